"""Hugging Face checkpoints in and out: the one table between HF tensor names and laserjax paths.

Loading reads safetensors (single file or sharded with `model.safetensors.index.json`, fp32 or bf16)
without torch. With a mesh, every parameter is built by `jax.make_array_from_callback` from slices
of the file, so each device reads only its shard: a 7B model is never gathered on one device.
Nothing loads partially: a missing, mis-shaped or unexpected tensor is an error that names it.

Supported config.json fields. Every field of transformers' (5.x) Qwen2 / Qwen2.5 and Llama /
Llama-3 configs that changes the forward is either computed as transformers computes it (parity
against the PyTorch model in tests/test_model.py) or refused by `TransformerConfig.from_hf` with an
error naming the field and its value. `save_pretrained` writes back what the model computes.

- `model_type`: `qwen2` (Qwen2, Qwen2.5) and `llama` (Llama 2 / 3, OctoThinker). Others refused,
  including those that reuse these classes with changes (qwen3's q/k norm, mistral, ...).
- `vocab_size`, `hidden_size`, `intermediate_size`, `num_hidden_layers`, `num_attention_heads`,
  `num_key_value_heads`, `head_dim` (may differ from hidden_size / heads): implemented.
- `hidden_act`: `silu` = `swish`, `gelu` (erf), `gelu_new` = `gelu_pytorch_tanh` (tanh
  approximation), `relu`. Others refused.
- `rms_norm_eps`, `tie_word_embeddings`: implemented.
- `attention_bias`: llama: q/k/v/o biases. qwen2: ignored, as transformers does (q/k/v biases
  always, never an o_proj bias).
- `mlp_bias`: llama: implemented. qwen2: ignored, as transformers does (never an MLP bias).
- `rope_theta`, `rope_parameters` / `rope_scaling` (a non-empty `rope_scaling` wins, as in
  transformers): `rope_type` `default`; `linear` (`factor`); `llama3` (`factor`,
  `low_freq_factor`, `high_freq_factor`, `original_max_position_embeddings`, which defaults to
  `max_position_embeddings`). `dynamic`, `yarn`, `longrope` and every other type refused.
- `partial_rotary_factor` (top level or in the rope dict): 1.0 only; other values refused.
- `use_sliding_window`, `layer_types`: full attention only. `use_sliding_window: true` or a
  `layer_types` entry other than `full_attention` is refused; `sliding_window` and
  `max_window_layers` have no effect without them (as in transformers).
- `attention_dropout`: 0 only (laserjax has no dropout); other values refused.
- `quantization_config`: refused (load the unquantized weights).
- `pretraining_tp`: accepted and ignored; transformers 5 ignores it too (it only split matmuls).
- `max_position_embeddings`: no effect on the forward for the supported rope types.

Fields with no effect on the forward (token ids, `initializer_range`, `use_cache`, `dtype`,
`architectures`, ...) are ignored. These configs have no attention or logit scaling field:
scores are scaled by head_dim^-0.5 and logits are not scaled, as in transformers.
"""

from __future__ import annotations

import argparse
import json
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from laserjax.model.transformer import Transformer, TransformerConfig, to_dtype
from laserjax.sharding import path_str, spec_for

# laserjax path (nnx state, "/"-joined)     Hugging Face tensor name                  transform
# "T": HF stores Linear weights [out, in]; laserjax kernels are [in, out].
HF_TABLE: tuple[tuple[str, str, str | None], ...] = (
    ("embed_tokens/embedding", "model.embed_tokens.weight", None),
    ("layers/{i}/input_layernorm/weight", "model.layers.{i}.input_layernorm.weight", None),
    ("layers/{i}/self_attn/q_proj/kernel", "model.layers.{i}.self_attn.q_proj.weight", "T"),
    ("layers/{i}/self_attn/q_proj/bias", "model.layers.{i}.self_attn.q_proj.bias", None),
    ("layers/{i}/self_attn/k_proj/kernel", "model.layers.{i}.self_attn.k_proj.weight", "T"),
    ("layers/{i}/self_attn/k_proj/bias", "model.layers.{i}.self_attn.k_proj.bias", None),
    ("layers/{i}/self_attn/v_proj/kernel", "model.layers.{i}.self_attn.v_proj.weight", "T"),
    ("layers/{i}/self_attn/v_proj/bias", "model.layers.{i}.self_attn.v_proj.bias", None),
    ("layers/{i}/self_attn/o_proj/kernel", "model.layers.{i}.self_attn.o_proj.weight", "T"),
    ("layers/{i}/self_attn/o_proj/bias", "model.layers.{i}.self_attn.o_proj.bias", None),
    (
        "layers/{i}/post_attention_layernorm/weight",
        "model.layers.{i}.post_attention_layernorm.weight",
        None,
    ),
    ("layers/{i}/mlp/gate_proj/kernel", "model.layers.{i}.mlp.gate_proj.weight", "T"),
    ("layers/{i}/mlp/gate_proj/bias", "model.layers.{i}.mlp.gate_proj.bias", None),
    ("layers/{i}/mlp/up_proj/kernel", "model.layers.{i}.mlp.up_proj.weight", "T"),
    ("layers/{i}/mlp/up_proj/bias", "model.layers.{i}.mlp.up_proj.bias", None),
    ("layers/{i}/mlp/down_proj/kernel", "model.layers.{i}.mlp.down_proj.weight", "T"),
    ("layers/{i}/mlp/down_proj/bias", "model.layers.{i}.mlp.down_proj.bias", None),
    ("norm/weight", "model.norm.weight", None),
    ("lm_head/kernel", "lm_head.weight", "T"),
)

# Tensors a checkpoint may carry that laserjax derives instead of loading.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_names(cfg: TransformerConfig) -> dict[str, tuple[str, str | None]]:
    """laserjax path -> (HF name, transform) for every parameter of this architecture."""
    out = {}
    for path, hf, transform in HF_TABLE:
        layers = range(cfg.num_layers) if "{i}" in path else [None]
        for i in layers:
            out[path.format(i=i)] = (hf.format(i=i), transform)
    return out


def _state_paths(state: nnx.State) -> dict[str, jax.Array | jax.ShapeDtypeStruct]:
    return {path_str(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(state)}


def resolve_checkpoint(path_or_id: str) -> pathlib.Path:
    """A local checkpoint directory, or a hub id downloaded (config, weights, tokenizer).
    `laserjax.model.fetch.resolve_model` adds `gguf:<name>` in front of this."""
    p = pathlib.Path(path_or_id).expanduser()
    if p.is_dir():
        return p
    if p.exists() or path_or_id.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model path {path_or_id!r} is not a checkpoint directory")
    from huggingface_hub import snapshot_download

    try:
        return pathlib.Path(
            snapshot_download(
                path_or_id,
                allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"],
            )
        )
    except Exception as e:  # the hub's own errors are many; say what was asked for
        raise FileNotFoundError(
            f"model {path_or_id!r} is neither a local directory nor a downloadable hub id: {e}"
        ) from e


def special_token_ids(
    ckpt_dir: pathlib.Path, tokenizer: Any, *, eos_ids: tuple[int, ...] = (), pad_id: int = -1
) -> tuple[tuple[int, ...], int]:
    """(EOS ids, pad id) of a checkpoint; explicit values win.

    EOS: `eos_ids` if given, else generation_config.json's `eos_token_id` (chat models list two),
    else config.json's, else the tokenizer's. Pad: `pad_id` if >= 0, else the tokenizer's pad,
    else the first EOS id.
    """
    eos = tuple(int(e) for e in eos_ids)
    for name in () if eos else ("generation_config.json", "config.json"):
        f = pathlib.Path(ckpt_dir) / name
        value = json.loads(f.read_text()).get("eos_token_id") if f.is_file() else None
        if value is not None:
            eos = tuple(int(e) for e in value) if isinstance(value, list) else (int(value),)
            break
    if not eos and tokenizer is not None and tokenizer.eos_token_id is not None:
        eos = (int(tokenizer.eos_token_id),)
    if not eos:
        raise ValueError(
            f"checkpoint {str(ckpt_dir)!r}: no EOS id in generation_config.json, "
            "config.json or the tokenizer; set `tokens.eos_ids` (--eos-ids)"
        )
    if pad_id < 0:
        tok_pad = None if tokenizer is None else tokenizer.pad_token_id
        pad_id = int(tok_pad) if tok_pad is not None else eos[0]
    return eos, pad_id


class _SafetensorsReader:
    """Random access to the tensors of a single or sharded safetensors checkpoint."""

    def __init__(self, ckpt_dir: pathlib.Path):
        from safetensors import safe_open

        index = ckpt_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (ckpt_dir / "model.safetensors").is_file():
            weight_map = None
        else:
            raise FileNotFoundError(
                f"no model.safetensors or model.safetensors.index.json in "
                f"{str(ckpt_dir)!r} (laserjax reads safetensors only)"
            )
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        self._handles = {f: safe_open(str(ckpt_dir / f), framework="np") for f in files}
        self._where = {}
        for f, h in self._handles.items():
            for name in h.keys():
                self._where[name] = f

    def names(self) -> set[str]:
        return set(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return self._handles[self._where[name]].get_slice(name).get_dtype()

    def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
        sl = self._handles[self._where[name]].get_slice(name)
        return sl[index] if index is not None else sl[:]


_SUPPORTED_FILE_DTYPES = ("F32", "BF16", "F16")


def load_pretrained(
    path_or_id: str,
    *,
    dtype: str = "float32",
    param_dtype: str = "float32",
    remat: bool = False,
    attention_impl: str = "blocked",
    mesh: Mesh | None = None,
) -> Transformer:
    """Load a Hugging Face Qwen2/Llama checkpoint (directory or hub id) into a `Transformer`.

    With `mesh`, each parameter is created directly with its sharding from the rule table in
    `laserjax.sharding`, reading only the slice each device holds.
    """
    ckpt = resolve_checkpoint(path_or_id)
    cfg = TransformerConfig.from_pretrained_dir(
        ckpt, dtype=dtype, param_dtype=param_dtype, remat=remat, attention_impl=attention_impl
    )
    reader = _SafetensorsReader(ckpt)
    pdt = to_dtype(param_dtype)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    expected = _state_paths(abstract)
    table = hf_names(cfg)

    available = reader.names()
    used = set()
    loaders: dict[str, Callable] = {}
    for path, leaf in expected.items():
        hf, transform = table[path]
        if hf not in available:
            raise ValueError(
                f"checkpoint {str(ckpt)!r} has no tensor `{hf}` (needed for "
                f"laserjax parameter `{path}`); is the config's architecture right?"
            )
        file_dtype = reader.dtype(hf)
        if file_dtype not in _SUPPORTED_FILE_DTYPES:
            raise ValueError(
                f"tensor `{hf}` has dtype {file_dtype}; laserjax loads "
                f"{', '.join(_SUPPORTED_FILE_DTYPES)}"
            )
        shape = reader.shape(hf)
        want = tuple(leaf.shape)
        got = shape[::-1] if transform == "T" else shape
        if got != want:
            raise ValueError(
                f"tensor `{hf}` has shape {list(shape)}, but config.json implies "
                f"{list(want[::-1] if transform == 'T' else want)} for `{path}`"
            )
        used.add(hf)
        loaders[path] = _slice_loader(reader, hf, transform, pdt)
    extra = {n for n in available - used if not n.endswith(_IGNORED_SUFFIXES)}
    if cfg.tie_word_embeddings:
        extra.discard("lm_head.weight")  # some tied checkpoints store the tied copy too
    if extra:
        raise ValueError(
            f"checkpoint {str(ckpt)!r} has tensors laserjax does not map: "
            f"{sorted(extra)[:8]}{' ...' if len(extra) > 8 else ''}; is "
            "`model_type` in config.json right?"
        )

    if mesh is not None:

        def build(path, leaf):
            sharding = jax.sharding.NamedSharding(mesh, spec_for(path, tuple(leaf.shape), mesh))
            return jax.make_array_from_callback(tuple(leaf.shape), sharding, loaders[path])
    else:

        def build(path, leaf):
            return jnp.asarray(loaders[path](None))

    state = jax.tree_util.tree_map_with_path(lambda p, leaf: build(path_str(p), leaf), abstract)
    return nnx.merge(graphdef, state)


def _slice_loader(reader: _SafetensorsReader, hf: str, transform: str | None, pdt: jnp.dtype):
    def load(index: tuple[slice, ...] | None) -> np.ndarray:
        if index is not None and transform == "T":
            index = index[::-1]
        arr = reader.read(hf, index)
        if transform == "T":
            arr = arr.T
        return np.ascontiguousarray(arr.astype(pdt))

    return load


EXPORT_INFO_FILE = "laserjax.json"
"""Written by the trainer beside an exported policy: what `generate`, `eval` and `calibrate` need
to score it as it was trained (z_c, c_ref, beta_v, prompt template, reward, EOS/pad, dtype)."""


def write_export_info(out_dir: str | pathlib.Path, info: dict) -> None:
    """Write `laserjax.json` into an exported model directory (process 0 only)."""
    if jax.process_index() == 0:
        path = pathlib.Path(out_dir) / EXPORT_INFO_FILE
        path.write_text(json.dumps(info, indent=2) + "\n")


def read_export_info(model: str | pathlib.Path | None) -> dict:
    """The `laserjax.json` of a local model directory written by the trainer, else {} (a hub id,
    or a checkpoint laserjax did not export)."""
    if not model:
        return {}
    path = pathlib.Path(model) / EXPORT_INFO_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def with_export_defaults(
    args: argparse.Namespace, table: dict[str, tuple[str, object]]
) -> argparse.Namespace:
    """`args` (an argparse Namespace) with each flag left at None filled from the model's
    `laserjax.json` (`table`: flag attribute -> (key in laserjax.json, fallback))."""
    info = read_export_info(getattr(args, "model", None))
    values = dict(vars(args))
    for attr, (key, fallback) in table.items():
        if values.get(attr) is None:
            values[attr] = info[key] if info.get(key) is not None else fallback
    return type(args)(**values)


def save_pretrained(
    model: Transformer,
    out_dir: str | pathlib.Path,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = 4 << 30,
    extra_config: dict | None = None,
) -> pathlib.Path:
    """Write `config.json` + safetensors that `AutoModelForCausalLM.from_pretrained` loads.

    Tied embeddings write no `lm_head.weight`. Arrays are gathered to the host (on several hosts
    every process gathers; only process 0 writes).
    """
    from safetensors.numpy import save_file

    cfg = model.cfg
    out = pathlib.Path(out_dir)
    dtype = dtype or cfg.param_dtype
    np_dtype = to_dtype(dtype)
    table = hf_names(cfg)
    flat = _state_paths(nnx.state(model, nnx.Param))
    tensors = {}
    for path, leaf in flat.items():
        hf, transform = table[path]
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            arr = np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
        else:
            arr = np.asarray(jax.device_get(leaf))
        arr = arr.T if transform == "T" else arr
        tensors[hf] = np.ascontiguousarray(arr.astype(np_dtype))
    if jax.process_index() != 0:
        return out
    out.mkdir(parents=True, exist_ok=True)
    hf_cfg = cfg.to_hf() | {"dtype": dtype, "torch_dtype": dtype} | (extra_config or {})
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2))

    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / fname), metadata={"format": "pt"})
            weight_map |= {n: fname for n in shard}
        total = sum(t.nbytes for t in tensors.values())
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    return out
