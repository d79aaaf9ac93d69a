"""The decoder-only transformer of the Qwen2 / Qwen2.5 and Llama-3 families, in flax.nnx.

One job, the model (STYLE "A model file per family"); checkpoint names are `hf_params.py`'s table.

One model, three ways to run it:

- `model(tokens_bt, positions_bt, mask_bt)`: the training forward over whole sequences (left-padded
  prompts and right-padded responses in one batch; `positions_bt` counts real tokens only).
  `model.hidden(...)` stops before the LM head so the train step can compute log-probs in chunks.
- `model.prefill(...)`: runs the prompts once and returns their keys/values as a `PrefixCache`.
- `model.decode(...)`: one token for each of the K samples of each prompt. The K samples of a prompt
  attend to the prompt's keys/values in the shared `PrefixCache` (read once per prompt, never copied
  K times) and to their own generated keys/values in the `SuffixCache`.

Naming follows the Hugging Face modules (`self_attn.q_proj`, `mlp.gate_proj`, ...) so that the
weight table in `hf_params.py` reads one to one. Kernels are stored `[in, out]`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from laserjax.model import decode_kernel

SUPPORTED_MODEL_TYPES = ("qwen2", "llama")
ATTENTION_IMPLS = ("blocked", "xla", "cudnn")
ATTENTION_CHOICES = ("auto", *ATTENTION_IMPLS)
DECODE_IMPLS = ("xla", "pallas")
KV_LAYOUTS = ("auto", "augmented", "plain")
# Hugging Face `hidden_act` values laserjax computes, each as transformers' ACT2FN defines it
# (gelu: exact, erf; gelu_new / gelu_pytorch_tanh: the tanh approximation).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}
ROPE_TYPES = ("default", "linear", "llama3")
# The keys each supported rope_type reads (the field list in hf_params.py's docstring).
_ROPE_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def to_dtype(name: str | jnp.dtype) -> jnp.dtype:
    if not isinstance(name, str):
        return jnp.dtype(name)
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(_DTYPES)}")
    return jnp.dtype(_DTYPES[name])


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    """Hashable copy of the HF rope parameters beyond theta (llama3 / linear scaling)."""
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    """The MLP's gate activation, a key of ACTIVATIONS (HF `hidden_act`)."""
    max_position_embeddings: int = 32768
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    attention_block: int = 512
    """Queries per attention block in the training/prefill forward: scores are held as
    [B, heads, block, S] at a time (rematerialised in the backward pass) instead of
    [B, heads, S, S], which a 10k-token LaSeR sequence could not afford. Sequences no longer than
    one block use the dense path."""
    attention_impl: str = "blocked"
    """The training/prefill forward's causal attention: `blocked` (this module's, in blocks of
    `attention_block` queries), or `jax.nn.dot_product_attention` with `implementation` `xla`
    (dense scores) or `cudnn` (cuDNN's fused flash attention: GPU only, bfloat16 / float16), or
    `auto`, which becomes one of them at construction (`auto_attention_impl`). Decode attention
    is `decode_impl`'s."""
    decode_impl: str = "xla"
    """The sampler's decode attention: `xla` (`Attention.attend_cached`: per cache part a scores
    matmul, a max, an exp and a weights-times-values matmul) or `pallas` (one Pallas kernel per
    part, `decode_kernel.py`: a GPU (Triton) kernel, run by Pallas's interpreter on the CPU,
    refused on a TPU; head_dim a power of two >= 16). The same softmax either way."""
    kv_layout: str = "auto"
    """The sampler's key/value caches: `augmented` (head_dim + 1 components, `augment_kv`: each
    key carries its own mask and each value a 1 that sums the softmax weights, so XLA:CPU reads
    the cache once and no mask), `plain` (head_dim components; attention masks by position and
    by the prompt mask), or `auto` (`kv_layout_for`): plain on a TPU, where head_dim + 1 (65,
    129) is off the 128-lane tiles (compiled for a TPU, the decode program copied the whole
    suffix cache into another layout and back); augmented elsewhere: on the CPU, for the Pallas
    kernel, and on a GPU, whose timed decode (H200) ran augmented, plain not yet timed there."""

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"config field `model_type`: {self.model_type!r} is not supported; "
                f"laserjax implements {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"config fields `num_attention_heads` ({self.num_heads}) must be a "
                f"multiple of `num_key_value_heads` ({self.num_kv_heads})"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"config field `hidden_act`: {self.hidden_act!r} is not supported; "
                f"laserjax implements {', '.join(ACTIVATIONS)}"
            )
        rope_type = self.rope.get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise ValueError(
                f"config field `rope_parameters.rope_type`: {rope_type!r} is not supported; "
                f"laserjax implements {', '.join(ROPE_TYPES)}"
            )
        for key in _ROPE_KEYS.get(rope_type, ()):
            if key not in self.rope:
                raise ValueError(
                    f"config field `rope_parameters.{key}` is missing (rope_type {rope_type!r} "
                    "needs it)"
                )
        if self.attention_impl not in ATTENTION_CHOICES:
            raise ValueError(
                f"config field `attention_impl`: {self.attention_impl!r} is not one of "
                f"{', '.join(ATTENTION_CHOICES)}"
            )
        if self.attention_impl == "auto":
            impl = auto_attention_impl(self.dtype, self.head_dim)
            object.__setattr__(self, "attention_impl", impl)
        if self.decode_impl not in DECODE_IMPLS:
            raise ValueError(
                f"config field `decode_impl`: {self.decode_impl!r} is not one of "
                f"{', '.join(DECODE_IMPLS)}"
            )
        if self.decode_impl == "pallas":
            decode_kernel.check_head_dim(self.head_dim)
        if self.kv_layout not in KV_LAYOUTS:
            raise ValueError(
                f"config field `kv_layout`: {self.kv_layout!r} is not one of "
                f"{', '.join(KV_LAYOUTS)}"
            )
        if self.kv_layout == "auto":
            layout = kv_layout_for(jax.default_backend(), self.decode_impl)
            object.__setattr__(self, "kv_layout", layout)
        if self.decode_impl == "pallas" and self.kv_layout != "augmented":
            raise ValueError(
                "config field `kv_layout`: the pallas decode kernel reads augmented caches; "
                "use `augmented` or `auto`"
            )
        if self.attention_impl == "cudnn" and self.dtype not in ("bfloat16", "float16"):
            raise ValueError(
                f"config field `attention_impl`: cudnn needs dtype bfloat16 or float16, not "
                f"{self.dtype}; use `blocked` or `xla` in {self.dtype}"
            )
        to_dtype(self.dtype), to_dtype(self.param_dtype)

    @property
    def rope(self) -> dict[str, Any]:
        return dict(self.rope_scaling or ())

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> TransformerConfig:
        """Build from a Hugging Face `config.json` dict (transformers 4 or 5 layout).

        Every field that changes transformers' forward is either implemented or refused here
        with an error naming the field and its value (the table in hf_params.py's docstring).
        """
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"config field `model_type`: {model_type!r} is not supported; "
                f"laserjax implements {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        for f in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        ):
            if f not in hf:
                raise ValueError(f"config field `{f}` is missing from the Hugging Face config")
        _refuse_unsupported_hf_fields(hf)
        # As transformers 5 (PreTrainedConfig.convert_rope_params_to_dict): a non-empty
        # `rope_scaling` (the older name) replaces `rope_parameters`; theta comes from the dict,
        # else the top-level `rope_theta`, else 10000.
        rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
        theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        rope.pop("partial_rotary_factor", None)  # 1.0 here (checked above)
        # transformers' defaults when config.json omits the field: Llama 2048, Qwen2 32768.
        max_pos = hf.get("max_position_embeddings", 2048 if model_type == "llama" else 32768)
        if rope_type == "llama3" and "original_max_position_embeddings" not in rope:
            rope["original_max_position_embeddings"] = hf.get(
                "original_max_position_embeddings", max_pos
            )
        num_heads = hf["num_attention_heads"]
        attention_bias = bool(hf.get("attention_bias", False))
        kwargs = dict(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rope_theta=theta,
            rope_scaling=(
                None
                if rope_type == "default"
                else tuple(sorted((rope | {"rope_type": rope_type}).items()))
            ),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            # transformers' Qwen2 hard-codes q/k/v biases and no o_proj / MLP bias (it reads
            # neither `attention_bias` nor `mlp_bias`); Llama reads both.
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type == "llama" and attention_bias,
            mlp_bias=model_type == "llama" and bool(hf.get("mlp_bias", False)),
            hidden_act=hf.get("hidden_act", "silu"),
            max_position_embeddings=max_pos,
        )
        return cls(**(kwargs | overrides))

    @classmethod
    def from_pretrained_dir(cls, path: str | pathlib.Path, **overrides: Any) -> TransformerConfig:
        cfg_file = pathlib.Path(path) / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"no config.json in {str(path)!r}")
        return cls.from_hf(json.loads(cfg_file.read_text()), **overrides)

    @property
    def cache_width(self) -> int:
        """Components per cached key or value: head_dim, plus one when augmented."""
        return self.head_dim + (self.kv_layout == "augmented")

    def to_hf(self) -> dict[str, Any]:
        """The Hugging Face `config.json` fields for this architecture (used by the exporter).

        Raises when transformers could not compute what this model computes: its Qwen2 always
        has q/k/v biases and never an o_proj or MLP bias, its Llama one `attention_bias` for all
        four projections.
        """
        if self.model_type == "qwen2" and (not self.qkv_bias or self.o_bias or self.mlp_bias):
            raise ValueError(
                f"cannot export as qwen2: transformers' Qwen2 has q/k/v biases and no o_proj or "
                f"MLP bias, this model has qkv_bias={self.qkv_bias}, o_bias={self.o_bias}, "
                f"mlp_bias={self.mlp_bias}"
            )
        if self.model_type == "llama" and self.qkv_bias != self.o_bias:
            raise ValueError(
                f"cannot export as llama: transformers' `attention_bias` covers q/k/v and o_proj "
                f"alike, this model has qkv_bias={self.qkv_bias}, o_bias={self.o_bias}"
            )
        rope = {"rope_type": "default", "rope_theta": self.rope_theta} | self.rope
        hf: dict[str, Any] = dict(
            model_type=self.model_type,
            architectures=[
                "Qwen2ForCausalLM" if self.model_type == "qwen2" else "LlamaForCausalLM"
            ],
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            hidden_act=self.hidden_act,
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_word_embeddings,
            max_position_embeddings=self.max_position_embeddings,
            rope_theta=self.rope_theta,
            rope_parameters=rope,
        )
        if self.rope_scaling:
            hf["rope_scaling"] = rope
        if self.model_type == "llama":
            hf |= dict(attention_bias=self.o_bias, mlp_bias=self.mlp_bias)
        else:
            hf |= dict(use_sliding_window=False)
        return hf


def _refuse_unsupported_hf_fields(hf: dict[str, Any]) -> None:
    """Raise on a Hugging Face config field whose value changes the forward in a way laserjax
    does not compute (hf_params.py's docstring lists every field and its verdict)."""

    def refuse(field: str, value: Any, why: str) -> None:
        raise ValueError(f"config field `{field}`: {value!r} is not supported; {why}")

    if hf.get("use_sliding_window"):
        refuse(
            "use_sliding_window",
            hf["use_sliding_window"],
            "laserjax implements full attention only (every released Qwen2.5 checkpoint sets "
            "it false)",
        )
    layer_types = hf.get("layer_types") or ()
    if any(t != "full_attention" for t in layer_types):
        refuse("layer_types", sorted(set(layer_types)), "laserjax implements full_attention only")
    rope_field = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    rope = dict(hf.get(rope_field) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        refuse(f"{rope_field}.rope_type", rope_type, f"laserjax implements {', '.join(ROPE_TYPES)}")
    for where, value in (
        ("partial_rotary_factor", hf.get("partial_rotary_factor")),
        (f"{rope_field}.partial_rotary_factor", rope.get("partial_rotary_factor")),
    ):
        if value is not None and float(value) != 1.0:
            refuse(where, value, "laserjax rotates the whole head (factor 1.0)")
    if hf.get("attention_dropout"):
        refuse("attention_dropout", hf["attention_dropout"], "laserjax has no dropout; set 0.0")
    if hf.get("quantization_config"):
        method = dict(hf["quantization_config"]).get("quant_method", "?")
        refuse(
            "quantization_config",
            method,
            "laserjax loads float32 / bfloat16 / float16 weights; use the unquantized checkpoint",
        )


# ---------------------------------------------------------------------------------------------
# Rotary position embedding.


def rope_inv_freq(cfg: TransformerConfig) -> jax.Array:
    """Inverse frequencies, with Llama-3.1 style scaling when the config asks for it."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    rope = cfg.rope
    if rope.get("rope_type") == "linear":
        inv_freq = inv_freq / rope["factor"]
    elif rope.get("rope_type") == "llama3":
        factor = rope["factor"]
        low, high = rope["low_freq_factor"], rope["high_freq_factor"]
        old_len = rope["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = jnp.where(is_medium, smoothed, scaled)
    return inv_freq


def apply_rope(x_bthd: jax.Array, positions_bt: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate-half RoPE, as Hugging Face's Qwen2/Llama (not the interleaved variant)."""
    angles_btf = positions_bt[..., None].astype(jnp.float32) * inv_freq
    angles = jnp.concatenate([angles_btf, angles_btf], axis=-1)[..., None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x = x_bthd.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * cos + rotated * sin).astype(x_bthd.dtype)


# ---------------------------------------------------------------------------------------------
# KV caches for the sampler.


MASKED_KEY = -1e30
"""The extra key component of a position attention must skip (see `augment_kv`)."""


def augment_kv(
    k: jax.Array, v: jax.Array, live: jax.Array | bool = True
) -> tuple[jax.Array, jax.Array]:
    """Keys/values as the caches store them: head_dim + 1 components.

    Keys get a last component 0 where `live` and MASKED_KEY elsewhere, values a last component 1;
    decode queries get a last component 1. A score q.k then carries its own mask (a skipped
    position scores about -1e30 and its softmax weight is exactly 0) and the weighted sum of
    values carries the softmax denominator in its last component, so attention reads the cache
    once and never writes or reads a mask or a separate sum.
    """
    live = jnp.broadcast_to(jnp.asarray(live), k.shape[:-1])
    bias = jnp.where(live, 0.0, MASKED_KEY).astype(k.dtype)[..., None]
    return jnp.concatenate([k, bias], -1), jnp.concatenate([v, jnp.ones_like(v[..., :1])], -1)


# Both caches keep positions next to head_dim ([..., kv_heads, positions, head_dim]) and hold one
# array per layer (and per segment of positions for the suffix) rather than one stacked array:
# decode attention then reads each array where it lies, whole. On XLA:CPU a slice of a stacked
# cache (one layer, or the first W positions) is copied into its own buffer before the fused
# multiply-reduce reads it, and an in-place update of one layer of a stacked buffer that another
# layer's read still uses makes XLA copy the whole buffer; separate arrays avoid both.


@flax.struct.dataclass
class PrefixCache:
    """Keys/values of the prompts, one copy per prompt, shared by its K samples."""

    k: tuple[jax.Array, ...]  # per layer [prompts, kv_heads, P, cache_width] (`kv_layout`)
    v: tuple[jax.Array, ...]
    mask_bp: jax.Array

    def rows(self, rows_b: jax.Array, shards: int = 1) -> PrefixCache:
        """The cache of each of B rows, row b holding entry `rows_b[b]` (a pool of prompts shared
        by rows, as in continuous batching). With `shards` = D > 1 the entries and the rows are
        split into D equal blocks and row block d reads only entry block d (each batch shard of
        a mesh gathers from its own entries)."""

        def take(x):
            if shards == 1:
                return x[rows_b]
            # Block by block (vmap: the block axis is a batch axis of the gather), so on a mesh
            # no shard reads another's entries.
            blocks = x.reshape(shards, -1, *x.shape[1:])
            local = rows_b.reshape(shards, -1) - blocks.shape[1] * jnp.arange(shards)[:, None]
            out = jax.vmap(lambda pool, rows: pool[rows])(blocks, local)
            return out.reshape(-1, *x.shape[1:])

        return PrefixCache(tuple(map(take, self.k)), tuple(map(take, self.v)), take(self.mask_bp))


@flax.struct.dataclass
class SuffixCache:
    """Keys/values of the generated tokens, one row per sample, in segments of positions.

    `k[layer][i]` is [prompts * K, kv_heads, bounds[i] - bounds[i-1], head_dim + 1] (row = prompt *
    K + sample: no size-1 axis when K = 1, which XLA would fold away with a reshape that it then
    duplicates, with a copy, into the in-place update): segment i holds
    suffix positions bounds[i-1] .. bounds[i] - 1 (bounds[-1] = the suffix length). A decode
    step with window W = bounds[i] reads segments 0..i only. Positions not yet written hold
    masked keys (`augment_kv`), so attention skips them without a mask.
    """

    k: tuple[tuple[jax.Array, ...], ...]
    v: tuple[tuple[jax.Array, ...], ...]
    bounds: tuple[int, ...] = flax.struct.field(pytree_node=False)
    augmented: bool = flax.struct.field(pytree_node=False, default=True)
    """`kv_layout` augmented (head_dim + 1 components) or plain (head_dim; masked by position)."""

    @property
    def length(self) -> int:
        return self.bounds[-1]

    def fresh_rows(self, rows: int) -> SuffixCache:
        """`rows` rows of this cache's segments as `zeros` makes them: every key masked (a slot
        of a continuous batch starts a new sample with these)."""

        def fresh(x, last):
            zeros = jnp.zeros((rows, *x.shape[1:]), x.dtype)
            return zeros.at[..., -1].set(last) if self.augmented else zeros

        return SuffixCache(
            jax.tree.map(lambda x: fresh(x, MASKED_KEY), self.k),
            jax.tree.map(lambda x: fresh(x, 1), self.v),
            self.bounds,
            self.augmented,
        )

    @classmethod
    def zeros(
        cls,
        cfg: TransformerConfig,
        batch: int,
        k: int,
        length: int,
        bounds: tuple[int, ...] = (),
    ) -> SuffixCache:
        bounds = tuple(bounds) or (length,)
        if list(bounds) != sorted(set(bounds)) or bounds[0] <= 0 or bounds[-1] != length:
            raise ValueError(f"suffix segment bounds {bounds} must increase from > 0 to {length}")
        dtype = to_dtype(cfg.dtype)
        starts = (0, *bounds[:-1])
        augmented = cfg.kv_layout == "augmented"

        def layer(i):
            def segment(lo, hi):
                zeros = jnp.zeros((batch * k, cfg.num_kv_heads, hi - lo, cfg.head_dim), dtype)
                return augment_kv(zeros, zeros, False)[i] if augmented else zeros

            return tuple(segment(lo, hi) for lo, hi in zip(starts, bounds, strict=True))

        return cls(
            tuple(layer(0) for _ in range(cfg.num_layers)),
            tuple(layer(1) for _ in range(cfg.num_layers)),
            bounds,
            augmented,
        )


# ---------------------------------------------------------------------------------------------
# Layers.


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, param_dtype: jnp.dtype):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        # As Hugging Face: normalise in float32, cast back, then scale.
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * xf.astype(x.dtype)


def matmul_2d(x: jax.Array, w_io: jax.Array, **dot_kw: Any) -> jax.Array:
    """`x @ w_io` over x's last axis, computed as one [N, in] x [in, out] matmul.

    The leading axes are flattened first: XLA:CPU runs a dot with several batch-like free axes
    (and, in the backward pass, the weight gradient contracting over all of them) through slower
    paths than a plain 2-D matmul: on a [8, 256, 256] x [256, 1024] MLP the gradient took 106 ms
    as an einsum and 59 ms as 2-D matmuls (bench/README, the train step section).
    """
    lead = x.shape[:-1]
    y = jnp.dot(x.reshape(-1, x.shape[-1]), w_io, **dot_kw)
    return y.reshape(*lead, w_io.shape[-1])


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); kernel stored [in, out] in param_dtype, computed in dtype."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        *,
        bias: bool,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        init = nnx.initializers.normal(0.02)
        self.kernel = nnx.Param(init(rngs.params(), (d_in, d_out), param_dtype))
        self.bias = nnx.Param(jnp.zeros((d_out,), param_dtype)) if bias else None
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = matmul_2d(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def auto_attention_impl(dtype: str, head_dim: int) -> str:
    """`attention_impl: auto`: cuDNN's fused flash attention on a GPU where cuDNN takes the
    shape (bfloat16 / float16, head_dim a multiple of 8 up to 128), the blocked attention
    elsewhere (CPU, TPU). On an H200 the train step ran 1.30-1.50x PyTorch's with cuDNN and
    0.90x with the dense XLA attention (bench/README)."""
    fits = dtype in ("bfloat16", "float16") and head_dim % 8 == 0 and head_dim <= 128
    return "cudnn" if fits and jax.default_backend() == "gpu" else "blocked"


def kv_layout_for(platform: str, decode_impl: str = "xla") -> str:
    """`kv_layout: auto` on `platform` (a jax backend: cpu, gpu, tpu)."""
    return "plain" if platform == "tpu" and decode_impl != "pallas" else "augmented"


def _causal_attend(
    q_bthd: jax.Array, k_bshd: jax.Array, v_bshd: jax.Array, key_mask_bs: jax.Array, block: int
) -> jax.Array:
    """Causal attention (by index) over keys where key_mask_bs is True, `block` queries at a time.

    Each block's scores are recomputed in the backward pass (`jax.checkpoint`), so memory grows
    with block x S rather than S x S.
    """
    b, t, h, d = q_bthd.shape
    s = k_bshd.shape[1]
    if t <= block:
        mask = jnp.tril(jnp.ones((t, s), bool), k=s - t)[None] & key_mask_bs[:, None, :]
        return _attend(q_bthd, k_bshd, v_bshd, mask)
    n = -(-t // block)
    q = jnp.pad(q_bthd, ((0, 0), (0, n * block - t), (0, 0), (0, 0)))
    q_nbchd = q.reshape(b, n, block, h, d).swapaxes(0, 1)

    @jax.checkpoint
    def one(args):
        q_bchd, start = args
        q_idx = start + jnp.arange(block) + (s - t)
        mask = (q_idx[:, None] >= jnp.arange(s)[None, :])[None] & key_mask_bs[:, None, :]
        return _attend(q_bchd, k_bshd, v_bshd, mask)

    out = jax.lax.map(one, (q_nbchd, jnp.arange(n) * block))
    return out.swapaxes(0, 1).reshape(b, n * block, h, d)[:, :t]


def causal_attention(cfg: TransformerConfig) -> Callable[..., jax.Array]:
    """`attend(q_bthd, k_bshd, v_bshd, key_mask_bs)` of the training/prefill forward, as
    `cfg.attention_impl` picks it: causal by index, keys where key_mask_bs is False skipped."""
    if cfg.attention_impl == "blocked":
        return functools.partial(_causal_attend, block=cfg.attention_block)

    def attend(q_bthd, k_bshd, v_bshd, key_mask_bs):
        # cuDNN takes a mask only at its full [B, 1, T, S] extent (it refuses one broadcast
        # over queries: "Bias must have same seq length as QKV").
        b, t, s = q_bthd.shape[0], q_bthd.shape[1], k_bshd.shape[1]
        return jax.nn.dot_product_attention(
            q_bthd,
            k_bshd,
            v_bshd,
            mask=jnp.broadcast_to(key_mask_bs[:, None, None, :], (b, 1, t, s)),
            is_causal=True,
            implementation=cfg.attention_impl,
        )

    return attend


def _attend(
    q_bthd: jax.Array, k_bshd: jax.Array, v_bshd: jax.Array, mask_bts: jax.Array
) -> jax.Array:
    """Grouped-query attention; softmax in float32; masked keys get a large negative score."""
    b, t, h, d = q_bthd.shape
    s, kv = k_bshd.shape[1], k_bshd.shape[2]
    g = h // kv
    # Heads-major operands with one free axis each side ([b, kv, g * t, d] x [b, kv, s, d]):
    # XLA:CPU runs these as batched matmuls, where the 5-axis einsum took 1.8x as long forward
    # and backward (same values; bench/README, the train step section).
    q = q_bthd.reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, d)
    k, v = k_bshd.transpose(0, 2, 1, 3), v_bshd.transpose(0, 2, 1, 3)
    scores = jnp.einsum("bkqd,bksd->bkqs", q, k, preferred_element_type=jnp.float32)
    scores = scores.reshape(b, kv, g, t, s) / math.sqrt(d)
    scores = jnp.where(mask_bts[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_bshd.dtype).reshape(b, kv, g * t, s)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, v)
    return out.reshape(b, kv, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


class Attention(nnx.Module):
    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        dt, pdt = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
        d, hd = cfg.hidden_size, cfg.head_dim
        kw = dict(dtype=dt, param_dtype=pdt, rngs=rngs)
        self.q_proj = Linear(d, cfg.num_heads * hd, bias=cfg.qkv_bias, **kw)
        self.k_proj = Linear(d, cfg.num_kv_heads * hd, bias=cfg.qkv_bias, **kw)
        self.v_proj = Linear(d, cfg.num_kv_heads * hd, bias=cfg.qkv_bias, **kw)
        self.o_proj = Linear(cfg.num_heads * hd, d, bias=cfg.o_bias, **kw)
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.decode_impl = cfg.decode_impl

    def qkv(
        self, x_btd: jax.Array, positions_bt: jax.Array, inv_freq: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        b, t, _ = x_btd.shape
        q = self.q_proj(x_btd).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x_btd).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x_btd).reshape(b, t, self.num_kv_heads, self.head_dim)
        return apply_rope(q, positions_bt, inv_freq), apply_rope(k, positions_bt, inv_freq), v

    def __call__(
        self,
        x_btd: jax.Array,
        positions_bt: jax.Array,
        key_mask_bt: jax.Array,
        inv_freq: jax.Array,
        attend: Callable[..., jax.Array],
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        q, k, v = self.qkv(x_btd, positions_bt, inv_freq)
        out = attend(q, k, v, key_mask_bt)
        return self.o_proj(out.reshape(*out.shape[:2], -1)), (k, v)

    def attend_cached(
        self,
        q_bkhd: jax.Array,
        prefix: tuple[jax.Array, jax.Array],
        blocks: list[tuple[jax.Array, jax.Array]],
        masks: tuple[jax.Array, list[jax.Array]] | None = None,
    ) -> jax.Array:
        """Decode attention of one query token per row over the cached keys/values.

        `prefix` is the prompt's (keys, values): [B, kv_heads, P, width], read once for
        the K samples of a prompt. `blocks` are segments of the samples' own suffix, (keys,
        values) with [B * K, kv_heads, t, width]. Augmented caches (width head_dim + 1,
        `augment_kv`: masked positions score -1e30, the last value component sums the weights)
        carry their masks; plain ones (width head_dim) come with `masks`: the prefix's
        [B, P] and each block's [B * K or 1, t], True where a position is attended. This
        step's key/value must already be in a block.

        Scores and the weighted sum are batched matmuls over (row, kv head) in the caches' own
        layout ([..., kv_heads, t, width], contracting head_dim, then t), so XLA reads
        each cache array where it lies, and the scores are written once and read by the max and
        by exp-times-V. The softmax over the prefix and every segment is exact. Augmented caches
        (the CPU's and GPU's) take one max over all parts and one sum. Plain ones (a TPU's) take
        each part's own max and sum and merge the parts by their maxima: a part's scores are
        then dead once its sums are taken, where one max over all parts kept every part's
        scores alive until the last, and XLA's TPU slot loop moved the long parts' scores
        through device memory (4096 new tokens, 64 slots, 0.5B shape: 5.2 against 4.4 GB a
        step, compile only; bench/README). XLA:CPU reads the same bytes either way; XLA's GPU
        compiler spends a kernel per part and layer on the merge. With `decode_impl` pallas each
        part is one kernel instead (`decode_kernel.part_attention`), merged the same way
        (`merge_parts`).
        """
        f32 = jnp.float32
        b, kk = q_bkhd.shape[:2]
        n_kv, d = self.num_kv_heads, self.head_dim
        g = self.num_heads // n_kv
        q = (q_bkhd.astype(f32) / math.sqrt(d)).reshape(b, kk, n_kv, g, d)
        plain = masks is not None
        if self.decode_impl != "pallas" and not plain:  # the Pallas kernel adds k[D] itself
            q = jnp.concatenate([q, jnp.ones_like(q[..., :1])], -1)
        pk, pv = prefix
        # The prefix is shared by the K samples: batch over (prompt, kv head), queries (k, g).
        q_pre = q.transpose(0, 2, 1, 3, 4).reshape(b, n_kv, kk * g, q.shape[-1])
        q_r = q.reshape(b * kk, n_kv, g, q.shape[-1])

        def pre_to_rows(x):  # [b, n, k * g, ...] -> [b * k, n, g, ...]
            x = x.reshape(b, n_kv, kk, g, *x.shape[3:])
            return jnp.moveaxis(x, 2, 1).reshape(b * kk, n_kv, g, *x.shape[4:])

        def rows_to_pre(x):  # [b * k, n, g] -> [b, n, k * g]
            return jnp.moveaxis(x.reshape(b, kk, n_kv, g), 1, 2).reshape(b, n_kv, kk * g)

        if self.decode_impl == "pallas":  # one kernel per part
            interpret = decode_kernel.interpret_here()
            pre = decode_kernel.part_attention(q_pre, pk, pv, interpret=interpret)
            parts = [tuple(pre_to_rows(x) for x in pre)]
            parts += [
                decode_kernel.part_attention(q_r, k, v, interpret=interpret) for k, v in blocks
            ]
            out = decode_kernel.merge_parts(parts)
        else:
            # Each part's scores take their own copy of the queries (a barrier copies nothing):
            # given one query array, XLA's GPU compiler merged the parts' score matmuls into one
            # over the parts' keys concatenated, a copy of every part's keys and values each
            # step (the slot loop at the 0.5B shape: 3.8 GB a step, 2.8 without; bench/README).
            q_pre, *q_parts = jax.lax.optimization_barrier((q_pre, *[q_r] * len(blocks)))
            s_pre = jnp.einsum("bnqd,bntd->bnqt", q_pre, pk.astype(f32))
            s_suf = [
                jnp.einsum("rngd,rntd->rngt", q_p, k.astype(f32))
                for q_p, (k, _) in zip(q_parts, blocks, strict=True)
            ]
            if plain:  # masked positions score MASKED_KEY, as an augmented key's would
                pre_mask, block_masks = masks
                s_pre = jnp.where(pre_mask[:, None, None, :], s_pre, MASKED_KEY)
                s_suf = [
                    jnp.where(mask[:, None, None, :], s, MASKED_KEY)
                    for s, mask in zip(s_suf, block_masks, strict=True)
                ]
            if plain:  # each part its own max, merged after (see the docstring)

                def part(s, v, eq):  # (weighted values, the weights' sum, max)
                    m = s.max(-1)
                    e = jnp.exp(s - m[..., None])
                    return jnp.einsum(eq, e, v.astype(f32)), e.sum(-1), m

                pre = part(s_pre, pv, "bnqt,bntd->bnqd")
                parts = [tuple(pre_to_rows(x) for x in pre)]
                parts += [
                    part(s, v, "rngt,rntd->rngd") for s, (_, v) in zip(s_suf, blocks, strict=True)
                ]
                out = decode_kernel.merge_parts(parts)
            else:  # one max over every part; the values' last component sums the weights
                m_r = functools.reduce(
                    jnp.maximum, [s.max(-1) for s in s_suf], pre_to_rows(s_pre.max(-1))
                )
                e_pre = jnp.exp(s_pre - rows_to_pre(m_r)[..., None])
                acc = pre_to_rows(jnp.einsum("bnqt,bntd->bnqd", e_pre, pv.astype(f32)))
                for s, (_, v) in zip(s_suf, blocks, strict=True):
                    e = jnp.exp(s - m_r[..., None])
                    acc = acc + jnp.einsum("rngt,rntd->rngd", e, v.astype(f32))
                out = acc[..., :d] / acc[..., d:]
        out = out.astype(to_dtype(self.o_proj.dtype))
        return self.o_proj(out.reshape(b, kk, -1))


class MLP(nnx.Module):
    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        kw = dict(
            bias=cfg.mlp_bias,
            dtype=to_dtype(cfg.dtype),
            param_dtype=to_dtype(cfg.param_dtype),
            rngs=rngs,
        )
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, **kw)
        self.hidden_act = cfg.hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.hidden_act]
        return self.down_proj(act(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        pdt = to_dtype(cfg.param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pdt)
        self.self_attn = Attention(cfg, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pdt)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(
        self,
        x_btd: jax.Array,
        positions_bt: jax.Array,
        key_mask_bt: jax.Array,
        inv_freq: jax.Array,
        attend: Callable[..., jax.Array],
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        h, kv = self.self_attn(
            self.input_layernorm(x_btd), positions_bt, key_mask_bt, inv_freq, attend
        )
        x_btd = x_btd + h
        return x_btd + self.mlp(self.post_attention_layernorm(x_btd)), kv


SLICED_ROWS_MAX = 64
"""Row reads (`Embed.rows`, `sampler.row_slices`) of at most this many rows are unrolled dynamic
slices, more rows one gather: the same values; the slices make XLA:CPU's cost analysis count what
is read (a gather counts its whole operand) but compile in time linear in the rows (the CPU
demo's 256 rows compiled its sampler in 40 s instead of 6)."""


class Embed(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.embedding = nnx.Param(init(rngs.params(), (vocab, dim), param_dtype))

    def __call__(self, tokens: jax.Array, dtype: jnp.dtype) -> jax.Array:
        # Ids are checked against the vocabulary where they enter (prompts) or drawn from it;
        # an in-bounds gather reads only the rows it needs (a filling one fuses with a select
        # that XLA costs as a read of the whole table).
        table = self.embedding[...]
        return table.at[tokens].get(mode="promise_in_bounds").astype(dtype)

    def rows(self, tokens: jax.Array, dtype: jnp.dtype, sliced: bool = True) -> jax.Array:
        """The same lookup as one dynamic slice per token, for up to `SLICED_ROWS_MAX` tokens
        (a decode step); more take the gather, and so do tokens split over a mesh (`sliced`
        False: a slice of global token i moves every row between the devices each step).

        XLA:CPU's cost analysis counts a gather as a read of the whole table, a dynamic slice as
        a read of its row, which is what either reads; the slices are unrolled, so past a few
        dozen rows they cost compile time (bench/decode_cost.py measures 64 rows).
        """
        if tokens.size > SLICED_ROWS_MAX or not sliced:
            return self(tokens, dtype)
        table = self.embedding[...]
        flat = tokens.reshape(-1)
        rows = [jax.lax.dynamic_slice_in_dim(table, flat[i], 1) for i in range(flat.size)]
        return jnp.concatenate(rows).reshape(*tokens.shape, -1).astype(dtype)


class Transformer(nnx.Module):
    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pdt = to_dtype(cfg.param_dtype)
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=pdt, rngs=rngs)
        self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pdt)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else Linear(
                cfg.hidden_size,
                cfg.vocab_size,
                bias=False,
                dtype=to_dtype(cfg.dtype),
                param_dtype=pdt,
                rngs=rngs,
            )
        )

    # -- pieces -----------------------------------------------------------------------------

    @property
    def dtype(self) -> jnp.dtype:
        return to_dtype(self.cfg.dtype)

    def logits(self, h_btd: jax.Array) -> jax.Array:
        """Final-norm-ed hidden states -> float32 logits (float32 accumulation of the matmul)."""
        if self.lm_head is None:
            w_dv = self.embed_tokens.embedding[...].astype(self.dtype).T
        else:
            w_dv = self.lm_head.kernel[...].astype(self.dtype)
        return matmul_2d(h_btd.astype(self.dtype), w_dv, preferred_element_type=jnp.float32)

    def token_logit(self, h_btd: jax.Array, token_id: int) -> jax.Array:
        """`logits(h)[..., token_id]` from that token's row of the head alone."""
        if self.lm_head is None:
            w_d = self.embed_tokens.embedding[token_id]
        else:
            w_d = self.lm_head.kernel[:, token_id]
        return jnp.einsum(
            "...d,d->...",
            h_btd.astype(self.dtype),
            w_d.astype(self.dtype),
            preferred_element_type=jnp.float32,
        )

    # -- training forward -------------------------------------------------------------------

    def hidden(
        self,
        tokens_bt: jax.Array,
        positions_bt: jax.Array,
        mask_bt: jax.Array,
        *,
        return_kv: bool = False,
        constrain: Callable[[jax.Array], jax.Array] | None = None,
    ) -> jax.Array | tuple[jax.Array, list[tuple[jax.Array, jax.Array]]]:
        """Final-normalised hidden states [B, T, D] for a batch of padded sequences.

        Attention is causal by index and ignores keys where mask_bt is False, so one batch can
        hold left-padded prompts followed by right-padded responses. `constrain`, when given, pins
        the residual stream's sharding between blocks (the train step keeps it batch-sharded, so
        under FSDP XLA gathers weights rather than activations).
        """
        inv_freq = rope_inv_freq(self.cfg)
        constrain = constrain or (lambda x: x)
        x = constrain(self.embed_tokens(tokens_bt, self.dtype))
        attend = causal_attention(self.cfg)

        def block_fn(block: Block, x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
            x, kv = block(x, positions_bt, mask_bt, inv_freq, attend)
            return constrain(x), kv

        if self.cfg.remat and not return_kv:
            # The blocks' parameters stacked and scanned, each block rematerialised in the
            # backward pass: compiled for a TPU (v5e-8, compile only), Qwen2.5-0.5B's train step
            # kept 3.08 GiB of temporaries this way against 4.74 with the blocks unrolled under
            # `nnx.remat`, whose recomputations XLA scheduled early and kept live together
            # (5.70 without remat), and compiled in 39 s instead of 126.
            split = [nnx.split(block) for block in self.layers]
            graphdef = split[0][0]
            stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[state for _, state in split])

            def one_block(h: jax.Array, state: nnx.State) -> tuple[jax.Array, None]:
                return block_fn(nnx.merge(graphdef, state), h)[0], None

            x, _ = jax.lax.scan(jax.checkpoint(one_block), x, stacked)
            return self.norm(x)
        kvs = []
        for block in self.layers:
            x, kv = block_fn(block, x)
            kvs.append(kv)
        x = self.norm(x)
        return (x, kvs) if return_kv else x

    def __call__(
        self, tokens_bt: jax.Array, positions_bt: jax.Array, mask_bt: jax.Array
    ) -> jax.Array:
        return self.logits(self.hidden(tokens_bt, positions_bt, mask_bt))

    # -- sampling ---------------------------------------------------------------------------

    def prefill(
        self,
        tokens_bp: jax.Array,
        positions_bp: jax.Array,
        mask_bp: jax.Array,
        *,
        constrain: Callable[[jax.Array], jax.Array] | None = None,
    ) -> tuple[jax.Array, PrefixCache]:
        """Run left-padded prompts once: logits of the last position [B, V] and the prefix cache.
        `constrain` pins the residual stream's sharding between blocks (`hidden`)."""
        h, kvs = self.hidden(tokens_bp, positions_bp, mask_bp, return_kv=True, constrain=constrain)
        kvs = [(k.swapaxes(1, 2), v.swapaxes(1, 2)) for k, v in kvs]
        if self.cfg.kv_layout == "augmented":
            kvs = [augment_kv(k, v, mask_bp[:, None]) for k, v in kvs]
        cache = PrefixCache(k=tuple(k for k, _ in kvs), v=tuple(v for _, v in kvs), mask_bp=mask_bp)
        return self.logits(h[:, -1]), cache

    def decode(
        self,
        tokens_bk: jax.Array,
        positions_bk: jax.Array,
        prefix: PrefixCache,
        suffix: SuffixCache,
        step: jax.Array,
        *,
        window: int | None = None,
        return_hidden: bool = False,
        row_shards: int = 1,
        write_after_read: bool = False,
    ) -> tuple[jax.Array, SuffixCache] | tuple[jax.Array, SuffixCache, jax.Array]:
        """One token for each of K samples per prompt, written at suffix index `step`.

        Sample j of prompt b attends to prompt b's prefix keys and to its own suffix keys
        0..step. Returns float32 logits [B, K, V] and the updated suffix cache.

        `window` (static, one of `suffix.bounds`, default the last) is the suffix positions
        attention reads, `[0, window)`: a step early in a long generation reads only the segments
        that can be live. `step` is a scalar (every row at the same index, which must lie in the
        window's last segment: one in-place dynamic-update-slice per layer) or an int array
        [B, K] (rows at their own indices below the window, as in continuous batching: a scatter
        per segment that drops the rows outside it; the prefix then holds one entry per row,
        `PrefixCache.rows`). `return_hidden` adds the final-normalised hidden states [B, K, D] (for
        `token_logit`). `row_shards` > 1: the rows are split over that many devices
        (`Embed.rows`).

        `write_after_read` (per-row steps only): attention reads the segments as they were, with
        this step's keys and values as a part of their own, and the scatter writes them after.
        Written first, the segments a step had just updated were attention's operands, and
        XLA's TPU slot loop updated them on chip and copied them back every step (1.87 against
        1.65 GB a step at the 0.5B shape with 64 slots, compile only, bench/README). XLA:CPU
        cannot order the read before the in-place write and copies every segment instead, so
        continuous batching asks for it on a TPU only (`continuous.writes_after_reading`).
        """
        inv_freq = rope_inv_freq(self.cfg)
        x = self.embed_tokens.rows(tokens_bk, self.dtype, sliced=row_shards == 1)
        bounds = suffix.bounds
        w = bounds[-1] if window is None else window
        if w not in bounds:
            raise ValueError(f"decode window {w} is not one of the suffix segment ends {bounds}")
        n_seg = bounds.index(w) + 1
        starts = (0, *bounds[:-1])
        step = jnp.asarray(step, jnp.int32)
        per_row = step.ndim > 0
        step_bk = jnp.broadcast_to(step, tokens_bk.shape)

        def write(seg, new_bknd, s):  # new: [B, K, kv_heads, cache_width]
            new = new_bknd.astype(seg.dtype).reshape(-1, *new_bknd.shape[2:])
            lo, hi = starts[s], bounds[s]
            if per_row:
                at = step_bk.reshape(-1) - lo
                at = jnp.where((at >= 0) & (at < hi - lo), at, hi - lo)  # out of range: dropped
                # Row by row (vmap: a scatter whose row axis is a batch axis), so on a mesh
                # each batch shard writes its own rows; an index array over all rows made
                # XLA gather every row's new keys and values across the shards first. Each
                # update is one (head, position)'s components, contiguous in the segment's
                # layout: written as all heads at one position, the update spanned heads, and
                # XLA's TPU compiler laid every segment out positions before heads for the
                # scatter, copying it in and out on each call (BUILD.md).
                heads = jnp.arange(seg.shape[1])
                return jax.vmap(
                    lambda seg_r, new_r, at_r: seg_r.at[heads, at_r].set(new_r, mode="drop")
                )(seg, new, at)
            if s != n_seg - 1:
                return seg
            return jax.lax.dynamic_update_slice(seg, new[:, :, None], (0, 0, step - lo, 0))

        if write_after_read and not per_row:
            raise ValueError("write_after_read needs per-row steps (an int array [B, K])")
        masks = None
        if not suffix.augmented:  # plain caches: the prompt mask, and suffix positions <= step
            # (< step when this step's key and value come as a part of their own)
            last_r = step_bk.reshape(-1, 1) - int(write_after_read)
            block_masks = [
                lo + jnp.arange(hi - lo)[None, :] <= last_r
                for lo, hi in zip(starts[:n_seg], bounds[:n_seg], strict=True)
            ]
            new_part = [jnp.ones((1, 1), bool)] if write_after_read else []
            masks = (prefix.mask_bp, block_masks + new_part)

        def as_part(new_bknd):  # [B, K, kv_heads, width] -> [B * K, kv_heads, 1, width]
            new = new_bknd.astype(suffix.k[0][0].dtype)
            return new.reshape(-1, *new.shape[2:])[:, :, None]

        new_k, new_v = [], []
        for i, block in enumerate(self.layers):
            h = block.input_layernorm(x)
            q, k_now, v_now = block.self_attn.qkv(h, positions_bk, inv_freq)
            if suffix.augmented:
                k_now, v_now = augment_kv(k_now, v_now)
            old_k, old_v = suffix.k[i][:n_seg], suffix.v[i][:n_seg]
            ks = [write(seg, k_now, s) for s, seg in enumerate(old_k)]
            vs = [write(seg, v_now, s) for s, seg in enumerate(old_v)]
            if write_after_read:  # the segments as they were, and this step's key and value
                parts = [*zip(old_k, old_v, strict=True), (as_part(k_now), as_part(v_now))]
            else:
                parts = list(zip(ks, vs, strict=True))
            x = x + block.self_attn.attend_cached(q, (prefix.k[i], prefix.v[i]), parts, masks)
            x = x + block.mlp(block.post_attention_layernorm(x))
            new_k.append((*ks, *suffix.k[i][n_seg:]))
            new_v.append((*vs, *suffix.v[i][n_seg:]))
        h = self.norm(x)
        suffix = SuffixCache(tuple(new_k), tuple(new_v), bounds, suffix.augmented)
        return (self.logits(h), suffix, h) if return_hidden else (self.logits(h), suffix)
