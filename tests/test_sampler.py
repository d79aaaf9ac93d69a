"""The rollout sampler (laserjax/sampler.py, LASER_SPEC section 5) on tiny random models, fp32.

References are computed independently of the sampler: a teacher-forced forward of the whole
sequence (`Transformer.__call__`, checked against transformers in test_model.py) with
`jax.nn.log_softmax`, transformers' own `generate`, and sampling frequencies computed by hand.
Tolerances: 1e-4 on log-probs against the teacher-forced forward (the issue's figure; float32
logits of magnitude ~5 agree to ~1e-6 here); exact equality for tokens.
"""

import dataclasses
import itertools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from laserjax import sampler as sampler_module
from laserjax import sharding
from laserjax.config import MeshConfig
from laserjax.continuous import (
    ContinuousSampler,
    default_windows,
    empty_buffers,
    programs,
    writes_after_reading,
)
from laserjax.model import Transformer, TransformerConfig
from laserjax.model.transformer import SuffixCache, kv_layout_for
from laserjax.sampler import (
    Sampler,
    SamplingSettings,
    _constrainer,
    _decode_loop,
    _prefill,
    decode_compiler_options,
    decode_windows_for,
    full_vocab_draw,
    prompt_positions,
    row_slices,
    sample_tokens,
    step_traffic,
    token_logprobs,
    window_schedule,
)
from laserjax.sharding import make_mesh

ATOL = 1e-4
CFG = TransformerConfig(
    model_type="qwen2",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    tie_word_embeddings=True,
    qkv_bias=True,
)
# Six of 64 ids end a response, so with 8 new tokens the batch holds finished and truncated
# rows and (for SEED) a row that ends with EOS at the last position, whose z_c read is the
# loop's one extra step. test_batch_covers_every_ending checks that coverage.
EOS = (0, 1, 2, 3, 4, 5)
PAD, ZC, T, K, SEED = 63, 62, 8, 4, 1
PROMPTS = [[10, 11, 12], [13, 14, 15, 16, 17, 18, 19], [20], [30, 31, 32, 33, 34]]


def tiny_model(seed: int = 0, scale: float = 5.0) -> Transformer:
    """Random weights with std 0.1 (5x the init) so logits are O(1), not near-uniform."""
    graphdef, state = nnx.split(Transformer(CFG, rngs=nnx.Rngs(seed)))
    state = jax.tree.map(lambda x: x * scale if x.ndim >= 2 else x, state)
    return nnx.merge(graphdef, state)


def make_sampler(model, mesh=None, prompt_buckets=(8,), **kw) -> Sampler:
    return Sampler(
        model,
        eos_ids=EOS,
        pad_id=PAD,
        self_reward_token_id=ZC,
        max_new_tokens=T,
        prompt_buckets=prompt_buckets,
        mesh=mesh,
        **kw,
    )


def assert_equal_rollouts(got, ref, atol=1e-5):
    """The same tokens; log-probs and log p(z_c) within `atol` (two float32 computations of the
    same softmax)."""
    np.testing.assert_array_equal(got.response_tokens, ref.response_tokens)
    np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=atol, rtol=0)
    np.testing.assert_allclose(got.logp_zc, ref.logp_zc, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def sampler(model):
    return make_sampler(model)


@pytest.fixture(scope="module")
def batches(sampler):
    """One rollout per temperature, shared by the tests that only read it."""
    return {t: sampler.sample(PROMPTS, k=K, temperature=t, seed=SEED) for t in (1.0, 0.7)}


def teacher_forced_logits(model, batch) -> np.ndarray:
    """float64 logits [rows, P + T + 1, V] of one forward of prompt + response + [z_c].

    The sequence of row r is its left-padded prompt, its response, and for finished rows z_c
    right after the EOS; token i is predicted at position P - 1 + i, z_c at the EOS position.
    """
    p = batch.prompt_tokens.shape[1]
    rows = batch.response_tokens.shape[0]
    prompt = np.repeat(batch.prompt_tokens, batch.k, axis=0)
    pmask = np.repeat(batch.prompt_mask, batch.k, axis=0)
    seq = np.concatenate([prompt, batch.response_tokens, np.full((rows, 1), PAD)], axis=1)
    mask = np.concatenate([pmask, batch.response_mask, np.zeros((rows, 1), bool)], axis=1)
    eos_at = p + batch.lengths - 1
    fin = np.flatnonzero(batch.finished)
    seq[fin, eos_at[fin] + 1] = ZC
    mask[fin, eos_at[fin] + 1] = True
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return np.asarray(
        model(jnp.asarray(seq), jnp.asarray(positions), jnp.asarray(mask)), np.float64
    )


def teacher_forced(model, batch, temperature: float, zc_temperature: float = 1.0):
    """Per-token log-probs and log p(z_c) from `teacher_forced_logits`."""
    p = batch.prompt_tokens.shape[1]
    rows, t = batch.response_tokens.shape
    logits = teacher_forced_logits(model, batch)
    eos_at = p + batch.lengths - 1
    tempered = np.asarray(jax.nn.log_softmax(jnp.asarray(logits / temperature), axis=-1))
    lp = np.take_along_axis(
        tempered[:, p - 1 : p - 1 + t], batch.response_tokens[..., None], axis=-1
    )[..., 0]
    raw = np.asarray(jax.nn.log_softmax(jnp.asarray(logits / zc_temperature), axis=-1))
    zc = raw[np.arange(rows), eos_at, ZC]
    return np.where(batch.response_mask, lp, 0.0), np.where(batch.finished, zc, 0.0)


def assert_same_draws(model, ref, out, rows: int, temperature: float, seed: int) -> None:
    """Rows 0..rows-1 of `out` and `ref` (the same prompts, model and seed sampled in two layouts:
    shared or separate prefill, sharded or not) drew the same tokens, unless a draw was a tie
    that float32 round-off decides.

    Token i of output row r is the inverse-CDF draw of softmax(logits / T) at
    u = uniform(fold_in(fold_in(key(seed), r), i)) (sampler.py): the token whose cumulative
    probability interval holds u. Each layout's tempered log-probs are within ATOL of a
    teacher-forced forward (the tests above), so each interval end is within ATOL of the
    teacher-forced one, and two layouts can pick different tokens a and b only where u lies
    within 2 ATOL of an end of a's teacher-forced interval: which side wins is then round-off,
    and another CPU may decide it the other way. So: equal tokens, finish flags and log-probs
    (to 1e-5: the same float32 forward in another layout, measured ~1e-6) up to a row's first
    different token; there u must be such a tie; later tokens follow different histories. The
    draw reconstruction is checked on every token of `ref` first.
    """
    p, t = ref.prompt_tokens.shape[1], ref.response_tokens.shape[1]
    lp = np.asarray(
        jax.nn.log_softmax(jnp.asarray(teacher_forced_logits(model, ref) / temperature), -1)
    )[:rows, p - 1 : p - 1 + t]
    u = np.asarray(
        jax.vmap(
            lambda r: jax.vmap(
                lambda i: jax.random.uniform(
                    jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), r), i)
                )
            )(jnp.arange(t, dtype=jnp.uint32))
        )(jnp.arange(rows, dtype=jnp.uint32)),
        np.float64,
    )  # [rows, T]
    probs = np.exp(lp)
    hi = np.cumsum(probs, -1)
    lo = hi - probs
    for r in range(rows):
        n = ref.lengths[r]
        tok = ref.response_tokens[r, :n]
        a_lo = np.take_along_axis(lo[r, :n], tok[:, None], -1)[:, 0]
        a_hi = np.take_along_axis(hi[r, :n], tok[:, None], -1)[:, 0]
        inside = (a_lo - 2 * ATOL <= u[r, :n]) & (u[r, :n] <= a_hi + 2 * ATOL)
        assert inside.all(), f"row {r}: not its inverse-CDF draw"
        same = ref.response_tokens[r, :n] == out.response_tokens[r, :n]
        if same.all():
            assert out.lengths[r] == n and out.finished[r] == ref.finished[r], f"row {r}"
            np.testing.assert_allclose(out.logprobs[r], ref.logprobs[r], atol=1e-5, rtol=0)
            np.testing.assert_allclose(out.logp_zc[r], ref.logp_zc[r], atol=1e-5, rtol=0)
            continue
        i = int(np.argmin(same))
        np.testing.assert_allclose(out.logprobs[r, :i], ref.logprobs[r, :i], atol=1e-5, rtol=0)
        margin = min(abs(u[r, i] - a_lo[i]), abs(u[r, i] - a_hi[i]))
        assert margin <= 2 * ATOL, f"row {r} token {i}: u {u[r, i]} is no round-off tie ({margin})"


# --- the returned quantities against a teacher-forced forward -------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_and_self_reward_match_teacher_forced(model, batches, temperature):
    batch = batches[temperature]
    assert batch.logprob_temperature == temperature
    lp, zc = teacher_forced(model, batch, temperature)
    assert np.abs(batch.logprobs - lp).max() < ATOL
    # z_c is read from raw logits (LASER_SPEC section 1) even when sampling at 0.7.
    assert np.abs(batch.logp_zc - zc).max() < ATOL
    assert batch.finished.any()
    if temperature != 1.0:  # the other reading would differ by far more: the checks can fail
        lp_untempered, _ = teacher_forced(model, batch, 1.0)
        assert np.abs(batch.logprobs - lp_untempered).max() > 100 * ATOL
        _, zc_tempered = teacher_forced(model, batch, temperature, zc_temperature=temperature)
        assert np.abs(batch.logp_zc - zc_tempered).max() > 100 * ATOL


def test_batch_covers_every_ending(batches):
    for batch in batches.values():
        assert batch.truncated.any() and batch.finished.any()
        assert (batch.finished & (batch.lengths == T)).any(), "no EOS at the last position"


def test_self_reward_costs_at_most_one_decode_step(batches):
    """Token 0 comes from the prefill; a row of length L needs L - 1 decode steps, plus one for
    its z_c read if it finished. The loop runs the maximum of that over rows, no more."""
    for b in batches.values():
        assert b.decode_steps == (b.lengths - 1 + b.finished).max()
        # Here a row ends with EOS at position T, so its z_c read is the one extra step.
        assert b.decode_steps == T


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rows_end_with_eos_or_truncation(batches, temperature):
    b = batches[temperature]
    rows = np.arange(len(b.lengths))
    last = b.response_tokens[rows, b.lengths - 1]
    assert not (b.finished & b.truncated).any() and (b.finished | b.truncated).all()
    np.testing.assert_array_equal(b.finished, np.isin(last, EOS))  # EOS kept in the output
    np.testing.assert_array_equal(b.truncated, (b.lengths == T) & ~b.finished)
    inside = b.response_mask.copy()
    inside[rows, b.lengths - 1] = False
    assert not np.isin(b.response_tokens[inside], EOS).any(), "a row went on after EOS"
    assert (b.response_tokens[~b.response_mask] == PAD).all()
    assert (b.logprobs[~b.response_mask] == 0).all() and (b.logprobs[b.response_mask] < 0).all()
    assert (b.logp_zc[b.truncated] == 0).all() and (b.logp_zc[b.finished] < 0).all()
    assert np.isfinite(b.logp_zc).all()
    np.testing.assert_array_equal(b.prompt_index, np.repeat(np.arange(len(PROMPTS)), K))


def test_left_padded_prompts(batches):
    b = batches[1.0]
    for i, p in enumerate(PROMPTS):
        assert b.prompt_tokens[i, 8 - len(p) :].tolist() == p
        assert b.prompt_mask[i].sum() == len(p) and b.prompt_mask[i, -len(p) :].all()
    assert prompt_positions(jnp.asarray([[False, True, True]])).tolist() == [[0, 0, 1]]


# --- one prefill per prompt, determinism, compiles -------------------------------------------


def test_k_samples_share_one_prefill(model, sampler, batches):
    """K samples of a prompt from one prefill == K copies of the prompt, one sample each."""
    s = sampler.settings(k=K, temperature=1.0, top_p=1.0, top_k=0)
    before = dict(sampler.stats)
    prefix, _, _, _ = sampler.start(PROMPTS, s, SEED)
    assert prefix.k[0].shape[0] == len(PROMPTS)  # one cache row per prompt, not per sample
    assert sampler.stats["prefill_calls"] - before["prefill_calls"] == 1
    assert sampler.stats["prefill_rows"] - before["prefill_rows"] == len(PROMPTS)

    separate = make_sampler(model)
    copies = [p for p in PROMPTS for _ in range(K)]
    ref = separate.sample(copies, k=1, temperature=1.0, seed=SEED)
    assert separate.stats["prefill_rows"] == len(PROMPTS) * K
    assert_same_draws(model, batches[1.0], ref, len(PROMPTS) * K, 1.0, SEED)


def test_deterministic_for_a_seed(sampler, batches):
    again = sampler.sample(PROMPTS, k=K, temperature=1.0, seed=SEED)
    np.testing.assert_array_equal(again.response_tokens, batches[1.0].response_tokens)
    np.testing.assert_array_equal(again.logprobs, batches[1.0].logprobs)
    other = sampler.sample(PROMPTS, k=K, temperature=1.0, seed=SEED + 1)
    assert (other.response_tokens != again.response_tokens).any()
    # The K samples of a prompt are different draws.
    assert (again.response_tokens[0] != again.response_tokens[1]).any()


def test_new_batches_and_params_do_not_recompile(model, sampler, batches):
    sampler.sample(PROMPTS, k=K, temperature=1.0, seed=0)  # compiled by the fixture already
    traces = (sampler.stats["prefill_traces"], sampler.stats["decode_traces"])
    other_prompts = [[40, 41], [42] * 8, [43, 44, 45], [46]]  # same bucket, other lengths
    sampler.sample(other_prompts, k=K, temperature=1.0, seed=3)
    graphdef, state = nnx.split(model)
    sampler.update_params(jax.tree.map(lambda x: x * 1.5, state))
    try:
        moved = sampler.sample(PROMPTS, k=K, temperature=1.0, seed=SEED)
    finally:
        sampler.update_params(state)
    assert (sampler.stats["prefill_traces"], sampler.stats["decode_traces"]) == traces
    assert np.abs(moved.logprobs - batches[1.0].logprobs).max() > 1e-2  # new params were used


@pytest.mark.slow
def test_bf16_params_cast_once_is_exact():
    """Storing float32 params in the bf16 compute dtype changes no result (module docstring)."""
    cfg = TransformerConfig(**{**CFG.__dict__, "dtype": "bfloat16"})
    graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(1)))
    state = jax.tree.map(lambda x: x * 5.0 if x.ndim >= 2 else x, state)
    outs = []
    for cast in (True, False):
        s = Sampler(
            (graphdef, state),
            eos_ids=EOS,
            pad_id=PAD,
            self_reward_token_id=ZC,
            max_new_tokens=4,
            prompt_buckets=(8,),
            cast_params=cast,
        )
        assert {x.dtype for x in jax.tree.leaves(s.params)} == {
            jnp.dtype("bfloat16" if cast else "float32")
        }
        outs.append(s.sample(PROMPTS[:2], k=2, temperature=1.0, seed=0))
    np.testing.assert_array_equal(outs[0].response_tokens, outs[1].response_tokens)
    np.testing.assert_array_equal(outs[0].logprobs, outs[1].logprobs)


# --- sharded ---------------------------------------------------------------------------------


def test_sharded_equals_single_device(model, batches):
    """data 2 x fsdp 2 x tensor 2 on 8 CPU devices; 3 prompts are padded to 4 (batch axes)."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets 8 fake CPU devices)")
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sharded = make_sampler(model, mesh=mesh)
    out = sharded.sample(PROMPTS[:3], k=K, temperature=1.0, seed=SEED)
    assert sharded.stats["prefill_rows"] == 4
    assert_same_draws(model, batches[1.0], out, 3 * K, 1.0, SEED)


def loop_collectives(hlo: str) -> dict[str, list[int]]:
    """Element counts of the collectives inside the compiled program's while bodies (what every
    decode step moves between devices), by kind."""
    bodies = set(re.findall(r"body=%([\w.\-]+)", hlo))
    kinds = "all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter"
    comp, out = "", {}
    for line in hlo.splitlines():
        hit = re.match(r"^(?:ENTRY )?%([\w.\-]+) ", line)
        if hit:
            comp = hit.group(1)
        hit = re.search(rf"= (.*?) ({kinds})(?:-start)?\(", line)
        if hit and comp in bodies:
            shapes = re.findall(r"[a-z]+\d*\[([0-9,]*)\]", hit.group(1))
            sizes = [math.prod(int(d) for d in s.split(",") if d) for s in shapes]
            out.setdefault(hit.group(2), []).extend(sizes)
    return out


@pytest.mark.parametrize(
    "mesh_cfg", [MeshConfig(data=1, fsdp=8, tensor=1), MeshConfig(data=2, fsdp=2, tensor=2)]
)
def test_gathered_weights_draw_the_same_rollout_and_move_no_weights_per_step(
    model, batches, mesh_cfg
):
    """`gather_weights`: the sampler's copy whole over fsdp (split over tensor as before) draws
    the single-device rollout. Its decode loops, static and continuous, move nothing between
    devices per step but tensor parallelism's partial sums ([rows, hidden] all-reduces): no
    weights, and no rows of the logits or of the embedding (per-row slices of global rows
    would move them: `row_slices`, `Embed.rows`). The copy sharded as in training all-gathers
    weights inside the loop on the data x fsdp x tensor mesh."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets 8 fake CPU devices)")
    mesh = make_mesh(mesh_cfg)
    gathered = make_sampler(model, mesh=mesh, gather_weights=True)
    for x in jax.tree.leaves(gathered.params):
        assert "fsdp" not in jax.tree.leaves(tuple(x.sharding.spec)), x.sharding
    out = gathered.sample(PROMPTS[:3], k=K, temperature=1.0, seed=SEED)
    assert_same_draws(model, batches[1.0], out, 3 * K, 1.0, SEED)

    s = gathered.settings(k=K, temperature=1.0, top_p=1.0, top_k=0)
    local_rows = 4 * K // (mesh_cfg.data * mesh_cfg.fsdp)
    partial_sums = [] if mesh_cfg.tensor == 1 else [local_rows * CFG.hidden_size]
    prefix, state, _, _ = gathered.start(PROMPTS[:4], s, SEED)
    moved = loop_collectives(
        gathered._loop.lower(gathered.params, prefix, state, s).compile().as_text()
    )
    assert set(moved) <= {"all-reduce"}, moved
    assert set(moved.get("all-reduce", [])) <= set(partial_sums), moved
    # Continuous batching's loop condition also reads every slot's status (a few [slots]
    # vectors and scalars); nothing larger moves.
    slots = 8
    cont = ContinuousSampler(gathered, slots=slots)
    pool, st = cont.buffers(8, s)
    key, stop, low = jax.random.key(0), jnp.int32(1), jnp.int32(-1)
    lowered = cont._loop.lower(gathered.params, pool, st, key, stop, low, s=s, window=T)
    moved = loop_collectives(lowered.compile().as_text())
    assert max(sum(moved.values(), [])) <= max(partial_sums + [2 * slots]), moved

    if mesh_cfg.tensor > 1:
        sharded = make_sampler(model, mesh=mesh)
        lowered = sharded._loop.lower(sharded.params, prefix, state, s)
        assert loop_collectives(lowered.compile().as_text()).get("all-gather"), "contrast"


# --- the sampling distribution ---------------------------------------------------------------


LOGITS = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])


def expected_probs(temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """Hugging Face's warper order by hand: temperature, top-k, top-p (sorted prefix to p)."""
    x = LOGITS / temperature
    order = np.argsort(-x)
    keep = np.zeros(len(x), bool)
    keep[order[: top_k or len(x)]] = True
    p = np.where(keep, np.exp(x - x.max()), 0.0)
    p /= p.sum()
    mass = 0.0
    for i in order:
        if keep[i] and mass >= top_p:
            keep[i] = False
        mass += p[i]
    p = np.where(keep, p, 0.0)
    return p / p.sum()


@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [(1.0, 0, 1.0), (0.7, 3, 1.0), (1.0, 0, 0.6), (1.3, 5, 0.8), (1.0, 1, 1.0)],
)
def test_sampling_frequencies(temperature, top_k, top_p):
    n = 40_000
    keys = jax.random.split(jax.random.key(0), n)
    logits = jnp.broadcast_to(jnp.asarray(LOGITS, jnp.float32), (n, len(LOGITS)))
    toks = np.asarray(
        sample_tokens(logits, keys, temperature=temperature, top_k=top_k, top_p=top_p)
    )
    freq = np.bincount(toks, minlength=len(LOGITS)) / n
    want = expected_probs(temperature, top_k, top_p)
    assert (freq[want == 0] == 0).all()
    # 5 standard deviations of a binomial frequency.
    assert (np.abs(freq - want) <= 5 * np.sqrt(want * (1 - want) / n) + 1e-12).all(), (freq, want)


def test_full_vocab_draw_across_chunks():
    """Inverse-CDF draws over a vocabulary of several 128-wide chunks (the last one padded):
    frequencies match softmax, masked tokens are never drawn, the logsumexp is exact, greedy is
    the first argmax, and the per-row slices equal the gather they stand in for."""
    v, n = 300, 40_000
    logits = np.full(v, -np.inf, np.float32)
    hot = np.array([3, 127, 128, 200, 255, 299])
    logits[hot] = [0.5, 1.0, -0.3, 2.0, 0.0, 1.5]
    want = np.zeros(v)
    want[hot] = np.exp(logits[hot] - logits[hot].max())
    want /= want.sum()
    x = jnp.broadcast_to(jnp.asarray(logits), (n, v))
    u = jax.random.uniform(jax.random.key(3), (n,))
    toks, lse = full_vocab_draw(x, u)
    freq = np.bincount(np.asarray(toks), minlength=v) / n
    assert (freq[want == 0] == 0).all()
    assert (np.abs(freq - want) <= 5 * np.sqrt(want * (1 - want) / n) + 1e-12).all()
    np.testing.assert_allclose(lse[:4], jax.nn.logsumexp(x[:4], axis=-1), rtol=1e-6)
    ties = jnp.asarray(np.r_[np.zeros(200), [5.0, 1.0, 5.0], np.zeros(97)], jnp.float32)[None]
    assert int(full_vocab_draw(ties, None)[0][0]) == 200
    y = jax.random.normal(jax.random.key(4), (9, v))
    starts = jnp.arange(9) * 17
    gathered = jnp.take_along_axis(y, starts[:, None] + jnp.arange(5), axis=-1)
    np.testing.assert_array_equal(row_slices(y, starts, 5), gathered)


def _ynn_fused_ops(hlo: str) -> set[str]:
    """The ops inside the YNNPACK fusions of a compiled XLA:CPU program."""
    bodies = dict(re.findall(r"\n(%\S+) \([^\n]*\{\n(.*?)\n\}", hlo, re.S))
    called = re.findall(r"fusion\([^\n]*calls=(%[^,\s]+)[^\n]*\"kind\":\"__ynn_fusion\"", hlo)
    return {op for c in called for op in re.findall(r" (\w+)\(", bodies.get(c, ""))}


def test_decode_programs_compile_with_the_platforms_options():
    """The static decode loop and the slot loop compile with `DECODE_COMPILER_OPTIONS` on the
    CPU: XLA:CPU then fuses the MLP's silu (a divide) into the matmuls' YNNPACK fusions, which
    it does not with its defaults (the static loop jitted without options, the reference)."""
    assert decode_compiler_options("tpu") == decode_compiler_options("gpu") == {}
    # Big enough for XLA:CPU to fuse: at hidden size 64 it leaves the silu alone either way.
    cfg = dataclasses.replace(
        CFG, hidden_size=128, intermediate_size=512, head_dim=32, vocab_size=512
    )
    sp = make_sampler(Transformer(cfg, rngs=nnx.Rngs(0)))
    s = sp.settings(k=K, temperature=1.0, top_p=1.0, top_k=0)
    prefix, state, *_ = sp.start(PROMPTS, s, SEED)
    static = sp._loop.lower(sp.params, prefix, state, s).compile()
    assert "divide" in _ynn_fused_ops(static.as_text())
    plain = jax.jit(
        lambda pr, pre, st: _decode_loop(sp.graphdef, pr, pre, st, s, lambda x: x, lambda x: x)
    )
    assert "divide" not in _ynn_fused_ops(plain.lower(sp.params, prefix, state).compile().as_text())
    windows = default_windows(T)
    pool, slots = empty_buffers(cfg, len(PROMPTS) * K, 1, 8, s, windows)
    key, count = jax.random.key(0), jnp.int32(0)
    _, loop = programs(sp.graphdef, None)
    slot = loop.lower(sp.params, pool, slots, key, count, count, s=s, window=windows[-1])
    assert "divide" in _ynn_fused_ops(slot.compile().as_text())


def test_decode_options_a_compiler_does_not_take_fall_back_to_its_defaults(monkeypatch):
    """An option (or value) this jaxlib's XLA does not know would fail every compile: the decode
    programs then compile with XLA's defaults, and say so."""
    bad = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_NO_SUCH_KIND"}
    monkeypatch.setitem(sampler_module.DECODE_COMPILER_OPTIONS, "cpu", bad)
    with pytest.warns(UserWarning, match="LIBRARY_FUSION_TYPE_NO_SUCH_KIND"):
        assert decode_compiler_options("cpu") == {}
    monkeypatch.undo()
    assert decode_compiler_options("cpu") == sampler_module.DECODE_COMPILER_OPTIONS["cpu"]


def test_window_schedule_bounds_the_modelled_excess():
    least, read, e = (1000.0, 1.0), (1100.0, 1.2), 0.3
    w = window_schedule(4096, least, read, e, align=64)
    assert w[-1] == 4096 and list(w) == sorted(set(w)) and all(b % 64 == 0 for b in w)
    for lo, hi in zip((0, *w[:-1]), w, strict=True):  # the step lo reads window hi
        fits = read[0] + hi * read[1] <= (1 + e) * (least[0] + (lo + 1) * least[1])
        assert fits or hi == lo + 64 or hi == 4096
        if hi < 4096:  # the largest window that fits: one `align` more does not
            assert read[0] + (hi + 64) * read[1] > (1 + e) * (least[0] + (lo + 1) * least[1])
    assert w[0] == 128  # (1.3 * 1001 - 1100) / 1.2 = 167.8, rounded down to 64
    given = window_schedule(4096, least, read, e, first=64)
    assert given[0] == 64 and given[1] == 192  # (1.3 * 1065 - 1100) / 1.2 = 237.9
    assert window_schedule(40, least, read, e) == (40,)
    # No slack the bound allows: every window one `align` longer than the last.
    assert window_schedule(256, least, (1400.0, 1.2), e) == (64, 128, 192, 256)
    assert decode_windows_for(CFG, 10**6, 4, 8, 2, 8) == (8,)


def test_decode_windows_model_the_platforms_traffic():
    """XLA:CPU's step moves its scores and activations through memory, so its windows are
    shorter than a TPU's, whose compiler keeps them on chip; the TPU keeps the schedule its
    compiled-traffic figures were taken with (bench/README)."""
    cfg = dataclasses.replace(
        CFG,
        num_layers=24,
        hidden_size=896,
        num_heads=14,
        num_kv_heads=2,
        head_dim=64,
        vocab_size=151936,
        dtype="bfloat16",
        kv_layout="plain",
    )  # Qwen2.5-0.5B's decode shape
    args = (cfg, 988065536, 64, 256, 1, 4096)
    tpu = decode_windows_for(*args, platform="tpu")
    assert tpu[:4] == (64, 448, 832, 1216) and tpu[-3:] == (3712, 3904, 4096) and len(tpu) == 16
    assert decode_windows_for(*args, platform="gpu") == tpu
    cpu = decode_windows_for(*args, platform="cpu")
    assert len(cpu) == 16 and cpu[1] < tpu[1]
    assert step_traffic("tpu") == step_traffic("gpu") != step_traffic("cpu")


def test_decode_windows_are_capped_by_raising_the_excess():
    """Where the 30% bound takes more than `max_windows` windows (many rows, long responses:
    the keys/values outweigh the parameters), the least excess that fits replaces it; a
    schedule within the cap is left as it is."""
    cfg = dataclasses.replace(
        CFG, num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64, dtype="bfloat16"
    )  # Qwen2.5-0.5B's decode shape
    args = (cfg, 10**9, 64, 256, 1, 4096)
    uncapped = decode_windows_for(*args, max_windows=10**6)
    assert len(uncapped) > 16
    for cap in (16, 4, 2):
        capped = decode_windows_for(*args, max_windows=cap)
        assert len(capped) <= cap and capped[-1] == 4096 and list(capped) == sorted(set(capped))
        assert len(capped) >= cap - 1  # the least excess that fits: no coarser than needed
    assert decode_windows_for(*args, max_windows=1) == (4096,)
    short = (cfg, 10**9, 64, 256, 1, 512)
    assert decode_windows_for(*short) == decode_windows_for(*short, max_windows=10**6)


def test_segmented_decode_equals_one_window(model, batches):
    """Decode windows (2, 5, 8): each segment of the loop reads only the suffix positions that
    can be live; the rollout equals the single-window one."""
    seg = make_sampler(model, decode_windows=(2, 5, T))
    out = seg.sample(PROMPTS, k=K, temperature=1.0, seed=SEED)
    ref = batches[1.0]
    np.testing.assert_array_equal(out.response_tokens, ref.response_tokens)
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-5)
    np.testing.assert_allclose(out.logp_zc, ref.logp_zc, atol=1e-5)
    assert out.decode_steps == ref.decode_steps


def test_greedy_is_argmax():
    logits = jax.random.normal(jax.random.key(1), (6, 50))
    keys = jax.random.split(jax.random.key(2), 6)
    want = np.argmax(np.asarray(logits), axis=-1)
    for kw in (
        dict(temperature=0.0, top_k=0, top_p=1.0),
        dict(temperature=0.0, top_k=7, top_p=0.3),
        dict(temperature=1.0, top_k=1, top_p=1.0),
    ):
        np.testing.assert_array_equal(sample_tokens(logits, keys, **kw), want)


def test_token_logprobs_by_hand():
    logits = jnp.asarray([[1.0, 2.0, 3.0], [0.0, 0.0, math.log(2.0)]])
    tokens = jnp.asarray([2, 0])
    z1 = math.exp(1) + math.exp(2) + math.exp(3)
    np.testing.assert_allclose(
        token_logprobs(logits, tokens, 1.0),
        [3 - math.log(z1), -math.log(4.0)],
        rtol=1e-6,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        token_logprobs(logits, tokens, 0.0), token_logprobs(logits, tokens, 1.0)
    )
    z2 = math.exp(2) + math.exp(4) + math.exp(6)
    np.testing.assert_allclose(
        token_logprobs(logits, tokens, 0.5)[0], 6 - math.log(z2), rtol=1e-6, atol=1e-6
    )


# --- bad input -------------------------------------------------------------------------------


def test_bad_input_is_named(sampler, model):
    with pytest.raises(ValueError, match=r"prompt_ids\[1\].*empty"):
        sampler.sample([[1, 2], []])
    with pytest.raises(ValueError, match=r"prompt_ids\[0\].*token 64 is outside"):
        sampler.sample([[64]])
    with pytest.raises(ValueError, match="longer than the largest prompt bucket 8"):
        sampler.sample([list(range(9))])
    with pytest.raises(ValueError, match="`k`"):
        sampler.sample(PROMPTS, k=0)
    with pytest.raises(ValueError, match="`top_p`"):
        sampler.sample(PROMPTS, top_p=0.0)
    with pytest.raises(ValueError, match="self_reward_token_id.*also an EOS"):
        Sampler(model, eos_ids=(ZC,), pad_id=PAD, self_reward_token_id=ZC, max_new_tokens=4)
    with pytest.raises(ValueError, match="self_reward_token_id.*outside the vocabulary"):
        Sampler(model, eos_ids=EOS, pad_id=PAD, self_reward_token_id=151652, max_new_tokens=4)


# --- against transformers' generate -----------------------------------------------------------


def test_greedy_matches_transformers_generate(tmp_path):
    """Token for token, on a left-padded batch of mixed prompt lengths, with one EOS id."""
    torch = pytest.importorskip("torch")
    from hf_utils import load_hf_torch, make_tiny_hf

    from laserjax.model.hf_params import load_pretrained

    path = make_tiny_hf(tmp_path, "qwen2_tied")
    hf = load_hf_torch(path)
    model = load_pretrained(path, dtype="float32", param_dtype="float32")
    vocab, pad, zc, new = model.cfg.vocab_size, 0, 1, 12
    prompts = [[5, 17, 33, 60, 2, 71, 9], [44, 12], [90, 3, 3, 27]]

    def hf_generate(eos_ids):
        sampler = Sampler(
            model,
            eos_ids=eos_ids,
            pad_id=pad,
            self_reward_token_id=zc,
            max_new_tokens=new,
            prompt_buckets=(8,),
        )
        tokens, mask, _ = sampler.pad_prompts(prompts)
        with torch.no_grad():
            out = hf.generate(
                input_ids=torch.tensor(tokens, dtype=torch.long),
                attention_mask=torch.tensor(mask.astype(np.int64)),
                do_sample=False,
                max_new_tokens=new,
                min_new_tokens=0,
                eos_token_id=list(eos_ids) or None,
                pad_token_id=pad,
            )
        return sampler, out[:, tokens.shape[1] :].numpy()

    # Pick as EOS a token that greedy emits mid-way through row 0, so that row finishes early
    # and the others (checked below) run to the limit or stop elsewhere.
    _, free = hf_generate(())
    eos = int(
        next(
            t
            for i, t in enumerate(free[0])
            if i >= 3 and t not in free[0, :i] and t not in (pad, zc)
        )
    )
    sampler, want = hf_generate((eos,))
    got = sampler.sample(prompts, k=1, temperature=0.0)
    assert got.finished[0] and got.lengths[0] < new and got.truncated.any()
    np.testing.assert_array_equal(got.response_tokens[:, : want.shape[1]], want)
    assert (got.response_tokens[:, want.shape[1] :] == pad).all()
    assert vocab > max(max(p) for p in prompts)


# --- the `generate` command --------------------------------------------------------------------


def test_generate_command_prints_samples_and_r_s(capsys):
    import json

    from laserjax.cli import main

    main(
        [
            "generate",
            "--tiny",
            "--ids",
            "5,6,7",
            "--k",
            "3",
            "--max-new-tokens",
            "6",
            "--json",
            "--seed",
            "1",
            "--c-ref",
            "-20",
        ]
    )
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["sample"] for x in lines] == [0, 1, 2]
    for x in lines:
        assert x["finished"] != x["truncated"] and 1 <= x["length"] == len(x["tokens"]) <= 6
        if x["finished"]:
            assert x["tokens"][-1] < 16 and x["r_s"] == pytest.approx(0.1 * (x["logp_zc"] + 20))
        else:
            assert x["logp_zc"] is None and x["r_s"] is None and x["length"] == 6


def test_top_k_exact_equals_lax_top_k():
    """The two-stage top-k (chunks of 16 here, 313 of them) against lax.top_k, values and ids."""
    from laserjax.sampler import top_k_exact

    x = jax.random.normal(jax.random.key(3), (6, 5000)) * 3
    for k in (1, 7, 50):
        vals, ids = top_k_exact(x, k, chunk=16)
        want_vals, want_ids = jax.lax.top_k(x, k)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(vals, want_vals)
    # Many ties and a vocabulary that is not a multiple of the chunk: the values still agree.
    x = jnp.round(jax.random.normal(jax.random.key(4), (4, 4999)), 1)
    vals, ids = top_k_exact(x, 50, chunk=16)
    np.testing.assert_array_equal(vals, jax.lax.top_k(x, 50)[0])
    np.testing.assert_array_equal(np.take_along_axis(np.asarray(x), np.asarray(ids), -1), vals)
    assert all(len(set(row)) == 50 for row in np.asarray(ids).tolist())


def test_sharded_decode_all_reduces_nothing_vocabulary_sized(model):
    """FSDP x tensor decode on 8 CPU devices: the compiled loops, static and continuous, have no
    all-reduce of the logits' size (the head is gathered once before the loop;
    `_head_gatherer`)."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets 8 fake CPU devices)")
    wide = TransformerConfig(**(dataclasses.asdict(CFG) | dict(vocab_size=1000)))
    m = Transformer(wide, rngs=nnx.Rngs(0))
    for mesh_cfg, continuous in itertools.product(
        (MeshConfig(data=1, fsdp=8, tensor=1), MeshConfig(data=2, fsdp=2, tensor=2)),
        (False, True),
    ):
        sampler = make_sampler(m, mesh=make_mesh(mesh_cfg))
        s = sampler.settings(k=2, temperature=1.0, top_p=1.0, top_k=0)
        if continuous:
            cont = ContinuousSampler(sampler, slots=8)
            pool, st = cont.buffers(8, s)
            key, stop, low = jax.random.key(0), jnp.int32(1), jnp.int32(-1)
            lowered = cont._loop.lower(sampler.params, pool, st, key, stop, low, s=s, window=T)
        else:
            prefix, state, _, _ = sampler.start([[10, 11]] * 8, s, SEED)
            lowered = sampler._loop.lower(sampler.params, prefix, state, s)
        hlo = lowered.compile().as_text()
        sizes = []
        for line in hlo.splitlines():
            # `%name = f32[...] all-reduce(...)`: the result shapes sit between '=' and the
            # opcode (the name itself may read `all-reduce.3`).
            hit = re.search(r"= (.*?) all-reduce(?:-start)?\(", line)
            if hit:
                shapes = re.findall(r"[a-z]+\d*\[([0-9,]*)\]", hit.group(1))
                sizes += [math.prod(int(d) for d in s.split(",") if d) for s in shapes]
        # A vocabulary-sized all-reduce would carry at least one row's logits (1000 values).
        assert max(sizes, default=0) < wide.vocab_size, (mesh_cfg, continuous, sorted(sizes)[-5:])


# --- continuous batching ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "temperature",
    [1.0, pytest.param(0.7, marks=pytest.mark.slow), pytest.param(0.0, marks=pytest.mark.slow)],
)
def test_continuous_batching_equals_the_static_sampler(model, batches, temperature):
    """16 rows through 3 slots (windows 2, 5, 8): every row's tokens, log-probs, log p(z_c) and
    ending equal the static sampler's for the same seed (per-row keys, `sampler.row_keys`); each
    prompt is prefilled once; the slots did exactly the row-steps the rows need."""
    ref = batches.get(temperature) or make_sampler(model).sample(
        PROMPTS, k=K, temperature=temperature, seed=SEED
    )
    cont = ContinuousSampler(make_sampler(model), slots=3, windows=(2, 5, T))
    out, stats = cont.sample(PROMPTS, k=K, temperature=temperature, seed=SEED)
    np.testing.assert_array_equal(out.response_tokens, ref.response_tokens)
    np.testing.assert_array_equal(out.lengths, ref.lengths)
    np.testing.assert_array_equal(out.finished, ref.finished)
    np.testing.assert_array_equal(out.truncated, ref.truncated)
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-5)
    np.testing.assert_allclose(out.logp_zc, ref.logp_zc, atol=1e-5)
    assert stats.prefill_prompts == len(PROMPTS)
    assert stats.busy_steps == (ref.lengths - 1 + ref.finished).sum()
    assert stats.token_steps == (ref.lengths - 1).sum()
    # 3 slots, then 1 once the queue is empty and at most one row is left.
    assert stats.busy_steps <= stats.slot_steps <= 3 * stats.decode_steps


def test_continuous_batching_refills_in_groups(model, batches):
    """`refill=3` of 4 slots: the loop returns to the host only once 3 slots have freed (or the
    queue has fewer samples left), so it makes fewer loop calls than refilling every freed slot
    at once, and every row still equals the static sampler's."""
    ref = batches[1.0]
    one = ContinuousSampler(make_sampler(model), slots=4, windows=(T,), refill=1)
    three = ContinuousSampler(make_sampler(model), slots=4, windows=(T,), refill=3)
    out1, stats1 = one.sample(PROMPTS, k=K, temperature=1.0, seed=SEED)
    out3, stats3 = three.sample(PROMPTS, k=K, temperature=1.0, seed=SEED)
    for out in (out1, out3):
        np.testing.assert_array_equal(out.response_tokens, ref.response_tokens)
        np.testing.assert_array_equal(out.finished, ref.finished)
        np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-5)
        np.testing.assert_allclose(out.logp_zc, ref.logp_zc, atol=1e-5)
    assert stats3.loop_calls < stats1.loop_calls
    # Waiting for 3 free slots idles some: at most 2 idle slots per step.
    assert stats3.busy_steps == stats1.busy_steps
    assert stats3.slot_steps <= stats3.busy_steps + 2 * stats3.decode_steps


def test_continuous_batching_drains_into_fewer_slots(model, batches):
    """More slots than rows: every row starts at once, and the batch halves whenever at most
    half its slots are live (16 -> 8 -> ...), so a step never runs more than twice its live rows
    and the rollout takes fewer slot-steps than 16 slots for every step."""
    ref = batches[1.0]
    out, stats = ContinuousSampler(make_sampler(model), slots=16).sample(
        PROMPTS, k=K, temperature=1.0, seed=SEED
    )
    np.testing.assert_array_equal(out.response_tokens, ref.response_tokens)
    assert stats.prefill_calls == 1
    assert stats.busy_steps == (ref.lengths - 1 + ref.finished).sum()
    assert stats.slot_steps <= 2 * stats.busy_steps
    assert stats.slot_steps < 16 * stats.decode_steps


@pytest.mark.parametrize(
    "mesh_cfg, slots",
    [
        (MeshConfig(data=2, fsdp=2, tensor=2), 4),
        (MeshConfig(data=1, fsdp=8, tensor=1), 8),
        (MeshConfig(data=2, fsdp=1, tensor=4), 8),  # the drain halves 8 -> 4 -> 2 (`_regroup`)
    ],
)
def test_continuous_batching_on_a_mesh_equals_the_static_sampler(model, batches, mesh_cfg, slots):
    """Slots and the prompt pool split over the batch axes of 8 CPU devices (each shard's slots
    read its own block of the pool; the drain moves rows between blocks with their prompts):
    every row draws what the single-device static sampler draws (up to round-off ties,
    `assert_same_draws`), and the drain stops halving at one slot per batch shard."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets 8 fake CPU devices)")
    cont = ContinuousSampler(make_sampler(model, mesh=make_mesh(mesh_cfg)), slots, (2, 5, T))
    out, stats = cont.sample(PROMPTS, k=K, temperature=1.0, seed=SEED)
    assert_same_draws(model, batches[1.0], out, len(PROMPTS) * K, 1.0, SEED)
    assert stats.prefill_prompts == len(PROMPTS)
    shards = mesh_cfg.data * mesh_cfg.fsdp
    assert stats.slot_steps % shards == 0 and stats.slot_steps >= shards * stats.decode_steps
    if slots > shards:
        assert stats.slot_steps < slots * stats.decode_steps  # the drain ran fewer slots
    s = cont.sampler.settings(k=K, temperature=1.0, top_p=1.0, top_k=0)
    pool, st = cont.buffers(8, s)
    assert st.tokens_st.sharding.spec == P(("data", "fsdp"), None)
    assert st.suffix.k[0][0].sharding.spec[0] == ("data", "fsdp")
    assert pool.prefix.k[0].sharding.spec[0] == ("data", "fsdp")  # a block per batch shard


def test_continuous_batching_slots_must_split_over_the_mesh(model):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets 8 fake CPU devices)")
    sampler = make_sampler(model, mesh=make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)))
    with pytest.raises(ValueError, match=r"`slots`: 6 must be a multiple of .* = 4\)"):
        ContinuousSampler(sampler, slots=6)


def test_plain_kv_layout_draws_what_the_augmented_one_draws():
    """`kv_layout: plain` (head_dim components, masked by position and prompt mask: the TPU's
    caches) against `augmented` (the CPU's and GPU's): static sampler with decode windows 2, 5,
    8 and K = 4, on one device and on a data 2 x fsdp 2 x tensor 2 mesh, and continuous batching
    (per-row steps, a prompt pool, slots refilled): the same tokens, log-probs and log p(z_c)
    within 1e-5 (two float32 computations of the same softmax, the masked positions weighing
    exactly 0 in both)."""
    _, state = nnx.split(tiny_model())
    out = {}
    for layout in ("augmented", "plain"):
        cfg = dataclasses.replace(CFG, kv_layout=layout)
        model = nnx.merge(nnx.graphdef(Transformer(cfg, rngs=nnx.Rngs(0))), state)
        assert model.cfg.cache_width == CFG.head_dim + (layout == "augmented")
        runs = []
        for mesh in (None, make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))):
            smp = make_sampler(model, mesh, decode_windows=(2, 5, T))
            runs.append(smp.sample(PROMPTS, k=K, temperature=1.0, seed=SEED))
        runs.append(
            ContinuousSampler(smp, slots=4).sample(PROMPTS, k=K, temperature=1.0, seed=SEED)[0]
        )
        out[layout] = runs
    for ref, got in zip(out["augmented"], out["plain"], strict=True):
        assert_equal_rollouts(got, ref)
    assert len(set(out["augmented"][0].lengths.tolist())) > 1  # rows of several lengths


@pytest.mark.parametrize("layout", ["augmented", "plain"])
def test_continuous_batching_writing_after_reading_draws_the_same_rows(batches, layout):
    """`write_after_read` (the slot loop on a TPU or GPU, `writes_after_reading`; asked for here
    on the CPU): each step attends over the segments as they were plus its own keys and values as
    a part of their own, then writes them. Slots crossing segments (windows 2, 5, 8), on one
    device and on a data 2 x fsdp 2 x tensor 2 mesh, in both cache layouts: every row equals the
    static sampler's (tokens exactly; log-probs and log p(z_c) within 1e-5, two float32 sums of
    the same softmax in another order)."""
    assert not writes_after_reading("cpu")  # XLA:CPU would copy every segment (continuous.py)
    assert writes_after_reading("tpu")
    _, state = nnx.split(tiny_model())
    cfg = dataclasses.replace(CFG, kv_layout=layout)
    model = nnx.merge(nnx.graphdef(Transformer(cfg, rngs=nnx.Rngs(0))), state)
    for mesh, slots in ((None, 3), (make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)), 4)):
        smp = make_sampler(model, mesh)
        cont = ContinuousSampler(smp, slots, (2, 5, T), write_after_read=True)
        out, _ = cont.sample(PROMPTS, k=K, temperature=1.0, seed=SEED)
        assert_equal_rollouts(out, batches[1.0])
    one = jnp.zeros((1, 1), jnp.int32)
    with pytest.raises(ValueError, match="write_after_read needs per-row steps"):
        model.decode(one, one, None, SuffixCache.zeros(cfg, 1, 1, T), 0, write_after_read=True)


def test_slot_loop_windows_by_platform():
    """The slot loop's default windows: doubling from max_new_tokens / 8 on the CPU and a TPU,
    one window on a GPU (`default_windows`: the loop spends most steps at its widest window,
    where one segment compiled to 43% fewer kernels and 5% fewer bytes for an H200)."""
    assert default_windows(512, "cpu") == default_windows(512, "tpu") == (64, 128, 256, 512)
    assert default_windows(512, "gpu") == (512,)


@pytest.mark.parametrize(
    "platform, decode_impl, expected",
    [
        ("cpu", "xla", "augmented"),
        ("gpu", "xla", "augmented"),
        ("tpu", "xla", "plain"),
        ("gpu", "pallas", "augmented"),
    ],
)
def test_kv_layout_auto_is_plain_on_a_tpu_only(platform, decode_impl, expected):
    assert kv_layout_for(platform, decode_impl) == expected
    with pytest.raises(ValueError, match="`kv_layout`: the pallas decode kernel reads augmented"):
        dataclasses.replace(CFG, head_dim=16, decode_impl="pallas", kv_layout="plain")


def test_sharded_prefill_keeps_no_whole_batch_activation():
    """Under FSDP the prefill's residual stream is pinned batch-sharded, so each device runs its
    own prompts: XLA's temporaries stay below one float32 MLP activation of the whole batch
    ([prompts, P, intermediate]), which a prefill with the batch replicated must hold (on
    8 CPU devices it kept 538 MB against this bound's 134 MB; 73 MB pinned)."""
    cfg = dataclasses.replace(CFG, vocab_size=4096, hidden_size=256, intermediate_size=4096)
    cfg = dataclasses.replace(cfg, head_dim=64)
    mesh = make_mesh(MeshConfig(fsdp=8))
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    shardings = sharding.state_shardings(params, mesh)
    params = jax.tree.map(
        lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), params, shardings
    )
    b, p = 64, 128
    s = SamplingSettings(
        k=1,
        max_new_tokens=64,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        eos_ids=EOS,
        pad_id=PAD,
        self_reward_token_id=ZC,
    )

    def batch(shape, dtype):
        return jax.ShapeDtypeStruct(
            shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape))
        )

    prefill = jax.jit(
        lambda pr, tk, m, va, seed: _prefill(graphdef, pr, tk, m, va, seed, s, _constrainer(mesh))
    )
    compiled = prefill.lower(
        params,
        batch((b, p), jnp.int32),
        batch((b, p), jnp.bool_),
        batch((b,), jnp.bool_),
        jax.ShapeDtypeStruct((), jnp.uint32, sharding=sharding.replicated(mesh)),
    ).compile()
    whole_batch_activation = b * p * cfg.intermediate_size * 4
    assert compiled.memory_analysis().temp_size_in_bytes < whole_batch_activation
