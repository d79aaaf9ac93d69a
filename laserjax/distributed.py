"""Joining a multi-host JAX cluster, before anything touches a backend (every command that runs
on several hosts calls `maybe_initialize_distributed` first)."""

from __future__ import annotations

import os

import jax


def maybe_initialize_distributed() -> None:
    """Multi-host runs (tpu_scripts set LASERJAX_DISTRIBUTED=1): join the JAX cluster first.

    TPU VMs discover the cluster themselves. Elsewhere (e.g. several CPU processes on one
    machine, as tests/test_multihost.py runs) LASERJAX_COORDINATOR (host:port of process 0),
    LASERJAX_NUM_PROCESSES and LASERJAX_PROCESS_ID name it; CPU collectives across processes
    use gloo (jax's default `jax_cpu_collectives_implementation`).
    """
    if os.environ.get("LASERJAX_DISTRIBUTED") != "1":
        return
    names = ("LASERJAX_COORDINATOR", "LASERJAX_NUM_PROCESSES", "LASERJAX_PROCESS_ID")
    given = [n for n in names if os.environ.get(n)]
    if not given:
        jax.distributed.initialize()
        return
    if len(given) != len(names):
        raise SystemExit(
            f"error: set all of {', '.join(names)} or none of them (none: let JAX "
            f"discover the cluster, as on TPU VMs); only {', '.join(given)} set"
        )
    try:
        num, pid = int(os.environ[names[1]]), int(os.environ[names[2]])
    except ValueError:
        raise SystemExit(
            f"error: {names[1]} and {names[2]} must be integers, got "
            f"{os.environ[names[1]]!r} and {os.environ[names[2]]!r}"
        ) from None
    jax.distributed.initialize(
        coordinator_address=os.environ[names[0]], num_processes=num, process_id=pid
    )
