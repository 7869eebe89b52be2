"""Time to predict the 10,000 test images: Loaded_model.predict's fast path against a plain fp32 eager loop.

Fast path: channels_last and the precision utils.resolve_precision picks (bf16 where it measures faster), batch 128.
Baseline: the model in fp32, NCHW, batch 100, as a plain evaluation loop (the course report's) would run
it. Same weights, same run.

    python bench/predict_throughput.py [--archs resnet20 resnet18]

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


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=["resnet20", "resnet18"])
    p.add_argument("--data", help="CIFAR-10 folder (else CIFAR10_DIR, data/)")
    args = p.parse_args()
    _, _, x_test, y_test = utils.load_cifar10(args.data)
    print(f"CPU, torch {torch.__version__}, {torch.get_num_threads()} threads, fast path precision "
          f"{utils.resolve_precision('cpu')}")
    print("\n| weights | fp32 loop (s) | Loaded_model.predict (s) | speed-up | fp32 accuracy | fast accuracy |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for arch in args.archs:
        path, trained = ROOT / "checkpoints" / f"{arch}.pth", True
        if not path.is_file():
            path, trained = Path(tempfile.mkdtemp()) / f"{arch}_untrained.pth", False
            torch.manual_seed(0)
            utils.save_checkpoint({"arch": arch, "model": utils.build_model(arch).state_dict()}, path)
        model = utils.Loaded_model(path)
        model.predict(x_test[:500], verbose=False)  # warm-up
        fast, t_fast = timed(lambda: model.predict(x_test, verbose=False))
        base, t_base = timed(lambda: plain_fp32_predict(utils.Loaded_model(path, precision="fp32").model,
                                                        model.preprocess, x_test))
        acc = (lambda y: f"{np.mean(y == y_test):.4f}") if trained else (lambda y: "untrained")
        print(f"| {path.name} ({model.arch}) | {t_base:.1f} | {t_fast:.1f} | {t_base / t_fast:.1f}x | "
              f"{acc(base)} | {acc(fast)} |")


if __name__ == "__main__":
    main()
