"""The speed run: a small residual network and a recipe of known methods (after Keller Jordan's airbench94)
that trains to 94% on CIFAR-10 in minutes on 2 CPU cores; every trick is a switch of `SpeedRunConfig`.

Taught in notebook 06 (speed run); bench/speedrun.py runs its final protocol, bench/speedrun_ablation.py its
ablation.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .checkpoints import release_payload
from .data import TRUE_STD, Preprocess, augment_batch, draw_augmentation, images_to_tensor, labels_to_tensor
from .models import SPEEDRUN_WIDTHS, build_model
from .quick import shrink_images_for_tests
from .runtime import autocast, check_precision, get_device, hardware_label, resolve_precision
from .training import NonFiniteLossError
from .views import check_tta, tta_accuracies, tta_accuracy

__all__ = ["SpeedRunConfig", "SPEEDRUN_RECIPES", "SPEEDRUN_RESULTS", "speedrun_recipe", "same_recipe",
           "SPEEDRUN_TRICKS", "without_trick", "whitening_filters", "speedrun_lr_factor",
           "whiten_bias_lr_factor", "newton_schulz", "Muon", "Optimizers", "speedrun_optimizer", "Lookahead",
           "speedrun_flips", "speedrun_inputs", "speedrun_scores", "speedrun_network", "speedrun",
           "speedrun_checkpoint"]

# The learning rate and weight decay are in airbench's units. Its loss is summed over the batch, not averaged,
# and its lr is given per 1,024 images with momentum's gain 1 / (1 - momentum) divided out, so one number keeps
# its meaning when the batch size or the momentum changes: the SGD step size is lr / (1024 * (1 + 1 / (1 -
# momentum))) per image of summed loss (see speedrun_optimizer). Weight decay is per 1,024 images likewise and
# independent of the lr: PyTorch multiplies it by the lr, so it is divided by the lr once here.
#
# A batch can be run as several forward passes of micro_batch images whose summed gradients make the one step
# ("ghost batch norm", Hoffer et al. 2017): each pass normalizes by its own statistics, which is the one change to
# the arithmetic, and batch norm's running averages are updated once a pass, so their momentum m becomes
# 1 - (1 - m) ** (micro_batch / batch_size): they still average over as many images. The reason is speed on a CPU:
# a pass of 250 images keeps more of its activations in cache; tier94_muon trains 17% faster per image in passes
# of 250 than of 2,000 (`python bench/train_throughput.py --archs speedrun --passes 2000 250`: 499 against 425
# images/s, 85% against 72% of the bf16 matmul peak, on 2 cores of an AMD EPYC family 25).


@dataclass
class SpeedRunConfig:
    """The speed run's recipe (after Keller Jordan's airbench94); each trick is a switch the ablation turns off."""

    epochs: float = 10.0
    widths: tuple = SPEEDRUN_WIDTHS  # channels of the network's three groups
    batch_size: int = 512  # 1,024 runs slower on a 2-core CPU (the activations leave the cache)
    micro_batch: int = 0  # images per forward pass, dividing batch_size (0: the whole batch); see above
    lr: float = 11.5  # airbench's units: per 1,024 images of summed loss, with momentum's gain divided out
    momentum: float = 0.85
    weight_decay: float = 0.0153  # per 1,024 images, independent of the learning rate
    nesterov: bool = True
    warmup: float = 0.2  # fraction of the steps in which the lr rises from 0.2x to its peak; then linear to lr_end
    lr_end: float = 0.0  # the lr's multiple at the last step
    label_smoothing: float = 0.2
    whitening: bool = True  # first layer's filters from the training patches' covariance, frozen
    whiten_bias_epochs: float = 3.0  # the whitening layer's bias trains this long, then freezes
    whiten_bias_decay: bool = False  # that bias at the batch-norm biases' lr, falling to 0 by then (airbench94_muon)
    frozen_bn_weights: bool = True  # batch-norm scales stay 1; only their biases learn, at bias_lr_scale x the lr
    bias_lr_scale: float = 64.0
    lookahead: bool = True  # every 5 steps, pull the weights toward their running average (stronger late)
    alternating_flip: bool = True  # each image mirrored in every other epoch instead of at random
    translate: int = 2  # random shifts of up to this many pixels with reflected borders (0: none)
    tta: str = "flip_translate"  # the views the test accuracy averages: "none", "flip" or "flip_translate"
    residual: bool = True  # shortcut around each group's second convolution
    muon: bool = False  # convolution filters step by Muon (orthogonalized momentum), the rest by SGD as above
    muon_lr: float = 0.24  # Muon's step: each filter bank moves this far, relative to its norm sqrt(out channels)
    muon_momentum: float = 0.6
    precision: str = "auto"
    seed: int = 0

    def __post_init__(self):
        self.tta = check_tta(self.tta)
        check_precision(self.precision)
        if not (self.epochs > 0 and self.batch_size >= 1 and 0 <= self.warmup < 1 and self.translate >= 0):
            raise ValueError("epochs must be > 0, batch_size >= 1, warmup in [0, 1) and translate >= 0; got "
                             f"{self.epochs}, {self.batch_size}, {self.warmup}, {self.translate}")
        self.widths = tuple(self.widths)  # a list when read back from JSON
        if len(self.widths) != 3 or not all(isinstance(w, int) and w >= 1 for w in self.widths):
            raise ValueError(f"widths must be three channel counts, got {self.widths}")
        if self.micro_batch and (self.micro_batch < 1 or self.batch_size % self.micro_batch):
            raise ValueError(f"micro_batch must divide batch_size {self.batch_size} (or be 0: the whole batch); "
                             f"got {self.micro_batch}")
        if not 0 <= self.lr_end <= 1:
            raise ValueError(f"lr_end is a multiple of the peak lr in [0, 1], got {self.lr_end}")


# The named recipes, one per tier of the speed run. Each is fixed on the validation split before its five final
# runs; bench/speedrun.py --recipe NAME runs the final protocol and README.md lists what each reached.
SPEEDRUN_RECIPES = {
    # The first lap, after airbench94: 10 epochs of Nesterov SGD with lookahead.
    "tier94_sgd": SpeedRunConfig(),
    # After airbench94_muon: 8 epochs; the filters step by Muon at batch 2,000 (its update is normalized, so its
    # step per epoch grows with the number of steps: the batch is part of its lr); no warm-up and no shortcut, as
    # airbench94_muon (with the shortcut and no warm-up, a one-epoch run trained far worse); batch-norm biases at
    # 36x the lr, airbench94_muon's 0.053 in these units. Lookahead stays: without it, the validation run
    # (checkpoints/speedrun_tiers_val.json) ended half a point lower with the views. Passes of 250 images (ghost
    # batch norm, see above): with whole batches, the first final run took 529 s at 800 GFLOP/s (budget 480) for
    # 94.01% with the views; validation then had 93.88%, and the passes are kept if validation stays within 0.2
    # point of it (rule written before that run).
    "tier94_muon": SpeedRunConfig(epochs=8, batch_size=2000, micro_batch=250, muon=True, warmup=0.0,
                                  bias_lr_scale=36.0, residual=False),
    # tier94_muon with the whitening bias trained as airbench94_muon trains it: at the batch-norm biases' lr (36x
    # the base lr), falling linearly to zero over its 3 epochs; tier94_muon gives it the base lr on the run's
    # schedule. Its five final runs follow only if its validation run reaches 93.84% with the views, 0.1 point
    # above tier94_muon's 93.74% (the gap by which tier94_muon's final mean missed 94.0%; rule written before
    # the run). Its validation run ended at 93.30% with the views (checkpoints/speedrun_tiers_val.json): below the
    # gate, so it has no final runs.
    "tier94_muon_bias": SpeedRunConfig(epochs=8, batch_size=2000, micro_batch=250, muon=True, warmup=0.0,
                                       bias_lr_scale=36.0, residual=False, whiten_bias_decay=True),
    # tier94_muon for 8.5 epochs, not 8: its final runs missed 94.0% by 0.10 point with the slowest at 443 s
    # at 800 GFLOP/s, and half an epoch more is the most the 480 s budget leaves (about 470 s). Its five final
    # runs follow only if its validation run reaches 93.84% with the views, 0.1 point above tier94_muon's 93.74%
    # (rule written before the run). Validation: 93.98% with the views, so they follow. The first two, timed with
    # the test set scored in fp32 (seed 0 94.32% in 471 s, seed 1 93.86% in 491 s at 800 GFLOP/s), were stopped
    # when seed 1 went over: the time outside the epochs, mostly scoring six views of 10,000 images in fp32, was
    # 9% of each run (85 s of 950). The protocol now scores in the run's own precision, as airbench does
    # (bench/speedrun.py), and the five runs start again at seed 0.
    "tier94_muon_8.5": SpeedRunConfig(epochs=8.5, batch_size=2000, micro_batch=250, muon=True, warmup=0.0,
                                      bias_lr_scale=36.0, residual=False),
    # After airbench95: widths 128/384/384, 15 epochs, lr 10 rising over 23% of the steps and ending at 0.07x, no
    # shortcut (airbench95 has none).
    "tier95": SpeedRunConfig(epochs=15, widths=(128, 384, 384), lr=10.0, warmup=0.23, lr_end=0.07,
                             residual=False),
}


# Each recipe's final protocol (five runs and seed 0's model), as `bench/speedrun.py --recipe NAME --runs 5
# --json RUNS --save RELEASE` writes them; README.md's speed-run table and notebook 06 read these files.
SPEEDRUN_RESULTS = {"tier94_sgd": ("checkpoints/speedrun_runs.json", "checkpoints/speedrun.pth"),
                    "tier94_muon": ("checkpoints/speedrun94_runs.json", "checkpoints/speedrun94.pth"),
                    "tier94_muon_bias": ("checkpoints/speedrun94_bias_runs.json",
                                         "checkpoints/speedrun94_bias.pth"),
                    "tier94_muon_8.5": ("checkpoints/speedrun94_8.5_runs.json", "checkpoints/speedrun94_8.5.pth"),
                    "tier95": ("checkpoints/speedrun95_runs.json", "checkpoints/speedrun95.pth")}


def speedrun_recipe(name, **changes):
    """A named recipe of SPEEDRUN_RECIPES, with any fields changed (epochs=..., seed=...)."""
    if name not in SPEEDRUN_RECIPES:
        raise ValueError(f"unknown speed-run recipe {name!r}; the recipes are {', '.join(SPEEDRUN_RECIPES)}")
    return SpeedRunConfig(**{**asdict(SPEEDRUN_RECIPES[name]), **changes})


def same_recipe(recorded, cfg):
    """Whether a recipe recorded in a results file (a dict) is `cfg`. A field added to SpeedRunConfig after the
    file was written reads as its default, which is what the code did before the field existed."""
    try:
        return asdict(SpeedRunConfig(**recorded)) == asdict(cfg)
    except (TypeError, ValueError):  # a field this code does not know, or a value it refuses
        return False


SPEEDRUN_TRICKS = ("whitening", "lookahead", "alternating_flip", "label_smoothing", "translate", "tta",
                   "frozen_bn_weights", "residual", "warmup", "nesterov")


def without_trick(cfg, trick):
    """The same recipe with one trick switched off (label smoothing 0, no shifts, no TTA views, ...)."""
    off = {"label_smoothing": 0.0, "translate": 0, "tta": "none", "warmup": 0.0}.get(trick, False)
    if trick not in SPEEDRUN_TRICKS:
        raise ValueError(f"unknown trick {trick!r}; the tricks are {', '.join(SPEEDRUN_TRICKS)}")
    return SpeedRunConfig(**{**asdict(cfg), trick: off})


def whitening_filters(images, eps=5e-4):
    """24 2x2 filters that whiten normalized images' patches: eigenvectors / sqrt(eigenvalue + eps), both signs."""
    patches = images.float().unfold(2, 2, 1).unfold(3, 2, 1).transpose(1, 3).reshape(-1, 12).double()
    eigenvalues, eigenvectors = torch.linalg.eigh(patches.T @ patches / len(patches))
    filters = (eigenvectors.T / (eigenvalues[:, None] + eps).sqrt()).flip(0).reshape(12, 3, 2, 2)
    return torch.cat([filters, -filters]).float()


def speedrun_lr_factor(cfg, step, total):
    """The learning rate's multiple at a step: linear from 0.2 to 1 over the warm-up, then linear to lr_end."""
    top = cfg.warmup * total
    if step < top:
        return 0.2 + 0.8 * step / top
    return cfg.lr_end + (1 - cfg.lr_end) * (total - step) / (total - top)


def whiten_bias_lr_factor(cfg, step, steps_per_epoch):
    """The whitening bias's lr multiple with whiten_bias_decay: linear from 1 to 0 over its whiten_bias_epochs."""
    return max(0.0, 1 - step / (cfg.whiten_bias_epochs * steps_per_epoch))


def newton_schulz(grad, steps=5, eps=1e-7):
    """The nearest semi-orthogonal matrix to a 2-D `grad` (its singular values pushed towards 1), by five steps of
    the quintic Newton-Schulz iteration of Keller Jordan's Muon (coefficients from its post, 2024)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = grad.float() / (grad.norm() + eps)
    wide = x.size(0) <= x.size(1)
    x = x if wide else x.T  # iterate on the smaller Gram matrix
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else x.T


class Muon(torch.optim.Optimizer):
    """Momentum whose update is orthogonalized per filter bank (airbench94_muon's optimizer for convolutions).

    Each step first rescales the filters to norm sqrt(out channels), so the lr is a relative step size; the
    Nesterov momentum of the gradients, flattened to (out channels, in x kh x kw), is replaced by its nearest
    semi-orthogonal matrix: every direction of the update moves by the same amount.
    """

    def __init__(self, params, lr, momentum, nesterov=True):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                buf.mul_(group["momentum"]).add_(p.grad)
                grad = p.grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                p.mul_(len(p) ** 0.5 / p.norm())
                p.add_(newton_schulz(grad.reshape(len(grad), -1)).view_as(p), alpha=-group["lr"])


class Optimizers:
    """Several optimizers stepped as one: their param_groups in one list, one zero_grad, one step."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers
        self.param_groups = [group for opt in optimizers for group in opt.param_groups]

    def zero_grad(self, set_to_none=True):
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self):
        for opt in self.optimizers:
            opt.step()


def speedrun_optimizer(net, cfg):
    """Nesterov SGD in airbench's units: batch-norm biases at bias_lr_scale x the lr, the same decay per image;
    with cfg.muon, the trainable convolution filters go to Muon instead."""
    kilostep = 1024 * (1 + 1 / (1 - cfg.momentum))
    lr, decay = cfg.lr / kilostep, cfg.weight_decay * cfg.batch_size / kilostep
    trainable = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    scale = cfg.bias_lr_scale if cfg.frozen_bn_weights else 1.0

    def kind(name, param):
        if cfg.muon and param.ndim == 4:
            return "filters"
        if ".bn" in name and name.endswith("bias"):
            return "biases"
        return "whiten_bias" if cfg.whiten_bias_decay and name == "whiten.bias" else "others"

    params = {k: [p for n, p in trainable if kind(n, p) == k] for k in ("filters", "biases", "whiten_bias", "others")}
    groups = [dict(params=params["biases"], lr=lr * scale, weight_decay=decay / (lr * scale), base_lr=lr * scale),
              dict(params=params["others"], lr=lr, weight_decay=decay / lr, base_lr=lr)]
    if params["whiten_bias"]:  # its own schedule: see whiten_bias_lr_factor
        groups.append(dict(params=params["whiten_bias"], lr=lr * scale, weight_decay=decay / (lr * scale),
                           base_lr=lr * scale, whiten_bias=True))
    sgd = torch.optim.SGD(groups, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if not cfg.muon:
        return sgd
    muon = Muon(params["filters"], lr=cfg.muon_lr, momentum=cfg.muon_momentum)
    muon.param_groups[0]["base_lr"] = cfg.muon_lr
    return Optimizers(sgd, muon)


class Lookahead:
    """A running average of the weights that the weights are reset to every few steps (airbench's EMA)."""

    def __init__(self, net):
        self.average = {k: v.detach().clone() for k, v in net.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, net, decay):
        """average <- decay * average + (1 - decay) * weights; then weights <- average."""
        state = net.state_dict()
        for k, avg in self.average.items():
            avg.lerp_(state[k], 1 - decay)
            state[k].copy_(avg)


def speedrun_flips(n, epoch, cfg, first_flips):
    """Which images are mirrored this epoch: alternating from a fixed random start, or fresh draws."""
    if cfg.alternating_flip:
        return first_flips ^ bool(epoch % 2)
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7919 * epoch + 1)
    return torch.rand(n, generator=g) < 0.5


def speedrun_inputs(x, y):
    """uint8 images and their labels as the speed run's network reads them: normalized tensors."""
    return Preprocess(std=TRUE_STD)(images_to_tensor(x)), labels_to_tensor(y)


def speedrun_scores(result, x, y, tta, device="cpu", precision="fp32"):
    """(single-view accuracy, accuracy with the views `tta`) of a finished speed run on uint8 images x.

    fp32 by default whatever the run trained in: the figures `Loaded_model` gives for the saved release (fp32 by
    default for the README). The final protocol's timed score passes the run's own precision instead, as
    airbench scores in its half precision (why: tier94_muon_8.5's comment in SPEEDRUN_RECIPES).
    """
    x_norm, y = speedrun_inputs(*shrink_images_for_tests(x, y))
    return tta_accuracies(result["model"], x_norm, y, tta, device, precision)


def speedrun_network(cfg, x, passes, device):
    """The speed run's network before its first step: seeded, whitening filters from the first 5,000 normalized
    training images x, batch-norm momentum for `passes` passes a batch, batch-norm weights frozen if asked."""
    torch.manual_seed(cfg.seed)
    net = build_model("speedrun", residual=cfg.residual, widths=cfg.widths)
    net = net.to(device, memory_format=torch.channels_last)
    if cfg.whitening:
        net.whiten.weight.data.copy_(whitening_filters(x[:5000]))
        net.whiten.weight.requires_grad_(False)
    for module in net.modules():  # running averages over as many images, updated once a pass (see above)
        if isinstance(module, torch.nn.BatchNorm2d) and passes > 1:
            module.momentum = 1 - (1 - module.momentum) ** (1 / passes)
    for name, param in net.named_parameters():
        if cfg.frozen_bn_weights and ".bn" in name and name.endswith("weight"):
            param.requires_grad_(False)
    return net


def speedrun(cfg, x_train, y_train, x_eval=None, y_eval=None, device=None, log=print):
    """Train the speed run's network on uint8 images; returns dict(model, history, precision, hardware).

    With evaluation images, each epoch ends with their single-view accuracy (for the curve; nothing is selected).
    """
    device = get_device(device)
    precision = resolve_precision(device, cfg.precision)
    x_train, y_train = shrink_images_for_tests(x_train, y_train)
    if len(y_train) < cfg.batch_size:  # an epoch is whole batches: there would be no step to take
        raise ValueError(f"the recipe's batch of {cfg.batch_size} images needs at least that many training "
                         f"images; got {len(y_train)}")
    x, y = (t.to(device) for t in speedrun_inputs(x_train, y_train))
    if x_eval is not None:
        x_ev, y_ev = speedrun_inputs(x_eval, y_eval)
    passes = cfg.batch_size // cfg.micro_batch if cfg.micro_batch else 1
    net = speedrun_network(cfg, x, passes, device)
    optimizer = speedrun_optimizer(net, cfg)
    lookahead = Lookahead(net) if cfg.lookahead else None
    n, g = len(y), torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = n // cfg.batch_size
    total = max(math.ceil(cfg.epochs * steps_per_epoch), 1)
    first_flips = torch.rand(n, generator=g) < 0.5
    history = {k: [] for k in ("epoch", "train_loss", "train_acc", "val_acc", "seconds", "elapsed")}
    step, epoch, start = 0, 0, time.perf_counter()
    while step < total:
        net.train()
        tick, loss_sum, correct, seen = time.perf_counter(), 0.0, 0, 0
        if cfg.whitening and epoch == math.ceil(cfg.whiten_bias_epochs):
            net.whiten.bias.requires_grad_(False)
        order = torch.randperm(n, generator=g)
        draws = draw_augmentation(n, g, cfg.translate)
        draws[2] = speedrun_flips(n, epoch, cfg, first_flips).long()
        for i in range(min(steps_per_epoch, total - step)):
            idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            xb = augment_batch(x[idx.to(device)], pad=cfg.translate, draws=draws[:, idx].to(device), padding="reflect")
            xb, yb = xb.contiguous(memory_format=torch.channels_last), y[idx.to(device)]
            factor = speedrun_lr_factor(cfg, step, total)
            whiten_factor = whiten_bias_lr_factor(cfg, step, steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * (whiten_factor if group.get("whiten_bias") else factor)
            optimizer.zero_grad(set_to_none=True)
            for xm, ym in zip(xb.chunk(passes), yb.chunk(passes)):  # the batch's summed gradient, pass by pass
                with autocast(device, precision):
                    logits = net(xm)
                loss = F.cross_entropy(logits.float(), ym, label_smoothing=cfg.label_smoothing, reduction="sum")
                loss.backward()
                loss_sum += loss.item()
                correct += (logits.argmax(1) == ym).sum().item()
            optimizer.step()
            step += 1
            if lookahead and step % 5 == 0:
                lookahead.update(net, decay=0.95 ** 5 * (step / total) ** 3)
            seen += len(yb)
        if not math.isfinite(loss_sum):
            raise NonFiniteLossError(f"the speed run's loss became {loss_sum} in epoch {epoch + 1}; lower lr")
        if lookahead and step == total:
            lookahead.update(net, decay=1.0)  # end on the average itself
        seconds = time.perf_counter() - tick
        val = tta_accuracy(net, x_ev, y_ev, "none", device, precision) if x_eval is not None else float("nan")
        for k, v in dict(epoch=epoch, train_loss=loss_sum / seen, train_acc=correct / seen, val_acc=val,
                         seconds=seconds, elapsed=time.perf_counter() - start).items():
            history[k].append(v)
        epoch += 1
        if log:
            log(f"epoch {epoch:2d} | train loss {loss_sum / seen:.4f} acc {correct / seen:.4f} | "
                f"{'val acc %.4f | ' % val if x_eval is not None else ''}{seconds:.0f} s")
    if x_eval is None:
        del history["val_acc"]
    net.eval()
    return dict(model=net, history=history, precision=precision, hardware=hardware_label(device, precision))


def speedrun_arch_options(cfg):
    """The network's options a release file records: the shortcut switch, and the widths where they differ from
    the first lap's (so its files keep loading as they were written)."""
    widths = {"widths": list(cfg.widths)} if cfg.widths != SPEEDRUN_WIDTHS else {}
    return {"residual": cfg.residual} | widths


def speedrun_checkpoint(cfg, result, **extra):
    """A release payload for a finished speed run: what Loaded_model and the hub read, plus its recipe and history."""
    return release_payload("speedrun", speedrun_arch_options(cfg), Preprocess(std=TRUE_STD), asdict(cfg),
                           result["model"], result["history"], result["precision"], tta=cfg.tta,
                           hardware=result["hardware"], **extra)
