"""Pictures: image grids, learning curves, filters, feature maps, Grad-CAM, feature embeddings, the residual
block drawn, error curves, reliability diagrams and per-class bars.

Taught in notebook 05 (visualization); notebooks 01 to 04 draw with the same helpers.
"""
from __future__ import annotations

import math
import re

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch
from sklearn.calibration import calibration_curve
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE

from .predict import expected_calibration_error

__all__ = ["show_images", "lr_drops", "plot_history", "plot_filters", "get_layer", "feature_maps", "grad_cam",
           "overlay", "plot_grad_cam",
           "embed_features", "plot_error_curves", "plot_batch_norm_runs", "draw_basic_block", "plot_reliability",
           "plot_per_class_accuracy"]

def _as_hwc(img):
    """An H x W x 3 (or H x W) array from an image array or a 3 x H x W (or H x W) tensor."""
    if isinstance(img, torch.Tensor):
        img = img.detach().float().cpu() if img.is_floating_point() else img.detach().cpu()
        img = (img.permute(1, 2, 0) if img.ndim == 3 else img).numpy()
    return img


def show_images(images, titles=None, ncols=10, size=1.2):
    """A grid of images (H x W x 3 arrays or 3 x H x W tensors), each with an optional title; returns the figure."""
    n = len(images)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * size, nrows * size * 1.15), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(_as_hwc(images[i]), interpolation="nearest")
            if titles is not None:
                ax.set_title(titles[i], fontsize=7)
    fig.tight_layout()
    return fig


def lr_drops(history, span=3):
    """What each drop of the learning rate did, from a run's history: a dict per drop with the epoch it took
    effect (1-based), the lr before and after, and the mean validation accuracy of the `span` epochs before and
    after it (a mean, so one noisy epoch does not make or hide a jump)."""
    lr, val = history["lr"], history["val_acc"]
    drops = []
    for i in range(1, len(lr)):
        if lr[i] < lr[i - 1] * 0.5:  # a stage's drop, not a cosine schedule's small steps
            before, after = val[max(0, i - span):i], val[i:i + span]
            drops.append(dict(epoch=i + 1, lr_before=lr[i - 1], lr_after=lr[i], val_before=float(np.mean(before)),
                              val_after=float(np.mean(after))))
    return drops


def plot_history(history, title=None):
    """Training and validation loss and accuracy against epochs: each stage's lr, each drop with the change in
    validation accuracy it made (lr_drops), and the best validation epoch, the one a run keeps."""
    epochs = np.asarray(history["epoch"]) + 1
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, key in ((ax_loss, "loss"), (ax_acc, "acc")):
        ax.plot(epochs, history[f"train_{key}"], label=f"train {key}")
        ax.plot(epochs, history[f"val_{key}"], label=f"validation {key}")
        for end in history.get("stage_ends", [])[:-1]:
            ax.axvline(end + 0.5, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    for drop in lr_drops(history):  # the measured effect of each drop, written at the drop
        gain = 100 * (drop["val_after"] - drop["val_before"])
        ax_acc.annotate(f"lr {drop['lr_before']:g}→{drop['lr_after']:g}\nval {gain:+.1f} pts", (drop["epoch"], 0.42),
                        xycoords=("data", "axes fraction"), fontsize=7.5, ha="center",
                        bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="grey", alpha=0.85))
    best = int(np.argmax(history["val_acc"]))
    ax_acc.plot(epochs[best], history["val_acc"][best], marker="*", markersize=12, color="tab:red", linestyle="none",
                label=f"best validation, epoch {epochs[best]}: kept")
    ax_loss.set_ylabel("cross-entropy")
    ax_acc.set_ylabel("accuracy")
    ax_loss.legend(fontsize=8)
    ax_acc.legend(fontsize=8, loc="lower right")
    ax_acc.set_title(f"starting lr {history['lr'][0]:g}", fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_filters(weight, ncols=16, size=0.55):
    """First-layer filters (out x 3 x k x k) as RGB tiles, each stretched to [0, 1]; returns the figure."""
    w = weight.detach().float().cpu()
    lo, hi = w.amin((1, 2, 3), keepdim=True), w.amax((1, 2, 3), keepdim=True)
    return show_images((w - lo) / (hi - lo).clamp_min(1e-8), ncols=ncols, size=size)


def get_layer(model, name):
    """The submodule called `name`; a bad name raises an error that lists the valid ones."""
    modules = dict(model.named_modules())
    if not name or name not in modules:
        raise ValueError(f"no layer {name!r}; valid layers: {', '.join(k for k in modules if k)}")
    return modules[name]


@torch.no_grad()
def feature_maps(model, x, layers):
    """{layer: activations N x C x H x W} for a preprocessed batch, via forward hooks removed afterwards."""
    found, handles = {}, []
    for name in layers:
        hook = (lambda n: lambda module, inputs, output: found.__setitem__(n, output.detach().float().cpu()))(name)
        handles.append(get_layer(model, name).register_forward_hook(hook))
    try:
        model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return found


def grad_cam(model, x, layer, target=None):
    """Grad-CAM maps (N x H x W at the input's size, non-negative, max 1) and the target classes (default:
    predicted)."""
    store = {}
    handle = get_layer(model, layer).register_forward_hook(lambda m, i, out: store.__setitem__("act", out))
    try:
        with torch.enable_grad():
            logits = model.eval()(x.detach())
            target = logits.argmax(1) if target is None else torch.as_tensor(target).expand(len(x))
            act = store["act"]
            grads, = torch.autograd.grad(logits.gather(1, target.view(-1, 1)).sum(), act)
    finally:
        handle.remove()
    cam = F.relu((grads.mean((2, 3), keepdim=True) * act).sum(1, keepdim=True)).detach().float()
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return cam / cam.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1), target


CAM_COLORMAP = "inferno"  # dark to bright in one hue ramp: reads in print and for colour-blind readers, unlike jet


def overlay(image, cam, alpha=0.45):
    """An H x W x 3 uint8 image blended with a heat map of `cam` (H x W in [0, 1]); alpha < 0.5 keeps the image
    readable under the map."""
    heat = matplotlib.colormaps[CAM_COLORMAP](np.asarray(cam))[..., :3]
    return (1 - alpha) * np.asarray(image) / 255 + alpha * heat


def plot_grad_cam(images, cams, titles, ncols=8, size=1.3):
    """Rows of images, each above its Grad-CAM overlay, and one colour bar for the map (0: no evidence, 1: the
    image's strongest); images are H x W x 3 uint8, cams N x H x W in [0, 1]."""
    n = len(images)
    rows = math.ceil(n / ncols)
    fig, axes = plt.subplots(2 * rows, ncols, figsize=(ncols * size + 0.8, 2 * rows * size * 1.12), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k in range(n):
        top, bottom = axes[2 * (k // ncols), k % ncols], axes[2 * (k // ncols) + 1, k % ncols]
        top.imshow(np.asarray(images[k]), interpolation="nearest")
        top.set_title(titles[k], fontsize=7)
        bottom.imshow(overlay(images[k], np.asarray(cams[k])), interpolation="nearest")
    scale = plt.cm.ScalarMappable(cmap=CAM_COLORMAP, norm=matplotlib.colors.Normalize(0, 1))
    fig.colorbar(scale, ax=axes.ravel().tolist(), fraction=0.015, pad=0.01, label="Grad-CAM (per image)")
    return fig


@torch.no_grad()
def embed_features(model, x, method="pca", seed=0, batch_size=500):
    """(N x 2 embedding by PCA or t-SNE, N x D penultimate features) of a preprocessed batch."""
    if method not in ("pca", "tsne"):
        raise ValueError(f"method must be 'pca' or 'tsne', got {method!r}")
    model.eval()
    feats = torch.cat([model.features(x[i:i + batch_size]).float().cpu() for i in range(0, len(x), batch_size)]).numpy()
    reducer = PCA(2, random_state=seed) if method == "pca" else TSNE(2, init="pca", random_state=seed)
    return reducer.fit_transform(feats), feats


def plot_error_curves(runs, title=None):
    """Training and validation error (%) against epochs for {label: history}; labels starting 'plain' dashed."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    depths = sorted({re.sub(r"\D", "", label) for label in runs}, key=lambda d: int(d or 0))
    for label, h in runs.items():  # one colour per depth; plain nets dashed, residual nets solid
        style = dict(color=plt.cm.tab10(depths.index(re.sub(r"\D", "", label))),
                     linestyle="--" if label.startswith("plain") else "-")
        epochs = np.arange(1, len(h["epoch"]) + 1)
        for ax, key in zip(axes, ("train_acc", "val_acc")):
            ax.plot(epochs, 100 * (1 - np.asarray(h[key])), label=label, **style)
    for ax, name in zip(axes, ("training error (augmented images)", "validation error")):
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("error (%)")
    axes[1].legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_batch_norm_runs(runs, title=None):
    """Training loss and validation accuracy against epochs for {label: (history, batch_norm, lr)}: one colour per
    lr, solid with batch norm, dashed without; a run that diverged ends where it did, marked with a cross."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    lrs = sorted({lr for _, _, lr in runs.values()}, reverse=True)
    for label, (h, batch_norm, lr) in runs.items():
        style = dict(color=plt.cm.tab10(lrs.index(lr)), linestyle="-" if batch_norm else "--")
        epochs = np.arange(1, len(h["epoch"]) + 1)
        for ax, key in ((ax_loss, "train_loss"), (ax_acc, "val_acc")):
            ax.plot(epochs, h[key], label=label, marker="o", markersize=3, **style)
            if h.get("diverged"):
                ax.plot(epochs[-1:] if len(epochs) else [0.5], h[key][-1:] or [np.nan], marker="x", markersize=10,
                        color=style["color"])
    ax_loss.set_ylabel("training loss (augmented images)")
    ax_acc.set_ylabel("validation accuracy")
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def draw_basic_block():
    """A drawing of the basic residual block: the plain path, the shortcut and the addition, options A and B."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    layers = ["3×3 conv, stride s", "batch norm", "ReLU", "3×3 conv", "batch norm"]
    shortcuts = ("option A: identity, or subsample\nby s and pad new channels with\nzeros (no weights)",
                 "option B: identity, or 1×1 conv\n(stride s) + batch norm\n(a projection, with weights)")
    for ax, shortcut in zip(axes, shortcuts):
        ax.set_xlim(0, 10)
        ax.set_ylim(-0.6, 9.4)
        ax.axis("off")
        ys = [7.6 - 1.25 * i for i in range(len(layers))]
        ax.text(3, 9.0, "x", ha="center", fontsize=12, weight="bold")
        for y, name in zip(ys, layers):
            ax.add_patch(FancyBboxPatch((1.2, y - 0.35), 3.6, 0.7, boxstyle="round,pad=0.05",
                                        fc="#dbe9f6", ec="#1f4e79"))
            ax.text(3, y, name, ha="center", va="center", fontsize=9)
        arrows = [(8.75, ys[0] + 0.4)] + [(a - 0.4, b + 0.4) for a, b in zip(ys, ys[1:])] + [(ys[-1] - 0.4, 1.15)]
        for top, bottom in arrows:
            ax.add_patch(FancyArrowPatch((3, top), (3, bottom), arrowstyle="-|>", mutation_scale=12))
        ax.add_patch(plt.Circle((3, 0.8), 0.35, fc="#ffe08a", ec="#7a5c00"))
        ax.text(3, 0.8, "+", ha="center", va="center", fontsize=14, weight="bold")
        ax.text(3, -0.45, "ReLU → out = F(x) + shortcut(x)", ha="center", fontsize=9)
        ax.plot([3.3, 5.6, 5.6], [9.1, 9.1, 0.8], color="#b03a2e", lw=1.8)  # the shortcut skips both convolutions
        ax.add_patch(FancyArrowPatch((5.6, 0.8), (3.35, 0.8), arrowstyle="-|>", mutation_scale=12,
                                     color="#b03a2e", lw=1.8))
        ax.text(5.8, 4.9, shortcut, ha="left", va="center", fontsize=8.5, color="#b03a2e")
        ax.text(0.5, 4.9, "F(x)", rotation=90, ha="center", va="center", fontsize=10, color="#1f4e79")
    axes[0].set_title("BasicBlock with shortcut option A (the paper's CIFAR nets)", fontsize=10)
    axes[1].set_title("BasicBlock with shortcut option B (ResNet18)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_reliability(proba, y_true, bins=15, label="model"):
    """Reliability diagram: accuracy against confidence of the predicted class, with the ECE in the legend.
    `proba` is one model's N x 10 probabilities, or {label: probabilities} to draw several models on one plot."""
    curves = proba if isinstance(proba, dict) else {label: proba}
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
    for name, p in curves.items():
        conf, correct = p.max(1), (p.argmax(1) == np.asarray(y_true)).astype(int)
        acc, mean_conf = calibration_curve(correct, conf, n_bins=bins, strategy="uniform")
        ax.plot(mean_conf, acc, marker="o", label=f"{name} (ECE {expected_calibration_error(p, y_true, bins):.3f})")
    ax.set_xlabel("confidence (probability of the predicted class)")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_per_class_accuracy(accuracy):
    """Horizontal bars of {class: accuracy}, lowest at the top, the value written on each bar."""
    names, values = zip(*sorted(accuracy.items(), key=lambda kv: kv[1]))
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.barh(names, values, color="tab:blue")
    for i, v in enumerate(values):
        ax.text(v - 0.005, i, f"{100 * v:.1f}%", va="center", ha="right", color="white", fontsize=8)
    lo = min(values)
    ax.set_xlim(max(0.0, lo - 0.1), 1.0)
    ax.set_xlabel("test accuracy")
    fig.tight_layout()
    return fig
