"""Evaluation metrics over per-sample arrays grouped by problem (LASER_SPEC section 5).

Inputs are rectangular: `correct_pn` (P problems x n samples, 0/1 verifier rewards), `answers_pn`
(the extracted answer of each sample, None when it has none), `scores_pn` (the self-reward r_s of
each sample, NaN when it has none: a truncated response gets no z_c step). Metrics that use the
first k samples of each problem take `k` (None = all n).

Conventions, each tested:
- Votes group answers by `laserjax.answers.normalize_answer` (presentation-free strings), not by
  math-verify equivalence; a sample without an answer does not vote.
- Voting ties are broken deterministically: the largest vote weight wins (sums within 1e-9
  relative count as equal), then the most votes, then the answer whose first occurrence comes
  first. Plain majority voting is the weighted rule with weight 1 per vote. A problem where
  nobody answered scores 0.
- Self-reward weights are clip(r_s, 0, 1); a NaN score weighs 0 (as the score of a truncated
  response is 0 in LASER_SPEC section 3). When all of a problem's voters weigh 0, the vote
  count decides, i.e. weighted voting falls back to plain majority voting.
- Best-of-n takes the sample with the highest r_s; NaN ranks lowest; ties go to the earliest.
- Self-verification, AUROC and ECE use the samples with a finite score only (`n_unscored`
  counts the rest); pass 0 instead of NaN to count truncated samples as predicted incorrect.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from laserjax import laser
from laserjax.answers import normalize_answer

_TIE_RTOL = 1e-9


def _as_correct(correct_pn: np.ndarray | Sequence, name: str = "correct_pn") -> np.ndarray:
    arr = np.asarray(correct_pn, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise ValueError(
            f"{name} must be (problems, samples) with at least one sample, got shape {arr.shape}"
        )
    if not np.isin(arr, (0.0, 1.0)).all():
        raise ValueError(f"{name} must hold 0/1 verifier rewards")
    return arr


def _as_scores(scores: np.ndarray | Sequence, shape: tuple[int, ...], name: str) -> np.ndarray:
    arr = np.asarray(scores, dtype=np.float64)
    if arr.shape != shape:
        raise ValueError(f"{name} has shape {arr.shape}, expected {shape} (one score per sample)")
    return arr


def _as_answers(
    answers_pn: Sequence[Sequence[str | None]], shape: tuple[int, ...]
) -> list[list[str | None]]:
    rows = [list(r) for r in answers_pn]
    if len(rows) != shape[0] or any(len(r) != shape[1] for r in rows):
        raise ValueError(
            f"answers_pn must be {shape[0]} problems x {shape[1]} samples, like correct_pn"
        )
    return rows


def _check_k(k: int | None, n: int) -> int:
    if k is None:
        return n
    if not 1 <= k <= n:
        raise ValueError(f"k = {k} must be in [1, n = {n}]")
    return k


# ---------------------------------------------------------------------------------------------
# Accuracy.


def avg_at_n(correct_pn: np.ndarray | Sequence) -> float:
    """avg@n: mean correctness over all samples of all problems (the paper's accuracy)."""
    return float(_as_correct(correct_pn).mean())


def pass_at_k(correct_pn: np.ndarray | Sequence, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): mean over problems of 1 - C(n-c, k) / C(n, k)."""
    correct = _as_correct(correct_pn)
    n = correct.shape[1]
    k = _check_k(k, n)
    values = []
    for c in correct.sum(axis=1).astype(int):
        if n - c < k:
            values.append(1.0)
        else:  # the product form of 1 - C(n-c, k)/C(n, k), stable for large n
            values.append(1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1))))
    return float(np.mean(values))


# ---------------------------------------------------------------------------------------------
# Voting and best-of-n.


def vote(answers: Sequence[str | None], weights: Sequence[float] | None = None) -> int | None:
    """Index of the sample whose answer wins the vote (its first occurrence), None if nobody
    answered. Tie rule: larger weight sum, then more votes, then earlier first occurrence."""
    weight_of: dict[str, float] = {}
    count_of: dict[str, int] = {}
    first_of: dict[str, int] = {}
    for i, answer in enumerate(answers):
        if answer is None:
            continue
        key = normalize_answer(answer)
        w = 1.0 if weights is None else float(weights[i])
        weight_of[key] = weight_of.get(key, 0.0) + w
        count_of[key] = count_of.get(key, 0) + 1
        first_of.setdefault(key, i)
    if not first_of:
        return None
    top = max(weight_of.values())
    tied = [key for key, w in weight_of.items() if w >= top - _TIE_RTOL * max(1.0, abs(top))]
    most = max(count_of[key] for key in tied)
    return min(first_of[key] for key in tied if count_of[key] == most)


def self_reward_weights(scores: np.ndarray | Sequence) -> np.ndarray:
    """clip(r_s, 0, 1), NaN -> 0: the vote weight of each sample (LASER_SPEC section 5)."""
    s = np.asarray(scores, dtype=np.float64)
    return np.where(np.isfinite(s), np.clip(s, 0.0, 1.0), 0.0)


def _voted_accuracy(
    answers: list[list[str | None]], correct: np.ndarray, weights_pn: np.ndarray | None, k: int
) -> float:
    hits = []
    for p, row in enumerate(answers):
        winner = vote(row[:k], None if weights_pn is None else weights_pn[p, :k])
        hits.append(0.0 if winner is None else correct[p, winner])
    return float(np.mean(hits))


def maj_at_k(
    answers_pn: Sequence[Sequence[str | None]],
    correct_pn: np.ndarray | Sequence,
    k: int | None = None,
) -> float:
    """maj@k: the fraction of problems whose majority answer over the first k samples is
    correct (a voted answer is as correct as its first sample)."""
    correct = _as_correct(correct_pn)
    answers = _as_answers(answers_pn, correct.shape)
    return _voted_accuracy(answers, correct, None, _check_k(k, correct.shape[1]))


def weighted_maj_at_k(
    answers_pn: Sequence[Sequence[str | None]],
    correct_pn: np.ndarray | Sequence,
    scores_pn: np.ndarray | Sequence,
    k: int | None = None,
) -> float:
    """Self-reward weighted maj@k: argmax_a of the sum of clip(r_s, 0, 1) over the samples
    answering a (LASER_SPEC section 5), over the first k samples."""
    correct = _as_correct(correct_pn)
    answers = _as_answers(answers_pn, correct.shape)
    weights = self_reward_weights(_as_scores(scores_pn, correct.shape, "scores_pn"))
    return _voted_accuracy(answers, correct, weights, _check_k(k, correct.shape[1]))


def best_of_n(
    correct_pn: np.ndarray | Sequence, scores_pn: np.ndarray | Sequence, k: int | None = None
) -> float:
    """Best-of-n by r_s: mean correctness of each problem's highest-scored sample among the
    first k (NaN ranks lowest; ties go to the earliest sample)."""
    correct = _as_correct(correct_pn)
    k = _check_k(k, correct.shape[1])
    scores = _as_scores(scores_pn, correct.shape, "scores_pn")[:, :k]
    best = np.argmax(np.where(np.isnan(scores), -np.inf, scores), axis=1)
    return float(correct[np.arange(correct.shape[0]), best].mean())


# ---------------------------------------------------------------------------------------------
# The score as a verifier.


@dataclasses.dataclass(frozen=True)
class SelfVerification:
    """Accuracy of "r_s > threshold means correct" on each class, and the paper's F1.

    `acc_correct` is NaN when no scored sample is correct, `acc_incorrect` when none is
    incorrect; `f1` (their harmonic mean) is 0.0 then, since one class was never tested.
    """

    acc_correct: float
    acc_incorrect: float
    f1: float
    n_correct: int
    n_incorrect: int
    n_unscored: int


def _scored(
    correct: np.ndarray | Sequence, scores: np.ndarray | Sequence
) -> tuple[np.ndarray, np.ndarray, int]:
    c = np.asarray(correct, dtype=np.float64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if c.shape != s.shape:
        raise ValueError(
            f"correct ({c.size} values) and scores ({s.size} values) must hold one value per sample"
        )
    if not np.isin(c, (0.0, 1.0)).all():
        raise ValueError("correct must hold 0/1 verifier rewards")
    finite = np.isfinite(s)
    return c[finite].astype(bool), s[finite], int((~finite).sum())


def self_verification(
    correct: np.ndarray | Sequence, scores: np.ndarray | Sequence, threshold: float = 0.5
) -> SelfVerification:
    """Self-verification at `threshold` (LASER_SPEC section 5: predict correct when r_s > 0.5).

    The counting is `laser.self_verification_metrics`, the train step's own, over the scored
    samples; its (count, count) pairs are exact integers, divided here in float64."""
    c, s, unscored = _scored(correct, scores)
    pairs = laser.self_verification_metrics(s, c, np.ones_like(c), threshold)
    hits_pos, n_pos = (float(x) for x in pairs["acc_correct"])
    hits_neg, n_neg = (float(x) for x in pairs["acc_incorrect"])
    acc_pos = hits_pos / n_pos if n_pos else math.nan
    acc_neg = hits_neg / n_neg if n_neg else math.nan
    if math.isnan(acc_pos) or math.isnan(acc_neg) or acc_pos + acc_neg == 0:
        f1 = 0.0
    else:
        f1 = float(laser.self_verification_f1(acc_pos, acc_neg))
    return SelfVerification(acc_pos, acc_neg, f1, int(n_pos), int(n_neg), unscored)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x, tied values sharing the mean of their ranks."""
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x))
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def auroc(correct: np.ndarray | Sequence, scores: np.ndarray | Sequence) -> float:
    """Area under the ROC curve of r_s separating correct from incorrect samples (the
    Mann-Whitney U statistic, ties counting one half); NaN when a class is absent."""
    c, s, _ = _scored(correct, scores)
    n_pos, n_neg = int(c.sum()), int((~c).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = _average_ranks(s)
    return float((ranks[c].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auroc_within(correct_pn: np.ndarray | Sequence, scores_pn: np.ndarray | Sequence) -> float:
    """AUROC of r_s over the (correct, incorrect) pairs of samples of the *same* problem, pooled
    over problems (ties count one half, NaN scores left out); NaN when no problem has both.

    What voting and best-of-n use: `auroc` also rewards a score that only knows which problems
    are hard, which cannot change any vote. 0.5 here means r_s ranks a problem's answers at
    random, and weighted voting can only match majority voting by luck.
    """
    correct = _as_correct(correct_pn)
    scores = _as_scores(scores_pn, correct.shape, "scores_pn")
    wins = pairs = 0.0
    for c, s in zip(correct, scores, strict=True):
        scored = c[np.isfinite(s)].astype(bool)
        n_pairs = int(scored.sum()) * int((~scored).sum())
        if n_pairs:  # each problem's AUROC, weighted by its number of pairs
            wins += auroc(c, s) * n_pairs
            pairs += n_pairs
    return wins / pairs if pairs else math.nan


def ece(correct: np.ndarray | Sequence, scores: np.ndarray | Sequence, n_bins: int = 10) -> float:
    """Expected calibration error of clip(r_s, 0, 1) as the probability of being correct:
    sum over `n_bins` equal-width bins of (bin share) * |accuracy - mean probability|.
    Bins are [i/n, (i+1)/n), the last one closed; NaN when no sample has a score."""
    c, s, _ = _scored(correct, scores)
    if c.size == 0:
        return math.nan
    p = np.clip(s, 0.0, 1.0)
    bins = np.minimum((p * n_bins).astype(int), n_bins - 1)
    total = 0.0
    for b in np.unique(bins):
        in_bin = bins == b
        total += in_bin.mean() * abs(c[in_bin].mean() - p[in_bin].mean())
    return float(total)


# ---------------------------------------------------------------------------------------------
# Everything for one benchmark.


def default_ks(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    ks = [2**i for i in range(n.bit_length()) if 2**i <= n]
    return ks if ks[-1] == n else ks + [n]


def summarize(
    correct_pn: np.ndarray | Sequence,
    answers_pn: Sequence[Sequence[str | None]],
    scores_pn: np.ndarray | Sequence | None = None,
    *,
    ks: Sequence[int] | None = None,
) -> dict[str, float]:
    """The paper's table for one benchmark: accuracy (avg@n), pass@k, maj@k and, given scores,
    weighted maj@k, best-of-k, self-verification accuracies and F1, AUROC (overall and within
    problems) and ECE."""
    correct = _as_correct(correct_pn)
    answers = _as_answers(answers_pn, correct.shape)
    problems, n = correct.shape
    out: dict[str, float] = {"problems": problems, "n": n, "accuracy": avg_at_n(correct)}
    scores = None if scores_pn is None else _as_scores(scores_pn, correct.shape, "scores_pn")
    weights = None if scores is None else self_reward_weights(scores)
    for k in ks or default_ks(n):
        k = _check_k(k, n)
        out[f"pass@{k}"] = pass_at_k(correct, k)
        out[f"maj@{k}"] = _voted_accuracy(answers, correct, None, k)
        if scores is not None:
            out[f"weighted_maj@{k}"] = _voted_accuracy(answers, correct, weights, k)
            out[f"best_of_{k}"] = best_of_n(correct, scores, k)
    if scores is not None:
        sv = self_verification(correct, scores)
        out.update(
            sv_acc_correct=sv.acc_correct,
            sv_acc_incorrect=sv.acc_incorrect,
            sv_f1=sv.f1,
            sv_unscored=sv.n_unscored,
            auroc=auroc(correct, scores),
            auroc_within=auroc_within(correct, scores),
            ece=ece(correct, scores),
        )
    return out
