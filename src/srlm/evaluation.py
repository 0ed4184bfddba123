"""Reward-modeling evaluation (PAPER.md §5): how well the model's judge agrees with human rankings.

Input: prompts with several human-rated replies (`RankedReply` records, or the oasst2-srlm export), or
pairwise labels (a prompt, two responses, which one humans preferred: `PairwiseLabel`, or the `{prompt,
chosen, rejected}` preference format). The model judges every reply with the same judge stage the loop
uses; per prompt, its ordering is compared with the human one (a labelled pair is a prompt with two replies,
so its pairwise accuracy is the share of pairs the judge scores the human way round):

- pairwise accuracy: of the reply pairs with different human scores, the share the judge orders the same way;
- exact match: the share of prompts where the judge orders every such pair the same way;
- Spearman and Kendall tau (tau-b) between judge and human scores, averaged over prompts where the human scores
  vary;
- 5-best: of the replies the judge gives a 5, the share that humans rated best for their prompt. A reply's score is
  the mean of its k judgments (or the expected score), so "gives a 5" is a score that rounds to 5, 4.5 or more (with
  k=3: two 5s and a 4 at least); an exact 5 would ask every judgment for it, and never happen in `expected` mode.

Tie convention (the paper does not state one): a pair the judge scores equally counts as *not* agreeing in
pairwise accuracy and exact match; the share of such pairs is reported as `judge_tie_rate`. Likewise a prompt
whose replies the judge scores all alike, where the humans do not, has a rank correlation of 0 (no order, so no
agreement), not none: leaving it out would raise the mean over the prompts the judge does order; their number is
`prompts_judge_constant`. A reply whose judgments all failed to parse is left out of every metric, and the failures
are counted; a prompt with such a reply has no known whole ordering, so it is left out of exact match (counted as
`prompts_partly_parsed`). Replies of one prompt with the same text (by `normalise`) are one reply that humans scored
twice: `load_ranked` gives each the mean of their human scores, so that no pair of them asks the judge to rank a text
against itself.
"""
from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from statistics import mean

from pydantic import AliasChoices, Field, field_validator, model_validator

from .errors import InputError
from .records import Candidate, Prompt, Record, open_input, read_jsonl
from .validate import normalise

TIE_CONVENTION = ("judge ties count as disagreement in pairwise accuracy and exact match; their share is "
                  "judge_tie_rate; pairs of replies humans tie count in neither (any judge order of them matches); "
                  "a prompt the judge scores all alike has Spearman and Kendall tau 0; a 5 is a mean "
                  "score of 4.5 or more, and 5-best counts it for a prompt humans rank (every reply tied for their "
                  "best is best), against their best of all its replies; replies with no parsed judgment are "
                  "excluded")


FIVE = 4.5  # a mean score that rounds to 5 (5-best)


class RankedReply(Record):
    """One human-rated reply to a prompt; higher `human_score` is better."""

    id: str
    prompt_id: str
    prompt: str
    reply: str
    human_score: float


class _OasstReply(Record):
    model_config = Record.model_config | {"extra": "ignore"}

    prompt_id: str
    prompt_text: str
    response_id: str
    response_text: str
    quality_score: float | None  # the export has replies nobody rated
    language: str | None = None


_WINNERS = {"a": "A", "model_a": "A", "1": "A", "1.0": "A", "b": "B", "model_b": "B", "2": "B", "2.0": "B",
            "tie": "tie", "1.5": "tie", "0": "tie", "0.0": "tie", "tie (bothbad)": "tie"}


class PairwiseLabel(Record):
    """A human preference between two responses to one prompt. Field names of the common exports are accepted:
    `response_a`/`output_a`/`output_1`, and `winner`/`preference`/`label` as A, B or tie (also model_a/model_b as
    in Chatbot Arena, and AlpacaEval's preference 1, 2 or 1.5)."""

    model_config = Record.model_config | {"extra": "ignore"}

    id: str | None = None
    prompt: str = Field(validation_alias=AliasChoices("prompt", "instruction", "question"))
    response_a: str = Field(validation_alias=AliasChoices("response_a", "output_a", "output_1"))
    response_b: str = Field(validation_alias=AliasChoices("response_b", "output_b", "output_2"))
    winner: str = Field(validation_alias=AliasChoices("winner", "preference", "label"))

    @model_validator(mode="before")
    @classmethod
    def _no_numbered_label(cls, data):
        # AlpacaEval's numbers (1, 2, 1.5 or 0 for a draw) come as `preference`; a number under `label` follows some
        # other dataset's convention (often 0 = the first response, 1 = the second), which would be read wrong.
        if isinstance(data, dict) and "winner" not in data and "preference" not in data:
            label = data.get("label")
            if isinstance(label, (int, float)) and not isinstance(label, bool) or (
                    isinstance(label, str) and label.strip().replace(".", "", 1).isdigit()):
                raise ValueError(f"label {label!r}: a number here has no one meaning (0 may be a tie, as in "
                                 "AlpacaEval, or the first response); write winner: A, B or tie, or AlpacaEval's "
                                 "preference: 1, 2 or 1.5")
        return data

    @field_validator("id", "winner", mode="before")
    @classmethod
    def _as_text(cls, value):
        return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value

    @field_validator("winner")
    @classmethod
    def _winner(cls, value: str) -> str:
        found = _WINNERS.get(value.strip().lower())
        if found is None:
            raise ValueError(f"expected A, B or tie (or model_a/model_b, or 1/2/1.5), found {value!r}")
        return found


class _PreferencePair(Record):
    """TRL's preference format: the chosen response is the human-preferred one."""

    model_config = Record.model_config | {"extra": "ignore"}

    id: str | None = None
    prompt: str
    chosen: str
    rejected: str


def _pairs_as_ranked(pairs: list[tuple[str, str, str, str, str]]) -> list[RankedReply]:
    """(pair id, prompt, response A, response B, winner) -> two RankedReply per pair, in a group of their own.

    Each pair is its own "prompt" (prompt_id = the pair id) even when two pairs share a prompt text: a label says
    nothing about replies of other pairs. A tie gives both replies the same human score, so the pair counts in no
    metric (as a human tie does for ranked replies)."""
    out = []
    for pid, prompt, a, b, winner in pairs:
        score_a, score_b = {"A": (1.0, 0.0), "B": (0.0, 1.0), "tie": (0.5, 0.5)}[winner]
        out += [RankedReply(id=f"{pid}-a", prompt_id=pid, prompt=prompt, reply=a, human_score=score_a),
                RankedReply(id=f"{pid}-b", prompt_id=pid, prompt=prompt, reply=b, human_score=score_b)]
    return out


def _pair_id(given: str | None, number: int) -> str:
    return given if given else f"pair{number:05d}"


def heldout(prompt_id: str, eval_share: int = 4) -> bool:
    """The fixed split, by prompt (never by reply): a prompt is held out iff sha256(prompt_id) % 4 == 0."""
    return int(hashlib.sha256(prompt_id.encode()).hexdigest(), 16) % eval_share == 0


def split_key(reply: RankedReply, pairs: bool) -> str:
    """What the split is decided on: the prompt id, or for pairwise labels (each pair its own group, so one prompt
    may be under several pair ids) the prompt's text, so that no prompt is both in EFT (train) and judged (eval)."""
    return "text:" + normalise(reply.prompt) if pairs else reply.prompt_id


def merge_repeats(replies: list[RankedReply], path: Path) -> list[RankedReply]:
    """Replies of one prompt with the same text take the mean of their human scores (see the module docstring)."""
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, r in enumerate(replies):
        groups[(r.prompt_id, normalise(r.reply))].append(i)
    repeated = [g for g in groups.values() if len(g) > 1]
    if not repeated:
        return replies
    out = list(replies)
    for g in repeated:
        score = mean(replies[i].human_score for i in g)
        for i in g:
            out[i] = replies[i].model_copy(update={"human_score": score})
    print(f"[srlm] {path}: {sum(map(len, repeated))} replies repeat the text of another reply of their prompt; each "
          "such text takes the mean of its human scores", file=sys.stderr)
    return out


def load_ranked(path: Path, split: str = "eval") -> list[RankedReply]:
    """Ranked replies from our schema, the oasst2-srlm export, pairwise labels or preference pairs (told apart
    by the first line's fields); `split` is eval, train or all (by prompt: `split_key`)."""
    path = Path(path)
    with open_input(path, "a JSONL file of ranked replies or pairwise labels") as f:
        first = f.readline().removeprefix(b"\xef\xbb\xbf")
    if first.lstrip().startswith(b"["):  # AlpacaEval's annotations come as one array
        raise InputError(f"is a JSON array, but ranked replies and pairwise labels are JSONL (one object per line); "
                         f"convert it with: jq -c '.[]' {path} > labels.jsonl", path=path)
    try:
        keys = set(json.loads(first))
    except (ValueError, TypeError, RecursionError):  # read_jsonl below names what is wrong with the line
        keys = set()
    pairs = False  # pairwise labels: each pair is a group of its own
    if "response_text" in keys:
        rows = read_jsonl(path, _OasstReply)
        replies = [RankedReply(id=r.response_id, prompt_id=r.prompt_id, prompt=r.prompt_text, reply=r.response_text,
                               human_score=r.quality_score) for r in rows if r.quality_score is not None]
        if len(replies) < len(rows):
            print(f"[srlm] {path}: {len(rows) - len(replies)} of {len(rows)} replies have no human score and are "
                  "left out", file=sys.stderr)
    elif {"chosen", "rejected"} <= keys:
        pairs = True
        rows = read_jsonl(path, _PreferencePair)
        replies = _pairs_as_ranked([(_pair_id(r.id, n), r.prompt, r.chosen, r.rejected, "A")
                                    for n, r in enumerate(rows, start=1)])
    elif keys & {"winner", "preference", "label"}:
        pairs = True
        rows = read_jsonl(path, PairwiseLabel)
        replies = _pairs_as_ranked([(_pair_id(r.id, n), r.prompt, r.response_a, r.response_b, r.winner)
                                    for n, r in enumerate(rows, start=1)])
    else:
        replies = read_jsonl(path, RankedReply)
    if split != "all":
        replies = [r for r in replies if heldout(split_key(r, pairs)) == (split == "eval")]
    replies = merge_repeats(replies, path)
    if not replies:
        raise InputError(f"no replies in the {split!r} split", path=path)
    return replies


def as_stage_records(replies: Sequence[RankedReply]) -> tuple[list[Prompt], list[Candidate]]:
    """The ranked replies as the judge stage's input: one Prompt per prompt, one Candidate per reply."""
    prompts: dict[str, Prompt] = {}
    candidates = []
    counts: dict[str, int] = defaultdict(int)
    for r in replies:
        prompts.setdefault(r.prompt_id, Prompt(id=r.prompt_id, text=r.prompt, iteration=0, source="user"))
        candidates.append(Candidate(id=r.id, prompt_id=r.prompt_id, index=counts[r.prompt_id], text=r.reply))
        counts[r.prompt_id] += 1
    return list(prompts.values()), candidates


def _ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    mx, my = mean(x), mean(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return None
    return sxy / (sxx * syy) ** 0.5


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    return _pearson(_ranks(x), _ranks(y))


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float | None:
    concordant = discordant = ties_x = ties_y = 0
    for i, j in combinations(range(len(x)), 2):
        dx, dy = x[i] - x[j], y[i] - y[j]
        if dx == 0 and dy == 0:
            continue
        if dx == 0:
            ties_x += 1
        elif dy == 0:
            ties_y += 1
        elif (dx > 0) == (dy > 0):
            concordant += 1
        else:
            discordant += 1
    denominator = ((concordant + discordant + ties_x) * (concordant + discordant + ties_y)) ** 0.5
    return (concordant - discordant) / denominator if denominator else None


@dataclass
class JudgeAgreement:
    pairwise_accuracy: float | None
    exact_match: float | None
    spearman: float | None
    kendall_tau: float | None
    five_best: float | None
    judge_tie_rate: float | None
    pairs: int
    prompts: int
    replies_scored: int
    replies_failed: int
    prompts_judge_constant: int = 0  # prompts whose replies the judge scored all alike (rank correlation 0)
    prompts_partly_parsed: int = 0  # prompts with ranked pairs left out of exact match: a reply's judgments all failed
    tie_convention: str = TIE_CONVENTION

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def judge_agreement(replies: Sequence[RankedReply], judge_scores: dict[str, float]) -> JudgeAgreement:
    """Agreement of `judge_scores` (reply id -> mean parsed score; absent = all judgments failed) with humans."""
    by_prompt: dict[str, list[RankedReply]] = defaultdict(list)
    for r in replies:
        by_prompt[r.prompt_id].append(r)
    agree = ties = pairs = 0
    exact: list[bool] = []
    rhos: list[float] = []
    taus: list[float] = []
    fives = fives_best = constant = partly = 0
    scored = sum(1 for r in replies if r.id in judge_scores)
    for replies_of_prompt in by_prompt.values():
        group = [r for r in replies_of_prompt if r.id in judge_scores]
        human = [r.human_score for r in group]
        model = [judge_scores[r.id] for r in group]
        # 5-best: a 5 against the humans' best among all the prompt's replies, not among those whose judgment parsed
        # (else a failed judgment of the best reply would make the second best "best"), so a prompt with one parsed
        # reply counts too; a prompt humans rate all alike has no best.
        everyone = [r.human_score for r in replies_of_prompt]
        if len(set(everyone)) > 1:
            for h, m in zip(human, model):
                if m >= FIVE:
                    fives += 1
                    fives_best += h == max(everyone)
        if len(group) < 2:
            continue
        prompt_pairs = prompt_agree = 0
        for i, j in combinations(range(len(group)), 2):
            if human[i] == human[j]:
                continue
            prompt_pairs += 1
            if model[i] == model[j]:
                ties += 1
            elif (model[i] > model[j]) == (human[i] > human[j]):
                prompt_agree += 1
        pairs += prompt_pairs
        agree += prompt_agree
        if prompt_pairs and len(group) < len(replies_of_prompt):
            partly += 1
        elif prompt_pairs:
            exact.append(prompt_agree == prompt_pairs)
        if len(set(human)) > 1:
            if len(set(model)) == 1:
                constant += 1
            for values, metric in ((rhos, spearman), (taus, kendall_tau_b)):
                value = metric(model, human)
                values.append(0.0 if value is None else value)
    ratio = lambda n, d: n / d if d else None
    return JudgeAgreement(
        pairwise_accuracy=ratio(agree, pairs), exact_match=ratio(sum(exact), len(exact)),
        spearman=mean(rhos) if rhos else None, kendall_tau=mean(taus) if taus else None,
        five_best=ratio(fives_best, fives), judge_tie_rate=ratio(ties, pairs), pairs=pairs, prompts=len(exact),
        replies_scored=scored, replies_failed=len(replies) - scored, prompts_judge_constant=constant,
        prompts_partly_parsed=partly,
    )


def measure_judge(generator, replies: Sequence[RankedReply], out_dir: Path, config, *, seed: int,
                  about: dict | None = None, progress=None) -> dict:
    """Judge every reply with the configured judge (judge.mode, judge.k) and compare with the humans:
    `out_dir/judgments.jsonl` (resumable) and `out_dir/judge_agreement.json`; returns what the latter holds."""
    import hashlib

    from .config import output_settings
    from .judging import run_judge, score_bin
    from .pairs import candidate_scores
    from .records import atomic_write_text
    from .rundir import pin_settings

    prompts, candidates = as_stage_records(replies)
    out_dir.mkdir(parents=True, exist_ok=True)
    # judgments.jsonl resumes: only for the same replies, judge and seed (a resumed run may change eval.*).
    replies_digest = hashlib.sha256(json.dumps([r.model_dump(mode="json") for r in replies]).encode()).hexdigest()
    settings = {**(about or {}), "replies": f"{len(replies)}, sha256:{replies_digest[:16]}",
                **output_settings(config, ["judge"])}
    pin_settings(out_dir / "settings.json", settings, "judgments")
    judgments = run_judge(generator, prompts, candidates, out_dir / "judgments.jsonl", config, seed=seed,
                          progress=progress)
    result = {**(about or {}), **judge_agreement(replies, candidate_scores(judgments)).as_dict()}
    failed = sum(x.score is None for x in judgments)
    valid = [x.score for x in judgments if x.score is not None]
    result.update(judge_mode=config.judge.mode, judgments=len(judgments), parse_failures=failed,
                  parse_failure_rate=failed / len(judgments) if judgments else None,
                  score_histogram=dict(sorted(Counter(score_bin(s) for s in valid).items())))
    atomic_write_text(out_dir / "judge_agreement.json", json.dumps(result, indent=2) + "\n")
    return result


def first_prompts(replies: Sequence[RankedReply], n: int | None) -> list[RankedReply]:
    """The replies of the first `n` prompts (file order): a fixed, cheaper subset of an evaluation set."""
    if not n:
        return list(replies)
    keep = set(list(dict.fromkeys(r.prompt_id for r in replies))[:n])
    return [r for r in replies if r.prompt_id in keep]
