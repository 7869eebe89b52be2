"""The house: one module per concern behind utils.py, imports that run one way, every name the notebooks use."""
import ast
import json
import re
from pathlib import Path

import pytest

import cifar_resnet
import utils

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cifar_resnet"
MODULES = sorted(p for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
ORDER = [m.__name__.split(".")[-1] for m in cifar_resnet.MODULES]  # bottom to top


def _tree(path):
    return ast.parse(path.read_text())


def _code_lines(path):
    """Lines that are neither blank, comments nor part of a docstring."""
    tree = _tree(path)
    docstrings = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(
                getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
            docstrings.update(range(body[0].lineno, body[0].end_lineno + 1))
    return [ln for i, ln in enumerate(path.read_text().splitlines(), 1)
            if ln.strip() and not ln.strip().startswith("#") and i not in docstrings]


def test_utils_is_a_facade_of_a_few_lines():
    assert len(_code_lines(ROOT / "utils.py")) <= 40
    assert set(utils.__all__) == set(cifar_resnet.__all__)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_each_module_is_one_concern_with_its_docstring_and_all(path):
    tree = _tree(path)
    assert ast.get_docstring(tree) and "notebook" in ast.get_docstring(tree).lower(), "says what teaches it"
    names = [t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
             if isinstance(t, ast.Name)]
    assert "__all__" in names
    assert len(path.read_text().splitlines()) <= 500
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            assert node.end_lineno - node.lineno + 1 <= 80, f"{path.name}: {node.name} is over 80 lines"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_imports_run_one_way_down_the_stack(path):
    """A module imports only modules below it in cifar_resnet.MODULES: there can be no cycle."""
    me = ORDER.index(path.stem)
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            assert ORDER.index(node.module) < me, f"{path.stem} imports {node.module}, which sits above it"


def test_every_public_name_of_a_module_is_defined_there():
    for module in cifar_resnet.MODULES:
        for name in module.__all__:
            obj = getattr(module, name)
            assert getattr(obj, "__module__", module.__name__) == module.__name__ or not callable(obj), name


def test_every_utils_name_the_notebooks_use_resolves():
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        for cell in json.loads(nb.read_text())["cells"]:
            if cell["cell_type"] == "code":
                for name in re.findall(r"\butils\.([A-Za-z_]\w*)", "".join(cell["source"])):
                    assert name == "py" or hasattr(utils, name), f"{nb.name}: utils.{name}"


def test_hubconf_imports_the_package_by_name():
    source = (ROOT / "hubconf.py").read_text()
    assert "import cifar_resnet" in source and "spec_from_file_location" not in source
