"""`python -m laserjax eval`: sample, grade and score benchmarks with the self-reward
(LASER_SPEC section 5).

The command's job is its flags: it parses them, checks them (and the config fields they set, with
the flag named in every error), loads the benchmarks and encodes their prompts, and hands the run
to `laserjax.eval_run`, which resolves the model, prepares `--output-dir` (and `--resume`) and
samples, n per problem (`laserjax.evaluate.evaluate_prompts`) or adaptively under `--stop-rule`
(`laserjax.adaptive_eval.sample_adaptively`). It writes, under `--output-dir`:

- `samples.jsonl`: one row per sample (benchmark, problem id, sample index, response, extracted
  answer, reference, correct, r_s, length, truncated), appended and flushed after every batch, so
  a crash loses nothing already computed and `--resume` continues from the last whole batch;
- `summary.json`: the table of each benchmark and their average, computed from `samples.jsonl`
  (so a resumed run and an uninterrupted one report the same numbers);
- `eval_config.json`: the settings, which `--resume` requires to be unchanged.

Grading is the paper's evaluation protocol: the last `\\boxed{}` of a response, math-verify
equivalence, no single-boxed format gate (that gate is a training-reward rule, spec section 6).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time
from typing import Any

import jax

from laserjax import sharding
from laserjax.adaptive import parse_rule
from laserjax.answers import REWARDS
from laserjax.config import Config, ConfigError, MeshConfig
from laserjax.config_load import add_config_flag, build_config, field_default, flag_for, set_field
from laserjax.data import BENCHMARK_N, BENCHMARKS, EVAL_DIR_ENV, encode_prompts, load_benchmark
from laserjax.distributed import maybe_initialize_distributed
from laserjax.eval_run import (
    EvalError,
    EvalJob,
    ModelSetup,
    build_sampler,
    default_output_dir,
    fail,
    prepare_output,
    resolve_eval_model,
    run_adaptive,
    run_fixed,
)
from laserjax.evaluate import Scoring
from laserjax.model.hf_params import with_export_defaults

DEFAULT_BATCH_PROMPTS = 16

# Flags that set a config field: their defaults are the config's, their values go through the
# config's checks, and a ConfigError's field names the flag to fix (`config_load.flag_for`).
CONFIG_FLAGS = {
    "--max-new-tokens": "rollout.max_new_tokens",
    "--max-prompt-len": "rollout.max_prompt_len",
    "--temperature": "rollout.temperature",
    "--top-p": "rollout.top_p",
    "--top-k": "rollout.top_k",
    "--template": "data.template",
    "--c-ref": "laser.c_ref",
    "--beta-v": "laser.beta_v",
    "--z-token-id": "tokens.self_reward_token_id",
}
# Flags the command turns into config fields itself (parsed lists, one flag for two fields).
_OTHER_FLAGS = {
    "--model": "model.path",
    "--dtype": "model",
    "--eos-ids": "tokens.eos_ids",
    "--pad-id": "tokens.pad_id",
    "--mesh": "mesh",
    "--output-dir": "output_dir",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    paper_n = ", ".join(f"{b} {BENCHMARK_N[b]}" for b in BENCHMARKS)
    parser.add_argument(
        "--model", required=True, help="Hugging Face checkpoint directory or hub id (Qwen2 / Llama)"
    )
    parser.add_argument(
        "--benchmarks",
        required=True,
        help=f"comma-separated: any of {', '.join(BENCHMARKS)}, or jsonl paths "
        "(problem / answer / id fields)",
    )
    parser.add_argument(
        "--eval-dir",
        default=None,
        help=f"folder with the benchmark files (default: ${EVAL_DIR_ENV})",
    )
    parser.add_argument(
        "--n", type=int, default=None, help=f"samples per problem (default: the paper's, {paper_n})"
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="evaluate only the first M problems of each benchmark",
    )
    add_config_flag(parser, "--max-new-tokens", "rollout.max_new_tokens", default=None)
    add_config_flag(
        parser,
        "--max-prompt-len",
        "rollout.max_prompt_len",
        help="prompt token limit (see --prompt-overflow)",
    )
    parser.add_argument(
        "--prompt-overflow",
        choices=("error", "filter"),
        default="error",
        help="a prompt over --max-prompt-len stops the run (error, default) or "
        "is left out and counted in the summary (filter)",
    )
    add_config_flag(parser, "--temperature", "rollout.temperature", help="0 = greedy")
    add_config_flag(parser, "--top-p", "rollout.top_p")
    add_config_flag(parser, "--top-k", "rollout.top_k", help="0 = full vocabulary")
    add_config_flag(
        parser,
        "--template",
        "data.template",
        default=None,
        help="the tokenizer's chat template, 'Question: ...\\nAnswer:' for base models (plain), "
        "or the problem text alone (raw, the CPU demo's)",
    )
    add_config_flag(
        parser,
        "--c-ref",
        "laser.c_ref",
        type=float,
        default=None,
        help="r_s = beta_v * (log p(z_c) - c_ref), c_ref from the run that exported the model; "
        "measure it for another model with `python -m laserjax calibrate`",
    )
    add_config_flag(parser, "--beta-v", "laser.beta_v", default=None)
    add_config_flag(
        parser,
        "--z-token-id",
        "tokens.self_reward_token_id",
        default=None,
        help="the self-reward token z_c (Qwen2.5: 151652, Llama-3: 128002)",
    )
    parser.add_argument(
        "--eos-ids",
        default=None,
        help="comma-separated EOS ids (default: generation_config.json, else the tokenizer's EOS)",
    )
    parser.add_argument(
        "--pad-id",
        type=int,
        default=None,
        help="default: the tokenizer's pad id, else the first EOS id",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--batch-prompts",
        type=int,
        default=DEFAULT_BATCH_PROMPTS,
        help="problems per sampler call (each with its n samples)",
    )
    parser.add_argument(
        "--mesh",
        default="data=-1,fsdp=1,tensor=1",
        help="data=D,fsdp=F,tensor=T (-1 on one axis: the remaining devices), "
        "or 'none' for one device without a mesh",
    )
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float32", "float16"),
        default=None,
        help="parameter and activation dtype (config model.dtype and model.param_dtype; "
        f"default: the model's laserjax.json, else {field_default('model.dtype')})",
    )
    parser.add_argument(
        "--output-dir",
        default=None,
        help="where samples.jsonl and summary.json go (default: "
        "runs/eval/<model folder or hub name>)",
    )
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument(
        "--resume",
        action="store_true",
        help="continue the samples.jsonl in --output-dir (same settings)",
    )
    resume.add_argument(
        "--overwrite", action="store_true", help="replace the outputs already in --output-dir"
    )
    parser.add_argument(
        "--reward",
        choices=REWARDS,
        default=None,
        help="math_verify: the last \\boxed{} against the reference (the paper's); exact: the "
        "whole response equals the reference (the CPU demo's); last_number: the last number "
        "written equals the reference's (the real-model CPU config's). Voting groups the "
        "answers the same reward reads. Default: the model's laserjax.json (a laserjax "
        "export), else math_verify",
    )
    parser.add_argument(
        "--max-bad-share",
        type=float,
        default=field_default("data.max_bad_share"),
        help="refuse a benchmark file when more than this share of its rows is bad "
        "(default 0.1); bad rows below it are skipped and reported",
    )
    parser.add_argument(
        "--grader-workers",
        type=int,
        default=None,
        help="math-verify processes (default: CPUs, at most 16)",
    )
    parser.add_argument(
        "--grader-timeout",
        type=float,
        default=None,
        help="seconds allowed per answer (default: laserjax.reward's)",
    )
    add_stop_rule_arguments(parser)


def _check_flags(args: argparse.Namespace) -> None:
    for flag, value, low in (
        ("--n", args.n, 1),
        ("--limit", args.limit, 1),
        ("--batch-prompts", args.batch_prompts, 1),
        ("--grader-workers", args.grader_workers, 1),
    ):
        if value is not None and value < low:
            raise fail(flag, f"must be >= {low}, got {value}")
    if not 0 <= args.max_bad_share <= 1:
        raise fail("--max-bad-share", f"must be in [0, 1], got {args.max_bad_share}")
    if args.grader_timeout is not None and args.grader_timeout <= 0:
        raise fail("--grader-timeout", f"must be > 0 seconds, got {args.grader_timeout}")
    if args.stop_rule is not None:
        _check_stop_rule_flags(args)


def _benchmark_names(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise fail("--benchmarks", "names no benchmark")
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise fail("--benchmarks", f"lists {sorted(dup)} more than once")
    return names


def _load_benchmarks(args: argparse.Namespace) -> list[tuple[Any, int]]:
    """(Benchmark cut to --limit, n) per --benchmarks entry, in order."""
    out = []
    for name in _benchmark_names(args.benchmarks):
        try:
            bench = load_benchmark(name, args.eval_dir)
        except (ValueError, FileNotFoundError) as e:
            raise fail("--benchmarks", f"{e} (--eval-dir sets the benchmark folder)") from None
        try:
            bench.report.check(args.max_bad_share, "--max-bad-share")
        except ValueError as e:
            raise fail("--benchmarks", str(e)) from None
        if bench.report.num_skipped:
            print(f"eval: {bench.report.skipped_line()}", file=sys.stderr)
        n = args.n if args.n is not None else bench.n
        if n is None:
            raise fail(
                "--n",
                f"{name!r} is not one of the paper's benchmarks "
                f"({', '.join(BENCHMARK_N)}), so it has no default n; pass --n",
            )
        if args.limit is not None:
            bench = dataclasses.replace(bench, problems=bench.problems[: args.limit])
        out.append((bench, n))
    if len({b.name for b, _ in out}) < len(out):
        raise fail(
            "--benchmarks",
            f"two entries load the same benchmark ({', '.join(b.name for b, _ in out)})",
        )
    return out


def _eval_config(args: argparse.Namespace, eos_ids: tuple[int, ...], pad_id: int) -> Config:
    """The flags as a validated `Config`: the same coercion and checks (token ids, mesh, sampling
    settings) as `train`'s YAML goes through."""
    data: dict[str, Any] = {}
    for flag, field in CONFIG_FLAGS.items():
        set_field(data, field, getattr(args, flag[2:].replace("-", "_")))
    set_field(data, "model", {"path": args.model, "dtype": args.dtype, "param_dtype": args.dtype})
    set_field(data, "tokens.eos_ids", list(eos_ids))
    set_field(data, "tokens.pad_id", pad_id)
    set_field(data, "output_dir", args.output_dir)
    try:
        mesh = MeshConfig.parse(args.mesh)
        if mesh is not None:
            set_field(data, "mesh", dataclasses.asdict(mesh))
        return build_config(data)
    except ConfigError as e:
        raise _flag_error(e) from None


def _flag_error(e: ConfigError) -> EvalError:
    """A ConfigError names a config field; say which flag sets it."""
    flag = flag_for(e, CONFIG_FLAGS | _OTHER_FLAGS)
    if flag is None:
        return EvalError(f"eval: {e}")
    return EvalError(f"eval {flag}: {e.reason} (config field `{e.field}`)")


def _settings(
    args: argparse.Namespace, setup: ModelSetup, benches: list[tuple[Any, int]]
) -> dict[str, Any]:
    """Everything that decides the samples: `--resume` requires it unchanged."""
    return dict(
        model=args.model,
        benchmarks={b.name: n for b, n in benches},
        limit=args.limit,
        max_new_tokens=args.max_new_tokens,
        max_prompt_len=args.max_prompt_len,
        prompt_overflow=args.prompt_overflow,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        template=args.template,
        c_ref=args.c_ref,
        beta_v=args.beta_v,
        z_token_id=args.z_token_id,
        eos_ids=list(setup.eos_ids),
        pad_id=setup.pad_id,
        seed=args.seed,
        batch_prompts=args.batch_prompts,
        dtype=args.dtype,
        stop_rule=args.stop_rule,
        round_size=args.round_size,
        reward=args.reward,
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Sample, grade and score every benchmark; write the outputs; print and return the summary."""
    try:
        return _run(args)
    except EvalError as e:
        raise SystemExit(f"error: {e}") from None


EXPORT_DEFAULTS = {
    "z_token_id": ("self_reward_token_id", field_default("tokens.self_reward_token_id")),
    "c_ref": ("c_ref", field_default("laser.c_ref")),
    "beta_v": ("beta_v", field_default("laser.beta_v")),
    "template": ("template", field_default("data.template")),
    "reward": ("reward", "math_verify"),
    "max_new_tokens": ("max_new_tokens", field_default("rollout.max_new_tokens")),
    "dtype": ("dtype", field_default("model.dtype")),
}
"""Flags left unset -> (key in the model's laserjax.json, the fallback without one)."""


def _run(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.time()
    if args.output_dir is None:
        args = argparse.Namespace(**vars(args) | {"output_dir": default_output_dir(args.model)})
    # Defaults of a laserjax export: score it as the run that trained it (z_c, c_ref, template,
    # reward), not with another model's constants.
    args = with_export_defaults(args, EXPORT_DEFAULTS)
    _check_flags(args)
    _eval_config(args, (), -1)  # every flag's config check, before any JAX backend starts
    maybe_initialize_distributed()  # before anything touches a JAX backend
    primary = jax.process_index() == 0
    if args.resume and jax.process_count() > 1:
        raise fail(
            "--resume",
            "is single-host only: every host must sample the same batches, "
            "and only the first host holds samples.jsonl",
        )
    benches = _load_benchmarks(args)
    try:
        setup = resolve_eval_model(
            args.model,
            args.eos_ids,
            args.pad_id,
            args.template,
            lambda eos, pad: _eval_config(args, eos, pad),
        )
    except ConfigError as e:  # a token id outside the vocabulary
        raise _flag_error(e) from None

    prompts: dict[str, tuple[list[Any], list[list[int]]]] = {}
    overflow: dict[str, int] = {}
    for bench, _ in benches:
        try:
            enc = encode_prompts(
                bench.problems,
                setup.tokenizer,
                template=args.template,
                max_prompt_len=args.max_prompt_len,
                prompt_overflow=args.prompt_overflow,
            )
        except ValueError as e:
            raise fail(
                "--max-prompt-len", f"{bench.name}: {e} (eval: --prompt-overflow filter)"
            ) from None
        if not enc.problems:
            raise fail(
                "--max-prompt-len",
                f"{bench.name}: every prompt is over {args.max_prompt_len} tokens",
            )
        prompts[bench.name] = (enc.problems, enc.token_ids)
        overflow[bench.name] = enc.num_overflow
        if enc.num_overflow:
            print(
                f"eval: {bench.name}: {enc.num_overflow} prompts over --max-prompt-len "
                f"{args.max_prompt_len} left out: {enc.overflow_ids[:5]}",
                file=sys.stderr,
            )

    settings = _settings(args, setup, benches)
    ids = {name: [p.id for p in probs] for name, (probs, _) in prompts.items()}
    out = pathlib.Path(args.output_dir)
    kept = (
        prepare_output(
            out,
            settings,
            args.batch_prompts,
            ids,
            resume=args.resume,
            overwrite=args.overwrite,
        )
        if primary
        else {name: [] for name in ids}
    )
    longest = max(len(t) for _, toks in prompts.values() for t in toks)
    mesh = None
    if MeshConfig.parse(args.mesh) is not None:
        try:
            mesh = sharding.make_mesh(setup.cfg.mesh)
        except ConfigError as e:
            raise _flag_error(e) from None
    sampler = build_sampler(
        setup,
        mesh,
        dtype=args.dtype,
        self_reward_token_id=args.z_token_id,
        max_new_tokens=args.max_new_tokens,
        max_prompt_len=max(longest, 16),
    )
    job = EvalJob(
        model=args.model,
        benches=benches,
        prompts=prompts,
        tokenizer=setup.tokenizer,
        sampler=sampler,
        scoring=Scoring(beta_v=args.beta_v, c_ref=args.c_ref),
        settings=settings,
        out=out,
        primary=primary,
        reward=args.reward,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        batch_prompts=args.batch_prompts,
        grader_workers=args.grader_workers,
        grader_timeout=args.grader_timeout,
    )
    if args.stop_rule is not None:
        shards = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
        if args.slots % shards:
            raise EvalError(
                f"eval --slots: {args.slots} decode slots do not split over the mesh's "
                f"{shards} batch shards (data x fsdp); use a multiple of {shards}"
            )
        return run_adaptive(job, parse_rule(args.stop_rule), args.round_size, args.slots)
    return run_fixed(job, kept, overflow, setup.ckpt, t0)


# ---------------------------------------------------------------------------------------------
# `eval --stop-rule RULE`: the eval command, sampling adaptively.


def add_stop_rule_arguments(parser: argparse.ArgumentParser) -> None:
    """The `eval` flags of adaptive sampling."""
    parser.add_argument(
        "--stop-rule",
        default=None,
        help="sample adaptively: rounds of --round-size per open problem, up to --n, each "
        "problem stopped by this rule (e.g. ac:0.95, rsbeta:0.95:1, rsaccept:0.9, esc:4; "
        "see laserjax.adaptive.parse_rule)",
    )
    parser.add_argument(
        "--round-size",
        type=int,
        default=4,
        help="with --stop-rule: samples per open problem per round (must divide n)",
    )
    parser.add_argument(
        "--slots",
        type=int,
        default=0,
        help="with --stop-rule: run each sampler call through this many decode slots "
        "(continuous batching: a response that ends frees its slot; the same draws); "
        "0 = a static batch",
    )


def _check_stop_rule_flags(args: argparse.Namespace) -> None:
    """`eval --stop-rule` flag errors, before any output is touched."""
    try:
        parse_rule(args.stop_rule)
    except ValueError as e:
        raise EvalError(f"eval --stop-rule: {e}") from None
    if args.resume:
        raise EvalError(
            "eval --resume: not supported with --stop-rule (an adaptive run has no whole "
            "batches of n samples to continue from); use --overwrite"
        )
    if args.slots < 0:
        raise EvalError(f"eval --slots: must be >= 0, got {args.slots}")
    if args.round_size < 1 or (args.n is not None and args.n % args.round_size):
        raise EvalError(
            f"eval --round-size: must be >= 1 and divide --n ({args.n}), got {args.round_size}"
        )
