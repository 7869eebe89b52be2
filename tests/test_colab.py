"""Colab first: the setup cell, runtime types, cost up front, Colab's packages, and Run all in a fresh stand-in Colab."""
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

import utils

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
COLAB_FREEZES = sorted((ROOT.parent / "shared" / "colab").glob("pip-freeze*.txt"))
SETUP_MARK = "#@title Setup, the same cell in every notebook"


def setup_cell(nb):
    cells = [c for c in nb.cells if c.cell_type == "code" and c.source.startswith(SETUP_MARK)]
    assert len(cells) == 1, "one setup cell per notebook"
    return cells[0]


def read(path):
    return nbformat.read(path, as_version=4)


def repo_url_of(source):
    return re.search(r'^REPO_URL = "([^"]*)"', source, re.M).group(1)


def test_setup_cell_is_the_same_in_every_notebook_and_comes_first():
    sources = {p.name: setup_cell(read(p)).source for p in NOTEBOOKS}
    assert len(set(sources.values())) == 1, sorted(sources)
    for p in NOTEBOOKS:  # before any other code (03 first says where its run folder lives)
        code = [c.source for c in read(p).cells if c.cell_type == "code"]
        assert code.index(setup_cell(read(p)).source) <= (1 if "KEEP_ON_DRIVE = True" in code[0] else 0), p.name


def test_repo_url_is_the_readme_address():
    readme = re.search(r"^Repository address \(`REPO_URL`\): (?:`([^`]+)`|not published yet)\.",
                       (ROOT / "README.md").read_text(), re.M)
    assert readme, "README.md names the repository address once, near the top"
    assert repo_url_of(setup_cell(read(NOTEBOOKS[0])).source) == (readme.group(1) or "")


def test_only_the_training_notebook_asks_for_a_gpu():
    for p in NOTEBOOKS:
        meta = read(p).metadata
        wants_gpu = meta.get("accelerator") == "GPU" or "gpuType" in meta.get("colab", {})
        assert wants_gpu == p.name.startswith("03_"), p.name


def test_every_notebook_states_its_run_all_time_first():
    for p in NOTEBOOKS:
        first = read(p).cells[0]
        assert first.cell_type == "markdown"
        assert re.search(r"\*\*Run all:\*\*[^\n]* about \d+(\.\d+)? (min|h)\b", first.source), p.name


def test_training_notebook_stores_its_time_estimate():
    outputs = [o.get("text", "") for c in read(ROOT / "notebooks" / "03_training.ipynb").cells
               if c.cell_type == "code" for o in c.get("outputs", [])]
    assert any(re.search(r"estimate: about \d+", t) for t in outputs)


def _freeze_versions(path):
    versions = {}
    for line in path.read_text().splitlines():
        if "==" in line:
            name, version = line.split("==", 1)
        elif " @ " in line and (m := re.search(r"/([A-Za-z0-9_.]+)-(\d[^-]*)-", line)):
            name, version = line.split(" @ ")[0], m.group(2).replace("%2B", "+")
        else:
            continue
        versions[name.strip().lower().replace("_", "-")] = version.strip()
    return versions


def test_colab_satisfies_the_notebooks_requirements():
    from packaging.requirements import Requirement
    if not COLAB_FREEZES:
        reason = "Colab's pip freeze not found beside the project (../shared/colab)"
        pytest.fail(reason) if os.environ.get("CI") else pytest.skip(reason)
    for freeze in COLAB_FREEZES:
        versions = _freeze_versions(freeze)
        for line in utils.runtime_requirements():
            req = Requirement(line)
            assert req.name.lower() in versions, f"{freeze.name} has no {req.name}"
            assert req.specifier.contains(versions[req.name.lower()], prereleases=True), \
                f"{freeze.name}: {req.name} {versions[req.name.lower()]} is outside {req.specifier}: pip would replace it"


def test_missing_requirement_is_installed_alone(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda args, **kw: calls.append(args))
    (tmp_path / "requirements.txt").write_text("# a comment\nnumpy>=1.0\nno-such-package-xyz>=1.0  # why\n")
    assert utils.install_missing_requirements(tmp_path / "requirements.txt") == ["no-such-package-xyz>=1.0"]
    assert calls == [[sys.executable, "-m", "pip", "install", "--quiet", "no-such-package-xyz>=1.0"]]


# ---- Run all in a fresh stand-in Colab session ---------------------------------------------------------------

@pytest.fixture
def colab(tmp_path, monkeypatch, real_cifar10):
    """An empty working folder, a stand-in google.colab whose drive.mount makes the folder it is given, and /content
    moved into the temporary folder."""
    fake = tmp_path / "fake_modules" / "google" / "colab"  # google stays a namespace package (protobuf lives there)
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("from . import drive\n")
    (fake / "drive.py").write_text("from pathlib import Path\n\n\ndef mount(path, **kwargs):\n"
                                   "    (Path(path) / 'MyDrive').mkdir(parents=True, exist_ok=True)\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(fake.parents[1]), os.environ.get("PYTHONPATH")])))
    content, work = tmp_path / "content", tmp_path / "work"
    content.mkdir()
    work.mkdir()
    return content, work


def run_as_colab(name, content, work, **settings):
    """Execute a notebook from an empty folder with REPO_URL at this repository (file://) and /content moved."""
    from nbclient import NotebookClient
    nb = read(ROOT / "notebooks" / name)
    setup = setup_cell(nb)
    setup.source = re.sub(r'^REPO_URL = "[^"]*"', f'REPO_URL = "file://{ROOT}"', setup.source, flags=re.M)
    setup.source = setup.source.replace('CONTENT = Path("/content")', f'CONTENT = Path("{content}")')
    for cell in nb.cells:  # a user changing a setting
        for key, value in settings.items():
            cell.source = re.sub(rf"^{key} = .*$", f"{key} = {value!r}", cell.source, flags=re.M)
    NotebookClient(nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(work)}}).execute()
    return nb


def printed(nb):
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


def readme_single_view(release):
    row = next(ln for ln in (ROOT / "README.md").read_text().splitlines() if ln.startswith(f"| [`{release}`]"))
    return float(re.findall(r"(\d+\.\d+)%", row)[0])


def test_evaluation_notebook_runs_in_a_fresh_colab_and_prints_the_readme_figure(colab, monkeypatch):
    content, work = colab
    monkeypatch.setenv("CIFAR_QUICK", "1")  # the precision comparison on 1,000 images; the accuracy on all 10,000
    nb = run_as_colab("04_evaluation.ipynb", content, work)
    assert (content / "cifar10-resnet" / "utils.py").is_file() and not (content / "drive").exists()  # no Drive asked
    assert (content / "cifar10-resnet" / ".git" / "shallow").is_file()  # cloned with --depth 1
    accuracy = float(re.search(r"Accuracy of my model on test set:\s+([\d.]+)", printed(nb)).group(1))
    assert abs(accuracy * 100 - readme_single_view("checkpoints/resnet18.pth")) <= 0.005


def test_data_notebook_runs_in_a_fresh_colab(colab):
    content, work = colab
    nb = run_as_colab("01_data.ipynb", content, work)
    assert "train 45000, validation 5000, test 10000" in printed(nb)


def test_training_notebook_on_drive_then_evaluation_of_what_it_trained(colab, monkeypatch):
    content, work = colab
    monkeypatch.setenv("CIFAR_QUICK", "1")
    nb = run_as_colab("03_training.ipynb", content, work)
    project = content / "drive" / "MyDrive" / "cifar10-resnet"
    mine = project / "checkpoints" / "my_resnet20.pth"
    assert mine.is_file(), "03 exports its selected epoch"
    assert re.search(r"wrote checkpoints/my_resnet20.pth: epoch \d of 3\n", printed(nb))  # quick: 3 epochs
    nb = run_as_colab("04_evaluation.ipynb", content, work, MODEL="checkpoints/my_resnet20.pth")
    assert not (content / "cifar10-resnet").exists()  # 04 found the project 03 left on Drive
    accuracy = float(re.search(r"Accuracy of my model on test set:\s+([\d.]+)", printed(nb)).group(1))
    x_test, y_test = utils.load_cifar10()[2:]
    assert accuracy == pytest.approx(utils.Loaded_model(mine, precision="fp32").score(x_test, y_test), abs=1e-9)


def test_setup_without_project_or_address_says_what_to_do(colab):
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError
    content, work = colab
    nb = read(ROOT / "notebooks" / "01_data.ipynb")
    setup = setup_cell(nb)
    setup.source = setup.source.replace('CONTENT = Path("/content")', f'CONTENT = Path("{content}")')
    setup.source = re.sub(r'^REPO_URL = "[^"]*"', 'REPO_URL = ""', setup.source, flags=re.M)
    nb.cells = [setup]
    with pytest.raises(CellExecutionError) as e:
        NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(work)}}).execute()
    assert "paste its GitHub address into REPO_URL" in str(e.value)
