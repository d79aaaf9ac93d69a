"""What the CPU decode programs' XLA options and window schedule cost or buy in wall time.

`sampler.DECODE_COMPILER_OPTIONS` has XLA:CPU fuse the elementwise work and reductions around the
decode step's matmuls into them, and `decode_windows_for` models what a step then reads; together
they take the decode step's traffic under 1.3x its least at every step (`decode_cost.py`). This
times the sampler's whole rollout three ways in one process, on the same random weights and
prompts, the same rows in each (one EOS id among 151,936: nearly every row runs to
`--new-tokens`; the decode steps are printed):

- `library`: the sampler as it is (the options, its windows);
- `no_options`: XLA's defaults (the options cleared before the sampler is built), its windows;
- `before`: XLA's defaults and the windows of the schedule before the options (30% excess
  bound, first window 64 positions: `--before-windows`, for the default shape).

Each variant is built and compiled once (compile seconds printed: more windows, longer compile),
then the timed rollouts alternate between them, `--rounds` rounds, and the fastest of each is
kept: the 2-core CPU is shared, so the load average is printed before and after. Outputs are
compared too: rows with the same tokens, and the log-probs up to a row's first difference.

    python bench/cpu_decode_options.py                     # 0.5B widths, 4 of 24 layers, f32
    python bench/cpu_decode_options.py --layers 24 --rounds 2

Default: Qwen2.5-0.5B's widths with 4 of its layers, 64 rows, prompt 256, 512 new tokens,
float32.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np
from decode_cost import PRESETS, qwen2_config
from flax import nnx

from laserjax import sampler as sm
from laserjax.model import Transformer


def emit(**kw) -> None:
    print(json.dumps(kw), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--before-windows",
        type=int,
        nargs="+",
        default=[64, 384, 512],
        help="the `before` variant's windows (the old schedule's at the default shape)",
    )
    args = ap.parse_args()

    shape = dict(PRESETS["0.5b"], num_layers=args.layers)
    cfg = qwen2_config(shape, "float32")
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    prompts = rng.integers(10, cfg.vocab_size - 10, (args.rows, args.prompt_len)).tolist()
    zc = cfg.vocab_size - 1

    def build(windows=()) -> sm.Sampler:
        return sm.Sampler(
            model,
            eos_ids=(cfg.vocab_size - 2,),
            pad_id=0,
            self_reward_token_id=zc,
            max_new_tokens=args.new_tokens,
            prompt_buckets=(args.prompt_len,),
            decode_windows=windows,
        )

    library = build()
    options = sm.DECODE_COMPILER_OPTIONS
    sm.DECODE_COMPILER_OPTIONS = {}  # the next samplers compile with XLA's defaults
    try:
        variants = {
            "library": library,
            "no_options": build(),
            "before": build(tuple(args.before_windows)),
        }
    finally:
        sm.DECODE_COMPILER_OPTIONS = options
    emit(
        what="env",
        jax=jax.__version__,
        backend=jax.default_backend(),
        shape=shape,
        rows=args.rows,
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        options=sm.decode_compiler_options("cpu"),
        windows={
            k: list(v.windows_for(args.rows, args.prompt_len, 1)) for k, v in variants.items()
        },
        load_before=os.getloadavg(),
    )

    def rollout(sampler):
        t0 = time.perf_counter()
        out = sampler.sample(prompts, k=1, temperature=1.0, seed=0)
        jax.block_until_ready(out.response_tokens)
        return time.perf_counter() - t0, out

    outs, best = {}, {}
    for name, sampler in variants.items():
        first, outs[name] = rollout(sampler)
        emit(what="first_call", variant=name, seconds=round(first, 2))
    ref = outs["library"]
    for name, out in outs.items():
        # A near-uniform draw (random weights, 151,936 tokens) can flip on a last-bit difference
        # of the logits, after which a row's tokens part: compare each row up to that token.
        differs = out.response_tokens != ref.response_tokens
        first = np.where(differs.any(1), differs.argmax(1), differs.shape[1])
        upto = np.arange(differs.shape[1])[None] < first[:, None]
        gap = float(np.max(np.abs(out.logprobs - ref.logprobs), where=upto, initial=0.0))
        emit(
            what="outputs",
            variant=name,
            rows_identical=int((first == differs.shape[1]).sum()),
            rows=len(first),
            first_difference_median=float(np.median(first)),
            logprob_gap_before_it=gap,
            decode_steps=out.decode_steps,
            tokens=int(out.lengths.sum()),
        )
    for r in range(args.rounds):
        for name, sampler in variants.items():
            secs, _ = rollout(sampler)
            best[name] = min(best.get(name, secs), secs)
            emit(what="round", round=r, variant=name, seconds=round(secs, 3))
    tokens = int(ref.lengths.sum())
    for name, secs in best.items():
        emit(
            what="best",
            variant=name,
            seconds=round(secs, 3),
            tokens_per_s=round(tokens / secs, 1),
            library_speedup=round(secs / best["library"], 3),
        )
    emit(what="load", load_after=os.getloadavg())


if __name__ == "__main__":
    main()
