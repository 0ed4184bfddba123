"""models.py: sizing a sampling batch from the model's shape and the device's memory (models.auto_batch_size), and
loading a checkpoint (models.load_model)."""
from __future__ import annotations

import json

import pytest

from srlm import models

GIB = 2**30
# SmolLM2-135M's shape: 30 layers x 3 key/value heads x 64 dims, 23,040 bytes of bf16 cache per token.
SMOLLM2 = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576}
PER_SEQUENCE = 2 * 30 * 3 * 64 * 2 * 1024  # bytes of cache for one 1024-token sequence in bf16


@pytest.fixture
def checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2))
    with open(tmp_path / "model.safetensors", "wb") as f:
        f.truncate(GIB // 4)  # the weights' size is all that is read
    return tmp_path


def sized(monkeypatch, checkpoint, device="cpu", *, total, free):
    monkeypatch.setattr(models, "total_memory", lambda d: total)
    monkeypatch.setattr(models, "available_memory", lambda d: free)
    return models.auto_batch_size(checkpoint, device, "bfloat16", 1024)


def test_a_machine_with_room_gets_the_cap_whatever_is_free(monkeypatch, checkpoint):
    assert sized(monkeypatch, checkpoint, total=24 * GIB, free=20 * GIB) == 128
    assert sized(monkeypatch, checkpoint, total=24 * GIB, free=12 * GIB) == 128  # the same batches, run to run
    assert sized(monkeypatch, checkpoint, total=8 * GIB, free=7 * GIB) == 128  # two fifths of 8 GiB hold 145
    assert sized(monkeypatch, checkpoint, "cuda", total=80 * GIB, free=70 * GIB) == 256


def test_the_batch_shrinks_to_what_is_free(monkeypatch, checkpoint):
    # Half of (2 GiB free - 0.25 GiB of weights) holds 39 sequences of cache: the power of two below is 32.
    assert int(0.5 * (2 * GIB - GIB // 4) // PER_SEQUENCE) == 39
    assert sized(monkeypatch, checkpoint, total=24 * GIB, free=2 * GIB) == 32
    assert sized(monkeypatch, checkpoint, total=24 * GIB, free=GIB // 8) == 1  # less free than the weights take


def test_total_memory_bounds_the_batch_where_free_memory_is_unknown(monkeypatch, checkpoint):
    # Two fifths of 1 GiB hold 18 sequences: 16.
    assert int(0.4 * GIB // PER_SEQUENCE) == 18
    assert sized(monkeypatch, checkpoint, total=GIB, free=None) == 16


def test_this_machine_reports_its_free_memory():
    free = models.available_memory("cpu")
    assert free is None or 0 < free <= models.total_memory("cpu")


@pytest.mark.parametrize("native,expected", [(True, "bfloat16"), (False, "float32")])
def test_bf16_on_a_gpu_only_where_it_is_in_hardware(monkeypatch, native, expected):
    """torch says bf16 is supported on a T4 or V100 too, where it is emulated (slowly, and refused by vLLM): only
    bf16 in hardware counts."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)
    assert models.pick_dtype("auto", "cuda") == getattr(torch, expected)
    assert models.generation_dtype("auto", models.ModelConfig(), "cuda") == ("bfloat16" if native else "float16")


def made_up_system(monkeypatch, tmp_path, cgroups: str, mounts: list[str], free_kib: int = 64 * GIB // 1024):
    """/proc/self/cgroup, /proc/self/mountinfo and /proc/meminfo of a made-up machine whose mount points are
    under `tmp_path` (written `{root}` in `mounts`)."""
    (tmp_path / "cgroup").write_text(cgroups)
    (tmp_path / "mountinfo").write_text("".join(line.format(root=tmp_path) + "\n" for line in mounts))
    (tmp_path / "meminfo").write_text(f"MemTotal: {2 * free_kib} kB\nMemAvailable: {free_kib} kB\n")
    monkeypatch.setattr(models, "PROC_CGROUP", str(tmp_path / "cgroup"))
    monkeypatch.setattr(models, "MOUNTINFO", str(tmp_path / "mountinfo"))
    monkeypatch.setattr(models, "MEMINFO", str(tmp_path / "meminfo"))


def level(path, limit: str, usage: int | None = None, stat: str = ""):
    path.mkdir(parents=True, exist_ok=True)
    (path / "memory.max").write_text(limit + "\n")
    if usage is not None:
        (path / "memory.current").write_text(f"{usage}\n")
    (path / "memory.stat").write_text(stat)


V2_MOUNT = "30 23 0:26 / {root}/cg2 rw,nosuid - cgroup2 cgroup2 rw"


def test_a_containers_memory_limit_bounds_the_batch(monkeypatch, checkpoint, tmp_path):
    """In a container /proc/meminfo shows the host's memory; the cgroup's limit is what the process may take, and
    the page cache it holds is not taken (the kernel reclaims it before it kills anything)."""
    made_up_system(monkeypatch, tmp_path, "0::/\n", [V2_MOUNT])
    (tmp_path / "cg2").mkdir()
    assert models.cgroup_memory() == (None, None)  # no memory controller: no limit
    level(tmp_path / "cg2", "max", GIB)
    assert models.cgroup_memory() == (None, None)
    level(tmp_path / "cg2", str(2 * GIB), GIB, stat=f"anon 1\ninactive_file {3 * GIB // 4}\nactive_file 5\n")
    assert models.cgroup_memory() == (2 * GIB, 2 * GIB - GIB // 4)
    assert models.total_memory("cpu") == 2 * GIB  # below any machine the tests run on
    assert models.available_memory("cpu") == 2 * GIB - GIB // 4  # the host's 64 GiB free are not the container's
    # Two fifths of 2 GiB hold 36 sequences of cache, half of (1.75 GiB free - 0.25 GiB of weights) 34: 32, not 128.
    assert int(0.4 * 2 * GIB // PER_SEQUENCE) == 36 and int(0.5 * 1.5 * GIB // PER_SEQUENCE) == 34
    assert models.auto_batch_size(checkpoint, "cpu", "bfloat16", 1024) == 32


def test_the_tightest_limit_above_the_process_counts(monkeypatch, tmp_path):
    """A Slurm job or a systemd unit: the process's own cgroup has no limit, an ancestor has; the host's root is
    not read."""
    made_up_system(monkeypatch, tmp_path, "0::/system.slice/job_7/step_0\n", [V2_MOUNT])
    (tmp_path / "memory.max").write_text("1\n")  # above the mount point: not a cgroup, never read
    level(tmp_path / "cg2", str(GIB))
    level(tmp_path / "cg2/system.slice", "max", 20 * GIB)
    level(tmp_path / "cg2/system.slice/job_7", str(8 * GIB), 6 * GIB, stat=f"inactive_file {GIB}\n")
    level(tmp_path / "cg2/system.slice/job_7/step_0", "max", GIB)
    assert models.cgroup_memory() == (GIB, GIB)  # the mount root's limit is the tightest here (usage unread)
    (tmp_path / "cg2/memory.max").unlink()
    assert models.cgroup_memory() == (8 * GIB, 3 * GIB)


def test_cgroup_v1_memory_beside_an_empty_v2_hierarchy(monkeypatch, tmp_path):
    """Hybrid hosts mount cgroup v2 without the memory controller and v1's memory controller apart; a container
    without its own cgroup namespace sees the host's path of its cgroup, and its mount's root is that path."""
    made_up_system(monkeypatch, tmp_path, "4:memory:/docker/abc\n1:cpu,cpuacct:/docker/abc\n0::/docker/abc\n", [
        V2_MOUNT,
        "35 31 0:32 /docker/abc {root}/mem\\040v1 rw,relatime - cgroup cgroup rw,memory",
        "32 31 0:29 /docker/abc {root}/cpu rw,relatime - cgroup cgroup rw,cpu,cpuacct"])
    (tmp_path / "cg2/docker/abc").mkdir(parents=True)
    own = tmp_path / "mem v1"
    own.mkdir()
    (own / "memory.limit_in_bytes").write_text(f"{3 * GIB}\n")
    (own / "memory.usage_in_bytes").write_text(f"{GIB}\n")
    (own / "memory.stat").write_text(f"cache 9\ninactive_file 1\ntotal_inactive_file {GIB // 4}\n")
    assert models.cgroup_memory() == (3 * GIB, 3 * GIB - 3 * GIB // 4)
    (own / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    assert models.cgroup_memory() == (None, None)


def test_a_mount_of_another_subtree_says_nothing_of_this_process(monkeypatch, tmp_path):
    made_up_system(monkeypatch, tmp_path, "4:memory:/user.slice/u1\n", [
        "35 31 0:32 /docker/other {root}/mem rw,relatime - cgroup cgroup rw,memory"])
    level(tmp_path / "mem", str(GIB), GIB // 2)  # /docker/other's limit, not this process's
    (tmp_path / "mem/memory.max").rename(tmp_path / "mem/memory.limit_in_bytes")
    assert models.cgroup_memory() == (None, None)


def test_no_proc_files_no_limit(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "PROC_CGROUP", str(tmp_path / "missing"))
    assert models.cgroup_memory() == (None, None)


def test_weights_stored_in_bf16_and_loaded_in_fp32_count_twice(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    assert models.weights_bytes(checkpoint, "float32") == GIB // 4  # no stored dtype declared: the file's size
    (checkpoint / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    assert models.weights_bytes(checkpoint, "float32") == GIB // 2
    assert models.weights_bytes(checkpoint, "bfloat16") == GIB // 4
    # A composite model's config: the text model's dtype first, else the top level's.
    (checkpoint / "config.json").write_text(json.dumps({"text_config": config, "dtype": "bfloat16"}))
    assert models.weights_bytes(checkpoint, "float32") == GIB // 2
    (checkpoint / "config.json").write_text(json.dumps({"text_config": {**config, "dtype": "float32"},
                                                        "dtype": "bfloat16"}))
    assert models.weights_bytes(checkpoint, "float32") == GIB // 4


def test_a_head_to_head_judge_gets_no_larger_batch_than_fits_it(monkeypatch, checkpoint):
    """generation.batch_size is fixed for the run's own model; a larger judge or opponent is capped to what `auto`
    gives it, and never raised above the run's number."""
    from srlm.backends import capped_batch_size, resolve_batch_size
    from srlm.config import RunConfig

    monkeypatch.setattr(models, "total_memory", lambda d: 24 * GIB)
    monkeypatch.setattr(models, "available_memory", lambda d: 2 * GIB)
    config = RunConfig.model_validate({"device": "cpu", "generation": {"batch_size": 128}})
    auto = config.model_copy(deep=True)
    auto.generation.batch_size = "auto"
    fits = resolve_batch_size(auto, checkpoint)
    assert 1 <= fits < 128 and capped_batch_size(config, checkpoint) == fits
    config.generation.batch_size = 1
    assert capped_batch_size(config, checkpoint) == 1



def test_a_loaded_model_never_swaps_in_hub_kernels(monkeypatch, tiny_model):
    """transformers kernelizes a model at load and again whenever `.train()`/`.eval()` sees a new mode, fetching the
    kernels from the Hub for the device it is on: offline on a GPU, the first training step failed (seen on an H200)."""
    import transformers.modeling_utils

    from srlm.config import ModelConfig

    def hub(*args, **kwargs):
        raise AssertionError("srlm asked transformers for Hub kernels")

    monkeypatch.setattr(transformers.modeling_utils, "kernelize", hub)
    lm = models.load_model(tiny_model, ModelConfig(name_or_path=str(tiny_model), dtype="float32"), "cpu")
    lm.train()
    lm.eval()
    assert not lm.use_kernels


def test_on_a_gpu_the_blocks_pytorch_caches_count_as_free(monkeypatch):
    """A model released earlier in the process leaves its memory cached by PyTorch, reported used by the driver:
    the next model's batch would shrink by all of it."""
    import torch

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index: (10 * GIB, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda index: 50 * GIB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda index: 20 * GIB)
    assert models.available_memory("cuda") == 40 * GIB


def test_processes_that_start_together_convert_the_embedded_model_once(monkeypatch, tmp_path):
    """`accelerate launch`'s ranks, or two runs on a new machine, share the cache: one converts, the others wait and
    load what it published (each converting into the same `.saving` directory tore each other's files)."""
    import threading
    import time

    from srlm.config import ModelConfig

    monkeypatch.setenv("SRLM_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "embedded_gguf_path", lambda: tmp_path / "model.gguf")
    converting, conversions = [], []

    def convert(gguf, target):
        converting.append(1)
        assert len(converting) == 1, "two conversions at once"
        time.sleep(0.2)
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")
        conversions.append(target)
        converting.pop()

    monkeypatch.setattr(models, "convert_gguf", convert)
    found, errors = [], []

    def resolve():
        try:
            found.append(models.resolve(ModelConfig()))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=resolve) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(conversions) == 1
    assert found == [models.embedded_cache()] * 3


def test_under_accelerate_launch_each_process_takes_its_own_gpu_before_loading(monkeypatch):
    import torch

    chosen, visible = [], [8]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible[0])
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert models.pick_device("auto") == "cuda"
    assert chosen == [3]
    visible[0] = 1  # a launcher that shows each process its own GPU alone
    assert models.pick_device("cuda") == "cuda" and chosen == [3, 0]
    monkeypatch.delenv("LOCAL_RANK")
    assert models.pick_device("cuda") == "cuda" and chosen == [3, 0]


def test_a_cache_on_a_file_system_without_locks_still_converts(monkeypatch, tmp_path):
    import fcntl

    from srlm.config import ModelConfig

    def unsupported(*args):
        raise OSError(38, "Function not implemented")

    monkeypatch.setenv("SRLM_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "embedded_gguf_path", lambda: tmp_path / "model.gguf")
    monkeypatch.setattr(models, "convert_gguf", lambda gguf, target: target.mkdir(parents=True)
                        or (target / "config.json").write_text("{}"))
    monkeypatch.setattr(fcntl, "flock", unsupported)
    assert models.resolve(ModelConfig()) == models.embedded_cache()
