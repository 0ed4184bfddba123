"""Seed data: the human-written IFT and EFT sets (PAPER.md §2), shipped with srlm or given by the user.

Schemas (JSONL, one object a line; see `srlm/seed/README.md`):
    IFT: {"id", "prompt", "response", "category"?}
    EFT: {"id", "prompt", "response", "judgment", "score"}  -- judgment ends with "Score: N", N == score
"""
from __future__ import annotations

import importlib.resources
from pathlib import Path

from .errors import InputError
from .judging import eft_format_problem, parse_score
from .records import EFTExample, IFTExample, read_jsonl, scan_jsonl


def shipped(name: str) -> Path:
    return Path(str(importlib.resources.files("srlm") / "seed" / f"{name}.jsonl"))


_told: set[tuple[str, int, int]] = set()


def _say_limit(path: Path | None, kept: int, total: int, key: str, which: str = "the first") -> None:
    """A user's own seed file cut by a preset's limit is said once (the shipped seed's limit is the preset's to set):
    a run on 24 of 3,000 examples, unannounced, looks like a run on all of them."""
    if path is None or kept >= total or (str(path), kept, total) in _told:
        return
    import sys

    _told.add((str(path), kept, total))
    print(f"[srlm] {path}: using {which} {kept} of {total} examples ({key}={kept}; --set {key}=null for all)",
          file=sys.stderr)


def load_ift(path: Path | None = None, limit: int | None = None) -> list[IFTExample]:
    try:
        records = read_jsonl(path or shipped("ift"), IFTExample)
    except InputError as e:
        if e.field in ("judgment", "score"):  # an unknown field of IFT, and EFT's own
            raise InputError(f"{e}; this looks like an EFT file (give it as --eft)") from e
        raise
    kept = records[:limit] if limit else records
    _say_limit(path, len(kept), len(records), "data.ift_limit")
    return kept


def load_eft(path: Path | None = None, limit: int | None = None) -> list[EFTExample]:
    given, path = path, path or shipped("eft")
    records = []
    for number, record in scan_jsonl(path, EFTExample):
        if isinstance(record, InputError):
            raise record
        score, _ = parse_score(record.judgment)
        error = eft_format_problem(record.judgment)
        if error is not None:
            raise InputError(f"record {record.id!r}: the judgment must end with 'Score: N' ({error})",
                             path=path, line=number, field="judgment")
        if score != record.score:
            raise InputError(f"record {record.id!r}: judgment concludes 'Score: {score:g}' but score is {record.score}",
                             path=path, line=number, field="score")
        records.append(record)
    if not records:
        raise InputError("file is empty (expected at least one EFTExample record)", path=path)
    kept = balanced_head(records, limit) if limit else records
    _say_limit(given, len(kept), len(records), "data.eft_limit", "a score-balanced")
    return kept


def balanced_head(records: list[EFTExample], limit: int) -> list[EFTExample]:
    """The first `limit` records taken round-robin over scores, so a small subset still teaches every score."""
    by_score: dict[int, list[EFTExample]] = {}
    for r in records:
        by_score.setdefault(r.score, []).append(r)
    out: list[EFTExample] = []
    queues = [list(v) for _, v in sorted(by_score.items())]
    while len(out) < limit and any(queues):
        for q in queues:
            if q and len(out) < limit:
                out.append(q.pop(0))
    return out
