"""The trainer's must-shows (issue 6), end to end on CPU with the demo's toy task.

- A run killed with SIGKILL mid-step resumes from its last checkpoint and ends with the metrics,
  evaluation, summary and final train state of the run that was never killed, exactly.
- An invalid config fails before any compile, with a message naming the field and the fix.
- A NaN/inf loss stops the run with a clear message; the last good checkpoint stays intact.
- `algorithm=grpo` logs the same required keys, and the Hugging Face export gives the trained
  policy's logits.

The runs are `python -m laserjax train` subprocesses (the command a user types), shrunk so that
compiling dominates. They share one JAX persistent compilation cache, so only the first run pays
for compiling the sampler and the warm-start step: a cached executable is the very program the
first run compiled, so sharing it cannot change a number (and the first, uncached run is the
reference every other run is compared with).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from laserjax import sharding, toy_task
from laserjax.checkpoint import Checkpointer
from laserjax.config import ConfigError, MeshConfig
from laserjax.config_load import load_config
from laserjax.model import Transformer
from laserjax.train_step import init_train_state
from laserjax.trainer import Trainer

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo_cpu.yaml"
RUN_TIMEOUT_S = 600  # one tiny run is ~15-25 s of CPU; the margin is for a loaded machine

# The demo, shrunk: 4 prompts x K = 8 samples per step, 4 held-out problems x 8 samples (the same
# rollout shape, one compile), warm-ups of 2 + 2 steps so the self-reward MSE and the advantage
# integration both switch on inside the 8 steps, and a checkpoint every 2 steps.
SMALL = [
    "train.prompts_per_step=4",
    "model.toy.eval_problems=4",
    "train.eval_samples=8",
    "laser.reasoning_warmup_steps=2",
    "laser.self_reward_warmup_steps=2",
    "train.progress_bar=false",
    "train.export_hf=false",
]
TOTAL_STEPS, SAVE_EVERY = 8, 2
RESUME_ARGS = SMALL + [f"train.total_steps={TOTAL_STEPS}", f"train.save_every={SAVE_EVERY}"]

REQUIRED_STEP_KEYS = (
    "step",
    "reward_mean",
    "self_verify_f1",
    "self_verify_acc_correct",
    "self_verify_acc_incorrect",
    "mse_loss",
    "policy_loss",
    "response_len_mean",
    "truncated_frac",
    "zc_emitted_frac",
    "step_seconds",
)
REQUIRED_SUMMARY_KEYS = (
    "accuracy_start",
    "accuracy_end",
    "self_verify_f1_start",
    "self_verify_f1_end",
    "k",
    "maj_at_k",
    "weighted_maj_at_k",
    "seconds",
)
TIMING_KEYS = {"step_seconds", "seconds"}
"""Wall-clock fields: the only ones a resumed run may report differently."""

# Runs the `train` command, but at the n-th train step, after its rollout and before its update,
# writes a marker file and sleeps: the test then SIGKILLs it from outside, so the kill lands
# mid-step deterministically (a step of the toy run takes ~20 ms, too short to hit by polling).
PAUSE_MID_STEP = """
import pathlib, sys, time
from laserjax import cli, trainer
pause_at, marker = int(sys.argv[1]), pathlib.Path(sys.argv[2])
check_batch, calls = trainer.check_batch, []
def check_batch_then_pause(batch, group_size):
    check_batch(batch, group_size)
    calls.append(1)
    if len(calls) == pause_at:
        marker.write_text(str(pause_at))
        time.sleep(RUN_TIMEOUT_S)
trainer.check_batch = check_batch_then_pause
cli.main(sys.argv[3:])
""".replace("RUN_TIMEOUT_S", str(RUN_TIMEOUT_S))


# ---------------------------------------------------------------------------------------------
# Helpers.


def _env(cache_dir: pathlib.Path) -> dict[str, str]:
    env = dict(os.environ)
    # conftest.py gives this process 8 fake CPU devices; the demo's mesh is one device.
    flags = [
        f
        for f in env.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    env["XLA_FLAGS"] = " ".join(flags)
    env.update(
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(cache_dir),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    return env


def _train_argv(out: pathlib.Path, args: list[str]) -> list[str]:
    return ["train", "--config", str(DEMO), f"output_dir={out}", *args]


@dataclasses.dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def _train(out: pathlib.Path, args: list[str], cache_dir: pathlib.Path) -> Finished:
    tic = time.time()
    p = subprocess.run(
        [sys.executable, "-m", "laserjax", *_train_argv(out, args)],
        cwd=REPO,
        env=_env(cache_dir),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    return Finished(p.returncode, p.stdout, p.stderr, time.time() - tic)


def _ok(run: Finished) -> Finished:
    assert run.returncode == 0, f"train failed ({run.returncode}):\n{run.stderr[-4000:]}"
    return run


def _rows(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _drop_timing(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIMING_KEYS}


def _restore(run_dir: pathlib.Path, step: int):
    """(graphdef, TrainState, meta) of checkpoint `step`, on one device of this process."""
    cfg = load_config(run_dir / "config.yaml")
    mcfg = toy_task.model_config(
        cfg.model.toy,
        dtype=cfg.model.dtype,
        param_dtype=cfg.model.param_dtype,
    )
    mesh = sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    graphdef, target = init_train_state(Transformer(mcfg, rngs=nnx.Rngs(0)), cfg.optim, mesh)
    ckpt = Checkpointer(run_dir / "checkpoints", keep=cfg.train.keep_checkpoints)
    try:
        state, meta = ckpt.restore(step, target)
    finally:
        ckpt.close()
    return graphdef, state, meta


def _checkpoint_steps(run_dir: pathlib.Path) -> list[int]:
    d = run_dir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def _assert_trees_equal(a, b) -> None:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for i, (x, y) in enumerate(zip(la, lb, strict=True)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f"leaf {i}")


# ---------------------------------------------------------------------------------------------
# Shared runs.


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("trainer")


@pytest.fixture(scope="module")
def cache_dir(work) -> pathlib.Path:
    return work / "jax_cache"


@pytest.fixture(scope="module")
def full_run(work, cache_dir) -> pathlib.Path:
    """The reference: 8 LaSeR steps never interrupted (compiled from scratch)."""
    out = work / "full"
    run = _ok(_train(out, RESUME_ARGS, cache_dir))
    print(f"\nuninterrupted run: {run.seconds:.1f} s")
    return out


@dataclasses.dataclass
class KilledAndResumed:
    out: pathlib.Path
    killed_metrics: str
    killed_eval: str
    killed_checkpoints: list[int]
    resume: Finished


@pytest.fixture(scope="module")
def killed_and_resumed(work, cache_dir, full_run) -> KilledAndResumed:
    """The same command, SIGKILLed in the middle of step 6 (last checkpoint: step 4), then rerun."""
    out, marker = work / "killed", work / "paused_mid_step"
    kill_step = 6
    tic = time.time()
    with open(work / "killed.log", "w") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                PAUSE_MID_STEP,
                str(kill_step),
                str(marker),
                *_train_argv(out, RESUME_ARGS),
            ],
            cwd=REPO,
            env=_env(cache_dir),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            while not marker.exists():
                assert proc.poll() is None, (
                    f"run exited ({proc.returncode}) before step {kill_step}:\n"
                    f"{(work / 'killed.log').read_text()[-4000:]}"
                )
                assert time.time() - tic < RUN_TIMEOUT_S, "run never reached the kill point"
                time.sleep(0.05)
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=60) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    killed = KilledAndResumed(
        out,
        (out / "metrics.jsonl").read_text(),
        (out / "eval.jsonl").read_text(),
        _checkpoint_steps(out),
        None,
    )
    killed.resume = _ok(_train(out, RESUME_ARGS, cache_dir))
    print(
        f"\nkilled run: {time.time() - tic - killed.resume.seconds:.1f} s, "
        f"resumed run: {killed.resume.seconds:.1f} s"
    )
    return killed


# ---------------------------------------------------------------------------------------------
# 1. SIGKILL mid-step, resume, same metrics.


@pytest.mark.slow
def test_killed_run_was_killed_mid_step_after_a_checkpoint(killed_and_resumed):
    k = killed_and_resumed
    # Steps 1-5 logged, step 6 rolled out but not applied; keep_checkpoints=2 holds steps 2, 4.
    assert [r["step"] for r in map(json.loads, k.killed_metrics.splitlines())] == [1, 2, 3, 4, 5]
    assert k.killed_checkpoints == [2, 4]
    assert "resumed from checkpoint step 4" in k.resume.stdout


@pytest.mark.slow
def test_resumed_run_reproduces_the_uninterrupted_metrics(full_run, killed_and_resumed):
    out = killed_and_resumed.out
    full, resumed = _rows(full_run / "metrics.jsonl"), _rows(out / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, TOTAL_STEPS + 1))
    # Exact: the resumed run restores params, Adam moments, step (warm-ups, integration), data
    # iterator position, c_ref and seeds; CPU XLA is deterministic.
    assert [_drop_timing(r) for r in resumed] == [_drop_timing(r) for r in full]
    assert _rows(out / "eval.jsonl") == _rows(full_run / "eval.jsonl")
    summary_full = json.loads((full_run / "summary.json").read_text())
    summary_resumed = json.loads((out / "summary.json").read_text())
    assert _drop_timing(summary_resumed) == _drop_timing(summary_full)
    # The run did learn something in those 8 steps, so equality is not of two no-ops.
    assert any(r["grad_norm"] > 0.1 for r in full)
    assert any(r["integration_active"] == 1.0 for r in full)


@pytest.mark.slow
def test_resumed_final_checkpoint_equals_the_uninterrupted_one(full_run, killed_and_resumed):
    _, a, meta_a = _restore(full_run, TOTAL_STEPS)
    _, b, meta_b = _restore(killed_and_resumed.out, TOTAL_STEPS)
    _assert_trees_equal(a, b)  # params, AdamW moments and step, bit for bit
    assert meta_a == meta_b  # data iterator state, c_ref, seed


@pytest.mark.slow
def test_resume_sets_aside_lines_after_the_checkpoint_and_loses_nothing(killed_and_resumed):
    k = killed_and_resumed
    backup = k.out / "metrics.jsonl.before-resume-0"
    assert backup.read_text() == k.killed_metrics  # step 5 (after checkpoint 4) kept, set aside
    assert not (k.out / "metrics.jsonl.before-resume-1").exists()
    # Lines up to the checkpoint stay as written, step_seconds included.
    kept = k.killed_metrics.splitlines()[:4]
    assert (k.out / "metrics.jsonl").read_text().splitlines()[:4] == kept
    # eval.jsonl had only the step-0 evaluation, which the resume keeps (nothing to set aside).
    assert (k.out / "eval.jsonl").read_text().startswith(k.killed_eval)
    assert not (k.out / "eval.jsonl.before-resume-0").exists()


# ---------------------------------------------------------------------------------------------
# 3. A non-finite loss stops the run; the last good checkpoint stays.


@pytest.mark.slow
def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(work, cache_dir, full_run):
    # Continue the finished reference run (checkpoint 8) to step 12 with a learning rate of 1e30:
    # step 9's loss is still finite but its AdamW update sends the weights to ~1e30, so step 10's
    # forward overflows and its policy loss is NaN -- before step 10 would be saved.
    out = work / "diverged"
    shutil.copytree(full_run, out)
    good = (out / "metrics.jsonl").read_text()
    _, before, _ = _restore(out, TOTAL_STEPS)
    run = _train(
        out,
        SMALL
        + ["train.total_steps=12", f"train.save_every={SAVE_EVERY}", "optim.learning_rate=1e30"]
        + ["--allow-change", "train.total_steps,optim.learning_rate"],
        cache_dir,
    )
    print(f"\ndiverging run: {run.seconds:.1f} s")

    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    assert (
        f"error: step {TOTAL_STEPS + 2}: policy_loss = nan; stopping. The last good "
        f"checkpoint (step {TOTAL_STEPS}) is intact"
    ) in run.stderr
    assert "lower optim.learning_rate" in run.stderr

    assert _checkpoint_steps(out) == [TOTAL_STEPS - SAVE_EVERY, TOTAL_STEPS]
    _, after, _ = _restore(out, TOTAL_STEPS)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(after.params))
    _assert_trees_equal(after, before)

    lines = (out / "metrics.jsonl").read_text()
    assert lines.startswith(good)  # the good lines are kept
    extra = _rows(out / "metrics.jsonl")[TOTAL_STEPS:]
    assert [r["step"] for r in extra] == [TOTAL_STEPS + 1]  # step 9 logged, finite
    assert all(math.isfinite(extra[0][key]) for key in ("policy_loss", "mse_loss", "grad_norm"))


# ---------------------------------------------------------------------------------------------
# 4. algorithm=grpo: the same logs, and a Hugging Face export with the trained logits.


@pytest.fixture(scope="module")
def grpo_run(work, cache_dir) -> pathlib.Path:
    out = work / "grpo"
    run = _ok(
        _train(
            out,
            SMALL
            + [
                "algorithm=grpo",
                "train.total_steps=4",
                f"train.save_every={SAVE_EVERY}",
                "train.export_hf=true",
            ],
            cache_dir,
        )
    )
    print(f"\ngrpo run with HF export: {run.seconds:.1f} s")
    return out


def test_grpo_run_logs_the_required_metrics_and_summary(grpo_run):
    rows = _rows(grpo_run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        missing = [k for k in REQUIRED_STEP_KEYS if k not in r]
        assert not missing, f"step {r['step']}: missing {missing}"
        assert r["mse_loss"] == 0.0  # no self-reward term in plain GRPO
        assert 0.0 <= r["reward_mean"] <= 1.0 and 0.0 <= r["truncated_frac"] <= 1.0
    summary = json.loads((grpo_run / "summary.json").read_text())
    missing = [k for k in REQUIRED_SUMMARY_KEYS if k not in summary]
    assert not missing, f"summary.json: missing {missing}"
    assert summary["algorithm"] == "grpo" and summary["k"] == 8
    for key in REQUIRED_SUMMARY_KEYS:
        assert isinstance(summary[key], int | float), (key, summary[key])


def test_continuous_batching_run_trains_as_the_static_one(work, cache_dir, grpo_run):
    """`rollout.slots=3`: the 32 rows of each step go through 3 decode slots. The rollouts are
    the static batch's (per-row draws), so every step samples the same responses (equal
    rewards, lengths, finished shares) and every metric agrees to the sampler's log-prob
    tolerance: rows of a different batch width differ in float32 round-off only (test_sampler's
    ATOL 1e-4 per log-prob; a metric averages such values, four steps of updates of size lr)."""
    out = work / "grpo_slots"
    _ok(
        _train(
            out,
            SMALL + ["algorithm=grpo", "train.total_steps=4", "rollout.slots=3"],
            cache_dir,
        )
    )
    static, cont = _rows(grpo_run / "metrics.jsonl"), _rows(out / "metrics.jsonl")
    assert [r["step"] for r in cont] == [1, 2, 3, 4]
    # What the slots change is the schedule: which row-steps the decode loop runs.
    busy = [
        (a.pop("rollout_busy_share"), b.pop("rollout_busy_share"))
        for a, b in zip(static, cont, strict=True)
    ]
    assert any(x != y for x, y in busy), busy
    for a, b in zip(static, cont, strict=True):
        a, b = _drop_timing(a), _drop_timing(b)
        assert a.keys() == b.keys()
        for key in ("reward_mean", "response_len_mean", "truncated_frac"):
            assert a[key] == b[key], (a["step"], key, a[key], b[key])
        for key, x in a.items():
            if isinstance(x, float):
                assert abs(x - b[key]) <= 1e-4 * max(1.0, abs(x)), (a["step"], key, x, b[key])


def test_continuous_batching_slots_must_split_over_the_mesh(tmp_path):
    cfg = load_config(DEMO, ["rollout.slots=6", f"output_dir={tmp_path / 'x'}"])
    assert cfg.rollout.slots == 6
    with pytest.raises(ConfigError, match="`rollout.slots`: 6 decode slots do not split over"):
        cfg.validate_against_mesh(dict(data=2, fsdp=2, tensor=2))
    cfg.validate_against_mesh(dict(data=2, fsdp=1, tensor=4))


def test_hf_export_loads_in_transformers_with_the_trained_logits(grpo_run):
    import torch
    from transformers import AutoModelForCausalLM

    graphdef, state, _ = _restore(grpo_run, 4)  # the final checkpoint: the trained params
    model = nnx.merge(graphdef, state.params)
    hf = AutoModelForCausalLM.from_pretrained(grpo_run / "hf", dtype=torch.float32).eval()
    vocab = model.cfg.vocab_size
    tokens_bt = np.random.default_rng(0).integers(0, vocab, (3, 12), dtype=np.int32)
    positions_bt = np.broadcast_to(np.arange(12, dtype=np.int32), tokens_bt.shape)
    ours = np.asarray(
        model(jnp.asarray(tokens_bt), jnp.asarray(positions_bt), jnp.ones(tokens_bt.shape, bool))
    )
    with torch.no_grad():
        ref = hf(torch.from_numpy(tokens_bt.astype(np.int64))).logits.numpy()
    assert ours.shape == ref.shape == (3, 12, vocab)
    assert np.abs(ref).max() > 1.0  # logits large enough for the tolerance to mean something
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)
    # The export is the final policy, not an earlier one: the step-2 checkpoint's logits differ.
    graphdef2, state2, _ = _restore(grpo_run, SAVE_EVERY)
    earlier = np.asarray(
        nnx.merge(graphdef2, state2.params)(
            jnp.asarray(tokens_bt), jnp.asarray(positions_bt), jnp.ones(tokens_bt.shape, bool)
        )
    )
    assert np.abs(earlier - ref).max() > 1e-3


# ---------------------------------------------------------------------------------------------
# 2. Invalid configs fail before any compile, naming the field and the fix.


@pytest.mark.parametrize(
    "overrides, field, fix",
    [
        # batch not divisible: 32 prompts x 8 samples = 256 rows
        (["train.micro_batch_size=3"], "train.micro_batch_size", "pick a divisor of 256"),
        (
            ["rollout.samples_per_prompt=3", "train.micro_batch_size=64"],
            "train.micro_batch_size",
            "pick a divisor of 96",
        ),
        # z_c equal to an EOS or the pad id given in the config, or not a token id at all
        (["tokens.eos_ids=[1,2]"], "tokens.self_reward_token_id", "is also an EOS id"),
        (["tokens.pad_id=2"], "tokens.self_reward_token_id", "equals the pad id; choose another"),
        (
            ["tokens.self_reward_token_id=-1"],
            "tokens.self_reward_token_id",
            "must be a token id >= 0",
        ),
        # negative warm-ups
        (
            ["laser.reasoning_warmup_steps=-1"],
            "laser.reasoning_warmup_steps",
            "use 0 to switch the warm-up off",
        ),
        (
            ["laser.self_reward_warmup_steps=-3"],
            "laser.self_reward_warmup_steps",
            "use 0 to switch the warm-up off",
        ),
        (["optim.warmup_steps=-1"], "optim.warmup_steps", "must be >= 0"),
        # unknown keys list the known ones
        (["train.totl_steps=5"], "train.totl_steps", "known fields of `train`: total_steps"),
        (["lazer.alpha=0.1"], "lazer", "known fields of `config`: model, tokens, laser"),
        # bad value types
        (["train.total_steps=many"], "train.total_steps", "expected int, got 'many'"),
        (["train.total_steps=2.5"], "train.total_steps", "expected int, got 2.5"),
        (["train.export_hf=maybe"], "train.export_hf", "expected true/false"),
        (["laser.c_ref=high"], "laser.c_ref", "must be a number (e.g. -23.0) or `auto`"),
        (["train=5"], "train", "expected a section"),
        (["algorithm=ppo"], "laser.algorithm", "use laser or grpo"),
    ],
)
def test_invalid_config_fails_at_load_naming_field_and_fix(overrides, field, fix):
    with pytest.raises(ConfigError) as e:
        load_config(DEMO, overrides)
    assert f"`{field}`" in str(e.value) and fix in str(e.value), str(e.value)


def test_override_without_equals_sign_explains_the_syntax():
    with pytest.raises(ConfigError, match=r"write it as section.key=value"):
        load_config(DEMO, ["train.total_steps"])


class _CountCompiles:
    """Counts XLA backend compiles in this process while active (jit caches cleared first)."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __enter__(self):
        jax.clear_caches()
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def _listen(self, name: str, *_args, **_kwargs) -> None:
        if name == self.EVENT:
            self.count += 1

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listen)


def test_compile_counter_sees_a_compile():
    with _CountCompiles() as c:
        jax.jit(lambda x: x * 3)(jnp.ones(3))
    assert c.count >= 1


def _toy_token_cases() -> list[tuple[int, str]]:
    vocab, ids = len(toy_task.make_tokenizer()), toy_task.token_ids()
    return [
        (vocab + 7, f"is outside the vocabulary [0, {vocab})"),
        (ids["eos"], f"is also an EOS id [{ids['eos']}]"),
        (ids["pad"], "equals the pad id"),
    ]


@pytest.mark.parametrize("case", range(3), ids=["outside_vocab", "eos", "pad"])
def test_token_ids_against_the_vocabulary_fail_before_any_compile(tmp_path, case):
    zc, fix = _toy_token_cases()[case]
    # mesh.data=-1: this process has 8 fake devices. sft_steps=1 keeps a failing run cheap.
    cfg = load_config(
        DEMO,
        [
            f"output_dir={tmp_path}",
            f"tokens.self_reward_token_id={zc}",
            "mesh.data=-1",
            "model.toy.sft_steps=1",
        ],
    )
    with _CountCompiles() as c, pytest.raises(ConfigError) as e:
        Trainer(cfg)
    assert "`tokens.self_reward_token_id`" in str(e.value) and fix in str(e.value), str(e.value)
    assert c.count == 0, (
        f"{c.count} XLA compiles ran before the token-id check; validate "
        "against the vocabulary before building the model"
    )


@pytest.mark.parametrize(
    "override, field, fix",
    [
        ("model.toy.sft_stepz=3", "model.toy.sft_stepz", "known fields of `model.toy`"),
        ("model.toy.hidden_size=wide", "model.toy.hidden_size", "expected int, got 'wide'"),
        ("model.toy.sft_steps=-1", "model.toy.sft_steps", "must be >= 0"),
    ],
)
def test_invalid_toy_settings_fail_before_any_compile(tmp_path, override, field, fix):
    # model.toy is a typed config section: it fails the same way as every other config field,
    # when the config is loaded.
    with _CountCompiles() as c, pytest.raises(ConfigError) as e:
        Trainer(load_config(DEMO, [f"output_dir={tmp_path}", override, "mesh.data=-1"]))
    assert f"`{field}`" in str(e.value) and fix in str(e.value), str(e.value)
    assert c.count == 0


@pytest.mark.parametrize("gather", [False, True])
def test_trainer_lays_out_the_samplers_weights_as_configured(tmp_path, gather):
    """`rollout.gather_weights` reaches the sampler: on an FSDP mesh of this process's 8 fake
    devices its weight copy is whole over fsdp when set, sharded as in training when not."""
    cfg = load_config(
        DEMO,
        [
            f"output_dir={tmp_path}",
            "mesh.data=1",
            "mesh.fsdp=-1",
            "model.toy.sft_steps=0",
            f"rollout.gather_weights={str(gather).lower()}",
        ],
    )
    sampler, _ = Trainer(cfg)._make_samplers()
    specs = [x.sharding.spec for x in jax.tree.leaves(sampler.params)]
    split = [spec for spec in specs if "fsdp" in jax.tree.leaves(tuple(spec))]
    assert (split == []) is gather, specs


def test_real_model_token_ids_fail_before_any_compile(tmp_path):
    """The same check on the Hugging Face checkpoint path (`model.path`)."""
    from hf_utils import make_tiny_hf

    ckpt = make_tiny_hf(tmp_path)  # vocabulary of 96
    toy_task.make_tokenizer().save_pretrained(str(ckpt))
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"problem": "1+1=", "answer": "2"}) + "\n")
    cfg = load_config(
        None,
        [
            f"model.path={ckpt}",
            "model.dtype=float32",
            f"data.train={train}",
            "data.reward=exact",
            "data.template=plain",
            "mesh.data=-1",
            "tokens.self_reward_token_id=151652",
            f"output_dir={tmp_path / 'o'}",
        ],
    )
    with _CountCompiles() as c, pytest.raises(ConfigError) as e:
        Trainer(cfg)
    assert "`tokens.self_reward_token_id`" in str(e.value)
    assert "outside the vocabulary [0, 96)" in str(e.value)
    assert c.count == 0, f"{c.count} XLA compiles ran before the token-id check"


def _cli_train(tmp_path: pathlib.Path, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "laserjax", *_train_argv(tmp_path / "run", args)],
        cwd=REPO,
        env=_env(tmp_path / "jax_cache"),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )


def test_cli_reports_a_config_error_in_one_line_and_compiles_nothing(tmp_path):
    p = _cli_train(tmp_path, ["train.micro_batch_size=3"])
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [
        "error: config field `train.micro_batch_size`: the step batch has prompts_per_step * "
        "samples_per_prompt = 256 rows, which 3 does not divide; pick a divisor of 256 (or 0 for "
        "no accumulation)"
    ]
    assert not (tmp_path / "run").exists()  # nothing ran: not even the run directory
    assert not (tmp_path / "jax_cache").exists()  # and nothing was compiled


def test_cli_reports_an_unknown_toy_key_as_a_config_error(tmp_path):
    # model.toy is a typed config section: its errors read like every other config error (the
    # unknown key named in full), not end a traceback, and come before anything runs.
    p = _cli_train(tmp_path, ["model.toy.sft_stepz=3"])
    assert p.returncode == 1
    assert "Traceback" not in p.stderr, p.stderr[-2000:]
    assert p.stderr.strip().startswith(
        "error: config field `model.toy.sft_stepz`: unknown field; known fields of `model.toy`: "
    ), p.stderr[-2000:]


def test_zc_emitted_fraction_counts_responses_that_sampled_zc():
    from laserjax.trainer import zc_emitted_fraction

    zc, pad, eos = 2, 0, 1
    tokens = np.array(
        [
            [5, zc, 6, eos],  # z_c inside the response
            [5, 6, eos, pad],  # clean
            [5, eos, pad, pad],  # clean
            [5, 6, 7, zc],
        ]
    )  # z_c in a slot past the mask: padding, not sampled
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 0]], bool)
    assert zc_emitted_fraction(tokens, mask, zc) == 0.25
    assert zc_emitted_fraction(tokens, np.ones_like(mask), zc) == 0.5
    assert zc_emitted_fraction(tokens, mask, 9) == 0.0


@pytest.mark.parametrize(
    "overrides, field, fix",
    [
        # 3 prompts x 3 samples = 9 rows on the 8 devices of this process
        (
            ["train.prompts_per_step=3", "rollout.samples_per_prompt=3"],
            "train.prompts_per_step",
            "3 x 3 = 9 rows does not split over the 8 batch shards of the mesh (data 8 x fsdp 1);"
            " make it a multiple of 8 (e.g. prompts_per_step = 8)",
        ),
        (
            ["train.micro_batch_size=4"],
            "train.micro_batch_size",
            "micro-batches of 4 rows do not split over the 8 batch shards",
        ),
        (
            ["rollout.slots=6"],
            "rollout.slots",
            "6 decode slots do not split over the 8 batch shards of the mesh (data 8 x fsdp 1);"
            " use a multiple of 8",
        ),
    ],
)
def test_mesh_divisibility_fails_before_any_compile_or_data(tmp_path, overrides, field, fix):
    cfg = load_config(DEMO, [f"output_dir={tmp_path}", "mesh.data=-1", *overrides])
    with _CountCompiles() as c, pytest.raises(ConfigError) as e:
        Trainer(cfg)
    assert f"`{field}`" in str(e.value) and fix in str(e.value), str(e.value)
    assert "\n" not in str(e.value)
    assert c.count == 0, f"{c.count} XLA compiles ran before the mesh check"


# ---------------------------------------------------------------------------------------------
# The export carries z_c and c_ref; generate and eval take them by default (issue 13).


def test_export_carries_zc_c_ref_and_how_to_prompt_and_grade(grpo_run):
    info = json.loads((grpo_run / "hf" / "laserjax.json").read_text())
    summary = json.loads((grpo_run / "summary.json").read_text())
    assert info["self_reward_token_id"] == toy_task.token_ids()["zc"] == 2
    assert info["c_ref"] == summary["c_ref"]
    assert (info["template"], info["reward"], info["eos_ids"]) == ("raw", "exact", [1])
    problems = _rows(grpo_run / "toy_arithmetic.jsonl")
    assert len(problems) == 4 and set(problems[0]) == {"id", "problem", "answer"}


def test_generate_and_eval_work_on_the_demo_export_by_default(grpo_run, tmp_path, capsys):
    from laserjax import cli

    hf = str(grpo_run / "hf")
    cli.main(["generate", "--model", hf, "--ids", "7,5,15", "--k", "2", "--json"])
    samples = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    info = json.loads((grpo_run / "hf" / "laserjax.json").read_text())
    for s in samples:  # r_s from the run's own c_ref (default: -23 and z_c 151652, which failed)
        if s["finished"]:
            assert s["r_s"] == pytest.approx(0.1 * (s["logp_zc"] - info["c_ref"]))

    out = tmp_path / "eval"
    argv = ["eval", "--model", hf, "--benchmarks", str(grpo_run / "toy_arithmetic.jsonl")]
    cli.main([*argv, "--n", "2", "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert "warning" not in err, err
    s = json.loads((out / "summary.json").read_text())
    assert s["settings"]["z_token_id"] == 2 and s["settings"]["c_ref"] == info["c_ref"]
    assert s["settings"]["reward"] == "exact" and s["settings"]["template"] == "raw"
    rows = _rows(out / "samples.jsonl")
    for r in rows:  # graded and voted on the same answer: the whole response
        assert r["extracted_answer"] == (r["response"].strip() or None)
        assert r["correct"] == (r["response"].strip() == r["reference"])
    assert any(r["correct"] for r in rows), "the warmed-up demo policy answers some right"

    # Grading the same model with the \boxed{} reward finds nothing to grade, and says so.
    cli.main(
        [*argv, "--n", "2", "--output-dir", str(tmp_path / "boxed"), "--reward", "math_verify"]
    )
    err = capsys.readouterr().err
    assert "eval: warning: none of the 8 responses has a final \\boxed{...} answer" in err
    assert "--reward exact" in err


def test_calibrate_takes_zc_and_the_prompt_template_from_the_export(grpo_run, tmp_path, capsys):
    from laserjax import cli

    pairs = tmp_path / "pairs.jsonl"
    rows = _rows(grpo_run / "toy_arithmetic.jsonl")
    pairs.write_text(
        "".join(json.dumps({"problem": r["problem"], "response": r["answer"]}) + "\n" for r in rows)
    )
    cli.main(["calibrate", "--model", str(grpo_run / "hf"), "--data", str(pairs), "--n", "4"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # Defaults without laserjax.json: z_c 151652 (outside this 16-token vocabulary) and chat.
    assert (summary["z_token_id"], summary["template"], summary["dtype"]) == (2, "raw", "float32")
    assert summary["n"] == 4 and summary["c_ref"] < 0
