"""`python -m laserjax grade`: grade a jsonl of responses against reference answers.

Each row's last `\\boxed{}` answer is checked with `laserjax.reward.Grader` (math-verify in
worker processes, a deadline per answer); one result row per input row, and a one-line JSON
summary.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from typing import Any

from laserjax.answers import answer_to_str
from laserjax.data import BadRow, read_jsonl
from laserjax.reward import DEFAULT_TIMEOUT_S, Grader, default_num_workers


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help="jsonl of responses, one row per response")
    parser.add_argument("--output", required=True, help="jsonl written with one result per row")
    parser.add_argument(
        "--response-field",
        default="response",
        help="field holding the response text (default: response)",
    )
    parser.add_argument(
        "--answer-field",
        default="answer",
        help="field holding the reference answer (default: answer)",
    )
    parser.add_argument(
        "--id-field",
        default=None,
        help="field copied to each result as its id (default: the row number, "
        "counting lines from 1)",
    )
    parser.add_argument(
        "--require-single-boxed",
        action="store_true",
        help="grade 0 unless the response has exactly one boxed answer (the training format gate)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help=f"grader processes (default: CPUs, at most 16; here {default_num_workers()})",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help=f"seconds allowed per answer (default {DEFAULT_TIMEOUT_S:g})",
    )


def _read_rows(
    path: pathlib.Path, response_field: str, answer_field: str, id_field: str | None
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Output stubs for every row, and (response, answer) for the rows that can be graded.

    One reader for every jsonl (`laserjax.data.read_jsonl`): a line that is not JSON or not
    UTF-8 is one bad row with its error, the rest are graded."""
    rows, tasks = [], []
    for row_number, record in read_jsonl(path):
        out: dict[str, Any] = {"row": row_number}
        if isinstance(record, BadRow):
            out["error"] = f"row {row_number}: {record.reason}"
            rows.append(out)
            continue
        if not isinstance(record, dict):
            out["error"] = f"row {row_number}: expected a JSON object"
            rows.append(out)
            continue
        out["id"] = record.get(id_field) if id_field else row_number
        problems = []
        if id_field and id_field not in record:
            problems.append(f"missing field {id_field!r} (--id-field)")
        response = record.get(response_field)
        if response_field not in record:
            problems.append(f"missing field {response_field!r} (--response-field)")
        elif not isinstance(response, str):
            problems.append(f"field {response_field!r} is {type(response).__name__}, not a string")
        answer = record.get(answer_field)
        if answer_field not in record:
            problems.append(f"missing field {answer_field!r} (--answer-field)")
        else:
            try:
                answer = answer_to_str(answer)
            except TypeError as e:
                problems.append(f"field {answer_field!r}: {e}")
        if problems:
            out["error"] = f"row {row_number}: " + "; ".join(problems)
        else:
            out["_task"] = len(tasks)
            tasks.append((response, answer))
        rows.append(out)
    return rows, tasks


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Grade `--input` into `--output`; print and return the one-line summary."""
    path = pathlib.Path(args.input)
    if not path.is_file():
        raise SystemExit(f"grade: --input {str(path)!r} not found")
    out_path = pathlib.Path(args.output)
    if out_path.resolve() == path.resolve():
        raise SystemExit(
            f"grade: --output {str(out_path)!r} is the --input file; grading would replace the "
            "responses with the grades: write the grades to another file"
        )
    t0 = time.monotonic()
    rows, tasks = _read_rows(path, args.response_field, args.answer_field, args.id_field)
    with Grader(args.workers, timeout_s=args.timeout) as grader:
        results = grader.grade_detailed(
            [r for r, _ in tasks],
            [a for _, a in tasks],
            require_single_boxed=args.require_single_boxed,
        )
        stats = dict(grader.stats)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    errors = 0
    with out_path.open("w") as f:
        for row in rows:
            task = row.pop("_task", None)
            if task is None:
                errors += 1
                print(f"grade: {row['error']}", file=sys.stderr)
                row.update(extracted=None, correct=False)
            else:
                res = results[task]
                row.update(extracted=res.extracted, correct=bool(res.correct), status=res.status)
            f.write(json.dumps(row) + "\n")
    correct = sum(int(r.correct) for r in results)
    summary = {
        "graded": len(results),
        "correct": correct,
        "accuracy": correct / len(results) if results else 0.0,
        "errors": errors,
        "timeouts": stats.get("timeouts", 0),
        "no_boxed": sum(r.status == "no_boxed" for r in results),
        "wall_s": round(time.monotonic() - t0, 2),
        "output": str(out_path),
    }
    print(json.dumps(summary))
    return summary
