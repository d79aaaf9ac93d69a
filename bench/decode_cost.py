"""Decode-step memory traffic against the minimum, from XLA's cost analysis (compile only).

The sampler's decode loop runs one `while_loop` per attention window (`window_schedule`); this
compiles one decode step per window (Qwen2.5-0.5B shape by default, abstract parameters, the
state donated as in the loop) and reads XLA's `bytes accessed`. The minimum a step at suffix
position s must read: every parameter once, the prompts' keys/values (once per prompt, shared by
its K samples) and positions 0..s of every row's generated keys/values. Printed per window: the
ratio at its first step (the worst one it serves), and over a whole generation the worst ratio
and the step-weighted average. Also counts copy / transpose instructions of at least a layer's
slice of the cache in the compiled step (there should be none: the cache is updated in place and
read where it lies).

    python bench/decode_cost.py                 # float32, batch 64, prompt 256, 512 and 4096 new
    python bench/decode_cost.py --new-tokens 64 --model small
    python bench/decode_cost.py --new-tokens 512 --breakdown   # each window's bytes by jax op
    JAX_PLATFORMS=cpu PYTHONPATH=/tmp/tpulib python bench/decode_cost.py --slice v5e-8 \
        --dtype bfloat16                        # XLA's TPU compiler (libtpu, nothing runs)
    JAX_PLATFORMS=cpu PYTHONPATH=/tmp/cudalib python bench/decode_cost.py --gpu h200 \
        --dtype bfloat16 --new-tokens 512 --slots 64   # XLA's GPU compiler, the slot loop

Use float32 (the default): XLA:CPU converts bf16 weights and caches to f32 every step, which an
accelerator does not do, so a bf16 compile on CPU measures the conversion, not the design.
`--slice` compiles for the first chip of a TPU slice instead (`plan.compile_only_devices`, the
caches in the TPU's layout, `kv_layout_for("tpu")`): what the fusing compiler of the platform the
library is built for makes of the same decode. There it compiles the whole decode loop (its
schedule differs from a lone step's) and counts one iteration of each window's loop body in device
memory (`bytes_by_op(..., hbm_only=True)`): XLA's own `bytes accessed` on a TPU also counts the
moves into on-chip memory and every on-chip operand. An estimate read off the compiled program,
not a measurement on a TPU. `--gpu h200` compiles for a GPU the same way, with no GPU here
(`gpu_device`), and also counts each loop body's kernels. `--slots N`: continuous batching's slot
loop (`slot_loop_cost`) instead of the static batch's decode loop.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from laserjax import continuous as cont
from laserjax import plan
from laserjax import sampler as sm
from laserjax.model import Transformer, TransformerConfig
from laserjax.model.transformer import kv_layout_for

PRESETS = {
    "0.5b": dict(
        num_layers=24,
        hidden_size=896,
        intermediate_size=4864,
        num_heads=14,
        num_kv_heads=2,
        head_dim=64,
        vocab_size=151936,
    ),
    "small": dict(
        num_layers=4,
        hidden_size=256,
        intermediate_size=1024,
        num_heads=4,
        num_kv_heads=2,
        head_dim=64,
        vocab_size=8192,
    ),
}


def qwen2_config(shape: dict, dtype: str, **kw) -> TransformerConfig:
    """A Qwen2 model (rope theta 1e6, tied embeddings, q/k/v biases) of `shape` (`PRESETS`) in
    `dtype`, weights and compute; `kw`: more `TransformerConfig` fields."""
    return TransformerConfig(
        model_type="qwen2",
        rope_theta=1e6,
        tie_word_embeddings=True,
        qkv_bias=True,
        dtype=dtype,
        param_dtype=dtype,
        **shape,
        **kw,
    )


_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1}


def settings(cfg: TransformerConfig, k: int, new_tokens: int) -> sm.SamplingSettings:
    """Sampling at temperature 1 over the full vocabulary, EOS and z_c near its end."""
    v = cfg.vocab_size
    return sm.SamplingSettings(
        k=k,
        max_new_tokens=new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        eos_ids=(v - 3,),
        pad_id=0,
        self_reward_token_id=v - 2,
    )


def abstract_rollout(
    graphdef, params, s: sm.SamplingSettings, prompts: int, prompt_len: int, windows
):
    """The shapes of the prefix cache and sampler state that the prefill hands the decode loop."""
    return jax.eval_shape(
        lambda pr, tk, m, va, seed: sm._prefill(
            graphdef, pr, tk, m, va, seed, s, lambda x: x, windows
        ),
        params,
        jax.ShapeDtypeStruct((prompts, prompt_len), jnp.int32),
        jax.ShapeDtypeStruct((prompts, prompt_len), bool),
        jax.ShapeDtypeStruct((prompts,), bool),
        jax.ShapeDtypeStruct((), jnp.uint32),
    )


def emit(**kw) -> None:
    print(json.dumps(kw), flush=True)


def big_moves(hlo: str, min_bytes: int) -> list[str]:
    """copy / transpose instructions (outside fusions' bodies too) of at least `min_bytes`."""
    out = []
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%\S+ = (\w+)\[([0-9,]*)\]\S* (copy|transpose)\(", line)
        if not m:
            continue
        n = 1
        for d in m.group(2).split(","):
            n *= int(d) if d else 1
        if m.group(1) in _BYTES and n * _BYTES[m.group(1)] >= min_bytes:
            out.append(line.strip()[:120])
    return out


def _shape_bytes(shape: str, hbm_only: bool = False) -> int:
    """Bytes of the arrays in an HLO shape; `hbm_only`: only those in device memory (a TPU
    layout's `S(n)` marks an array held on chip: VMEM, SMEM or a sync flag)."""
    total = 0
    for m in re.finditer(r"(\w+)\[([0-9,]*)\](\{[^}]*\})?", shape):
        if m.group(1) in _BYTES and not (hbm_only and "S(" in (m.group(3) or "")):
            n = 1
            for d in m.group(2).split(","):
                n *= int(d) if d else 1
            total += n * _BYTES[m.group(1)]
    return total


_SKIPPED = ("parameter", "constant", "get-tuple-element", "tuple", "bitcast")
_SKIPPED += ("slice-done", "copy-done")  # an async move is counted at its start
_IN_PLACE = ("dynamic-update-slice", "scatter")  # their result is their operand, updated
_READS_PART = ("dynamic-slice", "slice", "gather")  # read only what they return
_ARRAY = re.compile(r"(\w+\[[0-9,]*\])(\{[^}]*\})?")
_INSTR = re.compile(r"\s*(?:ROOT )?(%\S+) = (.+?) ([\w-]+)\((.*?)\)(, .*)?$")


def bytes_by_op(hlo: str, hbm_only: bool = False, start: str | None = None) -> dict[str, int]:
    """An estimate of XLA's `bytes accessed`, split by the jax op each top-level instruction of
    the entry computation (and of while bodies) came from: operands plus result, where a fused
    operand only sliced or gathered inside its fusion counts what is taken, and an in-place update
    (a dynamic-update-slice or scatter, fused or not) counts its updates alone (as XLA's cost
    analysis counts a dynamic-update-slice). Layer numbers are folded, so the 24 layers'
    copies of an op add up to one entry.

    `hbm_only` (a TPU program): only device-memory traffic. XLA's TPU schedule moves weights and
    caches into on-chip memory ahead of their use (`slice-start` / `copy-start`, each counted as
    its destination's bytes read from device memory) and keeps activations there; its own
    `bytes accessed` counts every such move twice and every on-chip operand as well. `start`:
    the computation to count from (a while loop's body: one iteration), default the entry."""
    comps: dict[str, list[str]] = {}
    cur, entry = None, None
    for line in hlo.splitlines():
        m = re.match(r"^(ENTRY )?(%\S+) \(", line)
        if m:
            cur = m.group(2)
            comps[cur] = []
            entry = cur if m.group(1) else entry
        elif cur and line.strip() not in ("", "}"):
            comps[cur].append(line)
    parsed = {
        c: [p.groups() for ln in lines if (p := _INSTR.match(ln))] for c, lines in comps.items()
    }
    shapes = {name: out for instrs in parsed.values() for name, out, *_ in instrs}

    def operand_bytes(fused: str | None, i: int, full: int) -> int:
        if fused is None or not full:
            return full
        instrs = parsed.get(fused, [])
        param = next(
            (n for n, _, op, a, _ in instrs if op == "parameter" and a.strip() == str(i)), None
        )
        uses = [u for u in instrs if param in [a.strip() for a in u[3].split(",")]]
        if uses and all(u[2] in _READS_PART for u in uses):
            return sum(_shape_bytes(u[1]) for u in uses)
        if uses and all(u[2] in _IN_PLACE for u in uses):
            return 0
        return full

    out: dict[str, int] = {}

    def walk(comp: str) -> None:
        for _, shape, op, args, rest in parsed[comp]:
            rest = rest or ""
            if op in _SKIPPED:
                continue
            if op == "while":
                walk(re.search(r"body=(%[^,\s]+)", rest).group(1))
                continue
            operands = [a.strip() for a in args.split(",") if a.strip().startswith("%")]
            if op in ("slice-start", "copy-start"):  # one move: its destination's bytes
                arrays = _ARRAY.findall(shape)  # ((source), dest, flag) / (dest, source, flag)
                dest = "".join(arrays[1] if op == "slice-start" else arrays[0])
                moved = _shape_bytes(dest)
                source = shapes.get(operands[0], "")
                nbytes = moved * (bool(_shape_bytes(source, True)) + bool(_shape_bytes(dest, True)))
            elif op in _IN_PLACE and _shape_bytes(shape, True) == _shape_bytes(shape):
                # Unfused, in device memory: the operand is updated where it lies.
                updates = operands[1:] if op == "dynamic-update-slice" else operands[2:]
                nbytes = sum(_shape_bytes(shapes.get(a, ""), hbm_only) for a in updates)
            elif op in _READS_PART:  # unfused: reads what it returns (and its indices)
                source = _shape_bytes(shapes.get(operands[0], ""), hbm_only)
                nbytes = (_shape_bytes(shape) if source else 0) + _shape_bytes(shape, hbm_only)
                nbytes += sum(_shape_bytes(shapes.get(a, ""), hbm_only) for a in operands[1:])
            else:
                calls = re.search(r"calls=(%[^,\s]+)", rest)
                fused = calls.group(1) if op == "fusion" and calls else None
                nbytes = sum(
                    operand_bytes(fused, i, _shape_bytes(shapes.get(a, ""), hbm_only))
                    for i, a in enumerate(operands)
                )
                in_place = fused and any(o in _IN_PLACE for _, _, o, *_ in parsed[fused][-1:])
                nbytes += 0 if in_place else _shape_bytes(shape, hbm_only)
            meta = re.search(r'op_name="([^"]*)"', rest)
            key = re.sub(r"^(jit\([^)]*\)/)+", "", meta.group(1) if meta else op)
            key = re.sub(r"\d+", "#", key)
            out[key] = out.get(key, 0) + nbytes

    walk(start or entry)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def while_bodies(hlo: str) -> list[str]:
    """The bodies of the entry computation's while loops, in program order."""
    entry = hlo[hlo.index("\nENTRY ") :]
    entry = entry[: entry.index("\n}")]
    return re.findall(r"= .+? while\(.*?body=(%[^,\s]+)", entry)


_NO_KERNEL = (*_SKIPPED, "opt-barrier", "while")


def kernels(hlo: str, comp: str) -> int:
    """Instructions of computation `comp` (a loop body) that run as kernels of their own on a
    GPU: fusions, library calls, copies, ... (not parameters, tuples, bitcasts or barriers)."""
    body = hlo[hlo.index(f"\n{comp} (") :]
    body = body[: body.index("\n}")]
    return sum(
        1 for ln in body.splitlines()[1:] if (m := _INSTR.match(ln)) and m[3] not in _NO_KERNEL
    )


def gpu_device(spec: str) -> jax.Device:
    """A compile-only GPU: XLA's GPU compiler for the card `spec` describes (a
    GpuTargetConfigProto in text; a name looks in bench/gpu_targets/), with no GPU here. Needs
    jax's CUDA plugin (`pip install --target DIR jax-cuda12-plugin==<jax version>
    jax-cuda12-pjrt==<jax version>`, `PYTHONPATH=DIR`, `JAX_PLATFORMS=cpu`). Nothing is
    autotuned: the card picks its own matmul kernels, so kernels and bytes are XLA's plan."""
    from jax.experimental import topologies

    path, known = pathlib.Path(spec), pathlib.Path(__file__).parent / "gpu_targets"
    if not path.exists():
        path = known / f"{spec}.txtpb"
    if not path.exists():
        names = ", ".join(sorted(p.stem for p in known.glob("*.txtpb")))
        raise SystemExit(f"--gpu {spec}: not a file, nor one of bench/gpu_targets' {names}")
    try:
        topo = topologies.get_topology_desc(
            platform="cuda", target_config=path.read_text(), topology="1x1x1"
        )
    except NotImplementedError:  # no CUDA plugin on the path
        raise SystemExit(
            f"--gpu: XLA's GPU compiler is not here; pip install --target DIR "
            f'"jax-cuda12-plugin=={jax.__version__}" "jax-cuda12-pjrt=={jax.__version__}" and '
            "run with PYTHONPATH=DIR JAX_PLATFORMS=cpu"
        ) from None
    return topo.devices[0]


def slot_loop_cost(cfg, graphdef, params, on, args, t: int, hbm_only: bool) -> dict:
    """Continuous batching's slot loop (`continuous.programs` with `default_windows`, as the
    library compiles it for the device, `writes_after_reading` unless `--write-after-read`),
    `args.slots` slots at its widest window, every slot's prompt of `args.prompt_len` positions:
    one iteration's bytes (`bytes_by_op` of the loop body) against the minimum, every parameter
    once and every slot's prompt and window of keys and values (no two slots share a prompt's
    cache)."""
    s = settings(cfg, args.k, t)
    (device,) = jax.tree.leaves(params)[0].sharding.device_set
    windows = cont.default_windows(t, device.platform)
    pool, st = jax.eval_shape(
        lambda: cont.empty_buffers(cfg, args.slots, 1, args.prompt_len, s, windows)
    )
    pool, st = on(pool), on(st)
    key = on(jax.ShapeDtypeStruct((), jax.random.key(0).dtype))
    count = on(jax.ShapeDtypeStruct((), jnp.int32))
    auto = cont.writes_after_reading(device.platform)
    after = {"yes": True, "no": False}.get(args.write_after_read, auto)
    _, loop = cont.programs(graphdef, None, after)
    t0 = time.perf_counter()
    hlo = (
        loop.lower(params, pool, st, key, count, count, s=s, window=windows[-1]).compile().as_text()
    )
    body = while_bodies(hlo)[-1]
    return dict(
        hlo=hlo,
        body=body,
        window=windows[-1],
        write_after_read=after,
        compile_s=time.perf_counter() - t0,
        bytes=sum(bytes_by_op(hlo, hbm_only=hbm_only, start=body).values()),
    )


def tunix_decode_step(device, args, hbm_only: bool) -> dict:
    """Google Tunix 0.1.7's decode loop (`Sampler._decode_fn`, its static batch over a cache of
    prompt + new tokens) compiled for `device` at the benchmark's shape (`--model 0.5b`, batch,
    prompt, the first of `--new-tokens`, bf16; the peer benchmark's Qwen2 preset and import,
    ../shared/bench/tunix_sampler_bench.py): one iteration's bytes (`bytes_by_op`) and kernels
    (`kernels`: on a GPU). Nothing runs: the model is abstract and the prefill is traced for its
    output's shapes."""
    sys.path.append(str(pathlib.Path(__file__).resolve().parents[2] / "shared" / "bench"))
    if os.environ.get("TUNIX_DIR"):
        sys.path.append(os.environ["TUNIX_DIR"])
    import numpy as np
    import tunix_sampler_bench as peer

    _, sampler_lib, qwen2_lib = peer.import_tunix()
    shape = peer.PRESETS[args.model]
    cfg = qwen2_lib.ModelConfig(
        num_layers=shape["layers"],
        vocab_size=shape["vocab"],
        embed_dim=shape["hidden"],
        hidden_dim=shape["intermediate"],
        num_heads=shape["heads"],
        head_dim=shape["head_dim"],
        num_kv_heads=shape["kv_heads"],
        rope_theta=shape["rope_theta"],
        norm_eps=shape["rms_eps"],
        use_tied_embedding=shape["tied"],
        dtype=jnp.bfloat16,
        param_dtype=jnp.bfloat16,
    )
    b, p, t, v = args.batch, args.prompt_len, args.new_tokens[0], shape["vocab"]
    model = nnx.eval_shape(lambda: qwen2_lib.Qwen2(cfg, rngs=nnx.Rngs(params=0)))
    cache = sampler_lib.CacheConfig(
        cache_size=p + t,
        num_layers=shape["layers"],
        num_kv_heads=shape["kv_heads"],
        head_dim=shape["head_dim"],
    )
    sampler = sampler_lib.Sampler(model, peer.IdTokenizer(eos_id=v), cache)
    chip = jax.sharding.SingleDeviceSharding(device)

    def on(tree):
        def put(x):
            if not hasattr(x, "shape"):  # the state's static fields
                return x
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=chip)

        return jax.tree.map(put, tree)

    def prefill(params, state, images, **kw):  # shapes only
        def run(pr, st):
            return sampler._prefill_fn(pr, st, images, **kw)

        return jax.eval_shape(run, params, state)

    class Compiled(Exception):
        pass

    def decode(params, state):
        jitted = jax.jit(sampler._decode_fn, donate_argnums=(1,))
        raise Compiled(jitted.lower(on(params), on(state)).compile().as_text())

    sampler._compiled_prefill_fn, sampler._compiled_decode_fn = prefill, decode
    ids = np.random.default_rng(0).integers(100, 50000, size=(b, p))
    t0 = time.perf_counter()
    try:
        sampler(
            [" ".join(map(str, row)) for row in ids],
            max_generation_steps=t,
            max_prompt_length=p,
            echo=False,
            temperature=1.0,
            top_p=1.0,
            eos_tokens=[v],
            seed=0,
        )
    except Compiled as done:
        hlo = done.args[0]
    body = while_bodies(hlo)[-1]
    return dict(
        compile_s=round(time.perf_counter() - t0, 1),
        bytes_per_step=sum(bytes_by_op(hlo, hbm_only=hbm_only, start=body).values()),
        kernels_per_step=kernels(hlo, body),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="0.5b", choices=list(PRESETS))
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, nargs="+", default=[512, 4096])
    ap.add_argument(
        "--excess", type=float, default=sm.WINDOW_EXCESS, help="Sampler(window_excess=...)"
    )
    ap.add_argument(
        "--cpu-options",
        choices=("library", "none"),
        default="library",
        help="XLA:CPU compiles each static-loop step with the decode programs' options "
        "(`sampler.DECODE_COMPILER_OPTIONS`) or with none (XLA's defaults); the slot loop "
        "(--slots) compiles as the library's program does",
    )
    ap.add_argument(
        "--max-windows",
        type=int,
        default=sm.MAX_WINDOWS,
        help="Sampler(max_windows=...): the cap on the decode windows (a large value: uncapped)",
    )
    ap.add_argument(
        "--breakdown",
        action="store_true",
        help="also print each window's bytes split by jax op (`bytes_by_op`)",
    )
    ap.add_argument(
        "--slice",
        help="compile for the first chip of this TPU slice (e.g. v5e-8; needs libtpu, "
        "JAX_PLATFORMS=cpu)",
    )
    ap.add_argument(
        "--gpu",
        help="compile for this GPU with none here (h200, h100, or a GpuTargetConfigProto text "
        "file; needs jax's CUDA plugin, JAX_PLATFORMS=cpu): bytes and kernels per step",
    )
    ap.add_argument(
        "--slots",
        type=int,
        default=0,
        help="continuous batching's slot loop with this many slots instead of the static batch",
    )
    ap.add_argument(
        "--tunix",
        action="store_true",
        help="also compile Google Tunix 0.1.7's decode loop at the same shape (TUNIX_DIR: where "
        "it is installed, as for tunix_lengths.py); with --slice or --gpu",
    )
    ap.add_argument(
        "--write-after-read",
        choices=("auto", "yes", "no"),
        default="auto",
        help="the slot loop's `write_after_read` (auto: the library's choice for the device)",
    )
    args = ap.parse_args()

    shape = PRESETS[args.model]
    device = platform = None
    if args.slice:
        device, platform = plan.compile_only_devices(args.slice)[0], "tpu"
    elif args.gpu:
        device, platform = gpu_device(args.gpu), "gpu"
    layout = {"kv_layout": kv_layout_for(platform)} if platform else {}
    cfg = qwen2_config(shape, args.dtype, **layout)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    chip = jax.sharding.SingleDeviceSharding(device or jax.devices()[0])

    def on(tree):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=chip), tree)

    params = on(params)
    hbm_only = platform == "tpu"
    item = jnp.dtype(args.dtype).itemsize
    params_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    kv_tok = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * item
    b, k, p = args.batch, args.k, args.prompt_len
    rows = b * k
    opts = sm.decode_compiler_options("cpu") if args.cpu_options == "library" else {}
    emit(
        what="env",
        jax=jax.__version__,
        backend=f"{platform} ({args.slice or args.gpu}, compile only)"
        if platform
        else jax.default_backend(),
        kv_layout=cfg.kv_layout,
        cpu_options=opts if not platform else None,
        model=args.model,
        dtype=args.dtype,
        batch=b,
        k=k,
        prompt_len=p,
        params_bytes=params_bytes,
        kv_bytes_per_token=kv_tok,
    )
    summary = {}
    if args.tunix:
        tunix = tunix_decode_step(device, args, hbm_only)
        if not args.gpu:  # a TPU program's instructions are not kernels
            del tunix["kernels_per_step"]
        emit(what="tunix_decode_step", new_tokens=args.new_tokens[0], **tunix)
    if args.slots:
        for t in args.new_tokens:
            got = slot_loop_cost(cfg, graphdef, params, on, args, t, hbm_only)
            need = params_bytes + args.slots * (p + got["window"]) * kv_tok
            summary[t] = dict(per_step=round(got["bytes"] / need, 3))
            emit(
                what="slot_loop",
                new_tokens=t,
                slots=args.slots,
                window=got["window"],
                write_after_read=got["write_after_read"],
                compile_s=round(got["compile_s"], 1),
                bytes_per_step=got["bytes"],
                min_bytes=need,
                ratio=summary[t]["per_step"],
                **({"kernels_per_step": kernels(got["hlo"], got["body"])} if args.gpu else {}),
            )
            if args.breakdown:
                split = bytes_by_op(got["hlo"], hbm_only, got["body"])
                mb = {k: round(v / 1e6, 1) for k, v in split.items() if v >= 1e6}
                emit(what="slot_loop_bytes_by_op", new_tokens=t, mb=mb)
        emit(what="summary", **{str(t): v for t, v in summary.items()})
        return
    for t in args.new_tokens:
        s = settings(cfg, k, t)
        windows = sm.decode_windows_for(
            cfg, params_bytes, b, p, k, t, args.excess, args.max_windows, platform or "cpu"
        )
        prefix, state = on(abstract_rollout(graphdef, params, s, b, p, windows))
        layer_slice = rows * min(windows) * kv_tok // (2 * cfg.num_layers)
        worst, weighted, need_sum, lo, launched = 0.0, 0.0, 0.0, 0, 0
        if platform:  # the whole decode loop: on a TPU its bodies move more than one step
            t0 = time.perf_counter()
            loop_hlo = (
                jax.jit(
                    lambda pr, pre, st, s=s: sm._decode_loop(graphdef, pr, pre, st, s, lambda x: x),
                    donate_argnums=(2,),
                )
                .lower(params, prefix, state)
                .compile()
                .as_text()
            )
            bodies = dict(zip(windows, while_bodies(loop_hlo), strict=True))
            loop_s = time.perf_counter() - t0
        for w in windows:
            if platform:
                hlo, xla, compile_s = loop_hlo, None, loop_s
                got = sum(bytes_by_op(hlo, hbm_only=hbm_only, start=bodies[w]).values())
            else:

                def step(pr, pre, st, w=w, s=s):
                    return sm._decode_step(nnx.merge(graphdef, pr), pre, st, s, w)

                t0 = time.perf_counter()
                jitted = jax.jit(step, donate_argnums=(2,))
                compiled = jitted.lower(params, prefix, state).compile(compiler_options=opts)
                cost = compiled.cost_analysis()
                cost = cost[0] if isinstance(cost, list) else cost
                xla = got = float(cost["bytes accessed"])
                hlo, compile_s = compiled.as_text(), time.perf_counter() - t0
            moves = big_moves(hlo, layer_slice)

            def need(pos):
                return params_bytes + (b * p + rows * (pos + 1)) * kv_tok

            # The steps this window serves: lo .. w - 1 (the last window stops at t - 1: a
            # generation of t tokens runs at most t - 1 decode steps plus one z_c read).
            steps = range(lo, w)
            first = got / need(lo)
            worst = max(worst, first)
            weighted += got * len(steps)
            launch = kernels(hlo, bodies[w]) if args.gpu else 0
            launched += launch * len(steps)
            need_sum += sum(need(i) for i in steps)
            emit(
                what="window",
                new_tokens=t,
                window=w,
                steps=f"{lo}..{w - 1}",
                compile_s=round(compile_s, 1),
                **({"device_bytes_from_hlo": got} if platform else {"xla_bytes": xla}),
                **({"kernels_per_step": launch} if args.gpu else {}),
                min_bytes_first_step=need(lo),
                ratio_first_step=round(first, 3),
                ratio_last_step=round(got / need(w - 1), 3),
                cache_copies_or_transposes=len(moves),
                examples=moves[:3],
            )
            if args.breakdown:
                split = bytes_by_op(hlo, hbm_only, bodies[w] if platform else None)
                emit(
                    what="window_bytes_by_op",
                    new_tokens=t,
                    window=w,
                    estimate_over_xla=round(sum(split.values()) / xla, 4) if xla else None,
                    mb={k: round(v / 1e6, 1) for k, v in split.items() if v >= 1e6},
                )
            lo = w
        summary[t] = dict(worst=round(worst, 3), average=round(weighted / need_sum, 3))
        summary[t]["bytes_per_step"] = round(weighted / t)  # steps 0 .. t - 1
        if args.gpu:
            summary[t]["kernels_per_step"] = round(launched / t)
        if args.tunix and t == args.new_tokens[0]:
            summary[t]["tunix_bytes_over_laserjax"] = round(
                tunix["bytes_per_step"] / summary[t]["bytes_per_step"], 2
            )
        emit(what="generation", new_tokens=t, windows=list(windows), **summary[t])
    emit(what="summary", goal="<= 1.3 at every step", **{str(t): v for t, v in summary.items()})


if __name__ == "__main__":
    main()
