import json

import pytest

from srlm.errors import InputError
from srlm.records import Candidate, IFTExample, Prompt, RecordLog, read_jsonl, write_jsonl

GOOD = {"id": "a", "prompt": "Q?", "response": "A."}


def write(path, lines: list) -> None:
    path.write_bytes(b"".join(l if isinstance(l, bytes) else (l + "\n").encode() for l in lines))


@pytest.mark.parametrize("lines,message", [
    ([json.dumps(GOOD), '{"id": "b", "prompt": "Q'], ":2: invalid JSON"),
    ([json.dumps({**GOOD, "prompt": 3})], ":1: field 'prompt': Input should be a valid string"),
    ([json.dumps({"id": "a", "prompt": "Q?"})], ":1: field 'response': missing (required)"),
    ([json.dumps({**GOOD, "answer": "x"})], "field 'answer': unknown field"),
    ([json.dumps({**GOOD, "response": "   "})], "field 'response': Value error, must not be empty"),
    ([json.dumps(GOOD), json.dumps(GOOD)], ":2: field 'id': duplicate id 'a' (first on line 1)"),
    (["[1, 2]"], ":1: expected a JSON object, found list"),
    ([b'{"id": "a", "prompt": "\xff", "response": "x"}\n'], ":1: invalid UTF-8"),
    # Counted in the file's bytes, the byte-order mark's three included.
    ([b'\xef\xbb\xbf{"id": "a", "prompt": "\xff", "response": "x"}\n'], ":1: invalid UTF-8 at byte 26"),
    ([json.dumps(GOOD), b'{"id": "b", "prompt": "Q'], "(the line looks truncated)"),
    ([], "file is empty"),
    # Valid JSON that is no text, or that Python's reader refuses: errors with a line, not tracebacks.
    ([json.dumps({**GOOD, "prompt": "\ud800What?"})], ":1: an escaped lone surrogate"),
    (['{"id": "a", "prompt": "Q", "response": "x", "n": ' + "9" * 5000 + "}"], ":1: JSON this reader refuses"),
    (["[" * 100_000 + "]" * 100_000], ":1: JSON this reader refuses"),
])
def test_bad_lines_name_file_line_and_field(tmp_path, lines, message):
    path = tmp_path / "ift.jsonl"
    write(path, lines)
    with pytest.raises(InputError) as e:
        read_jsonl(path, IFTExample)
    assert str(e.value).startswith(str(path))
    assert message in str(e.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        read_jsonl(tmp_path / "nope.jsonl", IFTExample)
    with pytest.raises(InputError, match="is a directory"):
        read_jsonl(tmp_path, IFTExample)


def test_roundtrip_and_blank_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    records = [Prompt(id=f"p{i}", text=f"Prompt {i} with ünïcode", iteration=1) for i in range(3)]
    write_jsonl(path, records)
    path.write_text(path.read_text() + "\n\n")
    assert read_jsonl(path, Prompt) == records
    assert not (tmp_path / "p.jsonl.tmp").exists()


def test_a_byte_order_mark_before_the_first_line_is_read_past(tmp_path):
    from srlm.importers import read_alpaca

    path = tmp_path / "ift.jsonl"
    write(path, [b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n", json.dumps({**GOOD, "id": "b"})])
    assert [r.id for r in read_jsonl(path, IFTExample)] == ["a", "b"]
    alpaca = tmp_path / "alpaca.jsonl"
    write(alpaca, [b"\xef\xbb\xbf" + json.dumps({"instruction": "Say hi.", "output": "Hi."}).encode() + b"\n"])
    assert [r.prompt for r in read_alpaca(alpaca)[0]] == ["Say hi."]


def cand(i: int) -> Candidate:
    return Candidate(id=f"c{i}", prompt_id="p", index=i, text=f"t{i}")


def test_record_log_survives_a_torn_write_and_never_duplicates(tmp_path):
    path = tmp_path / "candidates.jsonl"
    log = RecordLog(path, Candidate)
    log.append([cand(0), cand(1)])
    # A kill in the middle of the next write leaves half a line behind.
    with open(log.partial, "a") as f:
        f.write('{"id": "c2", "prompt_id": "p", "ind')
    assert not path.exists(), "an unfinished log must not look complete"
    log = RecordLog(path, Candidate)
    assert log.done == {"c0", "c1"}
    log.append([cand(1), cand(2)])  # c1 again: skipped
    assert [r.id for r in log.finish()] == ["c0", "c1", "c2"]
    assert [r.id for r in read_jsonl(path, Candidate)] == ["c0", "c1", "c2"]
    assert not log.partial.exists()


def test_record_log_reopened_after_finish_keeps_records(tmp_path):
    path = tmp_path / "x.jsonl"
    log = RecordLog(path, Candidate)
    log.append([cand(0)])
    log.finish()
    again = RecordLog(path, Candidate)
    assert again.done == {"c0"}
    again.append([cand(1)])
    assert [r.id for r in again.finish()] == ["c0", "c1"]


def test_a_checkpoint_cut_by_a_kill_is_not_resumed_from(tmp_path):
    from srlm.training import last_checkpoint

    assert last_checkpoint(tmp_path / "none") is None
    for step, state in ((5, '{"global_step": 5}'), (10, '{"global_step": 1'), (15, None)):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x")
        if state is not None:
            (d / "trainer_state.json").write_text(state)
    assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-5")
    assert not (tmp_path / "checkpoint-10").exists() and not (tmp_path / "checkpoint-15").exists()


def test_pinned_settings_name_a_key_only_one_side_has_and_refuse_an_unreadable_file(tmp_path):
    """A directory started by an older srlm lacks a key this one records: the refusal names it rather than listing
    no change; a settings file that is not srlm's JSON object is refused, not a crash."""
    from srlm.errors import RunDirError
    from srlm.rundir import pin_settings

    path = tmp_path / "settings.json"
    pin_settings(path, {"judge": "M1"}, "a comparison")
    pin_settings(path, {"judge": "M1"}, "a comparison")  # the same settings: continued
    with pytest.raises(RunDirError, match=r"judge_weights: \(not recorded\) -> 'abc'"):
        pin_settings(path, {"judge": "M1", "judge_weights": "abc"}, "a comparison")
    with pytest.raises(RunDirError, match=r"judge: 'M1' -> \(not recorded\)"):
        pin_settings(path, {}, "a comparison")
    # An output an earlier srlm pinned: to a key no longer pinned (pair selection), and without the judge prompt's
    # digest (pinned since): continued, and recorded as this version pins it.
    path.write_text(json.dumps({"judge": "M1", "judge.exclude_flagged": True}))
    pin_settings(path, {"judge": "M1", "judge.template_sha256": "abc"}, "a comparison")
    assert json.loads(path.read_text()) == {"judge": "M1", "judge.template_sha256": "abc"}
    with pytest.raises(RunDirError, match=r"judge.template_sha256: 'abc' -> 'def'"):
        pin_settings(path, {"judge": "M1", "judge.template_sha256": "def"}, "a comparison")
    for text in ("[1, 2]", "{not json", "\xff"):
        path.write_bytes(text.encode("latin-1"))
        with pytest.raises(RunDirError, match="not the JSON object of settings srlm writes"):
            pin_settings(path, {"judge": "M1"}, "a comparison")


@pytest.mark.parametrize("field,value", [("score", float("nan")), ("score", float("inf")), ("score", 17), ("score", -1),
                                         ("sample", -1)])
def test_a_judgment_holds_a_score_of_the_rubric_or_none(tmp_path, field, value):
    # NaN and -1e308 once made pairs: max/min over NaN, a "rejected_score" of -5e+307.
    from srlm.records import Judgment

    row = {"id": "c-j0", "candidate_id": "c", "prompt_id": "p", "sample": 0, "text": "Score: 4", "score": 4.0}
    path = tmp_path / "judgments.jsonl"
    path.write_text(json.dumps({**row, field: value}) + "\n")
    with pytest.raises(InputError, match=rf":1: field '{field}'"):
        read_jsonl(path, Judgment)


def test_a_damaged_line_with_records_after_it_is_refused_not_dropped(tmp_path):
    # Recovery stopped at the first bad line and rewrote the file without it and every record after it, silently.
    path = tmp_path / "candidates.jsonl"
    RecordLog(path, Candidate).append([cand(0), cand(1)])
    partial = path.with_name(path.name + ".partial")
    lines = partial.read_text().splitlines(True)
    partial.write_text(lines[0] + '{"garbage\n' + lines[1])
    before = partial.read_text()
    with pytest.raises(InputError, match=r"candidates.jsonl.partial:2: not a whole Candidate record, and records "
                                         r"follow it"):
        RecordLog(path, Candidate)
    assert partial.read_text() == before  # nothing lost while the user looks
    partial.write_text(lines[0] + "\n\n" + '{"garbage\n')  # blank lines, then a bad last line: a torn tail
    assert RecordLog(path, Candidate).done == {"c0"} and partial.read_text() == lines[0] + "\n\n"


def test_records_two_writers_both_appended_are_kept_once(tmp_path):
    path = tmp_path / "candidates.jsonl"
    log = RecordLog(path, Candidate)
    log.append([cand(0), cand(1)])
    with open(log.partial, "a") as f:  # what a second process appending the same batch leaves
        f.write(log.partial.read_text())
    log = RecordLog(path, Candidate)
    assert [r.id for r in log.finish()] == ["c0", "c1"]
    assert [r.id for r in read_jsonl(path, Candidate)] == ["c0", "c1"]  # no duplicate id in the published file


def test_two_runs_made_in_one_directory_at_once_never_write_over_each_other(tmp_path):
    # Both passed the "no manifest yet" check, and the second wrote its config and manifest over the first's before
    # it failed to lock: the first then ran under the second's config (two `srlm run` in one second share a name).
    from srlm.config import RunConfig
    from srlm.errors import RunDirError
    from srlm.rundir import RunDir

    first, second = RunDir(tmp_path / "run"), RunDir(tmp_path / "run")
    (tmp_path / "run").mkdir()
    first.lock()  # the first run, between its checks and its writes
    with pytest.raises(RunDirError, match="in use by another srlm process"):
        second.create(RunConfig(seed=2))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]
    first.create(RunConfig(seed=1))
    assert first.read_manifest()["seed"] == 1 and "seed: 1" in first.config_path.read_text()
    with pytest.raises(RunDirError, match="already holds a run"):
        second.create(RunConfig(seed=2))
    first.unlock()


def test_a_mistake_mid_line_is_no_sign_of_a_write_cut_short(tmp_path):
    path = tmp_path / "ift.jsonl"
    write(path, [json.dumps(GOOD), b'{"id": "b",, "prompt": "Q", "response": "x"}'])  # the last line, no newline
    with pytest.raises(InputError) as e:
        read_jsonl(path, IFTExample)
    assert str(e.value).endswith(":2: invalid JSON: Expecting property name enclosed in double quotes at column 12")


def test_one_output_written_by_two_processes_at_once_is_refused(tmp_path):
    # Two `srlm judge --out X` at once: once the first published, the second started a new .partial and published
    # it over the first's records.
    import subprocess
    import sys

    from srlm.errors import OutputError
    from srlm.records import RecordLog

    path = tmp_path / "prompts.jsonl"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from srlm.records import RecordLog, Prompt\n"
        f"log = RecordLog({str(path)!r}, Prompt); print('ready', flush=True); sys.stdin.read()")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "ready\n"
        with pytest.raises(OutputError, match=rf"prompts.jsonl: being written by another srlm process \(pid {holder.pid}\)"):
            RecordLog(path, Prompt)
    finally:
        holder.communicate("")
    log = RecordLog(path, Prompt)  # free again; and within one process a log left unfinished passes its lock on
    log.append([Prompt(id="p0", text="Q?", iteration=1)])
    again = RecordLog(path, Prompt)
    assert again.done == {"p0"} and [r.id for r in again.finish()] == ["p0"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.jsonl"]  # the lock file goes with the writer
