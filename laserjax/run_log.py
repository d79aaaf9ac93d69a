"""The run's logs: metrics.jsonl and eval.jsonl (one line per step / evaluation, flushed per
line), plus TensorBoard or W&B when asked for and installed, and the one vocabulary of metric
names from the train step and the held-out evaluation to those files and summary.json; and what
a run prints on the console (`Progress` while it trains, `format_summary` at the end)."""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from typing import Any, TextIO

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


# ---------------------------------------------------------------------------------------------
# The console: progress while training, the summary table at the end.


class Progress:
    """`train.progress_bar`: a tqdm bar when `terminal` (default: stderr is a terminal);
    elsewhere (a pipe, a log file, a notebook) one plain line every `train.log_every` steps on
    `out` (default stdout), never carriage-return updates."""

    def __init__(
        self, cfg: Config, start: int, terminal: bool | None = None, out: TextIO | None = None
    ) -> None:
        self.total, self.every, self.start = cfg.train.total_steps, cfg.train.log_every, start
        self.on = cfg.train.progress_bar
        self.out = sys.stdout if out is None else out
        self.t0 = time.time()
        self.bar = None
        if terminal is None:
            terminal = sys.stderr.isatty()
        if self.on and terminal:
            from tqdm import tqdm

            self.bar = tqdm(
                total=self.total,
                initial=start,
                desc="laserjax",
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
            )

    def update(self, step: int, row: dict[str, Any]) -> None:
        if not self.on:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(
                reward=f"{row['reward_mean']:.3f}", f1=f"{row['self_verify_f1']:.3f}"
            )
        elif self.every and (step % self.every == 0 or step == self.total):
            per_step = (time.time() - self.t0) / max(step - self.start, 1)
            print(
                f"step {step}/{self.total}: reward {row['reward_mean']:.3f}, self-verification "
                f"F1 {row['self_verify_f1']:.3f}, {per_step:.2f} s/step",
                file=self.out,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def format_summary(s: dict[str, Any]) -> str:
    """The end-of-run table of a training run's summary.json: start and end, side by side."""

    def f(x: Any) -> str:
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
