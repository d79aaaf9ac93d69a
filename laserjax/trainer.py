"""The LaSeR trainer loop (LASER_SPEC section 4); `laserjax.commands.train` runs it.

One job, the loop (`Trainer`) and its helpers. Set-up is `laserjax.task`, logs and
console output `laserjax.run_log`, checkpoints `laserjax.checkpoint`, the step
`laserjax.train_step`.

One step: a batch of prompts from the data iterator -> the sampler (K samples each, with the
rollout-time self-reward from its extra decode step) -> the verifier -> the jitted train step
(advantages, integration after the warm-ups, PPO + self-reward MSE from one forward) -> metrics,
checkpoints, periodic held-out evaluation.

The run directory (`output_dir`: a local path, or a `gs://bucket/...` URL that every host reaches;
process 0 writes its files, every process its checkpoint shards) holds `config.yaml`,
`metrics.jsonl` (one line per step), `eval.jsonl` (one line per evaluation), `checkpoints/`,
`summary.json` and the final policy in Hugging Face format under `hf/`. A run restarted with the
same `output_dir` resumes from its latest checkpoint and reproduces the uninterrupted run's
metrics. Whether to resume, from which step, c_ref and everything `run_info.json` holds are read
by process 0 and broadcast, so all hosts resume the same step or all start fresh, whatever their
local disks hold; rewards are graded in shares and gathered, so every host trains on the rewards
that are logged.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from laserjax import eval_metrics, multihost, paths, run_identity, sharding
from laserjax.checkpoint import Checkpointer
from laserjax.config import Config, ConfigError
from laserjax.continuous import ContinuousSampler
from laserjax.data import make_train_loader, read_jsonl
from laserjax.evaluate import (
    EvalResult,
    Scoring,
    average_over_benchmarks,
    decode_responses,
    evaluate_prompts,
)
from laserjax.model.hf_params import (
    save_pretrained,
    write_export_info,
)
from laserjax.run_log import (
    MetricsLog,
    Progress,
    format_summary,
    held_out_row,
    step_metrics_row,
    summary_metrics,
)
from laserjax.sampler import RolloutBatch, Sampler
from laserjax.task import build_task
from laserjax.train_step import (
    StepSettings,
    TrainBatch,
    TrainState,
    check_batch,
    init_train_state,
    make_optimizer,
    make_train_step,
    reference_params,
    train_state_sharding,
)


class TrainingDiverged(RuntimeError):
    """A non-finite loss, gradient or parameter: the run stops, earlier checkpoints intact."""


def zc_emitted_fraction(
    response_tokens: np.ndarray, response_mask: np.ndarray, zc_id: int
) -> float:
    """Share of responses that sampled z_c. The score assumes z_c is never emitted (LASER_SPEC
    section 1); a value that climbs means the self-verification loss has raised log p(z_c)
    enough to leak into responses (c_ref too close to 0 for beta_v, e.g. on a tiny vocabulary)."""
    hit = (np.asarray(response_tokens) == zc_id) & np.asarray(response_mask, bool)
    return float(hit.any(axis=-1).mean())


def train_batch(
    rollout: RolloutBatch, rewards: np.ndarray, ref_logprobs: np.ndarray | None = None
) -> TrainBatch:
    """The train step's batch from the sampler's output (one prompt row per prompt) and the
    verifier's rewards: the trainer joins the two, so the train step need not know the sampler.

    The step's `StepSettings.temperature` must equal `rollout.logprob_temperature`.
    """

    def repeat(x: np.ndarray) -> jax.Array:
        return jnp.asarray(np.repeat(x, rollout.k, axis=0))

    return TrainBatch(
        prompt_tokens=repeat(rollout.prompt_tokens),
        prompt_mask=repeat(rollout.prompt_mask),
        response_tokens=jnp.asarray(rollout.response_tokens),
        response_mask=jnp.asarray(rollout.response_mask),
        old_logprobs=jnp.asarray(rollout.logprobs, jnp.float32),
        finished=jnp.asarray(rollout.finished),
        rewards=jnp.asarray(rewards, jnp.float32),
        rollout_logp_zc=jnp.asarray(rollout.logp_zc, jnp.float32),
        ref_logprobs=None if ref_logprobs is None else jnp.asarray(ref_logprobs, jnp.float32),
    )


def _finite(x: Any) -> bool:
    return bool(np.all(np.isfinite(np.asarray(x))))


@jax.jit
def _params_finite(params: nnx.State) -> jax.Array:
    leaves = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(params)
        if jnp.issubdtype(x.dtype, jnp.floating)
    ]
    return jnp.all(jnp.stack(leaves))


# ---------------------------------------------------------------------------------------------
# The loop.


class Trainer:
    def __init__(
        self, cfg: Config, allow_change: tuple[str, ...] = (), started: float | None = None
    ) -> None:
        """`started`: when the command started (time.time()); summary.json's and the printed
        `seconds` count from it, so they are the whole wall time (warm start included). Default:
        now."""
        self.started = time.time() if started is None else started
        self.cfg = cfg
        try:
            self.out = paths.run_path(cfg.output_dir, field="config field `output_dir`")
        except paths.PathError as e:
            raise ConfigError(str(e)) from None
        if jax.process_count() > 1 and not paths.is_remote(self.out):
            print(
                f"note: output_dir {str(self.out)!r} is a local path on {jax.process_count()} "
                "processes; it must be one directory all hosts share (e.g. an NFS mount), "
                "otherwise use output_dir=gs://BUCKET/run",
                file=sys.stderr,
            )
        # Before anything is built or written: a run directory holds one run (run_identity).
        # Process 0 reads the stored config and every process gets its verdict (a refusal too).
        self.identity = run_identity.Identity(
            **multihost.on_primary(
                lambda: dataclasses.asdict(run_identity.check(self.out, cfg, allow_change)),
                error=ConfigError,
            )
        )
        self.mesh = sharding.make_mesh(cfg.mesh)
        cfg.validate_against_mesh(dict(self.mesh.shape), jax.process_count())  # before any compile
        self.ckpt = Checkpointer(self.out / "checkpoints", keep=cfg.train.keep_checkpoints)
        # Decided once, by process 0, for every process: hosts that listed the directory
        # themselves could disagree, and one resuming while another starts fresh deadlocks.
        self.resume_step: int | None = multihost.on_primary(self.ckpt.latest_step)
        resuming = self.resume_step is not None
        if resuming and self.resume_step > cfg.train.total_steps:
            raise ConfigError(
                f"config field `train.total_steps`: {cfg.train.total_steps} is below the step "
                f"of the latest checkpoint in {self.out / 'checkpoints'} ({self.resume_step}); "
                "a run cannot be shortened below what it has trained: use a new output_dir"
            )
        model, self.task, self.setup_info = build_task(cfg, self.mesh, resuming)
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
            self.graphdef, self.state = init_train_state(
                model,
                cfg.optim,
                self.mesh,
                ref_dtype=cfg.policy_loss.ref_param_dtype,
                with_reference=cfg.policy_loss.kl_coef > 0,
            )
        self.sampler: Sampler | None = None  # built once the parameters are concrete
        self.continuous: ContinuousSampler | None = None
        self.c_ref: float | None = None if cfg.laser.c_ref == "auto" else float(cfg.laser.c_ref)
        self.step_fn = None

    # -- pieces -----------------------------------------------------------------------------

    def _make_samplers(self) -> tuple[Sampler, ContinuousSampler | None]:
        """The rollout sampler, and the continuous batcher over it when `rollout.slots` > 0."""
        cfg, t = self.cfg, self.task
        sampler = Sampler(
            (self.graphdef, self.state.params),
            eos_ids=t.eos_ids,
            pad_id=t.pad_id,
            self_reward_token_id=cfg.tokens.self_reward_token_id,
            max_new_tokens=cfg.rollout.max_new_tokens,
            max_prompt_len=cfg.rollout.max_prompt_len,
            prompt_buckets=cfg.rollout.prompt_buckets,
            mesh=self.mesh,
            gather_weights=cfg.rollout.gather_weights,
        )
        slots = cfg.rollout.slots
        return sampler, (ContinuousSampler(sampler, slots) if slots else None)

    def _scoring(self) -> Scoring:
        return Scoring(beta_v=self.cfg.laser.beta_v, c_ref=self.c_ref)

    def _rollout(self, prompts: list[list[int]], answers: list[str], seed: int):
        """(rollout, rewards, the share of the rollout's row-steps that did a row's work: fed
        a live row a token or its z_c read)."""
        r = self.cfg.rollout
        kw = dict(k=r.samples_per_prompt, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k)
        if self.continuous is None:
            rollout = self.sampler.sample(prompts, seed=seed, **kw)
            busy = (rollout.lengths - 1 + rollout.finished).sum()
            share = float(busy / max(len(rollout.lengths) * rollout.decode_steps, 1))
        else:
            rollout, stats = self.continuous.sample(prompts, seed=seed, **kw)
            share = stats.utilisation
        texts = decode_responses(self.task.tokenizer, rollout)
        refs = [answers[i // r.samples_per_prompt] for i in range(len(texts))]
        return rollout, self._grade(texts, refs), share

    def _grade(self, responses: list[str], answers: list[str]) -> np.ndarray:
        """Rewards (LASER_SPEC section 4: verifier reward r_v) that every process agrees on:
        each process grades its share and the shares are gathered."""
        return multihost.grade_in_shares(self.task.reward_fn, responses, answers)

    def _build_step(self) -> None:
        cfg = self.cfg
        laser_cfg = dataclasses.replace(cfg.laser, c_ref=self.c_ref)
        settings = StepSettings(
            group_size=cfg.rollout.samples_per_prompt,
            self_reward_token_id=cfg.tokens.self_reward_token_id,
            temperature=cfg.rollout.temperature or 1.0,
            micro_batch_size=cfg.train.micro_batch_size,
            old_logprob_source=cfg.train.old_logprob_source,
            mini_batch_size=cfg.train.ppo_mini_batch_size,
            epochs=cfg.train.ppo_epochs,
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
                reward_fn=self._grade,
                extract_fn=self.task.extract_fn,
                scoring=self._scoring(),
                temperature=cfg.rollout.temperature,
                top_p=cfg.rollout.top_p,
                top_k=cfg.rollout.top_k,
                seed=10_000_019 * (cfg.train.seed + 1) + step,
                ks=eval_metrics.default_ks(cfg.train.eval_samples),  # maj@k at 1, 2, 4 .. n
            )
            results[name] = res
            rows |= {f"{name}/{k}": v for k, v in res.summary.items()}
        avg = average_over_benchmarks({n: r.summary for n, r in results.items()})
        rows |= held_out_row(avg, cfg.train.eval_samples)
        return {"step": step, **rows}

    def _measure_c_ref(self, prompts: list[list[int]], answers: list[str]) -> float:
        """c_ref = mean log pi_ref(z_c | x, y, eos) of the starting policy (spec section 1)."""
        rollout, _, _ = self._rollout(prompts, answers, seed=-1 % 2**31)
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
        primary = jax.process_index() == 0
        if primary:
            self.out.mkdir(parents=True, exist_ok=True)
            if self.resume_step is None:
                self.identity.write(self.out, cfg, None)
        start = 0
        run_info_path = self.out / "run_info.json"
        summary_path = self.out / "summary.json"
        # Finished already (process 0's reading, for every process): report it, rewrite
        # nothing (a rerun is not a new result).
        summary = multihost.on_primary(
            lambda: (
                json.loads(summary_path.read_text())
                if self.resume_step == cfg.train.total_steps and summary_path.is_file()
                else None
            ),
            error=ConfigError,
        )
        if summary is not None:
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
            # The newest intact checkpoint: a damaged one is reported and set aside, never
            # deleted; one of another model stops here, before anything is recorded.
            start, self.state, meta = self.ckpt.restore_latest(
                self.state, log=print if primary else (lambda _: None)
            )
            # Process 0's reading of the small state, so no host resumes on a value of its own.
            meta = multihost.broadcast_json(meta)
            start = meta["step"]
            if primary:
                self.identity.write(self.out, cfg, start)
            self.loader.set_state(meta["data"])
            self.c_ref = meta["c_ref"]
            self.sampler, self.continuous = self._make_samplers()
            run_info = multihost.on_primary(
                lambda: self._read_run_info(run_info_path, start), error=ConfigError
            )
            print(f"resumed from checkpoint step {start} in {self.out / 'checkpoints'}")
            if primary:
                run_identity.record(self.out, "resume", from_step=start)
        else:
            self.sampler, self.continuous = self._make_samplers()
            if self.c_ref is None:
                probe = [t.train_prompts[i] for i in range(min(len(t.train_prompts), 64))]
                answers = [t.train_problems[i].answer for i in range(len(probe))]
                self.c_ref = self._measure_c_ref(probe, answers)
            run_info = {
                "c_ref": self.c_ref,
                **self.setup_info,
                "eval_start": self.evaluate(0) if t.eval_sets else {},
            }
            # Every process trains with process 0's c_ref and logs its evaluation.
            run_info = multihost.broadcast_json(run_info)
            self.c_ref = run_info["c_ref"]
            if primary:
                run_identity.set_aside(run_info_path, "restart")
                run_info_path.write_text(json.dumps(run_info, indent=2))
        # A fresh run sets aside every line an earlier, never-checkpointed run left behind.
        log = MetricsLog(self.out, cfg, start if self.resume_step is not None else -1)
        if self.resume_step is None and run_info["eval_start"]:
            log.write(run_info["eval_start"], kind="eval")
        self._build_step()
        progress = Progress(cfg, start) if primary else None
        last_eval = run_info.get("eval_start", {})
        try:
            for step in range(start + 1, cfg.train.total_steps + 1):
                tic = time.time()
                idx = self._global_batch_indices()
                prompts = [t.train_prompts[i] for i in idx]
                answers = [t.train_problems[i].answer for i in idx]
                rollout, rewards, busy_share = self._rollout(
                    prompts, answers, seed=(cfg.train.seed * 1_000_003 + step) % 2**31
                )
                batch = train_batch(rollout, rewards)
                check_batch(batch, cfg.rollout.samples_per_prompt)
                # The sampler's weight copy is not needed while the step runs (the plan's
                # train peak does not hold it); the new policy's copy is made after.
                self.sampler.params = None
                self.state, metrics = self.step_fn(self.state, batch)
                metrics = jax.device_get(metrics)
                row = self._step_row(step, rollout, rewards, metrics, time.time() - tic)
                row["rollout_busy_share"] = busy_share
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
                    progress.update(step, row)
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
        if cfg.train.export_hf:
            self.export(self.out / "hf")
        # The whole wall time: from the command's start, warm start and export included.
        summary = self._summary(
            run_info.get("eval_start", {}), last_eval, time.time() - self.started
        )
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
        self.ckpt.close()
        return summary

    def _read_run_info(self, path: epath.Path, step: int) -> dict[str, Any]:
        """run_info.json (on process 0); when it is missing or unreadable, rebuilt from what the
        run kept (the checkpoint's c_ref, the step-0 line of eval.jsonl) and written back, with
        one line."""
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as e:
            why = "missing" if isinstance(e, FileNotFoundError) else f"unreadable ({e})"
        eval_start: dict[str, Any] = {}
        eval_path = self.out / "eval.jsonl"
        if eval_path.is_file():
            rows = [r for _, r in read_jsonl(eval_path) if isinstance(r, dict)]
            eval_start = next((r for r in rows if r.get("step") == 0), {})
        run_info = {"c_ref": self.c_ref, **self.setup_info, "eval_start": eval_start}
        print(
            f"{path.name} is {why}: rebuilt from checkpoint step {step} (c_ref) and "
            f"eval.jsonl ({'the' if eval_start else 'no'} start evaluation)"
        )
        run_identity.set_aside(path, "rebuild")
        path.write_text(json.dumps(run_info, indent=2))
        return run_info

    def _step_row(
        self,
        step: int,
        rollout: RolloutBatch,
        rewards: np.ndarray,
        metrics: dict[str, Any],
        seconds: float,
    ) -> dict[str, Any]:
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
            # log pi(z_c) itself (spec claim 4: correct drift to c_ref + 1/beta_v, incorrect stay).
            "logp_zc_correct_mean": _mean_or_none(
                rollout.logp_zc[(rewards == 1) & rollout.finished]
            ),
            "logp_zc_incorrect_mean": _mean_or_none(
                rollout.logp_zc[(rewards == 0) & rollout.finished]
            ),
            "response_len_mean": float(rollout.lengths.mean()),
            "truncated_frac": float(rollout.truncated.mean()),
            "zc_emitted_frac": zc_emitted_fraction(
                rollout.response_tokens, rollout.response_mask, self.cfg.tokens.self_reward_token_id
            ),
        }
        row |= step_metrics_row(metrics)
        row.setdefault("mse_loss", 0.0)
        row["step_seconds"] = seconds
        return row

    def _summary(self, start: dict, end: dict, seconds: float) -> dict[str, Any]:
        return {
            "algorithm": self.cfg.laser.algorithm,
            "steps": self.cfg.train.total_steps,
            "seed": self.cfg.train.seed,
            "c_ref": self.c_ref,
            "k": self.cfg.train.eval_samples,
            **summary_metrics(start, end),
            "data_rows_skipped": self.setup_info.get("data_rows_skipped", {}),
            "seconds": seconds,
        }

    def export(self, out_dir: epath.Path) -> None:
        """The policy in Hugging Face format, its tokenizer, and `laserjax.json`: z_c, c_ref and
        the rest `generate`, `eval` and `calibrate` take as their defaults for this model. The
        toy task's held-out problems go beside it (`toy_arithmetic.jsonl`), for `eval`."""
        cfg = self.cfg
        toy = cfg.model.toy is not None
        info = {
            "self_reward_token_id": cfg.tokens.self_reward_token_id,
            "c_ref": self.c_ref,
            "beta_v": cfg.laser.beta_v,
            "eos_ids": list(self.task.eos_ids),
            "pad_id": self.task.pad_id,
            "template": "raw" if toy else cfg.data.template,
            "reward": cfg.data.reward,
            "max_new_tokens": cfg.rollout.max_new_tokens,
            "dtype": cfg.model.param_dtype,
            "algorithm": cfg.laser.algorithm,
            "step": cfg.train.total_steps,
        }
        export_hf(self.graphdef, self.state.params, self.task.tokenizer, out_dir, info)
        if toy and jax.process_index() == 0:
            problems, _ = self.task.eval_sets["toy_arithmetic"]
            (self.out / "toy_arithmetic.jsonl").write_text(
                "".join(json.dumps(dataclasses.asdict(p)) + "\n" for p in problems)
            )


def export_hf(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    tokenizer: Any,
    out_dir: str | os.PathLike,
    info: dict[str, Any] | None = None,
) -> None:
    """The policy in Hugging Face format under `out_dir` (a local path or a URL), with `info` as
    its `laserjax.json`. Call it on every process: each gathers the parameters and process 0
    writes, to a local staging directory first when `out_dir` is a URL (safetensors and
    tokenizers write local files only)."""
    model = nnx.merge(graphdef, params)
    primary = jax.process_index() == 0
    with paths.local_staging(paths.run_path(out_dir, field="export dir"), upload=primary) as local:
        save_pretrained(model, local)
        if primary:
            tokenizer.save_pretrained(local)
            if info is not None:
                write_export_info(local, info)


def _abstract_train_state(abstract_params: nnx.State, cfg: Config, mesh: Mesh) -> TrainState:
    """The shapes, dtypes and shardings a checkpoint restores into. The KL reference is part of
    the checkpoint (not re-derived from model.path or the toy's warm start, which need not give
    the same weights again), so a resumed run keeps the reference it started with."""
    tx = make_optimizer(cfg.optim)
    state = TrainState(
        params=abstract_params,
        opt_state=jax.eval_shape(tx.init, abstract_params),
        step=jax.ShapeDtypeStruct((), jnp.int32),
        ref_params=reference_params(abstract_params, cfg.policy_loss.ref_param_dtype)
        if cfg.policy_loss.kl_coef > 0
        else None,
    )
    shard = train_state_sharding(state, mesh)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shard
    )


def _nan_to_none(x: float) -> float | None:
    return None if math.isnan(x) else x


def _mean_or_none(x: np.ndarray) -> float | None:
    return float(np.mean(x)) if x.size else None


def process_start_time() -> float:
    """When this process started (time.time() scale; Linux /proc, to the second), else now."""
    try:
        fields = pathlib.Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # starttime: clock ticks after boot
        with open("/proc/stat") as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()
