"""Stopping rules on hand-built sample sequences; every stop point is computed by hand below.

Adaptive-Consistency's statistic for whole counts a >= b is P(p > 1/2), p ~ Beta(a + 1, b + 1),
which equals P(Binomial(a + b + 1, 1/2) <= a); with b = 0 it is 1 - 2^-(a + 1) (the Beta(a + 1, 1)
CDF is x^(a + 1)), also for fractional a.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from laserjax.adaptive import (
    BetaStop,
    FixedK,
    PrefixStats,
    ScoreAccept,
    ScoreBetaStop,
    WindowStop,
    answer_ids,
    beta_confidence,
    parse_rule,
    stop_points,
)


def first_stop(rule, answers, scores=None, finished=None, round_size=1):
    n = len(answers)
    scores = [0.5] * n if scores is None else scores
    finished = [True] * n if finished is None else finished
    stats = PrefixStats.from_samples(answers, scores, finished)
    return int(stop_points(rule, stats, round_size)[0])


def test_beta_confidence_is_the_binomial_tail_for_whole_counts():
    for a in range(0, 9):
        for b in range(0, a + 1):
            m = a + b + 1
            expected = sum(math.comb(m, i) for i in range(a + 1)) / 2**m
            assert beta_confidence(a, b) == pytest.approx(expected, rel=1e-12)
    assert beta_confidence(3.5, 0) == pytest.approx(1 - 0.5**4.5, rel=1e-12)


def test_answer_ids_group_by_normalized_answer():
    ids = answer_ids(["\\frac{1}{2}", None, "0.5", "\\dfrac{1}{2}", " 3", "$3$"])
    np.testing.assert_array_equal(ids, [0, -1, 1, 0, 2, 2])  # \dfrac -> \frac, no space, no $


def test_beta_stop_unanimous_stops_after_four():
    # 1 - 2^-(a+1): 0.75, 0.875, 0.9375, 0.96875 >= 0.95 at the 4th sample
    assert first_stop(BetaStop(threshold=0.95), ["7"] * 6) == 4
    assert first_stop(BetaStop(threshold=0.8), ["7"] * 6) == 2  # 0.875 >= 0.8
    assert first_stop(BetaStop(threshold=0.9), ["7"] * 6) == 3  # 0.9375 >= 0.9


def test_beta_stop_with_a_runner_up():
    # counts (a, b) after t: (1,0) .75, (1,1) .5, (2,1) 11/16, (3,1) 26/32, (4,1) 57/64,
    # (5,1) 120/128 = .9375, (6,1) 247/256 = .965 -> stops at 7
    assert first_stop(BetaStop(), ["1", "2", "1", "1", "1", "1", "1", "1"]) == 7


def test_beta_stop_reads_only_the_top_two_and_skips_no_answer():
    # a third answer does not count: (6 votes, 1) is first reached at t = 8
    assert first_stop(BetaStop(), ["1", "2", "3", "1", "1", "1", "1", "1", "1"]) == 8
    # a sample without an answer does not vote: 4 votes for "1" are reached at t = 5
    assert first_stop(BetaStop(), ["1", None, "1", "1", "1", "1"]) == 5
    # nobody answers: never fires, so the budget (the whole sequence) is spent
    assert first_stop(BetaStop(), [None] * 5) == 5


def test_beta_stop_budget_and_rounds():
    assert first_stop(BetaStop(max_samples=3), ["1", "2", "1", "2", "1"]) == 3
    # fires at t = 4, but checked only at t = 3, 6: stops at 6
    assert first_stop(BetaStop(), ["7"] * 8, round_size=3) == 6
    # checked at t = 3 and at the last sample t = 5 even though 5 is not a multiple of 3
    assert first_stop(BetaStop(), ["7"] * 5, round_size=3) == 5


def test_window_stop_checks_whole_windows_only():
    esc = WindowStop(window=3)
    assert first_stop(esc, ["1", "1", "1", "2"]) == 3
    # samples 2..4 agree, but the windows are [2,1,1] (t = 3) and [1,1,1] (t = 6)
    assert first_stop(esc, ["2", "1", "1", "1", "1", "1", "1"]) == 6
    # a window of no answers does not stop; the budget does
    assert first_stop(esc, [None] * 6) == 6
    assert first_stop(esc, ["1", None, "1", "1", "1", "1"]) == 6
    # the answer is the majority over every sample drawn
    assert esc.decide(["2", "1", "1", "1", "1", "1"], [0.5] * 6, [True] * 6).pick == 1


def test_score_beta_stop_pseudo_counts():
    # lam 1: r_s 1 counts 2 per sample -> a = 2, 4: 0.875, 0.96875 -> stops at 2
    assert first_stop(ScoreBetaStop(), ["7"] * 6, [1.0] * 6) == 2
    # r_s 0.5 counts 1 per sample: Adaptive-Consistency's stop point, 4
    assert first_stop(ScoreBetaStop(), ["7"] * 6, [0.5] * 6) == 4
    # r_s 0.25 counts 0.5: a = t/2, 1 - 2^-(a+1) >= .95 first at a = 3.5 (.9558; a = 3: .9375)
    assert first_stop(ScoreBetaStop(), ["7"] * 9, [0.25] * 9) == 7
    # a truncated sample (NaN) counts 1 - lam = 0
    assert first_stop(ScoreBetaStop(), ["7"] * 3 + ["7"] * 2, [1.0, np.nan, np.nan, 1.0, 1.0]) == 4


def test_score_beta_stop_picks_by_pseudo_counts():
    answers, scores = ["1", "2", "2"], [0.9, 0.1, 0.2]
    # pseudo-counts: "1" 1.8, "2" 0.2 + 0.4 = 0.6; majority would pick "2"
    assert ScoreBetaStop().decide(answers, scores, [True] * 3).pick == 0
    assert BetaStop().decide(answers, scores, [True] * 3).pick == 1


def test_score_beta_with_lam_zero_is_beta_stop():
    rng = np.random.default_rng(0)
    ids = rng.integers(-1, 3, size=(200, 12))
    scores = rng.uniform(-0.2, 1.2, size=ids.shape)
    stats = PrefixStats.from_ids(ids, scores, np.ones(ids.shape, bool))
    np.testing.assert_array_equal(
        ScoreBetaStop(lam=0.0).stops(stats), BetaStop(threshold=0.95).stops(stats)
    )


def test_score_accept():
    rule = ScoreAccept(tau=0.9, fallback=BetaStop())
    assert first_stop(rule, ["1", "2", "3", "4"], [0.3, 0.95, 0.2, 0.1]) == 2
    assert rule.decide(["1", "2"], [0.3, 0.95], [True, True]) == rule.decide(
        ["1", "2"], [0.3, 0.95], [True, True]
    )
    d = rule.decide(["1", "2"], [0.3, 0.95], [True, True])
    assert d.stop and d.pick == 1
    # the highest-scored confident sample wins, the earliest on a tie
    assert rule.decide(["1", "2", "3"], [0.92, 0.97, 0.97], [True] * 3).pick == 1
    # an unfinished sample or one without an answer is never accepted: the fallback decides
    assert (
        first_stop(rule, ["1", None, "2", "3"], [0.95, 0.99, 0.1, 0.1], [False] + [True] * 3) == 4
    )
    assert first_stop(rule, ["5"] * 6, [0.1] * 6) == 4
    assert rule.decide(["5", "6", "5"], [0.1] * 3, [True] * 3).pick == 0


def test_fixed_k_majority_and_weighted():
    assert first_stop(FixedK(k=3), ["1"] * 5) == 3
    assert FixedK(k=3).max_samples == 3
    answers, scores = ["1", "2", "2"], [0.9, 0.3, 0.3]
    assert FixedK(k=3).decide(answers, scores, [True] * 3).pick == 1
    assert FixedK(k=3, weighted=True).decide(answers, scores, [True] * 3).pick == 0


@pytest.mark.parametrize(
    "rule",
    [
        BetaStop(threshold=0.9),
        WindowStop(window=2),
        ScoreBetaStop(threshold=0.9, lam=0.5),
        ScoreAccept(tau=0.8),
        FixedK(k=4),
    ],
    ids=lambda r: r.name,
)
def test_rules_are_causal_and_decide_agrees(rule):
    """A prefix's decision depends on that prefix only, and `decide` on the first t samples
    says stop exactly when t is at or after the replay's stop point."""
    rng = np.random.default_rng(1)
    ids = rng.integers(-1, 3, size=(50, 10))
    scores = np.where(rng.uniform(size=ids.shape) < 0.1, np.nan, rng.uniform(size=ids.shape))
    finished = np.isfinite(scores)
    full = rule.stops(PrefixStats.from_ids(ids, scores, finished))
    for t in (1, 4, 7):
        part = rule.stops(PrefixStats.from_ids(ids[:, :t], scores[:, :t], finished[:, :t]))
        np.testing.assert_array_equal(part, full[:, :t])
    stops = stop_points(rule, PrefixStats.from_ids(ids, scores, finished))
    names = ["a", "b", "c"]
    for b in range(10):
        answers = [None if i < 0 else names[i] for i in ids[b]]
        said = [rule.decide(answers[:t], scores[b, :t], finished[b, :t]).stop for t in range(1, 11)]
        capped = [rule.max_samples is not None and t >= rule.max_samples for t in range(1, 11)]
        assert said == [bool(f) or c for f, c in zip(full[b], capped, strict=True)]
        assert stops[b] == (said.index(True) + 1 if True in said else 10)


def test_parse_rule():
    assert parse_rule("maj:16") == FixedK(k=16)
    assert parse_rule("wmaj:8") == FixedK(k=8, weighted=True)
    assert parse_rule("ac:0.95/32") == BetaStop(32, threshold=0.95)
    assert parse_rule("esc:5") == WindowStop(window=5)
    assert parse_rule("rsbeta:0.9:0.5") == ScoreBetaStop(threshold=0.9, lam=0.5)
    assert parse_rule("rsaccept:0.9") == ScoreAccept(tau=0.9, fallback=BetaStop())
    for bad in ("ac", "ac:x", "foo:1", "ac:1.5", "rsbeta:0.9:2"):
        with pytest.raises(ValueError, match="stopping rule|threshold|lam"):
            parse_rule(bad)
