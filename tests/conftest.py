"""Shared fixtures: the real CIFAR-10 (through CIFAR10_DIR) and small fake datasets."""
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import utils  # noqa: E402
from cifar_resnet import data  # noqa: E402


def _real_data_dir():
    d = os.environ.get("CIFAR10_DIR")
    return Path(d) if d and all((Path(d) / f).is_file() for f in utils.NPY_FILES) else None


@pytest.fixture(scope="session")
def real_cifar10():
    """The real data as (x_train, y_train, x_test, y_test); skip without it, but fail in CI."""
    d = _real_data_dir()
    if d is None:
        reason = "real CIFAR-10 not found: set CIFAR10_DIR to a folder with x_train.npy, y_train.npy, x_test.npy, y_test.npy"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return utils.load_cifar10(d, download=False)


def make_fake_arrays(n_train=50, n_test=10, seed=0):
    """Small random CIFAR-shaped arrays with labels 0..9 cycling."""
    rng = np.random.default_rng(seed)
    x_tr = rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8)
    x_te = rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8)
    return x_tr, np.arange(n_train, dtype=np.int64) % 10, x_te, np.arange(n_test, dtype=np.int64) % 10


def write_npy(folder, arrays):
    """The four .npy files, the form of ../shared/cifar10."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, a in zip(utils.NPY_FILES, arrays):
        np.save(folder / name, a)


def write_batches(folder, arrays):
    """cifar-10-batches-py/ in the official pickle layout: rows of 3072 bytes, channel-major."""
    x_tr, y_tr, x_te, y_te = arrays
    out = folder / utils.BATCHES_DIR
    out.mkdir(parents=True, exist_ok=True)
    parts = np.array_split(np.arange(len(y_tr)), 5)
    batches = [(f"data_batch_{i + 1}", x_tr[p], y_tr[p]) for i, p in enumerate(parts)] + [("test_batch", x_te, y_te)]
    for name, x, y in batches:
        d = {b"batch_label": name.encode(), b"labels": [int(v) for v in y],
             b"data": x.transpose(0, 3, 1, 2).reshape(len(x), -1), b"filenames": [b"x.png"] * len(y)}
        with open(out / name, "wb") as f:
            pickle.dump(d, f, protocol=2)
    return out


@pytest.fixture
def fake_arrays():
    return make_fake_arrays()


@pytest.fixture
def no_default_places(tmp_path, monkeypatch):
    """Point data/ at an empty folder and unset CIFAR10_DIR so only what a test sets is found."""
    empty = tmp_path / "empty_data"
    empty.mkdir()
    monkeypatch.setattr(data, "DATA_DIR", empty)
    monkeypatch.delenv("CIFAR10_DIR", raising=False)
    return empty


@pytest.fixture(autouse=True)
def no_quick_mode(monkeypatch):
    """Unit tests run the library as users do: quick mode (CIFAR_QUICK=1) is for the notebook kernels only."""
    monkeypatch.delenv("CIFAR_QUICK", raising=False)
