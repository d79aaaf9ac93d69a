"""The LaSeR and GRPO formulas (LASER_SPEC sections 1-5) as small pure `jnp` functions.

One job, the spec's formulas, in one file on purpose: someone checking the implementation against
the paper reads this module alone (STYLE "The algorithm as a readable module"). Its length is the
number of terms the spec has, not several concerns.

Read this module beside /work/shared/LASER_SPEC.md: each function is one term of the spec and cites
its section. Nothing here knows about models, sharding or the trainer (it imports jax only); every
function is jit-able, accepts numpy or jax arrays and does its math in float32 whatever the input
dtype. The sampler, the train step, evaluation and generation all take their formulas from here:
the log-probs (`token_logprobs`, `positions_from_mask`), the score r_s, self-verification, and the
objective L itself (`step_advantages`, `loss_counts`, `objective`, `objective_loss`), whose
named variants (`ALGORITHMS`: grpo, laser, dr_grpo, dapo) are registered defaults, not branches.

Conventions
-----------
- A "row" is one response. Rows come grouped as `[num_groups, K]` contiguous rows: row r belongs to
  group r // K (the sampler emits the K samples of a prompt next to each other). Suffix `_b` is a
  per-row array `[B]`, `_bt` a per-token array `[B, T]` over response positions.
- Masks (`finished_b`, `mask_bt`) may be bool or 0/1 float arrays.
- `r_v` (verifier reward) is 0 or 1; a row counts as correct when r_v > 0.5.
- Losses and metrics are `SumCount(total, count)` pairs: add the pairs of micro-batches together
  (`jax.tree.map(jnp.add, a, b)`) and divide once with `.value()`, so accumulation over
  micro-batches equals the full-batch computation (STYLE "Losses as (sum, denominator)").
  Every count here depends on data only, never on parameters, so the train step may also compute the
  full-batch counts first and differentiate `total / full_count` per micro-batch.
- Gradient accumulation and the MSE: class weights come from the *whole step batch*
  (`mse_class_weights` on all rows), the numerator from each micro-batch (`self_reward_mse` on that
  micro-batch's rows and weights); the counts of the micro-batches add up to N_c + N_i.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

# The one source of these names: config.py validates against them.
LossAggMode = Literal[
    "token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"
]
KLKind = Literal["k1", "k2", "low_var_kl"]

LOSS_AGG_MODES: tuple[str, ...] = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)
KL_KINDS: tuple[str, ...] = ("k1", "k2", "low_var_kl")


class SumCount(NamedTuple):
    """A loss or metric as (numerator, denominator), summable across micro-batches."""

    total: jax.Array
    count: jax.Array

    def value(self) -> jax.Array:
        """total / count, and 0 when count is 0 (an empty batch contributes nothing, never NaN)."""
        return _safe_div(self.total, self.count)


def finalize(metrics: dict[str, SumCount]) -> dict[str, jax.Array]:
    """Divide every (sum, count) pair once, after accumulation."""
    return {name: pair.value() for name, pair in metrics.items()}


# ---------------------------------------------------------------------------------------------
# Helpers


def _f32(x: jax.Array) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def _bool(mask: jax.Array) -> jax.Array:
    return jnp.asarray(mask).astype(bool)


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    # The double `where` keeps both the value and its gradient finite when den == 0.
    den = _f32(den)
    nonzero = den != 0
    return jnp.where(nonzero, _f32(num) / jnp.where(nonzero, den, 1.0), 0.0)


def _groups(x_b: jax.Array, group_size: int, name: str) -> jax.Array:
    """[B] -> [B // K, K]; shapes are static, so a bad size fails at trace time."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(
            f"group_size must be a python int >= 1 (K, rollout.samples_per_prompt), "
            f"got {group_size!r}"
        )
    if x_b.ndim != 1 or x_b.shape[0] % group_size:
        raise ValueError(
            f"`{name}` must be a 1-D per-row array whose length is a multiple of "
            f"group_size={group_size} (rows grouped as [num_groups, K]); got shape "
            f"{x_b.shape}"
        )
    return x_b.reshape(-1, group_size)


def _check_same_shape(**arrays: jax.Array) -> None:
    shapes = {name: jnp.shape(a) for name, a in arrays.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(
            "shape mismatch: "
            + ", ".join(f"`{n}` {s}" for n, s in shapes.items())
            + "; these arrays must have the same shape"
        )


# ---------------------------------------------------------------------------------------------
# Section 1: log-probs and the score


def token_logprobs(logits: jax.Array, tokens: jax.Array, temperature: float = 1.0) -> jax.Array:
    """log_softmax(logits / temperature)[tokens] over the full vocabulary, in float32.

    The one definition of a token's log-prob, shared by the sampler (rollout log-probs) and the
    train step (the policy log-probs of the ratio): the tempered distribution before top-k /
    top-p truncation; temperature 0 (greedy) counts as 1. `temperature` must be a Python number.
    `logits` is [..., V], `tokens` is [...]. The self-reward log p(z_c) is this function at
    temperature 1 (LASER_SPEC section 1: raw logits, never temperature-scaled).
    """
    x = jnp.asarray(logits).astype(jnp.float32)
    if temperature not in (0, 1):
        x = x / temperature
    tokens = jnp.asarray(tokens)
    picked = jnp.take_along_axis(x, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(x, axis=-1)


def positions_from_mask(mask_bl: jax.Array) -> jax.Array:
    """Position ids counting real tokens only: 0 at the first unmasked token, contiguous after it
    (left padding gets 0). The sequence `prompt, y, <eos>, z_c` of LASER_SPEC section 2 has
    contiguous positions, so the train step, the sampler and calibration all use this."""
    return jnp.maximum(jnp.cumsum(jnp.asarray(mask_bl).astype(jnp.int32), axis=-1) - 1, 0)


def self_reward_score(logp_zc_b: jax.Array, beta_v: float, c_ref: float) -> jax.Array:
    """r_s = beta_v * (log pi_theta(z_c | x, y, <eos>) - c_ref)   (LASER_SPEC section 1).

    Args:
      logp_zc_b: [B] log-prob of z_c at the EOS position, from log_softmax of the raw
        (never temperature-scaled) logits. Values at truncated rows are meaningless; every
        consumer below masks them with `finished_b`.
      beta_v: the scale (paper: 0.1). c_ref: the measured reference log-prob (Qwen2.5: ~ -23).
    Returns:
      r_s_b: [B] float32.
    """
    return beta_v * (_f32(logp_zc_b) - c_ref)


def self_reward_score_or_nan(
    logp_zc_b: jax.Array, finished_b: jax.Array, beta_v: float, c_ref: float
) -> jax.Array:
    """`self_reward_score` at finished rows, NaN at truncated ones (they get no z_c step,
    LASER_SPEC section 5): the per-sample score evaluation and generation report."""
    return jnp.where(_bool(finished_b), self_reward_score(logp_zc_b, beta_v, c_ref), jnp.nan)


# ---------------------------------------------------------------------------------------------
# Section 2: GRPO advantages, the self-reward MSE


def grpo_advantages(
    rewards_b: jax.Array, group_size: int, eps: float = 1e-6, norm_by_std: bool = True
) -> jax.Array:
    """A_v = (r_v - mean_group(r_v)) / (std_group(r_v, unbiased) + eps)   (LASER_SPEC section 2).

    A group of one has no unbiased std; the spec (as verl) takes mean 0 and std 1 for it, so
    there A_v = r_v / (1 + eps). Groups with all-equal rewards get A_v = 0 exactly.
    `norm_by_std=False` is Dr. GRPO's A_v = r_v - mean_group(r_v) (verl
    `norm_adv_by_std_in_grpo=False`; a group of one keeps r_v).

    Args:
      rewards_b: [B] verifier rewards, rows grouped as [B // K, K].
      group_size: K, a python int.
    Returns:
      A_v_b: [B] float32.
    """
    r_gk = _groups(_f32(rewards_b), group_size, "rewards_b")
    if not norm_by_std:
        if group_size == 1:
            return r_gk.reshape(-1)
        return (r_gk - r_gk.mean(axis=1, keepdims=True)).reshape(-1)
    if group_size == 1:
        return (r_gk / (1.0 + eps)).reshape(-1)
    mean_g1 = r_gk.mean(axis=1, keepdims=True)
    std_g1 = r_gk.std(axis=1, ddof=1, keepdims=True)
    return ((r_gk - mean_g1) / (std_g1 + eps)).reshape(-1)


def mse_class_weights(
    rewards_b: jax.Array, finished_b: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Class-balancing weights of the self-reward MSE   (LASER_SPEC section 2).

    Over the finished rows of the *whole step batch* (call this on all rows, not per micro-batch):
        N_c = #finished with r_v = 1,  N_i = #finished with r_v = 0
        w = (N_c + N_i) / (2 N_c) for correct rows, (N_c + N_i) / (2 N_i) for incorrect rows,
        0 for truncated rows. An absent class has no rows, so no weight to define.

    Returns:
      (w_b [B] float32, n_correct, n_incorrect) -- the counts as float32 scalars.
    """
    _check_same_shape(rewards_b=rewards_b, finished_b=finished_b)
    finished = _bool(finished_b)
    correct = finished & (_f32(rewards_b) > 0.5)
    incorrect = finished & ~correct
    n_correct = correct.sum(dtype=jnp.float32)
    n_incorrect = incorrect.sum(dtype=jnp.float32)
    n = n_correct + n_incorrect
    w_correct = _safe_div(n, 2.0 * n_correct)
    w_incorrect = _safe_div(n, 2.0 * n_incorrect)
    w_b = jnp.where(correct, w_correct, jnp.where(incorrect, w_incorrect, 0.0))
    return w_b, n_correct, n_incorrect


def self_reward_mse(
    r_s_b: jax.Array, rewards_b: jax.Array, finished_b: jax.Array, weights_b: jax.Array
) -> SumCount:
    """L_MSE = sum_finished w * (r_s - r_v)^2 / (N_c + N_i)   (LASER_SPEC section 2).

    Returned as (sum over this batch's finished rows of w * (r_s - r_v)^2, #finished rows here):
    with `weights_b` from `mse_class_weights` over the whole step batch, the pairs of the
    micro-batches add up to the full-batch numerator and N_c + N_i. The denominator is the paper's
    N_c + N_i, not the reference code's count of all responses. No finished row: (0, 0), and
    `.value()` gives 0. Truncated rows contribute nothing, whatever r_s holds there.

    Args:
      r_s_b: [B] scores of the current policy (gradients flow through it).
      rewards_b, finished_b, weights_b: [B] (the weights are treated as constants).
    """
    _check_same_shape(r_s_b=r_s_b, rewards_b=rewards_b, finished_b=finished_b, weights_b=weights_b)
    finished = _bool(finished_b)
    # `where` before squaring: a truncated row's r_s (no z_c there) must not leak a NaN gradient.
    err_b = jnp.where(finished, _f32(r_s_b) - _f32(rewards_b), 0.0)
    w_b = jax.lax.stop_gradient(_f32(weights_b))
    return SumCount(jnp.sum(w_b * err_b**2), finished.sum(dtype=jnp.float32))


# ---------------------------------------------------------------------------------------------
# Section 3: self-rewarding advantage integration


def integrated_advantages(
    A_v_b: jax.Array,
    r_s_rollout_b: jax.Array,
    finished_b: jax.Array,
    group_size: int,
    tau: float,
    std_threshold: float,
) -> tuple[jax.Array, jax.Array]:
    """A = (1 - tau) * A_v + tau * A_s   (LASER_SPEC section 3).

        s   = clip(r_s_rollout, 0, 1) for finished rows, 0 for truncated ones   (no gradient)
        sd  = std_group(s, unbiased)
        A_s = (s - mean_group(s)) / sd   if sd > T   else A_v

    A group whose verifier rewards are all equal has A_v = 0 but still gets tau * A_s here. A
    group of one has no unbiased std and falls back to A_v (so A = A_v). Call it on the whole step
    batch (groups must be complete), and only when `integration_active`.

    Args:
      A_v_b: [B] from `grpo_advantages`. r_s_rollout_b: [B] rollout-time scores (the sampler's
        extra decode step). finished_b: [B]. group_size: K (python int).
      tau: mixing weight (paper 0.1). std_threshold: T (paper 0.1).
    Returns:
      (A_b [B] float32, fallback_frac: float32 scalar, the fraction of groups sent back to A_v).
    """
    _check_same_shape(A_v_b=A_v_b, r_s_rollout_b=r_s_rollout_b, finished_b=finished_b)
    A_v_gk = _groups(jax.lax.stop_gradient(_f32(A_v_b)), group_size, "A_v_b")
    finished_gk = _groups(_bool(finished_b), group_size, "finished_b")
    r_s_gk = _groups(jax.lax.stop_gradient(_f32(r_s_rollout_b)), group_size, "r_s_rollout_b")
    s_gk = jnp.where(finished_gk, jnp.clip(r_s_gk, 0.0, 1.0), 0.0)
    if group_size == 1:
        use_s_g1 = jnp.zeros((s_gk.shape[0], 1), bool)
        A_s_gk = A_v_gk
    else:
        sd_g1 = s_gk.std(axis=1, ddof=1, keepdims=True)
        use_s_g1 = sd_g1 > std_threshold
        centred_gk = s_gk - s_gk.mean(axis=1, keepdims=True)
        A_s_gk = jnp.where(use_s_g1, centred_gk / jnp.where(use_s_g1, sd_g1, 1.0), A_v_gk)
    A_gk = (1.0 - tau) * A_v_gk + tau * A_s_gk
    fallback_frac = jnp.mean(~use_s_g1, dtype=jnp.float32)
    return A_gk.reshape(-1), fallback_frac


# ---------------------------------------------------------------------------------------------
# Section 2: the PPO clipped surrogate, its aggregation, the optional KL to a reference policy


def ppo_clipped_surrogate(
    logp_bt: jax.Array,
    old_logp_bt: jax.Array,
    adv_b: jax.Array,
    mask_bt: jax.Array,
    clip_low: float,
    clip_high: float,
    dual_clip: float,
) -> tuple[jax.Array, dict[str, SumCount]]:
    """Per-token PPO loss with clip-higher and dual clip   (LASER_SPEC section 2).

    As verl's `compute_policy_loss` (paper defaults 0.2 / 0.2 / c = 3.0):
        ratio = exp(clip(logp - old_logp, -20, 20))
        l     = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high))
        for A < 0 with dual clip on:  l = min(l, -A * c)
    `dual_clip` = 0 switches dual clip off (the config allows 0 or > 1).

    Args:
      logp_bt: [B, T] log-probs of the response tokens under the current policy.
      old_logp_bt: [B, T] the same under the rollout policy (constants).
      adv_b: [B] per-row advantages (or [B, T] per-token; constants).
      mask_bt: [B, T] response tokens y_1..<eos>.
    Returns:
      loss_bt: [B, T] float32, 0 outside the mask (aggregate with `aggregate_loss`);
      metrics, each a SumCount over masked tokens: "clipfrac" (the clipped branch is taken),
      "clipfrac_lower" (dual clip taken, A < 0), "ppo_kl" (mean of old_logp - logp, verl's
      approximate KL), "ratio_mean".
    """
    _check_same_shape(logp_bt=logp_bt, old_logp_bt=old_logp_bt, mask_bt=mask_bt)
    mask = _bool(mask_bt)
    adv = jax.lax.stop_gradient(_f32(adv_b))
    if adv.ndim == 1:
        adv = adv[:, None]
    log_ratio = jnp.clip(_f32(logp_bt) - jax.lax.stop_gradient(_f32(old_logp_bt)), -20.0, 20.0)
    # Padding positions may hold anything (e.g. -inf log-probs): neutralise them before exp.
    log_ratio = jnp.where(mask, log_ratio, 0.0)
    ratio = jnp.exp(log_ratio)

    loss_unclipped = -adv * ratio
    loss_clipped = -adv * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss_ppo = jnp.maximum(loss_unclipped, loss_clipped)
    dual_on = (dual_clip > 0) & (adv < 0)
    loss_dual = -adv * dual_clip
    loss = jnp.where(dual_on, jnp.minimum(loss_ppo, loss_dual), loss_ppo)
    loss_bt = jnp.where(mask, loss, 0.0)

    n_tokens = mask.sum(dtype=jnp.float32)

    def masked_sum(x: jax.Array) -> jax.Array:
        return jnp.sum(jnp.where(mask, _f32(x), 0.0))

    metrics = {
        "clipfrac": SumCount(masked_sum(loss_clipped > loss_unclipped), n_tokens),
        "clipfrac_lower": SumCount(masked_sum(dual_on & (loss_ppo > loss_dual)), n_tokens),
        "ppo_kl": SumCount(masked_sum(-log_ratio), n_tokens),
        "ratio_mean": SumCount(masked_sum(ratio), n_tokens),
    }
    metrics = jax.tree.map(jax.lax.stop_gradient, metrics)
    return loss_bt, metrics


def aggregate_loss(
    loss_bt: jax.Array, mask_bt: jax.Array, mode: LossAggMode, scale_factor: float = 0.0
) -> SumCount:
    """A per-token loss as (sum, count)   (LASER_SPEC section 2: the paper uses token-mean).

    - "token-mean":              (sum of masked token losses, #masked tokens)
    - "seq-mean-token-mean":     (sum over rows of the row's masked mean, #rows)
    - "seq-mean-token-sum":      (sum over rows of the row's masked sum, #rows)
    - "seq-mean-token-sum-norm": (sum over rows of the row's masked sum / N, #rows): Dr. GRPO's
      constant normaliser N = `scale_factor`, or the padded response length T when it is 0
      (verl's `loss_scale_factor` default)
    "#rows" counts rows with at least one masked token: a row with an empty mask (batch padding)
    is not a sequence. Otherwise this is verl's `agg_loss`, split so that the pairs of
    micro-batches add up to the full batch's pair. `mode` is static (a python str).
    """
    if mode not in LOSS_AGG_MODES:
        raise ValueError(
            f"loss aggregation mode {mode!r} is unknown; use one of {LOSS_AGG_MODES} "
            "(config field `policy_loss.loss_agg`)"
        )
    _check_same_shape(loss_bt=loss_bt, mask_bt=mask_bt)
    mask = _bool(mask_bt)
    masked_bt = jnp.where(mask, _f32(loss_bt), 0.0)
    n_tokens_b = mask.sum(axis=-1, dtype=jnp.float32)
    if mode == "token-mean":
        return SumCount(masked_bt.sum(), n_tokens_b.sum())
    seq_b = masked_bt.sum(axis=-1)
    if mode == "seq-mean-token-mean":
        seq_b = _safe_div(seq_b, n_tokens_b)
    elif mode == "seq-mean-token-sum-norm":
        seq_b = seq_b / jnp.float32(scale_factor or mask.shape[-1])
    return SumCount(seq_b.sum(), (n_tokens_b > 0).sum(dtype=jnp.float32))


def logprob_mismatch(
    logp_bt: jax.Array, rollout_logp_bt: jax.Array, mask_bt: jax.Array
) -> tuple[SumCount, jax.Array]:
    """|log p_train - log p_rollout| over the response tokens (no gradient): the (sum, count) of
    its mean and its max (0 without tokens). The sampler's and the train step's log-probs of the
    same tokens under the same weights are one quantity (LASER_SPEC section 5); this measures
    how far numerics (e.g. a bf16 sampler against float32 training) pull them apart."""
    _check_same_shape(logp_bt=logp_bt, rollout_logp_bt=rollout_logp_bt, mask_bt=mask_bt)
    mask = _bool(mask_bt)
    diff = jnp.abs(_f32(logp_bt) - _f32(rollout_logp_bt))
    diff = jax.lax.stop_gradient(jnp.where(mask, diff, 0.0))
    return SumCount(diff.sum(), mask.sum(dtype=jnp.float32)), diff.max(initial=0.0)


def kl_penalty(logp_bt: jax.Array, ref_logp_bt: jax.Array, kind: KLKind) -> jax.Array:
    """Per-token KL(pi_theta || pi_ref) estimate, as verl's `kl_penalty` (LASER_SPEC section 2:
    weight 0 in the paper's runs, so optional).

    - "k1":         logp - ref_logp
    - "k2":         0.5 * (logp - ref_logp)^2
    - "low_var_kl": k3 = exp(d) - d - 1 with d = clip(ref_logp - logp, -20, 20), clipped to
                    [-10, 10]
    Aggregate the [B, T] result with `aggregate_loss`. `kind` is static (a python str).
    """
    if kind not in KL_KINDS:
        raise ValueError(
            f"KL kind {kind!r} is unknown; use one of {KL_KINDS} "
            "(config field `policy_loss.kl_type`)"
        )
    _check_same_shape(logp_bt=logp_bt, ref_logp_bt=ref_logp_bt)
    logp, ref = _f32(logp_bt), jax.lax.stop_gradient(_f32(ref_logp_bt))
    if kind == "k1":
        return logp - ref
    if kind == "k2":
        return 0.5 * jnp.square(logp - ref)
    d = jnp.clip(ref - logp, -20.0, 20.0)
    return jnp.clip(jnp.exp(d) - d - 1.0, -10.0, 10.0)


# ---------------------------------------------------------------------------------------------
# Section 4: schedule


def mse_active(step: int | jax.Array, reasoning_warmup: int | jax.Array) -> bool | jax.Array:
    """The MSE term is on when step > reasoning_warmup_steps; steps count from 1 (section 4).

    A python bool for python ints, a traced bool for traced ints.
    """
    return step > reasoning_warmup


def integration_active(
    step: int | jax.Array, reasoning_warmup: int | jax.Array, self_reward_warmup: int | jax.Array
) -> bool | jax.Array:
    """Advantage integration is on when step > reasoning_warmup + self_reward_warmup (section 4)."""
    return step > reasoning_warmup + self_reward_warmup


# ---------------------------------------------------------------------------------------------
# Section 5: self-verification metrics


def self_verification_metrics(
    r_s_b: jax.Array, rewards_b: jax.Array, finished_b: jax.Array, threshold: float = 0.5
) -> dict[str, SumCount]:
    """Self-verification over finished rows, as (sum, count) pairs   (LASER_SPEC section 5).

    - "acc_correct":   fraction of finished correct rows with r_s > threshold
    - "acc_incorrect": fraction of finished incorrect rows with r_s <= threshold
    - "r_s_correct", "r_s_incorrect": mean r_s of finished correct / incorrect rows
    An absent class gives (0, 0), whose `.value()` is 0. Combine the two accuracies with
    `self_verification_f1` after `finalize`.
    """
    _check_same_shape(r_s_b=r_s_b, rewards_b=rewards_b, finished_b=finished_b)
    finished = _bool(finished_b)
    correct = finished & (_f32(rewards_b) > 0.5)
    incorrect = finished & ~correct
    r_s = jax.lax.stop_gradient(_f32(r_s_b))
    predicted_correct = r_s > threshold
    n_correct = correct.sum(dtype=jnp.float32)
    n_incorrect = incorrect.sum(dtype=jnp.float32)

    def count(m: jax.Array) -> jax.Array:
        return m.sum(dtype=jnp.float32)

    return {
        "acc_correct": SumCount(count(correct & predicted_correct), n_correct),
        "acc_incorrect": SumCount(count(incorrect & ~predicted_correct), n_incorrect),
        "r_s_correct": SumCount(jnp.sum(jnp.where(correct, r_s, 0.0)), n_correct),
        "r_s_incorrect": SumCount(jnp.sum(jnp.where(incorrect, r_s, 0.0)), n_incorrect),
    }


def self_verification_f1(acc_correct: jax.Array, acc_incorrect: jax.Array) -> jax.Array:
    """The paper's self-verification "F1": the harmonic mean of the accuracy on correct and on
    incorrect solutions (LASER_SPEC section 5; not precision/recall F1). 0 when both are 0."""
    a, b = _f32(acc_correct), _f32(acc_incorrect)
    return _safe_div(2.0 * a * b, a + b)


# ---------------------------------------------------------------------------------------------
# The objective L = L_GRPO + alpha * L_MSE (+ kl_coef * KL), sections 2-4, and its named variants


@dataclasses.dataclass(frozen=True)
class Objective:
    """Every static setting of the objective (hashable: a jitted step compiles per value).

    Defaults are the paper's (LASER_SPEC section 2). A named algorithm of `ALGORITHMS` is one of
    these with some defaults changed; the config overrides any field but `self_reward`, which is
    what the name chooses.
    """

    self_reward: bool = False
    """LaSeR's terms: the self-reward MSE (section 2) and advantage integration (section 3)."""
    norm_adv_by_std: bool = True
    """Divide A_v by the group std (GRPO); Dr. GRPO does not."""
    loss_agg: LossAggMode = "token-mean"
    loss_scale_factor: float = 0.0
    """N of "seq-mean-token-sum-norm" (0: the padded response length)."""
    clip_low: float = 0.2
    clip_high: float = 0.2
    """1 + clip_high bounds the ratio of positive advantages (DAPO's clip-higher: 0.28)."""
    dual_clip: float = 3.0
    kl_coef: float = 0.0
    kl_type: KLKind = "low_var_kl"
    beta_v: float = 0.1
    c_ref: float = -23.0
    alpha: float = 0.1
    tau: float = 0.1
    std_threshold: float = 0.1
    reasoning_warmup_steps: int = 200
    self_reward_warmup_steps: int = 200

    def __post_init__(self) -> None:
        if self.loss_agg not in LOSS_AGG_MODES:
            raise ValueError(
                f"loss aggregation mode {self.loss_agg!r} is unknown; use one of "
                f"{LOSS_AGG_MODES} (config field `policy_loss.loss_agg`)"
            )
        if self.kl_type not in KL_KINDS:
            raise ValueError(
                f"KL kind {self.kl_type!r} is unknown; use one of {KL_KINDS} "
                "(config field `policy_loss.kl_type`)"
            )

    @property
    def use_kl(self) -> bool:
        return self.kl_coef > 0


ALGORITHMS: dict[str, Objective] = {}
"""Named algorithms: each is its `Objective` defaults (Tunix's algo_core registers variants by
name the same way). Add one with `register_algorithm`."""


def register_algorithm(name: str, defaults: Objective) -> None:
    """Make `name` a value of `laser.algorithm` whose objective starts from `defaults`."""
    ALGORITHMS[name] = defaults


# GRPO as the paper runs it (section 2) and LaSeR (sections 1-4) on top of it.
register_algorithm("grpo", Objective())
register_algorithm("laser", Objective(self_reward=True))
# Dr. GRPO (Liu et al. 2025): no std normalisation, each sequence's token sum over a constant.
register_algorithm("dr_grpo", Objective(norm_adv_by_std=False, loss_agg="seq-mean-token-sum-norm"))
# DAPO (Yu et al. 2025): clip-higher and token-level aggregation (its dynamic sampling and
# overlong shaping are data-side, not terms of L).
register_algorithm("dapo", Objective(clip_high=0.28, loss_agg="token-mean"))


def objective_for(algorithm: str, **settings: object) -> Objective:
    """The registered defaults of `algorithm` with `settings` on top (None keeps the default)."""
    if algorithm not in ALGORITHMS:
        raise ValueError(
            f"unknown algorithm {algorithm!r}; use one of {', '.join(ALGORITHMS)} "
            "(config field `laser.algorithm`)"
        )
    given = {k: v for k, v in settings.items() if v is not None}
    if "self_reward" in given:
        raise ValueError("`self_reward` is chosen by the algorithm's name, not set")
    return dataclasses.replace(ALGORITHMS[algorithm], **given)


def step_advantages(
    obj: Objective,
    step: int | jax.Array,
    rewards_b: jax.Array,
    finished_b: jax.Array,
    rollout_logp_zc_b: jax.Array,
    group_size: int,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The advantage of each row at step `step` (sections 2-4): A_v, or with self-reward and
    after both warm-ups the integrated A. Needs whole groups. Returns (A_b, metrics)."""
    adv_v = grpo_advantages(rewards_b, group_size, norm_by_std=obj.norm_adv_by_std)
    if not obj.self_reward:
        return adv_v, {}
    step = jnp.asarray(step, jnp.int32)
    integrate = integration_active(step, obj.reasoning_warmup_steps, obj.self_reward_warmup_steps)
    r_s_rollout = self_reward_score(rollout_logp_zc_b, obj.beta_v, obj.c_ref)
    adv_int, fallback = integrated_advantages(
        adv_v, r_s_rollout, finished_b, group_size, obj.tau, obj.std_threshold
    )
    metrics = {
        "std_filter_fallback_frac": fallback,
        "mse_active": mse_active(step, obj.reasoning_warmup_steps).astype(jnp.float32),
        "integration_active": integrate.astype(jnp.float32),
    }
    return jnp.where(integrate, adv_int, adv_v), metrics


def loss_counts(
    obj: Objective, rewards_b: jax.Array, finished_b: jax.Array, mask_bt: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The MSE class weights and the denominators of L over these rows (the rows one optimizer
    update sees): (mse_weights_b, counts) with counts "pg" and "kl" (the aggregation's count)
    and, with self-reward, "mse" (N_c + N_i).

    Call it on all the update's rows, then `objective` on any split of them into micro-batches:
    every count depends on data only, so differentiating `objective_loss(objective(micro),
    counts)` per micro-batch and summing gives the whole-rows gradient (STYLE "Losses as (sum,
    denominator)")."""
    # Any (sum, count) of `aggregate_loss` has a count that depends on the mask alone.
    n_pg = aggregate_loss(
        jnp.zeros(jnp.shape(mask_bt), jnp.float32), mask_bt, obj.loss_agg, obj.loss_scale_factor
    ).count
    counts = {"pg": n_pg, "kl": n_pg}
    if not obj.self_reward:
        return jnp.zeros(jnp.shape(rewards_b), jnp.float32), counts
    mse_w, n_c, n_i = mse_class_weights(rewards_b, finished_b)
    counts["mse"] = n_c + n_i
    return mse_w, counts


class Term(NamedTuple):
    """One term of L: its coefficient (0 while gated off) and its (sum, count)."""

    weight: jax.Array
    value: SumCount


def objective(
    obj: Objective,
    step: int | jax.Array,
    logp_bt: jax.Array,
    old_logp_bt: jax.Array,
    mask_bt: jax.Array,
    advantages_b: jax.Array,
    *,
    ref_logp_bt: jax.Array | None = None,
    logp_zc_b: jax.Array | None = None,
    rewards_b: jax.Array | None = None,
    finished_b: jax.Array | None = None,
    mse_weights_b: jax.Array | None = None,
) -> tuple[dict[str, Term], dict[str, SumCount]]:
    """The terms of L on these rows (LASER_SPEC sections 2 and 4), and their metrics.

    Terms, in the order they add up:
    - "pg":  L_GRPO, the clipped surrogate aggregated by `obj.loss_agg`, weight 1;
    - "kl":  `kl_penalty(logp, ref_logp)` aggregated the same way, weight kl_coef (only when
             kl_coef > 0; needs `ref_logp_bt`);
    - "mse": L_MSE, weight alpha once step > reasoning_warmup_steps and 0 before (section 4)
             (only with self-reward; needs `logp_zc_b`, `rewards_b`, `finished_b`,
             `mse_weights_b` from `loss_counts`).
    Metrics: "clipfrac", "clipfrac_lower", "ppo_kl" (`ppo_clipped_surrogate`), and with
    self-reward "acc_correct", "acc_incorrect", "r_s_correct", "r_s_incorrect" of the current
    policy's scores (`self_verification_metrics`).
    """
    loss_bt, ppo = ppo_clipped_surrogate(
        logp_bt, old_logp_bt, advantages_b, mask_bt, obj.clip_low, obj.clip_high, obj.dual_clip
    )
    one = jnp.float32(1.0)
    terms = {"pg": Term(one, aggregate_loss(loss_bt, mask_bt, obj.loss_agg, obj.loss_scale_factor))}
    metrics = {k: ppo[k] for k in ("clipfrac", "clipfrac_lower", "ppo_kl")}
    if obj.use_kl:
        if ref_logp_bt is None:
            raise ValueError(
                "policy_loss.kl_coef > 0 needs the reference policy's log-probs of the "
                "response tokens (`ref_logp_bt`)"
            )
        kl_bt = kl_penalty(logp_bt, ref_logp_bt, obj.kl_type)
        kl = aggregate_loss(kl_bt, mask_bt, obj.loss_agg, obj.loss_scale_factor)
        terms["kl"] = Term(jnp.float32(obj.kl_coef), kl)
    if obj.self_reward:
        r_s_b = self_reward_score(logp_zc_b, obj.beta_v, obj.c_ref)
        mse = self_reward_mse(r_s_b, rewards_b, finished_b, mse_weights_b)
        on = mse_active(jnp.asarray(step, jnp.int32), obj.reasoning_warmup_steps)
        terms["mse"] = Term(jnp.where(on, jnp.float32(obj.alpha), 0.0), mse)
        metrics |= self_verification_metrics(r_s_b, rewards_b, finished_b)
    return terms, metrics


def objective_loss(terms: dict[str, Term], counts: dict[str, jax.Array]) -> jax.Array:
    """L = sum over terms of weight * total / count, with the full-batch `counts` of
    `loss_counts` (a micro-batch's share of the full-batch loss; 0 for an empty count)."""
    loss = jnp.float32(0.0)
    for name, term in terms.items():
        loss = loss + term.weight * SumCount(term.value.total, counts[name]).value()
    return loss
