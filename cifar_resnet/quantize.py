"""int8 inference on x86 CPUs: post-training static quantization (PT2E) of a trained network, calibrated on
images of the training split and lowered to oneDNN's int8 convolutions; the calibration statistics are kept
beside the release file.

Taught in notebook 04 (fp32, bf16 and int8 compared). `Loaded_model(path, precision="int8")` is the way in.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import logging
import platform
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .checkpoints import DamagedCheckpointError, file_sha256, load_checkpoint, payload_digest, save_checkpoint
from .data import as_image_batch, load_cifar10, train_val_split
from .runtime import cpu_has_vnni

__all__ = ["INT8_BATCH", "INT8_CALIBRATION", "Int8UnavailableError", "activation_bits",
           "int8_unavailable_reason", "calibration_images", "quantize_int8", "int8_cache_key"]

INT8_BATCH = 128  # the lowered graph's fixed batch; a shorter last batch is padded
INT8_CALIBRATION = 1000  # images of the training split, drawn with seed 0, unless the caller gives its own


class Int8UnavailableError(RuntimeError):
    """int8 inference cannot run here; the message names what is missing and the precisions that work."""


@functools.lru_cache(maxsize=None)
def _pt2e_tools():
    """(prepare, convert, make_quantizer, lower, library) from torchao 0.11+, else from a torch that still ships
    them."""
    with _quiet_libraries():
        return _import_pt2e_tools()


@contextlib.contextmanager
def _quiet_libraries():
    """Silence the deprecation notes torchao and the int8 lowering print, which a reader cannot act on."""
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
        config = xiq.get_default_x86_inductor_quantization_config(reduce_range=activation_bits() == 7)
        return quantizer.set_global(config)

    return prepare_pt2e, convert_pt2e, make_quantizer, lower, library


def activation_bits():
    """8, or 7 on a CPU without VNNI. There oneDNN multiplies uint8 activations by int8 weights with
    vpmaddubsw, which adds each pair of products in 16 bits and saturates when both are large; measured on an
    AMD EPYC family 25 (AVX2), ResNet18 lost 1.9 points of test accuracy on 3,000 test images in int8 with 8-bit
    activations, 0.2 with 7 (PyTorch's reduce_range exists for this)."""
    return 8 if cpu_has_vnni() else 7


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
        with _quiet_libraries():  # the 224-pixel stem's max-pool stays in float, which the quantizer warns of
            prepared = prepare(graph, make_quantizer())  # folds batch norm into the convolutions of the copy
        observers = _observers(prepared)
        stats = _cached_statistics(cache, key, observers) if cache else None
        if stats is None:
            images = calibration_images() if calibration is None else calibration
            xt = as_image_batch(images, size)
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


def int8_cache_key(path, preprocess, network, calibration=None):
    """What a release's int8 statistics depend on: the file's bytes, the normalization and network it is loaded
    with (a bare state dict takes them from the caller), torch, the quantization library and the images."""
    images = (f"training split, {INT8_CALIBRATION} images, seed 0" if calibration is None
              else f"given images sha256 {payload_digest({'images': torch.as_tensor(np.asarray(calibration))})}")
    return (f"{Path(path).name} sha256 {file_sha256(path)} | {network} | {preprocess} | torch {torch.__version__} | "
            f"{_pt2e_tools()[4]} | {activation_bits()}-bit activations | {images}")
