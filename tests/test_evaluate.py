"""The evaluation core and the `eval` command (laserjax/evaluate.py, LASER_SPEC section 5).

- `evaluate_prompts` on a tiny random laserjax model with a fake reward: its arrays against the
  sampler called directly (exact), its summary against `eval_metrics` on the same arrays, the
  per-batch callback, the resume invariant (a run continued at a batch boundary draws what the
  uninterrupted run draws) and the summary rebuilt from the written records.
- `python -m laserjax eval` end to end on CPU: a tiny random Qwen2 checkpoint written by
  transformers with a byte-level BPE tokenizer trained here (loaded back by transformers as the
  Qwen2Tokenizer a real Qwen2.5 checkpoint gets), on the first 20 MATH500 problems, n = 4, 32 new
  tokens; the paper's per-benchmark n when --n is absent; --resume after a crash; input errors.
"""

from __future__ import annotations

import json
import math
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from laserjax import cli, eval_metrics
from laserjax.answers import extract_boxed
from laserjax.evaluate import (
    Scoring,
    average_over_benchmarks,
    evaluate_prompts,
    format_table,
    result_from_records,
)
from laserjax.model import Transformer, TransformerConfig
from laserjax.reward import grade_one
from laserjax.sampler import Sampler

# ---------------------------------------------------------------------------------------------
# evaluate_prompts with a fake reward.

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
EOS, PAD, ZC, T = (0, 1, 2, 3), 63, 62, 8
PROMPTS = [
    [10, 11, 12],
    [13, 14, 15, 16, 17],
    [20],
    [30, 31, 32, 33],
    [40, 41],
    [50],
    [51, 52, 53],
    [54],
]
ANSWERS = [str(i % 3) for i in range(len(PROMPTS))]
SCORING = Scoring(beta_v=0.1, c_ref=-8.0)


class IdTokenizer:
    """Decodes token ids to their decimal strings: responses are the token ids as text."""

    def batch_decode(self, rows, skip_special_tokens=True):
        return [" ".join(str(int(t)) for t in row) for row in rows]


def fake_reward(responses: list[str], answers: list[str]) -> np.ndarray:
    """Correct when the response's first token id is congruent to the answer mod 3."""
    return np.asarray(
        [float(int(r.split()[0]) % 3 == int(a)) for r, a in zip(responses, answers, strict=True)],
        np.float32,
    )


def first_token_answer(response: str) -> str | None:
    """The "answer" of a response: its first token id mod 3 (so votes collide), none when the
    response is a single token."""
    tokens = response.split()
    return str(int(tokens[0]) % 3) if len(tokens) > 1 else None


@pytest.fixture(scope="module")
def toy_sampler() -> Sampler:
    graphdef, state = nnx.split(Transformer(CFG, rngs=nnx.Rngs(0)))
    state = jax.tree.map(lambda x: x * 5.0 if x.ndim >= 2 else x, state)  # O(1) logits
    return Sampler(
        nnx.merge(graphdef, state),
        eos_ids=EOS,
        pad_id=PAD,
        self_reward_token_id=ZC,
        max_new_tokens=T,
        prompt_buckets=(8,),
    )


def run_eval(sampler, prompts, answers, **kw):
    args = dict(
        n=4,
        reward_fn=fake_reward,
        extract_fn=first_token_answer,
        scoring=SCORING,
        temperature=1.0,
        seed=7,
        batch_prompts=4,
    )
    return evaluate_prompts(sampler, IdTokenizer(), prompts, answers, **(args | kw))


def nan_equal_dicts(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]) or (math.isnan(a[k]) and math.isnan(b[k])), (k, a[k], b[k])


def test_evaluate_prompts_arrays_and_summary_against_sampler_and_eval_metrics(toy_sampler):
    seen = []
    res = run_eval(toy_sampler, PROMPTS, ANSWERS, on_batch=seen.append)
    p, n = len(PROMPTS), 4

    # The arrays are the sampler's own output (called directly with the same seeds: seed +
    # start of each batch of 4 prompts), graded by the reward function.
    rows = [
        toy_sampler.sample(PROMPTS[start : start + 4], k=n, temperature=1.0, seed=7 + start)
        for start in (0, 4)
    ]
    lengths = np.concatenate([r.lengths for r in rows])
    finished = np.concatenate([r.finished for r in rows])
    logp = np.concatenate([r.logp_zc for r in rows])
    texts = [
        t
        for r in rows
        for t in IdTokenizer().batch_decode(
            [row[:m] for row, m in zip(r.response_tokens, r.lengths, strict=True)]
        )
    ]
    np.testing.assert_array_equal(res.lengths_pn.ravel(), lengths)
    np.testing.assert_array_equal(res.truncated_pn.ravel(), ~finished)
    assert [t for row in res.responses_pn for t in row] == texts
    refs = [ANSWERS[i // n] for i in range(p * n)]
    np.testing.assert_array_equal(res.correct_pn.ravel(), fake_reward(texts, refs))
    assert [a for row in res.answers_pn for a in row] == [first_token_answer(t) for t in texts]
    # r_s = beta_v * (log p(z_c) - c_ref) for finished samples (LASER_SPEC section 1), else NaN.
    expect_rs = np.where(finished, 0.1 * (logp.astype(np.float64) + 8.0), np.nan)
    np.testing.assert_allclose(res.scores_pn.ravel(), expect_rs, rtol=0, atol=1e-6)
    assert np.isnan(res.scores_pn).any() and np.isfinite(res.scores_pn).any(), (
        "the case should hold truncated and finished samples"
    )
    assert 0 < res.correct_pn.mean() < 1, "the case should hold correct and incorrect samples"

    # The summary is eval_metrics on those arrays, metric by metric.
    s = res.summary
    c, a, sc = res.correct_pn, res.answers_pn, res.scores_pn
    assert s["accuracy"] == eval_metrics.avg_at_n(c)
    for k in (1, 2, 4):
        assert s[f"pass@{k}"] == eval_metrics.pass_at_k(c, k)
        assert s[f"maj@{k}"] == eval_metrics.maj_at_k(a, c, k)
        assert s[f"weighted_maj@{k}"] == eval_metrics.weighted_maj_at_k(a, c, sc, k)
        assert s[f"best_of_{k}"] == eval_metrics.best_of_n(c, sc, k)
    sv = eval_metrics.self_verification(c, sc)
    assert (s["sv_acc_correct"], s["sv_acc_incorrect"], s["sv_f1"], s["sv_unscored"]) == (
        sv.acc_correct,
        sv.acc_incorrect,
        sv.f1,
        sv.n_unscored,
    )
    assert s["sv_unscored"] == int((~finished).sum())
    assert s["auroc"] == eval_metrics.auroc(c, sc) and s["ece"] == eval_metrics.ece(c, sc)
    assert s["response_len_mean"] == lengths.mean()
    assert s["truncated_frac"] == (~finished).mean()
    assert (s["problems"], s["n"]) == (p, n)

    # The callback saw each batch once, in order, before the result came back.
    assert [b.start for b in seen] == [0, 4]
    assert [b.num_prompts for b in seen] == [4, 4]
    np.testing.assert_array_equal(np.concatenate([b.correct for b in seen]), c.ravel())


def test_continuing_at_a_batch_boundary_draws_the_same_samples(toy_sampler):
    full = run_eval(toy_sampler, PROMPTS, ANSWERS)
    tail = run_eval(toy_sampler, PROMPTS[4:], ANSWERS[4:], seed=7 + 4)
    np.testing.assert_array_equal(tail.lengths_pn, full.lengths_pn[4:])
    assert tail.responses_pn == full.responses_pn[4:]
    np.testing.assert_array_equal(tail.scores_pn, full.scores_pn[4:])


def test_summary_rebuilt_from_records_equals_the_run(toy_sampler):
    res = run_eval(toy_sampler, PROMPTS, ANSWERS)
    ids = [f"p{i}" for i in range(len(PROMPTS))]
    records = json.loads(json.dumps(res.records(ids)))  # through JSON, as samples.jsonl
    back = result_from_records(records[::-1], ids, n=4)  # any row order
    nan_equal_dicts(back.summary, res.summary)
    with pytest.raises(ValueError, match="1 samples missing"):
        result_from_records(records[1:], ids, n=4)
    with pytest.raises(ValueError, match="duplicate"):
        result_from_records(records + records[:1], ids, n=4)


def test_evaluate_prompts_rejects_mismatched_inputs(toy_sampler):
    with pytest.raises(ValueError, match="2 prompts but 1 answers"):
        run_eval(toy_sampler, PROMPTS[:2], ANSWERS[:1])
    with pytest.raises(ValueError, match="rewards for"):
        run_eval(toy_sampler, PROMPTS[:4], ANSWERS[:4], reward_fn=lambda r, a: np.zeros(1))


def test_average_over_benchmarks_at_each_n_and_shared_k():
    a = {
        "problems": 2,
        "n": 2,
        "accuracy": 0.5,
        "pass@1": 0.5,
        "pass@2": 1.0,
        "maj@2": 0.5,
        "sv_f1": 0.2,
        "auroc": math.nan,
        "sv_unscored": 1,
    }
    b = {
        "problems": 1,
        "n": 4,
        "accuracy": 0.25,
        "pass@1": 0.25,
        "pass@2": 0.5,
        "pass@4": 1.0,
        "maj@2": 0.0,
        "maj@4": 1.0,
        "sv_f1": 0.4,
        "auroc": 0.75,
        "sv_unscored": 2,
    }
    avg = average_over_benchmarks({"a": a, "b": b})
    assert avg["accuracy"] == pytest.approx(0.375)
    assert avg["pass@n"] == pytest.approx((1.0 + 1.0) / 2)  # pass@2 of a, pass@4 of b
    assert avg["maj@n"] == pytest.approx((0.5 + 1.0) / 2)
    assert avg["pass@2"] == pytest.approx(0.75) and "pass@4" not in avg
    assert avg["auroc"] == 0.75  # undefined on a: the mean over the benchmarks defining it
    assert (avg["problems"], avg["samples"], avg["sv_unscored"]) == (3, 8, 3)
    table = format_table({"a": a, "b": b}, avg)
    assert "average" in table and "2 x 2" in table and "1 x 4" in table


# ---------------------------------------------------------------------------------------------
# The command on a tiny Hugging Face checkpoint.

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|z|>"]
CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    r"Please reason step by step, and put your final answer within \boxed{}.",
    r"The answer is $\boxed{\frac{1}{2}}$, so x^2 + y_1 = 3 and (a, b) = \sqrt{5} \pi.",
    "Question: what is the value of 0 1 2 3 4 5 6 7 8 9? Answer: user assistant",
]
VOCAB = 320


def save_tiny_tokenizer(model_dir: pathlib.Path) -> None:
    """A byte-level BPE (any text encodes) with Qwen-style special tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(
            vocab_size=VOCAB,
            special_tokens=SPECIAL,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    assert tok.get_vocab_size() == VOCAB
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>", chat_template=CHAT
    ).save_pretrained(model_dir)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> pathlib.Path:
    from hf_utils import make_tiny_hf

    path = make_tiny_hf(tmp_path_factory.mktemp("ckpt"), "qwen2_tied", vocab_size=VOCAB)
    save_tiny_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def token_ids(tiny_ckpt) -> dict[str, int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    return {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}


def eval_argv(ckpt, eval_dir, out, zc, *extra) -> list[str]:
    return [
        "eval",
        "--model",
        str(ckpt),
        "--eval-dir",
        str(eval_dir),
        "--output-dir",
        str(out),
        "--z-token-id",
        str(zc),
        "--dtype",
        "float32",
        "--mesh",
        "none",
        "--grader-workers",
        "2",
        *extra,
    ]


def read_rows(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


SAMPLE_KEYS = {
    "benchmark",
    "problem_id",
    "sample",
    "response",
    "extracted_answer",
    "reference",
    "correct",
    "r_s",
    "length",
    "truncated",
}


MATH500_ARGV = [
    "--benchmarks",
    "math500",
    "--limit",
    "20",
    "--n",
    "4",
    "--max-new-tokens",
    "32",
    "--batch-prompts",
    "20",
]


_MATH500_RUNS: dict[pathlib.Path, pathlib.Path] = {}


@pytest.fixture
def math500_run(tiny_ckpt, token_ids, eval_dir, tmp_path_factory):
    """The issue's run: 20 MATH500 problems, n = 4, 32 new tokens, in one sampler batch (one
    compile); run once per checkpoint (`eval_dir` is function-scoped, so this fixture is too)."""
    if tiny_ckpt not in _MATH500_RUNS:
        out = tmp_path_factory.mktemp("eval") / "out"
        cli.main(eval_argv(tiny_ckpt, eval_dir, out, token_ids["<|z|>"], *MATH500_ARGV))
        _MATH500_RUNS[tiny_ckpt] = out
    return _MATH500_RUNS[tiny_ckpt]


def test_eval_command_end_to_end_math500(math500_run, token_ids, eval_dir):
    from laserjax.data import load_benchmark

    out = math500_run
    rows = read_rows(out / "samples.jsonl")
    assert len(rows) == 20 * 4
    assert all(set(r) == SAMPLE_KEYS for r in rows)
    problems = load_benchmark("math500", eval_dir).problems[:20]
    assert [(r["problem_id"], r["sample"]) for r in rows] == [
        (p.id, j) for p in problems for j in range(4)
    ]
    assert all(r["reference"] == problems[i // 4].answer for i, r in enumerate(rows))
    for r in rows:
        assert 1 <= r["length"] <= 32
        # Truncated samples (no EOS within 32 tokens) have no z_c read, hence no score.
        assert (r["r_s"] is None) == r["truncated"]
        assert not r["truncated"] or r["length"] == 32
        # The grade is the paper's eval rule: last \boxed, math-verify, no single-box gate.
        assert r["extracted_answer"] == extract_boxed(r["response"])
        assert r["correct"] == bool(grade_one(r["response"], r["reference"]))
    finished = [r for r in rows if not r["truncated"]]
    assert finished and len(finished) < len(rows), "want finished and truncated samples"

    summary = json.loads((out / "summary.json").read_text())
    s = summary["benchmarks"]["math500"]
    expected_keys = {
        "problems",
        "n",
        "accuracy",
        "sv_acc_correct",
        "sv_acc_incorrect",
        "sv_f1",
        "sv_unscored",
        "auroc",
        "auroc_within",
        "ece",
        "response_len_mean",
        "truncated_frac",
        "prompts_over_length",
    }
    expected_keys |= {f"{m}@{k}" for m in ("pass", "maj", "weighted_maj") for k in (1, 2, 4)}
    expected_keys |= {f"best_of_{k}" for k in (1, 2, 4)}
    assert set(s) == expected_keys
    assert (s["problems"], s["n"]) == (20, 4)
    assert s["accuracy"] == pytest.approx(np.mean([r["correct"] for r in rows]))
    assert s["sv_unscored"] == len(rows) - len(finished)
    assert s["response_len_mean"] == pytest.approx(np.mean([r["length"] for r in rows]))
    avg = summary["average"]
    assert {
        "accuracy",
        "pass@n",
        "maj@n",
        "weighted_maj@n",
        "best_of_n",
        "sv_f1",
        "auroc",
        "ece",
        "samples",
    } <= set(avg)
    assert avg["accuracy"] == s["accuracy"] and avg["samples"] == 80
    assert summary["settings"]["benchmarks"] == {"math500": 4}
    assert summary["settings"]["eos_ids"] == [token_ids["<|im_end|>"]]  # the tokenizer's EOS
    assert summary["settings"]["pad_id"] == token_ids["<|endoftext|>"]  # the tokenizer's pad


@pytest.mark.slow
def test_eval_command_resumes_after_a_crash(tiny_ckpt, token_ids, eval_dir, tmp_path):
    argv = [
        "--benchmarks",
        "math500,amc23",
        "--limit",
        "5",
        "--n",
        "2",
        "--max-new-tokens",
        "8",
        "--batch-prompts",
        "2",
        "--eos-ids",
        ",".join(str(i) for i in range(40) if i != token_ids["<|z|>"]),
    ]
    zc = token_ids["<|z|>"]
    whole_dir = tmp_path / "whole"
    cli.main(eval_argv(tiny_ckpt, eval_dir, whole_dir, zc, *argv))
    whole = (whole_dir / "samples.jsonl").read_text().splitlines()
    assert len(whole) == 2 * 5 * 2
    # A crash while writing amc23's second batch: math500 whole, amc23's first batch (2
    # problems x 2), one sample of its third problem, and a torn line.
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    (crashed / "eval_config.json").write_text((whole_dir / "eval_config.json").read_text())
    (crashed / "samples.jsonl").write_text("\n".join(whole[:15]) + "\n" + whole[15][:30])
    with pytest.raises(SystemExit, match="--resume to continue"):
        cli.main(eval_argv(tiny_ckpt, eval_dir, crashed, zc, *argv))
    with pytest.raises(SystemExit, match="settings differ .*seed: 0 -> 1"):
        cli.main(eval_argv(tiny_ckpt, eval_dir, crashed, zc, *argv, "--resume", "--seed", "1"))
    cli.main(eval_argv(tiny_ckpt, eval_dir, crashed, zc, *argv, "--resume"))
    # amc23's second batch is sampled again with its own seed: the file is the uninterrupted
    # run's, and so is the summary.
    assert (crashed / "samples.jsonl").read_text().splitlines() == whole
    summaries = [json.loads((d / "summary.json").read_text()) for d in (whole_dir, crashed)]
    assert summaries[0]["benchmarks"] == summaries[1]["benchmarks"]
    assert summaries[0]["average"] == summaries[1]["average"]


def test_eval_command_paper_n_per_benchmark(tiny_ckpt, token_ids, eval_dir, tmp_path):
    out = tmp_path / "out"
    # Many EOS ids (all but z_c below 64): most samples finish within 6 tokens.
    eos = ",".join(str(i) for i in range(64) if i != token_ids["<|z|>"])
    cli.main(
        eval_argv(
            tiny_ckpt,
            eval_dir,
            out,
            token_ids["<|z|>"],
            "--benchmarks",
            "math500,aime24",
            "--limit",
            "2",
            "--max-new-tokens",
            "6",
            "--eos-ids",
            eos,
        )
    )
    rows = read_rows(out / "samples.jsonl")
    counts = {b: sum(r["benchmark"] == b for r in rows) for b in ("math500", "aime24")}
    assert counts == {"math500": 2 * 2, "aime24": 2 * 32}  # n = 2 and 32, as the paper
    summary = json.loads((out / "summary.json").read_text())
    assert {b: s["n"] for b, s in summary["benchmarks"].items()} == {"math500": 2, "aime24": 32}
    assert "maj@32" in summary["benchmarks"]["aime24"]
    assert "maj@32" not in summary["average"] and "maj@n" in summary["average"]
    assert summary["settings"]["eos_ids"] == [int(e) for e in eos.split(",")]
    assert sum(r["r_s"] is not None for r in rows) > len(rows) // 2


@pytest.mark.slow
def test_eval_command_on_a_mesh_matches_one_device(tiny_ckpt, token_ids, eval_dir, tmp_path):
    """Data-parallel over the 8 fake CPU devices: the sampler draws per row from the seed, so
    the samples are the single-device ones; r_s to 1e-5 (float32 reductions may differ)."""
    argv = [
        "--benchmarks",
        "math500",
        "--limit",
        "4",
        "--n",
        "2",
        "--max-new-tokens",
        "8",
        "--eos-ids",
        ",".join(str(i) for i in range(40) if i != token_ids["<|z|>"]),
    ]
    zc = token_ids["<|z|>"]
    cli.main(eval_argv(tiny_ckpt, eval_dir, tmp_path / "one", zc, *argv))
    # The later --mesh wins over eval_argv's `--mesh none`.
    cli.main(
        eval_argv(
            tiny_ckpt, eval_dir, tmp_path / "mesh", zc, *argv, "--mesh", "data=-1,fsdp=1,tensor=1"
        )
    )
    one, mesh = (read_rows(tmp_path / d / "samples.jsonl") for d in ("one", "mesh"))
    assert len(jax.devices()) == 8 and len(one) == len(mesh) == 8
    for a, b in zip(one, mesh, strict=True):
        assert {k: v for k, v in a.items() if k != "r_s"} == {
            k: v for k, v in b.items() if k != "r_s"
        }
        assert (a["r_s"] is None) == (b["r_s"] is None)
        if a["r_s"] is not None:
            assert abs(a["r_s"] - b["r_s"]) < 1e-5
    assert any(r["r_s"] is not None for r in one)


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--benchmarks", "math5000"],
            "neither one of math500, amc23, aime24, aime25, olympiadbench",
        ),
        (["--benchmarks", "math500", "--n", "0"], "--n: must be >= 1"),
        (["--benchmarks", "math500", "--mesh", "data=2,model=4"], "--mesh: 'model=4'"),
        (["--benchmarks", "math500", "--top-p", "1.5"], "--top-p: .*top_p"),
        (["--benchmarks", "math500", "--eos-ids", "2,x"], "--eos-ids: expected integers"),
    ],
)
def test_eval_command_input_errors(tiny_ckpt, eval_dir, tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message):
        cli.main(eval_argv(tiny_ckpt, eval_dir, tmp_path, 3, *extra))


def test_eval_command_token_id_errors(tiny_ckpt, token_ids, eval_dir, tmp_path):
    # The default z_c (Qwen2.5's 151652) is outside this model's vocabulary of 320.
    argv = [
        "eval",
        "--model",
        str(tiny_ckpt),
        "--eval-dir",
        str(eval_dir),
        "--benchmarks",
        "math500",
        "--output-dir",
        str(tmp_path),
        "--mesh",
        "none",
    ]
    with pytest.raises(
        SystemExit,
        match=r"--z-token-id: .*151652 is outside the vocabulary "
        r"\[0, 320\)",
    ):
        cli.main(argv)
    eos = token_ids["<|im_end|>"]
    with pytest.raises(SystemExit, match="--z-token-id: .*EOS id"):
        cli.main(argv + ["--z-token-id", str(eos)])
    with pytest.raises(SystemExit, match=r"--eos-ids: .*EOS id 999 is outside \[0, 320\)"):
        cli.main(argv + ["--z-token-id", "3", "--eos-ids", "999"])


def test_eval_command_needs_n_for_other_files(tiny_ckpt, tmp_path):
    data = tmp_path / "mine.jsonl"
    data.write_text(json.dumps({"problem": "1 + 1?", "answer": "2"}) + "\n")
    with pytest.raises(SystemExit, match="--n: .*mine.jsonl' is not one of the paper's"):
        cli.main(
            [
                "eval",
                "--model",
                str(tiny_ckpt),
                "--benchmarks",
                str(data),
                "--output-dir",
                str(tmp_path / "o"),
                "--z-token-id",
                "3",
            ]
        )


def test_default_output_dir_is_named_after_the_model():
    from laserjax.commands.eval import default_output_dir

    assert default_output_dir("Qwen/Qwen2.5-Math-7B") == "runs/eval/Qwen2.5-Math-7B"
    assert default_output_dir("/ckpts/step_200/") == "runs/eval/step_200"
