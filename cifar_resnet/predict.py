"""Prediction with a saved model on the CPU, `Loaded_model(path).predict(x)`, and the measures notebook 04
reports: accuracy per class, mistakes by confidence, calibration.

Taught in notebook 04 (evaluation and the reproduce section); notebook 05 looks inside the same models.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from .checkpoints import check_weights, load_checkpoint
from .data import CLASSES, Preprocess, as_image_batch
from .models import build_model, find_state_dict, guess_arch, input_size, load_weights
from .quick import shrink_images_for_tests
from .quantize import Int8UnavailableError, int8_cache_key, int8_unavailable_reason, quantize_int8
from .runtime import PREDICT_PRECISIONS, check_precision, get_device, precision_dtype, resolve_precision
from .views import check_tta, tta_probabilities

__all__ = ["Loaded_model", "per_class_accuracy", "mistakes_by_confidence", "probability_label",
           "expected_calibration_error", "compare_precisions"]


def _metadata(ckpt):
    """A checkpoint's metadata (everything but weights and optimizer state), or {} for a bare state dict."""
    meta = ckpt if isinstance(ckpt, dict) and "arch" in ckpt else {}
    return {k: v for k, v in meta.items() if k not in ("model", "optimizer", "rng")}


class Loaded_model:  # noqa: N801  (the name the course reports evaluate with)
    """A trained checkpoint ready to predict on the CPU: Loaded_model(path).predict(x_test).

    precision: 'auto' (fp32, or bf16 where this CPU computes it faster), 'fp32', 'bf16', 'fp16', or 'int8'
    (CPU only, asked for by name: post-training quantization calibrated on `calibration` images, by default 1,000
    of the training split).
    tta: the test-time views predictions average, 'none', 'flip' (or True) or 'flip_translate'; by default the
    ones the file records (the speed run's release records 'flip_translate'; the others none).
    """

    def __init__(self, path, device="cpu", arch=None, mean=None, std=None, tta=None, precision="auto",
                 calibration=None, **arch_options):
        check_precision(precision, PREDICT_PRECISIONS)  # every name is checked before any work
        if precision == "int8" and (reason := int8_unavailable_reason(device)):
            raise Int8UnavailableError(reason)
        tta = None if tta is None else check_tta(tta)
        ckpt = load_checkpoint(path)
        self.meta = _metadata(ckpt)
        self.arch = arch or self.meta.get("arch")
        if self.arch is None:
            guesses = guess_arch(find_state_dict(ckpt))
            hint = f"; its weights fit {guesses}" if guesses else ""
            raise ValueError(f"{path} carries no architecture name: pass arch=... (and shortcut=...){hint}")
        self.arch_options = arch_options or dict(self.meta.get("arch_options", {}))
        pre = dict(self.meta.get("preprocess", {})) or asdict(Preprocess(size=input_size(self.arch)))
        pre.update({k: tuple(v) for k, v in (("mean", mean), ("std", std)) if v is not None})
        self.preprocess = Preprocess(**pre)
        self.classes = list(self.meta.get("classes", CLASSES))
        self.device = get_device(device)
        self.precision = "int8" if precision == "int8" else resolve_precision(self.device, precision)
        self.tta = check_tta(self.meta.get("tta", "none") if tta is None else tta)
        net = build_model(self.arch, len(self.classes), **self.arch_options)
        label = f"{self.arch} {self.arch_options or ''}".strip()
        # weights stored in the compute dtype: faster than autocast, which re-casts them every batch
        self.dtype = torch.float32 if self.precision == "int8" else precision_dtype(self.precision)
        net = load_weights(net, check_weights(find_state_dict(ckpt), path), label)
        self.model = net.to(self.device, self.dtype, memory_format=torch.channels_last).eval()
        if self.precision == "int8":  # calibrated once per release file and torch; the statistics are kept beside it
            cache = Path(path).with_name(f"{Path(path).stem}.int8-statistics.pth")
            key = int8_cache_key(path, self.preprocess, label, calibration)
            self.model = quantize_int8(self.model, self.preprocess, calibration, cache, key)

    @torch.no_grad()
    def predict_proba(self, x, batch_size=128, verbose=False, tta=None):
        """N x classes probabilities, averaged over the test-time views `tta` (default: the model's)."""
        x = as_image_batch(x, self.preprocess.size)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a whole number of at least 1, got {batch_size!r}")
        tta = self.tta if tta is None else check_tta(tta)
        out, n, next_mark = [], len(x), 10
        for i in range(0, n, batch_size):  # batches of 128 stay in cache; 500 is slower for ResNet18 on a CPU
            xb = self.preprocess(x[i:i + batch_size].to(self.device)).to(self.dtype)
            xb = xb.contiguous(memory_format=torch.channels_last)
            out.append(tta_probabilities(self.model, xb, tta).cpu())
            done = min(i + batch_size, n) * 100 // n
            while verbose and next_mark <= done:
                print(f"predicting...{next_mark}%")
                next_mark += 10
        return torch.cat(out).numpy()

    def predict(self, x, batch_size=128, verbose=True, tta=None):
        """Class indices (int64, shape (N,)) for images; prints predicting...10% lines as the course reports do."""
        return self.predict_proba(x, batch_size, verbose, tta).argmax(1).astype(np.int64)

    def score(self, x, y, tta=None):
        """Accuracy (0 to 1) of the predictions for images x against labels y."""
        if len(x) != len(y):
            raise ValueError(f"x holds {len(x)} images but y {len(y)} labels; expected one label per image")
        return float(np.mean(self.predict(x, verbose=False, tta=tta) == np.asarray(y)))

# ----------------------------------------------------------------------------- measures (notebook 04)


def per_class_accuracy(y_true, y_pred, classes=CLASSES):
    """{class name: accuracy} over the images of each class."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return {name: float((y_pred[y_true == i] == i).mean()) for i, name in enumerate(classes)}


def mistakes_by_confidence(proba, y_true, k=8):
    """(most confident, least confident) wrong predictions: k indices each, by the predicted class's probability."""
    wrong = np.flatnonzero(proba.argmax(1) != np.asarray(y_true))
    order = wrong[np.argsort(-proba[wrong].max(1), kind="stable")]
    return order[:k], order[::-1][:k]


def probability_label(p):
    """A probability with enough decimals that close values differ: 0.60, 0.970, 0.99973."""
    decimals = 6 if p >= 1 else max(2, 1 - math.floor(math.log10(1 - p)))
    return f"{p:.{min(decimals, 6)}f}"


def expected_calibration_error(proba, y_true, bins=15):
    """ECE: the gap between confidence and accuracy, averaged over equal-width confidence bins, weighted by size."""
    conf, correct = proba.max(1), proba.argmax(1) == np.asarray(y_true)
    which = np.minimum((conf * bins).astype(int), bins - 1)
    return float(sum(abs(conf[which == b].mean() - correct[which == b].mean()) * (which == b).mean()
                     for b in range(bins) if (which == b).any()))


def compare_precisions(path, x, y, precisions=("fp32", "bf16", "int8")):
    """One release file's predictions on images x in each precision: a dict per precision with its seconds,
    accuracy against labels y and the number of predictions that differ from the first precision's, or the
    reason it cannot run here (int8 off x86, without torchao)."""
    x, y = shrink_images_for_tests(x, y)
    rows, reference = [], None
    for precision in precisions:
        if precision == "int8" and (reason := int8_unavailable_reason()):
            rows.append(dict(precision=precision, skipped=reason))
            continue
        model = Loaded_model(path, precision=precision)  # int8: calibrates on the first load, then reads the cache
        start = time.perf_counter()
        labels = model.predict(x, verbose=False)
        seconds = time.perf_counter() - start
        reference = labels if reference is None else reference
        rows.append(dict(precision=precision, seconds=seconds, accuracy=float(np.mean(labels == np.asarray(y))),
                         differ=int((labels != reference).sum()), images=len(labels)))
    return rows
