"""Decisions made once for every process of a multi-host run.

On a pod, each host runs the same program, but hosts do not share disks, clocks or CPU load. What
one host reads from its disk or computes on its CPU under a deadline can differ from another's,
and a value that steers the program (resume or start fresh, the step, c_ref, a reward) must then
be taken from one place: process 0 reads or decides and broadcasts it (`on_primary`,
`broadcast_json`), or each process does its share and the shares are gathered
(`grade_in_shares`). On one process every function here is the plain computation.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
import numpy as np

T = TypeVar("T")

# JSON payloads are padded to a multiple of this many bytes, so the few broadcasts of a run
# compile a handful of programs rather than one per payload length.
_PAD_BYTES = 1024


def broadcast_json(value: Any) -> Any:
    """Process 0's `value` (anything json.dumps takes) on every process."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    primary = jax.process_index() == 0
    payload = json.dumps(value).encode() if primary else b""
    size = int(multihost_utils.broadcast_one_to_all(np.int32(len(payload))))
    buf = np.zeros(-(-size // _PAD_BYTES) * _PAD_BYTES, np.uint8)
    if primary:
        buf[:size] = np.frombuffer(payload, np.uint8)
    buf = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    return json.loads(buf[:size].tobytes().decode())


class PrimaryError(RuntimeError):
    """What process 0 raised in `on_primary`, raised on every process."""


def on_primary(fn: Callable[[], T], *, error: type[Exception] = PrimaryError) -> T:
    """Run `fn` on process 0 only and return its (JSON-able) result on every process.

    If `fn` raises on process 0, every process raises `error` with its message: the others
    would otherwise wait forever in the broadcast.
    """
    out: dict[str, Any] = {}
    if jax.process_index() == 0:
        try:
            out = {"value": fn()}
        except Exception as e:
            if jax.process_count() == 1:
                raise
            out = {"error": f"{type(e).__name__} on process 0: {e}"}
    out = broadcast_json(out)
    if "error" in out:
        raise error(out["error"])
    return out["value"]


def grade_in_shares(
    reward_fn: Callable[[list[str], list[str]], Sequence[float] | np.ndarray],
    responses: Sequence[str],
    answers: Sequence[str],
) -> np.ndarray:
    """One reward per response for all processes: process h grades the h-th contiguous share of
    the responses and the shares are gathered, so every process trains and logs on the same
    float32 rewards (a grader deadline that one host hits and another does not can otherwise
    give two hosts two rewards for one response)."""
    n, hosts = len(responses), jax.process_count()
    if hosts == 1:
        return np.asarray(reward_fn(list(responses), list(answers)), np.float32).reshape(n)
    from jax.experimental import multihost_utils

    per = -(-n // hosts)
    lo = min(jax.process_index() * per, n)
    hi = min(lo + per, n)
    mine = np.zeros(per, np.float32)
    if hi > lo:
        mine[: hi - lo] = np.asarray(
            reward_fn(list(responses[lo:hi]), list(answers[lo:hi])), np.float32
        ).reshape(hi - lo)
    shares = np.asarray(multihost_utils.process_allgather(mine))  # [hosts, per]
    return shares.reshape(-1)[:n]
