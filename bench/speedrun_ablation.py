"""The speed run's ablation on the validation split: the full recipe, then each trick switched off in turn.

Trains on 45,000 training images and scores the held-out 5,000 (never the test set), one run per row, seed 0. Each
finished row is written to the JSON file at once, so a stopped ablation continues where it was (rows whose recipe
and data match are kept; nothing else in the file is overwritten).

    python bench/speedrun_ablation.py [--recipe tier94_sgd] [--tricks full whitening lookahead ...] [--epochs E]
                                      [--json FILE]

--recipe names one of utils.SPEEDRUN_RECIPES (default: the first lap's); `--tricks full` alone is how a new
recipe is fixed on the validation split before its final runs. Rows record their recipe's name.
"""
import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import utils  # noqa: E402
from speedrun import describe_peaks, measured_peaks  # noqa: E402

DEFAULT_JSON = Path(__file__).resolve().parents[1] / "checkpoints" / "speedrun_ablation.json"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tricks", nargs="+", default=["full", *utils.SPEEDRUN_TRICKS],
                   help=f"'full' and any of: {', '.join(utils.SPEEDRUN_TRICKS)}")
    p.add_argument("--recipe", default="tier94_sgd", choices=list(utils.SPEEDRUN_RECIPES))
    p.add_argument("--epochs", type=float, help="train this many epochs instead of the recipe's")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"results file (default {DEFAULT_JSON})")
    p.add_argument("--data", help="CIFAR-10 folder (else CIFAR10_DIR, data/)")
    p.add_argument("--limit", type=int, help="train on only this many images (a smoke test)")
    args = p.parse_args()
    unknown = sorted(set(args.tricks) - {"full", *utils.SPEEDRUN_TRICKS})
    if unknown:
        p.error(f"unknown tricks {unknown}; choose from full, {', '.join(utils.SPEEDRUN_TRICKS)}")
    x, y, _, _ = utils.load_cifar10(args.data)
    x_tr, y_tr, x_val, y_val = utils.train_val_split(x, y)
    x_tr, y_tr = x_tr[:args.limit], y_tr[:args.limit]
    results = json.loads(args.json.read_text()) if args.json.exists() else {"rows": []}
    peaks = measured_peaks(also=[utils.resolve_precision("cpu", utils.SpeedRunConfig.precision)])
    print(f"measured matmul peak: {describe_peaks(peaks)}", flush=True)
    full = utils.speedrun_recipe(args.recipe, **({} if args.epochs is None else {"epochs": args.epochs}))
    # tta changes no training: its row is the full recipe's run scored single view, so that run comes first
    needs_full = "full" in args.tricks or "tta" in args.tricks
    def finished_row(cfg):
        """The row of this recipe and training-set size already in the file, or None."""
        return next((r for r in results["rows"] if utils.same_recipe(r["config"], cfg) and r["train_images"] == len(y_tr)), None)

    for trick in ["full"] * needs_full + [t for t in args.tricks if t != "full"]:
        cfg = full if trick == "full" else utils.without_trick(full, trick)
        if done := finished_row(cfg):
            print(f"{trick}: kept from {args.json.name}: val {done['val_acc']:.4f}", flush=True)
            continue
        if trick == "tta":
            full_row = finished_row(full)
            row = dict(full_row, trick=trick, config=asdict(cfg), val_acc_tta=full_row["val_acc"])
            print(f"tta: the full recipe's run without its test-time views: val {row['val_acc']:.4f}", flush=True)
        else:
            print(f"--- {trick} {'(the full recipe)' if trick == 'full' else 'off'}", flush=True)
            start = time.perf_counter()
            result = utils.speedrun(cfg, x_tr, y_tr, x_val, y_val, log=lambda line: print(line, flush=True))
            seconds = time.perf_counter() - start
            val_acc, val_acc_tta = utils.speedrun_scores(result, x_val, y_val, cfg.tta)
            row = dict(recipe=args.recipe, trick=trick, config=asdict(cfg), train_images=len(y_tr), val_acc=val_acc,
                       val_acc_tta=val_acc_tta, seconds=seconds, precision=result["precision"],
                       hardware=result["hardware"], peak_gflops=peaks[result["precision"]], history=result["history"])
            print(f"{trick}: val {row['val_acc']:.4f}, with its test-time views {row['val_acc_tta']:.4f}, "
                  f"{seconds:.0f} s", flush=True)
        stale = [r for r in results["rows"] if r["trick"] == trick and r["train_images"] == len(y_tr)
                 and r.get("recipe", "tier94_sgd") == args.recipe]  # rows before names were the first lap's
        if stale:
            print(f"{trick}: replaces the row measured with an older recipe in {args.json.name}", flush=True)
        results["rows"] = [r for r in results["rows"] if r not in stale]
        results["rows"].append(row)
        utils.write_json(results, args.json)


if __name__ == "__main__":
    main()
