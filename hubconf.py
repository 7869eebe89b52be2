"""torch.hub entry points: the released CIFAR-10 networks and every architecture of cifar_resnet.list_models().

    model = torch.hub.load("PROJECT_DIR", "resnet20", pretrained=True, source="local")   # or "OWNER/REPO" from GitHub
    x = model.preprocess(images)          # uint8 N x 3 x 32 x 32 (0..255) or floats in [0, 1] -> normalized batch
    labels = model(x).argmax(1)           # indices into model.classes

Each entry returns a torch.nn.Module in eval mode on the CPU, with two attributes: `preprocess`, the
normalization its weights were trained with, and `classes`, the ten class names. With pretrained=True the weights
come from the release file in checkpoints/ (loaded with weights_only=True and its SHA-256 digest checked); with
pretrained=False the network is freshly initialized. Nothing is downloaded at import time.
"""
from pathlib import Path

import cifar_resnet  # torch.hub puts this project's folder first on sys.path

dependencies = ["torch", "torchvision", "numpy"]

HERE = Path(__file__).resolve().parent
# Entry point -> release file. An entry named after a release that is an architecture variant builds that
# variant with pretrained=False too (VARIANTS), so both settings give the same network.
RELEASES = {"resnet20": "checkpoints/resnet20.pth", "resnet20b": "checkpoints/resnet20b.pth",
            "resnet18": "checkpoints/resnet18.pth", "speedrun": "checkpoints/speedrun.pth",
            "speedrun94": "checkpoints/speedrun94.pth"}
VARIANTS = {"resnet20b": ("resnet20", {"shortcut": "B"}), "speedrun94": ("speedrun", {"residual": False})}


def _entry(name):
    def entry(pretrained=False, **options):
        if pretrained:
            if name not in RELEASES:
                raise ValueError(f"no released weights for {name}; released: {', '.join(RELEASES)}")
            loaded = cifar_resnet.Loaded_model(HERE / RELEASES[name], precision="fp32", **options)
            model, preprocess, classes = loaded.model, loaded.preprocess, loaded.classes
        else:
            arch, fixed = VARIANTS.get(name, (name, {}))
            model = cifar_resnet.build_model(arch, **{**fixed, **options})
            preprocess = cifar_resnet.Preprocess(size=cifar_resnet.input_size(arch))
            classes = list(cifar_resnet.CLASSES)
        model.preprocess, model.classes = preprocess, classes
        return model.cpu().eval()

    entry.__name__ = name
    entry.__doc__ = (f"{name} for CIFAR-10" + (f"; pretrained=True loads {RELEASES[name]}" if name in RELEASES else "")
                     + "; returns an eval-mode nn.Module with .preprocess and .classes.")
    return entry


for _name in [*cifar_resnet.list_models(), *VARIANTS]:
    globals()[_name] = _entry(_name)
