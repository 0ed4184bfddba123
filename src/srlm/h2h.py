"""Head-to-head evaluation (PAPER.md §5): how often model A's response beats model B's, by a pairwise judge.

Each side either answers the prompts (a model, greedy by default, through the configured generation backend)
or brings fixed outputs (a file matched to the prompts by instruction text, e.g. AlpacaEval's reference
outputs). The judge (model A itself, another local model, or an OpenAI-compatible endpoint such as GPT-4)
reads the instruction and both responses and names the better one, twice: once with A's response shown
first and once with B's. As in the paper, a prompt is a win or a loss only when both orders agree; when they
disagree it is a tie.

Files in the output directory (a rerun continues where a killed run stopped):
  outputs_a.jsonl, outputs_b.jsonl  one H2HOutput per prompt (generated per batch, resumable)
  verdicts.jsonl                    one PairVerdict per prompt and order, with the judge's raw text
  h2h.json                          the summary (`summarize`)
  settings.json                     what generated the files; a rerun under other settings is refused

Conventions (the paper states only the tie rule):
- A verdict that does not parse is a failure: counted (`parse_failures`), never guessed. A prompt with a
  failed verdict in either order is left out of every rate (`excluded_prompts`): one order alone would
  carry the judge's position bias that judging both orders exists to cancel.
- win_rate = (wins + ties / 2) / judged prompts (AlpacaEval's convention); win / tie / loss rates beside it.
- 95% intervals: percentile bootstrap over prompts (1000 resamples, fixed seed).
- Length-controlled win rate (the idea of AlpacaEval 2.0 LC, without its per-instruction terms): a logistic
  regression of the per-prompt outcome (win 1, tie 0.5, loss 0: ties split, as in win_rate) on
  x = tanh((words_A - words_B) / std(words_A - words_B)); the LC win rate is its prediction at x = 0, the
  win rate A would have against B at equal length. Words, not tokens: the sides need not share a tokenizer
  and an outputs file has none.
"""
from __future__ import annotations

import gc
import hashlib
import json
import re
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from .backends import Generator, SamplingParams, batch_params, close, plan_batches
from .errors import ConfigError, InputError, RunDirError
from .judging import fill_slots, read_slotted_template
from .records import Record, RecordLog, atomic_write_text, load_json, read_input, write_jsonl
from .rundir import pin_settings, text_digest

INSTRUCTION_SLOT = "<INSTRUCTION_HERE>"
RESPONSE_A_SLOT = "<RESPONSE_A_HERE>"
RESPONSE_B_SLOT = "<RESPONSE_B_HERE>"
SLOTS = (INSTRUCTION_SLOT, RESPONSE_A_SLOT, RESPONSE_B_SLOT)

# In the spirit of the AlpacaEval / MT-Bench pairwise prompts (PAPER.md §5): the judge compares, is told
# to ignore position and length, and ends with one machine-readable line. Like AlpacaEval's, it must choose: a tie is
# the two orders disagreeing (PAPER.md §5), not a verdict the judge may give (a template of your own may offer it).
PAIRWISE_TEMPLATE = """Please act as an impartial judge and compare two responses to the user instruction below.
Choose the response a careful human reader would prefer: the one that follows the instruction more faithfully
and is more helpful, accurate, relevant and clear. Judge the content only: the order in which the responses
appear and their names must not influence you, and a longer response is not better unless the extra content
helps the user.

[Instruction]
<INSTRUCTION_HERE>

[Response A]
<RESPONSE_A_HERE>
[End of Response A]

[Response B]
<RESPONSE_B_HERE>
[End of Response B]

Compare the two responses briefly, in at most 100 words. Then give your verdict on a final line: Winner: A
(Response A is better) or Winner: B (Response B is better). You must choose one of the two."""

Order = Literal["ab", "ba"]
ORDERS: tuple[Order, Order] = ("ab", "ba")
OUTCOME_SCORE = {"win": 1.0, "tie": 0.5, "loss": 0.0}


class H2HOutput(Record):
    """One side's response to one prompt."""

    id: str  # the prompt's id
    instruction: str
    text: str
    generator: str  # the model, or the outputs file the response came from
    n_tokens: int | None = None  # None for responses read from a file: their tokenizer is unknown
    truncated: bool = False


class PairVerdict(Record):
    """One judgment of one prompt's pair, in one order."""

    id: str  # "<prompt id>-<order>"
    prompt_id: str
    order: Order  # ab: A's response shown as "Response A"; ba: B's response shown as "Response A"
    text: str  # the judge's raw output
    label: Literal["A", "B", "tie"] | None = None  # the verdict as the judge gave it, by position
    winner: Literal["a", "b", "tie"] | None = None  # the same verdict, by model
    error: str | None = None


@dataclass(frozen=True)
class Instruction:
    id: str
    text: str


@dataclass
class Side:
    """One contestant: a model that answers (`generator` builds its backend when needed) or fixed outputs."""

    name: str
    generator: Callable[[], Generator] | None = None
    outputs: dict[str, str] | None = None  # instruction text (stripped) -> response
    # Which weights answer, where the name alone does not say (a directory a model may be trained into again):
    # a resumed comparison must not take another model's outputs for this one's.
    weights: str | None = None


# --- reading prompts and outputs ----------------------------------------------------------------------------


def _rows(path: Path) -> list[tuple[str, dict]]:
    """(where, object) for every row of a JSON array or a JSONL file; `where` names the line or array item."""
    path = Path(path)
    data = read_input(path, "a JSON or JSONL file").removeprefix(b"\xef\xbb\xbf")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"invalid UTF-8 at byte {e.start}", path=path, line=data[: e.start].count(b"\n") + 1)
    rows: list[tuple[str, dict]] = []
    if text.lstrip().startswith("["):
        items = load_json(text, path, what="file")
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise InputError(f"array item {i}: expected a JSON object, found {type(item).__name__}", path=path)
            rows.append((f"array item {i}", item))
    else:
        # Lines end at \n alone: str.splitlines also breaks at U+2028 and U+0085, which JSON strings hold as is.
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            item = load_json(line, path, number)
            if not isinstance(item, dict):
                raise InputError(f"expected a JSON object, found {type(item).__name__}", path=path, line=number)
            rows.append((f"line {number}", item))
    if not rows:
        raise InputError("file is empty", path=path)
    return rows


def _text_field(row: dict, names: Sequence[str], path: Path, where: str, what: str) -> str:
    for name in names:
        value = row.get(name)
        if isinstance(value, str) and value.strip():
            return value
    found = ", ".join(sorted(row)) or "none"
    raise InputError(f"{where}: no {what} (expected a non-empty string field {' or '.join(names)}; fields found: "
                     f"{found})", path=path)


def load_instructions(path: Path) -> list[Instruction]:
    """Prompts from any of the evaluation sets' own files, told apart by their fields:

    - srlm Prompt records ({id, text, ...}), or {instruction} / {prompt} rows (JSONL);
    - AlpacaEval's model_outputs.json (a JSON array of {instruction, output, ...});
    - MT-Bench's question.jsonl ({question_id, turns: [...]}): the first turn (srlm compares single turns);
    - Self-Instruct's user_oriented_instructions.jsonl ({id, instruction, instances: [{input, output}]}): the
      instruction followed by the first instance's input, as the authors present it to a model;
    - IFEval's input_data.jsonl ({key, prompt, ...}).
    A row without an id gets its position, 0000...
    """
    path = Path(path)
    out, seen = [], {}
    for i, (where, row) in enumerate(_rows(path)):
        if isinstance(row.get("turns"), list):
            turns = row["turns"]
            if not turns or not isinstance(turns[0], str) or not turns[0].strip():
                raise InputError(f"{where}: field 'turns': expected a list whose first item is a non-empty string",
                                 path=path)
            text = turns[0]
        else:
            text = _text_field(row, ("instruction", "prompt", "text"), path, where, "instruction")
            instances = row.get("instances")
            if instances:
                first = instances[0] if isinstance(instances, list) else None
                extra = first.get("input") if isinstance(first, dict) else None
                if not isinstance(extra, str):
                    raise InputError(f"{where}: field 'instances': expected a list of {{input, output}} objects",
                                     path=path)
                if extra.strip():
                    text = f"{text.strip()}\n\n{extra.strip()}"
        given = next((row[k] for k in ("id", "question_id", "key") if row.get(k) is not None), None)
        pid = str(given) if given is not None else f"{i:04d}"
        if pid in seen:
            raise InputError(f"{where}: duplicate id {pid!r} (first at {seen[pid]})", path=path)
        seen[pid] = where
        out.append(Instruction(id=pid, text=text))
    return out


def load_outputs(path: Path) -> dict[str, str]:
    """Fixed responses, by instruction text: AlpacaEval's [{instruction, output, ...}], JSONL rows of
    {instruction or prompt, output or response or text}, or an outputs_*.jsonl of an earlier h2h run."""
    path = Path(path)
    outputs: dict[str, str] = {}
    for where, row in _rows(path):
        instruction = _text_field(row, ("instruction", "prompt"), path, where, "instruction").strip()
        response = next((row[k] for k in ("output", "response", "text") if isinstance(row.get(k), str)), None)
        if response is None:
            raise InputError(f"{where}: no response (expected a string field output, response or text)", path=path)
        if outputs.get(instruction, response) != response:
            raise InputError(f"{where}: a second, different output for the instruction {instruction[:60]!r}; "
                             "which one to compare is ambiguous", path=path)
        outputs[instruction] = response
    return outputs


# AlpacaEval's judge prompts (PAPER.md §5: the paper's GPT-4 judge) write the slots so; they are read as srlm's.
ALPACA_EVAL_SLOTS = {"{instruction}": INSTRUCTION_SLOT, "{output_1}": RESPONSE_A_SLOT, "{output_2}": RESPONSE_B_SLOT}


def load_pairwise_template(path: Path | None) -> str:
    """The pairwise judge prompt: srlm's, or the file's, with its slots as <INSTRUCTION_HERE>, <RESPONSE_A_HERE> and
    <RESPONSE_B_HERE> (or AlpacaEval's {instruction}, {output_1} and {output_2}, and then only those braces are
    slots). A file may be in ChatML, as AlpacaEval's are: its system and user turns are sent as such."""
    if path is None:
        return PAIRWISE_TEMPLATE
    template = read_slotted_template(path, SLOTS, ALPACA_EVAL_SLOTS, "pairwise judge prompt",
                                     "the instruction and the two responses")
    if "<|im_start|>" in template:
        # Text outside the turns (an unclosed last turn, say) would never reach the judge.
        outside = _CHATML_TURN.sub("", template).strip()
        if outside:
            raise ConfigError(f"{path}: text outside its ChatML turns, which would not be sent: {outside[:80]!r} (each "
                              "turn is <|im_start|>role, a newline, its text, <|im_end|>)")
    _verdict_parser(template, path)  # at the door: a verdict srlm cannot read would fail every judgment
    return template


_CHATML_TURN = re.compile(r"<\|im_start\|>(system|user|assistant)\n(.*?)<\|im_end\|>", re.DOTALL)


def template_turns(template: str) -> list[tuple[str, str]]:
    """(role, text) of each turn of a ChatML template; a template without ChatML is one user turn. Split before the
    slots are filled, so that a response holding ChatML markers stays text."""
    turns = [(m.group(1), m.group(2).strip()) for m in _CHATML_TURN.finditer(template)]
    return turns or [("user", template)]


# --- the judge's prompt and verdict -------------------------------------------------------------------------


def fill_pairwise(template: str, instruction: str, first: str, second: str) -> str:
    return fill_slots(template, {INSTRUCTION_SLOT: instruction, RESPONSE_A_SLOT: first, RESPONSE_B_SLOT: second})


# The rest of the line up to any next "winner", so that each "Winner:" on a line is read on its own.
_WINNER = re.compile(r"\bwinner[*_\s]*[:=](?P<rest>(?:(?!winner)[^\n])*)", re.IGNORECASE)
# "A/B/tie", "[A|B|tie]": the prompt's format, copied.
_CHOICES = re.compile(r"\b(?:a|b|tie)\s*[/|]\s*(?:a|b|tie)\b", re.IGNORECASE)
_LABELS = {"a": "A", "b": "B", "tie": "tie", "draw": "tie"}
_FILLER = {"response", "output", "assistant", "model", "the"}


def _one_verdict(rest: str) -> tuple[str | None, str | None]:
    if "<" in rest:
        return None, "placeholder copied from the prompt instead of a verdict"
    words = re.findall(r"[a-z]+", rest.lower())
    while words and words[0] in _FILLER:
        words.pop(0)
    if not words:
        return None, "'Winner:' without a verdict"
    if "or" in words[1:3] or _CHOICES.search(rest):
        return None, "the format copied from the prompt instead of a verdict"
    if words[0] == "a" and words[1:2] and words[1] in ("tie", "draw"):
        return "tie", None  # "a tie", not Response A
    if words[1:2] == ["and"]:
        return None, f"'Winner: {' '.join(words[:3])}' names both"
    label = _LABELS.get(words[0])
    if label is None:
        return None, f"'Winner: {words[0]}' is not A, B or tie"
    return label, None


def parse_verdict(text: str) -> tuple[str | None, str | None]:
    """("A" | "B" | "tie", None), or (None, why) when the judgment has no usable "Winner: ..." line.

    Accepts markdown and wording around the label ("**Winner:** Response B", "Winner: (A)", "Winner: Tie.").
    Several "Winner:" lines must agree; a judge that names two winners has given no verdict."""
    found = [_one_verdict(m.group("rest")) for m in _WINNER.finditer(text)]
    if not found:
        return None, "no 'Winner: A/B/tie' found"
    labels = {label for label, _ in found if label is not None}
    if len(labels) > 1:
        return None, f"conflicting verdicts ({', '.join(sorted(labels))})"
    if labels:
        return labels.pop(), None
    return found[-1]


def pairwise_request(template: str, a: H2HOutput, b: H2HOutput, order: Order) -> list[dict]:
    first, second = (a, b) if order == "ab" else (b, a)
    return [{"role": role, "content": fill_pairwise(text, a.instruction, first.text, second.text)}
            for role, text in template_turns(template)]


def parse_identifier(text: str) -> tuple[str | None, str | None]:
    """AlpacaEval's classifier prompt: the answer is the best model's identifier, "m" (the first output) or "M"."""
    answer = text.strip().strip("`'\"* .")
    if answer in ("m", "M"):
        return ("A" if answer == "m" else "B"), None
    return None, f"{text.strip()[:40]!r} is not the identifier 'm' or 'M'"


def parse_last_identifier(text: str) -> tuple[str | None, str | None]:
    """AlpacaEval's chain-of-thought classifier prompt: an explanation, then the identifier last (it reads
    `output[-1]`)."""
    answer = text.rstrip().rstrip("`'\"* .")
    if answer[-1:] in ("m", "M") and not answer[-2:-1].isalnum():
        return ("A" if answer[-1] == "m" else "B"), None
    return None, f"the answer does not end with the identifier 'm' or 'M': {text.strip()[-40:]!r}"


def parse_ranking(text: str) -> tuple[str | None, str | None]:
    """AlpacaEval's ranking prompt: a Python list [{'model': 'model_1', 'rank': 1}, ...]; rank 1 is the winner."""
    import ast

    # The first bracketed span that is a ranking, whatever text surrounds it; a bounded search, since a rambling
    # judge can write hundreds of brackets.
    opens = [i for i, c in enumerate(text) if c == "["][:32]
    closes = [i for i, c in enumerate(text) if c == "]"][:256]
    for start in opens:
        for end in (e for e in closes if e > start):
            try:
                ranking = ast.literal_eval(text[start : end + 1])
                # A rank may be written 1 or "1" (not True, which Python would take for 1).
                best = [r["model"] for r in ranking if str(r["rank"]).strip() == "1"]
            except (ValueError, SyntaxError, TypeError, KeyError, MemoryError, RecursionError):
                continue
            if len(best) != 1 or best[0] not in ("model_1", "model_2"):
                return None, f"rank 1 is not one of model_1 and model_2 ({best})"
            return ("A" if best[0] == "model_1" else "B"), None
    return None, "no ranking list of {'model': ..., 'rank': ...} found"


def _verdict_parser(template: str, path: Path | None = None) -> Callable[[str], tuple[str | None, str | None]]:
    """How a judge prompted with `template` gives its verdict: srlm's 'Winner: A/B', or one of AlpacaEval's."""
    if re.search(r"\bwinner\s*:", template, re.IGNORECASE):
        return parse_verdict
    if '"model_identifier"' in template:
        chain_of_thought = re.search(r"finish with|output\[-1\]", template, re.IGNORECASE)
        return parse_last_identifier if chain_of_thought else parse_identifier
    if "'rank'" in template:
        return parse_ranking
    raise ConfigError(f"{path or 'the pairwise judge prompt'}: asks for no verdict srlm can read: it must ask for a "
                      "final line 'Winner: A' or 'Winner: B', or be one of AlpacaEval's prompts (the best model's "
                      "identifier 'm' or 'M', or a ranking list of model_1 and model_2)")


def model_winner(label: str | None, order: Order) -> str | None:
    """A positional verdict as the model that won: in order "ba", Response A is model B's."""
    if label is None or label == "tie":
        return label
    first, second = ("a", "b") if order == "ab" else ("b", "a")
    return first if label == "A" else second


def combine(ab: str | None, ba: str | None) -> str | None:
    """A prompt's outcome for A ("win" | "tie" | "loss") from its verdicts in both orders; None if either failed.

    PAPER.md §5: when the two orders disagree, it is a tie."""
    if ab is None or ba is None:
        return None
    if ab != ba:
        return "tie"
    return {"a": "win", "b": "loss", "tie": "tie"}[ab]


# --- statistics ---------------------------------------------------------------------------------------------


def rates(outcomes: Sequence[str]) -> dict:
    """Counts, shares and win rate (wins + ties / 2) of a list of "win" / "tie" / "loss"."""
    n = len(outcomes)
    counts = {k: sum(o == k for o in outcomes) for k in ("win", "tie", "loss")}
    return dict(counts=counts, rates={k: v / n if n else None for k, v in counts.items()},
                win_rate=(counts["win"] + counts["tie"] / 2) / n if n else None)


def bootstrap_ci(statistic: Callable[[np.ndarray], float | None], n: int, *, resamples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> list[float] | None:
    """Percentile interval of `statistic(indices)` over `resamples` resamplings of n items with replacement.

    Every call with the same n and seed draws the same resamples, so the intervals of different statistics
    in one report come from the same resampled prompt sets. A statistic undefined (None) on more than a tenth of
    the resamples has no interval: the rest would be a biased subset."""
    if n == 0:
        return None
    rng = np.random.default_rng(seed)
    values = [statistic(rng.integers(0, n, n)) for _ in range(resamples)]
    values = [v for v in values if v is not None]
    if not values or len(values) < 0.9 * resamples:
        return None
    low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return [float(low), float(high)]


def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # the tanh form does not overflow for large |z|


def _fit_logistic(x: np.ndarray, y: np.ndarray, l2: float) -> np.ndarray:
    """(intercept, slope) maximising the log-likelihood of soft labels y in [0, 1], minus l2/2 * slope**2.

    Newton's method with step halving. The slope penalty keeps the fit finite when outcomes separate by
    length (a judge that always prefers the longer response); the intercept is not penalised."""
    design = np.column_stack([np.ones_like(x), x])
    penalty = np.array([0.0, l2])

    def objective(beta):
        z = design @ beta
        return float(np.sum(y * z - np.logaddexp(0.0, z)) - 0.5 * np.sum(penalty * beta**2))

    beta = np.zeros(2)
    current = objective(beta)
    for _ in range(200):
        p = _sigmoid(design @ beta)
        gradient = design.T @ (y - p) - penalty * beta
        hessian = (design * (p * (1 - p))[:, None]).T @ design + np.diag(penalty) + 1e-12 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        t = 1.0
        while objective(beta + t * step) < current and t > 1e-10:
            t /= 2
        beta = beta + t * step
        new = objective(beta)
        if abs(new - current) < 1e-13 or np.max(np.abs(t * step)) < 1e-12:
            break
        current = new
    return beta


def separated_by_length(scores: Sequence[float], length_diffs: Sequence[float]) -> bool:
    """Whether length alone tells A's wins from its losses: every win at least as long (relative to B) as every
    loss, or every win at most as long, a tie counting as half a win and half a loss. Then the logistic fit has
    no maximum (its slope runs off) and its intercept, the LC win rate, is whatever the penalty and the gap's
    position make it: 0.013 for a judge that always picks the longer response, where the raw rate was 0.8."""
    y = np.asarray(scores, dtype=float)
    diffs = np.asarray(length_diffs, dtype=float)
    wins, losses = diffs[y > 0], diffs[y < 1]
    if not len(wins) or not len(losses) or diffs.min() == diffs.max():
        return False
    return bool(wins.min() >= losses.max() or wins.max() <= losses.min())


def length_controlled_win_rate(scores: Sequence[float], length_diffs: Sequence[float], *,
                               l2: float = 1e-3) -> tuple[float, float] | None:
    """(LC win rate, length coefficient) from per-prompt scores (1 win, 0.5 tie, 0 loss) and length differences
    (A minus B): logit P(A wins) = b0 + b1 * tanh(diff / std(diff)), LC win rate = sigmoid(b0).

    A positive coefficient means the judge favours the longer response. Without length differences the LC win
    rate is the plain one; with outcomes all equal it is that outcome (the fit's limit). None without prompts, and
    when the outcomes separate by length (`separated_by_length`): the data do not say what happens at equal length.
    The small slope penalty only keeps the fit finite on the way (ties can make the slope large)."""
    y = np.asarray(scores, dtype=float)
    diffs = np.asarray(length_diffs, dtype=float)
    if len(y) == 0:
        return None
    spread = float(diffs.std())
    if y.min() == y.max() or spread == 0:
        return float(y.mean()), 0.0
    if separated_by_length(y, diffs):
        return None
    intercept, slope = _fit_logistic(np.tanh(diffs / spread), y, l2)
    return float(_sigmoid(intercept)), float(slope)


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def words(text: str) -> int:
    return len(text.split())


def summarize(outputs_a: Sequence[H2HOutput], outputs_b: Sequence[H2HOutput], verdicts: Sequence[PairVerdict], *,
              resamples: int = 1000, seed: int = 0) -> dict:
    """The numbers of h2h.json from the records (a pure function of the three files)."""
    by_prompt: dict[str, dict[str, str | None]] = defaultdict(dict)
    for v in verdicts:
        by_prompt[v.prompt_id][v.order] = v.winner
    b_by_id = {o.id: o for o in outputs_b}
    outcome = {a.id: combine(by_prompt[a.id].get("ab"), by_prompt[a.id].get("ba")) for a in outputs_a}
    judged = [a for a in outputs_a if outcome[a.id] is not None]
    outcomes = [outcome[a.id] for a in judged]
    labels = np.array(outcomes, dtype=object)
    scores = np.array([OUTCOME_SCORE[o] for o in outcomes])
    diffs = np.array([words(a.text) - words(b_by_id[a.id].text) for a in judged], dtype=float)
    summary = rates(outcomes)

    def ci(statistic):
        return bootstrap_ci(statistic, len(judged), resamples=resamples, seed=seed)

    lc = length_controlled_win_rate(scores, diffs)
    summary.update(
        rates_ci95={k: ci(lambda idx, k=k: float(np.mean(labels[idx] == k))) for k in ("win", "tie", "loss")},
        win_rate_ci95=ci(lambda idx: float(scores[idx].mean())),
        lc_win_rate=lc[0] if lc else None,
        lc_win_rate_ci95=ci(lambda idx: (length_controlled_win_rate(scores[idx], diffs[idx]) or (None,))[0]),
        lc_length_coef=lc[1] if lc else None,
        lc_separated=bool(len(judged)) and separated_by_length(scores, diffs),
    )
    # Over the judged prompts, as every other figure here: an excluded prompt's one parsed order says little.
    judged_ids = {a.id for a in judged}
    positional = [v.label for v in verdicts if v.prompt_id in judged_ids and v.label in ("A", "B")]
    summary.update(
        prompts=len(outputs_a),
        judged_prompts=len(judged),
        excluded_prompts=len(outputs_a) - len(judged),
        judgments=len(verdicts),
        parse_failures=sum(v.label is None for v in verdicts),
        order_disagreements=sum(by_prompt[a.id]["ab"] != by_prompt[a.id]["ba"] for a in judged),
        first_position_preference=_mean([label == "A" for label in positional]),
        # Characters are AlpacaEval's (and the paper's) unit of length; a response cut at the length cap has the
        # cap's length, not its model's, and loses comparisons for being unfinished (PAPER.md §7).
        length={side: dict(mean_tokens=_mean([o.n_tokens for o in outs]) if all(o.n_tokens is not None for o in outs)
                           else None, mean_words=_mean([words(o.text) for o in outs]),
                           mean_chars=_mean([len(o.text) for o in outs]), truncated=sum(o.truncated for o in outs))
                for side, outs in (("a", outputs_a), ("b", outputs_b))},
        bootstrap=dict(resamples=resamples, seed=seed, level=0.95),
    )
    return summary


CONVENTIONS = {
    "orders": "each prompt judged with A's response first and with B's first; disagreement counts as a tie "
              "(PAPER.md §5)",
    "ties": "the default judge prompt must choose A or B; a 'Winner: tie' (a judge template that offers it) counts as "
            "a tie in that order",
    "failures": "a verdict that does not parse is a failure; a prompt with a failure in either order is excluded",
    "win_rate": "(wins + ties / 2) / judged prompts",
    "ci95": "percentile bootstrap over judged prompts",
    "lc_win_rate": "logistic regression of the outcome (win 1, tie 0.5, loss 0) on "
                   "tanh((words_A - words_B) / std); prediction at zero length difference; none when length alone "
                   "separates wins from losses (the fit then has no maximum)",
}


def render(summary: dict) -> str:
    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    def interval(x):
        return "" if x is None else f" [{100 * x[0]:.1f}, {100 * x[1]:.1f}]"

    def num(x):
        return "-" if x is None else f"{x:.1f}"

    r = summary["rates"]
    lines = [
        f"A: {summary['a']}   B: {summary['b']}   judge: {summary['judge']}",
        f"prompts: {summary['prompts']} ({summary['judged_prompts']} judged, {summary['excluded_prompts']} excluded; "
        f"{summary['parse_failures']} of {summary['judgments']} verdicts failed to parse)",
        "",
        f"{'':<10}{'win':>8}{'tie':>8}{'loss':>8}   {'win rate [95% CI]':<24}{'LC win rate [95% CI]'}",
        f"{'A vs B':<10}{pct(r['win']):>8}{pct(r['tie']):>8}{pct(r['loss']):>8}   "
        f"{pct(summary['win_rate']) + interval(summary['win_rate_ci95']):<24}"
        f"{pct(summary['lc_win_rate']) + interval(summary['lc_win_rate_ci95'])}",
        f"ties from order disagreement: {summary['order_disagreements']}; judge picked the first-shown response in "
        f"{pct(summary['first_position_preference'])} of its non-tie verdicts",
        *(["no LC win rate: length alone separates A's wins from its losses (every win longer, or every win "
           "shorter, than every loss), so these outcomes say nothing of equal lengths"] if summary.get("lc_separated")
          else []),
        "",
        f"{'mean length':<12}{'tokens':>8}{'words':>8}{'chars':>8}   cut at the length cap",
    ]
    for side in ("a", "b"):
        length = summary["length"][side]
        # h2h.json files written before chars and cuts were counted lack them.
        chars, cut = length.get("mean_chars"), length.get("truncated")
        lines.append(f"{side.upper():<12}{num(length['mean_tokens']):>8}{num(length['mean_words']):>8}{num(chars):>8}   "
                     f"{'-' if cut is None else cut}")
    return "\n".join(lines)


# --- the stages ---------------------------------------------------------------------------------------------


class _Lazy:
    """A generator built on first use: a rerun whose files are complete loads no model."""

    def __init__(self, factory: Callable[[], Generator]):
        self.factory, self.generator = factory, None

    def generate(self, requests, params):
        if self.generator is None:
            self.generator = self.factory()
        return self.generator.generate(requests, params)

    def close(self) -> None:
        close(self.generator)
        self.generator = None


def _release() -> None:
    # One model at a time: A's weights go before B's (or the judge's) are loaded.
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def generate_outputs(generator: Generator, instructions: Sequence[Instruction], out_path: Path, *, name: str,
                     params: SamplingParams, batch_size: int = 16) -> list[H2HOutput]:
    """One response per instruction, each the model's reply to it as a single user turn.

    Resumable per batch; the file may hold responses to more prompts than `instructions` (an earlier run
    with a larger --max-prompts), and only those asked for are returned."""
    log = RecordLog(out_path, H2HOutput)
    wanted = {x.id: x.text for x in instructions}
    stale = [r.id for r in log.records if r.id in wanted and r.instruction != wanted[r.id]]
    if stale:
        raise RunDirError(f"{out_path}: the response to prompt {stale[0]!r} answers another instruction (a different "
                          "--prompts file); use another --out")
    for index, batch in enumerate(plan_batches(list(instructions), lambda x: len(x.text), batch_size)):
        if all(x.id in log.done for x in batch):
            continue
        outs = generator.generate([[{"role": "user", "content": x.text}] for x in batch], batch_params(params, index))
        log.append(H2HOutput(id=x.id, instruction=x.text, text=o.text, generator=name, n_tokens=o.n_tokens,
                             truncated=o.truncated) for x, o in zip(batch, outs))
    by_id = {o.id: o for o in log.finish()}
    ordered = [by_id[x.id] for x in instructions]
    _in_prompt_order(out_path, ordered, by_id)
    return ordered


def _in_prompt_order(path: Path, ordered: Sequence[Record], every: dict[str, Record]) -> None:
    # The log holds records in batch order (shortest first); a reader expects the prompts file's order.
    listed = {r.id for r in ordered}
    rest = [r for rid, r in every.items() if rid not in listed]
    write_jsonl(path, [*ordered, *rest])


def side_outputs(side: Side, instructions: Sequence[Instruction], out_path: Path, *, params: SamplingParams,
                 batch_size: int = 16) -> list[H2HOutput]:
    if side.outputs is None:
        assert side.generator is not None, "a side needs a model or outputs"
        model = _Lazy(side.generator)
        outputs = generate_outputs(model, instructions, out_path, name=side.name, params=params,
                                   batch_size=batch_size)
        model.close()
        _release()
        return outputs
    missing = [x for x in instructions if x.text.strip() not in side.outputs]
    if missing:
        raise InputError(f"{len(missing)} of {len(instructions)} prompts have no output here (outputs are matched to "
                         f"prompts by instruction text; first missing: {missing[0].text[:80]!r})", path=side.name)
    records = [H2HOutput(id=x.id, instruction=x.text, text=side.outputs[x.text.strip()], generator=side.name)
               for x in instructions]
    write_jsonl(out_path, records)
    return records


def judge_pairs(generator: Generator, outputs_a: Sequence[H2HOutput], outputs_b: Sequence[H2HOutput],
                out_path: Path, *, template: str = PAIRWISE_TEMPLATE, max_new_tokens: int = 256,
                batch_size: int = 16, seed: int = 0) -> list[PairVerdict]:
    """Judge every prompt's pair in both orders: `verdicts.jsonl`, resumable per batch.

    Greedy: a deterministic judge makes the two orders comparable, so a disagreement between them reflects
    the judge's position bias, not sampling noise. Every verdict is written, parsed or not."""
    b_by_id = {o.id: o for o in outputs_b}
    work = [(a, b_by_id[a.id], order) for a in outputs_a for order in ORDERS]
    log = RecordLog(out_path, PairVerdict)
    parse = _verdict_parser(template)
    params = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens, seed=seed)
    batches = plan_batches(work, lambda w: len(w[0].instruction) + len(w[0].text) + len(w[1].text), batch_size)
    for index, batch in enumerate(batches):
        ids = [_verdict_id(a, b, order) for a, b, order in batch]
        if all(i in log.done for i in ids):
            continue
        requests = [pairwise_request(template, a, b, order) for a, b, order in batch]
        records = []
        for vid, (a, _, order), out in zip(ids, batch, generator.generate(requests, batch_params(params, index))):
            label, error = parse(out.text)
            if label is None and out.truncated:
                error = f"{error} (cut off at max_new_tokens)"
            records.append(PairVerdict(id=vid, prompt_id=a.id, order=order, text=out.text, label=label,
                                       winner=model_winner(label, order), error=error))
        log.append(records)
    by_id = {v.id: v for v in log.finish()}
    ordered = [by_id[_verdict_id(a, b_by_id[a.id], order)] for a in outputs_a for order in ORDERS]
    _in_prompt_order(out_path, ordered, by_id)
    return ordered


def _verdict_id(a: H2HOutput, b: H2HOutput, order: Order) -> str:
    """A verdict's id names the texts it judged, so that resuming a comparison whose outputs changed (a file of
    outputs exported again to the same path) judges the new texts instead of keeping the old texts' verdicts."""
    digest = hashlib.sha256("\0".join((a.instruction, a.text, b.text)).encode()).hexdigest()[:12]
    return f"{a.id}-{order}-{digest}"


def check_settings(out_dir: Path, settings: dict) -> None:
    """Refuse to continue in `out_dir` under other settings: resumed files would mix two comparisons."""
    pin_settings(out_dir / "settings.json", settings, "a comparison")


def head_to_head(instructions: Sequence[Instruction], a: Side, b: Side, judge: Callable[[], Generator],
                 out_dir: Path, *, judge_name: str, judge_weights: str | None = None,
                 template: str = PAIRWISE_TEMPLATE, temperature: float = 0.0,
                 top_p: float = 0.9, max_new_tokens: int = 512, judge_max_new_tokens: int = 256,
                 batch_size: int = 16, seed: int = 0, resamples: int = 1000) -> dict:
    """Both sides' outputs, the judge's verdicts in both orders, and h2h.json in `out_dir`; returns the summary.

    Resumable: outputs and verdicts already on disk are kept, and no model is loaded for work already done.
    Settings that change what is generated or judged must match those the directory was started with; for a local
    judge, `judge_weights` (its weights' fingerprint) is one of them, as a judge trained again under the same path
    would give other verdicts."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    check_settings(out_dir, dict(a=a.name, b=b.name, a_weights=a.weights, b_weights=b.weights, judge=judge_name,
                                 judge_weights=judge_weights, temperature=temperature, top_p=top_p,
                                 max_new_tokens=max_new_tokens, judge_max_new_tokens=judge_max_new_tokens, seed=seed,
                                 template_sha256=text_digest(template)))
    params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
    outputs_a = side_outputs(a, instructions, out_dir / "outputs_a.jsonl", params=params, batch_size=batch_size)
    outputs_b = side_outputs(b, instructions, out_dir / "outputs_b.jsonl", params=params, batch_size=batch_size)
    judge_model = _Lazy(judge)
    verdicts = judge_pairs(judge_model, outputs_a, outputs_b, out_dir / "verdicts.jsonl", template=template,
                           max_new_tokens=judge_max_new_tokens, batch_size=batch_size, seed=seed)
    judge_model.close()
    _release()
    summary = dict(a=a.name, b=b.name, judge=judge_name,
                   **summarize(outputs_a, outputs_b, verdicts, resamples=resamples, seed=seed),
                   conventions=CONVENTIONS)
    atomic_write_text(out_dir / "h2h.json", json.dumps(summary, indent=2) + "\n")
    return summary
