"""What a run reports per iteration (the end-of-run table): pure functions over the stage records."""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from statistics import mean

from .judging import MAX_SCORE, score_bin
from .pairs import TIE, PairSelection
from .records import Candidate, Judgment


def iteration_stats(
    attempts: Sequence, candidates: Sequence[Candidate], judgments: Sequence[Judgment], selection: PairSelection,
    n_prompts: int,
) -> dict:
    valid = [j.score for j in judgments if j.score is not None]
    failures = len(judgments) - len(valid)
    by_id = {c.id: c for c in candidates}
    chosen = [by_id[p.chosen_id] for p in selection.pairs if p.chosen_id in by_id]
    rejected = [by_id[p.rejected_id] for p in selection.pairs if p.rejected_id in by_id]
    histogram = Counter(score_bin(s) for s in valid)
    return {
        "prompts_generated": len(attempts),
        "prompts_kept": n_prompts,
        "prompt_drop_reasons": dict(Counter(a.reason for a in attempts if not a.kept)),
        "candidates": len(candidates),
        "candidates_flagged": sum(c.flagged for c in candidates),
        "candidates_truncated": _count_cut(candidates),
        "chosen_truncated": _count_cut(chosen),
        "rejected_truncated": _count_cut(rejected),
        "judgments": len(judgments),
        "parse_failures": failures,
        "parse_failure_rate": failures / len(judgments) if judgments else 0.0,
        "parse_failure_reasons": dict(Counter(failure_kind(j.error) for j in judgments if j.error).most_common()),
        "mean_score": mean(valid) if valid else None,
        "score_histogram": dict(sorted(histogram.items())),
        "max_score_share": sum(1 for s in valid if s >= MAX_SCORE - 0.5) / len(valid) if valid else None,
        "pairs": len(selection.pairs),
        "ties_dropped": selection.dropped.get(TIE, 0),
        "dropped_other": {k: v for k, v in selection.dropped.items() if k != TIE},
        "mean_chosen_tokens": mean(c.n_tokens for c in chosen) if chosen else None,
        "mean_rejected_tokens": mean(c.n_tokens for c in rejected) if rejected else None,
        "mean_candidate_tokens": mean(c.n_tokens for c in candidates) if candidates else None,
    }


def failure_kind(error: str) -> str:
    """A parse failure's reason without the judgment's own words ("not one score (3-4)" -> "not one score"), so that
    failures of one kind count together; each judgment's record keeps the whole reason."""
    kind = re.sub(r"\s*\((?!cut off at max_new_tokens\)).*?\)(?=\s*(?:\(|$))", "", error)
    return re.sub(r"\d+%", "N%", kind)  # expected mode's share of probability on the digits


def _count_cut(candidates: Sequence[Candidate]) -> int | None:
    """How many were cut at the length cap; None where a run of an older srlm did not record it."""
    if any(c.truncated is None for c in candidates):
        return None
    return sum(bool(c.truncated) for c in candidates)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, dict):
        return ", ".join(f"{k}:{v}" for k, v in value.items()) or "-"
    return str(value)


ROWS = [
    ("prompts generated", lambda s: s["prompts_generated"]),
    ("prompts kept by filters", lambda s: s["prompts_kept"]),
    ("candidates (flagged)", lambda s: f"{s['candidates']} ({s['candidates_flagged']})"),
    ("judgments", lambda s: s["judgments"]),
    ("judge parse failures", lambda s: f"{s['parse_failures']} ({100 * s['parse_failure_rate']:.1f}%)"),
    ("mean score", lambda s: _fmt(s["mean_score"])),
    ("score distribution", lambda s: _fmt(s["score_histogram"])),
    ("share of 5s", lambda s: "-" if s["max_score_share"] is None else f"{100 * s['max_score_share']:.1f}%"),
    ("pairs kept", lambda s: s["pairs"]),
    ("ties dropped", lambda s: s["ties_dropped"]),
    ("other drops", lambda s: _fmt(s["dropped_other"])),
    ("mean chosen / rejected tokens",
     lambda s: f"{_fmt(s['mean_chosen_tokens'])} / {_fmt(s['mean_rejected_tokens'])}"),
    # "-" where a run of an older srlm did not record it.
    ("cut at the length cap: all (chosen / rejected)",
     lambda s: f"{_fmt(s.get('candidates_truncated'))} ({_fmt(s.get('chosen_truncated'))} / "
               f"{_fmt(s.get('rejected_truncated'))})"),
]


def format_table(per_iteration: dict[int, dict]) -> str:
    """A plain-text table, one column per iteration (AIFT(M1), AIFT(M2), ...)."""
    headers = ["", *[f"AIFT(M{t})" for t in sorted(per_iteration)]]
    body = [[label, *[str(fn(per_iteration[t])) for t in sorted(per_iteration)]] for label, fn in ROWS]
    widths = [max(len(row[i]) for row in [headers, *body]) for i in range(len(headers))]
    line = lambda row: "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, body)])
