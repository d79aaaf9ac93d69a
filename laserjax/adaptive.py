"""Adaptive test-time sampling: when to stop drawing samples for a problem (LASER_SPEC section 5).

Self-consistency draws a fixed k samples per problem and votes. An adaptive rule looks at the
samples drawn so far and decides whether the vote is settled; easy problems stop after a few
samples and the budget goes to the hard ones. LaSeR gives each finished sample a self-reward r_s
for one extra token, so a rule can also ask *how much the policy trusts* each answer, not only how
often it appeared.

A problem's samples so far are three parallel sequences: `answers` (the extracted answer of each
sample, None when it has none), `scores` (its r_s, NaN when it has none: a truncated response
gets no z_c step) and `finished` (it ended with EOS). Every rule is a pure function of them:

- `Rule.decide(answers, scores, finished)` -> `Decision(stop, pick)`: stop sampling now?, and
  the index of the sample whose answer the rule would answer with now (None: nobody answered).
- `Rule.stops(stats)` is the same stop decision for every prefix of many sequences at once
  (`PrefixStats`, vectorised with numpy), which the offline replay uses; `decide` is its
  one-sequence case, so the replay and online sampling apply literally the same rule.

A rule only decides *whether* to stop; `Rule.max_samples` caps the budget, and at the cap the
sampler stops regardless. The answer at the stop is the rule's vote over the samples drawn,
computed by `laserjax.eval_metrics.vote` (its grouping by `normalize_answer` and its tie rule).

The rules:

- `FixedK` (self-consistency): stop after k samples; plain or r_s-weighted majority (the
  weighted vote of LASER_SPEC section 5, weights clip(r_s, 0, 1)).
- `BetaStop` (Adaptive-Consistency, Aggarwal et al., EMNLP 2023, their default criterion): with
  v1, v2 the vote counts of the two most frequent answers, p1 ~ Beta(v1 + 1, v2 + 1) is the
  posterior share of the leader among the two under a uniform prior; stop when
  P(p1 > 1/2) >= threshold (0.95 in the paper). As in their code, this is computed after every
  sample and looks only at the top two answers.
- `WindowStop` (Early-Stopping Self-Consistency, Li et al., ICLR 2024): samples come in windows
  of w; after each whole window, stop when all w answers of that window are the same.
- `ScoreBetaStop` (laserjax): Adaptive-Consistency's criterion on r_s-weighted pseudo-counts.
  Sample i adds 1 + lam * (2 * clip(r_s_i, 0, 1) - 1) to its answer's count: a sample the policy
  is sure of counts up to 1 + lam, one it rejects down to 1 - lam, a truncated one 1 - lam. lam =
  0 is `BetaStop` exactly; the vote uses the same pseudo-counts.
- `ScoreAccept` (laserjax, in the spirit of ReASC, Kim et al. 2026): stop at once when some
  sample's r_s >= tau and answer with the highest-scored one; otherwise fall back to a
  count-based or pseudo-count rule (`fallback`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from scipy import special

from laserjax.answers import normalize_answer
from laserjax.eval_metrics import self_reward_weights, vote

# ---------------------------------------------------------------------------------------------
# Statistics of every prefix of a batch of sample sequences.


@dataclasses.dataclass(frozen=True)
class PrefixStats:
    """Everything a rule may read about the first t samples of B sequences, for t = 1..T.

    Answer ids are per sequence (0..A-1 by first appearance of each `normalize_answer` key; -1:
    no answer). Index t - 1 on the T axis is the prefix of t samples.
    """

    ids_bt: np.ndarray  # [B, T] int, -1 = no answer
    scores_bt: np.ndarray  # [B, T] float r_s, NaN = none
    finished_bt: np.ndarray  # [B, T] bool
    count_bta: np.ndarray  # [B, T, A] votes per answer among the first t samples
    weight_bta: np.ndarray  # [B, T, A] sum of clip(r_s, 0, 1) per answer among the first t

    @property
    def num_samples(self) -> int:
        return self.ids_bt.shape[1]

    @classmethod
    def from_ids(
        cls, ids_bt: np.ndarray, scores_bt: np.ndarray, finished_bt: np.ndarray
    ) -> PrefixStats:
        ids = np.asarray(ids_bt, np.int64)
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise ValueError(f"ids_bt must be [sequences, samples >= 1], got shape {ids.shape}")
        scores = np.asarray(scores_bt, np.float64)
        finished = np.asarray(finished_bt, bool)
        if scores.shape != ids.shape or finished.shape != ids.shape:
            raise ValueError(
                f"scores {scores.shape} and finished {finished.shape} must match answers "
                f"{ids.shape}: one value per sample"
            )
        num_answers = max(int(ids.max()) + 1, 1)
        onehot = (ids[..., None] == np.arange(num_answers)).astype(np.float64)
        count = np.cumsum(onehot, axis=1)
        weight = np.cumsum(onehot * self_reward_weights(scores)[..., None], axis=1)
        return cls(ids, scores, finished, count, weight)

    @classmethod
    def from_samples(
        cls,
        answers: Sequence[str | None],
        scores: Sequence[float] | np.ndarray,
        finished: Sequence[bool] | np.ndarray,
    ) -> PrefixStats:
        """The stats of one sequence (B = 1)."""
        ids = answer_ids(answers)
        if len(scores) != len(ids) or len(finished) != len(ids):
            raise ValueError(
                f"{len(ids)} answers but {len(scores)} scores and {len(finished)} finished "
                "flags; pass one of each per sample"
            )
        return cls.from_ids(ids[None], np.asarray(scores, np.float64)[None], [finished])


def answer_ids(answers: Sequence[str | None]) -> np.ndarray:
    """Ids 0, 1, ... by first appearance of each `normalize_answer` key (what `vote` groups
    by); -1 for a sample without an answer."""
    index: dict[str, int] = {}
    out = np.full(len(answers), -1, np.int64)
    for i, a in enumerate(answers):
        if a is not None:
            out[i] = index.setdefault(normalize_answer(a), len(index))
    return out


def _top_two(values_bta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The largest and second-largest value over the answer axis (0 when absent)."""
    if values_bta.shape[-1] == 1:
        return values_bta[..., 0], np.zeros(values_bta.shape[:-1])
    part = -np.partition(-values_bta, 1, axis=-1)
    return part[..., 0], part[..., 1]


def beta_confidence(lead: np.ndarray | float, runner_up: np.ndarray | float) -> np.ndarray:
    """P(p > 1/2) for p ~ Beta(lead + 1, runner_up + 1): Adaptive-Consistency's stopping
    statistic (their code integrates x^a (1 - x)^b over [1/2, 1] and divides by [0, 1]).

    For whole counts it equals P(Binomial(lead + runner_up + 1, 1/2) <= lead)."""
    a = np.asarray(lead, np.float64) + 1.0
    b = np.asarray(runner_up, np.float64) + 1.0
    return special.betainc(b, a, 0.5)  # I_{1/2}(b, a) = 1 - I_{1/2}(a, b) = P(p > 1/2)


# ---------------------------------------------------------------------------------------------
# The rules.


@dataclasses.dataclass(frozen=True)
class Decision:
    stop: bool
    pick: int | None
    """Index of the sample whose answer the rule answers with now; None: no sample answered."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """A stopping rule. Subclasses implement `stops` (and `pick` when they do not vote by plain
    counts); `max_samples` caps the budget (None: the pool's or the sampler's size)."""

    max_samples: int | None = None

    @property
    def name(self) -> str:
        raise NotImplementedError

    def stops(self, stats: PrefixStats) -> np.ndarray:
        """[B, T] bool: whether the rule stops after the first t samples (t = index + 1).

        Causal: entry t - 1 depends on the first t samples only. The budget cap is not part of
        it (see `stop_points`)."""
        raise NotImplementedError

    def pick(
        self,
        answers: Sequence[str | None],
        scores: Sequence[float] | np.ndarray,
        finished: Sequence[bool] | np.ndarray,
    ) -> int | None:
        """The sample whose answer is the rule's answer given these samples: plain majority."""
        return vote(answers)

    @property
    def pick_key(self) -> tuple:
        """Rules with equal keys pick alike on the same samples (the replay shares their votes)."""
        return ("majority",)

    def decide(
        self,
        answers: Sequence[str | None],
        scores: Sequence[float] | np.ndarray,
        finished: Sequence[bool] | np.ndarray,
    ) -> Decision:
        """Stop after these samples (the rule fires, or the budget is spent)?, and the answer."""
        stats = PrefixStats.from_samples(answers, scores, finished)
        t = len(answers)
        stop = bool(self.stops(stats)[0, -1]) or (
            self.max_samples is not None and t >= self.max_samples
        )
        return Decision(stop, self.pick(answers, scores, finished))


def _clip_weights(scores: Sequence[float] | np.ndarray) -> np.ndarray:
    return self_reward_weights(np.asarray(scores, np.float64))


@dataclasses.dataclass(frozen=True)
class FixedK(Rule):
    """Self-consistency with k samples: plain majority, or r_s-weighted majority (LASER_SPEC
    section 5) when `weighted`."""

    k: int = 16
    weighted: bool = False

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"FixedK: k must be >= 1, got {self.k}")
        if self.max_samples is None:
            object.__setattr__(self, "max_samples", self.k)

    @property
    def name(self) -> str:
        return f"{'weighted_' if self.weighted else ''}maj@{self.k}"

    def stops(self, stats: PrefixStats) -> np.ndarray:
        t = np.arange(1, stats.num_samples + 1)
        return np.broadcast_to(t >= self.k, stats.ids_bt.shape)

    def pick(
        self,
        answers: Sequence[str | None],
        scores: Sequence[float] | np.ndarray,
        finished: Sequence[bool] | np.ndarray,
    ) -> int | None:
        return vote(answers, _clip_weights(scores) if self.weighted else None)

    @property
    def pick_key(self) -> tuple:
        return ("weighted",) if self.weighted else ("majority",)


@dataclasses.dataclass(frozen=True)
class BetaStop(Rule):
    """Adaptive-Consistency's Beta criterion (Aggarwal et al. 2023): stop when
    P(p1 > 1/2 | v1, v2) >= threshold with p1 ~ Beta(v1 + 1, v2 + 1), v1 >= v2 the counts of
    the two most frequent answers. Samples without an answer do not count."""

    threshold: float = 0.95

    def __post_init__(self) -> None:
        if not 0.5 <= self.threshold < 1.0:
            raise ValueError(f"BetaStop: threshold must be in [0.5, 1), got {self.threshold}")

    @property
    def name(self) -> str:
        return f"ac_beta@{self.threshold:g}"

    def stops(self, stats: PrefixStats) -> np.ndarray:
        v1, v2 = _top_two(stats.count_bta)
        return (v1 > 0) & (beta_confidence(v1, v2) >= self.threshold)


@dataclasses.dataclass(frozen=True)
class WindowStop(Rule):
    """Early-Stopping Self-Consistency (Li et al. 2024): after each whole window of w samples
    (t = w, 2w, ...), stop when all w answers of that window are one answer. A sample without
    an answer breaks agreement. The answer is the majority over all samples drawn."""

    window: int = 5

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"WindowStop: window must be >= 1, got {self.window}")

    @property
    def name(self) -> str:
        return f"esc@w{self.window}"

    def stops(self, stats: PrefixStats) -> np.ndarray:
        ids = stats.ids_bt
        b, n = ids.shape
        out = np.zeros((b, n), bool)
        w = self.window
        for end in range(w, n + 1, w):
            win = ids[:, end - w : end]
            out[:, end - 1] = (win[:, :1] >= 0).ravel() & (win == win[:, :1]).all(axis=1)
        return out


def pseudo_count_weights(scores: np.ndarray | Sequence[float], lam: float) -> np.ndarray:
    """1 + lam * (2 clip(r_s, 0, 1) - 1) per sample, NaN r_s -> 1 - lam (`ScoreBetaStop`)."""
    return 1.0 + lam * (2.0 * _clip_weights(scores) - 1.0)


@dataclasses.dataclass(frozen=True)
class ScoreBetaStop(Rule):
    """Adaptive-Consistency's criterion on r_s-weighted pseudo-counts (laserjax): v1, v2 are the
    two largest sums of `pseudo_count_weights` over the samples of one answer. lam = 0 is
    `BetaStop`; lam in (0, 1] lets trusted samples settle the vote sooner and doubted ones
    later. The answer is the vote weighted by the same pseudo-counts."""

    threshold: float = 0.95
    lam: float = 1.0

    def __post_init__(self) -> None:
        if not 0.5 <= self.threshold < 1.0:
            raise ValueError(f"ScoreBetaStop: threshold must be in [0.5, 1), got {self.threshold}")
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"ScoreBetaStop: lam must be in [0, 1], got {self.lam}")

    @property
    def name(self) -> str:
        return f"rs_beta@{self.threshold:g},lam{self.lam:g}"

    def stops(self, stats: PrefixStats) -> np.ndarray:
        # sum_i (1 + lam (2 w_i - 1)) over an answer = (1 - lam) count + 2 lam weight
        pseudo = (1.0 - self.lam) * stats.count_bta + 2.0 * self.lam * stats.weight_bta
        v1, v2 = _top_two(pseudo)
        return (stats.count_bta.max(axis=-1) > 0) & (beta_confidence(v1, v2) >= self.threshold)

    def pick(
        self,
        answers: Sequence[str | None],
        scores: Sequence[float] | np.ndarray,
        finished: Sequence[bool] | np.ndarray,
    ) -> int | None:
        return vote(answers, pseudo_count_weights(scores, self.lam))

    @property
    def pick_key(self) -> tuple:
        return ("pseudo", self.lam) if self.lam else ("majority",)


@dataclasses.dataclass(frozen=True)
class ScoreAccept(Rule):
    """Accept a confident sample at once (laserjax): stop as soon as a finished sample with an
    answer has r_s >= tau, answering with the highest-scored such sample (the earliest on a
    tie); until then, stop when `fallback` does and answer as it does."""

    tau: float = 0.9
    fallback: Rule = dataclasses.field(default_factory=BetaStop)

    @property
    def name(self) -> str:
        return f"rs_accept@{self.tau:g}+{self.fallback.name}"

    def _confident(self, stats: PrefixStats) -> np.ndarray:
        s = np.where(stats.ids_bt >= 0, stats.scores_bt, np.nan)
        ok = np.isfinite(s) & stats.finished_bt & (np.nan_to_num(s, nan=-np.inf) >= self.tau)
        return np.logical_or.accumulate(ok, axis=1)

    def stops(self, stats: PrefixStats) -> np.ndarray:
        return self._confident(stats) | self.fallback.stops(stats)

    def pick(
        self,
        answers: Sequence[str | None],
        scores: Sequence[float] | np.ndarray,
        finished: Sequence[bool] | np.ndarray,
    ) -> int | None:
        s = np.asarray(scores, np.float64)
        ok = [
            i
            for i, a in enumerate(answers)
            if a is not None and finished[i] and math.isfinite(s[i]) and s[i] >= self.tau
        ]
        if ok:
            return max(ok, key=lambda i: (s[i], -i))
        return self.fallback.pick(answers, scores, finished)

    @property
    def pick_key(self) -> tuple:
        return ("accept", self.tau, self.fallback.pick_key)


# ---------------------------------------------------------------------------------------------
# Where each sequence stops.


def stop_points(rule: Rule, stats: PrefixStats, round_size: int = 1) -> np.ndarray:
    """[B] samples drawn when each sequence stops: the first t at a round boundary (t a multiple
    of `round_size`, or the last sample) where the rule fires, else the budget
    min(rule.max_samples, T)."""
    n = stats.num_samples
    budget = n if rule.max_samples is None else min(rule.max_samples, n)
    t = np.arange(1, n + 1)
    checked = ((t % round_size == 0) | (t == budget)) & (t <= budget)
    fire = rule.stops(stats) & checked
    first = np.where(fire.any(axis=1), fire.argmax(axis=1) + 1, budget)
    return first.astype(np.int64)


def parse_rule(spec: str) -> Rule:
    """A rule from its command-line form: `maj:K`, `wmaj:K`, `ac:THRESHOLD`, `esc:WINDOW`,
    `rsbeta:THRESHOLD[:LAM]`, `rsaccept:TAU[:AC_THRESHOLD]` (fallback `ac` at that threshold,
    default 0.95), each optionally followed by `/MAX` for a budget cap."""
    body, _, cap = spec.partition("/")
    kind, *params = body.split(":")
    try:
        max_samples = int(cap) if cap else None
        values = [float(p) for p in params]
        if kind in ("maj", "wmaj") and len(values) == 1:
            return FixedK(k=int(values[0]), weighted=kind == "wmaj")
        if kind == "ac" and len(values) == 1:
            return BetaStop(max_samples, threshold=values[0])
        if kind == "esc" and len(values) == 1:
            return WindowStop(max_samples, window=int(values[0]))
        if kind == "rsbeta" and len(values) in (1, 2):
            return ScoreBetaStop(max_samples, values[0], *values[1:])
        if kind == "rsaccept" and len(values) in (1, 2):
            fallback = BetaStop(max_samples, threshold=values[1] if len(values) > 1 else 0.95)
            return ScoreAccept(max_samples, tau=values[0], fallback=fallback)
    except ValueError as e:
        raise ValueError(f"stopping rule {spec!r}: {e}") from None
    raise ValueError(
        f"stopping rule {spec!r}: expected maj:K, wmaj:K, ac:THRESHOLD, esc:WINDOW, "
        "rsbeta:THRESHOLD[:LAM] or rsaccept:TAU[:AC_THRESHOLD], optionally with /MAX_SAMPLES"
    )
