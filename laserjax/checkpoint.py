"""Checkpoints with orbax's CheckpointManager: the train state plus a small JSON of the rest.

A checkpoint at step s holds the params and optimizer state after step s (sharded arrays,
restored straight into their shardings), and a JSON with the step, the data iterator's state,
the c_ref in use and the RNG seed: everything the next step needs to be exactly the one an
uninterrupted run would take. Orbax writes into a temporary directory and renames it when
complete (on Cloud Storage, which cannot rename, it writes a commit marker last), so a run killed
mid-save leaves the previous checkpoints intact.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from laserjax import paths


class Checkpointer:
    def __init__(self, directory: str | os.PathLike, *, keep: int) -> None:
        """`directory`: a local path (made absolute) or a URL such as gs://bucket/run/checkpoints,
        passed to orbax intact; on several hosts it must be one directory they all reach."""
        self.directory: epath.Path = paths.absolute(
            paths.run_path(directory, field="checkpoint directory")
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=False
            ),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
        )
        self.manager.wait_until_finished()

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

    def close(self) -> None:
        self.manager.close()
