"""`pytest --nbval` at the project root: quick mode by default, a per-cell timeout, one-line skips without data."""
import configparser
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from conftest import make_fake_arrays, write_npy

ROOT = Path(__file__).resolve().parents[1]


def _notebook(path, source, output):
    """A one-cell notebook whose stored output is `output`."""
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell(source, execution_count=1)
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=output)]
    nb.cells = [cell]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


@pytest.fixture
def project(tmp_path):
    """A copy of the project root's pytest setup (configuration, conftest, sanitizers, utils and its package) to
    run pytest in."""
    root = tmp_path / "project"
    for name in ("pytest.ini", "conftest.py", "utils.py", "tests/nbval_sanitize.cfg"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, root / name)
    shutil.copytree(ROOT / "cifar_resnet", root / "cifar_resnet", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _pytest(root, *args, env_changes=None, timeout=300):
    """Run pytest as a user types it, in the folder `root`, in a fresh process."""
    env = {k: v for k, v in os.environ.items() if k not in ("CIFAR_QUICK", "CI")}
    env.update(env_changes or {})
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_root_configuration_collects_tests_and_notebooks_with_a_cell_timeout():
    ini = configparser.ConfigParser()
    ini.read(ROOT / "pytest.ini")
    assert ini["pytest"]["testpaths"].split() == ["tests", "notebooks"]
    opts = ini["pytest"]["addopts"].split()
    timeout = next(int(o.split("=")[1]) for o in opts if o.startswith("--nbval-cell-timeout="))
    assert 60 <= timeout <= 1800
    sanitize = next(o.split("=")[1] for o in opts if o.startswith("--nbval-sanitize-with="))
    assert (ROOT / sanitize).is_file()


def test_a_cell_past_the_timeout_fails_naming_notebook_and_cell(project, tmp_path):
    write_npy(tmp_path / "data", make_fake_arrays())
    _notebook(project / "slow_throwaway.ipynb", "import time\ntime.sleep(60)\nprint('done')", "done\n")
    run = _pytest(project, "--nbval", "slow_throwaway.ipynb", "--nbval-cell-timeout=3",
                  env_changes={"CIFAR10_DIR": str(tmp_path / "data")})
    out = run.stdout + run.stderr
    assert run.returncode == 1, out
    assert "slow_throwaway.ipynb::Cell 0" in out and "1 failed" in out, out
    assert "Timeout of 3 seconds exceeded" in out, out


@pytest.mark.parametrize("setting, passes", [(None, True), ("0", False)])
def test_notebooks_run_in_quick_mode_unless_asked_for_full_length(project, tmp_path, setting, passes):
    write_npy(tmp_path / "data", make_fake_arrays())  # the data check only needs the files to be there
    _notebook(project / "mode.ipynb", "import os\nprint(os.environ.get('CIFAR_QUICK'))", "1\n")
    env = {"CIFAR10_DIR": str(tmp_path / "data"), **({"CIFAR_QUICK": setting} if setting else {})}
    run = _pytest(project, "--nbval", "mode.ipynb", env_changes=env)
    assert (run.returncode == 0) == passes, run.stdout + run.stderr


def _root_conftest():
    spec = importlib.util.spec_from_file_location("root_conftest_copy", ROOT / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _NotebookCell:
    fspath = ROOT / "notebooks" / "01_data.ipynb"


def test_without_data_notebook_cells_skip_with_one_line_and_fail_under_ci(no_default_places, monkeypatch):
    hook = _root_conftest().pytest_runtest_setup
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception) as skipped:
        hook(_NotebookCell())
    assert "\n" not in str(skipped.value) and "CIFAR10_DIR" in str(skipped.value)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CIFAR10_DIR"):
        hook(_NotebookCell())


def test_with_data_notebook_cells_run(no_default_places, monkeypatch, tmp_path):
    write_npy(tmp_path / "data", make_fake_arrays())
    monkeypatch.setenv("CIFAR10_DIR", str(tmp_path / "data"))
    assert _root_conftest().pytest_runtest_setup(_NotebookCell()) is None
