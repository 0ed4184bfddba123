"""`srlm report RUN_DIR`: the per-iteration table and plots of a run, rebuilt from its files.

Works on a finished run, on one still in progress and on one the judge gate stopped, since everything it shows is
derived from the records on disk: an iteration appears once its judgments are complete (the gate's figures are the
ones a stopped run most needs), and one that has not been trained into M(t+1) is marked so.
"""
from __future__ import annotations

from pathlib import Path

from .pairs import as_recorded, select_pairs
from .prompts import PromptAttempt
from .records import Candidate, Judgment, Pair, Prompt, read_jsonl
from .rundir import RunDir
from .summary import format_table, iteration_stats


def collect(root: Path, exclude_flagged: bool | None = None) -> dict[int, dict]:
    """Each finished iteration's statistics, from its records; pairs are the run's (its pairs.jsonl, or before that
    stage selected as the run selects them: `judge.exclude_flagged` and `judge.exclude_truncated` of its
    config.yaml). `exclude_flagged`, if given, selects anew from the judgments with it."""
    run = RunDir(root)
    run.open()
    judge = _run_judge_settings(run)
    recount = exclude_flagged  # a selection asked for, not the run's: from the judgments alone
    if exclude_flagged is None:
        exclude_flagged = bool(judge.get("exclude_flagged", True))
    exclude_truncated = bool(judge.get("exclude_truncated", True))
    stats: dict[int, dict] = {}
    t = 1
    while (run.iteration(t) / "judgments.jsonl").exists():
        folder = run.iteration(t)
        prompts = read_jsonl(folder / "prompts.jsonl", Prompt)
        candidates = read_jsonl(folder / "candidates.jsonl", Candidate)
        judgments = read_jsonl(folder / "judgments.jsonl", Judgment)
        attempts = read_jsonl(folder / "prompts_attempts.jsonl", PromptAttempt)
        selection = select_pairs(prompts, candidates, judgments, exclude_flagged=exclude_flagged,
                                 exclude_truncated=exclude_truncated)
        if recount is None and (folder / "pairs.jsonl").exists():
            counts = run.read_manifest()["stages"].get(f"iter_{t}.pairs", {}).get("counts")
            selection = as_recorded(selection, read_jsonl(folder / "pairs.jsonl", Pair, allow_empty=True), counts)
        stats[t] = iteration_stats(attempts, candidates, judgments, selection, len(prompts))
        t += 1
    return stats


def _run_judge_settings(run: RunDir) -> dict:
    """The judge section of the run's config.yaml, with the keys it predates as that run behaved
    (config.run_config_data: a run made before judge.exclude_truncated chose cut-off candidates)."""
    import yaml

    from .config import run_config_data

    try:
        saved = yaml.safe_load(run.config_path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        saved = {}
    return run_config_data(saved).get("judge") or {}


def _save(fig, path: Path) -> None:
    """The figure as a PNG at `path`, whole or not at all (a kill mid-write leaves the previous plot)."""
    import io

    from .records import atomic_write_bytes

    png = io.BytesIO()
    fig.savefig(png, dpi=100, format="png")
    atomic_write_bytes(path, png.getvalue())


def plot(stats: dict[int, dict], path: Path) -> Path:
    """One PNG: score distribution, judge parse failures and saturation, and response lengths per iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    iterations = sorted(stats)
    labels = [f"AIFT(M{t})" for t in iterations]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    width = 0.8 / max(1, len(iterations))
    for k, t in enumerate(iterations):
        hist = stats[t]["score_histogram"]
        xs = sorted(int(s) for s in hist)  # whole-score bins (judging.score_bin)
        axes[0].bar([x + k * width for x in xs], [hist[str(x)] for x in xs], width=width, label=labels[k])
    axes[0].set(title="judge scores", xlabel="score", ylabel="judgments")
    axes[0].legend()
    axes[1].plot(labels, [100 * stats[t]["parse_failure_rate"] for t in iterations], marker="o", label="parse failures")
    # No parsed judgment: no share, a gap rather than 0%.
    shares = [stats[t]["max_score_share"] for t in iterations]
    axes[1].plot(labels, [float("nan") if x is None else 100 * x for x in shares], marker="s",
                 label="scores of 5 (% of parsed ones)")
    axes[1].set(title="judge integrity", ylabel="% of judgments")
    axes[1].legend()
    for key, name in (("mean_candidate_tokens", "all candidates"), ("mean_chosen_tokens", "chosen"),
                      ("mean_rejected_tokens", "rejected")):
        # No pairs: no chosen length, a gap in the line rather than a fall to 0 tokens.
        axes[2].plot(labels, [float("nan") if stats[t][key] is None else stats[t][key] for t in iterations],
                     marker="o", label=name)
    axes[2].set(title="response length (length explosion, PAPER.md §7)", ylabel="tokens")
    axes[2].legend(loc="upper left")
    # A cut response has the cap's length: a rising share of them is length growth the means above cannot show.
    cut = axes[2].twinx()
    shares = [float("nan") if stats[t].get("candidates_truncated") is None  # not recorded by an older srlm
              else 100 * stats[t]["candidates_truncated"] / max(stats[t]["candidates"], 1) for t in iterations]
    cut.plot(labels, shares, color="grey", linestyle="--", marker="x", label="cut at the length cap")
    cut.set(ylabel="% of candidates cut", ylim=(0, 105))
    cut.legend(loc="lower right")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


EVAL_ROWS = [
    ("judge pairwise accuracy", ("judge", "pairwise_accuracy")),
    ("judge exact match", ("judge", "exact_match")),
    ("judge Spearman", ("judge", "spearman")),
    ("judge Kendall tau", ("judge", "kendall_tau")),
    ("judge 5-best", ("judge", "five_best")),
    ("judge tie rate", ("judge", "judge_tie_rate")),
    ("judge parse failures", ("judge", "parse_failure_rate")),
    ("IFEval prompt strict", ("ifeval", "prompt_level_strict_acc")),
    ("IFEval prompt loose", ("ifeval", "prompt_level_loose_acc")),
    ("IFEval instruction strict", ("ifeval", "inst_level_strict_acc")),
    ("IFEval instruction loose", ("ifeval", "inst_level_loose_acc")),
    ("response tokens (IFEval)", ("ifeval", "mean_response_tokens")),
    # The paper reports wins and losses ("M2 vs M1 55.5 / 11.7"); the win rate counts a tie as half a win.
    ("wins vs previous", ("h2h_vs_previous", "rates", "win")),
    ("losses vs previous", ("h2h_vs_previous", "rates", "loss")),
    ("win rate vs previous", ("h2h_vs_previous", "win_rate")),
    ("LC win rate vs previous", ("h2h_vs_previous", "lc_win_rate")),
    # A prompt on which either order's verdict failed to parse is left out of every rate (PAPER.md §7: say so).
    ("prompts judged vs previous", ("h2h_vs_previous", "judged_prompts")),
    ("prompts left out vs previous (verdict unparsed)", ("h2h_vs_previous", "excluded_prompts")),
    ("response chars (vs previous)", ("h2h_vs_previous", "length", "a", "mean_chars")),
    ("wins vs SFT baseline", ("h2h_vs_sft", "rates", "win")),
    ("losses vs SFT baseline", ("h2h_vs_sft", "rates", "loss")),
    ("win rate vs SFT baseline", ("h2h_vs_sft", "win_rate")),
    ("LC win rate vs SFT baseline", ("h2h_vs_sft", "lc_win_rate")),
    ("prompts judged vs SFT baseline", ("h2h_vs_sft", "judged_prompts")),
    ("prompts left out vs SFT baseline", ("h2h_vs_sft", "excluded_prompts")),
    ("response chars (vs SFT baseline)", ("h2h_vs_sft", "length", "a", "mean_chars")),
]


def read_eval(root: Path) -> list[dict]:
    from .records import read_objects

    path = Path(root) / "eval.jsonl"
    # srlm writes it whole (atomically); a hand edit gets a file:line error, not a traceback.
    return read_objects(path) if path.exists() else []


def _value(result: dict, key: tuple[str, ...]):
    for part in key:
        result = result.get(part) if isinstance(result, dict) else None
    return result


def format_eval_table(results: list[dict]) -> str:
    """Both skills per model (PAPER.md §5): judge agreement with humans, instruction following, and length."""
    rows = [(label, key) for label, key in EVAL_ROWS if any(_value(r, key) is not None for r in results)]
    headers = ["", *[r["model"] for r in results]]
    # Counts, lengths, shares.
    cell = lambda v: "-" if v is None else str(v) if isinstance(v, int) else f"{v:.1f}" if abs(v) >= 10 else f"{v:.3f}"
    body = [[label, *[cell(_value(r, key)) for r in results]] for label, key in rows]
    widths = [max(len(row[i]) for row in [headers, *body]) for i in range(len(headers))]
    line = lambda row: "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, body)])


def plot_eval(results: list[dict], path: Path) -> Path | None:
    """eval.png: judge agreement, IFEval accuracy and response length per model."""
    if not results:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [r["model"] for r in results]
    # (title, y label, series); the length panel's second unit goes on an axis of its own on the right.
    panels = [
        ("judge agreement with humans", "agreement (share or correlation)", [
            ("pairwise accuracy", ("judge", "pairwise_accuracy")), ("exact match", ("judge", "exact_match")),
            ("Spearman", ("judge", "spearman")), ("Kendall tau", ("judge", "kendall_tau")),
            ("5-best", ("judge", "five_best")), ("parse failures", ("judge", "parse_failure_rate"))]),
        ("IFEval", "accuracy", [("prompt strict", ("ifeval", "prompt_level_strict_acc")),
                                ("prompt loose", ("ifeval", "prompt_level_loose_acc")),
                                ("instruction strict", ("ifeval", "inst_level_strict_acc")),
                                ("instruction loose", ("ifeval", "inst_level_loose_acc"))]),
        ("head-to-head", "share of prompts", [("win rate vs previous", ("h2h_vs_previous", "win_rate")),
                                              ("LC win rate vs previous", ("h2h_vs_previous", "lc_win_rate")),
                                              ("win rate vs SFT baseline", ("h2h_vs_sft", "win_rate")),
                                              ("LC win rate vs SFT baseline", ("h2h_vs_sft", "lc_win_rate"))]),
        ("response length", "mean tokens (IFEval)", [("IFEval, tokens", ("ifeval", "mean_response_tokens"))]),
    ]
    chars = [("head-to-head vs previous, chars", ("h2h_vs_previous", "length", "a", "mean_chars")),
             ("head-to-head vs SFT, chars", ("h2h_vs_sft", "length", "a", "mean_chars"))]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))

    def draw(ax, series, **style) -> bool:
        drawn = False
        for name, key in series:
            values = [_value(r, key) for r in results]
            if any(v is not None for v in values):
                ax.plot(models, [float("nan") if v is None else v for v in values], marker="o", label=name, **style)
                drawn = True
        return drawn

    for ax, (title, unit, series) in zip(axes, panels):
        draw(ax, series)
        ax.set(title=title, ylabel=unit)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    right = axes[-1].twinx()
    if draw(right, chars, linestyle="--"):
        right.set(ylabel="mean characters (head-to-head)")
        right.legend(loc="lower right", fontsize="small")
    else:
        right.remove()
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def report(root: Path, *, png: bool = True) -> str:
    stats = collect(root)
    results = read_eval(root)
    if not stats and not results:
        return f"{root}: no iteration has finished its judgments yet"
    parts = []
    if stats:
        run = RunDir(root)
        untrained = [t for t in stats if not run.model(t + 1).is_dir()]  # published whole, by rename
        parts.append(format_table(stats) + "".join(
            f"\nAIFT(M{t}): judged, not trained into M{t + 1} (stopped before DPO, or still running; the pairs "
            "shown are those it would train on)" for t in untrained))
        if png:
            parts.append(f"plot: {plot(stats, Path(root) / 'report.png')}")
    if results:
        parts.append("evaluation (PAPER.md §5)\n" + format_eval_table(results))
        if png:
            parts.append(f"plot: {plot_eval(results, Path(root) / 'eval.png')}")
    return "\n\n".join(parts)
