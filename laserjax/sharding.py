"""The device mesh and the one partition-rule table for parameters and optimizer state.

Mesh axes: `data` and `fsdp` split the batch; `fsdp` also splits every weight matrix along its
hidden-size side (ZeRO-3 style, all-gathered per layer by XLA); `tensor` splits attention heads,
the MLP's hidden units and the vocabulary (Megatron style). Optimizer moments mirror the params'
paths, so the same table shards them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from laserjax.config import MeshConfig

AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")
"""Mesh axes the batch dimension is split over."""

# (regex searched in the '/'-joined parameter path, spec of the array's trailing dims).
PARAM_RULES: tuple[tuple[str, P], ...] = (
    (r"embed_tokens/embedding$", P("tensor", "fsdp")),  # [vocab, hidden]
    (r"self_attn/[qkv]_proj/kernel$", P("fsdp", "tensor")),  # [hidden, heads * head_dim]
    (r"self_attn/[qkv]_proj/bias$", P("tensor")),
    (r"self_attn/o_proj/kernel$", P("tensor", "fsdp")),  # [heads * head_dim, hidden]
    (r"mlp/(gate|up)_proj/kernel$", P("fsdp", "tensor")),  # [hidden, intermediate]
    (r"mlp/(gate|up)_proj/bias$", P("tensor")),
    (r"mlp/down_proj/kernel$", P("tensor", "fsdp")),  # [intermediate, hidden]
    (r"lm_head/kernel$", P("fsdp", "tensor")),  # [hidden, vocab]
    (r"(o_proj|down_proj)/bias$", P()),
    (r"(norm|layernorm)/weight$", P()),
)


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all), with Auto axis types."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = list(cfg.resolve(len(devices)).values())
    return Mesh(np.asarray(devices).reshape(sizes), AXES)


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Right-align `spec` to the array's rank; replicate any dim the axis does not divide."""
    if len(spec) > len(shape):
        return P()
    padded = (None,) * (len(shape) - len(spec)) + tuple(spec)
    out = []
    for dim, axis in zip(shape, padded, strict=True):
        names = () if axis is None else (axis if isinstance(axis, tuple) else (axis,))
        size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        out.append(axis if size > 1 and dim % size == 0 else None)
    return P(*out)


def path_str(path: tuple) -> str:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    if parts and parts[-1] == "value":  # nnx.Variable leaves end in a `.value` attribute key
        parts.pop()
    return "/".join(parts)


def spec_for(path: str, shape: tuple[int, ...], mesh: Mesh, replicate: Sequence[str] = ()) -> P:
    """The PartitionSpec of one parameter (or optimizer moment) by its path; the mesh axes in
    `replicate` are dropped from it (the array is whole along them)."""
    for pattern, spec in PARAM_RULES:
        if re.search(pattern, path):
            if replicate:
                spec = P(*(None if axis in replicate else axis for axis in spec))
            return _fit(spec, shape, mesh)
    return P()


def state_shardings(state: Any, mesh: Mesh, replicate: Sequence[str] = ()) -> Any:
    """NamedShardings for every leaf of a params / optimizer-state pytree, by the rule table,
    replicated over the mesh axes in `replicate` (the sampler's gathered weight copy:
    `replicate=("fsdp",)`)."""

    def one(path: tuple, leaf: Any) -> NamedSharding:
        shape = tuple(getattr(leaf, "shape", ()))
        return NamedSharding(mesh, spec_for(path_str(path), shape, mesh, replicate))

    return jax.tree_util.tree_map_with_path(one, state)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Batch-major arrays: the leading dim over (data, fsdp), the rest replicated."""
    return NamedSharding(mesh, P(BATCH, *(None,) * (ndim - 1)))


def batch_shards(mesh: Mesh | None) -> int:
    """How many shards the batch splits into: data x fsdp (1 without a mesh)."""
    return 1 if mesh is None else int(np.prod([mesh.shape[a] for a in BATCH]))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def platform_of(mesh: Mesh | None) -> str:
    """The platform of `mesh`'s devices (compile-only ones too); without a mesh, jax's default
    backend."""
    return jax.default_backend() if mesh is None else mesh.devices.flat[0].platform
