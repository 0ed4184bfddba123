from srlm.pairs import (
    TIE,
    TOO_FEW_COMPLETE,
    TOO_FEW_ELIGIBLE,
    TOO_FEW_JUDGED,
    TOO_FEW_UNFLAGGED,
    candidate_scores,
    select_pairs,
)
from srlm.records import Candidate, Judgment, Prompt


def make(scores_by_candidate: dict[int, list], flagged=(), prompt_id="p", truncated=()):
    prompt = Prompt(id=prompt_id, text="Q?", iteration=1)
    candidates = [Candidate(id=f"{prompt_id}-c{i}", prompt_id=prompt_id, index=i, text=f"answer {i}", n_tokens=10 * (i + 1),
                            flagged=i in flagged, truncated=i in truncated) for i in scores_by_candidate]
    judgments = [Judgment(id=f"{prompt_id}-c{i}-j{s}", candidate_id=f"{prompt_id}-c{i}", prompt_id=prompt_id, sample=s,
                          text="...", score=v, error=None if v is not None else "no 'Score: N' found")
                 for i, values in scores_by_candidate.items() for s, v in enumerate(values)]
    return [prompt], candidates, judgments


def test_best_vs_worst_by_mean_score():
    sel = select_pairs(*make({0: [3, 4, 4], 1: [1, 2, 2], 2: [4, 4, 4], 3: [2, 2, 2]}))
    (pair,) = sel.pairs
    assert (pair.chosen_id, pair.rejected_id) == ("p-c2", "p-c1")
    assert (pair.chosen_score, pair.rejected_score) == (4, 5 / 3)
    assert pair.chosen == "answer 2" and pair.prompt == "Q?"


def test_failed_judgments_are_ignored_not_zero():
    # c1's only "low" evidence is a failure: it must not become the rejected response.
    sel = select_pairs(*make({0: [4, None, 4], 1: [None, None, None], 2: [2, 3, None]}))
    (pair,) = sel.pairs
    assert (pair.chosen_id, pair.rejected_id) == ("p-c0", "p-c2")
    assert "p-c1" not in candidate_scores(make({1: [None]})[2])


def test_tie_drops_the_prompt():
    sel = select_pairs(*make({0: [3, 4], 1: [4, 3], 2: [3.5, 3.5]}))
    assert sel.pairs == [] and sel.dropped == {TIE: 1}


def test_all_failed_and_single_valid_drop_the_prompt():
    sel = select_pairs(*make({0: [None], 1: [None]}, prompt_id="a")[:3])
    assert sel.dropped == {TOO_FEW_JUDGED: 1}
    sel = select_pairs(*make({0: [5], 1: [None], 2: [None]}))
    assert sel.pairs == [] and sel.dropped == {TOO_FEW_JUDGED: 1}


def test_a_prompt_lost_to_flagged_candidates_is_counted_as_such_not_as_a_judge_failure():
    sel = select_pairs(*make({0: [5], 1: [3], 2: [3]}, flagged={0}))  # only the flagged one beat the rest
    assert sel.pairs == [] and sel.dropped == {TOO_FEW_UNFLAGGED: 1}
    sel = select_pairs(*make({0: [5], 1: [None], 2: [1]}, flagged={0, 2}))  # two judged, both flagged
    assert sel.dropped == {TOO_FEW_UNFLAGGED: 1}
    sel = select_pairs(*make({0: [5], 1: [None], 2: [None]}, flagged={0}))  # the judge left one scored: its loss
    assert sel.dropped == {TOO_FEW_JUDGED: 1}
    sel = select_pairs(*make({0: [3], 1: [3]}, flagged={0}))  # a tie is a tie, flagged or not
    assert sel.dropped == {TIE: 1}


def test_a_flagged_candidate_is_never_chosen_but_can_be_rejected():
    # PAPER.md §7: the hack is winning by writing "Score: 5"; a flagged response that lost is a fair negative.
    (pair,) = select_pairs(*make({0: [5], 1: [3], 2: [1]}, flagged={0, 2})).pairs
    assert (pair.chosen_id, pair.rejected_id) == ("p-c1", "p-c2")


def test_flagged_candidates_are_excluded_unless_allowed():
    data = make({0: [5, 5], 1: [3, 3], 2: [1, 1]}, flagged={0})
    (pair,) = select_pairs(*data).pairs
    assert (pair.chosen_id, pair.rejected_id) == ("p-c1", "p-c2")
    (pair,) = select_pairs(*data, exclude_flagged=False).pairs
    assert pair.chosen_id == "p-c0"


def test_a_candidate_cut_at_the_length_cap_is_never_chosen_but_can_be_rejected():
    # Chosen, a cut response becomes a DPO target the chat template closes after the cut: "end the turn mid-sentence".
    data = make({0: [5], 1: [3], 2: [1]}, truncated={0, 2})
    (pair,) = select_pairs(*data).pairs
    assert (pair.chosen_id, pair.rejected_id) == ("p-c1", "p-c2")
    (pair,) = select_pairs(*data, exclude_truncated=False).pairs
    assert (pair.chosen_id, pair.rejected_id) == ("p-c0", "p-c2")
    # Counted by what kept the prompt from a pair: the cap, judge-format text, or one of each.
    assert select_pairs(*make({0: [5], 1: [3]}, truncated={0})).dropped == {TOO_FEW_COMPLETE: 1}
    assert select_pairs(*make({0: [5], 1: [4], 2: [3]}, truncated={0}, flagged={1})).dropped == {TOO_FEW_ELIGIBLE: 1}
    assert select_pairs(*make({0: [5], 1: [3]}, truncated={0}, flagged={0})).dropped == {TOO_FEW_UNFLAGGED: 1}


def test_equal_top_scores_pick_the_lowest_index():
    (pair,) = select_pairs(*make({0: [2], 1: [5], 2: [5], 3: [2]})).pairs
    assert (pair.chosen_id, pair.rejected_id) == ("p-c1", "p-c0")


def test_several_prompts_counted_separately():
    p1, c1, j1 = make({0: [5], 1: [1]}, prompt_id="x")
    p2, c2, j2 = make({0: [3], 1: [3]}, prompt_id="y")
    p3, c3, j3 = make({0: [None], 1: [2]}, prompt_id="z")
    sel = select_pairs(p1 + p2 + p3, c1 + c2 + c3, j1 + j2 + j3)
    assert [p.prompt_id for p in sel.pairs] == ["x"]
    assert sel.dropped == {TIE: 1, TOO_FEW_JUDGED: 1}


def test_best_and_worst_of_the_same_text_is_no_preference():
    from srlm.pairs import SAME_TEXT

    prompts, candidates, judgments = make({0: [4, 5], 1: [3, 3], 2: [1, 2]})
    candidates = [c.model_copy(update={"text": "same answer"}) if c.index in (0, 2) else c for c in candidates]
    sel = select_pairs(prompts, candidates, judgments)
    assert sel.pairs == [] and sel.dropped == {SAME_TEXT: 1}


def test_among_equal_scores_a_text_other_than_the_other_sides_is_taken():
    # A, B, A scored 5, 5, 2: best-by-index was A (c0) against A (c2), a "same text" drop; B over A is the pair.
    prompts, candidates, judgments = make({0: [5], 1: [5], 2: [2]})
    same = lambda indices: [c.model_copy(update={"text": "A"}) if c.index in indices else c for c in candidates]
    (pair,) = select_pairs(prompts, same({0, 2}), judgments).pairs
    assert (pair.chosen_id, pair.rejected_id, pair.chosen, pair.rejected) == ("p-c1", "p-c2", "answer 1", "A")
    # The same on the rejected side: A, A, B scored 5, 2, 2.
    prompts, candidates, judgments = make({0: [5], 1: [2], 2: [2]})
    (pair,) = select_pairs(prompts, same({0, 1}), judgments).pairs
    assert (pair.chosen_id, pair.rejected_id) == ("p-c0", "p-c2")
