"""Test-time views: the one vocabulary of names ('none', 'flip', 'flip_translate'), its check, and the averaged
predictions over the views.

Taught in notebook 04 (flip TTA) and notebook 06 (the speed run's six views); `Loaded_model` and the speed run
both score through `tta_probabilities`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .runtime import autocast

__all__ = ["TTA_VIEWS", "check_tta", "tta_probabilities", "tta_accuracy", "tta_accuracies"]

TTA_VIEWS = ("none", "flip", "flip_translate")  # True means "flip", False "none"


def check_tta(tta):
    """One of TTA_VIEWS from a name or a bool, or a one-line error naming the choices."""
    if isinstance(tta, bool):
        return "flip" if tta else "none"
    if tta not in TTA_VIEWS:
        raise ValueError(f"tta must be one of {', '.join(map(repr, TTA_VIEWS))} (or True / False); got {tta!r}")
    return tta


def _view_probabilities(model, xb, tta):
    """(single-view probabilities, probabilities averaged over the views `tta`) of a normalized batch: the single
    view is the views' first, so scoring both costs no extra forward pass."""
    single = model(xb).float().softmax(1)
    if tta == "none":
        return single, single
    p = (single + model(xb.flip(3)).float().softmax(1)) / 2
    if tta == "flip_translate":
        padded = F.pad(xb.float(), (1, 1, 1, 1), mode="reflect").to(xb.dtype)
        shifted = (padded[:, :, :-2, :-2], padded[:, :, 2:, 2:])
        mirrored = [(model(v).float().softmax(1) + model(v.flip(3)).float().softmax(1)) / 2
                    for v in (view.contiguous(memory_format=torch.channels_last) for view in shifted)]
        p = (p + sum(mirrored) / 2) / 2
    return single, p


@torch.no_grad()
def tta_probabilities(model, xb, tta="none"):
    """Softmax probabilities of a normalized batch averaged over the test-time views `tta`.

    'flip' averages the image and its mirror image. 'flip_translate' gives half the weight to those two and
    half to the image shifted a pixel up-left and down-right (reflected borders), each mirrored too.
    """
    return _view_probabilities(model, xb, check_tta(tta))[1]


@torch.no_grad()
def tta_accuracies(net, x, y, tta="none", device="cpu", precision="fp32", batch_size=500):
    """(single-view accuracy, accuracy with the views `tta`) of an eval-mode network on normalized images x (float
    N x 3 x 32 x 32), from one pass over the views."""
    tta = check_tta(tta)
    net.eval()
    correct = torch.zeros(2, dtype=torch.long)
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(device).contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            probabilities = _view_probabilities(net, xb, tta)
        correct += torch.stack([(p.argmax(1).cpu() == y[i:i + batch_size]).sum() for p in probabilities])
    return tuple(c / len(x) for c in correct.tolist())


def tta_accuracy(net, x, y, tta="none", device="cpu", precision="fp32", batch_size=500):
    """Accuracy of an eval-mode network on normalized images x (float N x 3 x 32 x 32) under the given views."""
    return tta_accuracies(net, x, y, tta, device, precision, batch_size)[1]
