"""`srlm data validate`: a whole-file report on seed data, every problem with its file and line.

Errors (exit non-zero): a line that is not a valid record, duplicate ids, duplicate examples, an EFT
judgment whose concluding score is missing or differs from `score`, a prompt present in both IFT and EFT.
Warnings: overlong fields, and an EFT score distribution so skewed that the judge would learn it
(PAPER.md §2: the paper flattened its EFT scores; we warn when one score is over 30% of the set).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError
from .judging import eft_format_problem, parse_score
from .records import EFTExample, IFTExample, scan_jsonl

MAX_FIELD_CHARS = 8000
MAX_SCORE_SHARE = 0.30


@dataclass
class Report:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    score_histogram: dict[int, int] = field(default_factory=dict)
    categories: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors

    def render(self) -> str:
        lines = [f"{name}: {n} records" for name, n in self.counts.items()]
        if self.categories:
            lines.append("IFT categories: " + ", ".join(f"{k} {v}" for k, v in sorted(self.categories.items())))
        if self.score_histogram:
            lines.append("EFT scores: " + ", ".join(f"{k}: {v}" for k, v in sorted(self.score_histogram.items())))
        lines += [f"warning: {w}" for w in self.warnings]
        lines += [f"error: {e}" for e in self.errors]
        lines.append("OK" if self.ok else f"{len(self.errors)} error(s)")
        return "\n".join(lines)


def _records(path: Path, model, report: Report) -> list[tuple[int, object]]:
    good = []
    errors = len(report.errors)
    try:
        for number, item in scan_jsonl(path, model):
            if isinstance(item, InputError):
                report.errors.append(str(item))
            else:
                good.append((number, item))
    except InputError as e:
        report.errors.append(str(e))
        return []
    # This file's own errors: another file's name may hold this one's ("my_eft.jsonl" holds "eft.jsonl").
    if not good and len(report.errors) == errors:
        report.errors.append(f"{path}: file is empty (expected at least one {model.__name__} record)")
    report.counts[str(path)] = len(good)
    return good


def _long_fields(path: Path, number: int, record, report: Report) -> None:
    for name, value in record.model_dump().items():
        if isinstance(value, str) and len(value) > MAX_FIELD_CHARS:
            report.warnings.append(f"{path}:{number}: field '{name}': {len(value)} characters (over "
                                   f"{MAX_FIELD_CHARS}; training leaves out an example longer than its max_length tokens)")


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def validate(ift: Path | None = None, eft: Path | None = None) -> Report:
    report = Report()
    ift_prompts: dict[str, tuple[Path, int]] = {}
    if ift is not None:
        seen: dict[str, int] = {}
        records = _records(ift, IFTExample, report)
        for number, r in records:
            _long_fields(ift, number, r, report)
            key = normalise(r.prompt)
            if key in seen:
                report.errors.append(f"{ift}:{number}: field 'prompt': duplicate of the prompt on line {seen[key]}")
            seen.setdefault(key, number)
            ift_prompts.setdefault(key, (ift, number))
        report.categories = dict(Counter(r.category or "(none)" for _, r in records))
    if eft is not None:
        seen_pairs: dict[tuple[str, str], int] = {}
        scores: Counter = Counter()
        for number, r in _records(eft, EFTExample, report):
            _long_fields(eft, number, r, report)
            score, _ = parse_score(r.judgment)
            error = eft_format_problem(r.judgment)
            if error is not None:
                report.errors.append(f"{eft}:{number}: field 'judgment': must conclude with 'Score: N' ({error})")
            elif score != r.score:
                report.errors.append(f"{eft}:{number}: field 'score': {r.score}, but the judgment concludes "
                                     f"'Score: {score:g}'")
            pair = (normalise(r.prompt), normalise(r.response))
            if pair in seen_pairs:
                report.errors.append(f"{eft}:{number}: duplicate of the prompt and response on line {seen_pairs[pair]}")
            seen_pairs.setdefault(pair, number)
            if pair[0] in ift_prompts:
                where = "{}:{}".format(*ift_prompts[pair[0]])
                report.errors.append(f"{eft}:{number}: field 'prompt': also an IFT prompt ({where}); a prompt used "
                                     "for EFT must not be used for IFT")
            scores[r.score] += 1
        report.score_histogram = dict(sorted(scores.items()))
        total = sum(scores.values())
        if total:
            missing = sorted(set(range(6)) - set(scores))
            if missing:
                report.warnings.append(f"{eft}: no example with score {', '.join(map(str, missing))}: the judge "
                                       "never sees those scores")
            top, n = scores.most_common(1)[0]
            if n / total > MAX_SCORE_SHARE:
                report.warnings.append(f"{eft}: score {top} is {100 * n / total:.0f}% of the set (over "
                                       f"{100 * MAX_SCORE_SHARE:.0f}%): the judge may learn the prior, not the rubric")
    return report
