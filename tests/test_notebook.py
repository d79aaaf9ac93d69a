"""The Colab demo notebook (notebooks/laserjax_demo.ipynb) executes top to bottom.

The run uses the notebook's own SMALL setting (a tiny smoke-test run), injected after its
`parameters` cell the way papermill does, in a fresh kernel on the current interpreter, with every
output under a temporary directory. The checks: no cell errors, the three figures are written and
displayed, both runs leave their logs, and the voting curve the notebook plots is what
`eval_metrics` gives on the held-out samples the notebook saved.
"""

from __future__ import annotations

import json
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

from laserjax import eval_metrics  # noqa: E402
from laserjax.evaluate import result_from_records  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "laserjax_demo.ipynb"
FIGURES = ("curves", "rs_hist", "voting")
KERNEL = "laserjax-test"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CELL_TIMEOUT_S = 600


def _read() -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOK, as_version=4)


def _parameters_index(nb: nbformat.NotebookNode) -> int:
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"expected one cell tagged `parameters`, found {len(tagged)}"
    return tagged[0]


def _install_kernel(prefix: pathlib.Path) -> None:
    """A kernelspec that starts ipykernel on this interpreter (not whatever `python3` resolves
    to), found through JUPYTER_PATH."""
    from ipykernel.kernelspec import install

    install(kernel_name=KERNEL, prefix=str(prefix))


def test_notebook_is_committed_without_outputs():
    nb = _read()
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "the notebook has no code cells"
    for i, cell in enumerate(code):
        assert cell.outputs == [] and cell.execution_count is None, (
            f"code cell {i} holds outputs; clear them before committing"
        )
    params = nb.cells[_parameters_index(nb)].source
    for name in ("SMALL = False", 'REPO = "."', "REPO_URL = "):
        assert name in params, f"the parameters cell lost `{name}`"


def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    kernels = tmp_path / "jupyter"
    _install_kernel(kernels)
    monkeypatch.setenv("JUPYTER_PATH", str(kernels / "share" / "jupyter"))
    # The kernel inherits this environment: one CPU device, as on Colab (conftest's 8 fake
    # devices would not fit the demo's one-device mesh).
    monkeypatch.delenv("XLA_FLAGS", raising=False)

    out = tmp_path / "out"
    nb = _read()
    at = _parameters_index(nb)
    # REPO keeps its default ".", and the kernel runs in notebooks/, as under
    # `jupyter nbconvert --execute notebooks/laserjax_demo.ipynb`: the notebook finds the checkout.
    injected = nbformat.v4.new_code_cell(
        f"SMALL = True\nOUT = {str(out)!r}\n",
        metadata={"tags": ["injected-parameters"]},
    )
    nb.cells.insert(at + 1, injected)
    client = nbclient.NotebookClient(
        nb,
        kernel_name=KERNEL,
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()  # raises CellExecutionError, with the traceback, on the first failing cell

    errors = [
        o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"
    ]
    assert not errors, errors
    # Training output in a notebook: progress lines, not hundreds of carriage-return bar updates.
    streams = "".join(
        o.get("text", "")
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o.output_type == "stream"
    )
    assert "laserjax: " not in streams  # no tqdm bar of the trainer's (its desc is "laserjax")
    assert "IProgress" not in streams
    assert len(streams.splitlines()) < 100, streams[-3000:]
    shown = sum(
        1
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o.output_type == "display_data" and "image/png" in o.get("data", {})
    )
    assert shown == len(FIGURES), f"{shown} figures displayed, expected {len(FIGURES)}"
    for name in FIGURES:
        png = out / "figures" / f"{name}.png"
        assert png.is_file() and png.read_bytes()[:8] == PNG_MAGIC, f"{png} is not a PNG"

    voting = json.loads((out / "voting.json").read_text())
    ks = voting["ks"]
    assert ks == [1, 2, 4, 8, 16]
    for algorithm in ("laser", "grpo"):
        run = out / algorithm
        summary = json.loads((run / "summary.json").read_text())
        assert summary["algorithm"] == algorithm and summary["steps"] == 8
        steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").open()]
        assert steps == list(range(1, 9))
        evals = [json.loads(line)["step"] for line in (run / "eval.jsonl").open()]
        assert evals == [0, 4, 8]
        rows = [json.loads(line) for line in (run / "heldout_n16.jsonl").open()]
        ids = list(dict.fromkeys(r["problem_id"] for r in rows))
        assert len(ids) == 32 and len(rows) == 32 * 16
        res = result_from_records(rows, ids, n=16)
        assert voting[algorithm]["maj"] == [
            eval_metrics.maj_at_k(res.answers_pn, res.correct_pn, k) for k in ks
        ]
        assert voting[algorithm]["weighted"] == [
            eval_metrics.weighted_maj_at_k(res.answers_pn, res.correct_pn, res.scores_pn, k)
            for k in ks
        ]
