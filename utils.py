"""Helpers shared by the notebooks: data, models, training, checkpoints, evaluation, pictures.

The module reads top to bottom in the order the notebooks meet it.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import io
import math
import os
import pickle
import platform
import re
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

PROJECT_DIR = Path(__file__).resolve().parent
DATA_DIR = PROJECT_DIR / "data"

# --------------------------------------------------------------------------- data

CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck")
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
COMMON_STD = (0.2023, 0.1994, 0.2010)  # the std many CIFAR repositories (kuangliu's too) normalize with
TRUE_STD = (0.2470, 0.2435, 0.2616)  # the measured per-channel std of the training pixels
NPY_FILES = ("x_train.npy", "y_train.npy", "x_test.npy", "y_test.npy")
BATCHES_DIR = "cifar-10-batches-py"
TARBALL = "cifar-10-python.tar.gz"


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler for the official CIFAR batches: numpy arrays and plain containers only."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}  # bytes under protocol 2

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"CIFAR batch refers to {module}.{name}; only numpy arrays are allowed")
        return super().find_class(module, name)


def _read_batch(fileobj):
    """Images (N, 32, 32, 3) uint8 and labels (N,) int64 from one official pickle batch."""
    d = _ArrayUnpickler(fileobj, encoding="bytes").load()
    x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(x), np.asarray(d[b"labels"], dtype=np.int64)


def _stack_batches(open_batch):
    """Concatenate data_batch_1..5 and test_batch, opened by `open_batch(name)`."""
    train = [_read_batch(open_batch(f"data_batch_{i}")) for i in range(1, 6)]
    x_test, y_test = _read_batch(open_batch("test_batch"))
    return (np.concatenate([b[0] for b in train]), np.concatenate([b[1] for b in train]), x_test, y_test)


def _data_form(place: Path):
    """Which accepted form of the data a folder holds: "npy", "batches", "tarball", or None."""
    if all((place / f).is_file() for f in NPY_FILES):
        return "npy"
    if (place / BATCHES_DIR / "data_batch_1").is_file():
        return "batches"
    return "tarball" if (place / TARBALL).is_file() else None


def _load_from(place: Path):
    """The four arrays from one folder in any accepted form, or None if none is there."""
    form = _data_form(place)
    if form == "npy":
        return tuple(np.load(place / f, allow_pickle=False) for f in NPY_FILES)
    if form == "batches":
        return _stack_batches(lambda name: open(place / BATCHES_DIR / name, "rb"))
    if form == "tarball":
        with tarfile.open(place / TARBALL, "r:gz") as tar:
            return _stack_batches(lambda name: io.BytesIO(tar.extractfile(f"{BATCHES_DIR}/{name}").read()))
    return None


def _data_places(root=None):
    """Where the data is looked for, in order: the given folder, $CIFAR10_DIR, data/."""
    return [Path(p) for p in (root, os.environ.get("CIFAR10_DIR"), DATA_DIR) if p]


def find_cifar10(root=None):
    """The first folder of root, $CIFAR10_DIR and data/ holding the data in an accepted form, or None."""
    return next((place for place in _data_places(root) if _data_form(place)), None)


def load_cifar10(root=None, download=True):
    """Return (x_train, y_train, x_test, y_test): uint8 N x 32 x 32 x 3 images and int64 labels, official order."""
    if root is not None and not Path(root).is_dir():  # an explicit folder is never silently replaced by another
        raise FileNotFoundError(f"CIFAR-10 folder {root} does not exist; pass an existing folder, or root=None "
                                "to search $CIFAR10_DIR and data/")
    places = _data_places(root)
    place = find_cifar10(root)
    if place is not None:
        return _check_arrays(_load_from(place), place)
    reason = "download=False"
    if download:
        try:
            import torchvision
            torchvision.datasets.CIFAR10(root=str(DATA_DIR), train=True, download=True)
            return _check_arrays(_load_from(DATA_DIR), DATA_DIR)
        except Exception as e:  # no network, disk full, ...: report it with the places searched
            reason = f"download failed: {type(e).__name__}: {e}"
    searched = "\n".join(f"  - {p}" for p in places)
    raise FileNotFoundError(
        f"CIFAR-10 not found ({reason}). Searched, in order:\n{searched}\n"
        f"Each place may hold the four files {', '.join(NPY_FILES)}, the folder {BATCHES_DIR}/, or {TARBALL}.\n"
        "Fix: pass load_cifar10(root=DIR), set the environment variable CIFAR10_DIR=DIR, "
        f"put the data in {DATA_DIR}, or allow the torchvision download (needs internet).")


def _check_arrays(arrays, place):
    """Refuse arrays of the wrong dtype, shape, length or label range, naming the folder; labels become int64."""
    x_tr, y_tr, x_te, y_te = arrays
    for name, x, y in (("train", x_tr, y_tr), ("test", x_te, y_te)):
        where = f"{place}: x_{name}"
        if x.dtype != np.uint8:  # a cast would turn floats in [0, 1] into zeros and wrap values above 255
            raise ValueError(f"{where} should be uint8 pixels 0..255, got dtype {x.dtype}")
        if x.ndim != 4 or x.shape[1:] != (32, 32, 3):
            raise ValueError(f"{where} should be N x 32 x 32 x 3, got shape {x.shape}")
        if y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"{where} has {len(x)} images but y_{name} has shape {y.shape}; expected one label each")
        if not np.issubdtype(y.dtype, np.integer) or (len(y) and (y.min() < 0 or y.max() >= len(CLASSES))):
            values = f", values {y.min()}..{y.max()}" if len(y) and np.issubdtype(y.dtype, np.number) else ""
            raise ValueError(f"{place}: y_{name} should hold integer labels 0..{len(CLASSES) - 1}, "
                             f"got dtype {y.dtype}{values}")
    return x_tr, y_tr.astype(np.int64), x_te, y_te.astype(np.int64)


def train_val_split(x, y, val_size=5000, seed=0):
    """Stratified, seeded split of the training set into (x_train, y_train, x_val, y_val), official order kept."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    per_class = np.floor(counts / counts.sum() * val_size).astype(int)
    per_class[np.argsort(-(counts / counts.sum() * val_size - per_class))[: val_size - per_class.sum()]] += 1
    val_idx = np.concatenate([rng.choice(np.flatnonzero(y == c), k, replace=False) for c, k in zip(classes, per_class)])
    is_val = np.zeros(len(y), dtype=bool)
    is_val[val_idx] = True
    return x[~is_val], y[~is_val], x[is_val], y[is_val]


def images_to_tensor(x):
    """uint8 N x H x W x 3 array (or N x 3 x H x W tensor) to a uint8 N x 3 x H x W tensor."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)
    return x.contiguous()


@dataclass
class Preprocess:
    """How images become network input: scale to [0, 1], optional resize, then normalize."""

    mean: tuple = CIFAR_MEAN
    std: tuple = COMMON_STD
    per_image: bool = False  # per-image standardization (the ResNet v1/v2 reports) instead of mean/std
    size: int = 32  # 224 for resnet18_imagenet

    def __call__(self, x):
        """Float N x 3 x size x size batch from uint8 (0..255) or float (0..1) images."""
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        if x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        if self.per_image:
            flat = x.flatten(1)
            std = flat.std(1, unbiased=False).clamp_min(1 / math.sqrt(flat.shape[1]))
            return (x - flat.mean(1).view(-1, 1, 1, 1)) / std.view(-1, 1, 1, 1)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


def draw_augmentation(n, generator=None, pad=4):
    """Per-image (row offset, column offset, flip) for `n` images, as a 3 x n int64 CPU tensor."""
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    return torch.stack([oy, ox, flip.long()])


def augment_batch(x, generator=None, pad=4, draws=None, padding="constant"):
    """Random crop after `pad`-pixel zero padding and random horizontal flip per image, on x's device.

    `draws` (from draw_augmentation, already on x's device) replaces drawing from `generator`; padding='reflect'
    mirrors the border instead of padding with zeros (the speed run's shifts).
    """
    n, _, h, w = x.shape
    draws = (draw_augmentation(n, generator, pad).to(x.device) if draws is None else draws)[:, :, None]
    oy, ox, flip = draws[0], draws[1], draws[2].bool()
    rows = oy + torch.arange(h, device=x.device)
    cols = ox + torch.where(flip, torch.arange(w - 1, -1, -1, device=x.device), torch.arange(w, device=x.device))
    padded = F.pad(x, (pad, pad, pad, pad), mode=padding).permute(0, 2, 3, 1)  # N x H x W x C for one gather
    out = padded[torch.arange(n, device=x.device).view(n, 1, 1), rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


class BatchLoader:
    """Seeded batches of (images, labels) from a uint8 tensor held once on the device, augmented there."""

    def __init__(self, x, y, batch_size=128, preprocess=None, augment=False, shuffle=False,
                 drop_last=False, seed=0, device="cpu", rank=0, world_size=1):
        self.x = images_to_tensor(x).to(device)
        self.y = torch.as_tensor(np.asarray(y), dtype=torch.long).to(device)
        self.batch_size, self.augment, self.shuffle, self.drop_last = batch_size, augment, shuffle, drop_last
        self.preprocess = preprocess or Preprocess()
        self.seed, self.rank, self.world_size, self.epoch = seed, rank, world_size, 0

    def set_epoch(self, epoch):
        """Choose the epoch whose order and augmentation the next pass uses (exact resume)."""
        self.epoch = epoch

    def _order(self, generator):
        n = len(self.y)
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        if self.world_size > 1:  # every rank takes an equal shard of the same permutation
            order = order[: n - n % self.world_size][self.rank:: self.world_size]
        return order

    def __len__(self):
        n = len(self.y) // self.world_size  # each rank's shard, as _order cuts it
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def epoch_plan(self):
        """The epoch's image order and, when augmenting, each image's draws: one 4 x N (or 1 x N) int64 tensor.

        Drawn on the CPU in the order the batches use them, then moved to the device in one copy, so a GPU gets
        one host-to-device transfer an epoch and its batches are the CPU's, bit for bit.
        """
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = self._order(g)
        rows = [order]
        if self.augment:
            sizes = [len(order[i * self.batch_size:(i + 1) * self.batch_size]) for i in range(len(self))]
            rows = [order[:sum(sizes)], *torch.cat([draw_augmentation(k, g) for k in sizes], 1)]
        return torch.stack(rows).to(self.x.device, non_blocking=True)

    def __iter__(self):
        plan = self.epoch_plan()
        for i in range(len(self)):
            part = plan[:, i * self.batch_size:(i + 1) * self.batch_size]
            xb = self.x[part[0]]
            if self.augment:
                xb = augment_batch(xb, draws=part[1:])
            yield self.preprocess(xb).contiguous(memory_format=torch.channels_last), self.y[part[0]]
        self.epoch += 1  # a plain loop over epochs reshuffles

# --------------------------------------------------------------------------- models


class PadShortcut(nn.Module):
    """Option A shortcut of He et al.: subsample by 2 and zero-pad the new channels (no parameters)."""

    def __init__(self, extra_channels):
        super().__init__()
        self.extra = extra_channels

    def forward(self, x):
        x = x[:, :, ::2, ::2]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


def _projection(in_planes, out_planes, stride):
    """Option B shortcut: 1x1 convolution and batch norm."""
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False), nn.BatchNorm2d(out_planes))


def _shortcut(in_planes, out_planes, stride, kind):
    """Identity when shapes match, else option A (zero pad) or B (projection)."""
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    return PadShortcut(out_planes - in_planes) if kind == "A" else _projection(in_planes, out_planes, stride)


def _preact_shortcut(in_planes, out_planes, stride):
    """Identity, or a bare 1x1 projection applied to the pre-activated input (He et al. 2016b)."""
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (post-activation, ResNet v1)."""

    expansion = 1

    def __init__(self, in_planes, planes, stride=1, shortcut="B"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes, stride, shortcut)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class PlainBlock(BasicBlock):
    """A BasicBlock without its residual connection: the "plain" baseline of He et al. (2016), Figure 6."""

    def __init__(self, in_planes, planes, stride=1, shortcut="A"):
        super().__init__(in_planes, planes, stride, shortcut="A")  # option A: no parameters, so none to drop
        del self.shortcut

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)))  # no "+ shortcut(x)": the one line that makes a ResNet


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016b): BN-ReLU-conv twice; `shortcut` is accepted and ignored."""

    expansion = 1

    def __init__(self, in_planes, planes, stride=1, shortcut="B"):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.shortcut = _preact_shortcut(in_planes, planes, stride)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        short = self.shortcut(out) if len(self.shortcut) else x  # projections see the activated input
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + short


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck block (1x1, 3x3, 1x1), the "version 2" block of the ResNet v1/v2 reports."""

    expansion = 4

    def __init__(self, in_planes, planes, stride=1, shortcut="B"):
        super().__init__()
        out_planes = planes * self.expansion
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.shortcut = _preact_shortcut(in_planes, out_planes, stride)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        short = self.shortcut(out) if len(self.shortcut) else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        return out + short


class ResNet(nn.Module):
    """ResNet with the reference reports' state_dict names: conv1, bn1, layer1..., linear."""

    def __init__(self, block, num_blocks, widths, num_classes=10, stem="cifar", shortcut="B"):
        super().__init__()
        self.preact = block in (PreActBlock, PreActBottleneck)
        self.in_planes = widths[0]
        if stem == "imagenet":  # the 224-pixel ResNet18 report's 7x7 stride 2 convolution and max-pool
            self.conv1 = nn.Conv2d(3, widths[0], 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
            self.maxpool = nn.Identity()
        # pre-activation nets normalize after the last block instead of after the stem
        self.bn1 = nn.BatchNorm2d(widths[-1] * block.expansion if self.preact else widths[0])
        for i, (planes, n) in enumerate(zip(widths, num_blocks)):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", self._make_layer(block, planes, n, stride, shortcut))
        self.num_layers = len(widths)
        self.linear = nn.Linear(widths[-1] * block.expansion, num_classes)
        self._init_weights()

    def _make_layer(self, block, planes, num_blocks, stride, shortcut):
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(block(self.in_planes, planes, s, shortcut))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x):
        """Penultimate features: the pooled output of the last stage."""
        out = self.conv1(x)
        if not self.preact:
            out = F.relu(self.bn1(out))
        out = self.maxpool(out)
        for i in range(1, self.num_layers + 1):
            out = getattr(self, f"layer{i}")(out)
        if self.preact:
            out = F.relu(self.bn1(out))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x):
        return self.linear(self.features(x))


class SpeedRunGroup(nn.Module):
    """conv, 2x2 max-pool, BN, GELU, then conv, BN, GELU with a shortcut around it (the speed run's group)."""

    def __init__(self, in_planes, planes, residual=True):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, eps=1e-12, momentum=0.4)  # short runs: running statistics must catch up fast
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-12, momentum=0.4)
        self.residual = residual
        for conv in (self.conv1, self.conv2):  # identity on the first input channels: the group starts near a copy
            nn.init.dirac_(conv.weight.data[:conv.in_channels])

    def forward(self, x):
        x = F.gelu(self.bn1(F.max_pool2d(self.conv1(x), 2)))
        out = F.gelu(self.bn2(self.conv2(x)))
        return x + out if self.residual else out


class SpeedRunNet(nn.Module):
    """The speed run's network: a 2x2 whitening stem, three groups of widths 64/256/256, max-pool, linear / 9."""

    def __init__(self, num_classes=10, widths=(64, 256, 256), residual=True):
        super().__init__()
        self.whiten = nn.Conv2d(3, 24, 2)  # 24 = both signs of the 12 eigenvectors of 2x2x3 patches
        planes = [24, *widths]
        for i in range(3):
            setattr(self, f"layer{i + 1}", SpeedRunGroup(planes[i], planes[i + 1], residual))
        self.linear = nn.Linear(widths[-1], num_classes, bias=False)

    def features(self, x):
        """Penultimate features: the global max over the last group's 3x3 map."""
        out = F.gelu(self.whiten(x))
        out = self.layer3(self.layer2(self.layer1(out)))
        return F.adaptive_max_pool2d(out, 1).flatten(1)

    def forward(self, x):
        return self.linear(self.features(x)) / 9  # smaller logits: calmer early steps at a high learning rate


def layer_table(model, size=32):
    """(name, output shape, parameters, MACs) of each top-level layer for one size x size image."""
    from torch.utils.flop_counter import FlopCounterMode
    shapes = {}
    hooks = [m.register_forward_hook(lambda _, __, out, n=n: shapes.__setitem__(n, tuple(out.shape[1:])))
             for n, m in model.named_children()]
    counter, was_training = FlopCounterMode(display=False), model.training
    with counter, torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size))
    model.train(was_training)
    for hook in hooks:
        hook.remove()
    flops = counter.get_flop_counts()
    root = type(model).__name__
    return [(n, shapes.get(n), count_parameters(m), sum(flops.get(f"{root}.{n}", {}).values()) // 2)
            for n, m in model.named_children()]

def _cifar_depth(name, prefix, step):
    """Depth from a name like resnet56 (6n+2) or preact_resnet164 (9n+2), or None."""
    m = re.fullmatch(prefix + r"(\d+)", name)
    if m and int(m.group(1)) > 2 and (int(m.group(1)) - 2) % step == 0:
        return int(m.group(1))
    return None


def build_model(name, num_classes=10, **options):
    """A model by name (see list_models()); options: shortcut='A'|'B' for the 6n+2 family, residual for speedrun."""
    if name == "speedrun":
        residual = options.pop("residual", True)
        if options or not isinstance(residual, bool):
            raise TypeError(f"speedrun takes one option, residual=True or False; got {options or residual!r}")
        return SpeedRunNet(num_classes, residual=residual)
    shortcut = options.pop("shortcut", None)
    if options:
        raise TypeError(f"unknown options {sorted(options)} for {name}; the only option is shortcut='A' or 'B'")
    if shortcut not in (None, "A", "B"):
        raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
    if name == "resnet18":
        return ResNet(BasicBlock, [2, 2, 2, 2], [64, 128, 256, 512], num_classes, shortcut=shortcut or "B")
    if name == "resnet18_imagenet":
        return ResNet(BasicBlock, [2, 2, 2, 2], [64, 128, 256, 512], num_classes, stem="imagenet", shortcut=shortcut or "B")
    if name == "preact_resnet18":
        return ResNet(PreActBlock, [2, 2, 2, 2], [64, 128, 256, 512], num_classes)
    if depth := _cifar_depth(name, "preact_resnet", 9):
        n = (depth - 2) // 9
        return ResNet(PreActBottleneck, [n] * 3, [16, 32, 64], num_classes)
    if depth := _cifar_depth(name, "resnet", 6):
        n = (depth - 2) // 6
        return ResNet(BasicBlock, [n] * 3, [16, 32, 64], num_classes, shortcut=shortcut or "A")
    if depth := _cifar_depth(name, "plain", 6):
        if shortcut is not None:
            raise ValueError(f"{name} has no shortcuts, so it takes no shortcut option")
        return ResNet(PlainBlock, [(depth - 2) // 6] * 3, [16, 32, 64], num_classes)
    raise ValueError(f"unknown model {name!r}; valid names: {', '.join(list_models())} "
                     "(any resnet<6n+2>, plain<6n+2> or preact_resnet<9n+2> depth works too)")


def list_models():
    """The model names build_model knows by default."""
    return ["resnet18", "resnet18_imagenet", "preact_resnet18", "resnet20", "resnet32",
            "resnet44", "resnet56", "resnet110", "preact_resnet164", "plain20", "plain56", "speedrun"]


def input_size(name):
    """Input side length a model expects: 224 for resnet18_imagenet, else 32."""
    return 224 if name == "resnet18_imagenet" else 32


def count_parameters(model):
    """Number of parameters of a model."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model, size=32):
    """Multiply-accumulates of one forward pass on one size x size image (flop counter / 2)."""
    from torch.utils.flop_counter import FlopCounterMode
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    weight = next(model.parameters())
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, size, size, device=weight.device, dtype=weight.dtype))
    model.train(was_training)
    return counter.get_total_flops() // 2

# --------------------------------------------------------------------------- training


QUICK = os.environ.get("CIFAR_QUICK") == "1"  # the test suite's quick mode: tiny data and stages, same code paths


def quick_mode(stages, limit_train=None, limit_val=None, run_dir=None):
    """(stages, limit_train, limit_val, run_dir) as given, or, under CIFAR_QUICK=1, one epoch a stage on 1,024
    training and 500 validation images in a new temporary run folder."""
    if not QUICK:
        return stages, limit_train, limit_val, run_dir
    import tempfile
    quick_stages = [(lr, i + 1) for i, (lr, _) in enumerate(stages)]
    return quick_stages, 1024, 500, tempfile.mkdtemp(prefix="quick_run_")


def quick_images(n):
    """`n`, or at most 1,000 under CIFAR_QUICK=1: how many images an optional measurement in a notebook uses."""
    return min(n, 1000) if QUICK else n


def runtime_requirements(path=None):
    """The lines of requirements.txt above its tests-and-CI section: what the notebooks need."""
    text = Path(path or PROJECT_DIR / "requirements.txt").read_text().split("# tests and CI only")[0]
    return [line for line in (ln.split("#")[0].strip() for ln in text.splitlines()) if line]


def install_missing_requirements(path=None):
    """pip-install only the requirements (above the tests' section) that are absent or outside their range."""
    import importlib.metadata
    import subprocess
    import sys
    from packaging.requirements import Requirement
    missing = []
    for line in runtime_requirements(path):
        req = Requirement(line)
        try:
            ok = req.specifier.contains(importlib.metadata.version(req.name), prereleases=True)
        except importlib.metadata.PackageNotFoundError:
            ok = False
        missing += [line] * (not ok)
    if missing:
        print("installing what this runtime lacks:", ", ".join(missing))
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *missing], check=True)
    return missing


def runtime_summary():
    """One line: torch version, device (GPU name, or CPU model and its bf16 support) and the precision 'auto' picks."""
    device = get_device()
    if device.type == "cuda":
        where = f"GPU {torch.cuda.get_device_name(device)}"
    else:
        bf16 = "computes bf16 natively" if cpu_has_native_bf16() else "no native bf16"
        name = cpu_fields().get("model name", platform.processor() or "unknown")
        where = f"CPU {name}, {torch.get_num_threads()} threads, {bf16}"
    return f"torch {torch.__version__} | {where} | precision {resolve_precision(device)}"


def get_device(device=None):
    """The given device, else CUDA when available, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def cpu_info():
    """Text of /proc/cpuinfo, or '' where there is none (macOS, Windows)."""
    with contextlib.suppress(OSError):
        return Path("/proc/cpuinfo").read_text()
    return ""


def cpu_fields():
    """The first CPU's /proc/cpuinfo fields as a dict ('model name', 'cpu family', 'flags', ...)."""
    fields = {}
    for key, _, value in (ln.partition(":") for ln in cpu_info().splitlines()):
        if value:
            fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_has_native_bf16():
    """True when this CPU has bf16 instructions (AMX or AVX512-BF16)."""
    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except AttributeError:  # older torch: read the flags
        flags = cpu_info()
        return "amx_bf16" in flags or "avx512_bf16" in flags


BF16_MIN_SPEEDUP = 1.3  # 'auto' picks bf16 on a CPU only where its matmuls beat fp32 by this much


@functools.lru_cache(maxsize=None)
def cpu_bf16_speedup(n=512, reps=8):
    """bf16 over fp32 matmul throughput on this CPU, measured once per process (about 0.1 s).

    The two precisions alternate and each keeps its fastest time, so another process sharing the cores
    (which only ever slows a run down) cannot make the slower precision look faster.
    """
    mats = {dtype: (torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype))
            for dtype in (torch.float32, torch.bfloat16)}
    best = dict.fromkeys(mats, math.inf)
    for a, b in mats.values():  # warm-up: oneDNN picks its kernel on first use
        a @ b
    for _ in range(reps):
        for dtype, (a, b) in mats.items():
            start = time.perf_counter()
            a @ b
            best[dtype] = min(best[dtype], time.perf_counter() - start)
    return best[torch.float32] / best[torch.bfloat16]


def resolve_precision(device, precision="auto"):
    """'fp32', 'bf16' or 'fp16' for 'auto' or a forced choice on this device."""
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be 'auto', 'fp32', 'bf16' or 'fp16', got {precision!r}")
    if precision != "auto":
        return precision
    if torch.device(device).type == "cuda":
        # is_bf16_supported() is True on a T4 too (emulated since torch 2.3); bf16 tensor cores need capability 8.0
        return "bf16" if cuda_capability(device) >= (8, 0) else "fp16"
    # bf16 instructions alone don't make it faster: on one AVX512-BF16 Xeon without AMX, bf16 ran slower than fp32.
    return "bf16" if cpu_has_native_bf16() and cpu_bf16_speedup() >= BF16_MIN_SPEEDUP else "fp32"


def cuda_capability(device):
    """(major, minor) compute capability of the given CUDA device (its index, or the current one without)."""
    return tuple(torch.cuda.get_device_capability(torch.device(device)))


def hardware_label(device, precision):
    """Where and how an epoch ran, for the history: 'AMD EPYC family 25 (AVX2), 2 threads, fp32' or 'Tesla T4, bf16'."""
    device = torch.device(device)
    if device.type == "cuda":
        tf32 = precision == "fp32" and cuda_capability(device) >= (8, 0) and torch.backends.cudnn.allow_tf32
        return f"{torch.cuda.get_device_name(device)}, {precision}{' (TF32 convolutions)' * tf32}"
    field = cpu_fields()
    name = field.get("model name", platform.processor() or "cpu")
    if "cpu family" in field:  # cloud CPUs often share one model name ("AMD EPYC") across generations
        name += f" family {field['cpu family']}"
    flags = set(field.get("flags", "").split())
    isa = next((label for flag, label in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16"), ("avx512f", "AVX512"),
                                          ("avx2", "AVX2")) if flag in flags), None)
    threads = torch.get_num_threads()
    return f"{name}{f' ({isa})' if isa else ''}, {threads} thread{'s' * (threads != 1)}, {precision}"


def autocast(device, precision):
    """Autocast context for a resolved precision (no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(torch.device(device).type, dtype=dtype)


def seed_everything(seed=0, deterministic=False):
    """Seed Python, NumPy and torch; optionally ask for deterministic kernels."""
    import random
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss."""


def _progress_bar(total, desc, enabled):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, leave=False, disable=not enabled, mininterval=1.0)


def train_epoch(model, loader, optimizer, criterion, device, precision="fp32", scaler=None, desc="train", progress=True):
    """One pass over `loader`; returns dict(loss, acc, seconds, images_per_s)."""
    model.train()
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen, start = 0, time.perf_counter()
    steps = len(loader)
    with _progress_bar(steps, desc, progress) as bar:
        for step, (x, y) in enumerate(loader, 1):
            with autocast(device, precision):
                logits = model(x)
                loss = criterion(logits, y)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            total_loss += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
            if step % 20 == 0 or step == steps:  # sync rarely: each .item() stalls a GPU
                mean_loss = total_loss.item() / seen
                if not math.isfinite(mean_loss):
                    raise NonFiniteLossError(f"loss became {mean_loss} at step {step} of {desc}; "
                                             "lower the learning rate or use precision='fp32'")
                bar.set_postfix(loss=f"{mean_loss:.3f}", acc=f"{correct.item() / seen:.3f}",
                                img_s=f"{seen / (time.perf_counter() - start):.0f}")
            bar.update()
    seconds = time.perf_counter() - start
    return dict(loss=total_loss.item() / seen, acc=correct.item() / seen, seconds=seconds, images_per_s=seen / seconds,
                images=seen)


TTA_VIEWS = ("none", "flip", "flip_translate")  # test-time views; True means "flip", False "none"


def _tta_views(tta):
    """One of TTA_VIEWS from a name or a bool, or a one-line error naming the choices."""
    if isinstance(tta, bool):
        return "flip" if tta else "none"
    if tta not in TTA_VIEWS:
        raise ValueError(f"tta must be one of {TTA_VIEWS} (or True / False), got {tta!r}")
    return tta


@torch.no_grad()
def evaluate(model, loader, device, precision="fp32"):
    """Mean cross-entropy loss and accuracy of `model` on `loader`."""
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    for x, y in loader:
        with autocast(device, precision):
            logits = model(x)
        total_loss += F.cross_entropy(logits.float(), y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
    return dict(loss=total_loss / seen, acc=correct / seen)


@dataclass
class TrainConfig:
    """Everything a run needs besides the data; stored in every checkpoint."""

    arch: str = "resnet20"
    arch_options: dict = field(default_factory=dict)
    stages: list = field(default_factory=lambda: [(0.1, 82), (0.01, 123), (0.001, 164)])  # (lr, end epoch)
    batch_size: int = 128
    optimizer: str = "sgd"  # or "adam" (the ResNet v1/v2 reports)
    momentum: float = 0.9
    weight_decay: float = 5e-4  # the ResNet18 course report's; the paper and the ResNet20 report use 1e-4
    nesterov: bool = False
    schedule: str = "staged"  # or "cosine" (the ResNet20 report): cosine from stages[0] lr to 0 at the last end
    label_smoothing: float = 0.0
    precision: str = "auto"
    seed: int = 0
    val_size: int = 5000
    std: str = "common"  # "common" (0.2023, ...) or "true" (0.2470, ...); "seed" is an older name for "common"
    save_every: int = 5
    keep_last: int = 3
    patience: int | None = None  # stop a stage when val acc has not improved by min_delta in this many epochs
    min_delta: float = 0.0
    compile: bool = False

    def __post_init__(self):
        self.stages = [(float(lr), int(end)) for lr, end in self.stages]
        ends = [end for _, end in self.stages]
        if not self.stages or ends != sorted(set(ends)) or ends[0] < 1:
            raise ValueError(f"stages must be (lr, end_epoch) pairs with increasing end epochs, got {self.stages}")
        if not all(math.isfinite(lr) and lr > 0 for lr, _ in self.stages):
            raise ValueError(f"every stage's lr must be a positive number, got {[lr for lr, _ in self.stages]}")
        for name in ("batch_size", "save_every", "keep_last", "val_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0 and 0 <= self.label_smoothing < 1):
            raise ValueError("weight_decay must be >= 0 and label_smoothing in [0, 1), "
                             f"got {self.weight_decay} and {self.label_smoothing}")
        if self.optimizer not in ("sgd", "adam") or self.schedule not in ("staged", "cosine"):
            raise ValueError("optimizer must be 'sgd' or 'adam' and schedule 'staged' or 'cosine'")
        self.std = {"seed": "common"}.get(self.std, self.std)
        if self.std not in ("common", "true"):
            raise ValueError(f"std must be 'common' or 'true', got {self.std!r}")

    def preprocess(self):
        """The Preprocess this run trains with."""
        return Preprocess(std=COMMON_STD if self.std == "common" else TRUE_STD, size=input_size(self.arch))


def parse_stages(specs):
    """['0.1:82', '0.01:123'] -> [(0.1, 82), (0.01, 123)]."""
    try:
        return [(float(lr), int(end)) for lr, end in (s.split(":") for s in specs)]
    except ValueError:
        raise ValueError(f"stages are written LR:END_EPOCH, for example 0.1:82; got {specs}") from None


def scale_stages(stages, epochs):
    """The same stages with their end epochs scaled so that the last ends at `epochs` (rounded, kept increasing)."""
    stages = [(float(lr), int(end)) for lr, end in stages]
    if epochs < len(stages):
        raise ValueError(f"{epochs} epochs cannot hold {len(stages)} stages; give at least {len(stages)}")
    last, scaled, prev = stages[-1][1], [], 0
    for i, (lr, end) in enumerate(stages):
        room = epochs - (len(stages) - 1 - i)  # leave at least one epoch for every later stage
        prev = min(max(prev + 1, math.floor(end * epochs / last + 0.5)), room)
        scaled.append((lr, prev))
    return scaled


RECIPE_FIELDS = ("arch", "arch_options", "stages", "batch_size", "optimizer", "momentum", "weight_decay", "nesterov",
                 "schedule", "label_smoothing", "seed", "val_size", "std", "patience", "min_delta")


def canonical_arch_options(arch, options):
    """Options with the default shortcut filled in, so that {} and {'shortcut': 'A'} name the same resnet20."""
    options = dict(options or {})
    if _cifar_depth(arch, "resnet", 6):
        options.setdefault("shortcut", "A")
    elif arch in ("resnet18", "resnet18_imagenet"):
        options.setdefault("shortcut", "B")
    elif arch == "speedrun":
        options.setdefault("residual", True)
    return options


def recipe_differences(recorded, cfg):
    """['label_smoothing: recorded 0.1, given 0.0', ...]: where a config departs from a checkpoint's recorded one."""
    ours = asdict(cfg)
    diffs = []
    for name in RECIPE_FIELDS:
        if name not in recorded:
            continue
        a, b = recorded[name], ours[name]
        if name == "stages":
            a, b = [tuple(x) for x in a], [tuple(x) for x in b]
        if name == "std":  # files written before the rename recorded "seed"
            a, b = ({"seed": "common"}.get(x, x) for x in (a, b))
        if name == "arch_options":
            a, b = canonical_arch_options(ours["arch"], a), canonical_arch_options(ours["arch"], b)
        if a != b:
            diffs.append(f"{name}: recorded {a}, given {b}")
    return diffs


def stage_lr(cfg, stage, epoch):
    """Learning rate of an epoch: the stage's lr, or the cosine curve over all epochs."""
    if cfg.schedule == "cosine":
        return 0.5 * cfg.stages[0][0] * (1 + math.cos(math.pi * epoch / cfg.stages[-1][1]))
    return cfg.stages[stage][0]


def make_optimizer(model, cfg):
    """SGD with momentum and weight decay, or Adam, as the config says."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.stages[0][0], weight_decay=cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=cfg.stages[0][0], momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)

# --------------------------------------------------------------------------- checkpoints


DIGEST_KEY = "sha256"  # a checkpoint's digest of everything else in it, checked on every load


class DamagedCheckpointError(ValueError):
    """A checkpoint file that cannot be read, or whose contents no longer match its digest."""


def _feed_digest(h, obj):
    """Feed a payload of dicts, lists, tensors and plain values into a hash, in a fixed order."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(memoryview(t.view(-1).view(torch.uint8).numpy()) if t.numel() else b"")
    elif isinstance(obj, dict):
        h.update(b"{")
        for k in sorted(obj, key=repr):
            h.update(repr(k).encode())
            _feed_digest(h, obj[k])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for v in obj:
            _feed_digest(h, v)
        h.update(b"]")
    else:
        h.update(repr(obj).encode())


def payload_digest(payload):
    """SHA-256 (hex) of a checkpoint's tensors and values, its own digest entry left out."""
    h = hashlib.sha256()
    _feed_digest(h, {k: v for k, v in payload.items() if k != DIGEST_KEY})
    return h.hexdigest()


def save_checkpoint(payload, path):
    """torch.save with a digest, to a temporary file, then os.replace: an interrupted save never destroys `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save({**payload, DIGEST_KEY: payload_digest(payload)}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_checkpoint(path):
    """Load a checkpoint on the CPU without running pickled code (weights_only=True), its digest checked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = next((ln.strip() for ln in str(e).splitlines() if "Unsupported" in ln), str(e).splitlines()[0])
        raise ValueError(f"{path} holds pickled Python objects, not only tensors and plain data; it is refused "
                         "because loading it could run arbitrary code. Re-save its state_dict with torch.save. "
                         f"({detail})") from None
    except Exception as e:  # truncated, overwritten or not a torch file at all
        raise DamagedCheckpointError(f"{path} is damaged or not a PyTorch checkpoint: it cannot be read "
                                     f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if isinstance(ckpt, dict) and DIGEST_KEY in ckpt and ckpt[DIGEST_KEY] != payload_digest(ckpt):
        raise DamagedCheckpointError(f"{path} is damaged: its contents no longer match the SHA-256 digest written "
                                     "when it was saved. Use another copy (or the previous checkpoint of the run).")
    return ckpt


def check_weights(state_dict, source):
    """Refuse weights that cannot be a trained network's: non-finite values, negative batch-norm variances."""
    for k, v in state_dict.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise DamagedCheckpointError(f"{source}: {k} holds NaN or infinite values; these weights cannot predict")
        if k.endswith("running_var") and (v < 0).any():
            raise DamagedCheckpointError(f"{source}: {k} holds negative variances; the file is damaged")
    return state_dict


def checkpoint_epochs(run_dir):
    """Epochs of the ckpt_<epoch>.pth files in a run folder, ascending."""
    return sorted(int(m.group(1)) for p in Path(run_dir).glob("ckpt_*.pth")
                  if (m := re.fullmatch(r"ckpt_(\d+)\.pth", p.name)))


def latest_checkpoint(run_dir):
    """Path of the newest ckpt_<epoch>.pth in a run folder, or None."""
    epochs = checkpoint_epochs(run_dir)
    return Path(run_dir) / f"ckpt_{epochs[-1]}.pth" if epochs else None


def strip_module_prefix(state_dict):
    """Remove the DataParallel / DDP / torch.compile prefixes from state_dict keys."""
    return {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in state_dict.items()}


def _versions():
    import torchvision
    return {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__)}  # plain str: weights_only


class RunFolderError(RuntimeError):
    """A run folder this process may not train in: in use by another process, or holding another run."""


class RecipeMismatchError(ValueError):
    """Resuming a run with settings that differ from the ones its checkpoint recorded."""


_HELD_LOCKS = {}  # run folder -> file descriptor of its lock, held until this process ends


def lock_run_dir(run_dir):
    """Hold the run folder's OS file lock for the rest of this process; another process is refused at once.

    The kernel releases the lock when the holder dies, so a killed run never leaves a stale lock behind.
    """
    run_dir = Path(run_dir).resolve()
    if run_dir in _HELD_LOCKS:
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        import fcntl
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # Windows has no flock: the folder is then unguarded
        pass
    except BlockingIOError:
        os.close(fd)
        holder = (run_dir / ".lock").read_text().strip() or "unknown"
        raise RunFolderError(f"{run_dir} is in use by another training process (pid {holder}); "
                             "wait for it to end, or choose another --out") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _HELD_LOCKS[run_dir] = fd
    return run_dir


def check_fresh_run_dir(run_dir):
    """Refuse to start a new run in a folder that already holds another run's checkpoints."""
    run_dir = Path(run_dir)
    found = [p.name for p in sorted(run_dir.glob("ckpt_*.pth"))] + [p.name for p in run_dir.glob("best.pth")]
    if found:
        raise RunFolderError(f"{run_dir} already holds a run ({', '.join(found[-3:])}); continue it with --resume "
                             "(resume() in Python), or choose a new --out folder for a new run")


def readable_checkpoints(source):
    """Yield (path, checkpoint) newest first from a run folder, or the one file; a damaged one is reported and skipped.

    A file given by name is taken as is: a damaged one raises. In a folder, the newest readable checkpoint wins.
    """
    source = Path(source)
    if not source.is_dir():
        yield source, load_checkpoint(source)
        return
    skipped = []
    for epoch in reversed(checkpoint_epochs(source)):
        path = source / f"ckpt_{epoch}.pth"
        try:
            ckpt = load_checkpoint(path)
        except DamagedCheckpointError as e:
            print(f"warning: {e}", flush=True)
            skipped.append(path.name)
            continue
        if skipped:
            print(f"warning: resuming from {path.name} instead of the damaged {', '.join(skipped)}", flush=True)
        yield path, ckpt
        return
    raise FileNotFoundError(f"no readable ckpt_<epoch>.pth to resume from in {source}"
                            + (f" (damaged: {', '.join(skipped)})" if skipped else ""))


def _to_cpu(obj):
    """A copy of nested dicts, lists and tuples with every tensor moved to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


class Trainer:
    """Staged training with checkpoints every few epochs, exact resume and best-on-validation selection."""

    def __init__(self, cfg, data, run_dir=None, device=None, rank=0, world_size=1, progress=True, tensorboard_dir=None):
        self.cfg, self.device, self.rank, self.world_size = cfg, get_device(device), rank, world_size
        self.run_dir = Path(run_dir) if run_dir else None
        self.precision = resolve_precision(self.device, cfg.precision)
        if self.device.type == "cuda" and not torch.are_deterministic_algorithms_enabled():
            torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels
        self.progress = progress and rank == 0
        if cfg.batch_size % world_size:
            raise ValueError(f"batch size {cfg.batch_size} does not split evenly over {world_size} processes")
        self.batch_per_rank = cfg.batch_size // world_size  # the recipe's batch is the global one, as is its lr
        x_tr, y_tr, x_val, y_val = data
        pre = cfg.preprocess()
        self.train_loader = BatchLoader(x_tr, y_tr, self.batch_per_rank, pre, augment=True, shuffle=True,
                                        drop_last=False, seed=cfg.seed, device=self.device, rank=rank,
                                        world_size=world_size)
        self.val_loader = BatchLoader(x_val, y_val, 500, pre, device=self.device)
        torch.manual_seed(cfg.seed)  # the same initial weights for the same seed
        self.net = build_model(cfg.arch, len(CLASSES), **cfg.arch_options).to(self.device, memory_format=torch.channels_last)
        self.model = self._wrap(self.net)
        self.optimizer = make_optimizer(self.net, cfg)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.epoch, self.stage, self.best_val_acc = 0, 0, -1.0
        self.stage_best, self.stage_bad_epochs = -1.0, 0
        self.saved = []  # epochs of the ckpt files this run wrote: the only ones pruning may delete
        self._run_dir_checked = False  # a new run's folder is checked before its first epoch
        if self.run_dir is not None and rank == 0:
            lock_run_dir(self.run_dir)
            for tmp in self.run_dir.glob(".*.tmp"):  # left by killed saves; with the lock, no one else is writing
                tmp.unlink(missing_ok=True)
        self.hardware = hardware_label(self.device, self.precision)
        self.history = {k: [] for k in ("epoch", "stage", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "seconds",
                                        "hardware")}
        self.history["stage_ends"] = []
        self.writer = None
        if tensorboard_dir and rank == 0:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(tensorboard_dir)

    def _wrap(self, net):
        model = net
        if self.cfg.compile:
            model = torch.compile(model)
        if self.world_size > 1:
            model = nn.parallel.DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return model

    # -- state ------------------------------------------------------------
    def state(self, with_optimizer=True):
        """Everything needed to resume exactly and to predict, as plain data and CPU tensors."""
        state = {
            "arch": self.cfg.arch, "arch_options": dict(self.cfg.arch_options),
            "preprocess": asdict(self.cfg.preprocess()), "input_size": input_size(self.cfg.arch),
            "classes": list(CLASSES), "config": asdict(self.cfg),
            "model": {k: v.detach().cpu() for k, v in strip_module_prefix(self.net.state_dict()).items()},
            "epoch": self.epoch, "stage": self.stage, "best_val_acc": self.best_val_acc,
            "stage_best": self.stage_best, "stage_bad_epochs": self.stage_bad_epochs,
            "history": self.history, "precision": self.precision, "device": str(self.device), "versions": _versions(),
            "saved": list(self.saved), "world_size": self.world_size, "batch_per_rank": self.batch_per_rank,
        }
        if with_optimizer:  # nothing draws from a CUDA generator (augmentation uses a seeded CPU one): not saved
            state["optimizer"] = _to_cpu(self.optimizer.state_dict())
            state["scaler"] = self.scaler.state_dict() if self.scaler else None
            state["rng"] = {"torch": torch.get_rng_state()}
        return state

    def load_state(self, path, stage=None, override=False, ckpt=None):
        """Resume from a checkpoint file; `stage` starts that stage (0-based) from the checkpoint's epoch.

        The checkpoint's recorded recipe must match this config; `override=True` accepts the differences and
        writes them into the history. An earlier stage than the checkpoint's continues it: a stage-one checkpoint
        of a run whose stage one proved too short goes on at lr 0.1 under longer stages (with `override`), exactly
        as a run planned that way from the start.
        """
        ckpt = load_checkpoint(path) if ckpt is None else ckpt
        if ckpt.get("arch") != self.cfg.arch or (canonical_arch_options(self.cfg.arch, ckpt.get("arch_options"))
                                                 != canonical_arch_options(self.cfg.arch, self.cfg.arch_options)):
            raise RecipeMismatchError(f"{path} holds {ckpt.get('arch')} {ckpt.get('arch_options')}, "
                                      f"but this run trains {self.cfg.arch} {self.cfg.arch_options}")
        diffs = recipe_differences(ckpt.get("config", {}), self.cfg)
        if diffs and not override:
            raise RecipeMismatchError(f"{path} was trained with other settings: {'; '.join(diffs)}. Leave those "
                                      "settings out to continue the recorded recipe, or override them on purpose "
                                      "(--override, or override=True)")
        self.net.load_state_dict(check_weights(ckpt["model"], path))
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        self.epoch, self.stage, self.best_val_acc = ckpt["epoch"], ckpt["stage"], ckpt["best_val_acc"]
        self.stage_best, self.stage_bad_epochs = ckpt["stage_best"], ckpt["stage_bad_epochs"]
        self.saved = list(ckpt.get("saved", []))
        self.history = {k: list(v) for k, v in ckpt["history"].items()}  # saved at its epoch: nothing later
        if "hardware" not in self.history:  # written before epochs recorded it; a run may have changed machines
            self.history["hardware"] = ["not recorded"] * len(self.history["epoch"])
        if diffs:
            self.history.setdefault("overrides", []).append(f"from epoch {self.epoch}: {'; '.join(diffs)}")
        if stage is not None and stage != self.stage:
            self.stage, self.stage_best, self.stage_bad_epochs = stage, -1.0, 0
            ended = [e for e in self.history["stage_ends"] if e < self.epoch][:max(stage - 1, 0)]
            self.history["stage_ends"] = ended + [self.epoch] * (stage > 0)
        self._run_dir_checked = True
        self._restore_best()
        return self

    def _restore_best(self):
        """Rewrite best.pth when a save was killed between the checkpoint and best.pth of the best epoch."""
        val = self.history["val_acc"]
        if self.run_dir is None or self.rank != 0 or not val or val.index(max(val)) + 1 != self.epoch:
            return
        best = self.run_dir / "best.pth"
        with contextlib.suppress(FileNotFoundError, DamagedCheckpointError):
            if load_checkpoint(best)["epoch"] == self.epoch:
                return
        save_checkpoint(self.state(with_optimizer=False), best)

    def resume(self, source=None, stage=None, override=False):
        """Resume from a file, or from the newest readable checkpoint of a folder (default: the run folder)."""
        source = Path(source) if source else self.run_dir
        if source is None:
            raise FileNotFoundError("nothing to resume from: give a checkpoint file or a run folder")
        for path, ckpt in readable_checkpoints(source):
            return self.load_state(path, stage, override, ckpt)

    # -- saving -----------------------------------------------------------
    def _save(self, stage_end=False, best=False):
        if self.rank != 0 or self.run_dir is None:
            return
        if stage_end or self.epoch % self.cfg.save_every == 0:  # first: a kill before best.pth is healed on resume
            saved = [e for e in self.saved if e != self.epoch] + [self.epoch]
            keep = set(saved[-self.cfg.keep_last:]) | set(self.history["stage_ends"])
            self.saved = [e for e in saved if e in keep]  # the checkpoint records only the files that stay
            save_checkpoint(self.state(), self.run_dir / f"ckpt_{self.epoch}.pth")
            for e in sorted(set(saved) - keep):  # only files this run wrote: never another run's
                (self.run_dir / f"ckpt_{e}.pth").unlink(missing_ok=True)
        if best:  # a model to select, not to resume: no optimizer state, so it is small enough to keep with the run
            save_checkpoint(self.state(with_optimizer=False), self.run_dir / "best.pth")

    def _claim_run_dir(self):
        """Before the first epoch of a new run: its folder must not hold another run."""
        if self.run_dir is not None and self.rank == 0 and not self._run_dir_checked and self.epoch == 0:
            check_fresh_run_dir(self.run_dir)
        self._run_dir_checked = True

    # -- the loop ---------------------------------------------------------
    def _log(self, row):
        for k, v in row.items():
            self.history[k].append(v)
        if self.rank == 0:
            print(f"epoch {row['epoch'] + 1:3d} stage {row['stage'] + 1} lr {row['lr']:.4g} | "
                  f"train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f} | "
                  f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f} | {row['seconds']:.0f} s", flush=True)
        if self.writer:
            for k in ("lr", "train_loss", "train_acc", "val_loss", "val_acc"):
                self.writer.add_scalar(k, row[k], row["epoch"] + 1)

    def _plateaued(self, val_acc):
        """Track the stage's best validation accuracy; True when patience has run out."""
        if val_acc >= self.stage_best + self.cfg.min_delta:
            self.stage_best, self.stage_bad_epochs = max(val_acc, self.stage_best), 0
        else:
            self.stage_bad_epochs += 1
        return self.cfg.patience is not None and self.stage_bad_epochs >= self.cfg.patience

    def run_epoch(self):
        """Train one epoch at the current stage's lr, validate, log and checkpoint; True if the stage ended."""
        self._claim_run_dir()
        lr = stage_lr(self.cfg, self.stage, self.epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.train_loader.set_epoch(self.epoch)
        desc = f"epoch {self.epoch + 1}/{self.cfg.stages[-1][1]}"
        tr = train_epoch(self.model, self.train_loader, self.optimizer, self.criterion, self.device,
                         self.precision, self.scaler, desc, self.progress)
        val = evaluate(self.net, self.val_loader, self.device, self.precision) if self.rank == 0 else None
        if self.world_size > 1:
            tr, val = self._agree(tr, val)
        row = dict(epoch=self.epoch, stage=self.stage, lr=lr, train_loss=tr["loss"], train_acc=tr["acc"],
                   val_loss=val["loss"], val_acc=val["acc"], seconds=tr["seconds"], hardware=self.hardware)
        self.epoch += 1
        self._log(row)
        stage_end = self._plateaued(val["acc"]) or self.epoch >= self.cfg.stages[self.stage][1]
        if stage_end:  # the checkpoint then says which stage comes next
            self.history["stage_ends"].append(self.epoch)
            self._next_stage()
        best = val["acc"] > self.best_val_acc
        self.best_val_acc = max(self.best_val_acc, val["acc"])
        self._save(stage_end=stage_end, best=best)
        return stage_end

    def _agree(self, tr, val):
        """Across processes: train metrics over all shards, and rank 0's validation (its batch-norm statistics are
        the ones saved), so that every rank takes the same plateau and stage decisions."""
        import torch.distributed as dist
        sums = torch.tensor([tr["loss"] * tr["images"], tr["acc"] * tr["images"], tr["images"]],
                            dtype=torch.float64, device=self.device)
        dist.all_reduce(sums)
        tr = dict(tr, loss=(sums[0] / sums[2]).item(), acc=(sums[1] / sums[2]).item(), images=int(sums[2].item()))
        scores = torch.tensor([val["loss"], val["acc"]] if self.rank == 0 else [0.0, 0.0], dtype=torch.float64,
                              device=self.device)
        dist.broadcast(scores, src=0)
        return tr, dict(loss=scores[0].item(), acc=scores[1].item())

    def _next_stage(self):
        self.stage, self.stage_best, self.stage_bad_epochs = self.stage + 1, -1.0, 0

    def fit(self, until_stage=None, stop_epoch=None):
        """Train the rest of the current stage and the following ones (up to `until_stage`, 0-based, inclusive).

        `stop_epoch` pauses the run at that epoch (a Colab session's time limit); resume() continues it.
        """
        last = len(self.cfg.stages) - 1 if until_stage is None else until_stage
        end = min(self.cfg.stages[min(last, len(self.cfg.stages) - 1)][1], stop_epoch or math.inf)
        first, schedule_end = self.epoch, min(self.cfg.stages[-1][1], stop_epoch or math.inf)
        with _progress_bar(max(end - first, 0), "run (epochs)", self.progress) as bar:
            while self.stage <= last and (stop_epoch is None or self.epoch < stop_epoch):
                if self.epoch >= self.cfg.stages[self.stage][1]:  # resumed at or past this stage's end
                    self._next_stage()
                    continue
                self.run_epoch()
                bar.update()
                if self.epoch == first + 1 and self.rank == 0 and schedule_end > self.epoch:
                    print(self.estimate(schedule_end), flush=True)
        return self.history

    def estimate(self, end):
        """'about 12 min for the remaining 24 epochs (to epoch 30), at 30 s an epoch': from the last epoch's time."""
        seconds = self.history["seconds"][-1] * 1.08  # validation and saving add a little to the training time
        left = end - self.epoch
        total = seconds * left
        told = f"{total / 3600:.1f} h" if total >= 5400 else f"{max(round(total / 60), 1)} min"
        epochs = f"{left} epoch{'s' * (left != 1)}"
        return f"estimate: about {told} for the remaining {epochs} (to epoch {end}), at {seconds:.0f} s an epoch"


def start_or_resume(cfg, data, run_dir, **options):
    """A Trainer for this run, resumed from the newest checkpoint of `run_dir` if it has one."""
    trainer = Trainer(cfg, data, run_dir, **options)
    if latest_checkpoint(run_dir):
        trainer.resume()
        print(f"resumed from {latest_checkpoint(run_dir)}: epoch {trainer.epoch}, stage {trainer.stage + 1}")
    return trainer


# --------------------------------------------------------------------------- speed run


@dataclass
class SpeedRunConfig:
    """The speed run's recipe (after Keller Jordan's airbench94); each trick is a switch the ablation turns off."""

    epochs: float = 10.0
    batch_size: int = 512  # 1,024 runs slower on a 2-core CPU (the activations leave the cache)
    lr: float = 11.5  # airbench's units: per 1,024 images of summed loss, with momentum's gain divided out
    momentum: float = 0.85
    weight_decay: float = 0.0153  # per 1,024 images, independent of the learning rate
    nesterov: bool = True
    warmup: float = 0.2  # fraction of the steps in which the lr rises from 0.2x to its peak; then linear to 0
    label_smoothing: float = 0.2
    whitening: bool = True  # first layer's filters from the training patches' covariance, frozen
    whiten_bias_epochs: float = 3.0  # the whitening layer's bias trains this long, then freezes
    frozen_bn_weights: bool = True  # batch-norm scales stay 1; only their biases learn, at bias_lr_scale x the lr
    bias_lr_scale: float = 64.0
    lookahead: bool = True  # every 5 steps, pull the weights toward their running average (stronger late)
    alternating_flip: bool = True  # each image mirrored in every other epoch instead of at random
    translate: int = 2  # random shifts of up to this many pixels with reflected borders (0: none)
    tta: str = "flip_translate"  # the views the test accuracy averages: "none", "flip" or "flip_translate"
    residual: bool = True  # shortcut around each group's second convolution
    precision: str = "auto"
    seed: int = 0

    def __post_init__(self):
        if self.tta not in TTA_VIEWS:
            raise ValueError(f"tta must be one of {TTA_VIEWS}, got {self.tta!r}")
        if not (self.epochs > 0 and self.batch_size >= 1 and 0 <= self.warmup < 1 and self.translate >= 0):
            raise ValueError("epochs must be > 0, batch_size >= 1, warmup in [0, 1) and translate >= 0; got "
                             f"{self.epochs}, {self.batch_size}, {self.warmup}, {self.translate}")


SPEEDRUN_TRICKS = ("whitening", "lookahead", "alternating_flip", "label_smoothing", "translate", "tta",
                   "frozen_bn_weights", "residual", "warmup", "nesterov")


def without_trick(cfg, trick):
    """The same recipe with one trick switched off (label smoothing 0, no shifts, no TTA views, ...)."""
    off = {"label_smoothing": 0.0, "translate": 0, "tta": "none", "warmup": 0.0}.get(trick, False)
    if trick not in SPEEDRUN_TRICKS:
        raise ValueError(f"unknown trick {trick!r}; the tricks are {', '.join(SPEEDRUN_TRICKS)}")
    return SpeedRunConfig(**{**asdict(cfg), trick: off})


def whitening_filters(images, eps=5e-4):
    """24 2x2 filters that whiten normalized images' patches: eigenvectors / sqrt(eigenvalue + eps), both signs."""
    patches = images.float().unfold(2, 2, 1).unfold(3, 2, 1).transpose(1, 3).reshape(-1, 12).double()
    eigenvalues, eigenvectors = torch.linalg.eigh(patches.T @ patches / len(patches))
    filters = (eigenvectors.T / (eigenvalues[:, None] + eps).sqrt()).flip(0).reshape(12, 3, 2, 2)
    return torch.cat([filters, -filters]).float()


def speedrun_lr_factor(cfg, step, total):
    """The learning rate's multiple at a step: linear from 0.2 to 1 over the warm-up, then linear to 0."""
    top = cfg.warmup * total
    return 0.2 + 0.8 * step / top if step < top else (total - step) / (total - top)


def speedrun_optimizer(net, cfg):
    """Nesterov SGD in airbench's units: batch-norm biases at bias_lr_scale x the lr, the same decay per image."""
    kilostep = 1024 * (1 + 1 / (1 - cfg.momentum))
    lr, decay = cfg.lr / kilostep, cfg.weight_decay * cfg.batch_size / kilostep
    biases = [p for n, p in net.named_parameters() if ".bn" in n and n.endswith("bias")]
    others = [p for n, p in net.named_parameters() if p.requires_grad and not (".bn" in n and n.endswith("bias"))]
    scale = cfg.bias_lr_scale if cfg.frozen_bn_weights else 1.0
    groups = [dict(params=biases, lr=lr * scale, weight_decay=decay / (lr * scale), base_lr=lr * scale),
              dict(params=others, lr=lr, weight_decay=decay / lr, base_lr=lr)]
    return torch.optim.SGD(groups, momentum=cfg.momentum, nesterov=cfg.nesterov)


class Lookahead:
    """A running average of the weights that the weights are reset to every few steps (airbench's EMA)."""

    def __init__(self, net):
        self.average = {k: v.detach().clone() for k, v in net.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, net, decay):
        """average <- decay * average + (1 - decay) * weights; then weights <- average."""
        state = net.state_dict()
        for k, avg in self.average.items():
            avg.lerp_(state[k], 1 - decay)
            state[k].copy_(avg)


def speedrun_flips(n, epoch, cfg, first_flips):
    """Which images are mirrored this epoch: alternating from a fixed random start, or fresh draws."""
    if cfg.alternating_flip:
        return first_flips ^ bool(epoch % 2)
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7919 * epoch + 1)
    return torch.rand(n, generator=g) < 0.5


@torch.no_grad()
def tta_probabilities(model, xb, tta="none"):
    """Softmax probabilities of a normalized batch averaged over the test-time views ('none', 'flip', 'flip_translate')."""
    p = model(xb).float().softmax(1)
    if tta in ("flip", "flip_translate"):
        p = (p + model(xb.flip(3)).float().softmax(1)) / 2
    if tta == "flip_translate":  # half the weight on the image shifted a pixel up-left and down-right, each mirrored too
        padded = F.pad(xb.float(), (1, 1, 1, 1), mode="reflect").to(xb.dtype)
        views = [padded[:, :, :-2, :-2], padded[:, :, 2:, 2:]]
        p = (p + sum(tta_probabilities(model, v.contiguous(memory_format=torch.channels_last), "flip")
                     for v in views) / 2) / 2
    return p


@torch.no_grad()
def tta_accuracy(net, x, y, tta="none", device="cpu", precision="fp32", batch_size=500):
    """Accuracy of an eval-mode network on normalized images x (float N x 3 x 32 x 32) under the given views."""
    net.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(device).contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            correct += (tta_probabilities(net, xb, tta).argmax(1).cpu() == y[i:i + batch_size]).sum().item()
    return correct / len(x)


def speedrun_inputs(x, y):
    """uint8 images and their labels as the speed run's network reads them: normalized tensors."""
    return Preprocess(std=TRUE_STD)(images_to_tensor(x)), torch.as_tensor(np.asarray(y), dtype=torch.long)


def speedrun_scores(result, x, y, tta, device="cpu"):
    """(single-view accuracy, accuracy with the views `tta`) of a finished speed run on uint8 images x."""
    x_norm, y = speedrun_inputs(x, y)
    single = tta_accuracy(result["model"], x_norm, y, "none", device, result["precision"])
    return single, single if tta == "none" else tta_accuracy(result["model"], x_norm, y, tta, device, result["precision"])


def speedrun(cfg, x_train, y_train, x_eval=None, y_eval=None, device=None, log=print):
    """Train the speed run's network on uint8 images; returns dict(model, history, precision, hardware).

    With evaluation images, each epoch ends with their single-view accuracy (for the curve; nothing is selected).
    """
    device = get_device(device)
    precision = resolve_precision(device, cfg.precision)
    x, y = (t.to(device) for t in speedrun_inputs(x_train, y_train))
    if x_eval is not None:
        x_ev, y_ev = speedrun_inputs(x_eval, y_eval)
    torch.manual_seed(cfg.seed)
    net = build_model("speedrun", residual=cfg.residual).to(device, memory_format=torch.channels_last)
    if cfg.whitening:
        net.whiten.weight.data.copy_(whitening_filters(x[:5000]))
        net.whiten.weight.requires_grad_(False)
    for name, param in net.named_parameters():
        if cfg.frozen_bn_weights and ".bn" in name and name.endswith("weight"):
            param.requires_grad_(False)
    optimizer = speedrun_optimizer(net, cfg)
    lookahead = Lookahead(net) if cfg.lookahead else None
    n, g = len(y), torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = n // cfg.batch_size
    total = max(math.ceil(cfg.epochs * steps_per_epoch), 1)
    first_flips = torch.rand(n, generator=g) < 0.5
    history = {k: [] for k in ("epoch", "train_loss", "train_acc", "val_acc", "seconds", "elapsed")}
    step, epoch, start = 0, 0, time.perf_counter()
    while step < total:
        net.train()
        tick, loss_sum, correct, seen = time.perf_counter(), 0.0, 0, 0
        if cfg.whitening and epoch == math.ceil(cfg.whiten_bias_epochs):
            net.whiten.bias.requires_grad_(False)
        order = torch.randperm(n, generator=g)
        draws = draw_augmentation(n, g, cfg.translate)
        draws[2] = speedrun_flips(n, epoch, cfg, first_flips).long()
        for i in range(min(steps_per_epoch, total - step)):
            idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            xb = augment_batch(x[idx.to(device)], pad=cfg.translate, draws=draws[:, idx].to(device), padding="reflect")
            xb, yb = xb.contiguous(memory_format=torch.channels_last), y[idx.to(device)]
            factor = speedrun_lr_factor(cfg, step, total)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            with autocast(device, precision):
                logits = net(xb)
            loss = F.cross_entropy(logits.float(), yb, label_smoothing=cfg.label_smoothing, reduction="sum")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if lookahead and step % 5 == 0:
                lookahead.update(net, decay=0.95 ** 5 * (step / total) ** 3)
            loss_sum += loss.item()
            correct += (logits.argmax(1) == yb).sum().item()
            seen += len(yb)
        if not math.isfinite(loss_sum):
            raise NonFiniteLossError(f"the speed run's loss became {loss_sum} in epoch {epoch + 1}; lower lr")
        if lookahead and step == total:
            lookahead.update(net, decay=1.0)  # end on the average itself
        seconds = time.perf_counter() - tick
        val = tta_accuracy(net, x_ev, y_ev, "none", device, precision) if x_eval is not None else float("nan")
        for k, v in dict(epoch=epoch, train_loss=loss_sum / seen, train_acc=correct / seen, val_acc=val,
                         seconds=seconds, elapsed=time.perf_counter() - start).items():
            history[k].append(v)
        epoch += 1
        if log:
            log(f"epoch {epoch:2d} | train loss {loss_sum / seen:.4f} acc {correct / seen:.4f} | "
                f"{'val acc %.4f | ' % val if x_eval is not None else ''}{seconds:.0f} s")
    if x_eval is None:
        del history["val_acc"]
    net.eval()
    return dict(model=net, history=history, precision=precision, hardware=hardware_label(device, precision))


def speedrun_checkpoint(cfg, result, **extra):
    """A release payload for a finished speed run: what Loaded_model and the hub read, plus its recipe and history."""
    return {"arch": "speedrun", "arch_options": {"residual": cfg.residual},
            "preprocess": asdict(Preprocess(std=TRUE_STD)), "input_size": 32, "classes": list(CLASSES),
            "config": asdict(cfg), "tta": cfg.tta,
            "model": {k: v.detach().cpu() for k, v in result["model"].state_dict().items()},
            "history": result["history"], "precision": result["precision"], "hardware": result["hardware"],
            "versions": _versions(), **extra}


def export_release(checkpoint_path, out_path, half=False, run_checkpoint=None):
    """Write a release file: weights, metadata and history, no optimizer or RNG state; fp16 weights if `half`.

    `run_checkpoint`, the run's last checkpoint, supplies the whole run's history, so a file that holds the
    best-on-validation epoch still shows every stage; `epoch` stays the selected one.
    """
    ckpt = load_checkpoint(checkpoint_path)
    model = {k: (v.half() if half and v.is_floating_point() else v) for k, v in ckpt["model"].items()}
    drop = {"optimizer", "scaler", "rng", "model"}
    release = {k: v for k, v in ckpt.items() if k not in drop} | {"model": model, "source": Path(checkpoint_path).name}
    if run_checkpoint is not None:
        run = load_checkpoint(run_checkpoint)
        if any(run["history"][k][:ckpt["epoch"]] != ckpt["history"][k] for k in ("train_loss", "val_loss")):
            raise ValueError(f"{run_checkpoint} is not a later checkpoint of the run that wrote {checkpoint_path}")
        release |= {"history": run["history"], "epochs_run": run["epoch"]}
    return save_checkpoint(release, out_path)


# --------------------------------------------------------------------------- evaluation


def find_state_dict(ckpt):
    """The weights inside a checkpoint: under 'model', 'net', 'state_dict', or the dict itself."""
    for key in ("model", "net", "state_dict", "model_state_dict"):
        if isinstance(ckpt, dict) and isinstance(ckpt.get(key), dict):
            return strip_module_prefix(ckpt[key])
    if isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return strip_module_prefix(ckpt)
    raise ValueError("checkpoint holds no state_dict: expected a dict of tensors, or one under "
                     f"'model', 'net' or 'state_dict'; found keys {list(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt)}")


def _candidate_archs():
    """(name, options) pairs to compare an unknown state_dict against."""
    pairs = [(n, {}) for n in list_models()]
    return pairs + [(n, {"shortcut": "B"}) for n in ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110")]


def guess_arch(state_dict):
    """Names (with options) of the known models whose state_dict keys and shapes match exactly."""
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    num_classes = shapes.get("linear.weight", (10,))[0]
    matches = []
    for name, opts in _candidate_archs():
        ref = build_model(name, num_classes, **opts).state_dict()
        if shapes == {k: tuple(v.shape) for k, v in ref.items()}:
            matches.append((name, opts))
    return matches


def load_weights(model, state_dict, arch_label):
    """load_state_dict with exact key matching and an error that names the difference and the likely model."""
    own = model.state_dict()
    # files from PyTorch before 0.4.1 have no num_batches_tracked: batch-norm step counters, not weights
    counters = {k: v for k, v in own.items()
                if k.endswith("num_batches_tracked") and k.replace("num_batches_tracked", "running_mean") in state_dict}
    missing = sorted(set(own) - set(state_dict) - set(counters))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = sorted(k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    if missing or unexpected or wrong:
        guesses = guess_arch(state_dict)
        hint = ("it looks like " + " or ".join(f"arch={n!r}" + "".join(f", {k}={v!r}" for k, v in o.items())
                                           for n, o in guesses)) if guesses else "it matches no known model"
        raise ValueError(f"checkpoint does not fit {arch_label}: {len(missing)} missing keys {missing[:5]}, "
                         f"{len(unexpected)} unexpected keys {unexpected[:5]}, shape mismatches {wrong[:5]}; {hint}")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in {**counters, **state_dict}.items()})
    return model


def _as_image_batch(x, size=32):
    """Validate predict() input and return it as an N x 3 x H x W tensor (uint8 or float in [0, 1])."""
    expected = (f"a uint8 array N x {size} x {size} x 3 (0..255), floats in [0, 1], "
                f"or an N x 3 x {size} x {size} tensor")
    if isinstance(x, np.ndarray):
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected {expected}; got an array of shape {x.shape}")
        x = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)
    elif isinstance(x, torch.Tensor):
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected {expected}; got a tensor of shape {tuple(x.shape)}")
    else:
        raise ValueError(f"expected {expected}; got {type(x).__name__}")
    if len(x) == 0 or tuple(x.shape[-2:]) not in ((size, size), (32, 32)):  # 32 x 32 is resized for 224 px models
        raise ValueError(f"expected {expected}; got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x
    if not x.is_floating_point():
        raise ValueError(f"expected {expected}; got dtype {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError("images contain NaN or infinite values")
    if x.min() < 0 or x.max() > 1:
        raise ValueError(f"float images must lie in [0, 1]; got values in [{x.min():.3g}, {x.max():.3g}]")
    return x


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
        if precision == "int8" and (reason := int8_unavailable_reason(device)):  # before any work
            raise Int8UnavailableError(reason)
        if tta is not None:
            _tta_views(tta)
        ckpt = load_checkpoint(path)
        meta = ckpt if isinstance(ckpt, dict) and "arch" in ckpt else {}
        self.arch = arch or meta.get("arch")
        if self.arch is None:
            guesses = guess_arch(find_state_dict(ckpt))
            hint = f"; its weights fit {guesses}" if guesses else ""
            raise ValueError(f"{path} carries no architecture name: pass arch=... (and shortcut=...){hint}")
        self.arch_options = arch_options or dict(meta.get("arch_options", {}))
        pre = dict(meta.get("preprocess", {})) or asdict(Preprocess(size=input_size(self.arch)))
        pre.update({k: tuple(v) for k, v in (("mean", mean), ("std", std)) if v is not None})
        self.preprocess = Preprocess(**pre)
        self.classes = list(meta.get("classes", CLASSES))
        self.device = get_device(device)
        self.precision = "int8" if precision == "int8" else resolve_precision(self.device, precision)
        self.tta = _tta_views(meta.get("tta", "none") if tta is None else tta)
        self.meta = {k: v for k, v in meta.items() if k not in ("model", "optimizer", "rng")}
        net = build_model(self.arch, len(self.classes), **self.arch_options)
        label = f"{self.arch} {self.arch_options or ''}".strip()
        # weights stored in the compute dtype: faster than autocast, which re-casts them every batch
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision, torch.float32)
        self.model = load_weights(net, check_weights(find_state_dict(ckpt), path), label).to(
            self.device, self.dtype, memory_format=torch.channels_last).eval()
        if self.precision == "int8":  # calibrated once per release file and torch; the statistics are kept beside it
            cache = Path(path).with_name(f"{Path(path).stem}.int8-statistics.pth")
            self.model = quantize_int8(self.model, self.preprocess, calibration, cache, int8_cache_key(path, calibration))

    @torch.no_grad()
    def predict_proba(self, x, batch_size=128, verbose=False, tta=None):
        """N x classes probabilities, averaged over the test-time views `tta` (default: the model's)."""
        x = _as_image_batch(x, self.preprocess.size)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a whole number of at least 1, got {batch_size!r}")
        tta = self.tta if tta is None else _tta_views(tta)
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

# int8: post-training static quantization (PT2E) lowered to oneDNN's int8 convolutions on x86 CPUs

INT8_BATCH = 128  # the lowered graph's fixed batch; a shorter last batch is padded
INT8_CALIBRATION = 1000  # images of the training split, drawn with seed 0, unless the caller gives its own


class Int8UnavailableError(RuntimeError):
    """int8 inference cannot run here; the message names what is missing and the precisions that work."""


@functools.lru_cache(maxsize=None)
def _pt2e_tools():
    """(prepare, convert, make_quantizer, lower, library) from torchao 0.11+, else from a torch that still ships them."""
    with _quiet_libraries():
        return _import_pt2e_tools()


@contextlib.contextmanager
def _quiet_libraries():
    """Silence the deprecation notes torchao and the int8 lowering print, which a reader cannot act on."""
    import logging
    import warnings
    pytree_log = logging.getLogger("torch.utils._pytree")
    level = pytree_log.level
    pytree_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        pytree_log.setLevel(level)


def _import_pt2e_tools():
    """The PT2E functions, or None when neither torchao nor torch provides them."""
    try:
        from torchao import __version__ as version
        from torchao.quantization.pt2e.lowering import lower_pt2e_quantized_to_x86 as lower
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
        with contextlib.suppress(ImportError):  # torchao 0.12+ keeps the int8 fusion passes itself: register them
            import torchao.quantization.pt2e.inductor_passes.x86  # noqa: F401
        library = f"torchao {version}"
    except ImportError:
        try:
            from torch.ao.quantization.pt2e.lowering import lower_pt2e_quantized_to_x86 as lower
            from torch.ao.quantization.quantize_pt2e import convert_pt2e, prepare_pt2e
            from torch.ao.quantization.quantizer import x86_inductor_quantizer as xiq
            library = f"torch {torch.__version__}"
        except ImportError:
            return None

    def make_quantizer():
        quantizer = xiq.X86InductorQuantizer()  # per-channel int8 weights, per-tensor uint8 activations
        return quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())

    return prepare_pt2e, convert_pt2e, make_quantizer, lower, library


def int8_unavailable_reason(device="cpu"):
    """Why precision='int8' cannot run on `device` here, or None when it can."""
    works = "precisions that work here: 'fp32', 'bf16' and 'auto'"
    if torch.device(device).type != "cpu":
        return f"int8 runs on the CPU only, not {device}; on {device} use 'auto', 'fp32', 'fp16' or 'bf16'"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"int8 needs an x86-64 CPU (oneDNN's int8 convolutions); this one is {platform.machine()}; {works}"
    if not torch.backends.mkldnn.is_available():
        return f"int8 needs a torch built with oneDNN (mkldnn), which this one ({torch.__version__}) lacks; {works}"
    if _pt2e_tools() is None:
        return ("int8 needs PT2E quantization: pip install 'torchao>=0.11' (this torch, "
                f"{torch.__version__}, no longer ships torch.ao.quantization.quantize_pt2e); {works}")
    return None


def calibration_images(n=None, seed=0, root=None):
    """`n` (default INT8_CALIBRATION) images drawn with `seed` from the training split (the 45,000 images: never
    validation, never test)."""
    x, y, _, _ = load_cifar10(root)
    x_train, _, _, _ = train_val_split(x, y)
    return x_train[np.random.default_rng(seed).choice(len(x_train), n or INT8_CALIBRATION, replace=False)]


def _observers(prepared):
    """A prepared graph's observers keyed by what each observes (stable across builds, unlike module names)."""
    found, seen = {}, {}
    for node in prepared.graph.nodes:
        if node.op == "call_module" and "activation_post_process" in str(node.target):
            source = node.args[0]
            name = str(source.target) if source.op == "get_attr" else source.name
            seen[name] = seen.get(name, 0) + 1
            found[f"{name}#{seen[name]}"] = prepared.get_submodule(node.target)
    return found


def _cached_statistics(cache, key, observers):
    """The observers' calibrated buffers from `cache` when it was written for exactly `key`, else None."""
    with contextlib.suppress(FileNotFoundError, DamagedCheckpointError, KeyError, TypeError):
        stored = load_checkpoint(cache)
        if stored["key"] == key and set(stored["observers"]) == set(observers):
            return stored["observers"]
    return None


class _FixedBatch(nn.Module):
    """Runs a graph lowered for batches of exactly `size` on any batch: split, pad the last part, trim."""

    def __init__(self, graph, size):
        super().__init__()
        self.graph, self.size = graph, size

    def train(self, mode=True):
        """A quantized graph has no training mode: eval() and train() leave it as it is."""
        return self

    def forward(self, x):
        parts, x = [], x.contiguous(memory_format=torch.channels_last)  # the layout the graph was lowered for
        for i in range(0, len(x), self.size):
            part = x[i:i + self.size]
            pad = self.size - len(part)
            if pad:
                part = torch.cat([part, part.new_zeros(pad, *part.shape[1:])]).contiguous(
                    memory_format=torch.channels_last)
            parts.append(self.graph(part)[:self.size - pad])
        return torch.cat(parts)


def quantize_int8(model, preprocess, calibration=None, cache=None, key=None):
    """`model` (fp32) post-training quantized to int8 for this CPU: batch norm folded, per-channel weights,
    activations calibrated on `calibration` images (default: calibration_images()). With `cache` (a file) and
    `key` (what the statistics depend on), calibration runs once; a cache written for another key is rebuilt."""
    prepare, convert, make_quantizer, lower, _ = _pt2e_tools()  # int8_unavailable_reason() has checked them
    size = preprocess.size
    example = (torch.zeros(INT8_BATCH, 3, size, size).contiguous(memory_format=torch.channels_last),)
    batch = {0: torch.export.Dim("batch", min=1, max=4096)}  # calibration batches of any size
    with torch.no_grad():
        graph = torch.export.export(copy.deepcopy(model).float().eval(), example, dynamic_shapes=(batch,)).module()
        prepared = prepare(graph, make_quantizer())  # folds batch norm into the convolutions of the copy
        observers = _observers(prepared)
        stats = _cached_statistics(cache, key, observers) if cache else None
        if stats is None:
            images = calibration_images() if calibration is None else calibration
            xt = _as_image_batch(images, size)
            for i in range(0, len(xt), INT8_BATCH):
                prepared(preprocess(xt[i:i + INT8_BATCH]).contiguous(memory_format=torch.channels_last))
            stats = {k: {n: b.clone() for n, b in m.named_buffers()} for k, m in observers.items()}
            if cache:
                with contextlib.suppress(OSError):  # a read-only folder: no cache, the next load calibrates again
                    save_checkpoint({"key": key, "observers": stats}, cache)
        else:
            for k, module in observers.items():
                for name, value in stats[k].items():
                    getattr(module, name).resize_(value.shape).copy_(value)
        with _quiet_libraries():
            return _FixedBatch(lower(convert(prepared), example), INT8_BATCH)


def _file_sha256(path):
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def int8_cache_key(path, calibration=None):
    """What a release's int8 statistics depend on: the file's bytes, torch, the quantization library, the images."""
    images = (f"training split, {INT8_CALIBRATION} images, seed 0" if calibration is None
              else f"given images sha256 {payload_digest({'images': torch.as_tensor(np.asarray(calibration))})}")
    return f"{Path(path).name} sha256 {_file_sha256(path)} | torch {torch.__version__} | {_pt2e_tools()[4]} | {images}"



# --------------------------------------------------------------------------- pictures


def _as_hwc(img):
    """An H x W x 3 (or H x W) array from an image array or a 3 x H x W (or H x W) tensor."""
    if isinstance(img, torch.Tensor):
        img = img.detach().float().cpu() if img.is_floating_point() else img.detach().cpu()
        img = (img.permute(1, 2, 0) if img.ndim == 3 else img).numpy()
    return img


def show_images(images, titles=None, ncols=10, size=1.2):
    """A grid of images (H x W x 3 arrays or 3 x H x W tensors), each with an optional title; returns the figure."""
    import matplotlib.pyplot as plt
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


def plot_history(history, title=None):
    """Training and validation loss and accuracy against epochs, stage boundaries and lr marked."""
    import matplotlib.pyplot as plt
    epochs = np.asarray(history["epoch"]) + 1
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, key in ((ax_loss, "loss"), (ax_acc, "acc")):
        ax.plot(epochs, history[f"train_{key}"], label=f"train {key}")
        ax.plot(epochs, history[f"val_{key}"], label=f"validation {key}")
        for end in history.get("stage_ends", [])[:-1]:
            ax.axvline(end + 0.5, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    starts = [0] + [i for i in range(1, len(epochs)) if history["lr"][i] != history["lr"][i - 1]]
    for i in starts:  # the lr of each stage, written where it begins
        ax_acc.annotate(f"lr {history['lr'][i]:g}", (epochs[i], 0.02), xycoords=("data", "axes fraction"), fontsize=8)
    ax_loss.set_ylabel("cross-entropy")
    ax_acc.set_ylabel("accuracy")
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
    """Grad-CAM maps (N x H x W at the input's size, non-negative, max 1) and the target classes (default: predicted)."""
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


def overlay(image, cam, alpha=0.5):
    """An H x W x 3 uint8 image blended with a heat map of `cam` (H x W in [0, 1])."""
    import matplotlib
    heat = matplotlib.colormaps["jet"](np.asarray(cam))[..., :3]
    return (1 - alpha) * np.asarray(image) / 255 + alpha * heat


@torch.no_grad()
def embed_features(model, x, method="pca", seed=0, batch_size=500):
    """(N x 2 embedding by PCA or t-SNE, N x D penultimate features) of a preprocessed batch."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    if method not in ("pca", "tsne"):
        raise ValueError(f"method must be 'pca' or 'tsne', got {method!r}")
    model.eval()
    feats = torch.cat([model.features(x[i:i + batch_size]).float().cpu() for i in range(0, len(x), batch_size)]).numpy()
    reducer = PCA(2, random_state=seed) if method == "pca" else TSNE(2, init="pca", random_state=seed)
    return reducer.fit_transform(feats), feats


def save_history(checkpoint_path, out_path):
    """Write a run's architecture, recipe and per-epoch history (no weights) as a small JSON file."""
    import json
    ckpt = load_checkpoint(checkpoint_path)
    record = {k: ckpt[k] for k in ("arch", "arch_options", "config", "history", "epoch")}
    tmp = Path(out_path).with_name(f".{Path(out_path).name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, out_path)
    return Path(out_path)


def load_history(path):
    """A record written by save_history: {'arch', 'arch_options', 'config', 'history', 'epoch'}."""
    import json
    return json.loads(Path(path).read_text())


def plot_error_curves(runs, title=None):
    """Training and validation error (%) against epochs for {label: history}; labels starting 'plain' dashed."""
    import matplotlib.pyplot as plt
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


def draw_basic_block():
    """A drawing of the basic residual block: the plain path, the shortcut and the addition, options A and B."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch
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
    """Reliability diagram: accuracy against confidence of the predicted class, with the ECE in the legend."""
    import matplotlib.pyplot as plt
    from sklearn.calibration import calibration_curve
    conf, correct = proba.max(1), (proba.argmax(1) == np.asarray(y_true)).astype(int)
    acc, mean_conf = calibration_curve(correct, conf, n_bins=bins, strategy="uniform")
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
    ax.plot(mean_conf, acc, marker="o", label=f"{label} (ECE {expected_calibration_error(proba, y_true, bins):.3f})")
    ax.set_xlabel("confidence (probability of the predicted class)")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_per_class_accuracy(accuracy):
    """Horizontal bars of {class: accuracy}, lowest at the top, the value written on each bar."""
    import matplotlib.pyplot as plt
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
