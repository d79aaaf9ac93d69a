"""llama.cpp GGUF checkpoints in: the GGUF -> laserjax name table, dequantisation, HF export.

A GGUF file carries the weights (quantised), the architecture (`llama.*` metadata) and the
tokenizer with its chat template. `load_gguf` builds a laserjax `Transformer` from it directly;
`export_hf` writes a Hugging Face directory (config.json, model.safetensors, tokenizer files,
generation_config.json) that every other laserjax command and transformers load.

Two things differ from a Hugging Face checkpoint:

- llama.cpp's converter permutes the rows of the Q and K projections (it pairs rotary halves
  differently: interleaved instead of rotate-half). `_unpermute_qk` undoes it per head, as
  transformers' GGUF loader (`LlamaTensorProcessor._reverse_permute_weights`) does.
- Tensors are stored as ggml types; `gguf.dequantize` turns the supported ones into float32. Other
  types and architectures are refused by name before anything is built.

Where the model comes from: `python -m laserjax fetch-model` (`laserjax.model.fetch`).
"""

from __future__ import annotations

import functools
import json
import pathlib
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from laserjax.model.hf_params import save_pretrained
from laserjax.model.transformer import Transformer, TransformerConfig, to_dtype
from laserjax.sharding import path_str

if TYPE_CHECKING:  # transformers loads on first use only
    from transformers import PreTrainedTokenizerFast

# laserjax path (nnx state, "/"-joined)         GGUF tensor name          transform
# GGUF (numpy view) stores Linear weights [out, in] like HF, so "T" as in hf_params.HF_TABLE;
# "Q" / "K": undo llama.cpp's rotary row permutation (with num_heads / num_kv_heads) first.
GGUF_TABLE: tuple[tuple[str, str, str | None], ...] = (
    ("embed_tokens/embedding", "token_embd.weight", None),
    ("layers/{i}/input_layernorm/weight", "blk.{i}.attn_norm.weight", None),
    ("layers/{i}/self_attn/q_proj/kernel", "blk.{i}.attn_q.weight", "QT"),
    ("layers/{i}/self_attn/k_proj/kernel", "blk.{i}.attn_k.weight", "KT"),
    ("layers/{i}/self_attn/v_proj/kernel", "blk.{i}.attn_v.weight", "T"),
    ("layers/{i}/self_attn/o_proj/kernel", "blk.{i}.attn_output.weight", "T"),
    ("layers/{i}/post_attention_layernorm/weight", "blk.{i}.ffn_norm.weight", None),
    ("layers/{i}/mlp/gate_proj/kernel", "blk.{i}.ffn_gate.weight", "T"),
    ("layers/{i}/mlp/up_proj/kernel", "blk.{i}.ffn_up.weight", "T"),
    ("layers/{i}/mlp/down_proj/kernel", "blk.{i}.ffn_down.weight", "T"),
    ("norm/weight", "output_norm.weight", None),
    ("lm_head/kernel", "output.weight", "T"),
)

SUPPORTED_ARCHITECTURES = ("llama",)
SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
"""ggml types laserjax dequantises (all through `gguf.dequantize`, tested on Q4_1 / Q8_0 / F32)."""


class GGUFError(ValueError):
    """A GGUF file laserjax cannot load; the message names the field or tensor."""


@functools.lru_cache(maxsize=4)
def _reader(path: str):
    try:
        from gguf import GGUFReader
    except ImportError as e:  # a runtime requirement; say which one
        raise ImportError("reading GGUF needs the `gguf` package: pip install gguf") from e
    return GGUFReader(path)


def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _require(reader, path: str, key: str) -> Any:
    value = _field(reader, key)
    if value is None:
        raise GGUFError(f"GGUF {path!r} has no metadata field `{key}`")
    return value


def gguf_config(path: str | pathlib.Path, **overrides: Any) -> TransformerConfig:
    """The `TransformerConfig` written in a GGUF file's `<arch>.*` metadata."""
    path = str(path)
    r = _reader(path)
    arch = _require(r, path, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(
            f"GGUF {path!r}: architecture {arch!r} is not supported; laserjax loads "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} GGUF files"
        )
    a = arch + "."
    num_heads = int(_require(r, path, a + "attention.head_count"))
    hidden = int(_require(r, path, a + "embedding_length"))
    head_dim = int(_field(r, a + "rope.dimension_count", hidden // num_heads))
    if _field(r, a + "rope.scaling.type", "none") not in ("none",):
        raise GGUFError(
            f"GGUF {path!r}: `{a}rope.scaling.type` is "
            f"{_field(r, a + 'rope.scaling.type')!r}; laserjax reads unscaled rope from GGUF"
        )
    tensor_names = {t.name for t in r.tensors}
    vocab = _field(r, a + "vocab_size")
    if vocab is None:
        vocab = len(_require(r, path, "tokenizer.ggml.tokens"))
    kwargs = dict(
        model_type="llama",
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(_require(r, path, a + "feed_forward_length")),
        num_layers=int(_require(r, path, a + "block_count")),
        num_heads=num_heads,
        num_kv_heads=int(_field(r, a + "attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        rope_theta=float(_field(r, a + "rope.freq_base", 10000.0)),
        rms_norm_eps=float(_require(r, path, a + "attention.layer_norm_rms_epsilon")),
        # llama.cpp writes no `output.weight` when the LM head is the embedding.
        tie_word_embeddings="output.weight" not in tensor_names,
        max_position_embeddings=int(_field(r, a + "context_length", 2048)),
    )
    return TransformerConfig(**(kwargs | overrides))


def gguf_names(cfg: TransformerConfig) -> dict[str, tuple[str, str | None]]:
    """laserjax path -> (GGUF name, transform) for every parameter of this architecture."""
    out = {}
    for path, name, transform in GGUF_TABLE:
        for i in range(cfg.num_layers) if "{i}" in path else [None]:
            out[path.format(i=i)] = (name.format(i=i), transform)
    return out


def _unpermute_qk(w_oi: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's `permute` of Q/K rows ([out, in]): per head, rows (d/2, 2) -> (2, d/2)."""
    half = w_oi.shape[0] // n_head // 2
    return w_oi.reshape(n_head, half, 2, *w_oi.shape[1:]).swapaxes(1, 2).reshape(w_oi.shape)


def _dequantized(path: str, name: str) -> np.ndarray:
    """A tensor as float32 numpy in the HF layout ([out, in] for Linear weights)."""
    from gguf import dequantize

    t = _tensors(path)[name]
    kind = t.tensor_type.name
    if kind not in SUPPORTED_TENSOR_TYPES:
        raise GGUFError(
            f"GGUF {path!r}: tensor `{name}` has ggml type {kind}; laserjax dequantises "
            f"{', '.join(SUPPORTED_TENSOR_TYPES)}"
        )
    # GGUF lists dims innermost first; the numpy view (and HF) is the reverse.
    shape = tuple(int(d) for d in reversed(t.shape))
    return np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)


@functools.lru_cache(maxsize=4)
def _tensors(path: str) -> dict[str, Any]:
    return {t.name: t for t in _reader(path).tensors}


def load_gguf(
    path: str | pathlib.Path,
    *,
    dtype: str = "float32",
    param_dtype: str = "float32",
    remat: bool = False,
    num_layers: int | None = None,
) -> Transformer:
    """A `Transformer` with the GGUF file's weights, dequantised to `param_dtype`.

    `num_layers` keeps only the first n blocks (with the real embedding, final norm and head):
    the real weights and vocabulary at a fraction of the cost, for tests.
    """
    path = str(path)
    over: dict[str, Any] = dict(dtype=dtype, param_dtype=param_dtype, remat=remat)
    full = gguf_config(path)
    if num_layers is not None:
        if not 1 <= num_layers <= full.num_layers:
            raise GGUFError(f"num_layers={num_layers}: the file has 1..{full.num_layers} layers")
        over["num_layers"] = num_layers
    cfg = gguf_config(path, **over)
    names = _tensors(path)
    pdt = to_dtype(param_dtype)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    table = gguf_names(cfg)

    def build(p, leaf):
        key = path_str(p)
        name, transform = table[key]
        if name not in names:
            raise GGUFError(f"GGUF {path!r} has no tensor `{name}` (for `{key}`)")
        arr = _dequantized(path, name)
        if transform and transform[0] == "Q":
            arr = _unpermute_qk(arr, cfg.num_heads)
        elif transform and transform[0] == "K":
            arr = _unpermute_qk(arr, cfg.num_kv_heads)
        if transform and transform.endswith("T"):
            arr = arr.T
        if arr.shape != tuple(leaf.shape):
            raise GGUFError(
                f"GGUF {path!r}: tensor `{name}` gives shape {list(arr.shape)} for `{key}`, "
                f"the metadata implies {list(leaf.shape)}"
            )
        return jnp.asarray(np.ascontiguousarray(arr), dtype=pdt)

    state = jax.tree_util.tree_map_with_path(build, abstract)
    return nnx.merge(graphdef, state)


def load_tokenizer(path: str | pathlib.Path) -> PreTrainedTokenizerFast:
    """The file's tokenizer (vocabulary, merges, specials, chat template) as a transformers fast
    tokenizer, converted by transformers' own GGUF tokenizer converter."""
    from transformers import AutoTokenizer

    p = pathlib.Path(path)
    return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)


def special_ids(path: str | pathlib.Path) -> dict[str, int]:
    """BOS / EOS / pad ids from the `tokenizer.ggml.*` metadata (absent ones left out)."""
    r = _reader(str(path))
    out = {}
    for key, field in (
        ("bos", "bos_token_id"),
        ("eos", "eos_token_id"),
        ("pad", "padding_token_id"),
    ):
        value = _field(r, "tokenizer.ggml." + field)
        if value is not None:
            out[key] = int(value)
    return out


def export_hf(
    path: str | pathlib.Path, out_dir: str | pathlib.Path, *, dtype: str = "float32"
) -> pathlib.Path:
    """Write a Hugging Face checkpoint directory of a GGUF file: config.json and
    model.safetensors (dequantised, in `dtype`), the tokenizer with its chat template, and
    generation_config.json with the file's EOS (what `special_token_ids` reads)."""
    out = pathlib.Path(out_dir)
    model = load_gguf(path, dtype=dtype, param_dtype=dtype)
    ids = special_ids(path)
    save_pretrained(
        model, out, dtype=dtype, extra_config={k + "_token_id": v for k, v in ids.items()}
    )
    tok = load_tokenizer(path)
    tok.save_pretrained(str(out))
    gen = {k + "_token_id": v for k, v in ids.items() if k in ("bos", "eos")}
    (out / "generation_config.json").write_text(
        json.dumps(gen | {"pad_token_id": ids.get("pad")}, indent=2)
    )
    return out
