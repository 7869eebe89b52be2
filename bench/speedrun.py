"""The speed run's final protocol: train on all 50,000 training images with the fixed recipe, score the test set.

Per run (seed 0, then 1, 2, ...): the test accuracy single view and with the recipe's test-time views (scored in the
run's training precision, as airbench scores in its own; a saved release is scored again in fp32 after the clock
stops), the wall seconds from loading the arrays to the final test accuracy, and those seconds scaled to a machine
whose matmul peak in the run's precision is 800 GFLOP/s (seconds x measured peak / 800). The peaks are measured in the same process, before the runs.
Run it on an otherwise idle machine, one run at a time.

    python bench/speedrun.py [--recipe tier94_sgd] --runs 5 [--epochs E] [--device cpu] [--json FILE] [--save FILE]

--recipe names one of utils.SPEEDRUN_RECIPES (default tier94_sgd, the first lap's); their results files are
checkpoints/speedrun_runs.json (tier94_sgd), speedrun94_runs.json (tier94_muon) and speedrun95_runs.json (tier95).

With --json, each finished run is written at once; an existing file whose recipe matches is continued (its runs are
kept and the next seed values run), so a long protocol can span sessions and machines (each run keeps its own peak).

    python bench/speedrun.py --peer airbench94 [--runs 1] [--json checkpoints/speedrun_peer.json]

With --peer, each seed trains airbench's own code first (the `airbench` package from PyPI, run on the CPU as
bench/peer.py describes) and then ours, in the same process on the same arrays, and prints both accuracies, both
times and the ratio of the times.
"""
import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import utils  # noqa: E402
import peer  # noqa: E402

REFERENCE_GFLOPS = 800  # the budget's machine: 2 cores of an AMD EPYC family 26, bf16


def matmul_gflops(precision, device="cpu", n=2048, reps=10):
    """Measured GFLOP/s of a large matrix product in 'bf16', 'fp16' or 'fp32', best of three timings."""
    a, b = (torch.randn(n, n, dtype=utils.precision_dtype(precision), device=device) for _ in range(2))
    a @ b
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 * reps / best / 1e9


def measured_peaks(device="cpu", also=()):
    """{precision: GFLOP/s} of this device's matmul, measured now: fp32, and bf16 (fp16 on CUDA) where the device
    computes it natively, plus any precision in `also`. Emulated bf16 is never what 'auto' trains in, and timing
    it takes minutes on a CPU without bf16 instructions."""
    cuda = torch.device(device).type == "cuda"
    kinds = {"fp32", "bf16", "fp16"} if cuda else {"fp32", "bf16"} if utils.cpu_has_native_bf16() else {"fp32"}
    return {kind: matmul_gflops(kind, device) for kind in sorted(kinds | set(also))}


def describe_peaks(peaks):
    """'411 GFLOP/s bf16, 175 GFLOP/s fp32' for the precisions measured."""
    return ", ".join(f"{gflops:.0f} GFLOP/s {kind}" for kind, gflops in peaks.items())


def summarize(results):
    """Mean and standard deviation of the reported accuracy over the runs, into `results` (with a peer: of both,
    and the mean ratio of the times)."""
    key = results["reported"]
    sides = {"": results["runs"]} if "peer" not in results else {
        "peer_": [r["peer"] for r in results["runs"]], "": [r["ours"] for r in results["runs"]]}
    for prefix, runs in sides.items():
        accs = [r[key] for r in runs]
        results[f"{prefix}mean_acc"] = statistics.mean(accs)
        results[f"{prefix}std_acc"] = statistics.stdev(accs) if len(accs) > 1 else 0.0
    if "peer" in results:
        results["mean_time_ratio"] = statistics.mean(r["time_ratio"] for r in results["runs"])
    return results


def one_run(cfg, device, peaks, data_dir, save=None):
    """Train and score one seed; every second from loading the arrays to the test accuracy counts.

    The timed test accuracy is scored in the run's training precision (as airbench scores in its own). A saved
    release is scored again in fp32 after the clock stops: the figures `Loaded_model` gives for the file."""
    start = time.perf_counter()
    x, y, x_test, y_test = utils.load_cifar10(data_dir)
    result = utils.speedrun(cfg, x, y, device=device, log=lambda line: print(line, flush=True))
    precision = result["precision"]
    single, views = utils.speedrun_scores(result, x_test, y_test, cfg.tta, device, precision)
    seconds = time.perf_counter() - start
    run = dict(seed=cfg.seed, test_acc=single, test_acc_tta=views, score_precision=precision, seconds=seconds,
               seconds_at_800=seconds * peaks[precision] / REFERENCE_GFLOPS, precision=precision,
               peak_gflops=peaks[precision], hardware=result["hardware"], epoch_seconds=result["history"]["seconds"])
    if save:  # fp32 figures for the file; a run trained in fp32 has them already
        scores = (single, views) if precision == "fp32" else utils.speedrun_scores(result, x_test, y_test, cfg.tta,
                                                                                    device)
        release = dict(zip(("test_acc", "test_acc_tta"), scores))
        run |= {f"release_{key}": value for key, value in release.items()}
        utils.save_checkpoint(utils.speedrun_checkpoint(cfg, result, seconds=seconds, **release), save)
    return run


def score_precision_of(run):
    """The precision a recorded run's test accuracy was scored in: runs before score_precision was recorded
    were scored in fp32."""
    return run["ours"].get("score_precision", "fp32") if "ours" in run else run.get("score_precision", "fp32")


def peer_run(name, cfg, peaks, data_dir, folder):
    """airbench's `name` and then our recipe on the same arrays, one seed; both results and the time ratio."""
    x, y, x_test, y_test = utils.load_cifar10(data_dir)
    precision = utils.resolve_precision("cpu", cfg.precision)
    peer.write_peer_data(folder, x, y, x_test, y_test, utils.CLASSES)
    theirs = peer.run_peer(name, folder, precision, seed=cfg.seed)
    theirs["seconds_at_800"] = theirs["seconds"] * peaks[precision] / REFERENCE_GFLOPS
    ours = one_run(cfg, "cpu", peaks, data_dir)
    return dict(seed=cfg.seed, peer=theirs, ours=ours, time_ratio=ours["seconds"] / theirs["seconds"])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5, help="number of runs, with seed 0 to N-1 (default 5)")
    p.add_argument("--recipe", default="tier94_sgd", choices=list(utils.SPEEDRUN_RECIPES),
                   help="the named recipe (default tier94_sgd, the first lap's)")
    p.add_argument("--epochs", type=float, help="train this many epochs instead of the recipe's")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--json", type=Path, help="write (and continue) the results here")
    p.add_argument("--save", type=Path, help="write seed 0's model here as a release file")
    p.add_argument("--data", help="CIFAR-10 folder (else CIFAR10_DIR, data/)")
    p.add_argument("--peer", choices=sorted(peer.PEERS), help="also train the peer's own code, seed by seed")
    args = p.parse_args()
    if args.runs < 1 or args.epochs is not None and args.epochs <= 0:
        p.error(f"--runs must be at least 1 and --epochs above 0; got {args.runs} and {args.epochs}")
    if utils.find_cifar10(args.data) is None:
        p.error("no CIFAR-10 found: give --data FOLDER or set CIFAR10_DIR (the folder of x_train.npy ...)")
    device = utils.get_device(args.device)
    if args.peer and (device.type != "cpu" or args.save or importlib.util.find_spec("airbench") is None):
        p.error("--peer runs on the CPU, without --save, and needs the airbench package (requirements-dev.txt)")
    cfg = utils.speedrun_recipe(args.recipe, **({} if args.epochs is None else {"epochs": args.epochs}))
    recipe = asdict(cfg)
    precision = utils.resolve_precision(device, recipe["precision"])
    results = {"recipe_name": args.recipe, "recipe": recipe, "runs": []} | ({"peer": args.peer} if args.peer else {})
    if args.json and args.json.exists():
        results = json.loads(args.json.read_text())
        if not utils.same_recipe(results.get("recipe", {}), cfg) or results.get("peer") != args.peer:
            p.error(f"{args.json} holds runs of another recipe or peer; choose another --json file "
                    "(nothing is overwritten)")
        scored = {score_precision_of(run) for run in results["runs"]} - {precision}
        if scored:
            p.error(f"{args.json} holds runs scored in {', '.join(sorted(scored))}; this run scores in {precision}: "
                    "choose another --json file (one protocol, one precision; nothing is overwritten)")
    seed_0_runs = 0 not in {r["seed"] for r in results["runs"]}  # --save applies to seed 0's run only
    if args.save and seed_0_runs and args.save.exists():
        p.error(f"{args.save} exists; move it away or choose another --save path (nothing is overwritten)")
    peaks = measured_peaks(device, also=[precision])
    results |= {"peak_bf16_gflops": peaks.get("bf16"), "peak_fp32_gflops": peaks["fp32"]}
    results["reported"] = "test_acc_tta" if recipe["tta"] != "none" else "test_acc"
    print(f"measured matmul peak: {describe_peaks(peaks)}; "
          f"training in {precision}; seconds at 800 = seconds x {peaks[precision]:.0f} / {REFERENCE_GFLOPS}", flush=True)
    done = {r["seed"] for r in results["runs"]}
    for seed in range(args.runs):
        if seed in done:
            continue
        cfg = utils.SpeedRunConfig(**{**recipe, "seed": seed})
        if args.peer:
            with tempfile.TemporaryDirectory() as folder:
                run = peer_run(args.peer, cfg, peaks, args.data, folder)
            print(f"seed {seed}: {args.peer} {run['peer']['test_acc_tta']:.4f} in {run['peer']['seconds']:.0f} s, "
                  f"ours {run['ours']['test_acc_tta']:.4f} in {run['ours']['seconds']:.0f} s (both with their "
                  f"views); our time / theirs {run['time_ratio']:.2f}", flush=True)
        else:
            run = one_run(cfg, device, peaks, args.data, args.save if seed == 0 else None)
            print(f"seed {seed}: test {run['test_acc']:.4f}, with {cfg.tta} views {run['test_acc_tta']:.4f} | "
                  f"{run['seconds']:.0f} s wall, {run['seconds_at_800']:.0f} s at {REFERENCE_GFLOPS} GFLOP/s",
                  flush=True)
        results["runs"].append(run)
        results["runs"].sort(key=lambda r: r["seed"])
        if args.json:
            utils.write_json(summarize(results), args.json)
    summarize(results)
    if args.peer:
        print(f"\n| seed | {args.peer} with its views | ours with ours | {args.peer} s | ours s | ours / theirs |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in results["runs"]:
            print(f"| {r['seed']} | {r['peer']['test_acc_tta']:.2%} | {r['ours']['test_acc_tta']:.2%} | "
                  f"{r['peer']['seconds']:.0f} | {r['ours']['seconds']:.0f} | {r['time_ratio']:.2f} |")
        return
    print(f"\n| seed | test acc | test acc ({recipe['tta']}) | wall s | s at {REFERENCE_GFLOPS} GFLOP/s |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for r in results["runs"]:
        print(f"| {r['seed']} | {r['test_acc']:.2%} | {r['test_acc_tta']:.2%} | {r['seconds']:.0f} | "
              f"{r['seconds_at_800']:.0f} |")
    print(f"\nmean {results['mean_acc']:.2%} +- {results['std_acc']:.2%} ({results['reported']}) over "
          f"{len(results['runs'])} runs; slowest run {max(r['seconds_at_800'] for r in results['runs']) / 60:.1f} min "
          f"at {REFERENCE_GFLOPS} GFLOP/s")


if __name__ == "__main__":
    main()
