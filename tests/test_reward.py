"""The verifier reward (LASER_SPEC section 6): extraction, equivalence, the worker pool, `grade`."""

import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from laserjax import cli
from laserjax.answers import (
    answer_to_str,
    count_boxed,
    extract_boxed,
    extract_last_number,
    last_number_match,
    normalize_answer,
)
from laserjax.reward import Grader, grade_one

# Seconds a result may arrive after its deadline: the kill, the reply and a loaded 2-core machine.
DEADLINE_SLACK_S = 2.0


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so $\boxed{3}$.", "3"),
        (r"first \boxed{1}, finally \boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
        (r"\fbox{7}", "7"),
        (r"\boxed {12}", "12"),
        ("the answer is $\\boxed 5$.", "5"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces are not structure
        (r"\boxed{\left\{ x \right.}", r"\left\{ x \right."),
        (r"\boxed{\boxed{4}}", "4"),  # the last box opened is the inner one
        ("no answer here", None),
        (r"\boxed{1} and then a truncated \boxed{2", None),  # the final answer is malformed
        (r"\boxed{", None),
        (r"\boxed", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_count_boxed():
    assert count_boxed("nothing") == 0
    assert count_boxed(r"\boxed{1}") == 1
    assert count_boxed(r"\boxed{1} \fbox{2} \boxed 3") == 3


def test_answer_to_str_normalises_numbers_and_rejects_the_rest():
    assert answer_to_str(70) == "70"  # aime25 stores integers
    assert answer_to_str(70.0) == "70"
    assert answer_to_str(0.5) == "0.5"
    assert answer_to_str("  \\frac{1}{2} ") == "\\frac{1}{2}"
    for bad in (True, [1], None, float("nan")):
        with pytest.raises(TypeError, match="reference answer"):
            answer_to_str(bad)


def test_normalize_answer_drops_presentation_only():
    assert normalize_answer(r"\left( 3, \dfrac{\pi}{2} \right)") == r"(3,\frac{\pi}{2})"
    assert normalize_answer(r"$x = 1$") == "x=1"


# (response, reference answer, expected r_v) graded by math-verify; the exact-match fast path
# would accept only the first of each pair.
HAND_CASES = [
    (r"The answer is \boxed{0.5}.", r"\frac{1}{2}", 1.0),
    (r"\boxed{\frac{1}{2}}", "0.5", 1.0),
    (r"\boxed{\left(3,\frac{\pi}{2}\right)}", r"\left( 3, \frac{\pi}{2} \right)", 1.0),
    (r"\boxed{(3, \frac{\pi}{2})}", r"\left( 3, \frac{\pi}{2} \right)", 1.0),
    (r"\boxed{70}", 70, 1.0),
    (r"\boxed{\frac{6}{8}}", r"\frac34", 1.0),
    (r"\boxed{4}", "5", 0.0),
    (r"\boxed{\frac{1}{3}}", "0.5", 0.0),
    (r"\boxed{(3, \pi)}", r"\left( 3, \frac{\pi}{2} \right)", 0.0),
    (r"\boxed{69}", 70, 0.0),
    ("I think it is 5", "5", 0.0),  # no boxed answer
]


@pytest.mark.parametrize("response, answer, expected", HAND_CASES)
def test_grade_one_hand_cases(response, answer, expected):
    assert grade_one(response, answer) == expected


def test_single_boxed_gate():
    two = r"Maybe \boxed{2}? No: \boxed{3}."
    assert grade_one(two, "3") == 1.0  # the last box counts
    assert grade_one(two, "3", require_single_boxed=True) == 0.0
    assert grade_one(r"So \boxed{3}.", "3", require_single_boxed=True) == 1.0


@pytest.fixture(scope="module")
def grader():
    """No length cap, 1.5 s deadline: pathological answers reach math-verify and must be killed."""
    with Grader(2, timeout_s=1.5, max_answer_chars=None) as g:
        g.start()
        yield g


def _check_hand_cases(g: Grader) -> None:
    responses, answers, expected = zip(*HAND_CASES, strict=True)
    got = g.grade_batch(list(responses), list(answers))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, np.asarray(expected, np.float32))


def test_grader_batch_matches_hand_cases(grader):
    _check_hand_cases(grader)
    got = grader.grade_batch(
        [r"Maybe \boxed{2}? No: \boxed{3}."] * 2, ["3", "3"], require_single_boxed=True
    )
    np.testing.assert_array_equal(got, [0.0, 0.0])


PATHOLOGICAL = {
    "10,000 nested braces": "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}",
    "power tower": r"\boxed{9^{9^{9^{9}}}}",
    "1 MB answer": "\\boxed{" + "1+" * 500_000 + "1}",
}


@pytest.mark.parametrize("name", list(PATHOLOGICAL))
def test_pathological_answer_is_killed_at_deadline_and_pool_survives(grader, name):
    grader.start()  # the pool is warm: the clock below measures grading only
    restarts = grader.stats["worker_restarts"]
    t0 = time.monotonic()
    [result] = grader.grade_detailed([PATHOLOGICAL[name]], ["1"])
    elapsed = time.monotonic() - t0
    assert result.correct == 0.0
    assert result.status == "timeout"
    assert elapsed < grader.timeout_s + DEADLINE_SLACK_S, f"{name} took {elapsed:.1f} s"
    assert grader.stats["worker_restarts"] == restarts + 1
    _check_hand_cases(grader)  # the replaced worker and the other one still grade correctly


def test_cheap_pathological_inputs_short_circuit():
    # Default cap: a huge answer is never parsed; no box at all never leaves the caller.
    with Grader(2, timeout_s=1.0) as g:
        t0 = time.monotonic()
        results = g.grade_detailed(
            [
                "x" * 1_000_000,
                "\\boxed{",
                PATHOLOGICAL["10,000 nested braces"],
                PATHOLOGICAL["1 MB answer"],
                r"\boxed{\frac{1}{2}}",
            ],
            ["1", "1", "1", "1", r"\frac{1}{2}"],
        )
        elapsed = time.monotonic() - t0
        assert [r.status for r in results] == ["no_boxed", "no_boxed", "too_long", "too_long", "ok"]
        assert [r.correct for r in results] == [0.0, 0.0, 0.0, 0.0, 1.0]
        assert g.stats["ipc"] == 0 and g.stats["workers_started"] == 0
        assert elapsed < 1.0


def test_pool_replaces_workers_that_died_between_batches(grader):
    grader.start()
    for w in grader._workers:
        w.process.kill()
        w.process.wait()
    _check_hand_cases(grader)


def test_grader_rejects_mismatched_lengths(grader):
    with pytest.raises(ValueError, match="2 responses but 1 answers"):
        grader.grade_batch(["a", "b"], ["1"])


def _math500_rows(eval_dir):
    with open(eval_dir / "math500.jsonl") as f:
        return [json.loads(line) for line in f]


def test_math500_gold_solutions_accepted_by_math_verify(eval_dir):
    """The paper's recipe accepts all 500 gold solutions; every one goes through math-verify."""
    rows = _math500_rows(eval_dir)
    with Grader(2, fast_path=False) as g:
        got = g.grade_batch(
            [r["solution"] for r in rows], [r["answer"] for r in rows], require_single_boxed=False
        )
        assert g.stats["ipc"] == 500 and g.stats["timeouts"] == 0
    assert int(got.sum()) == 500, [r["unique_id"] for r, c in zip(rows, got, strict=True) if not c]


def test_grade_command_on_math500(eval_dir, tmp_path, capsys):
    out = tmp_path / "graded.jsonl"
    cli.main(
        [
            "grade",
            "--input",
            str(eval_dir / "math500.jsonl"),
            "--response-field",
            "solution",
            "--answer-field",
            "answer",
            "--id-field",
            "unique_id",
            "--output",
            str(out),
            "--workers",
            "2",
        ]
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["graded"] == 500 and summary["correct"] == 500
    assert summary["accuracy"] == 1.0 and summary["errors"] == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 500
    assert rows[0]["id"] == "test/precalculus/807.json"
    assert rows[0]["extracted"] == r"\left( 3, \frac{\pi}{2} \right)" and rows[0]["correct"]


def test_grade_command_reports_bad_rows(tmp_path, capsys):
    src = tmp_path / "responses.jsonl"
    src.write_text(
        "\n".join(
            [
                json.dumps({"id": "a", "response": r"\boxed{70}", "answer": 70}),
                json.dumps({"id": "b", "response": r"\boxed{1}"}),
                "{not json",
                json.dumps({"id": "d", "answer": "2"}),
                json.dumps({"id": "e", "response": r"\boxed{\frac{1}{2}}", "answer": "0.5"}),
                json.dumps({"id": "f", "response": "no box", "answer": "3"}),
            ]
        )
        + "\n"
    )
    out = tmp_path / "out.jsonl"
    cli.main(
        [
            "grade",
            "--input",
            str(src),
            "--output",
            str(out),
            "--id-field",
            "id",
            "--workers",
            "1",
            "--require-single-boxed",
        ]
    )
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["graded"] == 3 and summary["correct"] == 2 and summary["errors"] == 3
    assert summary["accuracy"] == pytest.approx(2 / 3)
    assert "row 2: missing field 'answer' (--answer-field)" in captured.err
    assert "row 3: invalid JSON" in captured.err
    assert "row 4: missing field 'response' (--response-field)" in captured.err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r.get("correct") for r in rows] == [True, False, False, False, True, False]
    assert rows[1]["error"].startswith("row 2:") and rows[1]["id"] == "b"
    assert rows[5]["status"] == "no_boxed"


def test_grader_started_from_a_thread_outlives_that_thread():
    # On Linux the workers of a main-thread grader die with the parent *thread*
    # (PR_SET_PDEATHSIG); a grader started elsewhere must not lose its workers when that ends.
    with Grader(1, timeout_s=5.0) as g:
        starter = threading.Thread(target=g.start)
        starter.start()
        starter.join()
        time.sleep(0.5)
        assert g.grade_batch([r"\boxed{0.5}"], [r"\frac{1}{2}"])[0] == 1.0
        assert g.stats["worker_restarts"] == 0


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_die_with_their_parent_even_mid_task():
    script = (
        "import os, sys, threading, time\n"
        "from laserjax.reward import Grader\n"
        "g = Grader(1, timeout_s=100.0)\n"
        "g.start()\n"
        "print(g._workers[0].process.pid, flush=True)\n"
        "threading.Thread(target=g.grade_batch, args=([r'\\boxed{9^{9^{9^{9}}}}'], ['1']),\n"
        "                 daemon=True).start()\n"
        "time.sleep(1.0)\n"
        "os._exit(0)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    pid = int(out.stdout.split()[0])
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split()[2] == "Z":  # killed, waiting to be reaped by init
                    return
        except FileNotFoundError:
            return
        time.sleep(0.1)
    os.kill(pid, 9)
    raise AssertionError(f"worker {pid} outlived its parent by 5 s")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("7 + 35 = 42", "42"),
        ("The answer is 1,234.", "1234"),
        ("-0", "0"),
        ("3.50 or 07", "7"),
        ("about 2.50", "2.5"),
        ("2.0", "2"),
        ("-12", "-12"),
        ("no digits here", None),
        ("", None),
    ],
)
def test_extract_last_number(text, expected):
    assert extract_last_number(text) == expected


def test_last_number_match_grades_what_voting_reads():
    responses = ["7 + 35 = 42", "42.", "The sum is 43", "forty-two", "42 or 41"]
    got = last_number_match(responses, ["42"] * 5)
    np.testing.assert_array_equal(got, [1, 1, 0, 0, 0])
    assert [extract_last_number(r) == "42" for r in responses] == [bool(x) for x in got]
