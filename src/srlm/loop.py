"""`srlm run`: the whole method, M0 -> M1 -> M2 -> ... (PAPER.md §2 and §4), as a sequence of stages.

    seed         validate the IFT/EFT seed and snapshot it into the run directory
    sft          M1 = SFT(M0, IFT + EFT)
    iteration t = 1..T, with the current model M(t):
      prompts      new prompts, few-shot from the IFT prompts (and M(t)'s own), filtered
      candidates   N responses per prompt
      judgments    k judgments per candidate with the paper's judge prompt
      pairs        best vs worst per prompt, ties dropped       -> AIFT(M(t))
      dpo          M(t+1) = DPO(M(t), AIFT(M(t)))
    eval.M<t>    after each model, when the config names evaluation sets (eval.*): judge agreement with humans,
                 IFEval, head-to-head with the previous model (PAPER.md §5) -> RUN/eval/M<t>/, RUN/eval.jsonl,
                 RUN/eval.png
    sft_baseline with eval.sft_baseline: M0 on IFT alone -> models/SFT, measured like the others (eval.SFT) and
                 compared head-to-head with every M(t)

Every stage reads and writes files in the run directory and is marked complete in the manifest only once
its outputs are whole, so `srlm run --resume RUN` continues after the last complete stage (and inside a
generation stage, after the last batch written; inside training, from the last Trainer checkpoint).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pydantic
import yaml

from . import h2h, ifeval, models
from .backends import capped_batch_size, close, make_generator, resolve_batch_size
from .candidates import respond, respond_options, truncation_warning
from .config import RunConfig, absolute_paths, flat_keys, run_config_data
from .dpo import train_dpo
from .errors import JudgeIntegrityError, ModelError, RunDirError
from .evaluation import first_prompts, load_ranked, measure_judge
from .judging import check_failure_rate, judgments_per_candidate, load_template, run_judge
from .pairs import as_recorded, select_pairs
from .progress import bar as _bar
from .prompts import PromptAttempt, generate_prompts, prompt_options
from .records import (
    Candidate,
    EFTExample,
    IFTExample,
    Judgment,
    Pair,
    Prompt,
    atomic_write_text,
    read_jsonl,
    write_jsonl,
)
from .report import format_eval_table, plot, plot_eval, read_eval
from .rundir import RunDir, text_digest
from .seed import load_eft, load_ift
from .sft import train_sft
from .summary import format_table, iteration_stats

# Keys a resumed run may change: they decide what happens next, not what the finished stages wrote.
RESUMABLE_CHANGES = {"iterations", "judge.max_failure_rate", "judge.saturation_warning", "candidates.truncation_warning"}
# Sections that one kind of stage alone reads (by the stage name's last part): a resumed run may change them until
# such a stage has finished, and the run is then the one the new settings would have made from the start. The errors
# that stop a run in training ask for these (every pair over dpo.max_length; a smaller micro-batch for memory).
TRAINING_SECTIONS = {"sft": ("sft", "sft_baseline"), "dpo": ("dpo",)}


def _changed_keys(a: RunConfig, b: RunConfig) -> set[str]:
    fa, fb = flat_keys(a), flat_keys(b)
    return {k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k)}


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Run:
    """One run directory and the config it was made with; `execute()` runs every stage not yet complete."""

    def __init__(self, config: RunConfig, root: Path, *, resume: bool = False):
        self.config = config
        self.dir = RunDir(root)
        try:
            self._open(root, resume)  # sets self.template, checked
        except BaseException:
            self.dir.unlock()  # a refused resume must not hold the directory while its error is handled
            raise
        self._generator = None
        self._generator_model: Path | None = None

    def _open(self, root: Path, resume: bool) -> None:
        if resume:
            manifest = self.dir.open()
            self.dir.lock()
            recorded = self._recorded_config(manifest)
            # Evaluation settings never change what the method wrote; they apply to models not yet evaluated. A path
            # given anew (an eval set) is taken from where this resume runs; the recorded ones stay as they are.
            changed = _changed_keys(recorded, self.config)
            self.config = config = absolute_paths(self.config, changed)
            changed = _changed_keys(recorded, config)
            finished = {stage.rsplit(".", 1)[-1] for stage, entry in manifest["stages"].items()
                        if entry.get("status") == "complete"}
            untrained = {section for section, stages in TRAINING_SECTIONS.items() if not finished & set(stages)}
            if refused := {k for k in changed if not k.startswith("eval.") and k.split(".")[0] not in untrained
                           } - RESUMABLE_CHANGES:
                fa, fb = flat_keys(recorded), flat_keys(config)
                shown = "; ".join(f"{k}: {fa.get(k)!r} -> {fb.get(k)!r}" for k in sorted(refused))
                raise RunDirError(
                    f"{root}: this run was made with a different config ({shown}; from config.yaml or --set); on "
                    f"resume only {', '.join(sorted(RESUMABLE_CHANGES))} and eval.* may change, and sft.* and "
                    "dpo.* until the run's first stage of that kind has finished, since the others would not match "
                    "the artifacts already written. Start a new run for the rest"
                )
            self._check_template(manifest, config)
            for section in {k.split(".")[0] for k in changed} & untrained:
                self._start_over(section)
            if changed:
                # Checked before it is saved: a typo in a --set would otherwise stay in config.yaml and fail every
                # later plain --resume the same way.
                self._eval_sets()
            if changed or "config" not in manifest or "judge_template_sha256" not in manifest:
                # A run made before the manifest kept them gets them now, so later resumes are checked too.
                self.dir.record_config(config, template=self.template)
        else:
            self.config = config = absolute_paths(self.config)
            # Validate every input at the door, so that a typo never leaves a half-made run directory behind.
            self.template = load_template(config.judge.template)
            models.check(config.model)
            self._check_backends(config)
            load_ift(config.data.ift, config.data.ift_limit)
            load_eft(config.data.eft, config.data.eft_limit)
            self._eval_sets()
            if config.generation.batch_size == "auto":
                # Fixed once and recorded in config.yaml: every stage plans (and a resume replans) the same batches.
                config.generation.batch_size = resolve_batch_size(config, models.resolve(config.model))
            self.dir.create(config, template=self.template)  # locked from before its first write

    def _start_over(self, section: str) -> None:
        """The checkpoints of an unfinished stage trained under `section` settings now changed go: the stage starts
        over, as the run would have run it."""
        from .training import discard, work_dir_of

        outputs = [self.dir.model(1), self.dir.sft_baseline] if section == "sft" else [self.dir.model(2)]
        for work in map(work_dir_of, outputs):
            if work.exists():
                say(f"[srlm] {work}: its checkpoints were trained with other {section}.* settings; the stage starts "
                    "over")
                discard(work)

    def _recorded_config(self, manifest: dict) -> RunConfig:
        """The config this run was last accepted under: the manifest's copy (config.yaml may have been edited since),
        or config.yaml itself for a run made before the manifest kept one."""
        try:
            if "config" in manifest:
                return RunConfig.model_validate(run_config_data(manifest["config"]))
            return RunConfig.model_validate(run_config_data(
                yaml.safe_load(self.dir.config_path.read_text(encoding="utf-8")) or {}))
        except (pydantic.ValidationError, OSError, yaml.YAMLError) as e:
            raise RunDirError(f"{self.dir.manifest_path}: the config recorded for this run cannot be read back "
                              f"({type(e).__name__}: {str(e).splitlines()[0]})")

    def _check_template(self, manifest: dict, config: RunConfig) -> None:
        """The judge prompt's text is part of the method (the EFT data and every judgment used it), and a file can
        change under the same judge.template path; a run that recorded its digest resumes only with that text."""
        self.template = load_template(config.judge.template)
        recorded = manifest.get("judge_template_sha256")
        if recorded is not None and recorded != text_digest(self.template):
            where = config.judge.template or "the built-in paper prompt"
            raise RunDirError(f"{where}: the judge prompt is not the text this run began with (its sha256 was "
                              f"{recorded[:12]}..., now {text_digest(self.template)[:12]}...); the run's judgments "
                              "and EFT training used the earlier text. Restore it, or start a new run")

    @staticmethod
    def _check_backends(config: RunConfig) -> None:
        """What the config asks to run on, checked before anything is made: vLLM installed if it is the backend,
        and a head-to-head judge given as a model directory loadable."""
        if config.generation.backend == "vllm":
            import importlib.util

            from .backends.vllm import INSTALL_HINT

            if importlib.util.find_spec("vllm") is None:
                raise ModelError(f"vLLM is not installed here; {INSTALL_HINT}")
        e = config.eval
        if e.h2h_prompts and e.h2h_judge != "self" and not e.h2h_judge.startswith(("http://", "https://")):
            models.check(config.model.model_copy(update={"name_or_path": e.h2h_judge}))

    # -- helpers ---------------------------------------------------------------------------------------
    def _stage(self, name: str, work, load):
        """Run `work()` unless the manifest says `name` is complete; either way return `load()`."""
        if self.dir.is_complete(name):
            say(f"[srlm] {name}: complete, skipped")
            return load()
        say(f"[srlm] {name} ...")
        start = time.time()
        counts = work()
        self.dir.mark_complete(name, time.time() - start, counts or {})
        return load()

    def _generator_for(self, model_path: Path):
        if self._generator_model != model_path:
            self._release_generator()
            self._generator = make_generator(self.config, model_path)
            self._generator_model = model_path
        return self._generator

    def _release_generator(self) -> None:
        close(self._generator)
        self._generator = None
        self._generator_model = None
        import gc

        gc.collect()

    # -- stages ----------------------------------------------------------------------------------------
    def seed_stage(self) -> tuple[list[IFTExample], list[EFTExample]]:
        data = self.config.data

        def work():
            ift = load_ift(data.ift, data.ift_limit)
            eft = load_eft(data.eft, data.eft_limit)
            write_jsonl(self.dir.data("ift"), ift)
            write_jsonl(self.dir.data("eft"), eft)
            return {"ift": len(ift), "eft": len(eft)}

        return self._stage("seed", work, lambda: (read_jsonl(self.dir.data("ift"), IFTExample),
                                                  read_jsonl(self.dir.data("eft"), EFTExample)))

    def sft_stage(self, ift, eft) -> Path:
        out = self.dir.model(1)

        def work():
            m0 = models.resolve(self.config.model)
            train_sft(m0, ift, eft, out, self.config, template=self.template)
            return {"examples": len(ift) + len(eft)}

        return self._stage("sft", work, lambda: out)

    def sft_baseline_stage(self, ift) -> Path:
        """The paper's SFT baseline (PAPER.md §2): M0 fine-tuned on IFT alone, the yardstick of §6."""
        out = self.dir.sft_baseline

        def work():
            train_sft(models.resolve(self.config.model), ift, [], out, self.config, template=self.template)
            return {"examples": len(ift)}

        return self._stage("sft_baseline", work, lambda: out)

    def iteration(self, t: int, seed_prompts: list[str]) -> dict:
        cfg, folder, model_t = self.config, self.dir.iteration(t), self.dir.model(t)
        seed = cfg.seed + 1000 * t

        def prompts_work():
            with _bar(cfg.prompts.num_prompts, f"iter {t} prompts") as bar:
                earlier = [p.text for s in range(1, t)
                           for p in read_jsonl(self.dir.iteration(s) / "prompts.jsonl", Prompt)]
                prompts, attempts = generate_prompts(self._generator_for(model_t), seed_prompts,
                                                     folder / "prompts.jsonl", iteration=t, seed=seed, progress=bar,
                                                     earlier=earlier, **prompt_options(cfg))
            if not prompts:
                raise JudgeIntegrityError(f"iteration {t}: every generated prompt was filtered out "
                                          f"({folder / 'prompts_attempts.jsonl'} says why)")
            return {"generated": len(attempts), "kept": len(prompts)}

        prompts = self._stage(f"iter_{t}.prompts", prompts_work,
                              lambda: read_jsonl(folder / "prompts.jsonl", Prompt))

        def candidates_work():
            with _bar(len(prompts) * cfg.candidates.n, f"iter {t} candidates") as bar:
                out = respond(self._generator_for(model_t), prompts, folder / "candidates.jsonl", seed=seed + 1,
                              progress=bar, **respond_options(cfg))
            warning = truncation_warning(out, cfg.candidates.max_new_tokens, cfg.candidates.truncation_warning)
            if warning:
                say(f"[srlm] warning: iteration {t}: {warning}")
            return {"candidates": len(out), "flagged": sum(x.flagged for x in out),
                    "truncated": sum(x.truncated is True for x in out)}

        candidates = self._stage(f"iter_{t}.candidates", candidates_work,
                                 lambda: read_jsonl(folder / "candidates.jsonl", Candidate))

        def judgments_work():
            with _bar(len(candidates) * judgments_per_candidate(cfg), f"iter {t} judgments") as bar:
                out = run_judge(self._generator_for(model_t), prompts, candidates, folder / "judgments.jsonl", cfg,
                                seed=seed + 2, progress=bar)
            failed = sum(x.score is None for x in out)
            return {"judgments": len(out), "parse_failures": failed}

        judgments = self._stage(f"iter_{t}.judgments", judgments_work,
                                lambda: read_jsonl(folder / "judgments.jsonl", Judgment))
        self._release_generator()
        if not self.dir.is_complete(f"iter_{t}.pairs"):
            # The gate before pairs are made: an iteration past it was judged fit when it passed, and a resume that
            # changes judge.max_failure_rate applies to the iterations still to come.
            self._check_judge(t, judgments)

        selection = select_pairs(prompts, candidates, judgments, exclude_flagged=cfg.judge.exclude_flagged,
                                 exclude_truncated=cfg.judge.exclude_truncated)

        def pairs_work():
            write_jsonl(folder / "pairs.jsonl", selection.pairs)
            return {"pairs": len(selection.pairs), **{f"dropped: {k}": v for k, v in selection.dropped.items()}}

        pairs = self._stage(f"iter_{t}.pairs", pairs_work,
                            lambda: read_jsonl(folder / "pairs.jsonl", Pair, allow_empty=True))

        def dpo_work():
            if not pairs:
                raise JudgeIntegrityError(f"iteration {t}: {selection.none_left()}: a new run with them (see "
                                          f"{folder / 'judgments.jsonl'})")
            reference = self.dir.model(1) if cfg.dpo.reference == "m1" else None
            train_dpo(model_t, pairs, self.dir.model(t + 1), cfg, reference_path=reference)
            return {"pairs": len(pairs)}

        self._stage(f"iter_{t}.dpo", dpo_work, lambda: self.dir.model(t + 1))
        self.eval_stage(f"M{t + 1}", self.dir.model(t + 1), previous=(f"M{t}", model_t))
        attempts = read_jsonl(folder / "prompts_attempts.jsonl", PromptAttempt)
        counts = self.dir.read_manifest()["stages"][f"iter_{t}.pairs"].get("counts")
        return iteration_stats(attempts, candidates, judgments, as_recorded(selection, pairs, counts), len(prompts))

    def _eval_sets(self):
        """The evaluation sets the config names (validated: a bad file fails before any training)."""
        e = self.config.eval
        replies = rows = None
        if e.judge_data:
            replies = first_prompts(load_ranked(e.judge_data, e.judge_split), e.judge_max_prompts)
        if e.ifeval_data:
            rows = ifeval.load_prompts(e.ifeval_data, e.ifeval_limit)
        instructions = h2h.load_instructions(e.h2h_prompts)[: e.h2h_limit] if e.h2h_prompts else None
        return replies, rows, instructions

    def _h2h_judge(self, newer: Path, name: str):
        """The head-to-head judge as eval.h2h_judge names it: (name, weights' fingerprint or None for a server, a
        function that builds its backend)."""
        e, g = self.config.eval, self.config.generation
        if e.h2h_judge == "self":
            return f"self ({name})", models.fingerprint(newer), lambda: make_generator(self.config, newer)
        if e.h2h_judge.startswith(("http://", "https://")):
            from .backends import OpenAIGenerator

            return (f"{e.h2h_judge_model} at {e.h2h_judge}", None,
                    lambda: OpenAIGenerator(e.h2h_judge, e.h2h_judge_model or "", concurrency=g.concurrency,
                                            timeout_s=g.timeout_s, max_retries=g.max_retries))
        path = models.resolve(self.config.model.model_copy(update={"name_or_path": e.h2h_judge}))
        return (str(path), models.fingerprint(path),
                lambda: make_generator(self.config, path, batch_size=capped_batch_size(self.config, path)))

    def eval_stage(self, name: str, model: Path, previous: tuple[str, Path] | None = None) -> None:
        """Measure one model on the configured evaluation sets (PAPER.md §5): RUN/eval/<name>/, a line of
        eval.jsonl. Head-to-heads: against `previous` (M(t-1)) and, with eval.sft_baseline, the SFT baseline."""
        replies, rows, instructions = self._eval_sets()
        opponents = []
        if instructions is not None:
            if previous is not None:
                opponents.append(("h2h_vs_previous", *previous))
            if self.config.eval.sft_baseline and name != "SFT":
                opponents.append(("h2h_vs_sft", "SFT", self.dir.sft_baseline))
        if replies is None and rows is None and not opponents:
            return
        e, folder = self.config.eval, self.dir.root / "eval" / name

        def work():
            result: dict = {"model": name}
            if replies is not None:
                with _bar(len(replies) * judgments_per_candidate(self.config), f"eval {name} judge") as bar:
                    result["judge"] = measure_judge(self._generator_for(model), replies, folder / "judge",
                                                    self.config, seed=self.config.seed, progress=bar,
                                                    about={"data": str(e.judge_data), "split": e.judge_split})
            if rows is not None:
                # A resumed run may change eval.ifeval_*: the responses resume only under the same cap.
                ifeval.check_settings(folder / "ifeval", dict(max_new_tokens=e.ifeval_max_new_tokens))
                with _bar(len(rows), f"eval {name} ifeval") as bar:
                    responses = ifeval.generate_responses(
                        self._generator_for(model), rows, folder / "ifeval" / "responses.jsonl",
                        max_new_tokens=e.ifeval_max_new_tokens, batch_size=self.config.generation.batch_size,
                        seed=self.config.seed, progress=bar)
                score, _ = ifeval.score(rows, {r.key: r.response for r in responses})
                result["ifeval"] = ifeval.summary(score, responses, {"data": str(e.ifeval_data)})
            for key, other_name, other in opponents:
                self._release_generator()
                judge_name, judge_weights, judge = self._h2h_judge(model, name)
                result[key] = h2h.head_to_head(
                    instructions, h2h.Side(name, generator=lambda: make_generator(self.config, model)),
                    h2h.Side(other_name, generator=lambda other=other: make_generator(self.config, other)), judge,
                    folder / ("h2h" if key == "h2h_vs_previous" else key), judge_name=judge_name, judge_weights=judge_weights,
                    temperature=0.0,
                    max_new_tokens=e.h2h_max_new_tokens,
                    judge_max_new_tokens=self.config.judge.max_new_tokens,
                    batch_size=self.config.generation.batch_size, seed=self.config.seed)
            atomic_write_text(folder / "eval.json", json.dumps(result, indent=2) + "\n")
            self._release_generator()
            return {k: 1 for k in result if k != "model"}

        self._stage(f"eval.{name}", work, lambda: None)
        order = lambda p: -1 if p.parent.name == "SFT" else int(p.parent.name[1:])
        results = [json.loads(path.read_text(encoding="utf-8"))
                   for path in sorted((self.dir.root / "eval").glob("*/eval.json"), key=order)]
        atomic_write_text(self.dir.root / "eval.jsonl", "".join(json.dumps(r) + "\n" for r in results))
        plot_eval(results, self.dir.root / "eval.png")

    def _check_judge(self, t: int, judgments: list[Judgment]) -> None:
        """PAPER.md §7: stop rather than train on a judge that does not follow the format, and flag saturation."""
        check_failure_rate(judgments, self.config.judge.max_failure_rate, self.dir.iteration(t) / "judgments.jsonl",
                           f"iteration {t}")
        valid = [j.score for j in judgments if j.score is not None]
        # >= 4.5: a sampled judgment of 5, or an expected-mode score mostly on 5.
        share = sum(s >= 4.5 for s in valid) / len(valid) if valid else 0.0
        if share > self.config.judge.saturation_warning:
            say(f"[srlm] warning: iteration {t}: {100 * share:.0f}% of scores are 5 (judge saturation, PAPER.md §7)")

    # -- the whole run ---------------------------------------------------------------------------------
    def execute(self) -> dict:
        start = time.time()
        ift, eft = self.seed_stage()
        self.sft_stage(ift, eft)
        if self.config.eval.sft_baseline:
            self.eval_stage("SFT", self.sft_baseline_stage(ift))
        self.eval_stage("M1", self.dir.model(1))
        seed_prompts = [x.prompt for x in ift]
        per_iteration = {t: self.iteration(t, seed_prompts) for t in range(1, self.config.iterations + 1)}
        summary = {"iterations": per_iteration, "models": [str(self.dir.model(t)) for t in
                                                           range(1, self.config.iterations + 2)],
                   "seconds_this_session": round(time.time() - start, 1)}
        atomic_write_text(self.dir.root / "summary.json", json.dumps(summary, indent=2) + "\n")
        if per_iteration:
            print(format_table(per_iteration))
            print(f"\nplot: {plot(per_iteration, self.dir.root / 'report.png')}")
        results = read_eval(self.dir.root)
        if results:
            print("\nevaluation (PAPER.md §5)\n" + format_eval_table(results))
            print(f"\nplot: {self.dir.root / 'eval.png'}")
        print(f"\nmodels: {', '.join(summary['models'])}")
        return summary


def run(config: RunConfig, out: Path, *, resume: bool = False) -> dict:
    """Run (or resume) the whole method into `out`; returns the summary also written to `out/summary.json`."""
    job = Run(config, out, resume=resume)
    say(f"[srlm] run directory: {out}")  # once it exists: inputs refused at the door make none
    try:
        return job.execute()
    finally:
        job.dir.unlock()
