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

import pytest

from laserjax import run_identity
from laserjax.config import ConfigError, load_config
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
    p = _train(out, TINY, root / "jax_cache")
    assert p.returncode == 0, p.stderr[-3000:]
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
