"""Share of decode row-steps doing a row's work: static batch vs continuous batching.

1024 samples (128 prompts x 8) with long-tailed response lengths (lognormal, median 1000,
sigma 0.8, cap 8192), run through the continuous sampler itself on a small random model whose
logits are overridden so that EOS arrives with the lognormal's hazard: at response index i the
EOS probability is P(len = i + 1) / P(len >= i + 1), every other token uniform (z_c excluded).
The model still runs every layer, cache and window the sampler uses; only its logits are forced.

Printed: the continuous sampler's measured slot-steps, busy row-steps (a token draw or the z_c
read) and token row-steps, and the static sampler's figure for the same lengths by exact step
accounting (a static batch runs max(len - 1 + finished) steps for every row; see
`sampler.RolloutBatch.decode_steps`, checked in test_sampler).

    python bench/slot_utilisation.py            # over 20 min on 2 cores
    python bench/slot_utilisation.py --median 200 --cap 1638   # the same shape, 5x shorter

`--batch-shards D` runs the slots over a mesh of D devices on the data axis (on the CPU:
XLA_FLAGS=--xla_force_host_platform_device_count=D), where each shard's slots take only samples
of prompts in its own block of the prompt pool (`continuous.py`): what that constraint costs in
utilisation, beside the one-device figure for the same seed.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from laserjax import sharding
from laserjax.config import MeshConfig
from laserjax.continuous import ContinuousSampler
from laserjax.model import Transformer, TransformerConfig
from laserjax.sampler import Sampler

VOCAB, EOS, ZC, PAD = 256, 1, 2, 0


def hazard_logits(median: float, sigma: float, cap: int, vocab: int = VOCAB) -> np.ndarray:
    """[cap, vocab] logits: row i gives EOS probability P(len = i + 1 | len > i) under
    lognormal(log median, sigma) lengths rounded up; other tokens uniform, z_c and pad never."""
    from math import erf

    def cdf(x):
        return 0.5 * (1 + erf((math.log(x) - math.log(median)) / (sigma * math.sqrt(2))))

    out = np.zeros((cap, vocab), np.float32)
    out[:, [ZC, PAD]] = -np.inf
    others = vocab - 3
    for i in range(cap):
        survive = 1 - cdf(i) if i > 0 else 1.0
        p = (cdf(i + 1) - (cdf(i) if i > 0 else 0.0)) / max(survive, 1e-30)
        p = min(max(p, 1e-12), 1 - 1e-7)
        out[i, EOS] = math.log(p * others / (1 - p))
    return out


class LengthForced(Transformer):
    """A Transformer whose sampling logits are the hazard table's row for the response index
    (position - prompt length; every prompt here has the same length)."""

    table: nnx.Variable
    prompt_len: int

    def _forced(self, logits, positions):
        i = jnp.clip(positions - self.prompt_len + 1, 0, self.table.shape[0] - 1)
        return logits * 0 + self.table[...][i]

    def prefill(self, tokens_bp, positions_bp, mask_bp):
        logits, cache = super().prefill(tokens_bp, positions_bp, mask_bp)
        return self._forced(logits, jnp.full(logits.shape[:1], self.prompt_len - 1)), cache

    def decode(self, tokens_bk, positions_bk, *args, **kw):
        out = super().decode(tokens_bk, positions_bk, *args, **kw)
        return (self._forced(out[0], positions_bk), *out[1:])

    def token_logit(self, h, token_id):
        return (
            jnp.full(h.shape[:-1], -jnp.inf) if token_id == ZC else super().token_logit(h, token_id)
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--median", type=float, default=1000)
    ap.add_argument("--sigma", type=float, default=0.8)
    ap.add_argument("--cap", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-shards", type=int, default=1, help="devices on the mesh's data axis")
    args = ap.parse_args()
    mesh = None
    if args.batch_shards > 1:
        devices = jax.devices()[: args.batch_shards]
        mesh = sharding.make_mesh(MeshConfig(data=args.batch_shards), devices)

    p = 16
    cfg = TransformerConfig(
        model_type="qwen2",
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        qkv_bias=True,
        tie_word_embeddings=True,
    )
    model = LengthForced(cfg, rngs=nnx.Rngs(0))
    model.table = nnx.Variable(jnp.asarray(hazard_logits(args.median, args.sigma, args.cap)))
    model.prompt_len = p
    sampler = Sampler(
        model,
        eos_ids=(EOS,),
        pad_id=PAD,
        self_reward_token_id=ZC,
        max_new_tokens=args.cap,
        prompt_buckets=(p,),
        mesh=mesh,
    )
    cont = ContinuousSampler(sampler, slots=args.slots)
    rng = np.random.default_rng(args.seed)
    prompts = rng.integers(3, VOCAB, (args.prompts, p)).tolist()
    t0 = time.perf_counter()
    batch, stats = cont.sample(prompts, k=args.k, temperature=1.0, seed=args.seed)
    wall = time.perf_counter() - t0
    useful = batch.lengths - 1 + batch.finished
    rows = len(batch.lengths)
    static_steps = int(useful.max())
    print(
        json.dumps(
            dict(
                what="slot_utilisation",
                rows=rows,
                slots=args.slots,
                batch_shards=args.batch_shards,
                lengths=dict(
                    median=float(np.median(batch.lengths)),
                    mean=round(float(batch.lengths.mean()), 1),
                    max=int(batch.lengths.max()),
                    truncated=int(batch.truncated.sum()),
                ),
                continuous=dict(
                    slot_steps=stats.slot_steps,
                    busy_row_steps=stats.busy_steps,
                    token_row_steps=stats.token_steps,
                    utilisation=round(stats.utilisation, 4),
                    token_share=round(stats.token_share, 4),
                    decode_steps=stats.decode_steps,
                    prefill_calls=stats.prefill_calls,
                    accounting_exact=bool(stats.busy_steps == int(useful.sum())),
                ),
                static_same_lengths=dict(
                    decode_steps=static_steps,
                    utilisation=round(float(useful.sum()) / (rows * static_steps), 4),
                ),
                goal=">= 0.90",
                wall_s=round(wall, 1),
                backend=jax.default_backend(),
            )
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
