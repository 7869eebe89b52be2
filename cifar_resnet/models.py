"""The networks: residual blocks, `ResNet` in the CIFAR and ImageNet layouts, the speed run's network, the
registry of names (`build_model`, `list_models`), counts of parameters and multiply-accumulates, and matching a
file's weights to a network.

Taught in notebook 02 (architecture); the speed run's network in notebook 06. State-dict names follow the
reference reports (conv1, bn1, layer1..., shortcut, linear), so their checkpoints load.
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["PadShortcut", "BasicBlock", "PlainBlock", "PreActBlock", "PreActBottleneck", "ResNet",
           "SpeedRunGroup", "SpeedRunNet", "without_batch_norm", "build_model", "list_models", "input_size",
           "canonical_arch_options", "SPEEDRUN_WIDTHS",
           "count_parameters", "count_macs", "layer_table", "strip_module_prefix", "find_state_dict", "guess_arch",
           "load_weights"]

# ----------------------------------------------------------------------------- shortcuts (He et al. 2016, sec. 3.3)


class PadShortcut(nn.Module):
    """Option A shortcut of He et al.: subsample by 2 and zero-pad the new channels (no parameters)."""

    def __init__(self, extra_channels):
        super().__init__()
        self.extra = extra_channels

    def forward(self, x):
        x = x[:, :, ::2, ::2]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


def _projection(in_planes, out_planes, stride):
    """Option B shortcut: 1x1 convolution and batch norm."""
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False), nn.BatchNorm2d(out_planes))


def _shortcut(in_planes, out_planes, stride, kind):
    """Identity when shapes match, else option A (zero pad) or B (projection)."""
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    return PadShortcut(out_planes - in_planes) if kind == "A" else _projection(in_planes, out_planes, stride)


def _preact_shortcut(in_planes, out_planes, stride):
    """Identity, or a bare 1x1 projection applied to the pre-activated input (He et al. 2016b)."""
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False))

# ----------------------------------------------------------------------------- blocks (notebook 02)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (post-activation, ResNet v1)."""

    expansion = 1

    def __init__(self, in_planes, planes, stride=1, shortcut="B"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes, stride, shortcut)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class PlainBlock(BasicBlock):
    """A BasicBlock without its residual connection: the "plain" baseline of He et al. (2016), Figure 6."""

    def __init__(self, in_planes, planes, stride=1, shortcut="A"):
        super().__init__(in_planes, planes, stride, shortcut="A")  # option A: no parameters, so none to drop
        del self.shortcut

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)))  # no "+ shortcut(x)": the one line that makes a ResNet


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016b): BN-ReLU-conv twice; `shortcut` is accepted and ignored."""

    expansion = 1

    def __init__(self, in_planes, planes, stride=1, shortcut="B"):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.shortcut = _preact_shortcut(in_planes, planes, stride)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        short = self.shortcut(out) if len(self.shortcut) else x  # projections see the activated input
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + short


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck block (1x1, 3x3, 1x1), the "version 2" block of the ResNet v1/v2 reports."""

    expansion = 4

    def __init__(self, in_planes, planes, stride=1, shortcut="B"):
        super().__init__()
        out_planes = planes * self.expansion
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.shortcut = _preact_shortcut(in_planes, out_planes, stride)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        short = self.shortcut(out) if len(self.shortcut) else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        return out + short

# ----------------------------------------------------------------------------- the network (notebook 02)


class ResNet(nn.Module):
    """ResNet with the reference reports' state_dict names: conv1, bn1, layer1..., linear."""

    def __init__(self, block, num_blocks, widths, num_classes=10, stem="cifar", shortcut="B"):
        super().__init__()
        self.preact = block in (PreActBlock, PreActBottleneck)
        self.in_planes = widths[0]
        if stem == "imagenet":  # the 224-pixel ResNet18 report's 7x7 stride 2 convolution and max-pool
            self.conv1 = nn.Conv2d(3, widths[0], 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
            self.maxpool = nn.Identity()
        # pre-activation nets normalize after the last block instead of after the stem
        self.bn1 = nn.BatchNorm2d(widths[-1] * block.expansion if self.preact else widths[0])
        for i, (planes, n) in enumerate(zip(widths, num_blocks)):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", self._make_layer(block, planes, n, stride, shortcut))
        self.num_layers = len(widths)
        self.linear = nn.Linear(widths[-1] * block.expansion, num_classes)
        self._init_weights()

    def _make_layer(self, block, planes, num_blocks, stride, shortcut):
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(block(self.in_planes, planes, s, shortcut))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x):
        """Penultimate features: the pooled output of the last stage."""
        out = self.conv1(x)
        if not self.preact:
            out = F.relu(self.bn1(out))
        out = self.maxpool(out)
        for i in range(1, self.num_layers + 1):
            out = getattr(self, f"layer{i}")(out)
        if self.preact:
            out = F.relu(self.bn1(out))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x):
        return self.linear(self.features(x))

# ----------------------------------------------------------------------------- the speed run's network (notebook 06)


class SpeedRunGroup(nn.Module):
    """conv, 2x2 max-pool, BN, GELU, then conv, BN, GELU with a shortcut around it (the speed run's group)."""

    def __init__(self, in_planes, planes, residual=True):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, padding=1, bias=False)
        # momentum 0.4: in a 10-epoch run the running statistics must catch up fast
        self.bn1 = nn.BatchNorm2d(planes, eps=1e-12, momentum=0.4)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-12, momentum=0.4)
        self.residual = residual
        for conv in (self.conv1, self.conv2):  # identity on the first input channels: the group starts near a copy
            nn.init.dirac_(conv.weight.data[:conv.in_channels])

    def forward(self, x):
        x = self.conv1(x)
        x = F.max_pool2d(x, 2)
        x = F.gelu(self.bn1(x))
        out = self.conv2(x)
        out = F.gelu(self.bn2(out))
        return x + out if self.residual else out


SPEEDRUN_WIDTHS = (64, 256, 256)  # the first lap's (airbench94's) channels of the speed-run net's three groups


class SpeedRunNet(nn.Module):
    """The speed run's network: a 2x2 whitening stem, three groups of widths 64/256/256, max-pool, linear / 9."""

    def __init__(self, num_classes=10, widths=SPEEDRUN_WIDTHS, residual=True):
        super().__init__()
        self.whiten = nn.Conv2d(3, 24, 2)  # 24 = both signs of the 12 eigenvectors of 2x2x3 patches
        planes = [24, *widths]
        for i in range(3):
            setattr(self, f"layer{i + 1}", SpeedRunGroup(planes[i], planes[i + 1], residual))
        self.linear = nn.Linear(widths[-1], num_classes, bias=False)

    def features(self, x):
        """Penultimate features: the global max over the last group's 3x3 map."""
        out = F.gelu(self.whiten(x))
        out = self.layer1(out)
        out = self.layer2(out)
        out = self.layer3(out)
        return F.adaptive_max_pool2d(out, 1).flatten(1)

    def forward(self, x):
        return self.linear(self.features(x)) / 9  # smaller logits: calmer early steps at a high learning rate

# ----------------------------------------------------------------------------- the registry (notebook 02)


def _cifar_depth(name, prefix, step):
    """Depth from a name like resnet56 (6n+2) or preact_resnet164 (9n+2), or None."""
    m = re.fullmatch(prefix + r"(\d+)", name)
    if m and int(m.group(1)) > 2 and (int(m.group(1)) - 2) % step == 0:
        return int(m.group(1))
    return None


def _speedrun_model(num_classes, options):
    residual = options.pop("residual", True)
    widths = tuple(options.pop("widths", SPEEDRUN_WIDTHS))
    if options or not isinstance(residual, bool) or len(widths) != 3:
        raise TypeError("speedrun takes residual=True or False and widths=(three channel counts); got "
                        f"{options or dict(residual=residual, widths=widths)!r}")
    return SpeedRunNet(num_classes, widths=widths, residual=residual)


def without_batch_norm(model):
    """The same network with every batch norm replaced by the identity (notebook 02's experiment: what batch norm
    buys). Convolutions keep bias=False, so nothing else changes."""
    for name, module in model.named_children():
        if isinstance(module, nn.BatchNorm2d):
            setattr(model, name, nn.Identity())
        else:
            without_batch_norm(module)
    return model


def build_model(name, num_classes=10, **options):
    """A model by name (see list_models()); options: shortcut='A'|'B' for the 6n+2 family, residual and widths for
    speedrun, batch_norm=False for any ResNet without its batch norms."""
    if name == "speedrun":
        return _speedrun_model(num_classes, options)
    batch_norm = options.pop("batch_norm", True)
    if not isinstance(batch_norm, bool):
        raise TypeError(f"batch_norm must be True or False, got {batch_norm!r}")
    model = _resnet(name, num_classes, options)
    return model if batch_norm else without_batch_norm(model)


def _resnet(name, num_classes, options):
    """The ResNet family of build_model, by name."""
    shortcut = options.pop("shortcut", None)
    if options:
        raise TypeError(f"unknown options {sorted(options)} for {name}; its options are shortcut='A' or 'B' and "
                        "batch_norm=True or False")
    if shortcut not in (None, "A", "B"):
        raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
    imagenet_widths = [64, 128, 256, 512]
    if name in ("resnet18", "resnet18_imagenet"):
        stem = "imagenet" if name == "resnet18_imagenet" else "cifar"
        return ResNet(BasicBlock, [2, 2, 2, 2], imagenet_widths, num_classes, stem=stem, shortcut=shortcut or "B")
    if name == "preact_resnet18":
        return ResNet(PreActBlock, [2, 2, 2, 2], imagenet_widths, num_classes)
    if depth := _cifar_depth(name, "preact_resnet", 9):
        return ResNet(PreActBottleneck, [(depth - 2) // 9] * 3, [16, 32, 64], num_classes)
    if depth := _cifar_depth(name, "resnet", 6):
        return ResNet(BasicBlock, [(depth - 2) // 6] * 3, [16, 32, 64], num_classes, shortcut=shortcut or "A")
    if depth := _cifar_depth(name, "plain", 6):
        if shortcut is not None:
            raise ValueError(f"{name} has no shortcuts, so it takes no shortcut option")
        return ResNet(PlainBlock, [(depth - 2) // 6] * 3, [16, 32, 64], num_classes)
    raise ValueError(f"unknown model {name!r}; valid names: {', '.join(list_models())} "
                     "(any resnet<6n+2>, plain<6n+2> or preact_resnet<9n+2> depth works too)")


def list_models():
    """The model names build_model knows by default."""
    return ["resnet18", "resnet18_imagenet", "preact_resnet18", "resnet20", "resnet32",
            "resnet44", "resnet56", "resnet110", "preact_resnet164", "plain20", "plain56", "speedrun"]


def input_size(name):
    """Input side length a model expects: 224 for resnet18_imagenet, else 32."""
    return 224 if name == "resnet18_imagenet" else 32


def canonical_arch_options(arch, options):
    """Options with the default shortcut filled in, so that {} and {'shortcut': 'A'} name the same resnet20."""
    options = dict(options or {})
    if arch != "speedrun":
        options.setdefault("batch_norm", True)
    if _cifar_depth(arch, "resnet", 6):
        options.setdefault("shortcut", "A")
    elif arch in ("resnet18", "resnet18_imagenet"):
        options.setdefault("shortcut", "B")
    elif arch == "speedrun":
        options.setdefault("residual", True)
        options["widths"] = list(options.get("widths", SPEEDRUN_WIDTHS))
    return options

# ----------------------------------------------------------------------------- counting (notebooks 02, 06)


def count_parameters(model):
    """Number of parameters of a model."""
    return sum(p.numel() for p in model.parameters())


def _flop_counts(model, size):
    """FlopCounterMode's per-module counts of one eval-mode forward pass on one size x size image."""
    weight = next(model.parameters())
    counter, was_training = FlopCounterMode(display=False), model.training
    with counter, torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size, device=weight.device, dtype=weight.dtype))
    model.train(was_training)
    return counter.get_flop_counts()


def count_macs(model, size=32):
    """Multiply-accumulates of one forward pass on one size x size image (flop counter / 2)."""
    return sum(_flop_counts(model, size)["Global"].values()) // 2


def layer_table(model, size=32):
    """(name, output shape, parameters, MACs) of each top-level layer for one size x size image."""
    shapes = {}
    hooks = [m.register_forward_hook(lambda _, __, out, n=n: shapes.__setitem__(n, tuple(out.shape[1:])))
             for n, m in model.named_children()]
    try:
        flops = _flop_counts(model, size)
    finally:
        for hook in hooks:
            hook.remove()
    root = type(model).__name__
    return [(n, shapes.get(n), count_parameters(m), sum(flops.get(f"{root}.{n}", {}).values()) // 2)
            for n, m in model.named_children()]

# ----------------------------------------------------------------------------- weights from a file (notebook 04)


def strip_module_prefix(state_dict):
    """Remove the DataParallel / DDP / torch.compile prefixes from state_dict keys."""
    return {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in state_dict.items()}


def find_state_dict(ckpt):
    """The weights inside a checkpoint: under 'model', 'net', 'state_dict', or the dict itself."""
    for key in ("model", "net", "state_dict", "model_state_dict"):
        if isinstance(ckpt, dict) and isinstance(ckpt.get(key), dict):
            return strip_module_prefix(ckpt[key])
    if isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return strip_module_prefix(ckpt)
    found = list(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt)
    raise ValueError("checkpoint holds no state_dict: expected a dict of tensors, or one under "
                     f"'model', 'net' or 'state_dict'; found keys {found}")


def _candidate_archs():
    """(name, options) pairs to compare an unknown state_dict against."""
    pairs = [(n, {}) for n in list_models()]
    return pairs + [(n, {"shortcut": "B"}) for n in ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110")]


def guess_arch(state_dict):
    """Names (with options) of the known models whose state_dict keys and shapes match exactly."""
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    num_classes = shapes.get("linear.weight", (10,))[0]
    matches = []
    for name, opts in _candidate_archs():
        ref = build_model(name, num_classes, **opts).state_dict()
        if shapes == {k: tuple(v.shape) for k, v in ref.items()}:
            matches.append((name, opts))
    return matches


def load_weights(model, state_dict, arch_label):
    """load_state_dict with exact key matching and an error that names the difference and the likely model."""
    own = model.state_dict()
    # files from PyTorch before 0.4.1 have no num_batches_tracked: batch-norm step counters, not weights
    counters = {k: v for k, v in own.items()
                if k.endswith("num_batches_tracked") and k.replace("num_batches_tracked", "running_mean") in state_dict}
    missing = sorted(set(own) - set(state_dict) - set(counters))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = sorted(k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    if missing or unexpected or wrong:
        guesses = guess_arch(state_dict)
        hint = ("it looks like " + " or ".join(f"arch={n!r}" + "".join(f", {k}={v!r}" for k, v in o.items())
                                           for n, o in guesses)) if guesses else "it matches no known model"
        raise ValueError(f"checkpoint does not fit {arch_label}: {len(missing)} missing keys {missing[:5]}, "
                         f"{len(unexpected)} unexpected keys {unexpected[:5]}, shape mismatches {wrong[:5]}; {hint}")
    weights = {**counters, **state_dict}
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in weights.items()})
    return model
