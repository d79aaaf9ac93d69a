"""`python -m laserjax train`: train a policy with LaSeR (or plain GRPO) from a YAML config.

The loop itself is `laserjax.trainer.Trainer` (LASER_SPEC section 4); this module parses the
flags, loads the config and runs it.
"""

from __future__ import annotations

import argparse
from typing import Any

from laserjax import run_identity
from laserjax.checkpoint import NoIntactCheckpoint
from laserjax.config import ConfigError
from laserjax.config_load import load_config
from laserjax.distributed import maybe_initialize_distributed
from laserjax.trainer import Trainer, TrainingDiverged, process_start_time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="e.g. algorithm=grpo train.total_steps=10 output_dir=runs/x",
    )
    parser.add_argument(
        "--allow-change",
        action="append",
        metavar="KEY[,KEY]",
        help="continue the run in output_dir although these config keys differ from its "
        "config.yaml (e.g. train.total_steps to train longer); the change is recorded in "
        f"{run_identity.HISTORY_FILE}",
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    maybe_initialize_distributed()
    try:
        allow = run_identity.parse_allow_change(getattr(args, "allow_change", None))
        return Trainer(cfg, allow_change=allow, started=process_start_time()).run()
    except (ConfigError, TrainingDiverged, NoIntactCheckpoint) as e:
        raise SystemExit(f"error: {e}") from None
