"""Decode throughput of laserjax's rollout sampler at Qwen2.5-0.5B / 1.5B shapes, bf16.

The settings of ../shared/bench/tunix_sampler_bench.py (the Tunix peer) so the two print
comparable lines in one device run: batch 64 (64 prompts x K = 1), prompt 256 tokens (no
padding), exactly 512 new tokens (no EOS id: nothing can stop a row early), temperature 1.0,
full vocabulary and top-k 50. Per measurement: one warm-up call (compiles prefill and the decode
loop), then one timed call with the same shapes (`compiles_in_timed_call` checks that the jit
caches were hit). tokens_per_s = generated tokens / wall seconds of the whole timed rollout
(prefill, every decode step, the copy of the results to the host), as the peers count it.

Other figures per line:
  * decode_ms_per_step: decode seconds / decode steps. laserjax draws token 0 from the prefill,
    so N new tokens take N - 1 decode steps (Tunix: N, transformers: N - 1).
  * roofline_tokens_per_s: rows / (bytes one decode step must read / HBM bandwidth), the bytes
    being every weight once plus the keys/values of the average context (prompt + N/2) of every
    row; roofline_fraction = tokens_per_s / that. `--hbm-tb-s` sets the bandwidth (default 4.3,
    an H200; 3.35 for an H100). impl_kv_bytes_per_step is what this implementation's attention
    reads per step on average: the prefix once, and each row's suffix up to the end of the
    static window the step runs in (`Sampler.windows_for`), each key/value with the cache's
    `cache_width` components (head_dim + 1 with `kv_layout` augmented: the Pallas kernel's).
  * self_reward_step_s / self_reward_share: a real z_c step (LASER_SPEC section 5) timed apart:
    the final state with every row marked "emitted EOS, z_c not read yet" goes through the decode
    loop once more, which runs exactly one step (the z_c read over the full cache); its share is
    that time over the timed rollout's. In training this step runs at most once per rollout.
  * --transformers: Hugging Face `generate` at the same settings (do_sample, min_new_tokens =
    max_new_tokens so no row stops; top_k 0 = full vocabulary, as transformers' default is 50).

It never imports grain (the GPU image lacks it): only laserjax.model, laserjax.sampler,
laserjax.sharding and laserjax.config, which need jax, flax, numpy and pyyaml.

Usage (GPU):       python3 bench/sampler_gpu.py [0.5b] [1.5b] [--top-k 0 50] [--transformers]
                       [--peer-jsonl tunix.jsonl]    (adds `ratio` lines: laserjax / peer)
                   python3 bench/sampler_gpu.py --ratios-only laserjax.jsonl tunix.jsonl
                       (the ratio lines of two runs made apart in the same device session)
Usage (CPU smoke): python3 bench/sampler_gpu.py --tiny [--transformers]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pathlib
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
Z_C = 151652  # Qwen2.5 `<|vision_start|>`; clipped into tiny vocabularies.


RESULTS: list[dict] = []


def emit(**kw) -> None:
    RESULTS.append(kw)
    print(json.dumps(kw), flush=True)


def summarize(peer_files: list[str]) -> None:
    """Ratio lines: each laserjax measurement over the peer lines with the same model/top-k
    (laserjax's variants, one window, the Pallas decode kernel or a kv_layout, over the same
    peer line)."""
    lines = list(RESULTS)
    for f in peer_files:
        for raw in pathlib.Path(f).read_text().splitlines():
            if raw.strip().startswith("{"):
                lines.append(json.loads(raw))
    ours = {r["what"]: r for r in lines if r["what"].startswith("laserjax_sampler_")}
    for what, r in ours.items():
        tail = what[len("laserjax_sampler_") :]
        for variant in ("_one_window", "_pallas", "_augmented", "_plain"):
            tail = tail.replace(variant, "")
        for peer in ("tunix_sampler_", "transformers_generate_"):
            p = next((x for x in lines if x["what"] == peer + tail), None)
            if p is not None:
                emit(
                    what="ratio",
                    ours=what,
                    peer=p["what"],
                    ours_tokens_per_s=r["tokens_per_s"],
                    peer_tokens_per_s=p["tokens_per_s"],
                    speedup=r["tokens_per_s"] / p["tokens_per_s"],
                )


class CompileCounter:
    """Counts XLA backend compilations (jax.monitoring) between start() and stop()."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        import jax

        self.n, self.active = 0, False
        jax.monitoring.register_event_duration_secs_listener(self._on)

    def _on(self, event, duration, **kwargs):
        if self.active and event == self.EVENT:
            self.n += 1

    def start(self):
        self.n, self.active = 0, True

    def stop(self) -> int:
        self.active = False
        return self.n


def qwen_config(shape: dict, dtype: str = "bfloat16"):
    from laserjax.model import TransformerConfig

    return TransformerConfig(
        model_type="qwen2",
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        qkv_bias=True,
        dtype=dtype,
        param_dtype=dtype,
        **shape,
    )


def random_model(cfg, seed: int = 0, std: float = 0.02):
    """A Transformer with N(0, std) weights and biases, unit norms, built without a host copy.

    The constructor is traced abstractly (nnx.eval_shape) and each parameter drawn by one jitted
    call per distinct shape, so building a 1.5B model takes seconds.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from laserjax.model import Transformer
    from laserjax.model.transformer import to_dtype

    dt = to_dtype(cfg.param_dtype)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    draw = jax.jit(
        lambda k, shape: (std * jax.random.normal(k, shape)).astype(dt), static_argnums=1
    )
    key = jax.random.key(seed)
    counter = iter(range(1 << 30))

    def one(path, leaf):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            return jnp.ones(leaf.shape, dt)
        return draw(jax.random.fold_in(key, next(counter)), tuple(leaf.shape))

    state = jax.tree_util.tree_map_with_path(one, abstract)
    jax.block_until_ready(state)
    return nnx.merge(graphdef, state)


def roofline(
    cfg,
    params_bytes: int,
    prompts: int,
    k: int,
    prompt_len: int,
    new_tokens: int,
    hbm_bytes_per_s: float,
    windows: tuple[int, ...],
) -> dict:
    """The memory-bound lower bound of one decode step (module docstring)."""
    kv_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2  # K and V, bf16
    rows = prompts * k
    avg_ctx_kv = (prompts * prompt_len + rows * new_tokens / 2) * kv_token  # prefix read once
    kv_aug = kv_token * cfg.cache_width / cfg.head_dim  # the cache's own width (`kv_layout`)
    # Decode step s (s = 1 .. new_tokens - 1) runs in the first window W with s < W.
    steps = range(1, max(new_tokens, 2))
    mean_window = sum(next(w for w in windows if s < w) for s in steps) / len(steps)
    impl_kv = (prompts * prompt_len + rows * mean_window) * kv_aug
    step_s = (params_bytes + avg_ctx_kv) / hbm_bytes_per_s
    return dict(
        params_bytes=params_bytes,
        kv_bytes_per_step=int(avg_ctx_kv),
        impl_kv_bytes_per_step=int(impl_kv),
        decode_windows=list(windows),
        roofline_ms_per_step=1e3 * step_s,
        roofline_tokens_per_s=rows / step_s,
    )


def time_rollout(
    sampler,
    prompts,
    *,
    k: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int,
    counter: CompileCounter | None = None,
) -> dict:
    """One laserjax rollout timed in parts: prefill, decode loop, copy to host; plus one z_c step.

    Mirrors `Sampler.sample` with a block between prefill and decode (one extra sync).
    """
    import jax
    import jax.numpy as jnp

    s = sampler.settings(k=k, temperature=temperature, top_p=top_p, top_k=top_k)
    if counter is not None:
        counter.start()
    t0 = time.perf_counter()
    prefix, state, _, _ = sampler.start(prompts, s, seed)
    jax.block_until_ready(state)
    t1 = time.perf_counter()
    state = sampler.decode(prefix, state, s)
    jax.block_until_ready(state)
    t2 = time.perf_counter()
    host = jax.device_get((state.tokens_bkt, state.lengths_bk, state.step, state.finished_bk))
    t3 = time.perf_counter()
    compiles = counter.stop() if counter is not None else None

    # The self-reward step alone: every row "emitted EOS, z_c pending" at the last suffix slot.
    extra = state.replace(
        finished_bk=jnp.ones_like(state.finished_bk),
        complete_bk=jnp.zeros_like(state.complete_bk),
        step=jnp.int32(s.max_new_tokens - 1),
    )
    jax.block_until_ready(extra)
    t4 = time.perf_counter()
    extra = sampler.decode(prefix, extra, s)
    jax.block_until_ready(extra)
    t5 = time.perf_counter()
    tokens, lengths, steps, finished = host
    n_prompts = len(prompts)
    gen = int(lengths[:n_prompts].sum())
    return dict(
        seconds=t3 - t0,
        prefill_s=t1 - t0,
        decode_s=t2 - t1,
        to_host_s=t3 - t2,
        decode_steps=int(steps),
        generated_tokens=gen,
        min_len=int(lengths[:n_prompts].min()),
        max_len=int(lengths[:n_prompts].max()),
        any_finished=bool(finished[:n_prompts].any()),
        tokens_per_s=gen / (t3 - t0),
        decode_ms_per_step=1e3 * (t2 - t1) / max(int(steps), 1),
        self_reward_step_s=t5 - t4,
        self_reward_steps=int(extra.step) - int(steps),
        self_reward_share=(t5 - t4) / (t3 - t0),
        distinct_tokens_row0=len(set(tokens[0, 0].tolist())),
        compiles_in_call=compiles,
    )


def with_decode_impl(model, impl: str, layout: str = "auto"):
    """The same parameters under `TransformerConfig.decode_impl` = impl and `kv_layout` =
    layout (the graph only is new)."""
    import dataclasses

    from flax import nnx

    from laserjax.model import Transformer

    # `auto` resolves anew for this decode_impl (the Pallas kernel reads augmented caches)
    cfg = dataclasses.replace(model.cfg, decode_impl=impl, kv_layout=layout)
    if cfg == model.cfg:
        return model
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, nnx.state(model))


def bench_laserjax(args, name: str, shape: dict, counter: CompileCounter) -> None:
    import jax
    import numpy as np
    from flax import nnx

    from laserjax.sampler import Sampler

    cfg = qwen_config(shape)
    t = time.perf_counter()
    model = random_model(cfg, seed=args.seed)
    build_s = time.perf_counter() - t
    zc = min(Z_C, cfg.vocab_size - 1)
    params_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model)))
    for k in args.k:
        if args.batch % k:
            raise SystemExit(f"--batch {args.batch} is not a multiple of --k {k}")
        n = args.batch // k
        rng = np.random.default_rng(args.seed)
        lo, hi = (100, 50000) if cfg.vocab_size > 50000 else (1, cfg.vocab_size)
        prompts = rng.integers(lo, hi, size=(n, args.prompt_len)).tolist()
        for impl, layout, windows, top_k in itertools.product(
            args.decode_impl, args.kv_layout, args.windows, args.top_k
        ):
            sampler = Sampler(
                with_decode_impl(model, impl, layout),
                eos_ids=(),
                pad_id=0,
                self_reward_token_id=zc,
                max_new_tokens=args.new_tokens,
                prompt_buckets=(args.prompt_len,),
                decode_windows=(args.new_tokens,) if windows == "one" else (),
            )
            kw = dict(k=k, temperature=args.temperature, top_k=top_k, top_p=args.top_p)
            counter.start()
            t = time.perf_counter()
            time_rollout(sampler, prompts, seed=args.seed + 100, **kw)
            warm_s, warm_compiles = time.perf_counter() - t, counter.stop()
            r = time_rollout(sampler, prompts, seed=args.seed, counter=counter, **kw)
            roof = roofline(
                cfg,
                params_bytes,
                n,
                k,
                args.prompt_len,
                args.new_tokens,
                args.hbm_tb_s * 1e12,
                sampler.windows_for(n, args.prompt_len, k),
            )
            what = (
                f"laserjax_sampler_{name}"
                + (f"_topk{top_k}" if top_k else "")
                + (f"_k{k}" if k > 1 else "")
                + ("_one_window" if windows == "one" else "")
                + ("" if impl == "xla" else f"_{impl}")
                + ("" if layout == "auto" else f"_{layout}")
            )
            emit(
                what=what,
                decode_impl=impl,
                kv_layout=sampler.cfg.kv_layout,
                windows=list(sampler.windows_for(n, args.prompt_len, k)),
                batch=args.batch,
                prompts=n,
                k=k,
                prompt_len=args.prompt_len,
                new_tokens=args.new_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                top_k=top_k,
                **{kk: v for kk, v in r.items() if kk != "compiles_in_call"},
                compiles_in_timed_call=r["compiles_in_call"],
                warmup_s=warm_s,
                warmup_compiles=warm_compiles,
                build_s=build_s,
                **roof,
                roofline_fraction=r["tokens_per_s"] / roof["roofline_tokens_per_s"],
                hbm_tb_s=args.hbm_tb_s,
                peak_gb=peak_gb(),
                device=device_kind(),
                jax=jax.__version__,
            )
            if args.profile:
                profile_decode(sampler, prompts, what, seed=args.seed, **kw)


def profile_decode(sampler, prompts, what: str, *, k, temperature, top_k, top_p, seed) -> None:
    """One more rollout's decode loop under the profiler: its kernels per decode step
    (`kernel_table`), one line each, then a summary line."""
    import jax
    from kernel_table import kernel_table

    s = sampler.settings(k=k, temperature=temperature, top_p=top_p, top_k=top_k)
    prefix, state, _, _ = sampler.start(prompts, s, seed)
    jax.block_until_ready(state)
    steps = s.max_new_tokens - 1
    rows, summary = kernel_table(
        lambda: jax.block_until_ready(sampler.decode(prefix, state, s)), per=steps
    )
    for row in rows:
        emit(what=f"kernels_{what}", per="decode step", **row)
    emit(what=f"kernels_{what}_summary", per="decode step", decode_steps=steps, **summary)


def bench_transformers(args, name: str, shape: dict) -> None:
    """transformers `generate` with random bf16 weights at the same settings."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    hf_cfg = Qwen2Config(
        vocab_size=shape["vocab_size"],
        hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["num_layers"],
        num_attention_heads=shape["num_heads"],
        num_key_value_heads=shape["num_kv_heads"],
        head_dim=shape["head_dim"],
        tie_word_embeddings=True,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=32768,
        use_sliding_window=False,
    )
    torch.manual_seed(args.seed)
    t = time.perf_counter()
    with torch.device(dev):
        model = Qwen2ForCausalLM(hf_cfg).to(torch.bfloat16).eval()
    build_s = time.perf_counter() - t
    n_new = args.transformers_new_tokens or args.new_tokens
    g = torch.Generator().manual_seed(args.seed)
    lo, hi = (100, 50000) if shape["vocab_size"] > 50000 else (1, shape["vocab_size"])
    ids = torch.randint(lo, hi, (args.batch, args.prompt_len), generator=g).to(dev)

    def call(top_k):
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                temperature=args.temperature,
                top_p=args.top_p,
                top_k=top_k,
                max_new_tokens=n_new,
                min_new_tokens=n_new,
                pad_token_id=0,
            )
        if dev == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    for top_k in args.top_k:
        _, warm_s = call(top_k)
        out, secs = call(top_k)
        gen = (out.shape[1] - args.prompt_len) * args.batch
        emit(
            what=f"transformers_generate_{name}" + (f"_topk{top_k}" if top_k else ""),
            batch=args.batch,
            prompt_len=args.prompt_len,
            new_tokens=n_new,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=top_k,
            seconds=secs,
            generated_tokens=gen,
            tokens_per_s=gen / secs,
            decode_ms_per_step=1e3 * secs / n_new,
            warmup_s=warm_s,
            build_s=build_s,
            device=torch.cuda.get_device_name() if dev == "cuda" else "cpu",
            transformers=__import__("transformers").__version__,
            torch=torch.__version__,
        )


def device_kind() -> str:
    import jax

    return str(jax.devices()[0].device_kind)


def peak_gb() -> float | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else round(peak / 1e9, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="*", default=[], help="0.5b (default) and/or 1.5b")
    ap.add_argument(
        "--tiny",
        action="store_true",
        help="tiny shape and sizes for a CPU smoke run (implies --allow-cpu)",
    )
    ap.add_argument("--batch", type=int, default=None, help="rows = prompts x k (default 64)")
    ap.add_argument("--prompt-len", type=int, default=None, help="default 256")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 512")
    ap.add_argument(
        "--k",
        type=int,
        nargs="+",
        default=[1],
        help="samples per prompt; 8 also shows the shared-prefill layout",
    )
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument(
        "--top-k",
        type=int,
        nargs="+",
        default=[0, 50],
        help="0 = full vocabulary; one measurement per value",
    )
    ap.add_argument(
        "--windows",
        nargs="+",
        choices=["auto", "one"],
        default=["auto"],
        help="auto: the sampler's decode windows (suffix segments); one: a single window of "
        "max_new_tokens (every step reads the whole suffix cache, fewer kernels)",
    )
    ap.add_argument(
        "--decode-impl",
        nargs="+",
        choices=["xla", "pallas"],
        default=["xla"],
        help="TransformerConfig.decode_impl; one measurement per value (pallas: the Triton "
        "decode-attention kernel, laserjax/model/decode_kernel.py)",
    )
    ap.add_argument(
        "--kv-layout",
        nargs="+",
        choices=["auto", "augmented", "plain"],
        default=["auto"],
        help="TransformerConfig.kv_layout; one measurement per value (auto: augmented on a GPU, "
        "plain on a TPU)",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="after each measurement, profile one more decode loop: kernels per step",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--hbm-tb-s",
        type=float,
        default=4.3,
        help="HBM bandwidth for the roofline (H200 4.3, H100 SXM 3.35)",
    )
    ap.add_argument(
        "--transformers",
        action="store_true",
        help="also time transformers generate at the same settings",
    )
    ap.add_argument(
        "--transformers-new-tokens",
        type=int,
        default=0,
        help="fewer new tokens for generate (it is ~50x slower); 0 = same",
    )
    ap.add_argument(
        "--peer-jsonl",
        nargs="*",
        default=[],
        help="JSON lines of tunix_sampler_bench.py (same run) for ratio lines",
    )
    ap.add_argument(
        "--ratios-only",
        nargs="+",
        default=None,
        metavar="JSONL",
        help="measure nothing: print the ratio lines of laserjax lines over peer lines read "
        "from these files (laserjax's own output first)",
    )
    ap.add_argument("--allow-cpu", action="store_true")
    args = ap.parse_args()
    if args.ratios_only:
        summarize(args.ratios_only)
        return
    tiny = args.tiny
    args.batch = args.batch or (4 if tiny else 64)
    args.prompt_len = args.prompt_len or (16 if tiny else 256)
    args.new_tokens = args.new_tokens or (8 if tiny else 512)
    names = ["tiny"] if tiny else (args.models or ["0.5b"])
    bad = [m for m in names if m not in PRESETS]
    if bad:
        ap.error(f"unknown model(s) {bad}; choose from 0.5b, 1.5b")

    if args.transformers:  # torch shares the GPU: JAX must not take 75% of it up front
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    emit(
        what="env",
        jax=jax.__version__,
        flax=__import__("flax").__version__,
        devices=[str(d) for d in jax.devices()],
        device_kind=device_kind(),
        python=sys.version.split()[0],
    )
    if jax.default_backend() == "cpu" and not (args.allow_cpu or tiny):
        raise SystemExit("JAX sees no GPU (backend cpu); pass --tiny or --allow-cpu")
    counter = CompileCounter()
    for name in names:
        bench_laserjax(args, name, PRESETS[name], counter)
        if args.transformers:
            bench_transformers(args, name, PRESETS[name])
    summarize(args.peer_jsonl)


if __name__ == "__main__":
    main()
