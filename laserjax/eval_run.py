"""One `eval` run on disk: the model it scores, its output folder (and `--resume`), and the two
ways it samples a benchmark, n samples per problem or adaptively under a stop rule (LASER_SPEC
section 5).

`laserjax.commands.eval` turns its flags into the arguments here; this module does the work.
Errors still name the flag that fixes them (`EvalError`), since the settings here are the
command's. The per-batch sampling, grading and scoring is `laserjax.evaluate.evaluate_prompts`
(fixed n) and `laserjax.adaptive_eval.sample_adaptively` (a stop rule); the metrics are
`laserjax.eval_metrics`.

Output files, under the output folder:

- `samples.jsonl`: one row per sample, appended and flushed after every batch, so a crash loses
  nothing already computed and `--resume` continues from the last whole batch;
- `summary.json`: the table of each benchmark and their average, computed from `samples.jsonl`
  (so a resumed run and an uninterrupted one report the same numbers);
- `eval_config.json`: the settings, which `--resume` requires to be unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from jax.sharding import Mesh

from laserjax.adaptive import Rule
from laserjax.adaptive_eval import sample_adaptively
from laserjax.answers import answer_extractor, exact_reward, last_number_match
from laserjax.config import Config, parse_ids
from laserjax.continuous import ContinuousSampler
from laserjax.data import BadRow, Benchmark, Problem, read_jsonl
from laserjax.evaluate import (
    SampleBatch,
    Scoring,
    average_over_benchmarks,
    evaluate_prompts,
    format_table,
    json_safe,
    result_from_records,
    sample_record,
)
from laserjax.model import TransformerConfig
from laserjax.model.fetch import resolve_model
from laserjax.model.hf_params import load_pretrained, special_token_ids
from laserjax.reward import DEFAULT_TIMEOUT_S, Grader
from laserjax.sampler import Sampler


class EvalError(ValueError):
    """Bad input to the `eval` command; the message names the flag and the fix."""


def fail(flag: str, msg: str) -> EvalError:
    """An `EvalError` for `flag`."""
    return EvalError(f"eval {flag}: {msg}")


# ---------------------------------------------------------------------------------------------
# The model: checkpoint, tokenizer, token ids, sampler.


@dataclasses.dataclass
class ModelSetup:
    """What the run resolved from its flags and the checkpoint, before any sampling."""

    ckpt: pathlib.Path
    tokenizer: Any
    cfg: Config
    max_positions: int
    eos_ids: tuple[int, ...]
    pad_id: int


def resolve_eval_model(
    model: str,
    eos_ids: str | None,
    pad_id: int | None,
    template: str,
    make_config: Callable[[tuple[int, ...], int], Config],
) -> ModelSetup:
    """Checkpoint, tokenizer and token ids, validated against the vocabulary (no weights yet).

    `eos_ids` is the `--eos-ids` text (None: generation_config.json, else the tokenizer's EOS),
    `make_config(eos_ids, pad_id)` the flags as a validated `Config`. Raises `ConfigError` when a
    token id is outside the vocabulary.
    """
    from transformers import AutoTokenizer

    try:
        ckpt = resolve_model(model)
        mcfg = TransformerConfig.from_pretrained_dir(ckpt)
    except (FileNotFoundError, ValueError) as e:
        raise fail("--model", str(e)) from None
    try:
        tok = AutoTokenizer.from_pretrained(str(ckpt))
    except Exception as e:  # transformers raises many kinds; say what was being loaded
        raise fail("--model", f"cannot load a tokenizer from {str(ckpt)!r}: {e}") from None
    vocab = mcfg.vocab_size
    explicit = _parse_int_list(eos_ids, "--eos-ids") if eos_ids else ()
    cfg = make_config(explicit, -1 if pad_id is None else pad_id)
    try:
        eos, pad = special_token_ids(
            ckpt, tok, eos_ids=explicit, pad_id=-1 if pad_id is None else pad_id
        )
    except ValueError as e:
        raise fail("--eos-ids", str(e)) from None
    cfg = make_config(eos, pad)
    cfg.validate_against_vocab(vocab, eos, pad)
    if template == "chat" and not getattr(tok, "chat_template", None):
        raise fail(
            "--template",
            f"the tokenizer in {str(ckpt)!r} has no chat template; pass "
            "--template plain for a base model",
        )
    return ModelSetup(ckpt, tok, cfg, mcfg.max_position_embeddings, eos, pad)


def _parse_int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        return parse_ids(text)
    except ValueError as e:
        raise fail(flag, str(e)) from None


def build_sampler(
    setup: ModelSetup,
    mesh: Mesh | None,
    *,
    dtype: str,
    self_reward_token_id: int,
    max_new_tokens: int,
    max_prompt_len: int,
) -> Sampler:
    """The model's weights loaded (sharded over `mesh`) into a sampler for prompts of up to
    `max_prompt_len` tokens; warns when prompt plus response exceeds the model's positions."""
    if max_prompt_len + max_new_tokens > setup.max_positions:
        print(
            f"eval: warning: the longest prompt ({max_prompt_len} tokens) plus "
            f"--max-new-tokens {max_new_tokens} exceeds the model's "
            f"max_position_embeddings {setup.max_positions}",
            file=sys.stderr,
        )
    model = load_pretrained(str(setup.ckpt), dtype=dtype, param_dtype=dtype, mesh=mesh)
    return Sampler(
        model,
        eos_ids=setup.eos_ids,
        pad_id=setup.pad_id,
        self_reward_token_id=self_reward_token_id,
        max_new_tokens=max_new_tokens,
        max_prompt_len=max_prompt_len,
        mesh=mesh,
    )


# ---------------------------------------------------------------------------------------------
# The output folder and `--resume`.


def default_output_dir(model: str) -> str:
    """runs/eval/<last path component of the model directory or hub id>."""
    return str(
        pathlib.Path("runs") / "eval" / (pathlib.PurePath(model.rstrip("/")).name or "model")
    )


def _read_jsonl_rows(path: pathlib.Path) -> list[dict[str, Any]]:
    """The rows of a samples file; a torn last line (a crash mid-write) is dropped."""
    read = list(read_jsonl(path))
    rows = []
    for i, (line, row) in enumerate(read):
        if isinstance(row, BadRow) or not isinstance(row, dict):
            if i == len(read) - 1:
                break
            raise EvalError(
                f"eval --resume: {path} line {line} is damaged "
                f"({row.reason if isinstance(row, BadRow) else 'not a JSON object'}) before its "
                "last line; start over with --overwrite"
            )
        rows.append(row)
    return rows


def prepare_output(
    out: pathlib.Path,
    settings: dict[str, Any],
    batch_prompts: int,
    problem_ids: dict[str, list[str]],
    *,
    resume: bool,
    overwrite: bool,
) -> dict[str, list[dict[str, Any]]]:
    """Create the output folder; with `resume`, the kept rows per benchmark (whole batches of
    whole problems, in order), which are rewritten to samples.jsonl. Else start it empty."""
    samples_path, config_path = out / "samples.jsonl", out / "eval_config.json"
    kept: dict[str, list[dict[str, Any]]] = {b: [] for b in problem_ids}
    exists = samples_path.is_file() and samples_path.stat().st_size > 0
    if exists and not (resume or overwrite):
        raise fail(
            "--output-dir",
            f"{samples_path} already holds samples; pass --resume to "
            "continue that run or --overwrite to replace it",
        )
    if resume and exists:
        if not config_path.is_file():
            raise fail(
                "--resume",
                f"{config_path} is missing, so the samples' settings are "
                "unknown; pass --overwrite to start over",
            )
        old = json.loads(config_path.read_text())
        changed = sorted(k for k in settings.keys() | old.keys() if old.get(k) != settings.get(k))
        if changed:
            diff = "; ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in changed)
            raise fail(
                "--resume",
                f"the settings differ from the run in {out} ({diff}); "
                "use the same flags, or --overwrite / another --output-dir",
            )
        by_bench: dict[str, list[dict[str, Any]]] = {}
        for row in _read_jsonl_rows(samples_path):
            by_bench.setdefault(row.get("benchmark"), []).append(row)
        for name, ids in problem_ids.items():
            n = settings["benchmarks"][name]
            counts: dict[str, int] = {}
            for row in by_bench.get(name, []):
                counts[row["problem_id"]] = counts.get(row["problem_id"], 0) + 1
            done = 0
            while done < len(ids) and counts.get(ids[done]) == n:
                done += 1
            if done < len(ids):
                done -= done % batch_prompts  # resume at a batch boundary: same seeds
            keep = set(ids[:done])
            kept[name] = [r for r in by_bench.get(name, []) if r["problem_id"] in keep]
    out.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(settings, indent=2) + "\n")
    with samples_path.open("w") as f:
        for name in problem_ids:
            for row in kept[name]:
                f.write(json.dumps(row) + "\n")
    (out / "summary.json").unlink(missing_ok=True)
    return kept


# ---------------------------------------------------------------------------------------------
# Sampling: n per problem, or adaptively.


@dataclasses.dataclass
class EvalJob:
    """What one run samples and how: the benchmarks with their encoded prompts, the sampler and
    the sampling and grading settings, and where the outputs go."""

    model: str
    benches: list[tuple[Benchmark, int]]
    """(benchmark, n samples per problem), in order."""
    prompts: dict[str, tuple[list[Problem], list[list[int]]]]
    """Per benchmark: its problems within the prompt limit and their prompt token ids."""
    tokenizer: Any
    sampler: Sampler
    scoring: Scoring
    settings: dict[str, Any]
    """Everything that decides the samples (eval_config.json)."""
    out: pathlib.Path
    primary: bool
    """This host writes the outputs (the first process)."""
    reward: str
    temperature: float
    top_p: float
    top_k: int
    seed: int
    batch_prompts: int
    grader_workers: int | None
    grader_timeout: float | None


def reward_fn(reward: str, grader: Grader) -> Callable[[list[str], list[str]], np.ndarray]:
    """r_v of `--reward` (`data.reward`'s choices), one function for fixed and adaptive eval."""
    if reward == "exact":
        return exact_reward
    if reward == "last_number":
        return last_number_match
    return lambda responses, answers: grader.grade_batch(
        responses, answers, require_single_boxed=False
    )


def run_fixed(
    job: EvalJob,
    kept: dict[str, list[dict[str, Any]]],
    overflow: dict[str, int],
    checkpoint: pathlib.Path,
    t0: float,
) -> dict[str, Any]:
    """n samples per problem of every benchmark, after the `kept` rows of a resumed run; each
    batch appended to samples.jsonl; the summary (per benchmark and averaged, from the rows)
    written to summary.json, printed and returned."""
    out = job.out
    ids = {name: [p.id for p in probs] for name, (probs, _) in job.prompts.items()}
    rows: dict[str, list[dict[str, Any]]] = {name: list(r) for name, r in kept.items()}
    timeout = job.grader_timeout or DEFAULT_TIMEOUT_S
    with Grader(job.grader_workers, timeout_s=timeout) as grader:
        r_v = reward_fn(job.reward, grader)

        for bench, n in job.benches:
            problems, token_ids = job.prompts[bench.name]
            done = len(rows[bench.name]) // n
            if done:
                print(
                    f"eval: {bench.name}: resuming after {done} of {len(problems)} problems",
                    file=sys.stderr,
                )
            if done == len(problems):
                continue
            refs = [p.answer for p in problems]

            def write(
                batch: SampleBatch,
                name: str = bench.name,
                offset: int = done,
                problems: list[Any] = problems,
            ) -> None:
                shifted = dataclasses.replace(batch, start=batch.start + offset)
                new = shifted.records([p.id for p in problems], benchmark=name)
                for i, r in enumerate(new):
                    r["reference"] = problems[shifted.start + i // shifted.n].answer
                rows[name].extend(new)
                if job.primary:
                    with (out / "samples.jsonl").open("a") as f:
                        f.write("".join(json.dumps(r) + "\n" for r in new))
                        f.flush()
                acc = np.mean([r["correct"] for r in rows[name]])
                print(
                    f"eval: {name}: {shifted.start + shifted.num_prompts}/{len(problems)} "
                    f"problems x {batch.n}, accuracy so far {acc:.3f}, "
                    f"{time.time() - t0:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )

            evaluate_prompts(
                job.sampler,
                job.tokenizer,
                token_ids[done:],
                refs[done:],
                n=n,
                reward_fn=r_v,
                extract_fn=answer_extractor(job.reward),  # what the reward grades is voted on
                scoring=job.scoring,
                temperature=job.temperature,
                top_p=job.top_p,
                top_k=job.top_k,
                seed=job.seed + done,
                batch_prompts=job.batch_prompts,
                on_batch=write,
            )

    summaries = {}
    for bench, n in job.benches:
        res = result_from_records(
            rows[bench.name], ids[bench.name], n, where=f"{out / 'samples.jsonl'} ({bench.name})"
        )
        summaries[bench.name] = res.summary | {"prompts_over_length": overflow[bench.name]}
    average = average_over_benchmarks(summaries)
    no_answer = sum(r["extracted_answer"] is None for rs in rows.values() for r in rs)
    total = sum(len(rs) for rs in rows.values())
    if job.primary and total and no_answer == total:
        what = "a final \\boxed{...} answer" if job.reward == "math_verify" else "any text"
        hint = (
            "; for a model that answers with the bare answer (e.g. the CPU demo's) pass "
            "--reward exact"
            if job.reward == "math_verify"
            else ""
        )
        print(
            f"eval: warning: none of the {total} responses has {what}, the answer the "
            f"{job.reward} reward grades, so every one grades 0{hint}",
            file=sys.stderr,
        )
    summary = json_safe(
        {
            "model": job.model,
            "checkpoint": str(checkpoint),
            "settings": job.settings,
            "benchmarks": summaries,
            "average": average,
            "data_rows_skipped": {
                b.report.source: b.report.to_json() for b, _ in job.benches if b.report.num_skipped
            },
            "responses_without_answer": no_answer,
            "wall_s": round(time.time() - t0, 1),
        }
    )
    if job.primary:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(format_table(summaries, average))
        print(f"samples: {out / 'samples.jsonl'}; summary: {out / 'summary.json'}")
    return summary


def run_adaptive(job: EvalJob, rule: Rule, round_size: int, slots: int = 0) -> dict[str, Any]:
    """Each benchmark sampled by `sample_adaptively` (budget: its n); writes every drawn sample
    to samples.jsonl (with its `round`) and summary.json with, per benchmark, the accuracy of
    the rule's answers, samples and response tokens per problem and the wall time."""
    out = job.out
    t0 = time.time()
    summaries: dict[str, dict[str, Any]] = {}
    timeout = job.grader_timeout or DEFAULT_TIMEOUT_S
    # One slot pool for every benchmark (its jitted pieces compile once).
    sampler = ContinuousSampler(job.sampler, slots=slots) if slots else job.sampler
    with Grader(job.grader_workers, timeout_s=timeout) as grader:
        r_v = reward_fn(job.reward, grader)

        for bench, n in job.benches:
            if n % round_size:
                raise EvalError(
                    f"eval --round-size: {round_size} does not divide {bench.name}'s n = {n}"
                )
            problems, token_ids = job.prompts[bench.name]

            def progress(j: int, num_open: int, name: str = bench.name) -> None:
                print(
                    f"eval: {name}: round {j}, {num_open} problems open, {time.time() - t0:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )

            res = sample_adaptively(
                sampler,
                job.tokenizer,
                token_ids,
                [p.answer for p in problems],
                rule,
                round_size=round_size,
                max_samples=n,
                reward_fn=r_v,
                extract_fn=answer_extractor(job.reward),
                scoring=job.scoring,
                temperature=job.temperature,
                top_p=job.top_p,
                top_k=job.top_k,
                seed=job.seed,
                batch_prompts=job.batch_prompts,
                on_round=progress,
            )
            if job.primary:
                with (out / "samples.jsonl").open("a") as f:
                    for p, prob in enumerate(problems):
                        for j, text in enumerate(res.responses[p]):
                            row = sample_record(
                                prob.id,
                                j,
                                text,
                                res.answers[p][j],
                                res.correct[p][j],
                                res.scores[p][j],
                                res.lengths[p][j],
                                not res.finished[p][j],
                                benchmark=bench.name,
                                round=j // round_size,
                                picked=j == res.picks[p],
                            )
                            f.write(json.dumps(row | {"reference": prob.answer}) + "\n")
            summaries[bench.name] = {
                "problems": len(problems),
                "max_samples": n,
                "accuracy": res.accuracy,
                "samples_per_problem": res.samples,
                "tokens_per_problem": res.tokens,
                "wall_s": round(res.wall_s, 1),
                "sampler_calls": res.sampler_calls,
            }
    summary = json_safe(
        {
            "model": job.model,
            "stop_rule": rule.name,
            "slots": slots,
            "round_size": round_size,
            "settings": job.settings,
            "benchmarks": summaries,
            "wall_s": round(time.time() - t0, 1),
        }
    )
    if job.primary:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"adaptive sampling with {rule.name}, rounds of {round_size}")
        for name, s in summaries.items():
            print(
                f"{name}: accuracy {100 * s['accuracy']:.1f}%, {s['samples_per_problem']:.2f} "
                f"samples and {s['tokens_per_problem']:.0f} tokens per problem (budget "
                f"{s['max_samples']}), {s['wall_s']:.0f} s"
            )
        print(f"samples: {out / 'samples.jsonl'}; summary: {out / 'summary.json'}")
    return summary
