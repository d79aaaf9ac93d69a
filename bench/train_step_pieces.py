"""Where a train step's time goes on CPU: each piece of the model jitted alone, forward and
gradient, and the two matmul formulations the model chose between, side by side.

Toy shape of `train_vs_torch.py` (hidden 256, intermediate 1024, 4 / 2 heads of 64, 8 x 256
tokens), float32, best of R calls each, interleaved. Printed per piece: forward and gradient ms.
Then the MLP as multi-axis einsums (`...i,io->...o` on [8, 256, 256]) against 2-D matmuls over
flattened rows, and grouped-query attention as one 5-axis einsum against batched matmuls with one
free axis per side: the same values, different XLA:CPU paths.

    python bench/train_step_pieces.py
"""

from __future__ import annotations

import json
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from laserjax.model import Transformer, TransformerConfig
from laserjax.model.transformer import causal_attention, rope_inv_freq

B, S, D, F, H, KV, HD, V = 8, 256, 256, 1024, 4, 2, 64, 8192


def load() -> str:
    return " ".join(pathlib.Path("/proc/loadavg").read_text().split()[:3])


def best_ms(fns: dict, rounds: int = 5) -> dict[str, float]:
    for f in fns.values():  # compile + warm
        f()
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: round(min(v) * 1000, 1) for k, v in times.items()}


def timed(f, *args):
    fj = jax.jit(f)
    return lambda: jax.block_until_ready(fj(*args))


def main() -> None:
    cfg = TransformerConfig(
        model_type="qwen2",
        num_layers=1,
        hidden_size=D,
        intermediate_size=F,
        num_heads=H,
        num_kv_heads=KV,
        head_dim=HD,
        vocab_size=V,
        rope_theta=1e6,
        tie_word_embeddings=True,
        qkv_bias=True,
    )
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(B, S, D)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(S), (B, S))
    mask = jnp.ones((B, S), bool)
    inv = rope_inv_freq(cfg)
    attend = causal_attention(cfg)

    def piece(fn):
        def loss(p):
            return (fn(nnx.merge(graphdef, p)) ** 2).mean()

        return {"fwd": timed(loss, params), "grad": timed(jax.grad(loss), params)}

    pieces = {
        "attention": piece(lambda m: m.layers[0].self_attn(x, pos, mask, inv, attend)[0]),
        "mlp": piece(lambda m: m.layers[0].mlp(x)),
        "block": piece(lambda m: m.layers[0](x, pos, mask, inv, attend)[0]),
    }
    fns = {f"{n}_{k}": f for n, d in pieces.items() for k, f in d.items()}

    # The MLP two ways.
    w = [jnp.asarray(rng.normal(size=s) * 0.05, jnp.float32) for s in ((D, F), (D, F), (F, D))]

    def mlp_einsum(ws):
        g = jnp.einsum("...i,io->...o", x, ws[0])
        u = jnp.einsum("...i,io->...o", x, ws[1])
        return (jnp.einsum("...i,io->...o", jax.nn.silu(g) * u, ws[2]) ** 2).mean()

    def mlp_2d(ws):
        x2 = x.reshape(-1, D)
        return (((jax.nn.silu(x2 @ ws[0]) * (x2 @ ws[1])) @ ws[2]) ** 2).mean()

    # Grouped-query attention two ways.
    g = H // KV
    q = jnp.asarray(rng.normal(size=(B, S, H, HD)), jnp.float32)
    kk = jnp.asarray(rng.normal(size=(B, S, KV, HD)), jnp.float32)
    vv = jnp.asarray(rng.normal(size=(B, S, KV, HD)), jnp.float32)
    causal = jnp.tril(jnp.ones((S, S), bool))

    def attn_5axis(q, k, v):
        s = jnp.einsum("btkgd,bskd->bkgts", q.reshape(B, S, KV, g, HD), k) / math.sqrt(HD)
        p = jax.nn.softmax(jnp.where(causal, s, -1e30), -1)
        return (jnp.einsum("bkgts,bskd->btkgd", p, v) ** 2).mean()

    def attn_batched(q, k, v):
        qb = q.reshape(B, S, KV, g, HD).transpose(0, 2, 3, 1, 4).reshape(B, KV, g * S, HD)
        s = jnp.einsum("bkqd,bksd->bkqs", qb, k.transpose(0, 2, 1, 3)) / math.sqrt(HD)
        s = jnp.where(causal, s.reshape(B, KV, g, S, S), -1e30)
        p = jax.nn.softmax(s, -1).reshape(B, KV, g * S, S)
        return (jnp.einsum("bkqs,bksd->bkqd", p, v.transpose(0, 2, 1, 3)) ** 2).mean()

    grads = (0, 1, 2)
    fns |= {
        "mlp_einsum_grad": timed(jax.grad(mlp_einsum), w),
        "mlp_2d_grad": timed(jax.grad(mlp_2d), w),
        "attn_5axis_grad": timed(jax.grad(attn_5axis, argnums=grads), q, kk, vv),
        "attn_batched_grad": timed(jax.grad(attn_batched, argnums=grads), q, kk, vv),
    }
    same = dict(
        mlp=float(abs(jax.jit(mlp_einsum)(w) - jax.jit(mlp_2d)(w))),
        attention=float(abs(jax.jit(attn_5axis)(q, kk, vv) - jax.jit(attn_batched)(q, kk, vv))),
    )
    before = load()
    ms = best_ms(fns)
    print(
        json.dumps(
            dict(
                what="train_step_pieces",
                ms_best_of_5=ms,
                mlp_einsum_over_2d=round(ms["mlp_einsum_grad"] / ms["mlp_2d_grad"], 2),
                attn_5axis_over_batched=round(ms["attn_5axis_grad"] / ms["attn_batched_grad"], 2),
                loss_difference=same,
                load_before=before,
                load_after=load(),
            )
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
