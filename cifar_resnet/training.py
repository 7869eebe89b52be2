"""Training: one epoch, evaluation, and `Trainer`, which trains the staged schedule, validates every epoch,
selects on the validation split and resumes exactly; `start_or_resume` is the notebooks' entry point.

Taught in notebook 03 (training); notebook 02's experiments use the same engine. Files and folders are
`cifar_resnet.checkpoints`' business: the Trainer asks its `RunFolder` to lock, check, save and prune.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from IPython import get_ipython
from IPython.display import display
from tqdm import tqdm

from .checkpoints import (RunFolder, check_weights, latest_checkpoint, load_checkpoint, nonfinite_entries,
                          readable_checkpoints, release_payload, to_cpu)
from .data import CLASSES, BatchLoader, data_fingerprint, describe_data
from .models import build_model, canonical_arch_options
from .quick import shrink_run_for_tests
from .recipe import RecipeMismatchError, make_optimizer, recipe_differences, stage_lr
from .runtime import autocast, get_device, hardware_label, resolve_compile, resolve_precision

__all__ = ["NonFiniteLossError", "train_epoch", "evaluate", "Counters", "Trainer", "start_or_resume"]


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss."""


class NotebookProgress:
    """A progress line for notebooks: one output updated in place (a bar in Jupyter and Colab, its text
    elsewhere), so a saved notebook keeps its last state. A widget bar would save only its first frame, "0%",
    which is all GitHub shows. With leave=False the line is emptied on close."""

    def __init__(self, total, desc, leave=True, mininterval=1.0):
        self.total, self.desc, self.leave, self.mininterval = total, desc, leave, mininterval
        self.n, self.postfix, self.start, self.shown = 0, "", time.perf_counter(), -math.inf
        self.handle = display(self, display_id=True)

    def __repr__(self):
        elapsed = time.perf_counter() - self.start
        share = f" ({self.n / self.total:.0%})" if self.total else ""
        return f"{self.desc}: {self.n}/{self.total}{share}, {elapsed:.0f} s{self.postfix}"

    def _repr_html_(self):
        return f'<progress value="{self.n}" max="{max(self.total, 1)}"></progress> <code>{self!r}</code>'

    def _show(self, force=False):
        if force or time.perf_counter() - self.shown >= self.mininterval:
            self.handle.update(self)
            self.shown = time.perf_counter()

    def update(self, n=1):
        self.n += n
        self._show(force=self.n >= self.total)

    def set_postfix(self, refresh=True, **values):
        self.postfix = "".join(f", {key} {value}" for key, value in values.items())

    def close(self):
        if self.leave:
            self._show(force=True)
        else:
            self.handle.update({"text/plain": ""}, raw=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _in_notebook():
    """True inside a Jupyter or Colab kernel (not in a terminal IPython or a script)."""
    return hasattr(get_ipython(), "kernel")


def _progress_bar(total, desc, enabled, leave=False):
    """A tqdm bar in a terminal; a NotebookProgress line in a notebook; nothing when not enabled."""
    if enabled and _in_notebook():
        return NotebookProgress(total, desc, leave=leave)
    return tqdm(total=total, desc=desc, leave=leave, disable=not enabled, mininterval=1.0)

# ----------------------------------------------------------------------------- one epoch (notebook 03)


def _step(model, x, y, optimizer, criterion, device, precision, scaler):
    """Forward, backward and update on one batch; returns (loss, logits)."""
    with autocast(device, precision):
        logits = model(x)
        loss = criterion(logits, y)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:  # fp16: scale the loss so small gradients survive (bf16 has fp32's range)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss, logits


def train_epoch(model, loader, optimizer, criterion, device, precision="fp32", scaler=None, desc="train",
                progress=True):
    """One pass over `loader`; returns dict(loss, acc, seconds, images_per_s, images)."""
    model.train()
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen, start = 0, time.perf_counter()
    steps = len(loader)
    with _progress_bar(steps, desc, progress) as bar:
        for step, (x, y) in enumerate(loader, 1):
            loss, logits = _step(model, x, y, optimizer, criterion, device, precision, scaler)
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
    return dict(loss=total_loss.item() / seen, acc=correct.item() / seen, seconds=seconds,
                images_per_s=seen / seconds, images=seen)


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


def agree_across_ranks(tr, val, rank, device):
    """Across processes: train metrics over all shards, and rank 0's validation (its batch-norm statistics are
    the ones saved), so that every rank takes the same plateau and stage decisions."""
    sums = torch.tensor([tr["loss"] * tr["images"], tr["acc"] * tr["images"], tr["images"]],
                        dtype=torch.float64, device=device)
    dist.all_reduce(sums)
    tr = dict(tr, loss=(sums[0] / sums[2]).item(), acc=(sums[1] / sums[2]).item(), images=int(sums[2].item()))
    scores = torch.tensor([val["loss"], val["acc"]] if rank == 0 else [0.0, 0.0], dtype=torch.float64,
                          device=device)
    dist.broadcast(scores, src=0)
    return tr, dict(loss=scores[0].item(), acc=scores[1].item())

# ----------------------------------------------------------------------------- the run (notebook 03)


@dataclass
class Counters:
    """Where a run stands, saved in every checkpoint: the next epoch, the stage, and the best validation
    accuracies that decide selection (over the run) and plateaus (within the stage)."""

    epoch: int = 0
    stage: int = 0
    best_val_acc: float = -1.0
    stage_best: float = -1.0
    stage_bad_epochs: int = 0

    def start_stage(self, stage):
        self.stage, self.stage_best, self.stage_bad_epochs = stage, -1.0, 0

    def plateaued(self, val_acc, patience, min_delta):
        """Track the stage's best validation accuracy; True when patience has run out."""
        if val_acc >= self.stage_best + min_delta:
            self.stage_best, self.stage_bad_epochs = max(val_acc, self.stage_best), 0
        else:
            self.stage_bad_epochs += 1
        return patience is not None and self.stage_bad_epochs >= patience


HISTORY_KEYS = ("epoch", "stage", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "seconds", "hardware")


class Trainer:
    """Staged training with checkpoints every few epochs, exact resume and best-on-validation selection."""

    def __init__(self, cfg, data, run_dir=None, device=None, rank=0, world_size=1, progress=True,
                 tensorboard_dir=None):
        self.cfg, self.device, self.rank, self.world_size = cfg, get_device(device), rank, world_size
        self.precision = resolve_precision(self.device, cfg.precision)
        self.compiled, self.compile_note = resolve_compile(self.device, cfg.compile)  # note: a few words why
        if self.device.type == "cuda" and not torch.are_deterministic_algorithms_enabled():
            torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels
        self.progress = progress and rank == 0
        if cfg.batch_size % world_size:
            raise ValueError(f"batch size {cfg.batch_size} does not split evenly over {world_size} processes")
        self.batch_per_rank = cfg.batch_size // world_size  # the recipe's batch is the global one, as is its lr
        self.train_loader, self.val_loader = self._loaders(data)
        self.data = data_fingerprint(data)  # recorded, so that a resume on other images is noticed
        torch.manual_seed(cfg.seed)  # the same initial weights for the same seed
        self.net = build_model(cfg.arch, len(CLASSES), **cfg.arch_options)
        self.net = self.net.to(self.device, memory_format=torch.channels_last)
        self.model = self._wrap(self.net)
        self.optimizer = make_optimizer(self.net, cfg)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.counters = Counters()
        self.saved = []  # epochs of the ckpt files this run wrote: the only ones pruning may delete
        self.folder = None  # rank 0 writes the run's files; a new run's folder is checked before its first epoch
        if run_dir is not None and rank == 0:
            self.folder = (run_dir if isinstance(run_dir, RunFolder) else RunFolder(run_dir)).lock()
        self.run_dir = getattr(run_dir, "path", None) or (Path(run_dir) if run_dir else None)
        self.hardware = hardware_label(self.device, self.precision) + ", compiled" * self.compiled
        self.history = {k: [] for k in HISTORY_KEYS} | {"stage_ends": []}
        self.writer = self._tensorboard(tensorboard_dir) if tensorboard_dir and rank == 0 else None

    epoch = property(lambda self: self.counters.epoch, doc="The next epoch to train (0-based): epochs done.")
    stage = property(lambda self: self.counters.stage, doc="The current stage (0-based).")
    best_val_acc = property(lambda self: self.counters.best_val_acc, doc="Best validation accuracy so far.")

    def _loaders(self, data):
        x_tr, y_tr, x_val, y_val = data
        pre = self.cfg.preprocess()
        train = BatchLoader(x_tr, y_tr, self.batch_per_rank, pre, augment=True, shuffle=True, seed=self.cfg.seed,
                            device=self.device, rank=self.rank, world_size=self.world_size)
        return train, BatchLoader(x_val, y_val, 500, pre, device=self.device)

    def _wrap(self, net):
        model = torch.compile(net) if self.compiled else net
        if self.world_size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        return model

    @staticmethod
    def _tensorboard(folder):
        from torch.utils.tensorboard import SummaryWriter  # imports TensorBoard: only when asked for
        return SummaryWriter(folder)

    # -- state ------------------------------------------------------------
    def state(self, with_optimizer=True, saved=None):
        """Everything needed to resume exactly and to predict, as plain data and CPU tensors."""
        state = release_payload(
            self.cfg.arch, self.cfg.arch_options, self.cfg.preprocess(), asdict(self.cfg), self.net, self.history,
            self.precision, **asdict(self.counters), data=self.data, device=str(self.device),
            saved=list(self.saved if saved is None else saved), world_size=self.world_size,
            batch_per_rank=self.batch_per_rank)
        if with_optimizer:  # nothing draws from a CUDA generator (augmentation uses a seeded CPU one): not saved
            state["optimizer"] = to_cpu(self.optimizer.state_dict())
            state["scaler"] = self.scaler.state_dict() if self.scaler else None
            state["rng"] = {"torch": torch.get_rng_state()}
        return state

    def _check_recipe(self, path, ckpt, override):
        """The checkpoint's recorded recipe against this config: its differences, or an error without override."""
        ours = canonical_arch_options(self.cfg.arch, self.cfg.arch_options)
        if ckpt.get("arch") != self.cfg.arch or canonical_arch_options(self.cfg.arch, ckpt.get("arch_options")) != ours:
            raise RecipeMismatchError(f"{path} holds {ckpt.get('arch')} {ckpt.get('arch_options')}, "
                                      f"but this run trains {self.cfg.arch} {self.cfg.arch_options}")
        diffs = recipe_differences(ckpt.get("config", {}), self.cfg)
        if ckpt.get("data", self.data) != self.data:
            diffs.append(f"data: recorded {describe_data(ckpt['data'])}, given {describe_data(self.data)}")
        if diffs and not override:
            raise RecipeMismatchError(f"{path} was trained with other settings: {'; '.join(diffs)}. Leave those "
                                      "settings out to continue the recorded recipe, or override them on purpose "
                                      "(--override, or override=True)")
        return diffs

    def load_state(self, path, stage=None, override=False, ckpt=None):
        """Resume from a checkpoint file; `stage` starts that stage (0-based) from the checkpoint's epoch.

        The checkpoint's recorded recipe must match this config; `override=True` accepts the differences and
        writes them into the history. An earlier stage than the checkpoint's continues it: a stage-one checkpoint
        of a run whose stage one proved too short goes on at lr 0.1 under longer stages (with `override`), exactly
        as a run planned that way from the start.
        """
        ckpt = load_checkpoint(path) if ckpt is None else ckpt
        if not isinstance(ckpt, dict) or "optimizer" not in ckpt or "rng" not in ckpt:
            raise ValueError(f"{path} holds a model to predict with, not a run to resume (no optimizer state): "
                             "resume from a run folder's ckpt_<epoch>.pth, or start a new run")
        diffs = self._check_recipe(path, ckpt, override)
        self.net.load_state_dict(check_weights(ckpt["model"], path))
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        self.counters = Counters(**{f.name: ckpt[f.name] for f in fields(Counters)})
        self.saved = list(ckpt.get("saved", []))
        self.history = {k: list(v) for k, v in ckpt["history"].items()}  # saved at its epoch: nothing later
        if "hardware" not in self.history:  # written before epochs recorded it; a run may have changed machines
            self.history["hardware"] = ["not recorded"] * len(self.history["epoch"])
        if diffs:
            self.history.setdefault("overrides", []).append(f"from epoch {self.epoch}: {'; '.join(diffs)}")
        if stage is not None and stage != self.stage:
            self.counters.start_stage(stage)
            ended = [e for e in self.history["stage_ends"] if e < self.epoch][:max(stage - 1, 0)]
            self.history["stage_ends"] = ended + [self.epoch] * (stage > 0)
        if self.folder is not None:
            self.folder.claimed = True  # its own run continues
        self._restore_best()
        return self

    def _restore_best(self):
        """Rewrite best.pth when a save was killed between the checkpoint and best.pth of the best epoch."""
        val = self.history["val_acc"]
        if self.folder is None or not val or val.index(max(val)) + 1 != self.epoch:
            return
        if self.folder.best_epoch() != self.epoch:
            self.folder.save_best(self.state(with_optimizer=False))

    def resume(self, source=None, stage=None, override=False):
        """Resume from a file, or from the newest readable checkpoint of a folder (default: the run folder)."""
        source = Path(source) if source else self.run_dir
        if source is None:
            raise FileNotFoundError("nothing to resume from: give a checkpoint file or a run folder")
        for path, ckpt in readable_checkpoints(source):
            return self.load_state(path, stage, override, ckpt)

    def _save(self, stage_end=False, best=False, pause=False):
        if self.folder is None:
            return
        # A resume point at every stage end, every save_every epochs, at a pause, and after a run's first epoch:
        # a folder holding best.pth always holds a checkpoint to resume from. Before best.pth: a kill between the
        # two is healed on resume.
        if stage_end or pause or not self.saved or self.epoch % self.cfg.save_every == 0:
            self.saved = self.folder.save(lambda kept: self.state(saved=kept), self.epoch, self.saved,
                                          self.cfg.keep_last, self.history["stage_ends"])
        if best:
            self.folder.save_best(self.state(with_optimizer=False))

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

    def run_epoch(self, pause=False):
        """Train one epoch at the current stage's lr, validate, log and checkpoint; True if the stage ended.

        `pause`: the run stops after this epoch for now, so a resume checkpoint is written whatever save_every says.
        """
        if self.folder is not None and not self.folder.claimed:
            self.folder.claim(fresh=self.epoch == 0)
        lr = stage_lr(self.cfg, self.stage, self.epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.train_loader.set_epoch(self.epoch)
        desc = f"epoch {self.epoch + 1}/{self.cfg.stages[-1][1]}"
        tr = train_epoch(self.model, self.train_loader, self.optimizer, self.criterion, self.device,
                         self.precision, self.scaler, desc, self.progress)
        val = evaluate(self.net, self.val_loader, self.device, self.precision) if self.rank == 0 else None
        if self.world_size > 1:
            tr, val = agree_across_ranks(tr, val, self.rank, self.device)
        self._check_finite(val)
        row = dict(epoch=self.epoch, stage=self.stage, lr=lr, train_loss=tr["loss"], train_acc=tr["acc"],
                   val_loss=val["loss"], val_acc=val["acc"], seconds=tr["seconds"], hardware=self.hardware)
        counters = self.counters
        counters.epoch += 1
        self._log(row)
        plateau = counters.plateaued(val["acc"], self.cfg.patience, self.cfg.min_delta)
        stage_end = plateau or counters.epoch >= self.cfg.stages[counters.stage][1]
        if stage_end:  # the checkpoint then says which stage comes next
            self.history["stage_ends"].append(counters.epoch)
            counters.start_stage(counters.stage + 1)
        best = val["acc"] > counters.best_val_acc
        counters.best_val_acc = max(counters.best_val_acc, val["acc"])
        self._save(stage_end=stage_end, best=best, pause=pause)
        return stage_end

    def _check_finite(self, val):
        """Stop before saving weights that cannot predict: a finite training loss can still leave NaN weights."""
        bad = nonfinite_entries(self.net.state_dict())
        if bad or not math.isfinite(val["loss"]):
            what = f"{bad[0]} holds NaN or infinite values" if bad else f"validation loss is {val['loss']}"
            raise NonFiniteLossError(f"epoch {self.epoch + 1} diverged ({what}) at lr "
                                     f"{self.optimizer.param_groups[0]['lr']:g}; nothing was saved for it: lower the "
                                     "learning rate, or use precision='fp32'")

    def fit(self, until_stage=None, stop_epoch=None):
        """Train the rest of the current stage and the following ones (up to `until_stage`, 0-based, inclusive).

        `stop_epoch` pauses the run at that epoch (a Colab session's time limit); resume() continues it.
        """
        last = len(self.cfg.stages) - 1 if until_stage is None else until_stage
        end = min(self.cfg.stages[min(last, len(self.cfg.stages) - 1)][1], stop_epoch or math.inf)
        first, schedule_end = self.epoch, min(self.cfg.stages[-1][1], stop_epoch or math.inf)
        with _progress_bar(max(end - first, 0), "run (epochs)", self.progress, leave=True) as bar:
            while self.stage <= last and (stop_epoch is None or self.epoch < stop_epoch):
                if self.epoch >= self.cfg.stages[self.stage][1]:  # resumed at or past this stage's end
                    self.counters.start_stage(self.stage + 1)
                    continue
                self.run_epoch(pause=stop_epoch is not None and self.epoch + 1 >= stop_epoch)
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
    cfg, data, run_dir = shrink_run_for_tests(cfg, data, run_dir)
    trainer = Trainer(cfg, data, run_dir, **options)
    if latest_checkpoint(run_dir):
        trainer.resume()
        print(f"resumed from {latest_checkpoint(run_dir)}: epoch {trainer.epoch}, stage {trainer.stage + 1}")
    return trainer
