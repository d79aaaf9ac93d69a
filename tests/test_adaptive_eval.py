"""The offline replay (numbers by hand on a two-problem pool), matched savings, and online
adaptive sampling against the replay: with one problem per sampler call and the pool drawn by
the same function with a rule that never stops, online sampling draws exactly the pool's samples
in order, so its stops, answers and accuracy equal the replay's on the pool's own order."""

from __future__ import annotations

import json

import numpy as np
import pytest
import test_evaluate as te
from flax import nnx

from laserjax import cli
from laserjax.adaptive import BetaStop, FixedK, ScoreAccept, ScoreBetaStop, WindowStop
from laserjax.adaptive_eval import (
    Pool,
    ReplayRow,
    matched_savings,
    orders_for,
    replay,
    replay_orders,
    sample_adaptively,
)
from laserjax.continuous import ContinuousSampler
from laserjax.evaluate import Scoring
from laserjax.model import Transformer, TransformerConfig
from laserjax.sampler import Sampler

# The eval command's tiny checkpoint and its 20-problem MATH500 run, shared as fixtures.
MATH500_ARGV, eval_argv, read_rows = te.MATH500_ARGV, te.eval_argv, te.read_rows
tiny_ckpt, token_ids, math500_run = te.tiny_ckpt, te.token_ids, te.math500_run


def hand_pool() -> Pool:
    # problem 0: "1" x3 then "2" (correct answer "1"); problem 1: "5", "6", "6", "6" (right: "6")
    answers = [["1", "1", "1", "2"], ["5", "6", "6", "6"]]
    correct = np.array([[1, 1, 1, 0], [0, 1, 1, 1]], float)
    scores = np.array([[0.5, 0.5, 0.5, 0.5], [0.95, 0.2, 0.2, 0.2]])
    lengths = np.array([[3, 4, 5, 6], [1, 2, 3, 4]])
    return Pool(answers, scores, np.ones((2, 4), bool), correct, lengths)


def test_replay_on_the_pools_own_order_by_hand():
    pool = hand_pool()
    rules = [
        FixedK(k=1),
        FixedK(k=3),
        BetaStop(threshold=0.85),
        ScoreAccept(tau=0.9, fallback=BetaStop(threshold=0.85)),
        WindowStop(window=2),
    ]
    rows = {r.rule: r for r in replay(pool, rules, num_orders=1, seed=None)}
    # maj@1: p0 "1" right, p1 "5" wrong; 1 sample; tokens (3 + 1) / 2
    assert (rows["maj@1"].accuracy, rows["maj@1"].samples, rows["maj@1"].tokens) == (0.5, 1, 2)
    # maj@3: p0 "1", p1 "6" (2 of 3): both right; tokens (12 + 6) / 2
    assert (rows["maj@3"].accuracy, rows["maj@3"].samples, rows["maj@3"].tokens) == (1, 3, 9)
    # AC at 0.85: p0 stops at 2 (0.875); p1: (1,0) .75, (1,1) .5, (2,1) .6875, (3,1) .8125 ->
    # budget 4, answer "6". samples (2 + 4) / 2, tokens (7 + 10) / 2
    ac = rows["ac_beta@0.85"]
    assert (ac.accuracy, ac.samples, ac.tokens) == (1, 3, 8.5)
    # r_s accept at 0.9: p1's first sample (0.95) is accepted at once, and it is wrong; p0 as AC
    acc = rows["rs_accept@0.9+ac_beta@0.85"]
    assert (acc.accuracy, acc.samples, acc.tokens) == (0.5, 1.5, 4)
    # ESC w = 2: p0 window [1, 1] stops at 2; p1 [5, 6] no, [6, 6] stops at 4
    assert (rows["esc@w2"].accuracy, rows["esc@w2"].samples) == (1, 3)
    assert all(r.accuracy_sd == 0 for r in rows.values())  # one order


def test_accept_family_never_takes_more_samples_than_adaptive_consistency():
    """Every `r_s accept + Adaptive-Consistency` setting of the comparison stops, problem by
    problem and order by order, no later than Adaptive-Consistency at its fallback threshold
    (accepting can only stop earlier), so on average it takes at most as many samples."""
    from laserjax.adaptive_eval import default_rules, family

    pool = hand_pool()
    rules = default_rules(4)
    accept = [r for r in rules if family(r) == "r_s accept + Adaptive-Consistency"]
    assert len(accept) == 5 * 8
    rows = {r.rule: r for r in replay(pool, rules, num_orders=24, seed=0)}
    for r in accept:
        ac = rows[r.fallback.name]
        assert rows[r.name].samples <= ac.samples
    # tau 0.9 accepts problem 1's 0.95-scored sample whenever it comes before the stop.
    assert rows["rs_accept@0.9+ac_beta@0.95"].samples < rows["ac_beta@0.95"].samples


def test_replay_orders_are_shared_and_each_a_permutation():
    pool = hand_pool()
    orders = orders_for(pool, 5, seed=3)
    assert orders.shape == (5, 2, 4)
    assert (np.sort(orders, axis=-1) == np.arange(4)).all()
    np.testing.assert_array_equal(orders, orders_for(pool, 5, seed=3))
    # maj@4 sees every sample in any order: accuracy 1, no spread, tokens (18 + 10) / 2
    (row,) = replay_orders(pool, [FixedK(k=4)], orders)
    assert row.accuracy == 1 and row.accuracy_sd == 0 and row.tokens == 14
    # maj@1 is right when p1's order starts with a "6" sample (3 of 4); p0 when it starts with "1"
    (row,) = replay_orders(pool, [FixedK(k=1)], orders)
    expected = np.mean(
        [np.isin(o[0, 0], [0, 1, 2]) / 2 + np.isin(o[1, 0], [1, 2, 3]) / 2 for o in orders]
    )
    assert row.accuracy == pytest.approx(expected, abs=1e-12)
    # bootstrap draws: indices with repeats; maj@1 is right exactly when the first draw is
    boot = orders_for(pool, 50, seed=3, replace=True)
    assert boot.shape == (50, 2, 4) and ((boot >= 0) & (boot < 4)).all()
    assert any(len(set(o)) < 4 for o in boot.reshape(-1, 4))
    (row,) = replay_orders(pool, [FixedK(k=1)], boot)
    expected = np.mean(
        [np.isin(o[0, 0], [0, 1, 2]) / 2 + np.isin(o[1, 0], [1, 2, 3]) / 2 for o in boot]
    )
    assert row.accuracy == pytest.approx(expected, abs=1e-12)


def test_matched_savings():
    def row(rule, family, acc, samples):
        return ReplayRow(rule, family, acc, 0.0, samples, 10 * samples, 0.0)

    rows = [
        row("maj@8", "maj", 0.70, 8),
        row("maj@16", "maj", 0.72, 16),
        row("a1", "A", 0.71, 3),
        row("a2", "A", 0.72, 5),
        row("a3", "A", 0.73, 9),
        row("b1", "B", 0.65, 2),
    ]
    ref, savings = matched_savings(rows)
    by = {s.family: s for s in savings}
    assert ref.rule == "maj@16"
    assert by["A"].rule == "a2" and by["A"].saving == pytest.approx(16 / 5)
    assert by["maj"].rule == "maj@16" and by["maj"].saving == 1
    assert by["B"].rule is None and by["B"].accuracy == 0.65
    with pytest.raises(ValueError, match="maj@32"):
        matched_savings(rows, "maj@32")


# ---------------------------------------------------------------------------------------------
# Online against the replay on a tiny random model.

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
PROMPTS = [[10, 11, 12], [13, 14], [20], [30, 31, 32, 33], [40, 41], [50]]
REFS = [str(i % 3) for i in range(len(PROMPTS))]


class IdTokenizer:
    def batch_decode(self, rows, skip_special_tokens=True):
        return [" ".join(str(int(t)) for t in row) for row in rows]


def first_token_mod3(text: str) -> str | None:
    """The answer: the first response token id mod 3 (None for an empty response)."""
    return str(int(text.split()[0]) % 3) if text.strip() else None


def reward(responses: list[str], refs: list[str]) -> np.ndarray:
    return np.array([float(first_token_mod3(r) == a) for r, a in zip(responses, refs, strict=True)])


@pytest.fixture(scope="module")
def sampler():
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    return Sampler(
        model, eos_ids=tuple(range(16)), pad_id=63, self_reward_token_id=62, max_new_tokens=6
    )


def run(sampler, rule, max_samples, batch_prompts=1, seed=5):
    return sample_adaptively(
        sampler,
        IdTokenizer(),
        PROMPTS,
        REFS,
        rule,
        round_size=2,
        max_samples=max_samples,
        reward_fn=reward,
        extract_fn=first_token_mod3,
        scoring=Scoring(beta_v=0.1, c_ref=-10.0),  # r_s about 0.6 for this model
        temperature=1.0,
        seed=seed,
        batch_prompts=batch_prompts,
    )


N = 8


@pytest.fixture(scope="module")
def pool(sampler):
    full = run(sampler, FixedK(k=N), N)
    assert [len(a) for a in full.answers] == [N] * len(PROMPTS)
    return full.pool()


@pytest.mark.parametrize(
    "rule",
    [BetaStop(threshold=0.8), ScoreBetaStop(threshold=0.8, lam=1.0), WindowStop(window=2)],
    ids=lambda r: r.name,
)
def test_online_equals_replay_with_the_same_seeds(sampler, pool, rule):
    n = N
    online = run(sampler, rule, n)
    stops = [len(a) for a in online.answers]
    assert min(stops) < n  # the rule stops some problem early: the comparison is not vacuous
    for p, s in enumerate(stops):
        assert online.answers[p] == pool.answers_pn[p][:s]
        np.testing.assert_array_equal(online.scores[p], pool.scores_pn[p, :s])
        assert online.lengths[p] == list(pool.lengths_pn[p, :s])
    (row,) = replay(pool, [rule], num_orders=1, seed=None, round_size=2)
    assert online.accuracy == row.accuracy
    assert online.samples == row.samples
    assert online.tokens == row.tokens


def test_online_through_decode_slots_draws_what_the_static_sampler_draws(sampler, pool):
    """`slots=3`: each round's call of 3 problems x 2 samples runs through 3 decode slots
    (continuous batching), and every problem stops where the static run stops, with the same
    answers, scores and lengths."""
    rule = BetaStop(threshold=0.8)
    static = run(sampler, rule, N, batch_prompts=3)
    calls = sampler.stats["prefill_calls"]
    slotted = run(ContinuousSampler(sampler, slots=3), rule, N, batch_prompts=3)
    assert sampler.stats["prefill_calls"] == calls  # no static call: every round ran in slots
    assert min(len(a) for a in static.answers) < N  # some problem stops early
    assert slotted.answers == static.answers
    assert slotted.lengths == static.lengths
    for a, b in zip(slotted.scores, static.scores, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)  # log p(z_c) as the static decode, 1e-5
    assert slotted.accuracy == static.accuracy and slotted.samples == static.samples


@pytest.mark.slow  # a second compile (8 prompts)
def test_online_padding_to_a_power_of_two_changes_no_draw(sampler):
    # 6 open problems go to the sampler as 8 prompts (2 copies of the last); the real rows must
    # be what an unpadded call with the same seed draws
    res = run(sampler, FixedK(k=2), 2, batch_prompts=8)
    direct = sampler.sample(PROMPTS, k=2, temperature=1.0, seed=5)
    texts = IdTokenizer().batch_decode(
        [row[:n] for row, n in zip(direct.response_tokens, direct.lengths, strict=True)]
    )
    assert [a for ans in res.answers for a in ans] == [first_token_mod3(t) for t in texts]
    assert res.sampler_calls == 1
    with pytest.raises(ValueError, match="multiple of round_size"):
        run(sampler, FixedK(k=4), 5)


# ---------------------------------------------------------------------------------------------
# The command on a saved pool.


def write_pool(path, n=16, problems=12, seed=0):
    """A samples.jsonl in the `eval` row format: answers drawn so that about 60% are right."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for p in range(problems):
            for j in range(n):
                right = rng.uniform() < 0.6
                ans = "7" if right else str(rng.integers(0, 3))
                row = {
                    "benchmark": "toy",
                    "problem_id": f"p{p}",
                    "sample": j,
                    "response": ans,
                    "extracted_answer": ans,
                    "correct": bool(right),
                    "r_s": float(rng.uniform(0.5, 1.0) if right else rng.uniform(0.0, 0.6)),
                    "length": 3,
                    "truncated": False,
                }
                f.write(json.dumps(row) + "\n")


def test_adaptive_command_on_a_pool(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    write_pool(tmp_path / "samples.jsonl")
    out = tmp_path / "out"
    cli.main(
        [
            "adaptive",
            "--pool",
            str(tmp_path / "samples.jsonl"),
            "--orders",
            "3",
            "--output-dir",
            str(out),
        ]
    )
    report = json.loads((out / "replay.json").read_text())
    (entry,) = report["pools"].values()
    assert entry["problems"] == 12 and entry["n"] == 16
    names = [r["rule"] for r in entry["rules"]]
    assert {"maj@16", "ac_beta@0.95", "esc@w5", "rs_beta@0.95,lam1"} <= set(names)
    assert (out / "replay.png").stat().st_size > 0
    text = (out / "replay.md").read_text()
    assert "At the accuracy of maj@16" in text and "Noise: one fresh run of maj@16" in text
    assert text in capsys.readouterr().out


def test_adaptive_pools_in_folders_of_the_same_name_stay_apart(tmp_path):
    """Two runs' pools at a/x/samples.jsonl and b/x/samples.jsonl are two pools in the report
    (they were once both titled x/... and the second silently replaced the first); the same
    file twice is a one-line --pool error."""
    for run in ("a", "b"):
        (tmp_path / run / "x").mkdir(parents=True)
        write_pool(tmp_path / run / "x" / "samples.jsonl")
    out = tmp_path / "out"
    argv = ["adaptive", "--orders", "2", "--no-plot", "--output-dir", str(out)]
    pools = [str(tmp_path / run / "x" / "samples.jsonl") for run in ("a", "b")]
    cli.main([*argv, "--pool", pools[0], "--pool", pools[1]])
    titles = list(json.loads((out / "replay.json").read_text())["pools"])
    assert [t.split("/")[:2] for t in titles] == [["a", "x"], ["b", "x"]]
    with pytest.raises(SystemExit, match="--pool: .* is given twice"):
        cli.main([*argv, "--pool", pools[0], "--pool", pools[0]])


def test_adaptive_command_errors(tmp_path):
    with pytest.raises(SystemExit, match="--run"):
        cli.main(["adaptive"])
    with pytest.raises(SystemExit, match="--pool"):
        cli.main(["adaptive", "--pool", str(tmp_path / "none.jsonl")])
    write_pool(tmp_path / "samples.jsonl", n=4)
    with pytest.raises(SystemExit, match="--reference.*maj@16"):
        cli.main(
            [
                "adaptive",
                "--pool",
                str(tmp_path / "samples.jsonl"),
                "--no-plot",
                "--output-dir",
                str(tmp_path / "o"),
            ]
        )
    with pytest.raises(SystemExit, match="--online"):
        cli.main(["adaptive", "--pool", str(tmp_path / "samples.jsonl"), "--online", "ac:0.9"])
    # Two runs of one folder name would share one pool folder (and reuse each other's samples).
    runs = [str(tmp_path / d / "laser") for d in ("a", "b")]
    with pytest.raises(SystemExit, match="--run: two runs are named 'laser'"):
        cli.main(["adaptive", "--run", runs[0], "--run", runs[1], "--output-dir", str(tmp_path)])


# ---------------------------------------------------------------------------------------------
# `eval --stop-rule`: the eval command sampling adaptively.


@pytest.mark.slow  # a second 20-problem eval run
@pytest.mark.parametrize("slots, mesh", [(0, "none"), (8, "none"), (8, "data=-1,fsdp=1,tensor=1")])
def test_eval_stop_rule_that_never_stops_early_draws_what_eval_draws(
    math500_run, tiny_ckpt, token_ids, eval_dir, tmp_path, slots, mesh
):
    """maj:4 in one round of 4 with every problem in one call is plain `eval --n 4`: round 0's
    seed is the first batch's seed, so the samples are the same; the summary reports the vote.
    With `--slots 8` the calls run through 8 decode slots (on one device, or one per device over
    8 CPU devices) and draw the same samples; their log p(z_c) equal the static decode's within
    the sampler tests' 1e-5, so r_s (beta_v 0.1) within 1e-6."""
    out = tmp_path / "adaptive"
    argv = [*MATH500_ARGV, "--stop-rule", "maj:4", "--round-size", "4", "--slots", str(slots)]
    argv += ["--mesh", mesh]
    cli.main(eval_argv(tiny_ckpt, eval_dir, out, token_ids["<|z|>"], *argv))
    plain = read_rows(math500_run / "samples.jsonl")
    rows = read_rows(out / "samples.jsonl")
    assert len(rows) == len(plain) == 80
    for a, b in zip(rows, plain, strict=True):
        assert {k: a[k] for k in b if k != "r_s"} == {k: v for k, v in b.items() if k != "r_s"}
        assert (a["r_s"] is None) == (b["r_s"] is None)
        if b["r_s"] is not None:
            assert a["r_s"] == (b["r_s"] if slots == 0 else pytest.approx(b["r_s"], abs=1e-6))
        assert a["round"] == 0
    summary = json.loads((out / "summary.json").read_text())
    s = summary["benchmarks"]["math500"]
    assert summary["stop_rule"] == "maj@4" and s["samples_per_problem"] == 4
    assert summary["slots"] == slots
    picked = {r["problem_id"]: r for r in rows if r["picked"]}
    assert s["accuracy"] == pytest.approx(sum(r["correct"] for r in picked.values()) / 20)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--stop-rule", "beta:0.9"], "--stop-rule: stopping rule 'beta:0.9'"),
        (["--stop-rule", "ac:0.9", "--round-size", "3"], "--round-size: must be >= 1 and divide"),
        (["--stop-rule", "ac:0.9", "--resume"], "--resume: not supported with --stop-rule"),
        (["--stop-rule", "ac:0.9", "--slots", "-1"], "--slots: must be >= 0, got -1"),
        (  # 8 fake CPU devices (tests/conftest.py)
            ["--stop-rule", "ac:0.9", "--slots", "4", "--mesh", "data=-1,fsdp=1,tensor=1"],
            "--slots: 4 decode slots do not split over the mesh's 8 batch shards",
        ),
    ],
)
def test_eval_stop_rule_errors(tiny_ckpt, eval_dir, tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message):
        cli.main(eval_argv(tiny_ckpt, eval_dir, tmp_path, 3, *MATH500_ARGV, *extra))


def test_adaptive_benchmarks_are_asked_as_the_run_asks_them(tiny_ckpt, token_ids, tmp_path):
    """`adaptive --run DIR --benchmarks B` on a real-model run encodes B's prompts exactly as the
    run's own evaluations do (its template, instruction, system turn): it once left the
    instruction out, so a chat run's prompts got the default \\boxed{} instruction, all ran over
    rollout.max_prompt_len, and the command crashed on an empty prompt list."""
    import shutil

    import yaml

    from laserjax import task
    from laserjax.commands import adaptive
    from laserjax.config_load import load_config, to_dict

    bench = "arithmetic:+:1-9:1-20:eval"
    cfg = load_config(
        None,
        [
            f"model.path={tiny_ckpt}",
            "model.dtype=float32",
            f"data.train={bench.replace(':eval', ':train')}",
            f"data.eval=[{bench}]",
            "data.reward=last_number",
            "data.template=plain",
            "data.instruction=Answer with the number only.",
            f"tokens.self_reward_token_id={token_ids['<|z|>']}",
            f"tokens.eos_ids=[{token_ids['<|im_end|>']}]",
        ],
    )
    run = tmp_path / "run"
    shutil.copytree(tiny_ckpt, run / "hf")
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    (run / "run_info.json").write_text(json.dumps({"c_ref": -20.0}))
    _, own, _ = task.real_setup(cfg, None, abstract=True)
    setup = adaptive._load_run(str(run), bench, None)
    (problems, ids), (own_problems, own_ids) = setup.task.eval_sets[bench], own.eval_sets[bench]
    assert [p.id for p in problems] == [p.id for p in own_problems] and len(problems) > 0
    assert ids == own_ids
    assert "Answer with the number only." in setup.task.tokenizer.decode(ids[0])
