"""Evaluation with the self-reward: sample n per problem, grade, score (LASER_SPEC section 5).

`evaluate_prompts` is the core the trainer's periodic evaluation and the `eval` command share:
it rolls out n samples per problem through the sampler (the self-reward comes from its extra
decode step, no second pass), grades them and returns per-sample records plus the paper's table
from `eval_metrics.summarize`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from laserjax import eval_metrics
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
        return np.where(finished, self.beta_v * (logp_zc - self.c_ref), np.nan)


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
        out = []
        for p, pid in enumerate(ids):
            for j in range(self.correct_pn.shape[1]):
                s = float(self.scores_pn[p, j])
                out.append(dict(problem_id=pid, sample=j, response=self.responses_pn[p][j],
                                extracted_answer=self.answers_pn[p][j],
                                correct=bool(self.correct_pn[p, j]),
                                r_s=None if math.isnan(s) else s,
                                length=int(self.lengths_pn[p, j]),
                                truncated=bool(self.truncated_pn[p, j])))
        return out


def decode_responses(tokenizer: Any, rollout: RolloutBatch) -> list[str]:
    rows = [row[:n] for row, n in zip(rollout.response_tokens, rollout.lengths, strict=True)]
    return tokenizer.batch_decode(rows, skip_special_tokens=True)


def evaluate_prompts(sampler: Sampler, tokenizer: Any, prompt_ids: Sequence[Sequence[int]],
                     answers: Sequence[str], *, n: int, reward_fn: RewardFn,
                     extract_fn: Callable[[str], str | None], scoring: Scoring,
                     temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                     seed: int = 0, batch_prompts: int = 64,
                     ks: Sequence[int] | None = None) -> EvalResult:
    """n samples per prompt, graded and scored, with the summary table (accuracy = avg@n)."""
    correct, scores, lengths, truncated = [], [], [], []
    responses: list[str] = []
    for start in range(0, len(prompt_ids), batch_prompts):
        chunk = prompt_ids[start:start + batch_prompts]
        rollout = sampler.sample(chunk, k=n, temperature=temperature, top_p=top_p, top_k=top_k,
                                 seed=seed + start)
        texts = decode_responses(tokenizer, rollout)
        refs = [answers[start + i // n] for i in range(len(texts))]
        correct.append(np.asarray(reward_fn(texts, refs), np.float32))
        scores.append(scoring.score(rollout.logp_zc, rollout.finished))
        lengths.append(rollout.lengths)
        truncated.append(rollout.truncated)
        responses += texts
    num = len(prompt_ids)

    def grid(parts):
        return np.concatenate(parts).reshape(num, n)

    correct_pn = grid(correct)
    scores_pn = grid(scores)
    responses_pn = [responses[p * n:(p + 1) * n] for p in range(num)]
    answers_pn = [[extract_fn(r) for r in row] for row in responses_pn]
    summary = eval_metrics.summarize(correct_pn, answers_pn, scores_pn, ks=ks)
    summary["response_len_mean"] = float(grid(lengths).mean())
    summary["truncated_frac"] = float(grid(truncated).mean())
    return EvalResult(correct_pn, answers_pn, scores_pn, responses_pn, grid(lengths),
                      grid(truncated), summary)
