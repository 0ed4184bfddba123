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
    # As a run with judge.exclude_truncated=false pairs them (by default a cut candidate is never chosen: p0 drops).
    chosen_too = select_pairs(prompts, candidates, judgments, exclude_truncated=False)
    stats = iteration_stats([], candidates, judgments, chosen_too, n_prompts=2)
    assert (stats["candidates_truncated"], stats["chosen_truncated"], stats["rejected_truncated"]) == (2, 1, 1)
    assert "cut at the length cap: all (chosen / rejected)  2 (1 / 1)" in format_table({1: stats})
    stats = iteration_stats([], candidates, judgments, select_pairs(prompts, candidates, judgments), n_prompts=2)
    assert (stats["pairs"], stats["chosen_truncated"], stats["rejected_truncated"]) == (1, 0, 1)
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


def test_scores_fall_in_six_whole_bins_in_either_judge_mode():
    # An `expected` judge's scores are fractions: each its own bar before, unreadable in the table and the plot.
    from srlm.judging import score_bin

    assert [score_bin(s) for s in (0.0, 0.49, 0.5, 2.5, 2.7768, 3.5, 4.5, 5.0)] == ["0", "0", "1", "3", "3", "4", "5",
                                                                                     "5"]
    scores = [4.5, 2.7768, 3.0, 0.4, 5.0, 3.2]
    judgments = [Judgment(id=f"c{i}-e", candidate_id=f"c{i}", prompt_id="p0", sample=0, text="", score=s)
                 for i, s in enumerate(scores)]
    stats = iteration_stats([], [], judgments, select_pairs([], [], judgments), n_prompts=1)
    assert stats["score_histogram"] == {"0": 1, "3": 3, "5": 2}
    assert stats["max_score_share"] == 2 / 6  # the scores in the 5 bin


def test_failures_count_by_kind_and_a_judge_with_no_parsed_score_has_no_share_of_5s(tmp_path):
    # Each failure's snippet made its own entry in summary.json; with none parsed the share of 5s read "0.0%".
    from srlm.report import plot

    errors = ["not one score (3-4)", "not one score (2, 3)", "verdicts that disagree (4, then 2)",
              "no 'Score: N' found (cut off at max_new_tokens)", "no 'Score: N' found (cut off at max_new_tokens)"]
    judgments = [Judgment(id=f"c{i}-j0", candidate_id=f"c{i}", prompt_id="p0", sample=0, text="x", error=e)
                 for i, e in enumerate(errors)]
    stats = iteration_stats([], [], judgments, select_pairs([], [], judgments), n_prompts=1)
    assert stats["parse_failure_reasons"] == {"not one score": 2, "no 'Score: N' found (cut off at max_new_tokens)": 2,
                                              "verdicts that disagree": 1}
    rows = {line.split("  ")[0]: line.split()[-1] for line in format_table({1: stats}).splitlines()[2:]}
    assert stats["max_score_share"] is None and rows["share of 5s"] == "-"
    assert plot({1: stats}, tmp_path / "report.png").stat().st_size > 0


def test_the_eval_table_shows_the_papers_figures(tmp_path):
    # PAPER.md §5-6: 5-best among the judge's metrics, wins and losses (not only the win rate), length in chars.
    from srlm.report import format_eval_table, plot_eval

    results = [{"model": "M1", "judge": {"pairwise_accuracy": 0.6, "five_best": 0.4}},
               {"model": "M2", "judge": {"pairwise_accuracy": 0.65, "five_best": 0.5},
                "h2h_vs_previous": {"rates": {"win": 0.555, "tie": 0.328, "loss": 0.117}, "win_rate": 0.7190,
                                    "judged_prompts": 251, "excluded_prompts": 5,
                                    "length": {"a": {"mean_chars": 1092.25, "mean_words": 180.0}}}}]
    rows = {line.split("  ")[0]: line.split()[-2:] for line in format_eval_table(results).splitlines()[2:]}
    assert rows["judge 5-best"] == ["0.400", "0.500"]
    assert rows["wins vs previous"] == ["-", "0.555"] and rows["losses vs previous"] == ["-", "0.117"]
    assert rows["response chars (vs previous)"] == ["-", "1092.2"]
    # The rates are over the prompts whose verdicts parsed: how many those are, and how many were left out.
    assert rows["prompts judged vs previous"] == ["-", "251"]
    assert rows["prompts left out vs previous (verdict unparsed)"] == ["-", "5"]
    assert "LC win rate vs previous" not in rows  # no figure for any model: no row
    assert plot_eval(results, tmp_path / "eval.png").stat().st_size > 0
