"""`python -m laserjax eval`: sample, grade and score benchmarks with the self-reward
(LASER_SPEC section 5).

It runs `laserjax.evaluate.evaluate_prompts` over the paper's benchmarks and writes, under
`--output-dir`:

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
import json
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from laserjax import sharding
from laserjax.adaptive import parse_rule
from laserjax.adaptive_eval import sample_adaptively
from laserjax.answers import REWARDS, answer_extractor, exact_reward, last_number_match
from laserjax.config import (
    Config,
    ConfigError,
    MeshConfig,
    add_config_flag,
    build_config,
    field_default,
    flag_for,
    parse_ids,
    set_field,
)
from laserjax.data import (
    BENCHMARK_N,
    BENCHMARKS,
    EVAL_DIR_ENV,
    BadRow,
    encode_prompts,
    load_benchmark,
    read_jsonl,
)
from laserjax.distributed import maybe_initialize_distributed
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
from laserjax.model.hf_params import load_pretrained, special_token_ids, with_export_defaults
from laserjax.reward import DEFAULT_TIMEOUT_S, Grader
from laserjax.sampler import Sampler

DEFAULT_BATCH_PROMPTS = 16

# Flags that set a config field: their defaults are the config's, their values go through the
# config's checks, and a ConfigError's field names the flag to fix (`config.flag_for`).
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


class EvalError(ValueError):
    """Bad input to the `eval` command; the message names the flag and the fix."""


def _fail(flag: str, msg: str) -> EvalError:
    return EvalError(f"eval {flag}: {msg}")


def _parse_int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        return parse_ids(text)
    except ValueError as e:
        raise _fail(flag, str(e)) from None


def _check_flags(args: argparse.Namespace) -> None:
    for flag, value, low in (
        ("--n", args.n, 1),
        ("--limit", args.limit, 1),
        ("--batch-prompts", args.batch_prompts, 1),
        ("--grader-workers", args.grader_workers, 1),
    ):
        if value is not None and value < low:
            raise _fail(flag, f"must be >= {low}, got {value}")
    if not 0 <= args.max_bad_share <= 1:
        raise _fail("--max-bad-share", f"must be in [0, 1], got {args.max_bad_share}")
    if args.grader_timeout is not None and args.grader_timeout <= 0:
        raise _fail("--grader-timeout", f"must be > 0 seconds, got {args.grader_timeout}")
    if args.stop_rule is not None:
        _check_stop_rule_flags(args)


def _benchmark_names(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise _fail("--benchmarks", "names no benchmark")
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise _fail("--benchmarks", f"lists {sorted(dup)} more than once")
    return names


def _load_benchmarks(args: argparse.Namespace) -> list[tuple[Any, int]]:
    """(Benchmark cut to --limit, n) per --benchmarks entry, in order."""
    out = []
    for name in _benchmark_names(args.benchmarks):
        try:
            bench = load_benchmark(name, args.eval_dir)
        except (ValueError, FileNotFoundError) as e:
            raise _fail("--benchmarks", f"{e} (--eval-dir sets the benchmark folder)") from None
        try:
            bench.report.check(args.max_bad_share, "--max-bad-share")
        except ValueError as e:
            raise _fail("--benchmarks", str(e)) from None
        if bench.report.num_skipped:
            print(f"eval: {bench.report.skipped_line()}", file=sys.stderr)
        n = args.n if args.n is not None else bench.n
        if n is None:
            raise _fail(
                "--n",
                f"{name!r} is not one of the paper's benchmarks "
                f"({', '.join(BENCHMARK_N)}), so it has no default n; pass --n",
            )
        if args.limit is not None:
            bench = dataclasses.replace(bench, problems=bench.problems[: args.limit])
        out.append((bench, n))
    if len({b.name for b, _ in out}) < len(out):
        raise _fail(
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


@dataclasses.dataclass
class _Setup:
    """What the command resolved from its flags and the checkpoint, before any sampling."""

    ckpt: pathlib.Path
    tokenizer: Any
    cfg: Config
    max_positions: int
    eos_ids: tuple[int, ...]
    pad_id: int


def _resolve_model(args: argparse.Namespace) -> _Setup:
    """Checkpoint, tokenizer and token ids, validated against the vocabulary (no weights yet)."""
    from transformers import AutoTokenizer

    try:
        ckpt = resolve_model(args.model)
        mcfg = TransformerConfig.from_pretrained_dir(ckpt)
    except (FileNotFoundError, ValueError) as e:
        raise _fail("--model", str(e)) from None
    try:
        tok = AutoTokenizer.from_pretrained(str(ckpt))
    except Exception as e:  # transformers raises many kinds; say what was being loaded
        raise _fail("--model", f"cannot load a tokenizer from {str(ckpt)!r}: {e}") from None
    vocab = mcfg.vocab_size
    explicit = _parse_int_list(args.eos_ids, "--eos-ids") if args.eos_ids else ()
    cfg = _eval_config(args, explicit, -1 if args.pad_id is None else args.pad_id)
    try:
        eos, pad = special_token_ids(
            ckpt, tok, eos_ids=explicit, pad_id=-1 if args.pad_id is None else args.pad_id
        )
    except ValueError as e:
        raise _fail("--eos-ids", str(e)) from None
    cfg = _eval_config(args, eos, pad)
    try:
        cfg.validate_against_vocab(vocab, eos, pad)
    except ConfigError as e:
        raise _flag_error(e) from None
    if args.template == "chat" and not getattr(tok, "chat_template", None):
        raise _fail(
            "--template",
            f"the tokenizer in {str(ckpt)!r} has no chat template; pass "
            "--template plain for a base model",
        )
    return _Setup(ckpt, tok, cfg, mcfg.max_position_embeddings, eos, pad)


def _settings(
    args: argparse.Namespace, setup: _Setup, benches: list[tuple[Any, int]]
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


def _prepare_output(
    args: argparse.Namespace,
    settings: dict[str, Any],
    batch_prompts: int,
    problem_ids: dict[str, list[str]],
) -> dict[str, list[dict[str, Any]]]:
    """Create the output folder; with --resume, the kept rows per benchmark (whole batches of
    whole problems, in order), which are rewritten to samples.jsonl. Else start it empty."""
    out = pathlib.Path(args.output_dir)
    samples_path, config_path = out / "samples.jsonl", out / "eval_config.json"
    kept: dict[str, list[dict[str, Any]]] = {b: [] for b in problem_ids}
    exists = samples_path.is_file() and samples_path.stat().st_size > 0
    if exists and not (args.resume or args.overwrite):
        raise _fail(
            "--output-dir",
            f"{samples_path} already holds samples; pass --resume to "
            "continue that run or --overwrite to replace it",
        )
    if args.resume and exists:
        if not config_path.is_file():
            raise _fail(
                "--resume",
                f"{config_path} is missing, so the samples' settings are "
                "unknown; pass --overwrite to start over",
            )
        old = json.loads(config_path.read_text())
        changed = sorted(k for k in settings.keys() | old.keys() if old.get(k) != settings.get(k))
        if changed:
            diff = "; ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in changed)
            raise _fail(
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


def _build_sampler(args: argparse.Namespace, setup: _Setup, max_prompt_len: int) -> Sampler:
    mesh = None
    if MeshConfig.parse(args.mesh) is not None:
        try:
            mesh = sharding.make_mesh(setup.cfg.mesh)
        except ConfigError as e:
            raise _flag_error(e) from None
    if max_prompt_len + args.max_new_tokens > setup.max_positions:
        print(
            f"eval: warning: the longest prompt ({max_prompt_len} tokens) plus "
            f"--max-new-tokens {args.max_new_tokens} exceeds the model's "
            f"max_position_embeddings {setup.max_positions}",
            file=sys.stderr,
        )
    model = load_pretrained(str(setup.ckpt), dtype=args.dtype, param_dtype=args.dtype, mesh=mesh)
    return Sampler(
        model,
        eos_ids=setup.eos_ids,
        pad_id=setup.pad_id,
        self_reward_token_id=args.z_token_id,
        max_new_tokens=args.max_new_tokens,
        max_prompt_len=max_prompt_len,
        mesh=mesh,
    )


def default_output_dir(model: str) -> str:
    """runs/eval/<last path component of the model directory or hub id>."""
    return str(
        pathlib.Path("runs") / "eval" / (pathlib.PurePath(model.rstrip("/")).name or "model")
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


def _reward_fn(reward: str, grader: Grader) -> Callable[[list[str], list[str]], np.ndarray]:
    """r_v of `--reward` (`data.reward`'s choices), one function for fixed and adaptive eval."""
    if reward == "exact":
        return exact_reward
    if reward == "last_number":
        return last_number_match
    return lambda responses, answers: grader.grade_batch(
        responses, answers, require_single_boxed=False
    )


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
        raise _fail(
            "--resume",
            "is single-host only: every host must sample the same batches, "
            "and only the first host holds samples.jsonl",
        )
    benches = _load_benchmarks(args)
    setup = _resolve_model(args)

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
            raise _fail(
                "--max-prompt-len", f"{bench.name}: {e} (eval: --prompt-overflow filter)"
            ) from None
        if not enc.problems:
            raise _fail(
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
    kept = (
        _prepare_output(args, settings, args.batch_prompts, ids)
        if primary
        else {name: [] for name in ids}
    )
    out = pathlib.Path(args.output_dir)
    longest = max(len(t) for _, toks in prompts.values() for t in toks)
    sampler = _build_sampler(args, setup, max_prompt_len=max(longest, 16))
    scoring = Scoring(beta_v=args.beta_v, c_ref=args.c_ref)
    if args.stop_rule is not None:
        return _eval_adaptive(
            args, benches, prompts, setup.tokenizer, sampler, scoring, settings, primary
        )

    rows: dict[str, list[dict[str, Any]]] = {name: list(r) for name, r in kept.items()}
    timeout = args.grader_timeout or DEFAULT_TIMEOUT_S
    with Grader(args.grader_workers, timeout_s=timeout) as grader:
        reward_fn = _reward_fn(args.reward, grader)

        for bench, n in benches:
            problems, token_ids = prompts[bench.name]
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
                if primary:
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
                sampler,
                setup.tokenizer,
                token_ids[done:],
                refs[done:],
                n=n,
                reward_fn=reward_fn,
                extract_fn=answer_extractor(args.reward),  # what the reward grades is voted on
                scoring=scoring,
                temperature=args.temperature,
                top_p=args.top_p,
                top_k=args.top_k,
                seed=args.seed + done,
                batch_prompts=args.batch_prompts,
                on_batch=write,
            )

    summaries = {}
    for bench, n in benches:
        res = result_from_records(
            rows[bench.name], ids[bench.name], n, where=f"{out / 'samples.jsonl'} ({bench.name})"
        )
        summaries[bench.name] = res.summary | {"prompts_over_length": overflow[bench.name]}
    average = average_over_benchmarks(summaries)
    no_answer = sum(r["extracted_answer"] is None for rs in rows.values() for r in rs)
    total = sum(len(rs) for rs in rows.values())
    if primary and total and no_answer == total:
        what = "a final \\boxed{...} answer" if args.reward == "math_verify" else "any text"
        hint = (
            "; for a model that answers with the bare answer (e.g. the CPU demo's) pass "
            "--reward exact"
            if args.reward == "math_verify"
            else ""
        )
        print(
            f"eval: warning: none of the {total} responses has {what}, the answer the "
            f"{args.reward} reward grades, so every one grades 0{hint}",
            file=sys.stderr,
        )
    summary = json_safe(
        {
            "model": args.model,
            "checkpoint": str(setup.ckpt),
            "settings": settings,
            "benchmarks": summaries,
            "average": average,
            "data_rows_skipped": {
                b.report.source: b.report.to_json() for b, _ in benches if b.report.num_skipped
            },
            "responses_without_answer": no_answer,
            "wall_s": round(time.time() - t0, 1),
        }
    )
    if primary:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(format_table(summaries, average))
        print(f"samples: {out / 'samples.jsonl'}; summary: {out / 'summary.json'}")
    return summary


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
    if args.round_size < 1 or (args.n is not None and args.n % args.round_size):
        raise EvalError(
            f"eval --round-size: must be >= 1 and divide --n ({args.n}), got {args.round_size}"
        )


def _eval_adaptive(
    args: argparse.Namespace,
    benches: list[tuple[Any, int]],
    prompts: dict[str, tuple[list[Any], list[list[int]]]],
    tokenizer: Any,
    sampler: Any,
    scoring: Any,
    settings: dict[str, Any],
    primary: bool,
) -> dict[str, Any]:
    """Each benchmark sampled by `sample_adaptively` (budget: its n); writes every drawn sample
    to samples.jsonl (with its `round`) and summary.json with, per benchmark, the accuracy of
    the rule's answers, samples and response tokens per problem and the wall time."""
    rule = parse_rule(args.stop_rule)
    out = pathlib.Path(args.output_dir)
    t0 = time.time()
    summaries: dict[str, dict[str, Any]] = {}
    timeout = args.grader_timeout or DEFAULT_TIMEOUT_S
    with Grader(args.grader_workers, timeout_s=timeout) as grader:
        reward_fn = _reward_fn(args.reward, grader)

        for bench, n in benches:
            if n % args.round_size:
                raise EvalError(
                    f"eval --round-size: {args.round_size} does not divide {bench.name}'s n = {n}"
                )
            problems, token_ids = prompts[bench.name]

            def progress(j: int, num_open: int, name: str = bench.name) -> None:
                print(
                    f"eval: {name}: round {j}, {num_open} problems open, {time.time() - t0:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )

            res = sample_adaptively(
                sampler,
                tokenizer,
                token_ids,
                [p.answer for p in problems],
                rule,
                round_size=args.round_size,
                max_samples=n,
                reward_fn=reward_fn,
                extract_fn=answer_extractor(args.reward),
                scoring=scoring,
                temperature=args.temperature,
                top_p=args.top_p,
                top_k=args.top_k,
                seed=args.seed,
                batch_prompts=args.batch_prompts,
                on_round=progress,
            )
            if primary:
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
                                round=j // args.round_size,
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
            "model": args.model,
            "stop_rule": rule.name,
            "round_size": args.round_size,
            "settings": settings,
            "benchmarks": summaries,
            "wall_s": round(time.time() - t0, 1),
        }
    )
    if primary:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"adaptive sampling with {rule.name}, rounds of {args.round_size}")
        for name, s in summaries.items():
            print(
                f"{name}: accuracy {100 * s['accuracy']:.1f}%, {s['samples_per_problem']:.2f} "
                f"samples and {s['tokens_per_problem']:.0f} tokens per problem (budget "
                f"{s['max_samples']}), {s['wall_s']:.0f} s"
            )
        print(f"samples: {out / 'samples.jsonl'}; summary: {out / 'summary.json'}")
    return summary
