"""Multi-host correctness without TPUs (issue 7): two JAX processes equal one.

`python -m laserjax train` runs twice on the toy task, with the same config and a (data = 2) mesh:

- once as one process that owns both devices (`--xla_force_host_platform_device_count=2`);
- once as two processes on localhost, one CPU device each, joined by `jax.distributed` through
  LASERJAX_DISTRIBUTED=1 and LASERJAX_COORDINATOR / LASERJAX_NUM_PROCESSES / LASERJAX_PROCESS_ID
  (what the trainer reads; cross-process CPU collectives go over gloo). Each process reads its own
  half of every step's prompts from the data stream (`make_train_loader`'s host shards); the
  trainer gathers the halves into the global batch, the sampler gathers the batch-sharded rollout
  for the verifier, and the train step reduces gradients across the processes.

Mesh data = 1 on a single device could not stand in for the reference: it would compile a
different program. With data = 2 in both runs the program is the same SPMD program over two
devices, and its only cross-device reductions are two-way sums, where a + b == b + a exactly in
IEEE arithmetic; so the runs must agree bit for bit, and the test compares exactly: every
metrics.jsonl field but the wall-clock `step_seconds`, the evaluations, the summary, the final
orbax checkpoint (params, AdamW moments, step, the data-iterator state) and the Hugging Face
export. The two-process run must also write each line once (only process 0 logs) and one
checkpoint both processes wrote their shards into. A third pair of processes stops after step 1
and a fourth resumes that run directory to the end: the resumed run must equal the uninterrupted
one the same way (each process restores its own shards and the data stream's position).

The runs are shrunk until compiling dominates (~20 s of CPU per process) and run at once.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo_cpu.yaml"
TIMEOUT_S = 420  # each process is ~20 s of CPU; the margin is for a loaded CI machine
TOTAL_STEPS = 3

# The demo, shrunk: 4 prompts x 4 samples per step (2 prompts read by each process), 4 held-out
# problems x 4 samples (the same rollout shape: one sampler compile), a fixed c_ref (no probe
# rollout of another shape). Operands up to 9 and 100 warm-start steps give a policy that is right
# about half the time, so groups have mixed rewards and the policy gradient is not zero; warm-ups
# of 0 steps switch the self-reward MSE and the advantage integration on from step 1. Then every
# step changes the parameters and the next step's rollouts depend on the cross-process update.
ARGS = [
    "mesh.data=2",
    "model.toy.max_operand=9",
    "model.toy.mul_max_operand=0",
    "model.toy.num_layers=2",
    "model.toy.sft_learning_rate=0.003",
    "model.toy.sft_steps=100",
    "model.toy.eval_problems=4",
    "train.eval_samples=4",
    "train.prompts_per_step=4",
    "rollout.samples_per_prompt=4",
    "laser.c_ref=-6.0",
    "laser.reasoning_warmup_steps=0",
    "laser.self_reward_warmup_steps=0",
    f"train.total_steps={TOTAL_STEPS}",
    f"train.save_every={TOTAL_STEPS}",
    "train.progress_bar=false",
    "train.export_hf=true",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LASERJAX_")}
    env |= {
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
        **extra,
    }
    return env


def _start(
    out: pathlib.Path, env: dict[str, str], log: pathlib.Path, extra: tuple[str, ...] = ()
) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "laserjax",
        "train",
        "--config",
        str(DEMO),
        *ARGS,
        *extra,
        f"output_dir={out}",
    ]
    with log.open("w") as f:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )


def _wait(procs: dict[str, tuple[subprocess.Popen, pathlib.Path]]) -> None:
    """Wait for every run. As soon as one fails (a process whose peer died would sit in a
    collective), at the timeout, or if the test itself is interrupted, kill the rest; on a
    failure, fail with the logs' tails."""
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while None in (codes := [p.poll() for p, _ in procs.values()]):
            if any(codes) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p, _ in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    if any(p.returncode for p, _ in procs.values()):
        timed_out = time.monotonic() > deadline
        tails = "\n".join(
            f"--- {name} (exit {p.returncode}):\n{log.read_text()[-3000:]}"
            for name, (p, log) in procs.items()
        )
        pytest.fail(
            f"a training run failed{f' (over {TIMEOUT_S} s)' if timed_out else ''}; logs:\n{tails}"
        )


def _start_two_processes(
    out: pathlib.Path, logs: pathlib.Path, tag: str, extra: tuple[str, ...] = ()
) -> dict:
    coordinator = f"127.0.0.1:{_free_port()}"
    procs = {}
    for i in range(2):
        env = _env(
            1,
            LASERJAX_DISTRIBUTED="1",
            LASERJAX_COORDINATOR=coordinator,
            LASERJAX_NUM_PROCESSES="2",
            LASERJAX_PROCESS_ID=str(i),
        )
        log = logs / f"{tag}{i}.log"
        procs[f"{tag} process {i}"] = (_start(out, env, log, extra), log)
    return procs


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
    """(one-process run dir, two-process run dir), run concurrently."""
    root = tmp_path_factory.mktemp("multihost")
    one, two = root / "one_process", root / "two_processes"
    procs = {"one process": (_start(one, _env(2), root / "one.log"), root / "one.log")}
    _wait(procs | _start_two_processes(two, root, "process"))
    return one, two


@pytest.fixture(scope="module")
def resumed(tmp_path_factory) -> pathlib.Path:
    """Two processes stop after step 1 (a run of 1 step that saves it), then two new processes
    resume that run directory to step TOTAL_STEPS, as after a TPU pod preemption."""
    root = tmp_path_factory.mktemp("multihost_resume")
    out = root / "run"
    _wait(_start_two_processes(out, root, "first", ("train.total_steps=1", "train.save_every=1")))
    # Lengthening a run is a change of its config: allowed explicitly, and recorded.
    resumed_args = ("train.save_every=1", "--allow-change", "train.total_steps")
    _wait(_start_two_processes(out, root, "resumed", resumed_args))
    assert "resumed from checkpoint step 1" in (root / "resumed0.log").read_text()
    return out


def _jsonl(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _without(row: dict, key: str) -> dict:
    return {k: v for k, v in row.items() if k != key}


def test_two_processes_log_the_one_process_metrics(runs):
    one, two = runs
    rows_one, rows_two = _jsonl(one / "metrics.jsonl"), _jsonl(two / "metrics.jsonl")
    # One line per step: only process 0 writes.
    assert [r["step"] for r in rows_two] == list(range(1, TOTAL_STEPS + 1))
    for a, b in zip(rows_one, rows_two, strict=True):
        assert _without(a, "step_seconds") == _without(b, "step_seconds"), f"step {a['step']}"
    # The comparison has something to compare: every step updates the parameters (no zero
    # gradient) and some step has groups with both rewards.
    assert all(r["grad_norm"] > 0 for r in rows_one)
    assert any(0 < r["reward_mean"] < 1 for r in rows_one)
    assert _jsonl(one / "eval.jsonl") == _jsonl(two / "eval.jsonl")
    summary_one = json.loads((one / "summary.json").read_text())
    summary_two = json.loads((two / "summary.json").read_text())
    assert _without(summary_one, "seconds") == _without(summary_two, "seconds")


def _restore_on_one_device(step_dir: pathlib.Path) -> dict:
    """A checkpoint's train state as arrays on this process's first device (the runs' devices
    are not this process's, so the saved shardings cannot be reused)."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.StandardCheckpointer() as ckpt:
        meta = ckpt.metadata(step_dir / "state").item_metadata
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta
        )
        return ckpt.restore(step_dir / "state", target)


def test_two_processes_save_the_one_process_checkpoint_and_export(runs):
    from safetensors.numpy import load_file

    one, two = runs
    step_one = one / "checkpoints" / str(TOTAL_STEPS)
    step_two = two / "checkpoints" / str(TOTAL_STEPS)
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == [str(TOTAL_STEPS)]
    state_one, state_two = _restore_on_one_device(step_one), _restore_on_one_device(step_two)
    assert jax.tree.structure(state_one) == jax.tree.structure(state_two)
    flat_one = jax.tree_util.tree_flatten_with_path(state_one)[0]
    for (path, a), b in zip(flat_one, jax.tree.leaves(state_two), strict=True):
        np.testing.assert_array_equal(
            np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path)
        )
    assert int(state_two["step"]) == TOTAL_STEPS
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckpt:
        meta_one, meta_two = ckpt.restore(step_one / "meta"), ckpt.restore(step_two / "meta")
    assert meta_one == meta_two  # step, data-iterator state, c_ref, seed
    hf_one, hf_two = (
        load_file(one / "hf" / "model.safetensors"),
        load_file(two / "hf" / "model.safetensors"),
    )
    assert hf_one.keys() == hf_two.keys()
    for name in hf_one:
        np.testing.assert_array_equal(hf_one[name], hf_two[name], err_msg=name)
    assert (one / "hf" / "config.json").read_text() == (two / "hf" / "config.json").read_text()


def test_two_processes_resume_to_the_uninterrupted_run(runs, resumed):
    one, _ = runs
    rows_one, rows_resumed = _jsonl(one / "metrics.jsonl"), _jsonl(resumed / "metrics.jsonl")
    assert [r["step"] for r in rows_resumed] == list(range(1, TOTAL_STEPS + 1))
    for a, b in zip(rows_one, rows_resumed, strict=True):
        assert _without(a, "step_seconds") == _without(b, "step_seconds"), f"step {a['step']}"
    # The first leg's final evaluation (step 1) is extra; the rest is the uninterrupted run's.
    evals = [r for r in _jsonl(resumed / "eval.jsonl") if r["step"] != 1]
    assert evals == _jsonl(one / "eval.jsonl")
    summary_one = json.loads((one / "summary.json").read_text())
    summary_resumed = json.loads((resumed / "summary.json").read_text())
    assert _without(summary_one, "seconds") == _without(summary_resumed, "seconds")
    state_one = _restore_on_one_device(one / "checkpoints" / str(TOTAL_STEPS))
    state_resumed = _restore_on_one_device(resumed / "checkpoints" / str(TOTAL_STEPS))
    for a, b in zip(jax.tree.leaves(state_one), jax.tree.leaves(state_resumed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
