"""The one-forward, sharded, jitted GRPO / LaSeR train step (LASER_SPEC sections 1-4).

One call of the model over `prompt, y_1 .. y_T, <eos>, z_c` gives both losses:

- the policy log-probs of y_1 .. <eos>, tempered as the sampler's (`token_logprobs`), feed the PPO
  clipped surrogate with group-normalised (and, after the warm-ups, self-reward-integrated)
  advantages;
- log pi(z_c | x, y, <eos>) is read from the raw logits at the EOS position and becomes
  r_s = beta_v * (log pi(z_c) - c_ref), the input of the class-balanced MSE.

The formulas come from `laserjax.laser`; this module only arranges the data, the forward, the
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

The z_c column (`StepSettings.append_zc`, on by default as the spec writes the sequence) is never
read: log p(z_c) is the EOS position's output, and causal attention hides z_c from every earlier
position. Dropping it gives the same numbers one position shorter.
"""

from __future__ import annotations

import dataclasses
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
from laserjax.model.transformer import Transformer
from laserjax.sampler import token_logprobs

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
    append_zc: bool = True
    """Put z_c in the sequence at eos_pos + 1 (spec 2). Causally invisible to every log-prob the
    step reads, so False gives the same numbers one position shorter; kept for the benchmark."""
    compute_entropy: bool = False
    """Log the mean policy entropy over response tokens (costs one more pass over each chunk)."""

    def __post_init__(self) -> None:
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
    """Everything a step updates: parameters, optimizer state, optimizer step count."""

    params: nnx.State
    opt_state: optax.OptState
    step: jax.Array
    """int32 scalar: optimizer steps taken. The step being taken is `step + 1` (the spec's
    schedule counts steps from 1, section 4)."""


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
    return TrainState(
        params=sharding.state_shardings(state.params, mesh),
        opt_state=sharding.state_shardings(state.opt_state, mesh),
        step=sharding.replicated(mesh),
    )


def init_train_state(
    model: Transformer, optim_cfg: OptimConfig, mesh: Mesh
) -> tuple[nnx.GraphDef, TrainState]:
    """Split the model into (graphdef, params), place params and fresh AdamW moments on `mesh`."""
    graphdef, params = nnx.split(model, nnx.Param)
    tx = make_optimizer(optim_cfg)
    abstract = TrainState(
        params=params,
        opt_state=jax.eval_shape(tx.init, params),
        step=jax.ShapeDtypeStruct((), jnp.int32),
    )
    shard = train_state_sharding(abstract, mesh)
    params = jax.device_put(params, shard.params)
    opt_state = jax.jit(tx.init, out_shardings=shard.opt_state)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), shard.step)
    return graphdef, TrainState(params=params, opt_state=opt_state, step=step)


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
    positions_bl = jnp.maximum(jnp.cumsum(mask_bl, axis=1, dtype=jnp.int32) - 1, 0)
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
    with_entropy: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
    """`token_logprobs(model.logits(h), targets, temperature)` without materialising [B, T, V].

    The LM head runs over `chunk` positions at a time inside `lax.map`; `jax.checkpoint` keeps
    only each chunk's hidden states for the backward pass and recomputes its logits there. With
    chunk >= T there is one chunk, run as a plain head whose logits the backward pass keeps:
    faster (no recompute) when [B, T, V] float32 fits in memory.
    Returns (logp_bt, entropy_bt or None), float32.
    """
    b, t, d = h_btd.shape
    n = -(-t // chunk)
    chunk = logit_chunk_len(t, chunk)  # same chunk count, least padding
    pad = n * chunk - t
    h_nbcd = jnp.pad(h_btd, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, d).swapaxes(0, 1)
    tg_nbc = jnp.pad(targets_bt, ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)

    def one_chunk(args):
        h_bcd, tg_bc = args
        logits_bcv = model.logits(h_bcd)
        logp_bc = token_logprobs(logits_bcv, tg_bc, temperature)
        if not with_entropy:
            return logp_bc, None
        t_eff = temperature if temperature > 0 else 1.0
        all_logp = jax.nn.log_softmax(logits_bcv / t_eff, axis=-1)
        ent_bc = -jnp.sum(jnp.exp(all_logp) * all_logp, axis=-1)
        return logp_bc, jax.lax.stop_gradient(ent_bc)

    if n == 1:
        # One chunk: the plain head, logits kept for the backward pass (no recompute).
        logp_nbc, ent_nbc = jax.tree.map(lambda x: x[None], one_chunk((h_nbcd[0], tg_nbc[0])))
    else:
        logp_nbc, ent_nbc = jax.lax.map(jax.checkpoint(one_chunk), (h_nbcd, tg_nbc))

    def unchunk(x_nbc: jax.Array) -> jax.Array:
        return x_nbc.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]

    return unchunk(logp_nbc), None if ent_nbc is None else unchunk(ent_nbc)


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
        only at finished rows), present when `with_zc`;
      "entropy_bt": [R, T] when settings.compute_entropy.
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
    logp_bt, ent_bt = chunked_token_logprobs(
        model,
        h_resp,
        batch.response_tokens,
        settings.temperature,
        settings.logit_chunk,
        settings.compute_entropy,
    )
    out = {"logp_bt": logp_bt}
    if ent_bt is not None:
        out["entropy_bt"] = ent_bt
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
    """Static shape checks (trace time); returns the number of micro-batches."""
    r = batch.rewards.shape[0]
    if r % settings.group_size:
        raise ValueError(
            f"TrainBatch has {r} rows, not a multiple of K = group_size = "
            f"{settings.group_size}: rows must be whole prompt groups"
        )
    mb = settings.micro_batch_size or r
    if r % mb:
        raise ValueError(
            f"micro_batch_size {mb} does not divide the {r} rows of the step batch; "
            "pick a divisor (config field train.micro_batch_size)"
        )
    if mesh is not None:
        shards = int(np.prod([mesh.shape[a] for a in sharding.BATCH]))
        if mb % shards:
            raise ValueError(
                f"micro-batches of {mb} rows cannot be split over the {shards} batch "
                f"shards of the mesh (data x fsdp); make train.micro_batch_size a "
                f"multiple of {shards}"
            )
    return r // mb


def make_grad_fn(
    graphdef: nnx.GraphDef,
    laser_cfg: LaserConfig,
    loss_cfg: PolicyLossConfig,
    settings: StepSettings,
    mesh: Mesh | None = None,
):
    """`grad_fn(params, batch, step) -> (grads, metrics)` for the step numbered `step` (from 1).

    Not jitted: `make_train_step` jits it with the optimizer; tests jit it alone. `grads` has the
    params' structure and dtype; `metrics` is a dict of float32 scalars.
    """
    use_laser = laser_cfg.enabled
    use_kl = loss_cfg.kl_coef > 0
    k = settings.group_size

    def micro_loss(params, rows: _RowInputs, dens: dict[str, jax.Array], mse_scale: jax.Array):
        model = nnx.merge(graphdef, params)
        b = rows.batch
        out = sequence_logprobs(model, b, settings, with_zc=use_laser, mesh=mesh)
        mask = b.response_mask
        loss_bt, ppo = laser.ppo_clipped_surrogate(
            out["logp_bt"],
            b.old_logprobs,
            rows.advantages,
            mask,
            loss_cfg.clip_low,
            loss_cfg.clip_high,
            loss_cfg.dual_clip,
        )
        pg = laser.aggregate_loss(loss_bt, mask, loss_cfg.loss_agg)
        loss = laser.SumCount(pg.total, dens["policy"]).value()
        metrics = {
            "actor/pg_loss": pg,
            "actor/pg_clipfrac": ppo["clipfrac"],
            "actor/pg_clipfrac_lower": ppo["clipfrac_lower"],
            "actor/ppo_kl": ppo["ppo_kl"],
        }
        if "entropy_bt" in out:
            metrics["actor/entropy"] = laser.aggregate_loss(out["entropy_bt"], mask, "token-mean")
        if use_kl:
            kl_bt = laser.kl_penalty(out["logp_bt"], b.ref_logprobs, loss_cfg.kl_type)
            kl = laser.aggregate_loss(kl_bt, mask, loss_cfg.loss_agg)
            loss = loss + loss_cfg.kl_coef * laser.SumCount(kl.total, dens["policy"]).value()
            metrics["actor/kl_loss"] = kl
        if use_laser:
            r_s_b = laser.self_reward_score(out["logp_zc_b"], laser_cfg.beta_v, laser_cfg.c_ref)
            mse = laser.self_reward_mse(r_s_b, b.rewards, b.finished, rows.mse_weights)
            loss = loss + mse_scale * laser.SumCount(mse.total, dens["mse"]).value()
            metrics["self_reward/mse"] = mse
            sv = laser.self_verification_metrics(r_s_b, b.rewards, b.finished)
            metrics |= {f"self_reward/{name}": pair for name, pair in sv.items()}
        return loss, metrics

    grad_micro = jax.grad(micro_loss, has_aux=True)

    def grad_fn(params: nnx.State, batch: TrainBatch, step: jax.Array | int):
        n_micro = _check_rows(batch, settings, mesh)
        if use_kl and batch.ref_logprobs is None:
            raise ValueError(
                "policy_loss.kl_coef > 0 needs TrainBatch.ref_logprobs (the "
                "reference policy's log-probs of the response tokens)"
            )
        # -- whole-batch quantities (spec 2-4): group statistics, class weights, denominators.
        step = jnp.asarray(step, jnp.int32)
        adv_v = laser.grpo_advantages(batch.rewards, k)
        extra: dict[str, jax.Array] = {}
        if use_laser:
            warm1, warm2 = laser_cfg.reasoning_warmup_steps, laser_cfg.self_reward_warmup_steps
            integrate = laser.integration_active(step, warm1, warm2)
            r_s_rollout = laser.self_reward_score(
                batch.rollout_logp_zc, laser_cfg.beta_v, laser_cfg.c_ref
            )
            adv_int, fallback = laser.integrated_advantages(
                adv_v, r_s_rollout, batch.finished, k, laser_cfg.tau, laser_cfg.std_threshold
            )
            advantages = jnp.where(integrate, adv_int, adv_v)
            mse_w, n_c, n_i = laser.mse_class_weights(batch.rewards, batch.finished)
            mse_on = laser.mse_active(step, warm1)
            mse_scale = jnp.where(mse_on, jnp.float32(laser_cfg.alpha), 0.0)
            dens = {"mse": n_c + n_i}
            extra = {
                "self_reward/std_filter_fallback_frac": fallback,
                "self_reward/mse_active": mse_on.astype(jnp.float32),
                "self_reward/integration_active": integrate.astype(jnp.float32),
            }
        else:
            advantages = adv_v
            mse_w = jnp.zeros_like(adv_v)
            mse_scale = jnp.float32(0.0)
            dens = {}
        # Any (sum, count) of `aggregate_loss` has a count that depends on the mask alone.
        dens["policy"] = laser.aggregate_loss(
            jnp.zeros(batch.response_mask.shape, jnp.float32),
            batch.response_mask,
            loss_cfg.loss_agg,
        ).count
        rows = _RowInputs(batch=batch, advantages=advantages, mse_weights=mse_w)

        # -- micro-batches: sum the gradients of numerator / whole-batch denominator.
        if n_micro == 1:
            grads, metrics = grad_micro(params, rows, dens, mse_scale)
        else:
            rows_m = jax.tree.map(lambda x: _split_micro(x, n_micro, mesh), rows)

            def body(acc, rows_i):
                g, m = grad_micro(params, rows_i, dens, mse_scale)
                return jax.tree.map(lambda a, gi: a + gi.astype(jnp.float32), acc, g), m

            acc0 = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
            grads, metrics_m = jax.lax.scan(body, acc0, rows_m)
            grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
            metrics = jax.tree.map(lambda x: x.sum(axis=0), metrics_m)

        values = laser.finalize(metrics)
        if use_laser:
            values["self_reward/f1"] = laser.self_verification_f1(
                values["self_reward/acc_correct"], values["self_reward/acc_incorrect"]
            )
        values["response_length/mean"] = batch.response_mask.sum(-1).mean(dtype=jnp.float32)
        values["response/finished_frac"] = batch.finished.mean(dtype=jnp.float32)
        values["reward/mean"] = batch.rewards.mean(dtype=jnp.float32)
        return grads, values | extra

    return grad_fn


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
):
    """`step_fn(state, batch) -> (state, metrics)`: one optimizer step, jitted on `mesh`.

    Params and optimizer state keep the shardings of `state_sharding` (from
    `train_state_sharding`) and are donated; the batch is split over (data, fsdp); metrics come
    back replicated. The LaSeR schedule (spec 4) reads the step number from `state.step + 1`.
    """
    tx = make_optimizer(optim_cfg)
    grad_fn = make_grad_fn(graphdef, laser_cfg, loss_cfg, settings, mesh)

    def step_fn(state: TrainState, batch: TrainBatch) -> tuple[TrainState, dict[str, jax.Array]]:
        step = state.step + 1
        grads, metrics = grad_fn(state.params, batch, step)
        metrics["actor/grad_norm"] = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(params=params, opt_state=opt_state, step=step), metrics

    batch_sharding = NamedSharding(mesh, P(sharding.BATCH))  # a prefix for every batch array
    return jax.jit(
        step_fn,
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )


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
