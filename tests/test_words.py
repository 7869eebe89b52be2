"""What a reader sees: references named by what they are, no test plumbing in the cells, readable banners."""
import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
PROSE = [ROOT / "README.md", ROOT / "checkpoints" / "README.md", ROOT / "utils.py", ROOT / "train.py",
         ROOT / "hubconf.py", *sorted((ROOT / "bench").glob("*.py")), *sorted((ROOT / "cifar_resnet").glob("*.py"))]
SEED_AS_REFERENCE = re.compile(r"\bseed 0\d|\bseeds\b|\bseed's\b|\bseed-style\b", re.I)


@pytest.mark.parametrize("path", NOTEBOOKS + PROSE, ids=lambda p: p.name)
def test_references_are_named_by_what_they_are_never_seed_numbers(path):
    if path.suffix == ".ipynb":
        text = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells)
    else:
        text = path.read_text()
    assert not SEED_AS_REFERENCE.findall(text), SEED_AS_REFERENCE.findall(text)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_test_plumbing_in_cells_and_banners_set_their_text_colour(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        assert "NBVAL_" not in cell.source.upper(), cell.source[:80]
        if cell.cell_type == "code":  # quick mode is the library's and the test suite's business
            assert not re.search(r"quick", cell.source, re.I), cell.source[:80]
        for style in re.findall(r'style="([^"]*background-color[^"]*)"', cell.source):
            assert re.search(r"(^|;)\s*color:", style), f"banner without a text colour: {style}"
    assert nb.cells[-1].cell_type == "markdown" and nb.cells[-1].source.startswith("## Summary"), "ends with a summary"
