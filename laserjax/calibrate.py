"""Measuring c_ref, the self-reward's reference constant (`python -m laserjax calibrate`, in
`laserjax.commands.calibrate`).

LASER_SPEC section 1: r_s = beta_v * (log pi_theta(z_c | x, y, <eos>) - c_ref), with c_ref the
mean of log pi_ref(z_c | x, y, <eos>) under the starting model. Every model has its own value
(the paper: -23.11 +- 0.04 for Qwen2.5-7B, -24.87 +- 1.18 for OctoThinker-3B over 300 pairs); it
must be measured, not copied.

    python -m laserjax calibrate --model Qwen/Qwen2.5-7B --data pairs.jsonl --n 300

Each pair (x, y) is a prompt (built with the training prompt template from the problem text)
and a response: given in the jsonl, or, for rows without one, sampled from the model itself with
`laserjax.sampler.Sampler` (truncated samples are dropped: training never scores them). The
response gets EOS appended unless it ends with one; then one teacher-forced forward over
`x, y, <eos>` gives log_softmax(raw logits at the EOS position)[z_c], in batches.

Two warnings guard the assumptions of the closed form:

- std > STD_WARN (1 nat): log pi_ref(z_c) depends on the response, so one constant c_ref puts
  different responses' r_s at different offsets before training starts (OctoThinker's 1.18 is
  over; the paper still trained it, but the MSE then has work to do at step 0);
- pi_ref(z_c) * e^(1 / beta_v) > Z_WARN (0.01) for some pair: the derivation takes log Z ~ 0,
  which needs pi_ref(z_c) * e^(1/beta_v) << 1 (section 1); otherwise the optimum of a correct
  solution, log-prob c_ref + 1/beta_v, is no longer a token the model never samples.
"""

from __future__ import annotations

import math
import pathlib
import random
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from laserjax import sharding
from laserjax.config import token_id_problem
from laserjax.data import BadRow, read_jsonl
from laserjax.laser import positions_from_mask, token_logprobs
from laserjax.model.transformer import Transformer
from laserjax.sampler import Sampler

STD_WARN = 1.0
"""Warn when the std of log pi_ref(z_c) over pairs exceeds this many nats."""
Z_WARN = 0.01
"""Warn when pi_ref(z_c) * e^(1/beta_v) exceeds this for some pair (log Z ~ 0 fails)."""


# ---------------------------------------------------------------------------------------------
# The measurement.


def _eos_terminated(response: Sequence[int], eos_ids: tuple[int, ...]) -> list[int]:
    """The response with the first EOS id appended unless its last token is an EOS."""
    out = [int(t) for t in response]
    return out if out and out[-1] in eos_ids else [*out, eos_ids[0]]


def _bucket(length: int) -> int:
    """Padded sequence length: a power of two (>= 16), so a run compiles a handful of shapes."""
    return max(16, 1 << (length - 1).bit_length())


def _make_forward(model: Transformer, z_token_id: int):
    """jit: (params, tokens_bl, mask_bl, eos_pos_b) -> log p(z_c) at each row's EOS position."""
    graphdef, params = nnx.split(model)

    @jax.jit
    def forward(params, tokens_bl, mask_bl, eos_pos_b):
        m = nnx.merge(graphdef, params)
        positions_bl = positions_from_mask(mask_bl)
        h_bld = m.hidden(tokens_bl, positions_bl, mask_bl)
        h_bd = jnp.take_along_axis(h_bld, eos_pos_b[:, None, None], axis=1)[:, 0]
        z_b = jnp.full(eos_pos_b.shape, z_token_id, jnp.int32)
        # Raw logits, never temperature-scaled (LASER_SPEC section 1).
        return token_logprobs(m.logits(h_bd), z_b, 1.0)

    return forward, params


def measure_c_ref(
    model: Transformer,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    *,
    eos_id: int | Sequence[int],
    z_token_id: int,
    batch_size: int = 8,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[float, float, np.ndarray]:
    """(mean, std, values) of log pi(z_c | x, y, <eos>) over pairs (LASER_SPEC section 1).

    `eos_id`: one EOS id or several; a response that does not end with one of them gets the
    first appended. Sequences `prompt, response, <eos>` run right-padded in batches of
    `batch_size` (sorted by length, padded to a power of two; the batch is split over `mesh`'s
    data and fsdp axes when given). `values` are float64, in the order of the pairs; `std` is
    the population std (ddof 0).
    """
    eos_ids = (int(eos_id),) if isinstance(eos_id, int | np.integer) else tuple(map(int, eos_id))
    vocab = model.cfg.vocab_size
    if not eos_ids:
        raise ValueError("measure_c_ref: `eos_id` is empty; give the model's EOS id")
    if len(prompt_ids) != len(response_ids):
        raise ValueError(
            f"measure_c_ref: {len(prompt_ids)} prompts but {len(response_ids)} "
            "responses; pass one response per prompt"
        )
    if not prompt_ids:
        raise ValueError("measure_c_ref: no pairs given")
    problem = token_id_problem(z_token_id, eos_ids, vocab_size=vocab)
    if problem is not None:
        arg = {"self_reward_token_id": "z_token_id", "eos_ids": "eos_id"}[problem[0]]
        raise ValueError(f"measure_c_ref: {arg}: {problem[1]}")
    if batch_size < 1:
        raise ValueError(f"measure_c_ref: batch_size must be >= 1, got {batch_size}")
    seqs = []
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids, strict=True)):
        if len(p) == 0:
            raise ValueError(f"measure_c_ref: prompt {i} is empty; every pair needs a prompt")
        seq = [int(t) for t in p] + _eos_terminated(r, eos_ids)
        bad = [t for t in seq if not 0 <= t < vocab]
        if bad:
            raise ValueError(
                f"measure_c_ref: pair {i} has token {bad[0]} outside the "
                f"vocabulary [0, {vocab}); was it tokenised for another model?"
            )
        seqs.append(seq)

    if mesh is not None:
        shards = sharding.batch_shards(mesh)
        batch_size = -(-batch_size // shards) * shards
    forward, params = _make_forward(model, z_token_id)
    if mesh is not None:
        params = jax.device_put(params, sharding.state_shardings(params, mesh))
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    values = np.zeros(len(seqs), np.float64)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        length = _bucket(len(seqs[idx[0]]))
        tokens = np.zeros((batch_size, length), np.int32)
        mask = np.zeros((batch_size, length), bool)
        mask[:, 0] = True  # filler rows (a short last batch) get one token; never read
        eos_pos = np.zeros(batch_size, np.int32)
        for row, i in enumerate(idx):
            n = len(seqs[i])
            tokens[row, :n] = seqs[i]
            mask[row, :n] = True
            eos_pos[row] = n - 1
        arrays = [jnp.asarray(x) for x in (tokens, mask, eos_pos)]
        if mesh is not None:
            arrays = [jax.device_put(x, sharding.batch_sharding(mesh, x.ndim)) for x in arrays]
        logp = np.asarray(jax.device_get(forward(params, *arrays)), np.float64)
        values[idx] = logp[: len(idx)]
    return float(values.mean()), float(values.std()), values


def calibration_warnings(values: np.ndarray, beta_v: float) -> list[str]:
    """The module docstring's two checks on measured log pi_ref(z_c) values."""
    out = []
    std = float(np.std(values))
    if std > STD_WARN:
        out.append(
            f"the std of log pi_ref(z_c) is {std:.2f} nats (> {STD_WARN:g}): z_c's "
            "reference probability depends on the response, so a constant c_ref starts "
            "different responses at different r_s; check the pairs (template, EOS) and "
            "consider a rarer z_c token"
        )
    z_mass = np.exp(values + 1.0 / beta_v)
    over = int((z_mass > Z_WARN).sum())
    if over:
        out.append(
            f"pi_ref(z_c) * e^(1/beta_v) reaches {float(z_mass.max()):.3g} (> {Z_WARN:g}) "
            f"on {over} of {values.size} pairs (at the mean: "
            f"{math.exp(float(values.mean()) + 1.0 / beta_v):.3g}): log Z ~ 0 does not "
            "hold (LASER_SPEC section 1); choose a token the model gives less mass, or a "
            "smaller 1/beta_v"
        )
    return out


def sample_responses(
    model: Transformer,
    prompts: list[list[int]],
    *,
    eos_ids: tuple[int, ...],
    pad_id: int,
    z_token_id: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    mesh: Mesh | None,
) -> tuple[list[list[int] | None], list[float | None]]:
    """One sample per prompt: its tokens (EOS included) and the sampler's own log p(z_c), or
    None for both when it was truncated."""
    sampler = Sampler(
        model,
        eos_ids=eos_ids,
        pad_id=pad_id,
        self_reward_token_id=z_token_id,
        max_new_tokens=max_new_tokens,
        max_prompt_len=max(map(len, prompts)),
        mesh=mesh,
    )
    out = sampler.sample(prompts, k=1, temperature=temperature, seed=seed)
    responses, logps = [], []
    for i in range(len(prompts)):
        if out.finished[i]:
            responses.append(out.response_tokens[i, : out.lengths[i]].tolist())
            logps.append(float(out.logp_zc[i]))
        else:
            responses.append(None)
            logps.append(None)
    return responses, logps


# ---------------------------------------------------------------------------------------------
# Pairs from a jsonl.


def read_pairs(
    path: pathlib.Path, prompt_field: str, response_field: str, n: int, seed: int
) -> tuple[list[tuple[str, str | None]], dict[str, Any]]:
    """Up to `n` (problem, response or None) rows, sampled with `seed` when there are more.

    Rows without a usable prompt, and lines that are not JSON or not UTF-8, are skipped and
    counted with their line numbers; a row whose response field is missing or null gets None
    (the response is generated).
    """
    rows, skipped = [], []
    for line_no, record in read_jsonl(path):  # a non-JSON or non-UTF-8 line is one bad row
        if isinstance(record, BadRow):
            skipped.append((line_no, record.reason))
            continue
        if not isinstance(record, dict):
            skipped.append((line_no, "not a JSON object"))
            continue
        prompt = record.get(prompt_field)
        if not isinstance(prompt, str) or not prompt.strip():
            skipped.append((line_no, f"no `{prompt_field}` text"))
            continue
        response = record.get(response_field)
        if response is not None and not isinstance(response, str):
            skipped.append((line_no, f"`{response_field}` is not a string"))
            continue
        rows.append((prompt, response))
    if not rows:
        raise ValueError(
            f"{path}: no row has a `{prompt_field}` string (skipped "
            f"{len(skipped)}: {skipped[:3]}); set --prompt-field to the field "
            "holding the problem text"
        )
    if len(rows) > n:
        rows = random.Random(seed).sample(rows, n)
    return rows, {"rows_skipped": len(skipped), "skipped_examples": skipped[:5]}
