"""The peer's own code on this CPU: Keller Jordan's airbench (the `airbench` package from PyPI), run unchanged.

airbench is written for a CUDA GPU in fp16. To run it on the CPU, exactly these are swapped in from outside the
package, only while it runs, and restored afterwards (`cpu_stand_ins`):

1. `torch.cuda.Event` -> a wall clock with the same `record()` / `elapsed_time()` (milliseconds);
2. `torch.cuda.synchronize` -> nothing (CPU work is done when the call returns);
3. `nn.Module.cuda` -> the module itself, left on the CPU;
4. `torch.load(..., map_location=<GPU 0>)` -> onto the CPU;
5. fp16 (`Tensor.half`, `nn.Module.half`) -> fp32 weights, with the whole run under autocast in the run's precision
   (bf16 where `auto` picks it, as this project's engine trains). fp16 has no fast CPU kernels, and bf16 weights
   would silently skip airbench's lookahead, which averages only fp16 and fp32 tensors. Autocast's weight cache
   is off: it keeps each weight's bf16 copy until the autocast region ends, and this region is the whole run, so
   every step would compute with the first step's weights (the loss stays at 2.3).
6. `airbench.utils.init_whitening_conv` -> the same function with autocast off: airbench computes its whitening
   filters in fp32 (the patches' covariance and its eigenvectors); under bf16 autocast the covariance's matrix
   product would round to 8 bits of mantissa, its smallest eigenvalues would come out negative, the filters NaN,
   and the run would score 10%.

Its data files (`cifar10/train.pt`, `cifar10/test.pt` in its own format, which it would otherwise download) are
written from the same arrays this project's run reads. Everything else (network, recipe, augmentation, schedule,
test-time views) is airbench's. The clock runs from airbench opening its files to its test accuracy with views,
as ours runs from loading the arrays to ours.
"""
import contextlib
import importlib
import importlib.metadata
import os
import time
from pathlib import Path

import torch
import torch.nn as nn

PEERS = {"airbench94": "train94", "airbench95": "train95"}  # --peer NAME: the package's function that trains it
TTA_LEVEL = 2  # airbench's views: mirror and 1-pixel translations, as its recipes report


class WallClockEvent:
    """torch.cuda.Event's timing interface on the CPU's wall clock."""

    def __init__(self, enable_timing=True, **kwargs):
        self.time = None

    def record(self, stream=None):
        self.time = time.perf_counter()

    def elapsed_time(self, end):
        return 1000 * (end.time - self.time)


@contextlib.contextmanager
def _swapped(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextlib.contextmanager
def cpu_stand_ins(precision):
    """The swaps 1-5 of the module docstring, undone on exit (also on an error)."""
    torch_load = torch.load

    def load_on_cpu(f, *args, map_location=None, **kwargs):
        return torch_load(f, *args, map_location="cpu", **kwargs)

    def to_fp32(self, *args, **kwargs):
        return self.float()

    autocast = (torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False) if precision == "bf16"
                else contextlib.nullcontext())
    with contextlib.ExitStack() as stack:
        stack.enter_context(_swapped(torch.cuda, "Event", WallClockEvent))
        stack.enter_context(_swapped(torch.cuda, "synchronize", lambda *args, **kwargs: None))
        stack.enter_context(_swapped(nn.Module, "cuda", lambda self, device=None: self))
        stack.enter_context(_swapped(torch, "load", load_on_cpu))
        stack.enter_context(_swapped(torch.Tensor, "half", to_fp32))
        stack.enter_context(_swapped(nn.Module, "half", to_fp32))
        stack.enter_context(autocast)
        yield


def without_autocast(function):
    """`function` run with autocast off: as written, in the dtypes of its inputs."""
    def in_fp32(*args, **kwargs):
        with torch.autocast("cpu", enabled=False):
            return function(*args, **kwargs)
    return in_fp32


@contextlib.contextmanager
def whitening_in_fp32(airbench_utils):
    """Swap 6 of the module docstring, undone on exit."""
    fp32 = without_autocast(airbench_utils.init_whitening_conv)
    with _swapped(airbench_utils, "init_whitening_conv", fp32):
        yield


def write_peer_data(folder, x_train, y_train, x_test, y_test, classes):
    """airbench's data files (uint8 NHWC images, int64 labels, class names) in folder/cifar10/."""
    data = Path(folder) / "cifar10"
    data.mkdir(parents=True, exist_ok=True)
    for name, x, y in (("train.pt", x_train, y_train), ("test.pt", x_test, y_test)):
        torch.save({"images": torch.as_tensor(x), "labels": torch.as_tensor(y, dtype=torch.long),
                    "classes": list(classes)}, data / name)
    return data


def run_peer(name, folder, precision, seed=0, **train_kwargs):
    """Train airbench's `name` with its own defaults from folder/cifar10/*.pt; its test accuracy single view and
    with its views, and the wall seconds. `train_kwargs` (epochs, ...) only for the test suite's tiny runs."""
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}; the peers are {', '.join(PEERS)}")
    airbench = importlib.import_module("airbench")
    here = Path.cwd()
    os.chdir(folder)  # airbench opens cifar10/train.pt and cifar10/test.pt relative to the working folder
    try:
        with cpu_stand_ins(precision), whitening_in_fp32(importlib.import_module("airbench.utils")):
            torch.manual_seed(seed)
            start = time.perf_counter()
            model = getattr(airbench, PEERS[name])(verbose=False, **train_kwargs)
            test = airbench.CifarLoader("cifar10", train=False, batch_size=2000)
            views = airbench.evaluate(model, test, tta_level=TTA_LEVEL)
            seconds = time.perf_counter() - start  # single view, scored after the clock, costs nothing extra
            single = airbench.evaluate(model, test, tta_level=0)
    finally:
        os.chdir(here)
    return dict(peer=name, seed=seed, test_acc=single, test_acc_tta=views, seconds=seconds, precision=precision,
                airbench_version=importlib.metadata.version("airbench"))
