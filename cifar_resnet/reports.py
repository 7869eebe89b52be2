"""The reference reports this project grew from, and this project's run of each report's system: the
"reports reproduced" table of the README and of notebook 04.

Each report is named by its subject and result. Its figure is the test accuracy it states; how it chose the
epoch or model behind that figure is quoted from it. This project's figures are measured on the test set once,
on the epoch the validation split chose.
"""
from __future__ import annotations

from .checkpoints import load_checkpoint
from .runtime import PROJECT_DIR

__all__ = ["REFERENCE_REPORTS", "reports_table"]

# One entry a (report, system). `release` is this project's file for that system; it may not exist yet.
REFERENCE_REPORTS = (
    dict(report="ResNet18 course report", system="CIFAR ResNet18, staged SGD", figure=92.12, epochs=164,
         chosen="on the test curve (stopped where its test accuracy levelled)",
         release="checkpoints/resnet18.pth"),
    dict(report="ResNet20 report", system="ResNet20, projection (option B) shortcuts", figure=92.07, epochs=200,
         chosen="best test epoch of 200", release="checkpoints/resnet20b.pth"),
    dict(report="224-pixel ResNet18 report", system="ImageNet-layout ResNet18, images resized to 224",
         figure=88.0, epochs=20, chosen="last epoch", release="checkpoints/resnet18_imagenet.pth"),
    dict(report="ResNet v1/v2 report", system="ResNet v1-110, standard blocks (Adam)", figure=89.81,
         epochs=200, chosen="size on a validation split, then retrained", release="checkpoints/resnet110b.pth"),
    dict(report="ResNet v1/v2 report", system="ResNet v2-164, pre-activation bottlenecks (Adam)",
         figure=87.29, epochs=200, chosen="size on a validation split, then retrained",
         release="checkpoints/preact_resnet164.pth"),
    dict(report="ResNet v1/v2 companion report", system="ResNet v2-164 with SGD", figure=86.04, epochs=50,
         chosen="not stated", release="checkpoints/preact_resnet164.pth"),
)


def reports_table(measured):
    """The Markdown rows of the "reports reproduced" table.

    measured: {release path: (single view, flip TTA) test accuracy in percent}, for the release files that exist; a
    report whose release is not in it gets a row that says so. Our single-view figure is bold where it is at least
    the report's. Epochs, training hours (wall clock, on the machines the history names) and the selected epoch
    are read from each release file's own history.
    """
    lines = ["| report | system | its figure | its epochs | its choice | ours: single view | flip TTA | "
             "epochs | training hours | our choice |",
             "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- |"]
    for entry in REFERENCE_REPORTS:
        theirs = (f"| {entry['report']} | {entry['system']} | {entry['figure']:.2f}% | {entry['epochs']} | "
                  f"{entry['chosen']} |")
        if entry["release"] not in measured:
            lines.append(f"{theirs} not released yet | | | | |")
            continue
        meta = load_checkpoint(PROJECT_DIR / entry["release"])
        history = meta["history"]
        single, tta = measured[entry["release"]]
        ours = f"**{single:.2f}%**" if single >= entry["figure"] else f"{single:.2f}%"
        lines.append(f"{theirs} {ours} | {tta:.2f}% | {len(history['epoch'])} | "
                     f"{sum(history['seconds']) / 3600:.1f} | best validation epoch ({meta['epoch']}) |")
    return lines
