"""A `gs://bucket/run` output directory stays a URL through every path operation of the run.

`pathlib.Path("gs://b/run")` is the local relative path `gs:/b/run`; the trainer, the
checkpointer and the exporter once used it, so every worker of a pod wrote its checkpoints and
logs to its own disk. Here the trainer's writers (the run identity's config.yaml, its history and
set-aside copies, metrics.jsonl and eval.jsonl with the resume trim), the checkpointer (orbax:
gcsfs for its metadata, TensorStore's GCS driver for array shards) and the Hugging Face exporter
write to `gs://BUCKET/run` on a local
GCS server (tests/gcs_emulator.py): every object must land under `run/` in the bucket with the
names a local run gives its files, and nothing may appear in the working directory.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from laserjax import paths, run_identity, toy_task
from laserjax.checkpoint import Checkpointer
from laserjax.config import ConfigError
from laserjax.config_load import load_config
from laserjax.model import Transformer
from laserjax.run_log import MetricsLog
from laserjax.trainer import Trainer, export_hf
from tests.gcs_emulator import BUCKET, GcsEmulator

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo_cpu.yaml"
URL = f"gs://{BUCKET}/run"


def test_a_gs_url_survives_every_path_operation_the_run_uses():
    out = paths.run_path(URL)
    assert str(out) == os.fspath(out) == URL
    assert str(out / "checkpoints") == f"{URL}/checkpoints"
    assert str(out / "checkpoints" / "3" / "state") == f"{URL}/checkpoints/3/state"
    assert str((out / "metrics.jsonl").with_name("metrics.jsonl.before-resume-0")) == (
        f"{URL}/metrics.jsonl.before-resume-0"
    )
    assert str((out / "hf").parent) == URL and (out / "hf").name == "hf"
    assert str(paths.absolute(out / "checkpoints")) == f"{URL}/checkpoints"
    assert str(paths.run_path(f"{URL}/")) == URL
    assert paths.is_remote(out) and not paths.is_remote(paths.run_path("runs/x"))
    # What the trainer once did with it: a relative local directory named `gs:`.
    assert str(pathlib.Path(URL)) == f"gs:/{BUCKET}/run"


def test_an_unserved_scheme_fails_at_construction_naming_output_dir(tmp_path):
    cfg = load_config(DEMO, ["output_dir=hdfs://cluster/run", "mesh.data=-1"])
    with pytest.raises(ConfigError, match=r"config field `output_dir` 'hdfs://cluster/run'.*gs://"):
        Trainer(cfg)


def test_gs_without_gcsfs_fails_naming_the_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # import gcsfs -> ImportError
    with pytest.raises(paths.PathError, match=r"output_dir.*gcsfs.*laserjax\[gcs\]"):
        paths.run_path(URL, field="config field `output_dir`")


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    with GcsEmulator(tmp_path_factory.mktemp("gcs") / "emulator.log") as server:
        yield server


def _drop_cached_filesystems() -> None:
    """gcsfs and epath cache the filesystem (and so the endpoint) per process."""
    import gcsfs
    from etils.epath import backend

    gcsfs.GCSFileSystem.clear_instance_cache()
    backend.fsspec_backend._get_filesystem.cache_clear()


@pytest.fixture
def on_gcs(gcs, monkeypatch, tmp_path) -> pathlib.Path:
    """This process reaches the local server for gs:// and runs in an empty working directory,
    which it returns."""
    for key, value in gcs.env().items():
        monkeypatch.setenv(key, value)
    _drop_cached_filesystems()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield cwd
    _drop_cached_filesystems()


def _objects(gcs) -> list[str]:
    return sorted(os.path.relpath(n, BUCKET) for n in gcs.fs().find(BUCKET))


def test_trainer_checkpointer_and_exporter_write_under_the_url(gcs, on_gcs, tmp_path):
    out = paths.run_path(URL)
    cfg = load_config(DEMO, [f"output_dir={URL}", "mesh.data=-1"])

    # The checkpointer: orbax saves, lists and restores at the URL.
    ckpt = Checkpointer(out / "checkpoints", keep=2)
    assert str(ckpt.directory) == f"{URL}/checkpoints"
    assert str(ckpt.manager.directory) == f"{URL}/checkpoints"
    state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.int32(3)}
    ckpt.save(3, state, {"step": 3, "c_ref": -6.0})
    ckpt.close()
    reopened = Checkpointer(URL + "/checkpoints", keep=2)
    assert reopened.latest_step() == 3
    restored, meta = reopened.restore(3, state)
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(state["w"]))
    assert meta == {"step": 3, "c_ref": -6.0}
    reopened.close()

    # The run's identity: config.yaml written and read back, history lines appended, an allowed
    # change setting the old config aside.
    run_identity.check(out, cfg).write(out, cfg, None)
    longer = load_config(DEMO, [f"output_dir={URL}", "mesh.data=-1", "train.total_steps=300"])
    with pytest.raises(ConfigError, match="train.total_steps"):
        run_identity.check(out, longer)
    run_identity.check(out, longer, ("train.total_steps",)).write(out, longer, 3)
    run_identity.record(out, "resume", from_step=3)
    history = [
        json.loads(ln)["event"] for ln in (out / "run_history.jsonl").read_text().splitlines()
    ]
    assert history == ["start", "change", "resume"]
    assert load_config(out / "config.yaml").train.total_steps == 300
    assert load_config(out / "config.yaml.before-change-0").train.total_steps == 200

    # The trainer's run files: one line per write, and on resume the lines after the checkpoint
    # set aside next to the file.
    log = MetricsLog(out, cfg, resume_step=-1)
    for step in (1, 2, 3, 4):
        log.write({"step": step, "reward_mean": step / 10})
    log.write({"step": 4, "accuracy": 0.5}, kind="eval")
    log.close()
    MetricsLog(out, cfg, resume_step=3).close()
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    backup = (out / "metrics.jsonl.before-resume-0").read_text().splitlines()
    assert [json.loads(ln)["step"] for ln in backup] == [1, 2, 3, 4]
    assert (out / "eval.jsonl").read_text() == ""  # its step-4 line was set aside too

    # The exporter: config, weights and tokenizer under hf/.
    toy = toy_task.ToyConfig(num_layers=1)
    model = Transformer(toy_task.model_config(toy), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    export_hf(graphdef, params, toy_task.make_tokenizer(), out / "hf")
    export_hf(graphdef, params, toy_task.make_tokenizer(), tmp_path / "local_hf")
    from_gcs = gcs.download(f"{URL}/hf", tmp_path / "hf")
    local = sorted(p.name for p in (tmp_path / "local_hf").iterdir())
    assert sorted(p.name for p in from_gcs.iterdir()) == local
    for name in local:
        assert (from_gcs / name).read_bytes() == (tmp_path / "local_hf" / name).read_bytes(), name

    names = _objects(gcs)
    assert all(n.startswith("run/") for n in names), names
    for expected in (
        "run/config.yaml",
        "run/config.yaml.before-change-0",
        "run/run_history.jsonl",
        "run/metrics.jsonl",
        "run/metrics.jsonl.before-resume-0",
        "run/eval.jsonl",
        "run/hf/config.json",
        "run/hf/model.safetensors",
        "run/hf/tokenizer.json",
        "run/checkpoints/3/meta/metadata",
    ):
        assert expected in names, (expected, names)
    assert any(n.startswith("run/checkpoints/3/state/") for n in names)
    assert list(on_gcs.iterdir()) == []  # nothing local: no `gs:` directory in the cwd
