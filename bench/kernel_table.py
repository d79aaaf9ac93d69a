"""Where a jitted call's device time goes: the kernels (or XLA:CPU thunks) of one profiled call.

`kernel_table(fn, per=N)` runs `fn()` once under `jax.profiler.trace`, reads the trace back with
`jax.profiler.ProfileData` and adds up the events per kernel: on a GPU or TPU the events of the
device planes (`/device:...`), keyed by the framework op that launched them where the trace says
so (`_key`); on the CPU the XLA thunks on the runtime's threads of `/host:CPU` (the Python line
and the runtime's own events are left out: they nest the thunks). Each row: the kernel, its
launches and microseconds per `per` (e.g. per decode step) and its share of all kernel time.
`busy_share` is kernel time over the call's wall time: well below 1 means the device waits
(launch gaps, host round trips, syncs).

    rows, summary = kernel_table(lambda: jax.block_until_ready(step(x)), per=steps)
"""

from __future__ import annotations

import collections
import pathlib
import re
import tempfile
import time
from collections.abc import Callable

import jax

SKIP_LINES = ("python", "XLA Modules", "XLA TraceMe", "Steps", "Framework", "Source")


def _is_thunk(name: str) -> bool:
    """An XLA:CPU thunk's event (`ynn_fusion.3`, `wrapped_tanh`), not the runtime's own
    (`ThunkExecutor::Execute`, `SlinkyThreadPool::Await`, `end: ...` markers)."""
    return "::" not in name and not name.startswith("end: ")


def _key(event) -> str:
    """The framework op that launched the kernel (`tf_op`: the jaxpr op path, e.g.
    `.../bnqt,bntd->bnqd/dot_general`), else its HLO op, else the event's name (a key naming the
    XLA module rather than an op is passed over); layer and
    fusion numbers folded (`#`), so the 24 layers' copies of one op add up to one row."""
    stats = {name: value for name, value in event.stats if name}
    # jax 0.11.2 on a GPU set `tf_op` to the module ("XlaModule:..."), folding every kernel into
    # one row (H200, bench/README): such a key is passed over for the next.
    candidates = (stats.get("tf_op"), stats.get("hlo_op"), event.name)
    key = next((str(c) for c in candidates if c and not str(c).startswith("XlaModule")), "?")
    key = re.sub(r"^(jit\([^)]*\)/)+", "", key)
    return re.sub(r"\d+", "#", key)


def kernel_table(fn: Callable[[], object], per: int = 1, top: int = 30) -> tuple[list, dict]:
    """Profile one `fn()` call; the `top` kernels by time, and a summary (see the module doc)."""
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            t0 = time.perf_counter()
            fn()
            wall = time.perf_counter() - t0
        paths = sorted(pathlib.Path(tmp).rglob("*.xplane.pb"))
        if not paths:
            raise RuntimeError(f"jax.profiler.trace wrote no .xplane.pb under {tmp}")
        data = jax.profiler.ProfileData.from_file(str(paths[-1]))
    planes = [p for p in data.planes if p.name.startswith("/device:")]
    on_host = not planes
    if on_host:
        planes = [p for p in data.planes if p.name == "/host:CPU"]
    total_ns: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    samples: list[dict] = []  # a few raw events, to read a trace whose stats name things anew
    for plane in planes:
        for line in plane.lines:
            if line.name.startswith(SKIP_LINES):
                continue
            for ev in line.events:
                if ev.duration_ns <= 0 or (on_host and not _is_thunk(ev.name)):
                    continue
                k = _key(ev)
                total_ns[k] += ev.duration_ns
                count[k] += 1
                if len(samples) < 3:
                    stats = {str(n): str(v)[:120] for n, v in ev.stats if n}
                    samples.append(dict(line=line.name, name=ev.name[:120], stats=stats))
    all_ns = sum(total_ns.values())
    rows = [
        dict(
            kernel=k[:160],
            launches=count[k],
            launches_per=round(count[k] / per, 2),
            us_per=round(ns / per / 1e3, 2),
            share=round(ns / max(all_ns, 1), 4),
        )
        for k, ns in total_ns.most_common(top)
    ]
    summary = dict(
        planes=[p.name for p in planes],
        kernels=len(total_ns),
        launches_per=round(sum(count.values()) / per, 1),
        kernel_us_per=round(all_ns / per / 1e3, 1),
        wall_us_per=round(wall / per * 1e6, 1),
        busy_share=round(all_ns / 1e9 / wall, 3) if wall > 0 else None,
        sample_events=samples,
    )
    return rows, summary
