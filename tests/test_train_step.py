"""The one-forward train step (issue 4): parity with plain forwards and a plain GRPO step,
micro-batch accumulation, the sharded step, and the z_c read-out (LASER_SPEC sections 1-4).

Tiny random float32 models; tolerances are stated per test and are float32 round-off of sums
computed in a different order (chunked vs whole LM head, scan vs one pass, sharded vs not).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from laserjax import sharding, trainer
from laserjax import train_step as ts
from laserjax.config import LaserConfig, MeshConfig, OptimConfig, PolicyLossConfig
from laserjax.laser import token_logprobs
from laserjax.model.transformer import Transformer, TransformerConfig

VOCAB, EOS, ZC = 96, 2, 90
R, P, T, K = 8, 5, 7, 4
LASER_ON = LaserConfig(reasoning_warmup_steps=0, self_reward_warmup_steps=0)
# alpha = 0 and both warm-ups far away: the step must be plain GRPO.
LASER_OFF = LaserConfig(alpha=0.0, reasoning_warmup_steps=1000, self_reward_warmup_steps=1000)


def _model(tie: bool = True, seed: int = 0) -> Transformer:
    cfg = TransformerConfig(
        model_type="qwen2",
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        tie_word_embeddings=tie,
        qkv_bias=True,
    )
    model = Transformer(cfg, rngs=nnx.Rngs(seed))
    # Scale the 0.02-std init up so the next-token distributions are far from uniform.
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda x: 4.0 * x, params))
    return model


@pytest.fixture(scope="module")
def model() -> Transformer:
    return _model()


def _rows(seed: int = 0):
    """Prompt/response layout of R = 8 rows (2 prompts x K = 4), hand-picked edge cases:
    row 1 finishes with EOS in the last slot (z_c goes to the extra column), rows 2 and 6 are
    truncated (no EOS), row 5 is truncated short of T (batch padded beyond it)."""
    rng = np.random.default_rng(seed)
    prompt_len = np.array([3, 5, 1, 4, 2, 5, 3, 4])
    resp_len = np.array([4, T, T, 1, 6, 3, T, 2])
    finished = np.array([1, 1, 0, 1, 1, 0, 0, 1], bool)
    rewards = np.array([1, 0, 0, 1, 1, 1, 0, 0], np.float32)
    pmask = np.arange(P)[None] >= P - prompt_len[:, None]
    rmask = np.arange(T)[None] < resp_len[:, None]
    ptok = np.where(pmask, rng.integers(3, VOCAB - 10, (R, P)), 0)
    rtok = np.where(rmask, rng.integers(3, VOCAB - 10, (R, T)), 0)
    rtok[np.arange(R)[finished], resp_len[finished] - 1] = EOS
    return dict(
        prompt_tokens=ptok,
        prompt_mask=pmask,
        response_tokens=rtok,
        response_mask=rmask,
        finished=finished,
        rewards=rewards,
    )


def _plain_forward_logits(model, rows) -> jax.Array:
    """Whole-vocabulary logits of `prompt, response` (no z_c), [R, P + T, V]."""
    tokens = np.concatenate([rows["prompt_tokens"], rows["response_tokens"]], axis=1)
    mask = np.concatenate([rows["prompt_mask"], rows["response_mask"]], axis=1)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return model(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask))


def _packed_forward(model, rows):
    """Each row as `prompt, response, z_c` with no left padding (positions 0..n-1, padding only
    after the end, which causal attention never sees): [R, P + T + 1, V] logits and the length
    of each row's prompt and response. A layout independent of the train step's."""
    seqs, lens = [], []
    for r in range(R):
        prompt = rows["prompt_tokens"][r][rows["prompt_mask"][r]]
        resp = rows["response_tokens"][r][rows["response_mask"][r]]
        seqs.append(np.concatenate([prompt, resp, [ZC]]))
        lens.append((len(prompt), len(resp)))
    length = P + T + 1
    tokens = np.stack([np.pad(x, (0, length - len(x))) for x in seqs])
    mask = np.arange(length)[None] < np.array([len(x) for x in seqs])[:, None]
    positions = np.broadcast_to(np.arange(length), (R, length))
    logits = model(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask))
    return logits, lens


def _batch(model, seed: int = 0, temperature: float = 1.0, **overrides) -> ts.TrainBatch:
    """A batch whose old log-probs are the model's own plus noise, so the PPO ratio leaves the
    clip range on some tokens (both clip branches and the dual clip get exercised)."""
    rows = _rows(seed) | overrides
    rng = np.random.default_rng(seed + 1)
    logits = _plain_forward_logits(model, rows)[:, P - 1 : P - 1 + T]
    logp = np.asarray(jax.nn.log_softmax(logits / temperature, -1))
    logp = np.take_along_axis(logp, rows["response_tokens"][..., None], -1)[..., 0]
    old = np.where(rows["response_mask"], logp + rng.normal(0, 0.3, logp.shape), 0.0)
    batch = ts.TrainBatch(
        prompt_tokens=jnp.asarray(rows["prompt_tokens"], jnp.int32),
        prompt_mask=jnp.asarray(rows["prompt_mask"]),
        response_tokens=jnp.asarray(rows["response_tokens"], jnp.int32),
        response_mask=jnp.asarray(rows["response_mask"]),
        old_logprobs=jnp.asarray(old, jnp.float32),
        finished=jnp.asarray(rows["finished"]),
        rewards=jnp.asarray(rows["rewards"]),
        rollout_logp_zc=jnp.asarray(-23.0 + rng.uniform(0, 15, R), jnp.float32),
    )
    ts.check_batch(batch, K)
    return batch


def _settings(**kw) -> ts.StepSettings:
    return ts.StepSettings(**(dict(group_size=K, self_reward_token_id=ZC, logit_chunk=3) | kw))


def _grads(model, batch, laser_cfg, settings, step=1, loss_cfg=None):
    loss_cfg = loss_cfg or PolicyLossConfig()
    graphdef, params = nnx.split(model, nnx.Param)
    fn = jax.jit(ts.make_grad_fn(graphdef, laser_cfg, loss_cfg, settings))
    return fn(params, batch, step)


def _max_rel_err(a, b) -> float:
    """max over leaves of max|a - b| / max|b| (the error relative to the leaf's scale)."""
    errs = jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(y))), a, b)
    return max(jax.tree.leaves(errs))


# ---------------------------------------------------------------------------------------------
# The forward: z_c placement, log-probs against plain forwards.


def test_build_sequences_places_zc_after_eos_of_finished_rows_only(model):
    batch = _batch(model)
    tokens, positions, mask, n_resp = (np.asarray(x) for x in ts.build_sequences(batch, ZC, True))
    assert tokens.shape == (R, P + T + 1)
    rows = _rows()
    for r in range(R):
        n = int(rows["response_mask"][r].sum())
        assert n_resp[r] == n
        zc_cols = np.nonzero(tokens[r] == ZC)[0]
        if rows["finished"][r]:
            # z_c at eos_pos + 1, inside the mask, with the next contiguous position.
            assert list(zc_cols) == [P + n] and tokens[r, P + n - 1] == EOS
            assert mask[r, P + n] and positions[r, P + n] == positions[r, P + n - 1] + 1
            assert mask[r].sum() == rows["prompt_mask"][r].sum() + n + 1
        else:
            assert zc_cols.size == 0 and mask[r].sum() == rows["prompt_mask"][r].sum() + n
    assert tokens[1, P + T] == ZC  # row 1: EOS in the last slot, z_c in the extra column
    assert not mask[[0, 2, 3, 4, 5, 6, 7], P + T].any()


def test_logprobs_equal_plain_teacher_forced_forward(model):
    """Against `model(...)` over each row packed as `prompt, response, z_c` from position 0.

    Policy log-probs: log_softmax(logits / 0.7) at each response token (the sampler's
    definition, tempered); log p(z_c): raw log_softmax at the EOS position. Tolerance 1e-5
    absolute on log-probs of magnitude ~1-20 (float32; chunked head vs one matmul, left-padded
    vs packed rows).
    """
    temperature = 0.7
    batch = _batch(model, temperature=temperature)
    settings = _settings(temperature=temperature)
    out = jax.jit(lambda b: ts.sequence_logprobs(model, b, settings))(batch)
    logp_bt, logp_zc = np.asarray(out["logp_bt"]), np.asarray(out["logp_zc_b"])
    rows = _rows()
    logits_blv, lens = _packed_forward(model, rows)
    for r, (n_prompt, n_resp) in enumerate(lens):
        resp = rows["response_tokens"][r][:n_resp]
        logits = logits_blv[r, n_prompt - 1 : n_prompt - 1 + n_resp]
        want = token_logprobs(logits, jnp.asarray(resp), temperature)
        np.testing.assert_allclose(logp_bt[r, :n_resp], np.asarray(want), atol=1e-5, rtol=0)
        # And the definition spelt out: tempered log_softmax over the whole vocabulary.
        by_hand = np.asarray(jax.nn.log_softmax(logits / temperature, -1))
        np.testing.assert_allclose(
            logp_bt[r, :n_resp], by_hand[np.arange(n_resp), resp], atol=1e-5, rtol=0
        )
        if rows["finished"][r]:
            eos = n_prompt + n_resp - 1  # z_c is predicted at the EOS position, raw logits
            want_zc = jax.nn.log_softmax(logits_blv[r, eos])[ZC]
            np.testing.assert_allclose(logp_zc[r], float(want_zc), atol=1e-5, rtol=0)


def test_rollout_logprobs_equal_train_step_logprobs(model):
    """On-policy, the sampler's old log-probs and log p(z_c) (KV-cache decode) equal what the
    train step recomputes from `trainer.train_batch` in one forward (PPO ratio 1): 1e-5
    absolute, float32, temperature 0.7."""
    from laserjax.sampler import Sampler

    eos_ids = tuple(range(2, 10))  # several EOS ids so that about half the rows finish
    sampler = Sampler(
        model,
        eos_ids=eos_ids,
        pad_id=0,
        self_reward_token_id=ZC,
        max_new_tokens=T,
        prompt_buckets=(P,),
    )
    prompts = [[11, 12, 13], [20, 21, 22, 23, 24]]
    rollout = sampler.sample(prompts, k=K, temperature=0.7, seed=3)
    assert 0 < rollout.finished.sum() < R  # both finished and truncated rows
    batch = trainer.train_batch(rollout, rewards=np.arange(R) % 2)
    ts.check_batch(batch, K)
    settings = _settings(temperature=rollout.logprob_temperature)
    out = jax.jit(lambda b: ts.sequence_logprobs(model, b, settings))(batch)
    mask = rollout.response_mask
    np.testing.assert_allclose(
        np.asarray(out["logp_bt"])[mask], rollout.logprobs[mask], atol=1e-5, rtol=0
    )
    np.testing.assert_allclose(
        np.asarray(out["logp_zc_b"])[rollout.finished],
        rollout.logp_zc[rollout.finished],
        atol=1e-5,
        rtol=0,
    )


def test_train_step_uses_the_samplers_token_logprobs():
    """One definition of the policy log-probs for rollouts and training (the most common GRPO
    bug is a mismatch): the step and the sampler import laser.py's function."""
    from laserjax import laser, sampler

    assert ts.token_logprobs is laser.token_logprobs
    assert sampler.token_logprobs is laser.token_logprobs


# ---------------------------------------------------------------------------------------------
# alpha = 0, integration off: a plain GRPO step.


def _reference_grpo_loss(graphdef, batch, loss_cfg: PolicyLossConfig):
    """GRPO written out independently, as a function of the params: full-vocabulary logits of
    `prompt, response` (no z_c), group-normalised advantages, the dual-clip PPO surrogate,
    token-mean."""
    rows = {
        f: np.asarray(getattr(batch, f))
        for f in ("prompt_tokens", "prompt_mask", "response_tokens", "response_mask")
    }
    r_gk = np.asarray(batch.rewards, np.float64).reshape(-1, K)
    adv = (r_gk - r_gk.mean(1, keepdims=True)) / (r_gk.std(1, ddof=1, keepdims=True) + 1e-6)
    adv = jnp.asarray(adv.reshape(-1, 1), jnp.float32)
    mask = batch.response_mask

    def loss_fn(params):
        logits = _plain_forward_logits(nnx.merge(graphdef, params), rows)[:, P - 1 : P - 1 + T]
        logp = jnp.take_along_axis(
            jax.nn.log_softmax(logits, -1), batch.response_tokens[..., None], -1
        )[..., 0]
        ratio = jnp.exp(jnp.where(mask, logp - batch.old_logprobs, 0.0))
        loss = jnp.maximum(
            -adv * ratio, -adv * jnp.clip(ratio, 1 - loss_cfg.clip_low, 1 + loss_cfg.clip_high)
        )
        loss = jnp.where(adv < 0, jnp.minimum(loss, -adv * loss_cfg.dual_clip), loss)
        return jnp.sum(jnp.where(mask, loss, 0.0)) / mask.sum()

    return loss_fn


def test_step_without_mse_and_integration_is_plain_grpo(model):
    """Gradients of the LaSeR step with alpha = 0 and integration off, with and without the
    appended z_c column, and of `algorithm: grpo`, all equal the independently written GRPO
    gradient: max |diff| <= 1e-5 x the leaf's largest gradient. (Measured: 3e-6; against a
    float64 run of the reference, the float32 reference itself is 2.6e-6 off and the step
    3.0e-6, so this is float32 round-off.) With and without z_c in the sequence the step's
    gradients agree to <= 1e-6 (measured 4e-7): the causal mask hides z_c from every log-prob
    the policy loss reads."""
    batch = _batch(model)
    loss_cfg = PolicyLossConfig()
    graphdef, params = nnx.split(model, nnx.Param)
    ref_loss, ref_grads = jax.jit(
        jax.value_and_grad(_reference_grpo_loss(graphdef, batch, loss_cfg))
    )(params)
    grads_zc, m_zc = _grads(model, batch, LASER_OFF, _settings(append_zc=True))
    grads_nozc, m_nozc = _grads(model, batch, LASER_OFF, _settings(append_zc=False))
    # `algorithm: grpo` also takes the single-chunk LM head (chunk >= T, logits kept).
    grads_grpo, m_grpo = _grads(
        model, batch, dataclasses.replace(LASER_OFF, algorithm="grpo"), _settings(logit_chunk=T)
    )
    assert 0 < float(m_zc["actor/pg_clipfrac"]) < 1  # the clipped branch is really exercised
    assert float(m_zc["self_reward/mse_active"]) == 0.0
    assert float(m_zc["self_reward/integration_active"]) == 0.0
    for grads, metrics in ((grads_zc, m_zc), (grads_nozc, m_nozc), (grads_grpo, m_grpo)):
        assert _max_rel_err(grads, ref_grads) <= 1e-5
        np.testing.assert_allclose(metrics["actor/pg_loss"], ref_loss, rtol=1e-6)
    # Appending z_c changes nothing the policy loss reads (the causal mask).
    assert _max_rel_err(grads_zc, grads_nozc) <= 1e-6


# ---------------------------------------------------------------------------------------------
# The MSE term: truncated rows contribute nothing; value against a hand computation.


def test_zc_column_changes_nothing_under_laser(model):
    """With the MSE and the advantage integration on (alpha 1, every warm-up over), the step with
    z_c written into the sequence and the default step without it give the same log p(z_c), MSE
    and gradients: z_c is an input no position before it sees. The two runs differ only in the
    sequence length the matmuls run over, so at most float32 round-off of one forward and
    backward, ~1e-6 relative: bound 1e-5 (measured 0.0: XLA:CPU sums the same terms in the same
    order). Row 1 ends with EOS in the last slot, where the column would be an extra one."""
    rewards = np.array([1, 0, 1, 0, 1, 1, 0, 0], np.float32)
    batch = _batch(model, rewards=rewards)
    laser_cfg = dataclasses.replace(LASER_ON, alpha=1.0)
    assert _settings().append_zc is False  # the default leaves the column out
    g_zc, m_zc = _grads(model, batch, laser_cfg, _settings(append_zc=True))
    g_no, m_no = _grads(model, batch, laser_cfg, _settings())
    assert float(m_zc["self_reward/mse_active"]) == 1.0
    assert float(m_zc["self_reward/integration_active"]) == 1.0
    for key in ("self_reward/mse", "self_reward/r_s_correct", "self_reward/r_s_incorrect"):
        np.testing.assert_allclose(m_no[key], m_zc[key], rtol=1e-5)
    np.testing.assert_allclose(m_no["actor/pg_loss"], m_zc["actor/pg_loss"], rtol=1e-5, atol=1e-7)
    assert _max_rel_err(g_no, g_zc) <= 1e-5


def test_mse_over_finished_rows_only(model):
    """All rewards equal inside each group -> A_v = 0, so the gradient is alpha x grad(MSE)
    alone. Changing the truncated rows' tokens must change neither the MSE nor its gradient
    (<= 1e-6 relative); the MSE equals the class-balanced sum over finished rows / (N_c + N_i)
    computed from plain teacher-forced forwards (1e-5 relative)."""
    rewards = np.array([1, 1, 1, 1, 0, 0, 0, 0], np.float32)
    batch = _batch(model, rewards=rewards)
    laser_cfg = dataclasses.replace(LASER_ON, alpha=1.0, self_reward_warmup_steps=1000)
    grads, metrics = _grads(model, batch, laser_cfg, _settings())
    assert float(metrics["self_reward/mse_active"]) == 1.0
    assert float(metrics["actor/pg_loss"]) == 0.0

    truncated = ~np.asarray(batch.finished)
    rng = np.random.default_rng(7)
    tokens = np.asarray(batch.response_tokens).copy()
    tokens[truncated] = np.where(
        np.asarray(batch.response_mask)[truncated],
        rng.integers(3, VOCAB - 10, tokens[truncated].shape),
        0,
    )
    other = batch.replace(response_tokens=jnp.asarray(tokens, jnp.int32))
    grads2, metrics2 = _grads(model, other, laser_cfg, _settings())
    assert _max_rel_err(grads2, grads) <= 1e-6
    np.testing.assert_allclose(metrics2["self_reward/mse"], metrics["self_reward/mse"], rtol=1e-6)

    # By hand: finished rows 0, 1, 3 (correct), 4, 7 (incorrect): N_c = 3, N_i = 2.
    rows = _rows()
    logits_blv, lens = _packed_forward(model, rows)
    logp_zc = {
        r: float(jax.nn.log_softmax(logits_blv[r, sum(lens[r]) - 1])[ZC])
        for r in np.nonzero(rows["finished"])[0]
    }
    n_c, n_i = 3, 2
    total = 0.0
    for r, lp in logp_zc.items():
        r_s = 0.1 * (lp + 23.0)
        w = (n_c + n_i) / (2 * (n_c if rewards[r] == 1 else n_i))
        total += w * (r_s - rewards[r]) ** 2
    np.testing.assert_allclose(metrics["self_reward/mse"], total / (n_c + n_i), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Gradient accumulation and sharding.


# float32 unit round-off.
U32 = 2.0**-24
# Gradients of one step computed in two layouts (sharded or on one device, micro-batched or not),
# max |diff| relative to the leaf's largest element. Both are float32 sums of the same terms in
# another order (e.g. 4 batch shards x 2 micro-batches instead of 1 x 2; the tensor axis splits
# the 32- and 64-wide contractions). A reordered sum of n terms differs by <= (n - 1) u
# sum|terms| (Higham, Accuracy and Stability of Numerical Algorithms, eq. 3.5). The largest sums
# on a weight's gradient path are the 8 x 13 = 104 token positions and the 96-word vocabulary,
# and the two layers' backward chain passes through ~4 more contractions of <= 64 terms each:
# n_total <~ 104 + 96 + 4 x 64 = 456. With sum|terms| <= ~2 max|g| (no heavy cancellation in
# these gradients) the budget is 2 x 456 u = 5.4e-5. Measured: 3e-6 to 7e-6 on three meshes and
# under XLA CPU flags that change vectorisation (issue 11).
GRAD_RTOL = 2 * (104 + 96 + 4 * 64) * U32


@pytest.mark.parametrize(
    "loss_agg", ["token-mean", pytest.param("seq-mean-token-mean", marks=pytest.mark.slow)]
)
def test_two_micro_batches_equal_the_full_batch(model, loss_agg):
    """Full LaSeR step (MSE and integration on, KL on): gradients of 2 micro-batches of 4 rows
    equal one batch of 8, max |diff| <= GRAD_RTOL x the leaf's largest gradient (the same
    float32 sums in another order; measured 2e-6 to 4e-6), metrics to `_metric_tol`."""
    loss_cfg = PolicyLossConfig(loss_agg=loss_agg, kl_coef=0.05, kl_type="low_var_kl")
    batch = _batch(model)
    batch = batch.replace(ref_logprobs=batch.old_logprobs - 0.1)
    full, m_full = _grads(model, batch, LASER_ON, _settings(), loss_cfg=loss_cfg)
    micro, m_micro = _grads(
        model, batch, LASER_ON, _settings(micro_batch_size=4), loss_cfg=loss_cfg
    )
    assert float(m_full["self_reward/integration_active"]) == 1.0
    assert float(m_full["self_reward/mse"]) > 0 and float(m_full["actor/kl_loss"]) > 0
    assert _max_rel_err(micro, full) <= GRAD_RTOL
    for name, value in m_full.items():
        err = np.abs(np.asarray(m_micro[name]) - np.asarray(value))
        assert np.all(err <= _metric_tol(name, value)), (name, err)


def _metric_tol(name: str, value) -> np.ndarray:
    """Round-off tolerance of a step metric computed in another layout. Metrics are means over
    the batch of per-token or per-row terms of size <= ~1 (rewards, advantage x ratio, r_s,
    fractions) computed through the same chain as the gradients: GRAD_RTOL of |value| + 1.
    `ppo_kl` and `kl_loss` are means of differences of log-probs of size <= 25 here, so their
    round-off is GRAD_RTOL x 25 absolute."""
    scale = 25.0 if name in ("actor/ppo_kl", "actor/kl_loss") else 1.0
    return GRAD_RTOL * (np.abs(np.asarray(value)) + scale)


def _adam_first_step_bound(g_ref, grad_tol, p_ref, lr, eps):
    """Elementwise bound on |p_a - p_b| after AdamW's first step from the same params, when the
    two (clipped) gradients differ by at most `grad_tol` (array broadcast to g_ref).

    From zero moments the bias-corrected first step is p - lr (f(g) + wd p) with
    f(g) = g / (|g| + eps) (optax.adamw: m_hat = g, sqrt(v_hat) = |g|). f' = eps / (|g| + eps)^2
    falls with |g|, so by the mean value theorem |f(g_a) - f(g_b)| <= grad_tol x eps /
    (max(|g_ref| - grad_tol, 0) + eps)^2, and never more than 2 (|f| < 1). That is the lr-sized
    difference a gradient near eps can legitimately make (issue 11). On top: rounding of the two
    stored results (half an ulp each of |p'| <= |p| + 2 lr; measured up to one ulp apart, so two
    ulps) and of f itself (a few u, times lr).
    """
    m = np.maximum(np.abs(g_ref) - grad_tol, 0.0)
    df = np.minimum(2.0, grad_tol * eps / (m + eps) ** 2)
    ulp = np.spacing((np.abs(p_ref) + 2 * lr).astype(np.float32))
    return lr * df + 2 * ulp + 8 * U32 * lr


def _adam_moments(opt_state):
    mu = optax.tree_utils.tree_get(opt_state, "mu")
    nu = optax.tree_utils.tree_get(opt_state, "nu")
    return mu, nu


def _compare_steps(a, m_a, b, m_b, p0, optim: OptimConfig) -> dict[str, float]:
    """Assert that state `a` (and metrics `m_a`) are one AdamW step computing the same gradients,
    metrics and update as `b` from the same params `p0`; return the largest error / tolerance
    ratio of each check (<= 1 means it passed)."""
    worst = {}
    # After one step from zero moments mu = (1 - b1) g and nu = (1 - b2) g^2 with g the clipped
    # gradient, so the moments are the gradients, linear in g.
    mu_a, nu_a = _adam_moments(a.opt_state)
    mu_b, nu_b = _adam_moments(b.opt_state)
    pairs = zip(
        jax.tree.leaves(mu_a),
        jax.tree.leaves(mu_b),
        jax.tree.leaves(nu_a),
        jax.tree.leaves(nu_b),
        jax.tree.leaves(a.params),
        jax.tree.leaves(b.params),
        jax.tree.leaves(p0),
        strict=True,
    )
    for ma, mb, na, nb, pa, pb, p in pairs:
        ga, gb = np.asarray(ma) / (1 - optim.b1), np.asarray(mb) / (1 - optim.b1)
        scale = np.max(np.abs(gb))
        assert scale > 0
        grad_tol = GRAD_RTOL * scale
        worst["grad"] = max(worst.get("grad", 0.0), float(np.max(np.abs(ga - gb))) / grad_tol)
        # |g_a^2 - g_b^2| <= |g_a - g_b| |g_a + g_b|: twice the gradient's relative tolerance.
        nu_tol = 2 * GRAD_RTOL * np.max(np.abs(nb))
        worst["nu"] = max(worst.get("nu", 0.0), float(np.max(np.abs(na - nb))) / nu_tol)
        bound = _adam_first_step_bound(gb, grad_tol, np.asarray(p), optim.learning_rate, optim.eps)
        worst["param"] = max(worst.get("param", 0.0), float(np.max(np.abs(pa - pb) / bound)))
    for name, value in m_b.items():
        err = np.abs(np.asarray(m_a[name]) - np.asarray(value))
        worst[name] = float(np.max(err / _metric_tol(name, value)))
    for name, ratio in worst.items():
        assert ratio <= 1.0, f"{name}: error is {ratio:.3g} x its float32 tolerance"
    return worst


def _sharded_and_single_step(mesh_cfg: MeshConfig, optim: OptimConfig):
    settings = _settings(micro_batch_size=4)
    batch = _batch(_model())
    results = []
    for cfg, devices in (
        (mesh_cfg, jax.devices()[: mesh_cfg.data * mesh_cfg.fsdp * mesh_cfg.tensor]),
        (MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1]),
    ):
        mesh = sharding.make_mesh(cfg, devices)
        graphdef, state = ts.init_train_state(_model(), optim, mesh)
        step = ts.make_train_step(
            graphdef,
            ts.train_state_sharding(state, mesh),
            LASER_ON,
            PolicyLossConfig(),
            optim,
            settings,
            mesh,
        )
        state, metrics = step(state, batch)
        results.append((jax.device_get(state), jax.device_get(metrics), state))
    return results


def test_sharded_step_equals_single_device_step():
    """The jitted step on 8 fake CPU devices (data 2 x fsdp 2 x tensor 2, 2 micro-batches) and on
    one device compute the same gradients (read from AdamW's first moment), metrics and update.

    Tolerances are float32 round-off of the reordered sums (GRAD_RTOL), and for the parameters
    the bound that AdamW's first step puts on them given that gradient tolerance
    (`_adam_first_step_bound`): a gradient near eps turns round-off into an lr-sized move, so a
    fixed absolute tolerance on the params depends on the CPU (issue 11)."""
    optim = OptimConfig(learning_rate=1e-3)
    (s8, m8, live8), (s1, m1, _) = _sharded_and_single_step(
        MeshConfig(data=2, fsdp=2, tensor=2), optim
    )
    # The params really are split across devices by the rule table.
    emb = live8.params["embed_tokens"]["embedding"][...]
    assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert int(s8.step) == int(s1.step) == 1
    p0 = nnx.state(_model(), nnx.Param)
    _compare_steps(s8, m8, s1, m1, p0, optim)
    moved = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(p0), strict=True)
    )
    assert moved > 5e-4  # the step really updated the params (AdamW moves ~lr per element)


# ---------------------------------------------------------------------------------------------
# Bad input.


def test_bad_batches_are_named(model):
    batch = _batch(model)
    mask = np.asarray(batch.response_mask).copy()
    mask[3, 0], mask[3, 2] = False, True
    with pytest.raises(ValueError, match="response_mask row 3 is not right-padded"):
        ts.check_batch(batch.replace(response_mask=jnp.asarray(mask)), K)
    with pytest.raises(ValueError, match="rewards row 0 is 0.5"):
        ts.check_batch(batch.replace(rewards=batch.rewards.at[0].set(0.5)), K)
    with pytest.raises(ValueError, match="not a multiple of K = 3"):
        ts.check_batch(batch, 3)
    with pytest.raises(ValueError, match="old_logprobs has shape"):
        ts.check_batch(batch.replace(old_logprobs=batch.old_logprobs[:, :-1]), K)
    graphdef, params = nnx.split(model, nnx.Param)
    with pytest.raises(ValueError, match="needs TrainBatch.ref_logprobs"):
        ts.make_grad_fn(graphdef, LASER_ON, PolicyLossConfig(kl_coef=0.1), _settings())(
            params, batch, 1
        )
    with pytest.raises(ValueError, match="micro_batch_size 3 does not divide the 8 rows"):
        ts.make_grad_fn(graphdef, LASER_ON, PolicyLossConfig(), _settings(micro_batch_size=3))(
            params, batch, 1
        )


# ---------------------------------------------------------------------------------------------
# KL to the frozen reference policy (issue 11 section 3).


def _plain_logprobs(model, rows) -> np.ndarray:
    """[R, T] log-probs of the response tokens from a plain full-vocabulary forward."""
    logits = _plain_forward_logits(model, rows)[:, P - 1 : P - 1 + T]
    logp = np.asarray(jax.nn.log_softmax(logits, -1), np.float64)
    return np.take_along_axis(logp, rows["response_tokens"][..., None], -1)[..., 0]


@pytest.mark.parametrize("kl_type", ["k1", "k2", "low_var_kl"])
def test_kl_to_reference_params_equals_hand_computation(model, kl_type):
    """The step's reference forward (TrainState.ref_params, here another model) gives
    `actor/kl_loss` = the token mean of verl's estimator computed in float64 from two plain
    forwards (1e-5 relative: float32 log-probs of size ~1-10), and the same gradients as the
    step fed those reference log-probs in the batch (<= 1e-5 x the leaf's largest gradient)."""
    ref_model = _model(seed=1)
    batch = _batch(model)
    rows = _rows()
    logp, ref = _plain_logprobs(model, rows), _plain_logprobs(ref_model, rows)
    d = ref - logp  # verl: kl = ref_logprob - logprob
    per_token = {
        "k1": logp - ref,
        "k2": 0.5 * (logp - ref) ** 2,
        "low_var_kl": np.clip(np.exp(np.clip(d, -20, 20)) - d - 1, -10, 10),
    }[kl_type]
    mask = rows["response_mask"]
    want = per_token[mask].sum() / mask.sum()
    loss_cfg = PolicyLossConfig(kl_coef=0.1, kl_type=kl_type)
    graphdef, params = nnx.split(model, nnx.Param)
    ref_params = nnx.state(ref_model, nnx.Param)
    fn = jax.jit(ts.make_grad_fn(graphdef, LASER_ON, loss_cfg, _settings()))
    grads, metrics = fn(params, batch, 1, ref_params)
    np.testing.assert_allclose(float(metrics["actor/kl_loss"]), want, rtol=1e-5)
    given = batch.replace(ref_logprobs=jnp.asarray(np.where(mask, ref, 0.0), jnp.float32))
    grads_given, metrics_given = fn(params, given, 1, None)
    assert _max_rel_err(grads, grads_given) <= 1e-5
    np.testing.assert_allclose(metrics["actor/kl_loss"], metrics_given["actor/kl_loss"], rtol=1e-5)


def test_kl_micro_batches_equal_the_full_batch_and_start_at_zero():
    """KL on through the reference params: 2 micro-batches of 4 rows equal one batch of 8
    (gradients <= 1e-5 x the leaf's largest, metrics 1e-5 relative or 1e-6 absolute); and a
    fresh state's reference is its own params (bf16 when asked): at the first step the KL is
    round-off, <= 1e-6 (float32 k3 = exp(d) - d - 1 has an ulp of 1.2e-7 near d = 0), and with
    a bf16 reference the bf16 rounding of the weights."""
    policy = _model()
    batch = _batch(policy)
    loss_cfg = PolicyLossConfig(kl_coef=0.05, kl_type="low_var_kl")
    mesh = sharding.make_mesh(MeshConfig(data=1), jax.devices()[:1])
    graphdef, state = ts.init_train_state(policy, OptimConfig(), mesh, with_reference=True)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(state.ref_params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    other = nnx.state(_model(seed=1), nnx.Param)
    full_fn = jax.jit(ts.make_grad_fn(graphdef, LASER_ON, loss_cfg, _settings()))
    micro_fn = jax.jit(ts.make_grad_fn(graphdef, LASER_ON, loss_cfg, _settings(micro_batch_size=4)))
    full, m_full = full_fn(state.params, batch, 1, other)
    micro, m_micro = micro_fn(state.params, batch, 1, other)
    assert float(m_full["actor/kl_loss"]) > 0.1
    assert _max_rel_err(micro, full) <= 1e-5
    for name, value in m_full.items():
        np.testing.assert_allclose(m_micro[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    _, m_own = full_fn(state.params, batch, 1, state.ref_params)
    assert abs(float(m_own["actor/kl_loss"])) <= 1e-6
    _, bf16 = ts.init_train_state(_model(), OptimConfig(), mesh, "bfloat16", with_reference=True)
    assert {x.dtype for x in jax.tree.leaves(bf16.ref_params)} == {jnp.dtype(jnp.bfloat16)}
    _, m_bf16 = full_fn(state.params, batch, 1, bf16.ref_params)
    print("KL to a bf16 reference at step 1:", float(m_bf16["actor/kl_loss"]))
    assert 1e-6 < float(m_bf16["actor/kl_loss"]) < 1e-2


# ---------------------------------------------------------------------------------------------
# The old log-probs' source, the rollout mismatch, several updates per batch (issue 11 sec. 4).


def test_recomputed_old_logprobs_and_the_rollout_mismatch(model):
    """`recompute` (one update): the ratio is 1 (no token clipped, ppo_kl 0) and the gradient is
    the `rollout` step's given the model's own log-probs as old ones (<= 1e-5 x the leaf's
    largest gradient: the two differ by float32 round-off of the ratio). Either way the step
    logs mean and max |log p_train - log p_rollout| over response tokens, here against the
    batch's noisy old log-probs by hand (float64 from a plain forward; 1e-5 absolute)."""
    batch = _batch(model)
    rows = _rows()
    own = _plain_logprobs(model, rows)
    mask = rows["response_mask"]
    gap = np.abs(own - np.asarray(batch.old_logprobs, np.float64))[mask]
    grads_re, m_re = _grads(model, batch, LASER_ON, _settings(old_logprob_source="recompute"))
    exact = batch.replace(old_logprobs=jnp.asarray(np.where(mask, own, 0.0), jnp.float32))
    grads_ro, m_ro = _grads(model, exact, LASER_ON, _settings())
    assert float(m_re["actor/pg_clipfrac"]) == 0.0 and float(m_re["actor/ppo_kl"]) == 0.0
    assert _max_rel_err(grads_re, grads_ro) <= 1e-5
    np.testing.assert_allclose(m_re["actor/logprob_mismatch_mean"], gap.mean(), atol=1e-5)
    np.testing.assert_allclose(m_re["actor/logprob_mismatch_max"], gap.max(), atol=1e-5)
    assert float(m_ro["actor/logprob_mismatch_max"]) <= 1e-5  # exact old log-probs: no gap


def _state_and_step(settings):
    """A fresh single-device TrainState of `_model()` and its jitted step for `settings`.
    AdamW with eps = 1: with |g| << 1 its first updates are nearly linear in g (lr g / (|g| +
    1)), so float32 round-off in a gradient moves a parameter by at most lr x that round-off."""
    optim = OptimConfig(learning_rate=1e-2, eps=1.0)
    mesh = sharding.make_mesh(MeshConfig(data=1), jax.devices()[:1])
    graphdef, state = ts.init_train_state(_model(), optim, mesh)
    step = ts.make_train_step(
        graphdef,
        ts.train_state_sharding(state, mesh),
        LASER_ON,
        PolicyLossConfig(),
        optim,
        settings,
        mesh,
    )
    return graphdef, state, step


def _assert_params_close(a: ts.TrainState, b: ts.TrainState) -> None:
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, rtol=0)
    for x, y in zip(jax.tree.leaves(a.opt_state), jax.tree.leaves(b.opt_state), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_several_updates_equal_single_updates_in_sequence():
    """ppo_epochs = 2 over the whole batch with `recompute` = two single-update steps fed the
    pre-update log-probs as old ones (`rollout`); mini-batches of 4 rows (one prompt group
    each), one epoch = a single-update step on each group in turn. Params to 1e-6 absolute
    (updates of ~1e-2 nearly linear in g, `_state_and_step`)."""
    batch = _batch(_model())
    _, state, multi = _state_and_step(_settings(epochs=2, old_logprob_source="recompute"))
    state_m, metrics = multi(state, batch)
    assert int(state_m.step) == 1  # one rollout batch (the schedule's step), two updates:
    assert int(optax.tree_utils.tree_get(state_m.opt_state, "count")) == 2
    assert float(metrics["actor/logprob_mismatch_max"]) > 0.1  # the batch's noisy old log-probs

    graphdef, state, single = _state_and_step(_settings())
    model0 = nnx.merge(graphdef, state.params)
    old0 = jax.jit(lambda b: ts.sequence_logprobs(model0, b, _settings())["logp_bt"])(batch)
    fed = batch.replace(old_logprobs=old0)
    state_s, _ = single(state, fed)
    state_s, m2 = single(state_s, fed)
    assert float(m2["actor/pg_clipfrac"]) > 0  # the second update's ratio is not 1
    _assert_params_close(state_m, state_s)

    _, state, mini = _state_and_step(_settings(mini_batch_size=4))
    state_mini, _ = mini(state, batch)
    _, state, single = _state_and_step(_settings())
    for rows in (slice(0, 4), slice(4, 8)):
        state, _ = single(state, jax.tree.map(lambda x, r=rows: x[r], batch))
    _assert_params_close(state_mini, state)
