"""The `srlm` command line: `srlm run` for the whole method, one subcommand per stage for working on files.

Exit codes: 0 ok; 2 usage; 3 config; 4 input data; 5 run directory; 6 model; 7 judge integrity;
8 output not writable (disk full, read-only); 9 out of memory; 130 interrupted; 1 an unexpected error (a bug: please report it with the traceback).
"""
from __future__ import annotations

import argparse
import errno
import os
import re
import sys
import time
from pathlib import Path

from .errors import JudgeIntegrityError, OutputError, SrlmError

WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
OUT_OF_MEMORY = 9  # exit code

EPILOG = ("Every config key (see `srlm config --list`) can be set with --set section.key=value, on the commands "
          "that read the config (those with --set in their usage).")
MODEL_HELP = "a model directory (a run's models/M<t>, any Hugging Face layout) or embedded:smollm2-135m-instruct"


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default where it says something: not "(default: None)" after a required or unset option,
    nor "(default: False)" after a switch or "(default: [])" after a repeatable one."""

    def _get_help_string(self, action):
        if action.required or action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


ENVIRONMENT = """
environment:
  SRLM_CACHE           where the embedded model's converted checkpoint is kept (default ~/.cache/srlm)
  SRLM_MALLOC=system   leave glibc's malloc as it is (otherwise srlm has it keep freed memory for reuse, and
                       gives a training stage's back when the stage ends; see srlm/allocator.py)
"""


def _config_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("configuration (preset < --config < --set)")
    group.add_argument("--preset", help="a shipped preset: tiny (default; embedded model, CPU) or paper "
                                        "(the paper's sizes, for GPUs); none: the built-in defaults")
    group.add_argument("--config", type=Path, help="a YAML config file, over the preset (tiny unless --preset says "
                                                   "otherwise): it needs only the keys it changes")
    group.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one key, e.g. --set candidates.n=4 (repeatable)")


def _load(args, extra: list[str] | None = None):
    from .config import load_config

    return load_config(args.config, args.preset, [*(extra or []), *args.overrides])


def _model_path(name: str, config, option: str = "--model"):
    from . import models
    from .errors import ModelError

    try:
        return models.resolve(config.model.model_copy(update={"name_or_path": name}))
    except ModelError as e:  # named as the user gave it: an option here, not the config key
        raise ModelError(str(e).replace(f"model.name_or_path={name!r}", f"{option} {name!r}")) from e


def cmd_run(args) -> int:
    from .loop import run

    if args.resume:
        if args.out or args.preset or args.config or args.ift or args.eft:
            raise SrlmError("--resume DIR continues a run with its own saved config; drop --out/--preset/"
                            "--config/--ift/--eft")
        from .config import load_run_config

        root = args.resume
        saved = root / "config.yaml"
        if not saved.exists():
            from .errors import RunDirError

            if not root.is_dir():
                raise RunDirError(f"{root}: no such run directory")
            raise RunDirError(f"{root}: not a srlm run directory (no config.yaml)")
        config = load_run_config(saved, args.overrides)
        run(config, root, resume=True)
        return 0
    extra = []
    if args.ift:
        extra.append(f"data.ift={args.ift.resolve()}")
    if args.eft:
        extra.append(f"data.eft={args.eft.resolve()}")
    config = _load(args, extra)
    out = args.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    run(config, out)
    return 0


def cmd_sft(args) -> int:
    from .judging import load_template
    from .seed import load_eft, load_ift
    from .sft import train_sft

    if args.ift_only and args.eft:
        raise SrlmError("--ift-only trains on IFT alone: drop --eft, or drop --ift-only to train on both")
    config = _load(args)
    ift = load_ift(args.ift or config.data.ift, config.data.ift_limit)
    eft = [] if args.ift_only else load_eft(args.eft or config.data.eft, config.data.eft_limit)
    start = time.time()
    out = train_sft(_model_path(args.model, config), ift, eft, args.out, config,
                    template=load_template(config.judge.template))
    print(f"SFT of {args.model} on {len(ift)} IFT + {len(eft)} EFT examples in {time.time() - start:.0f} s -> {out}")
    return 0


def _ready(config, name: str | None):
    """Fix generation.batch_size=auto for the model `name`; called once a command's input files are checked (it may
    convert the embedded model). Stages plan their batches with the number, so it is fixed before they start."""
    from .backends import resolve_batch_size

    if config.generation.batch_size == "auto":
        if name is None:
            config.generation.batch_size = 16
        else:
            path = name if config.generation.backend == "openai" else _model_path(name, config)
            config.generation.batch_size = resolve_batch_size(config, path)
    return config


def _generator(args, config):
    return _generator_for(args.model, config)


def _generator_for(name: str, config, *, other: bool = False):
    """The backend for model `name`; `other`: not the model generation.batch_size was fixed for (`_ready`), which
    may be larger, so its batches are capped to what fits it (backends.capped_batch_size)."""
    from .backends import capped_batch_size, make_generator

    # A server knows its models by the names it was started with: send the name as given, unresolved.
    if config.generation.backend == "openai":
        return make_generator(config, name)
    path = _model_path(name, config)
    return make_generator(config, path, batch_size=capped_batch_size(config, path) if other else None)


def _pin_stage_output(out: Path, what: str, model: str, config, sections: list[str], *,
                      companions: tuple[str, ...] = (), **inputs) -> None:
    """Tie a stage command's output to what its records depend on (rundir.pin_output): the model's weights (their
    fingerprint; a server's model by name), each input (a file's bytes, or a value), the seed and the config sections
    the stage reads."""
    import hashlib
    import json

    from .config import output_settings
    from .models import fingerprint
    from .rundir import pin_output

    digest = lambda data: hashlib.sha256(data).hexdigest()[:16]
    # The weights, not only the name: a model trained again into the same directory makes other records.
    served = config.generation.backend == "openai"
    settings: dict = {"model": model if served else fingerprint(_model_path(model, config))}
    for name, value in inputs.items():
        settings[name] = (f"sha256:{digest(value.read_bytes())}" if isinstance(value, Path)
                          else value if isinstance(value, (int, str)) else f"sha256:{digest(json.dumps(value).encode())}")
    settings.update(output_settings(config, sections))
    pin_output(Path(out), settings, what, companions=companions)


def _model_identity(model: str) -> str:
    """A model as an evaluation's settings and results name it: a directory by its path and the fingerprint of its
    weights (a model trained again into it is another model), anything else (a server's model name) as given."""
    from .models import fingerprint

    return fingerprint(model) if Path(model).exists() else model


def _seed_prompts(path: Path) -> list[str]:
    """Few-shot pool from a JSONL of IFT examples or of prompts (`prompt` or `text` field)."""
    from .errors import InputError
    from .records import IFTExample, Prompt, read_jsonl

    try:
        return [x.prompt for x in read_jsonl(path, IFTExample)]
    except InputError as first:
        try:
            return [x.text for x in read_jsonl(path, Prompt)]
        except InputError:
            raise first


def cmd_prompts(args) -> int:
    from .progress import bar
    from .prompts import generate_prompts, prompt_options
    from .seed import load_ift

    config = _load(args)
    pool = _seed_prompts(args.seed_prompts) if args.seed_prompts else [x.prompt for x in load_ift(config.data.ift)]
    earlier = [text for path in args.earlier for text in _seed_prompts(path)]
    options = prompt_options(_ready(config, args.model), args.num)
    attempts = Path(args.out).stem + "_attempts.jsonl"  # what generate_prompts resumes from
    _pin_stage_output(args.out, "prompts", args.model, config, ["prompts"], companions=(attempts,), few_shot_pool=pool,
                      iteration=args.iteration, num_prompts=options["num_prompts"],
                      **({"earlier": earlier} if earlier else {}))
    with bar(options["num_prompts"], "prompts") as progress:
        prompts, attempts = generate_prompts(_generator(args, config), pool, args.out, iteration=args.iteration,
                                             seed=config.seed, progress=progress, earlier=earlier, **options)
    print(f"{len(prompts)} prompts kept of {len(attempts)} generated -> {args.out}")
    return 0


def cmd_respond(args) -> int:
    from .candidates import respond, respond_options
    from .progress import bar
    from .records import Prompt, read_jsonl

    config = _load(args)
    prompts = read_jsonl(args.prompts, Prompt)  # validated before minutes go into loading a model
    _ready(config, args.model)
    _pin_stage_output(args.out, "candidates", args.model, config, ["candidates"], prompts=args.prompts)
    with bar(len(prompts) * config.candidates.n, "candidates") as progress:
        out = respond(_generator(args, config), prompts, args.out, seed=config.seed, progress=progress,
                      **respond_options(config))
    print(f"{len(out)} candidates ({sum(x.flagged for x in out)} flagged) -> {args.out}")
    return 0


def cmd_judge(args) -> int:
    from .judging import check_failure_rate, judgments_per_candidate, run_judge
    from .progress import bar
    from .records import Candidate, Prompt, check_links, read_jsonl

    config = _load(args)
    prompts, candidates = read_jsonl(args.prompts, Prompt), read_jsonl(args.candidates, Candidate)
    check_links(args.candidates, candidates, "prompt_id", prompts, args.prompts)
    _ready(config, args.model)
    _pin_stage_output(args.out, "judgments", args.model, config, ["judge"], prompts=args.prompts,
                      candidates=args.candidates)
    with bar(len(candidates) * judgments_per_candidate(config), "judgments") as progress:
        out = run_judge(_generator(args, config), prompts, candidates, args.out, config, seed=config.seed,
                        progress=progress)
    failed = sum(x.score is None for x in out)
    print(f"{len(out)} judgments, {failed} parse failures ({100 * failed / max(1, len(out)):.1f}%) -> {args.out}")
    # Written either way; what `srlm run` would stop on is not a success here either (exit 7).
    check_failure_rate(out, config.judge.max_failure_rate, args.out, "these judgments")
    return 0


def cmd_pairs(args) -> int:
    from .judging import contains_judge_text
    from .pairs import select_pairs
    from .records import Candidate, Judgment, Prompt, check_links, read_jsonl, write_jsonl

    prompts, candidates = read_jsonl(args.prompts, Prompt), read_jsonl(args.candidates, Candidate)
    judgments = read_jsonl(args.judgments, Judgment)
    check_links(args.candidates, candidates, "prompt_id", prompts, args.prompts)
    check_links(args.judgments, judgments, "candidate_id", candidates, args.candidates, same="prompt_id")
    # Candidates made elsewhere may not carry srlm's flag: the text is what a judge was gamed by, so look at it.
    unflagged = [c for c in candidates if not c.flagged and contains_judge_text(c.text)]
    if unflagged:
        print(f"[srlm] {len(unflagged)} candidates hold judge-format text their records did not flag; flagged here",
              file=sys.stderr)
        ids = {c.id for c in unflagged}
        candidates = [c.model_copy(update={"flagged": True}) if c.id in ids else c for c in candidates]
    selection = select_pairs(prompts, candidates, judgments, exclude_flagged=not args.keep_flagged,
                             exclude_truncated=not args.keep_truncated)
    write_jsonl(args.out, selection.pairs)
    print(f"{len(selection.pairs)} pairs -> {args.out}; prompts dropped: {selection.dropped_text()}")
    if not selection.pairs:  # nothing for DPO to train on: `srlm run` stops here too
        raise JudgeIntegrityError(selection.none_left())
    return 0


def cmd_dpo(args) -> int:
    from .dpo import train_dpo
    from .records import Pair, read_jsonl

    config = _load(args)
    if config.dpo.reference == "m1" and not args.reference:
        # Outside a run there is no M1 to find: the setting would be ignored, training against M(t) instead.
        raise SrlmError("dpo.reference=m1: give the M1 model as --reference M1 (srlm dpo knows only --model)")
    pairs = read_jsonl(args.pairs, Pair)
    reference = _model_path(args.reference, config, "--reference") if args.reference else None
    start = time.time()
    out = train_dpo(_model_path(args.model, config), pairs, args.out, config, reference_path=reference)
    print(f"DPO of {args.model} on {len(pairs)} pairs (reference: {args.reference or args.model}) in "
          f"{time.time() - start:.0f} s -> {out}")
    return 0


def cmd_data_validate(args) -> int:
    from .seed import shipped
    from .validate import validate

    ift, eft = args.ift, args.eft
    if args.shipped:
        if ift is not None or eft is not None:
            raise SrlmError("--shipped validates the data srlm ships; give it alone, or --ift/--eft without it")
        ift, eft = shipped("ift"), shipped("eft")
    if ift is None and eft is None:
        raise SrlmError("nothing to validate: give --ift FILE and/or --eft FILE (or --shipped)")
    report = validate(ift, eft)
    print(report.render())
    return 0 if report.ok else 4


def _import_ranked(args, out: Path):
    from .evaluation import load_ranked
    from .importers import import_ranked, judgments_path
    from .judging import judge_options
    from .progress import bar

    if args.hf:
        raise SrlmError("--from ranked reads a local file (ranked-reply JSONL or the oasst2-srlm export), not --hf")
    if not args.model:
        raise SrlmError("--from ranked needs --model: the model that judges every reply (the paper used its IFT-only "
                        "SFT model, PAPER.md §2)")
    config = _load(args)
    replies = load_ranked(args.src, args.split)  # validated before minutes go into loading a model
    _ready(config, args.model)
    side = judgments_path(out)
    # Judgments are kept by reply id, so a rerun with more --max-prompts or another --split reuses them; a rerun
    # with another model, judge setting or input file would pass off earlier judgments as this judge's.
    _pin_stage_output(side, "judgments of ranked replies", args.model, config, ["judge"], replies=args.src)
    if side.exists() or side.with_name(side.name + ".partial").exists():
        print(f"[srlm] reusing the judgments already in {side} (same model, judge settings and input)",
              file=sys.stderr)
    prompt_ids = list(dict.fromkeys(r.prompt_id for r in replies))[: args.max_prompts]
    total = sum(r.prompt_id in set(prompt_ids) for r in replies) * config.judge.k
    with bar(total, "judging replies") as progress:
        return import_ranked(_generator(args, config), replies, side, seed=config.seed, max_prompts=args.max_prompts,
                             progress=progress, **judge_options(config))


def cmd_data_import(args) -> int:
    from .errors import InputError
    from .importers import TARGETS, check_target, import_file, import_hf
    from .records import write_jsonl

    kind, out = args.to[0], Path(args.to[1])
    if kind not in TARGETS:
        raise SrlmError(f"--to {kind} {out}: the first value must be one of {', '.join(TARGETS)}, the second the "
                        "output file")
    check_target(args.source_format, kind)
    if (args.src is None) == (args.hf is None):
        raise SrlmError("give the input either as SRC (a local file) or as --hf DATASET_ID"
                        + (", not both" if args.src else ""))
    if args.max_prompts is not None and args.max_prompts < 1:
        raise SrlmError(f"--max-prompts {args.max_prompts}: must be at least 1")
    lang = None if args.lang == "any" else args.lang
    if args.source_format == "ranked":
        records, report = _import_ranked(args, out)
    elif args.hf:
        records, report = import_hf(args.source_format, args.hf, kind, split=args.hf_split,
                                    allow_online=args.allow_online, lang=lang, limit=args.max_prompts)
    else:
        records, report = import_file(args.source_format, args.src, kind, lang=lang, limit=args.max_prompts)
    print(report.render(), file=sys.stderr)
    if not records:
        if args.source_format == "ranked":
            raise JudgeIntegrityError(f"no EFT example: the judge agreed with the human ranking on no prompt (see "
                                      f"the counts above); {out} was not written")
        raise InputError(f"nothing to import: every one of the {report.read} {report.unit} was dropped (see the "
                         f"counts above); {out} was not written", path=args.src or f"hf:{args.hf}")
    write_jsonl(out, records)
    print(f"{len(records)} records ({kind}) -> {out}")
    return 0


def cmd_eval_judge(args) -> int:
    from .evaluation import first_prompts, load_ranked, measure_judge
    from .judging import judgments_per_candidate
    from .progress import bar

    config = _load(args)
    replies = first_prompts(load_ranked(args.data, args.split), args.max_prompts)
    _ready(config, args.model)
    with bar(len(replies) * judgments_per_candidate(config), "judgments") as progress:
        result = measure_judge(_generator(args, config), replies, args.out, config, seed=config.seed,
                               about=dict(model=_model_identity(args.model), data=str(args.data), split=args.split),
                               progress=progress)
    for key, value in result.items():
        print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, found {value}")
    return value


def cmd_eval_ifeval(args) -> int:
    import json

    from . import ifeval
    from .config import output_settings
    from .records import atomic_write_text, write_jsonl

    if (args.model is None) == (args.responses is None):
        raise SrlmError("give --model M (generate responses and score them) or --responses FILE (score responses "
                        "made elsewhere), one of the two")
    every = ifeval.load_prompts(args.data)  # validated before minutes go into loading a model
    rows = every[: args.limit] if args.limit else every
    about = dict(model=args.model, data=str(args.data), responses=None, limit=args.limit)
    if args.responses:
        if args.overrides or args.config or args.preset:
            raise SrlmError("--responses scores responses made elsewhere: --set, --config and --preset (which set how "
                            "responses are generated) have no effect there; drop them")
        responses = ifeval.load_responses(args.responses, rows, every)
        about.update(responses=str(args.responses))
        args.out.mkdir(parents=True, exist_ok=True)  # once the responses are known good: no empty --out left behind
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        config = _ready(_load(args), args.model)
        model = _model_identity(args.model)
        ifeval.check_settings(args.out, dict(model=model, data=str(args.data.resolve()),
                                             max_new_tokens=args.max_new_tokens, temperature=0.0,
                                             **output_settings(config, [])))
        responses = ifeval.generate_responses(_generator(args, config), rows, args.out / "responses.jsonl",
                                              max_new_tokens=args.max_new_tokens,
                                              batch_size=config.generation.batch_size, seed=config.seed)
        about.update(max_new_tokens=args.max_new_tokens)
    result, per_prompt = ifeval.score(rows, {r.key: r.response for r in responses})
    write_jsonl(args.out / "results.jsonl", per_prompt)
    summary = ifeval.summary(result, responses, about)
    atomic_write_text(args.out / "ifeval.json", json.dumps(summary, indent=2) + "\n")
    print(ifeval.render(summary))
    print(f"-> {args.out / 'ifeval.json'}")
    return 0


def cmd_eval_h2h(args) -> int:
    from .h2h import Side, head_to_head, load_instructions, load_outputs, load_pairwise_template, render

    if args.judge_url:
        if args.judge:
            raise SrlmError("give the judge as --judge self|MODEL or as --judge-url URL --judge-model NAME, not both")
        if not args.judge_model:
            raise SrlmError("--judge-url needs --judge-model NAME: the model name the server knows (e.g. gpt-4-turbo)")
        if not args.judge_url.startswith(("http://", "https://")):
            raise SrlmError(f"--judge-url {args.judge_url}: expected an http:// or https:// URL, e.g. "
                            "https://api.openai.com/v1")
    elif not args.judge:
        raise SrlmError("no judge: give --judge self (model A judges), --judge MODEL (a local model) or --judge-url "
                        "URL --judge-model NAME (an OpenAI-compatible endpoint)")
    if args.judge == "self" and not args.a:
        raise SrlmError("--judge self means model A judges, so it needs --a MODEL (not --a-outputs)")
    config = _load(args)
    template = load_pairwise_template(args.judge_template)
    instructions = load_instructions(args.prompts)[: args.max_prompts]  # validated before any model loads
    _ready(config, args.a or args.b or (None if args.judge_url else args.judge))

    def name(model: str) -> str:
        return str(Path(model).resolve()) if Path(model).exists() else model

    def side(model: str | None, outputs: Path | None) -> Side:
        if outputs is not None:
            return Side(name=str(outputs), outputs=load_outputs(outputs))
        sized_for = args.a or args.b  # the model _ready fixed generation.batch_size for
        return Side(name=name(model), generator=lambda: _generator_for(model, config, other=model != sized_for),
                    weights=_model_identity(model))

    g = config.generation
    if args.judge_url:
        from .backends import OpenAIGenerator

        judge_name, judge_weights = f"{args.judge_model} at {args.judge_url}", None

        def judge():
            return OpenAIGenerator(args.judge_url, args.judge_model, api_key_env=args.judge_api_key_env,
                                   concurrency=g.concurrency, timeout_s=g.timeout_s, max_retries=g.max_retries)
    else:
        judge_model = args.a if args.judge == "self" else args.judge
        judge_name = f"self ({name(args.a)})" if args.judge == "self" else name(args.judge)
        judge_weights = _model_identity(judge_model)

        def judge():
            return _generator_for(judge_model, config, other=judge_model != (args.a or args.b))

    summary = head_to_head(instructions, side(args.a, args.a_outputs), side(args.b, args.b_outputs), judge, args.out,
                           judge_name=judge_name, judge_weights=judge_weights, template=template, temperature=args.temperature,
                           top_p=config.candidates.top_p,
                           max_new_tokens=args.max_new_tokens or config.eval.h2h_max_new_tokens,
                           judge_max_new_tokens=args.judge_max_new_tokens or config.judge.max_new_tokens,
                           batch_size=g.batch_size, seed=config.seed, resamples=args.resamples)
    print(render(summary))
    print(f"-> {args.out / 'h2h.json'}")
    return 0


def cmd_report(args) -> int:
    from .report import report

    print(report(args.run_dir, png=not args.no_plot))
    return 0


def cmd_config(args) -> int:
    from .config import config_to_yaml, describe_fields, flat_keys, yaml_value

    if args.list:
        # The values a run with these options would use (the tiny preset unless told otherwise), and the built-in
        # default beside any that differs from it: the defaults are the paper's. Written as --set takes them.
        values = {key: yaml_value(value) for key, value in flat_keys(_load(args), None).items()}
        for key, default, help_text in describe_fields():
            value = values.get(key, default)
            beside = f"   (default: {default})" if value != default else ""
            print(f"{key} = {value}{beside}\n    {help_text}")
        return 0
    print(config_to_yaml(_load(args)), end="")
    return 0


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("srlm")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="srlm",
        description="Self-Rewarding Language Models (Yuan et al., 2024): a model writes prompts, answers them,\n"
                    "judges its answers, and trains on its own preferences with DPO.",
        epilog=EPILOG + "\n" + ENVIRONMENT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"srlm {_version()}",
                        help="srlm's version (with a bug report, please)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = DefaultsHelp

    p = sub.add_parser("run", help="the whole method: M0 -> SFT -> M1 -> T self-rewarding iterations",
                       description="Run the whole method (PAPER.md §2, §4): SFT on IFT+EFT gives M1; each iteration "
                                   "M(t) writes prompts, answers each N times, judges each answer k times, keeps "
                                   "best-vs-worst pairs and trains M(t+1) with DPO. Prints a summary table per "
                                   "iteration.", epilog=EPILOG, formatter_class=fmt)
    p.add_argument("--out", type=Path, help="run directory (default: runs/<timestamp>)")
    p.add_argument("--resume", type=Path, metavar="DIR", help="continue the run in DIR after its last complete stage")
    p.add_argument("--ift", type=Path, help="your IFT seed JSONL instead of the shipped one")
    p.add_argument("--eft", type=Path, help="your EFT seed JSONL instead of the shipped one")
    _config_options(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("sft", help="SFT a model on IFT (+EFT): M0 -> M1", epilog=EPILOG, formatter_class=fmt)
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--ift", type=Path, help="IFT JSONL (default: shipped seed)")
    p.add_argument("--eft", type=Path, help="EFT JSONL (default: shipped seed)")
    p.add_argument("--ift-only", action="store_true", help="train on IFT alone (the paper's SFT baseline)")
    p.add_argument("--out", type=Path, required=True, help="output model directory")
    _config_options(p)
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("prompts", help="generate new prompts few-shot, with Self-Instruct filters", epilog=EPILOG,
                       formatter_class=fmt)
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--seed-prompts", type=Path, help="JSONL of IFT examples or prompts for the few-shot pool "
                                                     "(default: the IFT seed)")
    p.add_argument("--earlier", type=Path, nargs="*", default=[], metavar="JSONL",
                   help="prompts of earlier iterations: new ones too like them (ROUGE-L) are dropped, as by `srlm run`")
    p.add_argument("--num", type=_positive_int, help="prompts to keep (default: prompts.num_prompts)")
    p.add_argument("--iteration", type=_positive_int, default=1, help="iteration number, used in record ids")
    p.add_argument("--out", type=Path, required=True, help="prompts JSONL to write")
    _config_options(p)
    p.set_defaults(func=cmd_prompts)

    p = sub.add_parser("respond", help="sample N candidate responses per prompt", epilog=EPILOG, formatter_class=fmt)
    p.add_argument("--model", required=True, help="M(t), the model that answers: " + MODEL_HELP)
    p.add_argument("--prompts", type=Path, required=True, help="prompts JSONL (`srlm prompts`' output)")
    p.add_argument("--out", type=Path, required=True, help="candidates JSONL to write")
    _config_options(p)
    p.set_defaults(func=cmd_respond)

    p = sub.add_parser("judge", help="judge every candidate k times with the LLM-as-a-Judge prompt", epilog=EPILOG,
                       formatter_class=fmt)
    p.add_argument("--model", required=True, help="M(t), the model that judges: " + MODEL_HELP)
    p.add_argument("--prompts", type=Path, required=True, help="prompts JSONL the candidates answer")
    p.add_argument("--candidates", type=Path, required=True, help="candidates JSONL (`srlm respond`'s output)")
    p.add_argument("--out", type=Path, required=True, help="judgments JSONL to write")
    _config_options(p)
    p.set_defaults(func=cmd_judge)

    p = sub.add_parser("pairs", help="best-vs-worst preference pairs from judgments (ties dropped)",
                       formatter_class=fmt)
    p.add_argument("--prompts", type=Path, required=True, help="prompts JSONL")
    p.add_argument("--candidates", type=Path, required=True, help="candidates JSONL (`srlm respond`'s output)")
    p.add_argument("--judgments", type=Path, required=True, help="judgments JSONL (`srlm judge`'s output)")
    p.add_argument("--keep-flagged", action="store_true", help="let candidates with judge-format text be chosen")
    p.add_argument("--keep-truncated", action="store_true",
                   help="let candidates cut at the length cap be chosen (DPO then teaches ending the turn there)")
    p.add_argument("--out", type=Path, required=True, help="pairs JSONL to write")
    p.set_defaults(func=cmd_pairs)

    p = sub.add_parser("dpo", help="DPO-train M(t+1) from M(t) on preference pairs", epilog=EPILOG,
                       formatter_class=fmt)
    p.add_argument("--model", required=True, help="M(t)")
    p.add_argument("--pairs", type=Path, required=True, help="pairs JSONL (`srlm pairs`' output)")
    p.add_argument("--reference", help="reference model (default: M(t) itself, the paper's; with dpo.reference=m1, "
                                       "give M1 here)")
    p.add_argument("--out", type=Path, required=True, help="output model directory")
    _config_options(p)
    p.set_defaults(func=cmd_dpo)

    p = sub.add_parser("data", help="seed data tools: validate, import")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    p = data_sub.add_parser("validate", help="check IFT/EFT files: schema, duplicates, scores, IFT/EFT overlap",
                            description="Report every problem in IFT and/or EFT seed files with its file and line; "
                                        "exit 4 if there is any error (warnings alone exit 0).",
                            formatter_class=fmt)
    p.add_argument("--ift", type=Path, help="IFT JSONL")
    p.add_argument("--eft", type=Path, help="EFT JSONL")
    p.add_argument("--shipped", action="store_true", help="validate the seed shipped with srlm")
    p.set_defaults(func=cmd_data_validate)

    import textwrap

    from .importers import FORMATS, RANKED_HELP
    from .validate import MAX_SCORE_SHARE

    def entry(name: str, text: str) -> str:
        return textwrap.fill(text, 100, initial_indent=f"  {name:<15}", subsequent_indent=" " * 17)

    ranked = (f"(-> eft) {RANKED_HELP}: each reply is judged k times (judge.k); a prompt is kept when the judge's "
              "mean scores order every reply pair that humans scored differently the same way, with no judge tie; "
              f"then each score is capped so none is over {MAX_SCORE_SHARE:.0%} of the set. The judgments go to OUT with "
              "the suffix "
              ".judgments.jsonl, and a rerun with the same model, judge settings and input reuses them.")
    p = data_sub.add_parser(
        "import", help="convert OpenAssistant, Alpaca, Dolly, ShareGPT, chat, Self-Instruct or ranked replies to "
                       "IFT / EFT / prompts",
        description="\n".join([
            textwrap.fill("Convert a dataset to srlm records: IFT examples, EFT examples or prompts (source=user). "
                          "Rows that do not fit the method are dropped and counted by reason (on stderr); duplicate "
                          "prompts are dropped; a malformed row stops the import naming its file, line (or array "
                          "element) and field (exit 4). Local files only, unless --hf DATASET_ID --allow-online.",
                          100),
            "", "formats (-> ift or prompts):", *(entry(name, spec.help) for name, spec in FORMATS.items()),
            entry("ranked", ranked), "",
            "example: srlm data import --from oasst trees.jsonl --to ift ift.jsonl"]),
        epilog=EPILOG,
        formatter_class=type("ImportHelp", (argparse.RawDescriptionHelpFormatter, fmt), {}),
    )
    p.add_argument("--from", dest="source_format", required=True, choices=[*FORMATS, "ranked"], metavar="FORMAT",
                   help=f"input format: {', '.join([*FORMATS, 'ranked'])}")
    p.add_argument("src", nargs="?", type=Path, metavar="SRC", help="the local JSON/JSONL file")
    p.add_argument("--to", nargs=2, required=True, metavar=("{ift,eft,prompts}", "OUT"),
                   help="what to write, and the JSONL file to write it to")
    p.add_argument("--lang", default="en", help="oasst: the language kept (a code as in the export; any: all)")
    p.add_argument("--split", choices=["eval", "train", "all"], default="train",
                   help="ranked: the fixed split by prompt id that `srlm eval judge` uses (eval: sha256(prompt_id) "
                        "%% 4 == 0); train keeps EFT apart from what eval measures")
    p.add_argument("--max-prompts", type=int, metavar="N",
                   help="ranked: judge only the first N prompts (bounds the cost); other formats: keep the first N")
    p.add_argument("--model", help="ranked: the model that judges (model directory or embedded:...)")
    p.add_argument("--hf", metavar="DATASET_ID", help="read a Hugging Face dataset instead of SRC (needs "
                                                      "--allow-online)")
    p.add_argument("--hf-split", default="train", help="the split of the --hf dataset")
    p.add_argument("--allow-online", action="store_true", help="let --hf download from the Hugging Face Hub")
    _config_options(p)
    p.set_defaults(func=cmd_data_import)

    p = sub.add_parser("eval", help="measure a model: judge agreement with human rankings, IFEval, head-to-head "
                                    "win rates")
    eval_sub = p.add_subparsers(dest="eval_command", required=True, metavar="COMMAND")
    p = eval_sub.add_parser("judge", help="reward-modeling agreement with human rankings (PAPER.md §5)",
                            description="Judge every reply of prompts with several human-rated replies and report "
                                        "pairwise accuracy, exact match, Spearman, Kendall tau and 5-best (PAPER.md "
                                        "§5), with the judge's tie rate and parse failures.", epilog=EPILOG,
                            formatter_class=fmt)
    p.add_argument("--model", required=True, help="the judge: " + MODEL_HELP)
    p.add_argument("--data", type=Path, required=True,
                   help="ranked replies (JSONL of {id, prompt_id, prompt, reply, human_score}, or the oasst2-srlm "
                        "export) or pairwise labels ({prompt, response_a, response_b, winner}, AlpacaEval's and "
                        "Chatbot Arena's labels, or {prompt, chosen, rejected})")
    p.add_argument("--split", choices=["eval", "train", "all"], default="eval",
                   help="fixed split by prompt id (eval: sha256(prompt_id) %% 4 == 0)")
    p.add_argument("--max-prompts", type=_positive_int, help="evaluate only the first N prompts of the split")
    p.add_argument("--out", type=Path, required=True, help="directory for judgments.jsonl and judge_agreement.json")
    _config_options(p)
    p.set_defaults(func=cmd_eval_judge)

    p = eval_sub.add_parser("ifeval", help="IFEval instruction-following accuracy (offline)",
                            description="Answer IFEval's prompts greedily with --model (or take responses made "
                                        "elsewhere with --responses) and report prompt- and instruction-level "
                                        "accuracy, strict and loose, with IFEval's own checks. Writes DIR/"
                                        "responses.jsonl (resumable), DIR/results.jsonl and DIR/ifeval.json.",
                            epilog=EPILOG, formatter_class=fmt)
    p.add_argument("--model", help="the model that answers (or give --responses)")
    p.add_argument("--data", type=Path, required=True,
                   help="IFEval's input_data.jsonl: {key, prompt, instruction_id_list, kwargs} a line")
    p.add_argument("--responses", type=Path,
                   help="score these responses instead of generating: JSONL of {key or prompt, response} (the "
                        "official format is {prompt, response})")
    p.add_argument("--out", type=Path, required=True, help="directory for responses.jsonl, results.jsonl, ifeval.json")
    p.add_argument("--limit", type=_positive_int, help="score only the first N prompts of --data")
    p.add_argument("--max-new-tokens", type=_positive_int, default=512,
                   help="length cap of a response (lm-evaluation-harness uses 1280); cut responses are counted")
    _config_options(p)
    p.set_defaults(func=cmd_eval_ifeval)

    p = eval_sub.add_parser(
        "h2h", help="head-to-head win rate of model A against B, judged pairwise in both orders (PAPER.md §5)",
        description="A and B each answer the prompts (or bring outputs from a file); the judge compares every pair "
                    "twice, with A's response shown first and with B's, and a pair is a win or a loss only when both "
                    "orders agree (otherwise a tie, as in the paper). Reports win / tie / loss rates, the win rate "
                    "(wins + ties/2) and a length-controlled win rate with bootstrap 95% intervals, mean response "
                    "lengths and parse failures. Writes DIR/outputs_a.jsonl, outputs_b.jsonl, verdicts.jsonl "
                    "(resumable) and DIR/h2h.json.", epilog=EPILOG, formatter_class=fmt)
    for letter in ("a", "b"):
        group = p.add_mutually_exclusive_group(required=True)
        group.add_argument(f"--{letter}", metavar="MODEL",
                           help=f"model {letter.upper()}: a model directory or embedded:smollm2-135m-instruct")
        group.add_argument(f"--{letter}-outputs", type=Path, metavar="FILE",
                           help=f"{letter.upper()}'s responses from a file instead, matched to the prompts by "
                                "instruction text: AlpacaEval's model_outputs.json, or JSONL of {instruction, output}")
    p.add_argument("--prompts", type=Path, required=True,
                   help="JSONL of srlm prompts ({id, text, ...}) or of {instruction} / {prompt} rows, or a JSON array "
                        "of such objects (AlpacaEval's model_outputs.json)")
    p.add_argument("--judge", metavar="J", help="self (model A judges) or a local model directory")
    p.add_argument("--judge-url", metavar="URL", help="judge with an OpenAI-compatible endpoint instead, e.g. "
                                                      "https://api.openai.com/v1 or http://localhost:8000/v1")
    p.add_argument("--judge-model", metavar="NAME", help="with --judge-url: the judge's model name on that server")
    p.add_argument("--judge-api-key-env", default="OPENAI_API_KEY", metavar="VAR",
                   help="with --judge-url: the environment variable holding the API key (unset: no key)")
    p.add_argument("--judge-template", type=Path, metavar="FILE",
                   help="your pairwise judge prompt, with <INSTRUCTION_HERE>, <RESPONSE_A_HERE> and <RESPONSE_B_HERE> "
                        "(unset: srlm's own, ending in 'Winner: A/B/tie')")
    p.add_argument("--out", type=Path, required=True, help="directory for the outputs, verdicts and h2h.json")
    p.add_argument("--max-prompts", type=_positive_int, metavar="N", help="compare on the first N prompts only")
    p.add_argument("--max-new-tokens", type=_positive_int, metavar="N",
                   help="length cap of a response of A or B (unset: eval.h2h_max_new_tokens, as `srlm run` "
                        "evaluates)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature of A and B (0: greedy)")
    p.add_argument("--judge-max-new-tokens", type=_positive_int, metavar="N",
                   help="length cap of a judgment (unset: judge.max_new_tokens)")
    p.add_argument("--resamples", type=_positive_int, default=1000, help="bootstrap resamples for the 95%% intervals")
    _config_options(p)
    p.set_defaults(func=cmd_eval_h2h)

    p = sub.add_parser("report", help="the per-iteration table of a run (and report.png beside it)",
                       formatter_class=fmt)
    p.add_argument("run_dir", type=Path, help="a run directory (runs/<timestamp>)")
    p.add_argument("--no-plot", action="store_true", help="skip writing report.png")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("config", help="print the resolved config, or list every key with --list",
                       formatter_class=fmt)
    p.add_argument("--list", action="store_true", help="every config key with its default and meaning")
    _config_options(p)
    p.set_defaults(func=cmd_config)
    _remember_parsers(parser)
    return parser


def _remember_parsers(parser: argparse.ArgumentParser) -> None:
    """Give each subcommand's parser to its own arguments (`_parser`), so that an argument it does not know is
    refused with that subcommand's usage rather than the top level's."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                sub.set_defaults(_parser=sub)
                _remember_parsers(sub)


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        import warnings

        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        warnings.filterwarnings("ignore", category=UserWarning, module="trl")
        warnings.filterwarnings("ignore", category=FutureWarning)
    except ImportError:
        pass


def _wrapped_os_error(error: Exception) -> OSError | None:
    """The OS error inside a library's own exception type: safetensors (every checkpoint save) raises SafetensorError
    '... No space left on device (os error 28) at path "DIR/.tmpXXXX"' where Python libraries raise OSError."""
    if type(error).__name__ != "SafetensorError":
        return None
    found = re.search(r"\(os error (\d+)\)(?: at path \"([^\"]+)\")?", str(error))
    if found is None:
        return None
    code, path = int(found.group(1)), found.group(2)
    # The path is safetensors' temporary file; the directory it was writing into is what the user knows.
    return OSError(code, os.strerror(code), str(Path(path).parent) if path else None)


def _out_of_memory(error: Exception) -> str | None:
    """What a failed allocation says, if `error` is one: PyTorch's on a GPU (torch.OutOfMemoryError), or its CPU
    allocator's where the host refuses one (a kill by the kernel's OOM killer reaches no handler)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(error, torch.OutOfMemoryError):
        return str(error).split(". ")[0]
    if isinstance(error, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(error):
        return "out of host memory: " + str(error).split("can't allocate memory: ")[-1].split(". ")[0]
    return None


def _refused(e: OSError) -> int:
    # Permission errors come from reads too (a model directory's files, deep in transformers): not "write".
    verb = "cannot write" if e.errno not in (errno.EACCES, errno.EPERM) else "cannot read or write"
    print(f"srlm: error: {e.filename or 'output'}: {verb}: {e.strerror}; complete stages and records "
          "are kept, rerun (or `srlm run --resume DIR`) after fixing it", file=sys.stderr)
    return OutputError.exit_code


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        hint = ""
        if any(a.startswith("--") for a in unknown) and any(a.dest == "overrides" for a in args._parser._actions):
            hint = " (config keys are set with --set section.key=value; `srlm config --list` lists them)"
        args._parser.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    if args.func not in (cmd_pairs, cmd_config, cmd_data_validate, cmd_report):
        from .allocator import keep_freed_memory

        _quiet_libraries()
        keep_freed_memory()  # process-wide, so set once here: generation and judging reuse freed buffers too
    try:
        return args.func(args)
    except SrlmError as e:
        print(f"srlm: error: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:
        # The reader went away (`srlm config --list | head`): nothing is wrong, and nothing more can be said.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:
        # A write refused deep inside a library (a Trainer checkpoint, a tokenizer file): still the user's to fix.
        if e.errno not in WRITE_ERRNOS:
            raise
        return _refused(e)
    except Exception as e:
        if (what := _out_of_memory(e)) is not None:
            print(f"srlm: error: {what}. Smaller batches need less: sft.micro_batch_size and dpo.micro_batch_size "
                  "(training), generation.batch_size (sampling); complete stages and records are kept (`srlm run "
                  "--resume DIR`; README, Resuming, says which keys a resumed run may change)", file=sys.stderr)
            return OUT_OF_MEMORY
        if (inner := _wrapped_os_error(e)) is None or inner.errno not in WRITE_ERRNOS:
            raise
        return _refused(inner)
    except KeyboardInterrupt:
        print("srlm: interrupted; `srlm run --resume DIR` continues a run where it stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
