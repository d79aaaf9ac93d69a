"""Evaluation metrics on hand-made cases (LASER_SPEC section 5), with ties and absent classes."""

import itertools
import math

import numpy as np
import pytest

from laserjax.eval_metrics import (
    auroc,
    auroc_within,
    avg_at_n,
    best_of_n,
    default_ks,
    ece,
    maj_at_k,
    pass_at_k,
    self_verification,
    summarize,
    vote,
    weighted_maj_at_k,
)

NAN = float("nan")


def test_avg_at_n():
    assert avg_at_n([[1, 0], [1, 1]]) == 0.75
    assert avg_at_n([[0, 0, 0]]) == 0.0


def test_pass_at_k_against_the_binomial_definition():
    correct = np.zeros((4, 4))
    for p, c in enumerate([0, 1, 2, 4]):
        correct[p, :c] = 1
    assert pass_at_k(correct, 1) == pytest.approx((0 + 0.25 + 0.5 + 1) / 4)
    assert pass_at_k(correct, 2) == pytest.approx((0 + 0.5 + 5 / 6 + 1) / 4)
    assert pass_at_k(correct, 4) == pytest.approx(0.75)  # any correct sample
    n, c, k = 32, 5, 8
    row = np.r_[np.ones(c), np.zeros(n - c)][None]
    assert pass_at_k(row, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), rel=1e-12)
    with pytest.raises(ValueError, match=r"k = 5 must be in \[1, n = 4\]"):
        pass_at_k(correct, 5)


def test_majority_vote_tie_goes_to_the_first_occurrence():
    assert vote(["1", "2", "2", "1", "3"]) == 0  # "1" and "2" have two votes; "1" came first
    assert vote(["2", "1", "1", "2"]) == 0
    assert vote([None, "3", None]) == 1  # no answer, no vote
    assert vote([None, None]) is None
    assert vote([r"\frac{1}{2}", "0.5", r"\dfrac{1}{2}"]) == 0  # grouped by normalised string


def test_maj_at_k():
    answers = [
        ["1", "2", "2", "1", "3"],  # all 5: tie -> "1" (wrong); k=3: "2" (right)
        ["7", "8", "8", "8", "7"],  # "8" (right)
        [None, None, None, None, None],  # nobody answered -> 0
        ["5", "6", "6", "5", "5"],
    ]  # all 5: "5" (right); k=3: "6" (wrong)
    correct = [[0, 1, 1, 0, 0], [0, 1, 1, 1, 0], [0, 0, 0, 0, 0], [1, 0, 0, 1, 1]]
    assert maj_at_k(answers, correct) == 0.5
    assert maj_at_k(answers, correct, k=3) == 0.5
    assert maj_at_k(answers, correct, k=1) == 0.25  # each problem's first answer
    with pytest.raises(ValueError, match="answers_pn must be 4 problems x 5 samples"):
        maj_at_k(answers[:3], correct)


def test_weighted_vote_rules():
    w = lambda scores: np.clip(np.nan_to_num(np.asarray(scores, float), nan=0.0), 0, 1)
    assert vote(["1", "2", "2"], w([0.9, 0.3, 0.4])) == 0  # 0.9 beats 0.7
    assert vote(["1", "2", "2"], w([5.0, 0.6, 0.6])) == 1  # clipped: 1.0 loses to 1.2
    assert vote(["a", "b", "b"], w([0.5, 0.25, 0.25])) == 1  # equal weight: more votes win
    assert vote(["a", "b", "b"], w([0.3, 0.1, 0.2])) == 1  # 0.1 + 0.2 == 0.3 counts as tied
    assert vote(["a", "b", "b"], w([-1.0, 0.0, NAN])) == 1  # all weigh 0: plain majority
    assert vote(["a", "b"], w([0.5, 0.5])) == 0  # full tie: first occurrence


def test_weighted_maj_at_k():
    answers = [["1", "2", "2"], ["3", "4", "4"]]
    correct = [[1, 0, 0], [0, 1, 1]]
    scores = [[0.9, 0.3, 0.4], [0.2, NAN, 0.1]]
    assert maj_at_k(answers, correct) == 0.5  # "2" (wrong), "4" (right)
    assert weighted_maj_at_k(answers, correct, scores) == 0.5  # "1" (right), "3": 0.2 > 0.1
    assert weighted_maj_at_k(answers, correct, [[0.9, 0.3, 0.4], [0.0, 0.3, 0.1]]) == 1.0
    assert weighted_maj_at_k(answers, correct, scores, k=1) == 0.5
    with pytest.raises(ValueError, match=r"scores_pn has shape \(1, 3\), expected \(2, 3\)"):
        weighted_maj_at_k(answers, correct, scores[:1])


def test_best_of_n():
    assert best_of_n([[0, 1, 0]], [[0.1, 0.9, 0.5]]) == 1.0
    assert best_of_n([[0, 1]], [[0.7, 0.7]]) == 0.0  # tie: earliest sample
    assert best_of_n([[1, 0]], [[NAN, 0.2]]) == 0.0  # NaN ranks lowest
    assert best_of_n([[1, 0]], [[NAN, NAN]]) == 1.0  # nothing scored: the first sample
    assert best_of_n([[0, 1, 1]], [[0.5, 0.1, 0.9]], k=2) == 0.0
    assert best_of_n([[0, 1], [1, 0]], [[0.1, 0.2], [0.4, 0.3]]) == 1.0


def test_self_verification_and_f1():
    sv = self_verification([1, 1, 1, 0, 0], [0.9, 0.6, 0.2, 0.1, 0.7])
    assert sv.acc_correct == pytest.approx(2 / 3) and sv.acc_incorrect == 0.5
    assert sv.f1 == pytest.approx(4 / 7)  # 2 * (2/3) * (1/2) / (2/3 + 1/2)
    assert (sv.n_correct, sv.n_incorrect, sv.n_unscored) == (3, 2, 0)
    assert self_verification([1, 0], [0.5, 0.5]).acc_correct == 0.0  # "> 0.5" means correct
    assert self_verification([1, 0], [0.1, 0.9]).f1 == 0.0  # both accuracies 0


def test_self_verification_with_an_absent_class_and_unscored_samples():
    sv = self_verification([1, 1, 0], [0.9, 0.8, NAN])
    assert sv.acc_correct == 1.0 and math.isnan(sv.acc_incorrect)
    assert sv.f1 == 0.0 and sv.n_incorrect == 0 and sv.n_unscored == 1
    sv = self_verification([[0, 0]], [[0.1, 0.2]])
    assert math.isnan(sv.acc_correct) and sv.acc_incorrect == 1.0 and sv.f1 == 0.0


def _pairwise_auroc(correct, scores):
    """The definition: P(score of a correct sample > score of an incorrect one), ties 1/2."""
    pos = [s for c, s in zip(correct, scores, strict=True) if c]
    neg = [s for c, s in zip(correct, scores, strict=True) if not c]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auroc():
    assert auroc([1, 1, 0, 0], [0.9, 0.8, 0.1, 0.2]) == 1.0
    assert auroc([0, 0, 1, 1], [0.9, 0.8, 0.1, 0.2]) == 0.0
    assert auroc([1, 0], [0.5, 0.5]) == 0.5
    assert auroc([1, 1, 0, 0], [0.8, 0.4, 0.4, 0.2]) == 0.875  # the tie counts one half
    assert auroc([1, 1, 0, 0], [0.8, NAN, 0.4, 0.9]) == 0.5  # NaN score left out
    assert math.isnan(auroc([1, 1], [0.1, 0.2]))
    rng = np.random.default_rng(0)
    correct = rng.integers(0, 2, 200)
    scores = np.round(rng.normal(size=200) + correct, 1)  # rounded: many ties
    assert auroc(correct, scores) == pytest.approx(_pairwise_auroc(correct, scores), abs=1e-12)


def test_auroc_within():
    # A score that only knows which problem is hard: above chance overall, chance within.
    correct = [[1, 1, 0], [0, 0, 1]]
    difficulty = [[0.9, 0.9, 0.9], [0.1, 0.1, 0.1]]
    assert auroc(np.ravel(correct), np.ravel(difficulty)) == pytest.approx(2 / 3)
    assert auroc_within(correct, difficulty) == 0.5
    # Pairs pooled over problems: problem 0 has 2 pairs (both won), problem 1 has 2 (one won,
    # one tied), problem 2 none (all correct), problem 3 a NaN-scored sample left out.
    correct = [[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0]]
    scores = [[0.8, 0.6, 0.5], [0.4, 0.4, 0.1], [0.1, 0.2, 0.3], [0.2, NAN, 0.3]]
    assert auroc_within(correct, scores) == pytest.approx((2 + 1.5 + 0) / 5)
    assert math.isnan(auroc_within([[1, 1], [0, 0]], [[0.1, 0.2], [0.3, 0.4]]))
    rng = np.random.default_rng(1)
    c = rng.integers(0, 2, (30, 6))
    sc = np.round(rng.normal(size=(30, 6)) + c + rng.normal(size=(30, 1)), 1)
    pairs = [(p, n) for ci, si in zip(c, sc, strict=True) for p in si[ci == 1] for n in si[ci == 0]]
    want = np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs])
    assert auroc_within(c, sc) == pytest.approx(want, abs=1e-12)


def test_ece():
    # bin 9: p 0.95, accuracy 0.5; bin 0: p 0.05, accuracy 0 -> 0.5 * 0.45 + 0.5 * 0.05
    assert ece([1, 0, 0, 0], [0.95, 0.95, 0.05, 0.05]) == pytest.approx(0.25)
    assert ece([1, 0, 0, 0], [0.25, 0.25, 0.25, 0.25]) == pytest.approx(0.0)
    # clipping: 3.0 -> 1.0 and 1.0 share the closed last bin; -2 -> 0.0 in the first
    assert ece([1, 1, 0], [3.0, 1.0, -2.0]) == pytest.approx(0.0)
    assert ece([1, 0], [0.1, 0.19]) == pytest.approx(abs(0.5 - 0.145))  # same bin [0.1, 0.2)
    assert ece([1, 0], [0.1, NAN]) == pytest.approx(0.9)  # unscored left out
    assert math.isnan(ece([1], [NAN]))


def test_default_ks():
    assert default_ks(1) == [1]
    assert default_ks(2) == [1, 2]
    assert default_ks(32) == [1, 2, 4, 8, 16, 32]
    assert default_ks(6) == [1, 2, 4, 6]


def test_summarize():
    answers = [["1", "2", "2", "1"], ["3", "3", None, "4"]]
    correct = [[1, 0, 0, 1], [1, 1, 0, 0]]
    scores = [[0.9, 0.2, 0.1, 0.8], [0.7, 0.6, NAN, 0.3]]
    out = summarize(correct, answers, scores)
    assert out["problems"] == 2 and out["n"] == 4 and out["accuracy"] == 0.5
    assert out["maj@4"] == 1.0 and out["weighted_maj@4"] == 1.0
    assert out["maj@2"] == 1.0 and out["pass@1"] == 0.5 and out["best_of_4"] == 1.0
    assert out["sv_acc_correct"] == 1.0 and out["sv_acc_incorrect"] == 1.0
    assert out["sv_f1"] == 1.0 and out["sv_unscored"] == 1 and out["auroc"] == 1.0
    assert out["auroc_within"] == 1.0
    assert set(out) >= {f"{m}@{k}" for m in ("pass", "maj", "weighted_maj") for k in (1, 2, 4)}
    plain = summarize(correct, answers, ks=[4])
    assert not {"auroc", "auroc_within", "weighted_maj@4"} & set(plain)
    assert plain["maj@4"] == 1.0
    with pytest.raises(ValueError, match="correct_pn must hold 0/1"):
        summarize([[0.5, 1]], [["1", "2"]])
