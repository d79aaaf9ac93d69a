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
from typing import Any

import jax
import numpy as np

from laserjax import sharding
from laserjax.config import (
    Config,
    ConfigError,
    LaserConfig,
    MeshConfig,
    ModelConfig,
    RolloutConfig,
    TokenConfig,
)
from laserjax.data import BENCHMARK_N, BENCHMARKS, EVAL_DIR_ENV, encode_prompts, load_benchmark
from laserjax.distributed import maybe_initialize_distributed
from laserjax.evaluate import (
    SampleBatch,
    Scoring,
    average_over_benchmarks,
    evaluate_prompts,
    format_table,
    json_safe,
    result_from_records,
)
from laserjax.model import TransformerConfig
from laserjax.model.hf_params import load_pretrained, resolve_checkpoint, special_token_ids
from laserjax.reward import DEFAULT_TIMEOUT_S, Grader, extract_boxed
from laserjax.sampler import Sampler

DEFAULT_BATCH_PROMPTS = 16
DEFAULT_MESH = "data=-1,fsdp=1,tensor=1"

# Config fields the command builds from its flags -> the flag, for error messages.
_FLAG_OF_FIELD = {
    "tokens.self_reward_token_id": "--z-token-id",
    "tokens.eos_ids": "--eos-ids",
    "tokens.pad_id": "--pad-id",
    "laser.beta_v": "--beta-v",
    "laser.c_ref": "--c-ref",
    "rollout.temperature": "--temperature",
    "rollout.top_p": "--top-p",
    "rollout.top_k": "--top-k",
    "rollout.max_new_tokens": "--max-new-tokens",
    "rollout.max_prompt_len": "--max-prompt-len",
    "model.dtype": "--dtype",
    "mesh": "--mesh",
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
    parser.add_argument("--max-new-tokens", type=int, default=8192)
    parser.add_argument(
        "--max-prompt-len",
        type=int,
        default=2048,
        help="prompt token limit (see --prompt-overflow)",
    )
    parser.add_argument(
        "--prompt-overflow",
        choices=("error", "filter"),
        default="error",
        help="a prompt over --max-prompt-len stops the run (error, default) or "
        "is left out and counted in the summary (filter)",
    )
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 = full vocabulary")
    parser.add_argument(
        "--template",
        choices=("chat", "plain"),
        default="chat",
        help="the tokenizer's chat template, or 'Question: ...\\nAnswer:' for base models",
    )
    parser.add_argument(
        "--c-ref",
        type=float,
        default=-23.0,
        help="r_s = beta_v * (log p(z_c) - c_ref); measure it for your model "
        "with `python -m laserjax calibrate`",
    )
    parser.add_argument("--beta-v", type=float, default=0.1)
    parser.add_argument(
        "--z-token-id",
        type=int,
        default=151652,
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
        default=DEFAULT_MESH,
        help="data=D,fsdp=F,tensor=T (-1 on one axis: the remaining devices), "
        "or 'none' for one device without a mesh",
    )
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float32", "float16"),
        default="bfloat16",
        help="parameter and activation dtype",
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
    # imported here, not at the top: laserjax.commands.adaptive imports this module
    from laserjax.commands.adaptive import add_eval_arguments

    add_eval_arguments(parser)


class EvalError(ValueError):
    """Bad input to the `eval` command; the message names the flag and the fix."""


def _fail(flag: str, msg: str) -> EvalError:
    return EvalError(f"eval {flag}: {msg}")


def _parse_int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(t) for t in text.replace(",", " ").split())
    except ValueError:
        raise _fail(flag, f"expected integers separated by commas, got {text!r}") from None
    if not values:
        raise _fail(flag, "is empty")
    return values


def parse_mesh(text: str) -> dict[str, int] | None:
    """`data=-1,fsdp=1,tensor=1` -> MeshConfig fields (missing axes keep their defaults);
    `none` -> None (one device, no mesh)."""
    if text.strip().lower() == "none":
        return None
    out: dict[str, int] = {}
    for part in text.split(","):
        axis, sep, size = part.partition("=")
        axis = axis.strip()
        if not sep or axis not in ("data", "fsdp", "tensor"):
            raise _fail(
                "--mesh",
                f"{part!r} is not AXIS=SIZE with AXIS one of data, fsdp, "
                f"tensor (e.g. {DEFAULT_MESH}), nor 'none'",
            )
        try:
            out[axis] = int(size)
        except ValueError:
            raise _fail("--mesh", f"size {size!r} of axis {axis} is not an integer") from None
    return out


def _check_flags(args: argparse.Namespace) -> None:
    for flag, value, low in (
        ("--n", args.n, 1),
        ("--limit", args.limit, 1),
        ("--batch-prompts", args.batch_prompts, 1),
        ("--grader-workers", args.grader_workers, 1),
    ):
        if value is not None and value < low:
            raise _fail(flag, f"must be >= {low}, got {value}")
    if args.grader_timeout is not None and args.grader_timeout <= 0:
        raise _fail("--grader-timeout", f"must be > 0 seconds, got {args.grader_timeout}")
    if getattr(args, "stop_rule", None) is not None:
        from laserjax.commands.adaptive import check_eval_flags

        check_eval_flags(args)


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
    """The flags as a validated `Config`: the same checks (and token-id defaults) as `train`."""
    mesh = parse_mesh(args.mesh)
    try:
        return Config(
            model=ModelConfig(path=args.model, dtype=args.dtype, param_dtype=args.dtype),
            tokens=TokenConfig(
                eos_ids=eos_ids, pad_id=pad_id, self_reward_token_id=args.z_token_id
            ),
            laser=LaserConfig(beta_v=args.beta_v, c_ref=args.c_ref),
            rollout=RolloutConfig(
                temperature=args.temperature,
                top_p=args.top_p,
                top_k=args.top_k,
                max_new_tokens=args.max_new_tokens,
                max_prompt_len=args.max_prompt_len,
            ),
            mesh=MeshConfig(**(mesh or {})),
            output_dir=args.output_dir,
        )
    except ConfigError as e:
        raise _flag_error(e) from None


def _flag_error(e: Exception) -> EvalError:
    """A ConfigError names a config field; say which flag sets it."""
    text = str(e)
    for field, flag in sorted(_FLAG_OF_FIELD.items(), key=lambda kv: -len(kv[0])):
        if f"`{field}`" in text or f"`{field}." in text:
            return EvalError(f"eval {flag}: {text}")
    return EvalError(f"eval: {text}")


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
        ckpt = resolve_checkpoint(args.model)
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
        if not 0 <= pad < vocab:
            raise ConfigError(
                f"config field `tokens.pad_id`: {pad} is outside the vocabulary [0, {vocab})"
            )
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
        stop_rule=getattr(args, "stop_rule", None),
        round_size=getattr(args, "round_size", None),
    )


def _read_jsonl_rows(path: pathlib.Path) -> list[dict[str, Any]]:
    """The rows of a samples file; a torn last line (a crash mid-write) is dropped."""
    rows = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise EvalError(
                f"eval --resume: {path} line {i + 1} is not valid JSON; the file "
                "is damaged beyond its last line, start over with --overwrite"
            ) from None
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
    if parse_mesh(args.mesh) is not None:
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


def _run(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.time()
    if args.output_dir is None:
        args = argparse.Namespace(**vars(args) | {"output_dir": default_output_dir(args.model)})
    _check_flags(args)
    parse_mesh(args.mesh)
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
    if getattr(args, "stop_rule", None) is not None:
        from laserjax.commands.adaptive import eval_adaptive

        return eval_adaptive(
            args, benches, prompts, setup.tokenizer, sampler, scoring, settings, primary
        )

    rows: dict[str, list[dict[str, Any]]] = {name: list(r) for name, r in kept.items()}
    timeout = args.grader_timeout or DEFAULT_TIMEOUT_S
    with Grader(args.grader_workers, timeout_s=timeout) as grader:

        def reward_fn(responses: list[str], answers: list[str]) -> np.ndarray:
            return grader.grade_batch(responses, answers, require_single_boxed=False)

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
                extract_fn=extract_boxed,
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
    summary = json_safe(
        {
            "model": args.model,
            "checkpoint": str(setup.ckpt),
            "settings": settings,
            "benchmarks": summaries,
            "average": average,
            "wall_s": round(time.time() - t0, 1),
        }
    )
    if primary:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(format_table(summaries, average))
        print(f"samples: {out / 'samples.jsonl'}; summary: {out / 'summary.json'}")
    return summary
