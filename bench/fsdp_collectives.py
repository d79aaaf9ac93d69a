"""Bytes all-reduced per decode step when the sampler runs sharded (compile only, 8 CPU devices).

A Qwen2.5-0.5B-shaped model (hidden 896, vocabulary 151936, 14 / 2 heads; `--layers` of its 24,
since the figure is about the head and per-layer collectives are listed separately) sharded FSDP
x tensor on 8 fake CPU devices, 256 rows. Compiles the sampler's decode loop, and the continuous
batcher's over 256 slots, and sums the all-reduce results inside the loop body (what every step
moves) and outside it (once per call); `per_step_by_kind` adds every other collective of a step
(the FSDP weights' all-gathers, ...), for the sampler's weight copy sharded as in training and
whole over fsdp (`Sampler(gather_weights=True)`, `rollout.gather_weights`).
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
import itertools  # noqa: E402
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


def collective_bytes(hlo: str) -> dict[str, dict[str, list[int]]]:
    """Result bytes of every collective, by kind (all-reduce, all-gather, ...) and computation:
    the while body's (every step) vs the rest (once per call)."""
    out: dict[str, dict[str, list[int]]] = {}
    comp = ""
    bodies = set(re.findall(r"body=%([\w.\-]+)", hlo))
    kinds = "all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter"
    for line in hlo.splitlines():
        m = re.match(r"^(?:ENTRY )?%([\w.\-]+) ", line)
        if m:
            comp = m.group(1)
        m = re.search(rf"= (.*?) ({kinds})(?:-start)?\(", line)
        if not m:
            continue
        head = m.group(1)  # the result shape(s), between the name and the opcode
        n = 0
        for dt, dims in re.findall(r"([a-z]+\d*)\[([0-9,]*)\]", head):
            n += _BYTES.get(dt, 4) * math.prod(int(d) for d in dims.split(",") if d)
        where = "loop_body" if comp in bodies else "outside"
        out.setdefault(m.group(2), {"loop_body": [], "outside": []})[where].append(n)
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
    meshes = (MeshConfig(data=1, fsdp=8, tensor=1), MeshConfig(data=2, fsdp=2, tensor=2))
    for mesh_cfg, gather in itertools.product(meshes, (False, True)):
        sampler = Sampler(
            model,
            eos_ids=(v - 3,),
            pad_id=0,
            self_reward_token_id=v - 2,
            max_new_tokens=args.new_tokens,
            prompt_buckets=(8,),
            mesh=make_mesh(mesh_cfg),
            gather_weights=gather,
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
            moved = collective_bytes(lowered.compile().as_text())
            emit_moved(what, mesh_cfg, args, moved, v, gather)


def emit_moved(what, mesh_cfg, args, moved, v, gather=False) -> None:
    """The all-reduce figures, then every collective kind's bytes and count per step."""
    reduce = moved.get("all-reduce", {"loop_body": [], "outside": []})
    print(
        json.dumps(
            dict(
                what=f"{what}_all_reduce",
                mesh=dict(data=mesh_cfg.data, fsdp=mesh_cfg.fsdp, tensor=mesh_cfg.tensor),
                gather_weights=gather,
                layers=args.layers,
                rows=args.rows,
                per_step_bytes=sum(reduce["loop_body"]),
                per_step_largest=max(reduce["loop_body"], default=0),
                per_step_count=len(reduce["loop_body"]),
                per_call_bytes=sum(reduce["outside"]),
                logits_bytes=args.rows * v * 4,
                per_step_by_kind={
                    kind: dict(count=len(x["loop_body"]), bytes=sum(x["loop_body"]))
                    for kind, x in sorted(moved.items())
                },
                devices=len(jax.devices()),
            )
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
