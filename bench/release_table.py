"""The release files measured once on the real test set: README's results rows, and the model card.

    python bench/release_table.py                           # the README's results rows
    python bench/release_table.py --card checkpoints/README.md   # write the model card
    python bench/release_table.py --speedrun                # the README's speed-run tables (recipes, peer)
    python bench/release_table.py --reports                 # the README's "reports reproduced" table

Test accuracy is measured through Loaded_model in fp32 (the same on every CPU), single view and with flip TTA.
Everything else in the card (recipe, selection, per-stage validation, time and hardware per span of epochs)
is read from the release files' own metadata and history, so it cannot drift from them; tests/test_release.py
regenerates the card and fails when it differs from the committed one.
"""
import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import utils  # noqa: E402
from peer import PEERS as PEER_FUNCTIONS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RELEASES = ["checkpoints/resnet20.pth", "checkpoints/resnet20b.pth", "checkpoints/resnet18.pth"]
# A release is named by its file's stem (the card's section and the hub's entry point); one architecture may
# have several releases (resnet20 with shortcut option A and B).
TITLES = {"resnet20": "ResNet20 (shortcut option A)", "resnet20b": "ResNet20 (projection shortcuts, option B)",
          "resnet18": "ResNet18 (CIFAR layout)", "resnet110b": "ResNet v1-110 (standard blocks, projection shortcuts)",
          "preact_resnet164": "ResNet v2-164 (pre-activation bottleneck blocks)",
          "resnet18_imagenet": "ResNet18 (ImageNet layout, images resized to 224)",
          "speedrun": "the speed run's network (whitening stem, three residual groups)",
          "speedrun94": "the speed run's network without shortcuts, trained with Muon",
          "speedrun95": "the speed run's wide network (widths 128/384/384, no shortcuts)"}
PEER_RESULTS = "checkpoints/speedrun_peer.json"  # bench/speedrun.py --peer airbench94 --json PEER_RESULTS
SPEEDRUN = utils.SPEEDRUN_RESULTS["tier94_sgd"][1]  # the first lap's release, the README's quick example
# release file -> (recipe name, results file) of each recipe's final protocol (bench/speedrun.py --recipe NAME)
SPEEDRUNS = {release: (name, runs) for name, (runs, release) in utils.SPEEDRUN_RESULTS.items()}


def speedrun_releases():
    """The speed-run releases whose final protocol has run: release file and results file both present."""
    return [release for release, (_, runs) in SPEEDRUNS.items() if (ROOT / release).is_file() and (ROOT / runs).is_file()]

# Runs that were releases once, or were run to compete for it; their files stay in git history (see the commands).
SUPERSEDED = """| run | recipe | best validation | test, single / flip TTA | file |
| --- | --- | ---: | ---: | --- |
| ResNet20, first run | stages 0.1:82 / 0.01:123 / 0.001:164, weight decay 1e-4 | 91.90% (epoch 92) | 91.43% / 92.34% | `git show b9f4094:checkpoints/resnet20.pth` |
| ResNet20, second run | stages 0.1:91 / 0.01:137 / 0.001:182 (the paper's iterations), weight decay 1e-4 | 91.82% (epoch 166) | not measured (lost on validation) | not kept |
| ResNet20, third run | stages 0.1:82 / 0.01:123 / 0.001:164, weight decay 5e-4 | 92.32% (epoch 135) | 91.75% / 92.53% | `git show aacc30e:checkpoints/resnet20.pth` |
| ResNet18, first run | stages 0.1:20 / 0.01:30 / 0.001:35, weight decay 5e-4 | 93.06% (epoch 32) | 92.86% / 93.46% | `git show 3a23041:checkpoints/resnet18.pth` |
| ResNet20 with projection (option B) shortcuts, first run | the release's recipe with seed 0 (its own validation split) | 92.66% (epoch 130) | 91.84% / 92.92% | `git show 293d276:checkpoints/resnet20b.pth` |

Each new run had its selection rule written down before it started: of all runs of a model, the one with the highest
validation accuracy becomes the release, whatever the test set says; a run that loses on validation is never
measured on the test set. `python bench/release_table.py FILE` prints a row for any file pulled out of history."""

# Runs whose schedule and selection rule stood in PLANNED below before they started (their cards say so).
PLANNED_BEFORE_THE_RUN = {"checkpoints/resnet20b.pth", "checkpoints/resnet110b.pth",
                          "checkpoints/preact_resnet164.pth", "checkpoints/resnet18_imagenet.pth"}

# Each run's schedule and selection rule, written here before the run starts and kept; a run moves to the cards
# above when it ends.
PLANNED = """## Runs under way

Each recipe and selection rule below was fixed before its run started. Selection: the epoch with the best
validation accuracy (5,000 held-out training images) becomes the release file, whatever the test set says; the
test set is measured once, on that file. A schedule is lengthened only if the last stage's validation accuracy is
still rising in its final 5 epochs, by one more stage-three span at lr 0.001, noted in the history.

| run | reproduces | recipe | folder |
| --- | --- | --- | --- |
| ResNet20, projection (option B) shortcuts, third run | the ResNet20 report: 92.07% test, which neither run of the release's recipe reached single view (91.84% and 91.82%, each chosen on its validation split) | the ResNet20 report's own schedule, cosine from lr 0.1 to 0 over 200 epochs (`--schedule cosine --stages 0.1:200`), with the release's weight decay 5e-4 and label smoothing 0.1, batch 128, seed 2. Rule, written before it starts: of the three runs, the one with the highest best validation accuracy becomes the release, whatever the test set says | `checkpoints/resnet20b_cosine_run` (not started) |
| ResNet v1, 110 layers (standard blocks, 18 a stage, projection shortcuts) | the ResNet v1/v2 report: 89.81% with Adam | SGD momentum 0.9, batch 128, one warm-up epoch at lr 0.01, then lr 0.1 / 0.01 / 0.001 to epochs 25 / 38 / 50 (`--stages 0.01:1 0.1:25 0.01:38 0.001:50`), weight decay 5e-4, flips and 4-pixel crops, seed 0. The warm-up is He et al.'s rule for their 110-layer net (lr 0.1 is too large to start converging); a first try without it ended its first epoch at 86.5% training error and was stopped there | `checkpoints/resnet110b_run` (not started) |
| ResNet v2, 164 layers (pre-activation bottleneck blocks, 18 a stage) | the same report: 87.29% with Adam; its companion: 86.04% with SGD | as ResNet v1 | `checkpoints/preact_resnet164_run` (not started) |
| ResNet18, ImageNet layout (7 × 7 stride-2 stem, max-pool), images resized to 224 | the 224-pixel ResNet18 report: 88.0% after 20 epochs at batch 64 | SGD momentum 0.9, batch 128, lr 0.1 / 0.01 / 0.001 to epochs 5 / 8 / 10, weight decay 5e-4, flips and 4-pixel crops before the resize, seed 0 (`--stages 0.1:5 0.01:8 0.001:10`). Ten epochs, not fifteen: an epoch measured 30 minutes on an AMD EPYC of family 25 (25 images/s in bf16, compiled or not), and the run's resume checkpoint (90 MB with its optimizer state) may cross sessions once only. Rule, written before it starts: if the best validation accuracy is below 89.0% after epoch 10, two more epochs at lr 0.001, noted in the history | `checkpoints/resnet18_imagenet_run` (not started) |
| the same ResNet18, ImageNet layout, on the 32-pixel images (no resize) | nothing: the comparison for the run above, what the 7 × 7 stride-2 stem and max-pool cost at CIFAR's size | as the run above, with `--input-size 32` | `checkpoints/resnet18_imagenet_32px_run`; its history is kept as `checkpoints/comparison/resnet18_imagenet_32px.json`, not released |

Where these networks differ from the reports' own (the ResNet v1/v2 report's code and printed modules):

* ResNet v1-110 (`resnet110`, shortcut B) has the report's standard block (3 × 3 convolution, batch norm, ReLU;
  3 × 3 convolution, batch norm; the sum, then ReLU), its 16-channel start layer with batch norm and ReLU, and its
  projection shortcut (a 1 × 1 convolution and batch norm) only where a block changes the width or halves the
  image. The report's start convolution has a bias; here it has none, since the batch norm after it would cancel it.
* ResNet v2-164 (`preact_resnet164`) has the report's pre-activation bottleneck (batch norm and ReLU before each of
  the 1 × 1, 3 × 3 and 1 × 1 convolutions, 4 × expansion, 16 / 32 / 64 bottleneck widths) and its projection at the
  first block of each stage, 16 to 64 channels in the first. The projection here is a 1 × 1 convolution without
  bias on the pre-activated input, as He et al.'s v2 paper has it; the report's printed projection has a bias. The
  stride sits in the 3 × 3 convolution; a final batch norm and ReLU come before the pooling.
* Both reports trained with Adam; these runs use this project's staged SGD, the recipe the other releases use.
* ResNet18 in the ImageNet layout (`resnet18_imagenet`) has the 224-pixel report's 7 × 7 stride-2 stem with batch
  norm and ReLU, its four stages of two basic blocks (64 to 512 channels) and its projection shortcuts. Its max-pool
  follows the stem, as in He et al. and torchvision; the report's code applies it after the first stage, which
  then runs at 112 × 112 pixels (about 3.2 G multiply-accumulates an image instead of 1.8 G). The report trained
  at a constant lr 0.01, batch 64, without augmentation, normalizing with mean and std 0.5."""

LIMITS = """## Known limits

* The test figures are CIFAR-10's own test set, 10,000 images from the same distribution as the training images.
  No claim is made about robustness to corruptions, other datasets or adversarial inputs.
* Calibration is whatever notebook 04 measures (reliability diagram and expected calibration error); the ResNet20
  release trained with label smoothing, the ResNet18 release without, so their confidences are not comparable.
* Each staged release is one training run (seed 0); run-to-run spread of a few tenths of a point is normal for
  these recipes and was not measured for them. The speed run's spread over its runs is in the README's table.
* Training time depends on the machine; each epoch's seconds and hardware are in the file's history."""


def scores(path, x_test, y_test):
    """(single view, with test-time views) test accuracy in percent, fp32: the views the file records, else flip."""
    model = utils.Loaded_model(path, precision="fp32")
    single = model.predict_proba(x_test, tta="none")
    if model.tta == "none":  # flip TTA from the single view and one pass on the mirrored images, as notebook 04
        views = (single + model.predict_proba(np.ascontiguousarray(x_test[:, :, ::-1]), tta="none")) / 2
    else:
        views = model.predict_proba(x_test, tta=model.tta)
    return tuple(100 * float(np.mean(p.argmax(1) == np.asarray(y_test))) for p in (single, views))


def spread(values):
    """' ± s', the sample standard deviation of several runs, or '' for one run."""
    return f" ± {np.std(values, ddof=1):.2f}" if len(values) > 1 else ""


def recipe_label(name, cfg):
    """'`tier94_sgd`: 10 epochs, SGD' (and the widths where they are not the first lap's)."""
    cfg = utils.SpeedRunConfig(**cfg)
    widths = f", widths {'/'.join(map(str, cfg.widths))}" if cfg.widths != utils.SPEEDRUN_WIDTHS else ""
    return f"`{name}`: {cfg.epochs:g} epochs, {'Muon' if cfg.muon else 'SGD'}{widths}"


def speedrun_rows(releases=None):
    """The README's speed-run table from bench/speedrun.py's results files: one row per recipe (its runs' mean and
    spread, the slowest run's time, seed 0's release file); each run's figures are in the files and notebook 06."""
    rows = ["| recipe | runs | test acc, its test-time views | single view | slowest run at 800 GFLOP/s "
            "(wall time, machine) | seed 0's release: views / single |",
            "| --- | --- | ---: | ---: | --- | --- |"]
    for release in speedrun_releases() if releases is None else releases:
        name, runs_file = SPEEDRUNS[release]
        results = json.loads((ROOT / runs_file).read_text())
        runs = results["runs"]
        single, views = ([r[k] * 100 for r in runs] for k in ("test_acc", "test_acc_tta"))
        slowest = max(runs, key=lambda r: r["seconds_at_800"])
        seed0 = next(r for r in runs if r["seed"] == 0)
        rows.append(f"| {recipe_label(name, results['recipe'])} | {len(runs)}: seed "
                    f"{', '.join(str(r['seed']) for r in runs)} | "
                    f"{np.mean(views):.2f}%{spread(views)} | {np.mean(single):.2f}%{spread(single)} | "
                    f"{slowest['seconds_at_800'] / 60:.1f} min ({slowest['seconds'] / 60:.1f} min, "
                    f"{utils.machine_name(slowest['hardware'])}, {slowest['precision']}) | "
                    f"[`{release}`](checkpoints/README.md#{release_name(release)}): "
                    f"{seed0.get('release_test_acc_tta', seed0['test_acc_tta']):.2%} / "
                    f"{seed0.get('release_test_acc', seed0['test_acc']):.2%} |")
    return rows


def peer_rows(results_file=PEER_RESULTS):
    """The README's peer table from `bench/speedrun.py --peer NAME --json FILE`: per seed, airbench's own code and
    our recipe trained in one process on the same CPU and arrays; nothing when no such run has finished."""
    if not (ROOT / results_file).is_file():
        return []
    results = json.loads((ROOT / results_file).read_text())
    rows = ["| seed | trained by | test acc, its test-time views | single view | minutes at 800 GFLOP/s "
            "(wall time, machine) |", "| ---: | --- | ---: | ---: | --- |"]
    for run in results["runs"]:
        theirs = f"airbench {run['peer']['airbench_version']}'s own `{PEER_FUNCTIONS[results['peer']]}`"
        ours = recipe_label(results["recipe_name"], results["recipe"])
        machine = utils.machine_name(run["ours"]["hardware"])  # one process: the same machine for both
        for label, side in ((theirs, run["peer"]), (ours, run["ours"])):
            rows.append(f"| {run['seed']} | {label} | {side['test_acc_tta']:.2%} | {side['test_acc']:.2%} | "
                        f"{side['seconds_at_800'] / 60:.1f} ({side['seconds'] / 60:.1f} min, {machine}, "
                        f"{side['precision']}) |")
    return rows


def speedrun_card_section(path, measured):
    """The model card of the speed run's release, from its metadata and the protocol's results file."""
    meta = utils.load_checkpoint(ROOT / path)
    hist, name = meta["history"], release_name(path)
    recipe_name, runs_file = SPEEDRUNS[path]
    runs = json.loads((ROOT / runs_file).read_text())["runs"]
    net = utils.build_model("speedrun", **meta["arch_options"])
    config = utils.SpeedRunConfig(**meta["config"])
    cfg = asdict(config)
    tricks = [t for t in utils.SPEEDRUN_TRICKS if utils.without_trick(config, t) != config]
    single, views = measured
    views_name = {"flip_translate": "flip and one-pixel shifts"}.get(cfg["tta"], cfg["tta"])
    optimizer = (f"Muon for the convolution filters (lr {cfg['muon_lr']:g}, momentum {cfg['muon_momentum']:g}) and "
                 "Nesterov SGD for the rest" if cfg["muon"] else "Nesterov SGD")
    decay_to = "0" if cfg["lr_end"] == 0 else f"{cfg['lr_end']:g} times the peak"
    schedule = (f"warm-up over {cfg['warmup']:.0%} of the steps then linear decay to {decay_to}" if cfg["warmup"]
                else f"linear decay from the first step to {decay_to}")
    passes = (f" (run as passes of {cfg['micro_batch']} images, each normalized by its own batch statistics)"
              if cfg["micro_batch"] else "")
    lines = [f"## {name}", "",
             f"`{path}`: {TITLES[name]}, {utils.count_parameters(net):,} parameters, "
             f"{utils.count_macs(net) / 1e6:.0f} M multiply-accumulates an image, "
             f"{(ROOT / path).stat().st_size / 2**20:.1f} MiB, SHA-256 of its contents `{meta[utils.DIGEST_KEY][:16]}…`.",
             "",
             f"**Recipe** (`utils.SPEEDRUN_RECIPES[\"{recipe_name}\"]`, fixed on the validation split by "
             f"`bench/speedrun_ablation.py --recipe {recipe_name}`, notebook 06): {cfg['epochs']:g} epochs of batch "
             f"{cfg['batch_size']}{passes}, widths {'/'.join(map(str, cfg['widths']))}, {optimizer} (lr {cfg['lr']:g} and "
             f"weight decay {cfg['weight_decay']:g} in airbench's units, momentum {cfg['momentum']:g}), {schedule}, "
             f"label smoothing {cfg['label_smoothing']:g}, shifts of up to {cfg['translate']} pixels; tricks on: "
             f"{', '.join(tricks)}.", "",
             f"**Protocol.** Seed {cfg['seed']}, trained on all 50,000 training images for the fixed number of epochs: "
             "no validation split and no selection. The test set was used once, after training.", "",
             f"**Test set** (fp32, `Loaded_model`): **{single:.2f}%** single view, **{views:.2f}%** with its "
             f"test-time views ({views_name}), which `Loaded_model` uses unless given `tta=\"none\"`. The protocol's "
             f"{len(runs)} runs with the views (README, speed run): "
             + ", ".join(f"seed {r['seed']} {r['test_acc_tta']:.2%}" for r in runs)
             + f"; mean {np.mean([r['test_acc_tta'] for r in runs]):.2%}.", "",
             f"**Training time and hardware.** {sum(hist['seconds']) / 60:.1f} min of training passes "
             f"({len(hist['seconds'])} epochs, median {np.median(hist['seconds']):.0f} s) on {meta['hardware']}.", "",
             "**Reproduce and re-measure.**", "", "```",
             f"python bench/speedrun.py --recipe {recipe_name} --runs 1 --save checkpoints/my_{name}.pth",
             f"python bench/release_table.py {path}", "```", ""]
    return "\n".join(lines)


def hardware_runs(meta, sep="; "):
    """'epochs 1-120: A; 121-164: B' from the per-epoch hardware record."""
    labels = meta["history"].get("hardware") or ["not recorded"] * len(meta["history"]["epoch"])
    starts = [i for i in range(len(labels)) if i == 0 or labels[i] != labels[i - 1]] + [len(labels)]
    if len(starts) == 2:
        return labels[0]
    return sep.join(f"epochs {a + 1}-{b}: {labels[a]}" for a, b in zip(starts, starts[1:]))


def recipe(cfg):
    """'stages 0.1:82 / 0.01:123 / 0.001:164, weight decay 0.0005, label smoothing 0.1'."""
    text = "stages " + " / ".join(f"{lr:g}:{end}" for lr, end in cfg["stages"]) + f", weight decay {cfg['weight_decay']:g}"
    return text + (f", label smoothing {cfg['label_smoothing']:g}" if cfg.get("label_smoothing") else "")


def release_name(path):
    """'resnet20b' for checkpoints/resnet20b.pth: the card's section, the run folder's and the hub entry's name."""
    return Path(path).stem


def row(path, measured):
    """One Markdown row of the README's results table."""
    meta = utils.load_checkpoint(ROOT / path)
    net = utils.build_model(meta["arch"], **meta.get("arch_options", {}))
    single, tta = measured
    name = release_name(path)
    return (f"| [`{path}`](checkpoints/README.md#{name}) | {TITLES.get(name, name)} | "
            f"{utils.count_parameters(net):,} | {single:.2f}% | {tta:.2f}% | {meta['best_val_acc'] * 100:.2f}% | "
            f"{meta['epoch']} of {meta['config']['stages'][-1][1]} |")


def train_command(cfg, name):
    """The train.py command that runs this recipe from scratch into checkpoints/<name>_run."""
    shortcut = cfg["arch_options"].get("shortcut")
    size = cfg.get("input_size")
    return (f"python train.py --arch {cfg['arch']}" + (f" --shortcut {shortcut}" if shortcut else "")
            + (f" --input-size {size}" if size else "")
            + " --stages " + " ".join(f"{lr:g}:{end}" for lr, end in cfg["stages"]) + f" --wd {cfg['weight_decay']:g}"
            + (f" --label-smoothing {cfg['label_smoothing']:g}" if cfg.get("label_smoothing") else "")
            + f" --out checkpoints/{name}_run")


def reproduces(path):
    """Card lines naming the reference reports whose system this release is, with their figures."""
    entries = [e for e in utils.REFERENCE_REPORTS if e["release"] == path]
    if not entries:
        return []
    theirs = "; ".join(f"the {e['report']} ({e['system']}): {e['figure']:.2f}% test after {e['epochs']} epochs "
                       f"(its choice: {e['chosen']})" for e in entries)
    planned = (" Its recipe and selection rule were written in this card (\"Runs under way\") before the run started, "
               "and kept." if path in PLANNED_BEFORE_THE_RUN else "")
    return ["", f"**Reproduces** {theirs}.{planned}"]


def card_section(path, measured):
    """The model card of one release file, from its metadata and history and the measured test figures."""
    meta = utils.load_checkpoint(ROOT / path)
    cfg, hist = meta["config"], meta["history"]
    net = utils.build_model(meta["arch"], **meta.get("arch_options", {}))
    stored = next(v.dtype for v in meta["model"].values() if v.is_floating_point())
    name = release_name(path)
    lines = [f"## {name}", "",
             f"`{path}`: {TITLES.get(name, name)}, {utils.count_parameters(net):,} parameters, "
             f"{(ROOT / path).stat().st_size / 2**20:.1f} MiB ({str(stored).replace('torch.', '')} weights), "
             f"SHA-256 of its contents `{meta[utils.DIGEST_KEY][:16]}…` (checked on every load).", "",
             f"**Recipe.** {recipe(cfg)}; batch {cfg['batch_size']}, {cfg['optimizer'].upper()} momentum "
             f"{cfg['momentum']:g}{', nesterov' if cfg['nesterov'] else ''}, random crop (pad 4) and flip, trained on the "
             f"45,000 images of the seeded (seed {cfg['seed']}) stratified split, validated on the other 5,000.", "",
             f"**Selection.** The epoch with the best validation accuracy: epoch {meta['epoch']} of "
             f"{len(hist['epoch'])}, {meta['best_val_acc'] * 100:.2f}%. The test set played no part in choosing it.", "",
             "| stage | lr | epochs | best validation accuracy | at epoch |", "| --- | ---: | --- | ---: | ---: |"]
    starts = [0] + hist["stage_ends"][:-1]
    for k, ((lr, _), start, end) in enumerate(zip(cfg["stages"], starts, hist["stage_ends"])):
        val = hist["val_acc"][start:end]
        best = int(np.argmax(val))
        lines.append(f"| {k + 1} | {lr:g} | {start + 1}-{end} | {max(val) * 100:.2f}% | {start + best + 1} |")
    lines += reproduces(path)
    single, tta = measured
    seconds = hist["seconds"]
    lines += ["", f"**Test set, measured once** (fp32, `Loaded_model`): **{single:.2f}%** single view, "
              f"**{tta:.2f}%** with flip TTA.", "",
              f"**Training time and hardware.** {sum(seconds) / 3600:.1f} h of training for {len(seconds)} epochs "
              f"(median {np.median(seconds):.0f} s an epoch, training passes only); per span of epochs:", ""]
    lines += [f"* {span}" for span in hardware_runs(meta, sep="\n").splitlines()]
    if hist.get("overrides"):
        lines += ["", "Recipe changes made on resuming: " + "; ".join(hist["overrides"]) + "."]
    lines += ["", "**Reproduce and re-measure.**", "", "```",
              train_command(cfg, name),
              f"python -c \"import utils; utils.export_release('checkpoints/{name}_run/best.pth', 'checkpoints/my_{name}.pth', "
              f"run_checkpoint=utils.latest_checkpoint('checkpoints/{name}_run'))\"",
              f"python bench/release_table.py {path}", "```", ""]
    return "\n".join(lines)


def card(measured):
    """The whole model card, checkpoints/README.md; `measured` may hold the speed run's release too."""
    head = ["# Model card: the release files", "",
            "Generated by `python bench/release_table.py --card checkpoints/README.md` from the release files' own "
            "metadata and per-epoch history; the test figures are measured by the same command. "
            "Do not edit by hand: `tests/test_release.py` regenerates it and fails when it differs.", "",
            "The releases classify 32 × 32 CIFAR-10 images into ten classes. Load one with "
            "`utils.Loaded_model(path).predict(x)` or `torch.hub.load(..., pretrained=True)` (see the project README).", ""]
    body = [card_section(path, measured[path]) for path in sorted(measured) if path not in SPEEDRUNS]
    body += [speedrun_card_section(path, measured[path]) for path in SPEEDRUNS if path in measured]
    return "\n".join(head + body + [PLANNED, "", "## Superseded runs", "", SUPERSEDED, "", LIMITS, ""])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="*", default=RELEASES, help="release files (relative to the project)")
    p.add_argument("--card", help="write the model card of the files here instead of printing rows")
    p.add_argument("--speedrun", action="store_true",
                   help="print the README's speed-run tables (recipes, peer) from the results files")
    p.add_argument("--reports", action="store_true",
                   help="print the README's table of the reference reports against this project's runs")
    p.add_argument("--data", help="CIFAR-10 folder (else CIFAR10_DIR, data/)")
    args = p.parse_args()
    if args.speedrun:
        print("\n".join(speedrun_rows()))
        if peer_rows():
            print("\n" + "\n".join(peer_rows()))
        return
    _, _, x_test, y_test = utils.load_cifar10(args.data)
    if args.card and args.paths == RELEASES:
        args.paths = [*RELEASES, *speedrun_releases()]
    if args.reports:
        args.paths = [e["release"] for e in utils.REFERENCE_REPORTS if (ROOT / e["release"]).is_file()]
    measured = {path: scores(ROOT / path, x_test, y_test) for path in dict.fromkeys(args.paths)}
    if args.reports:
        print("\n".join(utils.reports_table(measured)))
        return
    if args.card:
        utils.atomic_write(args.card, lambda f: f.write(card(measured).encode()))  # never a half-written card
        print(f"wrote {args.card}")
        return
    print("| release file | model | parameters | test acc, single view | test acc, flip TTA | validation acc | "
          "selected epoch |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- |")
    for path in args.paths:
        if path in SPEEDRUNS:
            print(f"{path}: {measured[path][0]:.2f}% single view, {measured[path][1]:.2f}% with its test-time views")
            continue
        print(row(path, measured[path]))


if __name__ == "__main__":
    main()
