"""tpu_scripts/tpu.sh: the exact gcloud commands of every verb (dry-run, no gcloud installed),
clear errors for bad flags, and the worker-side shell run for real on two emulated workers."""

from __future__ import annotations

import ast
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TPU_SH = REPO / "tpu_scripts" / "tpu.sh"
V4 = ["--name", "lj-v4", "--zone", "us-central2-b"]
V5P = ["--name", "lj-v5p", "--zone", "europe-west4-b", "--project", "my-proj"]
SSH_V4 = "gcloud compute tpus tpu-vm ssh lj-v4 --zone=us-central2-b --worker=all"
SSH_V5P = (
    "gcloud compute tpus tpu-vm ssh lj-v5p --zone=europe-west4-b --project=my-proj --worker=all"
)


@pytest.fixture(scope="module")
def bin_without_gcloud(tmp_path_factory) -> pathlib.Path:
    """A PATH directory holding only what the wrapper needs (and git, for `sync` for real)."""
    d = tmp_path_factory.mktemp("bin")
    for tool in ("bash", "dirname", "git"):
        if shutil.which(tool):
            (d / tool).symlink_to(shutil.which(tool))
    (d / "python3").symlink_to(sys.executable)
    return d


def run_tpu(args: list[str], path: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(TPU_SH), *args],
        capture_output=True,
        text=True,
        env={"PATH": path, "HOME": os.environ.get("HOME", "/tmp"), **env},
        timeout=60,
    )


def dry_run(args: list[str], path: pathlib.Path) -> list[str]:
    assert shutil.which("gcloud", path=str(path)) is None
    out = run_tpu([*args, "--dry-run"], str(path))
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


EXPECTED: dict[str, tuple[list[str], list[str]]] = {
    "create v4-8": (
        ["create", *V4, "--accelerator-type", "v4-8"],
        [
            "gcloud compute tpus tpu-vm create lj-v4 --zone=us-central2-b --accelerator-type=v4-8"
            " --version=tpu-ubuntu2204-base",
        ],
    ),
    "create v5e-8 spot": (
        [
            "create",
            "--name",
            "lj-v5e",
            "--zone",
            "us-west4-a",
            "--accelerator-type",
            "v5e-8",
            "--spot",
        ],
        [
            "gcloud compute tpus tpu-vm create lj-v5e --zone=us-west4-a"
            " --accelerator-type=v5litepod-8 --version=v2-alpha-tpuv5-lite --spot",
        ],
    ),
    "create v5p-64 queued": (
        ["create", *V5P, "--accelerator-type", "v5p-64", "--queued"],
        [
            "gcloud compute tpus queued-resources create lj-v5p --zone=europe-west4-b"
            " --project=my-proj --node-id=lj-v5p --accelerator-type=v5p-64"
            " --runtime-version=v2-alpha-tpuv5",
        ],
    ),
    "create v6e-64 preemptible, runtime given": (
        [
            "create",
            "--name",
            "lj-v6e",
            "--zone",
            "us-east5-b",
            "--accelerator-type",
            "v6e-64",
            "--preemptible",
            "--runtime-version",
            "v2-alpha-tpuv6e",
        ],
        [
            "gcloud compute tpus tpu-vm create lj-v6e --zone=us-east5-b --accelerator-type=v6e-64"
            " --version=v2-alpha-tpuv6e --preemptible",
        ],
    ),
    "status": (
        ["status", *V4],
        [
            "gcloud compute tpus tpu-vm describe lj-v4 --zone=us-central2-b",
        ],
    ),
    "status queued": (
        ["status", *V5P, "--queued"],
        [
            "gcloud compute tpus queued-resources describe lj-v5p --zone=europe-west4-b"
            " --project=my-proj",
        ],
    ),
    "sync archive": (
        ["sync", *V5P, "--source", "/src/laserjax", "--ref", "v0.1"],
        [
            "git -C /src/laserjax archive --format=tar.gz"
            " --output=/tmp/laserjax-src-lj-v5p.tar.gz v0.1",
            "gcloud compute tpus tpu-vm scp /tmp/laserjax-src-lj-v5p.tar.gz"
            " lj-v5p:laserjax-src.tar.gz --zone=europe-west4-b --project=my-proj --worker=all",
            f"{SSH_V5P} '--command=mkdir -p laserjax && tar -xzf laserjax-src.tar.gz -C laserjax"
            " && rm -f laserjax-src.tar.gz'",
        ],
    ),
    "sync git": (
        ["sync", *V4, "--repo-url", "https://github.com/me/laserjax.git", "--ref", "main"],
        [
            f"{SSH_V4} '--command=(test -d laserjax/.git || git clone --quiet"
            " https://github.com/me/laserjax.git laserjax) && cd laserjax"
            " && git fetch --quiet origin main && git checkout --quiet --detach FETCH_HEAD'",
        ],
    ),
    "setup": (
        ["setup", *V4],
        [
            f"{SSH_V4} '--command=test -f laserjax/requirements.txt || {{ echo \"no"
            ' ~/laserjax/requirements.txt on this worker: run sync first" >&2; exit 1; }'
            " && python3 -m pip install --user --upgrade uv"
            " && python3 -m uv venv --allow-existing --python 3.13 ~/laserjax-venv"
            " && python3 -m uv pip install --python ~/laserjax-venv/bin/python --upgrade"
            ' "jax[tpu]" -r laserjax/requirements.txt -e "./laserjax[gcs]"\'',
        ],
    ),
    "setup pinned with find-links": (
        [
            "setup",
            *V5P,
            "--jax-spec",
            "jax[tpu]==0.6.2",
            "--python-version",
            "3.12",
            "--find-links",
            "https://storage.googleapis.com/jax-releases/libtpu_releases.html",
        ],
        [
            f"{SSH_V5P} '--command=test -f laserjax/requirements.txt || {{ echo \"no"
            ' ~/laserjax/requirements.txt on this worker: run sync first" >&2; exit 1; }'
            " && python3 -m pip install --user --upgrade uv"
            " && python3 -m uv venv --allow-existing --python 3.12 ~/laserjax-venv"
            " && python3 -m uv pip install --python ~/laserjax-venv/bin/python --upgrade"
            ' "jax[tpu]==0.6.2" --find-links'
            " https://storage.googleapis.com/jax-releases/libtpu_releases.html"
            ' -r laserjax/requirements.txt -e "./laserjax[gcs]"\'',
        ],
    ),
    "check": (
        ["check", *V4],
        [
            f"{SSH_V4} '--command=~/laserjax-venv/bin/python -c \"import jax;"
            " jax.distributed.initialize(); print(jax.process_index(), jax.process_count(),"
            " jax.local_device_count(), jax.device_count(), jax.devices()[0].device_kind)\"'",
        ],
    ),
    "launch 7B on v5p-64": (
        [
            "launch",
            *V5P,
            "--config",
            "configs/qwen2.5_7b_laser.yaml",
            "--env",
            "HF_HOME=/tmp/hf",
            "train.total_steps=200",
            "data.eval=[aime24, math500]",
        ],
        [
            f"{SSH_V5P} '--command=cd laserjax || exit 1; mkdir -p logs;"
            ' if [ -f logs/train.pid ] && kill -0 "$(cat logs/train.pid)" 2>/dev/null;'
            ' then echo "a laserjax run is still going (pid $(cat logs/train.pid)): stop it with'
            ' the kill verb first" >&2; exit 1; fi;'
            " LASERJAX_DISTRIBUTED=1 HF_HOME=/tmp/hf setsid nohup ~/laserjax-venv/bin/python -m"
            " laserjax train --config configs/qwen2.5_7b_laser.yaml train.total_steps=200"
            ' "data.eval=[aime24, math500]" > logs/train.log 2>&1 < /dev/null &'
            " echo $! > logs/train.pid;"
            ' echo "started pid $(cat logs/train.pid) on $(hostname), log'
            " ~/laserjax/logs/train.log\"'",
        ],
    ),
    "launch with own log file": (
        ["launch", *V4, "--config", "configs/qwen2.5_0.5b.yaml", "--log-file", "runs/a.log"],
        [
            f"{SSH_V4} '--command=cd laserjax || exit 1; mkdir -p logs runs;"
            ' if [ -f logs/train.pid ] && kill -0 "$(cat logs/train.pid)" 2>/dev/null;'
            ' then echo "a laserjax run is still going (pid $(cat logs/train.pid)): stop it with'
            ' the kill verb first" >&2; exit 1; fi;'
            " LASERJAX_DISTRIBUTED=1 setsid nohup ~/laserjax-venv/bin/python -m"
            " laserjax train --config configs/qwen2.5_0.5b.yaml > runs/a.log 2>&1 < /dev/null &"
            " echo $! > logs/train.pid;"
            ' echo "started pid $(cat logs/train.pid) on $(hostname), log'
            " ~/laserjax/runs/a.log\"'",
        ],
    ),
    "logs": (
        ["logs", *V4],
        [
            "gcloud compute tpus tpu-vm ssh lj-v4 --zone=us-central2-b --worker=0"
            " '--command=tail -n 100 -F laserjax/logs/train.log'",
        ],
    ),
    "logs worker 3": (
        ["logs", *V5P, "--worker", "3", "--lines", "20", "--no-follow"],
        [
            "gcloud compute tpus tpu-vm ssh lj-v5p --zone=europe-west4-b --project=my-proj"
            " --worker=3 '--command=tail -n 20 laserjax/logs/train.log'",
        ],
    ),
    "kill": (
        ["kill", *V5P],
        [
            f"{SSH_V5P} '--command=cd laserjax && if [ -f logs/train.pid ];"
            ' then kill -TERM -- -"$(cat logs/train.pid)" 2>/dev/null; rm -f logs/train.pid; fi\'',
        ],
    ),
    "stop": (["stop", *V4], ["gcloud compute tpus tpu-vm stop lj-v4 --zone=us-central2-b"]),
    "start": (["start", *V4], ["gcloud compute tpus tpu-vm start lj-v4 --zone=us-central2-b"]),
    "delete": (["delete", *V4], ["gcloud compute tpus tpu-vm delete lj-v4 --zone=us-central2-b"]),
    "delete queued": (
        ["delete", *V5P, "--queued"],
        [
            "gcloud compute tpus queued-resources delete lj-v5p --zone=europe-west4-b"
            " --project=my-proj --force",
        ],
    ),
}


@pytest.mark.parametrize("case", list(EXPECTED))
def test_dry_run_prints_exact_commands(case, bin_without_gcloud):
    args, expected = EXPECTED[case]
    assert dry_run(args, bin_without_gcloud) == expected


def test_sync_archives_this_checkout_by_default(bin_without_gcloud):
    first = dry_run(["sync", *V4], bin_without_gcloud)[0]
    assert first == (
        f"git -C {REPO} archive --format=tar.gz --output=/tmp/laserjax-src-lj-v4.tar.gz HEAD"
    )


@pytest.mark.parametrize(
    "args, names",
    [
        (["create", *V4, "--accelerator-type", "v9-8"], ["--accelerator-type", "'v9-8'", "v5p-64"]),
        (
            ["create", *V4, "--accelerator-type", "tpu-v4"],
            ["--accelerator-type", "GENERATION-SIZE"],
        ),
        (["create", *V4, "--accelerator-type", "v4-12"], ["--accelerator-type", "multiples of 8"]),
        (["create", *V4, "--accelerator-type", "v5e-2"], ["--accelerator-type", "16, 32"]),
        (["create", *V4], ["--accelerator-type is required"]),
        (
            ["create", "--name", "lj", "--accelerator-type", "v4-8"],
            ["--zone is required", "--zone=us-central2-b"],
        ),
        (["launch", "--name", "lj", "--config", "c.yaml"], ["--zone is required"]),
        (
            ["create", "--name", "lj", "--zone", "us-central2", "--accelerator-type", "v4-8"],
            ["--zone 'us-central2' is not valid", "regions-zones"],
        ),
        (
            ["create", "--zone", "us-central2-b", "--accelerator-type", "v4-8"],
            ["--name is required"],
        ),
        (
            ["create", "--name", "LJ_1", "--zone", "us-central2-b", "--accelerator-type", "v4-8"],
            ["--name 'LJ_1' is not valid"],
        ),
        (
            ["create", *V4, "--accelerator-type", "v4-8", "--queued", "--preemptible"],
            ["--preemptible", "--spot"],
        ),
        (["launch", *V4], ["--config is required"]),
        (
            ["launch", *V4, "--config", "c.yaml", "--env", "NOVALUE"],
            ["--env 'NOVALUE'", "NAME=VALUE"],
        ),
        (["sync", *V4, "--remote-dir", "../elsewhere"], ["--remote-dir '../elsewhere'"]),
        (["logs", *V4, "--worker", "first"], ["--worker 'first'"]),
        ([], ["give a verb", "launch"]),
    ],
)
def test_bad_input_names_the_flag(args, names, bin_without_gcloud):
    out = run_tpu([*args, "--dry-run"] if args else [], str(bin_without_gcloud))
    assert out.returncode == 2 and out.stdout == ""
    for name in names:
        assert name in out.stderr, out.stderr


# jax >= 0.11 needs Python >= 3.12 (jax 0.12.0.1, Oct 2026: Requires-Python >=3.12); with an
# older venv Python, uv resolves an unpinned `jax[tpu]` to the last jax that supported it (3.11 ->
# 0.10.2) without a word.
CURRENT_JAX_MIN_PYTHON = (3, 12)


def test_setup_dry_run_installs_current_jax_and_gcs_support(bin_without_gcloud):
    import tomllib

    (line,) = dry_run(["setup", *V4], bin_without_gcloud)
    remote = shlex.split(line)[-1].removeprefix("--command=")
    python = re.search(r"uv venv --allow-existing --python (\d+)\.(\d+) ", remote)
    assert python, remote
    assert tuple(map(int, python.groups())) >= CURRENT_JAX_MIN_PYTHON, remote
    install = remote[remote.index("uv pip install") :]
    # Unpinned and upgraded: the newest jax[tpu] (and the libtpu it pins) that Python resolves.
    assert ' --upgrade "jax[tpu]" ' in install, install
    # laserjax with its gcs extra, so output_dir=gs://... works on every worker.
    assert install.endswith(' -e "./laserjax[gcs]"'), install
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    gcs = pyproject["project"]["optional-dependencies"]["gcs"]
    assert any(req.startswith("gcsfs") for req in gcs), gcs


def test_running_without_gcloud_says_so(bin_without_gcloud):
    out = run_tpu(["delete", *V4], str(bin_without_gcloud))
    assert out.returncode == 127
    assert "gcloud not found" in out.stderr and "--dry-run" in out.stderr


# ---------------------------------------------------------------------------------------------
# The worker side, for real: a local gcloud double runs `tpu-vm ssh --command` with bash in
# each emulated worker's home and `tpu-vm scp` as a copy, so the shell the verbs send is
# executed, not just compared.

FAKE_GCLOUD = """\
#!{python}
import os, pathlib, shutil, subprocess, sys
args = sys.argv[1:]
with open(os.environ["GCLOUD_CALLS"], "a") as f:
    f.write(repr(args) + "\\n")
if args[:4] == ["compute", "tpus", "tpu-vm", os.environ.get("GCLOUD_FAIL_VERB")]:
    sys.exit(1)
opts = dict(a.split("=", 1) for a in args if a.startswith("--") and "=" in a)
homes = sorted(pathlib.Path(os.environ["WORKERS"]).iterdir())
if opts.get("--worker", "0") != "all":
    homes = [homes[int(opts.get("--worker", "0"))]]
rc = 0
for home in homes:
    if args[3] == "ssh":
        rc |= subprocess.run(["bash", "-c", opts["--command"]], cwd=home,
                             stdin=subprocess.DEVNULL,
                             env={{**os.environ, "HOME": str(home)}}).returncode
    elif args[3] == "scp":
        shutil.copy(args[4], home / args[5].split(":", 1)[1])
sys.exit(rc)
"""

# Stands in for the venv's python on each worker: records what `launch` passed through two
# shells, then holds the TPU the way a run does, with a child (as the reward pool has).
FAKE_PYTHON = """\
#!/bin/bash
echo "LASERJAX_DISTRIBUTED=$LASERJAX_DISTRIBUTED"
printf 'arg:%s\\n' "$@"
sleep 30 &
echo "child:$!"
wait
"""


def _alive_in_group(pgid: int) -> list[int]:
    """Pids in process group `pgid` that are not zombies (a zombie may wait for a reaper)."""
    alive = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


WORKER_TOOLS = (
    "git",
    "setsid",
    "nohup",
    "tar",
    "gzip",
    "mkdir",
    "rm",
    "cat",
    "tail",
    "sleep",
    "hostname",
)


@pytest.mark.skipif(
    not (REPO / ".git").exists() or not all(map(shutil.which, WORKER_TOOLS)),
    reason=f"needs a git checkout and {', '.join(WORKER_TOOLS)} on PATH",
)
def test_worker_side_shell_on_two_emulated_workers(tmp_path, bin_without_gcloud):
    bin_dir = tmp_path / "bin"
    shutil.copytree(bin_without_gcloud, bin_dir, symlinks=True)
    for tool in WORKER_TOOLS[1:]:  # git is linked already
        (bin_dir / tool).symlink_to(shutil.which(tool))
    (bin_dir / "gcloud").write_text(FAKE_GCLOUD.format(python=sys.executable))
    (bin_dir / "gcloud").chmod(0o755)
    workers = tmp_path / "workers"
    for i in range(2):
        venv_bin = workers / f"w{i}" / "laserjax-venv" / "bin"
        venv_bin.mkdir(parents=True)
        (venv_bin / "python").write_text(FAKE_PYTHON)
        (venv_bin / "python").chmod(0o755)
    (workers / "w0" / "laserjax" / "logs").mkdir(parents=True)
    (workers / "w0" / "laserjax" / "logs" / "old.log").write_text("kept")
    calls = tmp_path / "calls.txt"
    env = {"GCLOUD_CALLS": str(calls), "WORKERS": str(workers)}
    common = [*V4, "--archive", str(tmp_path / "src.tar.gz")]
    pgids = []

    def tpu(*args: str, **extra: str) -> subprocess.CompletedProcess:
        return run_tpu(list(args), str(bin_dir), **env, **extra)

    try:
        # Real execution runs exactly the commands the dry run prints, in order.
        out = tpu("sync", *common)
        assert out.returncode == 0, out.stderr
        printed = dry_run(["sync", *common], bin_without_gcloud)
        assert [
            line.removeprefix("+ ") for line in out.stderr.splitlines() if line.startswith("+ ")
        ] == printed
        assert [ast.literal_eval(c) for c in calls.read_text().splitlines()] == [
            shlex.split(line)[1:] for line in printed[1:]
        ]
        for i in range(2):
            code = workers / f"w{i}" / "laserjax"
            assert (code / "laserjax" / "cli.py").read_bytes() == subprocess.run(
                ["git", "-C", str(REPO), "show", "HEAD:laserjax/cli.py"],
                capture_output=True,
                check=True,
            ).stdout
            assert not (workers / f"w{i}" / "laserjax-src.tar.gz").exists()
        assert (workers / "w0" / "laserjax" / "logs" / "old.log").read_text() == "kept"

        out = tpu(
            "launch",
            *V4,
            "--config",
            "configs/qwen2.5_0.5b.yaml",
            "--env",
            "A_B=x y",
            "train.total_steps=3",
            "data.eval=[aime24, math500]",
            "x=it's $HOME",
        )
        assert out.returncode == 0, out.stderr
        for i in range(2):
            logs = workers / f"w{i}" / "laserjax" / "logs"
            pgids.append(int((logs / "train.pid").read_text()))
            deadline = time.time() + 10
            while "child:" not in (logs / "train.log").read_text() and time.time() < deadline:
                time.sleep(0.05)
            lines = (logs / "train.log").read_text().splitlines()
            assert lines[:8] == [
                "LASERJAX_DISTRIBUTED=1",
                "arg:-m",
                "arg:laserjax",
                "arg:train",
                "arg:--config",
                "arg:configs/qwen2.5_0.5b.yaml",
                "arg:train.total_steps=3",
                "arg:data.eval=[aime24, math500]",
            ]
            assert lines[8] == "arg:x=it's $HOME"
            # The run leads its own process group: the pid file names the group kill stops.
            assert len(_alive_in_group(pgids[-1])) == 2

        out = tpu("launch", *V4, "--config", "configs/qwen2.5_0.5b.yaml")
        assert out.returncode == 1 and "a laserjax run is still going" in out.stderr

        out = tpu("logs", *V4, "--worker", "1", "--lines", "1", "--no-follow")
        assert out.returncode == 0 and out.stdout.startswith("child:")

        out = tpu("kill", *V4)
        assert out.returncode == 0, out.stderr
        deadline = time.time() + 10
        while any(_alive_in_group(g) for g in pgids) and time.time() < deadline:
            time.sleep(0.05)
        assert not any(_alive_in_group(g) for g in pgids)
        assert not (workers / "w0" / "laserjax" / "logs" / "train.pid").exists()

        # A failing command stops the verb: nothing after the failed scp runs.
        calls.write_text("")
        out = tpu("sync", *common, GCLOUD_FAIL_VERB="scp")
        assert out.returncode == 1 and "the commands after it were not run" in out.stderr
        assert [ast.literal_eval(c)[3] for c in calls.read_text().splitlines()] == ["scp"]
    finally:
        for g in pgids:
            for pid in _alive_in_group(g):
                os.kill(pid, 9)
