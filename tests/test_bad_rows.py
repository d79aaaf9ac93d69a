"""Bad rows (issue 13): one jsonl reader, per-row errors, reports by file and reason, a limit.

Every jsonl laserjax reads goes through `laserjax.data.read_jsonl`: a line that is not JSON or not
UTF-8 is one bad row with its line number, never a crash. Training and evaluation data report
what they skipped (console and summary) and refuse a file over `data.max_bad_share`. Also here:
`grade` never writes over its input, a long answer equal to the reference is correct, the exact
reward and voting read the same answer, and data settings the toy task would ignore are errors.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from laserjax import eval_metrics
from laserjax.answers import answer_extractor, exact_reward
from laserjax.config import ConfigError
from laserjax.config_load import load_config
from laserjax.data import BadRow, load_benchmark, load_problems, read_jsonl
from laserjax.reward import Grader, grade_one

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo_cpu.yaml"

GOOD = [{"problem": f"What is {i}+1?", "answer": str(i + 1)} for i in range(5)]
BAD = [
    {"answer": "1"},  # missing problem
    {"problem": "", "answer": "1"},  # empty problem
    {"problem": "   ", "answer": "1"},
    {"problem": "Q", "answer": None},  # missing answer
    {"problem": "Q"},
    {"problem": "Q", "answer": ["1"]},  # not a scalar
    {"problem": "Q", "answer": {"v": 1}},
    {"problem": 7, "answer": "1"},  # not a string
]


def _mixed(path: pathlib.Path) -> pathlib.Path:
    """13 rows: 8 malformed between 5 good ones (the issue's file)."""
    rows = [GOOD[0], *BAD[:4], GOOD[1], GOOD[2], *BAD[4:], GOOD[3], GOOD[4]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _with_bad_bytes(path: pathlib.Path) -> pathlib.Path:
    lines = [json.dumps(r).encode() for r in GOOD]
    lines.insert(2, b'{"problem": "caf\xe9?", "answer": "1"}')  # latin-1, not UTF-8
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_read_jsonl_gives_each_bad_line_its_number_and_reason(tmp_path):
    src = _with_bad_bytes(tmp_path / "a.jsonl")
    with src.open("ab") as f:
        f.write(b"\n{broken\n")
    rows = list(read_jsonl(src))
    assert [n for n, _ in rows] == [1, 2, 3, 4, 5, 6, 8]  # the blank line 7 is no row
    bad = {n: r for n, r in rows if isinstance(r, BadRow)}
    assert set(bad) == {3, 8}
    assert bad[3].reason == "not UTF-8 text (byte 0xe9 at column 17)"
    assert bad[8].reason.startswith("invalid JSON")


def test_a_non_utf8_row_is_one_bad_row_in_training_data(tmp_path):
    problems, report = load_problems(_with_bad_bytes(tmp_path / "t.jsonl"))
    assert len(problems) == 5 and report.rows == 6
    assert report.skipped == [("line 3", "not UTF-8 text (byte 0xe9 at column 17)")]


def test_bad_rows_are_reported_by_reason_with_line_numbers_and_refused_over_the_share(tmp_path):
    problems, report = load_problems(_mixed(tmp_path / "train.jsonl"))
    assert len(problems) == 5 and report.num_skipped == 8
    reasons = report.by_reason()
    assert reasons["problem field 'problem' is empty"] == {"count": 2, "first": [3, 4]}
    assert reasons["answer field 'answer': missing answer"] == {"count": 2, "first": [5, 8]}
    line = report.skipped_line()
    assert "train.jsonl: skipped 8 of 13 rows" in line
    assert "problem field 'problem' is empty x2 (lines 3, 4)" in line
    with pytest.raises(ValueError, match=r"62% of the rows, over data.max_bad_share = 0.1"):
        report.check(0.1, "data.max_bad_share")
    report.check(0.7, "data.max_bad_share")  # allowed when the limit is raised


def test_trainer_refuses_too_many_bad_rows_before_loading_the_model(tmp_path):
    from hf_utils import make_tiny_hf

    from laserjax import toy_task
    from laserjax.trainer import Trainer

    ckpt = make_tiny_hf(tmp_path)
    toy_task.make_tokenizer().save_pretrained(str(ckpt))
    train = _mixed(tmp_path / "train.jsonl")
    cfg = load_config(
        None,
        [
            f"model.path={ckpt}",
            "model.dtype=float32",
            f"data.train={train}",
            "data.reward=exact",
            "data.template=plain",
            "mesh.data=-1",
            "tokens.self_reward_token_id=2",
            f"output_dir={tmp_path / 'o'}",
        ],
    )
    with pytest.raises(ConfigError) as e:
        Trainer(cfg)
    msg = str(e.value)
    assert msg.startswith("config field `data.train`: ") and "skipped 8 of 13 rows" in msg, msg
    assert "over data.max_bad_share = 0.1" in msg and "\n" not in msg
    assert not (tmp_path / "o" / "config.yaml").exists()


def test_exact_reward_and_voting_read_the_same_answer():
    responses = ["44", " 44 ", "45", "44"]
    extract = answer_extractor("exact")
    correct = exact_reward(responses, ["44"] * 4)
    assert correct.tolist() == [1.0, 1.0, 0.0, 1.0]
    answers = [[extract(r) for r in responses]]
    summary = eval_metrics.summarize(correct[None], answers, np.zeros((1, 4)), ks=[4])
    assert summary["accuracy"] == 0.75 and summary["maj@4"] == 1.0  # 0.0 with the boxed extractor


def test_real_data_with_the_exact_reward_votes_on_the_exact_answer(tmp_path):
    from hf_utils import make_tiny_hf

    from laserjax import toy_task
    from laserjax.task import real_setup as _real_setup

    ckpt = make_tiny_hf(tmp_path)
    toy_task.make_tokenizer().save_pretrained(str(ckpt))
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in GOOD))
    cfg = load_config(
        None,
        [
            f"model.path={ckpt}",
            "model.dtype=float32",
            f"data.train={train}",
            "data.reward=exact",
            "data.template=plain",
            "tokens.self_reward_token_id=2",
        ],
    )
    _, task, _ = _real_setup(cfg, None, abstract=True)
    assert task.extract_fn is answer_extractor("exact")
    assert task.extract_fn("44") == "44"  # the boxed extractor gives None here


def test_training_reports_skipped_rows_on_the_console_and_for_the_summary(tmp_path, capsys):
    from hf_utils import make_tiny_hf

    from laserjax import toy_task
    from laserjax.task import real_setup as _real_setup

    ckpt = make_tiny_hf(tmp_path)
    toy_task.make_tokenizer().save_pretrained(str(ckpt))
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in [*GOOD, *GOOD, BAD[0]]))
    cfg = load_config(
        None,
        [
            f"model.path={ckpt}",
            "model.dtype=float32",
            f"data.train={train}",
            "data.reward=exact",
            "data.template=plain",
            "tokens.self_reward_token_id=2",
        ],
    )
    _, _, info = _real_setup(cfg, None, abstract=True)
    assert info["data_rows_skipped"] == {
        str(train): {
            "rows": 11,
            "loaded": 10,
            "skipped": 1,
            "reasons": {"problem field 'problem' is missing": {"count": 1, "first": [11]}},
        }
    }
    assert (
        f"data: {train}: skipped 1 of 11 rows: problem field 'problem' is missing x1 (line 11)"
        in (capsys.readouterr().err)
    )


def test_a_long_answer_equal_to_the_reference_is_correct():
    ref = "1" * 20_000
    response = f"so the answer is \\boxed{{{ref}}}"
    assert grade_one(response, ref) == 1.0
    with Grader(1, timeout_s=5.0) as g:
        res = g.grade_detailed([response, f"\\boxed{{{'2' * 20_000}}}"], [ref, ref])
        assert (res[0].correct, res[0].status) == (1.0, "ok")
        assert (res[1].correct, res[1].status) == (0.0, "too_long")  # unequal: not parsed
        assert g.stats["ipc"] == 0
    assert grade_one("\\boxed{44.0}", "44") == 1.0  # the numeric fast path


def _grade(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "laserjax", "grade", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_grade_refuses_to_write_over_its_input(tmp_path):
    src = tmp_path / "g.jsonl"
    src.write_text(json.dumps({"response": "\\boxed{2}", "answer": "2"}) + "\n")
    before = src.read_bytes()
    p = _grade("--input", str(src), "--output", str(tmp_path / "." / "g.jsonl"))
    assert p.returncode == 1 and "is the --input file" in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert src.read_bytes() == before


def test_grade_counts_a_non_utf8_row_as_one_bad_row(tmp_path, capsys):
    from laserjax import cli

    src = tmp_path / "g.jsonl"
    src.write_bytes(
        json.dumps({"response": "\\boxed{2}", "answer": "2"}).encode()
        + b"\n"
        + b'{"response": "\\\\boxed{caf\xe9}", "answer": "2"}\n'
    )
    out = tmp_path / "out.jsonl"
    cli.main(["grade", "--input", str(src), "--output", str(out), "--workers", "1"])
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["graded"] == 1 and summary["correct"] == 1 and summary["errors"] == 1
    assert "row 2: not UTF-8 text" in captured.err
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["correct"] for r in rows] == [True, False]


@pytest.mark.parametrize("field", ["data.train=/nope.jsonl", "data.eval=[math500]"])
def test_data_settings_the_toy_task_would_ignore_are_errors(field):
    key = field.split("=")[0]
    with pytest.raises(ConfigError, match=rf"`{key}`: the toy task \(model.toy\) generates"):
        load_config(DEMO, [field])


def test_an_eval_benchmark_with_a_non_utf8_row_names_file_and_line(tmp_path):
    bench = load_benchmark(_with_bad_bytes(tmp_path / "b.jsonl"))
    assert len(bench.problems) == 5
    assert bench.report.skipped_line().endswith(
        "not UTF-8 text (byte 0xe9 at column 17) x1 (line 3)"
    )


def test_the_eval_command_reports_and_refuses_bad_benchmark_rows(tmp_path, capsys):
    import argparse

    from laserjax.commands.eval import EvalError, _load_benchmarks

    def args(path: pathlib.Path, share: float) -> argparse.Namespace:
        return argparse.Namespace(
            benchmarks=str(path), eval_dir=None, n=2, limit=None, max_bad_share=share
        )

    src = _with_bad_bytes(tmp_path / "b.jsonl")
    [(bench, n)] = _load_benchmarks(args(src, 0.2))
    assert len(bench.problems) == 5 and n == 2
    err = capsys.readouterr().err
    assert f"eval: {src}: skipped 1 of 6 rows: not UTF-8 text" in err and "(line 3)" in err
    with pytest.raises(EvalError, match=r"eval --benchmarks: .*skipped 8 of 13 rows.*--max-bad"):
        _load_benchmarks(args(_mixed(tmp_path / "m.jsonl"), 0.1))
