"""The LaSeR trainer loop (LASER_SPEC section 4); `laserjax.commands.train` runs it.

One step: a batch of prompts from the data iterator -> the sampler (K samples each, with the
rollout-time self-reward from its extra decode step) -> the verifier -> the jitted train step
(advantages, integration after the warm-ups, PPO + self-reward MSE from one forward) -> metrics,
checkpoints, periodic held-out evaluation.

The run directory (`output_dir`) holds `config.yaml`, `metrics.jsonl` (one line per step),
`eval.jsonl` (one line per evaluation), `checkpoints/`, `summary.json` and the final policy in
Hugging Face format under `hf/`. A run restarted with the same `output_dir` resumes from its
latest checkpoint and reproduces the uninterrupted run's metrics.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from laserjax import eval_metrics, run_identity, sharding, toy_task
from laserjax.checkpoint import Checkpointer
from laserjax.config import Config, ConfigError, to_dict
from laserjax.data import Problem, encode_prompts, load_benchmark, load_problems, make_train_loader
from laserjax.evaluate import (
    EvalResult,
    Scoring,
    average_over_benchmarks,
    decode_responses,
    evaluate_prompts,
)
from laserjax.model import Transformer, TransformerConfig
from laserjax.model.hf_params import (
    load_pretrained,
    resolve_checkpoint,
    save_pretrained,
    special_token_ids,
)
from laserjax.reward import Grader, extract_boxed
from laserjax.sampler import Sampler
from laserjax.train_step import (
    StepSettings,
    TrainBatch,
    TrainState,
    check_batch,
    init_train_state,
    make_optimizer,
    make_train_step,
    train_state_sharding,
)

# metrics.jsonl names -> the train step's metric names.
STEP_METRICS = {
    "policy_loss": "actor/pg_loss",
    "mse_loss": "self_reward/mse",
    "grad_norm": "actor/grad_norm",
    "clipfrac": "actor/pg_clipfrac",
    "clipfrac_dual": "actor/pg_clipfrac_lower",
    "ppo_kl": "actor/ppo_kl",
    "kl_loss": "actor/kl_loss",
    "std_filter_fallback_frac": "self_reward/std_filter_fallback_frac",
    "mse_active": "self_reward/mse_active",
    "integration_active": "self_reward/integration_active",
    "train_self_verify_f1": "self_reward/f1",
}


class TrainingDiverged(RuntimeError):
    """A non-finite loss, gradient or parameter: the run stops, earlier checkpoints intact."""


@dataclasses.dataclass
class Task:
    """What the loop needs from the data side."""

    tokenizer: Any
    eos_ids: tuple[int, ...]
    pad_id: int
    train_problems: list[Problem]
    train_prompts: list[list[int]]
    eval_sets: dict[str, tuple[list[Problem], list[list[int]]]]
    reward_fn: Callable[[list[str], list[str]], np.ndarray]
    extract_fn: Callable[[str], str | None]
    close: Callable[[], None] = lambda: None


# ---------------------------------------------------------------------------------------------
# Set-up: model, tokenizer, data, reward.


def _toy_setup(cfg: Config, abstract: bool) -> tuple[Transformer, Task, dict[str, Any]]:
    toy = toy_task.ToyConfig.from_dict(cfg.model.toy)
    tok, ids = toy_task.make_tokenizer(), toy_task.token_ids()
    cfg.validate_against_vocab(len(tok), (ids["eos"],), ids["pad"])  # before any compile
    if abstract:
        mcfg = toy_task.model_config(toy, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype)
        model = nnx.eval_shape(lambda: Transformer(mcfg, rngs=nnx.Rngs(0)))
        info: dict[str, Any] = {}
    else:
        model, info = toy_task.build(
            toy, seed=cfg.train.seed, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype
        )
    train, held_out = toy_task.problems(toy)
    task = Task(
        tokenizer=tok,
        eos_ids=(ids["eos"],),
        pad_id=ids["pad"],
        train_problems=train,
        train_prompts=[tok.encode(p.problem) for p in train],
        eval_sets={"toy_arithmetic": (held_out, [tok.encode(p.problem) for p in held_out])},
        reward_fn=toy_task.exact_match,
        extract_fn=lambda r: r.strip() or None,
    )
    return model, task, info


def _real_setup(cfg: Config, mesh, abstract: bool) -> tuple[Transformer, Task, dict[str, Any]]:
    from transformers import AutoTokenizer

    ckpt = resolve_checkpoint(cfg.model.path)
    mcfg = TransformerConfig.from_pretrained_dir(
        ckpt, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype, remat=cfg.model.remat
    )
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    try:
        eos, pad = special_token_ids(
            ckpt, tok, eos_ids=cfg.tokens.eos_ids, pad_id=cfg.tokens.pad_id
        )
    except ValueError as e:
        raise ConfigError(f"config field `tokens.eos_ids`: {e}") from None
    cfg.validate_against_vocab(mcfg.vocab_size, eos, pad)  # before loading or compiling
    if abstract:
        model = nnx.eval_shape(lambda: Transformer(mcfg, rngs=nnx.Rngs(0)))
    else:
        model = load_pretrained(
            str(ckpt),
            dtype=cfg.model.dtype,
            param_dtype=cfg.model.param_dtype,
            remat=cfg.model.remat,
            mesh=mesh,
        )
    if not cfg.data.train:
        raise ConfigError("config field `data.train`: set a jsonl/parquet path or hf:org/name")
    problems, report = load_problems(
        cfg.data.train, problem_field=cfg.data.problem_field, answer_field=cfg.data.answer_field
    )
    enc = encode_prompts(
        problems,
        tok,
        template=cfg.data.template,
        max_prompt_len=cfg.rollout.max_prompt_len,
        prompt_overflow=cfg.data.prompt_overflow,
    )
    info = {
        "train_rows_skipped": report.num_skipped,
        "train_prompts_over_length": enc.num_overflow,
        "train_problems": len(enc.problems),
    }
    eval_sets = {}
    for name in cfg.data.eval:
        bench = load_benchmark(name)
        e = encode_prompts(
            bench.problems,
            tok,
            template=cfg.data.template,
            max_prompt_len=cfg.rollout.max_prompt_len,
            prompt_overflow="filter",
        )
        eval_sets[bench.name] = (e.problems, e.token_ids)
    if cfg.data.reward == "exact":
        reward_fn, close = toy_task.exact_match, (lambda: None)
    else:
        grader = Grader()
        reward_fn = lambda rs, ans: grader.grade_batch(  # noqa: E731
            rs, ans, require_single_boxed=cfg.data.require_single_boxed
        )
        close = grader.close
    task = Task(
        tokenizer=tok,
        eos_ids=eos,
        pad_id=pad,
        train_problems=enc.problems,
        train_prompts=enc.token_ids,
        eval_sets=eval_sets,
        reward_fn=reward_fn,
        extract_fn=extract_boxed,
        close=close,
    )
    return model, task, info


# ---------------------------------------------------------------------------------------------
# Logging.


class MetricsLog:
    """metrics.jsonl (flushed per line), plus TensorBoard / W&B when asked for and installed."""

    def __init__(self, out: pathlib.Path, cfg: Config, resume_step: int):
        self.path = out / "metrics.jsonl"
        self.eval_path = out / "eval.jsonl"
        self.primary = jax.process_index() == 0
        if self.primary:
            for p in (self.path, self.eval_path):
                _keep_lines_up_to(p, resume_step)
        self.tb = self.wandb = None
        if self.primary and cfg.train.tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    SummaryWriter = None
                    print(
                        "train.tensorboard: neither tensorboardX nor torch's tensorboard is "
                        "installed; pip install tensorboardX",
                        file=sys.stderr,
                    )
            if SummaryWriter is not None:
                self.tb = SummaryWriter(str(out / "tensorboard"))
        if self.primary and cfg.train.wandb:
            try:
                import wandb

                self.wandb = wandb.init(
                    project=cfg.train.wandb_project,
                    config=to_dict(cfg),
                    dir=str(out),
                    resume="allow",
                    id=_run_id(out),
                )
            except ImportError:
                print("train.wandb: wandb is not installed; pip install wandb", file=sys.stderr)

    def write(self, row: dict[str, Any], *, kind: str = "train") -> None:
        if not self.primary:
            return
        path = self.path if kind == "train" else self.eval_path
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        step = row["step"]
        scalars = {k: v for k, v in row.items() if isinstance(v, int | float) and k != "step"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"{kind}/{k}", v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({f"{kind}/{k}": v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _run_id(out: pathlib.Path) -> str:
    return "".join(c if c.isalnum() else "-" for c in out.resolve().as_posix())[-64:]


def _keep_lines_up_to(path: pathlib.Path, step: int) -> None:
    """On resume, set aside (never delete) the lines a killed run wrote after its checkpoint."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    keep = [ln for ln in lines if ln.strip() and json.loads(ln)["step"] <= step]
    if len(keep) == len(lines):
        return
    n = 0
    while (backup := path.with_name(f"{path.name}.before-resume-{n}")).exists():
        n += 1
    path.rename(backup)
    path.write_text("".join(ln + "\n" for ln in keep))


def zc_emitted_fraction(
    response_tokens: np.ndarray, response_mask: np.ndarray, zc_id: int
) -> float:
    """Share of responses that sampled z_c. The score assumes z_c is never emitted (LASER_SPEC
    section 1); a value that climbs means the self-verification loss has raised log p(z_c)
    enough to leak into responses (c_ref too close to 0 for beta_v, e.g. on a tiny vocabulary)."""
    hit = (np.asarray(response_tokens) == zc_id) & np.asarray(response_mask, bool)
    return float(hit.any(axis=-1).mean())


def _finite(x: Any) -> bool:
    return bool(np.all(np.isfinite(np.asarray(x))))


@jax.jit
def _params_finite(params) -> jax.Array:
    leaves = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(params)
        if jnp.issubdtype(x.dtype, jnp.floating)
    ]
    return jnp.all(jnp.stack(leaves))


# ---------------------------------------------------------------------------------------------
# The loop.


class Trainer:
    def __init__(self, cfg: Config, allow_change: tuple[str, ...] = ()):
        self.cfg = cfg
        self.out = pathlib.Path(cfg.output_dir)
        # Before anything is built or written: a run directory holds one run (run_identity).
        self.identity = run_identity.check(self.out, cfg, allow_change)
        self.mesh = sharding.make_mesh(cfg.mesh)
        self.ckpt = Checkpointer(self.out / "checkpoints", keep=cfg.train.keep_checkpoints)
        self.resume_step = self.ckpt.latest_step()
        resuming = self.resume_step is not None
        if resuming and self.resume_step > cfg.train.total_steps:
            raise ConfigError(
                f"config field `train.total_steps`: {cfg.train.total_steps} is below the step "
                f"of the latest checkpoint in {self.out / 'checkpoints'} ({self.resume_step}); "
                "a run cannot be shortened below what it has trained: use a new output_dir"
            )
        setup = (
            _toy_setup if cfg.model.toy is not None else (lambda c, a: _real_setup(c, self.mesh, a))
        )
        model, self.task, self.setup_info = setup(cfg, resuming)
        t = self.task
        per_host = cfg.train.prompts_per_step // jax.process_count()
        if per_host * jax.process_count() != cfg.train.prompts_per_step:
            raise ConfigError(
                f"config field `train.prompts_per_step`: "
                f"{cfg.train.prompts_per_step} is not divisible by the "
                f"{jax.process_count()} processes"
            )
        self.loader = make_train_loader(
            t.train_problems,
            batch_size=per_host,
            seed=cfg.data.seed,
            shard_index=jax.process_index(),
            shard_count=jax.process_count(),
        )
        if resuming:
            graphdef, abstract = nnx.split(model, nnx.Param)
            self.graphdef = graphdef
            self.state = _abstract_train_state(abstract, cfg, self.mesh)
        else:
            self.graphdef, self.state = init_train_state(model, cfg.optim, self.mesh)
        self.sampler: Sampler | None = None  # built once the parameters are concrete
        self.c_ref: float | None = None if cfg.laser.c_ref == "auto" else float(cfg.laser.c_ref)
        self.step_fn = None

    # -- pieces -----------------------------------------------------------------------------

    def _make_sampler(self) -> Sampler:
        cfg, t = self.cfg, self.task
        return Sampler(
            (self.graphdef, self.state.params),
            eos_ids=t.eos_ids,
            pad_id=t.pad_id,
            self_reward_token_id=cfg.tokens.self_reward_token_id,
            max_new_tokens=cfg.rollout.max_new_tokens,
            max_prompt_len=cfg.rollout.max_prompt_len,
            prompt_buckets=cfg.rollout.prompt_buckets,
            mesh=self.mesh,
        )

    def _scoring(self) -> Scoring:
        return Scoring(beta_v=self.cfg.laser.beta_v, c_ref=self.c_ref)

    def _rollout(self, prompts: list[list[int]], answers: list[str], seed: int):
        r = self.cfg.rollout
        rollout = self.sampler.sample(
            prompts,
            k=r.samples_per_prompt,
            temperature=r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
            seed=seed,
        )
        texts = decode_responses(self.task.tokenizer, rollout)
        refs = [answers[i // r.samples_per_prompt] for i in range(len(texts))]
        return rollout, np.asarray(self.task.reward_fn(texts, refs), np.float32)

    def _build_step(self) -> None:
        cfg = self.cfg
        laser_cfg = dataclasses.replace(cfg.laser, c_ref=self.c_ref)
        settings = StepSettings(
            group_size=cfg.rollout.samples_per_prompt,
            self_reward_token_id=cfg.tokens.self_reward_token_id,
            temperature=cfg.rollout.temperature or 1.0,
            micro_batch_size=cfg.train.micro_batch_size,
        )
        self.step_fn = make_train_step(
            self.graphdef,
            train_state_sharding(self.state, self.mesh),
            laser_cfg,
            cfg.policy_loss,
            cfg.optim,
            settings,
            self.mesh,
        )

    def evaluate(self, step: int) -> dict[str, float]:
        cfg = self.cfg
        rows: dict[str, float] = {}
        results: dict[str, EvalResult] = {}
        for name, (problems, prompts) in self.task.eval_sets.items():
            res = evaluate_prompts(
                self.sampler,
                self.task.tokenizer,
                prompts,
                [p.answer for p in problems],
                n=cfg.train.eval_samples,
                reward_fn=self.task.reward_fn,
                extract_fn=self.task.extract_fn,
                scoring=self._scoring(),
                temperature=cfg.rollout.temperature,
                top_p=cfg.rollout.top_p,
                top_k=cfg.rollout.top_k,
                seed=10_000_019 * (cfg.train.seed + 1) + step,
                ks=[cfg.train.eval_samples],
            )
            results[name] = res
            rows |= {f"{name}/{k}": v for k, v in res.summary.items()}
        k = cfg.train.eval_samples
        avg = average_over_benchmarks({n: r.summary for n, r in results.items()})
        keys = {
            "accuracy": "accuracy",
            "self_verify_f1": "sv_f1",
            "self_verify_acc_correct": "sv_acc_correct",
            "self_verify_acc_incorrect": "sv_acc_incorrect",
            "maj_at_k": f"maj@{k}",
            "weighted_maj_at_k": f"weighted_maj@{k}",
            "best_of_k": f"best_of_{k}",
            "auroc": "auroc",
            "auroc_within": "auroc_within",
            "ece": "ece",
        }
        for out_key, key in keys.items():
            value = avg.get(key, math.nan)
            rows[out_key] = None if math.isnan(value) else float(value)
        return {"step": step, **rows}

    def _measure_c_ref(self, prompts, answers) -> float:
        """c_ref = mean log pi_ref(z_c | x, y, eos) of the starting policy (spec section 1)."""
        rollout, _ = self._rollout(prompts, answers, seed=-1 % 2**31)
        vals = rollout.logp_zc[rollout.finished]
        if vals.size == 0:
            raise ConfigError(
                "config field `laser.c_ref`: `auto` needs finished responses in "
                "the first rollout batch, and none ended with EOS; run "
                "`python -m laserjax calibrate` and set the value"
            )
        return float(np.mean(vals))

    def _global_batch_indices(self) -> np.ndarray:
        """This step's prompts. Each process reads its own share of the step batch from the data
        stream; on several processes the shares are gathered so every process holds the global
        batch (in stream order, as one process would read it) and feeds the same global arrays to
        the sharded sampler and train step."""
        idx = np.asarray(next(self.loader))
        if jax.process_count() == 1:
            return idx
        from jax.experimental import multihost_utils

        shares = np.asarray(multihost_utils.process_allgather(idx))  # [processes, B]
        return shares.T.reshape(-1)  # host h read stream elements h, h + H, ...

    def _save(self, step: int) -> None:
        if not bool(_params_finite(self.state.params)):
            raise TrainingDiverged(
                f"step {step}: the updated parameters hold NaN or inf; not "
                "saving them. The last good checkpoint is intact"
            )
        self.ckpt.save(
            step,
            self.state,
            {
                "step": step,
                "data": self.loader.get_state(),
                "c_ref": self.c_ref,
                "seed": self.cfg.train.seed,
            },
        )

    # -- the run ------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        cfg, t = self.cfg, self.task
        t0 = time.time()
        primary = jax.process_index() == 0
        if primary:
            self.out.mkdir(parents=True, exist_ok=True)
            self.identity.write(self.out, cfg, self.resume_step)
        start = 0
        run_info_path = self.out / "run_info.json"
        summary_path = self.out / "summary.json"
        if self.resume_step == cfg.train.total_steps and summary_path.is_file():
            # Finished already: report it, rewrite nothing (a rerun is not a new result).
            summary = json.loads(summary_path.read_text())
            if primary:
                print(
                    f"{self.out}: this run is complete (step {self.resume_step}); nothing to do, "
                    f"{summary_path.name} left as it is. To train on, raise train.total_steps "
                    "and pass --allow-change train.total_steps"
                )
                print(format_summary(summary))
            t.close()
            self.ckpt.close()
            return summary
        if self.resume_step is not None:
            self.state, meta = self.ckpt.restore(self.resume_step, self.state)
            self.loader.set_state(meta["data"])
            self.c_ref = meta["c_ref"]
            start = meta["step"]
            self.sampler = self._make_sampler()
            run_info = json.loads(run_info_path.read_text())
            print(f"resumed from checkpoint step {start} in {self.out / 'checkpoints'}")
            if primary:
                run_identity.record(self.out, "resume", from_step=start)
        else:
            self.sampler = self._make_sampler()
            if self.c_ref is None:
                probe = [t.train_prompts[i] for i in range(min(len(t.train_prompts), 64))]
                answers = [t.train_problems[i].answer for i in range(len(probe))]
                self.c_ref = self._measure_c_ref(probe, answers)
            run_info = {
                "c_ref": self.c_ref,
                **self.setup_info,
                "eval_start": self.evaluate(0) if t.eval_sets else {},
            }
            if primary:
                run_identity.set_aside(run_info_path, "restart")
                run_info_path.write_text(json.dumps(run_info, indent=2))
        # A fresh run sets aside every line an earlier, never-checkpointed run left behind.
        log = MetricsLog(self.out, cfg, start if self.resume_step is not None else -1)
        if self.resume_step is None and run_info["eval_start"]:
            log.write(run_info["eval_start"], kind="eval")
        self._build_step()
        progress = _progress(cfg, start)
        last_eval = run_info.get("eval_start", {})
        try:
            for step in range(start + 1, cfg.train.total_steps + 1):
                tic = time.time()
                idx = self._global_batch_indices()
                prompts = [t.train_prompts[i] for i in idx]
                answers = [t.train_problems[i].answer for i in idx]
                rollout, rewards = self._rollout(
                    prompts, answers, seed=(cfg.train.seed * 1_000_003 + step) % 2**31
                )
                batch = TrainBatch.from_rollout(rollout, rewards)
                check_batch(batch, cfg.rollout.samples_per_prompt)
                self.state, metrics = self.step_fn(self.state, batch)
                metrics = jax.device_get(metrics)
                row = self._step_row(step, rollout, rewards, metrics, time.time() - tic)
                for key in ("policy_loss", "mse_loss", "grad_norm"):
                    if key in row and not _finite(row[key]):
                        raise TrainingDiverged(
                            f"step {step}: {key} = {row[key]}; stopping. The last good "
                            f"checkpoint (step {self.ckpt.latest_step()}) is intact in "
                            f"{self.out / 'checkpoints'}; lower optim.learning_rate or check "
                            "the data"
                        )
                self.sampler.update_params(self.state.params)
                log.write(row)
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(
                        reward=f"{row['reward_mean']:.3f}", f1=f"{row['self_verify_f1']:.3f}"
                    )
                if step % cfg.train.save_every == 0 or step == cfg.train.total_steps:
                    self._save(step)
                if (
                    t.eval_sets
                    and cfg.train.eval_every
                    and step % cfg.train.eval_every == 0
                    and step != cfg.train.total_steps
                ):
                    log.write(self.evaluate(step), kind="eval")
            if t.eval_sets:
                last_eval = self.evaluate(cfg.train.total_steps)
                log.write(last_eval, kind="eval")
        finally:
            if progress is not None:
                progress.close()
            log.close()
            t.close()
        summary = self._summary(run_info.get("eval_start", {}), last_eval, time.time() - t0)
        if primary:
            run_identity.set_aside(summary_path, "resume")  # e.g. a finished run trained on
            summary_path.write_text(json.dumps(summary, indent=2))
            run_identity.record(
                self.out,
                "finish",
                from_step=start,
                step=cfg.train.total_steps,
                seconds=round(summary["seconds"], 1),
            )
            print(format_summary(summary))
        if cfg.train.export_hf:
            self.export(self.out / "hf")
        self.ckpt.close()
        return summary

    def _step_row(self, step, rollout, rewards, metrics, seconds) -> dict[str, Any]:
        scores = self._scoring().score(rollout.logp_zc, rollout.finished)
        sv = eval_metrics.self_verification(rewards, scores)
        row = {
            "step": step,
            "reward_mean": float(rewards.mean()),
            "self_verify_f1": sv.f1,
            "self_verify_acc_correct": _nan_to_none(sv.acc_correct),
            "self_verify_acc_incorrect": _nan_to_none(sv.acc_incorrect),
            "r_s_correct_mean": _mean_or_none(scores[(rewards == 1) & rollout.finished]),
            "r_s_incorrect_mean": _mean_or_none(scores[(rewards == 0) & rollout.finished]),
            "response_len_mean": float(rollout.lengths.mean()),
            "truncated_frac": float(rollout.truncated.mean()),
            "zc_emitted_frac": zc_emitted_fraction(
                rollout.response_tokens, rollout.response_mask, self.cfg.tokens.self_reward_token_id
            ),
        }
        for name, key in STEP_METRICS.items():
            if key in metrics:
                row[name] = float(metrics[key])
        row.setdefault("mse_loss", 0.0)
        row["step_seconds"] = seconds
        return row

    def _summary(self, start: dict, end: dict, seconds: float) -> dict[str, Any]:
        k = self.cfg.train.eval_samples
        return {
            "algorithm": self.cfg.laser.algorithm,
            "steps": self.cfg.train.total_steps,
            "seed": self.cfg.train.seed,
            "c_ref": self.c_ref,
            "accuracy_start": start.get("accuracy"),
            "accuracy_end": end.get("accuracy"),
            "self_verify_f1_start": start.get("self_verify_f1"),
            "self_verify_f1_end": end.get("self_verify_f1"),
            "self_verify_acc_correct_end": end.get("self_verify_acc_correct"),
            "self_verify_acc_incorrect_end": end.get("self_verify_acc_incorrect"),
            "k": k,
            "maj_at_k": end.get("maj_at_k"),
            "weighted_maj_at_k": end.get("weighted_maj_at_k"),
            "best_of_k": end.get("best_of_k"),
            "auroc_end": end.get("auroc"),
            "auroc_within_end": end.get("auroc_within"),
            "seconds": seconds,
        }

    def export(self, out_dir: pathlib.Path) -> None:
        model = nnx.merge(self.graphdef, self.state.params)
        save_pretrained(model, out_dir)
        if jax.process_index() == 0:
            self.task.tokenizer.save_pretrained(str(out_dir))


def _abstract_train_state(abstract_params, cfg: Config, mesh) -> TrainState:
    tx = make_optimizer(cfg.optim)
    state = TrainState(
        params=abstract_params,
        opt_state=jax.eval_shape(tx.init, abstract_params),
        step=jax.ShapeDtypeStruct((), jnp.int32),
    )
    shard = train_state_sharding(state, mesh)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shard
    )


def _nan_to_none(x: float) -> float | None:
    return None if math.isnan(x) else x


def _mean_or_none(x: np.ndarray) -> float | None:
    return float(np.mean(x)) if x.size else None


def _progress(cfg: Config, start: int):
    if not cfg.train.progress_bar or jax.process_index() != 0:
        return None
    from tqdm import tqdm

    return tqdm(
        total=cfg.train.total_steps,
        initial=start,
        desc="laserjax",
        unit="step",
        dynamic_ncols=True,
        file=sys.stderr,
    )


def format_summary(s: dict[str, Any]) -> str:
    def f(x):
        return "-" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))

    k = s["k"]
    rows = [
        ("", "start", "end"),
        ("held-out accuracy", f(s["accuracy_start"]), f(s["accuracy_end"])),
        ("self-verification F1", f(s["self_verify_f1_start"]), f(s["self_verify_f1_end"])),
        (f"maj@{k}", "", f(s["maj_at_k"])),
        (f"self-reward weighted maj@{k}", "", f(s["weighted_maj_at_k"])),
        (f"best-of-{k} by r_s", "", f(s["best_of_k"])),
        ("AUROC of r_s (all samples)", "", f(s["auroc_end"])),
        ("AUROC of r_s (within problems)", "", f(s["auroc_within_end"])),
    ]
    w = max(len(r[0]) for r in rows)
    lines = [
        f"laserjax {s['algorithm']}: {s['steps']} steps, seed {s['seed']}, "
        f"c_ref {f(s['c_ref'])}, {s['seconds']:.0f} s"
    ]
    lines += [f"  {a:<{w}}  {b:>8}  {c:>8}" for a, b, c in rows]
    return "\n".join(lines)
