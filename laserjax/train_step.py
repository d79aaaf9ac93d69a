"""The one-forward, sharded, jitted GRPO / LaSeR train step (LASER_SPEC sections 1-4).

One job, the step, in the order it runs: its inputs and state, the forward (sequences, chunked
log-probs, log p(z_c)), the loss and gradients over micro-batches, the jitted update over
mini-batches, and the host-side check of a batch. Each part serves only the next; the formulas
themselves are `laserjax.laser`'s.

One call of the model over `prompt, y_1 .. y_T, <eos>` gives both losses:

- the policy log-probs of y_1 .. <eos>, tempered as the sampler's (`laser.token_logprobs`), feed
  the PPO clipped surrogate with group-normalised (and, after the warm-ups,
  self-reward-integrated) advantages;
- log pi(z_c | x, y, <eos>) is read from the raw logits at the EOS position and becomes
  r_s = beta_v * (log pi(z_c) - c_ref), the input of the class-balanced MSE.

The formulas, and which terms the objective has, come from `laserjax.laser`; this module only
arranges the data, the forward, the
gradient accumulation and the optimizer around them.

Data flow of one step (all inside one `jax.jit`):

1. On the whole step batch: GRPO advantages, advantage integration, MSE class weights, and every
   loss denominator (token count, N_c + N_i). Group statistics and class weights therefore never
   depend on how the batch is split into micro-batches.
2. `lax.scan` over micro-batches: each computes `numerator / full_batch_denominator` per loss
   term and its gradient; gradients are summed in float32. Because every denominator depends on
   data only, the sum equals the full-batch gradient (STYLE "Losses as (sum, denominator)").
3. clip_by_global_norm -> AdamW, as optax, on params and moments sharded by the one partition-rule
   table of `laserjax.sharding`.

The LM head runs in chunks of `StepSettings.logit_chunk` positions under `jax.checkpoint`, so no
[R, L, V] float32 logits are ever held: each chunk's logits are recomputed in the backward pass
(a chunk >= T runs the head in one piece and keeps its logits, when memory allows).

The spec writes the sequence as `prompt, y, <eos>, z_c`, but the z_c column is never read:
log p(z_c) is the EOS position's output, and causal attention hides z_c from every earlier
position. So the step leaves it out by default (`StepSettings.append_zc = False`): the same
numbers (tests/test_train_step.py) one position shorter. The column made a 256 + 768-token batch
1025 positions long, and on an H200 that step ran at 50.9k tokens/s against 64.0k at 1024
(bench/README.md, GPU).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from laserjax import laser, sharding
from laserjax.config import LaserConfig, OptimConfig, PolicyLossConfig
from laserjax.laser import positions_from_mask, token_logprobs
from laserjax.model.transformer import Transformer, to_dtype

# ---------------------------------------------------------------------------------------------
# Inputs, settings, state.


@flax.struct.dataclass
class TrainBatch:
    """One step batch. Rows are prompts x K, prompt-major: row = prompt * K + j.

    All arrays are per row (leading dim R); the trainer fills them from the sampler's output and
    the verifier. `response_mask` covers y_1 .. <eos> (EOS included for finished rows) and must be
    a prefix of each row (right padding); `prompt_mask` a suffix (left padding).
    """

    prompt_tokens: jax.Array
    """[R, P] int, left-padded."""
    prompt_mask: jax.Array
    """[R, P] bool."""
    response_tokens: jax.Array
    """[R, T] int, right-padded; a finished row's last real token is its EOS."""
    response_mask: jax.Array
    """[R, T] bool: the policy-loss tokens y_1 .. <eos>."""
    old_logprobs: jax.Array
    """[R, T] float: the sampler's `token_logprobs` of the response tokens."""
    finished: jax.Array
    """[R] bool: the response ended with EOS (truncated rows get no z_c, no MSE term)."""
    rewards: jax.Array
    """[R] float: verifier reward r_v in {0, 1}."""
    rollout_logp_zc: jax.Array
    """[R] float: log pi_old(z_c | x, y, <eos>) from the sampler's extra decode step (spec 5);
    the source of the integrated advantage (spec 3). Ignored by `algorithm: grpo`."""
    ref_logprobs: jax.Array | None = None
    """[R, T] float: reference-policy log-probs, required when policy_loss.kl_coef > 0."""


OLD_LOGPROB_SOURCES = ("recompute", "rollout")


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """Static settings of the step (each value compiles its own program)."""

    group_size: int
    """K, samples per prompt (rollout.samples_per_prompt)."""
    self_reward_token_id: int
    """z_c (tokens.self_reward_token_id)."""
    temperature: float = 1.0
    """The rollout temperature: policy log-probs are log_softmax(logits / temperature)."""
    micro_batch_size: int = 0
    """Rows per micro-batch (train.micro_batch_size); 0 = the whole step batch at once."""
    logit_chunk: int = 512
    """Positions per LM-head chunk: bounds the float32 logits held to [R_micro, chunk, V]
    (chunks are recomputed in the backward pass; chunk >= T keeps the whole logits instead)."""
    append_zc: bool = False
    """Put z_c in the sequence at eos_pos + 1, as spec section 2 writes it. Causally invisible to
    every log-prob the step reads, so the default leaves it out: the same numbers one position
    shorter (module docstring); True is kept for the tests and benchmarks that show this."""
    old_logprob_source: str = "rollout"
    """The PPO ratio's old log-probs: "rollout" uses TrainBatch.old_logprobs (the sampler's; this
    API's default), "recompute" the training forward with the pre-update parameters (the
    official code's; the trainer's default, train.old_logprob_source). With one update per
    batch, recompute is the stop-gradient of the forward the loss already runs (free, ratio 1);
    with several, one no-grad pass before the first update."""
    mini_batch_size: int = 0
    """Rows per optimizer update (train.ppo_mini_batch_size); 0 = the whole step batch."""
    epochs: int = 1
    """Passes over the step batch, each one update per mini-batch (train.ppo_epochs)."""

    def __post_init__(self) -> None:
        if self.old_logprob_source not in OLD_LOGPROB_SOURCES:
            raise ValueError(
                f"StepSettings.old_logprob_source must be one of {OLD_LOGPROB_SOURCES}, got "
                f"{self.old_logprob_source!r}"
            )
        if self.mini_batch_size < 0 or self.epochs < 1:
            raise ValueError(
                "StepSettings.mini_batch_size must be >= 0 and epochs >= 1, got "
                f"{self.mini_batch_size} and {self.epochs}"
            )
        if self.group_size < 1:
            raise ValueError(f"StepSettings.group_size must be >= 1 (K), got {self.group_size}")
        if self.micro_batch_size < 0:
            raise ValueError(
                "StepSettings.micro_batch_size must be >= 0 (0 = no accumulation), "
                f"got {self.micro_batch_size}"
            )
        if self.logit_chunk < 1:
            raise ValueError(f"StepSettings.logit_chunk must be >= 1, got {self.logit_chunk}")
        if self.temperature < 0:
            raise ValueError(f"StepSettings.temperature must be >= 0, got {self.temperature}")


@flax.struct.dataclass
class TrainState:
    """Everything a step updates or reads: parameters, optimizer state, step count, and the
    frozen reference policy of the KL term."""

    params: nnx.State
    opt_state: optax.OptState
    step: jax.Array
    """int32 scalar: optimizer steps taken. The step being taken is `step + 1` (the spec's
    schedule counts steps from 1, section 4)."""
    ref_params: nnx.State | None = None
    """The reference policy (policy_loss.kl_coef > 0): the initial parameters, sharded like
    `params`, possibly in a narrower dtype; never updated, checkpointed with the rest so a
    resumed run keeps its reference whatever the initial weights' source does meanwhile."""


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """clip_by_global_norm(grad_clip) -> AdamW, with an optional linear warm-up from 0.

    Weight decay applies to every parameter, as the reference code's torch AdamW over all
    parameters. The warm-up matches `get_constant_schedule_with_warmup` (lr 0 on the first step).
    """
    lr: Any = cfg.learning_rate
    if cfg.warmup_steps:
        lr = optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay),
    )


def train_state_sharding(state: TrainState, mesh: Mesh) -> TrainState:
    """NamedShardings of a TrainState (arrays or ShapeDtypeStructs), from the one rule table."""
    ref = None if state.ref_params is None else sharding.state_shardings(state.ref_params, mesh)
    return TrainState(
        params=sharding.state_shardings(state.params, mesh),
        opt_state=sharding.state_shardings(state.opt_state, mesh),
        step=sharding.replicated(mesh),
        ref_params=ref,
    )


def reference_params(params: nnx.State, dtype: str | None) -> nnx.State:
    """The frozen reference policy: `params` (arrays or ShapeDtypeStructs) cast to `dtype`
    (None or "" keeps each parameter's dtype)."""

    def cast(x):
        if not dtype or not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, to_dtype(dtype))
        return x.astype(to_dtype(dtype))

    return jax.tree.map(cast, params)


def init_train_state(
    model: Transformer,
    optim_cfg: OptimConfig,
    mesh: Mesh,
    ref_dtype: str | None = None,
    with_reference: bool = False,
) -> tuple[nnx.GraphDef, TrainState]:
    """Split the model into (graphdef, params), place params and fresh AdamW moments on `mesh`;
    with `with_reference`, also a frozen copy of the params in `ref_dtype` (the KL reference)."""
    graphdef, params = nnx.split(model, nnx.Param)
    tx = make_optimizer(optim_cfg)
    abstract = TrainState(
        params=params,
        opt_state=jax.eval_shape(tx.init, params),
        step=jax.ShapeDtypeStruct((), jnp.int32),
        ref_params=reference_params(jax.eval_shape(lambda: params), ref_dtype)
        if with_reference
        else None,
    )
    shard = train_state_sharding(abstract, mesh)
    params = jax.device_put(params, shard.params)
    opt_state = jax.jit(tx.init, out_shardings=shard.opt_state)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), shard.step)
    ref = None
    if with_reference:  # a new buffer: the policy's own are donated at every step
        ref = jax.jit(
            lambda p: reference_params(jax.tree.map(jnp.copy, p), ref_dtype),
            out_shardings=shard.ref_params,
        )(params)
    return graphdef, TrainState(params=params, opt_state=opt_state, step=step, ref_params=ref)


# ---------------------------------------------------------------------------------------------
# The forward: sequences, chunked log-probs, log p(z_c).


def build_sequences(
    batch: TrainBatch, zc_id: int, append_zc: bool
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """`prompt, response[, z_c]` as one padded batch (LASER_SPEC section 2).

    z_c sits at eos_pos + 1 of finished rows only, so the sequence gets one more column for a row
    whose EOS is the last response slot; truncated rows leave that slot masked. Positions count
    real tokens (contiguous through prompt, response and z_c).

    Returns (tokens_bl, positions_bl, mask_bl, n_resp_b) with L = P + T (+ 1 with z_c) and
    n_resp_b the number of real response tokens per row.
    """
    r, t = batch.response_tokens.shape
    resp_tokens = batch.response_tokens.astype(jnp.int32)
    resp_mask = batch.response_mask.astype(bool)
    n_resp_b = resp_mask.sum(axis=-1, dtype=jnp.int32)
    if append_zc:
        slot_bt = jnp.arange(t + 1)[None, :] == n_resp_b[:, None]
        is_zc_bt = slot_bt & batch.finished.astype(bool)[:, None]
        resp_tokens = jnp.concatenate([resp_tokens, jnp.zeros((r, 1), jnp.int32)], axis=1)
        resp_tokens = jnp.where(is_zc_bt, jnp.int32(zc_id), resp_tokens)
        resp_mask = jnp.concatenate([resp_mask, jnp.zeros((r, 1), bool)], axis=1) | is_zc_bt
    tokens_bl = jnp.concatenate([batch.prompt_tokens.astype(jnp.int32), resp_tokens], axis=1)
    mask_bl = jnp.concatenate([batch.prompt_mask.astype(bool), resp_mask], axis=1)
    positions_bl = positions_from_mask(mask_bl)
    return tokens_bl, positions_bl, mask_bl, n_resp_b


def logit_chunk_len(response_len: int, chunk: int) -> int:
    """The LM-head chunk `chunked_token_logprobs` uses for `response_len` positions: the same
    number of chunks as `chunk` gives, each as short as it can be (least padding)."""
    n = -(-response_len // chunk)
    return -(-response_len // n)


def chunked_token_logprobs(
    model: Transformer,
    h_btd: jax.Array,
    targets_bt: jax.Array,
    temperature: float,
    chunk: int,
) -> jax.Array:
    """`token_logprobs(model.logits(h), targets, temperature)` without materialising [B, T, V].

    The LM head runs over `chunk` positions at a time inside `lax.map`; `jax.checkpoint` keeps
    only each chunk's hidden states for the backward pass and recomputes its logits there. With
    chunk >= T there is one chunk, run as a plain head whose logits the backward pass keeps:
    faster (no recompute) when [B, T, V] float32 fits in memory.
    Returns logp_bt, float32.
    """
    b, t, d = h_btd.shape
    n = -(-t // chunk)
    chunk = logit_chunk_len(t, chunk)  # same chunk count, least padding
    pad = n * chunk - t
    h_nbcd = jnp.pad(h_btd, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, d).swapaxes(0, 1)
    tg_nbc = jnp.pad(targets_bt, ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)

    def one_chunk(args):
        h_bcd, tg_bc = args
        return token_logprobs(model.logits(h_bcd), tg_bc, temperature)

    if n == 1:
        # One chunk: the plain head, logits kept for the backward pass (no recompute).
        logp_nbc = one_chunk((h_nbcd[0], tg_nbc[0]))[None]
    else:
        logp_nbc = jax.lax.map(jax.checkpoint(one_chunk), (h_nbcd, tg_nbc))
    return logp_nbc.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]


def sequence_logprobs(
    model: Transformer,
    batch: TrainBatch,
    settings: StepSettings,
    with_zc: bool = True,
    mesh: Mesh | None = None,
) -> dict[str, jax.Array]:
    """One forward over `prompt, response[, z_c]`: the policy and self-reward log-probs.

    Returns:
      "logp_bt": [R, T] tempered log-probs of the response tokens (meaningless at padding:
        mask with `response_mask`);
      "logp_zc_b": [R] log_softmax(raw logits at the EOS position)[z_c] (spec section 1; read it
        only at finished rows), present when `with_zc`.
    """
    p = batch.prompt_tokens.shape[1]
    t = batch.response_tokens.shape[1]
    if p < 1:
        raise ValueError(
            "TrainBatch.prompt_tokens has no columns: the first response token needs "
            "at least one prompt position to be predicted from"
        )
    tokens, positions, mask, n_resp_b = build_sequences(
        batch, settings.self_reward_token_id, append_zc=with_zc and settings.append_zc
    )
    constrain = None
    if mesh is not None:  # keep the residual stream batch-sharded between blocks
        spec = NamedSharding(mesh, P(sharding.BATCH, None, None))
        constrain = lambda x: jax.lax.with_sharding_constraint(x, spec)  # noqa: E731
    h_bld = model.hidden(tokens, positions, mask, constrain=constrain)
    # Position i predicts token i + 1: response token j comes from position P - 1 + j.
    h_resp = h_bld[:, p - 1 : p - 1 + t]
    logp_bt = chunked_token_logprobs(
        model, h_resp, batch.response_tokens, settings.temperature, settings.logit_chunk
    )
    out = {"logp_bt": logp_bt}
    if with_zc:
        # z_c is predicted from the EOS position P + n - 1, with the raw (untempered) logits.
        eos_idx_b = p + jnp.maximum(n_resp_b, 1) - 1
        h_eos_bd = jnp.take_along_axis(h_bld, eos_idx_b[:, None, None], axis=1)[:, 0]
        zc_b = jnp.full(h_eos_bd.shape[:1], settings.self_reward_token_id, jnp.int32)
        out["logp_zc_b"] = token_logprobs(model.logits(h_eos_bd), zc_b, 1.0)
    return out


# ---------------------------------------------------------------------------------------------
# Loss and gradients.


@flax.struct.dataclass
class _RowInputs:
    """The per-row arrays one micro-batch needs: the batch plus whole-batch-derived values."""

    batch: TrainBatch
    advantages: jax.Array
    mse_weights: jax.Array


def _check_rows(batch: TrainBatch, settings: StepSettings, mesh: Mesh | None) -> int:
    """Static shape checks (trace time) of the rows one update sees; returns the number of
    micro-batches."""
    r = batch.rewards.shape[0]
    if r % settings.group_size:
        raise ValueError(
            f"TrainBatch has {r} rows, not a multiple of K = group_size = "
            f"{settings.group_size}: rows must be whole prompt groups"
        )
    mb = settings.micro_batch_size or r
    if r % mb:
        raise ValueError(
            f"micro_batch_size {mb} does not divide the {r} rows of the step batch (or of each "
            "mini-batch); pick a divisor (config field train.micro_batch_size)"
        )
    if mesh is not None:
        shards = sharding.batch_shards(mesh)
        if mb % shards:
            raise ValueError(
                f"micro-batches of {mb} rows cannot be split over the {shards} batch "
                f"shards of the mesh (data x fsdp); make train.micro_batch_size a "
                f"multiple of {shards}"
            )
    return r // mb


def objective_from_config(laser_cfg: LaserConfig, loss_cfg: PolicyLossConfig) -> laser.Objective:
    """The objective's static settings: the named algorithm's defaults under the config's fields
    (a policy-loss field left unset keeps the algorithm's value)."""
    c_ref = laser_cfg.c_ref
    if not isinstance(c_ref, int | float):
        raise ValueError(
            f"laser.c_ref is {c_ref!r}; the train step needs a number (the trainer measures "
            "`auto` before building the step)"
        )
    loss_cfg = loss_cfg.for_algorithm(laser_cfg.algorithm)
    return laser.objective_for(
        laser_cfg.algorithm,
        norm_adv_by_std=loss_cfg.norm_adv_by_std,
        loss_agg=loss_cfg.loss_agg,
        loss_scale_factor=loss_cfg.loss_scale_factor,
        clip_low=loss_cfg.clip_low,
        clip_high=loss_cfg.clip_high,
        dual_clip=loss_cfg.dual_clip,
        kl_coef=loss_cfg.kl_coef,
        kl_type=loss_cfg.kl_type,
        beta_v=laser_cfg.beta_v,
        c_ref=float(c_ref),
        alpha=laser_cfg.alpha,
        tau=laser_cfg.tau,
        std_threshold=laser_cfg.std_threshold,
        reasoning_warmup_steps=laser_cfg.reasoning_warmup_steps,
        self_reward_warmup_steps=laser_cfg.self_reward_warmup_steps,
    )


# The train step's metric names for the objective's terms and metrics.
_TERM_NAMES = {"pg": "actor/pg_loss", "kl": "actor/kl_loss", "mse": "self_reward/mse"}
_METRIC_NAMES = {
    "clipfrac": "actor/pg_clipfrac",
    "clipfrac_lower": "actor/pg_clipfrac_lower",
    "ppo_kl": "actor/ppo_kl",
    "acc_correct": "self_reward/acc_correct",
    "acc_incorrect": "self_reward/acc_incorrect",
    "r_s_correct": "self_reward/r_s_correct",
    "r_s_incorrect": "self_reward/r_s_incorrect",
}


GradFn = Callable[..., tuple[nnx.State, dict[str, jax.Array]]]
"""`grad_fn(params, batch, step, ref_params=None) -> (grads, metrics)`, as `make_grad_fn` builds."""


def make_grad_fn(
    graphdef: nnx.GraphDef,
    laser_cfg: LaserConfig,
    loss_cfg: PolicyLossConfig,
    settings: StepSettings,
    mesh: Mesh | None = None,
) -> GradFn:
    """`grad_fn(params, batch, step, ref_params=None) -> (grads, metrics)`: the gradient of the
    step numbered `step` (from 1) as one update on the whole batch.

    Not jitted: `make_train_step` jits it with the optimizer; tests jit it alone. `grads` has the
    params' structure and dtype; `metrics` is a dict of float32 scalars. The objective (which
    terms, their weights and gating) is `laser.objective` for `objective_from_config`. With
    KL on, the reference log-probs come from TrainBatch.ref_logprobs or, when that is None, from
    a forward of `ref_params` over each micro-batch.
    """
    grads_for_rows = _make_rows_grad(graphdef, laser_cfg, loss_cfg, settings, mesh)
    obj = grads_for_rows.objective

    def grad_fn(
        params: nnx.State,
        batch: TrainBatch,
        step: jax.Array | int,
        ref_params: nnx.State | None = None,
    ) -> tuple[nnx.State, dict[str, jax.Array]]:
        step = jnp.asarray(step, jnp.int32)
        adv, adv_metrics = laser.step_advantages(
            obj, step, batch.rewards, batch.finished, batch.rollout_logp_zc, settings.group_size
        )
        recompute = settings.old_logprob_source == "recompute"
        grads, pairs, maxes = grads_for_rows(params, batch, adv, step, ref_params, recompute)
        return grads, _step_metrics(obj, batch, pairs, maxes, adv_metrics)

    return grad_fn


def _step_metrics(obj: laser.Objective, batch: TrainBatch, pairs, maxes, adv_metrics) -> dict:
    """The metrics of one update: (sum, count) pairs divided once, maxima, batch statistics."""
    values = laser.finalize(pairs) | maxes
    if obj.self_reward:
        values["self_reward/f1"] = laser.self_verification_f1(
            values["self_reward/acc_correct"], values["self_reward/acc_incorrect"]
        )
    values["response_length/mean"] = batch.response_mask.sum(-1).mean(dtype=jnp.float32)
    values["response/finished_frac"] = batch.finished.mean(dtype=jnp.float32)
    values["reward/mean"] = batch.rewards.mean(dtype=jnp.float32)
    return values | {f"self_reward/{name}": v for name, v in adv_metrics.items()}


def _make_rows_grad(graphdef, laser_cfg, loss_cfg, settings: StepSettings, mesh: Mesh | None):
    """`f(params, batch, advantages_b, step, ref_params, recompute) -> (grads, pairs, maxes)`:
    the gradient of L over the rows of `batch` (the step batch, or one mini-batch) with the
    given advantages, accumulated over micro-batches; `f.objective` is its `laser.Objective`.

    `recompute`: the ratio's old log-probs are the stop-gradient of this forward (one update
    per rollout batch: the pre-update parameters are these). The forward's log-probs are also
    compared with TrainBatch.old_logprobs (the rollout's): `actor/logprob_mismatch_*`.
    """
    obj = objective_from_config(laser_cfg, loss_cfg)

    def micro_loss(params, rows: _RowInputs, counts, step, ref_params, recompute: bool):
        model = nnx.merge(graphdef, params)
        b = rows.batch
        if ref_params is not None and b.ref_logprobs is None:
            # The reference's forward over the same micro-batch: a constant of the gradient
            # (`params` is the only differentiated argument), so it keeps no residuals.
            # Tied to this micro-batch, so XLA cannot hoist a cast of a narrower reference out
            # of the micro-batch loop (that would hold a full compute-dtype copy of it).
            ref_params, b = jax.lax.optimization_barrier((ref_params, b))
            ref_model = nnx.merge(graphdef, ref_params)
            # The policy's own sequence (z_c included), so that equal weights give equal
            # log-probs: the same program on the same values.
            ref_out = sequence_logprobs(ref_model, b, settings, with_zc=obj.self_reward, mesh=mesh)
            # The barrier makes the policy's forward wait for the reference's, so the two
            # never hold activations at once (the reference adds weights, not activations).
            ref_logp_bt, b = jax.lax.optimization_barrier((ref_out["logp_bt"], b))
            b = b.replace(ref_logprobs=jax.lax.stop_gradient(ref_logp_bt))
        out = sequence_logprobs(model, b, settings, with_zc=obj.self_reward, mesh=mesh)
        mask = b.response_mask
        old_bt = jax.lax.stop_gradient(out["logp_bt"]) if recompute else b.old_logprobs
        terms, objective_metrics = laser.objective(
            obj,
            step,
            out["logp_bt"],
            old_bt,
            mask,
            rows.advantages,
            ref_logp_bt=b.ref_logprobs,
            logp_zc_b=out.get("logp_zc_b"),
            rewards_b=b.rewards,
            finished_b=b.finished,
            mse_weights_b=rows.mse_weights,
        )
        loss = laser.objective_loss(terms, counts)
        metrics = {_TERM_NAMES[name]: term.value for name, term in terms.items()}
        metrics |= {_METRIC_NAMES[name]: pair for name, pair in objective_metrics.items()}
        mismatch, mismatch_max = laser.logprob_mismatch(out["logp_bt"], b.old_logprobs, mask)
        metrics["actor/logprob_mismatch_mean"] = mismatch
        return loss, (metrics, {"actor/logprob_mismatch_max": mismatch_max})

    grad_micro = jax.grad(micro_loss, has_aux=True)

    def grads_for_rows(params, batch: TrainBatch, advantages_b, step, ref_params, recompute):
        n_micro = _check_rows(batch, settings, mesh)
        if obj.use_kl and batch.ref_logprobs is None and ref_params is None:
            raise ValueError(
                "policy_loss.kl_coef > 0 needs TrainBatch.ref_logprobs (the "
                "reference policy's log-probs of the response tokens) or the reference "
                "params (TrainState.ref_params, from init_train_state(with_reference=True))"
            )
        if not obj.use_kl:
            ref_params = None  # no reference forward for a term that is off
        # Class weights and every denominator over these rows (spec 2), before any split.
        mse_w, counts = laser.loss_counts(obj, batch.rewards, batch.finished, batch.response_mask)
        rows = _RowInputs(batch=batch, advantages=advantages_b, mse_weights=mse_w)
        # Micro-batches: sum the gradients of numerator / whole-rows denominator.
        if n_micro == 1:
            return _pair(grad_micro(params, rows, counts, step, ref_params, recompute))
        rows_m = jax.tree.map(lambda x: _split_micro(x, n_micro, mesh), rows)

        def body(acc, rows_i):
            g, aux = grad_micro(params, rows_i, counts, step, ref_params, recompute)
            return jax.tree.map(lambda a, gi: a + gi.astype(jnp.float32), acc, g), aux

        acc0 = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        grads, (pairs_m, maxes_m) = jax.lax.scan(body, acc0, rows_m)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
        pairs = jax.tree.map(lambda x: x.sum(axis=0), pairs_m)
        maxes = jax.tree.map(lambda x: x.max(axis=0), maxes_m)
        return grads, pairs, maxes

    grads_for_rows.objective = obj
    return grads_for_rows


def _pair(out):
    grads, (pairs, maxes) = out
    return grads, pairs, maxes


def _split_micro(x: jax.Array, n_micro: int, mesh: Mesh | None) -> jax.Array:
    """[R, ...] -> [n_micro, R / n_micro, ...], micro-batch i = rows i, i + n_micro, ...

    Strided rather than contiguous so that every micro-batch is spread over all batch shards
    without moving data (each device keeps its own rows); the whole-batch group statistics are
    already computed, so which rows share a micro-batch does not matter.
    """
    r = x.shape[0]
    x = x.reshape(r // n_micro, n_micro, *x.shape[1:]).swapaxes(0, 1)
    if mesh is not None:
        x = jax.lax.with_sharding_constraint(
            x, NamedSharding(mesh, P(None, sharding.BATCH, *(None,) * (x.ndim - 2)))
        )
    return x


# ---------------------------------------------------------------------------------------------
# The jitted, sharded step.


def make_train_step(
    graphdef: nnx.GraphDef,
    state_sharding: TrainState,
    laser_cfg: LaserConfig,
    loss_cfg: PolicyLossConfig,
    optim_cfg: OptimConfig,
    settings: StepSettings,
    mesh: Mesh,
) -> Callable[[TrainState, TrainBatch], tuple[TrainState, dict[str, jax.Array]]]:
    """`step_fn(state, batch) -> (state, metrics)`: the optimizer updates of one rollout batch,
    jitted on `mesh`.

    Params and optimizer state keep the shardings of `state_sharding` (from
    `train_state_sharding`) and are donated; the batch is split over (data, fsdp); metrics come
    back replicated. The LaSeR schedule (spec 4) reads the step number from `state.step + 1`:
    one step per rollout batch, however many updates it makes.

    Updates: one on the whole batch by default (the paper's recipe). With
    `settings.epochs` > 1 or a `settings.mini_batch_size` below the batch (verl's ppo_epochs and
    ppo_mini_batch_size, Tunix's num_iterations), `epochs` passes over contiguous mini-batches
    of whole prompt groups, one optimizer update each, in a `lax.scan`. Advantages come from the
    whole batch once, before the first update; class weights and denominators from each
    mini-batch (each update is the spec's loss on its rows). One no-grad pass with the
    pre-update parameters first gives the old log-probs (`recompute`), the reference's (KL) and
    the rollout mismatch; metrics are the mean over updates (maxima: the max).
    """
    tx = make_optimizer(optim_cfg)
    grad_fn = make_grad_fn(graphdef, laser_cfg, loss_cfg, settings, mesh)
    grads_for_rows = _make_rows_grad(graphdef, laser_cfg, loss_cfg, settings, mesh)
    obj = grads_for_rows.objective

    def apply(grads, params, opt_state):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def one_update(state: TrainState, batch: TrainBatch, step):
        grads, metrics = grad_fn(state.params, batch, step, state.ref_params)
        metrics["actor/grad_norm"] = optax.tree.norm(grads)
        params, opt_state = apply(grads, state.params, state.opt_state)
        return params, opt_state, metrics

    def several_updates(state: TrainState, batch: TrainBatch, step, n_mini: int):
        pre = _no_grad_logprobs(
            graphdef, obj, settings, mesh, state.params, state.ref_params, batch
        )
        mismatch, mismatch_max = laser.logprob_mismatch(
            pre["logp_bt"], batch.old_logprobs, batch.response_mask
        )
        if settings.old_logprob_source == "recompute":
            batch = batch.replace(old_logprobs=pre["logp_bt"])
        if "ref_logp_bt" in pre:
            batch = batch.replace(ref_logprobs=pre["ref_logp_bt"])
        adv, adv_metrics = laser.step_advantages(
            obj, step, batch.rewards, batch.finished, batch.rollout_logp_zc, settings.group_size
        )
        minis = jax.tree.map(lambda x: _split_mini(x, n_mini, mesh), (batch, adv))

        def update(carry, i):
            params, opt_state = carry
            mb, adv_mb = jax.tree.map(lambda x: x[i], minis)
            grads, pairs, maxes = grads_for_rows(params, mb, adv_mb, step, None, False)
            metrics = _step_metrics(obj, mb, pairs, maxes, {})
            metrics["actor/grad_norm"] = optax.tree.norm(grads)
            return apply(grads, params, opt_state), metrics

        order = jnp.tile(jnp.arange(n_mini), settings.epochs)
        (params, opt_state), metrics_u = jax.lax.scan(
            update, (state.params, state.opt_state), order
        )
        metrics = {
            k: v.max(axis=0) if k.endswith("_max") else v.mean(axis=0) for k, v in metrics_u.items()
        }
        metrics |= {
            "actor/logprob_mismatch_mean": mismatch.value(),
            "actor/logprob_mismatch_max": mismatch_max,
            "response_length/mean": batch.response_mask.sum(-1).mean(dtype=jnp.float32),
            "response/finished_frac": batch.finished.mean(dtype=jnp.float32),
            "reward/mean": batch.rewards.mean(dtype=jnp.float32),
        }
        return params, opt_state, metrics | {f"self_reward/{k}": v for k, v in adv_metrics.items()}

    def step_fn(state: TrainState, batch: TrainBatch) -> tuple[TrainState, dict[str, jax.Array]]:
        step = state.step + 1
        n_mini = _check_mini_batches(batch, settings)
        if n_mini * settings.epochs == 1:
            params, opt_state, metrics = one_update(state, batch, step)
        else:
            params, opt_state, metrics = several_updates(state, batch, step, n_mini)
        new = TrainState(params=params, opt_state=opt_state, step=step, ref_params=state.ref_params)
        return new, metrics

    batch_sharding = NamedSharding(mesh, P(sharding.BATCH))  # a prefix for every batch array
    return jax.jit(
        step_fn,
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )


def _check_mini_batches(batch: TrainBatch, settings: StepSettings) -> int:
    """The number of mini-batches (trace time): whole prompt groups dividing the batch."""
    r = batch.rewards.shape[0]
    mini = settings.mini_batch_size or r
    if r % mini or mini % settings.group_size:
        raise ValueError(
            f"mini-batches of {mini} rows must divide the {r} rows of the step batch and be "
            f"whole prompt groups (a multiple of K = {settings.group_size}); fix config field "
            "train.ppo_mini_batch_size"
        )
    return r // mini


def _split_mini(x: jax.Array, n_mini: int, mesh: Mesh | None) -> jax.Array:
    """[R, ...] -> [n_mini, R / n_mini, ...] contiguous (mini-batch i = whole prompt groups),
    each mini-batch spread over the batch shards."""
    x = x.reshape(n_mini, x.shape[0] // n_mini, *x.shape[1:])
    if mesh is not None:
        x = jax.lax.with_sharding_constraint(
            x, NamedSharding(mesh, P(None, sharding.BATCH, *(None,) * (x.ndim - 2)))
        )
    return x


def _no_grad_logprobs(graphdef, obj, settings, mesh, params, ref_params, batch) -> dict:
    """One pass without gradient over the batch, in micro-batches: the policy's log-probs of the
    response tokens ("logp_bt") and, with KL on and no TrainBatch.ref_logprobs, the
    reference's ("ref_logp_bt")."""
    use_ref = obj.use_kl and batch.ref_logprobs is None
    if use_ref and ref_params is None:
        raise ValueError(
            "policy_loss.kl_coef > 0 needs TrainBatch.ref_logprobs or TrainState.ref_params "
            "(init_train_state(with_reference=True))"
        )

    def one(b: TrainBatch) -> dict:
        def logp(p):
            p, _ = jax.lax.optimization_barrier((p, b))  # no hoisted casts (`micro_loss`)
            model = nnx.merge(graphdef, p)
            return sequence_logprobs(model, b, settings, with_zc=obj.self_reward, mesh=mesh)

        out = {"logp_bt": logp(params)["logp_bt"]}
        if use_ref:
            out["ref_logp_bt"] = logp(ref_params)["logp_bt"]
        return jax.lax.stop_gradient(out)

    n_micro = _check_rows(batch, settings, mesh)
    if n_micro == 1:
        return one(batch)
    out_m = jax.lax.map(one, jax.tree.map(lambda x: _split_micro(x, n_micro, mesh), batch))
    # Undo `_split_micro`: micro-batch i held rows i, i + n_micro, ...
    return jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(-1, *x.shape[2:]), out_m)


# ---------------------------------------------------------------------------------------------
# Host-side validation of a batch (before it reaches the jit).


def check_batch(batch: TrainBatch, group_size: int) -> None:
    """Raise a ValueError naming the field and row when a batch breaks the layout contract."""
    tokens_p, mask_p = np.asarray(batch.prompt_tokens), np.asarray(batch.prompt_mask, bool)
    tokens_r, mask_r = np.asarray(batch.response_tokens), np.asarray(batch.response_mask, bool)
    r = tokens_r.shape[0]
    expect = {
        "prompt_tokens": (r, tokens_p.shape[1]),
        "prompt_mask": tokens_p.shape,
        "response_tokens": tokens_r.shape,
        "response_mask": tokens_r.shape,
        "old_logprobs": tokens_r.shape,
        "finished": (r,),
        "rewards": (r,),
        "rollout_logp_zc": (r,),
    }
    if batch.ref_logprobs is not None:
        expect["ref_logprobs"] = tokens_r.shape
    for name, shape in expect.items():
        got = tuple(np.shape(getattr(batch, name)))
        if got != shape:
            raise ValueError(
                f"TrainBatch.{name} has shape {got}, expected {shape} "
                "(rows R, prompt length P, response length T)"
            )
    if r % group_size:
        raise ValueError(f"TrainBatch has {r} rows, not a multiple of K = {group_size}")
    # Right padding: the mask never turns back on after its first False.
    bad = np.nonzero((~mask_r[:, :-1] & mask_r[:, 1:]).any(axis=1))[0]
    if bad.size:
        raise ValueError(
            f"TrainBatch.response_mask row {bad[0]} is not right-padded (a gap "
            "before its last token); responses must be y_1 .. <eos> then padding"
        )
    bad = np.nonzero((mask_p[:, :-1] & ~mask_p[:, 1:]).any(axis=1))[0]
    if bad.size:
        raise ValueError(
            f"TrainBatch.prompt_mask row {bad[0]} is not left-padded; prompts must "
            "be padding then the prompt tokens"
        )
    if tokens_p.shape[1] < 1 or (~mask_p.any(axis=1)).any():
        row = int(np.nonzero(~mask_p.any(axis=1))[0][0]) if tokens_p.shape[1] else 0
        raise ValueError(f"TrainBatch.prompt_mask row {row} is empty: every row needs a prompt")
    finished = np.asarray(batch.finished, bool)
    bad = np.nonzero(finished & ~mask_r.any(axis=1))[0]
    if bad.size:
        raise ValueError(
            f"TrainBatch row {bad[0]} is finished but has no response tokens; a "
            "finished row's mask must include its EOS"
        )
    rewards = np.asarray(batch.rewards, np.float64)
    bad = np.nonzero((rewards != 0) & (rewards != 1))[0]
    if bad.size:
        raise ValueError(
            f"TrainBatch.rewards row {bad[0]} is {rewards[bad[0]]}; the verifier "
            "reward must be 0 or 1 (LASER_SPEC section 6)"
        )
