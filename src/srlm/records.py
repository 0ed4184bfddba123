"""The typed records that flow between stages, and the JSONL files that hold them.

Every stage reads records and writes records (STYLE.md: files on disk are the interface). Ids link each
record to its parents: a judgment names its candidate and prompt, a pair names the two candidates it
was built from, so any number in a summary can be traced back to the text behind it.

Writing is crash-safe in two ways:
- `write_jsonl` writes a whole file atomically (temp file, fsync, rename): a reader sees all or nothing.
- `RecordLog` appends records in batches to `<name>.partial` with fsync; a killed process loses at most
  the batch in flight, a rerun skips the ids already there, and `finish()` renames the log to its final
  name only once every record is in. A file without `.partial` is therefore always complete.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

from .errors import InputError, OutputError


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _non_empty(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


class IFTExample(Record):
    """A human-written (prompt, response) pair: instruction fine-tuning data (PAPER.md §2)."""

    id: str
    prompt: str
    response: str
    category: str | None = None

    _check = field_validator("id", "prompt", "response")(_non_empty)


class EFTExample(Record):
    """Judge training data (PAPER.md §2): the judge prompt is filled from `prompt` and `response` at
    training time (so the template stays configurable); `judgment` is the target, ending in `Score: N`."""

    id: str
    prompt: str
    response: str
    judgment: str
    # Strict: a hand-written file's `"score": "4"` or `true` is a mistake to name, not a value to coerce.
    score: StrictInt = Field(ge=0, le=5)

    _check = field_validator("id", "prompt", "response", "judgment")(_non_empty)


class Prompt(Record):
    """A prompt the loop answers: written by the model in iteration `iteration` (or given by the user)."""

    id: str
    text: str
    iteration: int
    source: Literal["generated", "user"] = "generated"

    _check = field_validator("id", "text")(_non_empty)


class Candidate(Record):
    """One of N sampled responses of M(t) to a prompt (PAPER.md §4.2)."""

    id: str
    prompt_id: str
    index: int = Field(ge=0)
    text: str
    n_tokens: int = Field(0, ge=0)
    # Judge-format text inside a response ("Score: 5", the rubric's words) can game the judge (PAPER.md §7).
    flagged: bool = False
    # Cut at candidates.max_new_tokens before it ended: its length is the cap's, not the model's (PAPER.md §7, length
    # explosion), and the judge reads an unfinished response. None: not recorded (a run of an older srlm).
    truncated: bool | None = None


class Judgment(Record):
    """One sampled judgment of a candidate (PAPER.md §4.3). `score` is None exactly when parsing failed:
    a failure is never turned into a score."""

    id: str
    candidate_id: str
    prompt_id: str
    sample: int = Field(ge=0)
    text: str
    score: float | None = Field(None, ge=0, le=5, allow_inf_nan=False)
    error: str | None = None
    # judge.mode=expected: P(score = 0..5) after "Score:", of which `score` is the (renormalised) mean.
    score_probs: list[float] | None = None


class Pair(Record):
    """A preference pair for DPO (PAPER.md §4.4): the best- and worst-judged candidates of one prompt."""

    id: str
    prompt_id: str
    prompt: str
    chosen_id: str
    rejected_id: str
    chosen: str
    rejected: str
    chosen_score: float = Field(ge=0, le=5, allow_inf_nan=False)
    rejected_score: float = Field(ge=0, le=5, allow_inf_nan=False)


R = TypeVar("R", bound=Record)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_LONE_SURROGATE = re.compile(r"(?<!\\)(?:\\\\)*\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F])"
                             r"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})(?<!\\)(?:\\\\)*\\u[dD][c-fC-F][0-9a-fA-F]{2}")


def open_input(path: str | os.PathLike, expected: str):
    """`path` opened for reading (binary), or an InputError that says why not and what was `expected` there. A file
    the user may not read is an input to fix, not (as main()'s catch-all for EACCES would say) an output that
    cannot be written."""
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise InputError(f"file not found (expected {expected})", path=path)
    except IsADirectoryError:
        raise InputError(f"is a directory (expected {expected})", path=path)
    except OSError as e:
        raise InputError(f"cannot read: {e.strerror or e} (expected {expected})", path=path)


def read_input(path: str | os.PathLike, expected: str) -> bytes:
    """The bytes of an input file, or the InputError `open_input` gives."""
    with open_input(path, expected) as f:
        return f.read()


def _iter_lines(path: Path, model: type[Record]) -> Iterator[tuple[int, bytes]]:
    with open_input(path, f"a JSONL file of {model.__name__} records") as f:
        yield from enumerate(f, start=1)


def describe_error(error: dict) -> tuple[str, str]:
    field = ".".join(str(p) for p in error.get("loc", ())) or None
    found = error.get("input")
    message = error.get("msg", "invalid value")
    if error.get("type") == "missing":
        return field, "missing (required)"
    if error.get("type") == "extra_forbidden":
        return field, "unknown field (not part of the schema; check the spelling)"
    shown = repr(found)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return field, f"{message}; found {shown}"


def load_json(text: str, path, line: int = 1, *, truncated: bool | None = None, what: str = "line"):
    """`json.loads` of an input's `text` (a JSONL line, or a whole document starting on `line`), every way it can
    fail an InputError at its file and line: invalid JSON, what Python's reader refuses, and valid JSON that is no
    text. `truncated` says whether the text looks cut off (by default: the error is at its end), for the hint."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        end = len(text.rstrip())
        # Cut off: the error at the end, or a string that runs to it (the error then points at its start).
        cut = (e.pos >= end or e.msg.startswith("Unterminated string")) if truncated is None else truncated
        hint = f" (the {what} looks truncated)" if cut else ""
        row, column = e.lineno, e.colno
        if "\n" in text[end : e.pos]:  # ran out past the last line's end: the error is that line's, not the next's
            row, column = text.count("\n", 0, end) + 1, end - text.rfind("\n", 0, end)
        raise InputError(f"invalid JSON: {e.msg} at column {column}{hint}", path=path, line=line + row - 1)
    except (ValueError, RecursionError) as e:  # a number of more than 4300 digits; arrays nested thousands deep
        raise InputError(f"JSON this reader refuses: {str(e)[:120] or type(e).__name__}", path=path, line=line)
    if "\\u" in text and _SURROGATE_ESCAPE.search(text):  # "\ud800" alone: valid JSON, no text, and unwritable
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            lone = _LONE_SURROGATE.search(text)  # where, for a document over several lines
            raise InputError("an escaped lone surrogate (\\ud800-\\udfff without its pair): not a character "
                             "(expected UTF-8 text)", path=path, line=line + (text.count("\n", 0, lone.start()) if lone else 0))
    return obj


def parse_line(path: Path, number: int, raw: bytes, model: type[R]) -> R | None:
    """One JSONL line as a validated record (None for a blank line); InputError names file, line and field."""
    mark = b"\xef\xbb\xbf" if number == 1 and raw.startswith(b"\xef\xbb\xbf") else b""
    raw = raw[len(mark):]  # the byte-order mark some Windows editors begin UTF-8 files with
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"invalid UTF-8 at byte {e.start + len(mark)} (expected UTF-8 text)", path=path, line=number)
    if not line.strip():
        return None
    # Cut off: the error is at the end of a last line that has no newline (a write that stopped), not mid-line.
    obj = load_json(line, path, number, truncated=False if line.endswith("\n") else None)
    if not isinstance(obj, dict):
        raise InputError(f"expected a JSON object, found {type(obj).__name__}", path=path, line=number)
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        field, message = describe_error(e.errors()[0])
        raise InputError(message, path=path, line=number, field=field)


def scan_jsonl(path: str | os.PathLike, model: type[R]) -> Iterator[tuple[int, R | InputError]]:
    """Every non-blank line as (line number, record or the InputError it raised): for reports of all errors."""
    path = Path(path)
    seen: dict[str, int] = {}
    for number, raw in _iter_lines(path, model):
        try:
            record = parse_line(path, number, raw, model)
        except InputError as e:
            yield number, e
            continue
        if record is None:
            continue
        rid = getattr(record, "id", None)
        if rid is not None and rid in seen:
            yield number, InputError(f"duplicate id {rid!r} (first on line {seen[rid]})", path=path, line=number,
                                     field="id")
            continue
        if rid is not None:
            seen[rid] = number
        yield number, record


class JSONObject(BaseModel):
    """Any JSON object: for files of free-form rows (a run's eval.jsonl) read with the checks every record gets."""

    model_config = ConfigDict(extra="allow", frozen=True)


def read_objects(path: str | os.PathLike) -> list[dict]:
    """Every line of a JSONL file as a dict; InputError naming the file and line for one that is not an object."""
    return [dict(row.model_extra or {}) for row in read_jsonl(path, JSONObject, allow_empty=True)]


def read_jsonl(path: str | os.PathLike, model: type[R], *, allow_empty: bool = False) -> list[R]:
    """Read and validate every line of `path` as `model`.

    Raises InputError naming the file, line and field on the first bad line (invalid UTF-8, invalid JSON,
    a wrong type, a missing or unknown field) and on duplicate ids. Blank lines are skipped. An empty file
    is an error unless `allow_empty` (a stage's output may legitimately hold no record, user input may not).
    """
    records: list[R] = []
    for _, item in scan_jsonl(path, model):
        if isinstance(item, InputError):
            raise item
        records.append(item)
    if not records and not allow_empty:
        raise InputError(f"file is empty (expected at least one {model.__name__} record)", path=Path(path))
    return records


def check_links(path: str | os.PathLike, records: Sequence[Record], field: str, parents: Sequence[Record],
                parents_path: str | os.PathLike, *, same: str | None = None) -> None:
    """Every record's `field` must name a record of `parents` (e.g. a candidate's prompt_id), and agree with it on
    `same` if given (a judgment's prompt_id with its candidate's): files of a stage given separately on the command
    line may come from different runs."""
    known = {p.id: p for p in parents}

    def refuse(record: Record, message: str, field: str) -> InputError:
        # Read back for its line: records keep no line numbers, and this is the rare path.
        line = next((n for n, r in scan_jsonl(path, type(record)) if getattr(r, "id", None) == record.id), None)
        return InputError(f"{message}; the files must come from the same run", path=Path(path), line=line, field=field)

    for record in records:
        value = getattr(record, field)
        if value not in known:
            raise refuse(record, f"{value!r} (record {record.id!r}) is not an id in {parents_path}", field)
        if same is not None and getattr(record, same) != getattr(known[value], same):
            raise refuse(record, f"{getattr(record, same)!r} (record {record.id!r}), but {value!r} in {parents_path} "
                         f"has {same} {getattr(known[value], same)!r}", same)


def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(directory: Path) -> None:
    """Flush every file under `directory`, and the directories themselves, to disk: what is published by a rename
    afterwards must not turn out empty after a power loss."""
    for folder, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(folder))


def write_failed(path: Path, error: OSError, after: str) -> OutputError:
    """The error for a write the system refused (disk full, read-only, permission), saying what survives."""
    reason = error.strerror or str(error)
    return OutputError(f"{path}: cannot write: {reason} (errno {error.errno}); {after}")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` so that a crash leaves either the old file or the whole new one.

    A refused write (disk full, read-only directory) raises OutputError and leaves no temp file behind.
    """
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """`atomic_write_text` for bytes (a plot)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_failed(path, e, "nothing was written under that name (any previous version is intact)") from e
    fsync_dir(path.parent)


def dumps(record: Record) -> str:
    return json.dumps(record.model_dump(mode="json"), ensure_ascii=False)


def write_jsonl(path: str | os.PathLike, records: Iterable[Record]) -> None:
    atomic_write_text(path, "".join(dumps(r) + "\n" for r in records))


class LockHeld(Exception):
    """Another process holds the lock (`take_lock`); `holder` is its pid as it wrote it, or "?"."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


def take_lock(path: Path):
    """An exclusive lock on the file `path` (made if need be, holding this process's pid) for as long as the file
    returned stays open; None where none can be had (a directory that refuses writes, a file system without locks:
    NFS without lockd), which then goes unguarded. Raises LockHeld when another process holds it."""
    import fcntl

    try:
        handle = open(path, "a+", encoding="utf-8")
    except OSError:
        return None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise LockHeld(holder) from None
    except OSError:
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


_HELD: dict = {}  # RecordLog's locks this process holds, by path


class RecordLog:
    """Append-only, resumable record file: `<path>.partial` while being written, `<path>` once finished.

    Opening an existing `.partial` keeps its complete lines (a line cut by a kill is dropped) and exposes
    their ids in `done`, so a stage can skip work already done and never write a record twice.
    """

    def __init__(self, path: str | os.PathLike, model: type[R]):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.model = model
        self.records: list[R] = []
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise write_failed(self.path.parent, e, "nothing was written") from e
        # Held until `finish`: a second process on the same output (a stage command run twice at once) would start
        # a new .partial once the first had published, and publish it over the first's records. Within this process
        # the lock passes on: a log left unfinished by an error is no writer any more.
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        key = os.path.abspath(self._lock_path)
        if key not in _HELD:
            try:
                _HELD[key] = take_lock(self._lock_path)
            except LockHeld as e:
                raise OutputError(f"{self.path}: being written by another srlm process (pid {e.holder}); wait for it "
                                  "to end, or write elsewhere") from None
        if self.path.exists() and not self.partial.exists():
            # Reopened after it was finished (e.g. a crash before the stage's next output): keep everything.
            os.replace(self.path, self.partial)
        if self.partial.exists():
            self._recover()
        self.done = {r.id for r in self.records}

    def _recover(self) -> None:
        """Keep the complete records of `.partial`, drop a last line a kill cut (or left unreadable), and refuse a
        bad line that records follow: that is damage, or two writers, not a kill, and dropping what follows it
        would lose records without a word. A record whose id came before (two writers) is dropped."""
        end, torn, seen, duplicates = 0, None, set(), False
        with open(self.partial, "rb") as f:
            for number, raw in enumerate(f, start=1):
                if torn is not None:
                    if raw.strip():
                        raise InputError(
                            f"not a whole {self.model.__name__} record, and records follow it: the file was damaged or "
                            "written by two processes at once; mend the line, or delete the file to redo its work",
                            path=self.partial, line=torn)
                    continue
                if not raw.strip() and raw.endswith(b"\n"):  # blank, as read_jsonl allows
                    end += len(raw)
                    continue
                record = None
                if raw.endswith(b"\n"):
                    try:
                        record = self.model.model_validate_json(raw)
                    except ValidationError:
                        pass
                if record is None:
                    torn = number  # the write a kill interrupted, if nothing follows
                    continue
                end += len(raw)
                if record.id in seen:
                    duplicates = True
                    continue
                seen.add(record.id)
                self.records.append(record)
        if duplicates:
            write_jsonl(self.partial, self.records)  # by rename: a kill now leaves the records as they were
        elif end < self.partial.stat().st_size:
            # Cut the torn tail so later appends start on a clean line: in place, needing no free space.
            with open(self.partial, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())

    def append(self, records: Iterable[R]) -> None:
        new = [r for r in records if r.id not in self.done]
        if not new:
            return
        try:
            with open(self.partial, "a", encoding="utf-8") as f:
                f.write("".join(dumps(r) + "\n" for r in new))
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise write_failed(self.partial, e, f"the {len(self.records)} records written before are kept; free "
                                                "space or fix permissions and rerun to resume") from e
        self.records.extend(new)
        self.done.update(r.id for r in new)

    def finish(self) -> list[R]:
        """Publish the file under its final name; from then on it counts as complete."""
        try:
            if not self.partial.exists():
                self.partial.write_text("", encoding="utf-8")
            os.replace(self.partial, self.path)
        except OSError as e:
            raise write_failed(self.path, e, "the records stay in the .partial file; rerun to resume") from e
        fsync_dir(self.path.parent)
        handle = _HELD.pop(os.path.abspath(self._lock_path), None)
        if handle is not None:
            self._lock_path.unlink(missing_ok=True)
            handle.close()
        return self.records
