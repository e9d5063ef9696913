"""tutorial.ipynb runs top to bottom (in a copy of the repository, so runs/ here is untouched)."""
import glob
import os
import re
import shutil

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_tutorial_executes(tmp_path):
    for name in glob.glob(os.path.join(ROOT, "*.py")) + [os.path.join(ROOT, "tutorial.ipynb")]:
        shutil.copy(name, tmp_path / os.path.basename(name))
    shutil.copytree(os.path.join(ROOT, "data"), tmp_path / "data")
    nb = nbformat.read(str(tmp_path / "tutorial.ipynb"), as_version=4)
    # raises CellExecutionError (with the cell and its traceback) if any cell fails, incl. its asserts
    nbclient.NotebookClient(nb, timeout=1200, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    n_params = int(re.search(r"parameters: (\d+)", text).group(1))
    assert abs(n_params - 60_000) <= 600 and "bpp" in text and "GoPs start at frames [0, " in text
    assert os.path.getsize(tmp_path / "runs" / "tutorial.tnrv") > 1000
