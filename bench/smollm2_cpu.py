"""laserjax vs PyTorch on a real model on CPU: SmolLM2-135M-Instruct, side by side in one run.

Both sides load the same weights (the `gguf:smollm2-135m-instruct` Hugging Face export, float32):
torch through `AutoModelForCausalLM.from_pretrained`, laserjax through `load_pretrained`.

- Sampling: the same real chat prompts (the CPU config's arithmetic questions, left-padded for
  transformers), temperature 1.0, top_p 1.0, full vocabulary (transformers' top_k switched off),
  exactly --new-tokens tokens per row (laserjax: no EOS id; transformers: min_new_tokens =
  max_new_tokens). laserjax: `Sampler.sample`, as a rollout calls it (z_c step included);
  transformers: `generate`.
- Training: one optimizer step on the same --rows x (prompt + response) tokens. laserjax: the
  LaSeR train step (PPO-clip surrogate, log p(z_c) at EOS, MSE, AdamW, grad clip 1.0); torch:
  forward, the same clipped surrogate over the response log-probs, backward,
  clip_grad_norm_(1.0), AdamW.

The CPU is shared: after one warm-up each (laserjax: the compiles), the two sides are timed in
interleaved rounds (laserjax, torch, laserjax, torch, ...) and the fastest of --rounds calls of
each is compared, so a burst of load from other jobs hits both alike. `uptime` is printed before and
after. One JSON line per measurement; the summary line holds the two ratios (laserjax speed /
torch speed, > 1: laserjax faster).

Usage: python bench/smollm2_cpu.py [--batch 8 --new-tokens 32 --rows 8 --rounds 3]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

EOS, ZC = 2, 3


def emit(**row) -> None:
    print(json.dumps(row), flush=True)


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8, help="prompts sampled per call")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rows", type=int, default=8, help="sequences per train step")
    ap.add_argument("--response-len", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from laserjax import sharding
    from laserjax import train_step as ts
    from laserjax.config import LaserConfig, MeshConfig, OptimConfig, PolicyLossConfig
    from laserjax.data import build_prompt, load_problems
    from laserjax.model.fetch import resolve_model
    from laserjax.model.hf_params import load_pretrained
    from laserjax.sampler import Sampler

    emit(
        what="env",
        uptime_start=uptime(),
        torch_threads=torch.get_num_threads(),
        jax=jax.__version__,
    )
    ckpt = resolve_model("gguf:smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    hf = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    jx = load_pretrained(str(ckpt), dtype="float32", param_dtype="float32")

    # --- sampling -------------------------------------------------------------------------------
    problems, _ = load_problems("arithmetic:+:1-9:10-99:train")
    prompts = [
        build_prompt(p.problem, tok, "chat", instruction="", system="Answer with the number only.")
        for p in problems[: args.batch]
    ]
    width = max(map(len, prompts))
    ids = torch.tensor([[EOS] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    sampler = Sampler(
        jx,
        eos_ids=(),
        pad_id=EOS,
        self_reward_token_id=ZC,
        max_new_tokens=args.new_tokens,
        prompt_buckets=(width,),
    )

    def lj_sample(seed: int) -> float:
        t0 = time.perf_counter()
        sampler.sample(prompts, k=1, temperature=1.0, top_p=1.0, top_k=0, seed=seed)
        return time.perf_counter() - t0

    def tf_generate(seed: int) -> float:
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                pad_token_id=EOS,
            )
        assert out.shape[1] - width == args.new_tokens
        return time.perf_counter() - t0

    # --- training -------------------------------------------------------------------------------
    rng = np.random.default_rng(args.seed)
    p_len, r_len, rows = width, args.response_len, args.rows
    row_prompts = [prompts[i % len(prompts)] for i in range(rows)]
    prompt_tokens = np.array([[EOS] * (width - len(p)) + p for p in row_prompts], np.int32)
    prompt_mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in row_prompts], bool)
    response = rng.integers(17, 49152, (rows, r_len)).astype(np.int32)
    response[:, -1] = EOS
    old_lp = -rng.uniform(1, 5, (rows, r_len)).astype(np.float32)
    rewards = (np.arange(rows) % 2).astype(np.float32)
    batch = ts.TrainBatch(
        prompt_tokens=jnp.asarray(prompt_tokens),
        prompt_mask=jnp.asarray(prompt_mask),
        response_tokens=jnp.asarray(response),
        response_mask=jnp.ones((rows, r_len), bool),
        old_logprobs=jnp.asarray(old_lp),
        finished=jnp.ones((rows,), bool),
        rewards=jnp.asarray(rewards),
        rollout_logp_zc=jnp.full((rows,), -21.0, jnp.float32),
    )
    mesh = sharding.make_mesh(MeshConfig(data=1), jax.devices()[:1])
    optim = OptimConfig(learning_rate=1e-6)
    # Its own copy: the train step donates its state, which must not be the sampler's weights.
    jx_train = load_pretrained(str(ckpt), dtype="float32", param_dtype="float32")
    graphdef, state = ts.init_train_state(jx_train, optim, mesh)
    step = ts.make_train_step(
        graphdef,
        ts.train_state_sharding(state, mesh),
        LaserConfig(reasoning_warmup_steps=0, self_reward_warmup_steps=0, c_ref=-21.0),
        PolicyLossConfig(),
        optim,
        ts.StepSettings(group_size=4, self_reward_token_id=ZC, logit_chunk=256),
        mesh,
    )
    holder = {"state": state}

    def lj_train() -> float:
        t0 = time.perf_counter()
        holder["state"], metrics = step(holder["state"], batch)
        jax.block_until_ready((holder["state"], metrics))
        return time.perf_counter() - t0

    # Group-normalised advantages of the same rewards (groups of 4), as the LaSeR step computes.
    adv = rewards.reshape(-1, 4)
    adv = (adv - adv.mean(1, keepdims=True)) / (adv.std(1, ddof=1, keepdims=True) + 1e-6)
    t_seq = torch.tensor(np.concatenate([prompt_tokens, response], 1), dtype=torch.long)
    t_mask = torch.tensor(np.concatenate([prompt_mask, np.ones((rows, r_len), bool)], 1))
    t_pos = (t_mask.long().cumsum(1) - 1).clamp(min=0)
    t_old, t_adv = torch.tensor(old_lp), torch.tensor(adv.reshape(-1, 1))
    hf.train()
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-6, weight_decay=0.01)

    def tf_train() -> float:
        t0 = time.perf_counter()
        logits = hf(input_ids=t_seq, attention_mask=t_mask.long(), position_ids=t_pos).logits
        lp = torch.log_softmax(logits[:, p_len - 1 : -1].float(), -1)
        lp = lp.gather(-1, t_seq[:, p_len:, None])[..., 0]
        ratio = torch.exp(lp - t_old)
        surr = torch.minimum(ratio * t_adv, ratio.clamp(0.8, 1.2) * t_adv)
        loss = -surr.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        return time.perf_counter() - t0

    # --- interleaved timing -----------------------------------------------------------------------
    lj_sample(args.seed + 100)  # compiles
    hf.eval()
    tf_generate(args.seed + 100)
    hf.train()
    lj_train()  # compiles
    tf_train()
    times: dict[str, list[float]] = {
        k: [] for k in ("lj_sample", "tf_generate", "lj_train", "tf_train")
    }
    for r in range(args.rounds):
        times["lj_sample"].append(lj_sample(args.seed + r))
        hf.eval()
        times["tf_generate"].append(tf_generate(args.seed + r))
        hf.train()
        times["lj_train"].append(lj_train())
        times["tf_train"].append(tf_train())
        emit(what="round", round=r, **{k: round(v[-1], 3) for k, v in times.items()})
    gen_tokens = args.batch * args.new_tokens
    train_tokens = rows * (p_len + r_len)
    best = {k: min(v) for k, v in times.items()}
    for k, v in best.items():
        n = gen_tokens if k in ("lj_sample", "tf_generate") else train_tokens
        emit(what=k, best_s=round(v, 3), tokens_per_s=round(n / v, 1), rounds=args.rounds)
    emit(
        what="summary",
        sampler_speed_ratio_laserjax_over_transformers=round(
            best["tf_generate"] / best["lj_sample"], 3
        ),
        train_step_speed_ratio_laserjax_over_torch=round(best["tf_train"] / best["lj_train"], 3),
        batch=args.batch,
        new_tokens=args.new_tokens,
        prompt_len=width,
        train_rows=rows,
        train_seq_len=p_len + r_len,
        uptime_end=uptime(),
    )


if __name__ == "__main__":
    main()
