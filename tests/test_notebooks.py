"""The Colab notebooks' shape (``make test`` also runs each one in a real
kernel, in smoke mode, with nbmake): committed without outputs, opening with a
Colab badge, a ``%pip install`` that runs only in Colab and a parameters cell
whose smoke setting CI turns on."""

from __future__ import annotations

import json

import pytest

from conftest import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
EXPECTED = ["01_embed_quickstart", "02_probes", "03_analyze", "04_pretrain", "05_finetune",
            "06_generate"]


def test_the_six_notebooks_are_there():
    assert [p.stem for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stripped_and_colab_ready(path):
    nb = json.loads(path.read_text())
    cells = nb["cells"]
    for cell in cells:
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [] and cell.get("execution_count") is None, \
                "commit notebooks without outputs"
    first = "".join(cells[0]["source"])
    assert cells[0]["cell_type"] == "markdown" and "colab-badge.svg" in first
    assert f"notebooks/{path.name}" in first
    install = "".join(cells[1]["source"])
    assert '"google.colab" in sys.modules' in install and "%pip install" in install
    assert all(line.startswith(("    ", "#", "import", "if")) for line in install.splitlines()
               if line.strip()), "the install runs only inside the Colab guard"
    params = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1 and 'PROTLM_SMOKE' in "".join(params[0]["source"])
