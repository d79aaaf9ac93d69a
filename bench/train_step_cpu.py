"""The laserjax train step vs a transformers / PyTorch step on CPU, one process, interleaved rounds.

The same random Qwen2 shape on both sides, float32 (bf16 is emulated on CPU), the same tokens:

- `grpo`: `make_train_step` with `algorithm: grpo` (no log p(z_c) read, no MSE);
- `laser`: the LaSeR step as the library runs it (log p(z_c) read at the EOS position, the MSE
  and the advantage integration on; `StepSettings` defaults, so no z_c column);
- `laser_zc_column`: the same with `append_zc=True` (z_c written into the sequence: one more
  position, causally invisible; the step before 27 Nov 2026, and what
  `../shared/bench/instruments/train_vs_torch.py` times as its LaSeR side);
- `pytorch`: `Qwen2ForCausalLM` forward (sdpa), log_softmax of the float32 logits gathered at the
  response tokens, masked mean loss, backward, `clip_grad_norm_(1.0)`, AdamW (foreach), zero_grad.

Each round runs one step of every side in turn, so a burst of load from other jobs hits all of
them; the summary compares the fastest round of each (and the medians), with the load average
before and after. PyTorch's two OpenMP threads slow 5-10x when other jobs share the cores: quote a
ratio only with its load.

    python bench/train_step_cpu.py                 # 8 x 256 tokens, hidden 256, 4 layers
    python bench/train_step_cpu.py --rounds 7 --sides laser pytorch
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

EOS, ZC = 2, 5
SIDES = ("grpo", "laser", "laser_zc_column", "pytorch")


def emit(**row) -> None:
    print(json.dumps(row), flush=True)


def load() -> str:
    return " ".join(pathlib.Path("/proc/loadavg").read_text().split()[:3])


def stepper(step, state, batch):
    """A call that runs one train step on the state it holds (the step donates its input)."""
    box = [state]

    def run() -> None:
        import jax

        box[0], metrics = step(box[0], batch)
        jax.block_until_ready((box[0], metrics))

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--response-len", type=int, default=192)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from flax import nnx
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from laserjax import sharding
    from laserjax import train_step as ts
    from laserjax.config import LaserConfig, MeshConfig, OptimConfig, PolicyLossConfig
    from laserjax.model.transformer import Transformer, TransformerConfig

    v, r, p, t = args.vocab, args.rows, args.prompt_len, args.response_len
    shape = dict(
        num_layers=args.layers,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        vocab_size=v,
    )
    emit(
        what="env",
        jax=jax.__version__,
        torch=torch.__version__,
        torch_threads=torch.get_num_threads(),
        shape=shape,
        rows=r,
        tokens=r * (p + t),
        load=load(),
    )
    rng = np.random.default_rng(0)
    prompt = rng.integers(10, v, (r, p))
    response = rng.integers(10, v, (r, t))
    response[:, -1] = EOS
    batch = ts.TrainBatch(
        prompt_tokens=jnp.asarray(prompt, jnp.int32),
        prompt_mask=jnp.ones((r, p), bool),
        response_tokens=jnp.asarray(response, jnp.int32),
        response_mask=jnp.ones((r, t), bool),
        old_logprobs=jnp.asarray(-rng.uniform(8, 10, (r, t)), jnp.float32),
        finished=jnp.ones((r,), bool),
        rewards=jnp.asarray(np.arange(r) % 2, jnp.float32),
        rollout_logp_zc=jnp.asarray(rng.uniform(-23, -10, r), jnp.float32),
    )
    cfg = TransformerConfig(
        model_type="qwen2",
        rope_theta=1e6,
        tie_word_embeddings=True,
        qkv_bias=True,
        dtype="float32",
        param_dtype="float32",
        **shape,
    )
    mesh = sharding.make_mesh(MeshConfig(data=1), jax.devices()[:1])
    optim = OptimConfig(learning_rate=1e-6)
    laser_on = LaserConfig(reasoning_warmup_steps=0, self_reward_warmup_steps=0)
    variants = {
        "grpo": (LaserConfig(algorithm="grpo"), {}),
        "laser": (laser_on, {}),
        "laser_zc_column": (laser_on, dict(append_zc=True)),
    }
    sides, flops = {}, {}
    for name, (laser_cfg, extra) in variants.items():
        if name not in args.sides:
            continue
        settings = ts.StepSettings(group_size=4, self_reward_token_id=ZC, **extra)
        graphdef, state = ts.init_train_state(Transformer(cfg, rngs=nnx.Rngs(0)), optim, mesh)
        fn = ts.make_train_step(
            graphdef,
            ts.train_state_sharding(state, mesh),
            laser_cfg,
            PolicyLossConfig(),
            optim,
            settings,
            mesh,
        )
        cost = fn.lower(state, batch).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        flops[name] = float(cost.get("flops", 0.0))

        sides[name] = stepper(fn, state, batch)

    if "pytorch" in args.sides:
        torch.manual_seed(0)
        hf_cfg = Qwen2Config(
            vocab_size=v,
            hidden_size=args.hidden,
            intermediate_size=args.intermediate,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            num_key_value_heads=args.kv_heads,
            head_dim=args.head_dim,
            tie_word_embeddings=True,
            rope_theta=1e6,
            use_sliding_window=False,
            max_position_embeddings=32768,
        )
        model = Qwen2ForCausalLM(hf_cfg).to(torch.float32).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.01)
        ids = torch.tensor(np.concatenate([prompt, response], 1), dtype=torch.long)
        mask = torch.zeros(r, p + t - 1)
        mask[:, p - 1 :] = 1.0

        def torch_step():
            logits = model(input_ids=ids).logits[:, :-1]
            logp = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
            loss = -(logp * mask).sum() / mask.sum()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        sides["pytorch"] = torch_step

    for name, fn in sides.items():  # compile and warm up
        t0 = time.perf_counter()
        fn()
        fn()
        emit(what="warmup", side=name, seconds=round(time.perf_counter() - t0, 2))
    times: dict[str, list[float]] = {n: [] for n in sides}
    load_before = load()
    for i in range(args.rounds):
        for name, fn in sides.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        emit(what="round", round=i, load=load(), **{n: round(x[-1], 4) for n, x in times.items()})
    tokens = r * (p + t)
    summary = dict(
        what="summary",
        tokens=tokens,
        rounds=args.rounds,
        load_before=load_before,
        load_after=load(),
        best_s={n: round(min(x), 4) for n, x in times.items()},
        median_s={n: round(statistics.median(x), 4) for n, x in times.items()},
        tokens_per_s_best={n: round(tokens / min(x)) for n, x in times.items()},
        xla_flops=flops,
    )
    if "pytorch" in times:
        for n in (n for n in times if n != "pytorch"):
            summary[f"{n}_over_pytorch_best"] = round(min(times["pytorch"]) / min(times[n]), 3)
            summary[f"{n}_over_pytorch_median"] = round(
                statistics.median(times["pytorch"]) / statistics.median(times[n]), 3
            )
    emit(**summary)


if __name__ == "__main__":
    main()
