"""Pair selection (PAPER.md §4.4): best- vs worst-judged candidate of each prompt; ties dropped.

A pure function over records, tested without a model. Every prompt that yields no pair gets a reason,
so the summary can say how many were lost to ties, to judge failures, and to flagged or cut-off candidates.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import mean

from .records import Candidate, Judgment, Pair, Prompt

TIE = "tie"
TOO_FEW_JUDGED = "fewer than 2 candidates with a valid judgment"
TOO_FEW_UNFLAGGED = "only candidates with judge-format text scored above the lowest"
TOO_FEW_COMPLETE = "only cut-off candidates scored above the lowest"
TOO_FEW_ELIGIBLE = "only flagged or cut-off candidates scored above the lowest"
# Two samples can be the same text, and the judge can still score them apart (sampled justifications, or the
# rounding of a batch): such a pair would teach nothing and would count as a preference that is not one.
SAME_TEXT = "best and worst candidates are the same text"


@dataclass
class PairSelection:
    pairs: list[Pair]
    dropped: Counter = field(default_factory=Counter)  # reason -> number of prompts
    mean_scores: dict[str, float] = field(default_factory=dict)  # candidate id -> mean valid score

    def dropped_text(self) -> str:
        return ", ".join(f"{n} {reason}" for reason, n in self.dropped.most_common()) or "none"

    def none_left(self) -> str:
        """Why a selection has no pairs, for the error that stops DPO: what each prompt was dropped for, and what
        makes ties rarer (more prompts, candidates or judgments; the others are said by their reason)."""
        return (f"no preference pairs (prompts dropped: {self.dropped_text()}); more prompts (prompts.num_prompts), "
                "candidates (candidates.n) or judgments (judge.k) make ties rarer")


def as_recorded(selection: PairSelection, recorded: list[Pair] | None, counts: dict | None) -> PairSelection:
    """The selection as the run made it, for its statistics: `recorded`, its pairs.jsonl (None before the pairs
    stage), and `counts`, what the manifest counted for that stage. The same judgments may select otherwise under a
    newer srlm (a better tie-break), and a summary must count the pairs that were trained on."""
    same = lambda pairs: [(p.id, p.chosen_id, p.rejected_id) for p in pairs]
    if recorded is None or same(recorded) == same(selection.pairs):
        return selection
    dropped = Counter({k.removeprefix("dropped: "): v for k, v in (counts or {}).items() if k.startswith("dropped: ")})
    return PairSelection(pairs=list(recorded), dropped=dropped, mean_scores=selection.mean_scores)


def candidate_scores(judgments: Sequence[Judgment]) -> dict[str, float]:
    """Mean of the parsed scores of each candidate; candidates whose judgments all failed are absent."""
    scores: dict[str, list[float]] = defaultdict(list)
    for j in judgments:
        if j.score is not None:
            scores[j.candidate_id].append(j.score)
    return {cid: mean(values) for cid, values in scores.items()}


def select_pairs(
    prompts: Sequence[Prompt],
    candidates: Sequence[Candidate],
    judgments: Sequence[Judgment],
    *,
    exclude_flagged: bool = True,
    exclude_truncated: bool = True,
) -> PairSelection:
    """One pair per prompt: chosen = highest mean score, rejected = lowest; dropped on a tie (or when the two are
    the same text).

    A candidate takes part only with at least one parsed judgment (a failure is not a score). With
    `exclude_flagged`, one that contains judge-format text is never chosen (PAPER.md §7: a response can win by
    writing "Score: 5" for the judge to read), but may be rejected: it lost anyway. With `exclude_truncated`, the
    same for one cut at the length cap: as chosen, DPO would teach ending the turn mid-sentence (the chat template
    closes the turn after the cut text). Among equal top (or bottom) scores one whose text differs from the other
    side's wins, then the lowest candidate index, so selection is deterministic.
    """
    means = candidate_scores(judgments)
    by_prompt: dict[str, list[Candidate]] = defaultdict(list)
    for c in candidates:
        by_prompt[c.prompt_id].append(c)
    selection = PairSelection(pairs=[], mean_scores=means)
    for prompt in prompts:
        pool = sorted(by_prompt.get(prompt.id, []), key=lambda c: c.index)
        scored = [c for c in pool if c.id in means]
        if len(scored) < 2:
            selection.dropped[TOO_FEW_JUDGED] += 1
            continue
        worst = min(scored, key=lambda c: (means[c.id], c.index))
        if all(means[c.id] == means[worst.id] for c in scored):
            selection.dropped[TIE] += 1
            continue
        barred = lambda c: (exclude_flagged and c.flagged) or (exclude_truncated and c.truncated is True)
        # Among equal scores, a text other than the other side's: a repeated answer the judge scored apart (A, B, A
        # at 5, 5, 2) still leaves the pair B over A.
        differs = lambda c, other: c.text.strip() != other.text.strip()
        best = max((c for c in scored if not barred(c)), key=lambda c: (means[c.id], differs(c, worst), -c.index),
                   default=worst)
        worst = min(scored, key=lambda c: (means[c.id], not differs(c, best), c.index))
        if means[best.id] == means[worst.id]:  # lost to flagged or cut-off candidates, not to the judge
            above = [c for c in scored if means[c.id] > means[worst.id]]
            flagged = all(exclude_flagged and c.flagged for c in above)
            cut = all(exclude_truncated and c.truncated is True for c in above)
            selection.dropped[TOO_FEW_UNFLAGGED if flagged else TOO_FEW_COMPLETE if cut else TOO_FEW_ELIGIBLE] += 1
            continue
        if best.text.strip() == worst.text.strip():
            selection.dropped[SAME_TEXT] += 1
            continue
        selection.pairs.append(
            Pair(
                id=f"{prompt.id}-pair",
                prompt_id=prompt.id,
                prompt=prompt.text,
                chosen_id=best.id,
                rejected_id=worst.id,
                chosen=best.text,
                rejected=worst.text,
                chosen_score=means[best.id],
                rejected_score=means[worst.id],
            )
        )
    return selection
