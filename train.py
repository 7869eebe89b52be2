"""Command line for long runs on the engine in utils.py.

    python train.py --arch resnet20 --stages 0.1:82 0.01:123 0.001:164 --wd 5e-4 --label-smoothing 0.1 \
        --out checkpoints/r20                         # the ResNet20 release's recipe
    python train.py ... --resume                      # continue from the newest ckpt_<epoch>.pth in --out
    python train.py ... --resume OUT/ckpt_135.pth --stage 2   # start stage 2 from epoch 135, as seed 000 did
    python train.py ... --stages 0.1:40 0.01:55 0.001:60 --resume OUT/ckpt_20.pth --stage 1   # a longer stage one
    torchrun --nproc_per_node=2 train.py ...          # data-parallel (NCCL on GPUs, gloo on CPUs)
"""
import argparse
import os

import torch
import torch.distributed as dist

import utils


def parse_args(argv=None):
    """The command line; defaults follow seed 000 (batch 128, SGD momentum 0.9, wd 5e-4)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet20", help=f"one of {', '.join(utils.list_models())}")
    p.add_argument("--shortcut", choices=["A", "B"], help="shortcut option of the resnet<6n+2> family")
    p.add_argument("--stages", nargs="+", default=["0.1:82", "0.01:123", "0.001:164"], help="LR:END_EPOCH per stage")
    p.add_argument("--out", required=True, help="run folder for ckpt_<epoch>.pth and best.pth")
    p.add_argument("--resume", nargs="?", const="", default=None, help="newest checkpoint of --out, or this file")
    p.add_argument("--stage", type=int,
                   help="with --resume: start this stage (1-based) at the checkpoint's epoch; an earlier one continues")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--wd", type=float, default=5e-4,
                   help="weight decay (paper and seed 001: 1e-4; seed 000 and both releases: 5e-4)")
    p.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    p.add_argument("--nesterov", action="store_true")
    p.add_argument("--schedule", choices=["staged", "cosine"], default="staged")
    p.add_argument("--label-smoothing", type=float, default=0.0,
                   help="cross-entropy label smoothing (the ResNet20 release: 0.1; ResNet18 release: 0)")
    p.add_argument("--std", choices=["seed", "true"], default="seed", help="normalization std")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
    p.add_argument("--patience", type=int, help="end a stage after this many epochs without val improvement")
    p.add_argument("--min-delta", type=float, default=0.0)
    p.add_argument("--save-every", type=int, default=5)
    p.add_argument("--stop-epoch", type=int, help="pause after this epoch (a session's time limit); --resume continues")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", help="folder with CIFAR-10 (else CIFAR10_DIR, data/, or download)")
    p.add_argument("--limit-train", type=int, help="train on the first N images of the split (smoke runs)")
    p.add_argument("--limit-val", type=int, help="validate on the first N validation images")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--tensorboard", help="folder for TensorBoard scalars")
    p.add_argument("--no-progress", action="store_true", help="no per-epoch progress bar")
    return p.parse_args(argv)


def setup_distributed(device):
    """(rank, world_size, device) from torchrun's environment; a single process gets (0, 1, device)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, utils.get_device(device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device != "cpu"
    dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        return dist.get_rank(), world_size, torch.device("cuda", local_rank)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))  # share the cores, don't oversubscribe
    return dist.get_rank(), world_size, torch.device("cpu")


def load_data(args, cfg):
    """(x_train, y_train, x_val, y_val): the seeded stratified split, optionally truncated."""
    x, y, _, _ = utils.load_cifar10(args.data)
    x_tr, y_tr, x_val, y_val = utils.train_val_split(x, y, cfg.val_size, cfg.seed)
    return x_tr[:args.limit_train], y_tr[:args.limit_train], x_val[:args.limit_val], y_val[:args.limit_val]


def main(argv=None):
    args = parse_args(argv)
    cfg = utils.TrainConfig(
        arch=args.arch, arch_options={"shortcut": args.shortcut} if args.shortcut else {},
        stages=utils.parse_stages(args.stages), batch_size=args.batch_size, optimizer=args.optimizer,
        weight_decay=args.wd, nesterov=args.nesterov, schedule=args.schedule, label_smoothing=args.label_smoothing,
        precision=args.precision, seed=args.seed, std=args.std, save_every=args.save_every,
        patience=args.patience, min_delta=args.min_delta, compile=args.compile)
    rank, world_size, device = setup_distributed(args.device)
    utils.seed_everything(cfg.seed)
    trainer = utils.Trainer(cfg, load_data(args, cfg), args.out, device, rank, world_size,
                            progress=not args.no_progress, tensorboard_dir=args.tensorboard)
    if args.resume is not None:
        trainer.resume(args.resume or None, None if args.stage is None else args.stage - 1)
    elif args.stage is not None:
        raise SystemExit("--stage needs --resume: a later stage starts from a checkpoint")
    if rank == 0:
        print(f"{cfg.arch} on {device} ({trainer.precision}), {world_size} process(es), "
              f"{len(trainer.train_loader.y)} train / {len(trainer.val_loader.y)} val images, "
              f"from epoch {trainer.epoch} stage {trainer.stage + 1}, stages {cfg.stages}", flush=True)
    trainer.fit(stop_epoch=args.stop_epoch)
    if rank == 0:
        print(f"{'done' if trainer.stage >= len(cfg.stages) else 'paused'}: epoch {trainer.epoch}, best val acc {trainer.best_val_acc:.4f}")
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
