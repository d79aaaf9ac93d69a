"""The paper's model shapes, as their Hugging Face `config.json` fields (only the shape matters:
no weights, no download). One source for `python -m laserjax plan` and the GPU benchmarks; plain
data, importable without jax."""

from __future__ import annotations

import re
from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    # Hugging Face config.json fields of the paper's models (only the shape matters here).
    "Qwen2.5-7B": dict(
        model_type="qwen2",
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        tie_word_embeddings=False,
        rope_theta=1e6,
        max_position_embeddings=131072,
    ),
    "Qwen2.5-1.5B": dict(
        model_type="qwen2",
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rope_theta=1e6,
        max_position_embeddings=131072,
    ),
    "Qwen2.5-0.5B": dict(
        model_type="qwen2",
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rope_theta=1e6,
        max_position_embeddings=131072,
    ),
    # OctoThinker-3B continues Llama-3.2-3B: the same shape (RoPE scaling is irrelevant here).
    "OctoThinker-3B": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=True,
        rope_theta=500000.0,
        max_position_embeddings=131072,
    ),
}

_PRESET_PATTERNS: tuple[tuple[str, str], ...] = (
    # (regex searched in the lower-cased model.path, preset); Instruct / Math / ORZ variants of a
    # size share its shape.
    (r"qwen2\.5-(math-)?7b|open-reasoner-zero-7b", "Qwen2.5-7B"),
    (r"qwen2\.5-(math-)?1\.5b", "Qwen2.5-1.5B"),
    (r"qwen2\.5-0\.5b", "Qwen2.5-0.5B"),
    (r"octothinker-3b|llama-3\.2-3b", "OctoThinker-3B"),
)


def preset_for(model_path: str) -> str | None:
    low = model_path.lower()
    for pattern, preset in _PRESET_PATTERNS:
        if re.search(pattern, low):
            return preset
    return None


def shape(name: str) -> dict[str, int]:
    """A preset's shape in `laserjax.model.TransformerConfig`'s field names."""
    hf = PRESETS[name]
    heads = hf["num_attention_heads"]
    return dict(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_heads=heads,
        num_kv_heads=hf["num_key_value_heads"],
        head_dim=hf.get("head_dim", hf["hidden_size"] // heads),
        vocab_size=hf["vocab_size"],
    )
