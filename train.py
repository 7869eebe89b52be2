r"""Command line for long runs on the engine of the cifar_resnet package (the same one the notebooks use).

    python train.py --arch resnet20 --stages 0.1:82 0.01:123 0.001:164 --wd 5e-4 --label-smoothing 0.1 \
        --out checkpoints/r20                         # the ResNet20 release's recipe
    python train.py --arch resnet20 --epochs 30 --out checkpoints/r20_short   # the same three stages in 30 epochs
    python train.py --out checkpoints/r20 --resume    # continue the newest checkpoint with its recorded recipe
    python train.py --out OUT --resume OUT/ckpt_135.pth --stage 2   # start stage 2 from epoch 135
    python train.py --out OUT --stages 0.1:40 0.01:55 0.001:60 --resume OUT/ckpt_20.pth --stage 1 --override
                                                      # a longer stage one (the change is written into the history)
    torchrun --nproc_per_node=2 train.py ...          # data-parallel (NCCL on GPUs, gloo on CPUs)
"""
import argparse
import math
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import utils

# flag -> TrainConfig field, for the flags that make up a run's recipe; left out on --resume, they take the
# values the checkpoint recorded
RECIPE_FLAGS = {"stages": "stages", "batch_size": "batch_size", "wd": "weight_decay", "optimizer": "optimizer",
                "nesterov": "nesterov", "schedule": "schedule", "label_smoothing": "label_smoothing", "std": "std",
                "patience": "patience", "min_delta": "min_delta", "seed": "seed", "input_size": "input_size"}


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block), exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def finite_float(text):
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def parse_args(argv=None):
    """The command line; recipe flags left out take TrainConfig's defaults, or on --resume the recorded values."""
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", help=f"one of {', '.join(utils.list_models())} (default resnet20)")
    p.add_argument("--shortcut", choices=["A", "B"], help="shortcut option of the resnet<6n+2> family")
    p.add_argument("--stages", nargs="+", help="LR:END_EPOCH per stage (default 0.1:82 0.01:123 0.001:164)")
    p.add_argument("--epochs", type=positive_int, help="scale the stage ends so that the last one is this epoch")
    p.add_argument("--out", required=True, help="run folder for ckpt_<epoch>.pth and best.pth (one run per folder)")
    p.add_argument("--resume", nargs="?", const="", default=None, help="newest checkpoint of --out, or this file")
    p.add_argument("--override", action="store_true",
                   help="with --resume: accept recipe flags that differ from the recorded ones (noted in the history)")
    p.add_argument("--stage", type=int,
                   help="with --resume: start this stage (1-based) at the checkpoint's epoch; an earlier one continues")
    p.add_argument("--batch-size", type=positive_int)
    p.add_argument("--wd", type=finite_float, help="weight decay (default 5e-4; the paper: 1e-4)")
    p.add_argument("--optimizer", choices=["sgd", "adam"])
    p.add_argument("--nesterov", action="store_const", const=True)
    p.add_argument("--schedule", choices=["staged", "cosine"])
    p.add_argument("--label-smoothing", type=finite_float, help="cross-entropy label smoothing (the ResNet20 release: 0.1)")
    p.add_argument("--std", choices=["common", "true"], help="normalization std: the common (0.2023, ...) or the measured")
    p.add_argument("--input-size", type=positive_int,
                   help="pixels a side to resize to (default: the architecture's own, 224 for resnet18_imagenet)")
    p.add_argument("--precision", choices=utils.PRECISIONS, default="auto")
    p.add_argument("--patience", type=positive_int, help="end a stage after this many epochs without val improvement")
    p.add_argument("--min-delta", type=finite_float)
    p.add_argument("--save-every", type=positive_int, help="checkpoint every N epochs (default 5)")
    p.add_argument("--stop-epoch", type=positive_int, help="pause after this epoch (a session's limit); --resume goes on")
    p.add_argument("--seed", type=int)
    p.add_argument("--data", help="folder with CIFAR-10 (else CIFAR10_DIR, data/, or download)")
    p.add_argument("--limit-train", type=positive_int, help="train on the first N images of the split (smoke runs)")
    p.add_argument("--limit-val", type=positive_int, help="validate on the first N validation images")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--compile", nargs="?", const="on", default="auto", choices=utils.COMPILE_CHOICES,
                   help="torch.compile the model: auto (on a GPU; eager on a CPU, where it trains no faster), "
                        "on (--compile alone) or off")
    p.add_argument("--tensorboard", help="folder for TensorBoard scalars")
    p.add_argument("--no-progress", action="store_true", help="no per-epoch progress bar")
    args = p.parse_args(argv)
    check_args(p, args)
    return p, args


def check_args(p, args):
    """Every mistake that needs no data: found before anything is loaded or trained."""
    if args.stages is not None:
        try:
            utils.parse_stages(args.stages)
        except ValueError as e:
            p.error(f"--stages: {e}")
    if args.stage is not None and args.resume is None:
        p.error("--stage needs --resume: a later stage starts from a checkpoint")
    if args.override and args.resume is None:
        p.error("--override only applies with --resume")
    if args.data is not None and not Path(args.data).is_dir():
        p.error(f"--data {args.data}: no such folder")
    if args.device is not None:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            p.error(f"--device {args.device}: expected cpu, cuda or cuda:N")
        if device.type == "cuda" and not torch.cuda.is_available():
            p.error(f"--device {args.device}: no CUDA GPU is available here; use --device cpu")
        if device.type not in ("cpu", "cuda"):
            p.error(f"--device {args.device}: expected cpu, cuda or cuda:N")
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write_test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        p.error(f"--out {args.out}: cannot write there ({e.strerror or e})")


def build_config(p, args, recorded=None):
    """The run's TrainConfig: the flags given, else the recorded recipe (on --resume), else the defaults."""
    base = dict(recorded or {})
    base = {k: v for k, v in base.items() if k in utils.TrainConfig.__dataclass_fields__}
    if args.arch is not None:
        base["arch"] = args.arch
    if args.shortcut is not None:
        base["arch_options"] = {**base.get("arch_options", {}), "shortcut": args.shortcut}
    for flag, name in RECIPE_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            base[name] = utils.parse_stages(value) if flag == "stages" else value
    if args.epochs is not None:
        base["stages"] = utils.scale_stages(base.get("stages", utils.TrainConfig().stages), args.epochs)
    if args.save_every is not None:
        base["save_every"] = args.save_every
    base.update(precision=args.precision, compile=args.compile)
    try:
        cfg = utils.TrainConfig(**base)
        utils.build_model(cfg.arch, **cfg.arch_options)
    except (ValueError, TypeError) as e:
        p.error(str(e))
    if args.stage is not None and not 1 <= args.stage <= len(cfg.stages):
        p.error(f"--stage {args.stage}: this schedule has stages 1 to {len(cfg.stages)}")
    return cfg


def setup_distributed(device):
    """(rank, world_size, device) from torchrun's environment; a single process gets (0, 1, device)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, utils.get_device(device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if use_cuda:  # before the process group, so NCCL binds each rank to its own GPU
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        return dist.get_rank(), world_size, torch.device("cuda", local_rank)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))  # share the cores, don't oversubscribe
    return dist.get_rank(), world_size, torch.device("cpu")


def continues_its_own_run(args):
    """True when --resume continues a run of --out itself; resuming another folder's checkpoint into --out starts
    a new run there, which must not overwrite a run --out already holds."""
    if args.resume is None:
        return False
    source = Path(args.resume or args.out)
    return (source if source.is_dir() else source.parent).resolve() == Path(args.out).resolve()


def load_data(args, cfg):
    """(x_train, y_train, x_val, y_val): the seeded stratified split, optionally truncated."""
    x, y, _, _ = utils.load_cifar10(args.data)
    x_tr, y_tr, x_val, y_val = utils.train_val_split(x, y, cfg.val_size, cfg.seed)
    return x_tr[:args.limit_train], y_tr[:args.limit_train], x_val[:args.limit_val], y_val[:args.limit_val]


def main(argv=None):
    p, args = parse_args(argv)
    rank, world_size, device = setup_distributed(args.device)
    try:
        run(p, args, rank, world_size, device)
        if world_size > 1:
            # A rank that tears its gloo group down while rank 0 is still saving aborts at exit ("terminate
            # called without an active exception": 5 of 30 two-process runs here); waiting for every rank first
            # made it 0 of 30.
            dist.barrier()
    finally:  # also on an error or Ctrl-C: the other ranks are not left waiting in a collective
        if world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def run(p, args, rank, world_size, device):
    """Check, build or resume, and train: the body of main, inside the process group."""
    source, ckpt = None, None
    try:
        folder = args.out
        if rank == 0:  # before any data is loaded: a busy folder, or another run's for a new run, is refused
            folder = utils.RunFolder(args.out).claim(fresh=not continues_its_own_run(args))
        if args.resume is not None:
            source, ckpt = next(utils.readable_checkpoints(args.resume or args.out))
        cfg = build_config(p, args, ckpt["config"] if ckpt else None)
        utils.seed_everything(cfg.seed)
        trainer = utils.Trainer(cfg, load_data(args, cfg), folder, device, rank, world_size,
                                progress=not args.no_progress, tensorboard_dir=args.tensorboard)
        if ckpt:
            trainer.load_state(source, None if args.stage is None else args.stage - 1, args.override, ckpt)
    except (utils.RunFolderError, utils.DamagedCheckpointError, FileNotFoundError, ValueError) as e:
        p.error(str(e).replace("\n", " "))
    last = cfg.stages[-1][1]
    if trainer.epoch > last:
        print(f"nothing to train: {source} is at epoch {trainer.epoch}, past the end of the given schedule "
              f"(epoch {last}); give --stages that end after epoch {trainer.epoch} to train on.")
        return
    if trainer.epoch == last or trainer.stage >= len(cfg.stages):
        print(f"nothing to train: {source} is at epoch {trainer.epoch}, the end of its schedule ({last} epochs). "
              "To train longer, give longer --stages with --override.")
        return
    if rank == 0:
        print(f"{cfg.arch} on {device} ({trainer.precision}, {trainer.compile_note}), {world_size} process(es) of "
              f"batch {trainer.batch_per_rank}, "
              f"{len(trainer.train_loader.y)} train / {len(trainer.val_loader.y)} val images, "
              f"from epoch {trainer.epoch} stage {trainer.stage + 1}, stages {cfg.stages}", flush=True)
    try:
        trainer.fit(stop_epoch=args.stop_epoch)
    except utils.NonFiniteLossError as e:  # the last saved checkpoint stays the run's newest
        sys.exit(f"{p.prog}: error: {e}")
    if rank == 0:
        print(f"{'done' if trainer.stage >= len(cfg.stages) else 'paused'}: epoch {trainer.epoch}, best val acc {trainer.best_val_acc:.4f}")


if __name__ == "__main__":
    sys.exit(main())
