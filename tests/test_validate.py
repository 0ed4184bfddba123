import json

from srlm.cli import main
from srlm.validate import validate


def lines(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_shipped_seed_passes(capsys):
    assert main(["data", "validate", "--shipped"]) == 0
    out = capsys.readouterr().out
    assert "EFT scores: 0: 54, 1: 55, 2: 56, 3: 55, 4: 55, 5: 55" in out and out.rstrip().endswith("OK")


def test_shipped_with_a_file_of_ones_own_is_refused_not_ignored(tmp_path, capsys):
    # It validated the shipped data, said OK, and never read the user's file.
    bad = lines(tmp_path / "ift.jsonl", ['{"id": "a", "prompt": "Q'])
    assert main(["data", "validate", "--shipped", "--ift", str(bad)]) != 0
    assert "--shipped validates the data srlm ships" in capsys.readouterr().err


def test_every_problem_is_reported_with_its_line(tmp_path):
    ift = lines(tmp_path / "ift.jsonl", [
        {"id": "i1", "prompt": "What is rust?", "response": "Iron oxide."},
        {"id": "i2", "prompt": "what is  RUST?", "response": "Again."},
        '{"id": "i3", "prompt": ',
        {"id": "i1", "prompt": "Other?", "response": "x"},
    ])
    eft = lines(tmp_path / "eft.jsonl", [
        {"id": "e1", "prompt": "What is rust?", "response": "Iron oxide.", "judgment": "Good.\nScore: 4", "score": 4},
        {"id": "e2", "prompt": "Q2", "response": "A", "judgment": "Fine.\nScore: 3", "score": 2},
        {"id": "e3", "prompt": "Q3", "response": "A", "judgment": "No verdict.", "score": 1},
        {"id": "e4", "prompt": "Q2", "response": "A", "judgment": "Fine.\nScore: 2", "score": 2},
    ])
    report = validate(ift, eft)
    text = "\n".join(report.errors)
    assert f"{ift}:2: field 'prompt': duplicate of the prompt on line 1" in text
    assert f"{ift}:3: invalid JSON" in text
    assert f"{ift}:4: field 'id': duplicate id 'i1'" in text
    assert f"{eft}:1: field 'prompt': also an IFT prompt ({ift}:1)" in text
    assert f"{eft}:2: field 'score': 2, but the judgment concludes 'Score: 3'" in text
    assert f"{eft}:3: field 'judgment': must conclude with 'Score: N'" in text
    assert f"{eft}:4: duplicate of the prompt and response on line 2" in text
    assert len(report.errors) == 7
    assert any("no example with score 0, 3, 5" in w for w in report.warnings)
    assert any("score 2 is 50% of the set" in w for w in report.warnings)


def test_cli_exit_codes(tmp_path, capsys):
    good = lines(tmp_path / "good.jsonl", [{"id": "i1", "prompt": "Q?", "response": "A."}])
    assert main(["data", "validate", "--ift", str(good)]) == 0
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["data", "validate", "--ift", str(empty)]) == 4
    assert "file is empty" in capsys.readouterr().out
    assert main(["data", "validate", "--ift", str(tmp_path / "missing.jsonl")]) == 4
    assert "file not found" in capsys.readouterr().out
    assert main(["data", "validate"]) == 2


def test_an_empty_file_is_said_even_when_another_files_name_holds_its_own(tmp_path):
    # Whether a file had errors was looked up by its name in the messages: my_eft.jsonl's errors hid that eft.jsonl
    # was empty.
    (tmp_path / "my_eft.jsonl").write_text('{"id": 1}\n')
    (tmp_path / "eft.jsonl").write_text("")
    report = validate(ift=tmp_path / "my_eft.jsonl", eft=tmp_path / "eft.jsonl")
    assert any(e == f"{tmp_path / 'eft.jsonl'}: file is empty (expected at least one EFTExample record)"
               for e in report.errors), report.errors
