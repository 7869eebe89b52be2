"""Quick mode: the test suite's short version of the notebooks' long computations, and the only place it lives.

`pytest --nbval` sets the environment variable CIFAR_QUICK=1 for the notebook kernels (conftest.py). Then
`start_or_resume` trains one epoch a stage on 1,024 training and 500 validation images in a temporary folder,
and `speedrun` and `speedrun_scores` use at most 1,000 images; every other line of a notebook runs as written,
so nbval checks the same code paths and the stored outputs of every other cell. Without the variable, nothing
here changes anything. No notebook cell mentions it.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

__all__ = ["quick_mode_on", "shrink_run_for_tests", "shrink_images_for_tests"]

QUICK_TRAIN, QUICK_VAL, QUICK_IMAGES = 1024, 500, 1000
_folders = {}  # run folder -> its temporary stand-in, one per folder for the whole process


def quick_mode_on():
    """True when the test suite asked for quick mode (CIFAR_QUICK=1)."""
    return os.environ.get("CIFAR_QUICK") == "1"


def shrink_run_for_tests(cfg, data, run_dir):
    """(cfg, data, run_dir) as given, or in quick mode: one epoch a stage, 1,024 training and 500 validation
    images, and a temporary folder standing in for `run_dir` (the same one each time, so later cells resume)."""
    if not quick_mode_on():
        return cfg, data, run_dir
    stages = [(lr, i + 1) for i, (lr, _) in enumerate(cfg.stages)]
    x_tr, y_tr, x_val, y_val = data
    data = (x_tr[:QUICK_TRAIN], y_tr[:QUICK_TRAIN], x_val[:QUICK_VAL], y_val[:QUICK_VAL])
    key = str(Path(run_dir).resolve())
    folder = _folders.setdefault(key, tempfile.mkdtemp(prefix="quick_run_"))
    return dataclasses.replace(cfg, stages=stages), data, folder


def shrink_images_for_tests(*arrays):
    """The arrays as given, or in quick mode their first 1,000 entries."""
    return arrays if not quick_mode_on() else tuple(a[:QUICK_IMAGES] for a in arrays)
