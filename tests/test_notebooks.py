"""The example notebooks (examples/*.ipynb): stored without outputs, and run headless from top to bottom.

Each notebook is executed in a fresh kernel of this interpreter (nbclient, the ``notebooks`` extra); a
cell that raises (the notebooks assert on what they compute) fails the test, and a few of the outputs
a reader should see are checked here: the inline report, the views, the tables. Nothing is fetched:
the model is the bundled all-MiniLM-L6-v2 and the hub is switched off (tests/conftest.py).
"""

from __future__ import annotations

import html
import json
import re
import sys
from pathlib import Path

import pytest

MISSING = "the notebooks extra is not installed: pip install 'attnkit[notebooks]'"
nbformat = pytest.importorskip("nbformat", reason=MISSING)
nbclient = pytest.importorskip("nbclient", reason=MISSING)
pytest.importorskip("ipykernel", reason=MISSING)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))
# Per cell, generous for a shared two-core machine (each notebook takes well under a minute on a quiet one).
CELL_TIMEOUT = 300
# What each notebook must show, by output type: HTML fragments (the inline views) and printed text.
EXPECTED = {
    "01_queries_keys_values.ipynb": {
        "html": ['class="attnkit-view attnkit-head"', "Strongest weights (query → key)"],
        "text": ["largest difference from attnkit.attention_weights", "tiled: max |attnkit.attention - weights @ v|"],
    },
    "02_what_the_model_attends_to.ipynb": {
        "html": [
            'class="attnkit-view attnkit-report"',
            'sandbox="allow-scripts"',
            'id="attnkit-data"',  # the report's embedded data, inside the srcdoc
            'class="attnkit-view attnkit-roles"',
            'class="attnkit-view attnkit-head"',
            'class="attnkit-view attnkit-flow"',
        ],
        "text": ["layers x 12 heads", "x random (cosine change of the output)", "maps: (6, 1, 12,"],
    },
    "03_speed_and_memory.ipynb": {
        "html": [],
        "text": ["backend: tiled (requested 'auto')", "sdpa: max error", "tiled fwd+bwd", "pooled map (1, 4, 16, 16)"],
    },
}


def test_the_three_notebooks_are_there():
    assert [path.name for path in NOTEBOOKS] == sorted(EXPECTED)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_without_outputs(path: Path):
    """Outputs would go stale as the library changes; the test below regenerates them on every run."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: cell {i} has outputs"
        assert not set(cell.metadata) - {"tags"}, f"{path.name}: cell {i} has metadata {sorted(cell.metadata)}"
    assert set(nb.metadata) <= {"kernelspec", "language_info"}, sorted(nb.metadata)
    assert nb.metadata["kernelspec"]["name"] == "python3"


@pytest.fixture(scope="module")
def kernel_manager_factory(tmp_path_factory):
    """Kernels of this very interpreter (whatever kernels the machine has installed), talking over local sockets."""
    from jupyter_client import KernelManager
    from jupyter_client.kernelspec import KernelSpecManager

    specs = tmp_path_factory.mktemp("kernels")
    (specs / "attnkit-test").mkdir()
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "attnkit tests",
        "language": "python",
    }
    (specs / "attnkit-test" / "kernel.json").write_text(json.dumps(spec))
    sockets = tmp_path_factory.mktemp("ipc")

    def make() -> KernelManager:
        return KernelManager(
            kernel_name="attnkit-test",
            kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(specs)]),
            transport="ipc",
            ip=str(sockets / "kernel"),
        )

    return make


def _outputs(nb) -> tuple[str, str]:
    """All HTML outputs and all text outputs (streams and plain-text results) of an executed notebook."""
    htmls, texts = [], []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.output_type == "stream":
                texts.append(output.text)
            elif output.output_type in ("display_data", "execute_result"):
                htmls.append(output.data.get("text/html", ""))
                texts.append(output.data.get("text/plain", ""))
    return "\n".join(htmls), "\n".join(texts)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_runs_without_errors(path: Path, tmp_path: Path, kernel_manager_factory):
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, km=kernel_manager_factory(), timeout=CELL_TIMEOUT, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, when a cell fails
    htmls, texts = _outputs(nb)
    for fragment in EXPECTED[path.name]["html"]:
        assert fragment in htmls or fragment in html.unescape(htmls), f"{path.name}: no output contains {fragment!r}"
    for fragment in EXPECTED[path.name]["text"]:
        assert fragment in texts, f"{path.name}: no output contains {fragment!r}"
    # Offline: no output refers to anything outside itself (figures are data: URIs, the report is inline).
    for text in (htmls, html.unescape(htmls)):
        assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", text), f"{path.name}: a remote resource"
    assert list(tmp_path.iterdir()) == []  # and they leave no file behind in their working directory
