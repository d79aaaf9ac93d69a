"""What a new user sees (issue 13): progress output that suits where it goes, the eval table in
one unit. The export's defaults (z_c, c_ref) are tested on the exported demo run in
test_trainer.py, the wall time on the run of test_run_identity.py.
"""

from __future__ import annotations

import io
import pathlib

from laserjax.config_load import load_config
from laserjax.evaluate import format_table
from laserjax.run_log import Progress

DEMO = pathlib.Path(__file__).resolve().parents[1] / "configs" / "demo_cpu.yaml"
ROW = {"reward_mean": 0.5, "self_verify_f1": 0.25}


def test_progress_off_a_terminal_is_a_line_every_n_steps():
    cfg = load_config(DEMO, ["train.total_steps=5", "train.log_every=2"])
    out = io.StringIO()
    p = Progress(cfg, start=0, terminal=False, out=out)
    assert p.bar is None  # no tqdm: its carriage-return updates would flood a log or notebook
    for step in range(1, 6):
        p.update(step, ROW)
    p.close()
    lines = out.getvalue().splitlines()
    assert [ln.split(":")[0] for ln in lines] == ["step 2/5", "step 4/5", "step 5/5"]
    assert "reward 0.500, self-verification F1 0.250" in lines[0] and "\r" not in out.getvalue()


def test_progress_on_a_terminal_is_a_bar_and_can_be_switched_off():
    cfg = load_config(DEMO, ["train.total_steps=5"])
    p = Progress(cfg, start=0, terminal=True, out=io.StringIO())
    assert p.bar is not None
    p.close()
    off = load_config(DEMO, ["train.progress_bar=false"])
    out = io.StringIO()
    q = Progress(off, start=0, terminal=False, out=out)
    for step in range(1, 30):
        q.update(step, ROW)
    assert q.bar is None and out.getvalue() == ""


def test_the_eval_table_uses_one_unit():
    bench = {
        "problems": 2,
        "n": 2,
        "accuracy": 0.266,
        "pass@2": 0.5,
        "maj@2": 0.5,
        "weighted_maj@2": 0.5,
        "best_of_2": 0.5,
        "sv_f1": 0.4,
        "auroc": 0.75,
        "ece": 0.629,
        "response_len_mean": 12.0,
        "truncated_frac": 0.0,
    }
    table = format_table({"b": bench}, bench)
    rows = {ln.rsplit(None, 1)[0].strip(): ln.rsplit(None, 1)[1] for ln in table.splitlines()[2:]}
    assert rows["avg@n accuracy"] == "0.266" and rows["ECE of r_s"] == "0.629"
    assert "26.6" not in table
