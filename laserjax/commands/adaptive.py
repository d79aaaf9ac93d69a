"""`python -m laserjax adaptive`: stopping rules compared on sample pools, offline and online.

For each `--run` (a training run directory: its `config.yaml`, its exported policy in `hf/`, its
measured c_ref in `run_info.json`) the command samples a pool of `--n` responses per held-out
problem once (the toy demo's held-out set, or the run's `data.eval` benchmarks, or
`--benchmarks`), saves it as `<output-dir>/<run name>/samples.jsonl` (the `eval` command's row
format; reused when it exists with the same settings), then replays every rule of
`adaptive_eval.default_rules` on `--orders` random orders of each problem's pool. A `--pool`
(a samples.jsonl of `eval --n N`, or one written here) is replayed without sampling.

Outputs in `--output-dir`: `replay.md` (each pool: every rule's accuracy, samples and tokens per
problem, and each family's cheapest setting at the accuracy of `--reference`, maj@16 by default),
`replay.json` (the same numbers) and `replay.png` (accuracy against samples per problem).

`--online RULE` also samples each `--run` adaptively (`adaptive_eval.sample_adaptively`: rounds
of `--round-size` per open problem, stopped by RULE, up to `--n`) and reports its accuracy,
samples, tokens and wall time beside the replay of the same rule with the same round size.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import sys
import time
from typing import Any

from flax import nnx

from laserjax import sharding, trainer
from laserjax import task as run_task
from laserjax.adaptive import parse_rule
from laserjax.adaptive_eval import (
    Pool,
    ReplayRow,
    default_rules,
    format_replay,
    matched_savings,
    plot_replay,
    replay,
    sample_adaptively,
)
from laserjax.checkpoint import Checkpointer
from laserjax.config import ConfigError
from laserjax.config_load import load_config
from laserjax.data import load_benchmark
from laserjax.evaluate import (
    Scoring,
    evaluate_prompts,
    result_from_records,
)
from laserjax.model.hf_params import load_pretrained
from laserjax.sampler import Sampler


class AdaptiveError(ValueError):
    """Bad input to the `adaptive` command; the message names the flag and the fix."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--run",
        action="append",
        default=[],
        help="a training run directory (config.yaml, hf/, run_info.json); repeatable",
    )
    parser.add_argument(
        "--pool",
        action="append",
        default=[],
        help="a samples.jsonl to replay (from `eval --n N` or an earlier `adaptive`); repeatable",
    )
    parser.add_argument(
        "--benchmarks",
        default=None,
        help="comma-separated benchmarks for a real-model --run (default: its data.eval)",
    )
    parser.add_argument("--n", type=int, default=32, help="pool size: samples per problem")
    parser.add_argument("--limit", type=int, default=None, help="first M problems per benchmark")
    parser.add_argument("--orders", type=int, default=32, help="random orders replayed per pool")
    parser.add_argument("--seed", type=int, default=0, help="sampling and order seed")
    parser.add_argument("--batch-prompts", type=int, default=64, help="problems per sampler call")
    parser.add_argument(
        "--reference", default="maj@16", help="the rule whose accuracy the saving is matched at"
    )
    parser.add_argument(
        "--online",
        action="append",
        default=[],
        help="also sample each --run adaptively with this rule, e.g. ac:0.95, rsbeta:0.95:1, "
        "rsaccept:0.9, esc:4, maj:16 (see laserjax.adaptive.parse_rule); repeatable",
    )
    parser.add_argument(
        "--round-size", type=int, default=4, help="online: samples per open problem per round"
    )
    parser.add_argument("--output-dir", default="runs/adaptive")
    parser.add_argument("--no-plot", action="store_true", help="skip replay.png (no matplotlib)")


def _fail(flag: str, msg: str) -> AdaptiveError:
    return AdaptiveError(f"adaptive {flag}: {msg}")


# ---------------------------------------------------------------------------------------------
# A run's policy, tokenizer, problems and verifier.


@dataclasses.dataclass
class _RunSetup:
    name: str
    path: str  # the run directory, resolved
    cfg: Any
    task: run_task.Task
    sampler: Any
    scoring: Any


def _load_run(path: str, benchmarks: str | None, limit: int | None) -> _RunSetup:
    """A run's final policy (its `hf/` export, else its latest checkpoint), task and scoring."""
    run = pathlib.Path(path)
    hf, ckpt_dir = run / "hf", run / "checkpoints"
    if not (run / "config.yaml").is_file() or not (hf.is_dir() or ckpt_dir.is_dir()):
        raise _fail(
            "--run",
            f"{run} is not a training run directory (config.yaml and hf/ or checkpoints/)",
        )
    try:
        cfg = load_config(run / "config.yaml")
        if cfg.model.toy is not None:
            if benchmarks:
                raise _fail(
                    "--benchmarks", f"{run} is a toy run; its held-out set is the benchmark"
                )
            model, task, _ = run_task.toy_setup(cfg, abstract=True)
        else:
            if hf.is_dir():
                cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=str(hf)))
            model, task, _ = run_task.real_setup(cfg, None, abstract=True)
            if benchmarks:
                sets = {}
                for name in (b.strip() for b in benchmarks.split(",") if b.strip()):
                    bench = load_benchmark(name)
                    enc = run_task.encode_as_run(cfg, task.tokenizer, bench.problems)
                    if not enc.problems:
                        raise _fail(
                            "--benchmarks",
                            f"{name}: every prompt is longer than the run's "
                            f"rollout.max_prompt_len ({cfg.rollout.max_prompt_len})",
                        )
                    sets[bench.name] = (enc.problems, enc.token_ids)
                task.eval_sets = sets
    except (ConfigError, FileNotFoundError, ValueError) as e:
        raise _fail("--run", f"{run}: {e}") from None
    if not task.eval_sets:
        raise _fail("--run", f"{run} has no held-out benchmarks; pass --benchmarks")
    if limit is not None:
        task.eval_sets = {k: (p[:limit], t[:limit]) for k, (p, t) in task.eval_sets.items()}
    c_ref = None
    if (run / "run_info.json").is_file():
        c_ref = json.loads((run / "run_info.json").read_text()).get("c_ref")
    if hf.is_dir():
        policy: Any = load_pretrained(str(hf), **cfg.model.transformer_fields())
    else:  # no export (train.export_hf: false): the parameters of the latest checkpoint
        mesh = sharding.make_mesh(cfg.mesh)
        graphdef, abstract = nnx.split(model, nnx.Param)
        ck = Checkpointer(ckpt_dir, keep=cfg.train.keep_checkpoints)
        step = ck.latest_step()
        if step is None:
            raise _fail("--run", f"{ckpt_dir} holds no checkpoint yet")
        state, meta = ck.restore(step, trainer._abstract_train_state(abstract, cfg, mesh))
        ck.close()
        policy, c_ref = (graphdef, state.params), meta["c_ref"]
        print(f"adaptive: {run}: the policy of checkpoint step {step}", file=sys.stderr)
    if c_ref is None:
        raise _fail("--run", f"{run}: no measured c_ref in run_info.json or a checkpoint")
    sampler = Sampler(
        policy,
        eos_ids=task.eos_ids,
        pad_id=task.pad_id,
        self_reward_token_id=cfg.tokens.self_reward_token_id,
        max_new_tokens=cfg.rollout.max_new_tokens,
        max_prompt_len=cfg.rollout.max_prompt_len,
        prompt_buckets=cfg.rollout.prompt_buckets,
    )
    return _RunSetup(
        run.name, str(run.resolve()), cfg, task, sampler, Scoring(cfg.laser.beta_v, float(c_ref))
    )


def _pool_titles(read: list[tuple[pathlib.Path, str, Pool]]) -> dict[str, Pool]:
    """Each --pool file's pools titled `folder/benchmark`, with as many more parent folders, the
    same number for all, as it takes to tell them apart (two runs' `x/samples.jsonl` stay two
    pools, titled `a/x/...` and `b/x/...`)."""
    for depth in range(1, max((len(p.parent.parts) for p, _, _ in read), default=1) + 1):
        titles = ["/".join((*p.parent.parts[-depth:], b)).lstrip("/") for p, b, _ in read]
        if len(set(titles)) == len(titles):
            break
    return {t: pool for t, (_, _, pool) in zip(titles, read, strict=True)}


def _sample_pool(
    setup: _RunSetup, bench: str, n: int, seed: int, batch_prompts: int, out: pathlib.Path
) -> Pool:
    """The pool of `bench`, read back from `out` when it was sampled there with these settings."""
    problems, prompts = setup.task.eval_sets[bench]
    ids = [p.id for p in problems]
    settings = {
        "run": setup.path,
        "n": n,
        "seed": seed,
        "batch_prompts": batch_prompts,
        "problems": ids,
    }
    samples, cfg_path = out / "samples.jsonl", out / "pool_config.json"
    if samples.is_file() and cfg_path.is_file() and json.loads(cfg_path.read_text()) == settings:
        rows = [json.loads(line) for line in samples.read_text().splitlines() if line.strip()]
        print(f"adaptive: {setup.name}/{bench}: reusing the pool in {samples}", file=sys.stderr)
        return Pool.from_result(result_from_records(rows, ids, n, where=str(samples)))
    r = setup.cfg.rollout
    t0 = time.time()
    res = evaluate_prompts(
        setup.sampler,
        setup.task.tokenizer,
        prompts,
        [p.answer for p in problems],
        n=n,
        reward_fn=setup.task.reward_fn,
        extract_fn=setup.task.extract_fn,
        scoring=setup.scoring,
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        seed=seed,
        batch_prompts=batch_prompts,
        ks=[1],
    )
    out.mkdir(parents=True, exist_ok=True)
    rows = res.records(ids)
    with samples.open("w") as f:
        for row, prob in zip(rows, (p for p in problems for _ in range(n)), strict=True):
            f.write(json.dumps(row | {"benchmark": bench, "reference": prob.answer}) + "\n")
    cfg_path.write_text(json.dumps(settings) + "\n")
    print(
        f"adaptive: {setup.name}/{bench}: sampled {len(ids)} x {n} in {time.time() - t0:.0f} s "
        f"-> {samples}",
        file=sys.stderr,
    )
    return Pool.from_result(res)


def _read_pool(path: str, n: int | None) -> dict[str, Pool]:
    """The pools (one per benchmark) of a samples.jsonl; every problem needs the same n."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise _fail("--pool", f"{p} is not a file; pass a samples.jsonl")
    by_bench: dict[str, list[dict[str, Any]]] = {}
    for i, line in enumerate(p.read_text().splitlines()):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise _fail("--pool", f"{p} line {i + 1} is not JSON") from None
            by_bench.setdefault(row.get("benchmark", "pool"), []).append(row)
    if not by_bench:
        raise _fail("--pool", f"{p} holds no samples")
    pools = {}
    for bench, rows in by_bench.items():
        ids = list(dict.fromkeys(r["problem_id"] for r in rows))
        counts = {len([r for r in rows if r["problem_id"] == i]) for i in ids}
        if len(counts) != 1:
            raise _fail(
                "--pool",
                f"{p} ({bench}): problems have {sorted(counts)} samples; "
                "a pool needs the same number for every problem",
            )
        pools[bench] = Pool.from_result(
            result_from_records(rows, ids, counts.pop(), where=f"{p} ({bench})")
        )
    return pools


# ---------------------------------------------------------------------------------------------


def _row_json(r: ReplayRow) -> dict[str, Any]:
    return dataclasses.asdict(r)


def run(args: argparse.Namespace) -> dict[str, Any]:
    try:
        return _run(args)
    except AdaptiveError as e:
        raise SystemExit(f"error: {e}") from None


def _run(args: argparse.Namespace) -> dict[str, Any]:
    if not args.run and not args.pool:
        raise _fail("--run", "give at least one --run directory or --pool samples.jsonl")
    for flag, value in (
        ("--n", args.n),
        ("--orders", args.orders),
        ("--round-size", args.round_size),
        ("--batch-prompts", args.batch_prompts),
    ):
        if value < 1:
            raise _fail(flag, f"must be >= 1, got {value}")
    online_rules = []
    if args.online:
        if not args.run:
            raise _fail("--online", "needs a --run to sample from")
        try:
            online_rules = [parse_rule(spec) for spec in args.online]
        except ValueError as e:
            raise _fail("--online", str(e)) from None
        if args.n % args.round_size:
            raise _fail("--round-size", f"must divide --n ({args.n}), got {args.round_size}")
    out = pathlib.Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    pools: dict[str, Pool] = {}
    setups: dict[str, tuple[_RunSetup, str]] = {}
    names = [pathlib.Path(p).resolve().name for p in args.run]
    if len(set(names)) < len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise _fail(
            "--run",
            f"two runs are named {twice!r}: their pools would share {out / twice}; "
            "give each run a folder of its own name",
        )
    for path in args.run:
        setup = _load_run(path, args.benchmarks, args.limit)
        for bench in setup.task.eval_sets:
            title = f"{setup.name}/{bench}"
            pools[title] = _sample_pool(
                setup, bench, args.n, args.seed, args.batch_prompts, out / setup.name / bench
            )
            setups[title] = (setup, bench)
    read: list[tuple[pathlib.Path, str, Pool]] = []
    for path in args.pool:
        if any(pathlib.Path(path).resolve() == seen for seen, _, _ in read):
            raise _fail("--pool", f"{path} is given twice")
        for bench, pool in _read_pool(path, None).items():
            read.append((pathlib.Path(path).resolve(), bench, pool))
    pools.update(_pool_titles(read))

    report: dict[str, Any] = {"orders": args.orders, "seed": args.seed, "pools": {}}
    text, curves = [], {}
    for title, pool in pools.items():
        t0 = time.time()
        rules = default_rules(pool.n)
        rows = replay(pool, rules, num_orders=args.orders, seed=args.seed)
        try:
            ref, savings = matched_savings(rows, args.reference)
        except ValueError as e:
            raise _fail("--reference", str(e)) from None
        ref_rule = next(r for r in rules if r.name == ref.rule)
        (ref_boot,) = replay(pool, [ref_rule], num_orders=args.orders, seed=args.seed, replace=True)
        text.append(
            format_replay(
                rows,
                ref,
                savings,
                f"{title}: {pool.num_problems} problems x {pool.n} samples, {args.orders} orders",
                ref_boot,
            )
        )
        curves[title] = rows
        entry: dict[str, Any] = {
            "problems": pool.num_problems,
            "n": pool.n,
            "rules": [_row_json(r) for r in rows],
            "matched": [dataclasses.asdict(s) for s in savings],
            "reference_bootstrap": _row_json(ref_boot),
            "replay_s": round(time.time() - t0, 1),
        }
        if online_rules and title in setups:
            entry["online"] = [_online(args, rule, pool, *setups[title]) for rule in online_rules]
            text += [_format_online(o) for o in entry["online"]]
        report["pools"][title] = entry
    (out / "replay.md").write_text("\n".join(text))
    (out / "replay.json").write_text(json.dumps(_nan_to_none(report), indent=2) + "\n")
    if not args.no_plot:
        plot_replay(curves, str(out / "replay.png"), args.reference)
    print("\n".join(text))
    print(
        f"table: {out / 'replay.md'}; numbers: {out / 'replay.json'}"
        + ("" if args.no_plot else f"; plot: {out / 'replay.png'}")
    )
    return report


def _online(
    args: argparse.Namespace, rule: Any, pool: Pool, setup: _RunSetup, bench: str
) -> dict[str, Any]:
    """Sample adaptively, and the replay of the same rule and round size on the pool."""
    problems, prompts = setup.task.eval_sets[bench]
    r = setup.cfg.rollout
    # Compile every call width `sample_adaptively` can use (powers of two up to --batch-prompts)
    # first, so the wall time is sampling, not compilation, and rules compare on it.
    width = 1
    while width < 2 * min(args.batch_prompts, len(prompts)):
        w = min(width, args.batch_prompts)
        setup.sampler.sample([prompts[0]] * w, k=args.round_size, temperature=r.temperature)
        width *= 2
    res = sample_adaptively(
        setup.sampler,
        setup.task.tokenizer,
        prompts,
        [p.answer for p in problems],
        rule,
        round_size=args.round_size,
        max_samples=args.n,
        reward_fn=setup.task.reward_fn,
        extract_fn=setup.task.extract_fn,
        scoring=setup.scoring,
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        seed=args.seed + 1,  # fresh samples, not the pool's
        batch_prompts=args.batch_prompts,
    )
    (row,) = replay(
        pool, [rule], num_orders=args.orders, seed=args.seed, round_size=args.round_size
    )
    (boot,) = replay(
        pool,
        [rule],
        num_orders=args.orders,
        seed=args.seed,
        round_size=args.round_size,
        replace=True,
    )
    return {
        "rule": rule.name,
        "round_size": args.round_size,
        "accuracy": res.accuracy,
        "samples": res.samples,
        "tokens": res.tokens,
        "wall_s": round(res.wall_s, 2),
        "sampler_calls": res.sampler_calls,
        "replay_accuracy": row.accuracy,
        "replay_accuracy_sd": row.accuracy_sd,
        "replay_samples": row.samples,
        "replay_tokens": row.tokens,
        "bootstrap_accuracy": boot.accuracy,
        "bootstrap_accuracy_sd": boot.accuracy_sd,
        "bootstrap_samples": boot.samples,
    }


def _format_online(o: dict[str, Any]) -> str:
    # The online run and the pool are each one draw: their difference varies by about sqrt(2)
    # times one run's spread, which the bootstrap replay measures.
    noise = math.sqrt(2) * o["bootstrap_accuracy_sd"]

    def z(x: float) -> float:
        return (o["accuracy"] - x) / noise if noise else math.nan

    return (
        f"online {o['rule']} (rounds of {o['round_size']}): accuracy {100 * o['accuracy']:.2f}%, "
        f"{o['samples']:.2f} samples and {o['tokens']:.1f} tokens per problem, "
        f"{o['wall_s']:.1f} s in {o['sampler_calls']} sampler calls. Replay of the same rule and "
        f"rounds: {100 * o['replay_accuracy']:.2f}% at {o['replay_samples']:.2f} samples "
        f"({o['replay_tokens']:.1f} tokens) over permutations, "
        f"{100 * o['bootstrap_accuracy']:.2f}% at {o['bootstrap_samples']:.2f} samples over "
        f"bootstrap draws (one run's sd {100 * o['bootstrap_accuracy_sd']:.2f}). Online minus "
        f"replay: {z(o['replay_accuracy']):+.2f} (permutations), "
        f"{z(o['bootstrap_accuracy']):+.2f} (bootstrap) x sqrt(2) sd\n"
    )


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
