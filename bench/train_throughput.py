"""Training images/s: this engine against the course report's pipeline as baseline, measured in the same run.

Baseline (the ResNet18 course report's): per-image PIL transforms (RandomCrop with padding, flip, ToTensor, Normalize) in a
DataLoader with 2 workers, fp32, NCHW. Engine: utils.BatchLoader (batched augmentation on the device) and
utils.train_epoch with channels_last and the precision utils.resolve_precision picks (bf16 where it measures
faster, AMP on CUDA).
Also: the fraction of the device's measured matmul peak that the engine's training step reaches, and with
--compile the same step through torch.compile (Inductor), measured in the same run, alternating with the eager
step (the fastest of two each). With --processes N (CPU), the same step data-parallel in N processes of one
thread each, half the batch each (what `torchrun --nproc_per_node=N train.py` runs), beside the one process of
all threads. With --profile, where the engine's step spends its time (convolutions, batch norm, ReLU, additions,
the rest; forward and backward) and the rate of the convolutions alone as a share of the peak: what bounds the
whole step's share. With --passes, the speed run's own training (utils.speedrun, recipe tier94_muon: batches of
2,000 images, Muon, lookahead) for a few steps with each batch run as passes of each given size: what its
micro_batch buys.

    python bench/train_throughput.py [--steps 30] [--archs resnet20 speedrun resnet18] [--compile] [--processes 2]
                                     [--profile] [--passes 2000 250]
"""
import argparse
import re
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torchvision.transforms as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import utils  # noqa: E402
from speedrun import matmul_gflops  # noqa: E402


class PilPipelineDataset(torch.utils.data.Dataset):
    """uint8 HWC images through the course report's per-image PIL pipeline."""

    def __init__(self, x, y):
        self.x, self.y = x, y
        self.transform = T.Compose([T.ToPILImage(), T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(),
                                    T.ToTensor(), T.Normalize(utils.CIFAR_MEAN, utils.COMMON_STD)])

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.transform(self.x[i]), int(self.y[i])


def timed_steps(model, batches, step, warmup):
    """Images/s over the batches after `warmup` untimed ones."""
    seen, start = 0, None
    for i, (x, y) in enumerate(batches):
        if i == warmup:
            start = time.perf_counter()
        step(model, x, y)
        if start is not None:
            seen += len(y)
    return seen / (time.perf_counter() - start)


def sgd_step(device, precision):
    """One SGD step (forward, backward, update) under the given precision."""
    criterion = nn.CrossEntropyLoss()

    def step(model, x, y):
        opt = model._opt
        with utils.autocast(device, precision):
            loss = criterion(model(x.to(device)), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


# Profile categories of the engine's step: a pattern of ATen operator names each (self time, forward and
# backward together). The additions are the residual sums and their gradients' accumulation, not addmm.
OP_KINDS = (("convolutions", r"convolution"), ("batch norm", r"batch_norm"),
            ("ReLU", r"clamp_min|threshold_backward|relu"), ("additions", r"^aten::add_?$"))


def step_profile(model, batches, step, warmup, steps=5):
    """{kind: share of the step's time}, over `steps` profiled steps after `warmup` untimed ones."""
    from torch.profiler import ProfilerActivity, profile
    batches = iter(batches)
    for _ in range(warmup):
        step(model, *next(batches))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step(model, *next(batches))
    times = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    total = sum(times.values())
    shares = {kind: sum(t for name, t in times.items() if re.search(pattern, name)) / total
              for kind, pattern in OP_KINDS}
    return shares | {"other": 1 - sum(shares.values())}


def fresh_model(arch, device, channels_last, compiled=False):
    net = utils.build_model(arch).to(device).train()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    model = torch.compile(net) if compiled else net
    model._opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    return model


PASSES_RECIPE = "tier94_muon"  # --passes times this recipe's training
PASSES_BATCH = utils.SPEEDRUN_RECIPES[PASSES_RECIPE].batch_size


def speedrun_rate(micro_batch, x, y, steps):
    """Training images/s of the speed run itself over its first `steps` steps, each batch run as passes of
    `micro_batch` images."""
    cfg = utils.speedrun_recipe(PASSES_RECIPE, micro_batch=micro_batch % PASSES_BATCH,
                                epochs=steps / (len(y) // PASSES_BATCH))
    seconds = utils.speedrun(cfg, x, y, log=None)["history"]["seconds"][0]  # after the whitening, like an epoch
    return steps * cfg.batch_size / seconds, utils.count_macs(utils.build_model("speedrun", residual=cfg.residual))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_parallel_worker(rank, world_size, port, arch, precision, x, y, warmup, rates):
    """One process of a data-parallel step: one thread, its shard of each batch, gradients averaged by gloo."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)  # the same initial weights in every process, as train.py's ranks have
        net = fresh_model(arch, "cpu", True)
        model = nn.parallel.DistributedDataParallel(net)
        model._opt = net._opt
        batches = utils.BatchLoader(x, y, 128 // world_size, augment=True, shuffle=True, rank=rank,
                                    world_size=world_size)
        rates[rank] = timed_steps(model, batches, sgd_step("cpu", precision), warmup)
    finally:
        dist.destroy_process_group()


def data_parallel_rate(arch, precision, x, y, warmup, processes):
    """Images/s of all the processes together."""
    rates = mp.Manager().dict()
    mp.spawn(data_parallel_worker, args=(processes, free_port(), arch, precision, x, y, warmup, rates),
             nprocs=processes)
    return sum(rates.values())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=["resnet20", "speedrun", "resnet18"])
    p.add_argument("--compile", action="store_true", help="also time the engine's step through torch.compile")
    p.add_argument("--steps", type=int, default=30, help="timed steps per measurement (resnet18 uses a third)")
    p.add_argument("--processes", type=int, default=1,
                   help="also time the step data-parallel in this many one-thread processes (CPU)")
    p.add_argument("--profile", action="store_true",
                   help="also profile the engine's step: where its time goes, and the convolutions' own share "
                        "of the peak")
    p.add_argument("--passes", nargs="+", type=int, default=[], metavar="IMAGES",
                   help="also time the speed run's training (tier94_muon, batch 2,000) run as passes of these "
                        "sizes, each dividing 2,000 (2000: one pass)")
    p.add_argument("--data", help="CIFAR-10 folder (else CIFAR10_DIR, data/)")
    args = p.parse_args()
    if any(size < 1 or PASSES_BATCH % size for size in args.passes):
        p.error(f"--passes sizes must divide the speed run's batch of 2,000 images; got {args.passes}")
    if args.processes < 1 or args.processes > 1 and (128 % args.processes or utils.get_device().type != "cpu"):
        p.error(f"--processes must divide the batch of 128 and is for the CPU; got {args.processes}")
    device = utils.get_device()
    precision = utils.resolve_precision(device)
    x, y, _, _ = utils.load_cifar10(args.data)
    peak, fp32_peak = matmul_gflops(precision, device), matmul_gflops("fp32", device)
    print(f"device {device}, engine precision {precision}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; measured matmul peak {peak:.0f} GFLOP/s ({precision}), "
          f"{fp32_peak:.0f} GFLOP/s (fp32)")
    rows, profiles = [], []
    for arch in args.archs:
        steps = args.steps if arch != "resnet18" else max(4, args.steps // 3)
        warmup, n = 3, 128 * (steps + 3)
        torch.manual_seed(0)
        loader = torch.utils.data.DataLoader(PilPipelineDataset(x[:n], y[:n]), batch_size=128, shuffle=True,
                                             num_workers=2, persistent_workers=False)
        base = timed_steps(fresh_model(arch, device, False), loader, sgd_step(device, "fp32"), warmup)
        batches = utils.BatchLoader(x[:n], y[:n], 128, augment=True, shuffle=True, device=device)
        fast = timed_steps(fresh_model(arch, device, True), batches, sgd_step(device, precision), warmup)
        train_flops = 3 * 2 * utils.count_macs(utils.build_model(arch))  # forward + backward (2x forward)

        def share_of_peak(images_per_second):
            return images_per_second * train_flops / (peak * 1e9)
        rows.append((arch, base, fast, share_of_peak(fast)))
        if args.profile:  # the convolutions' rate: all of the step's multiply-accumulates in their time alone
            shares = step_profile(fresh_model(arch, device, True), batches, sgd_step(device, precision), warmup,
                                  steps=min(5, steps))
            profiles.append((arch, shares, share_of_peak(fast / shares["convolutions"])))
        if args.compile:  # alternated with eager, each's fastest of two: one shared CPU's drift decides nothing
            compiled_model = fresh_model(arch, device, True, compiled=True)
            step = sgd_step(device, precision)
            compiled = timed_steps(compiled_model, batches, step, warmup + 3)  # the first steps compile
            eager = max(fast, timed_steps(fresh_model(arch, device, True), batches, step, warmup))
            compiled = max(compiled, timed_steps(compiled_model, batches, step, warmup))
            rows[-1] = (arch, base, eager, share_of_peak(eager))
            rows.append((f"{arch}, compiled", base, compiled, share_of_peak(compiled)))
        if args.processes > 1:
            parallel = data_parallel_rate(arch, precision, x[:n], y[:n], warmup, args.processes)
            rows.append((f"{arch}, {args.processes} processes x 1 thread", base, parallel, share_of_peak(parallel)))
    print(f"\n| model | baseline images/s (PIL workers, fp32, NCHW) | engine images/s ({precision}, channels_last, "
          f"batched augmentation) | speed-up | engine's share of matmul peak |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for arch, base, fast, share in rows:
        print(f"| {arch} | {base:.0f} | {fast:.0f} | {fast / base:.2f}x | {share:.0%} |")
    if args.passes:
        print(f"\n| speed run's training (tier94_muon, {precision}) | images/s | share of matmul peak |")
        print("| --- | ---: | ---: |")
        for size in args.passes:
            rate, macs = speedrun_rate(size, x, y, max(4, args.steps // 3))
            print(f"| batch {PASSES_BATCH:,} as passes of {size:,} images | {rate:.0f} | {rate * 6 * macs / (peak * 1e9):.0%} |")
    if profiles:
        kinds = [kind for kind, _ in OP_KINDS] + ["other"]
        print(f"\n| model (profiled, {precision}) | " + " | ".join(f"time in {k}" for k in kinds)
              + " | convolutions' own share of matmul peak |")
        print("| --- |" + " ---: |" * (len(kinds) + 1))
        for arch, shares, conv_share in profiles:
            print(f"| {arch} | " + " | ".join(f"{shares[k]:.0%}" for k in kinds) + f" | {conv_share:.0%} |")


if __name__ == "__main__":
    main()
