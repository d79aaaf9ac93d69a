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
`fold_in(fold_in(key(seed), r), i)`. A row's draws therefore depend only on the seed, its row
number, its own step and its logits: the same on any mesh, with any amount of batch padding,
identical between K samples of one prompt and K copies of that prompt with K = 1, and the same
whichever slot of a continuous batch the row runs in (`continuous.py`).

Decode traffic: attention reads the suffix cache only up to a static window, so a step early in
a long generation does not read (or mask) the unused tail of the preallocated cache. The loop is
segmented: one `while_loop` per window of `window_schedule`, each running the steps that fit its
window; together they run exactly the steps the single loop would. The windows grow with the
step so that each step reads at most a set excess over the least it must read (every parameter
once plus the live prefix and suffix keys/values), as `decode_windows_for` models a step's
traffic. On the CPU the decode programs compile with `DECODE_COMPILER_OPTIONS`, which fuse the
work around the step's matmuls into them.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import warnings
from collections.abc import Callable, Sequence

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
from laserjax.model.transformer import (
    SLICED_ROWS_MAX,
    PrefixCache,
    SuffixCache,
    Transformer,
    TransformerConfig,
    to_dtype,
)

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


VOCAB_CHUNK = 128
"""Chunk width of the full-vocabulary draw (151936 = 1187 chunks of 128 for Qwen2.5)."""


def row_slices(x_rv: jax.Array, start_r: jax.Array, size: int, sliced: bool = True) -> jax.Array:
    """x_rv[r, start_r[r] : start_r[r] + size] for every row: [R, size].

    One dynamic slice per row for up to `SLICED_ROWS_MAX` rows: XLA:CPU's cost analysis counts a
    gather as a read of the whole [R, V] operand, a dynamic slice as a read of its `size` entries
    (what either reads). More rows take one gather (the slices are unrolled: compile time), and so
    do rows split over a mesh (`sliced` False): a slice of global row i would all-gather x_rv
    onto every device, where the gather stays on each row's shard.
    """
    r = x_rv.shape[0]
    if r > SLICED_ROWS_MAX or not sliced:
        idx = start_r[:, None] + jnp.arange(size)
        return jnp.take_along_axis(x_rv, idx, axis=-1, mode="promise_in_bounds")
    return jnp.concatenate(
        [jax.lax.dynamic_slice(x_rv, (i, start_r[i]), (1, size)) for i in range(r)]
    )


def full_vocab_draw(
    x_rv: jax.Array, u_r: jax.Array | None, sliced: bool = True
) -> tuple[jax.Array, jax.Array]:
    """One token per row from softmax(x_rv), and logsumexp(x_rv), in two reads of x_rv.

    `u_r` [R] uniform in [0, 1): inverse-CDF sampling, the first token whose cumulative
    probability exceeds u (an exact draw from the categorical distribution); `u_r` None: greedy,
    the first maximum (as `argmax`). The vocabulary is read as chunks of `VOCAB_CHUNK`: one pass
    for the chunk maxima, one for each chunk's mass; the cumulative sums run over the chunk
    masses ([R, V / 128]) and then inside the one chosen chunk, so no [R, V] intermediate (noise,
    sorted copy, probabilities) is ever written. Returns (tokens [R] int32, logsumexp [R]).
    `sliced`: as `row_slices` (False where the rows are split over a mesh).
    """
    x_rv = x_rv.astype(jnp.float32)
    r, v = x_rv.shape
    c = VOCAB_CHUNK
    n = -(-v // c)
    x = x_rv
    if n * c != v:
        x = jnp.pad(x_rv, ((0, 0), (0, n * c - v)), constant_values=-jnp.inf)
    x_rnc = x.reshape(r, n, c)
    m_rn = x_rnc.max(-1)
    # argmax, not max: XLA merges a max of the chunk maxima into one more pass over x.
    top_r = jnp.take_along_axis(m_rn, jnp.argmax(m_rn, axis=-1)[:, None], axis=-1)[:, 0]
    safe_rn = jnp.where(jnp.isfinite(m_rn), m_rn, top_r[:, None])
    mass_rn = jnp.sum(jnp.exp(x_rnc - safe_rn[..., None]), -1) * jnp.exp(safe_rn - top_r[:, None])
    total_r = mass_rn.sum(-1)
    lse_r = top_r + jnp.log(total_r)
    if u_r is None:
        chunk_r = jnp.argmax(m_rn, axis=-1).astype(jnp.int32)
        vals_rc = row_slices(x, chunk_r * c, c, sliced)
        return (chunk_r * c + jnp.argmax(vals_rc, axis=-1)).astype(jnp.int32), lse_r

    def pick(cum_rk, target_r, weights_rk):
        # First index whose cumulative mass exceeds the target; if rounding leaves the target
        # at or past the total, the last index with mass.
        k = cum_rk.shape[-1]
        first = jnp.sum(cum_rk <= target_r[:, None], axis=-1)
        last = k - 1 - jnp.argmax((weights_rk > 0)[:, ::-1], axis=-1)
        return jnp.where(first >= k, last, first).astype(jnp.int32)

    target_r = u_r * total_r
    cum_rn = jnp.cumsum(mass_rn, axis=-1)
    chunk_r = pick(cum_rn, target_r, mass_rn)
    before_r = jnp.take_along_axis(cum_rn - mass_rn, chunk_r[:, None], axis=-1)[:, 0]
    w_rc = jnp.exp(row_slices(x, chunk_r * c, c, sliced) - top_r[:, None])
    inner_r = pick(jnp.cumsum(w_rc, axis=-1), target_r - before_r, w_rc)
    return chunk_r * c + inner_r, lse_r


def sample_tokens(
    logits_rv: jax.Array, keys_r: jax.Array, *, temperature: float, top_k: int, top_p: float
) -> jax.Array:
    """One token per row: greedy (temperature 0) or temperature / top-k / top-p sampling.

    The order of Hugging Face's logits warpers: temperature, then top-k, then top-p. Top-k uses
    `top_k_exact` (no sort of the vocabulary); top-p sorts, over the k survivors when top_k > 0
    and over the full vocabulary only when top_k = 0 and top_p < 1. Top-p keeps the smallest prefix
    of the tokens sorted by probability whose mass reaches top_p (always at least one token).
    The full vocabulary (top_k = 0, top_p = 1) uses `full_vocab_draw` with u drawn from the row's
    key; truncated distributions draw with `jax.random.categorical`.
    """
    logits_rv = logits_rv.astype(jnp.float32)
    v = logits_rv.shape[-1]
    if temperature == 0:
        return jnp.argmax(logits_rv, axis=-1).astype(jnp.int32)
    if not 0 < top_k < v and top_p >= 1:
        u_r = jax.vmap(jax.random.uniform)(keys_r)
        return full_vocab_draw(logits_rv / temperature, u_r)[0]
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


def row_keys(seed_key: jax.Array, row_r: jax.Array, index_r: jax.Array) -> jax.Array:
    """Keys for drawing response index `index_r` of output rows `row_r` (module docstring):
    `fold_in(fold_in(seed_key, row), index)`, so a row's key never depends on its batch slot."""
    fold = jax.vmap(jax.random.fold_in, (None, 0))
    return jax.vmap(jax.random.fold_in)(
        fold(seed_key, row_r.astype(jnp.uint32)), index_r.astype(jnp.uint32)
    )


WINDOW_ALIGN = 64
"""Decode windows are multiples of this (or the full suffix length)."""

WINDOW_EXCESS = 0.25
"""The most a decode step may read over the least it must (`decode_windows_for`, as modelled)
before the next window starts. At the 0.5B shape on XLA:CPU a step reads 1.19x its least with
no window slack at all (activations, scores), so below about 0.2 every window is one
`WINDOW_ALIGN` longer than the last; 0.25 takes 7 windows at 512 new tokens there, and the cap
(`MAX_WINDOWS`) at 4096. On a TPU 0.25 takes 4 windows at 512 (0.3 took 3 before 28 Nov 2026)."""

MAX_WINDOWS = 16
"""Most decode windows a rollout compiles (`decode_windows_for`). Uncapped, the excess bound takes
30 windows for Qwen2.5-0.5B's shape at 64 rows x 4096 new tokens on the CPU (float32) and 58 on
a TPU (bf16); on an H200 each window added about 10 s to the 0.5B decode program's compile (3
windows 47 s, one 26 s)."""


DECODE_COMPILER_OPTIONS: dict[str, dict[str, str]] = {
    "cpu": {
        "xla_cpu_experimental_ynn_fusion_type": (
            "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"
        )
    },
}
"""XLA options the decode programs (the static decode loop, continuous batching's slot loop)
compile with, by platform (`decode_compiler_options`). By default XLA:CPU hands YNNPACK the
matmuls and little else, and writes most elementwise results and reductions between them to
memory; with reductions added it fuses the work around the matmuls into them (the MLP's
silu(gate) x up, attention's exp into exp-times-V). Qwen2.5-0.5B's shape, float32, 64 rows,
window 64: a step reads 2,850 MB against 3,113 MB (bench/decode_cost.py); a whole rollout takes
the same time on 2 cores, where it is bound by arithmetic (bench/cpu_decode_options.py). Other
platforms fuse these already."""


def decode_compiler_options(platform: str) -> dict[str, str]:
    """`DECODE_COMPILER_OPTIONS` for `platform` (`sharding.platform_of` a mesh): a new dict, empty
    (XLA's defaults, with a warning) where this jaxlib's compiler does not take them."""
    options = DECODE_COMPILER_OPTIONS.get(platform, {})
    if options and not _compiler_takes(platform, tuple(sorted(options.items()))):
        return {}
    return dict(options)


@functools.cache
def _compiler_takes(platform: str, options: tuple[tuple[str, str], ...]) -> bool:
    """Whether `platform`'s compiler (this jaxlib's) accepts `options`: an option or value it
    does not know fails every compile, and `jax>=0.6` spans versions before YNNPACK's fusions."""
    try:
        device = jax.devices(platform)[0]
        x = jax.device_put(np.float32(0), device)
        jax.jit(lambda y: y + 1, compiler_options=dict(options)).lower(x).compile()
    except Exception as e:  # XLA's errors for an unknown option vary by version
        warnings.warn(
            f"XLA ({platform}) does not take the decode programs' options {dict(options)} "
            f"({type(e).__name__}: {str(e).splitlines()[0][:120]}); they compile with its "
            "defaults, reading more memory per decode step",
            stacklevel=3,
        )
        return False
    return True


def window_schedule(
    max_new_tokens: int,
    least: tuple[float, float],
    read: tuple[float, float],
    max_excess: float = WINDOW_EXCESS,
    align: int = WINDOW_ALIGN,
    first: int | None = None,
) -> tuple[int, ...]:
    """Increasing static attention windows ending at `max_new_tokens` (module docstring).

    `least` = (L0, L1): decode step s must read at least L0 + (s + 1) * L1 bytes (the parameters
    and the prefix cache, plus every live suffix position). `read` = (R0, R1): a step run with
    window W reads R0 + W * R1 (what the step moves besides, per step and per window position).
    Window W_i serves the steps W_{i-1} <= s < W_i (W_0 = 0), so W_i is the largest multiple of
    `align` with R0 + W_i R1 <= (1 + max_excess) (L0 + (W_{i-1} + 1) L1), and at least one
    `align` more than W_{i-1}: every step reads at most `max_excess` over its least, as
    modelled, unless one `align` already exceeds that. `first`: the first window instead (where
    the model leaves out the step's fixed overheads, the first steps have the least room for
    them)."""
    (l0, l1), (r0, r1) = least, read
    if l1 <= 0 or r1 <= 0:
        return (max_new_tokens,)
    out, w = [], 0
    if first is not None:
        w = min(first, max_new_tokens)
        out.append(w)
    while w < max_new_tokens:
        best = ((1 + max_excess) * (l0 + (w + 1) * l1) - r0) / r1
        w = min(max_new_tokens, max(w + align, int(best) // align * align))
        out.append(w)
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class StepTraffic:
    """What a decode step moves besides the parameters and the caches, per compiler
    (`STEP_TRAFFIC`; `decode_windows_for` models a step with it)."""

    score_bytes: float
    """Per window position and query head: the float32 attention scores' passes."""
    prompt_scores: bool
    """Whether the prompt positions' scores count too (`score_bytes` each)."""
    activation_floats: float
    """Hidden-size float32 vectors per row and layer (norms, projections' outputs, rotary
    embedding, residuals)."""
    vocab_passes: int
    """Passes over the [rows, vocabulary] float32 logits."""
    first_window: int | None
    """The first window, where the model leaves the step's fixed overheads out (None: by the
    excess bound like the others)."""


STEP_TRAFFIC = {
    "cpu": StepTraffic(
        score_bytes=14, prompt_scores=True, activation_floats=32, vocab_passes=3, first_window=None
    ),
}
"""Measured on XLA:CPU with `DECODE_COMPILER_OPTIONS` at Qwen2.5-0.5B's shape (64 rows, float32,
bench/decode_cost.py): the scores written by their matmul and read by the max and by
exp-times-V, 12.6 bytes (a window position costs 1.17x its keys and values), taken as 14
because from 16 cache parts on (the 15th window) XLA:CPU takes some parts' exp out of their
fusions, 100-200 MB a step over the trend at 4096 new tokens; 28.8 activation vectors besides
the logits' three passes (written by the head, read by the draw's two)."""

FUSED_STEP_TRAFFIC = StepTraffic(
    score_bytes=20,
    prompt_scores=False,
    activation_floats=0,
    vocab_passes=0,
    first_window=WINDOW_ALIGN,
)
"""Other compilers (TPU, GPU) fuse the activations and the scores' passes into the matmuls; five
float32 passes per window position stand in for them, which keeps the windows' segments short:
on XLA's TPU compiler a segment of 448 positions was brought on chip and copied back every step,
none of 384 or fewer at the 0.5B shape (bench/README). The schedule this gives is the one the
TPU and GPU figures of bench/README were taken with before 28 Nov 2026 (at 0.3 excess)."""


def step_traffic(platform: str) -> StepTraffic:
    """`STEP_TRAFFIC` for `platform`, `FUSED_STEP_TRAFFIC` where it has none."""
    return STEP_TRAFFIC.get(platform, FUSED_STEP_TRAFFIC)


def decode_windows_for(
    cfg: TransformerConfig,
    params_bytes: int,
    prompts: int,
    prompt_len: int,
    k: int,
    max_new_tokens: int,
    max_excess: float = WINDOW_EXCESS,
    max_windows: int = MAX_WINDOWS,
    platform: str = "cpu",
) -> tuple[int, ...]:
    """`window_schedule` for a rollout of `prompts` x `k` rows (module docstring), compiled for
    `platform` (`sharding.platform_of` a mesh). A step must read the parameters, the prefix cache
    and the live suffix keys/values (`head_dim` wide). It reads the parameters, the caches as laid
    out (`cache_width` wide) and what `step_traffic(platform)` adds: the scores of every attended
    position, the activations and the logits.

    At most `max_windows` windows: where `max_excess` would take more, the least excess whose
    schedule fits replaces it (each window is a loop over every layer in the compiled program, so
    the count sets the decode program's compile time)."""
    if max_windows < 1:
        raise ValueError(f"max_windows must be >= 1, got {max_windows}")
    if max_windows == 1:
        return (max_new_tokens,)
    item = to_dtype(cfg.dtype).itemsize
    layers, rows, prefix = cfg.num_layers, prompts * k, prompts * prompt_len
    kv_least = 2 * layers * cfg.num_kv_heads * cfg.head_dim * item
    kv_read = 2 * layers * cfg.num_kv_heads * cfg.cache_width * item
    traffic = step_traffic(platform)
    scores = layers * cfg.num_heads * traffic.score_bytes
    per_row = traffic.vocab_passes * cfg.vocab_size
    per_row += traffic.activation_floats * layers * cfg.hidden_size
    fixed = params_bytes + prefix * (kv_read + scores * traffic.prompt_scores) + rows * 4 * per_row
    least = (params_bytes + prefix * kv_least, rows * kv_least)
    read = (fixed, rows * (kv_read + scores))

    def schedule(excess: float) -> tuple[int, ...]:
        return window_schedule(max_new_tokens, least, read, excess, first=traffic.first_window)

    windows = schedule(max_excess)
    if len(windows) <= max_windows:
        return windows
    lo, hi = max_excess, 2 * max_excess  # lo takes too many windows; hi is raised until it fits
    while len(schedule(hi)) > max_windows:
        lo, hi = hi, 2 * hi
    for _ in range(30):  # the least excess that fits, to 1e-9 of the bracket
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if len(schedule(mid)) <= max_windows else (mid, hi)
    return schedule(hi)


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
    batch_shards: int = 1
    """How many shards the rows are split over (a mesh's data x fsdp): above 1 the draw picks
    per-row entries with gathers, not per-row slices (`row_slices`)."""

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
    logits_bkv: jax.Array,
    seed_key: jax.Array,
    row_bk: jax.Array,
    index_bk: jax.Array,
    s: SamplingSettings,
    zc_logit_bk: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Tokens [B, K] for response indices `index_bk` of output rows `row_bk`, their log-probs
    (`token_logprobs` at the rollout temperature) and log p(z_c) from the raw logits (used only
    by rows whose fed token was their EOS; `zc_logit_bk` is the z_c logit when the caller has it
    from `Transformer.token_logit`, which saves a read of the logits).

    The full-vocabulary case reads the logits twice (`full_vocab_draw`) and takes the log-probs
    from the logsumexp it returns; truncated sampling goes through `sample_tokens`.
    """
    b, k, v = logits_bkv.shape
    x_rv = logits_bkv.reshape(b * k, v).astype(jnp.float32)
    keys_r = row_keys(seed_key, row_bk.reshape(-1), index_bk.reshape(-1))
    zc = s.self_reward_token_id
    if s.temperature == 0 or (not 0 < s.top_k < v and s.top_p >= 1):
        temp = s.logprob_temperature
        x_t = x_rv if temp == 1 else x_rv / temp
        u_r = None if s.temperature == 0 else jax.vmap(jax.random.uniform)(keys_r)
        sliced = s.batch_shards == 1
        tok_r, lse_r = full_vocab_draw(x_t, u_r, sliced)
        lp_r = row_slices(x_t, tok_r, 1, sliced)[:, 0] - lse_r
        raw_lse_r = lse_r if temp == 1 else full_vocab_draw(x_rv, None, sliced)[1]
    else:
        tok_r = sample_tokens(x_rv, keys_r, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
        lp_r = token_logprobs(x_rv, tok_r, s.logprob_temperature)
        raw_lse_r = jax.nn.logsumexp(x_rv, axis=-1)
    zc_r = x_rv[:, zc] if zc_logit_bk is None else zc_logit_bk.reshape(-1)
    zc_r = zc_r - raw_lse_r
    return tok_r.reshape(b, k), lp_r.reshape(b, k), zc_r.reshape(b, k)


def _prefill(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    tokens_bp: jax.Array,
    mask_bp: jax.Array,
    valid_b: jax.Array,
    seed: jax.Array,
    s: SamplingSettings,
    constrain,
    windows: tuple[int, ...] = (),
) -> tuple[PrefixCache, SamplerState]:
    model: Transformer = nnx.merge(graphdef, params)
    b = tokens_bp.shape[0]
    # The residual stream pinned batch-sharded between blocks: left to XLA, a Qwen2.5-7B
    # prefill on a v5p-64 (compile only) ran every prompt on every chip, 18.8 GiB of MLP
    # activations per chip.
    positions_bp = prompt_positions(mask_bp)
    logits_bv, prefix = model.prefill(tokens_bp, positions_bp, mask_bp, constrain=constrain)
    seed_key = jax.random.key(seed)
    logits_bkv = jnp.broadcast_to(logits_bv[:, None], (b, s.k, logits_bv.shape[-1]))
    rows_bk = jnp.arange(b * s.k, dtype=jnp.int32).reshape(b, s.k)
    tok_bk, lp_bk, _ = _draw(logits_bkv, seed_key, rows_bk, jnp.zeros_like(rows_bk), s)
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
        suffix=SuffixCache.zeros(model.cfg, b, s.k, s.max_new_tokens, windows),
        seed_key=seed_key,
        step=jnp.int32(0),
    )
    return constrain(prefix), constrain(state)


def _decode_step(
    model: Transformer,
    prefix: PrefixCache,
    st: SamplerState,
    s: SamplingSettings,
    window: int | None = None,
) -> SamplerState:
    """Feed y_step; pending EOS rows read log p(z_c); generating rows draw y_{step+1}.

    `window` (static, > step) bounds the suffix positions attention reads."""
    t = s.max_new_tokens
    positions_bk = jnp.broadcast_to(st.prompt_len_b[:, None] + st.step, st.last_bk.shape)
    logits_bkv, suffix, h_bkd = model.decode(
        st.last_bk,
        positions_bk,
        prefix,
        st.suffix,
        st.step,
        window=window,
        return_hidden=True,
        row_shards=s.batch_shards,
    )
    # Rows whose fed token is their EOS: this step's logits sit at the EOS position.
    pending = st.finished_bk & ~st.complete_bk
    nxt = st.step + 1
    b, k = st.last_bk.shape
    rows_bk = jnp.arange(b * k, dtype=jnp.int32).reshape(b, k)
    zc_logit = model.token_logit(h_bkd, s.self_reward_token_id)
    tok_bk, lp_bk, zc_bk = _draw(
        logits_bkv, st.seed_key, rows_bk, jnp.full((b, k), nxt), s, zc_logit
    )
    logp_zc = jnp.where(pending, zc_bk, st.logp_zc_bk)
    complete = st.complete_bk | pending
    active = ~complete
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
    gather_head=lambda params: params,
) -> SamplerState:
    """The segmented decode loop: for each window W (the suffix cache's segment ends), steps
    run while step < W (module docstring); a segment whose rows are all complete exits at once.
    `gather_head` replicates the vocabulary-sized parameters before the loop (`_head_gatherer`)."""
    model: Transformer = nnx.merge(graphdef, gather_head(params))
    for w in state.suffix.bounds:

        def cond(st: SamplerState, w=w) -> jax.Array:
            return (st.step < w) & ~jnp.all(st.complete_bk)

        def body(st: SamplerState, w=w) -> SamplerState:
            return constrain(_decode_step(model, prefix, st, s, w))

        state = jax.lax.while_loop(cond, body, state)
    return state


# ---------------------------------------------------------------------------------------------
# Sharding of the sampler's buffers.


def _batch_major(mesh: Mesh, x: jax.Array) -> NamedSharding:
    """[B, ...] buffers: the batch over (data, fsdp), the rest replicated."""
    return sharding.batch_sharding(mesh, x.ndim)


def _cache(mesh: Mesh, x: jax.Array) -> NamedSharding:
    """[B, ..., kv_heads, positions, head_dim] caches: batch over (data, fsdp), kv heads over
    tensor when it divides them (as the k/v projections' output columns are split)."""
    heads = "tensor" if x.shape[-3] % mesh.shape["tensor"] == 0 else None
    return NamedSharding(mesh, P(sharding.BATCH, *(None,) * (x.ndim - 4), heads, None, None))


HEAD_PATHS = r"(embed_tokens/embedding|lm_head/kernel)$"
"""The vocabulary-sized parameters: the LM head (the embedding when tied) and the embedding."""


def _head_gatherer(mesh: Mesh | None):
    """Replicates the vocabulary-sized parameters, once, before the decode loop.

    Sharded as in training (vocabulary over tensor, hidden over fsdp), the head's matmul
    contracts a sharded hidden axis, so every decode step would all-reduce the full float32
    logits [rows, V] across fsdp (155.6 MB at 256 rows of Qwen2.5). One all-gather of the head
    per rollout (V x D in the compute dtype, kept for the loop) instead: each device computes
    the full logits of its own rows, and sampling needs no collective over the vocabulary.
    """
    if mesh is None:
        return lambda params: params
    replicated = sharding.replicated(mesh)

    def gather(params):
        def pin(path, x):
            if re.search(HEAD_PATHS, sharding.path_str(path)):
                return jax.lax.with_sharding_constraint(x, replicated)
            return x

        return jax.tree_util.tree_map_with_path(pin, params)

    return gather


def _constrainer(mesh: Mesh | None):
    """Pins the shardings of a PrefixCache, a SamplerState or a batch-major array such as the
    prefill's residual stream (the identity without a mesh)."""
    if mesh is None:
        return lambda tree: tree

    def pin(x, spec):
        return jax.lax.with_sharding_constraint(x, spec(mesh, x))

    def constrain(tree):
        if isinstance(tree, jax.Array):
            return pin(tree, _batch_major)
        if isinstance(tree, PrefixCache):
            return PrefixCache(
                jax.tree.map(lambda x: pin(x, _cache), tree.k),
                jax.tree.map(lambda x: pin(x, _cache), tree.v),
                pin(tree.mask_bp, _batch_major),
            )
        suffix = jax.tree.map(lambda x: pin(x, _cache), tree.suffix)
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


def decode_program(
    graphdef: nnx.GraphDef, mesh: Mesh | None, on_trace: Callable[[], None] = lambda: None
) -> Callable[..., SamplerState]:
    """The decode loop, jitted: `loop(params, prefix, state, settings)` (`_decode_loop`; the state
    donated, the settings static), compiled with `decode_compiler_options` for the mesh's
    platform; `on_trace` runs at each trace. `Sampler` runs it; `plan --compile` compiles it
    from shapes."""
    constrain, gather_head = _constrainer(mesh), _head_gatherer(mesh)

    def loop(params, prefix, state, settings):
        on_trace()
        return _decode_loop(graphdef, params, prefix, state, settings, constrain, gather_head)

    return jax.jit(
        loop,
        static_argnums=(3,),
        donate_argnums=(2,),
        compiler_options=decode_compiler_options(sharding.platform_of(mesh)),
    )


# ---------------------------------------------------------------------------------------------
# The host-side driver.


def default_prompt_buckets(max_prompt_len: int) -> tuple[int, ...]:
    """Powers of two from 16 up to max_prompt_len, plus max_prompt_len itself."""
    out, b = [], 16
    while b < max_prompt_len:
        out.append(b)
        b *= 2
    return (*out, max_prompt_len)


def copy_dtype(dtype: jnp.dtype, compute: jnp.dtype) -> jnp.dtype:
    """The dtype of a parameter in the sampler's weight copy: floats wider than the compute
    dtype take it (exact: every use in the model casts to the compute dtype first)."""
    wide = jnp.issubdtype(dtype, jnp.floating) and jnp.dtype(dtype).itemsize > compute.itemsize
    return compute if wide else dtype


class Sampler:
    """Rollouts for LaSeR: K samples per prompt from one prefill, plus log p(z_c) per sample.

    `model` is a `Transformer` or its `(graphdef, params_state)` from `nnx.split`. Parameters are
    a jit argument, so `update_params` with the trainer's new policy never recompiles. Floating
    parameters are stored in the model's compute dtype when that is smaller (exact: every use in
    the model casts to the compute dtype first) so a decode step reads half the bytes of float32
    master weights.

    On a mesh the copy is sharded as in training: under FSDP, XLA's TPU program for the 7B recipe
    all-gathers the layers' weights inside every decode step (BUILD.md). `gather_weights=True`
    keeps the copy whole over the fsdp axis instead (still split over tensor): one gather per
    `update_params`, none per step, for the full weights / tensor on every device
    (`rollout.gather_weights`; `python -m laserjax plan` says whether it fits).

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
        window_excess: float = WINDOW_EXCESS,
        decode_windows: Sequence[int] = (),
        max_windows: int = MAX_WINDOWS,
        gather_weights: bool = False,
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
        windows = tuple(int(w) for w in decode_windows)
        _require(
            not windows
            or (list(windows) == sorted(set(windows)) and windows[0] > 0)
            and windows[-1] == max_new_tokens,
            "decode_windows",
            f"{windows} must increase strictly from > 0 to max_new_tokens = {max_new_tokens}",
        )
        _require(window_excess > 0, "window_excess", f"must be > 0, got {window_excess}")
        _require(max_windows >= 1, "max_windows", f"must be >= 1, got {max_windows}")
        # XLA cannot split a Pallas kernel's custom call over a mesh: it would gather its
        # operands onto every device.
        _require(
            self.cfg.decode_impl != "pallas" or mesh is None or mesh.size == 1,
            "decode_impl",
            f"pallas runs on one device, not a {mesh.size if mesh else 1}-device mesh; use xla",
        )
        self.decode_windows = windows
        self.window_excess = float(window_excess)
        self.max_windows = int(max_windows)
        self.max_new_tokens = int(max_new_tokens)
        self.prompt_buckets = buckets
        self.mesh = mesh
        self.batch_multiple = sharding.batch_shards(mesh)
        self.cast_params = cast_params
        self.gather_weights = bool(gather_weights)
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

        def prefill(params, tokens_bp, mask_bp, valid_b, seed, settings, windows):
            self.stats["prefill_traces"] += 1
            return _prefill(
                graphdef, params, tokens_bp, mask_bp, valid_b, seed, settings, constrain, windows
            )

        def count_trace() -> None:
            self.stats["decode_traces"] += 1

        self._prefill = jax.jit(prefill, static_argnums=(5, 6))
        self._loop = decode_program(graphdef, mesh, count_trace)
        self.params, self._gather = None, None
        self.update_params(params)

    def update_params(self, model_or_params: Transformer | nnx.State) -> None:
        """Use new policy weights (same structure and shapes: no recompile)."""
        params = (
            nnx.state(model_or_params)
            if isinstance(model_or_params, nnx.Module)
            else model_or_params
        )
        compute = to_dtype(self.cfg.dtype)

        def cast(x):  # the array itself where its dtype stays
            dtype = copy_dtype(x.dtype, compute) if self.cast_params else x.dtype
            return x if dtype == x.dtype else x.astype(dtype)

        self.params = None  # the previous copy goes before the new one is made
        if self.mesh is not None:
            params = jax.device_put(params, sharding.state_shardings(params, self.mesh))
        if not (self.mesh is not None and self.gather_weights):
            self.params = jax.tree.map(cast, params)
            return
        if self._gather is None:
            # Cast where the weights lie, then lay the copy out (one program, so the gathered
            # copy is built from the compute-dtype shards, never from whole float32 weights).
            layout = sharding.state_shardings(params, self.mesh, replicate=("fsdp",))
            self._gather = jax.jit(lambda t: jax.tree.map(cast, t), out_shardings=layout)
        self.params = self._gather(params)

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
            batch_shards=self.batch_multiple,
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
        windows = self.windows_for(tokens.shape[0], tokens.shape[1], settings.k)
        prefix, state = self._prefill(self.params, *dev, np.uint32(seed % 2**32), settings, windows)
        return prefix, state, tokens, mask

    def decode(
        self, prefix: PrefixCache, state: SamplerState, settings: SamplingSettings
    ) -> SamplerState:
        """Run the decode loop until every row is complete; `state` is donated."""
        self.stats["decode_calls"] += 1
        return self._loop(self.params, prefix, state, settings)

    def windows_for(self, prompts: int, prompt_len: int, k: int) -> tuple[int, ...]:
        """The decode windows (suffix segment ends) for a rollout of this shape: the explicit
        `decode_windows`, or `decode_windows_for` from the bytes one step reads."""
        if self.decode_windows:
            return self.decode_windows
        params = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self.params))
        return decode_windows_for(
            self.cfg,
            params,
            prompts,
            prompt_len,
            k,
            self.max_new_tokens,
            self.window_excess,
            self.max_windows,
            sharding.platform_of(self.mesh),
        )

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
    "window_schedule",
    "decode_windows_for",
    "decode_compiler_options",
    "decode_program",
    "step_traffic",
]
