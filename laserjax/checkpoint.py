"""Checkpoints with orbax's CheckpointManager: the train state plus a small JSON of the rest.

A checkpoint at step s holds the params and optimizer state after step s (sharded arrays,
restored straight into their shardings), and a JSON with the step, the data iterator's state,
the c_ref in use and the RNG seed: everything the next step needs to be exactly the one an
uninterrupted run would take. Orbax writes into a temporary directory and renames it when
complete (on Cloud Storage, which cannot rename, it writes a commit marker last), so a run killed
mid-save leaves the previous checkpoints intact.

A checkpoint damaged afterwards (a truncated or missing file, a lost `_METADATA`) is reported in
one line by `restore_latest`, which then resumes from the newest intact one and says which steps
are redone. Nothing is deleted: a damaged step directory is moved to `<dir>.damaged/<step>` (so
the step can be saved afresh). A checkpoint that is intact but does not fit the model (another
depth or width) is not damage: `StructureMismatch` names the parameter and both shapes.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
import types
import warnings
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from laserjax import paths
from laserjax.config import ConfigError
from laserjax.sharding import path_str

_ORBAX_FILES = ("orbax", "tensorstore")


def _closed_loop_callback(exc: BaseException | None) -> bool:
    """A read finishing after the failed restore's event loop closed: tensorstore then calls
    `loop.call_soon_threadsafe` on the closed loop."""
    return (
        isinstance(exc, RuntimeError)
        and str(exc) == "Event loop is closed"
        and any(
            f.f_code.co_name == "call_soon_threadsafe"
            for f, _ in traceback.walk_tb(exc.__traceback__)
        )
    )


def _is_abandoned_read(exc: BaseException | None, obj: object = None) -> bool:
    """An unraisable or unretrieved error of orbax / tensorstore's restore machinery left over
    from a failed restore: a coroutine of theirs collected un-awaited, a late read on the closed
    loop, or a read task of theirs whose error nobody retrieved. Never used for an exception that
    ends the program: `sys.excepthook` drops only the closed-loop callback."""
    if isinstance(obj, types.CoroutineType):
        return any(name in obj.cr_code.co_filename for name in _ORBAX_FILES)
    if exc is None:
        return False
    if _closed_loop_callback(exc):
        return True
    frames = [f.f_code for f, _ in traceback.walk_tb(exc.__traceback__)]
    return any(name in code.co_filename for code in frames for name in _ORBAX_FILES)


class _AbandonedReadLogFilter(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" records of orbax's read tasks."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not ("never retrieved" in record.getMessage() and _is_abandoned_read(exc))


def _quiet_abandoned_orbax_reads() -> None:
    """A restore that fails on a damaged file leaves orbax's other reads in flight, and they end
    noisily at moments the scheduler and the garbage collector choose: coroutines collected
    un-awaited ("Exception ignored in: <coroutine ...>"), reads finishing after orbax closed its
    event loop ("Event loop is closed" from tensorstore's threads), read tasks whose error nobody
    retrieved (asyncio's log). `restore_latest` reports the damage in one line, so it installs
    this before its first restore (a read can end before the failure reaches laserjax): those
    errors, and only those, are dropped from then on; every other one reaches the hooks that were
    installed. A restore that succeeds produces none of them."""
    previous_unraisable, previous_except = sys.unraisablehook, sys.excepthook
    if getattr(previous_unraisable, "__qualname__", "").startswith("_quiet_abandoned"):
        return  # installed once per process

    def unraisable_hook(unraisable: sys.UnraisableHookArgs) -> None:
        if not _is_abandoned_read(unraisable.exc_value, unraisable.object):
            previous_unraisable(unraisable)

    def except_hook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        if not _closed_loop_callback(value):  # an error that ends the run is always printed
            previous_except(kind, value, tb)

    sys.unraisablehook = unraisable_hook
    sys.excepthook = except_hook
    logging.getLogger("asyncio").addFilter(_AbandonedReadLogFilter())


class StructureMismatch(ConfigError):
    """An intact checkpoint whose parameters do not fit the configured model."""


class NoIntactCheckpoint(RuntimeError):
    """Every checkpoint of the run is damaged."""


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {path_str(p): tuple(getattr(x, "shape", ())) for p, x in leaves}


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def _mismatch(saved: dict[str, tuple], wanted: dict[str, tuple]) -> str | None:
    """The first difference between a checkpoint's and the model's (path -> shape), in words;
    parameters are named before optimizer moments."""

    def params_first(path: str) -> tuple[bool, str]:
        return (not path.startswith("params/"), path)

    for path in sorted(wanted, key=params_first):
        if path in saved and saved[path] != wanted[path]:
            return (
                f"parameter {path} has shape {saved[path]} in the checkpoint but "
                f"{wanted[path]} in the configured model"
            )

    missing = sorted(set(wanted) - set(saved), key=params_first)
    extra = sorted(set(saved) - set(wanted), key=params_first)
    if missing or extra:
        parts = []
        if extra:
            parts.append(
                f"{len(extra)} arrays only in the checkpoint (e.g. parameter {extra[0]}, shape "
                f"{saved[extra[0]]})"
            )
        if missing:
            parts.append(
                f"{len(missing)} only in the configured model (e.g. parameter {missing[0]}, "
                f"shape {wanted[missing[0]]})"
            )
        return "its structure differs: " + " and ".join(parts)
    return None


class Checkpointer:
    def __init__(self, directory: str | os.PathLike, *, keep: int) -> None:
        """`directory`: a local path (made absolute) or a URL such as gs://bucket/run/checkpoints,
        passed to orbax intact; on several hosts it must be one directory they all reach."""
        self.directory: epath.Path = paths.absolute(
            paths.run_path(directory, field="checkpoint directory")
        )
        self.keep = keep
        self.manager = self._manager()

    def _manager(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=self.keep, create=True, enable_async_checkpointing=False
            ),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
        )
        self.manager.wait_until_finished()

    def check_fits(self, step: int, abstract_state: Any) -> None:
        """Raise `StructureMismatch` if checkpoint `step` holds other arrays than
        `abstract_state`; any other failure to read its metadata propagates (damage)."""
        md = ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / "state")
        saved = _shapes(getattr(md, "item_metadata", md))
        wanted = _shapes(abstract_state)
        if not saved:
            raise FileNotFoundError("the state's metadata lists no arrays")
        why = _mismatch(saved, wanted)
        if why is not None:
            raise StructureMismatch(
                f"checkpoint step {step} in {self.directory} does not fit the configured model: "
                f"{why}; resume with the model config the run was trained with, or use a new "
                "output_dir"
            )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Restore into the shardings of `abstract_state` (arrays or ShapeDtypeStructs)."""
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), abstract_state
        )
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
            ),
        )
        return out["state"], out["meta"]

    def restore_latest(
        self, abstract_state: Any, log: Callable[[str], None] = print
    ) -> tuple[int, Any, dict[str, Any]]:
        """(step, state, meta) of the newest intact checkpoint.

        A damaged one is reported in one line (`log`) and moved aside (never deleted), and the
        next older one is tried; the line after says which step the run resumes from and which
        steps it redoes. Raises `StructureMismatch` for an intact checkpoint of another model,
        `NoIntactCheckpoint` when none is left."""
        steps = self.all_steps()
        damaged: list[int] = []
        _quiet_abandoned_orbax_reads()
        for step in reversed(steps):
            try:
                self.check_fits(step, abstract_state)
                state, meta = self.restore(step, abstract_state)
                if not isinstance(meta, dict) or "step" not in meta:
                    raise ValueError(f"its meta JSON holds no step: {meta!r}"[:200])
            except StructureMismatch:
                raise
            except Exception as e:  # orbax/tensorstore raise many kinds for a damaged file
                # Its abandoned read coroutines are collected later, each a RuntimeWarning.
                warnings.filterwarnings(
                    "ignore", message="coroutine '.*' was never awaited", category=RuntimeWarning
                )
                log(f"checkpoint step {step} in {self.directory} is damaged ({_first_line(e)})")
                damaged.append(step)
                continue
            if damaged:
                moved = self._set_aside(damaged)
                log(
                    f"resuming from checkpoint step {step}, the newest intact one: steps "
                    f"{step + 1}-{max(damaged)} are redone; the damaged checkpoint"
                    f"{'s' if len(damaged) > 1 else ''} moved to {moved}"
                )
            return step, state, meta
        raise NoIntactCheckpoint(
            f"no intact checkpoint in {self.directory} (damaged: steps "
            f"{', '.join(map(str, sorted(damaged)))}); nothing was deleted: move the directory "
            "aside (or use a new output_dir) to start over"
        )

    def _set_aside(self, steps: list[int]) -> str:
        """Move damaged step directories to `<dir>.damaged/<step>[-n]`; the manager is rebuilt
        so it forgets them and can save those steps again."""
        self.manager.close()
        aside = self.directory.parent / (self.directory.name + ".damaged")
        if jax.process_index() == 0:
            aside.mkdir(parents=True, exist_ok=True)
            for step in steps:
                n, target = 0, aside / str(step)
                while target.exists():
                    n += 1
                    target = aside / f"{step}-{n}"
                (self.directory / str(step)).rename(target)  # a sibling: same file system
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("laserjax checkpoint set-aside")
        self.manager = self._manager()
        return str(aside)

    def close(self) -> None:
        self.manager.close()
