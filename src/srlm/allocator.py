"""glibc's malloc, set for tensor work: freed memory stays with the process instead of going back to the kernel.

PyTorch takes CPU tensor memory from the C library's malloc. glibc serves every request above its mmap threshold
(128 KiB at start, raised adaptively up to 32 MiB) with a fresh mmap and returns it to the kernel on free, and gives
the top of its heap back whenever more than the trim threshold lies free there. A training step allocates and frees
the same few hundred activation and gradient buffers, tens of MiB each, every micro-batch, so each step the kernel
maps, zero-fills and unmaps them again. With the mmap threshold at 1 GiB and trimming off, those buffers are reused
from the heap. How much that buys depends on how much of a step is the kernel's (bench/README.md, "Training"): on a
2-core Xeon with AMX, SFT in bf16 of 16 examples went from 5.7 to 1.4 million page faults and ran 1.37-1.6x faster;
on a Xeon without bf16 instructions, training in fp32, DPO ran 1.13-1.16x faster and SFT within that host's noise.
Peak memory grows by ~3%; once a training stage returns (`tensor_stage`), the freed memory goes back to the kernel.

Both settings are needed: setting only the trim threshold also freezes glibc's adaptive mmap threshold at 128 KiB,
which is several times slower. They are the same knobs as `GLIBC_TUNABLES=glibc.malloc.trim_threshold=...`,
set at run time so that `srlm` and Python callers of its stages get them without a wrapper; they are process-wide
and change nothing but where freed memory goes. Elsewhere than glibc (macOS, musl, a preloaded jemalloc or
tcmalloc) this does nothing.
"""
from __future__ import annotations

import ctypes
import functools
import gc
import os
import platform
import sys

# From glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

TRIM_THRESHOLD = 2**31 - 1  # the largest an int holds: never trim the heap's top
# Only allocations above 1 GiB get their own mapping. mallopt(3) gives 32 MiB as the ceiling on 64-bit; glibc 2.36
# takes 1 GiB (tests/test_allocator.py sees a 64 MiB block come from the heap), and where it is refused, 32 MiB.
MMAP_THRESHOLDS = (2**30, 2**25)

_tuned: bool | None = None


def keep_freed_memory() -> bool:
    """Set glibc's malloc to keep freed memory for reuse (once per process); True where it took effect.

    SRLM_MALLOC=system leaves the C library's settings as they are (to compare, or where memory is tight).
    """
    global _tuned
    if _tuned is None:
        _tuned = _apply()
    return _tuned


def release_freed_memory() -> None:
    """Give the free memory malloc holds back to the kernel (glibc's malloc_trim), where keep_freed_memory() is on,
    and the GPU memory PyTorch's allocator caches back to the driver (`release_gpu_memory`)."""
    if _tuned:
        gc.collect()  # the Trainer's reference cycles hold the model and optimizer state until collected
        ctypes.CDLL(None).malloc_trim(0)
    # A training stage's peak (activations, gradients, optimizer state) would otherwise stay reserved from the
    # driver through the stages after it: a vLLM engine sizes its KV cache from the GPU's free memory.
    release_gpu_memory()


def torch_on_gpu():
    """torch, where this process has imported it and started CUDA; else None (nothing is imported or started)."""
    torch = sys.modules.get("torch")
    return torch if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized() else None


def release_gpu_memory() -> None:
    """Hand the GPU memory PyTorch's allocator caches unused back to the driver, once what is unreachable is
    collected, where this process has used a GPU."""
    if torch := torch_on_gpu():
        gc.collect()
        torch.cuda.empty_cache()


def tensor_stage(stage):
    """Decorates a stage that trains: freed memory is reused while it runs and given back once it has returned.

    A stage that keeps its heap for reuse would otherwise keep its peak for the rest of the process: a training
    stage's several GiB of activations, gradients and optimizer state, resident through the generation and judging
    that follow it in `srlm run`, or beside a vLLM engine's own memory.
    """
    @functools.wraps(stage)
    def run(*args, **kwargs):
        keep_freed_memory()
        try:
            return stage(*args, **kwargs)
        finally:  # on return the stage's frame, and with it its model, trainer and batches, is gone
            release_freed_memory()

    return run


def _apply() -> bool:
    if os.environ.get("SRLM_MALLOC", "").strip().lower() == "system":
        return False
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # The mmap threshold first: an explicit trim threshold stops glibc from adapting the mmap threshold, so it
    # must already be where we want it, or the trim threshold left alone.
    if not any(mallopt(M_MMAP_THRESHOLD, value) for value in MMAP_THRESHOLDS):
        return False
    return bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
