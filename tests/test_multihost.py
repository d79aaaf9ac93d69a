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
IEEE arithmetic; so the runs must agree bit for bit. Both runs compile that program on the same
machine, so this holds on any CPU (what another CPU changes, it changes in both runs alike), and
the test compares exactly: every metrics.jsonl field but the wall-clock `step_seconds`, the
evaluations, the summary, the final orbax checkpoint (params, AdamW moments, step, the
data-iterator state) and the Hugging Face export. The two-process run must also write each line
once (only process 0 logs) and one checkpoint both processes wrote their shards into.

A pod preemption (issue 17): a third pair of processes, each in its own empty working directory
(a TPU worker's private disk), trains into `gs://BUCKET/run` on a local GCS server
(tests/gcs_emulator.py: the JSON API that gcsfs and TensorStore's GCS driver speak) and is
SIGKILLed in the middle of step 2, after checkpoint 1 is in the bucket. A fourth pair, in new empty
directories, resumes from the bucket alone: both processes must resume the same step and the run
must end equal to the uninterrupted one, bit for bit (same layout, same machine), with nothing
written to or read from the processes' own directories.

Continuous batching (`rollout.slots=2`): another one-process run and pair of processes must agree
bit for bit in the same way, each process running the same slot schedule.

One reward for all hosts: a fifth pair runs with a grader that times out (grades 0) on every
answer on process 1 only; both processes must train on one reward vector, the one logged.

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

from tests.gcs_emulator import BUCKET, GcsEmulator

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
        # Every thread's Python stack in the log if a process is aborted (JAX's coordination
        # service aborts a process whose peer stopped answering): shows where a hang was.
        "PYTHONFAULTHANDLER": "1",
        # laserjax importable from any working directory.
        "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])]),
        **extra,
    }
    return env


def _start(
    out: pathlib.Path | str,
    env: dict[str, str],
    log: pathlib.Path,
    extra: tuple[str, ...] = (),
    *,
    cwd: pathlib.Path = REPO,
    wrapper: str | None = None,
) -> subprocess.Popen:
    """`python -m laserjax train` (or `python -c wrapper`, which runs the same command line)."""
    argv = ["train", "--config", str(DEMO), *ARGS, *extra, f"output_dir={out}"]
    cmd = [sys.executable, *(["-c", wrapper] if wrapper else ["-m", "laserjax"]), *argv]
    with log.open("w") as f:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
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
            f"--- {name} (exit {p.returncode}):\n{_log_tail(log)}"
            for name, (p, log) in procs.items()
        )
        pytest.fail(
            f"a training run failed{f' (over {TIMEOUT_S} s)' if timed_out else ''}; logs:\n{tails}"
        )


def _log_tail(log: pathlib.Path) -> str:
    """The end of a run's log, and its first Python traceback (a process that raised is often
    what left its peer waiting; the peer's abort message would push the traceback out of view)."""
    text = log.read_text()
    at = text.find("Traceback (most recent call last)")
    first = f"{text[at : at + 3000]}\n[...]\n" if at >= 0 and at < len(text) - 3000 else ""
    return first + text[-3000:]


def _start_two_processes(
    out: pathlib.Path | str,
    logs: pathlib.Path,
    tag: str,
    extra: tuple[str, ...] = (),
    *,
    cwds: tuple[pathlib.Path, pathlib.Path] = (REPO, REPO),
    env: dict[str, str] | None = None,
    wrapper: str | None = None,
) -> dict:
    coordinator = f"127.0.0.1:{_free_port()}"
    procs = {}
    for i in range(2):
        process_env = _env(
            1,
            LASERJAX_DISTRIBUTED="1",
            LASERJAX_COORDINATOR=coordinator,
            LASERJAX_NUM_PROCESSES="2",
            LASERJAX_PROCESS_ID=str(i),
            **(env or {}),
        )
        log = logs / f"{tag}{i}.log"
        proc = _start(out, process_env, log, extra, cwd=cwds[i], wrapper=wrapper)
        procs[f"{tag} process {i}"] = (proc, log)
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
def slot_runs(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
    """The same pair with continuous batching through 2 decode slots (`rollout.slots=2`)."""
    root = tmp_path_factory.mktemp("multihost_slots")
    one, two = root / "one_process", root / "two_processes"
    extra = ("rollout.slots=2",)
    procs = {"one process": (_start(one, _env(2), root / "one.log", extra), root / "one.log")}
    _wait(procs | _start_two_processes(two, root, "process", extra))
    return one, two


# The `train` command, but at the PAUSE_AT-th train step, after its rollout and before its update,
# it writes PAUSE_MARKER + its process id and sleeps, so the test's SIGKILL lands mid-step
# deterministically (a toy step is far too short to hit by polling).
PAUSE_MID_STEP = """
import os, pathlib, sys, time
from laserjax import cli, trainer
pause_at = int(os.environ["PAUSE_AT"])
marker = pathlib.Path(os.environ["PAUSE_MARKER"] + os.environ["LASERJAX_PROCESS_ID"])
check_batch, calls = trainer.check_batch, []
def check_batch_then_pause(batch, group_size):
    check_batch(batch, group_size)
    calls.append(1)
    if len(calls) == pause_at:
        marker.write_text(str(pause_at))
        time.sleep(TIMEOUT_S)
trainer.check_batch = check_batch_then_pause
cli.main(sys.argv[1:])
""".replace("TIMEOUT_S", str(TIMEOUT_S))
RUN_URL = f"gs://{BUCKET}/run"


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    with GcsEmulator(tmp_path_factory.mktemp("gcs") / "emulator.log") as server:
        yield server


def _kill_when_paused(procs: dict, markers: list[pathlib.Path]) -> None:
    """Wait until every process has written its marker (or one has exited), then SIGKILL all."""
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not all(m.exists() for m in markers):
            exited = [(n, p.returncode) for n, (p, _) in procs.items() if p.poll() is not None]
            if exited or time.monotonic() > deadline:
                tails = "\n".join(
                    f"--- {name}:\n{log.read_text()[-3000:]}" for name, (_, log) in procs.items()
                )
                pytest.fail(f"the run to kill did not reach its pause ({exited}); logs:\n{tails}")
            time.sleep(0.2)
    finally:
        for p, _ in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, gcs) -> tuple[pathlib.Path, pathlib.Path]:
    """Two processes in private working directories train into gs://BUCKET/run, checkpointing
    every step, and are SIGKILLed mid-step 2; two new processes in new private directories resume
    from the bucket to TOTAL_STEPS, as after a TPU pod preemption that took the slice's disks.
    Returns (a local copy of the bucket's run directory, the directory holding the logs)."""
    root = tmp_path_factory.mktemp("multihost_resume")
    cwds = {leg: (root / f"{leg}_cwd0", root / f"{leg}_cwd1") for leg in ("killed", "resumed")}
    for d in (*cwds["killed"], *cwds["resumed"]):
        d.mkdir()
    markers = [root / "paused0", root / "paused1"]
    procs = _start_two_processes(
        RUN_URL,
        root,
        "killed",
        ("train.save_every=1",),
        cwds=cwds["killed"],
        env={**gcs.env(), "PAUSE_AT": "2", "PAUSE_MARKER": str(root / "paused")},
        wrapper=PAUSE_MID_STEP,
    )
    _kill_when_paused(procs, markers)
    _wait(
        _start_two_processes(
            RUN_URL,
            root,
            "resumed",
            ("train.save_every=1",),
            cwds=cwds["resumed"],
            env=gcs.env(),
        )
    )
    for d in (*cwds["killed"], *cwds["resumed"]):
        assert list(d.iterdir()) == [], f"a process wrote into its own directory {d}"
    return gcs.download(RUN_URL, root / "run"), root


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


def test_two_processes_run_the_one_process_decode_slots(runs, slot_runs):
    """Continuous batching on two processes: each runs the same slot schedule from the slot
    status both read back replicated, so the run equals the one-process run bit for bit; and
    the slots did run the rollouts (their share of busy row-steps is not the static batch's)."""
    one, two = slot_runs
    rows_one, rows_two = _jsonl(one / "metrics.jsonl"), _jsonl(two / "metrics.jsonl")
    assert [r["step"] for r in rows_two] == list(range(1, TOTAL_STEPS + 1))
    for a, b in zip(rows_one, rows_two, strict=True):
        assert _without(a, "step_seconds") == _without(b, "step_seconds"), f"step {a['step']}"
    static = _jsonl(runs[0] / "metrics.jsonl")
    busy = [
        (a["rollout_busy_share"], b["rollout_busy_share"])
        for a, b in zip(static, rows_one, strict=True)
    ]
    assert any(x != y for x, y in busy), busy


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


def test_killed_pod_resumes_from_the_bucket_to_the_uninterrupted_run(runs, resumed):
    one, _ = runs
    run, logs = resumed
    # Killed mid-step 2: checkpoint 1 was committed to the bucket and step 2 never logged.
    for i in range(2):
        assert "resumed from checkpoint step 1 in gs://" in (logs / f"resumed{i}.log").read_text()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2", "3"]  # keep = 2
    rows_one, rows_resumed = _jsonl(one / "metrics.jsonl"), _jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows_resumed] == list(range(1, TOTAL_STEPS + 1))
    for a, b in zip(rows_one, rows_resumed, strict=True):
        assert _without(a, "step_seconds") == _without(b, "step_seconds"), f"step {a['step']}"
    assert _jsonl(run / "eval.jsonl") == _jsonl(one / "eval.jsonl")
    summary_one = json.loads((one / "summary.json").read_text())
    summary_resumed = json.loads((run / "summary.json").read_text())
    assert _without(summary_one, "seconds") == _without(summary_resumed, "seconds")
    assert json.loads((run / "run_info.json").read_text()) == json.loads(
        (one / "run_info.json").read_text()
    )
    state_one = _restore_on_one_device(one / "checkpoints" / str(TOTAL_STEPS))
    state_resumed = _restore_on_one_device(run / "checkpoints" / str(TOTAL_STEPS))
    for a, b in zip(jax.tree.leaves(state_one), jax.tree.leaves(state_resumed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (run / "hf" / name).read_bytes() == (one / "hf" / name).read_bytes(), name


# The `train` command with a grader that, on process 1 only, times out on every answer (the real
# grader's deadline grades such an answer 0); every call and every reward vector the train step
# gets is recorded to GRADER_LOG + process id.
SLOW_GRADER_ON_PROCESS_1 = """
import json, os, pathlib, sys
import jax
import numpy as np
from laserjax import cli, trainer
from laserjax.answers import exact_reward
calls, trained = [], []
def grader(responses, answers):
    exact = np.asarray(exact_reward(responses, answers), np.float32)
    graded = np.zeros_like(exact) if jax.process_index() == 1 else exact
    calls.append({"exact": exact.tolist(), "graded": graded.tolist()})
    return graded
build_task = trainer.build_task
def build_task_with_grader(cfg, mesh, abstract):
    model, task, info = build_task(cfg, mesh, abstract)
    task.reward_fn = grader
    return model, task, info
trainer.build_task = build_task_with_grader
train_batch = trainer.train_batch
def recording_train_batch(rollout, rewards, *args, **kwargs):
    trained.append(np.asarray(rewards, np.float32).tolist())
    return train_batch(rollout, rewards, *args, **kwargs)
trainer.train_batch = recording_train_batch
cli.main(sys.argv[1:])
log = pathlib.Path(os.environ["GRADER_LOG"] + str(jax.process_index()))
log.write_text(json.dumps({"calls": calls, "trained": trained}))
"""


@pytest.fixture(scope="module")
def slow_grader_run(tmp_path_factory) -> tuple[pathlib.Path, list[dict]]:
    root = tmp_path_factory.mktemp("multihost_grader")
    _wait(
        _start_two_processes(
            root / "run",
            root,
            "grader",
            ("train.total_steps=2", "train.save_every=2", "train.export_hf=false"),
            env={"GRADER_LOG": str(root / "grader")},
            wrapper=SLOW_GRADER_ON_PROCESS_1,
        )
    )
    return root / "run", [json.loads((root / f"grader{i}").read_text()) for i in range(2)]


def test_a_grader_timeout_on_one_host_gives_both_hosts_the_same_reward(slow_grader_run):
    run, (host0, host1) = slow_grader_run
    assert len(host0["trained"]) == len(host1["trained"]) == 2  # one reward vector per step
    # Both processes fed the train step the same rewards, bit for bit: the ones logged.
    assert host0["trained"] == host1["trained"]
    for row, rewards in zip(_jsonl(run / "metrics.jsonl"), host0["trained"], strict=True):
        assert row["reward_mean"] == float(np.mean(np.asarray(rewards, np.float32)))
    # Each response was graded once, by one process: process 0 the first half of each batch,
    # process 1 (whose grader timed out) the second.
    assert all(len(c["graded"]) * 2 == len(host0["trained"][0]) for c in host0["calls"])
    n = len(host0["trained"][0])
    train_calls = [(c0, c1) for c0, c1 in zip(host0["calls"], host1["calls"], strict=True)]
    step_calls = train_calls[1 : 1 + len(host0["trained"])]  # after the step-0 evaluation
    for (c0, c1), rewards in zip(step_calls, host0["trained"], strict=True):
        assert rewards[: n // 2] == c0["graded"] and rewards[n // 2 :] == c1["graded"]
    # The test has teeth: process 1 timed out on answers that process 0's grader finds right, so
    # hosts each grading every response would have trained on different rewards.
    assert any(1.0 in c1["exact"] for _, c1 in step_calls)
    assert any(1.0 in c0["graded"] for c0, _ in step_calls)
