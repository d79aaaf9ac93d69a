"""Decode-step memory traffic against the minimum, from XLA's cost analysis (compile only).

The sampler's decode loop runs one `while_loop` per attention window (`window_schedule`); this
compiles one decode step per window (Qwen2.5-0.5B shape by default, abstract parameters, the
state donated as in the loop) and reads XLA's `bytes accessed`. The minimum a step at suffix
position s must read: every parameter once, the prompts' keys/values (once per prompt, shared by
its K samples) and positions 0..s of every row's generated keys/values. Printed per window: the
ratio at its first step (the worst one it serves), and over a whole generation the worst ratio
and the step-weighted average. Also counts copy / transpose instructions of at least a layer's
slice of the cache in the compiled step (there should be none: the cache is updated in place and
read where it lies).

    python bench/decode_cost.py                 # float32, batch 64, prompt 256, 512 and 4096 new
    python bench/decode_cost.py --new-tokens 64 --model small

Use float32 (the default): XLA:CPU converts bf16 weights and caches to f32 every step, which an
accelerator does not do, so a bf16 compile on CPU measures the conversion, not the design.
"""

from __future__ import annotations

import argparse
import json
import re
import time

import jax
import jax.numpy as jnp
from flax import nnx

from laserjax import sampler as sm
from laserjax.model import Transformer, TransformerConfig

PRESETS = {
    "0.5b": dict(
        num_layers=24,
        hidden_size=896,
        intermediate_size=4864,
        num_heads=14,
        num_kv_heads=2,
        head_dim=64,
        vocab_size=151936,
    ),
    "small": dict(
        num_layers=4,
        hidden_size=256,
        intermediate_size=1024,
        num_heads=4,
        num_kv_heads=2,
        head_dim=64,
        vocab_size=8192,
    ),
}
_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1}


def emit(**kw) -> None:
    print(json.dumps(kw), flush=True)


def big_moves(hlo: str, min_bytes: int) -> list[str]:
    """copy / transpose instructions (outside fusions' bodies too) of at least `min_bytes`."""
    out = []
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%\S+ = (\w+)\[([0-9,]*)\]\S* (copy|transpose)\(", line)
        if not m:
            continue
        n = 1
        for d in m.group(2).split(","):
            n *= int(d) if d else 1
        if m.group(1) in _BYTES and n * _BYTES[m.group(1)] >= min_bytes:
            out.append(line.strip()[:120])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="0.5b", choices=list(PRESETS))
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, nargs="+", default=[512, 4096])
    ap.add_argument("--excess", type=float, default=0.3, help="Sampler(window_excess=...)")
    args = ap.parse_args()

    shape = PRESETS[args.model]
    cfg = TransformerConfig(
        model_type="qwen2",
        rope_theta=1e6,
        tie_word_embeddings=True,
        qkv_bias=True,
        dtype=args.dtype,
        param_dtype=args.dtype,
        **shape,
    )
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    item = jnp.dtype(args.dtype).itemsize
    params_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    kv_tok = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * item
    b, k, p = args.batch, args.k, args.prompt_len
    rows = b * k
    emit(
        what="env",
        jax=jax.__version__,
        backend=jax.default_backend(),
        model=args.model,
        dtype=args.dtype,
        batch=b,
        k=k,
        prompt_len=p,
        params_bytes=params_bytes,
        kv_bytes_per_token=kv_tok,
    )
    v = cfg.vocab_size
    summary = {}
    for t in args.new_tokens:
        s = sm.SamplingSettings(
            k=k,
            max_new_tokens=t,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            eos_ids=(v - 3,),
            pad_id=0,
            self_reward_token_id=v - 2,
        )
        windows = sm.decode_windows_for(cfg, params_bytes, b, p, k, t, args.excess)
        prefix, state = jax.eval_shape(
            lambda pr, tk, m, va, seed, s=s, windows=windows: sm._prefill(
                graphdef, pr, tk, m, va, seed, s, lambda x: x, windows
            ),
            params,
            jax.ShapeDtypeStruct((b, p), jnp.int32),
            jax.ShapeDtypeStruct((b, p), bool),
            jax.ShapeDtypeStruct((b,), bool),
            jax.ShapeDtypeStruct((), jnp.uint32),
        )
        windows = sm.decode_windows_for(cfg, params_bytes, b, p, k, t, args.excess)
        layer_slice = rows * min(windows) * kv_tok // (2 * cfg.num_layers)
        worst, weighted, need_sum, lo = 0.0, 0.0, 0.0, 0
        for w in windows:

            def step(pr, pre, st, w=w, s=s):
                return sm._decode_step(nnx.merge(graphdef, pr), pre, st, s, w)

            t0 = time.perf_counter()
            compiled = jax.jit(step, donate_argnums=(2,)).lower(params, prefix, state).compile()
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, list) else cost
            got = float(cost["bytes accessed"])
            moves = big_moves(compiled.as_text(), layer_slice)

            def need(pos):
                return params_bytes + (b * p + rows * (pos + 1)) * kv_tok

            # The steps this window serves: lo .. w - 1 (the last window stops at t - 1: a
            # generation of t tokens runs at most t - 1 decode steps plus one z_c read).
            steps = range(lo, w)
            first = got / need(lo)
            worst = max(worst, first)
            weighted += got * len(steps)
            need_sum += sum(need(i) for i in steps)
            emit(
                what="window",
                new_tokens=t,
                window=w,
                steps=f"{lo}..{w - 1}",
                compile_s=round(time.perf_counter() - t0, 1),
                xla_bytes=got,
                min_bytes_first_step=need(lo),
                ratio_first_step=round(first, 3),
                ratio_last_step=round(got / need(w - 1), 3),
                cache_copies_or_transposes=len(moves),
                examples=moves[:3],
            )
            lo = w
        summary[t] = dict(worst=round(worst, 3), average=round(weighted / need_sum, 3))
        emit(what="generation", new_tokens=t, windows=list(windows), **summary[t])
    emit(what="summary", goal="<= 1.3 at every step", **{str(t): v for t, v in summary.items()})


if __name__ == "__main__":
    main()
