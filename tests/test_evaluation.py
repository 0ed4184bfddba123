"""Judge-agreement metrics against values computed by hand."""
import json

import pytest

from srlm.evaluation import RankedReply, heldout, judge_agreement, kendall_tau_b, load_ranked, spearman


def replies(prompt_id, human):
    return [RankedReply(id=f"{prompt_id}{i}", prompt_id=prompt_id, prompt="Q", reply=f"r{i}", human_score=h)
            for i, h in enumerate(human)]


def test_perfect_agreement():
    r = replies("a", [0.9, 0.5, 0.1])
    m = judge_agreement(r, {"a0": 5, "a1": 3, "a2": 1})
    assert (m.pairwise_accuracy, m.exact_match, m.spearman, m.kendall_tau, m.five_best) == (1, 1, 1, 1, 1)
    assert m.judge_tie_rate == 0 and m.pairs == 3 and m.prompts == 1


def test_hand_computed_mixed_case():
    # Prompt a: human a0 > a1 > a2; judge 4, 4, 2 -> pairs (0,1) tie, (0,2) agree, (1,2) agree.
    # Prompt b: human b0 > b1; judge 1, 3 -> disagree.  Prompt c: one scored reply -> no pairs.
    r = replies("a", [0.9, 0.5, 0.1]) + replies("b", [0.8, 0.2]) + replies("c", [0.7, 0.3])
    scores = {"a0": 4, "a1": 4, "a2": 2, "b0": 1, "b1": 3, "c0": 5}
    m = judge_agreement(r, scores)
    assert m.pairs == 4
    assert m.pairwise_accuracy == pytest.approx(2 / 4)
    assert m.judge_tie_rate == pytest.approx(1 / 4)
    assert m.exact_match == 0  # a has a tie, b disagrees
    assert m.prompts == 2
    # Spearman a: judge ranks (2.5, 2.5, 1) vs human (3, 2, 1) -> 0.866; b: -1. Mean -0.067.
    assert m.spearman == pytest.approx((0.8660254 - 1) / 2)
    # Kendall tau-b a: C=2, D=0, ties in judge only = 1 -> 2 / sqrt(3 * 2) = 0.8165; b: -1.
    assert m.kendall_tau == pytest.approx((2 / 6 ** 0.5 - 1) / 2)
    # c0 got a 5 and is the humans' best; c1's judgment failed, which leaves c out of every pair metric, not 5-best.
    assert m.five_best == 1
    assert m.replies_scored == 6 and m.replies_failed == 1


def test_five_best_counts_only_scores_that_round_to_five():
    r = replies("a", [0.9, 0.5]) + replies("b", [0.2, 0.8])
    m = judge_agreement(r, {"a0": 5, "a1": 4.67, "b0": 4.5, "b1": 4.33})
    assert m.five_best == pytest.approx(1 / 3)  # a0 is best; a1 and b0 are not; b1 (5, 4, 4) is no 5


def test_five_best_is_against_the_humans_best_of_all_replies_and_needs_a_human_order():
    # a0, the humans' best, failed to parse: a1's 5 goes to their second best, not to "the best of those scored".
    m = judge_agreement(replies("a", [0.9, 0.7, 0.5]), {"a1": 5, "a2": 3})
    assert m.five_best == 0
    # A tied pair label (both replies 0.5) ranks nothing: its 5s count in no metric, 5-best included.
    m = judge_agreement(replies("t", [0.5, 0.5]) + replies("p", [1.0, 0.0]), {"t0": 5, "t1": 5, "p0": 3, "p1": 5})
    assert m.five_best == 0 and m.pairs == 1 and m.prompts == 1
    # One parsed reply counts as well as two (the 5 above, alone: still not the best).
    assert judge_agreement(replies("a", [0.9, 0.7, 0.5]), {"a1": 5}).five_best == 0
    # Replies tied for the humans' best are each best.
    m = judge_agreement(replies("b", [0.9, 0.9, 0.1]), {"b0": 5, "b1": 5, "b2": 1})
    assert m.five_best == 1


def test_all_equal_scores_and_human_ties():
    m = judge_agreement(replies("a", [0.5, 0.5, 0.5]), {"a0": 3, "a1": 4, "a2": 5})
    assert m.pairs == 0 and m.pairwise_accuracy is None and m.spearman is None
    m = judge_agreement(replies("a", [0.9, 0.1]), {"a0": 3, "a1": 3})
    assert m.pairwise_accuracy == 0 and m.judge_tie_rate == 1 and m.spearman == 0 and m.kendall_tau == 0
    assert m.prompts_judge_constant == 1


def test_a_prompt_the_judge_scores_all_alike_counts_as_no_correlation_not_as_absent():
    # a: the judge orders nothing; b: it orders perfectly. Left out, a would make the mean 1.0 while pairwise
    # accuracy is 0.5.
    r = replies("a", [3, 2, 1]) + replies("b", [5, 4, 3])
    m = judge_agreement(r, {"a0": 4, "a1": 4, "a2": 4, "b0": 5, "b1": 3, "b2": 1})
    assert m.pairwise_accuracy == pytest.approx(0.5)
    assert m.spearman == pytest.approx(0.5) and m.kendall_tau == pytest.approx(0.5)
    assert m.prompts_judge_constant == 1


def test_rank_correlations():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1)
    assert kendall_tau_b([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    assert spearman([1, 1], [1, 2]) is None


def test_oasst_export_is_read_and_split_by_prompt(tmp_path):
    path = tmp_path / "ranked.jsonl"
    rows = [{"prompt_id": f"p{i}", "prompt_text": f"Q{i}", "response_id": f"p{i}-r{j}", "response_text": f"A{j}",
             "language": "en", "quality_score": j / 2} for i in range(40) for j in range(2)]
    rows.append({**rows[0], "response_id": "unrated", "quality_score": None})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    eval_part, train_part = load_ranked(path, "eval"), load_ranked(path, "train")
    assert len(eval_part) + len(train_part) == 80  # the unrated reply is left out
    assert {r.prompt_id for r in eval_part}.isdisjoint({r.prompt_id for r in train_part})
    assert all(heldout(r.prompt_id) for r in eval_part) and eval_part[0].reply.startswith("A")


def write(tmp_path, rows, name="pairs.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_pairwise_labels_become_two_reply_prompts(tmp_path):
    path = write(tmp_path, [
        {"id": "x", "prompt": "Q1", "response_a": "good", "response_b": "bad", "winner": "A"},
        {"instruction": "Q1", "output_1": "meh", "output_2": "great", "preference": 2},  # AlpacaEval names
        {"question": "Q3", "output_a": "one", "output_b": "two", "winner": "tie"},
        {"prompt": "Q4", "response_a": "p", "response_b": "q", "label": "model_b"},  # Chatbot Arena's labels
    ])
    r = load_ranked(path, "all")
    assert [x.id for x in r] == ["x-a", "x-b", "pair00002-a", "pair00002-b", "pair00003-a", "pair00003-b",
                                 "pair00004-a", "pair00004-b"]
    # Same prompt text, different pairs: never compared across pairs.
    assert r[0].prompt == r[2].prompt and r[0].prompt_id != r[2].prompt_id
    # Judge: x right way round, pair 2 wrong way round, pair 3 a human tie (no metric), pair 4 a judge tie.
    scores = {"x-a": 5, "x-b": 2, "pair00002-a": 4, "pair00002-b": 1, "pair00003-a": 1, "pair00003-b": 5,
              "pair00004-a": 3, "pair00004-b": 3}
    m = judge_agreement(r, scores)
    assert m.pairs == 3 and m.prompts == 3
    assert m.pairwise_accuracy == pytest.approx(1 / 3)
    assert m.judge_tie_rate == pytest.approx(1 / 3)


def test_preference_pairs_chosen_is_better(tmp_path):
    path = write(tmp_path, [{"prompt": "Q", "chosen": "yes", "rejected": "no"}])
    (a, b) = load_ranked(path, "all")
    assert (a.reply, a.human_score, b.reply, b.human_score) == ("yes", 1.0, "no", 0.0)


@pytest.mark.parametrize("row,fragments", [
    ({"prompt": "Q", "response_a": "a", "response_b": "b", "winner": "C"}, ["pairs.jsonl:1: field 'winner'", "expected A, B or tie"]),
    ({"prompt": "Q", "response_a": "a", "winner": "A"}, ["pairs.jsonl:1: field 'response_b'", "missing"]),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, ["pairs.jsonl:1: field 'prompt'", "valid string"]),
    # A number as `label` follows no one convention (0 = tie in AlpacaEval, often 0 = the first response elsewhere).
    ({"prompt": "Q", "response_a": "a", "response_b": "b", "label": 0}, ["pairs.jsonl:1", "label 0", "winner: A, B"]),
    ({"prompt": "Q", "response_a": "a", "response_b": "b", "label": "1"}, ["pairs.jsonl:1", "label '1'"]),
])
def test_bad_pairwise_rows_name_line_and_field(tmp_path, row, fragments):
    from srlm.errors import InputError

    with pytest.raises(InputError) as e:
        load_ranked(write(tmp_path, [row]), "all")
    for fragment in fragments:
        assert fragment in str(e.value)


def test_judgments_of_one_set_of_replies_are_not_resumed_for_another(tmp_path):
    """eval/<model>/judge/judgments.jsonl resumes: a resumed run may change eval.judge_max_prompts, and the
    judgments kept must then not be counted for a set they were not made for."""
    from srlm.backends import Completion
    from srlm.config import load_config
    from srlm.errors import RunDirError
    from srlm.evaluation import measure_judge

    class Judge:
        def generate(self, requests, params):
            return [Completion(text="Fine. Score: 3", n_tokens=4, truncated=False) for _ in requests]

    config = load_config(overrides=["generation.batch_size=4", "judge.k=1"])
    few, more = replies("a", [0.9, 0.1]), replies("a", [0.9, 0.1]) + replies("b", [0.5, 0.2])
    assert measure_judge(Judge(), few, tmp_path, config, seed=0)["pairs"] == 1
    assert measure_judge(Judge(), few, tmp_path, config, seed=0)["pairs"] == 1  # the same: resumed, as it was
    with pytest.raises(RunDirError, match="holds judgments made with other settings"):
        measure_judge(Judge(), more, tmp_path, config, seed=0)
    with pytest.raises(RunDirError, match="judge.k: 1 -> 3"):
        measure_judge(Judge(), few, tmp_path, load_config(overrides=["generation.batch_size=4"]), seed=0)


def test_pairs_of_one_prompt_fall_on_one_side_of_the_split(tmp_path):
    # Split by pair id, pairs sharing a prompt landed in both EFT (train) and the judge evaluation (eval).
    rows = [{"prompt": f"Question {i % 10}?", "response_a": f"a{i}", "response_b": f"b{i}", "winner": "A"}
            for i in range(60)]
    path = write(tmp_path, rows)
    eval_part, train_part = load_ranked(path, "eval"), load_ranked(path, "train")
    assert len(eval_part) + len(train_part) == 120 and eval_part and train_part
    assert {r.prompt for r in eval_part}.isdisjoint({r.prompt for r in train_part})
    # The prompt's text decides, spaced and cased as it may be.
    again = write(tmp_path, [{**row, "prompt": "  " + row["prompt"].upper()} for row in rows], "again.jsonl")
    assert {r.prompt.strip().lower() for r in load_ranked(again, "eval")} == {r.prompt.lower() for r in eval_part}


def test_a_reply_text_repeated_within_a_prompt_is_one_reply_to_the_metrics(tmp_path, capsys):
    # oasst2 holds replies given twice ("e6" scored 0.75 and 0.83): as a ranked pair, the judge could order it
    # only by sampling noise, and a tie counted against it.
    rows = [{"prompt_id": "p", "prompt_text": "Q", "response_id": f"r{j}", "response_text": text, "language": "en",
             "quality_score": score} for j, (text, score) in enumerate([("e6", 0.75), ("E6 ", 0.83), ("long", 0.1)])]
    r = load_ranked(write(tmp_path, rows, "oasst.jsonl"), "all")
    assert [x.human_score for x in r] == [pytest.approx(0.79), pytest.approx(0.79), 0.1]
    assert "2 replies repeat the text of another reply of their prompt" in capsys.readouterr().err
    m = judge_agreement(r, {"r0": 4, "r1": 4, "r2": 1})
    assert m.pairs == 2 and m.pairwise_accuracy == 1 and m.judge_tie_rate == 0 and m.exact_match == 1


def test_exact_match_needs_every_reply_of_a_prompt_parsed():
    # The best and worst failed to parse and the middle two are ordered right: the whole ordering is unknown, so
    # the prompt is no exact match (nor a miss) and is counted apart.
    r = replies("a", [0.9, 0.7, 0.5, 0.1]) + replies("b", [0.9, 0.1])
    m = judge_agreement(r, {"a1": 4, "a2": 2, "b0": 1, "b1": 3})
    assert m.exact_match == 0 and m.prompts == 1 and m.prompts_partly_parsed == 1
    assert m.pairwise_accuracy == pytest.approx(1 / 2)  # a1 > a2 right, b wrong: pairs count as they parsed
