"""The README's results rows: each release file evaluated once on the real test set through Loaded_model.

    python bench/release_table.py [checkpoints/resnet20.pth ...]

Columns: release file, model, parameters, the selected epoch, the schedule, weight decay and label smoothing (when
used), the validation accuracy it was selected on, test accuracy single view and with flip TTA (fp32, so the figures
are the same on every CPU), training time (the whole run's, and the median seconds an epoch), and the hardware and
precision of each span of epochs.
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import utils  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def hardware_runs(meta):
    """'epochs 1-120: A; 121-164: B' from the per-epoch hardware record."""
    labels = meta["history"].get("hardware") or ["not recorded"] * len(meta["history"]["epoch"])
    starts = [i for i in range(len(labels)) if i == 0 or labels[i] != labels[i - 1]] + [len(labels)]
    if len(starts) == 2:
        return labels[0]
    return "; ".join(f"epochs {a + 1}-{b}: {labels[a]}" for a, b in zip(starts, starts[1:]))


def row(path, x_test, y_test):
    """One Markdown row of the results table for a release file."""
    model = utils.Loaded_model(path, precision="fp32")
    meta = model.meta
    single, tta = model.score(x_test, y_test) * 100, model.score(x_test, y_test, tta=True) * 100
    hist = meta["history"]
    hours, per_epoch = sum(hist["seconds"]) / 3600, float(np.median(hist["seconds"]))
    label = meta["arch"] + "".join(f" ({v})" for v in meta.get("arch_options", {}).values())
    cfg = meta["config"]
    recipe = " / ".join(f"{lr:g}:{end}" for lr, end in cfg["stages"]) + f", weight decay {cfg['weight_decay']:g}"
    if cfg.get("label_smoothing"):
        recipe += f", label smoothing {cfg['label_smoothing']:g}"
    return (f"| `{Path(path).relative_to(ROOT)}` | {label} | {utils.count_parameters(model.model):,} | "
            f"epoch {meta['epoch']} of {cfg['stages'][-1][1]} (stages {recipe}) | {meta['best_val_acc'] * 100:.2f}% | "
            f"{single:.2f}% | {tta:.2f}% | {hours:.1f} h for {len(hist['seconds'])} epochs (median {per_epoch:.0f} s), "
            f"{hardware_runs(meta)} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="*", default=sorted(str(p) for p in (ROOT / "checkpoints").glob("*.pth")))
    p.add_argument("--data", help="CIFAR-10 folder (else CIFAR10_DIR, data/)")
    args = p.parse_args()
    _, _, x_test, y_test = utils.load_cifar10(args.data)
    print("| release file | model | parameters | selected epoch | validation acc (selection) | test acc, single view "
          "| test acc, flip TTA | training |")
    print("| --- | --- | ---: | --- | ---: | ---: | ---: | --- |")
    for path in args.paths:
        print(row(Path(path).resolve(), x_test, y_test))


if __name__ == "__main__":
    main()
