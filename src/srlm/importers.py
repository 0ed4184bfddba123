"""`srlm data import`: other people's instruction data as srlm records (IFT examples, EFT examples, prompts).

Row formats (-> IFT or prompts; a prompt record is `Prompt(source="user", iteration=0)`):

- `oasst`: OpenAssistant message trees, either the tree export (one tree a line: `{"message_tree_id", "prompt":
  {message, "replies": [...]}}`) or the flat message export (one message a line, linked by `parent_id`). IFT keeps
  what the paper kept (PAPER.md §2): the first-turn, English, human-rank-0 assistant reply to a root prompt, if
  neither is deleted nor failed review; the unit counted is the assistant reply. Prompts: the root prompts (the
  unit is the prompter message).
- `alpaca`: a JSON array (or JSONL) of `{instruction, input, output}`.
- `dolly`: JSONL of `{instruction, context, response, category}`; the category is kept.
- `sharegpt`: a JSON array (or JSONL) of `{"id"?, "conversations": [{"from": "human"|"gpt"|"system", "value"}]}`:
  the first human turn and the gpt turn right after it.
- `chat`: JSONL of `{"messages": [{"role", "content"}]}` (OpenAI chat format): the first user turn and the
  assistant turn right after it.
- `self-instruct`: Self-Instruct `seed_tasks.jsonl` (`{id, name, instruction, instances: [{input, output}]}`): the
  instruction with the first instance's input, and that instance's output.

Wherever a format has a separate input (alpaca `input`, dolly `context`, a self-instruct instance's `input`), the
prompt is `instruction + "\\n\\n" + input` when the input is not empty. Ids are `{format}-{source id}` where the
format has ids, else `{format}-{line number}` (JSONL, 1-based), `{format}-{element}` (JSON array, 0-based index)
or `{format}-{row}` (a Hugging Face dataset).

`ranked` (-> EFT) follows the paper's EFT construction (PAPER.md §2); see `import_ranked` and `select_eft`.

Rows that do not fit the method are *dropped* and counted by reason (`ImportReport`); rows that are not what the
format says are *errors*: an InputError naming the file, the line (JSONL) or element (JSON array) and the field.
Guessing around a malformed row would hide a wrong file behind a plausible-looking import.
"""
from __future__ import annotations

import json
import random
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import InputError, SrlmError
from .evaluation import RankedReply, as_stage_records
from .judging import judge, verdicts
from .pairs import candidate_scores
from .records import EFTExample, IFTExample, Judgment, Prompt, Record, describe_error, load_json, parse_line, read_input
from .validate import MAX_SCORE_SHARE, normalise

TARGETS = ("ift", "eft", "prompts")


@dataclass
class ImportReport:
    """What became of every unit read (a row; for oasst a message, for ranked a prompt): kept or dropped, why."""

    unit: str = "rows"
    read: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> units
    left_out: Counter = field(default_factory=Counter)  # parts removed from rows that were kept, e.g. system turns
    details: dict[str, object] = field(default_factory=dict)

    def render(self) -> str:
        lines = [f"read {self.read} {self.unit}, kept {self.kept}, dropped {sum(self.dropped.values())}"]
        lines += [f"  dropped: {n} {reason}" for reason, n in self.dropped.most_common()]
        lines += [f"  left out: {n} {what}" for what, n in self.left_out.most_common()]
        lines += [f"{key}: {value}" for key, value in self.details.items()]
        return "\n".join(lines)


@dataclass(frozen=True)
class Loc:
    """Where a row came from, for its id and for error messages."""

    source: str
    number: int
    kind: Literal["line", "element", "row"] = "line"

    def error(self, message: str, field: str | None = None) -> InputError:
        if self.kind == "line":
            return InputError(message, path=self.source, line=self.number, field=field)
        return InputError(message, path=f"{self.source}, {self.kind} {self.number}", field=field)


# ---------------------------------------------------------------------------------------------- row models
# extra="ignore": exports carry many fields we do not use (user ids, emojis, labels), and they change over time.


class _Row(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class _AnyObject(_Row):
    """Any JSON object: lets `records.parse_line` do the UTF-8 / JSON / object checks before we pick a model."""

    model_config = ConfigDict(extra="allow", frozen=True)


class AlpacaRow(_Row):
    instruction: str
    input: str = ""
    output: str


class DollyRow(_Row):
    instruction: str
    context: str = ""
    response: str
    category: str | None = None


class ShareGPTTurn(_Row):
    speaker: Literal["human", "user", "gpt", "assistant", "chatgpt", "system"] = Field(alias="from")
    value: str


class ShareGPTRow(_Row):
    id: str | int | None = None
    conversations: list[ShareGPTTurn]


class ChatPart(_Row):
    type: str
    text: str | None = None


class ChatMessage(_Row):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ChatPart] | None = None  # None: an assistant turn that only calls tools

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "\n".join(p.text for p in self.content if p.type == "text" and p.text)
        return self.content or ""

    @property
    def beyond_text(self) -> bool:
        """Parts other than text (an image, audio, a file), which an example made of the text would not show."""
        return isinstance(self.content, list) and any(p.type != "text" for p in self.content)


class ChatRow(_Row):
    messages: list[ChatMessage]


class SelfInstructInstance(_Row):
    input: str = ""
    output: str


class SelfInstructRow(_Row):
    id: str | int
    instruction: str
    instances: list[SelfInstructInstance] = []


class OasstMessage(_Row):
    message_id: str
    parent_id: str | None = None  # in the tree export the nesting says it
    role: Literal["prompter", "assistant"]
    text: str
    lang: str | None = None
    rank: int | None = None  # human rank among siblings, 0 = best; None = not ranked
    deleted: bool = False
    review_result: bool | None = None  # None = not reviewed yet, which the paper's data did not exclude
    replies: list[OasstMessage] = []


class OasstFlatRow(OasstMessage):
    parent_id: str | None  # required: the only link from a message to its tree in the flat export


class OasstTreeRow(_Row):
    message_tree_id: str
    prompt: OasstMessage


# ---------------------------------------------------------------------------------------------- reading files


def _validate(loc: Loc, obj: dict, model: type[_Row]) -> _Row:
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        field_name, message = describe_error(e.errors()[0])
        raise loc.error(message, field_name)


def _jsonl_objects(path: Path, data: bytes, fmt: str) -> list[tuple[Loc, dict]]:
    objects = []
    for number, raw in enumerate(data.splitlines(keepends=True), start=1):
        try:
            row = parse_line(path, number, raw, _AnyObject)
        except InputError:
            if number == 1:
                _refuse_single_document(path, data, fmt)
            raise
        if row is not None:
            objects.append((Loc(str(path), number), dict(row.model_extra)))
    return objects


def _refuse_single_document(path: Path, data: bytes, fmt: str) -> None:
    # A pretty-printed JSON object fails on line 1 as JSONL; say what the file really is.
    try:
        document = json.loads(data)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError among them
        return
    if isinstance(document, dict):
        hint = ""
        lists = [key for key, value in document.items() if isinstance(value, list)]
        if lists:
            hint = f"; if the rows are under {lists[0]!r}: jq -c '.{lists[0]}[]' {path} > rows.jsonl"
        raise InputError(f"one JSON object over several lines, but {fmt} expects JSONL (one object per line){hint}",
                         path=path, line=1)


def _array_objects(path: Path, data: bytes) -> list[tuple[Loc, dict]]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"invalid UTF-8 at byte {e.start} (expected UTF-8 text)", path=path,
                         line=data[: e.start].count(b"\n") + 1)
    document = load_json(text, path, what="file")
    objects = []
    for index, obj in enumerate(document):
        loc = Loc(str(path), index, "element")
        if not isinstance(obj, dict):
            raise loc.error(f"expected a JSON object, found {type(obj).__name__}")
        objects.append((loc, obj))
    return objects


def _read_objects(path: Path, fmt: str, arrays: bool) -> list[tuple[Loc, dict]]:
    # The byte-order mark some Windows editors begin UTF-8 files with: before a JSON array it hid the "[".
    data = read_input(path, f"a file in {fmt} format").removeprefix(b"\xef\xbb\xbf")
    start = data.lstrip()[:1]
    if start == b"[":
        if not arrays:
            raise InputError(f"is a JSON array, but {fmt} files are JSONL (one object per line); convert it with: "
                             f"jq -c '.[]' {path} > rows.jsonl", path=path)
        objects = _array_objects(path, data)
    else:
        objects = _jsonl_objects(path, data, fmt) if start else []
    if not objects:
        raise InputError(f"file is empty (expected {fmt} rows)", path=path)
    return objects


# ---------------------------------------------------------------------------------------------- formats


@dataclass(frozen=True)
class _Item:
    """One row as the method sees it, before it becomes a record."""

    id: str
    prompt: str
    response: str | None = None
    category: str | None = None


Converted = Iterator["_Item | str"]  # an item, or the reason its unit was dropped


def _join(instruction: str, extra: str) -> str:
    return f"{instruction.strip()}\n\n{extra.strip()}" if extra.strip() else instruction


def _unique(seen: dict[str, Loc], value: str, loc: Loc, field_name: str) -> None:
    if value in seen:
        first = seen[value]
        raise loc.error(f"duplicate {field_name} {value!r} (first at {first.kind} {first.number})", field_name)
    seen[value] = loc


def _alpaca(rows: list[tuple[Loc, AlpacaRow]], to: str, lang: str | None, report: ImportReport) -> Converted:
    for loc, row in rows:
        yield _Item(f"alpaca-{loc.number}", _join(row.instruction, row.input), row.output)


def _dolly(rows: list[tuple[Loc, DollyRow]], to: str, lang: str | None, report: ImportReport) -> Converted:
    for loc, row in rows:
        yield _Item(f"dolly-{loc.number}", _join(row.instruction, row.context), row.response, row.category or None)


HUMAN, GPT = {"human", "user"}, {"gpt", "assistant", "chatgpt"}


def _sharegpt(rows: list[tuple[Loc, ShareGPTRow]], to: str, lang: str | None, report: ImportReport) -> Converted:
    seen: dict[str, Loc] = {}
    for loc, row in rows:
        if row.id is not None:
            _unique(seen, str(row.id), loc, "id")
        turns = list(row.conversations)
        while turns and turns[0].speaker == "system":
            turns.pop(0)
            report.left_out["leading system turns"] += 1
        if not turns or turns[0].speaker not in HUMAN:
            yield "does not start with a human turn"
            continue
        reply = turns[1].value if len(turns) > 1 and turns[1].speaker in GPT else None
        if to == "ift" and reply is None:
            yield "no gpt reply to the first human turn"
            continue
        # A row without an id is named by its line, apart from the ids rows give ("2" and line 2 must not meet).
        yield _Item(f"sharegpt-{row.id}" if row.id is not None else f"sharegpt-line{loc.number}", turns[0].value, reply)


def _chat(rows: list[tuple[Loc, ChatRow]], to: str, lang: str | None, report: ImportReport) -> Converted:
    for loc, row in rows:
        messages = list(row.messages)
        while messages and messages[0].role in ("system", "developer"):
            messages.pop(0)
            report.left_out["leading system messages"] += 1
        if not messages or messages[0].role != "user":
            yield "does not start with a user message"
            continue
        reply = messages[1].text if len(messages) > 1 and messages[1].role == "assistant" else None
        if to == "ift" and reply is None:
            yield "no assistant reply to the first user message"
            continue
        if messages[0].beyond_text or (to == "ift" and messages[1].beyond_text):
            # An answer about a picture the model never sees (what the §4.1 keyword filter keeps out of prompts).
            yield "content other than text (an image, audio, a file)"
            continue
        yield _Item(f"chat-{loc.number}", messages[0].text, reply)


def _self_instruct(rows: list[tuple[Loc, SelfInstructRow]], to: str, lang: str | None,
                   report: ImportReport) -> Converted:
    seen: dict[str, Loc] = {}
    for loc, row in rows:
        _unique(seen, str(row.id), loc, "id")
        first = row.instances[0] if row.instances else None
        if to == "ift" and first is None:
            yield "no instance (no output to learn)"
            continue
        yield _Item(f"self-instruct-{row.id}", _join(row.instruction, first.input if first else ""),
                    first.output if first else None)


def _language_reason(lang: str) -> str:
    return "not English" if lang == "en" else f"language is not {lang}"


def _oasst(rows: list[tuple[Loc, OasstTreeRow | OasstFlatRow]], to: str, lang: str | None,
           report: ImportReport) -> Converted:
    def walk(message: OasstMessage, parent_id: str | None):
        yield message, parent_id
        for reply in message.replies:
            yield from walk(reply, message.message_id)

    messages: dict[str, tuple[OasstMessage, str | None]] = {}
    seen_ids: dict[str, Loc] = {}
    seen_trees: dict[str, Loc] = {}
    for loc, row in rows:
        if isinstance(row, OasstTreeRow):
            _unique(seen_trees, row.message_tree_id, loc, "message_tree_id")
            found = walk(row.prompt, None)
        else:
            found = [(row, row.parent_id)]
        for message, parent_id in found:
            _unique(seen_ids, message.message_id, loc, "message_id")
            messages[message.message_id] = (message, parent_id)

    def unusable(message: OasstMessage) -> str | None:
        return "deleted" if message.deleted else "failed review" if message.review_result is False else None

    def prompt_problem(message: OasstMessage, parent_id: str | None) -> str | None:
        if unusable(message):
            return unusable(message)
        if parent_id is not None:
            return "not first turn"
        return _language_reason(lang) if lang and message.lang != lang else None

    def reply_problem(message: OasstMessage, parent_id: str | None) -> str | None:
        # PAPER.md §2: first-turn, English, human-rank-0; checked in this order, so a reason names the first failure.
        if unusable(message):
            return unusable(message)
        if parent_id not in messages:
            return "its prompt is not in the file"
        prompt, grandparent_id = messages[parent_id]
        if grandparent_id is not None:
            return "not first turn"
        if lang and (prompt.lang != lang or message.lang not in (None, lang)):
            return _language_reason(lang)
        if unusable(prompt):
            return f"prompt {unusable(prompt)}"
        return "not rank 0" if message.rank != 0 else None

    report.unit = "prompter messages" if to == "prompts" else "assistant replies"
    for message, parent_id in messages.values():
        if to == "prompts" and message.role == "prompter":
            yield prompt_problem(message, parent_id) or _Item(f"oasst-{message.message_id}", message.text)
        elif to == "ift" and message.role == "assistant":
            yield reply_problem(message, parent_id) or _Item(f"oasst-{message.message_id}",
                                                             messages[parent_id][0].text, message.text)


def _oasst_model(first: dict) -> type[_Row]:
    return OasstTreeRow if "prompt" in first and "message_tree_id" in first else OasstFlatRow


@dataclass(frozen=True)
class Format:
    name: str
    help: str
    targets: tuple[str, ...]
    arrays: bool  # a JSON array is accepted as well as JSONL
    model: Callable[[dict], type[_Row]]  # from the first row, so one format can have several export shapes
    convert: Callable[[list, str, str | None, ImportReport], Converted]


FORMATS: dict[str, Format] = {f.name: f for f in [
    Format("oasst", "OpenAssistant trees (tree or flat message JSONL export); IFT: first-turn, --lang, human-rank-0 "
                    "replies, not deleted or failed review; prompts: the root prompts",
           ("ift", "prompts"), False, _oasst_model, _oasst),
    Format("alpaca", "JSON array or JSONL of {instruction, input, output}",
           ("ift", "prompts"), True, lambda _: AlpacaRow, _alpaca),
    Format("dolly", "JSONL of {instruction, context, response, category}; the category is kept",
           ("ift", "prompts"), False, lambda _: DollyRow, _dolly),
    Format("sharegpt", "JSON array or JSONL of {id?, conversations: [{from, value}]}: first human turn and the gpt "
                       "reply after it",
           ("ift", "prompts"), True, lambda _: ShareGPTRow, _sharegpt),
    Format("chat", "JSONL of {messages: [{role, content}]} (OpenAI chat): first user turn and the assistant reply "
                   "after it; a leading system message is left out",
           ("ift", "prompts"), False, lambda _: ChatRow, _chat),
    Format("self-instruct", "Self-Instruct seed_tasks.jsonl: instruction (+ first instance's input), and its output",
           ("ift", "prompts"), False, lambda _: SelfInstructRow, _self_instruct),
]}
RANKED_HELP = ("ranked replies ({id, prompt_id, prompt, reply, human_score} or the oasst2-srlm export) judged by "
               "--model; prompts whose judge ranking agrees with the human one become EFT (PAPER.md §2)")
SUPPORTED = "; ".join([f"{name} -> {' or '.join(f.targets)}" for name, f in FORMATS.items()] + ["ranked -> eft"])


def check_target(fmt: str, to: str) -> None:
    """Refuse a combination that means nothing (alpaca has no judgments to make EFT from), saying what works."""
    targets = ("eft",) if fmt == "ranked" else FORMATS[fmt].targets if fmt in FORMATS else ()
    if to not in targets:
        raise SrlmError(f"cannot import --from {fmt} --to {to}. Supported: {SUPPORTED}. (EFT needs human-ranked "
                        "replies and a model to judge them: --from ranked SRC --to eft OUT --model M)")


def _row_format(fmt: str, to: str) -> Format:
    check_target(fmt, to)
    if fmt not in FORMATS:
        raise SrlmError(f"{fmt} is not a row format; ranked replies become EFT through import_ranked")
    return FORMATS[fmt]


def _records(converted: Converted, to: str, report: ImportReport, limit: int | None) -> list[Record]:
    records: list[Record] = []
    seen: set[str] = set()
    for item in converted:
        report.read += 1
        if isinstance(item, str):
            report.dropped[item] += 1
            continue
        prompt, response = item.prompt.strip(), (item.response or "").strip()
        # validate's duplicate check, so an import always passes `srlm data validate`.
        key = normalise(prompt)
        reason = ("empty prompt" if not prompt else "empty response" if to == "ift" and not response
                  else "duplicate prompt" if key in seen
                  else "over --max-prompts" if limit is not None and len(records) >= limit else None)
        if reason:
            report.dropped[reason] += 1
            continue
        seen.add(key)
        if to == "ift":
            records.append(IFTExample(id=item.id, prompt=prompt, response=response, category=item.category))
        else:
            records.append(Prompt(id=item.id, text=prompt, iteration=0, source="user"))
    report.kept = len(records)
    return records


def _convert(fmt: str, objects: Iterable[tuple[Loc, dict]], to: str, lang: str | None,
             limit: int | None) -> tuple[list[Record], ImportReport]:
    spec = _row_format(fmt, to)
    objects = list(objects)
    model = spec.model(objects[0][1]) if objects else _Row
    rows = [(loc, _validate(loc, obj, model)) for loc, obj in objects]
    report = ImportReport()
    return _records(spec.convert(rows, to, lang, report), to, report, limit), report


def import_file(fmt: str, path: str | Path, to: str, *, lang: str | None = "en",
                limit: int | None = None) -> tuple[list[Record], ImportReport]:
    """Read a local file of format `fmt` as IFT examples or prompts (`to`); `limit` keeps the first N.

    `lang` (oasst only; None = any language) is the language kept. Raises InputError on the first malformed
    row, naming the file, line or element, and field.
    """
    return _convert(fmt, _read_objects(Path(path), fmt, _row_format(fmt, to).arrays), to, lang, limit)


def import_rows(fmt: str, rows: Iterable[dict], to: str, *, source: str, lang: str | None = "en",
                limit: int | None = None) -> tuple[list[Record], ImportReport]:
    """The same as `import_file`, for rows already parsed (a Hugging Face dataset); `source` names them in errors."""
    objects = [(Loc(source, index, "row"), dict(row)) for index, row in enumerate(rows)]
    if not objects:
        raise InputError(f"no rows (expected {fmt} rows)", path=source)
    return _convert(fmt, objects, to, lang, limit)


def import_hf(fmt: str, dataset_id: str, to: str, *, split: str = "train", allow_online: bool = False,
              lang: str | None = "en", limit: int | None = None) -> tuple[list[Record], ImportReport]:
    """A Hugging Face dataset through the `fmt` row converter; downloads only with `allow_online`."""
    _row_format(fmt, to)
    if not allow_online:
        raise SrlmError(f"--hf {dataset_id}: loading a Hugging Face dataset needs the network, and srlm stays offline "
                        "unless told otherwise: add --allow-online, or download the data yourself and pass the "
                        "local JSON/JSONL file as SRC")
    try:
        import datasets

        rows = datasets.load_dataset(dataset_id, split=split)
    except Exception as e:  # the hub, the network and the dataset's own script can each fail in their own way
        raise InputError(f"cannot load Hugging Face dataset {dataset_id!r} (split {split!r}): {e}") from e
    return import_rows(fmt, rows, to, source=f"hf:{dataset_id}[{split}]", lang=lang, limit=limit)


def read_oasst(path: str | Path, to: str = "ift", *, lang: str | None = "en"):
    """OpenAssistant trees (tree or flat message export) -> IFT (rank-0 first-turn replies) or root prompts."""
    return import_file("oasst", path, to, lang=lang)


def read_alpaca(path: str | Path, to: str = "ift"):
    """Alpaca `{instruction, input, output}` (JSON array or JSONL) -> IFT or prompts."""
    return import_file("alpaca", path, to)


def read_dolly(path: str | Path, to: str = "ift"):
    """Dolly `{instruction, context, response, category}` JSONL -> IFT (with category) or prompts."""
    return import_file("dolly", path, to)


def read_sharegpt(path: str | Path, to: str = "ift"):
    """ShareGPT conversations -> IFT (first human turn, gpt reply) or prompts (first human turn)."""
    return import_file("sharegpt", path, to)


def read_chat(path: str | Path, to: str = "ift"):
    """OpenAI chat `{messages}` JSONL -> IFT (first user turn, assistant reply) or prompts (first user turn)."""
    return import_file("chat", path, to)


def read_self_instruct(path: str | Path, to: str = "prompts"):
    """Self-Instruct seed tasks -> prompts (instruction + first input) or IFT (with the first output)."""
    return import_file("self-instruct", path, to)


# ---------------------------------------------------------------------------------------------- ranked -> EFT

NO_PARSED = "a reply has no parsed judgment"
TOO_FEW = "fewer than 2 replies"
HUMAN_TIES = "humans scored every reply the same"
JUDGE_TIE = "judge ties replies that humans ranked apart"
DISAGREE = "judge orders a pair of replies against the human ranking"
PICKED_DISAGREE = "the means agree, but the single judgments that would be the examples tie or disagree"


def ranking_verdict(human: Sequence[float], judge_means: Sequence[float]) -> str | None:
    """None when the judge's ranking of one prompt's replies agrees with the human ranking, else why not.

    Agreement: every pair of replies with different human scores is ordered the same way by the judge's mean
    score, and the judge does not tie any such pair (a tie would give the judge credit for a ranking it did not
    make; it is also how `srlm eval judge` counts ties). Pairs that humans tie constrain nothing. A prompt needs
    at least one pair humans ranked apart, or there is no ranking to agree with.
    """
    if len(human) < 2:
        return TOO_FEW
    pairs = [(i, j) for i in range(len(human)) for j in range(i + 1, len(human)) if human[i] != human[j]]
    if not pairs:
        return HUMAN_TIES
    if any(judge_means[i] == judge_means[j] for i, j in pairs):
        return JUDGE_TIE
    if any((judge_means[i] > judge_means[j]) != (human[i] > human[j]) for i, j in pairs):
        return DISAGREE
    return None


# What leads into the score on its line ("**Total score:** 4"): markup, and the word only when on the same line.
_SCORE_LEAD = re.compile(r"[\s*_#:=-]*(?:\b(?:total|final|overall)\b[ \t*_#:=-]*)?\Z", re.IGNORECASE)


def eft_judgment(text: str, score: int) -> str:
    """The judge's text ending in exactly `Score: N`: what follows the last score, and its markup, are cut."""
    match = verdicts(text)[-1]
    body = _SCORE_LEAD.sub("", text[: match.start()])
    return f"{body}\nScore: {score}" if body else f"Score: {score}"


def _pick(judgments: Sequence[Judgment], mean_score: float) -> Judgment | None:
    # The judgment closest to the reply's mean score (the score the agreement was decided on); whole-number scores
    # only, because an EFT target is an integer score.
    whole = [j for j in judgments if j.score is not None and j.score == int(j.score)]
    return min(whole, key=lambda j: (abs(j.score - mean_score), j.sample), default=None)


def flatten_cap(counts: Iterable[int], max_share: float = MAX_SCORE_SHARE) -> int:
    """The largest per-score cap under which no score is more than `max_share` of the capped set.

    With fewer than 1/max_share distinct scores no cap gets there; then every score is cut to the rarest one's
    count, the flattest the data allows."""
    sizes = sorted(n for n in counts if n > 0)
    if not sizes:
        return 0
    for cap in range(sizes[-1], sizes[0] - 1, -1):
        capped = [min(n, cap) for n in sizes]
        if max(capped) / sum(capped) <= max_share:
            return cap
    return sizes[0]


def select_eft(replies: Sequence[RankedReply], judgments: Sequence[Judgment], *, seed: int = 0,
               max_share: float = MAX_SCORE_SHARE) -> tuple[list[EFTExample], ImportReport]:
    """The paper's EFT selection (PAPER.md §2) as a pure function over ranked replies and their judgments.

    1. Agreement, per prompt (`ranking_verdict`): the judge's mean scores must order every pair of replies
       that humans scored differently the same way as humans, with no judge tie. A prompt with a reply whose
       judgments all failed to parse is dropped whole: that reply's place in the ranking is unknown.
    2. One example per reply of an agreeing prompt: of the reply's judgments, the one whose whole-number score
       is closest to the mean (lowest sample on a tie), its text cut to end in `Score: N` (`eft_judgment`).
       A reply with no whole-number score ("Score: 3.5" only) gives no example; so does a reply whose text
       repeats another reply of the same prompt (validate rejects duplicate prompt/response pairs). The prompt
       is dropped if these judgments' own scores tie or reverse a pair humans ranked apart.
    3. Flattening (the paper's "too many 4s"): each score keeps at most `flatten_cap` examples, chosen at random
       with `seed`, so that no score is over `max_share` of the set (the share `srlm data validate` warns at).
    The report counts prompts: read, kept by agreement, dropped by reason; details give example counts and the
    score histograms before and after flattening.
    """
    wanted = {r.id for r in replies}
    judgments = [j for j in judgments if j.candidate_id in wanted]
    means = candidate_scores(judgments)
    by_reply: dict[str, list[Judgment]] = defaultdict(list)
    for j in judgments:
        by_reply[j.candidate_id].append(j)
    by_prompt: dict[str, list[RankedReply]] = defaultdict(list)
    for r in replies:
        by_prompt[r.prompt_id].append(r)

    report = ImportReport(unit="prompts")
    examples: list[EFTExample] = []
    no_whole = repeats = 0
    for group in by_prompt.values():
        report.read += 1
        reason = NO_PARSED if any(r.id not in means for r in group) else ranking_verdict(
            [r.human_score for r in group], [means.get(r.id, 0.0) for r in group])
        if reason:
            report.dropped[reason] += 1
            continue
        texts: set[str] = set()
        picked: list[tuple[RankedReply, Judgment]] = []
        for r in group:
            chosen = _pick(by_reply[r.id], means[r.id])
            if chosen is None:
                no_whole += 1
                continue
            if normalise(r.reply) in texts:
                repeats += 1
                continue
            texts.add(normalise(r.reply))
            picked.append((r, chosen))
        # The examples are single judgments, not the means: theirs must agree with the humans too (means 4 and 3.67
        # may be judgments of 4 and 4, a tie taught as a verdict).
        if len(picked) > 1 and ranking_verdict([r.human_score for r, _ in picked],
                                               [j.score for _, j in picked]) in (JUDGE_TIE, DISAGREE):
            report.dropped[PICKED_DISAGREE] += 1
            continue
        report.kept += 1
        for r, chosen in picked:
            score = int(chosen.score)
            examples.append(EFTExample(id=f"ranked-{r.id}", prompt=r.prompt, response=r.reply,
                                       judgment=eft_judgment(chosen.text, score), score=score))

    before = Counter(e.score for e in examples)
    cap = flatten_cap(before.values(), max_share)
    rng = random.Random(seed)
    keep: set[str] = set()
    for score in sorted(before):
        bucket = sorted(e.id for e in examples if e.score == score)
        keep.update(rng.sample(bucket, min(cap, len(bucket))))
    flat = [e for e in examples if e.id in keep]
    after = Counter(e.score for e in flat)
    largest = max(after.values(), default=0) / max(1, len(flat))
    # With few scores present the share cannot be met (two scores hold 50% each): say so rather than claim it.
    share = (f"none over {max_share:.0%}" if largest <= max_share else
             f"{len(after)} scores present, so one holds {largest:.0%}, over {max_share:.0%}")
    report.details.update({
        "examples from agreeing prompts": len(examples),
        "replies without a whole-number score": no_whole,
        "replies repeating another reply's text": repeats,
        f"examples after flattening (at most {cap} per score; {share})": len(flat),
        "scores before": dict(sorted(before.items())),
        "scores after": dict(sorted(after.items())),
    })
    return flat, report


def import_ranked(generator, replies: Sequence[RankedReply], judgments_path: Path, *, seed: int = 0,
                  max_prompts: int | None = None, max_share: float = MAX_SCORE_SHARE,
                  **judge_options) -> tuple[list[EFTExample], ImportReport]:
    """Ranked replies -> EFT examples: the model behind `generator` judges every reply, then `select_eft`.

    The judge stage writes `judgments_path` (k judgments per reply, `judge_options` as from
    `judging.judge_options(config)`) and is resumable: judgments already there, or in its `.partial`, are
    reused, not sampled again (`srlm data import` pins the file to the model, judge settings and input). `max_prompts`
    keeps the first N prompts (in file order) to bound the cost.
    """
    order = list(dict.fromkeys(r.prompt_id for r in replies))
    if max_prompts is not None:
        chosen = set(order[:max_prompts])
        replies = [r for r in replies if r.prompt_id in chosen]
    prompts, candidates = as_stage_records(replies)
    judgments = judge(generator, prompts, candidates, judgments_path, seed=seed, **judge_options)
    examples, report = select_eft(replies, judgments, seed=seed, max_share=max_share)
    mine = [j for j in judgments if j.candidate_id in {c.id for c in candidates}]
    failed = sum(j.score is None for j in mine)
    report.details = {"prompts in the input": len(order), "judgments": f"{len(mine)} ({failed} failed to parse) "
                      f"in {judgments_path}", **report.details}
    return examples, report


def judgments_path(out: Path) -> Path:
    """Where `srlm data import --to eft OUT` keeps its judgments: OUT with the suffix `.judgments.jsonl`."""
    return Path(out).with_suffix(".judgments.jsonl")

