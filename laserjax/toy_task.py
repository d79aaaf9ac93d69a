"""The CPU demo's world: a synthetic verifiable task, an in-process tokenizer, a tiny policy.

The task is small integer arithmetic in two families, `"37+12="` -> `"49"` and `"37*6="` ->
`"222"`, graded by exact match. A character-level tokenizer (built with `tokenizers`, no download)
covers digits, `+`, `*`, `=`, and three specials: pad, EOS and the self-reward token z_c, which no
training target ever contains, so the policy gives it about e^-10 per token and practically never
emits it (LASER_SPEC section 1). A short supervised warm start teaches the format and part of
the arithmetic, so the policy starts with some answers right and some wrong: the signal both
GRPO and the self-verification loss need.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from laserjax.config import ToyConfig
from laserjax.data import Problem
from laserjax.model.transformer import Transformer, TransformerConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

PAD, EOS, ZC = "<pad>", "<eos>", "<zc>"
CHARS = "0123456789+*="


@functools.lru_cache(maxsize=1)
def make_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level `PreTrainedTokenizerFast`: ids 0, 1, 2 are pad, EOS and z_c."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast  # heavy: only when the toy task is built

    vocab = {PAD: 0, EOS: 1, ZC: 2} | {c: i + 3 for i, c in enumerate(CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, additional_special_tokens=[ZC]
    )


def token_ids() -> dict[str, int]:
    tok = make_tokenizer()
    return {"pad": tok.pad_token_id, "eos": tok.eos_token_id, "zc": tok.convert_tokens_to_ids(ZC)}


def model_config(toy: ToyConfig, **fields: Any) -> TransformerConfig:
    """The toy policy's architecture; `fields` set dtypes, remat and attention."""
    return TransformerConfig(
        model_type="qwen2",
        vocab_size=len(make_tokenizer()),
        hidden_size=toy.hidden_size,
        intermediate_size=toy.intermediate_size,
        num_layers=toy.num_layers,
        num_heads=toy.num_heads,
        num_kv_heads=toy.num_kv_heads,
        head_dim=toy.hidden_size // toy.num_heads,
        tie_word_embeddings=True,
        qkv_bias=True,
        max_position_embeddings=64,
        **fields,
    )


def problems(toy: ToyConfig) -> tuple[list[Problem], list[Problem]]:
    """Addition and multiplication problems, split into (train, held-out eval) at random.

    Two families of different difficulty for the tiny policy: it learns to add two numbers below
    50 well and to multiply by a digit less well. A policy that knows which of its answers it can
    trust has something to learn for the self-verification loss, as an LLM on a benchmark of mixed
    difficulty does.
    """
    pairs = [("+", a, b) for a in range(toy.max_operand + 1) for b in range(toy.max_operand + 1)]
    if toy.mul_max_operand:
        pairs += [("*", a, b) for a in range(toy.mul_max_operand + 1) for b in range(10)]
    order = np.random.default_rng(12345).permutation(len(pairs))
    every = []
    for i in order:
        op, a, b = pairs[i]
        answer = a + b if op == "+" else a * b
        every.append(Problem(id=f"{a}{op}{b}", problem=f"{a}{op}{b}=", answer=str(answer)))
    return every[toy.eval_problems :], every[: toy.eval_problems]


def warm_start(toy: ToyConfig, train: list[Problem], model: Transformer) -> dict[str, float]:
    """Supervised next-token training on `problem -> answer <eos>` (answer tokens only).

    Short on purpose: it stops with some answers right and some wrong so that RL has signal.
    """
    tok, ids = make_tokenizer(), token_ids()
    rng = np.random.default_rng(toy.sft_seed)
    enc = [(tok.encode(p.problem), tok.encode(p.answer) + [ids["eos"]]) for p in train]
    width = max(len(a) + len(b) for a, b in enc)
    tokens = np.full((len(enc), width), ids["pad"], np.int32)
    loss_mask = np.zeros((len(enc), width), bool)
    for i, (a, b) in enumerate(enc):
        tokens[i, : len(a) + len(b)] = a + b
        loss_mask[i, len(a) : len(a) + len(b)] = True
    valid = tokens != ids["pad"]
    positions = np.broadcast_to(np.arange(width), tokens.shape)

    tx = optax.adamw(toy.sft_learning_rate, weight_decay=0.0)
    graphdef, params = nnx.split(model, nnx.Param)
    data = tuple(jnp.asarray(x) for x in (tokens, valid, positions, loss_mask))

    def loss_fn(params, idx):
        tok_bt, valid_bt, pos_bt, mask_bt = (x[idx] for x in data)
        logits = nnx.merge(graphdef, params)(tok_bt[:, :-1], pos_bt[:, :-1], valid_bt[:, :-1])
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), tok_bt[:, 1:, None], -1)[..., 0]
        return jnp.sum(nll * mask_bt[:, 1:]) / jnp.sum(mask_bt[:, 1:])

    @jax.jit
    def run(params, idx_sb):  # every warm-start step in one compiled scan
        def body(carry, idx):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(loss_fn)(params, idx)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, _), losses = jax.lax.scan(body, (params, tx.init(params)), idx_sb)
        return params, losses

    loss = float("nan")
    if toy.sft_steps:
        params, losses = run(
            params, jnp.asarray(rng.integers(0, len(enc), (toy.sft_steps, toy.sft_batch)))
        )
        nnx.update(model, params)
        loss = float(losses[-1])
    return {"sft_final_loss": loss, "sft_steps": toy.sft_steps}


def build(toy: ToyConfig, *, seed: int, **fields: Any) -> tuple[Transformer, dict[str, float]]:
    """A freshly initialised tiny policy after its supervised warm start; `fields` are
    `TransformerConfig` fields (`ModelConfig.transformer_fields`)."""
    model = Transformer(model_config(toy, **fields), rngs=nnx.Rngs(seed))
    train, _ = problems(toy)
    return model, warm_start(toy, train, model)
