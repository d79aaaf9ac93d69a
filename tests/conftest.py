"""Test set-up: 8 fake CPU devices for the sharding tests, set before jax is imported."""

import os
import pathlib

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# gcsfs's experimental zonal-bucket support asks a gRPC control API what kind each bucket is; the
# local GCS server of tests/gcs_emulator.py speaks only the JSON API (each ask would wait 60 s).
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

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
