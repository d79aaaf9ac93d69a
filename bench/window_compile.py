"""What the decode-window cap buys: the decode loop's compile time against its window count.

The static sampler runs one `while_loop` per attention window (`sampler.window_schedule`), each
over every layer, so the compiled decode program grows with the window count. This compiles the
sampler's whole decode loop (abstract parameters, the state donated, as `Sampler` does) for each
`--max-windows` value, one after another, best of `--repeats` compiles each, and prints the
windows, the compile seconds and their ratio to the fastest. What a cap costs in decode traffic
is `decode_cost.py --max-windows N`'s to measure.

    python bench/window_compile.py                      # 0.5B widths, 4 layers, bf16, 4096 new
    python bench/window_compile.py --layers 24 --max-windows 1000 16

Default: Qwen2.5-0.5B's widths with 4 of its 24 layers (the compile grows with layers x windows;
the count of windows does not depend on the layers kept, it is computed for the full 24), 64
rows, prompt 256, 4096 new tokens, bf16 weights and caches.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import jax
from decode_cost import PRESETS, abstract_rollout, settings
from flax import nnx

from laserjax import sampler as sm
from laserjax.model import Transformer, TransformerConfig


def emit(**kw) -> None:
    print(json.dumps(kw), flush=True)


def compile_loop(cfg, windows, rows, prompt_len, new_tokens) -> float:
    """Seconds to lower and compile the decode loop of `windows` (the prefill only traced)."""
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    s = settings(cfg, 1, new_tokens)
    prefix, state = abstract_rollout(graphdef, params, s, rows, prompt_len, windows)
    loop = jax.jit(
        lambda pr, pre, st: sm._decode_loop(
            graphdef, pr, pre, st, s, lambda x: x, sm._head_gatherer(None)
        ),
        donate_argnums=(2,),
    )
    t0 = time.perf_counter()
    loop.lower(params, prefix, state).compile()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4, help="layers compiled (of the 24)")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=4096)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-windows", type=int, nargs="+", default=[1000, sm.MAX_WINDOWS, 8])
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    full = TransformerConfig(
        model_type="qwen2",
        rope_theta=1e6,
        tie_word_embeddings=True,
        qkv_bias=True,
        dtype=args.dtype,
        param_dtype=args.dtype,
        **PRESETS["0.5b"],
    )
    cfg = dataclasses.replace(full, num_layers=args.layers)
    params_bytes = sum(
        x.size * x.dtype.itemsize
        for x in jax.tree.leaves(nnx.eval_shape(lambda: Transformer(full, rngs=nnx.Rngs(0))))
    )
    emit(
        what="env",
        jax=jax.__version__,
        backend=jax.default_backend(),
        layers=args.layers,
        rows=args.rows,
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        dtype=args.dtype,
        load_before=os.getloadavg()[0],
    )
    results = []
    for cap in args.max_windows:
        windows = sm.decode_windows_for(
            full, params_bytes, args.rows, args.prompt_len, 1, args.new_tokens, max_windows=cap
        )
        secs = min(
            compile_loop(cfg, windows, args.rows, args.prompt_len, args.new_tokens)
            for _ in range(args.repeats)
        )
        results.append((cap, len(windows), secs))
        emit(what="compile", max_windows=cap, windows=len(windows), compile_s=round(secs, 2))
    base = min(r[2] for r in results)
    for cap, n, secs in results:
        emit(what="ratio", max_windows=cap, windows=n, compile_over_fastest=round(secs / base, 2))
    emit(what="load", load_after=os.getloadavg()[0])


if __name__ == "__main__":
    main()
