"""Tiny random Hugging Face models built in-process (transformers + torch) for parity tests."""

from __future__ import annotations

import pathlib

TINY = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    # Large enough that logits are O(1-10): a 1e-4 tolerance must be able to fail.
    initializer_range=0.2,
)

KINDS = {
    "qwen2_tied": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen2_untied": ("qwen2", dict(tie_word_embeddings=False, rope_theta=1e6)),
    # Llama-3.1/3.2 style RoPE scaling, with a original context of 512 so all three branches of the
    # frequency ramp is exercised at head_dim 8.
    "llama3": (
        "llama",
        dict(
            tie_word_embeddings=False,
            rope_theta=500000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=512,
            ),
        ),
    ),
    # head_dim (12) != hidden / heads (32 / 4 = 8).
    "qwen2_head_dim": ("qwen2", dict(tie_word_embeddings=True, head_dim=12)),
    # pretraining_tp: transformers 5 ignores it, and so does laserjax.
    "llama_bias": (
        "llama",
        dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True, pretraining_tp=2),
    ),
    # The exact (erf) GELU, linear RoPE scaling and Llama-3's rms_norm_eps.
    "llama_gelu_linear": (
        "llama",
        dict(
            tie_word_embeddings=False,
            hidden_act="gelu",
            rms_norm_eps=1e-5,
            rope_scaling=dict(rope_type="linear", factor=4.0),
        ),
    ),
    # transformers' Qwen2 reads neither field (q/k/v biases always, no o_proj or MLP bias).
    "qwen2_bias_fields": (
        "qwen2",
        dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    ),
}


def make_tiny_hf(
    tmp_path: pathlib.Path,
    kind: str = "qwen2_tied",
    *,
    seed: int = 0,
    dtype: str = "float32",
    **overrides,
) -> pathlib.Path:
    """Save a tiny random `kind` model (see KINDS) to tmp_path/kind and return the directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    family, extra = KINDS[kind]
    cfg_cls, model_cls = (
        (Qwen2Config, Qwen2ForCausalLM) if family == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    )
    torch.manual_seed(seed)
    cfg = cfg_cls(**(TINY | extra | overrides))
    model = model_cls(cfg).eval()
    # Random init leaves norms at 1 and biases at 0: perturb them so the parity test sees them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    model = model.to(getattr(torch, dtype))
    out = pathlib.Path(tmp_path) / kind
    model.save_pretrained(out)
    return out


def load_hf_torch(path: pathlib.Path, dtype: str = "float32"):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
