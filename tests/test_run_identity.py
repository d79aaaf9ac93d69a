"""A run directory has one identity (issue 13, "Runs that silently become something else").

One tiny finished run of the demo (2 steps, a `train` subprocess) is restarted with changed
configs: a changed algorithm, a shorter total_steps and a changed learning rate are refused before
anything is built, naming the keys and the ways on; a rerun of the finished run rewrites nothing;
a lengthened run with `--allow-change train.total_steps` continues and records the change.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys
import time

import pytest

from laserjax import run_identity
from laserjax.config import ConfigError
from laserjax.config_load import load_config
from laserjax.trainer import Trainer

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo_cpu.yaml"
TINY = [
    "train.prompts_per_step=4",
    "model.toy.eval_problems=4",
    "model.toy.sft_steps=10",
    "train.eval_samples=8",
    "train.progress_bar=false",
    "train.export_hf=false",
    "train.save_every=1",
    "train.total_steps=2",
]


def _env(cache: pathlib.Path) -> dict[str, str]:
    from test_trainer import _env as trainer_env

    return trainer_env(cache)


def _train(out: pathlib.Path, args: list[str], cache: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "laserjax",
            "train",
            "--config",
            str(DEMO),
            *args,
            f"output_dir={out}",
        ],
        cwd=REPO,
        env=_env(cache),
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("identity")
    out = root / "run"
    tic = time.time()
    p = _train(out, TINY, root / "jax_cache")
    assert p.returncode == 0, p.stderr[-3000:]
    (root / "finished.stdout").write_text(p.stdout)
    (root / "finished.wall").write_text(str(time.time() - tic))
    return out


def _files(out: pathlib.Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def _cfg(out: pathlib.Path, *extra: str):
    return load_config(DEMO, [*TINY, f"output_dir={out}", *extra])


@pytest.mark.parametrize(
    "extra, key, shown",
    [
        (["algorithm=grpo"], "laser.algorithm", "laser.algorithm ('laser' -> 'grpo')"),
        (["optim.learning_rate=1e-3"], "optim.learning_rate", "(0.0002 -> 0.001)"),
        (["train.total_steps=1"], "train.total_steps", "train.total_steps (2 -> 1)"),
    ],
)
def test_a_changed_config_is_refused_naming_the_keys_and_the_ways_on(
    finished, tmp_path, extra, key, shown
):
    before = _files(finished)
    with pytest.raises(ConfigError) as e:
        Trainer(_cfg(finished, *extra))
    msg = str(e.value)
    assert shown in msg and "use a new output_dir" in msg, msg
    assert f"--allow-change {key}" in msg and "\n" not in msg, msg
    assert _files(finished) == before  # config.yaml, summary.json ... untouched


def test_the_cli_refuses_in_one_line(finished, tmp_path):
    p = _train(finished, [*TINY, "algorithm=grpo"], tmp_path / "cache")
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: output_dir"), p.stderr[-2000:]
    assert "laser.algorithm ('laser' -> 'grpo')" in lines[0]
    assert json.loads((finished / "summary.json").read_text())["algorithm"] == "laser"


def test_a_run_cannot_be_shortened_below_its_checkpoint_even_when_allowed(finished):
    with pytest.raises(
        ConfigError, match=r"`train.total_steps`: 1 is below the step of the latest"
    ):
        Trainer(_cfg(finished, "train.total_steps=1"), allow_change=("train.total_steps",))


def test_allow_change_names_real_fields(finished):
    with pytest.raises(ConfigError, match=r"--allow-change train.totl_steps: no such config field"):
        Trainer(_cfg(finished), allow_change=("train.totl_steps",))


def test_a_rerun_of_a_finished_run_rewrites_nothing(finished, capsys):
    before = _files(finished)
    # Neutral keys (progress output, checkpoint cadence) may differ without --allow-change.
    summary = Trainer(_cfg(finished, "train.save_every=5", "train.progress_bar=true")).run()
    assert _files(finished) == before  # summary.json's seconds included
    assert summary == json.loads(before["summary.json"])
    assert "this run is complete (step 2); nothing to do" in capsys.readouterr().out


@pytest.mark.slow
def test_an_allowed_change_continues_and_is_recorded(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    old_summary = (out / "summary.json").read_text()
    old_config = (out / "config.yaml").read_text()
    p = _train(
        out,
        [*TINY, "train.total_steps=3", "--allow-change", "train.total_steps"],
        tmp_path / "cache",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    history = [json.loads(line) for line in (out / "run_history.jsonl").read_text().splitlines()]
    change = [h for h in history if h["event"] == "change"]
    assert change and change[0]["changes"] == {"train.total_steps": {"old": 2, "new": 3}}
    assert change[0]["at_step"] == 2
    assert (out / "config.yaml.before-change-0").read_text() == old_config
    assert "total_steps: 3" in (out / "config.yaml").read_text()
    assert (out / "summary.json.before-resume-0").read_text() == old_summary
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]


def test_toy_defaults_written_out_are_the_same_run(tmp_path):
    a = load_config(DEMO, [f"output_dir={tmp_path}"])
    b = load_config(DEMO, [f"output_dir={tmp_path}", "model.toy.hidden_size=64"])  # the default
    c = load_config(DEMO, [f"output_dir={tmp_path / 'x'}", "train.tensorboard=true"])
    assert run_identity.differences(a, b) == {}
    assert run_identity.differences(a, c) == {}  # output_dir and logging are not the result
    d = load_config(DEMO, [f"output_dir={tmp_path}", "model.toy.num_layers=2"])
    assert run_identity.differences(a, d) == {"model.toy.num_layers": (4, 2)}


# ---------------------------------------------------------------------------------------------
# Damaged checkpoints: report in one line, resume from the newest intact one, delete nothing.


def _cache(finished: pathlib.Path) -> pathlib.Path:
    return finished.parent / "jax_cache"  # the finished run's compiles, shared


def _lines(path: pathlib.Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _no_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("step_seconds", "seconds")} for r in rows]


def _killed_before_summary(finished: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    """A copy of the finished run as if killed after its last checkpoint, before its summary."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / "summary.json").unlink()
    return out


def _abstract_state(out: pathlib.Path):
    from flax import nnx

    from laserjax import sharding, toy_task
    from laserjax.config import MeshConfig
    from laserjax.model import Transformer
    from laserjax.trainer import _abstract_train_state

    cfg = load_config(out / "config.yaml")
    mcfg = toy_task.model_config(cfg.model.toy)
    abstract = nnx.split(nnx.eval_shape(lambda: Transformer(mcfg, rngs=nnx.Rngs(0))), nnx.Param)
    import jax

    mesh = sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    return _abstract_train_state(abstract[1], cfg, mesh)


def test_a_truncated_latest_checkpoint_resumes_from_the_newest_intact_one(finished, tmp_path):
    out = _killed_before_summary(finished, tmp_path)
    data = max((out / "checkpoints" / "2" / "state").rglob("*"), key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    p = _train(out, TINY, _cache(finished))
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    damaged = [ln for ln in p.stdout.splitlines() if "is damaged" in ln]
    assert len(damaged) == 1 and damaged[0].startswith("checkpoint step 2 in "), p.stdout
    assert (
        "resuming from checkpoint step 1, the newest intact one: steps 2-2 are redone" in p.stdout
    )
    # Nothing deleted: the damaged step is kept aside, the redone step saved afresh.
    assert (out / "checkpoints.damaged" / "2" / "state").is_dir()
    assert sorted(int(d.name) for d in (out / "checkpoints").iterdir() if d.name.isdigit()) == [
        1,
        2,
    ]
    # Redoing step 2 from checkpoint 1 gives the uninterrupted run's step 2 (same program, CPU).
    assert _no_timing(_lines(out / "metrics.jsonl")) == _no_timing(
        _lines(finished / "metrics.jsonl")
    )
    assert _lines(out / "eval.jsonl") == _lines(finished / "eval.jsonl")


def test_a_missing_state_metadata_is_damage_and_the_run_falls_back(finished, tmp_path):
    from laserjax.checkpoint import Checkpointer

    out = _killed_before_summary(finished, tmp_path)
    (out / "checkpoints" / "2" / "state" / "_METADATA").unlink()
    kept = sorted(p.relative_to(out / "checkpoints") for p in (out / "checkpoints").rglob("*"))
    said: list[str] = []
    ckpt = Checkpointer(out / "checkpoints", keep=2)
    try:
        step, _, meta = ckpt.restore_latest(_abstract_state(out), log=said.append)
    finally:
        ckpt.close()
    assert step == 1 and meta["step"] == 1
    assert len(said) == 2 and said[0].startswith("checkpoint step 2 in ") and "damaged" in said[0]
    assert said[1].startswith("resuming from checkpoint step 1, the newest intact one")
    # Every file is still there: the damaged step moved to checkpoints.damaged/2.
    moved = sorted(
        pathlib.Path(str(p.relative_to(out / "checkpoints.damaged")))
        for p in (out / "checkpoints.damaged").rglob("*")
    )
    now = sorted(p.relative_to(out / "checkpoints") for p in (out / "checkpoints").rglob("*"))
    assert sorted(now + moved) == kept


def test_a_missing_run_info_is_rebuilt_from_the_checkpoint_and_eval_log(finished, tmp_path):
    out = _killed_before_summary(finished, tmp_path)
    want = json.loads((out / "run_info.json").read_text())
    (out / "run_info.json").unlink()
    trainer = Trainer(_cfg(out))  # resuming: nothing is built but the abstract state
    trainer.c_ref = want["c_ref"]  # what restore_latest reads from the checkpoint's meta
    info = trainer._read_run_info(trainer.out / "run_info.json", 2)
    assert info["c_ref"] == want["c_ref"] and info["eval_start"] == want["eval_start"]
    assert json.loads((out / "run_info.json").read_text()) == info


@pytest.mark.parametrize(
    "change, words",
    [
        (
            "model.toy.hidden_size=32",
            "parameter params/embed_tokens/embedding has shape (16, 64) in the checkpoint but "
            "(16, 32) in the configured model",
        ),
        (
            "model.toy.num_layers=2",
            "arrays only in the checkpoint (e.g. parameter params/layers/2/",
        ),
    ],
)
def test_a_checkpoint_of_another_model_names_the_parameter_and_shapes(
    finished, tmp_path, change, words
):
    out = _killed_before_summary(finished, tmp_path)
    before = _files(out)
    key = change.split("=")[0]
    with pytest.raises(ConfigError) as e:
        Trainer(_cfg(out, change), allow_change=(key,)).run()
    msg = str(e.value)
    assert words in msg and "\n" not in msg and "partial_restore" not in msg, msg
    assert _files(out) == before  # the refused change is not recorded as the run's config


def test_the_warm_start_is_announced_and_the_time_is_the_whole_wall_time(finished):
    stdout = (finished.parent / "finished.stdout").read_text()
    wall = float((finished.parent / "finished.wall").read_text())
    assert "warm start: 10 supervised steps of the toy policy" in stdout
    warm = float(stdout.split("warm start done in ")[1].split(" s")[0])
    summary = json.loads((finished / "summary.json").read_text())
    steps = sum(r["step_seconds"] for r in _lines(finished / "metrics.jsonl"))
    # From the command's start: the warm start and every step are inside it, and it is no more
    # than the wall time the test measured around the command (+1 s: /proc/stat's boot time
    # has a resolution of a second).
    assert summary["seconds"] >= warm + steps
    assert summary["seconds"] <= wall + 1.0
    header = next(ln for ln in stdout.splitlines() if ln.startswith("laserjax laser: "))
    assert header.endswith(f", {summary['seconds']:.0f} s")  # the printed time is the same


def _abandoned_coroutine(filename: str):
    """A coroutine compiled as if from `filename`, suspended at an await inside a `finally` that
    raises: collecting it un-awaited is an unraisable exception ("Exception ignored in: ...")."""
    source = (
        "class _Pending:\n"
        "    def __await__(self):\n"
        "        yield\n"
        "async def read():\n"
        "    try:\n"
        "        await _Pending()\n"
        "    finally:\n"
        "        raise ValueError('abandoned read')\n"
    )
    scope: dict = {}
    exec(compile(source, filename, "exec"), scope)
    coro = scope["read"]()
    coro.send(None)  # now suspended at the await
    return coro


def test_abandoned_orbax_reads_are_not_printed_and_other_unraisables_are(monkeypatch):
    import asyncio
    import gc
    import logging
    import sys

    from laserjax import checkpoint

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.object))
    monkeypatch.setattr(sys, "excepthook", lambda kind, value, tb: seen.append(value))
    checkpoint._quiet_abandoned_orbax_reads()
    checkpoint._quiet_abandoned_orbax_reads()  # a second call installs nothing more
    orbax_read = _abandoned_coroutine("/site-packages/orbax/checkpoint/serialization.py")
    del orbax_read
    gc.collect()
    assert seen == []
    ours = _abandoned_coroutine("/work/laserjax/somewhere.py")
    name = repr(ours)
    del ours
    gc.collect()
    assert [repr(o) for o in seen] == [name]

    # A read finishing after orbax closed its loop: tensorstore's call_soon_threadsafe raises.
    loop = asyncio.new_event_loop()
    loop.close()
    try:
        loop.call_soon_threadsafe(print)
    except RuntimeError as e:
        late_read = e
    other = RuntimeError("Event loop is closed")  # raised anywhere else: still printed
    for e in (late_read, other):
        sys.excepthook(type(e), e, e.__traceback__)
    assert seen[1:] == [other]

    # asyncio's "exception was never retrieved" for an orbax read task, and for one of ours.
    def raised_in(filename: str) -> BaseException:
        scope: dict = {}
        exec(
            compile("def read():\n    raise ValueError('OUT_OF_RANGE')\n", filename, "exec"), scope
        )
        try:
            scope["read"]()
        except ValueError as e:
            return e

    logged = []
    handler = logging.Handler()
    handler.emit = logged.append
    log = logging.getLogger("asyncio")
    log.addHandler(handler)
    try:
        for filename in ("/site-packages/orbax/checkpoint/serialization.py", "/work/ours.py"):
            e = raised_in(filename)
            log.error("Task exception was never retrieved", exc_info=(type(e), e, e.__traceback__))
    finally:
        log.removeHandler(handler)
    assert [r.exc_info[1].__traceback__.tb_next.tb_frame.f_code.co_filename for r in logged] == [
        "/work/ours.py"
    ]
    # An error that ends the program is printed even when it passed through orbax (a failed save).
    crash = raised_in("/site-packages/orbax/checkpoint/serialization.py")
    sys.excepthook(type(crash), crash, crash.__traceback__)
    assert seen[-1] is crash
