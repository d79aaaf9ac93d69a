"""Cloud TPU VMs and pod slices for laserjax: create, set up, sync, launch, watch, tear down.

Every verb turns its flags into the exact commands it runs (gcloud, plus a local `git archive`
for `sync`), prints each one and runs them in order, stopping at the first failure. With
`--dry-run` it prints the same commands, one per line, and runs nothing, so gcloud need not
be installed. Standard library only: this runs on your workstation, not on the TPU.

The usual order (BUILD.md, section "TPU", has worked examples):

    create -> sync -> setup -> check -> launch -> logs ... -> kill -> delete

Multi-host: `launch` starts the same `python -m laserjax train` on every worker with
LASERJAX_DISTRIBUTED=1, which makes the trainer call `jax.distributed.initialize()` before
anything else touches JAX; on a TPU VM that call finds the other workers by itself.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# Software version ("runtime") to boot each generation with, from Google's table of TPU
# software versions for JAX (cloud.google.com/tpu/docs/runtimes): v4 and older use the plain
# Ubuntu 22.04 base image, v5e/v5p/v6e their own images.
DEFAULT_RUNTIME: dict[str, str] = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5p": "v2-alpha-tpuv5",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v6e": "v2-alpha-tpuv6e",
}
GENERATION_ALIASES: dict[str, str] = {"v5e": "v5litepod"}
# v2-v5p sizes count TensorCores (2 per chip, 4 chips per host): multiples of 8.
# v5e/v6e sizes count chips, in the 2D slice shapes Google offers (1x1 ... 16x16).
CORE_COUNTED = ("v2", "v3", "v4", "v5p")
CHIP_COUNTED_SIZES = (1, 4, 8, 16, 32, 64, 128, 256)

PID_FILE = "logs/train.pid"
ARCHIVE_ON_WORKER = "laserjax-src.tar.gz"
ZONES_DOC = "https://cloud.google.com/tpu/docs/regions-zones"
# The venv's Python. jax >= 0.11 needs Python >= 3.12 (jax 0.12.0.1, Oct 2026: 3.12-3.15), so an
# older default silently resolves `jax[tpu]` to the last release that still supported it
# (3.11 -> jax 0.10.2). 3.13 resolves current jax[tpu], jaxlib, libtpu, grain and tensorstore
# wheels and stays supported longer than 3.12.
DEFAULT_PYTHON = "3.13"


class UsageError(ValueError):
    """A flag is missing or invalid; the message names the flag and the fix."""


# ---------------------------------------------------------------------------------------------
# Validation


def normalize_accelerator_type(value: str) -> str:
    """`v5e-8` -> `v5litepod-8`; raise UsageError naming --accelerator-type when unknown."""
    m = re.fullmatch(r"(v[0-9][a-z]*)-([0-9]+)", value or "")
    aliases = [f"{alias} (= {gen})" for alias, gen in GENERATION_ALIASES.items()]
    known = ", ".join(list(DEFAULT_RUNTIME) + aliases)
    if not m:
        raise UsageError(
            f"--accelerator-type {value!r} is not of the form GENERATION-SIZE; use "
            f"one of the generations {known}, e.g. v4-8, v5litepod-8, v5p-64, v6e-64"
        )
    gen, size = GENERATION_ALIASES.get(m[1], m[1]), int(m[2])
    if gen not in DEFAULT_RUNTIME:
        raise UsageError(
            f"--accelerator-type {value!r}: unknown TPU generation {m[1]!r}; use one "
            f"of {known}, e.g. v4-8, v5litepod-8, v5p-64, v6e-64"
        )
    if gen in CORE_COUNTED and (size < 8 or size % 8):
        raise UsageError(
            f"--accelerator-type {value!r}: {gen} sizes count TensorCores and are "
            f"multiples of 8 ({gen}-8, {gen}-16, {gen}-32, ...)"
        )
    if gen not in CORE_COUNTED and size not in CHIP_COUNTED_SIZES:
        raise UsageError(
            f"--accelerator-type {value!r}: {gen} sizes count chips and are one of "
            f"{', '.join(map(str, CHIP_COUNTED_SIZES))} (e.g. {gen}-8)"
        )
    return f"{gen}-{size}"


def _require(value: str | None, flag: str, what: str, pattern: str, example: str) -> str:
    if not value:
        raise UsageError(f"{flag} is required: {what}, e.g. {flag}={example}")
    if not re.fullmatch(pattern, value):
        raise UsageError(f"{flag} {value!r} is not valid: {what}, e.g. {flag}={example}")
    return value


def validate_common(args: argparse.Namespace) -> None:
    _require(
        args.name,
        "--name",
        "the TPU VM / slice name (lowercase letters, digits, hyphens)",
        r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?",
        "laserjax-v4",
    )
    _require(
        args.zone,
        "--zone",
        f"the zone of the slice, REGION-LETTER (the zones that offer "
        f"each TPU generation: {ZONES_DOC})",
        r"[a-z]+-[a-z]+[0-9]+-[a-z]",
        "us-central2-b",
    )
    if args.project is not None:
        _require(
            args.project,
            "--project",
            "the Google Cloud project id",
            r"[a-z][-a-z0-9.:]{4,61}[a-z0-9]",
            "my-project",
        )


def _home_relative(value: str, flag: str) -> str:
    """A directory on the worker, relative to the home directory, used unquoted in commands."""
    if not re.fullmatch(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*", value) or ".." in value.split("/"):
        raise UsageError(
            f"{flag} {value!r}: give a plain path relative to the worker's home "
            "directory (letters, digits, . _ - /), e.g. laserjax"
        )
    return value


# ---------------------------------------------------------------------------------------------
# Command builders: each returns the argv lists a verb runs, in order.

Command = list[str]


def _where(args: argparse.Namespace) -> Command:
    return [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])


def _tpu_vm(verb: str, args: argparse.Namespace) -> Command:
    return ["gcloud", "compute", "tpus", "tpu-vm", verb, args.name, *_where(args)]


def _queued(verb: str, args: argparse.Namespace) -> Command:
    return ["gcloud", "compute", "tpus", "queued-resources", verb, args.name, *_where(args)]


def _quote(value: str) -> str:
    """Quote a user value for the worker's shell; double quotes where that is safe, so the
    printed gcloud line (which single-quotes the whole --command) stays readable."""
    if shlex.quote(value) == value:
        return value
    if not any(c in value for c in '"$`\\!'):
        return f'"{value}"'
    return shlex.quote(value)


def _ssh(args: argparse.Namespace, worker: str, remote: str) -> Command:
    return _tpu_vm("ssh", args) + [f"--worker={worker}", f"--command={remote}"]


def _python(args: argparse.Namespace) -> str:
    return f"~/{_home_relative(args.venv, '--venv')}/bin/python"


def create_commands(args: argparse.Namespace) -> list[Command]:
    if not args.accelerator_type:
        raise UsageError(
            "--accelerator-type is required: GENERATION-SIZE, e.g. "
            "--accelerator-type=v4-8 (or v5litepod-8, v5p-64, v6e-64)"
        )
    accel = normalize_accelerator_type(args.accelerator_type)
    runtime = args.runtime_version or DEFAULT_RUNTIME[accel.split("-")[0]]
    if args.queued:
        if args.preemptible:
            raise UsageError("--preemptible does not apply to --queued requests; use --spot")
        cmd = _queued("create", args) + [
            f"--node-id={args.name}",
            f"--accelerator-type={accel}",
            f"--runtime-version={runtime}",
        ]
    else:
        cmd = _tpu_vm("create", args) + [f"--accelerator-type={accel}", f"--version={runtime}"]
    return [cmd + ["--spot"] * args.spot + ["--preemptible"] * args.preemptible]


def status_commands(args: argparse.Namespace) -> list[Command]:
    return [(_queued if args.queued else _tpu_vm)("describe", args)]


def sync_commands(args: argparse.Namespace) -> list[Command]:
    """Put one exact revision of the code in ~/REMOTE_DIR on every worker.

    Default: `git archive` of --ref (committed files only, so every worker runs the same code),
    copied to all workers and unpacked over the directory (run outputs there are kept). With
    --repo-url each worker clones/fetches that repository and checks out --ref instead.
    """
    remote_dir = _home_relative(args.remote_dir, "--remote-dir")
    if args.repo_url:
        url = _quote(args.repo_url)
        ref = _quote(args.ref)
        remote = (
            f"(test -d {remote_dir}/.git || git clone --quiet {url} {remote_dir})"
            f" && cd {remote_dir} && git fetch --quiet origin {ref}"
            " && git checkout --quiet --detach FETCH_HEAD"
        )
        return [_ssh(args, "all", remote)]
    archive = args.archive or f"/tmp/laserjax-src-{args.name}.tar.gz"
    source = str(pathlib.Path(args.source).resolve())
    return [
        ["git", "-C", source, "archive", "--format=tar.gz", f"--output={archive}", args.ref],
        [
            "gcloud",
            "compute",
            "tpus",
            "tpu-vm",
            "scp",
            archive,
            f"{args.name}:{ARCHIVE_ON_WORKER}",
            *_where(args),
            "--worker=all",
        ],
        _ssh(
            args,
            "all",
            f"mkdir -p {remote_dir} && tar -xzf {ARCHIVE_ON_WORKER} -C {remote_dir}"
            f" && rm -f {ARCHIVE_ON_WORKER}",
        ),
    ]


def setup_commands(args: argparse.Namespace) -> list[Command]:
    """Install jax[tpu], requirements.txt and laserjax with its `gcs` extra (gcsfs, for
    output_dir=gs://...) into a fresh Python on every worker.

    TPU images ship Python 3.10, which current JAX no longer supports; uv (installed with the
    image's pip) fetches a standalone CPython --python-version and builds the venv from it.
    """
    remote_dir = _home_relative(args.remote_dir, "--remote-dir")
    venv = _home_relative(args.venv, "--venv")
    find_links = f" --find-links {_quote(args.find_links)}" if args.find_links else ""
    remote = (
        f"test -f {remote_dir}/requirements.txt"
        f' || {{ echo "no ~/{remote_dir}/requirements.txt on this worker: run sync first" >&2;'
        " exit 1; }"
        " && python3 -m pip install --user --upgrade uv"
        f" && python3 -m uv venv --allow-existing --python {_quote(args.python_version)}"
        f" ~/{venv}"
        f" && python3 -m uv pip install --python ~/{venv}/bin/python --upgrade"
        f" {_quote(args.jax_spec)}{find_links} -r {remote_dir}/requirements.txt"
        f' -e "./{remote_dir}[gcs]"'
    )
    return [_ssh(args, "all", remote)]


def check_commands(args: argparse.Namespace) -> list[Command]:
    """Start JAX's multi-host runtime on every worker and print what each process sees:
    process index, process count, local devices, global devices, device kind."""
    code = (
        "import jax; jax.distributed.initialize(); print(jax.process_index(),"
        " jax.process_count(), jax.local_device_count(), jax.device_count(),"
        " jax.devices()[0].device_kind)"
    )
    return [_ssh(args, "all", f'{_python(args)} -c "{code}"')]


def launch_commands(args: argparse.Namespace) -> list[Command]:
    """Start `python -m laserjax train` on every worker, detached, logging to a file there.

    The run gets its own session (setsid) so `kill` can stop it with its reward-worker children;
    its pid goes to ~/REMOTE_DIR/logs/train.pid, and a second launch refuses while it lives.
    """
    remote_dir = _home_relative(args.remote_dir, "--remote-dir")
    log_file = _home_relative(args.log_file, "--log-file")
    if not args.config:
        raise UsageError(
            "--config is required: the YAML config, relative to the repository, "
            "e.g. --config=configs/qwen2.5_0.5b.yaml"
        )
    env = ["LASERJAX_DISTRIBUTED=1"]
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise UsageError(f"--env {item!r}: write it as NAME=VALUE, e.g. --env HF_HOME=/tmp/hf")
        env.append(f"{key}={_quote(value)}")
    train = [
        _python(args),
        "-m",
        "laserjax",
        "train",
        "--config",
        _quote(args.config),
        *map(_quote, args.overrides),
    ]
    log_dirs = sorted({"logs", str(pathlib.PurePosixPath(log_file).parent)} - {"."})
    running = f'[ -f {PID_FILE} ] && kill -0 "$(cat {PID_FILE})" 2>/dev/null'
    remote = "; ".join(
        [
            f"cd {remote_dir} || exit 1",
            f"mkdir -p {' '.join(log_dirs)}",
            f'if {running}; then echo "a laserjax run is still going (pid $(cat {PID_FILE})):'
            ' stop it with the kill verb first" >&2; exit 1; fi',
            " ".join(
                [*env, "setsid", "nohup", *train, ">", log_file, "2>&1", "<", "/dev/null", "&"]
            )
            + f" echo $! > {PID_FILE}",
            f'echo "started pid $(cat {PID_FILE}) on $(hostname), log ~/{remote_dir}/{log_file}"',
        ]
    )
    return [_ssh(args, "all", remote)]


def logs_commands(args: argparse.Namespace) -> list[Command]:
    remote_dir = _home_relative(args.remote_dir, "--remote-dir")
    log_file = _home_relative(args.log_file, "--log-file")
    if args.lines < 0:
        raise UsageError(f"--lines {args.lines}: must be >= 0")
    if not re.fullmatch(r"all|[0-9]+", args.worker):
        raise UsageError(f"--worker {args.worker!r}: give a worker index (0, 1, ...) or all")
    follow = " -F" if args.follow else ""
    return [_ssh(args, args.worker, f"tail -n {args.lines}{follow} {remote_dir}/{log_file}")]


def kill_commands(args: argparse.Namespace) -> list[Command]:
    """Stop the run on every worker: SIGTERM to its whole process group (one worker's process
    alone would leave the others blocked in a collective)."""
    remote_dir = _home_relative(args.remote_dir, "--remote-dir")
    remote = (
        f"cd {remote_dir} && if [ -f {PID_FILE} ];"
        f' then kill -TERM -- -"$(cat {PID_FILE})" 2>/dev/null; rm -f {PID_FILE}; fi'
    )
    return [_ssh(args, "all", remote)]


def stop_commands(args: argparse.Namespace) -> list[Command]:
    return [_tpu_vm("stop", args)]


def start_commands(args: argparse.Namespace) -> list[Command]:
    return [_tpu_vm("start", args)]


def delete_commands(args: argparse.Namespace) -> list[Command]:
    if args.queued:  # --force deletes the slice the request holds, then the request
        return [_queued("delete", args) + ["--force"]]
    return [_tpu_vm("delete", args)]


# ---------------------------------------------------------------------------------------------
# CLI


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", help="TPU VM / slice name")
    p.add_argument("--zone", help=f"zone, e.g. us-central2-b ({ZONES_DOC})")
    p.add_argument("--project", help="Google Cloud project (default: gcloud's configured one)")
    p.add_argument(
        "--dry-run", action="store_true", help="print the commands, one per line, and run nothing"
    )


def _add_remote_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--remote-dir",
        default="laserjax",
        help="code directory on each worker, relative to home (default: laserjax)",
    )


def _add_venv(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--venv",
        default="laserjax-venv",
        help="virtual environment on each worker, relative to home (default: laserjax-venv)",
    )


def _add_log_file(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--log-file",
        default="logs/train.log",
        help="log file on each worker, relative to --remote-dir (default: logs/train.log)",
    )


VERBS: dict[str, tuple[Callable[[argparse.Namespace], list[Command]], str]] = {
    "create": (create_commands, "create a TPU VM or pod slice (or queue a request with --queued)"),
    "status": (status_commands, "describe the slice (or the queued request with --queued)"),
    "sync": (sync_commands, "put one revision of the code on every worker"),
    "setup": (setup_commands, "install jax[tpu] and requirements.txt on every worker"),
    "check": (check_commands, "start jax.distributed on every worker and print its devices"),
    "launch": (launch_commands, "start `python -m laserjax train` on every worker"),
    "logs": (logs_commands, "stream a worker's training log"),
    "kill": (kill_commands, "stop the training run on every worker"),
    "stop": (stop_commands, "stop the TPU VM (single-host slices; keeps the disk)"),
    "start": (start_commands, "start a stopped TPU VM"),
    "delete": (delete_commands, "delete the slice (and its queued request with --queued)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tpu_scripts/tpu.sh",
        description=__doc__.split("\n\n")[0],
        epilog="Run `tpu_scripts/tpu.sh VERB --help` for a verb's flags.",
    )
    sub = parser.add_subparsers(dest="verb", metavar="verb")
    parsers = {}
    for verb, (_, help_text) in VERBS.items():
        parsers[verb] = p = sub.add_parser(verb, help=help_text, description=help_text)
        _add_common(p)

    p = parsers["create"]
    p.add_argument(
        "--accelerator-type",
        help="GENERATION-SIZE: v4-8, v5litepod-8 (alias v5e-8), v5p-64, v6e-64, ...",
    )
    p.add_argument(
        "--runtime-version",
        help="TPU software version (default per generation: "
        + ", ".join(f"{g}: {r}" for g, r in DEFAULT_RUNTIME.items())
        + ")",
    )
    p.add_argument(
        "--queued",
        action="store_true",
        help="request it as a queued resource (waits for capacity); see `status`",
    )
    kind = p.add_mutually_exclusive_group()
    kind.add_argument(
        "--spot",
        action="store_true",
        help="Spot VMs: cheaper, may be preempted at any time, no 24 h limit (long runs)",
    )
    kind.add_argument(
        "--preemptible",
        action="store_true",
        help="preemptible TPU: stopped after 24 h at the latest (not with --queued); "
        "use --spot for runs that may last longer",
    )
    for verb in ("status", "delete"):
        parsers[verb].add_argument(
            "--queued", action="store_true", help="the slice was created with create --queued"
        )

    p = parsers["sync"]
    _add_remote_dir(p)
    p.add_argument(
        "--ref",
        default="HEAD",
        help="git revision to ship (default: HEAD; uncommitted changes are not sent)",
    )
    p.add_argument(
        "--source",
        default=str(REPO_ROOT),
        help="local repository to archive (default: this checkout)",
    )
    p.add_argument(
        "--archive", help="local path of the archive (default: /tmp/laserjax-src-NAME.tar.gz)"
    )
    p.add_argument(
        "--repo-url",
        help="instead of copying: clone this URL on each worker and check out --ref there",
    )

    p = parsers["setup"]
    _add_remote_dir(p)
    _add_venv(p)
    p.add_argument(
        "--python-version",
        default=DEFAULT_PYTHON,
        help=f"Python for the venv, fetched by uv (default: {DEFAULT_PYTHON}; current jax "
        "needs >= 3.12)",
    )
    p.add_argument(
        "--jax-spec",
        default="jax[tpu]",
        help='JAX requirement, e.g. "jax[tpu]==0.10.0" (default: jax[tpu])',
    )
    p.add_argument(
        "--find-links",
        help="extra wheel index page for libtpu, e.g. "
        "https://storage.googleapis.com/jax-releases/"
        "libtpu_releases.html (only for older jax pins)",
    )

    _add_venv(parsers["check"])

    p = parsers["launch"]
    _add_remote_dir(p)
    _add_venv(p)
    _add_log_file(p)
    p.add_argument("--config", help="YAML config, relative to the repository")
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment variable for the run (repeatable)",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="config overrides passed to `laserjax train`",
    )

    p = parsers["logs"]
    _add_remote_dir(p)
    _add_log_file(p)
    p.add_argument("--worker", default="0", help="worker index, or all (default: 0)")
    p.add_argument("--lines", type=int, default=100, help="lines of history (default: 100)")
    p.add_argument(
        "--no-follow",
        dest="follow",
        action="store_false",
        help="print and exit instead of following the file",
    )

    _add_remote_dir(parsers["kill"])
    return parser


def plan(argv: Sequence[str]) -> tuple[argparse.Namespace, list[Command]]:
    """Parse argv and build the verb's commands; raises UsageError on bad input."""
    args = build_parser().parse_args(argv)
    if args.verb is None:
        raise UsageError(f"give a verb: {', '.join(VERBS)}")
    validate_common(args)
    return args, VERBS[args.verb][0](args)


def _warn_if_dirty(args: argparse.Namespace) -> None:
    if args.verb != "sync" or args.repo_url:
        return
    out = subprocess.run(
        ["git", "-C", str(args.source), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    )
    if out.returncode == 0 and out.stdout.strip():
        print(
            f"note: uncommitted changes in {args.source} are not sent; sync ships {args.ref}",
            file=sys.stderr,
        )


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args, commands = plan(argv)
    except UsageError as e:
        print(f"tpu_scripts/tpu.sh: error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print("\n".join(shlex.join(c) for c in commands))
        return 0
    if shutil.which("gcloud") is None:
        print(
            "tpu_scripts/tpu.sh: error: gcloud not found on PATH; install the Google Cloud CLI "
            "(https://cloud.google.com/sdk/docs/install) or use --dry-run",
            file=sys.stderr,
        )
        return 127
    _warn_if_dirty(args)
    for cmd in commands:
        print(f"+ {shlex.join(cmd)}", file=sys.stderr, flush=True)
        rc = subprocess.run(cmd).returncode
        if rc != 0:
            print(
                f"tpu_scripts/tpu.sh: error: `{' '.join(cmd[:5])} ...` exited with {rc}; "
                "the commands after it were not run",
                file=sys.stderr,
            )
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
