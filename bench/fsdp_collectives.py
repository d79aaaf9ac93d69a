"""Bytes all-reduced per decode step when the sampler runs sharded (compile only, 8 CPU devices).

A Qwen2.5-0.5B-shaped model (hidden 896, vocabulary 151936, 14 / 2 heads; `--layers` of its 24,
since the figure is about the head and per-layer collectives are listed separately) sharded FSDP
x tensor on 8 fake CPU devices, 256 rows. Compiles the sampler's decode loop, and the continuous
batcher's over 256 slots, and sums the all-reduce operands inside the loop body (what every step
moves) and outside it (once per call).
Before the head was gathered once per call (`sampler._head_gatherer`), the loop all-reduced the
full float32 logits every step: 256 x 151936 x 4 bytes = 155.6 MB.

    python bench/fsdp_collectives.py                 # FSDP 8, and data 2 x FSDP 2 x tensor 2
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from laserjax.config import MeshConfig  # noqa: E402
from laserjax.continuous import ContinuousSampler  # noqa: E402
from laserjax.model import Transformer, TransformerConfig  # noqa: E402
from laserjax.sampler import Sampler  # noqa: E402
from laserjax.sharding import make_mesh  # noqa: E402

_BYTES = {"f32": 4, "bf16": 2, "s32": 4, "u32": 4, "pred": 1, "f16": 2}


def all_reduce_bytes(hlo: str) -> dict[str, list[int]]:
    """Operand bytes of every all-reduce, by computation: the while body's vs the rest."""
    out: dict[str, list[int]] = {"loop_body": [], "outside": []}
    comp = ""
    bodies = set(re.findall(r"body=%([\w.\-]+)", hlo))
    for line in hlo.splitlines():
        m = re.match(r"^(?:ENTRY )?%([\w.\-]+) ", line)
        if m:
            comp = m.group(1)
        m = re.search(r"= (.*?) all-reduce(?:-start)?\(", line)
        if not m:
            continue
        head = m.group(1)  # the result shape(s), between the name and the opcode
        n = 0
        for dt, dims in re.findall(r"([a-z]+\d*)\[([0-9,]*)\]", head):
            n += _BYTES.get(dt, 4) * math.prod(int(d) for d in dims.split(",") if d)
        out["loop_body" if comp in bodies else "outside"].append(n)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    cfg = TransformerConfig(
        model_type="qwen2",
        num_layers=args.layers,
        hidden_size=896,
        intermediate_size=4864,
        num_heads=14,
        num_kv_heads=2,
        head_dim=64,
        vocab_size=151936,
        rope_theta=1e6,
        tie_word_embeddings=True,
        qkv_bias=True,
    )
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    v = cfg.vocab_size
    for mesh_cfg in (MeshConfig(data=1, fsdp=8, tensor=1), MeshConfig(data=2, fsdp=2, tensor=2)):
        sampler = Sampler(
            model,
            eos_ids=(v - 3,),
            pad_id=0,
            self_reward_token_id=v - 2,
            max_new_tokens=args.new_tokens,
            prompt_buckets=(8,),
            mesh=make_mesh(mesh_cfg),
        )
        s = sampler.settings(k=1, temperature=1.0, top_p=1.0, top_k=0)
        prefix, state, _, _ = sampler.start([[10, 11, 12]] * args.rows, s, 0)
        static = sampler._loop.lower(sampler.params, prefix, state, s)
        cont = ContinuousSampler(sampler, slots=args.rows)
        pool, st = cont.buffers(8, s)
        continuous = cont._loop.lower(
            sampler.params,
            pool,
            st,
            jax.random.key(0),
            jnp.int32(1),
            jnp.int32(-1),
            s=s,
            window=args.new_tokens,
        )
        for what, lowered in (("decode", static), ("continuous_decode", continuous)):
            moved = all_reduce_bytes(lowered.compile().as_text())
            emit_moved(what, mesh_cfg, args, moved, v)


def emit_moved(what, mesh_cfg, args, moved, v) -> None:
    print(
        json.dumps(
            dict(
                what=f"{what}_all_reduce",
                mesh=dict(data=mesh_cfg.data, fsdp=mesh_cfg.fsdp, tensor=mesh_cfg.tensor),
                layers=args.layers,
                rows=args.rows,
                per_step_bytes=sum(moved["loop_body"]),
                per_step_largest=max(moved["loop_body"], default=0),
                per_step_count=len(moved["loop_body"]),
                per_call_bytes=sum(moved["outside"]),
                logits_bytes=args.rows * v * 4,
                devices=len(jax.devices()),
            )
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
