"""Train-step throughput at Qwen2.5-0.5B / 1.5B shapes, bf16: laserjax beside PyTorch.

For the device machine (one GPU). Each measurement runs in its own subprocess (so JAX's and
PyTorch's allocators never share the card) and prints one JSON line; the parent prints a summary
line per model with laserjax / PyTorch tokens per second.

- laserjax: `make_train_step` on a one-device mesh: the full LaSeR step (MSE and advantage
  integration on), one forward over `prompt, response, z_c`, clip_by_global_norm -> AdamW,
  params and moments donated. The LM head runs in one piece by default (`--logit-chunk 1024`,
  logits kept for the backward pass, as PyTorch keeps them); a smaller chunk trades a recompute
  of the head for memory. bf16 params and activations (`--param-dtype float32` for
  float32 master weights), float32 loss math.
- PyTorch: transformers' `Qwen2ForCausalLM` in bf16 (sdpa attention), the same 8 x 1024 tokens:
  forward, token log-probs from log_softmax(float32 logits), a masked mean as the loss, backward,
  clip_grad_norm_(1.0), `torch.optim.AdamW` step (foreach; `--torch-fused` for fused), zero_grad.
  A plain policy-gradient step: the part of a GRPO/verl actor update that costs.

Batch: 8 rows x (prompt 256 + response 768) = 8192 tokens per step, every row finished with EOS
in the last slot (log p(z_c) read at that position; `--zc-column` also writes z_c into a 1025th
column, as the spec's sequence has it, causally invisible and not counted).
Timing: `--warmup` steps (the first compiles), then `--steps` timed steps, each synchronised;
tokens_per_s = 8192 / median step seconds. On an H200, the PyTorch step was measured earlier at
80.9k tokens/s (0.5B) and 38.2k (1.5B); the issue's target is laserjax >= 1.2x PyTorch.

It never imports grain (the GPU image lacks it): only laserjax.train_step and what it imports
(laserjax.laser, .sampler, .sharding, .config, .model), which need jax, flax, optax, numpy and
pyyaml.

Usage (GPU):       python3 bench/train_step_gpu.py [0.5b] [1.5b] [--grpo] [--remat]
  e.g. one device call: PYTHONUNBUFFERED=1 python3 bench/train_step_gpu.py 0.5b 1.5b --grpo
Usage (CPU smoke): python3 bench/train_step_gpu.py --tiny   (proves both paths run; bf16 on a
                   CPU makes its timings meaningless)
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from laserjax import presets  # noqa: E402  (plain data: no jax before main sets its flags)

PRESETS = {
    # Qwen2.5-0.5B / 1.5B shapes from the one preset table (tied embeddings, q/k/v biases).
    "0.5b": presets.shape("Qwen2.5-0.5B"),
    "1.5b": presets.shape("Qwen2.5-1.5B"),
    # CPU smoke shape: proves the script runs end to end in seconds.
    "tiny": dict(
        num_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        vocab_size=1000,
    ),
}
Z_C = 151652  # Qwen2.5 `<|vision_start|>`; taken modulo tiny vocabularies.
EOS = 151643  # Qwen2.5 `<|endoftext|>`; likewise.


def emit(**kw) -> None:
    print(json.dumps(kw), flush=True)


def matmul_flops_per_token(shape: dict, seq: int) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward): the weight matmuls, the LM
    head, and the attention scores/values over the whole (unmasked) sequence."""
    d, f, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_layers"]
    q = shape["num_heads"] * shape["head_dim"]
    kv = shape["num_kv_heads"] * shape["head_dim"]
    per_layer = 2 * (d * q + 2 * d * kv + q * d + 3 * d * f) + 2 * 2 * seq * q
    return 3 * (layers * per_layer + 2 * d * shape["vocab_size"])


# ---------------------------------------------------------------------------------------------
# Workers (one per subprocess).


def worker_laserjax(args, shape: dict) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    sys.path.insert(0, str(ROOT))
    from laserjax import sharding
    from laserjax import train_step as ts
    from laserjax.config import LaserConfig, MeshConfig, OptimConfig, PolicyLossConfig
    from laserjax.model.transformer import Transformer, TransformerConfig

    vocab = shape["vocab_size"]
    block = {"attention_block": args.attention_block} if args.attention_block else {}
    block["attention_impl"] = args.attention_impl[0]
    cfg = TransformerConfig(
        model_type="qwen2",
        **shape,
        rope_theta=1e6,
        tie_word_embeddings=True,
        qkv_bias=True,
        dtype="bfloat16",
        param_dtype=args.param_dtype,
        remat=args.remat,
        **block,
    )
    rows, p, t = args.rows, args.prompt_len, args.response_len
    rng = np.random.default_rng(0)
    response = rng.integers(0, vocab, (rows, t))
    response[:, -1] = EOS % vocab
    batch = ts.TrainBatch(
        prompt_tokens=jnp.asarray(rng.integers(0, vocab, (rows, p)), jnp.int32),
        prompt_mask=jnp.ones((rows, p), bool),
        response_tokens=jnp.asarray(response, jnp.int32),
        response_mask=jnp.ones((rows, t), bool),
        old_logprobs=jnp.asarray(-rng.uniform(10, 12, (rows, t)), jnp.float32),
        finished=jnp.ones((rows,), bool),
        rewards=jnp.asarray(np.arange(rows) % 2, jnp.float32),  # mixed groups: A_v != 0
        rollout_logp_zc=jnp.asarray(rng.uniform(-23, -10, rows), jnp.float32),
    )
    if args.variant == "grpo":
        laser_cfg = LaserConfig(algorithm="grpo")
    else:
        laser_cfg = LaserConfig(reasoning_warmup_steps=0, self_reward_warmup_steps=0)
    settings = ts.StepSettings(
        group_size=args.group_size,
        self_reward_token_id=Z_C % vocab,
        logit_chunk=args.logit_chunk,
        micro_batch_size=args.micro_batch,
        append_zc=args.zc_column,
    )
    optim = OptimConfig(learning_rate=1e-6)
    mesh = sharding.make_mesh(MeshConfig(data=1), jax.devices()[:1])
    t0 = time.perf_counter()
    graphdef, state = ts.init_train_state(Transformer(cfg, rngs=nnx.Rngs(0)), optim, mesh)
    step = ts.make_train_step(
        graphdef,
        ts.train_state_sharding(state, mesh),
        laser_cfg,
        PolicyLossConfig(),
        optim,
        settings,
        mesh,
    )
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    times = []
    for _ in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    timed = times[args.warmup :]
    stats = jax.devices()[0].memory_stats() or {}
    if args.profile:
        from kernel_table import kernel_table

        box = [state]

        def one_step() -> None:
            box[0], m = step(box[0], batch)
            jax.block_until_ready((box[0], m))

        rows_k, summary = kernel_table(one_step, per=1)
        what = f"kernels_train_step_{args.model}_{cfg.attention_impl}"
        for row in rows_k:
            emit(what=what, per="train step", **row)
        emit(what=f"{what}_summary", per="train step", **summary)
    report(
        args,
        "laserjax" if args.variant == "laser" else "laserjax_grpo",
        shape,
        timed,
        n_params=n_params,
        init_s=round(init_s, 2),
        first_step_s=round(times[0], 2),
        peak_gb=round(stats.get("peak_bytes_in_use", 0) / 2**30, 2),
        grad_norm=float(metrics["actor/grad_norm"]),
        device=str(jax.devices()[0].device_kind),
        remat=args.remat,
        param_dtype=args.param_dtype,
        logit_chunk=args.logit_chunk,
        attention_block=cfg.attention_block,
        attention_impl=cfg.attention_impl,
        append_zc=args.zc_column,
    )


def worker_torch(args, shape: dict) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=shape["vocab_size"],
        hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["num_layers"],
        num_attention_heads=shape["num_heads"],
        num_key_value_heads=shape["num_kv_heads"],
        head_dim=shape["head_dim"],
        tie_word_embeddings=True,
        rope_theta=1e6,
        use_sliding_window=False,
        max_position_embeddings=32768,
    )
    model = Qwen2ForCausalLM(cfg).to(device=device, dtype=torch.bfloat16).train()
    opt = torch.optim.AdamW(
        model.parameters(), lr=1e-6, weight_decay=0.01, fused=args.torch_fused or None
    )
    rows, seq = args.rows, args.prompt_len + args.response_len
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape["vocab_size"], (rows, seq), generator=gen).to(device)
    mask = torch.zeros(rows, seq - 1, device=device)
    mask[:, args.prompt_len - 1 :] = 1.0  # the response tokens, as the policy loss reads them

    def one_step() -> None:
        logits = model(input_ids=ids).logits[:, :-1]
        logp = torch.log_softmax(logits.float(), dim=-1)
        logp = logp.gather(-1, ids[:, 1:, None])[..., 0]
        loss = -(logp * mask).sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    for _ in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        one_step()
        sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
    report(
        args,
        "pytorch",
        shape,
        times[args.warmup :],
        n_params=sum(p.numel() for p in model.parameters()),
        peak_gb=round(peak, 2),
        device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
        torch=torch.__version__,
        fused_adamw=bool(args.torch_fused),
    )


def report(args, impl: str, shape: dict, timed: list[float], **extra) -> None:
    med = statistics.median(timed)
    tokens = args.rows * (args.prompt_len + args.response_len)
    flops = matmul_flops_per_token(shape, args.prompt_len + args.response_len) * tokens
    emit(
        impl=impl,
        model=args.model,
        tokens=tokens,
        median_step_s=round(med, 4),
        min_step_s=round(min(timed), 4),
        tokens_per_s=round(tokens / med),
        approx_tflops=round(flops / med / 1e12, 1),
        steps=len(timed),
        **extra,
    )


# ---------------------------------------------------------------------------------------------
# Parent: one subprocess per (model, implementation).


def run_worker(argv: list[str], env: dict, timeout: float) -> dict | None:
    try:
        proc = subprocess.run(
            [sys.executable, __file__, *argv],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as err:
        emit(error=f"worker {argv} ran past {timeout:.0f} s", stderr_tail=str(err.stderr)[-3000:])
        return None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        emit(
            error=f"worker {argv} failed with exit code {proc.returncode}",
            stderr_tail=proc.stderr[-3000:],
        )
        return None
    print("\n".join(lines), flush=True)
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="*", default=[], help="0.5b (default) and/or 1.5b")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run at a tiny shape")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=None, help="default 256 (tiny: 16)")
    ap.add_argument("--response-len", type=int, default=None, help="default 768 (tiny: 48)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 5, tiny 2)")
    ap.add_argument(
        "--logit-chunk",
        type=int,
        default=1024,
        help="LM-head chunk; >= response length (default) keeps the logits, as "
        "PyTorch does; e.g. 256 recomputes them chunk by chunk to save memory",
    )
    ap.add_argument("--micro-batch", type=int, default=0)
    ap.add_argument("--param-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--remat", action="store_true", help="rematerialise transformer blocks")
    ap.add_argument(
        "--attention-block",
        type=int,
        default=0,
        help="queries per attention block (0: the model's default; >= sequence "
        "length: dense attention)",
    )
    ap.add_argument(
        "--attention-impl",
        nargs="+",
        choices=["blocked", "xla", "cudnn"],
        default=["blocked"],
        help="TransformerConfig.attention_impl; one laserjax measurement per value (cudnn: "
        "jax.nn.dot_product_attention's cuDNN flash attention)",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="after timing, profile one more laserjax step: its kernels (bench/kernel_table.py)",
    )
    ap.add_argument(
        "--zc-column",
        action="store_true",
        help="write z_c into the sequence as the spec does (L = 1025, not 1024; the library "
        "default leaves the causally invisible column out)",
    )
    ap.add_argument(
        "--grpo",
        action="store_true",
        help="also time laserjax's GRPO step (no z_c): the z_c cost on the GPU",
    )
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument(
        "--worker-timeout",
        type=float,
        default=300,
        help="seconds before a measurement is abandoned (device time is scarce)",
    )
    ap.add_argument("--torch-fused", action="store_true")
    ap.add_argument("--worker", choices=["laserjax", "torch"], help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="laser", choices=["laser", "grpo"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args()

    tiny = args.tiny or args.model == "tiny"
    args.prompt_len = args.prompt_len or (16 if tiny else 256)
    args.response_len = args.response_len or (48 if tiny else 768)
    args.steps = args.steps or (2 if tiny else 5)

    if args.worker:
        shape = PRESETS[args.model]
        (worker_laserjax if args.worker == "laserjax" else worker_torch)(args, shape)
        return

    models = ["tiny"] if args.tiny else (args.models or ["0.5b"])
    env = dict(os.environ)
    if args.tiny:
        env.setdefault("JAX_PLATFORMS", "cpu")
    common = [
        "--rows",
        str(args.rows),
        "--group-size",
        str(args.group_size),
        "--prompt-len",
        str(args.prompt_len),
        "--response-len",
        str(args.response_len),
        "--warmup",
        str(args.warmup),
        "--steps",
        str(args.steps),
        "--logit-chunk",
        str(args.logit_chunk),
        "--micro-batch",
        str(args.micro_batch),
        "--param-dtype",
        args.param_dtype,
        "--attention-block",
        str(args.attention_block),
    ]
    common += ["--zc-column"] if args.zc_column else []
    common += ["--profile"] if args.profile else []
    common += ["--remat"] if args.remat else []
    common += ["--torch-fused"] if args.torch_fused else []
    for name in models:
        if name not in PRESETS:
            raise SystemExit(f"unknown model {name!r}; use 0.5b or 1.5b (or --tiny)")
        base = ["--model", name, *common]
        jxs = {
            impl: run_worker(
                ["--worker", "laserjax", *base, "--attention-impl", impl], env, args.worker_timeout
            )
            for impl in args.attention_impl
        }
        impl0 = args.attention_impl[0]
        jx = jxs[impl0]
        if args.grpo:
            gr = run_worker(
                ["--worker", "laserjax", "--variant", "grpo", *base, "--attention-impl", impl0],
                env,
                args.worker_timeout,
            )
            if jx and gr:
                emit(
                    summary=name, zc_cost_ratio=round(jx["median_step_s"] / gr["median_step_s"], 4)
                )
        pt = (
            None
            if args.no_torch
            else run_worker(["--worker", "torch", *base], env, args.worker_timeout)
        )
        for impl, jx in jxs.items():
            if jx and pt:
                emit(
                    summary=name,
                    attention_impl=impl,
                    laserjax_tokens_per_s=jx["tokens_per_s"],
                    pytorch_tokens_per_s=pt["tokens_per_s"],
                    laserjax_over_pytorch=round(jx["tokens_per_s"] / pt["tokens_per_s"], 3),
                )


if __name__ == "__main__":
    main()
