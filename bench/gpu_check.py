"""The one script to run on a GPU (a Colab T4, say): checks the CUDA path that no test here can run.

    python bench/gpu_check.py [--device cuda:0] [--steps 50]

Prints: the precision 'auto' chose against the device's compute capability; training images/s of ResNet20 and
ResNet18 in fp32, fp16 and bf16 (bf16 where the device supports it) for --steps steps each, with the
host-device synchronizations per step; an fp16 checkpoint saved on the GPU and loaded on the CPU; and
Loaded_model on the GPU against the CPU on the 10,000 test images (predictions that differ). Without CUDA it says
so and exits 0. About 3 minutes on a T4.
"""
import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import utils  # noqa: E402


def precision_report(device):
    """One line: the device, its capability, and what 'auto' picks there."""
    major, minor = utils.cuda_capability(device)
    return (f"{torch.cuda.get_device_name(device)}: compute capability {major}.{minor}, precision 'auto' -> "
            f"{utils.resolve_precision(device)} (bf16 needs 8.0 or higher; else fp16 with a grad scaler)")


def train_rate(arch, device, precision, steps, batch_size=128):
    """(images/s, host-device syncs per step) of `steps` training steps (whole passes of 4 batches) after 4
    warm-up steps, synthetic data, through utils.train_epoch."""
    x = np.random.default_rng(0).integers(0, 256, (batch_size * 4, 32, 32, 3), dtype=np.uint8)
    y = np.arange(len(x)) % 10
    cfg = utils.TrainConfig(arch=arch, arch_options={"shortcut": "A"} if arch == "resnet20" else {},
                            batch_size=batch_size, precision=precision)
    trainer = utils.Trainer(cfg, (x, y, x[:batch_size], y[:batch_size]), None, device, progress=False)

    def run(n):  # the engine's own training step, whole passes over the loader's 4 batches
        for _ in range(n // len(trainer.train_loader)):
            utils.train_epoch(trainer.model, trainer.train_loader, trainer.optimizer, trainer.criterion, device,
                              trainer.precision, trainer.scaler, progress=False)

    steps = max(steps // 4, 1) * 4
    run(4)
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("warn")  # every synchronizing call warns: count them
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        run(steps)
        torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    return steps * batch_size / seconds, syncs / steps


def checkpoint_round_trip(device):
    """An fp16 run's checkpoint written on the GPU and loaded on the CPU: 'ok' or what went wrong."""
    x = np.random.default_rng(1).integers(0, 256, (256, 32, 32, 3), dtype=np.uint8)
    y = np.arange(256) % 10
    cfg = utils.TrainConfig(arch="resnet8", stages=[(0.1, 1)], batch_size=128, precision="fp16")
    with tempfile.TemporaryDirectory() as tmp:
        trainer = utils.Trainer(cfg, (x, y, x, y), Path(tmp) / "run", device, progress=False)
        trainer.fit()
        ckpt = utils.load_checkpoint(Path(tmp) / "run" / "ckpt_1.pth")
        tensors = [v for v in ckpt["model"].values()] + [
            v for s in ckpt["optimizer"]["state"].values() for v in s.values() if isinstance(v, torch.Tensor)]
        on_gpu = sum(t.device.type != "cpu" for t in tensors)
        model = utils.Loaded_model(Path(tmp) / "run" / "best.pth", device="cpu", precision="fp32")
        return f"fp16 checkpoint saved on {device}, loaded on the CPU; tensors not on the CPU: {on_gpu}; " \
               f"CPU predicts {len(model.predict(x[:16], verbose=False))} images"


def loaded_model_agreement(device, release):
    """Test predictions of a release file on the GPU against the CPU."""
    _, _, x_test, y_test = utils.load_cifar10()
    cpu = utils.Loaded_model(release, device="cpu", precision="fp32").predict(x_test, verbose=False)
    gpu_model = utils.Loaded_model(release, device=device)
    gpu = gpu_model.predict(x_test, verbose=False)
    return (f"{Path(release).name}: CPU fp32 {np.mean(cpu == y_test):.4f}, {device} {gpu_model.precision} "
            f"{np.mean(gpu == y_test):.4f}; predictions that differ: {int(np.sum(cpu != gpu))} of {len(y_test)}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--release", default=str(utils.PROJECT_DIR / "checkpoints" / "resnet20.pth"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device here: nothing to check (run this on a GPU runtime)")
        return 0
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    print(precision_report(device))
    precisions = ["fp32", "fp16"] + ["bf16"] * (utils.cuda_capability(device) >= (8, 0))
    print(f"training, {args.steps} steps of batch 128 each (bf16 only on capability 8.0 or higher):")
    for arch in ("resnet20", "resnet18"):
        for precision in precisions:
            rate, syncs = train_rate(arch, device, precision, args.steps)
            print(f"  {arch:9s} {precision}: {rate:8.0f} images/s, {syncs:.2f} host-device syncs a step")
    print(checkpoint_round_trip(device))
    print(loaded_model_agreement(device, args.release))
    return 0


if __name__ == "__main__":
    sys.exit(main())
