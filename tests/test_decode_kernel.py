"""The Pallas decode-attention kernel (laserjax/model/decode_kernel.py), run by Pallas's
interpreter on the CPU (compiled for Triton where the tests run on a GPU: `JAX_PLATFORMS=cuda`,
as `bench/gpu_session.sh goals` runs the kernel tests): against a float64 softmax computed by
hand, and in the sampler against the XLA decode attention (`decode_impl: xla`).

Tolerance of the kernel against float64, from the float32 arithmetic: a score of D products
plus the mask component is off by at most delta = (D + 2) eps (sum_i |q_i k_i| + |s|), which
scales its weight by at most exp(delta) ~ 1 + delta; the T-term sums of the weights and of the
weighted values add T eps relative to their absolute sums. So the normalised output is within
2 (delta + T eps) max|v| and the log-sum-exp within delta + T eps, with delta the largest over
positions (eps = 2^-23; a factor 2 over the first order for the exp's own rounding).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_sampler as tsm
from flax import nnx

from laserjax.config import MeshConfig
from laserjax.continuous import ContinuousSampler
from laserjax.model import Transformer
from laserjax.model import decode_kernel as dk
from laserjax.model.transformer import augment_kv
from laserjax.sampler import Sampler
from laserjax.sharding import make_mesh

EPS = 2.0**-23


def _part(seed: int, r: int, n: int, nq: int, d: int, t: int, live_share: float):
    kq, kk, kv, kl = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (r, n, nq, d)) * 2 / np.sqrt(d)
    live = jax.random.uniform(kl, (r, n, t)) < live_share
    k, v = augment_kv(
        jax.random.normal(kk, (r, n, t, d)) * 2, jax.random.normal(kv, (r, n, t, d)), live
    )
    return q, k, v, live


def _exact(q, k, v, live):
    """float64 softmax over the live positions: (output [R, N, Q, D], logsumexp [R, N, Q]),
    and the bounds of the module docstring."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    live = np.asarray(live)
    s = np.einsum("rnqd,rntd->rnqt", q, k[..., :-1])
    s = np.where(live[:, :, None], s, -np.inf)
    m = s.max(-1, keepdims=True)
    p = np.exp(s - m)
    out = np.einsum("rnqt,rntd->rnqd", p, v[..., :-1]) / p.sum(-1)[..., None]
    lse = m[..., 0] + np.log(p.sum(-1))
    d, t = q.shape[-1], k.shape[2]
    products = np.einsum("rnqd,rntd->rnqt", np.abs(q), np.abs(k[..., :-1]))
    delta = (d + 2) * EPS * (products + np.abs(np.where(live[:, :, None], s, 0))).max()
    return out, lse, 2 * (delta + t * EPS) * np.abs(v[..., :-1]).max(), delta + t * EPS


@pytest.mark.parametrize(
    "r, n, nq, d, t, live_share, dtype",
    [
        (3, 2, 7, 16, 48, 0.7, "float32"),  # one block of 64 covers the part, masked tail
        (2, 1, 20, 32, 100, 0.5, "float32"),  # 20 queries padded to 32; 100 = 64 + 36
        (2, 2, 7, 64, 128, 0.9, "float32"),  # two full blocks
        (2, 2, 3, 16, 1, 1.0, "float32"),  # a one-position part
        (2, 2, 7, 16, 100, 0.5, "bfloat16"),  # bf16 caches (the GPU's), the tail masked in bf16
    ],
)
def test_part_attention_equals_the_exact_softmax(r, n, nq, d, t, live_share, dtype):
    q, k, v, live = _part(t + nq, r, n, nq, d, t, live_share)
    live = live.at[..., 0].set(True)  # every (row, head) has a live position
    k, v = augment_kv(k[..., :-1].astype(dtype), v[..., :-1].astype(dtype), live)
    o, total, m = (np.asarray(x) for x in dk.part_attention(q, k, v, interpret=dk.interpret_here()))
    out, lse, tol_out, tol_lse = _exact(q, k, v, live)
    np.testing.assert_allclose(o / total[..., None], out, atol=tol_out, rtol=0)
    np.testing.assert_allclose(m + np.log(total), lse, atol=tol_lse, rtol=0)


def test_merged_parts_equal_one_softmax_over_all_and_masked_parts_weigh_nothing():
    """Three parts, the last with no live position (a suffix segment not written yet): the merge
    equals the exact softmax over the concatenated positions."""
    q, k1, v1, live1 = _part(1, 2, 2, 7, 16, 40, 0.6)
    _, k2, v2, live2 = _part(2, 2, 2, 7, 16, 64, 0.6)
    _, k3, v3, _ = _part(3, 2, 2, 7, 16, 16, 0.0)
    live1 = live1.at[..., 0].set(True)
    k1, v1 = augment_kv(k1[..., :-1], v1[..., :-1], live1)
    merged = dk.merge_parts(
        [
            dk.part_attention(q, k, v, interpret=dk.interpret_here())
            for k, v in ((k1, v1), (k2, v2), (k3, v3))
        ]
    )
    live = jnp.concatenate([live1, live2, jnp.zeros((2, 2, 16), bool)], -1)
    out, _, tol_out, _ = _exact(
        q, jnp.concatenate([k1, k2, k3], 2), jnp.concatenate([v1, v2, v3], 2), live
    )
    np.testing.assert_allclose(np.asarray(merged), out, atol=tol_out, rtol=0)


# test_sampler.py's tiny model and rollout, with head_dim 16 (Triton's least matmul side).
CFG = dataclasses.replace(tsm.CFG, head_dim=16)
EOS, PAD, ZC, T, K, PROMPTS = tsm.EOS, tsm.PAD, tsm.ZC, tsm.T, tsm.K, tsm.PROMPTS


def _models():
    """The same random weights (std 0.1, so logits are O(1)) under both decode_impl values."""
    _, state = nnx.split(Transformer(CFG, rngs=nnx.Rngs(0)))
    state = jax.tree.map(lambda x: x * 5.0 if x.ndim >= 2 else x, state)
    graphdefs = [
        nnx.graphdef(Transformer(dataclasses.replace(CFG, decode_impl=i), rngs=nnx.Rngs(0)))
        for i in ("xla", "pallas")
    ]
    return [nnx.merge(g, state) for g in graphdefs]


def test_sampler_with_the_kernel_equals_the_xla_decode():
    """Static sampler (decode windows 2, 5, 8: the prefix and up to three suffix segments, K = 4
    samples sharing each prompt's prefix) and continuous batching (prompt pool rows, per-row
    steps): the same tokens, and log-probs and log p(z_c) within test_sampler.py's 1e-5 for two
    float32 computations of the same softmax."""
    out = {}
    for model in _models():
        smp = tsm.make_sampler(model, prompt_buckets=(16,), decode_windows=(2, 5, T))
        static = smp.sample(PROMPTS, k=K, temperature=1.0, seed=1)
        slots, _ = ContinuousSampler(smp, slots=4).sample(PROMPTS, k=K, temperature=1.0, seed=1)
        out[model.cfg.decode_impl] = (static, slots)
    for ref, got in zip(out["xla"], out["pallas"], strict=True):
        tsm.assert_equal_rollouts(got, ref)
    assert len(set(out["xla"][0].lengths.tolist())) > 1  # rows of several lengths


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(decode_impl="triton"), "`decode_impl`: 'triton' is not one of xla, pallas"),
        (dict(decode_impl="pallas", head_dim=8), "`decode_impl`: pallas needs head_dim a power"),
        (dict(decode_impl="pallas", head_dim=48), "`decode_impl`: pallas needs head_dim a power"),
    ],
)
def test_decode_impl_is_checked(fields, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(CFG, **fields)


def test_the_kernel_is_refused_on_a_mesh():
    """On a mesh XLA would gather the kernel's operands onto every device: refused by name."""
    mesh = make_mesh(MeshConfig(data=-1), jax.devices()[:2])
    with pytest.raises(ValueError, match="decode_impl.*pallas runs on one device"):
        Sampler(
            _models()[1],
            eos_ids=EOS,
            pad_id=PAD,
            self_reward_token_id=ZC,
            max_new_tokens=T,
            mesh=mesh,
        )


def test_the_kernel_is_refused_on_a_tpu(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    with pytest.raises(ValueError, match="`decode_impl`: pallas is a GPU"):
        dk.interpret_here()
