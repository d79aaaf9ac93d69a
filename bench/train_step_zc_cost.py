"""The cost of the self-reward position in the train step (CPU): LaSeR vs the same GRPO step.

Three jitted train steps on the same model and batch (one device, float32, full optimizer step):

- `grpo`: `algorithm: grpo`, sequence `prompt, response` (L = P + T), no z_c read, no MSE;
- `laser`: the LaSeR step as specified, `prompt, response, z_c` (L = P + T + 1), log p(z_c) read
  at the EOS position, the MSE term and advantage integration on;
- `laser_no_zc_column`: the LaSeR step without z_c written into the sequence (log p(z_c) still
  read from the EOS position: z_c's own column is causally invisible to everything the step
  reads), to split the cost between the extra column and the read-out + MSE.

Rows are all finished, EOS in the last slot, so the z_c column is a real extra position for
every row. The 2-core CPU here is shared with other jobs: the variants are timed in interleaved
rounds; each reports the median wall time, the fastest round (the least disturbed by other
jobs) and the median process CPU time (all threads; steadier than wall time on a busy machine),
each as a ratio to `grpo` (target <= 1.02). XLA's own FLOP count of each compiled step
(`cost_analysis`) is printed beside them: a ratio no other job can disturb. Expect about
(L + 1) / L for the column plus 1 / T of the LM head for the z_c read-out.

XLA's CPU backend has shape quirks (a GRPO step over L = 256 positions ran ~6% slower than over
255 or 257 here), so the default measures three response lengths (sequence lengths 254 to 257)
and the summary averages the ratios over them.

Usage: python bench/train_step_zc_cost.py [--rows 8 --prompt-len 64 --response-len 190 191 192]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from laserjax import sharding  # noqa: E402
from laserjax import train_step as ts  # noqa: E402
from laserjax.config import LaserConfig, MeshConfig, OptimConfig, PolicyLossConfig  # noqa: E402
from laserjax.model.transformer import Transformer, TransformerConfig  # noqa: E402

EOS, ZC = 2, 5


def synthetic_batch(
    rows: int, prompt_len: int, response_len: int, vocab: int, seed: int, finished_frac: float = 1.0
) -> ts.TrainBatch:
    """Full-length prompts and responses; finished rows end with EOS in the last slot."""
    rng = np.random.default_rng(seed)
    response = rng.integers(10, vocab, (rows, response_len))
    finished = rng.random(rows) < finished_frac
    response[finished, -1] = EOS
    return ts.TrainBatch(
        prompt_tokens=jnp.asarray(rng.integers(10, vocab, (rows, prompt_len)), jnp.int32),
        prompt_mask=jnp.ones((rows, prompt_len), bool),
        response_tokens=jnp.asarray(response, jnp.int32),
        response_mask=jnp.ones((rows, response_len), bool),
        old_logprobs=jnp.asarray(-rng.uniform(5, 10, (rows, response_len)), jnp.float32),
        finished=jnp.asarray(finished),
        rewards=jnp.asarray(np.arange(rows) % 2, jnp.float32),  # mixed groups: A_v != 0
        rollout_logp_zc=jnp.asarray(rng.uniform(-23, -10, rows), jnp.float32),
    )


VARIANTS = ("grpo", "laser", "laser_no_zc_column")


def measure(args, cfg: TransformerConfig, response_len: int) -> dict[str, dict]:
    """Interleaved timing of the three variants at one response length."""
    mesh = sharding.make_mesh(MeshConfig(data=1), jax.devices()[:1])
    optim = OptimConfig(learning_rate=1e-6)
    batch = synthetic_batch(args.rows, args.prompt_len, response_len, args.vocab, seed=0)
    on = LaserConfig(reasoning_warmup_steps=0, self_reward_warmup_steps=0)
    configs = {
        "grpo": (LaserConfig(algorithm="grpo"), True),
        "laser": (on, True),
        "laser_no_zc_column": (on, False),
    }
    steps, states, flops = {}, {}, {}
    for name, (laser_cfg, append_zc) in configs.items():
        settings = ts.StepSettings(
            group_size=args.group_size,
            self_reward_token_id=ZC,
            logit_chunk=args.logit_chunk,
            append_zc=append_zc,
        )
        graphdef, state = ts.init_train_state(Transformer(cfg, rngs=nnx.Rngs(0)), optim, mesh)
        steps[name] = ts.make_train_step(
            graphdef,
            ts.train_state_sharding(state, mesh),
            laser_cfg,
            PolicyLossConfig(),
            optim,
            settings,
            mesh,
        )
        cost = steps[name].lower(state, batch).compile().cost_analysis()
        flops[name] = float((cost[0] if isinstance(cost, list) else cost).get("flops", 0.0))
        for _ in range(2):  # compile + one warm run
            state, metrics = steps[name](state, batch)
            jax.block_until_ready(metrics)
        states[name] = state

    wall: dict[str, list[float]] = {name: [] for name in VARIANTS}
    cpu: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name in VARIANTS:
            t0, c0 = time.perf_counter(), time.process_time()
            states[name], metrics = steps[name](states[name], batch)
            jax.block_until_ready((states[name], metrics))
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)

    base_wall, base_cpu = statistics.median(wall["grpo"]), statistics.median(cpu["grpo"])
    tokens = args.rows * (args.prompt_len + response_len)
    out = {}
    for name in VARIANTS:
        med, med_cpu = statistics.median(wall[name]), statistics.median(cpu[name])
        out[name] = dict(
            variant=name,
            response_len=response_len,
            median_s=round(med, 4),
            min_s=round(min(wall[name]), 4),
            median_cpu_s=round(med_cpu, 4),
            tokens_per_s=round(tokens / med),
            ratio_to_grpo=round(med / base_wall, 4),
            min_ratio_to_grpo=round(min(wall[name]) / min(wall["grpo"]), 4),
            cpu_ratio_to_grpo=round(med_cpu / base_cpu, 4),
            flops_ratio_to_grpo=round(flops[name] / flops["grpo"], 4),
            xla_flops=flops[name],
            rows=args.rows,
            prompt_len=args.prompt_len,
            hidden=args.hidden,
            layers=args.layers,
            vocab=args.vocab,
            rounds=args.rounds,
        )
        print(json.dumps(out[name]), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument(
        "--response-len",
        type=int,
        nargs="+",
        default=[190, 191, 192],
        help="one measurement per length; the summary averages the ratios",
    )
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--logit-chunk", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()

    cfg = TransformerConfig(
        model_type="qwen2",
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=3 * args.hidden,
        num_layers=args.layers,
        num_heads=args.hidden // 64,
        num_kv_heads=max(1, args.hidden // 128),
        head_dim=64,
        tie_word_embeddings=True,
        qkv_bias=True,
    )
    results = [measure(args, cfg, t) for t in args.response_len]
    summary = {"summary": "mean over response lengths " + ",".join(map(str, args.response_len))}
    for name in VARIANTS[1:]:
        for key in ("ratio_to_grpo", "cpu_ratio_to_grpo", "flops_ratio_to_grpo"):
            summary[f"{name}_{key}"] = round(statistics.mean(r[name][key] for r in results), 4)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
