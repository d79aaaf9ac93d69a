"""The run's logs: metrics.jsonl and eval.jsonl (one line per step / evaluation, flushed per
line), plus TensorBoard or W&B when asked for and installed, and the one vocabulary of metric
names from the train step and the held-out evaluation to those files and summary.json."""

from __future__ import annotations

import json
import math
import sys
import tempfile
from typing import Any

import jax
from etils import epath

from laserjax import paths
from laserjax.config import Config
from laserjax.config_load import to_dict

# ---------------------------------------------------------------------------------------------
# Metric names. Each logged metric once: its name in metrics.jsonl / eval.jsonl (the key), where
# it comes from, and the summary.json keys it fills ("start" / "end": the first / last held-out
# evaluation). Sampler-side step metrics (reward, self-verification of the rollout, lengths)
# are named where the trainer computes them.

STEP_METRICS: dict[str, str] = {
    # metrics.jsonl name: the train step's metric
    "policy_loss": "actor/pg_loss",
    "mse_loss": "self_reward/mse",
    "grad_norm": "actor/grad_norm",
    "clipfrac": "actor/pg_clipfrac",
    "clipfrac_dual": "actor/pg_clipfrac_lower",
    "ppo_kl": "actor/ppo_kl",
    "kl_loss": "actor/kl_loss",
    "logprob_mismatch_mean": "actor/logprob_mismatch_mean",
    "logprob_mismatch_max": "actor/logprob_mismatch_max",
    "std_filter_fallback_frac": "self_reward/std_filter_fallback_frac",
    "mse_active": "self_reward/mse_active",
    "integration_active": "self_reward/integration_active",
    "train_self_verify_f1": "self_reward/f1",
}

HELD_OUT_METRICS: dict[str, tuple[str, dict[str, str]]] = {
    # eval.jsonl name: (its `eval_metrics.summarize` key, {k} = train.eval_samples,
    #                   {summary.json key: "start" or "end"})
    "accuracy": ("accuracy", {"accuracy_start": "start", "accuracy_end": "end"}),
    "self_verify_f1": (
        "sv_f1",
        {"self_verify_f1_start": "start", "self_verify_f1_end": "end"},
    ),
    "self_verify_acc_correct": ("sv_acc_correct", {"self_verify_acc_correct_end": "end"}),
    "self_verify_acc_incorrect": ("sv_acc_incorrect", {"self_verify_acc_incorrect_end": "end"}),
    "maj_at_k": ("maj@{k}", {"maj_at_k": "end"}),
    "weighted_maj_at_k": ("weighted_maj@{k}", {"weighted_maj_at_k": "end"}),
    "best_of_k": ("best_of_{k}", {"best_of_k": "end"}),
    "auroc": ("auroc", {"auroc_end": "end"}),
    "auroc_within": ("auroc_within", {"auroc_within_end": "end"}),
    "ece": ("ece", {}),
}


def step_metrics_row(metrics: dict[str, Any]) -> dict[str, float]:
    """The train step's metrics under their metrics.jsonl names (those the step computed)."""
    return {name: float(metrics[key]) for name, key in STEP_METRICS.items() if key in metrics}


def held_out_row(average: dict[str, float], k: int) -> dict[str, float | None]:
    """An eval.jsonl row's averages over benchmarks under their eval.jsonl names; undefined
    (NaN or missing) -> None."""
    row: dict[str, float | None] = {}
    for name, (key, _) in HELD_OUT_METRICS.items():
        value = average.get(key.format(k=k), math.nan)
        row[name] = None if math.isnan(value) else float(value)
    return row


def summary_metrics(start: dict[str, Any], end: dict[str, Any]) -> dict[str, Any]:
    """summary.json's metric keys from the first and last eval.jsonl rows."""
    rows = {"start": start, "end": end}
    return {
        out: rows[which].get(name)
        for name, (_, outs) in HELD_OUT_METRICS.items()
        for out, which in outs.items()
    }


class MetricsLog:
    """metrics.jsonl (flushed per line), plus TensorBoard / W&B when asked for and installed."""

    def __init__(self, out: epath.Path, cfg: Config, resume_step: int) -> None:
        self.path = out / "metrics.jsonl"
        self.eval_path = out / "eval.jsonl"
        self.primary = jax.process_index() == 0
        # The lines written so far: a remote object is rewritten whole on each write.
        self.lines: dict[epath.Path, list[str]] = {}
        if self.primary:
            for p in (self.path, self.eval_path):
                self.lines[p] = _keep_lines_up_to(p, resume_step)
        self.tb = self.wandb = None
        # TensorBoard and W&B write local files: under a remote output_dir, TensorBoard's go to
        # a local directory copied to out/tensorboard after each write.
        self.tb_remote: epath.Path | None = None
        self._tb_stage = None
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
                if paths.is_remote(out):
                    self.tb_remote = out / "tensorboard"
                    self._tb_stage = tempfile.TemporaryDirectory(prefix="laserjax-tb-")
                    self.tb = SummaryWriter(self._tb_stage.name)
                else:
                    self.tb = SummaryWriter(str(out / "tensorboard"))
        if self.primary and cfg.train.wandb:
            try:
                import wandb

                self.wandb = wandb.init(
                    project=cfg.train.wandb_project,
                    config=to_dict(cfg),
                    dir=None if paths.is_remote(out) else str(out),
                    resume="allow",
                    id=_run_id(out),
                )
            except ImportError:
                print("train.wandb: wandb is not installed; pip install wandb", file=sys.stderr)

    def write(self, row: dict[str, Any], *, kind: str = "train") -> None:
        if not self.primary:
            return
        path = self.path if kind == "train" else self.eval_path
        paths.append_line(path, json.dumps(row), self.lines[path])
        step = row["step"]
        scalars = {k: v for k, v in row.items() if isinstance(v, int | float) and k != "step"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"{kind}/{k}", v, step)
            self.tb.flush()
            if self.tb_remote is not None:
                paths.upload_tree(self._tb_stage.name, self.tb_remote)
        if self.wandb is not None:
            self.wandb.log({f"{kind}/{k}": v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            if self.tb_remote is not None:
                paths.upload_tree(self._tb_stage.name, self.tb_remote)
                self._tb_stage.cleanup()
        if self.wandb is not None:
            self.wandb.finish()


def _run_id(out: epath.Path) -> str:
    name = str(out) if paths.is_remote(out) else out.resolve().as_posix()
    return "".join(c if c.isalnum() else "-" for c in name)[-64:]


def _keep_lines_up_to(path: epath.Path, step: int) -> list[str]:
    """On resume, set aside (never delete) the lines a killed run wrote after its checkpoint.
    Returns the lines kept."""
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    keep = [ln for ln in lines if ln.strip() and json.loads(ln)["step"] <= step]
    if len(keep) == len(lines):
        return keep
    n = 0
    while (backup := path.with_name(f"{path.name}.before-resume-{n}")).exists():
        n += 1
    # Copy, then overwrite (not rename): object stores have no rename, and a kill in between
    # leaves both files whole.
    backup.write_text("".join(ln + "\n" for ln in lines))
    path.write_text("".join(ln + "\n" for ln in keep))
    return keep
