"""Every figure of issue 14's table, one after another in one run, each with the machine load.

    python bench/figures.py                      # all of them (an hour or more on 2 cores)
    python bench/figures.py --only traffic slots # a subset
    TUNIX_DIR=/tmp/tunix python bench/figures.py --only tunix

Figures and the script that prints each (their last JSON line is echoed here, with `uptime`):

- traffic: decode-step memory traffic over the minimum (XLA cost analysis, compile only, not a
  timing): `bench/decode_cost.py`, Qwen2.5-0.5B shape, float32, batch 64, prompt 256, 512 and
  4096 new tokens.
- slots: share of row-steps doing a row's work, continuous vs static batching, 1024 samples,
  lognormal lengths (median 1000, cap 8192): `bench/slot_utilisation.py` (the sampler itself).
- tunix: laserjax's sampler vs Google Tunix 0.1.7's, same process, interleaved, best of 3
  (`../shared/bench/instruments/sampler_vs_tunix.py`; Tunix installed with
  `pip install --no-deps --target $TUNIX_DIR google-tunix==0.1.7 jaxtyping wadler_lindig
  sentencepiece pillow`, outside the repository).
- tunix_lengths: the same on long-tailed response lengths (lognormal, median 100, cap 800),
  laserjax's continuous batching vs Tunix's static batches, same number of rows in flight:
  `bench/tunix_lengths.py`.
- fsdp: bytes all-reduced per decode step, FSDP and FSDP x tensor on 8 CPU devices, 0.5B shape,
  256 rows (compile only): `bench/fsdp_collectives.py`.
- generate: laserjax's sampler vs transformers `generate`: `bench/sampler_cpu.py`.
- train: the train step (GRPO, LaSeR as the library runs it, LaSeR with the z_c column) vs a
  PyTorch forward + backward + AdamW step, interleaved: `bench/train_step_cpu.py`.

Timing figures (tunix, tunix_lengths, generate, train) mean something only at low load: the CPU
is shared, and PyTorch's threads slow 5-10x under load. Each figure's line carries the load
before and after; quote a ratio only with its load.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
INSTRUMENTS = ROOT.parent / "shared" / "bench" / "instruments"

FIGURES = {
    "traffic": ["bench/decode_cost.py"],
    "slots": ["bench/slot_utilisation.py"],
    "tunix": [str(INSTRUMENTS / "sampler_vs_tunix.py")],
    "tunix_lengths": ["bench/tunix_lengths.py"],
    "fsdp": ["bench/fsdp_collectives.py"],
    "generate": ["bench/sampler_cpu.py"],
    "train": ["bench/train_step_cpu.py"],
}


def load() -> str:
    return " ".join(pathlib.Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=list(FIGURES), default=list(FIGURES))
    args = ap.parse_args()
    env = dict(os.environ)
    paths = [str(ROOT), str(ROOT / "bench"), str(INSTRUMENTS.parent)]
    if env.get("TUNIX_DIR"):
        paths.append(env["TUNIX_DIR"])
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")])
    for name in args.only:
        before, t0 = load(), time.time()
        proc = subprocess.run(
            [sys.executable, *FIGURES[name]], cwd=ROOT, env=env, capture_output=True, text=True
        )
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        last = json.loads(lines[-1]) if lines else {"error": proc.stderr[-2000:]}
        print(
            json.dumps(
                dict(
                    figure=name,
                    load_before=before,
                    load_after=load(),
                    seconds=round(time.time() - t0),
                    result=last,
                )
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
