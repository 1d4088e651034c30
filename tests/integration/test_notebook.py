"""experiments/explore.ipynb runs top to bottom on the embedded model and shows what it says."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[2] / "experiments" / "explore.ipynb"


def outputs_text(notebook) -> str:
    texts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            texts.append(output.get("text", ""))
            texts.append(str(output.get("data", {}).get("text/plain", "")))
    return "\n".join(texts)


@pytest.mark.golden  # "18 of 18 trials passed", retrieval heads in layer 2
def test_explore_notebook_executes(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    ).execute()
    text = outputs_text(notebook)
    assert "18 of 18 trials passed" in text
    assert "retrieval heads: ['2." in text
    kinds = {
        key for cell in notebook.cells for o in cell.get("outputs", []) for key in o.get("data", {})
    }
    assert "application/vnd.plotly.v1+json" in kinds or "text/html" in kinds
    top = float(text.split("top-6 masked: ")[1].split("%")[0])
    random = float(text.split("6 random masked: ")[1].split("%")[0])
    assert top < random, text
    share = float(text.split("of the cache")[0].rsplit("with ", 1)[1].strip().rstrip("%"))
    assert "KV share" in text and share < 30, text
