"""Where the code runs: the device, the precision names and their dtypes, CPU facts, seeding, the requirements.

Taught in every notebook's setup cell (the runtime line) and in notebook 04 (why bf16 can be slower than fp32 on
a CPU). One vocabulary for precisions lives here: `PRECISIONS` for training and prediction, plus `"int8"` for
prediction on the CPU (`cifar_resnet.quantize`).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import math
import os
import platform
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from packaging.requirements import Requirement

__all__ = ["PROJECT_DIR", "PRECISIONS", "PREDICT_PRECISIONS", "DTYPES", "BF16_MIN_SPEEDUP", "check_precision",
           "precision_dtype", "resolve_precision", "autocast", "get_device", "cuda_capability", "cpu_info",
           "cpu_fields", "cpu_name", "cpu_has_native_bf16", "cpu_has_vnni", "cpu_bf16_speedup",
           "hardware_label", "machine_name", "AUTO_PRECISION_ENV", "auto_precision_override",
           "precision_choice", "runtime_summary", "setup_notebook", "runtime_requirements",
           "install_missing_requirements", "seed_everything", "library_versions", "COMPILE_CHOICES",
           "check_compile", "compiler_missing", "resolve_compile"]

PROJECT_DIR = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- precision names (notebooks 03, 04)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # what training and prediction accept; "auto" picks by device
PREDICT_PRECISIONS = PRECISIONS + ("int8",)  # prediction on an x86 CPU also takes int8, asked for by name
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BF16_MIN_SPEEDUP = 1.3  # 'auto' picks bf16 on a CPU only where its matmuls beat fp32 by this much
# What 'auto' picks on a CPU depends on the CPU; this variable fixes it, so the test suite can be run both ways on
# one machine (`CIFAR_AUTO_PRECISION=fp32 pytest --nbval`). Unset, 'auto' measures.
AUTO_PRECISION_ENV = "CIFAR_AUTO_PRECISION"


def check_precision(precision, allowed=PRECISIONS):
    """`precision` itself when it is one of `allowed`, else a one-line error listing them."""
    if precision not in allowed:
        raise ValueError(f"precision must be one of {', '.join(map(repr, allowed))}; got {precision!r}")
    return precision


def precision_dtype(precision):
    """The floating dtype a resolved precision computes in ('fp32', 'bf16' or 'fp16')."""
    return DTYPES[check_precision(precision, tuple(DTYPES))]


def resolve_precision(device, precision="auto"):
    """'fp32', 'bf16' or 'fp16' for 'auto' or a forced choice on this device."""
    if check_precision(precision) != "auto":
        return precision
    if torch.device(device).type == "cuda":
        # is_bf16_supported() is True on a T4 too (emulated since torch 2.3); bf16 tensor cores need capability 8.0
        return "bf16" if cuda_capability(device) >= (8, 0) else "fp16"
    forced = auto_precision_override()
    if forced:
        return forced
    # bf16 instructions alone don't make it faster: on one AVX512-BF16 Xeon without AMX, bf16 ran slower than fp32.
    return "bf16" if cpu_has_native_bf16() and cpu_bf16_speedup() >= BF16_MIN_SPEEDUP else "fp32"


def auto_precision_override():
    """'fp32' or 'bf16' when CIFAR_AUTO_PRECISION fixes what 'auto' picks on a CPU, else None."""
    value = os.environ.get(AUTO_PRECISION_ENV)
    if not value:
        return None
    if value not in ("fp32", "bf16"):
        raise ValueError(f"{AUTO_PRECISION_ENV} must be 'fp32' or 'bf16' (or unset); got {value!r}")
    return value


def autocast(device, precision):
    """Autocast context for a resolved precision (no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=precision_dtype(precision))

# ----------------------------------------------------------------------------- devices and CPU facts


def get_device(device=None):
    """The given device, else CUDA when available, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def cuda_capability(device):
    """(major, minor) compute capability of the given CUDA device (its index, or the current one without)."""
    return tuple(torch.cuda.get_device_capability(torch.device(device)))


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


def cpu_has_vnni():
    """True when this CPU multiplies 8-bit integers into 32-bit sums in one instruction (AVX512-VNNI, AVX-VNNI
    or AMX-INT8). Without it, int8 products are summed in 16 bits and can saturate (see quantize.py)."""
    return bool(set(cpu_fields().get("flags", "").split()) & {"avx512_vnni", "avx_vnni", "amx_int8"})


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


def _isa_label(flags):
    """The widest matrix instruction set among a CPU's flags, for labels: AMX, AVX512-BF16, AVX512, AVX2."""
    pairs = (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16"), ("avx512f", "AVX512"), ("avx2", "AVX2"))
    return next((label for flag, label in pairs if flag in flags), None)


def cpu_name():
    """The CPU's model name with its family: 'AMD EPYC family 25' (cloud CPUs often share one model name, "AMD
    EPYC", across generations that differ in what they compute fast)."""
    field = cpu_fields()
    name = field.get("model name", platform.processor() or "cpu")
    return f"{name} family {field['cpu family']}" if "cpu family" in field else name


def hardware_label(device, precision):
    """Where and how an epoch ran, for the history: 'AMD EPYC family 25 (AVX2), 2 threads, fp32' or 'Tesla T4, bf16'."""
    device = torch.device(device)
    if device.type == "cuda":
        tf32 = precision == "fp32" and cuda_capability(device) >= (8, 0) and torch.backends.cudnn.allow_tf32
        return f"{torch.cuda.get_device_name(device)}, {precision}{' (TF32 convolutions)' * tf32}"
    isa = _isa_label(set(cpu_fields().get("flags", "").split()))
    threads = torch.get_num_threads()
    return f"{cpu_name()}{f' ({isa})' if isa else ''}, {threads} thread{'s' * (threads != 1)}, {precision}"


def machine_name(label):
    """The machine of a hardware label, short enough for a table column: 'Intel(R) Xeon(R) Processor family 6
    (AVX512-BF16), 2 threads, fp32' -> 'Intel Xeon family 6'. Threads and precision have columns of their own."""
    name = label.split(",")[0]
    name = re.sub(r"\((R|TM|tm)\)|\bProcessor\b|\bCPU\b|@ [\d.]+GHz|\([A-Z0-9-]+\)$", "", name.strip())
    return " ".join(name.split())


def precision_choice(device):
    """Why 'auto' picks what it picks on this device, in words: 'bf16 matmul measured 0.6x fp32 on this CPU'."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = cuda_capability(device)
        return f"compute capability {major}.{minor}: {'' if major >= 8 else 'no '}bf16 tensor cores"
    if auto_precision_override():
        return f"fixed by {AUTO_PRECISION_ENV}"
    if not cpu_has_native_bf16():
        return "no bf16 instructions on this CPU"
    speedup = cpu_bf16_speedup()
    verdict = "faster" if speedup >= BF16_MIN_SPEEDUP else "not faster"
    return f"bf16 instructions, bf16 matmul measured {speedup:.1f}x fp32: {verdict}"


# ----------------------------------------------------------------------------- torch.compile (notebook 03)

COMPILE_CHOICES = ("auto", "on", "off")  # TrainConfig.compile and train.py --compile


def check_compile(choice):
    """'auto', 'on' or 'off' (True and False, as older checkpoints recorded it, read as 'on' and 'off')."""
    choice = {True: "on", False: "off"}.get(choice, choice) if isinstance(choice, bool) else choice
    if choice not in COMPILE_CHOICES:
        raise ValueError(f"compile must be one of {', '.join(map(repr, COMPILE_CHOICES))}; got {choice!r}")
    return choice


def compiler_missing(device):
    """Why torch.compile cannot build kernels for `device` here (a few words), or None when it can.

    Inductor writes C++ for a CPU, so it needs a C++ compiler (g++, or the one $CXX names), and Triton kernels for a
    GPU (the `triton` package). Without them a compiled model fails at its first step, not when it is built.
    """
    try:
        if torch.device(device).type == "cuda":
            from torch.utils._triton import has_triton  # private, but the check Inductor itself makes
            return None if has_triton() else "the triton package is missing"
        from torch._inductor.cpp_builder import get_cpp_compiler
        get_cpp_compiler()
        return None
    except Exception:  # noqa: BLE001 - InvalidCxxCompiler, or a torch whose private layout moved
        return "no C++ compiler found (g++ or $CXX)" if torch.device(device).type == "cpu" else \
            "no GPU compiler found"


def resolve_compile(device, choice="auto"):
    """(compile or not, why in a few words) for 'auto', 'on' or 'off' on this device.

    'auto' compiles on a GPU, where Inductor fuses the batch norms and activations into few kernels, and not on a
    CPU: there a compiled ResNet20 trains no faster than an eager one (its epochs alternated with eager ones in
    fresh processes, and the option-B ResNet20's own epochs, 56-59 s compiled against 53-59 s eager), while
    compiling takes 1 to 3 minutes. 'on' compiles unless no compiler is found, and says so instead of failing at
    the first step.
    """
    choice = check_compile(choice)
    device = torch.device(device)
    if choice == "off":
        return False, "compile off"
    if choice == "auto" and device.type == "cpu":
        return False, "auto: eager, no faster compiled on a CPU"
    missing = compiler_missing(device)
    if missing:
        return False, f"not compiled: {missing}"
    return True, f"compiled{' (auto on a GPU)' if choice == 'auto' else ''}"


def runtime_summary():
    """One line: torch version, device (GPU name, or CPU model and threads) and what 'auto' picks, with why."""
    device = get_device()
    if device.type == "cuda":
        where = f"GPU {torch.cuda.get_device_name(device)}"
    else:
        threads = torch.get_num_threads()
        where = f"CPU {cpu_name()}, {threads} thread{'s' * (threads != 1)}"
    return f"torch {torch.__version__} | {where} | precision auto -> {resolve_precision(device)} " \
           f"({precision_choice(device)})"


def setup_notebook():
    """What every notebook's setup cell does once the project is importable: install what the runtime lacks
    (Colab has everything), then print the runtime line."""
    install_missing_requirements()
    print(runtime_summary())


def library_versions():
    """{'torch': ..., 'torchvision': ...} as plain strings (a checkpoint loads with weights_only=True)."""
    versions = {"torch": str(torch.__version__)}
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        versions["torchvision"] = importlib.metadata.version("torchvision")
    return versions

# ----------------------------------------------------------------------------- requirements (every setup cell)


def runtime_requirements(path=None):
    """The requirement lines of requirements.txt: what the notebooks need."""
    text = Path(path or PROJECT_DIR / "requirements.txt").read_text()
    return [line for line in (ln.split("#")[0].strip() for ln in text.splitlines())
            if line and not line.startswith("-")]


def install_missing_requirements(path=None):
    """pip-install only the notebooks' requirements that are absent or outside their range."""
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


def seed_everything(seed=0, deterministic=False):
    """Seed Python, NumPy and torch; optionally ask for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
