"""Shared fixtures: a tiny randomly initialised chat model (built here, in seconds) and small seed files."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from srlm import testing
from srlm.testing import build_tiny_model

FIXTURES = Path(__file__).parent / "fixtures"


def _corpus() -> list[str]:
    lines = [(FIXTURES / "short_judge_template.txt").read_text()]
    for name in ("ift.jsonl", "eft.jsonl"):
        for line in (FIXTURES / name).read_text().splitlines():
            lines.extend(str(v) for v in json.loads(line).values())
    return lines


@pytest.fixture(scope="session")
def device() -> str:
    """Where the backend tests run the model: cpu here and in CI; SRLM_TEST_DEVICE=cuda runs them on a GPU
    (bench/device_check.sh)."""
    return os.environ.get("SRLM_TEST_DEVICE", "cpu")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), _corpus())


@pytest.fixture(scope="session")
def tiny_model_vllm(tmp_path_factory) -> Path:
    # The same tiny model with a head size vLLM's CPU attention supports (16 is below its minimum of 32).
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model-vllm"), _corpus(), head_dim=32)


@pytest.fixture
def ift_file() -> Path:
    return FIXTURES / "ift.jsonl"


@pytest.fixture
def eft_file() -> Path:
    return FIXTURES / "eft.jsonl"


def tiny_overrides(model: Path, ift: Path, eft: Path) -> list[str]:
    """The tiny run's overrides, on SRLM_TEST_DEVICE where it is set (the loop and training tests on a GPU)."""
    where = os.environ.get("SRLM_TEST_DEVICE", "cpu")
    return [f"device={where}" if o == "device=cpu" else o
            for o in testing.tiny_overrides(model, ift, eft, FIXTURES / "short_judge_template.txt")]


def tiny_config(model: Path, *extra: str):
    """The tiny model's run config on the fixture seed files, with `extra` overrides (key=value) on top."""
    from srlm.config import load_config

    return load_config(overrides=tiny_overrides(model, FIXTURES / "ift.jsonl", FIXTURES / "eft.jsonl") + list(extra))
