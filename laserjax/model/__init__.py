"""The policy network and its Hugging Face weight mapping."""

from laserjax.model.transformer import (
    PrefixCache,
    SuffixCache,
    Transformer,
    TransformerConfig,
)

__all__ = ["PrefixCache", "SuffixCache", "Transformer", "TransformerConfig"]
