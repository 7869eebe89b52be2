"""What a reader sees: references named by what they are, no test plumbing in the cells, readable banners."""
import ast
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
    assert summary_text(nb.cells[-1]).startswith("## Summary"), "ends with a summary"


def summary_text(cell):
    """The summary a reader sees in a last cell: Markdown written as such, or printed from the notebook's own
    variables by a code cell (its stored output, so an unexecuted summary does not count)."""
    if cell.cell_type == "markdown":
        return cell.source
    shown = [out.get("data", {}).get("text/markdown", "") for out in cell.get("outputs", [])]
    return "".join(text if isinstance(text, str) else "".join(text) for text in shown)


def test_a_summary_printed_from_variables_counts_only_once_executed():
    printed = nbformat.v4.new_code_cell('Markdown(f"## Summary")')
    assert summary_text(printed) == ""
    printed.outputs = [nbformat.v4.new_output("execute_result", {"text/markdown": "## Summary\n* 93%"})]
    assert summary_text(printed).startswith("## Summary")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_code_lines_fit_a_notebook_column(path):
    # Jupyter, Colab and GitHub show about 100 characters of code before a line runs past the right edge
    long = [line for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code"
            for line in cell.source.splitlines() if len(line) > 100]
    assert not long, f"{len(long)} code lines over 100 characters, the first: {long[0]!r}"


def module_docstring(path):
    """(the docstring as Python reads it, its literal as written) of a module that opens with one, else None."""
    tree = ast.parse(path.read_text())
    if ast.get_docstring(tree) is None:
        return None
    return ast.get_docstring(tree, clean=False), ast.get_source_segment(path.read_text(), tree.body[0])


@pytest.mark.parametrize("path", [p for p in PROSE if p.suffix == ".py" and module_docstring(p)], ids=lambda p: p.name)
def test_commands_in_a_docstring_keep_their_line_continuations(path):
    # A script's docstring is its --help text; in a plain string a backslash at a line's end joins two lines, so
    # a command written on two lines was printed as one with a gap in it
    text, literal = module_docstring(path)
    assert text.count("\\\n") == literal.count("\\\n"), "a backslash-newline is lost: write the docstring as a raw string"
