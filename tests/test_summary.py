"""The end-of-run table (summary.py) and what a run says of its candidates' lengths."""
from srlm.backends import Completion
from srlm.candidates import respond, truncation_warning
from srlm.pairs import select_pairs
from srlm.records import Candidate, Judgment, Prompt
from srlm.summary import format_table, iteration_stats


class Cut:
    """A generator whose every other response is cut at the length cap."""

    def generate(self, requests, params):
        return [Completion(text=f"answer {i}", n_tokens=params.max_new_tokens if i % 2 else 3, truncated=bool(i % 2))
                for i in range(len(requests))]


def test_candidates_cut_at_the_cap_are_marked_counted_and_warned_of(tmp_path):
    prompts = [Prompt(id="p0", text="Name a colour.", iteration=1), Prompt(id="p1", text="Name a fruit.", iteration=1)]
    candidates = respond(Cut(), prompts, tmp_path / "candidates.jsonl", n=2, max_new_tokens=16, batch_size=4)
    assert [c.truncated for c in candidates] == [False, True, False, True]
    assert [c.n_tokens for c in candidates] == [3, 16, 3, 16]
    # p0: the cut candidate scores best (chosen), p1: the cut one scores worst (rejected).
    scores = {"p0-c0": 2, "p0-c1": 4, "p1-c0": 5, "p1-c1": 1}
    judgments = [Judgment(id=f"{c}-j0", candidate_id=c, prompt_id=c[:2], sample=0, text=f"Score: {s}", score=s)
                 for c, s in scores.items()]
    stats = iteration_stats([], candidates, judgments, select_pairs(prompts, candidates, judgments), n_prompts=2)
    assert (stats["candidates_truncated"], stats["chosen_truncated"], stats["rejected_truncated"]) == (2, 1, 1)
    assert "cut at the length cap: all (chosen / rejected)  2 (1 / 1)" in format_table({1: stats})
    assert truncation_warning(candidates, 16, 0.25).startswith("50% of candidates were cut at candidates.max_new_tokens=16")
    assert truncation_warning(candidates, 16, 0.5) is None  # not more than the limit
    assert truncation_warning(candidates[::2], 16, 0.0) is None and truncation_warning([], 16, 0.0) is None


def test_a_run_recorded_before_candidates_were_marked_says_it_does_not_know():
    old = Candidate.model_validate({"id": "p0-c0", "prompt_id": "p0", "index": 0, "text": "hi"})
    assert old.truncated is None  # not "not cut": unknown
    stats = iteration_stats([], [old], [], select_pairs([], [old], []), n_prompts=1)
    assert stats["candidates_truncated"] is None and stats["chosen_truncated"] == 0  # no pairs: nothing chosen
    assert "cut at the length cap: all (chosen / rejected)  - (0 / 0)" in format_table({1: stats})
    legacy = {k: v for k, v in stats.items() if "truncated" not in k}  # a summary.json of an older srlm
    assert "cut at the length cap: all (chosen / rejected)  - (- / -)" in format_table({1: legacy})
    assert truncation_warning([old], 16, 0.0) is None
