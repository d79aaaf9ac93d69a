"""Evaluation with the self-reward: sample n per problem, grade, score (LASER_SPEC section 5).

`evaluate_prompts` is the core the trainer's periodic evaluation and the `eval` command share:
it rolls out n samples per problem through the sampler (the self-reward comes from its extra
decode step, no second pass), grades them and returns per-sample records plus the paper's table
from `eval_metrics.summarize`. A callback sees every graded batch as it is produced.

The `eval` command (`laserjax.commands.eval`) runs it over the paper's benchmarks; the trainer
runs it for its periodic held-out evaluation.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from laserjax import eval_metrics, laser
from laserjax.sampler import RolloutBatch, Sampler

RewardFn = Callable[[list[str], list[str]], np.ndarray]
"""(responses, reference answers) -> 0/1 rewards, one per response."""


@dataclasses.dataclass(frozen=True)
class Scoring:
    """How r_s is computed from log p(z_c) (LASER_SPEC section 1)."""

    beta_v: float
    c_ref: float

    def score(self, logp_zc: np.ndarray, finished: np.ndarray) -> np.ndarray:
        """r_s per sample; NaN for truncated samples (they get no z_c step)."""
        return np.asarray(
            laser.self_reward_score_or_nan(logp_zc, finished, self.beta_v, self.c_ref)
        )


def sample_record(
    problem_id: str,
    sample: int,
    response: str,
    extracted: str | None,
    correct: float,
    r_s: float,
    length: int,
    truncated: bool,
    **extra: Any,
) -> dict[str, Any]:
    """The JSON-able row of one sample (`r_s` None when the sample has no score)."""
    s = float(r_s)
    return dict(
        extra,
        problem_id=problem_id,
        sample=int(sample),
        response=response,
        extracted_answer=extracted,
        correct=bool(correct),
        r_s=None if math.isnan(s) else s,
        length=int(length),
        truncated=bool(truncated),
    )


@dataclasses.dataclass
class EvalResult:
    correct_pn: np.ndarray
    answers_pn: list[list[str | None]]
    scores_pn: np.ndarray
    responses_pn: list[list[str]]
    lengths_pn: np.ndarray
    truncated_pn: np.ndarray
    summary: dict[str, float]

    def records(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        """One JSON-able record per sample."""
        return [
            sample_record(
                pid,
                j,
                self.responses_pn[p][j],
                self.answers_pn[p][j],
                self.correct_pn[p, j],
                self.scores_pn[p, j],
                self.lengths_pn[p, j],
                self.truncated_pn[p, j],
            )
            for p, pid in enumerate(ids)
            for j in range(self.correct_pn.shape[1])
        ]


@dataclasses.dataclass(frozen=True)
class SampleBatch:
    """The graded samples of prompts [start, start + num_prompts) of one `evaluate_prompts` call,
    prompt-major (row = (prompt - start) * n + sample), as handed to its `on_batch` callback."""

    start: int
    n: int
    responses: list[str]
    answers: list[str | None]
    """The extracted answer of each response (None: it has none)."""
    correct: np.ndarray  # [rows] float32 0/1
    scores: np.ndarray  # [rows] float64 r_s, NaN when truncated
    lengths: np.ndarray  # [rows] int
    truncated: np.ndarray  # [rows] bool

    @property
    def num_prompts(self) -> int:
        return len(self.responses) // self.n

    def records(self, ids: Sequence[str], **extra: Any) -> list[dict[str, Any]]:
        """One record per sample; `ids` are the ids of *all* prompts of the call."""
        return [
            sample_record(
                ids[self.start + i // self.n],
                i % self.n,
                self.responses[i],
                self.answers[i],
                self.correct[i],
                self.scores[i],
                self.lengths[i],
                self.truncated[i],
                **extra,
            )
            for i in range(len(self.responses))
        ]


def decode_responses(tokenizer: Any, rollout: RolloutBatch) -> list[str]:
    rows = [row[:n] for row, n in zip(rollout.response_tokens, rollout.lengths, strict=True)]
    return tokenizer.batch_decode(rows, skip_special_tokens=True)


def summarize_samples(
    correct_pn: np.ndarray,
    answers_pn: Sequence[Sequence[str | None]],
    scores_pn: np.ndarray,
    lengths_pn: np.ndarray,
    truncated_pn: np.ndarray,
    ks: Sequence[int] | None = None,
) -> dict[str, float]:
    """`eval_metrics.summarize` plus the mean response length and the truncated fraction."""
    summary = eval_metrics.summarize(correct_pn, answers_pn, scores_pn, ks=ks)
    summary["response_len_mean"] = float(np.mean(lengths_pn))
    summary["truncated_frac"] = float(np.mean(truncated_pn))
    return summary


def evaluate_prompts(
    sampler: Sampler,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    answers: Sequence[str],
    *,
    n: int,
    reward_fn: RewardFn,
    extract_fn: Callable[[str], str | None],
    scoring: Scoring,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    batch_prompts: int = 64,
    ks: Sequence[int] | None = None,
    on_batch: Callable[[SampleBatch], None] | None = None,
) -> EvalResult:
    """n samples per prompt, graded and scored, with the summary table (accuracy = avg@n).

    Prompts go to the sampler `batch_prompts` at a time; the batch starting at prompt `start`
    samples with seed `seed + start`, so a run continued from a batch boundary (prompts[start:]
    with seed + start) draws exactly what the uninterrupted run draws. `on_batch` gets each
    graded batch before the next one is sampled (to write it out, or show progress).
    """
    if len(prompt_ids) != len(answers):
        raise ValueError(
            f"evaluate_prompts: {len(prompt_ids)} prompts but {len(answers)} "
            "answers; pass one reference answer per prompt"
        )
    if not prompt_ids:
        raise ValueError("evaluate_prompts: no prompts given")
    if n < 1 or batch_prompts < 1:
        raise ValueError(
            f"evaluate_prompts: n ({n}) and batch_prompts ({batch_prompts}) must be >= 1"
        )
    batches: list[SampleBatch] = []
    for start in range(0, len(prompt_ids), batch_prompts):
        chunk = prompt_ids[start : start + batch_prompts]
        rollout = sampler.sample(
            chunk, k=n, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed + start
        )
        texts = decode_responses(tokenizer, rollout)
        refs = [answers[start + i // n] for i in range(len(texts))]
        correct = np.asarray(reward_fn(texts, refs), np.float32).reshape(-1)
        if correct.shape != (len(texts),):
            raise ValueError(
                f"evaluate_prompts: reward_fn returned {correct.size} rewards for "
                f"{len(texts)} responses"
            )
        batch = SampleBatch(
            start=start,
            n=n,
            responses=texts,
            answers=[extract_fn(t) for t in texts],
            correct=correct,
            scores=scoring.score(rollout.logp_zc, rollout.finished),
            lengths=np.asarray(rollout.lengths),
            truncated=np.asarray(rollout.truncated),
        )
        if on_batch is not None:
            on_batch(batch)
        batches.append(batch)
    num = len(prompt_ids)

    def grid(field: str) -> np.ndarray:
        return np.concatenate([getattr(b, field) for b in batches]).reshape(num, n)

    responses = [r for b in batches for r in b.responses]
    extracted = [a for b in batches for a in b.answers]
    responses_pn = [responses[p * n : (p + 1) * n] for p in range(num)]
    answers_pn = [extracted[p * n : (p + 1) * n] for p in range(num)]
    correct_pn, scores_pn = grid("correct"), grid("scores")
    lengths_pn, truncated_pn = grid("lengths"), grid("truncated")
    summary = summarize_samples(correct_pn, answers_pn, scores_pn, lengths_pn, truncated_pn, ks)
    return EvalResult(
        correct_pn, answers_pn, scores_pn, responses_pn, lengths_pn, truncated_pn, summary
    )


# ---------------------------------------------------------------------------------------------
# Samples back from samples.jsonl, and the summary over benchmarks.


def result_from_records(
    rows: Sequence[dict[str, Any]], ids: Sequence[str], n: int, where: str = "samples"
) -> EvalResult:
    """Rebuild the per-sample arrays of one benchmark from its `sample_record` rows (any order;
    every one of `ids` must have samples 0..n-1 exactly once), summary included."""
    pos = {pid: p for p, pid in enumerate(ids)}
    num = len(ids)
    correct = np.full((num, n), np.nan)
    scores = np.full((num, n), np.nan)
    lengths = np.zeros((num, n), np.int64)
    truncated = np.zeros((num, n), bool)
    responses: list[list[str]] = [[""] * n for _ in range(num)]
    answers: list[list[str | None]] = [[None] * n for _ in range(num)]
    seen = np.zeros((num, n), bool)
    for row in rows:
        p, j = pos.get(row["problem_id"]), row["sample"]
        if p is None or not 0 <= j < n or seen[p, j]:
            raise ValueError(
                f"{where}: unexpected row (problem {row['problem_id']!r}, sample "
                f"{j}): unknown problem, sample index outside [0, {n}) or a "
                "duplicate"
            )
        seen[p, j] = True
        correct[p, j] = float(row["correct"])
        scores[p, j] = math.nan if row["r_s"] is None else float(row["r_s"])
        lengths[p, j], truncated[p, j] = row["length"], row["truncated"]
        responses[p][j], answers[p][j] = row["response"], row["extracted_answer"]
    if not seen.all():
        p, j = np.argwhere(~seen)[0]
        raise ValueError(
            f"{where}: {int((~seen).sum())} samples missing, e.g. problem {ids[p]!r} sample {j}"
        )
    summary = summarize_samples(correct, answers, scores, lengths, truncated)
    return EvalResult(correct, answers, scores, responses, lengths, truncated, summary)


AT_N_METRICS = ("pass", "maj", "weighted_maj", "best_of")
"""k-indexed metrics averaged over benchmarks at each benchmark's own n (`maj@n` etc.)."""
_SUMMED = ("sv_unscored", "prompts_over_length")


def _at(metric: str, k: int | str) -> str:
    return f"best_of_{k}" if metric == "best_of" else f"{metric}@{k}"


def average_over_benchmarks(summaries: dict[str, dict[str, float]]) -> dict[str, float]:
    """The paper's "Average" column: the unweighted mean over benchmarks of each metric.

    k-indexed metrics are averaged at each benchmark's own n (`pass@n`, `maj@n`,
    `weighted_maj@n`, `best_of_n`), and also at every k all benchmarks report. Counts
    (problems, samples, unscored samples, prompts left out) are summed. A metric a benchmark
    leaves undefined (NaN: e.g. the accuracy on correct responses when none is correct) is
    averaged over the benchmarks that define it, and is NaN when none does.
    """

    def mean(values: list[float]) -> float:
        finite = [v for v in values if not math.isnan(v)]
        return float(np.mean(finite)) if finite else math.nan

    tables = list(summaries.values())
    if not tables:
        raise ValueError("average_over_benchmarks: no benchmark summaries given")
    out: dict[str, float] = {
        "benchmarks": len(tables),
        "problems": int(sum(t["problems"] for t in tables)),
        "samples": int(sum(t["problems"] * t["n"] for t in tables)),
    }
    for key in _SUMMED:
        if all(key in t for t in tables):
            out[key] = int(sum(t[key] for t in tables))
    for metric in AT_N_METRICS:
        if all(_at(metric, t["n"]) in t for t in tables):
            out[_at(metric, "n")] = mean([t[_at(metric, t["n"])] for t in tables])
    for key in tables[0]:
        if key not in out and key not in ("problems", "n") and all(key in t for t in tables):
            out[key] = mean([float(t[key]) for t in tables])
    return out


def json_safe(x: Any) -> Any:
    """NaN/inf -> None (JSON has no NaN); numpy scalars -> Python numbers."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_safe(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


# ---------------------------------------------------------------------------------------------
# The readable table.

_TABLE_ROWS = (
    ("accuracy", "avg@n accuracy", "pct"),
    ("pass@n", "pass@n", "pct"),
    ("maj@n", "maj@n", "pct"),
    ("weighted_maj@n", "self-reward weighted maj@n", "pct"),
    ("best_of_n", "best-of-n by r_s", "pct"),
    ("sv_acc_correct", "self-verif. acc (correct)", "pct"),
    ("sv_acc_incorrect", "self-verif. acc (incorrect)", "pct"),
    ("sv_f1", "self-verification F1", "pct"),
    ("auroc", "AUROC of r_s", "num"),
    ("auroc_within", "AUROC of r_s within problems", "num"),
    ("ece", "ECE of r_s", "num"),
    ("response_len_mean", "mean response tokens", "int"),
    ("truncated_frac", "truncated", "pct"),
)


def format_table(summaries: dict[str, dict[str, float]], average: dict[str, float]) -> str:
    """Benchmarks (and their average) as columns, the paper's metrics as rows; every rate as a
    fraction in [0, 1] (one unit for the whole table), `-` where a metric is undefined."""
    columns = list(summaries) + (["average"] if len(summaries) > 1 else [])

    def cell(name: str, key: str, kind: str) -> str:
        table = average if name == "average" else summaries[name]
        if key.endswith("@n") or key == "best_of_n":
            if name != "average":
                key = key[:-1] + str(table["n"])
        v = table.get(key)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        return {"pct": f"{v:.3f}", "num": f"{v:.3f}", "int": f"{v:.0f}"}[kind]

    header = ["", *columns]
    sizes = [
        f"{summaries[c]['problems']} x {summaries[c]['n']}"
        if c != "average"
        else f"{average['samples']} samples"
        for c in columns
    ]
    body = [["problems x n", *sizes]]
    body += [[label, *(cell(c, key, kind) for c in columns)] for key, label, kind in _TABLE_ROWS]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            [r[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(r[1:], widths[1:], strict=True)]
        )
        for r in [header, *body]
    )
