"""Decode attention over one cache part as one Pallas kernel (GPU, Triton backend).

The XLA decode attention (`Attention.attend_cached`) runs each part of the cache (the shared
prompt prefix, then each suffix segment up to the window) as a scores matmul, a max, an exp and
a weights-times-values matmul: four kernels per part and layer, and the float32 scores go through
memory between them. The first H200 session suspected such per-kernel costs of bounding the
GPU decode step (bench/README). Here each part is one kernel: one program per (row, kv head)
walks the part's positions in blocks of `BLOCK_K`, keeps the running max, sum and weighted
values of an online softmax on chip, and writes only its unnormalised output, its sum and its
max. The caller merges the parts with their maxima (`merge_parts`), exactly as the XLA path's
one softmax over all parts.

Keys and values are the caches' augmented ones (`transformer.augment_kv`: head_dim + 1
components, the last one of a key 0 where the position is live and MASKED_KEY where not), so a
score is q . k[:D] + k[D] and skipped positions weigh exactly 0, as in the XLA path. The kernel
reads the first head_dim components of values; the last one (1) is the sum, which it keeps itself.

Triton wants every loaded or stored block to have a power-of-two size and a matmul's sides to be
at least 16: head_dim must be a power of two >= 16; the queries per program are padded to a
power of two >= 16; a part's length need not divide `BLOCK_K` (its last block is masked).
On the CPU the same kernel runs in Pallas's interpreter (for tests: slow); TPUs are refused.

Measured on an H200 (bench/README, second session): the tests pass compiled for Triton, but the
sampler runs at 0.77x (Qwen2.5-0.5B) and 0.54x (1.5B) the speed of the XLA decode. One program
per (row, kv head) walks the whole part serially (128 programs for 132 SMs at batch 64) and
loads rows of head_dim + 1 components, off 16-byte alignment. Hence opt-in.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

BLOCK_K = 64
"""Key positions per step of a program's loop."""

MIN_TILE = 16
"""Triton's least matmul side."""


def _pow2_at_least(n: int, least: int) -> int:
    p = least
    while p < n:
        p *= 2
    return p


def check_head_dim(head_dim: int) -> None:
    """The field error of `TransformerConfig(decode_impl="pallas")` for a head_dim Triton cannot
    tile."""
    if head_dim < MIN_TILE or head_dim & (head_dim - 1):
        raise ValueError(
            f"config field `decode_impl`: pallas needs head_dim a power of two >= {MIN_TILE}, "
            f"not {head_dim}; use `xla`"
        )


def _kernel(q_ref, k_ref, v_ref, o_ref, l_ref, m_ref, *, length: int, block_k: int):
    """One (row, kv head): q_ref [Q, D]; k_ref, v_ref [T, D + 1]; o_ref [Q, D]; l_ref, m_ref [Q]."""
    q_tiles, d = q_ref.shape
    q = plgpu.load(q_ref).astype(jnp.float32)
    offsets = jnp.arange(block_k)

    def body(j, carry):
        o, total, m = carry
        start = j * block_k
        live = start + offsets < length
        rows = pl.ds(start, block_k)
        k = plgpu.load(k_ref.at[rows, pl.ds(0, d)], mask=live[:, None], other=0.0)
        # Past the part's end: a score below any key's, masked ones included (weight 0).
        bias = plgpu.load(k_ref.at[rows, jnp.int32(d)], mask=live, other=jnp.finfo(k_ref.dtype).min)
        v = plgpu.load(v_ref.at[rows, pl.ds(0, d)], mask=live[:, None], other=0.0)
        # float32 products (no TF32: a decode step is bound by memory, not by these flops).
        s = plgpu.dot(q, k.astype(jnp.float32), trans_b=True, allow_tf32=False)
        s = s + bias.astype(jnp.float32)[None, :]
        m_new = jnp.maximum(m, s.max(axis=-1))
        scale = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        o = scale[:, None] * o + plgpu.dot(p, v.astype(jnp.float32), allow_tf32=False)
        return o, scale * total + p.sum(axis=-1), m_new

    init = (
        jnp.zeros((q_tiles, d), jnp.float32),
        jnp.zeros((q_tiles,), jnp.float32),
        jnp.full((q_tiles,), jnp.finfo(jnp.float32).min, jnp.float32),
    )
    o, total, m = jax.lax.fori_loop(0, pl.cdiv(length, block_k), body, init)
    plgpu.store(o_ref, o)
    plgpu.store(l_ref, total)
    plgpu.store(m_ref, m)


@functools.partial(jax.jit, static_argnames=("interpret",))
def part_attention(
    q_rnqd: jax.Array, k_rntd: jax.Array, v_rntd: jax.Array, *, interpret: bool = False
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Unnormalised attention of queries over one cache part, per (row, kv head).

    `q_rnqd` [R, N, Q, D]: the queries of kv head n (already scaled by 1 / sqrt(D), without the
    augmented component); `k_rntd`, `v_rntd` [R, N, T, D + 1] augmented keys/values. Returns
    float32 (o [R, N, Q, D] = sum_t exp(s_t - m) v_t[:D], l [R, N, Q] = sum_t exp(s_t - m),
    m [R, N, Q] = max_t s_t) with s_t = q . k_t[:D] + k_t[D].
    """
    r, n, nq, d = q_rnqd.shape
    t = k_rntd.shape[2]
    check_head_dim(d)
    if k_rntd.shape != (r, n, t, d + 1) or v_rntd.shape != k_rntd.shape:
        raise ValueError(
            f"keys {k_rntd.shape} / values {v_rntd.shape} do not fit queries {q_rnqd.shape}"
        )
    q_tiles = _pow2_at_least(nq, MIN_TILE)
    q = jnp.pad(q_rnqd.astype(jnp.float32), ((0, 0), (0, 0), (0, q_tiles - nq), (0, 0)))
    block_k = min(BLOCK_K, _pow2_at_least(t, MIN_TILE))
    o, total, m = pl.pallas_call(
        functools.partial(_kernel, length=t, block_k=block_k),
        grid=(r, n),
        in_specs=[
            pl.BlockSpec((None, None, q_tiles, d), lambda i, j: (i, j, 0, 0)),
            pl.BlockSpec((None, None, t, d + 1), lambda i, j: (i, j, 0, 0)),
            pl.BlockSpec((None, None, t, d + 1), lambda i, j: (i, j, 0, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, q_tiles, d), lambda i, j: (i, j, 0, 0)),
            pl.BlockSpec((None, None, q_tiles), lambda i, j: (i, j, 0)),
            pl.BlockSpec((None, None, q_tiles), lambda i, j: (i, j, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((r, n, q_tiles, d), jnp.float32),
            jax.ShapeDtypeStruct((r, n, q_tiles), jnp.float32),
            jax.ShapeDtypeStruct((r, n, q_tiles), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="laserjax_decode_part",
    )(q, k_rntd, v_rntd)
    return o[:, :, :nq], total[:, :, :nq], m[:, :, :nq]


def merge_parts(parts: list[tuple[jax.Array, jax.Array, jax.Array]]) -> jax.Array:
    """Softmax-weighted values over all parts from each part's (o, l, m) (same shapes across
    parts): the parts' sums rescaled to their common max, as one softmax over every position."""
    m_all = functools.reduce(jnp.maximum, [m for _, _, m in parts])
    # The sum rides as one more component of the values: one rescaled sum over the parts (kept
    # as two, XLA's TPU slot loop read 2% more at 4096 new tokens).
    acc = sum(
        jnp.exp(m - m_all)[..., None] * jnp.concatenate([o, total[..., None]], -1)
        for o, total, m in parts
    )
    return acc[..., :-1] / acc[..., -1:]


def interpret_here() -> bool:
    """Run the kernel in Pallas's interpreter (CPU), compiled for Triton (GPU), or refuse (TPU)."""
    backend = jax.default_backend()
    if backend == "tpu":
        raise ValueError(
            "config field `decode_impl`: pallas is a GPU (Triton) kernel; use `xla` on a TPU"
        )
    return backend == "cpu"
