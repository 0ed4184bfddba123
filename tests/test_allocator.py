"""srlm.allocator: after keep_freed_memory(), a large buffer comes from the heap and stays there when freed.

Each case runs in its own interpreter: malloc's settings are process-wide and cannot be put back.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from srlm import allocator

glibc = platform.libc_ver()
needs_glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or glibc[0] != "glibc" or tuple(map(int, glibc[1].split(".")[:2])) < (2, 33),
    reason="reads malloc's state with mallinfo2 (glibc >= 2.33)")

BUFFER = 64 * 2**20  # the size of a training step's larger activation buffers

# Allocates and frees one BUFFER, reporting malloc's state (mallinfo2) before, while held, and after; in mode
# "stage" inside a function decorated with tensor_stage, with the state once it has returned.
PROBE = f"""
import ctypes, json, sys
from srlm.allocator import keep_freed_memory, tensor_stage

libc = ctypes.CDLL(None)
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
state = lambda: {{"heap": libc.mallinfo2().arena, "heap_used": libc.mallinfo2().uordblks,
                  "mapped": libc.mallinfo2().hblkhd}}

def stage():
    s = {{"before": state()}}
    buffer = libc.malloc({BUFFER})
    s["held"] = state()
    libc.free(buffer)
    s["after"] = state()
    return s

mode = sys.argv[1]
if mode == "stage":
    s = tensor_stage(stage)()
    s["returned"] = state()
else:
    s = {{"tuned": keep_freed_memory() if mode == "tuned" else None, **stage()}}
print(json.dumps(s))
"""


def probe(mode: str, **env) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **env})
    return json.loads(out.stdout)


@needs_glibc
def test_untuned_malloc_maps_a_large_buffer_and_unmaps_it_on_free():
    # The baseline the module exists to change; if glibc stops doing this, the module's premise is gone.
    s = probe("untuned")
    assert s["held"]["mapped"] - s["before"]["mapped"] >= BUFFER
    assert s["after"]["mapped"] == s["before"]["mapped"]


@needs_glibc
def test_tuned_malloc_takes_a_large_buffer_from_the_heap_and_keeps_it_after_free():
    s = probe("tuned")
    assert s["tuned"] is True
    assert s["held"]["mapped"] == s["before"]["mapped"]  # no mapping of its own
    assert s["held"]["heap_used"] - s["before"]["heap_used"] >= BUFFER
    assert s["after"]["heap"] == s["held"]["heap"]  # not trimmed: the next step reuses it without page faults


@needs_glibc
def test_a_tensor_stage_keeps_freed_memory_while_it_runs_and_gives_it_back_when_it_returns():
    s = probe("stage")
    assert s["held"]["mapped"] == s["before"]["mapped"]
    assert s["after"]["heap"] == s["held"]["heap"]
    assert s["held"]["heap"] - s["returned"]["heap"] >= BUFFER // 2  # trimmed once the stage is over


@needs_glibc
def test_srlm_malloc_system_leaves_malloc_as_it_is():
    s = probe("tuned", SRLM_MALLOC="system")
    assert s["tuned"] is False
    assert s["held"]["mapped"] - s["before"]["mapped"] >= BUFFER


def test_does_nothing_outside_glibc(monkeypatch):
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("", ""))
    assert allocator._apply() is False


def test_a_tensor_stage_on_a_gpu_hands_pytorchs_cached_blocks_back_to_the_driver(monkeypatch):
    """After training on a GPU, what PyTorch's allocator caches is free to it alone: a vLLM engine started next sizes
    its KV cache from what the driver reports free."""
    import torch

    emptied = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    monkeypatch.setenv("SRLM_MALLOC", "system")  # the GPU's memory is handed back whatever malloc does
    monkeypatch.setattr(allocator, "_tuned", None)

    @allocator.tensor_stage
    def train():
        assert not emptied
        return "trained"

    assert train() == "trained"
    assert emptied == [True]
