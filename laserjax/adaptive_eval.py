"""Stopping rules measured: offline replay on a sample pool, and online adaptive sampling.

**Replay** (`replay`): a pool holds n samples per problem, drawn once. Each rule is replayed on
`num_orders` random orders of every problem's pool, the same orders for every rule, so all rules
see the same samples and differ only in where they stop and what they answer. Per rule: accuracy
(the answer at the stop graded by the pool's verifier verdict of the sample it came from),
samples and response tokens spent per problem, each averaged over problems and orders, with the
spread over orders.

**Online** (`sample_adaptively`): rounds of `round_size` samples for every problem still open;
after each round a problem stops when `Rule.decide` says so (or at the budget). Round j of
problem p is sampled with seed `seed + ROUND_SEED_STRIDE * j + p0`, where p0 is the first problem
of its sampler call; with `batch_prompts = 1` a problem's samples therefore do not depend on which
other problems are still open, and the online run draws exactly the samples of the pool that
`sample_adaptively` draws with a rule that never stops (`FixedK(k = budget)`), in the same order:
the replay of that order with the same `round_size` gives the same stops and answers. With larger
batches the draws differ (a sampler row's randomness depends on its position in the call), and
agreement is statistical.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from laserjax.adaptive import (
    BetaStop,
    FixedK,
    PrefixStats,
    Rule,
    ScoreAccept,
    ScoreBetaStop,
    WindowStop,
    answer_ids,
    stop_points,
)
from laserjax.continuous import ContinuousSampler
from laserjax.evaluate import decode_responses

ROUND_SEED_STRIDE = 1_000_003
"""Seed offset between rounds of `sample_adaptively` (more than any benchmark's problems)."""


@dataclasses.dataclass(frozen=True)
class Pool:
    """n samples per problem of one benchmark (`finished`: ended with EOS, so it has r_s)."""

    answers_pn: list[list[str | None]]
    scores_pn: np.ndarray  # [P, n] r_s, NaN when none
    finished_pn: np.ndarray  # [P, n] bool
    correct_pn: np.ndarray  # [P, n] 0/1
    lengths_pn: np.ndarray  # [P, n] response tokens

    def __post_init__(self) -> None:
        shape = self.correct_pn.shape
        for name in ("scores_pn", "finished_pn", "lengths_pn"):
            if getattr(self, name).shape != shape:
                raise ValueError(f"Pool.{name} has shape {getattr(self, name).shape}, not {shape}")
        if len(self.answers_pn) != shape[0] or any(len(a) != shape[1] for a in self.answers_pn):
            raise ValueError(f"Pool.answers_pn must be {shape[0]} problems x {shape[1]} samples")

    @property
    def num_problems(self) -> int:
        return self.correct_pn.shape[0]

    @property
    def n(self) -> int:
        return self.correct_pn.shape[1]

    @classmethod
    def from_result(cls, res: Any) -> Pool:
        """From an `evaluate.EvalResult` (e.g. `result_from_records` of a samples.jsonl)."""
        return cls(
            [list(a) for a in res.answers_pn],
            np.asarray(res.scores_pn, np.float64),
            ~np.asarray(res.truncated_pn, bool),
            np.asarray(res.correct_pn, np.float64),
            np.asarray(res.lengths_pn, np.int64),
        )


@dataclasses.dataclass(frozen=True)
class ReplayRow:
    rule: str
    family: str
    accuracy: float
    accuracy_sd: float
    """Spread of the accuracy over the replayed orders. Over permutations it understates how much
    one fresh run varies (every order reuses the same n samples); over bootstrap draws
    (`replace=True`) each draw is one simulated fresh run, so this is one run's noise."""
    samples: float
    tokens: float
    no_answer: float  # share of (problem, order) stops with nobody answering


def family(rule: Rule) -> str:
    """The curve a rule belongs to in the table and plot."""
    if isinstance(rule, FixedK):
        return "weighted majority (fixed k)" if rule.weighted else "majority (fixed k)"
    if isinstance(rule, BetaStop):
        return "Adaptive-Consistency (Beta)"
    if isinstance(rule, WindowStop):
        return "ESC (window)"
    if isinstance(rule, ScoreBetaStop):
        return f"r_s pseudo-count Beta (lam {rule.lam:g})"
    if isinstance(rule, ScoreAccept):
        return "r_s accept + Adaptive-Consistency"
    return type(rule).__name__


def default_rules(n: int) -> list[Rule]:
    """The comparison's rules, each family swept over its knob, all capped at the pool size n."""
    ks = [k for k in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32) if k <= n]
    thresholds = (0.6, 0.75, 0.85, 0.9, 0.95, 0.975, 0.99, 0.995)
    rules: list[Rule] = [FixedK(k=k) for k in ks] + [FixedK(k=k, weighted=True) for k in ks]
    rules += [BetaStop(n, threshold=t) for t in thresholds]
    rules += [WindowStop(n, window=w) for w in (2, 3, 4, 5, 6, 8) if w <= n]
    rules += [ScoreBetaStop(n, threshold=t, lam=1.0) for t in thresholds]
    rules += [ScoreBetaStop(n, threshold=t, lam=0.5) for t in thresholds]
    # Accept a sample at r_s >= tau, else Adaptive-Consistency at any of its thresholds: for each
    # threshold the rule stops no later than Adaptive-Consistency alone, so the family's curve
    # can only lie left of AC's in samples; what r_s decides is whether accuracy holds there.
    # Two knobs (5 x 8 settings against AC's 8): the table names the one it picked.
    rules += [
        ScoreAccept(n, tau=tau, fallback=BetaStop(n, threshold=t))
        for tau in (0.6, 0.7, 0.8, 0.9, 0.95)
        for t in thresholds
    ]
    return rules


def replay(
    pool: Pool,
    rules: Sequence[Rule],
    *,
    num_orders: int = 32,
    seed: int | None = 0,
    round_size: int = 1,
    replace: bool = False,
) -> list[ReplayRow]:
    """Every rule on the same `num_orders` random orders of each problem's pool (see
    `orders_for`)."""
    orders = orders_for(pool, num_orders, seed, replace=replace)
    return replay_orders(pool, rules, orders, round_size=round_size)


def orders_for(
    pool: Pool, num_orders: int, seed: int | None, *, replace: bool = False
) -> np.ndarray:
    """[R, P, n] sample indices per problem: random permutations of its pool; with `replace`,
    bootstrap draws (n indices drawn with replacement: fresh samples from the pool's empirical
    distribution, so a rule stopping at s samples is not pushed toward the pool's own vote as
    s nears n); the pool's own order when `seed` is None."""
    if num_orders < 1:
        raise ValueError(f"num_orders must be >= 1, got {num_orders}")
    shape = (num_orders, pool.num_problems, pool.n)
    if seed is None:
        return np.broadcast_to(np.arange(pool.n), shape).copy()
    rng = np.random.default_rng(seed)
    if replace:
        return rng.integers(0, pool.n, size=shape)
    return np.argsort(rng.random(shape), axis=-1)


def replay_orders(
    pool: Pool, rules: Sequence[Rule], orders_rpn: np.ndarray, *, round_size: int = 1
) -> list[ReplayRow]:
    """`replay` on given orders ([R, P, n] permutations of each problem's samples)."""
    ids_pn = np.stack([answer_ids(a) for a in pool.answers_pn])
    num_orders, num = orders_rpn.shape[0], pool.num_problems
    hits = np.zeros((len(rules), num_orders, num))
    samples = np.zeros((len(rules), num_orders))
    tokens = np.zeros((len(rules), num_orders))
    none = np.zeros((len(rules), num_orders))
    rows = np.arange(num)[:, None]
    for r, order in enumerate(orders_rpn):
        stats = PrefixStats.from_ids(
            ids_pn[rows, order], pool.scores_pn[rows, order], pool.finished_pn[rows, order]
        )
        cum_len = np.cumsum(pool.lengths_pn[rows, order], axis=1)
        picked: dict[tuple, int | None] = {}  # rules that vote alike share a prefix's vote
        for i, rule in enumerate(rules):
            stop = stop_points(rule, stats, round_size)
            for p, s in enumerate(stop):
                idx = order[p, :s]
                key = (rule.pick_key, p, int(s))
                if key not in picked:
                    picked[key] = rule.pick(
                        [pool.answers_pn[p][j] for j in idx],
                        pool.scores_pn[p, idx],
                        pool.finished_pn[p, idx],
                    )
                pick = picked[key]
                if pick is None:
                    none[i, r] += 1
                else:
                    hits[i, r, p] = pool.correct_pn[p, idx[pick]]
            samples[i, r] = stop.mean()
            tokens[i, r] = cum_len[rows[:, 0], stop - 1].mean()
    acc = hits.mean(axis=2)
    return [
        ReplayRow(
            rule=rule.name,
            family=family(rule),
            accuracy=float(acc[i].mean()),
            accuracy_sd=float(acc[i].std()),
            samples=float(samples[i].mean()),
            tokens=float(tokens[i].mean()),
            no_answer=float(none[i].mean() / num),
        )
        for i, rule in enumerate(rules)
    ]


# ---------------------------------------------------------------------------------------------
# Matched accuracy and the report.


@dataclasses.dataclass(frozen=True)
class Saving:
    family: str
    rule: str | None  # the cheapest of the family reaching the target; None: none does
    accuracy: float
    samples: float
    tokens: float
    saving: float  # reference samples / rule samples


def matched_savings(
    rows: Sequence[ReplayRow], reference: str = "maj@16", tolerance: float = 0.0
) -> tuple[ReplayRow, list[Saving]]:
    """Per family, its cheapest configuration (fewest samples per problem) whose accuracy is at
    least the reference's minus `tolerance`, and its sample saving against the reference."""
    ref = next((r for r in rows if r.rule == reference), None)
    if ref is None:
        raise ValueError(f"matched_savings: the reference rule {reference!r} was not replayed")
    out = []
    for fam in dict.fromkeys(r.family for r in rows):
        ok = [r for r in rows if r.family == fam and r.accuracy >= ref.accuracy - tolerance]
        if not ok:
            best = max((r for r in rows if r.family == fam), key=lambda r: r.accuracy)
            out.append(Saving(fam, None, best.accuracy, math.nan, math.nan, math.nan))
            continue
        best = min(ok, key=lambda r: (r.samples, -r.accuracy))
        out.append(
            Saving(
                fam, best.rule, best.accuracy, best.samples, best.tokens, ref.samples / best.samples
            )
        )
    return ref, out


def format_replay(
    rows: Sequence[ReplayRow],
    ref: ReplayRow,
    savings: Sequence[Saving],
    title: str,
    ref_boot: ReplayRow | None = None,
) -> str:
    """Markdown: every rule's point, then the matched-accuracy table (with the reference's
    bootstrap replay, `ref_boot`, as the noise of one run when given)."""
    lines = [
        f"### {title}",
        "",
        "| rule | accuracy % | sd over orders | samples / problem | tokens / problem | no answer |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.rule} | {100 * r.accuracy:.2f} | {100 * r.accuracy_sd:.2f} | "
            f"{r.samples:.2f} | {r.tokens:.1f} | {100 * r.no_answer:.1f}% |"
        )
    lines += [
        "",
        f"At the accuracy of {ref.rule} ({100 * ref.accuracy:.2f}%, {ref.samples:.0f} samples, "
        f"{ref.tokens:.1f} tokens per problem): each family's cheapest setting that reaches it",
        "",
        "| family | setting | accuracy | samples / problem | tokens / problem | sample saving |",
        "|---|---|---|---|---|---|",
    ]
    for s in savings:
        if s.rule is None:
            lines.append(
                f"| {s.family} | none reaches it (best {100 * s.accuracy:.2f}) | - | - | - | - |"
            )
        else:
            lines.append(
                f"| {s.family} | {s.rule} | {100 * s.accuracy:.2f} | {s.samples:.2f} | "
                f"{s.tokens:.1f} | {s.saving:.2f}x |"
            )
    if ref_boot is not None:
        lines += [
            "",
            f"Noise: one fresh run of {ref_boot.rule} varies by {100 * ref_boot.accuracy_sd:.2f} "
            f"points (sd over bootstrap draws from the pool; its bootstrap mean is "
            f"{100 * ref_boot.accuracy:.2f}%). Permutations of one pool vary less, and reuse "
            "more of the pool's own vote the more samples a rule takes.",
        ]
    return "\n".join(lines) + "\n"


def plot_replay(
    curves: dict[str, Sequence[ReplayRow]], path: str, reference: str = "maj@16"
) -> None:
    """Accuracy against samples per problem, one panel per pool, one line per family."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit(
            "error: the replay plot needs matplotlib: `pip install matplotlib` "
            "(it is in requirements-test.txt), or pass --no-plot"
        ) from None
    fig, axes = plt.subplots(1, len(curves), figsize=(6.5 * len(curves), 4.8), squeeze=False)
    for ax, (title, rows) in zip(axes[0], curves.items(), strict=True):
        for fam in dict.fromkeys(r.family for r in rows):
            pts = sorted((r.samples, r.accuracy) for r in rows if r.family == fam)
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, [100 * y for y in ys], marker="o", ms=3, label=fam)
        ref = next((r for r in rows if r.rule == reference), None)
        if ref is not None:
            ax.axhline(100 * ref.accuracy, color="grey", ls=":", lw=1)
            ax.annotate(reference, (ref.samples, 100 * ref.accuracy), fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("samples per problem (mean)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Online: sample in rounds, stop each problem by a rule.


@dataclasses.dataclass
class AdaptiveResult:
    """What `sample_adaptively` drew: per problem the samples in draw order, and its answer."""

    answers: list[list[str | None]]
    scores: list[list[float]]
    finished: list[list[bool]]
    correct: list[list[float]]
    lengths: list[list[int]]
    responses: list[list[str]]
    picks: list[int | None]
    wall_s: float
    sampler_calls: int

    @property
    def accuracy(self) -> float:
        return float(
            np.mean(
                [0.0 if k is None else c[k] for k, c in zip(self.picks, self.correct, strict=True)]
            )
        )

    @property
    def samples(self) -> float:
        return float(np.mean([len(a) for a in self.answers]))

    @property
    def tokens(self) -> float:
        return float(np.mean([sum(x) for x in self.lengths]))

    def pool(self) -> Pool:
        """The samples as a pool (every problem must have the same number of samples)."""
        n = {len(a) for a in self.answers}
        if len(n) != 1:
            raise ValueError(f"pool(): problems have different numbers of samples {sorted(n)}")
        return Pool(
            [list(a) for a in self.answers],
            np.asarray(self.scores, np.float64),
            np.asarray(self.finished, bool),
            np.asarray(self.correct, np.float64),
            np.asarray(self.lengths, np.int64),
        )


def sample_adaptively(
    sampler: Any,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    references: Sequence[str],
    rule: Rule,
    *,
    round_size: int,
    max_samples: int,
    reward_fn: Callable[[list[str], list[str]], np.ndarray],
    extract_fn: Callable[[str], str | None],
    scoring: Any,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    batch_prompts: int = 16,
    on_round: Callable[[int, int], None] | None = None,
) -> AdaptiveResult:
    """Sample `round_size` responses per open problem per round until `rule` stops it or it has
    `max_samples` (a multiple of `round_size`); see the module docstring for the seeds.

    `scoring` is an `evaluate.Scoring` (r_s from log p(z_c)); `on_round(round, open)` is told how
    many problems each round samples. `sampler` is a `Sampler` or a `ContinuousSampler` built on
    one: through decode slots a response that ends frees its slot for the next one, so a call no
    longer runs until its longest response ends; the draws are the static sampler's, so the
    result is the same.
    """
    if isinstance(sampler, ContinuousSampler):

        def draw(prompts, **kw):
            return sampler.sample(prompts, **kw)[0]

    else:
        draw = sampler.sample
    if round_size < 1 or max_samples < round_size or max_samples % round_size:
        raise ValueError(
            f"sample_adaptively: max_samples ({max_samples}) must be a positive multiple of "
            f"round_size ({round_size})"
        )
    if len(prompt_ids) != len(references):
        raise ValueError(
            f"sample_adaptively: {len(prompt_ids)} prompts but {len(references)} references"
        )
    num = len(prompt_ids)
    res = AdaptiveResult(*([[] for _ in range(num)] for _ in range(6)), [None] * num, 0.0, 0)
    t0 = time.perf_counter()
    open_ = list(range(num))
    j = 0
    while open_:
        if on_round is not None:
            on_round(j, len(open_))
        for c in range(0, len(open_), batch_prompts):
            chunk = open_[c : c + batch_prompts]
            # Pad the call to a power of two (copies of its last prompt, rows dropped below) so
            # shrinking rounds compile a few shapes, not one per count of open problems. Padding
            # goes after the real rows, so it changes none of their draws.
            width = min(1 << (len(chunk) - 1).bit_length(), max(batch_prompts, len(chunk)))
            padded = chunk + [chunk[-1]] * (width - len(chunk))
            rollout = draw(
                [prompt_ids[p] for p in padded],
                k=round_size,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                seed=seed + ROUND_SEED_STRIDE * j + chunk[0],
            )
            res.sampler_calls += 1
            texts = decode_responses(tokenizer, rollout)[: len(chunk) * round_size]
            refs = [references[chunk[i // round_size]] for i in range(len(texts))]
            correct = np.asarray(reward_fn(texts, refs), np.float64).reshape(-1)
            scores = scoring.score(rollout.logp_zc, rollout.finished)
            for i, text in enumerate(texts):
                p = chunk[i // round_size]
                res.responses[p].append(text)
                res.answers[p].append(extract_fn(text))
                res.scores[p].append(float(scores[i]))
                res.finished[p].append(bool(rollout.finished[i]))
                res.correct[p].append(float(correct[i]))
                res.lengths[p].append(int(rollout.lengths[i]))
        still = []
        for p in open_:
            d = rule.decide(res.answers[p], res.scores[p], res.finished[p])
            res.picks[p] = d.pick
            if not d.stop and len(res.answers[p]) < max_samples:
                still.append(p)
        open_ = still
        j += 1
    res.wall_s = time.perf_counter() - t0
    return res
