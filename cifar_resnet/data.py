"""CIFAR-10 as arrays and as batches: the accepted file forms, safe unpickling, the validation split, the
normalization (`Preprocess`), augmentation on the device, `BatchLoader`, and the checks on image batches.

Taught in notebook 01 (data); `BatchLoader` and augmentation are what notebook 03 trains with.
"""
from __future__ import annotations

import hashlib
import io
import math
import os
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .runtime import PROJECT_DIR

__all__ = ["DATA_DIR", "CLASSES", "CIFAR_MEAN", "COMMON_STD", "TRUE_STD", "NPY_FILES", "BATCHES_DIR", "TARBALL",
           "find_cifar10", "load_cifar10", "train_val_split", "images_to_tensor", "labels_to_tensor",
           "as_image_batch", "data_fingerprint", "describe_data", "Preprocess", "draw_augmentation", "augment_batch",
           "BatchLoader"]

DATA_DIR = PROJECT_DIR / "data"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck")
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
COMMON_STD = (0.2023, 0.1994, 0.2010)  # the std many CIFAR repositories (kuangliu's too) normalize with
TRUE_STD = (0.2470, 0.2435, 0.2616)  # the measured per-channel std of the training pixels
NPY_FILES = ("x_train.npy", "y_train.npy", "x_test.npy", "y_test.npy")
BATCHES_DIR = "cifar-10-batches-py"
TARBALL = "cifar-10-python.tar.gz"

# ----------------------------------------------------------------------------- reading the files (notebook 01)


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


def _download_cifar10():
    """torchvision's download into data/ (Colab; these machines have no internet)."""
    import torchvision  # only here: importing it costs a second that nothing else needs
    torchvision.datasets.CIFAR10(root=str(DATA_DIR), train=True, download=True)


def load_cifar10(root=None, download=True):
    """Return (x_train, y_train, x_test, y_test): uint8 N x 32 x 32 x 3 images and int64 labels, official order."""
    if root is not None:  # an explicit folder is never silently replaced by another
        return _check_arrays(_load_from(_explicit_folder(Path(root))), Path(root))
    places = _data_places(root)
    place = find_cifar10(root)
    if place is not None:
        return _check_arrays(_load_from(place), place)
    reason = "download=False"
    if download:
        try:
            _download_cifar10()
            return _check_arrays(_load_from(DATA_DIR), DATA_DIR)
        except Exception as e:  # no network, disk full, ...: report it with the places searched
            reason = f"download failed: {type(e).__name__}: {e}"
    searched = "\n".join(f"  - {p}" for p in places)
    raise FileNotFoundError(
        f"CIFAR-10 not found ({reason}). Searched, in order:\n{searched}\n"
        f"Each place may hold the four files {', '.join(NPY_FILES)}, the folder {BATCHES_DIR}/, or {TARBALL}.\n"
        "Fix: pass load_cifar10(root=DIR), set the environment variable CIFAR10_DIR=DIR, "
        f"put the data in {DATA_DIR}, or allow the torchvision download (needs internet).")


def _explicit_folder(root):
    """`root` when it holds the data in an accepted form, else an error that says what it holds and lacks."""
    if not root.is_dir():
        raise FileNotFoundError(f"CIFAR-10 folder {root} does not exist; pass an existing folder, or root=None "
                                "to search $CIFAR10_DIR and data/")
    if _data_form(root) is None:
        present = [f for f in NPY_FILES if (root / f).is_file()]
        lacks = f"; it has {', '.join(present)} but lacks {', '.join(f for f in NPY_FILES if f not in present)}"
        raise FileNotFoundError(f"CIFAR-10 folder {root} holds no copy of the data{lacks if present else ''}: "
                                f"expected the four files {', '.join(NPY_FILES)}, the folder {BATCHES_DIR}/, "
                                f"or {TARBALL}")
    return root


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
    val_idx = np.concatenate([rng.choice(np.flatnonzero(y == c), k, replace=False)
                              for c, k in zip(classes, per_class)])
    is_val = np.zeros(len(y), dtype=bool)
    is_val[val_idx] = True
    return x[~is_val], y[~is_val], x[is_val], y[is_val]

# ----------------------------------------------------------------------------- arrays to tensors, checked


def images_to_tensor(x):
    """uint8 N x H x W x 3 array (or N x 3 x H x W tensor) to a uint8 N x 3 x H x W tensor."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)
    return x.contiguous()


def labels_to_tensor(y):
    """Class labels (a list, an array or a tensor) as an int64 tensor."""
    return torch.as_tensor(np.asarray(y), dtype=torch.long)


def data_fingerprint(data):
    """What a run trained on, small enough to record: image counts and a SHA-256 of the arrays' bytes."""
    h = hashlib.sha256()
    for a in data:
        h.update(np.ascontiguousarray(a).tobytes())
    return {"train_images": len(data[1]), "val_images": len(data[3]), "sha256": h.hexdigest()}


def describe_data(fingerprint):
    """'45000 training and 5000 validation images (sha256 1a2b3c4d...)'."""
    return (f"{fingerprint['train_images']} training and {fingerprint['val_images']} validation images "
            f"(sha256 {fingerprint['sha256'][:12]}...)")


def as_image_batch(x, size=32):
    """Check images given for prediction and return them as an N x 3 x H x W tensor (uint8, or float in [0, 1]).

    Accepted: uint8 pixels 0..255, or floats in [0, 1]; N x H x W x 3 arrays or N x 3 x H x W tensors, 32 x 32
    (resized for 224-pixel models) or `size` x `size`. Anything else is refused, never cast: a cast would turn
    int64 pixels or 0..255 floats into a plausible-looking but wrong input.
    """
    expected = (f"a uint8 array N x {size} x {size} x 3 (0..255), floats in [0, 1], "
                f"or an N x 3 x {size} x {size} tensor")
    if isinstance(x, np.ndarray):
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected {expected}; got an array of shape {x.shape}")
        x = images_to_tensor(x)
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
    return _check_float_pixels(x)


def _check_float_pixels(x):
    """`x` itself, unless it is a float batch with NaN, infinite or out-of-[0, 1] values (refused, never clipped)."""
    if x.is_floating_point() and len(x):
        if not torch.isfinite(x).all():
            raise ValueError("images contain NaN or infinite values")
        if x.min() < 0 or x.max() > 1:
            raise ValueError(f"float images must lie in [0, 1]; got values in [{x.min():.3g}, {x.max():.3g}]")
    return x

# ----------------------------------------------------------------------------- normalization (notebook 01)


@dataclass
class Preprocess:
    """How images become network input: scale to [0, 1], optional resize, then normalize."""

    mean: tuple = CIFAR_MEAN
    std: tuple = COMMON_STD
    per_image: bool = False  # per-image standardization (the ResNet v1/v2 reports) instead of mean/std
    size: int = 32  # 224 for resnet18_imagenet

    def __call__(self, x):
        """Float N x 3 x size x size batch from uint8 (0..255) or float (0..1) images; anything else is refused."""
        if x.dtype != torch.uint8 and not x.is_floating_point():  # int64 pixels would be read as 0..1 floats
            raise ValueError(f"expected uint8 pixels 0..255 or floats in [0, 1]; got dtype {x.dtype}")
        _check_float_pixels(x)
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

# ----------------------------------------------------------------------------- augmentation and batches (01, 03)


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
    mirrored = torch.arange(w - 1, -1, -1, device=x.device)
    cols = ox + torch.where(flip, mirrored, torch.arange(w, device=x.device))
    padded = F.pad(x, (pad, pad, pad, pad), mode=padding).permute(0, 2, 3, 1)  # N x H x W x C for one gather
    out = padded[torch.arange(n, device=x.device).view(n, 1, 1), rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


class BatchLoader:
    """Seeded batches of (images, labels) from a uint8 tensor held once on the device, augmented there."""

    def __init__(self, x, y, batch_size=128, preprocess=None, augment=False, shuffle=False,
                 drop_last=False, seed=0, device="cpu", rank=0, world_size=1):
        self.x = images_to_tensor(x).to(device)
        self.y = labels_to_tensor(y).to(device)
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
