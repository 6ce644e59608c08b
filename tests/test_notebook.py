"""notebooks/analysis.ipynb runs top to bottom (nbclient) against a small run made here.

The kernel is this interpreter (a kernelspec written into a temporary JUPYTER_PATH), so the
test works in a fresh CI venv whether or not a `python3` kernel was ever registered."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests._peers import require
from tests._runs import make_run

nbformat = require("nbformat")
nbclient = require("nbclient")
require("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "analysis.ipynb"
KERNEL = "opticam-test-kernel"


@pytest.fixture
def kernel(tmp_path, monkeypatch):
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "opticam test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    return KERNEL


def test_analysis_notebook_runs(tmp_path, monkeypatch, kernel):
    spec = make_run(tmp_path / "out", "nb", datasets={"imagenet-val": 8, "toy": 4}, models=("resnet50",),
                    methods=("fakecam", "gradcam", "opticam"), steps=4, iterations=6)
    monkeypatch.setenv("OPTICAM_RUN", str(spec.output))   # an output root: the notebook opens its latest run
    monkeypatch.setenv("OPTICAM_BOOTSTRAP", "10")
    monkeypatch.setenv("OPTICAM_SHOW", "3")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells)
    client = nbclient.NotebookClient(nb, kernel_name=kernel, timeout=240, resources={"metadata": {"path": str(tmp_path)}})
    client.execute()

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "\n".join(o.get("text", "") if o.get("output_type") == "stream" else
                     "\n".join(str(v) for v in o.get("data", {}).values()) for o in outputs)
    assert "run nb at" in text and "36 rows, 2 failed" in text  # (8 + 4) images × 3 methods
    assert "Figure 2" in text and "paper" in text              # the reproduced table, beside the paper's values
    assert "tench" in text                                     # the per-class slice
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # disagreement grids (one per dataset × model) and the distributions
