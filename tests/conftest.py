"""Test set-up: 8 fake CPU devices for the sharding tests, set before jax is imported."""

import os
import pathlib

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

SHARED_EVAL = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "eval"


@pytest.fixture
def eval_dir() -> pathlib.Path:
    """The paper's benchmark files in ../shared/data/eval; skips when absent."""
    if not SHARED_EVAL.is_dir():
        pytest.skip(
            f"benchmark files not found at {SHARED_EVAL} "
            "(they live in ../shared, never in this repository)"
        )
    return SHARED_EVAL
