"""laserjax's sampler vs transformers `generate` on CPU: the same tiny Qwen2 weights, side by side.

A small random Qwen2 model is saved with transformers (float32 safetensors) and loaded into both:
torch through `from_pretrained`, laserjax through `laserjax.model.hf_params.load_pretrained`.
Both sample the same batch of prompts at the same settings: temperature 1.0, top_p 1.0, full
vocabulary (transformers' default top_k = 50 is switched off with top_k = 0) and top-k 50,
exactly --new-tokens tokens per row (laserjax: no EOS id; transformers: min_new_tokens =
max_new_tokens). Each side gets one warm-up call (laserjax: the compiles), then --repeats timed
calls of which the fastest is reported: the 2-core CPU here is shared with other jobs.

One JSON line per measurement, then a summary line with the laserjax / transformers tokens/s
ratio per setting. The laserjax lines also carry the self-reward step's share of the rollout: a
real z_c decode step (every row marked "EOS emitted, z_c pending", one more pass through the
decode loop) timed apart and divided by the timed rollout's wall time; see bench/sampler_gpu.py.
A last laserjax line, `_k4`, samples K = 4 per prompt from one prefill (prompts / 4 of them) for
the same number of rows, the layout training rollouts use.

Usage: python bench/sampler_cpu.py [--batch 16 --prompt-len 64 --new-tokens 64]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from sampler_gpu import CompileCounter, emit, time_rollout  # noqa: E402

SHAPE = dict(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
)


def save_tiny_qwen2(out: pathlib.Path, seed: int) -> pathlib.Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        **SHAPE,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
        rope_theta=1_000_000.0,
        use_sliding_window=False,
    )
    Qwen2ForCausalLM(cfg).eval().save_pretrained(out)
    return out


def time_generate(model, ids, *, new_tokens: int, top_k: int, temperature: float) -> dict:
    import torch

    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            temperature=temperature,
            top_p=1.0,
            top_k=top_k,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=0,
        )
    secs = time.perf_counter() - t0
    gen = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return dict(seconds=secs, generated_tokens=gen, tokens_per_s=gen / secs)


def best(repeats: int, measure, *args, **kwargs) -> dict:
    """The fastest of `repeats` timed calls of measure(*args, **kwargs), with the count."""
    runs = [measure(*args, **kwargs) for _ in range(repeats)]
    return min(runs, key=lambda r: r["seconds"]) | dict(repeats=repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, nargs="+", default=[0, 50])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed calls per measurement; the fastest is reported (the CPU is shared)",
    )
    args = ap.parse_args()

    import jax
    import numpy as np
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from laserjax.model.hf_params import load_pretrained
    from laserjax.sampler import Sampler

    emit(
        what="env",
        jax=jax.__version__,
        torch=torch.__version__,
        transformers=transformers.__version__,
        device=str(jax.devices()[0].device_kind),
        torch_threads=torch.get_num_threads(),
        shape=SHAPE,
    )
    counter = CompileCounter()
    rng = np.random.default_rng(args.seed)
    prompts = rng.integers(1, SHAPE["vocab_size"], (args.batch, args.prompt_len))
    common = dict(
        batch=args.batch,
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        temperature=args.temperature,
    )
    speedup, zc_share = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        path = save_tiny_qwen2(pathlib.Path(tmp) / "tiny_qwen2", args.seed)
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        jx = load_pretrained(str(path), dtype="float32", param_dtype="float32")
    sampler = Sampler(
        jx,
        eos_ids=(),
        pad_id=0,
        self_reward_token_id=SHAPE["vocab_size"] - 1,
        max_new_tokens=args.new_tokens,
        prompt_buckets=(args.prompt_len,),
    )
    ids = torch.tensor(prompts, dtype=torch.long)
    for top_k in args.top_k:
        suffix = f"_topk{top_k}" if top_k else ""
        kw = dict(k=1, temperature=args.temperature, top_k=top_k, top_p=1.0)
        time_rollout(sampler, prompts.tolist(), seed=args.seed + 1, **kw)  # compiles
        lj = best(
            args.repeats,
            time_rollout,
            sampler,
            prompts.tolist(),
            seed=args.seed,
            counter=counter,
            **kw,
        )
        emit(what="laserjax_sampler" + suffix, top_k=top_k, **common, **lj)
        time_generate(
            hf, ids, new_tokens=args.new_tokens, top_k=top_k, temperature=args.temperature
        )  # warm-up
        tf = best(
            args.repeats,
            time_generate,
            hf,
            ids,
            new_tokens=args.new_tokens,
            top_k=top_k,
            temperature=args.temperature,
        )
        emit(what="transformers_generate" + suffix, top_k=top_k, **common, **tf)
        setting = f"top_k{top_k}" if top_k else "full_vocab"
        speedup[setting] = lj["tokens_per_s"] / tf["tokens_per_s"]
        zc_share[setting] = lj["self_reward_share"]

    k = 4
    if args.batch % k == 0:
        kw = dict(k=k, temperature=args.temperature, top_k=0, top_p=1.0)
        grouped = prompts[: args.batch // k].tolist()
        time_rollout(sampler, grouped, seed=args.seed + 1, **kw)
        lj = best(
            args.repeats, time_rollout, sampler, grouped, seed=args.seed, counter=counter, **kw
        )
        emit(what=f"laserjax_sampler_k{k}", top_k=0, k=k, prompts=len(grouped), **common, **lj)
    emit(
        what="summary",
        laserjax_over_transformers_tokens_per_s=speedup,
        self_reward_share=zc_share,
        **common,
    )


if __name__ == "__main__":
    main()
