"""Project-wide pytest setup: notebooks run in quick mode unless CIFAR_QUICK=0 asks for the full length, and
notebooks skip (or, under CI, fail) with one line when the CIFAR-10 data is not on this machine."""
import os
import sys
from pathlib import Path

import pytest

# Before any kernel starts: nbval's kernels inherit this environment. CIFAR_QUICK=0 runs the notebooks in full.
os.environ.setdefault("CIFAR_QUICK", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import utils  # noqa: E402

NO_DATA = ("CIFAR-10 is not on this machine: set CIFAR10_DIR to a folder with x_train.npy, y_train.npy, x_test.npy, "
           "y_test.npy, or download it once into data/ with: python -c \"import utils; utils.load_cifar10()\"")


def pytest_runtest_setup(item):
    """A notebook cell needs the data: without it, skip with the reason, or fail under CI."""
    if Path(str(item.fspath)).suffix == ".ipynb" and utils.find_cifar10() is None:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(NO_DATA)
