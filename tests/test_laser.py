"""The LaSeR/GRPO formulas (laserjax/laser.py) against hand-computed small cases.

Expected values are written out by hand or computed with plain python loops from the spec's
equations, never by calling the function under test. Tolerances: float32 math, rtol 1e-6 /
atol 1e-6 unless stated.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from laserjax import laser

TOL = dict(rtol=1e-6, atol=1e-6)


def close(actual, expected, **tol):
    np.testing.assert_allclose(
        np.asarray(actual, np.float64), np.asarray(expected, np.float64), **(tol or TOL)
    )


def loop_std_unbiased(xs):
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


# --- section 1 ------------------------------------------------------------------------------


def test_self_reward_score():
    r_s = laser.self_reward_score(jnp.array([-23.0, -13.0, -25.0], jnp.bfloat16), 0.1, -23.0)
    assert r_s.dtype == jnp.float32
    close(r_s, [0.0, 1.0, -0.2])


# --- section 2: GRPO advantages -------------------------------------------------------------


def test_grpo_advantages_hand_case():
    # Group 0: two right, two wrong: mean 0.5, unbiased std sqrt(1/3). Group 1: all right -> 0.
    a = laser.grpo_advantages(jnp.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]), 4)
    x = 0.5 / (math.sqrt(1.0 / 3.0) + 1e-6)  # 0.866024...
    close(a, [x, -x, -x, x, 0.0, 0.0, 0.0, 0.0])


def test_grpo_advantages_against_loops():
    rng = np.random.default_rng(0)
    rewards = rng.integers(0, 2, size=24).astype(np.float32)
    rewards[:6] = [1, 0, 0, 0, 0, 0]
    a = laser.grpo_advantages(jnp.asarray(rewards), 6)
    expected = []
    for g in range(4):
        grp = [float(r) for r in rewards[6 * g : 6 * g + 6]]
        m, sd = sum(grp) / 6, loop_std_unbiased(grp)
        expected += [(r - m) / (sd + 1e-6) for r in grp]
    close(a, expected, rtol=1e-5, atol=1e-6)


def test_grpo_advantages_group_of_one():
    # Spec: a group of one has mean 0 and std 1 -> A_v = r / (1 + eps).
    a = laser.grpo_advantages(jnp.array([1.0, 0.0, 1.0]), 1)
    close(a, [1.0 / (1.0 + 1e-6), 0.0, 1.0 / (1.0 + 1e-6)], rtol=1e-7, atol=0)
    assert float(a[0]) < 1.0  # the eps is there (float32 resolves 1 - 1e-6)
    close(laser.grpo_advantages(jnp.array([1.0, 0.0]), 1, eps=0.5), [1.0 / 1.5, 0.0])


def test_grpo_advantages_bad_shape_names_the_tensor():
    with pytest.raises(ValueError, match="rewards_b.*multiple of group_size=4"):
        laser.grpo_advantages(jnp.zeros(6), 4)
    with pytest.raises(ValueError, match="group_size"):
        laser.grpo_advantages(jnp.zeros(6), 0)


# --- section 2: MSE class weights and the MSE -----------------------------------------------

# rows:      0    1    2    3    4    5
REWARDS = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
FINISHED = [True, True, True, True, False, False]
# N_c = 1 (row 0), N_i = 3 (rows 1-3); rows 4, 5 truncated.
# w_correct = 4 / (2 * 1) = 2, w_incorrect = 4 / (2 * 3) = 2/3.
W_EXPECTED = [2.0, 2 / 3, 2 / 3, 2 / 3, 0.0, 0.0]


def test_mse_class_weights_hand_case():
    w, n_c, n_i = laser.mse_class_weights(jnp.array(REWARDS), jnp.array(FINISHED))
    close(w, W_EXPECTED)
    assert float(n_c) == 1.0 and float(n_i) == 3.0
    # float masks work the same
    w2, _, _ = laser.mse_class_weights(jnp.array(REWARDS), jnp.array(FINISHED, jnp.float32))
    close(w2, W_EXPECTED)


def test_mse_class_weights_absent_class():
    # All finished rows correct: N_i = 0; w_correct = (3 + 0) / (2 * 3) = 0.5, no incorrect weight.
    w, n_c, n_i = laser.mse_class_weights(
        jnp.array([1.0, 1.0, 1.0, 0.0]), jnp.array([True, True, True, False])
    )
    close(w, [0.5, 0.5, 0.5, 0.0])
    assert float(n_c) == 3.0 and float(n_i) == 0.0


def test_mse_all_truncated_is_zero_not_nan():
    rewards = jnp.array([1.0, 0.0, 1.0])
    finished = jnp.zeros(3, bool)
    w, n_c, n_i = laser.mse_class_weights(rewards, finished)
    close(w, [0.0, 0.0, 0.0])
    assert float(n_c) == 0.0 and float(n_i) == 0.0
    # r_s at truncated rows is meaningless (no z_c was appended): even NaN must not leak.
    r_s = jnp.array([jnp.nan, 0.3, jnp.inf])
    pair = laser.self_reward_mse(r_s, rewards, finished, w)
    assert float(pair.total) == 0.0 and float(pair.count) == 0.0
    assert float(pair.value()) == 0.0
    grad = jax.grad(lambda r: laser.self_reward_mse(r, rewards, finished, w).value())(r_s)
    close(grad, [0.0, 0.0, 0.0])


def test_self_reward_mse_hand_case():
    r_s = [0.9, 0.2, -0.1, 0.5, 7.0, jnp.nan]
    w, _, _ = laser.mse_class_weights(jnp.array(REWARDS), jnp.array(FINISHED))
    pair = laser.self_reward_mse(jnp.array(r_s), jnp.array(REWARDS), jnp.array(FINISHED), w)
    # 2 * (0.9 - 1)^2 + 2/3 * (0.2^2 + 0.1^2 + 0.5^2) = 0.02 + 2/3 * 0.3 = 0.22
    close(pair.total, 0.22)
    assert float(pair.count) == 4.0
    close(pair.value(), 0.055)


def test_self_reward_mse_gradient_is_analytic():
    beta_v, c_ref = 0.1, -23.0
    logp = jnp.array([-14.0, -20.0, -23.5, -22.0, -10.0, -30.0])
    rewards, finished = jnp.array(REWARDS), jnp.array(FINISHED)
    w, _, _ = laser.mse_class_weights(rewards, finished)

    def loss(lp):
        r_s = laser.self_reward_score(lp, beta_v, c_ref)
        return laser.self_reward_mse(r_s, rewards, finished, w).value()

    grad = jax.grad(loss)(logp)
    count = 4.0
    expected = []
    for lp, r, f, wi in zip(logp.tolist(), REWARDS, FINISHED, W_EXPECTED, strict=True):
        r_s = beta_v * (lp - c_ref)
        expected.append(2 * wi * (r_s - r) * beta_v / count if f else 0.0)
    close(grad, expected, rtol=1e-5, atol=1e-7)


def test_self_reward_mse_microbatches_sum_to_full_batch():
    rng = np.random.default_rng(1)
    rewards = jnp.asarray(rng.integers(0, 2, 16).astype(np.float32))
    finished = jnp.asarray(rng.random(16) > 0.3)
    r_s = jnp.asarray(rng.normal(0.5, 0.5, 16).astype(np.float32))
    w, n_c, n_i = laser.mse_class_weights(rewards, finished)  # whole step batch

    @jax.jit
    def mse_and_grad(r_s, rewards, finished, w):
        pair_total = lambda r: laser.self_reward_mse(r, rewards, finished, w).total
        return laser.self_reward_mse(r_s, rewards, finished, w), jax.grad(pair_total)(r_s)

    full, g_full = mse_and_grad(r_s, rewards, finished, w)
    halves = [
        mse_and_grad(r_s[s], rewards[s], finished[s], w[s]) for s in (slice(0, 8), slice(8, 16))
    ]
    summed = jax.tree.map(jnp.add, halves[0][0], halves[1][0])
    close(summed.total, full.total, rtol=1e-6)
    assert float(summed.count) == float(full.count) == float(n_c + n_i)
    # the micro-batch gradients of the numerators concatenate to the full one
    close(jnp.concatenate([halves[0][1], halves[1][1]]), g_full, rtol=1e-6, atol=1e-8)


# --- section 3: advantage integration -------------------------------------------------------


def test_integrated_advantages_hand_case():
    tau, T = 0.1, 0.1
    # Group 0: all rewards equal -> A_v = 0; s = [0.9, 0.2, 1.0 (clipped), 0.0 (clipped)].
    # Group 1: scores nearly equal -> sd ~ 0.016 <= T -> falls back to A_v.
    # Group 2: truncated rows (1, 3) get s = 0 whatever their score.
    rewards = [1, 1, 1, 1, 1, 0, 0, 1, 1, 0, 1, 0]
    r_s = [0.9, 0.2, 1.5, -0.3, 0.5, 0.52, 0.48, 0.5, 0.8, 0.9, 0.1, 5.0]
    finished = [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 0]
    a_v = laser.grpo_advantages(jnp.array(rewards, jnp.float32), 4)
    a, frac = laser.integrated_advantages(
        a_v, jnp.array(r_s), jnp.array(finished, jnp.float32), 4, tau, T
    )
    a_v = np.asarray(a_v, np.float64)

    expected = []
    for g, s in enumerate(([0.9, 0.2, 1.0, 0.0], [0.5, 0.52, 0.48, 0.5], [0.8, 0.0, 0.1, 0.0])):
        m, sd = sum(s) / 4, loop_std_unbiased(s)
        for k in range(4):
            av = a_v[4 * g + k]
            a_s = (s[k] - m) / sd if sd > T else av
            expected.append((1 - tau) * av + tau * a_s)
    # group 0 written out: mean 0.525, sd sqrt(0.7475 / 3) = 0.499166; A = 0.1 * (s - 0.525) / sd
    sd0 = math.sqrt(0.7475 / 3)
    close(expected[:4], [0.1 * d / sd0 for d in (0.375, -0.325, 0.475, -0.525)])
    assert all(abs(x) > 0.06 for x in expected[:4])  # A_v = 0 yet A != 0
    close(expected[4:8], a_v[4:8])  # the fallback group is pure A_v
    close(a, expected, rtol=1e-5, atol=1e-6)
    close(frac, 1 / 3)


def test_integrated_advantages_tau_zero_and_group_of_one():
    a_v = jnp.array([0.5, -0.5, 1.0, -1.0])
    r_s = jnp.array([0.9, 0.1, 0.3, 0.7])
    fin = jnp.ones(4, bool)
    a, _ = laser.integrated_advantages(a_v, r_s, fin, 2, 0.0, 0.1)
    close(a, a_v)
    # A group of one has no unbiased std: every group falls back, A = A_v.
    a1, frac1 = laser.integrated_advantages(a_v, r_s, fin, 1, 0.1, 0.1)
    close(a1, a_v)
    close(frac1, 1.0)


def test_integrated_advantages_no_gradient_through_scores():
    a_v = jnp.array([0.5, -0.5, 0.5, -0.5])
    fin = jnp.ones(4, bool)
    grad = jax.grad(
        lambda r: jnp.sum(
            laser.integrated_advantages(a_v, r, fin, 4, 0.5, 0.0)[0] * jnp.arange(4.0)
        )
    )(jnp.array([0.9, 0.1, 0.4, 0.6]))
    close(grad, [0.0, 0.0, 0.0, 0.0])


# --- section 2: PPO clipped surrogate -------------------------------------------------------

# Per token (clip_low 0.2, clip_high 0.28, dual clip c = 3), loss = max(-A r, -A clip(r)),
# then min(., -A c) for A < 0:
#   A=+1 r=1.25: clip(r)=1.25 -> -1.25        (inside 1.28: clip-higher leaves it unclipped)
#   A=+1 r=1.5 : clip(r)=1.28 -> -1.28        clipped
#   A=+1 r=0.5 : clip(r)=0.8  -> -0.5         (the unclipped loss is the larger one)
#   A=-1 r=0.5 : clip(r)=0.8  ->  0.8         clipped
#   A=-1 r=2.0 : clip(r)=1.28 ->  2.0         (below -A c = 3: dual clip inactive)
#   A=-1 r=4.0 : clip(r)=1.28 ->  min(4, 3) = 3   dual clip active
#   padding    : logp = -inf  ->  0, masked
RATIOS = [[1.25, 1.5, 0.5, 1.0], [0.5, 2.0, 4.0, 1.0]]
ADV = [1.0, -1.0]
MASK = [[1, 1, 1, 0], [1, 1, 1, 0]]
OLD = [[-1.0, -2.0, -0.5, -3.0], [-0.7, -1.5, -2.5, -1.0]]


def _ppo_inputs():
    old = np.array(OLD, np.float32)
    logp = old + np.log(np.array(RATIOS, np.float32))
    logp[:, 3] = -np.inf
    return jnp.asarray(logp), jnp.asarray(old), jnp.array(ADV), jnp.array(MASK, bool)


def test_ppo_surrogate_hand_case():
    logp, old, adv, mask = _ppo_inputs()
    loss, m = laser.ppo_clipped_surrogate(logp, old, adv, mask, 0.2, 0.28, 3.0)
    close(loss, [[-1.25, -1.28, -0.5, 0.0], [0.8, 2.0, 3.0, 0.0]], rtol=1e-6, atol=1e-6)
    adv_bt = jnp.broadcast_to(adv[:, None], logp.shape)  # per-token advantages give the same
    close(laser.ppo_clipped_surrogate(logp, old, adv_bt, mask, 0.2, 0.28, 3.0)[0], loss)
    m = laser.finalize(m)
    close(m["clipfrac"], 2 / 6)  # r=1.5 (A>0) and r=0.5 (A<0)
    close(m["clipfrac_lower"], 1 / 6)  # r=4.0
    close(m["ratio_mean"], (1.25 + 1.5 + 0.5 + 0.5 + 2.0 + 4.0) / 6, rtol=1e-6)
    close(m["ppo_kl"], -sum(math.log(r) for r in (1.25, 1.5, 0.5, 0.5, 2.0, 4.0)) / 6, rtol=1e-5)


def test_ppo_surrogate_dual_clip_off_and_symmetric_clip():
    logp, old, adv, mask = _ppo_inputs()
    loss, m = laser.ppo_clipped_surrogate(logp, old, adv, mask, 0.2, 0.2, 0.0)
    # symmetric 0.2: r=1.25 and r=1.5 both clip to 1.2; no dual clip: r=4.0 costs 4.0
    close(loss, [[-1.2, -1.2, -0.5, 0.0], [0.8, 2.0, 4.0, 0.0]], rtol=1e-6, atol=1e-6)
    m = laser.finalize(m)
    close(m["clipfrac"], 3 / 6)
    close(m["clipfrac_lower"], 0.0)


def test_ppo_surrogate_gradient():
    # d loss / d logp = -A r where the unclipped branch is taken, 0 where clipped (either clip).
    logp, old, adv, mask = _ppo_inputs()
    grad = jax.grad(
        lambda lp: jnp.sum(laser.ppo_clipped_surrogate(lp, old, adv, mask, 0.2, 0.28, 3.0)[0])
    )(logp)
    close(grad, [[-1.25, 0.0, -0.5, 0.0], [0.0, 2.0, 0.0, 0.0]], rtol=1e-6, atol=1e-6)
    assert np.all(np.isfinite(np.asarray(grad)))


# --- section 2: aggregation and KL ----------------------------------------------------------

LOSS_BT = [[1.0, 2.0, 3.0], [4.0, 9.0, 9.0], [5.0, 6.0, 7.0], [9.0, 9.0, 9.0]]
MASK_BT = [[1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 0, 0]]  # the last row is padding


@pytest.mark.parametrize(
    "mode, total, count",
    [
        ("token-mean", 1 + 2 + 3 + 4 + 5 + 6, 6),
        ("seq-mean-token-mean", 2.0 + 4.0 + 5.5, 3),
        ("seq-mean-token-sum", 6.0 + 4.0 + 11.0, 3),
    ],
)
def test_aggregate_loss_modes(mode, total, count):
    pair = laser.aggregate_loss(jnp.array(LOSS_BT), jnp.array(MASK_BT, jnp.float32), mode)
    close(pair.total, total)
    assert float(pair.count) == count
    # micro-batches of two rows each add up to the full batch
    halves = [
        laser.aggregate_loss(jnp.array(LOSS_BT[s]), jnp.array(MASK_BT[s], bool), mode)
        for s in (slice(0, 2), slice(2, 4))
    ]
    summed = jax.tree.map(jnp.add, *halves)
    close(summed.total, total)
    assert float(summed.count) == count


def test_aggregate_loss_unknown_mode():
    with pytest.raises(ValueError, match="policy_loss.loss_agg"):
        laser.aggregate_loss(jnp.zeros((1, 2)), jnp.ones((1, 2)), "seq-sum")


def test_policy_loss_microbatches_equal_full_batch():
    rng = np.random.default_rng(2)
    b, t = 8, 5
    old = jnp.asarray(rng.normal(-1.0, 0.5, (b, t)).astype(np.float32))
    logp = old + jnp.asarray(rng.normal(0.0, 0.4, (b, t)).astype(np.float32))
    adv = jnp.asarray(rng.normal(0, 1, b).astype(np.float32))
    lengths = rng.integers(1, t + 1, b)
    mask = jnp.asarray(np.arange(t)[None, :] < lengths[:, None])

    @jax.jit
    def pg(lp, old, adv, mask):
        """Per mode: the (sum, count) pair, the PPO metrics, and d(sum)/d logp."""

        def total(lp, mode):
            loss_bt, metrics = laser.ppo_clipped_surrogate(lp, old, adv, mask, 0.2, 0.28, 3.0)
            pair = laser.aggregate_loss(loss_bt, mask, mode)
            return pair.total, (pair, metrics)

        return {mode: jax.grad(total, has_aux=True)(lp, mode) for mode in laser.LOSS_AGG_MODES}

    full = pg(logp, old, adv, mask)
    halves = [pg(logp[s], old[s], adv[s], mask[s]) for s in (slice(0, 4), slice(4, 8))]
    for mode in laser.LOSS_AGG_MODES:
        g_full, (pair_full, m_full) = full[mode]
        (g0, (pair0, m0)), (g1, (pair1, m1)) = halves[0][mode], halves[1][mode]
        pair, metrics = jax.tree.map(jnp.add, (pair0, m0), (pair1, m1))
        close(pair.total, pair_full.total, rtol=1e-6, atol=1e-6)
        assert float(pair.count) == float(pair_full.count)
        for k in m_full:
            close(metrics[k].value(), m_full[k].value(), rtol=1e-6, atol=1e-6)
        # the loss is total / count with a data-only count: micro-batch gradients divided by
        # the full count concatenate to the full-batch gradient
        close(
            jnp.concatenate([g0, g1]) / pair_full.count,
            g_full / pair_full.count,
            rtol=1e-6,
            atol=1e-8,
        )


def test_kl_penalty_kinds():
    logp = jnp.array([[-1.0, -30.0, -0.5]])
    ref = jnp.array([[-2.0, 0.0, -0.5]])
    close(laser.kl_penalty(logp, ref, "k1"), [[1.0, -30.0, 0.0]])
    close(laser.kl_penalty(logp, ref, "k2"), [[0.5, 450.0, 0.0]])
    # low_var_kl: d = ref - logp = [-1, 30 -> clipped to 20, 0]; exp(d) - d - 1, clipped to 10
    close(laser.kl_penalty(logp, ref, "low_var_kl"), [[math.exp(-1.0), 10.0, 0.0]])
    with pytest.raises(ValueError, match="policy_loss.kl_type"):
        laser.kl_penalty(logp, ref, "k3")


# --- section 4: schedule --------------------------------------------------------------------


def test_schedule_python_and_traced():
    assert laser.mse_active(200, 200) is False
    assert laser.mse_active(201, 200) is True
    assert laser.mse_active(1, 0) is True
    assert laser.integration_active(400, 200, 200) is False
    assert laser.integration_active(401, 200, 200) is True
    assert laser.integration_active(200, 0, 200) is False
    steps = jnp.array([1, 200, 201, 400, 401])
    mse = jax.jit(jax.vmap(lambda s: laser.mse_active(s, 200)))(steps)
    integ = jax.jit(jax.vmap(lambda s: laser.integration_active(s, 200, 200)))(steps)
    assert mse.tolist() == [False, False, True, True, True]
    assert integ.tolist() == [False, False, False, False, True]


# --- section 5: self-verification -----------------------------------------------------------


def test_self_verification_metrics_hand_case():
    # finished correct: rows 0, 1, 2 (r_s 0.9, 0.4, 0.6 -> 2 of 3 right);
    # finished incorrect: rows 3, 4 (r_s 0.5 (<= 0.5: right), 0.7 -> 1 of 2 right); row 5 truncated.
    r_s = jnp.array([0.9, 0.4, 0.6, 0.5, 0.7, 0.99])
    rewards = jnp.array([1.0, 1.0, 1.0, 0.0, 0.0, 1.0])
    finished = jnp.array([1, 1, 1, 1, 1, 0], jnp.float32)
    m = laser.finalize(laser.self_verification_metrics(r_s, rewards, finished))
    close(m["acc_correct"], 2 / 3)
    close(m["acc_incorrect"], 1 / 2)
    close(m["r_s_correct"], (0.9 + 0.4 + 0.6) / 3)
    close(m["r_s_incorrect"], (0.5 + 0.7) / 2)
    close(
        laser.self_verification_f1(m["acc_correct"], m["acc_incorrect"]),
        2 * (2 / 3) * 0.5 / (2 / 3 + 0.5),
    )


def test_self_verification_absent_class_and_f1_edges():
    pairs = laser.self_verification_metrics(
        jnp.array([0.9, 0.2]), jnp.array([1.0, 1.0]), jnp.array([True, True])
    )
    assert float(pairs["acc_incorrect"].count) == 0.0
    m = laser.finalize(pairs)
    close(m["acc_correct"], 0.5)
    close(m["acc_incorrect"], 0.0)
    close(m["r_s_incorrect"], 0.0)
    assert all(np.isfinite(float(v)) for v in m.values())
    close(laser.self_verification_f1(0.0, 0.0), 0.0)
    close(laser.self_verification_f1(1.0, 1.0), 1.0)
    close(laser.self_verification_f1(0.5, 1.0), 2 / 3)


# --- jit ------------------------------------------------------------------------------------


def test_everything_jits_and_matches_eager():
    rng = np.random.default_rng(3)
    k, b, t = 4, 8, 6
    rewards = jnp.asarray(rng.integers(0, 2, b).astype(np.float32))
    finished = jnp.asarray(rng.random(b) > 0.2)
    logp_zc = jnp.asarray(rng.normal(-20, 3, b).astype(np.float32))
    old = jnp.asarray(rng.normal(-1, 0.5, (b, t)).astype(np.float32))
    logp = old + jnp.asarray(rng.normal(0, 0.3, (b, t)).astype(np.float32))
    mask = jnp.asarray(rng.random((b, t)) > 0.3)

    def everything(logp_zc, rewards, finished, logp, old, mask):
        r_s = laser.self_reward_score(logp_zc, 0.1, -23.0)
        a_v = laser.grpo_advantages(rewards, k)
        w, _, _ = laser.mse_class_weights(rewards, finished)
        mse = laser.self_reward_mse(r_s, rewards, finished, w)
        a, frac = laser.integrated_advantages(a_v, r_s, finished, k, 0.1, 0.1)
        loss_bt, metrics = laser.ppo_clipped_surrogate(logp, old, a, mask, 0.2, 0.28, 3.0)
        pg = laser.aggregate_loss(loss_bt, mask, "token-mean")
        kl = laser.aggregate_loss(laser.kl_penalty(logp, old, "low_var_kl"), mask, "token-mean")
        sv = laser.self_verification_metrics(r_s, rewards, finished)
        return mse.value(), a, frac, pg.value(), kl.value(), laser.finalize({**metrics, **sv})

    args = (logp_zc, rewards, finished, logp, old, mask)
    eager = everything(*args)
    jitted = jax.jit(everything)(*args)
    for x, y in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
        close(y, x, rtol=1e-5, atol=1e-6)


# --- section 1: the log-prob helper, positions -------------------------------------------------


def test_token_logprobs_and_positions_by_hand():
    # logits [0, ln 3]: softmax = [1/4, 3/4]; at temperature 2: [0, ln 3 / 2] -> [1/(1+sqrt 3), ...]
    logits = np.array([[0.0, math.log(3.0)]], np.float32)
    close(laser.token_logprobs(logits, np.array([1]), 1.0), [math.log(0.75)])
    close(laser.token_logprobs(logits, np.array([0]), 0), [math.log(0.25)])  # greedy counts as 1
    close(laser.token_logprobs(logits, np.array([0]), 2.0), [-math.log(1.0 + math.sqrt(3.0))])
    mask = np.array([[False, False, True, True, True], [True, True, True, False, False]])
    assert laser.positions_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]


def test_self_reward_score_or_nan_on_numpy():
    r_s = np.asarray(
        laser.self_reward_score_or_nan(
            np.array([-13.0, -40.0]), np.array([True, False]), 0.1, -23.0
        )
    )
    close(r_s[0], 1.0)
    assert math.isnan(r_s[1])


# --- the objective: named algorithms ----------------------------------------------------------


def test_dr_grpo_advantages_are_centred_not_scaled():
    a = laser.grpo_advantages(
        jnp.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0]), 4, norm_by_std=False
    )
    close(a, [0.5, -0.5, -0.5, 0.5, 0.25, 0.25, 0.25, -0.75])
    close(laser.grpo_advantages(jnp.array([1.0, 0.0]), 1, norm_by_std=False), [1.0, 0.0])


def test_seq_mean_token_sum_norm_divides_each_row_by_a_constant():
    # Row sums 6, 4, 11 (the padding row is no sequence); N = T = 3 by default, or given.
    pair = laser.aggregate_loss(jnp.array(LOSS_BT), jnp.array(MASK_BT), "seq-mean-token-sum-norm")
    close(pair.total, (6.0 + 4.0 + 11.0) / 3)
    assert float(pair.count) == 3
    pair = laser.aggregate_loss(
        jnp.array(LOSS_BT), jnp.array(MASK_BT), "seq-mean-token-sum-norm", scale_factor=10.0
    )
    close(pair.total, 2.1)


def test_algorithms_are_registered_defaults():
    assert set(laser.ALGORITHMS) >= {"grpo", "laser", "dr_grpo", "dapo"}
    grpo, dapo = laser.objective_for("grpo"), laser.objective_for("dapo")
    assert (grpo.clip_low, grpo.clip_high, grpo.loss_agg) == (0.2, 0.2, "token-mean")
    assert not grpo.self_reward and laser.objective_for("laser").self_reward
    assert (dapo.clip_low, dapo.clip_high) == (0.2, 0.28)
    dr = laser.objective_for("dr_grpo")
    assert dr.loss_agg == "seq-mean-token-sum-norm" and not dr.norm_adv_by_std
    # a setting given wins; None keeps the algorithm's default
    assert laser.objective_for("dapo", clip_high=0.3, loss_agg=None).clip_high == 0.3
    with pytest.raises(ValueError, match="laser.algorithm"):
        laser.objective_for("ppo")
    with pytest.raises(ValueError, match="policy_loss.kl_type"):
        laser.objective_for("grpo", kl_type="k3")


def test_objective_sums_its_terms_with_the_warmup_gate():
    """L = pg/n + kl_coef * kl/n + alpha * mse/(N_c + N_i), the MSE weight 0 until
    step > reasoning_warmup_steps; each term is the tested formula above."""
    obj = laser.objective_for("laser", kl_coef=0.5, alpha=0.25, reasoning_warmup_steps=3)
    logp, old, adv, mask = _ppo_inputs()
    ref = old - 0.5
    logp_zc = jnp.array([-13.0, -20.0])
    rewards, finished = jnp.array([1.0, 0.0]), jnp.array([True, True])
    w, n_c, n_i = laser.mse_class_weights(rewards, finished)
    kw = dict(
        ref_logp_bt=ref, logp_zc_b=logp_zc, rewards_b=rewards, finished_b=finished, mse_weights_b=w
    )
    counts = {"pg": 6.0, "kl": 6.0, "mse": n_c + n_i}
    pg_bt = laser.ppo_clipped_surrogate(logp, old, adv, mask, 0.2, 0.2, 3.0)[0]
    pg = float(jnp.sum(pg_bt)) / 6
    kl = float(jnp.sum(jnp.where(mask, laser.kl_penalty(logp, ref, "low_var_kl"), 0.0))) / 6
    # r_s = 0.1 * (logp_zc + 23) = [1.0, 0.3]; both errors weigh 1: (0^2 + 0.3^2) / 2
    mse = 0.09 / 2
    for step, mse_weight in ((3, 0.0), (4, 0.25)):
        terms, metrics = laser.objective(obj, step, logp, old, mask, adv, **kw)
        assert list(terms) == ["pg", "kl", "mse"]
        close(terms["mse"].weight, mse_weight)
        close(terms["mse"].value.value(), mse, rtol=1e-5)
        close(laser.objective_loss(terms, counts), pg + 0.5 * kl + mse_weight * mse, rtol=1e-5)
        close(laser.finalize(metrics)["acc_incorrect"], 1.0)  # r_s 0.3 <= 0.5
    terms, _ = laser.objective(laser.objective_for("grpo"), 1, logp, old, mask, adv)
    assert list(terms) == ["pg"]
    with pytest.raises(ValueError, match="kl_coef > 0 needs"):
        laser.objective(obj, 1, logp, old, mask, adv)


def test_kl_estimators_by_hand():
    """verl's k1 / k2 / low_var_kl on probabilities written out: pi = 1/2, pi_ref = 1/4 (the
    policy gained mass) and pi = 1/4, pi_ref = 1/2 (it lost mass).
    k1 = log(pi / pi_ref); k2 = k1^2 / 2; k3 = pi_ref/pi - log(pi_ref/pi) - 1."""
    ln2 = math.log(2.0)
    logp = jnp.log(jnp.array([[0.5, 0.25]]))
    ref = jnp.log(jnp.array([[0.25, 0.5]]))
    close(laser.kl_penalty(logp, ref, "k1"), [[ln2, -ln2]])
    close(laser.kl_penalty(logp, ref, "k2"), [[0.5 * ln2**2, 0.5 * ln2**2]])
    close(laser.kl_penalty(logp, ref, "low_var_kl"), [[0.5 + ln2 - 1.0, 2.0 - ln2 - 1.0]])
    # The gradient of k3 w.r.t. logp is 1 - pi_ref / pi: 0.5 and -1 here.
    grad = jax.grad(lambda lp: jnp.sum(laser.kl_penalty(lp, ref, "low_var_kl")))(logp)
    close(grad, [[0.5, -1.0]])
