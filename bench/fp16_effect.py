"""What storing a checkpoint's weights in fp16 costs: test accuracy of the fp32 and the fp16 release of the same epoch.

    python bench/fp16_effect.py checkpoints/resnet18_long_run/best.pth [more fp32 checkpoints ...]

Each checkpoint is exported twice with utils.export_release (half=False, half=True) to a temporary folder; both are
scored on the real test set in fp32 compute, single view and with flip TTA, so only the stored weights differ.
The release rule (README, Results) is that fp16 storage may move test accuracy by no more than 0.05 points.
"""
import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import utils  # noqa: E402


def compare(path, x_test, y_test, folder):
    """One Markdown row: file sizes and test accuracies of the fp32 and the fp16 export of `path`."""
    scores, sizes = {}, {}
    for half in (False, True):
        out = utils.export_release(path, Path(folder) / f"{'fp16' if half else 'fp32'}.pth", half=half)
        model = utils.Loaded_model(out, precision="fp32")
        scores[half] = [model.score(x_test, y_test, tta=tta) * 100 for tta in (False, True)]
        sizes[half] = Path(out).stat().st_size / 2**20
    (s32, t32), (s16, t16) = scores[False], scores[True]
    return (f"| `{path}` | {sizes[False]:.1f} MiB | {sizes[True]:.1f} MiB | {s32:.2f}% | {s16:.2f}% | {s16 - s32:+.2f} "
            f"| {t32:.2f}% | {t16:.2f}% | {t16 - t32:+.2f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="checkpoints whose weights are fp32 (a run's best.pth, or a release)")
    p.add_argument("--data", help="CIFAR-10 folder (else CIFAR10_DIR, data/)")
    args = p.parse_args()
    _, _, x_test, y_test = utils.load_cifar10(args.data)
    print("| checkpoint | fp32 file | fp16 file | single, fp32 | single, fp16 | change "
          "| TTA, fp32 | TTA, fp16 | change |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for path in args.paths:
        with tempfile.TemporaryDirectory() as folder:
            print(compare(path, x_test, y_test, folder), flush=True)


if __name__ == "__main__":
    main()
