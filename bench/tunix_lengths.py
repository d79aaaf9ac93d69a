"""laserjax's continuous sampler vs Google Tunix 0.1.7's sampler on long-tailed response lengths.

The same rollout on both sides: P prompts x K samples whose lengths follow a lognormal (median,
sigma, cap), drawn by each sampler itself. Both models are the same random Qwen2 shape with their
sampling logits replaced by a hazard table (`slot_utilisation.hazard_logits`): at response index
i the EOS probability is P(len = i + 1 | len > i), every other token uniform. Every layer, cache
and attention step still runs on both sides; only the logits are forced, so each side draws its
lengths from the same distribution (not the same lengths: the figure is tokens per second).

Both sides hold the same number of rows at once (`--slots`): laserjax's `ContinuousSampler`
refills a finished row's slot with the next queued sample; Tunix, a static-batch sampler, takes
the samples in batches of `--slots` rows and decodes each batch until its longest row ends (its
loop runs while any row is not done). One process, interleaved rounds, best of each; the load is
printed before and after.

    TUNIX_DIR=/tmp/tunix python bench/tunix_lengths.py             # ~5 min on 2 cores
    TUNIX_DIR=/tmp/tunix python bench/tunix_lengths.py --refill 1 4  # refill each freed slot
                                         # at once vs in groups of 4 (fewer host round trips)
    python bench/tunix_lengths.py --median 64 --cap 512 --prompts 16   # quicker

Tunix is installed outside the repository (`pip install --no-deps --target $TUNIX_DIR
google-tunix==0.1.7 jaxtyping wadler_lindig sentencepiece pillow`).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent.parent / "shared" / "bench")]
if os.environ.get("TUNIX_DIR"):
    sys.path.append(os.environ["TUNIX_DIR"])

from slot_utilisation import EOS, PAD, ZC, LengthForced, hazard_logits  # noqa: E402

from laserjax.continuous import ContinuousSampler  # noqa: E402
from laserjax.model import TransformerConfig  # noqa: E402
from laserjax.sampler import Sampler  # noqa: E402


def emit(**kw) -> None:
    print(json.dumps(kw), flush=True)


def load() -> str:
    return " ".join(pathlib.Path("/proc/loadavg").read_text().split()[:3])


def tunix_side(args, table: np.ndarray, prompt_len: int):
    """A Tunix sampler over a random Qwen2 whose logits are the hazard table's rows."""
    import tunix_sampler_bench as tb

    _, sampler_lib, qwen2_lib = tb.import_tunix()
    v = args.vocab

    class Forced(qwen2_lib.Qwen2):
        def __init__(self, config, *, rngs):
            super().__init__(config, rngs=rngs)
            self.table = nnx.Variable(jnp.zeros(table.shape, jnp.float32))

        def __call__(
            self,
            input_tokens,
            positions,
            cache,
            attention_mask=None,
            output_hidden_states=False,
            segment_ids=None,
        ):
            logits, cache = super().__call__(
                input_tokens, positions, cache, attention_mask, output_hidden_states, segment_ids
            )
            i = jnp.clip(positions - prompt_len + 1, 0, self.table.shape[0] - 1)
            return logits * 0 + self.table[...][i].astype(logits.dtype), cache

    cfg = qwen2_lib.ModelConfig(
        num_layers=args.layers,
        vocab_size=v,
        embed_dim=args.hidden,
        hidden_dim=args.intermediate,
        num_heads=args.heads,
        head_dim=args.head_dim,
        num_kv_heads=args.kv_heads,
        rope_theta=1_000_000,
        norm_eps=1e-6,
        use_tied_embedding=True,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    )
    graphdef, abs_state = nnx.split(nnx.eval_shape(lambda: Forced(cfg, rngs=nnx.Rngs(params=0))))
    key = jax.random.key(args.seed)
    counter = iter(range(1 << 30))

    def one(path, x):
        if len(x.shape) >= 2 or "bias" in jax.tree_util.keystr(path):
            return 0.02 * jax.random.normal(jax.random.fold_in(key, next(counter)), x.shape)
        return jnp.ones(x.shape, jnp.float32)

    model = nnx.merge(graphdef, jax.tree_util.tree_map_with_path(one, abs_state))
    model.table.value = jnp.asarray(table)
    return sampler_lib.Sampler(
        transformer=model,
        tokenizer=tb.IdTokenizer(eos_id=EOS, pad_id=PAD),
        cache_config=sampler_lib.CacheConfig(
            cache_size=prompt_len + args.cap,
            num_layers=args.layers,
            num_kv_heads=args.kv_heads,
            head_dim=args.head_dim,
        ),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--median", type=float, default=100)
    ap.add_argument("--sigma", type=float, default=0.8)
    ap.add_argument("--cap", type=int, default=800)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument(
        "--refill",
        type=int,
        nargs="+",
        default=[1],
        help="laserjax sides: one ContinuousSampler(refill=R) each (1, the default: refill "
        "every freed slot at the next step)",
    )
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    p, v = args.prompt_len, args.vocab
    table = hazard_logits(args.median, args.sigma, args.cap, v)
    emit(
        what="env",
        jax=jax.__version__,
        backend=jax.default_backend(),
        load=load(),
        **{k: getattr(args, k) for k in ("prompts", "k", "slots", "median", "sigma", "cap")},
        shape=dict(vocab=v, hidden=args.hidden, layers=args.layers, heads=args.heads),
    )

    cfg = TransformerConfig(
        model_type="qwen2",
        vocab_size=v,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        qkv_bias=True,
        tie_word_embeddings=True,
        rope_theta=1e6,
    )
    model = LengthForced(cfg, rngs=nnx.Rngs(args.seed))
    model.table = nnx.Variable(jnp.asarray(table))
    model.prompt_len = p
    sampler = Sampler(
        model,
        eos_ids=(EOS,),
        pad_id=PAD,
        self_reward_token_id=ZC,
        max_new_tokens=args.cap,
        prompt_buckets=(p,),
    )
    conts = {
        "laserjax" + (f"_refill{r}" if len(args.refill) > 1 else ""): ContinuousSampler(
            sampler, slots=args.slots, refill=r
        )
        for r in args.refill
    }
    tx = tunix_side(args, table, p)

    rng = np.random.default_rng(args.seed)
    prompts = rng.integers(3, v, (args.prompts, p)).tolist()
    rows = [r for r in prompts for _ in range(args.k)]  # Tunix: each sample its own row

    def run_laserjax(cont, seed):
        t0 = time.perf_counter()
        batch, stats = cont.sample(prompts, k=args.k, temperature=1.0, seed=seed)
        secs = time.perf_counter() - t0
        return dict(
            seconds=secs,
            tokens=int(batch.lengths.sum()),
            steps=stats.decode_steps,
            loop_calls=stats.loop_calls,
            utilisation=round(stats.utilisation, 4),
        )

    def run_tunix(seed):
        t0, tokens, steps = time.perf_counter(), 0, 0
        for i in range(0, len(rows), args.slots):
            chunk = [" ".join(map(str, r)) for r in rows[i : i + args.slots]]
            out = tx(
                chunk,
                max_generation_steps=args.cap,
                max_prompt_length=p,
                echo=False,
                temperature=1.0,
                top_p=1.0,
                top_k=None,
                eos_tokens=[EOS],
                seed=seed + i,
            )
            lens = [len(x) for x in out.tokens]
            tokens += sum(lens)
            steps += max(lens)
        return dict(seconds=time.perf_counter() - t0, tokens=tokens, steps=steps)

    sides = {name: functools.partial(run_laserjax, c) for name, c in conts.items()}
    sides["tunix"] = run_tunix
    for name, fn in sides.items():  # compile + warm
        res = fn(10_000)
        emit(what="warmup", side=name, **{k: round(x, 2) for k, x in res.items()})
    runs = {n: [] for n in sides}
    for r in range(args.rounds):
        for name, fn in sides.items():
            res = fn(r)
            res["tokens_per_s"] = res["tokens"] / res["seconds"]
            runs[name].append(res)
            emit(what="run", side=name, round=r, load=load(), **res)
    best = {n: max(x["tokens_per_s"] for x in runs[n]) for n in sides}
    for name in conts:
        emit(
            what="summary",
            side=name,
            laserjax_tokens_per_s=round(best[name], 1),
            tunix_tokens_per_s=round(best["tunix"], 1),
            laserjax_over_tunix=round(best[name] / best["tunix"], 3),
            goal=">= 1.5",
            load_end=load(),
        )


if __name__ == "__main__":
    main()
