"""`python -m laserjax <command>`: one subcommand per job.

Each command lives in its own module under `laserjax/commands/`, which exposes
`add_arguments(parser)` and `run(args)`; modules are imported only when their command runs so
`--help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "train": (
        "laserjax.commands.train",
        "train a policy with LaSeR (or plain GRPO) from a YAML config",
    ),
    "eval": ("laserjax.commands.eval", "sample, grade and score benchmarks with the self-reward"),
    "grade": ("laserjax.commands.grade", "grade a jsonl of responses against reference answers"),
    "calibrate": (
        "laserjax.commands.calibrate",
        "measure c_ref = mean log pi_ref(z_c | x, y, eos)",
    ),
    "plan": ("laserjax.commands.plan", "print bytes per device for a config and mesh"),
    "generate": ("laserjax.commands.generate", "generate from a model (smoke test of the sampler)"),
    "adaptive": (
        "laserjax.commands.adaptive",
        "compare stopping rules for test-time voting on sample pools (offline and online)",
    ),
    "fetch-model": (
        "laserjax.commands.fetch_model",
        "download a known GGUF model into the cache and print its path",
    ),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m laserjax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="command")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.print_help()
        if argv and argv[0] not in ("-h", "--help"):
            parser.exit(2, f"\nunknown command {argv[0]!r}: choose one of {', '.join(COMMANDS)}\n")
        return
    module = importlib.import_module(COMMANDS[argv[0]][0])
    cmd_parser = argparse.ArgumentParser(
        prog=f"python -m laserjax {argv[0]}", description=COMMANDS[argv[0]][1]
    )
    module.add_arguments(cmd_parser)
    # Intermixed: `train --config c a=1 --allow-change k b=2` keeps every key=value.
    module.run(cmd_parser.parse_intermixed_args(argv[1:]))
