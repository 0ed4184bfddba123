"""The `srlm` command line: `srlm run` for the whole method, one subcommand per stage for working on files.

Exit codes: 0 ok; 2 usage; 3 config; 4 input data; 5 run directory; 6 model; 7 judge integrity;
8 output not writable (disk full, read-only); 130 interrupted; 1 an unexpected error (a bug: please report it with the traceback).
"""
from __future__ import annotations

import argparse
import errno
import os
import sys
import time
from pathlib import Path

from .errors import OutputError, SrlmError

WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}

EPILOG = "Every config key (see `srlm config --list`) can be set with --set section.key=value."


def _config_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("configuration (preset < --config < --set)")
    group.add_argument("--preset", help="a shipped preset: tiny (default; embedded model, CPU) or paper "
                                        "(the paper's sizes, for GPUs)")
    group.add_argument("--config", type=Path, help="a YAML config file (overrides the preset)")
    group.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one key, e.g. --set candidates.n=4 (repeatable)")


def _load(args, extra: list[str] | None = None):
    from .config import load_config

    return load_config(args.config, args.preset, [*(extra or []), *args.overrides])


def _model_path(name: str, config):
    from . import models

    return models.resolve(config.model.model_copy(update={"name_or_path": name}))


def cmd_run(args) -> int:
    from .loop import run

    if args.resume:
        if args.out or args.preset or args.config or args.ift or args.eft:
            raise SrlmError("--resume DIR continues a run with its own saved config; drop --out/--preset/"
                            "--config/--ift/--eft")
        from .config import load_config

        root = args.resume
        saved = root / "config.yaml"
        if not saved.exists():
            from .errors import RunDirError

            raise RunDirError(f"{root}: not a srlm run directory (no config.yaml)")
        config = load_config(saved, None, args.overrides)
        run(config, root, resume=True)
        return 0
    extra = []
    if args.ift:
        extra.append(f"data.ift={args.ift.resolve()}")
    if args.eft:
        extra.append(f"data.eft={args.eft.resolve()}")
    config = _load(args, extra)
    out = args.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    print(f"[srlm] run directory: {out}", file=sys.stderr)
    run(config, out)
    return 0


def cmd_sft(args) -> int:
    from .judging import load_template
    from .seed import load_eft, load_ift
    from .sft import train_sft

    config = _load(args)
    ift = load_ift(args.ift or config.data.ift, config.data.ift_limit)
    eft = [] if args.ift_only else load_eft(args.eft or config.data.eft, config.data.eft_limit)
    out = train_sft(_model_path(args.model, config), ift, eft, args.out, config,
                    template=load_template(config.judge.template))
    print(out)
    return 0


def _generator(args, config):
    from .backends import make_generator

    return make_generator(config, _model_path(args.model, config))


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
    from .prompts import generate_prompts, prompt_options
    from .seed import load_ift

    config = _load(args)
    pool = _seed_prompts(args.seed_prompts) if args.seed_prompts else [x.prompt for x in load_ift(config.data.ift)]
    prompts, attempts = generate_prompts(_generator(args, config), pool, args.out, iteration=args.iteration,
                                         seed=config.seed, **prompt_options(config, args.num))
    print(f"{len(prompts)} prompts kept of {len(attempts)} generated -> {args.out}")
    return 0


def cmd_respond(args) -> int:
    from .candidates import respond, respond_options
    from .records import Prompt, read_jsonl

    config = _load(args)
    prompts = read_jsonl(args.prompts, Prompt)  # validated before minutes go into loading a model
    out = respond(_generator(args, config), prompts, args.out, seed=config.seed, **respond_options(config))
    print(f"{len(out)} candidates ({sum(x.flagged for x in out)} flagged) -> {args.out}")
    return 0


def cmd_judge(args) -> int:
    from .judging import judge, judge_options
    from .records import Candidate, Prompt, check_links, read_jsonl

    config = _load(args)
    prompts, candidates = read_jsonl(args.prompts, Prompt), read_jsonl(args.candidates, Candidate)
    check_links(args.candidates, candidates, "prompt_id", prompts, args.prompts)
    out = judge(_generator(args, config), prompts, candidates, args.out, seed=config.seed, **judge_options(config))
    failed = sum(x.score is None for x in out)
    print(f"{len(out)} judgments, {failed} parse failures ({100 * failed / max(1, len(out)):.1f}%) -> {args.out}")
    return 0


def cmd_pairs(args) -> int:
    from .pairs import select_pairs
    from .records import Candidate, Judgment, Prompt, check_links, read_jsonl, write_jsonl

    prompts, candidates = read_jsonl(args.prompts, Prompt), read_jsonl(args.candidates, Candidate)
    judgments = read_jsonl(args.judgments, Judgment)
    check_links(args.candidates, candidates, "prompt_id", prompts, args.prompts)
    check_links(args.judgments, judgments, "candidate_id", candidates, args.candidates)
    selection = select_pairs(prompts, candidates, judgments, exclude_flagged=not args.keep_flagged)
    write_jsonl(args.out, selection.pairs)
    dropped = ", ".join(f"{v} {k}" for k, v in selection.dropped.items()) or "none"
    print(f"{len(selection.pairs)} pairs -> {args.out}; prompts dropped: {dropped}")
    return 0


def cmd_dpo(args) -> int:
    from .dpo import train_dpo
    from .records import Pair, read_jsonl

    config = _load(args)
    pairs = read_jsonl(args.pairs, Pair)
    reference = _model_path(args.reference, config) if args.reference else None
    out = train_dpo(_model_path(args.model, config), pairs, args.out, config, reference_path=reference)
    print(out)
    return 0


def cmd_data_validate(args) -> int:
    from .seed import shipped
    from .validate import validate

    ift, eft = args.ift, args.eft
    if args.shipped:
        ift, eft = shipped("ift"), shipped("eft")
    if ift is None and eft is None:
        raise SrlmError("nothing to validate: give --ift FILE and/or --eft FILE (or --shipped)")
    report = validate(ift, eft)
    print(report.render())
    return 0 if report.ok else 4


def cmd_eval_judge(args) -> int:
    import json

    from .evaluation import as_stage_records, judge_agreement, load_ranked
    from .judging import judge, judge_options
    from .pairs import candidate_scores
    from .records import atomic_write_text

    config = _load(args)
    replies = load_ranked(args.data, args.split)
    if args.max_prompts:
        keep = list(dict.fromkeys(r.prompt_id for r in replies))[: args.max_prompts]
        replies = [r for r in replies if r.prompt_id in set(keep)]
    prompts, candidates = as_stage_records(replies)
    args.out.mkdir(parents=True, exist_ok=True)
    judgments = judge(_generator(args, config), prompts, candidates, args.out / "judgments.jsonl", seed=config.seed,
                      **judge_options(config))
    result = judge_agreement(replies, candidate_scores(judgments)).as_dict()
    failed = sum(x.score is None for x in judgments)
    result.update(model=args.model, data=str(args.data), split=args.split, judgments=len(judgments),
                  parse_failures=failed, parse_failure_rate=failed / len(judgments) if judgments else None)
    atomic_write_text(args.out / "judge_agreement.json", json.dumps(result, indent=2) + "\n")
    for key, value in result.items():
        print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")
    return 0


def cmd_report(args) -> int:
    from .report import report

    print(report(args.run_dir, png=not args.no_plot))
    return 0


def cmd_config(args) -> int:
    from .config import config_to_yaml, describe_fields

    if args.list:
        for key, default, help_text in describe_fields():
            print(f"{key} = {default}\n    {help_text}")
        return 0
    print(config_to_yaml(_load(args)), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="srlm",
        description="Self-Rewarding Language Models (Yuan et al., 2024): a model writes prompts, answers them, "
                    "judges its answers, and trains on its own preferences with DPO.",
        epilog=EPILOG,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = argparse.ArgumentDefaultsHelpFormatter

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
    p.add_argument("--model", required=True, help="model directory or embedded:smollm2-135m-instruct")
    p.add_argument("--ift", type=Path, help="IFT JSONL (default: shipped seed)")
    p.add_argument("--eft", type=Path, help="EFT JSONL (default: shipped seed)")
    p.add_argument("--ift-only", action="store_true", help="train on IFT alone (the paper's SFT baseline)")
    p.add_argument("--out", type=Path, required=True, help="output model directory")
    _config_options(p)
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("prompts", help="generate new prompts few-shot, with Self-Instruct filters", epilog=EPILOG,
                       formatter_class=fmt)
    p.add_argument("--model", required=True)
    p.add_argument("--seed-prompts", type=Path, help="JSONL of IFT examples or prompts for the few-shot pool "
                                                     "(default: the IFT seed)")
    p.add_argument("--num", type=int, help="prompts to keep (default: prompts.num_prompts)")
    p.add_argument("--iteration", type=int, default=1, help="iteration number, used in record ids")
    p.add_argument("--out", type=Path, required=True, help="prompts JSONL to write")
    _config_options(p)
    p.set_defaults(func=cmd_prompts)

    p = sub.add_parser("respond", help="sample N candidate responses per prompt", epilog=EPILOG, formatter_class=fmt)
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="candidates JSONL to write")
    _config_options(p)
    p.set_defaults(func=cmd_respond)

    p = sub.add_parser("judge", help="judge every candidate k times with the LLM-as-a-Judge prompt", epilog=EPILOG,
                       formatter_class=fmt)
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", type=Path, required=True)
    p.add_argument("--candidates", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="judgments JSONL to write")
    _config_options(p)
    p.set_defaults(func=cmd_judge)

    p = sub.add_parser("pairs", help="best-vs-worst preference pairs from judgments (ties dropped)",
                       formatter_class=fmt)
    p.add_argument("--prompts", type=Path, required=True)
    p.add_argument("--candidates", type=Path, required=True)
    p.add_argument("--judgments", type=Path, required=True)
    p.add_argument("--keep-flagged", action="store_true", help="let candidates with judge-format text into pairs")
    p.add_argument("--out", type=Path, required=True, help="pairs JSONL to write")
    p.set_defaults(func=cmd_pairs)

    p = sub.add_parser("dpo", help="DPO-train M(t+1) from M(t) on preference pairs", epilog=EPILOG,
                       formatter_class=fmt)
    p.add_argument("--model", required=True, help="M(t)")
    p.add_argument("--pairs", type=Path, required=True)
    p.add_argument("--reference", help="reference model (default: M(t) itself)")
    p.add_argument("--out", type=Path, required=True, help="output model directory")
    _config_options(p)
    p.set_defaults(func=cmd_dpo)

    p = sub.add_parser("data", help="seed data tools: validate")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    p = data_sub.add_parser("validate", help="check IFT/EFT files: schema, duplicates, scores, IFT/EFT overlap",
                            description="Report every problem in IFT and/or EFT seed files with its file and line; "
                                        "exit 4 if there is any error (warnings alone exit 0).",
                            formatter_class=fmt)
    p.add_argument("--ift", type=Path, help="IFT JSONL")
    p.add_argument("--eft", type=Path, help="EFT JSONL")
    p.add_argument("--shipped", action="store_true", help="validate the seed shipped with srlm")
    p.set_defaults(func=cmd_data_validate)

    p = sub.add_parser("eval", help="measure a model: judge agreement with human rankings")
    eval_sub = p.add_subparsers(dest="eval_command", required=True, metavar="COMMAND")
    p = eval_sub.add_parser("judge", help="reward-modeling agreement with human rankings (PAPER.md §5)",
                            description="Judge every reply of prompts with several human-rated replies and report "
                                        "pairwise accuracy, exact match, Spearman, Kendall tau and 5-best (PAPER.md "
                                        "§5), with the judge's tie rate and parse failures.", epilog=EPILOG,
                            formatter_class=fmt)
    p.add_argument("--model", required=True)
    p.add_argument("--data", type=Path, required=True,
                   help="ranked replies: JSONL of {id, prompt_id, prompt, reply, human_score} or the oasst2-srlm export")
    p.add_argument("--split", choices=["eval", "train", "all"], default="eval",
                   help="fixed split by prompt id (eval: sha256(prompt_id) %% 4 == 0)")
    p.add_argument("--max-prompts", type=int, help="evaluate only the first N prompts of the split")
    p.add_argument("--out", type=Path, required=True, help="directory for judgments.jsonl and judge_agreement.json")
    _config_options(p)
    p.set_defaults(func=cmd_eval_judge)

    p = sub.add_parser("report", help="the per-iteration table of a run (and report.png beside it)",
                       formatter_class=fmt)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--no-plot", action="store_true", help="skip writing report.png")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("config", help="print the resolved config, or list every key with --list",
                       formatter_class=fmt)
    p.add_argument("--list", action="store_true", help="every config key with its default and meaning")
    _config_options(p)
    p.set_defaults(func=cmd_config)
    return parser


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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.func not in (cmd_pairs, cmd_config, cmd_data_validate, cmd_report):
        _quiet_libraries()
    try:
        return args.func(args)
    except SrlmError as e:
        print(f"srlm: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        # A write refused deep inside a library (a Trainer checkpoint, a tokenizer file): still the user's to fix.
        if e.errno not in WRITE_ERRNOS:
            raise
        print(f"srlm: error: {e.filename or 'output'}: cannot write: {e.strerror}; complete stages and records "
              "are kept, rerun (or `srlm run --resume DIR`) after fixing it", file=sys.stderr)
        return OutputError.exit_code
    except KeyboardInterrupt:
        print("srlm: interrupted; `srlm run --resume DIR` continues a run where it stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
