"""Jitted rollouts with a shared-prompt KV cache and the extra self-reward decode step.

One job, the sampler: the token-drawing functions, its one state pytree, the two jitted stages
(prefill, the decode loop), the sharding of its buffers and the host-side driver (`Sampler`).

LASER_SPEC section 5: after a sample emits EOS, the sampler feeds that EOS once more through the
decode step it already runs and reads log pi(z_c | x, y, <eos>) from the raw logits. The
self-reward of every finished sample therefore costs at most one decode step for the whole
batch: rows finish at different steps, so a row's z_c read usually rides along with other rows
still generating, and only a row that ends with EOS on the batch's last step makes the loop run
one step longer.

How a rollout runs (shapes: B prompts after padding, K samples per prompt, P padded prompt
length, T = max_new_tokens, V vocabulary):

1. `_prefill` (one jit): the left-padded prompts go through `Transformer.prefill` once; the K
   samples of a prompt share its `PrefixCache`. The first response token of each sample is drawn
   from the prefill's last-position logits.
2. `_decode_loop` (one jit, a `lax.while_loop` over a donated `SamplerState`): step s feeds
   y_s (the last sampled token of every row) at suffix index s and draws y_{s+1}. A row whose
   y_s is EOS instead records log p(z_c) from this step's raw logits and is complete; a row that
   reaches T tokens without EOS is truncated. The loop stops when every row is complete, so it
   runs at most T steps: T - 1 to generate T tokens and one for a z_c read after an EOS at the
   last position. The suffix cache therefore holds T positions.

Per-token log-probs (the old log-probs of an on-policy GRPO step) are under the *tempered
full-vocabulary* distribution, `log_softmax(logits / temperature)` over all V tokens, before
any top-k / top-p truncation (temperature 0, i.e. greedy, counts as temperature 1). With
top_p = 1 and top_k = 0 (the paper's setting, LASER_SPEC section 5) this is exactly the
distribution the tokens were drawn from. The train step must compute the same quantity with
`laserjax.laser.token_logprobs`, which this module uses too.

Randomness: the token at response index i of output row r (= prompt * K + j) is drawn with
`fold_in(fold_in(key(seed), i), r)`. A row's draws therefore depend only on the seed, its row
number and its logits: the same on any mesh, with any amount of batch padding, and identical
between K samples of one prompt and K copies of that prompt with K = 1.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from laserjax import sharding
from laserjax.config import token_id_problem
from laserjax.laser import positions_from_mask as prompt_positions
from laserjax.laser import token_logprobs
from laserjax.model.transformer import PrefixCache, SuffixCache, Transformer, to_dtype

# ---------------------------------------------------------------------------------------------
# Pure sampling functions (the log-prob definition itself is `laser.token_logprobs`).


TOP_K_CHUNK = 128
"""Chunk width of `top_k_exact`'s first stage (151936 = 1187 chunks of 128 for Qwen2.5)."""


def top_k_exact(x_rv: jax.Array, k: int, chunk: int = TOP_K_CHUNK) -> tuple[jax.Array, jax.Array]:
    """`lax.top_k(x_rv, k)` (values descending, their ids) without sorting the vocabulary.

    XLA's GPU TopK has a fast kernel only for k <= 16 and sorts the whole row otherwise (a full
    sort of [rows, 151936] every decode step for top-k 50). Exact two-stage selection instead:
    split the row into chunks, keep the k chunks with the largest maxima, and take the top k of
    their k * chunk entries. Exact because each of the k largest entries lies in a chunk whose
    maximum is at least the k-th largest value, and at most k chunks have such a maximum.
    (Exactly tied values may be picked in a different order than lax.top_k picks them.)
    Falls back to lax.top_k when the row has fewer than 4k chunks.
    """
    r, v = x_rv.shape
    n_chunks = -(-v // chunk)
    if n_chunks < 4 * k:
        return jax.lax.top_k(x_rv, k)
    padded = jnp.pad(x_rv, ((0, 0), (0, n_chunks * chunk - v)), constant_values=-jnp.inf)
    _, best_rk = jax.lax.top_k(padded.reshape(r, n_chunks, chunk).max(axis=-1), k)
    ids_rc = (best_rk[:, :, None] * chunk + jnp.arange(chunk, dtype=best_rk.dtype)).reshape(r, -1)
    vals, pos = jax.lax.top_k(jnp.take_along_axis(padded, ids_rc, axis=-1), k)
    return vals, jnp.take_along_axis(ids_rc, pos, axis=-1)


def sample_tokens(
    logits_rv: jax.Array, keys_r: jax.Array, *, temperature: float, top_k: int, top_p: float
) -> jax.Array:
    """One token per row: greedy (temperature 0) or temperature / top-k / top-p sampling.

    The order of Hugging Face's logits warpers: temperature, then top-k, then top-p. Top-k uses
    `top_k_exact` (no sort of the vocabulary); top-p sorts, over the k survivors when top_k > 0
    and over the full vocabulary only when top_k = 0 and top_p < 1. Top-p keeps the smallest prefix
    of the tokens sorted by probability whose mass reaches top_p (always at least one token).
    """
    logits_rv = logits_rv.astype(jnp.float32)
    v = logits_rv.shape[-1]
    if temperature == 0:
        return jnp.argmax(logits_rv, axis=-1).astype(jnp.int32)
    ids_rc = None  # vocabulary ids of the candidate columns when they are a subset/permutation
    vals_rc = logits_rv
    if 0 < top_k < v:
        vals_rc, ids_rc = top_k_exact(logits_rv, top_k)  # sorted descending
    vals_rc = vals_rc / temperature
    if top_p < 1:
        if ids_rc is None:
            iota = jax.lax.broadcasted_iota(jnp.int32, vals_rc.shape, vals_rc.ndim - 1)
            neg_sorted, ids_rc = jax.lax.sort((-vals_rc, iota), num_keys=1)
            vals_rc = -neg_sorted
        probs = jax.nn.softmax(vals_rc, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        vals_rc = jnp.where(mass_before < top_p, vals_rc, -jnp.inf)
    choice_r = jax.vmap(jax.random.categorical)(keys_r, vals_rc).astype(jnp.int32)
    if ids_rc is None:
        return choice_r
    return jnp.take_along_axis(ids_rc, choice_r[:, None], axis=-1)[:, 0].astype(jnp.int32)


def row_keys(seed_key: jax.Array, index: jax.Array, rows: int) -> jax.Array:
    """Keys for drawing response index `index` of output rows 0..rows-1 (module docstring)."""
    step_key = jax.random.fold_in(seed_key, index)
    return jax.vmap(jax.random.fold_in, (None, 0))(step_key, jnp.arange(rows, dtype=jnp.uint32))


# ---------------------------------------------------------------------------------------------
# Settings, state and output.


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """Everything static about one rollout shape; a jit cache key."""

    k: int
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    eos_ids: tuple[int, ...]
    pad_id: int
    self_reward_token_id: int

    @property
    def logprob_temperature(self) -> float:
        return self.temperature if self.temperature > 0 else 1.0


@flax.struct.dataclass
class SamplerState:
    """Every buffer of one rollout; the decode loop's carry (donated, updated in place).

    Row (b, j) is sample j of prompt b. `step` is the suffix index the next decode step writes
    (= the response index of the token it feeds). `complete_bk` is True once a row needs no
    more decode steps: its z_c was read, it was truncated, or it is batch padding.
    """

    tokens_bkt: jax.Array  # int32 response tokens, pad after the end
    logprobs_bkt: jax.Array  # float32 token_logprobs at the rollout temperature, 0 after the end
    last_bk: jax.Array  # int32 the last sampled token: what the next step feeds
    lengths_bk: jax.Array  # int32 tokens generated, EOS included
    finished_bk: jax.Array  # bool emitted EOS
    truncated_bk: jax.Array  # bool reached max_new_tokens without EOS
    complete_bk: jax.Array  # bool needs no more decode steps
    logp_zc_bk: jax.Array  # float32 log p(z_c | x, y, <eos>) from raw logits; 0 if not finished
    prompt_len_b: jax.Array  # int32 real prompt tokens; the position of y_s is prompt_len + s
    suffix: SuffixCache
    seed_key: jax.Array
    step: jax.Array  # int32 scalar


@dataclasses.dataclass(frozen=True)
class RolloutBatch:
    """A rollout as numpy arrays; rows prompt-major (row = prompt * k + j), groups contiguous.

    `logprobs` are `token_logprobs(logits, token, logprob_temperature)` of each response token
    (module docstring); `logp_zc` is log p(z_c | x, y, <eos>) from raw logits for finished rows
    and 0 for truncated ones. Every row is exactly one of finished / truncated.
    """

    prompt_tokens: np.ndarray  # [N, P] int32, left-padded with pad_id
    prompt_mask: np.ndarray  # [N, P] bool
    response_tokens: np.ndarray  # [N*K, T] int32, right-padded with pad_id, EOS kept
    response_mask: np.ndarray  # [N*K, T] bool, True on y_1..<eos>
    logprobs: np.ndarray  # [N*K, T] float32, 0 where the mask is False
    lengths: np.ndarray  # [N*K] int32
    finished: np.ndarray  # [N*K] bool: ended with an EOS id
    truncated: np.ndarray  # [N*K] bool: hit max_new_tokens without EOS
    logp_zc: np.ndarray  # [N*K] float32
    k: int
    logprob_temperature: float
    decode_steps: int
    """Decode steps the loop ran: max over rows of (length - 1 + finished), so z_c reads add a
    step only when a row ends with EOS at the batch's last step (module docstring)."""

    @property
    def num_prompts(self) -> int:
        return self.prompt_tokens.shape[0]

    @property
    def prompt_index(self) -> np.ndarray:
        """[N*K] the prompt of each row."""
        return np.repeat(np.arange(self.num_prompts), self.k)


# ---------------------------------------------------------------------------------------------
# The two jitted stages.


def _is_eos(tokens: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
    hit = jnp.zeros(tokens.shape, bool)
    for e in eos_ids:
        hit = hit | (tokens == e)
    return hit


def _set_column(
    buf_bkt: jax.Array, index: jax.Array, values_bk: jax.Array, where_bk: jax.Array
) -> jax.Array:
    """buf[:, :, index] = values where `where_bk`, else unchanged."""
    old = jax.lax.dynamic_index_in_dim(buf_bkt, index, axis=2, keepdims=False)
    return jax.lax.dynamic_update_index_in_dim(
        buf_bkt, jnp.where(where_bk, values_bk.astype(buf_bkt.dtype), old), index, axis=2
    )


def _draw(
    logits_bkv: jax.Array, seed_key: jax.Array, index: jax.Array, s: SamplingSettings
) -> tuple[jax.Array, jax.Array]:
    """Tokens [B, K] for response index `index` and their log-probs."""
    b, k, v = logits_bkv.shape
    keys_r = row_keys(seed_key, index, b * k)
    tok_r = sample_tokens(
        logits_bkv.reshape(b * k, v),
        keys_r,
        temperature=s.temperature,
        top_k=s.top_k,
        top_p=s.top_p,
    )
    tok_bk = tok_r.reshape(b, k)
    return tok_bk, token_logprobs(logits_bkv, tok_bk, s.logprob_temperature)


def _prefill(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    tokens_bp: jax.Array,
    mask_bp: jax.Array,
    valid_b: jax.Array,
    seed: jax.Array,
    s: SamplingSettings,
    constrain,
) -> tuple[PrefixCache, SamplerState]:
    model: Transformer = nnx.merge(graphdef, params)
    b = tokens_bp.shape[0]
    logits_bv, prefix = model.prefill(tokens_bp, prompt_positions(mask_bp), mask_bp)
    seed_key = jax.random.key(seed)
    logits_bkv = jnp.broadcast_to(logits_bv[:, None], (b, s.k, logits_bv.shape[-1]))
    tok_bk, lp_bk = _draw(logits_bkv, seed_key, jnp.int32(0), s)
    valid_bk = jnp.broadcast_to(valid_b[:, None], (b, s.k))
    finished = valid_bk & _is_eos(tok_bk, s.eos_ids)
    truncated = valid_bk & ~finished & (s.max_new_tokens == 1)
    tokens_bkt = jnp.full((b, s.k, s.max_new_tokens), s.pad_id, jnp.int32)
    state = SamplerState(
        tokens_bkt=tokens_bkt.at[:, :, 0].set(jnp.where(valid_bk, tok_bk, s.pad_id)),
        logprobs_bkt=jnp.zeros(tokens_bkt.shape, jnp.float32)
        .at[:, :, 0]
        .set(jnp.where(valid_bk, lp_bk, 0.0)),
        last_bk=tok_bk,
        lengths_bk=valid_bk.astype(jnp.int32),
        finished_bk=finished,
        truncated_bk=truncated,
        complete_bk=~valid_bk | truncated,
        logp_zc_bk=jnp.zeros((b, s.k), jnp.float32),
        prompt_len_b=mask_bp.sum(-1).astype(jnp.int32),
        suffix=SuffixCache.zeros(model.cfg, b, s.k, s.max_new_tokens),
        seed_key=seed_key,
        step=jnp.int32(0),
    )
    return constrain(prefix), constrain(state)


def _decode_step(
    model: Transformer, prefix: PrefixCache, st: SamplerState, s: SamplingSettings
) -> SamplerState:
    """Feed y_step; pending EOS rows read log p(z_c); generating rows draw y_{step+1}."""
    t = s.max_new_tokens
    positions_bk = jnp.broadcast_to(st.prompt_len_b[:, None] + st.step, st.last_bk.shape)
    logits_bkv, suffix = model.decode(st.last_bk, positions_bk, prefix, st.suffix, st.step)
    # Rows whose fed token is their EOS: this step's logits sit at the EOS position.
    pending = st.finished_bk & ~st.complete_bk
    zc_bk = jnp.full(st.last_bk.shape, s.self_reward_token_id, jnp.int32)
    logp_zc = jnp.where(pending, token_logprobs(logits_bkv, zc_bk, 1.0), st.logp_zc_bk)
    complete = st.complete_bk | pending
    active = ~complete
    nxt = st.step + 1
    tok_bk, lp_bk = _draw(logits_bkv, st.seed_key, nxt, s)
    # With no active row the write index is clamped and the `where` leaves the buffers as they
    # were, so the last step (a z_c read only) cannot overwrite y_{T-1}.
    index = jnp.minimum(nxt, t - 1)
    eos_now = active & _is_eos(tok_bk, s.eos_ids)
    truncated_now = active & ~eos_now & (nxt >= t - 1)
    return SamplerState(
        tokens_bkt=_set_column(st.tokens_bkt, index, tok_bk, active),
        logprobs_bkt=_set_column(st.logprobs_bkt, index, lp_bk, active),
        last_bk=jnp.where(active, tok_bk, st.last_bk),
        lengths_bk=st.lengths_bk + active.astype(jnp.int32),
        finished_bk=st.finished_bk | eos_now,
        truncated_bk=st.truncated_bk | truncated_now,
        complete_bk=complete | truncated_now,
        logp_zc_bk=logp_zc,
        prompt_len_b=st.prompt_len_b,
        suffix=suffix,
        seed_key=st.seed_key,
        step=nxt,
    )


def _decode_loop(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    prefix: PrefixCache,
    state: SamplerState,
    s: SamplingSettings,
    constrain,
) -> SamplerState:
    model: Transformer = nnx.merge(graphdef, params)

    def cond(st: SamplerState) -> jax.Array:
        return (st.step < s.max_new_tokens) & ~jnp.all(st.complete_bk)

    def body(st: SamplerState) -> SamplerState:
        return constrain(_decode_step(model, prefix, st, s))

    return jax.lax.while_loop(cond, body, state)


# ---------------------------------------------------------------------------------------------
# Sharding of the sampler's buffers.


def _batch_major(mesh: Mesh, x: jax.Array) -> NamedSharding:
    """[B, ...] buffers: the batch over (data, fsdp), the rest replicated."""
    return sharding.batch_sharding(mesh, x.ndim)


def _cache(mesh: Mesh, x: jax.Array) -> NamedSharding:
    """[L, B, ..., kv_heads, head_dim] caches: batch over (data, fsdp), kv heads over tensor
    when it divides them (as the k/v projections' output columns are split)."""
    heads = "tensor" if x.shape[-2] % mesh.shape["tensor"] == 0 else None
    return NamedSharding(mesh, P(None, sharding.BATCH, *(None,) * (x.ndim - 4), heads, None))


def _constrainer(mesh: Mesh | None):
    """Pins the shardings of a PrefixCache or SamplerState (the identity without a mesh)."""
    if mesh is None:
        return lambda tree: tree

    def pin(x, spec):
        return jax.lax.with_sharding_constraint(x, spec(mesh, x))

    def constrain(tree):
        if isinstance(tree, PrefixCache):
            return PrefixCache(
                pin(tree.k_lbphd, _cache),
                pin(tree.v_lbphd, _cache),
                pin(tree.mask_bp, _batch_major),
            )
        suffix = SuffixCache(pin(tree.suffix.k_lbkthd, _cache), pin(tree.suffix.v_lbkthd, _cache))
        replicated = sharding.replicated(mesh)
        fields = {f.name: getattr(tree, f.name) for f in dataclasses.fields(tree)}
        fields = {
            name: pin(x, _batch_major)
            for name, x in fields.items()
            if name not in ("suffix", "seed_key", "step")
        }
        return SamplerState(
            **fields,
            suffix=suffix,
            seed_key=jax.lax.with_sharding_constraint(tree.seed_key, replicated),
            step=jax.lax.with_sharding_constraint(tree.step, replicated),
        )

    return constrain


# ---------------------------------------------------------------------------------------------
# The host-side driver.


def default_prompt_buckets(max_prompt_len: int) -> tuple[int, ...]:
    """Powers of two from 16 up to max_prompt_len, plus max_prompt_len itself."""
    out, b = [], 16
    while b < max_prompt_len:
        out.append(b)
        b *= 2
    return (*out, max_prompt_len)


class Sampler:
    """Rollouts for LaSeR: K samples per prompt from one prefill, plus log p(z_c) per sample.

    `model` is a `Transformer` or its `(graphdef, params_state)` from `nnx.split`. Parameters are
    a jit argument, so `update_params` with the trainer's new policy never recompiles. Floating
    parameters are stored in the model's compute dtype when that is smaller (exact: every use in
    the model casts to the compute dtype first) so a decode step reads half the bytes of float32
    master weights.

    Compiles happen once per (padded prompt count, prompt bucket, sampling settings); `stats`
    counts traces and calls so tests can assert both.
    """

    def __init__(
        self,
        model: Transformer | tuple[nnx.GraphDef, nnx.State],
        *,
        eos_ids: Sequence[int],
        pad_id: int,
        self_reward_token_id: int,
        max_new_tokens: int,
        max_prompt_len: int = 2048,
        prompt_buckets: Sequence[int] = (),
        mesh: Mesh | None = None,
        cast_params: bool = True,
    ):
        graphdef, params = nnx.split(model) if isinstance(model, nnx.Module) else model
        self.cfg = nnx.merge(graphdef, params).cfg
        vocab = self.cfg.vocab_size
        self.eos_ids = tuple(int(e) for e in eos_ids)
        self.pad_id = int(pad_id)
        self.self_reward_token_id = int(self_reward_token_id)
        problem = token_id_problem(self.self_reward_token_id, self.eos_ids, self.pad_id, vocab)
        if problem is None and self.pad_id == -1:
            problem = "pad_id", f"-1 is outside the vocabulary [0, {vocab}); give a pad id"
        if problem is not None:
            _require(False, *problem)
        _require(max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {max_new_tokens}")
        buckets = tuple(sorted(int(b) for b in prompt_buckets)) or default_prompt_buckets(
            max_prompt_len
        )
        _require(
            all(b > 0 for b in buckets), "prompt_buckets", f"every bucket must be > 0: {buckets}"
        )
        self.max_new_tokens = int(max_new_tokens)
        self.prompt_buckets = buckets
        self.mesh = mesh
        self.batch_multiple = (
            1 if mesh is None else math.prod(mesh.shape[a] for a in sharding.BATCH)
        )
        self.cast_params = cast_params
        self.graphdef = graphdef
        self.stats = {
            "prefill_traces": 0,
            "decode_traces": 0,
            "prefill_calls": 0,
            "prefill_rows": 0,
            "decode_calls": 0,
            "decode_steps": 0,
        }
        constrain = _constrainer(mesh)

        def prefill(params, tokens_bp, mask_bp, valid_b, seed, settings):
            self.stats["prefill_traces"] += 1
            return _prefill(
                graphdef, params, tokens_bp, mask_bp, valid_b, seed, settings, constrain
            )

        def loop(params, prefix, state, settings):
            self.stats["decode_traces"] += 1
            return _decode_loop(graphdef, params, prefix, state, settings, constrain)

        self._prefill = jax.jit(prefill, static_argnums=(5,))
        self._loop = jax.jit(loop, static_argnums=(3,), donate_argnums=(2,))
        self.params = None
        self.update_params(params)

    def update_params(self, model_or_params: Transformer | nnx.State) -> None:
        """Use new policy weights (same structure and shapes: no recompile)."""
        params = (
            nnx.state(model_or_params)
            if isinstance(model_or_params, nnx.Module)
            else model_or_params
        )
        compute = to_dtype(self.cfg.dtype)

        def cast(x):
            if (
                self.cast_params
                and jnp.issubdtype(x.dtype, jnp.floating)
                and x.dtype.itemsize > compute.itemsize
            ):
                return x.astype(compute)
            return x

        if self.mesh is not None:
            params = jax.device_put(params, sharding.state_shardings(params, self.mesh))
        self.params = jax.tree.map(cast, params)

    # -- host-side preparation --------------------------------------------------------------

    def bucket_for(self, length: int) -> int:
        for b in self.prompt_buckets:
            if length <= b:
                return b
        raise ValueError(
            f"prompt of {length} tokens is longer than the largest prompt bucket "
            f"{self.prompt_buckets[-1]}; raise rollout.max_prompt_len / "
            "rollout.prompt_buckets or filter long prompts"
        )

    def pad_prompts(
        self, prompt_ids: Sequence[Sequence[int]]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Left-pad into [B, P] (B a multiple of the data-parallel size, P a bucket).

        Rows past the real prompts are batch padding: one pad token, marked invalid.
        """
        n = len(prompt_ids)
        _require(n >= 1, "prompt_ids", "no prompts given")
        vocab = self.cfg.vocab_size
        rows = [np.asarray(p, dtype=np.int64).reshape(-1) for p in prompt_ids]
        for i, r in enumerate(rows):
            _require(r.size >= 1, f"prompt_ids[{i}]", "is empty; every prompt needs a token")
            bad = r[(r < 0) | (r >= vocab)]
            if bad.size:
                _require(
                    False,
                    f"prompt_ids[{i}]",
                    f"token {int(bad[0])} is outside the vocabulary [0, {vocab})",
                )
        p = self.bucket_for(max(r.size for r in rows))
        b = -(-n // self.batch_multiple) * self.batch_multiple
        tokens = np.full((b, p), self.pad_id, np.int32)
        mask = np.zeros((b, p), bool)
        for i, r in enumerate(rows):
            tokens[i, p - r.size :] = r
            mask[i, p - r.size :] = True
        mask[n:, -1] = True
        valid = np.arange(b) < n
        return tokens, mask, valid

    # -- sampling ---------------------------------------------------------------------------

    def settings(self, *, k: int, temperature: float, top_p: float, top_k: int) -> SamplingSettings:
        _require(k >= 1, "k", f"samples per prompt must be >= 1, got {k}")
        _require(temperature >= 0, "temperature", f"must be >= 0 (0 = greedy), got {temperature}")
        _require(0 < top_p <= 1, "top_p", f"must be in (0, 1], got {top_p}")
        _require(top_k >= 0, "top_k", f"must be >= 0 (0 = full vocabulary), got {top_k}")
        top_k = 0 if top_k >= self.cfg.vocab_size else int(top_k)
        return SamplingSettings(
            k=int(k),
            max_new_tokens=self.max_new_tokens,
            temperature=float(temperature),
            top_p=float(top_p),
            top_k=top_k,
            eos_ids=self.eos_ids,
            pad_id=self.pad_id,
            self_reward_token_id=self.self_reward_token_id,
        )

    def start(
        self, prompt_ids: Sequence[Sequence[int]], settings: SamplingSettings, seed: int
    ) -> tuple[PrefixCache, SamplerState, np.ndarray, np.ndarray]:
        """Pad, shard and prefill: the prefix cache and the initial state (device arrays)."""
        tokens, mask, valid = self.pad_prompts(prompt_ids)
        dev = [jnp.asarray(x) for x in (tokens, mask, valid)]
        if self.mesh is not None:
            dev = [jax.device_put(x, sharding.batch_sharding(self.mesh, x.ndim)) for x in dev]
        self.stats["prefill_calls"] += 1
        self.stats["prefill_rows"] += tokens.shape[0]
        prefix, state = self._prefill(self.params, *dev, np.uint32(seed % 2**32), settings)
        return prefix, state, tokens, mask

    def decode(
        self, prefix: PrefixCache, state: SamplerState, settings: SamplingSettings
    ) -> SamplerState:
        """Run the decode loop until every row is complete; `state` is donated."""
        self.stats["decode_calls"] += 1
        return self._loop(self.params, prefix, state, settings)

    def sample(
        self,
        prompt_ids: Sequence[Sequence[int]],
        *,
        k: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
    ) -> RolloutBatch:
        """K samples per prompt, their log-probs and log p(z_c) (LASER_SPEC section 5)."""
        s = self.settings(k=k, temperature=temperature, top_p=top_p, top_k=top_k)
        prefix, state, tokens, mask = self.start(prompt_ids, s, seed)
        state = self.decode(prefix, state, s)
        n = len(prompt_ids)
        host = _fetch(
            {
                f: getattr(state, f)
                for f in (
                    "tokens_bkt",
                    "logprobs_bkt",
                    "lengths_bk",
                    "finished_bk",
                    "truncated_bk",
                    "logp_zc_bk",
                    "step",
                )
            }
        )
        self.stats["decode_steps"] += int(host["step"])

        def rows(x):  # [B, K, ...] of the real prompts -> [N*K, ...]
            return np.asarray(x[:n]).reshape(n * s.k, *x.shape[2:])

        lengths = rows(host["lengths_bk"])
        return RolloutBatch(
            prompt_tokens=tokens[:n],
            prompt_mask=mask[:n],
            response_tokens=rows(host["tokens_bkt"]),
            response_mask=np.arange(s.max_new_tokens)[None] < lengths[:, None],
            logprobs=rows(host["logprobs_bkt"]),
            lengths=lengths,
            finished=rows(host["finished_bk"]),
            truncated=rows(host["truncated_bk"]),
            logp_zc=rows(host["logp_zc_bk"]),
            k=s.k,
            logprob_temperature=s.logprob_temperature,
            decode_steps=int(host["step"]),
        )


def _fetch(tree):
    """Device arrays -> numpy. On several processes a batch-sharded array spans devices this
    process cannot read, so every process gathers the global value (one all-gather per leaf)
    and all of them see the whole rollout, as the trainer's global step batch expects."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def _require(cond: bool, field: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"sampler argument `{field}`: {msg}")


__all__ = [
    "RolloutBatch",
    "Sampler",
    "SamplerState",
    "SamplingSettings",
    "prompt_positions",
    "sample_tokens",
    "token_logprobs",
    "top_k_exact",
    "row_keys",
    "default_prompt_buckets",
]
