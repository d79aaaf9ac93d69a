"""`python -m laserjax plan`: bytes per device of a training run, before renting the chips.

    python -m laserjax plan --config configs/qwen2.5_7b_laser.yaml --slice v5p-64 \\
        mesh.fsdp=32 mesh.data=1 train.micro_batch_size=32

The memory model is `laserjax.plan`; this module parses the flags, loads the config, prints the
table, the fit verdict and a micro-batch suggestion.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from typing import Any

import jax

from laserjax import sharding
from laserjax.config import Config, ConfigError, MeshConfig
from laserjax.config_load import load_config
from laserjax.model.transformer import TransformerConfig, kv_layout_for
from laserjax.plan import (
    HEADROOM,
    PRESETS,
    GiB,
    abstract_state,
    compile_only_devices,
    compiled_rollout_memory,
    compiled_train_step_memory,
    estimate,
    micro_batch_options,
    model_config_for,
    slice_chips,
    suggest_micro_batch,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        help="YAML config (default: the paper's defaults of "
        "laserjax.config: Qwen2.5-7B, 128 prompts x 8, prompt 2048, response 8192)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, e.g. mesh.fsdp=8 train.micro_batch_size=16",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--devices", type=int, help="number of chips (fills the mesh's -1 axis)")
    where.add_argument(
        "--slice",
        help="TPU accelerator type: v4-8, v5e-8 (v5litepod-8), v5p-64, "
        "v6e-64, ... (sets the chip count and HBM per chip)",
    )
    parser.add_argument(
        "--hbm-gib",
        type=float,
        help="HBM per chip in GiB (default: the slice's; needed for the fit check with --devices)",
    )
    shape = parser.add_mutually_exclusive_group()
    shape.add_argument(
        "--hf-config", help="a Hugging Face config.json (or its directory) giving the architecture"
    )
    shape.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="a built-in architecture (default: recognised from model.path)",
    )
    parser.add_argument(
        "--compile",
        nargs="?",
        const="all",
        choices=["all", "train"],
        help="also compile the real train step and the sampler's programs (`train`: the "
        "train step only) from shapes and print XLA's own numbers: on this machine's devices, "
        "or with --slice on a machine without them on the slice's chips as compile-only "
        "devices (needs the libtpu jax pins; JAX_PLATFORMS=cpu). The 7B recipe's rollout "
        "needs more than 24 GB of host memory to compile",
    )


def _gib(n: float) -> str:
    return f"{n / GiB:8.2f}"


def format_table(est: dict[str, int], remat: bool) -> str:
    rows = [
        ("params", "exact: shapes x dtype / mesh axes in PARAM_RULES"),
        ("opt_state", "exact: AdamW moments (params' dtype) + counts"),
        ("ref_params", "exact: the frozen KL reference (kl_coef > 0)"),
        (
            "gradients",
            "params' dtype" + (" + float32 accumulator" if est["micro_batches"] > 1 else ""),
        ),
        ("batch", "the TrainBatch arrays of the step"),
        ("weight_gather", "two layers all-gathered over fsdp"),
        ("activations_no_remat", "one micro-batch" + ("" if remat else "  <- config")),
        ("activations_remat", "one micro-batch" + ("  <- config" if remat else "")),
        ("train_peak", "params + opt + ref + grads + batch + gather + activations"),
        ("sampler_params", "the sampler's compute-dtype weight copy"),
        ("kv_prefix", "one per prompt, shared by its K samples (slots: slots / shards + 1)"),
        ("kv_suffix", "per sample (rollout.slots: per slot), max_new_tokens long"),
        ("rollout_buffers", "tokens/log-probs + prefill or decode working set + LM head"),
        ("rollout_peak", "params + opt + ref + sampler params + caches + buffers"),
    ]
    lines = [f"{'component':<22}{'GiB/device':>10}  note", "-" * 78]
    lines += [f"{name:<22}{_gib(est[name]):>10}  {note}" for name, note in rows]
    if est["decode_step_gather"]:
        step = est["decode_step_gather"] / GiB
        lines.append(
            f"each decode step all-gathers {step:.2f} GiB of weights per device over fsdp "
            "(rollout.gather_weights=true: none, for a whole weight copy)"
        )
    return "\n".join(lines)


def _load(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    if args.config is None and not any(
        o.startswith(("model.path=", "model.toy")) for o in overrides
    ):
        # A `model.*` override builds the model section from scratch, which would drop the
        # default checkpoint: keep it explicitly.
        overrides.insert(0, f"model.path={Config().model.path}")
    return load_config(args.config, overrides)


def _fit_report(
    model_cfg: TransformerConfig,
    cfg: Config,
    mesh_shape: dict[str, int],
    est: dict[str, int],
    hbm_gib: float,
) -> dict[str, Any]:
    """Print whether the plan fits and the largest micro-batch that does, with and without
    remat; return the same as JSON fields."""
    hbm = hbm_gib * GiB
    shards = mesh_shape["data"] * mesh_shape["fsdp"]
    fits = est["peak"] <= HEADROOM * hbm
    print(
        f"HBM per chip {hbm_gib:g} GiB (planning to {HEADROOM:.0%}): peak "
        f"{est['peak'] / GiB:.2f} GiB -> {'fits' if fits else 'DOES NOT FIT'}"
    )
    out: dict[str, Any] = {"hbm_gib": hbm_gib, "fits": fits}
    for remat in (False, True):
        found = suggest_micro_batch(model_cfg, cfg, mesh_shape, hbm, remat=remat)
        out["suggested_micro_batch_" + ("remat" if remat else "no_remat")] = (
            None if found is None else found[0]
        )
        label = f"model.remat={str(remat).lower()}"
        if found is None:
            smallest = micro_batch_options(cfg, mesh_shape)[-1]
            print(
                f"{label}: no micro-batch fits (not even {smallest} rows); shard more (fsdp, "
                "tensor), use more chips, or shorten rollout.max_new_tokens"
            )
        else:
            mb, e = found
            print(
                f"{label}: largest micro-batch that fits: train.micro_batch_size={mb} "
                f"({mb // shards} per device, train peak {e['train_peak'] / GiB:.2f} GiB)"
            )
    if est["decode_step_gather"]:
        rollout = dataclasses.replace(cfg.rollout, gather_weights=True)
        gathered = estimate(model_cfg, dataclasses.replace(cfg, rollout=rollout), mesh_shape)
        ok = gathered["peak"] <= HEADROOM * hbm
        out["gather_weights_fits"] = ok
        print(
            f"rollout.gather_weights=true {'fits' if ok else 'does not fit'}: peak "
            f"{gathered['peak'] / GiB:.2f} GiB (rollout {gathered['rollout_peak'] / GiB:.2f}), "
            f"and no {est['decode_step_gather'] / GiB:.2f} GiB weight all-gather per decode step"
        )
    if est["rollout_peak"] > HEADROOM * hbm:
        print(
            f"the rollout alone needs {est['rollout_peak'] / GiB:.2f} GiB per chip and its KV "
            "cache does not shrink with the micro-batch: add chips, raise mesh.tensor, or "
            "shorten rollout.max_new_tokens"
        )
    return out


def _compiled(fn, *args) -> dict | str:
    """`fn(*args)`, or XLA's one-line refusal when its TPU compiler finds the program's
    temporaries larger than the chip's HBM (RESOURCE_EXHAUSTED at compile time)."""
    try:
        return fn(*args)
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return str(e).splitlines()[0][:300]


def _verdict(phase: str, need: int | None, hbm_gib: float | None, fix: str) -> bool | None:
    """Print XLA's bytes for one phase against the whole chip: they are the buffers the chip
    must hold, not a model, so the plan's headroom for its model's error does not apply."""
    if hbm_gib is None:
        return None
    fits = need is not None and need <= hbm_gib * GiB
    got = "refused by XLA" if need is None else f"needs {need / GiB:.2f} GiB per chip"
    spare = " (less than 5% to spare)" if fits and need > 0.95 * hbm_gib * GiB else ""
    verdict = "fits" if fits else f"DOES NOT FIT: {fix}"
    print(f"XLA's {phase} {got} of {hbm_gib:g} GiB -> {verdict}{spare}")
    return fits


def _xla_report(
    model_cfg, cfg, mesh, est, hbm_gib, where: str, rollout: bool = True
) -> dict[str, Any]:
    """Compile the train step and the sampler's programs from shapes; print XLA's
    numbers beside the plan's and the verdicts; return them as JSON fields."""
    out: dict[str, Any] = {}
    xla = _compiled(compiled_train_step_memory, model_cfg, cfg, mesh)
    if isinstance(xla, str):
        print(f"XLA ({where}), train step: {xla}")
        out["xla"], need = None, None
    else:
        modelled = est["gradients"] + est["weight_gather"] + est["activations"]
        print(
            f"XLA ({where}): train step arguments {xla['arguments'] / GiB:.3f} GiB "
            f"(planned {(est['params'] + est['opt_state'] + est['batch']) / GiB:.3f}), "
            f"temp {xla['temp'] / GiB:.3f} GiB (planned gradients + gather + activations "
            f"{modelled / GiB:.3f})"
        )
        out["xla"], need = xla, xla["arguments"] + xla["temp"]
    fits = [_verdict("train step", need, hbm_gib, "lower train.micro_batch_size")]
    if not rollout:
        print("XLA: the rollout is not compiled (--compile train)")
    else:
        roll = _compiled(compiled_rollout_memory, model_cfg, cfg, mesh)
        if isinstance(roll, str):
            print(f"XLA ({where}), rollout: {roll}")
            out["xla_rollout"], need = None, None
        else:
            # The train state stays resident while the sampler's programs run.
            resident = est["params"] + est["opt_state"] + est["ref_params"]
            pre, dec = roll["prefill"], roll["decode"]
            need = resident + max(
                pre["arguments"] + pre["temp"] + pre["outputs"] - pre["aliased"],
                dec["arguments"] + dec["temp"] + dec["outputs"] - dec["aliased"],
            )
            print(
                f"XLA ({where}): rollout peak {need / GiB:.3f} GiB (planned "
                f"{est['rollout_peak'] / GiB:.3f}): prefill temp {pre['temp'] / GiB:.3f}, "
                f"decode arguments {dec['arguments'] / GiB:.3f} and temp {dec['temp'] / GiB:.3f}"
            )
            out["xla_rollout"], out["xla_rollout_peak"] = roll, need
        fix = "shorten rollout.max_new_tokens, add chips or raise mesh.tensor"
        fits.append(_verdict("rollout", need, hbm_gib, fix))
    if hbm_gib is not None:
        out["xla_fits"] = all(fits)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Print the table, the fit verdict, a micro-batch suggestion and a one-line JSON summary."""
    cfg = _load(args)
    devices, hbm_gib = None, None
    if args.slice:
        devices, hbm_gib = slice_chips(args.slice)
    elif args.devices is not None:
        devices = args.devices
    if args.hbm_gib is not None:
        hbm_gib = args.hbm_gib
    mesh_shape = cfg.mesh.resolve(devices)
    model_cfg, source = model_config_for(cfg, hf_config=args.hf_config, preset=args.preset)
    if args.slice:  # the caches as the slice's chips keep them, whatever this machine is
        layout = kv_layout_for("tpu", model_cfg.decode_impl)
        model_cfg = dataclasses.replace(model_cfg, kv_layout=layout)
    est = estimate(model_cfg, cfg, mesh_shape)
    params = abstract_state(model_cfg, cfg.optim)[0]
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    mb = est["rows_per_device"] * mesh_shape["data"] * mesh_shape["fsdp"]

    print(
        f"model: {source} ({n_params / 1e9:.2f}B parameters, {model_cfg.param_dtype} weights, "
        f"{model_cfg.dtype} compute, remat={model_cfg.remat})"
    )
    print(
        f"mesh: data={mesh_shape['data']} fsdp={mesh_shape['fsdp']} "
        f"tensor={mesh_shape['tensor']} ({math.prod(mesh_shape.values())} devices"
        + (f", {args.slice}" if args.slice else "")
        + ")"
    )
    print(
        f"step: {cfg.train.prompts_per_step} prompts x {cfg.rollout.samples_per_prompt} samples, "
        f"prompt {cfg.rollout.max_prompt_len} + response {cfg.rollout.max_new_tokens} + 1; "
        f"micro-batch {mb} rows ({est['rows_per_device']} per device, "
        f"{est['micro_batches']} micro-batches)"
    )
    print(format_table(est, model_cfg.remat))
    summary: dict[str, Any] = {
        "model": source,
        "params_count": n_params,
        "mesh": mesh_shape,
        "micro_batch_size": mb,
        "remat": model_cfg.remat,
        **est,
    }
    if hbm_gib is not None:
        summary |= _fit_report(model_cfg, cfg, mesh_shape, est, hbm_gib)
    else:
        print("no HBM size given (--slice or --hbm-gib): fit check skipped")
    if args.compile:
        n = math.prod(mesh_shape.values())
        devices, compile_only = jax.devices(), False
        if len(devices) < n and args.slice:
            devices, compile_only = compile_only_devices(args.slice), True
        if len(devices) < n:
            raise ConfigError(
                f"--compile: the plan's mesh {mesh_shape} needs {n} devices and "
                f"this machine has {len(devices)}; run it on the target or give --slice"
            )
        mesh = sharding.make_mesh(MeshConfig(**mesh_shape), devices[:n])
        where = f"{devices[0].device_kind}, {n} {'compile-only ' if compile_only else ''}devices"
        rollout = args.compile == "all"
        summary |= _xla_report(model_cfg, cfg, mesh, est, hbm_gib, where, rollout)
    print(json.dumps(summary))
    return summary
