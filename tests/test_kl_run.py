"""A CPU demo run with KL to the reference policy (issue 11 section 3): it trains, logs the KL,
and a resumed run keeps the reference it started with.

`python -m laserjax train` subprocesses of the shrunk demo (as tests/test_trainer.py), with
`policy_loss.kl_coef=0.001 policy_loss.kl_type=low_var_kl`.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from laserjax import sharding, toy_task
from laserjax.checkpoint import Checkpointer
from laserjax.config import MeshConfig
from laserjax.config_load import load_config
from laserjax.model import Transformer
from laserjax.train_step import init_train_state

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo_cpu.yaml"
KL_ARGS = [
    "train.prompts_per_step=4",
    "model.toy.eval_problems=4",
    "train.eval_samples=8",
    "laser.reasoning_warmup_steps=2",
    "laser.self_reward_warmup_steps=2",
    "train.progress_bar=false",
    "train.export_hf=false",
    "train.total_steps=6",
    "train.save_every=2",
    "train.keep_checkpoints=3",
    "policy_loss.kl_coef=0.001",
    "policy_loss.kl_type=low_var_kl",
]


def _train(out: pathlib.Path, cache_dir: pathlib.Path) -> None:
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(
        f
        for f in env.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    )
    env.update(
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(cache_dir),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    argv = ["train", "--config", str(DEMO), f"output_dir={out}", *KL_ARGS]
    p = subprocess.run(
        [sys.executable, "-m", "laserjax", *argv],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert p.returncode == 0, f"train failed ({p.returncode}):\n{p.stderr[-4000:]}"


def _rows(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _restore(run_dir: pathlib.Path, step: int):
    cfg = load_config(run_dir / "config.yaml")
    mcfg = toy_task.model_config(
        cfg.model.toy,
        dtype=cfg.model.dtype,
        param_dtype=cfg.model.param_dtype,
    )
    mesh = sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    _, target = init_train_state(
        Transformer(mcfg, rngs=nnx.Rngs(0)), cfg.optim, mesh, with_reference=True
    )
    ckpt = Checkpointer(run_dir / "checkpoints", keep=cfg.train.keep_checkpoints)
    try:
        return ckpt.restore(step, target)[0]
    finally:
        ckpt.close()


@pytest.mark.slow
def test_kl_run_trains_and_resumes_with_its_reference(tmp_path):
    """6 LaSeR steps with KL on. Step 1's KL is round-off (policy = reference; float32 k3 has an
    ulp of 1.2e-7 near 0); afterwards it is positive and the parameters move away from the
    unchanged reference. A copy of the run with its step-6 checkpoint and logs after step 4
    removed resumes from step 4, logs steps 5-6 exactly as the uninterrupted run, and ends with
    the same parameters and reference."""
    cache = tmp_path / "jax_cache"
    full = tmp_path / "full"
    _train(full, cache)
    rows = _rows(full / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    kl = [r["kl_loss"] for r in rows]
    print("\nkl_loss per step:", kl)
    assert abs(kl[0]) <= 1e-6 and all(1e-6 < v < 1.0 for v in kl[1:])
    s2, s6 = _restore(full, 2), _restore(full, 6)
    for a, b in zip(jax.tree.leaves(s2.ref_params), jax.tree.leaves(s6.ref_params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    moved = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(jax.tree.leaves(s6.params), jax.tree.leaves(s6.ref_params), strict=True)
    )
    assert moved > 0

    # A run that died after its step-4 checkpoint: drop what came later, rerun the command.
    cut = tmp_path / "cut"
    shutil.copytree(full, cut, ignore=shutil.ignore_patterns("jax_cache"))
    shutil.rmtree(cut / "checkpoints" / "6")
    (cut / "summary.json").unlink()
    lines = (cut / "metrics.jsonl").read_text().splitlines()[:4]
    (cut / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    _train(cut, cache)
    resumed = _rows(cut / "metrics.jsonl")
    timing = {"step_seconds"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in resumed] == [
        {k: v for k, v in r.items() if k not in timing} for r in rows
    ]
    r6 = _restore(cut, 6)
    for a, b in zip(jax.tree.leaves(r6), jax.tree.leaves(s6), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
