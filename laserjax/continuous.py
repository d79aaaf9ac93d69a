"""Continuous batching: rollouts through a fixed number of decode slots (LASER_SPEC section 5).

The static sampler (`sampler.Sampler`) decodes a batch until its longest row ends, so with
long-tailed response lengths most row-steps of a rollout run rows that are already complete.
Here a rollout of N prompts x K samples runs through S slots instead:

- A slot holds one sample. When a slot's row completes (after its z_c read, or truncated), the
  host collects the row and puts the next queued sample in the slot.
- A queued prompt is prefilled once, into a pool of prompt caches; its K samples are inserted as
  slots free up and all attend to that one pool entry (each loop call takes every slot's entry
  out of the pool once, `PrefixCache.rows`), which is released when the last of them
  completes. The K first tokens are drawn at prefill.
- The decode loop (one jit per slot count and window) runs until `refill` slots (default 1) have
  freed while samples are queued, until it can halve the slot count once the queue is empty
  (the live rows are gathered into a batch half as wide, so the drain at the end of a rollout
  does not run idle slots), or until a live row reaches the end of the attention window. Each
  return to the host reads the slots' status in one transfer and the completed rows in one
  gather.

Every row draws exactly what the static sampler draws for it: the token at response index i of
output row r uses `fold_in(fold_in(key(seed), r), i)` whichever slot and batch the row runs in,
and the decode step is the static one applied per row (each slot at its own position).

On a mesh (the `Sampler`'s), the slots are split over the batch axes (data, fsdp) as the static
sampler's rows are, their suffix caches' kv heads over tensor, and the parameters stay sharded as
in training (the vocabulary-sized ones gathered once per loop call, `sampler._head_gatherer`).
The slots and the prompt pool are split into one block per batch shard: a prompt's entry lies in
the block of the shard its K samples run on, so the pool reads stay on the device
(`PrefixCache.rows(..., shards)`). The drain halves the slots down to one per batch
shard; rows that move to another block take their prompts' caches along (`_regroup`). On
several processes (a pod) every process runs this host loop on the same global prompts: what it
reads from the devices comes back replicated, so all of them make the same decisions and call
the same programs in the same order, as with the static sampler.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from laserjax import sharding
from laserjax.model.transformer import PrefixCache, SuffixCache, Transformer, TransformerConfig
from laserjax.sampler import (
    WINDOW_ALIGN,
    RolloutBatch,
    Sampler,
    SamplingSettings,
    _cache,
    _constrainer,
    _draw,
    _head_gatherer,
    _is_eos,
    _require,
    decode_compiler_options,
    prompt_positions,
)
from laserjax.sharding import platform_of

PREFILL_BATCH = 8
"""Prompts per prefill call (padded; on a mesh rounded up to a multiple of the batch axes'
size): one compile, and a full pool refill in few calls."""


@flax.struct.dataclass
class Pool:
    """Prompt caches shared by the K samples of each prompt; entry e serves prompt owner[e]."""

    prefix: PrefixCache  # per layer [E, kv_heads, P, cache_width]
    tok0_ek: jax.Array  # int32 the K first response tokens, drawn at prefill
    lp0_ek: jax.Array  # float32 their log-probs
    prompt_len_e: jax.Array  # int32


@flax.struct.dataclass
class SlotState:
    """Every buffer of the S decode slots; the loop's carry (donated). Slot s runs output row
    `row_s[s]` (a sample of the prompt in pool entry `pool_s[s]`) and feeds its token at
    response index `pos_s[s]`. A free slot is not `occupied` and counts as complete."""

    occupied_s: jax.Array  # bool
    row_s: jax.Array  # int32 output row (prompt * K + j)
    pool_s: jax.Array  # int32 pool entry of the row's prompt
    pos_s: jax.Array  # int32 response index of the token the next step feeds
    last_s: jax.Array  # int32 that token
    tokens_st: jax.Array  # int32 response tokens, pad after the end
    logprobs_st: jax.Array  # float32
    lengths_s: jax.Array  # int32
    finished_s: jax.Array  # bool
    truncated_s: jax.Array  # bool
    complete_s: jax.Array  # bool
    logp_zc_s: jax.Array  # float32
    suffix: SuffixCache
    busy_steps: jax.Array  # int32 scalar: row-steps that fed a live row (token or z_c read)
    token_steps: jax.Array  # int32 scalar: row-steps that drew a response token
    slot_steps: jax.Array  # int32 scalar: slots x steps run
    steps: jax.Array  # int32 scalar: decode steps run


def _empty_slots(cfg: TransformerConfig, slots: int, s: SamplingSettings, bounds) -> SlotState:
    t = s.max_new_tokens

    def z():  # a new buffer per field: the state is donated
        return jnp.zeros((slots,), jnp.int32)

    def f():
        return jnp.zeros((slots,), bool)

    return SlotState(
        occupied_s=f(),
        row_s=z(),
        pool_s=z(),
        pos_s=z(),
        last_s=jnp.full((slots,), s.pad_id, jnp.int32),
        tokens_st=jnp.full((slots, t), s.pad_id, jnp.int32),
        logprobs_st=jnp.zeros((slots, t), jnp.float32),
        lengths_s=z(),
        finished_s=f(),
        truncated_s=f(),
        complete_s=jnp.ones((slots,), bool),
        logp_zc_s=jnp.zeros((slots,), jnp.float32),
        suffix=SuffixCache.zeros(cfg, slots, 1, t, bounds),
        busy_steps=jnp.zeros((), jnp.int32),
        token_steps=jnp.zeros((), jnp.int32),
        slot_steps=jnp.zeros((), jnp.int32),
        steps=jnp.zeros((), jnp.int32),
    )


def _shardings(mesh: Mesh, tree: Pool | SlotState) -> Pool | SlotState:
    """The shardings of a `Pool` or `SlotState` on `mesh`, as a tree of its shape.

    Slots: slot-major buffers over the batch axes, suffix caches as the static sampler's
    (`_cache`), the step counters replicated. Pool: the prompt caches entry-major over the batch
    axes (each batch shard holds the block of entries its slots read) and kv heads over tensor
    like the static prefix cache; the small per-entry arrays replicated."""
    replicated = sharding.replicated(mesh)
    if isinstance(tree, Pool):
        prefix = tree.prefix
        return Pool(
            prefix=PrefixCache(
                tuple(_cache(mesh, x) for x in prefix.k),
                tuple(_cache(mesh, x) for x in prefix.v),
                sharding.batch_sharding(mesh, 2),
            ),
            tok0_ek=replicated,
            lp0_ek=replicated,
            prompt_len_e=replicated,
        )
    fields = {}
    for f in dataclasses.fields(tree):
        x = getattr(tree, f.name)
        if f.name == "suffix":
            fields[f.name] = jax.tree.map(lambda a: _cache(mesh, a), x)
        else:
            fields[f.name] = replicated if x.ndim == 0 else sharding.batch_sharding(mesh, x.ndim)
    return SlotState(**fields)


def _pinner(mesh: Mesh | None):
    """`pin(tree)` constrains a `Pool` or `SlotState` to `_shardings` inside a jit (the identity
    without a mesh)."""
    if mesh is None:
        return lambda tree: tree
    return lambda tree: jax.lax.with_sharding_constraint(tree, _shardings(mesh, tree))


def _prefill_into_pool(
    model: Transformer,
    pool: Pool,
    tokens_bp: jax.Array,
    mask_bp: jax.Array,
    entry_b: jax.Array,
    prompt_b: jax.Array,
    seed_key: jax.Array,
    s: SamplingSettings,
    constrain=None,
) -> Pool:
    """Prefill B prompts into pool entries `entry_b` (an out-of-range entry is batch padding,
    dropped) and draw each prompt's K first tokens, for rows prompt * K + j. `constrain` pins
    the prefill's residual stream batch-sharded (`sampler._constrainer`), as the static
    sampler's prefill does."""
    positions_bp = prompt_positions(mask_bp)
    logits_bv, prefix = model.prefill(tokens_bp, positions_bp, mask_bp, constrain=constrain)
    b = tokens_bp.shape[0]
    rows_bk = prompt_b[:, None] * s.k + jnp.arange(s.k, dtype=jnp.int32)
    logits_bkv = jnp.broadcast_to(logits_bv[:, None], (b, s.k, logits_bv.shape[-1]))
    tok_bk, lp_bk, _ = _draw(logits_bkv, seed_key, rows_bk, jnp.zeros_like(rows_bk), s)

    def put(old, new):
        return old.at[entry_b].set(new.astype(old.dtype), mode="drop")

    return Pool(
        prefix=jax.tree.map(put, pool.prefix, prefix),
        tok0_ek=put(pool.tok0_ek, tok_bk),
        lp0_ek=put(pool.lp0_ek, lp_bk),
        prompt_len_e=put(pool.prompt_len_e, mask_bp.sum(-1)),
    )


def _update_slots(
    st: SlotState,
    pool: Pool,
    slot_m: jax.Array,
    row_m: jax.Array,
    entry_m: jax.Array,
    s: SamplingSettings,
) -> SlotState:
    """Free slots `slot_m` (out-of-range entries are padding) and put row `row_m` (>= 0) from
    pool entry `entry_m` in each, or leave it free (row -1). A new row starts as the static
    sampler's row after prefill: its first token, length 1, and a suffix cache of masked keys."""
    t = s.max_new_tokens
    j_m = jnp.maximum(row_m, 0) % s.k
    new_m = row_m >= 0
    tok0 = pool.tok0_ek[entry_m, j_m]
    lp0 = pool.lp0_ek[entry_m, j_m]
    eos = _is_eos(tok0, s.eos_ids)
    truncated = new_m & ~eos & (t == 1)

    def put(old, new):
        return old.at[slot_m].set(jnp.asarray(new).astype(old.dtype), mode="drop")

    m = slot_m.shape[0]
    fresh = st.suffix.fresh_rows(m)
    return SlotState(
        occupied_s=put(st.occupied_s, new_m),
        row_s=put(st.row_s, jnp.maximum(row_m, 0)),
        pool_s=put(st.pool_s, entry_m),
        pos_s=put(st.pos_s, jnp.zeros((m,), jnp.int32)),
        last_s=put(st.last_s, tok0),
        tokens_st=put(st.tokens_st, jnp.full((m, t), s.pad_id, jnp.int32).at[:, 0].set(tok0)),
        logprobs_st=put(st.logprobs_st, jnp.zeros((m, t), jnp.float32).at[:, 0].set(lp0)),
        lengths_s=put(st.lengths_s, new_m.astype(jnp.int32)),
        finished_s=put(st.finished_s, new_m & eos),
        truncated_s=put(st.truncated_s, truncated),
        complete_s=put(st.complete_s, ~new_m | truncated),
        logp_zc_s=put(st.logp_zc_s, jnp.zeros((m,), jnp.float32)),
        suffix=jax.tree.map(put, st.suffix, fresh),
        busy_steps=st.busy_steps,
        token_steps=st.token_steps,
        slot_steps=st.slot_steps,
        steps=st.steps,
    )


def _slot_step(
    model: Transformer,
    prefix: PrefixCache,
    prompt_len_s: jax.Array,
    st: SlotState,
    seed_key: jax.Array,
    s: SamplingSettings,
    window: int,
    write_after_read: bool = False,
) -> SlotState:
    """`sampler._decode_step` with every slot at its own response index; `prefix` holds each
    slot's prompt cache (`PrefixCache.rows` of the pool) and `prompt_len_s` its length;
    `write_after_read`: `Transformer.decode`'s."""
    t = s.max_new_tokens
    n = st.pos_s.shape[0]
    live = st.occupied_s & ~st.complete_s
    logits, suffix, h = model.decode(
        st.last_s[:, None],
        (prompt_len_s + st.pos_s)[:, None],
        prefix,
        st.suffix,
        st.pos_s[:, None],
        window=window,
        return_hidden=True,
        row_shards=s.batch_shards,
        write_after_read=write_after_read,
    )
    pending = st.finished_s & live
    nxt = st.pos_s + 1
    zc_logit = model.token_logit(h, s.self_reward_token_id)
    tok, lp, zc = _draw(logits, seed_key, st.row_s[:, None], nxt[:, None], s, zc_logit)
    tok, lp, zc = tok[:, 0], lp[:, 0], zc[:, 0]
    complete = st.complete_s | pending
    active = ~complete
    index = jnp.minimum(nxt, t - 1)
    eos_now = active & _is_eos(tok, s.eos_ids)
    truncated_now = active & ~eos_now & (nxt >= t - 1)
    rows = jnp.arange(n)

    def set_at(buf, values):
        return buf.at[rows, index].set(jnp.where(active, values, buf[rows, index]))

    return SlotState(
        occupied_s=st.occupied_s,
        row_s=st.row_s,
        pool_s=st.pool_s,
        pos_s=jnp.where(live, nxt, st.pos_s),
        last_s=jnp.where(active, tok, st.last_s),
        tokens_st=set_at(st.tokens_st, tok),
        logprobs_st=set_at(st.logprobs_st, lp),
        lengths_s=st.lengths_s + active.astype(jnp.int32),
        finished_s=st.finished_s | eos_now,
        truncated_s=st.truncated_s | truncated_now,
        complete_s=complete | truncated_now,
        logp_zc_s=jnp.where(pending, zc, st.logp_zc_s),
        suffix=suffix,
        busy_steps=st.busy_steps + live.sum(dtype=jnp.int32),
        token_steps=st.token_steps + active.sum(dtype=jnp.int32),
        slot_steps=st.slot_steps + n,
        steps=st.steps + 1,
    )


def _slot_loop(
    model: Transformer,
    pool: Pool,
    st: SlotState,
    seed_key: jax.Array,
    stop_free: jax.Array,
    min_live: jax.Array,
    s: SamplingSettings,
    window: int,
    pin=lambda st: st,
    shards: int = 1,
    write_after_read: bool = False,
) -> SlotState:
    """Steps while some row is live and every live row's next position fits the window; stop
    early when `stop_free` (> 0) slots have freed or the live rows drop to `min_live`. `pin`
    keeps each step's state on the mesh's shardings (`_pinner`); `shards` is the number of
    blocks the slots and the pool are split into (slot block d reads pool block d);
    `write_after_read`: `Transformer.decode`'s (`writes_after_reading`).

    No slot changes prompt inside the loop, so each slot's prompt cache is taken out of the pool
    once per call, not every step: gathered every step, XLA's TPU slot loop read 2.25 GB a step
    at the 0.5B shape with 64 slots, 1.87 GB taken once, 1.65 GB writing after reading
    (compile only, bench/README)."""
    prefix = pool.prefix.rows(st.pool_s, shards)
    prompt_len_s = pool.prompt_len_e[st.pool_s]

    def cond(st: SlotState) -> jax.Array:
        live = st.occupied_s & ~st.complete_s
        freed = st.occupied_s & st.complete_s
        fits = jnp.all(jnp.where(live, st.pos_s < window, True))
        refill = (stop_free > 0) & (freed.sum() >= stop_free)
        return jnp.any(live) & fits & ~refill & (live.sum() > min_live)

    def step(st: SlotState) -> SlotState:
        return pin(
            _slot_step(model, prefix, prompt_len_s, st, seed_key, s, window, write_after_read)
        )

    return jax.lax.while_loop(cond, step, st)


def _status(st: SlotState) -> dict[str, jax.Array]:
    """What the host needs after a loop call, in one transfer: which slots hold a completed row,
    and the furthest response index a live row will feed (the next window must pass it)."""
    live = st.occupied_s & ~st.complete_s
    return {
        "done": st.occupied_s & st.complete_s,
        "max_pos": jnp.max(jnp.where(live, st.pos_s, 0)),
    }


def _collect(st: SlotState, slot_m: jax.Array) -> dict[str, jax.Array]:
    """The outputs of slots `slot_m` (padded to the slot count with repeats), one gather."""
    return {
        "tokens": st.tokens_st[slot_m],
        "lp": st.logprobs_st[slot_m],
        "lengths": st.lengths_s[slot_m],
        "finished": st.finished_s[slot_m],
        "truncated": st.truncated_s[slot_m],
        "logp_zc": st.logp_zc_s[slot_m],
    }


def _gather_slots(st: SlotState, keep_m: jax.Array) -> SlotState:
    """The slots `keep_m`, in that order: a narrower batch for the drain."""
    counters = ("busy_steps", "token_steps", "slot_steps", "steps")
    fields = {
        f.name: (
            getattr(st, f.name)
            if f.name in counters
            else jax.tree.map(lambda x: x[keep_m], getattr(st, f.name))
        )
        for f in dataclasses.fields(st)
    }
    return SlotState(**fields)


def _regroup(
    st: SlotState, pool: Pool, keep_m: jax.Array, source_e: jax.Array, pool_s: jax.Array
) -> tuple[SlotState, Pool]:
    """The drain on a mesh: the slots `keep_m` (`_gather_slots`), and the pool laid out anew so
    every block of slots finds its rows' prompts in its own block: new entry e holds old entry
    `source_e[e]`, new slot i reads entry `pool_s[i]`."""
    return (
        _gather_slots(st, keep_m).replace(pool_s=pool_s),
        jax.tree.map(lambda x: x[source_e], pool),
    )


@dataclasses.dataclass(frozen=True)
class SlotStats:
    """Row-step accounting of one continuous rollout."""

    slot_steps: int  # sum over decode steps of the slots the step ran
    busy_steps: int  # of those, row-steps that fed a live row (a token draw or the z_c read)
    token_steps: int  # of those, row-steps that drew a response token
    decode_steps: int
    prefill_calls: int
    prefill_prompts: int  # prompts prefilled (each once)
    loop_calls: int  # decode-loop calls: each a return to the host (refill, drain, new window)

    @property
    def utilisation(self) -> float:
        """Share of slot-steps doing a row's work (what a static batch wastes on done rows)."""
        return self.busy_steps / max(self.slot_steps, 1)

    @property
    def token_share(self) -> float:
        """Share of slot-steps that produced a response token."""
        return self.token_steps / max(self.slot_steps, 1)


def default_windows(t: int, platform: str = "cpu") -> tuple[int, ...]:
    """The slot loop's attention windows: doubling from max_new_tokens / 8 up to `t`; on a GPU
    one window, `t`. At its widest window the slot loop reads every segment: compiled for an
    H200 with one segment it launched 509 kernels a step against 893 with four (a scatter per
    segment and four attention kernels per cache part, each layer) and read 5% fewer bytes
    (0.5B shape, 64 slots, 512 new tokens; compile only, bench/README). On the CPU and a TPU
    the narrower windows stay: there the bytes decide, and early in a rollout, when every slot
    is short, they spare reading the whole window."""
    if platform == "gpu":
        return (t,)
    w, ws = max(WINDOW_ALIGN, -(-t // 8)), []
    while w < t:
        ws.append(w)
        w *= 2
    return (*ws, t)


def empty_buffers(
    cfg: TransformerConfig,
    slots: int,
    per: int,
    prompt_len: int,
    s: SamplingSettings,
    windows: Sequence[int],
) -> tuple[Pool, SlotState]:
    """An empty prompt pool (one block of entries per batch shard of `per`, each one entry per
    slot of the shard plus one) and `slots` free slots whose suffix caches end at `windows`."""
    entries = (slots // per + 1) * per
    shape = (entries, cfg.num_kv_heads, prompt_len, cfg.cache_width)
    pool = Pool(
        prefix=PrefixCache(
            tuple(jnp.zeros(shape, cfg.dtype) for _ in range(cfg.num_layers)),
            tuple(jnp.zeros(shape, cfg.dtype) for _ in range(cfg.num_layers)),
            jnp.zeros((entries, prompt_len), bool),
        ),
        tok0_ek=jnp.zeros((entries, s.k), jnp.int32),
        lp0_ek=jnp.zeros((entries, s.k), jnp.float32),
        prompt_len_e=jnp.zeros((entries,), jnp.int32),
    )
    return pool, _empty_slots(cfg, slots, s, tuple(windows))


def writes_after_reading(platform: str) -> bool:
    """Whether the slot loop on `platform` (`platform_of` its mesh) writes each step's keys and
    values after attention has read the caches (`Transformer.decode`'s `write_after_read`): on
    a TPU only (the slot loop at the 0.5B shape, 64 slots, compile only: 1.65 GB a step against
    1.87). XLA:CPU copies every segment to do so (4.1 GB a step without, 7.4 with), and XLA's GPU
    compiler spends a kernel per layer on the extra part for 3% fewer bytes (bench/README)."""
    return platform == "tpu"


def programs(
    graphdef: nnx.GraphDef, mesh: Mesh | None, write_after_read: bool | None = None
) -> tuple[Callable[..., Pool], Callable[..., SlotState]]:
    """The two programs that hold a rollout's memory, jitted: `prefill(params, pool, tokens_bp,
    mask_bp, entry_b, prompt_b, seed_key, s=)` (prompts into pool entries; the pool donated) and
    `loop(params, pool, st, seed_key, stop_free, min_live, s=, window=)` (`_slot_loop`; the
    slots donated). `ContinuousSampler` runs them; `plan --compile` compiles them from shapes.
    `write_after_read`: default `writes_after_reading` on the mesh's platform."""
    pin, gather_head, residual = _pinner(mesh), _head_gatherer(mesh), _constrainer(mesh)
    per, platform = sharding.batch_shards(mesh), platform_of(mesh)
    after = writes_after_reading(platform) if write_after_read is None else write_after_read

    def model(params):
        return nnx.merge(graphdef, params)

    prefill = jax.jit(
        lambda params, pool, *a, s: pin(
            _prefill_into_pool(model(params), pool, *a, s, constrain=residual)
        ),
        static_argnames=("s",),
        donate_argnums=(1,),
    )
    loop = jax.jit(
        lambda params, pool, st, *a, s, window: _slot_loop(
            model(gather_head(params)), pool, st, *a, s, window, pin, per, after
        ),
        static_argnames=("s", "window"),
        donate_argnums=(2,),
        compiler_options=decode_compiler_options(platform),
    )
    return prefill, loop


class ContinuousSampler:
    """K samples per prompt through `slots` decode slots; the static `Sampler`'s outputs.

    Built on a `Sampler` (its parameters, prompt buckets and settings checks); `update_params`
    there is seen here. `windows` are the attention windows (suffix segment ends) the slot loop
    compiles for: by default doubling from max_new_tokens / 8, since slots at many different
    positions keep the window near the longest live row; one window on a GPU
    (`default_windows`). While samples are queued, the loop
    returns to the host to refill once `refill` slots have freed (default 1: every freed slot is
    refilled at the next step). A larger `refill` makes fewer returns to the host (each a few
    dispatches and transfers) at the cost of idle slots: at 32 slots on the CPU, `refill=4`
    made 64 returns instead of 210 and kept 93-94% of slot-steps busy instead of 96-98%, at a
    speed the machine's noise could not tell apart (`bench/tunix_lengths.py --refill 1 4`);
    where steps are short next to a host round trip (a GPU), it is the setting to measure.
    `write_after_read` (default: by platform, `writes_after_reading`) only moves where each
    step's keys and values are written; the rows drawn are the same.
    """

    def __init__(
        self,
        sampler: Sampler,
        slots: int,
        windows: Sequence[int] = (),
        refill: int = 1,
        write_after_read: bool | None = None,
    ):
        mesh, per = sampler.mesh, sampler.batch_multiple
        _require(slots >= 1, "slots", f"must be >= 1, got {slots}")
        _require(
            slots % per == 0,
            "slots",
            f"{slots} must be a multiple of the mesh's batch axes (data x fsdp = {per})",
        )
        _require(1 <= refill <= slots, "refill", f"must be in [1, slots = {slots}], got {refill}")
        self.refill = int(refill)
        t = sampler.max_new_tokens
        ws = tuple(int(w) for w in windows) or default_windows(t, platform_of(mesh))
        _require(
            list(ws) == sorted(set(ws)) and ws[0] > 0 and ws[-1] == t,
            "windows",
            f"{ws} must increase strictly from > 0 to max_new_tokens = {t}",
        )
        self.sampler, self.slots, self.windows = sampler, int(slots), ws
        self.mesh, self.per = mesh, per
        self.prefill_batch = -(-PREFILL_BATCH // per) * per
        self._prefill, self._loop = programs(sampler.graphdef, mesh, write_after_read)
        pin = _pinner(mesh)
        self._update = jax.jit(
            lambda st, pool, *a, s: pin(_update_slots(st, pool, *a, s)),
            static_argnames=("s",),
            donate_argnums=(0,),
        )
        self._gather = jax.jit(lambda st, keep_m: pin(_gather_slots(st, keep_m)))
        self._regroup = jax.jit(
            lambda st, pool, *a: tuple(pin(x) for x in _regroup(st, pool, *a)),
            donate_argnums=(0, 1),
        )
        # What the host reads comes back replicated: on several processes every process then
        # holds all of it and makes the same decisions, in step (SPMD).
        out = {} if mesh is None else dict(out_shardings=sharding.replicated(mesh))
        self._status = jax.jit(_status, **out)
        self._collect = jax.jit(_collect, **out)
        self._makers: dict = {}

    def buffers(self, prompt_len: int, s: SamplingSettings) -> tuple[Pool, SlotState]:
        """An empty prompt pool and free slots for a rollout with prompts padded to
        `prompt_len`, made on the mesh (`_shardings`). The pool holds one block of entries per
        batch shard, each one entry per slot of the shard plus one (`sample`)."""
        cfg, slots, per, windows = self.sampler.cfg, self.slots, self.per, self.windows

        def make() -> tuple[Pool, SlotState]:
            return empty_buffers(cfg, slots, per, prompt_len, s, windows)

        key = (prompt_len, s)
        if key not in self._makers:  # one compile per shape, not one per rollout
            out = None
            if self.mesh is not None:
                out = tuple(_shardings(self.mesh, x) for x in jax.eval_shape(make))
            self._makers[key] = jax.jit(make, out_shardings=out)
        return self._makers[key]()

    def _batch_major(self, *xs: np.ndarray) -> list[jax.Array]:
        """Host arrays of a prefill batch on the device(s): over the mesh's batch axes."""
        if self.mesh is None:
            return [jnp.asarray(x) for x in xs]
        return [jax.device_put(x, sharding.batch_sharding(self.mesh, x.ndim)) for x in xs]

    def _replicated(self, *xs) -> list[jax.Array]:
        """Small host values every call takes (slot indices, counts, the seed's key data) on
        every device of the mesh: the same global value on each process."""
        if self.mesh is None:
            return [jnp.asarray(x) for x in xs]
        return [jax.device_put(np.asarray(x), sharding.replicated(self.mesh)) for x in xs]

    def _can_halve(self, width: int) -> bool:
        """Whether the drain may run `width` slots as width / 2: still split evenly over the
        mesh's batch axes (at least one slot per device)."""
        return width // 2 >= self.per and (width // 2) % self.per == 0

    def sample(
        self,
        prompt_ids: Sequence[Sequence[int]],
        *,
        k: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
    ) -> tuple[RolloutBatch, SlotStats]:
        """The static `Sampler.sample` rollout (same rows, same draws), run through the slots."""
        smp = self.sampler
        s = smp.settings(k=k, temperature=temperature, top_p=top_p, top_k=top_k)
        tokens, mask, _ = smp.pad_prompts(prompt_ids)
        n, p = len(prompt_ids), tokens.shape[1]
        t, rows = s.max_new_tokens, len(prompt_ids) * k
        (seed_data,) = self._replicated(jax.random.key_data(jax.random.key(seed % 2**32)))
        seed_key = jax.random.wrap_key_data(seed_data)
        pool, st = self.buffers(p, s)
        entries, width = pool.prompt_len_e.shape[0], self.slots

        out_tokens = np.full((rows, t), s.pad_id, np.int32)
        out_lp = np.zeros((rows, t), np.float32)
        out = {
            f: np.zeros(rows, d)
            for f, d in (
                ("lengths", np.int32),
                ("finished", bool),
                ("truncated", bool),
                ("logp_zc", np.float32),
            )
        }
        # The slots are `shards` equal blocks (one per batch shard of the mesh), block d reading
        # its prompts from pool block d: a prompt gets an entry in the block of the slot its
        # first sample goes to, and its K samples go to slots of that block. Each block has one
        # entry per slot plus one, so it can always open its next prompt: every prompt in it
        # holds a live slot, but the one whose samples are being inserted.
        shards, per_block = self.per, entries // self.per
        free_entries = [list(range(d * per_block, (d + 1) * per_block)) for d in range(shards)]
        opening: list[list[int] | None] = [None] * shards  # per block: [prompt, next sample]
        next_prompt = inserted = 0
        entry_of: dict[int, int] = {}  # prompt -> pool entry
        left: dict[int, int] = {}  # prompt -> samples not yet collected
        slot_row = [-1] * width  # host copy of which row each slot runs
        slot_entry = [0] * width  # and which pool entry it reads
        prefill_calls = loop_calls = 0

        while True:
            host = jax.device_get(self._status(st))
            done = [i for i in range(width) if host["done"][i]]
            if done:
                got = jax.device_get(
                    self._collect(st, *self._replicated(np.resize(np.array(done, np.int32), width)))
                )
                for i, slot in enumerate(done):
                    r = slot_row[slot]
                    out_tokens[r], out_lp[r] = got["tokens"][i], got["lp"][i]
                    for f in out:
                        out[f][r] = got[f][i]
                    slot_row[slot] = -1
                    b = r // k
                    left[b] -= 1
                    if left[b] == 0:
                        e = entry_of.pop(b)
                        free_entries[e // per_block].append(e)
            block = width // shards
            fills, new_prompts = [], []  # fills: (slot, prompt, sample)
            for slot in (i for i in range(width) if slot_row[i] < 0):
                d = slot // block
                if opening[d] is None:
                    if next_prompt == n or not free_entries[d]:
                        continue
                    b, next_prompt = next_prompt, next_prompt + 1
                    entry_of[b], left[b] = free_entries[d].pop(), k
                    new_prompts.append(b)
                    opening[d] = [b, 0]
                b, j = opening[d]
                fills.append((slot, b, j))
                opening[d] = None if j + 1 == k else [b, j + 1]
            inserted += len(fills)
            for c in range(0, len(new_prompts), self.prefill_batch):
                batch = new_prompts[c : c + self.prefill_batch]
                pad = self.prefill_batch - len(batch)
                idx = np.array(batch + [0] * pad)
                ent = np.array([entry_of[b] for b in batch] + [entries] * pad, np.int32)
                pool = self._prefill(
                    smp.params,
                    pool,
                    *self._batch_major(tokens[idx], mask[idx], ent, idx.astype(np.int32)),
                    seed_key,
                    s=s,
                )
                prefill_calls += 1
            if done or fills:
                slot_m = np.full(width, width, np.int32)
                row_m = np.full(width, -1, np.int32)
                entry_m = np.zeros(width, np.int32)
                changed = sorted(set(done) | {slot for slot, _, _ in fills})
                for i, slot in enumerate(changed):
                    slot_m[i] = slot
                for slot, b, j in fills:
                    pos = changed.index(slot)
                    row_m[pos], entry_m[pos] = b * k + j, entry_of[b]
                    slot_row[slot], slot_entry[slot] = b * k + j, entry_of[b]
                st = self._update(st, pool, *self._replicated(slot_m, row_m, entry_m), s=s)
            if all(r < 0 for r in slot_row):
                break
            queued = inserted < rows
            while not queued and self._can_halve(width):
                live = [i for i in range(width) if slot_row[i] >= 0]
                if len(live) > width // 2:
                    break
                keep = live + [i for i in range(width) if slot_row[i] < 0][: width // 2 - len(live)]
                width //= 2
                if shards == 1:
                    st = self._gather(st, *self._replicated(np.array(keep, np.int32)))
                    slot_row = [slot_row[i] for i in keep]
                    slot_entry = [slot_entry[i] for i in keep]
                    continue
                # Rows move between blocks: each new block gets its rows' prompts copied into
                # its own block of the pool (no prompt is queued any more).
                source = np.arange(entries, dtype=np.int32)
                new_entry = []
                for d in range(shards):
                    at: dict[int, int] = {}
                    for old in keep[d * (width // shards) : (d + 1) * (width // shards)]:
                        if slot_row[old] < 0:
                            new_entry.append(d * per_block)
                            continue
                        e = at.setdefault(slot_entry[old], d * per_block + len(at))
                        source[e] = slot_entry[old]
                        new_entry.append(e)
                st, pool = self._regroup(
                    st,
                    pool,
                    *self._replicated(
                        np.array(keep, np.int32), source, np.array(new_entry, np.int32)
                    ),
                )
                slot_row = [slot_row[i] for i in keep]
                slot_entry = new_entry
            # Rows live before this trip keep their positions; rows put in now start at 0.
            window = next(w for w in self.windows if w > int(host["max_pos"]))
            min_live = -1 if queued or not self._can_halve(width) else width // 2
            stop_free = min(self.refill, rows - inserted) if queued else 0
            loop_calls += 1
            st = self._loop(
                smp.params,
                pool,
                st,
                seed_key,
                *self._replicated(np.int32(stop_free), np.int32(min_live)),
                s=s,
                window=window,
            )

        counters = jax.device_get(
            {f: getattr(st, f) for f in ("busy_steps", "token_steps", "slot_steps", "steps")}
        )
        batch = RolloutBatch(
            prompt_tokens=tokens[:n],
            prompt_mask=mask[:n],
            response_tokens=out_tokens,
            response_mask=np.arange(t)[None] < out["lengths"][:, None],
            logprobs=out_lp,
            lengths=out["lengths"],
            finished=out["finished"],
            truncated=out["truncated"],
            logp_zc=out["logp_zc"],
            k=k,
            logprob_temperature=s.logprob_temperature,
            decode_steps=int(counters["steps"]),
        )
        stats = SlotStats(
            slot_steps=int(counters["slot_steps"]),
            busy_steps=int(counters["busy_steps"]),
            token_steps=int(counters["token_steps"]),
            decode_steps=int(counters["steps"]),
            prefill_calls=prefill_calls,
            prefill_prompts=len(left),
            loop_calls=loop_calls,
        )
        return batch, stats
