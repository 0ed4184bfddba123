"""`srlm report RUN_DIR`: the per-iteration table and plots of a run, rebuilt from its files.

Works on a finished run and on one still in progress (iterations whose pairs are not written yet are
left out), since everything it shows is derived from the records on disk.
"""
from __future__ import annotations

from pathlib import Path

from .pairs import select_pairs
from .prompts import PromptAttempt
from .records import Candidate, Judgment, Prompt, read_jsonl
from .rundir import RunDir
from .summary import format_table, iteration_stats


def collect(root: Path, exclude_flagged: bool = True) -> dict[int, dict]:
    run = RunDir(root)
    run.open()
    stats: dict[int, dict] = {}
    t = 1
    while (run.iteration(t) / "pairs.jsonl").exists():
        folder = run.iteration(t)
        prompts = read_jsonl(folder / "prompts.jsonl", Prompt)
        candidates = read_jsonl(folder / "candidates.jsonl", Candidate)
        judgments = read_jsonl(folder / "judgments.jsonl", Judgment)
        attempts = read_jsonl(folder / "prompts_attempts.jsonl", PromptAttempt)
        selection = select_pairs(prompts, candidates, judgments, exclude_flagged=exclude_flagged)
        stats[t] = iteration_stats(attempts, candidates, judgments, selection, len(prompts))
        t += 1
    return stats


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
        xs = sorted(float(s) for s in hist)
        axes[0].bar([x + k * width for x in xs], [hist[f"{x:g}"] for x in xs], width=width, label=labels[k])
    axes[0].set(title="judge scores", xlabel="score", ylabel="judgments")
    axes[0].legend()
    axes[1].plot(labels, [100 * stats[t]["parse_failure_rate"] for t in iterations], marker="o", label="parse failures")
    axes[1].plot(labels, [100 * stats[t]["max_score_share"] for t in iterations], marker="s", label="scores of 5")
    axes[1].set(title="judge integrity", ylabel="% of judgments")
    axes[1].legend()
    for key, name in (("mean_candidate_tokens", "all candidates"), ("mean_chosen_tokens", "chosen"),
                      ("mean_rejected_tokens", "rejected")):
        axes[2].plot(labels, [stats[t][key] or 0 for t in iterations], marker="o", label=name)
    axes[2].set(title="response length (length explosion, PAPER.md §7)", ylabel="tokens")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def report(root: Path, *, png: bool = True) -> str:
    stats = collect(root)
    if not stats:
        return f"{root}: no iteration has finished its pairs yet"
    text = format_table(stats)
    if png:
        text += f"\n\nplot: {plot(stats, Path(root) / 'report.png')}"
    return text
