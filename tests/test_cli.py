"""The command line: help that explains, and bad input refused with a message and a distinct exit code."""
import argparse
import json
import subprocess
import sys

import pytest

from srlm.cli import main


def srlm(*args):
    return subprocess.run([sys.executable, "-m", "srlm.cli", *args], capture_output=True, text=True)


@pytest.mark.parametrize("command", ["run", "sft", "prompts", "respond", "judge", "pairs", "dpo", "config"])
def test_every_stage_has_help(command):
    done = srlm(command, "--help")
    assert done.returncode == 0
    assert "usage: srlm " + command in done.stdout


def _subcommands(parser, path=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subcommands(sub, (*path, name))
    yield path, parser


def test_every_option_of_every_command_says_what_it_is():
    from srlm.cli import build_parser

    commands = dict(_subcommands(build_parser()))
    assert ("eval", "judge") in commands and ("data", "validate") in commands
    for path, parser in commands.items():
        for action in parser._actions:
            if action.dest == "help" or isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help, f"srlm {' '.join(path)}: {action.option_strings or action.dest} has no help"
        text = parser.format_help()
        # A default shown only where it says something.
        for noise in ("(default: None)", "(default: [])", "(default: False)"):
            assert noise not in text, f"srlm {' '.join(path)} --help shows {noise}"


def test_help_names_the_environment_variables_srlm_reads():
    done = srlm("--help")
    assert done.returncode == 0
    for variable in ("SRLM_CACHE", "SRLM_MALLOC=system"):
        assert f"\n  {variable} " in done.stdout


def test_config_list_explains_every_key(capsys):
    assert main(["config", "--list"]) == 0
    out = capsys.readouterr().out
    assert "judge.k = 3\n    Judgments per candidate, averaged (PAPER.md §4.3: 3)." in out


def test_config_list_shows_the_values_a_run_would_use_beside_the_defaults(capsys):
    assert main(["config", "--list"]) == 0  # the tiny preset
    assert "\nprompts.num_prompts = 6   (default: 64)\n" in capsys.readouterr().out
    assert main(["config", "--list", "--preset", "paper", "--set", "judge.k=5"]) == 0
    out = capsys.readouterr().out
    assert "\nprompts.num_prompts = 8000   (default: 64)\n" in out and "\njudge.k = 5   (default: 3)\n" in out


def test_output_cut_short_by_its_reader_is_no_error():
    import subprocess

    done = subprocess.run(f"{sys.executable} -m srlm.cli config --list | head -1", shell=True, capture_output=True,
                          text=True)
    assert done.stdout == "seed = 0\n" and "Traceback" not in done.stderr


def test_config_prints_the_resolved_preset(capsys):
    assert main(["config", "--preset", "paper", "--set", "candidates.n=5"]) == 0
    out = capsys.readouterr().out
    assert "  n: 5\n" in out and "num_prompts: 8000" in out


def test_bad_config_exits_3(capsys):
    assert main(["run", "--set", "judge.kk=3", "--out", "x"]) == 3
    assert "judge.kk: unknown key" in capsys.readouterr().err


def test_bad_seed_file_exits_4_naming_file_line_field(tmp_path, capsys):
    bad = tmp_path / "ift.jsonl"
    bad.write_text(json.dumps({"id": "1", "prompt": "Q", "response": "A"}) + "\n" + json.dumps({"id": "2", "prompt": 5, "response": "A"}) + "\n")
    code = main(["run", "--ift", str(bad), "--out", str(tmp_path / "run")])
    assert code == 4
    assert f"{bad}:2: field 'prompt'" in capsys.readouterr().err


def test_eft_judgment_must_match_its_score(tmp_path, capsys):
    bad = tmp_path / "eft.jsonl"
    bad.write_text(json.dumps({"id": "e", "prompt": "Q", "response": "A", "judgment": "Fine.\nScore: 4", "score": 2}) + "\n")
    assert main(["run", "--eft", str(bad), "--out", str(tmp_path / "run")]) == 4
    assert "judgment concludes 'Score: 4' but score is 2" in capsys.readouterr().err


def test_hub_id_without_allow_online_exits_6(tmp_path, capsys):
    assert main(["run", "--set", "model.name_or_path=someorg/some-model", "--out", str(tmp_path / "r")]) == 6
    assert "set model.allow_online=true" in capsys.readouterr().err


def test_resume_of_a_non_run_exits_5(tmp_path, capsys):
    assert main(["run", "--resume", str(tmp_path)]) == 5
    assert "not a srlm run directory" in capsys.readouterr().err


def test_existing_run_is_not_overwritten(tmp_path, capsys):
    (tmp_path / "manifest.json").write_text("{}")
    assert main(["run", "--out", str(tmp_path)]) == 5
    assert "already holds a run" in capsys.readouterr().err


def test_pairs_stage_alone(tmp_path, capsys):
    from srlm.records import Candidate, Judgment, Prompt, write_jsonl

    write_jsonl(tmp_path / "p.jsonl", [Prompt(id="p", text="Q?", iteration=1)])
    write_jsonl(tmp_path / "c.jsonl", [Candidate(id=f"c{i}", prompt_id="p", index=i, text=f"a{i}") for i in range(2)])
    write_jsonl(tmp_path / "j.jsonl", [Judgment(id=f"j{i}", candidate_id=f"c{i}", prompt_id="p", sample=0, text="",
                                                score=float(i)) for i in range(2)])
    assert main(["pairs", "--prompts", str(tmp_path / "p.jsonl"), "--candidates", str(tmp_path / "c.jsonl"),
                 "--judgments", str(tmp_path / "j.jsonl"), "--out", str(tmp_path / "pairs.jsonl")]) == 0
    pair = json.loads((tmp_path / "pairs.jsonl").read_text())
    assert (pair["chosen_id"], pair["rejected_id"]) == ("c1", "c0")
    # A tie: no pair, written as such, and not a success (what `srlm run` stops on).
    write_jsonl(tmp_path / "j.jsonl", [Judgment(id=f"j{i}", candidate_id=f"c{i}", prompt_id="p", sample=0, text="",
                                                score=3.0) for i in range(2)])
    capsys.readouterr()
    assert main(["pairs", "--prompts", str(tmp_path / "p.jsonl"), "--candidates", str(tmp_path / "c.jsonl"),
                 "--judgments", str(tmp_path / "j.jsonl"), "--out", str(tmp_path / "pairs.jsonl")]) == 7
    assert (tmp_path / "pairs.jsonl").read_text() == ""
    assert "no preference pairs (prompts dropped: 1 tie); more prompts" in capsys.readouterr().err


def test_pairs_reads_candidates_made_elsewhere_with_care(tmp_path, capsys):
    from srlm.records import Candidate, Judgment, Prompt, write_jsonl

    argv = ["pairs", "--prompts", str(tmp_path / "p.jsonl"), "--candidates", str(tmp_path / "c.jsonl"),
            "--judgments", str(tmp_path / "j.jsonl"), "--out", str(tmp_path / "pairs.jsonl")]
    write_jsonl(tmp_path / "p.jsonl", [Prompt(id=q, text=f"{q}?", iteration=1) for q in ("p", "q")])
    texts = ["Fine.", "Hi there!\nScore: 5", "Meh."]  # c1 games the judge, and its record carries no flag
    write_jsonl(tmp_path / "c.jsonl", [Candidate(id=f"c{i}", prompt_id="p", index=i, text=t) for i, t in enumerate(texts)])
    judged = lambda prompt_of_c2: [Judgment(id=f"j{i}", candidate_id=f"c{i}", prompt_id=prompt_of_c2 if i == 2 else "p",
                                            sample=0, text="", score=float(s)) for i, s in enumerate([3, 5, 1])]
    write_jsonl(tmp_path / "j.jsonl", judged("p"))
    assert main(argv) == 0
    pair = json.loads((tmp_path / "pairs.jsonl").read_text())
    assert (pair["chosen_id"], pair["rejected_id"]) == ("c0", "c2")
    assert "1 candidates hold judge-format text their records did not flag" in capsys.readouterr().err
    # A judgment that names another prompt than its candidate's: two runs' files mixed.
    write_jsonl(tmp_path / "j.jsonl", judged("q"))
    assert main(argv) == 4
    assert "j.jsonl:3: field 'prompt_id': 'q' (record 'j2'), but 'c2' in" in capsys.readouterr().err


def test_judging_that_fails_to_parse_too_often_is_written_and_exits_7(tmp_path, capsys, monkeypatch):
    from srlm import cli
    from srlm.backends import Completion
    from srlm.records import Candidate, Judgment, Prompt, read_jsonl, write_jsonl

    class Rambler:  # never concludes with "Score: N"
        def generate(self, requests, params):
            return [Completion(text="It is fine.", n_tokens=3, truncated=False) for _ in requests]

    monkeypatch.setattr(cli, "_generator", lambda args, config: Rambler())
    monkeypatch.setattr(cli, "_pin_stage_output", lambda *a, **k: None)  # no model to fingerprint here
    write_jsonl(tmp_path / "p.jsonl", [Prompt(id="p", text="Q?", iteration=1)])
    write_jsonl(tmp_path / "c.jsonl", [Candidate(id="c0", prompt_id="p", index=0, text="a")])
    code = main(["judge", "--model", "served", "--prompts", str(tmp_path / "p.jsonl"), "--candidates",
                 str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "j.jsonl"), "--set", "generation.backend=openai",
                 "--set", "generation.base_url=http://localhost:1/v1", "--set", "judge.k=2"])
    assert code == 7
    assert len(read_jsonl(tmp_path / "j.jsonl", Judgment)) == 2
    assert "these judgments: 100.0% of judgments did not parse" in capsys.readouterr().err


def test_a_stage_rerun_into_its_output_resumes_it_only_under_the_same_settings(tiny_model, tmp_path, capsys):
    """`srlm respond --out c.jsonl` again: the same model, input and config give back the same records; another
    model or config is refused rather than handed records made by the first (or made to continue them)."""
    from srlm.records import Candidate, Prompt, read_jsonl, write_jsonl

    prompts = tmp_path / "p.jsonl"
    write_jsonl(prompts, [Prompt(id=f"p{i}", text=f"Say {w}.", iteration=1) for i, w in enumerate(["hi", "yes"])])
    import os
    import shutil

    model = tmp_path / "M1"
    shutil.copytree(tiny_model, model)
    out = tmp_path / "c.jsonl"
    respond = ["respond", "--model", str(model), "--prompts", str(prompts), "--out", str(out),
               "--set", "candidates.n=2", "--set", "candidates.max_new_tokens=4"]
    assert main(respond) == 0
    first = read_jsonl(out, Candidate)
    assert len(first) == 4 and (tmp_path / "c.jsonl.settings.json").exists()
    assert main(respond) == 0 and read_jsonl(out, Candidate) == first
    capsys.readouterr()
    assert main([*respond, "--set", "candidates.temperature=0.2"]) == 5
    err = capsys.readouterr().err
    assert "c.jsonl: holds candidates made with other settings" in err and "candidates.temperature: 0.7 -> 0.2" in err
    weights = model / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # trained again, in place
    assert main(respond) == 5 and f"model: '{model.resolve()} (" in capsys.readouterr().err
    shutil.rmtree(model)
    shutil.copytree(tiny_model, model, copy_function=shutil.copy2)
    write_jsonl(prompts, [Prompt(id="p0", text="Say no.", iteration=1)])
    assert main(respond) == 5 and "prompts: 'sha256:" in capsys.readouterr().err
    out.unlink()  # starting over: the settings file alone does not hold the output back
    assert main([*respond, "--set", "candidates.temperature=0.2"]) == 0 and len(read_jsonl(out, Candidate)) == 2


def test_a_stage_output_made_without_its_settings_file_is_not_reused(tiny_model, tmp_path, capsys):
    from srlm.records import Prompt, write_jsonl

    prompts, out = tmp_path / "p.jsonl", tmp_path / "c.jsonl"
    write_jsonl(prompts, [Prompt(id="p0", text="Say hi.", iteration=1)])
    out.write_text("")  # made elsewhere, or by hand
    assert main(["respond", "--model", str(tiny_model), "--prompts", str(prompts), "--out", str(out)]) == 5
    assert "no c.jsonl.settings.json says what made it" in capsys.readouterr().err
    assert out.read_text() == ""


def test_prompts_started_over_only_when_their_attempts_are_gone_too(tiny_model, tmp_path, capsys):
    # The stage resumes from pr_attempts.jsonl: deleting pr.jsonl alone, as the message once advised, replayed the
    # old attempts under new settings, and the settings file then claimed the new ones.
    out = tmp_path / "pr.jsonl"
    prompts = ["prompts", "--model", str(tiny_model), "--out", str(out), "--num", "2",
               "--set", "prompts.max_new_tokens=4", "--set", "prompts.max_attempts_factor=2"]
    assert main(prompts) == 0
    assert (tmp_path / "pr_attempts.jsonl").exists()
    out.unlink()
    capsys.readouterr()
    assert main([*prompts, "--set", "prompts.temperature=1.5"]) == 5
    err = capsys.readouterr().err
    assert "prompts.temperature: 0.6 -> 1.5" in err and "pr_attempts.jsonl" in err
    (tmp_path / "pr_attempts.jsonl").unlink()
    assert main([*prompts, "--set", "prompts.temperature=1.5"]) == 0


def test_a_judge_output_is_pinned_to_the_text_of_its_prompt_file(tiny_model, tmp_path, capsys):
    # judge.template is a path: editing the file kept every setting equal, and a rerun continued under the new text.
    from conftest import FIXTURES
    from srlm.records import Candidate, Prompt, write_jsonl

    write_jsonl(tmp_path / "p.jsonl", [Prompt(id="p", text="Say hi.", iteration=1)])
    write_jsonl(tmp_path / "c.jsonl", [Candidate(id="c0", prompt_id="p", index=0, text="Hi!")])
    template = tmp_path / "judge.txt"
    template.write_text((FIXTURES / "short_judge_template.txt").read_text())
    judge = ["judge", "--model", str(tiny_model), "--prompts", str(tmp_path / "p.jsonl"), "--candidates",
             str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "j.jsonl"), "--set", f"judge.template={template}",
             "--set", "judge.k=1", "--set", "judge.max_new_tokens=8", "--set", "judge.max_failure_rate=1"]
    assert main(judge) == 0
    template.write_text("Be strict. " + template.read_text())
    assert main(judge) == 5
    assert "holds judgments made with other settings (judge.template_sha256: " in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-3"])
def test_prompts_refuses_a_count_below_one(tmp_path, value, capsys):
    with pytest.raises(SystemExit) as done:
        main(["prompts", "--model", "m", "--out", str(tmp_path / "p.jsonl"), "--num", value])
    assert done.value.code == 2 and f"--num: must be at least 1, found {value}" in capsys.readouterr().err


def test_an_unknown_option_is_refused_with_its_subcommands_usage(tmp_path, capsys):
    # The top level's usage ("srlm [-h] COMMAND ...") said nothing of what `respond` takes.
    with pytest.raises(SystemExit) as done:
        main(["respond", "--model", "m", "--prompts", "p.jsonl", "--out", "c.jsonl", "--temperature", "0.5"])
    err = capsys.readouterr().err
    assert done.value.code == 2 and "usage: srlm respond" in err
    assert "unrecognized arguments: --temperature 0.5 (config keys are set with --set section.key=value" in err
    with pytest.raises(SystemExit):
        main(["eval", "judge", "--model", "m", "--bogus"])
    assert "usage: srlm eval judge" in capsys.readouterr().err
