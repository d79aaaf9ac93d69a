"""The memory plan: bytes per device of a training run, before renting the chips
(`laserjax.commands.plan` is its command, `python -m laserjax plan`).

The estimate has two phases, because the trainer alternates them and never holds both at once:

- the **train step** (`laserjax.train_step`): parameters, AdamW state, gradients (plus the float32
  accumulator when micro-batching), the batch, and the activations of one micro-batch of
  `rows x (prompt + response)` tokens (log p(z_c) is read at the EOS position: the z_c column
  of LASER_SPEC section 2 is causally invisible and the step leaves it out,
  `train_step.StepSettings.append_zc`);
- the **rollout** (`laserjax.sampler`): parameters and AdamW state stay on device, the sampler
  holds its own compute-dtype copy of the weights, the shared prefix KV cache (one per prompt),
  the per-sample suffix KV cache (K per prompt, `max_new_tokens` long) and its small buffers.

Parameters and optimizer state are exact: their shapes come from the model and optax, and every
array is divided by the mesh axes that `laserjax.sharding.PARAM_RULES` shards it over (the same
`spec_for` the train step uses). Activations are a model of what the backward pass keeps; see
`activation_bytes` for what is counted and tests/test_plan.py for how it compares with the
memory XLA reports for a compiled step.

The model's shape comes from `--hf-config`, the config's `model.path` (a local directory with a
config.json), a built-in preset for the paper's models (`PRESETS`; works offline), or the CPU
demo's toy model.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractMesh, Mesh

from laserjax import continuous as cont
from laserjax import sampler as sm
from laserjax import sharding, toy_task
from laserjax.config import Config, ConfigError, OptimConfig
from laserjax.continuous import PREFILL_BATCH
from laserjax.model.transformer import Transformer, TransformerConfig, to_dtype
from laserjax.presets import PRESETS, preset_for
from laserjax.train_step import (
    StepSettings,
    TrainBatch,
    TrainState,
    logit_chunk_len,
    make_optimizer,
    make_train_step,
    reference_params,
    train_state_sharding,
)

GiB = 1 << 30

_TPU_CHIPS: dict[str, tuple[int, float]] = {
    # generation -> (TensorCores counted per chip in the slice name, HBM GiB per chip)
    "v4": (2, 32.0),
    "v5p": (2, 95.0),
    "v5e": (1, 16.0),
    "v5litepod": (1, 16.0),
    "v6e": (1, 32.0),
}

HEADROOM = 0.9
"""Fraction of a chip's HBM the planner lets a phase use: XLA keeps some for its own program,
fragmentation and collectives' buffers."""


# ---------------------------------------------------------------------------------------------
# Where the numbers come from: slices, meshes, model shapes.


def slice_chips(name: str) -> tuple[int, float]:
    """`v5p-64` -> (32 chips, 95.0 GiB each). v4 / v5p names count TensorCores (2 per chip)."""
    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", name.strip().lower())
    if not m:
        raise ConfigError(
            f"--slice {name!r}: expected an accelerator type such as v4-8, v5e-8 "
            f"(v5litepod-8), v5p-64 or v6e-64"
        )
    per_chip, hbm = _TPU_CHIPS[m.group(1)]
    cores = int(m.group(2))
    if cores % per_chip:
        raise ConfigError(f"--slice {name!r}: {m.group(1)} slices count {per_chip} cores per chip")
    return cores // per_chip, hbm


_TOPOLOGY_SHAPES_2D = {
    1: "1x1",
    4: "2x2",
    8: "2x4",
    16: "4x4",
    32: "4x8",
    64: "8x8",
    128: "8x16",
    256: "16x16",
}
_TOPOLOGY_SHAPES_3D = {
    4: "2x2x1",
    8: "2x2x2",
    16: "2x2x4",
    32: "2x4x4",
    64: "4x4x4",
    128: "4x4x8",
    256: "4x8x8",
    512: "8x8x8",
}


def slice_topology(name: str) -> str:
    """`v5p-64` -> "v5p:2x4x4": the chip layout `jax.experimental.topologies` compiles for."""
    chips, _ = slice_chips(name)
    gen = name.strip().lower().split("-")[0].replace("v5litepod", "v5e")
    if gen == "v4":
        raise ConfigError(
            f"--slice {name!r}: compiling for v4 without its chips is not supported; "
            "use --compile on the TPU VM"
        )
    shapes = _TOPOLOGY_SHAPES_3D if gen == "v5p" else _TOPOLOGY_SHAPES_2D
    if chips not in shapes:
        raise ConfigError(
            f"--slice {name!r}: no standard {gen} layout of {chips} chips known to the planner; "
            "use --compile on the TPU VM"
        )
    return f"{gen}:{shapes[chips]}"


def compile_only_devices(name: str) -> list[jax.Device]:
    """The chips of TPU slice `name` as compile-only devices: XLA's TPU compiler runs on this
    machine (any CPU) and nothing executes. Needs the `libtpu` package that this jax pins
    (`pip install "jax[tpu]==<jax version>"`, or `pip install --target DIR libtpu==...` with
    `PYTHONPATH=DIR` to keep it out of the environment) and, on a machine without TPUs,
    `JAX_PLATFORMS=cpu`."""
    from jax.experimental import topologies

    topology = slice_topology(name)
    try:
        return list(topologies.get_topology_desc(topology, "tpu").devices)
    except Exception as e:  # no libtpu, or one that does not match this jax
        raise ConfigError(
            f"--slice {name!r} --compile: cannot load the TPU compiler for {topology} "
            f"({type(e).__name__}: {str(e).splitlines()[0][:160]}); install the libtpu that "
            f'jax {jax.__version__} pins (pip install "jax[tpu]=={jax.__version__}") or run '
            "--compile on the TPU VM"
        ) from None


def model_config_for(
    cfg: Config, *, hf_config: str | None = None, preset: str | None = None
) -> tuple[TransformerConfig, str]:
    """The architecture to plan for, and where it came from.

    Order: `hf_config` (a config.json path), `preset`, the toy model of `model.toy`, a local
    `model.path` directory, then a preset recognised in `model.path`.
    """
    kw = cfg.model.transformer_fields()
    if hf_config:
        path = pathlib.Path(hf_config)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"--hf-config {hf_config!r}: no such config.json")
        return TransformerConfig.from_hf(json.loads(path.read_text()), **kw), str(path)
    if preset:
        if preset not in PRESETS:
            raise ConfigError(f"--preset {preset!r}: choose one of {', '.join(PRESETS)}")
        return TransformerConfig.from_hf(PRESETS[preset], **kw), f"preset {preset}"
    if cfg.model.toy is not None:
        toy = cfg.model.toy
        return toy_task.model_config(toy, **kw), "model.toy"
    local = pathlib.Path(cfg.model.path).expanduser()
    if (local / "config.json").is_file():
        return TransformerConfig.from_pretrained_dir(local, **kw), str(local / "config.json")
    name = preset_for(cfg.model.path)
    if name is None:
        raise ConfigError(
            f"config field `model.path` = {cfg.model.path!r}: not a local checkpoint "
            "directory and not one of the built-in shapes "
            f"({', '.join(PRESETS)}); pass --hf-config path/to/config.json or "
            "--preset NAME"
        )
    return TransformerConfig.from_hf(PRESETS[name], **kw), f"preset {name}"


# ---------------------------------------------------------------------------------------------
# Exact: parameters and optimizer state under the partition-rule table.


def _abstract_mesh(mesh_shape: dict[str, int]) -> AbstractMesh:
    return AbstractMesh(tuple(mesh_shape[a] for a in sharding.AXES), sharding.AXES)


def sharded_bytes(tree: Any, mesh_shape: dict[str, int], replicate: tuple[str, ...] = ()) -> int:
    """Bytes one device holds of a pytree of arrays / ShapeDtypeStructs sharded by PARAM_RULES
    (whole over the mesh axes in `replicate`, as `sharding.state_shardings`)."""
    mesh = _abstract_mesh(mesh_shape)
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        shape = tuple(leaf.shape)
        spec = sharding.spec_for(sharding.path_str(path), shape, mesh, replicate)
        padded = (None,) * (len(shape) - len(spec)) + tuple(spec)
        split = 1
        for axis in padded:
            names = () if axis is None else (axis if isinstance(axis, tuple) else (axis,))
            split *= math.prod(mesh_shape[a] for a in names)
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize // split
    return total


@functools.lru_cache(maxsize=8)
def abstract_state(model_cfg: TransformerConfig, optim_cfg: OptimConfig) -> tuple[Any, Any]:
    """(params, AdamW state) as ShapeDtypeStructs: no memory is allocated, even for 7B."""
    model = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    return params, jax.eval_shape(make_optimizer(optim_cfg).init, params)


@functools.lru_cache(maxsize=64)
def _state_bytes(
    model_cfg: TransformerConfig, optim_cfg: OptimConfig, mesh_items: tuple[tuple[str, int], ...]
) -> tuple[int, int, int]:
    """Per-device bytes of (params, AdamW state, a float32 copy of params); cached because
    `suggest_micro_batch` asks for the same mesh many times."""
    mesh_shape = dict(mesh_items)
    params, opt_state = abstract_state(dataclasses.replace(model_cfg, remat=False), optim_cfg)
    f32 = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), params)
    return (
        sharded_bytes(params, mesh_shape),
        sharded_bytes(opt_state, mesh_shape),
        sharded_bytes(f32, mesh_shape),
    )


@functools.lru_cache(maxsize=64)
def _reference_bytes(
    model_cfg: TransformerConfig, ref_dtype: str, mesh_items: tuple[tuple[str, int], ...]
) -> int:
    """Per-device bytes of the KL reference (`TrainState.ref_params`): the params in
    `ref_dtype` ("" = their own dtype), sharded like them."""
    params, _ = abstract_state(dataclasses.replace(model_cfg, remat=False), OptimConfig())
    return sharded_bytes(reference_params(params, ref_dtype), dict(mesh_items))


@functools.lru_cache(maxsize=64)
def _sampler_bytes(
    model_cfg: TransformerConfig, gather: bool, mesh_items: tuple[tuple[str, int], ...]
) -> dict[str, int]:
    """Per-device bytes of the sampler's compute-dtype weight copy (`Sampler.update_params`;
    whole over fsdp when `gather`), of the LM head the decode loop replicates on top of it
    (`sampler._head_gatherer`: the head, and an untied model's embedding), and of the layers'
    weights a decode step all-gathers over fsdp when the copy is sharded."""
    mesh_shape = dict(mesh_items)
    params, _ = abstract_state(dataclasses.replace(model_cfg, remat=False), OptimConfig())
    a = to_dtype(model_cfg.dtype)
    copy = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, sm.copy_dtype(x.dtype, a)), params)
    flat = {sharding.path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(copy)}
    replicate = ("fsdp",) if gather else ()
    vocab = {p: x for p, x in flat.items() if re.search(sm.HEAD_PATHS, p)}
    layers = {p: x for p, x in flat.items() if p.startswith("layers/")}
    head_whole = sum(math.prod(x.shape) * x.dtype.itemsize for x in vocab.values())
    step_gather = 0
    if not gather:
        whole = sharded_bytes(layers, mesh_shape, replicate=("fsdp",))
        step_gather = whole - sharded_bytes(layers, mesh_shape)
    return {
        "params": sharded_bytes(copy, mesh_shape, replicate),
        "head_gather": head_whole - sharded_bytes(vocab, mesh_shape, replicate),
        "step_gather": step_gather,
    }


def _layer_param_count(m: TransformerConfig) -> int:
    d, hd = m.hidden_size, m.head_dim
    attn = d * hd * (2 * m.num_heads + 2 * m.num_kv_heads)
    attn += hd * (m.num_heads + 2 * m.num_kv_heads) if m.qkv_bias else 0
    attn += d if m.o_bias else 0
    mlp = 3 * d * m.intermediate_size + ((2 * m.intermediate_size + d) if m.mlp_bias else 0)
    return attn + mlp + 2 * d


# ---------------------------------------------------------------------------------------------
# Modelled: activations of the train step and the rollout's caches.


def _split(n: int, t: int) -> int:
    """A dimension over the tensor axis: divided when it divides, else replicated (as `_fit`)."""
    return n // t if n % t == 0 else n


def activation_bytes(
    m: TransformerConfig,
    rows: int,
    prompt_len: int,
    response_len: int,
    tensor: int,
    *,
    remat: bool,
    logit_chunk: int,
    fsdp: int = 1,
) -> dict[str, int]:
    """What one micro-batch of `rows` rows (on one device) keeps alive in the train step.

    Sequence length L = prompt + response (no z_c column). `a` is the compute dtype's size. Per
    layer and row, the backward pass needs (without remat):

    - hidden-size tensors: the block input, both RMSNorm outputs and the mid-block residual
      (4 x L x D x a) and two float32 RMS factors per token;
    - attention: q and the attention output (2 x L x H hd / t x a), k and v (2 x L x KV hd / t
      x a); with dense attention (L <= `TransformerConfig.attention_block`) also the
      materialised scores: the softmax output in float32 plus the probabilities in the compute
      dtype (H / t x L x L x (4 + a); one float32 copy when a = 4) and the [L, L] mask
      (`attention_impl: xla` is dense at every length). Blocked attention keeps no scores (each
      block is recomputed in the backward pass) but a padded copy of q, the input of its
      checkpointed blocks; cuDNN's flash attention keeps one float32 statistic per head and
      position;
    - MLP: gate, up and their product (3 x L x I / t x a).

    Shared by all layers: RoPE's cos/sin, the final norm's input and output, the LM head's
    padded copy of the response hidden states and the z_c logits. With mixed precision the
    compute-dtype copies of the weights are kept too.

    With remat (`TransformerConfig.remat`) a layer keeps only its input; during its backward one
    layer's activations exist again. The blocks then run as one scan over their stacked parameters,
    which the backward pass keeps: one more copy of the layers' parameters (in the parameters'
    dtype, sharded over fsdp and tensor as they are). On top of what is kept, the peak adds the
    larger of the LM head's working set (3 float32 [chunk, V / t] buffers per row: logits, softmax,
    their gradient) and one layer's backward working set: two float32 residual-stream gradients plus
    the larger of the MLP's gradients and the scores' (float32 plus the compute dtype, for all L x L
    scores when dense; for one block, recomputed scores and their gradients, when blocked).
    """
    a = to_dtype(m.dtype).itemsize
    p_item = to_dtype(m.param_dtype).itemsize
    d, hd, t = m.hidden_size, m.head_dim, tensor
    seq = prompt_len + response_len
    q, kv = _split(m.num_heads * hd, t), _split(m.num_kv_heads * hd, t)
    heads, inter, vocab = (
        _split(m.num_heads, t),
        _split(m.intermediate_size, t),
        _split(m.vocab_size, t),
    )
    block = m.attention_block
    if m.attention_impl == "cudnn":  # fused flash attention keeps only the softmax statistics
        scores_row = heads * seq * 4
        scores_work_row = 0
        q_copy = 0
    elif seq <= block or m.attention_impl == "xla":
        scores_row = heads * seq * seq * (4 + (a if a != 4 else 0)) + seq * seq
        scores_work_row = heads * seq * seq * (4 + a)
        q_copy = 0
    else:
        scores_row = 0
        scores_work_row = 2 * heads * block * seq * (4 + a)
        q_copy = q * a

    per_token = a * (4 * d + 2 * q + 2 * kv + 3 * inter) + q_copy + 2 * 4
    layer_row = seq * per_token + scores_row
    block_input_row = seq * d * a
    chunk = logit_chunk_len(response_len, logit_chunk)
    padded_resp = -(-response_len // chunk) * chunk
    shared_row = 2 * seq * hd * 4 + 2 * seq * d * a + padded_resp * d * a + vocab * 4
    head_row = 3 * chunk * vocab * 4
    backward_row = 2 * seq * d * 4 + max(scores_work_row, 3 * seq * inter * a)

    layer_weights = _layer_param_count(m) // t
    other_weights = (m.vocab_size * d * (1 if m.tie_word_embeddings else 2) + d) // t
    copies = a < p_item  # bf16 compute over float32 master weights
    if remat:
        stacked = m.num_layers * layer_weights * p_item // fsdp
        kept = rows * (m.num_layers * block_input_row + shared_row) + stacked
        peak_extra = rows * max(head_row, layer_row + backward_row)
        weight_copies = (other_weights + layer_weights) * a if copies else 0
    else:
        kept = rows * (m.num_layers * layer_row + shared_row)
        peak_extra = rows * max(head_row, backward_row)
        weight_copies = (other_weights + m.num_layers * layer_weights) * a if copies else 0
    return {
        "kept": kept,
        "working": peak_extra,
        "weight_copies": weight_copies,
        "total": kept + peak_extra + weight_copies,
    }


def rollout_bytes(
    m: TransformerConfig,
    prompts: int,
    k: int,
    prompt_len: int,
    new_tokens: int,
    tensor: int,
    *,
    slots: int = 0,
    shards: int = 1,
) -> dict[str, int]:
    """The sampler's buffers on one device for `prompts` prompts (LASER_SPEC section 5).

    `PrefixCache`: keys and values [prompts, KV, P, w] per layer, one copy per prompt shared
    by its K samples; `SuffixCache`: [prompts * K, KV, t, w] per layer and segment of
    positions, T in all (w = `cache_width`: hd + 1 when `kv_layout` is augmented, the extra
    component carrying the mask and the softmax sum, else hd); both in the compute dtype, kv
    heads over the tensor axis when it divides them (as `sampler._cache` pins them). The
    sampler state adds int32 tokens and float32 log-probs per generated slot. The prefill's
    working set: the per-layer keys/values before they are laid out as the cache (a second
    prefix cache) and one layer's float32 scores and probabilities (one query block of them
    with blocked attention).

    With continuous batching (`slots` > 0 over `shards` batch shards, `laserjax/continuous.py`)
    each batch shard holds its block of the prompt pool (slots / shards + 1 entries) and
    slots / shards rows of the suffix cache and state, and a prefill call takes
    `PREFILL_BATCH` prompts (rounded up to the shards) at a time.
    """
    a = to_dtype(m.dtype).itemsize
    kv_heads = _split(m.num_kv_heads, tensor)
    per_token = 2 * m.num_layers * kv_heads * m.cache_width * a
    if slots:
        rows, cached, prefilled = slots // shards, slots // shards + 1, -(-PREFILL_BATCH // shards)
    else:
        rows, cached, prefilled = prompts * k, prompts, prompts
    prefix = cached * prompt_len * (per_token + 1)
    suffix = rows * new_tokens * per_token
    state = rows * new_tokens * 8
    block = min(m.attention_block, prompt_len)
    prefill_scores = 2 * prefilled * _split(m.num_heads, tensor) * block * prompt_len * 4
    prefill = prefilled * prompt_len * (per_token + 1) + prefill_scores
    decode_logits = 3 * rows * m.vocab_size * 4
    return {
        "prefix_cache": prefix,
        "suffix_cache": suffix,
        "sampler_state": state,
        "working": max(prefill, decode_logits),
    }


# ---------------------------------------------------------------------------------------------
# The estimate.


def estimate(
    model_cfg: TransformerConfig,
    cfg: Config,
    mesh_shape: dict[str, int],
    *,
    micro_batch_size: int | None = None,
    logit_chunk: int | None = None,
) -> dict[str, int]:
    """Bytes per device of a run of `cfg` with the architecture `model_cfg` on `mesh_shape`.

    `mesh_shape` maps data / fsdp / tensor to sizes. `micro_batch_size` (rows per micro-batch,
    default `cfg.train.micro_batch_size`, 0 = the whole step batch) must be a multiple of
    data x fsdp, as the train step requires. Keys (all bytes per device):

    params, opt_state (AdamW moments and counts, plus the 4-byte step), ref_params (the frozen KL
    reference when policy_loss.kl_coef > 0, in policy_loss.ref_param_dtype; resident in both
    phases; its forward keeps nothing for the backward pass and runs before the policy's, so it
    adds no activation memory), batch (the TrainBatch arrays), gradients (params' dtype, plus a
    float32 accumulator with micro-batches),
    weight_gather (two layers of weights all-gathered over fsdp, when fsdp > 1),
    activations_remat / activations_no_remat / activations (the config's choice),
    train_peak, sampler_params (the sampler's compute-dtype weight copy, whole over fsdp with
    `rollout.gather_weights`), kv_prefix, kv_suffix, rollout_buffers (the sampler state, the
    prefill's or a decode step's working set, and head_gather: the vocabulary-sized weights the
    decode loop replicates), rollout_peak, peak, rows_per_device, micro_batches; and
    decode_step_gather, the weight bytes each device receives per decode step (fsdp > 1
    without gather_weights).
    """
    mesh_shape = {a: int(mesh_shape[a]) for a in sharding.AXES}
    shards = mesh_shape["data"] * mesh_shape["fsdp"]
    t = mesh_shape["tensor"]
    rows = cfg.rows_per_step
    mb = cfg.train.micro_batch_size if micro_batch_size is None else micro_batch_size
    mb = mb or rows
    if rows % mb or mb % shards:
        raise ConfigError(
            f"config field `train.micro_batch_size`: {mb} must divide the step's "
            f"{rows} rows and be a multiple of data x fsdp = {shards}"
        )
    chunk = logit_chunk or StepSettings.__dataclass_fields__["logit_chunk"].default
    p_len, t_len = cfg.rollout.max_prompt_len, cfg.rollout.max_new_tokens

    params_b, opt_b, grads_f32 = _state_bytes(model_cfg, cfg.optim, tuple(mesh_shape.items()))
    out: dict[str, int] = {}
    out["params"] = params_b
    out["opt_state"] = opt_b + 4
    out["ref_params"] = (
        _reference_bytes(model_cfg, cfg.policy_loss.ref_param_dtype, tuple(mesh_shape.items()))
        if cfg.policy_loss.kl_coef > 0
        else 0
    )
    local_rows = rows // shards
    out["batch"] = local_rows * (p_len * 5 + t_len * 9 + 9)
    n_micro = rows // mb
    out["gradients"] = out["params"] + (grads_f32 if n_micro > 1 else 0)
    p_item = to_dtype(model_cfg.param_dtype).itemsize
    out["weight_gather"] = (
        2 * _layer_param_count(model_cfg) // t * p_item if mesh_shape["fsdp"] > 1 else 0
    )
    rows_dev = mb // shards
    for name, remat in (("activations_remat", True), ("activations_no_remat", False)):
        out[name] = activation_bytes(
            model_cfg,
            rows_dev,
            p_len,
            t_len,
            t,
            remat=remat,
            logit_chunk=chunk,
            fsdp=mesh_shape["fsdp"],
        )["total"]
    out["activations"] = out["activations_remat" if model_cfg.remat else "activations_no_remat"]
    resident = out["params"] + out["opt_state"] + out["ref_params"]
    out["train_peak"] = (
        resident + out["batch"] + out["gradients"] + out["weight_gather"] + out["activations"]
    )

    copy = _sampler_bytes(model_cfg, cfg.rollout.gather_weights, tuple(mesh_shape.items()))
    out["sampler_params"] = copy["params"]
    out["head_gather"] = copy["head_gather"]
    out["decode_step_gather"] = copy["step_gather"]
    prompts_dev = -(-cfg.train.prompts_per_step // shards)
    roll = rollout_bytes(
        model_cfg,
        prompts_dev,
        cfg.rollout.samples_per_prompt,
        p_len,
        t_len,
        t,
        slots=cfg.rollout.slots,
        shards=shards,
    )
    out["kv_prefix"], out["kv_suffix"] = roll["prefix_cache"], roll["suffix_cache"]
    out["rollout_buffers"] = roll["sampler_state"] + roll["working"] + copy["head_gather"]
    out["rollout_peak"] = (
        resident
        + out["sampler_params"]
        + out["kv_prefix"]
        + out["kv_suffix"]
        + out["rollout_buffers"]
    )
    out["peak"] = max(out["train_peak"], out["rollout_peak"])
    out["rows_per_device"] = rows_dev
    out["micro_batches"] = n_micro
    return out


def micro_batch_options(cfg: Config, mesh_shape: dict[str, int]) -> list[int]:
    """Micro-batch sizes the train step accepts: divisors of the step's rows, multiples of
    data x fsdp; largest first."""
    rows, shards = cfg.rows_per_step, mesh_shape["data"] * mesh_shape["fsdp"]
    return [mb for mb in range(rows, 0, -1) if rows % mb == 0 and mb % shards == 0]


def suggest_micro_batch(
    model_cfg: TransformerConfig,
    cfg: Config,
    mesh_shape: dict[str, int],
    hbm_bytes: float,
    *,
    remat: bool,
) -> tuple[int, dict[str, int]] | None:
    """The largest accepted micro-batch whose train step fits HEADROOM x HBM, with its
    estimate; None when not even the smallest fits."""
    model_cfg = dataclasses.replace(model_cfg, remat=remat)
    for mb in micro_batch_options(cfg, mesh_shape):
        est = estimate(model_cfg, cfg, mesh_shape, micro_batch_size=mb)
        if est["train_peak"] <= HEADROOM * hbm_bytes:
            return mb, est
    return None


def compiled_rollout_memory(
    model_cfg: TransformerConfig, cfg: Config, mesh: Mesh
) -> dict[str, dict[str, int]]:
    """XLA's own per-device numbers for the sampler's two programs, compiled from shapes.

    One rollout of the step's prompts (`train.prompts_per_step`, padded to the batch shards) at
    `rollout.max_prompt_len`, K = `rollout.samples_per_prompt`, `rollout.max_new_tokens`, with
    the sampler's compute-dtype weight copy laid out as the sampler lays it (sharded as in
    training, or whole over fsdp with `rollout.gather_weights`): `prefill` (the prompts' caches
    and the first tokens) and `decode` (the whole decode loop, its state donated). Keys of each:
    arguments, outputs, aliased, temp. With continuous batching (`rollout.slots`) its prefill into
    the prompt pool and its slot loop (`_compiled_slots_memory`).
    """
    params, _ = abstract_state(dataclasses.replace(model_cfg, remat=False), cfg.optim)
    a = to_dtype(model_cfg.dtype)

    def sampler_copy(x, sh):  # `Sampler.update_params`
        return jax.ShapeDtypeStruct(x.shape, sm.copy_dtype(x.dtype, a), sharding=sh)

    replicate = ("fsdp",) if cfg.rollout.gather_weights else ()
    params = jax.tree.map(sampler_copy, params, sharding.state_shardings(params, mesh, replicate))
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0))))
    shards = sharding.batch_shards(mesh)
    prompts = -(-cfg.train.prompts_per_step // shards) * shards
    p_len, t_len = cfg.rollout.max_prompt_len, cfg.rollout.max_new_tokens
    k = cfg.rollout.samples_per_prompt
    v = model_cfg.vocab_size
    s = sm.SamplingSettings(
        k=k,
        max_new_tokens=t_len,
        temperature=cfg.rollout.temperature,
        top_p=cfg.rollout.top_p,
        top_k=cfg.rollout.top_k,
        eos_ids=(v - 1,),
        pad_id=0,
        self_reward_token_id=min(cfg.tokens.self_reward_token_id, v - 2),
        batch_shards=shards,
    )

    def batch(shape, dtype):
        return jax.ShapeDtypeStruct(
            shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape))
        )

    if cfg.rollout.slots:
        return _compiled_slots_memory(model_cfg, graphdef, params, s, cfg, mesh, batch)
    params_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    windows = sm.decode_windows_for(
        model_cfg, params_bytes, prompts, p_len, k, t_len, platform=sharding.platform_of(mesh)
    )
    constrain = sm._constrainer(mesh)

    prefill = jax.jit(
        lambda pr, tok, mask, valid, seed: sm._prefill(
            graphdef, pr, tok, mask, valid, seed, s, constrain, windows
        )
    )
    compiled = prefill.lower(
        params,
        batch((prompts, p_len), jnp.int32),
        batch((prompts, p_len), jnp.bool_),
        batch((prompts,), jnp.bool_),
        jax.ShapeDtypeStruct((), jnp.uint32, sharding=sharding.replicated(mesh)),
    ).compile()
    out = {"prefill": _memory(compiled)}
    prefix, state = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), compiled.out_info
    )
    loop = sm.decode_program(graphdef, mesh)
    out["decode"] = _memory(loop.lower(params, prefix, state, s).compile())
    return out


def _compiled_slots_memory(model_cfg, graphdef, params, s, cfg, mesh, batch):
    """`compiled_rollout_memory` with continuous batching (`rollout.slots`): the programs that
    hold a rollout's memory (`continuous.programs`): `prefill` (a batch of prompts into the
    prompt pool, donated) and `decode` (the slot loop at its widest window, the slots donated),
    from the empty pool and slots `ContinuousSampler.buffers` makes."""
    shards = s.batch_shards
    windows = cont.default_windows(s.max_new_tokens, sharding.platform_of(mesh))
    pool, st = jax.eval_shape(
        lambda: cont.empty_buffers(
            model_cfg, cfg.rollout.slots, shards, cfg.rollout.max_prompt_len, s, windows
        )
    )
    pool, st = (
        jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), tree, spec)
        for tree, spec in ((pool, cont._shardings(mesh, pool)), (st, cont._shardings(mesh, st)))
    )
    replicated = sharding.replicated(mesh)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)
    count = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    prefill, loop = cont.programs(graphdef, mesh)
    b = -(-PREFILL_BATCH // shards) * shards
    p_len = cfg.rollout.max_prompt_len
    out = {
        "prefill": _memory(
            prefill.lower(
                params,
                pool,
                batch((b, p_len), jnp.int32),
                batch((b, p_len), jnp.bool_),
                batch((b,), jnp.int32),
                batch((b,), jnp.int32),
                key,
                s=s,
            ).compile()
        )
    }
    lowered = loop.lower(params, pool, st, key, count, count, s=s, window=windows[-1])
    out["decode"] = _memory(lowered.compile())
    return out


def _memory(compiled) -> dict[str, int]:
    ma = compiled.memory_analysis()
    return {
        "arguments": int(ma.argument_size_in_bytes),
        "outputs": int(ma.output_size_in_bytes),
        "aliased": int(ma.alias_size_in_bytes),
        "temp": int(ma.temp_size_in_bytes),
    }


def compiled_train_step_memory(
    model_cfg: TransformerConfig,
    cfg: Config,
    mesh: Mesh,
    *,
    micro_batch_size: int | None = None,
    logit_chunk: int | None = None,
) -> dict[str, int]:
    """XLA's own per-device numbers for the real train step, compiled from shapes only.

    Nothing is allocated: parameters, optimizer state and batch are ShapeDtypeStructs with the
    shardings the trainer uses, so on the target machine (e.g. a TPU VM, `plan --compile`) this
    is the measurement the estimate models. Keys: arguments, outputs, aliased (donated), temp
    (activations, gradients and every other buffer XLA allocates inside the step).
    """
    params, opt_state = abstract_state(dataclasses.replace(model_cfg, remat=False), cfg.optim)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0))))
    ref = cfg.policy_loss.kl_coef > 0
    state = TrainState(
        params=params,
        opt_state=opt_state,
        step=jax.ShapeDtypeStruct((), jnp.int32),
        ref_params=reference_params(params, cfg.policy_loss.ref_param_dtype) if ref else None,
    )
    shard = train_state_sharding(state, mesh)
    state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shard
    )
    rows, k = cfg.rows_per_step, cfg.rollout.samples_per_prompt
    p_len, t_len = cfg.rollout.max_prompt_len, cfg.rollout.max_new_tokens

    def arr(shape: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype)

    batch = TrainBatch(
        prompt_tokens=arr((rows, p_len), jnp.int32),
        prompt_mask=arr((rows, p_len), jnp.bool_),
        response_tokens=arr((rows, t_len), jnp.int32),
        response_mask=arr((rows, t_len), jnp.bool_),
        old_logprobs=arr((rows, t_len), jnp.float32),
        finished=arr((rows,), jnp.bool_),
        rewards=arr((rows,), jnp.float32),
        rollout_logp_zc=arr((rows,), jnp.float32),
    )
    mb = cfg.train.micro_batch_size if micro_batch_size is None else micro_batch_size
    settings = StepSettings(
        group_size=k,
        self_reward_token_id=cfg.tokens.self_reward_token_id,
        temperature=cfg.rollout.temperature or 1.0,
        micro_batch_size=mb,
        **({"logit_chunk": logit_chunk} if logit_chunk else {}),
    )
    # `auto` is measured at run time; any number compiles the same program.
    laser_cfg = (
        dataclasses.replace(cfg.laser, c_ref=0.0) if cfg.laser.c_ref == "auto" else cfg.laser
    )
    step = make_train_step(graphdef, shard, laser_cfg, cfg.policy_loss, cfg.optim, settings, mesh)
    return _memory(step.lower(state, batch).compile())
