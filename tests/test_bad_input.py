"""Bad input, refused at the door: one table of cases, each run through the CLI and checked for its exit code,
for a message that names what was wrong (file, line, field, key), and for leaving nothing that looks complete.

Exit codes (srlm.cli): 3 config, 4 input data, 5 run directory, 6 model, 8 output not writable.
"""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

import srlm.records
from conftest import FIXTURES
from srlm.cli import main
from srlm.config import RunConfig
from srlm.errors import InputError, OutputError
from srlm.records import Candidate, Judgment, Prompt, RecordLog, write_jsonl
from srlm.rundir import RunDir

IFT = {"id": "i1", "prompt": "Name a prime number.", "response": "7 is prime."}
EFT = {"id": "e1", "prompt": "Say hi.", "response": "Hi!", "judgment": "Relevant and complete.\nScore: 4", "score": 4}


def jsonl(*rows) -> bytes:
    return b"".join((json.dumps(r).encode() if isinstance(r, dict) else r) + b"\n" for r in rows)


def put(tmp: Path, name: str, content: bytes | str) -> Path:
    path = tmp / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def run_with(tmp: Path, *, ift: bytes | None = None, eft: bytes | None = None, extra=()) -> list[str]:
    """`srlm run` on a bad seed file: refused before the run directory exists."""
    args = ["run", "--out", str(tmp / "run"), *extra]
    if ift is not None:
        args += ["--ift", str(put(tmp, "ift.jsonl", ift))]
    if eft is not None:
        args += ["--eft", str(put(tmp, "eft.jsonl", eft))]
    return args


def stage_files(tmp: Path, *, candidate_prompt="p", judged_candidate="c0") -> list[str]:
    write_jsonl(tmp / "p.jsonl", [Prompt(id="p", text="Q?", iteration=1)])
    write_jsonl(tmp / "c.jsonl", [Candidate(id="c0", prompt_id=candidate_prompt, index=0, text="a")])
    write_jsonl(tmp / "j.jsonl", [Judgment(id="j0", candidate_id=judged_candidate, prompt_id="p", sample=0, text="",
                                           score=1.0)])
    return ["pairs", "--prompts", str(tmp / "p.jsonl"), "--candidates", str(tmp / "c.jsonl"),
            "--judgments", str(tmp / "j.jsonl"), "--out", str(tmp / "pairs.jsonl")]


def made_run(tmp: Path, edit_manifest=None, *, config: RunConfig | None = None, template: str | None = None) -> Path:
    root = tmp / "made"
    RunDir(root).create(config or RunConfig(), template=template)
    if edit_manifest:
        path = root / "manifest.json"
        path.write_text(edit_manifest(path.read_text()))
    return root


def edited_config(root: Path) -> Path:
    path = root / "config.yaml"
    text = path.read_text()
    assert "\n  n: 4\n" in text
    path.write_text(text.replace("\n  n: 4\n", "\n  n: 6\n"))
    return root


def edited_eval(root: Path) -> Path:
    (root / "eval.jsonl").write_text('{"model": "M1"}\n{"model": "M2", \n')
    return root


def changed_template(tmp: Path) -> Path:
    from srlm.judging import load_template

    template = put(tmp, "judge.txt", "Judge this.\n<INSTRUCTION_HERE>\n<RESPONSE_HERE>\nScore: <total points>")
    config = RunConfig.model_validate({"judge": {"template": str(template)}})
    root = made_run(tmp, config=config, template=load_template(template))
    template.write_text(template.read_text().replace("Judge this.", "Judge this strictly."))
    return root


def model_dir(tmp: Path, files: dict[str, str]) -> str:
    root = tmp / "model"
    root.mkdir()
    for name, text in files.items():
        (root / name).write_text(text)
    return str(root)


# (case id, argv builder, exit code, fragments the message must contain)
CASES = [
    # -- configuration: exit 3 ----------------------------------------------------------------------------
    ("unknown key in config file", lambda t: ["run", "--config", str(put(t, "c.yaml", "judge:\n  kk: 3\n")),
                                              "--out", str(t / "run")], 3, ["judge.kk: unknown key"]),
    ("unknown key in --set", lambda t: ["run", "--set", "dpo.betta=0.1", "--out", str(t / "run")], 3,
     ["dpo.betta: unknown key", "beta"]),
    ("unknown section", lambda t: ["config", "--set", "judgee.k=3"], 3, ["judgee: unknown key"]),
    ("number out of range", lambda t: ["run", "--set", "judge.k=0", "--out", str(t / "run")], 3,
     ["judge.k", "greater than or equal to 1"]),
    ("unknown attention implementation", lambda t: ["run", "--set", "model.attention=fast", "--out",
                                                    str(t / "run")], 3, ["model.attention='fast'", "sdpa"]),
    ("probability out of range", lambda t: ["config", "--set", "candidates.top_p=1.5"], 3,
     ["candidates.top_p", "less than or equal to 1"]),
    ("negative temperature", lambda t: ["config", "--set", "candidates.temperature=-1"], 3,
     ["candidates.temperature"]),
    ("wrong type", lambda t: ["config", "--set", "candidates.n=four"], 3, ["candidates.n", "valid integer"]),
    ("choice not allowed", lambda t: ["config", "--set", "dpo.reference=m7"], 3, ["dpo.reference"]),
    ("inconsistent values", lambda t: ["config", "--set", "sft.min_learning_rate=1"], 3,
     ["sft.min_learning_rate must not exceed sft.learning_rate"]),
    ("override without =", lambda t: ["config", "--set", "candidates.n"], 3, ["expected key=value"]),
    ("batch not a multiple of the micro-batch", lambda t: ["config", "--set", "dpo.micro_batch_size=3"], 3,
     ["dpo.batch_size=4 is not a multiple of dpo.micro_batch_size=3"]),
    ("seed out of range", lambda t: ["run", "--set", "seed=-1", "--out", str(t / "run")], 3, ["seed"]),
    ("expected judge on a server", lambda t: ["run", "--set", "judge.mode=expected", "--set",
                                              "generation.backend=openai", "--set",
                                              "generation.base_url=http://localhost:8000/v1", "--out",
                                              str(t / "run")], 3, ["judge.mode=expected", "openai backend"]),
    ("head-to-head server without a model name", lambda t: ["run", "--set", "eval.h2h_judge=http://judge:8000/v1",
                                                            "--out", str(t / "run")], 3, ["eval.h2h_judge_model"]),
    ("config file missing", lambda t: ["config", "--config", str(t / "nope.yaml")], 3, ["config file not found"]),
    ("config YAML syntax", lambda t: ["config", "--config", str(put(t, "c.yaml", "judge: [1, 2\n"))], 3,
     ["invalid YAML"]),
    ("config not a mapping", lambda t: ["config", "--config", str(put(t, "c.yaml", "- 1\n- 2\n"))], 3,
     ["expected a mapping"]),
    ("unknown preset", lambda t: ["config", "--preset", "huge"], 3, ["unknown preset 'huge'"]),
    ("judge template missing", lambda t: ["run", "--set", f"judge.template={t / 'none.txt'}", "--out",
                                          str(t / "run")], 3, ["judge.template", "cannot read"]),
    ("judge template without slots", lambda t: ["run", "--set", f"judge.template={put(t, 'j.txt', 'Rate it.')}",
                                                "--out", str(t / "run")], 3, ["lacks <INSTRUCTION_HERE>"]),
    # -- seed and stage data: exit 4 ----------------------------------------------------------------------
    ("truncated JSONL", lambda t: run_with(t, ift=jsonl(IFT) + b'{"id": "i2", "prompt": "Q'), 4,
     ["ift.jsonl:2", "invalid JSON", "truncated"]),
    ("invalid UTF-8", lambda t: run_with(t, ift=jsonl(IFT) + b'{"id": "i2", "prompt": "caf\xe9", "response": "x"}\n'),
     4, ["ift.jsonl:2", "invalid UTF-8"]),
    ("empty file", lambda t: run_with(t, ift=b""), 4, ["ift.jsonl", "file is empty"]),
    ("blank lines only", lambda t: run_with(t, eft=b"\n\n"), 4, ["eft.jsonl", "file is empty"]),
    ("wrong type in a seed line", lambda t: run_with(t, ift=jsonl(IFT, {**IFT, "id": "i2", "prompt": 5})), 4,
     ["ift.jsonl:2: field 'prompt'", "valid string"]),
    ("missing field", lambda t: run_with(t, ift=jsonl({"id": "i1", "prompt": "Q"})), 4,
     ["ift.jsonl:1: field 'response'", "missing"]),
    ("unknown field", lambda t: run_with(t, ift=jsonl({**IFT, "answer": "x"})), 4,
     ["ift.jsonl:1: field 'answer'", "unknown field"]),
    ("empty string", lambda t: run_with(t, ift=jsonl({**IFT, "response": "   "})), 4,
     ["ift.jsonl:1: field 'response'", "must not be empty"]),
    ("duplicate ids", lambda t: run_with(t, ift=jsonl(IFT, IFT)), 4, ["ift.jsonl:2: field 'id'", "duplicate id"]),
    ("line not an object", lambda t: run_with(t, ift=jsonl(IFT, b'["i2", "Q", "A"]')), 4,
     ["ift.jsonl:2", "expected a JSON object, found list"]),
    ("score out of range", lambda t: run_with(t, eft=jsonl({**EFT, "score": 7})), 4,
     ["eft.jsonl:1: field 'score'", "less than or equal to 5"]),
    ("score as a string", lambda t: run_with(t, eft=jsonl({**EFT, "score": "4"})), 4,
     ["eft.jsonl:1: field 'score'", "valid integer", "'4'"]),
    ("score as a boolean", lambda t: run_with(t, eft=jsonl({**EFT, "score": True})), 4,
     ["eft.jsonl:1: field 'score'", "valid integer", "True"]),
    # U+2028 is whitespace to Python's str.strip but not to bytes.strip: the line is blank only once decoded.
    ("score disagrees after a line blank once decoded", lambda t: run_with(t, eft=jsonl(
        EFT, "\u2028".encode(), {**EFT, "id": "e2", "score": 2})), 4,
     ["eft.jsonl:3: field 'score'", "concludes 'Score: 4' but score is 2"]),
    ("score disagrees with judgment", lambda t: run_with(t, eft=jsonl(EFT, {**EFT, "id": "e2", "score": 2})), 4,
     ["eft.jsonl:2: field 'score'", "concludes 'Score: 4' but score is 2"]),
    ("judgment going on after its score", lambda t: run_with(t, eft=jsonl({**EFT, "judgment": "Fine.\nScore: 4\n"
                                                                                          "On reflection, less."})), 4,
     ["eft.jsonl:1: field 'judgment'", "its last line is 'On reflection, less.'"]),
    ("judgment score in another format", lambda t: run_with(t, eft=jsonl({**EFT, "judgment": "Fine. Score: four out "
                                                                                          "of 5"})), 4,
     ["eft.jsonl:1: field 'judgment'", "not 'Score: N'"]),
    ("judgment without a verdict", lambda t: run_with(t, eft=jsonl({**EFT, "judgment": "Good answer."})), 4,
     ["eft.jsonl:1: field 'judgment'", "must end with 'Score: N'"]),
    ("seed path is a directory", lambda t: ["run", "--ift", str(t), "--out", str(t / "run")], 4,
     ["is a directory"]),
    ("seed file missing", lambda t: ["run", "--eft", str(t / "none.jsonl"), "--out", str(t / "run")], 4,
     ["none.jsonl", "file not found"]),
    ("pairs file checked before training", lambda t: ["dpo", "--model", str(t / "no-model"), "--pairs",
                                                      str(put(t, "pairs.jsonl", jsonl({"id": "x"}))), "--out",
                                                      str(t / "M2")], 4, ["pairs.jsonl:1: field 'prompt_id'"]),
    ("candidate of an unknown prompt", lambda t: stage_files(t, candidate_prompt="p9"), 4,
     ["c.jsonl:1: field 'prompt_id'", "'p9'", "not an id in", "p.jsonl"]),
    ("judgment of an unknown candidate", lambda t: stage_files(t, judged_candidate="c9"), 4,
     ["j.jsonl:1: field 'candidate_id'", "'c9'"]),
    ("prompts file checked before the model loads", lambda t: ["respond", "--model", str(t / "no-model"), "--prompts",
                                                               str(put(t, "p.jsonl", jsonl({"id": "p", "text": "Q?",
                                                                                            "iteration": "one"}))),
                                                               "--out", str(t / "c.jsonl")], 4,
     ["p.jsonl:1: field 'iteration'"]),
    ("ranked replies without scores", lambda t: ["eval", "judge", "--model", "embedded:smollm2-135m-instruct",
                                                 "--data", str(put(t, "r.jsonl", jsonl({"id": "r", "prompt_id": "p",
                                                                                        "prompt": "Q", "reply": "A"}))),
                                                 "--split", "all", "--out", str(t / "ev")], 4,
     ["r.jsonl:1: field 'human_score'", "missing"]),
    ("ranked replies as one JSON array", lambda t: ["eval", "judge", "--model", "embedded:smollm2-135m-instruct",
                                                    "--data", str(put(t, "a.json", "[\n" + json.dumps({"id": "r"}) + "]")),
                                                    "--out", str(t / "ev")], 4,
     ["a.json: is a JSON array, but ranked replies and pairwise labels are JSONL", "jq -c '.[]'"]),
    ("dpo.reference=m1 without --reference", lambda t: ["dpo", "--model", "m", "--pairs", "p.jsonl", "--out",
                                                        str(t / "M2"), "--set", "dpo.reference=m1"], 2,
     ["dpo.reference=m1: give the M1 model as --reference M1"]),
    ("sft --ift-only with --eft", lambda t: ["sft", "--model", "m", "--ift-only", "--eft", "e.jsonl", "--out",
                                             str(t / "M1")], 2, ["--ift-only trains on IFT alone: drop --eft"]),
    ("an EFT file given as IFT", lambda t: run_with(t, ift=jsonl(EFT)), 4,
     ["ift.jsonl:1: field 'judgment': unknown field", "this looks like an EFT file (give it as --eft)"]),
    ("a run's eval.jsonl edited by hand", lambda t: ["report", str(edited_eval(made_run(t))), "--no-plot"], 4,
     ["eval.jsonl:2: invalid JSON"]),
    # -- models: exit 6 -----------------------------------------------------------------------------------
    ("model path missing", lambda t: ["run", "--set", f"model.name_or_path={t / 'none'}", "--out", str(t / "run")], 6,
     ["no such directory"]),
    ("stage model path missing", lambda t: ["respond", "--model", str(t / "none"), "--prompts",
                                            str(put(t, "p.jsonl", jsonl({"id": "p", "text": "Q?", "iteration": 1}))),
                                            "--out", str(t / "c.jsonl")], 6, ["--model '", "none': no such directory"]),
    ("model dir without config.json", lambda t: ["run", "--set", f"model.name_or_path={model_dir(t, {})}",
                                                 "--out", str(t / "run")], 6, ["no config.json"]),
    ("pickled weights only", lambda t: ["run", "--set", "model.name_or_path=" + model_dir(
        t, {"config.json": "{}", "pytorch_model.bin": ""}), "--out", str(t / "run")], 6,
     ["found only pytorch_model.bin", "safetensors only"]),
    ("hub id while offline", lambda t: ["run", "--set", "model.name_or_path=someorg/some-model", "--out",
                                        str(t / "run")], 6, ["set model.allow_online=true"]),
    ("unknown embedded model", lambda t: ["run", "--set", "model.name_or_path=embedded:gpt5", "--out",
                                          str(t / "run")], 6, ["unknown embedded model"]),
    ("head-to-head judge path missing", lambda t: ["run", "--set", f"eval.h2h_judge={t / 'judge'}", "--set",
                                                   f"eval.h2h_prompts={FIXTURES / 'h2h_reference_outputs.json'}",
                                                   "--out", str(t / "run")], 6, ["no such directory"]),
    # -- run directories: exit 5 --------------------------------------------------------------------------
    ("resume a non-run", lambda t: ["run", "--resume", str(t)], 5, ["not a srlm run directory"]),
    ("resume a missing directory", lambda t: ["run", "--resume", str(t / "nope")], 5, ["nope: no such run directory"]),
    ("resume with another config", lambda t: ["run", "--resume", str(made_run(t)), "--set", "candidates.n=6"], 5,
     ["different config", "candidates.n: 4 -> 6"]),
    ("resume a run from before the manifest kept its config", lambda t: [
        "run", "--resume", str(made_run(t, lambda m: json.dumps({k: v for k, v in json.loads(m).items() if k != "config"}))),
        "--set", "candidates.n=6"], 5, ["different config", "candidates.n: 4 -> 6"]),
    ("config.yaml edited by hand", lambda t: ["run", "--resume", str(edited_config(made_run(t)))], 5,
     ["different config", "candidates.n: 4 -> 6", "from config.yaml"]),
    ("judge prompt file changed since the run began", lambda t: ["run", "--resume", str(changed_template(t))], 5,
     ["judge.txt: the judge prompt is not the text this run began with", "Restore it"]),
    ("run from another format version", lambda t: ["run", "--resume", str(made_run(
        t, lambda m: m.replace('"format_version": 1', '"format_version": 99')))], 5, ["run format 99"]),
    ("manifest not an object", lambda t: ["run", "--resume", str(made_run(t, lambda m: "[1, 2]"))], 5,
     ["manifest.json", "expected a JSON object, found list"]),
    ("manifest without stages", lambda t: ["run", "--resume", str(made_run(t, lambda m: json.dumps(
        {**json.loads(m), "stages": None})))], 5, ["manifest.json", "'stages' is not an object"]),
    ("--out a directory of other files", lambda t: ["run", "--out", str(put(t, "notes.txt", "mine").parent)], 5,
     ["not empty and not a srlm run", "notes.txt"]),
    ("truncated manifest", lambda t: ["run", "--resume", str(made_run(t, lambda m: m[: len(m) // 2]))], 5,
     ["unreadable manifest"]),
    ("output holds a run already", lambda t: ["run", "--out", str(made_run(t))], 5, ["already holds a run"]),
]


@pytest.mark.parametrize("build,code,fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_clearly(build, code, fragments, tmp_path, capsys):
    argv = build(tmp_path)
    assert main(argv) == code
    err = capsys.readouterr().err
    assert "srlm: error: " in err and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    # Refused at the door: no run directory was made for a run that could not start.
    if argv[0] == "run" and "--out" in argv and code != 5:
        assert not (tmp_path / "run").exists() and "run directory:" not in err


@pytest.mark.skipif(__import__("importlib.util").util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_the_vllm_backend_without_vllm_is_refused_at_the_door(tmp_path, capsys):
    assert main(["run", "--set", "generation.backend=vllm", "--out", str(tmp_path / "run")]) == 6
    assert "vLLM is not installed here" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_table_is_big_enough():
    assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)


# -- outputs that cannot be written: exit 8, nothing half-written under a final name ------------------------

def _refuse(monkeypatch, under: Path, error: int):
    """Make writes under `under` fail as the OS would (root ignores chmod, so the refusal is simulated there)."""
    real_open = open

    def refusing_open(file, mode="r", *args, **kwargs):
        if any(m in mode for m in "wax") and Path(file).is_relative_to(under):
            raise OSError(error, os.strerror(error), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(srlm.records, "open", refusing_open, raising=False)


def test_read_only_output_directory(tmp_path, monkeypatch, capsys):
    argv = stage_files(tmp_path)
    out_dir = tmp_path / "ro"
    out_dir.mkdir()
    argv[-1] = str(out_dir / "pairs.jsonl")
    if os.geteuid() == 0:
        _refuse(monkeypatch, out_dir, errno.EACCES)
    else:
        out_dir.chmod(0o555)
    try:
        assert main(argv) == 8
    finally:
        out_dir.chmod(0o755)
    err = capsys.readouterr().err
    assert f"{out_dir / 'pairs.jsonl'}: cannot write: Permission denied" in err
    assert list(out_dir.iterdir()) == []


def test_disk_full_while_publishing_a_file(tmp_path, monkeypatch, capsys):
    argv = stage_files(tmp_path)

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(srlm.records.os, "fsync", full)
    assert main(argv) == 8
    assert "pairs.jsonl: cannot write: No space left on device" in capsys.readouterr().err
    assert not (tmp_path / "pairs.jsonl").exists() and not (tmp_path / "pairs.jsonl.tmp").exists()


def test_disk_full_mid_stage_keeps_what_was_written_and_resumes(tmp_path, monkeypatch):
    path = tmp_path / "judgments.jsonl"
    records = [Judgment(id=f"j{i}", candidate_id="c", prompt_id="p", sample=i, text="Score: 3", score=3.0)
               for i in range(4)]
    log = RecordLog(path, Judgment)
    log.append(records[:2])
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(srlm.records.os, "fsync", full)
    with pytest.raises(OutputError, match="the 2 records written before are kept"):
        log.append(records[2:])
    monkeypatch.setattr(srlm.records.os, "fsync", real_fsync)
    assert not path.exists()  # never published: the stage is not complete
    resumed = RecordLog(path, Judgment)
    assert [r.id for r in resumed.records][:2] == ["j0", "j1"]
    resumed.append(records)
    assert [r.id for r in resumed.finish()] == ["j0", "j1", "j2", "j3"]


def test_a_refused_write_deep_in_a_library_is_a_clear_error(monkeypatch, capsys):
    def trainer_save(args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "runs/x/models/M1.saving/model.safetensors")

    monkeypatch.setattr("srlm.cli.cmd_config", trainer_save)
    assert main(["config"]) == 8
    err = capsys.readouterr().err
    assert "M1.saving/model.safetensors: cannot write: No space left on device" in err
    assert "--resume" in err


# -- inputs that cannot be read: exit 4 (exit 3 for a config file), named as inputs ------------------------

def _refuse_reading(monkeypatch, path: Path):
    """Make reading `path` fail with EACCES as the OS would for a file the user may not read (root ignores chmod)."""
    real_open = open

    def refusing_open(file, mode="r", *args, **kwargs):
        if "r" in mode and Path(file) == path:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(srlm.records, "open", refusing_open, raising=False)


@pytest.mark.parametrize("build", [
    lambda t: stage_files(t),  # a JSONL of records
    lambda t: ["data", "import", "--from", "alpaca", "--to", "ift", str(t / "ift.jsonl"), str(t / "p.jsonl")],
    lambda t: ["eval", "judge", "--model", "embedded:smollm2-135m-instruct", "--data", str(t / "p.jsonl"),
               "--out", str(t / "ev")],
    lambda t: ["eval", "h2h", "--a-outputs", str(t / "p.jsonl"), "--b-outputs", str(t / "p.jsonl"), "--prompts",
               str(t / "p.jsonl"), "--judge", "embedded:smollm2-135m-instruct", "--out", str(t / "h2h")],
], ids=["records", "import", "ranked replies", "head-to-head prompts"])
def test_an_input_the_user_may_not_read_is_an_input_error(build, tmp_path, monkeypatch, capsys):
    # Reported as "cannot write" (exit 8) before: main() took every EACCES for a refused output.
    argv = build(tmp_path)
    stage_files(tmp_path)
    _refuse_reading(monkeypatch, tmp_path / "p.jsonl")
    assert main(argv) == 4
    err = capsys.readouterr().err
    assert f"{tmp_path / 'p.jsonl'}: cannot read: Permission denied (expected " in err
    assert "cannot write" not in err and "Traceback" not in err


def test_a_config_file_the_user_may_not_read_is_a_config_error(tmp_path, monkeypatch, capsys):
    path = put(tmp_path, "c.yaml", "seed: 3\n")
    real = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: (_ for _ in ()).throw(
        PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))) if self == path else real(self, *a, **k))
    assert main(["config", "--config", str(path)]) == 3
    assert f"{path}: cannot read the config file: Permission denied" in capsys.readouterr().err


def test_a_full_disk_under_safetensors_is_a_clear_error(tmp_path, monkeypatch, capsys):
    # safetensors (every checkpoint save) raises its own SafetensorError, not OSError: a traceback before.
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    def trainer_save(args):
        raise SafetensorError(f'Error while serializing: I/O error: No space left on device (os error 28) at path '
                              f'"{tmp_path}/M1.saving/.tmpK3x9Qa"')

    monkeypatch.setattr("srlm.cli.cmd_config", trainer_save)
    assert main(["config"]) == 8
    err = capsys.readouterr().err
    assert f"{tmp_path}/M1.saving: cannot write: No space left on device" in err and "Traceback" not in err
    # The message's form, from safetensors itself (a missing directory: errno 2, not a refused write, re-raised).
    monkeypatch.setattr("srlm.cli.cmd_config", lambda args: save_file({}, str(tmp_path / "no" / "x.safetensors")))
    with pytest.raises(SafetensorError, match=r"\(os error 2\) at path"):
        main(["config"])


def test_out_of_memory_is_a_clear_error(monkeypatch, capsys):
    # A GPU's out-of-memory error was a traceback, saying nothing of which settings need less or that a rerun resumes.
    import torch

    def allocate(args, error):
        raise error

    for error, said in [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
                                "79.19 GiB of which 1.02 GiB is free."), "CUDA out of memory"),
        (RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate memory: you "
                      "tried to allocate 68719476736 bytes. Error code 12 (Cannot allocate memory)"),
         "out of host memory: you tried to allocate 68719476736 bytes")]:
        monkeypatch.setattr("srlm.cli.cmd_config", lambda args, error=error: allocate(args, error))
        assert main(["config"]) == 9
        err = capsys.readouterr().err
        assert f"srlm: error: {said}. Smaller batches need less: sft.micro_batch_size" in err
        assert "srlm run --resume DIR" in err and "Traceback" not in err
    monkeypatch.setattr("srlm.cli.cmd_config", lambda args: allocate(args, RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):  # any other error stays a traceback
        main(["config"])


def test_a_broken_link_names_its_line(tmp_path):
    from srlm.records import check_links, read_jsonl

    write_jsonl(tmp_path / "p.jsonl", [Prompt(id="p", text="Q?", iteration=1)])
    rows = [Candidate(id=f"c{i}", prompt_id="p9" if i == 2 else "p", index=i, text="a") for i in range(3)]
    (tmp_path / "c.jsonl").write_text("\n".join([rows[0].model_dump_json(), "", rows[1].model_dump_json(),
                                                  rows[2].model_dump_json()]) + "\n")
    with pytest.raises(InputError, match=r"c.jsonl:4: field 'prompt_id': 'p9' \(record 'c2'\)"):
        check_links(tmp_path / "c.jsonl", read_jsonl(tmp_path / "c.jsonl", Candidate), "prompt_id",
                    read_jsonl(tmp_path / "p.jsonl", Prompt), tmp_path / "p.jsonl")
