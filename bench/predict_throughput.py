"""Time to predict the 10,000 test images: Loaded_model in fp32, bf16 and int8 against a plain fp32 eager loop.

Loaded_model: channels_last, batch 128, weights in the compute dtype (fp32, bf16), or int8 (post-training
quantization calibrated on 1,000 training images, lowered to oneDNN's int8 convolutions; calibration is not
timed, and is done once per release file, then read from checkpoints/<arch>.int8-statistics.pth).
Baseline: the model in fp32, NCHW, batch 100, as a plain evaluation loop (the course report's) would run it.
Same weights, same run; each timing is the faster of two passes.

    python bench/predict_throughput.py [--archs resnet20 resnet18] [--precisions fp32 bf16 int8]

Each model is read from checkpoints/<arch>.pth; where that file is absent, freshly initialized weights are
timed instead (the accuracy columns then say "untrained").
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import utils  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def plain_fp32_predict(model, preprocess, x, batch_size=100):
    """The baseline: fp32, NCHW, batch 100."""
    model = model.float().to(memory_format=torch.contiguous_format).eval()
    xt = utils.images_to_tensor(x)
    return torch.cat([model(preprocess(xt[i:i + batch_size])).argmax(1) for i in range(0, len(xt), batch_size)]).numpy()


def timed(fn, repeats=2):
    """fn's result and its fastest time over `repeats` calls (a shared machine only ever slows a pass down)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return out, best


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=["resnet20", "resnet18"])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "int8"], choices=["fp32", "bf16", "int8"])
    p.add_argument("--data", help="CIFAR-10 folder (else CIFAR10_DIR, data/)")
    args = p.parse_args()
    if "int8" in args.precisions and (reason := utils.int8_unavailable_reason("cpu")):
        p.error(reason)
    _, _, x_test, y_test = utils.load_cifar10(args.data)
    print(f"CPU {utils.cpu_fields().get('model name', '?')}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads; precision 'auto' picks {utils.resolve_precision('cpu')} here")
    head = " | ".join(f"{q} (s)" for q in args.precisions)
    accs = " | ".join(f"{q} accuracy" for q in args.precisions)
    ratio = ["int8 / bf16"] if {"int8", "bf16"} <= set(args.precisions) else []
    print(f"\n| weights | fp32 loop (s) | {head} | {' | '.join(ratio + [accs])} |")
    print("| --- |" + " ---: |" * (1 + 2 * len(args.precisions) + len(ratio)))
    for arch in args.archs:
        path, trained = ROOT / "checkpoints" / f"{arch}.pth", True
        if not path.is_file():
            path, trained = Path(tempfile.mkdtemp()) / f"{arch}_untrained.pth", False
            torch.manual_seed(0)
            utils.save_checkpoint({"arch": arch, "model": utils.build_model(arch).state_dict()}, path)
        acc = (lambda y: f"{np.mean(y == y_test):.4f}") if trained else (lambda y: "untrained")
        seconds, scores = {}, {}
        for precision in args.precisions:
            model = utils.Loaded_model(path, precision=precision)
            model.predict(x_test[:500], verbose=False)  # warm-up
            labels, seconds[precision] = timed(lambda: model.predict(x_test, verbose=False))
            scores[precision] = acc(labels)
        base, t_base = timed(lambda: plain_fp32_predict(utils.Loaded_model(path, precision="fp32").model,
                                                        model.preprocess, x_test))
        cells = [f"{seconds[q]:.1f}" for q in args.precisions]
        cells += [f"{seconds['int8'] / seconds['bf16']:.2f}"] * bool(ratio)
        cells += [scores[q] for q in args.precisions]
        print(f"| {path.name} ({arch}) | {t_base:.1f} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
