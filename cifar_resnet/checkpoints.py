"""Checkpoint files and run folders: the digest, the atomic write, safe loading, the one release payload, the run
folder (its lock, the fresh-folder check, pruning, repair of best.pth), and small JSON histories.

Taught in notebook 03 (checkpoints and resume) and notebook 04 (loading a release).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
from dataclasses import asdict
from pathlib import Path

import torch

from .data import CLASSES
from .models import strip_module_prefix
from .runtime import library_versions

try:
    import fcntl
except ImportError:  # Windows has no flock: run folders are then unguarded
    fcntl = None

__all__ = ["DIGEST_KEY", "DamagedCheckpointError", "UnsafeCheckpointError", "RunFolderError", "payload_digest",
           "file_sha256",
           "atomic_write", "write_json", "save_checkpoint", "load_checkpoint", "nonfinite_entries", "check_weights",
           "checkpoint_epochs",
           "latest_checkpoint", "readable_checkpoints", "to_cpu", "release_payload", "export_release", "RunFolder",
           "save_history", "load_history"]

DIGEST_KEY = "sha256"  # a checkpoint's digest of everything else in it, checked on every load


class DamagedCheckpointError(ValueError):
    """A checkpoint file that cannot be read, or whose contents no longer match its digest."""


class UnsafeCheckpointError(DamagedCheckpointError):
    """A file whose pickle names something other than tensors and plain data: refused, never executed.

    A damaged file (one flipped bit in a name) reads the same way, so it counts as damaged too: a run folder's
    resume falls back past it, and a cache built from it is rebuilt.
    """


class RunFolderError(RuntimeError):
    """A run folder this process may not train in: in use by another process, or holding another run."""

# ----------------------------------------------------------------------------- digests and atomic writes


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


def file_sha256(path):
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write(path, write):
    """Call write(file) on a temporary file beside `path`, sync it, then rename it over `path`.

    A kill at any moment leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(obj, path):
    """Write JSON atomically (see atomic_write)."""
    return atomic_write(path, lambda f: f.write((json.dumps(obj, indent=1) + "\n").encode()))

# ----------------------------------------------------------------------------- checkpoint files


def save_checkpoint(payload, path):
    """torch.save with a digest, written atomically: an interrupted save never destroys `path`."""
    return atomic_write(path, lambda f: torch.save({**payload, DIGEST_KEY: payload_digest(payload)}, f))


def load_checkpoint(path):
    """Load a checkpoint on the CPU without running pickled code (weights_only=True), its digest checked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported[^\n]*?(?= was not an allowed|\n|$)", str(e))
        detail = f" ({found.group(0).strip()})" if found else ""
        raise UnsafeCheckpointError(
            f"{path} is refused, never executed: its pickle refers to more than tensors and plain data{detail}. "
            "Either it is damaged (use another copy, or the run's previous checkpoint) or it holds pickled Python "
            "objects, which could run arbitrary code: re-save just its state_dict with torch.save.") from None
    except Exception as e:  # truncated, overwritten or not a torch file at all
        raise DamagedCheckpointError(f"{path} is damaged or not a PyTorch checkpoint: it cannot be read "
                                     f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if isinstance(ckpt, dict) and DIGEST_KEY in ckpt and ckpt[DIGEST_KEY] != payload_digest(ckpt):
        raise DamagedCheckpointError(f"{path} is damaged: its contents no longer match the SHA-256 digest written "
                                     "when it was saved. Use another copy (or the previous checkpoint of the run).")
    return ckpt


def nonfinite_entries(state_dict):
    """Names of the floating tensors that hold NaN or infinite values."""
    return [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]


def check_weights(state_dict, source):
    """Refuse weights that cannot be a trained network's: non-finite values, negative batch-norm variances."""
    if bad := nonfinite_entries(state_dict):
        raise DamagedCheckpointError(f"{source}: {bad[0]} holds NaN or infinite values; these weights cannot predict")
    for k, v in state_dict.items():
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


def to_cpu(obj):
    """A copy of nested dicts, lists and tuples with every tensor moved to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj

# ----------------------------------------------------------------------------- release files (notebooks 03, 04)


def release_payload(arch, arch_options, preprocess, config, net, history, precision, **extra):
    """What every model file holds, whoever trained it: what Loaded_model and the hub read, the recipe, the history.

    Training checkpoints add their counters and optimizer state; the speed run adds its test-time views.
    """
    return {"arch": arch, "arch_options": dict(arch_options), "preprocess": asdict(preprocess),
            "input_size": preprocess.size, "classes": list(CLASSES), "config": config,
            "model": {k: v.detach().cpu() for k, v in strip_module_prefix(net.state_dict()).items()},
            "history": history, "precision": precision, "versions": library_versions(), **extra}


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

# ----------------------------------------------------------------------------- run folders (notebook 03)

_HELD_LOCKS = {}  # run folder -> file descriptor of its lock, held until this process ends


class RunFolder:
    """One training run's folder: ckpt_<epoch>.pth, best.pth and the OS lock that admits one writer.

    The kernel releases the lock when its holder dies, so a killed run never leaves a stale lock behind.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.claimed = False  # True once this process may write a run here: locked, and checked if new

    def claim(self, fresh):
        """Lock the folder and, for a new run (`fresh`), refuse one that holds another run's checkpoints."""
        self.lock()
        if fresh and not self.claimed:
            self.check_fresh()
        self.claimed = True
        return self

    def lock(self):
        """Hold the folder's lock for the rest of this process; another process is refused at once, by name."""
        key = self.path.resolve()
        if key not in _HELD_LOCKS:
            self._acquire(key)
        for tmp in self.path.glob(".*.tmp"):  # left by killed saves; with the lock, no one else is writing
            tmp.unlink(missing_ok=True)
        return self

    def _acquire(self, key):
        """Lock the folder itself (not a file in it, which a user could delete) and note the holder in .lock."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDONLY)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RunFolderError(f"{key} is in use by another training process (pid {self._holder()}); "
                                     "wait for it to end, or choose another --out") from None
        (self.path / ".lock").write_text(str(os.getpid()))
        _HELD_LOCKS[key] = fd

    def _holder(self):
        """The pid the lock's holder wrote into .lock, or 'unknown'."""
        with contextlib.suppress(OSError):
            return (self.path / ".lock").read_text().strip() or "unknown"
        return "unknown"

    def check_fresh(self):
        """Refuse to start a new run in a folder that already holds another run's checkpoints."""
        found = [p.name for p in sorted(self.path.glob("ckpt_*.pth"))] + [p.name for p in self.path.glob("best.pth")]
        if found:
            raise RunFolderError(f"{self.path} already holds a run ({', '.join(found[-3:])}); continue it with "
                                 "--resume (resume() in Python), or choose a new --out folder for a new run")

    def save(self, state, epoch, saved, keep_last, stage_ends):
        """Write ckpt_<epoch>.pth, then delete the run's older files beyond the last `keep_last` (stage ends stay).

        `saved` lists the epochs this run wrote: the only files pruning may delete, never another run's. Returns
        the list after this save, which `state(saved)` records in the file itself.
        """
        saved = [e for e in saved if e != epoch] + [epoch]
        keep = set(saved[-keep_last:]) | set(stage_ends)
        kept = [e for e in saved if e in keep]
        save_checkpoint(state(kept), self.path / f"ckpt_{epoch}.pth")
        for e in sorted(set(saved) - keep):
            (self.path / f"ckpt_{e}.pth").unlink(missing_ok=True)
        return kept

    def save_best(self, state):
        """best.pth: a model to select, not to resume (no optimizer state), small enough to keep with the run."""
        save_checkpoint(state, self.path / "best.pth")

    def best_epoch(self):
        """The epoch best.pth holds, or None when it is missing or damaged."""
        with contextlib.suppress(FileNotFoundError, DamagedCheckpointError):
            return load_checkpoint(self.path / "best.pth")["epoch"]
        return None

# ----------------------------------------------------------------------------- small histories (notebooks 02, 05)


def save_history(checkpoint_path, out_path):
    """Write a run's architecture, recipe, data (image counts and digest) and per-epoch history, without the
    weights, as a small JSON file."""
    ckpt = load_checkpoint(checkpoint_path)
    keys = ("arch", "arch_options", "config", "history", "epoch", "data")
    return write_json({k: ckpt[k] for k in keys if k in ckpt}, out_path)


def load_history(path):
    """A record written by save_history: {'arch', 'arch_options', 'config', 'history', 'epoch', 'data'} ('data'
    in the records written since it was kept: {'train_images', 'val_images', 'sha256'})."""
    return json.loads(Path(path).read_text())
