"""IFEval: the four accuracies against hand-computed values, bad input refused at the door, the command with
responses made elsewhere and with a (tiny) model, and the checks running with no nltk data installed."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from srlm import ifeval
from srlm.cli import main
from srlm.errors import InputError

FIXTURES = Path(__file__).parent / "fixtures" / "ifeval"
DATA = FIXTURES / "input_data.jsonl"
RESPONSES = FIXTURES / "responses.jsonl"

# Per prompt of the fixture, which instructions its hand-written response follows (see responses.jsonl):
# 1 a comma only in a "Sure, here is" first line; 2 the end phrase in **bold**; 3 a third bullet on the last
# line; 4 follows both; 5 empty; 6 German as asked.
EXPECTED = {1: ([False], [True]), 2: ([True, False], [True, True]), 3: ([False, True], [True, True]),
            4: ([True, True], [True, True]), 5: ([False, False], [False, False]), 6: ([True], [True])}


def _responses() -> dict[int, str]:
    rows = ifeval.load_prompts(DATA)
    return {r.key: r.response for r in ifeval.load_responses(RESPONSES, rows)}


def test_strict_and_loose_per_instruction():
    rows = ifeval.load_prompts(DATA)
    _, results = ifeval.score(rows, _responses())
    assert {r.key: (r.strict, r.loose) for r in results} == EXPECTED


def test_the_four_accuracies_by_hand():
    result, _ = ifeval.score(ifeval.load_prompts(DATA), _responses())
    # prompts fully followed: strict 4 and 6; loose all but the empty 5. Instructions: 10 in all.
    assert result.prompt_level_strict_acc == pytest.approx(2 / 6)
    assert result.prompt_level_loose_acc == pytest.approx(5 / 6)
    assert result.inst_level_strict_acc == pytest.approx(5 / 10)
    assert result.inst_level_loose_acc == pytest.approx(8 / 10)
    assert (result.prompts, result.instructions, result.empty_responses) == (6, 10, 1)
    assert result.per_instruction["punctuation:no_comma"] == {"count": 1, "strict_acc": 0.0, "loose_acc": 1.0}
    assert result.per_instruction["startend:quotation"] == {"count": 1, "strict_acc": 1.0, "loose_acc": 1.0}


def test_loose_variants_are_the_official_eight():
    variants = ifeval.loose_variants("Sure:\n**Body**\nBye")
    assert variants == ["Sure:\n**Body**\nBye", "Sure:\nBody\nBye", "**Body**\nBye", "Sure:\n**Body**", "**Body**",
                        "Body\nBye", "Sure:\nBody", "Body"]


def test_a_response_that_only_passes_without_its_first_line():
    row = ifeval.load_prompts(DATA)[0]
    result = ifeval.check_response(row, "Of course, here you go.\nNo commas at all in this note.")
    assert (result.strict, result.loose) == ([False], [True])
    assert ifeval.check_response(row, "One, two.").loose == [False]  # nothing left to drop on a single line


def _write(tmp_path: Path, *lines) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


GOOD = {"key": 1, "prompt": "Say hi without commas.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}


@pytest.mark.parametrize("bad, where, message", [
    ('{"key": 2, "prompt": "x"', ":2", "invalid JSON"),
    ({"key": 2, "prompt": "x", "kwargs": [{}]}, ":2: field 'instruction_id_list'", "missing"),
    ({**GOOD, "key": 2, "prompt": 5}, ":2: field 'prompt'", "valid string"),
    ({**GOOD, "key": 2, "instruction_id_list": "punctuation:no_comma"}, ":2: field 'instruction_id_list'", "list"),
    ({**GOOD, "key": 2, "instruction_id_list": ["punctuation:no_commas"]}, ":2: field 'instruction_id_list.0'",
     "unknown instruction 'punctuation:no_commas'"),
    ({**GOOD, "key": 2, "kwargs": []}, ":2: field 'kwargs'", "has 0 entries for 1 instructions"),
    ({**GOOD, "key": 2, "instruction_id_list": ["length_constraints:number_words"], "kwargs": [{"num_words": 5}]},
     ":2: field 'kwargs.0'", "needs 'relation'"),
    ({**GOOD, "key": 2, "instruction_id_list": ["length_constraints:number_words"],
      "kwargs": [{"num_words": 5, "relation": "about"}]}, ":2: field 'kwargs.0'", "not valid arguments"),
    ({**GOOD, "kwargs": [{"num_words": 5}]}, ":2: field 'kwargs.0'", "not valid arguments"),
    ({**GOOD, "key": 2, "instruction_id_list": ["length_constraints:number_words"],
      "kwargs": [{"num_words": "5", "relation": "at least"}]}, ":2: field 'kwargs.0'", "not valid arguments"),
    ({**GOOD, "key": 2, "instruction_id_list": ["keywords:existence"], "kwargs": [{"keywords": "apple"}]},
     ":2: field 'kwargs.0.keywords'", "expected a list of words, e.g. ['apple'], found a string"),
    (GOOD, ":2: field 'key'", "duplicate key 1 (first on line 1)"),
])
def test_bad_lines_name_file_line_and_field(tmp_path, bad, where, message):
    path = _write(tmp_path, GOOD, bad)
    with pytest.raises(InputError) as e:
        ifeval.load_prompts(path)
    assert str(e.value).startswith(f"{path}{where}: ") and message in str(e.value)


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(InputError, match="file is empty"):
        ifeval.load_prompts(empty)
    with pytest.raises(InputError, match="file not found"):
        ifeval.load_prompts(tmp_path / "nope.jsonl")


def test_responses_must_answer_the_data(tmp_path):
    rows = ifeval.load_prompts(DATA)
    path = tmp_path / "responses.jsonl"
    path.write_text(json.dumps({"key": 99, "response": "x"}) + "\n")
    with pytest.raises(InputError, match=r":1: field 'key': 99 is not a key"):
        ifeval.load_responses(path, rows)
    path.write_text(json.dumps({"key": 1, "prompt": "another prompt", "response": "x"}) + "\n")
    with pytest.raises(InputError, match=r":1: field 'prompt': is not the data's prompt for key 1"):
        ifeval.load_responses(path, rows)
    path.write_text(json.dumps({"response": "x"}) + "\n")
    with pytest.raises(InputError, match=r":1: needs 'key' or 'prompt'"):
        ifeval.load_responses(path, rows)
    path.write_text(json.dumps({"key": 1, "response": "x"}) + "\n" + json.dumps({"key": 1, "response": "y"}) + "\n")
    with pytest.raises(InputError, match=r":2: a second response to key 1"):
        ifeval.load_responses(path, rows)
    path.write_text(json.dumps({"key": 1, "response": "x"}) + "\n")
    with pytest.raises(InputError, match=r"no response to 5 of the 6 prompts scored \(keys 2, 3, 4, 5, 6\)"):
        ifeval.load_responses(path, rows)
    assert [r.key for r in ifeval.load_responses(path, rows[:1], rows)] == [1]  # --limit 1


def test_cli_scores_responses_made_elsewhere(tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", "ifeval", "--data", str(DATA), "--responses", str(RESPONSES), "--out", str(out)]) == 0
    summary = json.loads((out / "ifeval.json").read_text())
    assert summary["prompt_level_strict_acc"] == pytest.approx(2 / 6)
    assert summary["inst_level_loose_acc"] == pytest.approx(8 / 10)
    assert summary["mean_response_tokens"] is None  # the file gives no token counts
    assert summary["mean_response_words"] > 0 and summary["responses"] == str(RESPONSES)
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["key"]: (r["strict"], r["loose"]) for r in results} == EXPECTED
    printed = capsys.readouterr().out
    assert "prompt-level         0.333   0.833" in printed and "instruction-level    0.500   0.800" in printed


def test_cli_limit_and_usage_errors(tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["eval", "ifeval", "--data", str(DATA), "--out", str(out)]
    assert main([*args, "--responses", str(RESPONSES), "--limit", "2"]) == 0
    assert json.loads((out / "ifeval.json").read_text())["prompts"] == 2
    assert main(args) == 2
    assert "give --model M" in capsys.readouterr().err
    assert main([*args, "--responses", str(tmp_path / "none.jsonl")]) == 4
    assert "file not found" in capsys.readouterr().err
    fresh = ["eval", "ifeval", "--data", str(DATA), "--out", str(tmp_path / "fresh")]
    assert main([*fresh, "--responses", str(tmp_path / "none.jsonl")]) == 4
    assert not (tmp_path / "fresh").exists()  # refused before it was made
    assert main([*fresh, "--responses", str(RESPONSES), "--set", "generation.batch_size=4"]) == 2
    assert "--set, --config and --preset (which set how responses are generated) have no effect" in capsys.readouterr().err


def test_cli_generates_with_a_tiny_model_and_resumes(tiny_model, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["eval", "ifeval", "--model", str(tiny_model), "--data", str(DATA), "--out", str(out),
            "--max-new-tokens", "8", "--set", "device=cpu", "--set", "generation.batch_size=4"]
    assert main(args) == 0
    responses = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert sorted(r["key"] for r in responses) == [1, 2, 3, 4, 5, 6]
    assert all(r["n_tokens"] <= 8 for r in responses)
    summary = json.loads((out / "ifeval.json").read_text())
    for key in ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc"):
        assert 0.0 <= summary[key] <= 1.0
    assert summary["prompt_level_strict_acc"] <= summary["prompt_level_loose_acc"]
    assert (summary["prompts"], summary["instructions"]) == (6, 10)
    assert 0 < summary["mean_response_tokens"] <= 8 and summary["max_new_tokens"] == 8
    assert "IFEval: 6 prompts, 10 instructions" in capsys.readouterr().out

    before = (out / "responses.jsonl").read_text()
    assert main(args) == 0  # everything already answered: nothing regenerated
    assert (out / "responses.jsonl").read_text() == before
    assert main([*args, "--max-new-tokens", "9"]) == 5  # would mix responses made under two settings
    assert "max_new_tokens: 8 -> 9" in capsys.readouterr().err
    assert main([*args, "--set", "generation.dtype=float32"]) == 5  # so would another precision
    assert "generation.dtype: 'auto' -> 'float32'" in capsys.readouterr().err
    # The data file changed under the same keys: the responses kept answer other prompts.
    other = tmp_path / "other.jsonl"
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    other.write_text("".join(json.dumps({**r, "prompt": r["prompt"] + " Thanks."}) + "\n" for r in rows))
    changed = [a if a != str(DATA) else str(other) for a in args]
    (out / "generation.json").write_text((out / "generation.json").read_text().replace(str(DATA), str(other)))
    assert main(changed) == 5
    assert "holds a response to key 1 for another prompt than the data's" in capsys.readouterr().err


def test_checks_run_with_no_nltk_data_and_download_nothing(tmp_path):
    empty = tmp_path / "nltk_data"
    empty.mkdir()
    script = (
        "import nltk\n"
        "def refuse(*a, **k): raise SystemExit('nltk.download was called')\n"
        "nltk.download = refuse\n"
        "from srlm import ifeval\n"
        "row = ifeval.IFEvalPrompt(key=1, prompt='p', instruction_id_list=['length_constraints:number_sentences',"
        " 'change_case:capital_word_frequency', 'language:response_language'], kwargs=[{'relation': 'less than',"
        " 'num_sentences': 4}, {'capital_relation': 'at least', 'capital_frequency': 3}, {'language': 'en'}])\n"
        "r = ifeval.check_response(row, 'Dr. Smith went to Washington, D.C. on Jan. 5. He met Mr. J. Fialka. '"
        " 'Then he left for HOME.')\n"
        "print(r.strict, nltk.sent_tokenize('Dr. Smith arrived. He sat.'))\n"
        "print(nltk.data.find('tokenizers/punkt_tab/english/').path.startswith(str(ifeval.use_bundled_punkt())))\n"
    )
    # 3 sentences only if punkt knows Dr., D.C., Jan. and Mr. (an untrained one finds 7); capitals D.C.,
    # J. and HOME come from nltk's word tokenizer, which needs punkt too.
    env = {**os.environ, "NLTK_DATA": str(empty), "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["[True, True, True] ['Dr. Smith arrived.', 'He sat.']", "True"]
    assert list(empty.iterdir()) == []
