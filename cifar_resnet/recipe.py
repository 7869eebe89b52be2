"""A training run's recipe: `TrainConfig`, the learning-rate stages and how they scale, the optimizer, and the
comparison of a given recipe with the one a checkpoint recorded.

Taught in notebook 03 (staged SGD: lr 0.1, then 0.01, then 0.001).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from .data import COMMON_STD, TRUE_STD, Preprocess
from .models import canonical_arch_options, input_size
from .runtime import check_compile, check_precision

__all__ = ["TrainConfig", "RecipeMismatchError", "RECIPE_FIELDS", "parse_stages", "scale_stages", "stage_lr",
           "make_optimizer", "recipe_differences"]

STDS = {"common": COMMON_STD, "true": TRUE_STD}  # the normalization's std by name


class RecipeMismatchError(ValueError):
    """Resuming a run with settings that differ from the ones its checkpoint recorded."""


@dataclass
class TrainConfig:
    """Everything a run needs besides the data; stored in every checkpoint."""

    arch: str = "resnet20"
    arch_options: dict = field(default_factory=dict)
    stages: list = field(default_factory=lambda: [(0.1, 82), (0.01, 123), (0.001, 164)])  # (lr, end epoch)
    batch_size: int = 128  # images a step (the global batch under torchrun)
    optimizer: str = "sgd"  # or "adam" (the ResNet v1/v2 reports)
    momentum: float = 0.9
    weight_decay: float = 5e-4  # the ResNet18 course report's; the paper and the ResNet20 report use 1e-4
    nesterov: bool = False
    schedule: str = "staged"  # or "cosine" (the ResNet20 report): cosine from stages[0] lr to 0 at the last end
    label_smoothing: float = 0.0
    precision: str = "auto"  # one of runtime.PRECISIONS
    seed: int = 0
    val_size: int = 5000  # images of the training set held out for selection
    std: str = "common"  # the normalization's std: "common" (0.2023, ...) or "true" (0.2470, ...)
    input_size: int | None = None  # pixels a side the images are resized to; None: the architecture's own (224
    # for resnet18_imagenet, else 32), so resnet18_imagenet with 32 trains on CIFAR's own size
    save_every: int = 5  # epochs between resume checkpoints (stage ends are always saved)
    keep_last: int = 3  # resume checkpoints kept besides the stage ends
    patience: int | None = None  # stop a stage when val acc has not improved by min_delta in this many epochs
    min_delta: float = 0.0
    compile: str = "auto"  # torch.compile: 'auto', 'on' or 'off' (runtime.resolve_compile says what auto does)

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
        if self.std not in STDS:
            raise ValueError(f"std must be one of {', '.join(map(repr, STDS))}; got {self.std!r}")
        check_precision(self.precision)
        self.compile = check_compile(self.compile)
        if self.input_size is not None and not (isinstance(self.input_size, int) and self.input_size >= 32):
            raise ValueError("input_size must be a whole number of pixels, at least 32, or None; "
                             f"got {self.input_size!r}")

    def preprocess(self):
        """The Preprocess this run trains with."""
        return Preprocess(std=STDS[self.std], size=self.input_size or input_size(self.arch))


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


RECIPE_FIELDS = ("arch", "arch_options", "stages", "batch_size", "optimizer", "momentum", "weight_decay", "nesterov",
                 "schedule", "label_smoothing", "seed", "val_size", "std", "input_size", "patience", "min_delta")


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
        if name == "arch_options":
            a, b = canonical_arch_options(ours["arch"], a), canonical_arch_options(ours["arch"], b)
        if a != b:
            diffs.append(f"{name}: recorded {a}, given {b}")
    return diffs
