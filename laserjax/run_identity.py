"""A run directory has one identity: the config that decides its result.

`config.yaml` in the run directory is that record, written when the run starts. A restart with
the same config resumes. A restart whose config differs in a key that changes the result (the
algorithm, the learning rate, the number of steps, the data, the model ...) is refused with one
line that lists the differing keys and the two ways on: a new `output_dir`, or `--allow-change
KEY` for each key, which continues this run under the new values and records the change in
`run_history.jsonl` (and sets the old `config.yaml` aside). Keys that only change how the run is
watched or stored (`NEUTRAL_KEYS`: progress output, logging and checkpoint cadence, export) may
differ freely.

Nothing here deletes or overwrites a record: `set_aside` renames a file to the first free
`<name>.before-<why>-<n>` before a new one takes its place.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from collections.abc import Iterable, Sequence
from typing import Any

import yaml
from etils import epath

from laserjax import paths
from laserjax.config import Config, ConfigError
from laserjax.config_load import load_config, to_dict

CONFIG_FILE = "config.yaml"
HISTORY_FILE = "run_history.jsonl"

NEUTRAL_KEYS = frozenset(
    {
        "output_dir",
        "train.progress_bar",
        "train.log_every",
        "train.tensorboard",
        "train.wandb",
        "train.wandb_project",
        "train.eval_every",
        "train.save_every",
        "train.keep_checkpoints",
        "train.export_hf",
        "data.max_bad_share",
    }
)
"""Config keys that do not change what a run computes (its metrics, evaluations, checkpoints):
how progress is shown, how often it logs, evaluates and saves, what it exports, and the share of
bad data rows it tolerates (the rows it trains on are the same either way). A restart may change
them without `--allow-change`."""


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"train": {"total_steps": 5}}` -> `{"train.total_steps": 5}` (lists stay values)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out |= flatten(value, f"{name}.")
        else:
            out[name] = value
    return out


def resolved(cfg: Config) -> dict[str, Any]:
    """The config as flat `section.key -> value`, with the toy model's defaults filled in (so
    `model.toy.num_layers=4` and the default 4 are the same run)."""
    tree = to_dict(cfg)  # `model.toy` is a typed section: its defaults are filled in already
    tree.pop("algorithm", None)  # a shorthand, already folded into laser.algorithm
    return flatten(tree)


def differences(old: Config, new: Config) -> dict[str, tuple[Any, Any]]:
    """Keys (outside `NEUTRAL_KEYS`) whose values differ: key -> (old, new)."""
    a, b = resolved(old), resolved(new)
    keys = sorted((a.keys() | b.keys()) - NEUTRAL_KEYS)
    return {k: (a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k)}


def set_aside(path: epath.Path, why: str) -> epath.Path | None:
    """Rename `path` (if it exists) to the first free `<name>.before-<why>-<n>`; return it."""
    if not path.exists():
        return None
    n = 0
    while (target := path.with_name(f"{path.name}.before-{why}-{n}")).exists():
        n += 1
    paths.move(path, target)  # a gs:// run directory has no rename
    return target


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def record(out: epath.Path, event: str, **fields: Any) -> None:
    """Append one line to the run's history (`run_history.jsonl`)."""
    paths.append_line(out / HISTORY_FILE, json.dumps({"time": _now(), "event": event, **fields}))


def parse_allow_change(values: Iterable[str] | None) -> tuple[str, ...]:
    """`--allow-change a,b --allow-change c` -> ("a", "b", "c")."""
    out: list[str] = []
    for v in values or ():
        out += [k.strip() for k in v.split(",") if k.strip()]
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Identity:
    """What `check` found in the run directory."""

    stored: bool
    """The directory already holds a config.yaml (a run was started there)."""
    changes: dict[str, tuple[Any, Any]]
    """Result-changing keys that differ and were allowed (`--allow-change`): key -> (old, new)."""

    def write(self, out: epath.Path, cfg: Config, step: int | None) -> None:
        """Record the identity: config.yaml for a new run; for an allowed change, the old
        config.yaml set aside, the new one written and the change appended to the history.
        Call on the primary process only."""
        text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
        if not self.stored:
            (out / CONFIG_FILE).write_text(text)
            record(out, "start", config=CONFIG_FILE)
        elif self.changes:
            kept = set_aside(out / CONFIG_FILE, "change")
            (out / CONFIG_FILE).write_text(text)
            record(
                out,
                "change",
                at_step=step,
                changes={k: {"old": a, "new": b} for k, (a, b) in self.changes.items()},
                previous_config=kept.name if kept else None,
            )


def check(out: epath.Path, cfg: Config, allow_change: Sequence[str] = ()) -> Identity:
    """Compare `cfg` with the run recorded in `out`; raise ConfigError (one line) if they differ
    in a key that changes the result and is not in `allow_change`.

    Reads only; `Identity.write` records. A directory without config.yaml is a new run.
    """
    known = set(resolved(cfg))
    unknown = [k for k in allow_change if k not in known]
    if unknown:
        raise ConfigError(
            f"--allow-change {','.join(unknown)}: no such config field (e.g. train.total_steps)"
        )
    path = out / CONFIG_FILE
    if not path.is_file():
        return Identity(stored=False, changes={})
    try:
        old = load_config(path)
    except ConfigError as e:
        raise ConfigError(
            f"output_dir {str(out)!r}: its {CONFIG_FILE} is not a config this version reads "
            f"({e}); use a new output_dir"
        ) from None
    diff = differences(old, cfg)
    refused = [k for k in diff if k not in allow_change]
    if refused:
        shown = ", ".join(f"{k} ({diff[k][0]!r} -> {diff[k][1]!r})" for k in refused)
        raise ConfigError(
            f"output_dir {str(out)!r} holds a run with a different config: {shown}; use a new "
            f"output_dir, or pass --allow-change {','.join(refused)} to continue this run with "
            f"the new values (recorded in {HISTORY_FILE})"
        )
    return Identity(stored=True, changes=diff)
