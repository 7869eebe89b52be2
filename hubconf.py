"""torch.hub entry points: the released CIFAR-10 networks and every architecture of utils.list_models().

    model = torch.hub.load("PROJECT_DIR", "resnet20", pretrained=True, source="local")   # or "OWNER/REPO" from GitHub
    x = model.preprocess(images)          # uint8 N x 3 x 32 x 32 (0..255) or floats in [0, 1] -> normalized batch
    labels = model(x).argmax(1)           # indices into model.classes

Each entry returns a torch.nn.Module in eval mode on the CPU, with two attributes: `preprocess`, the
normalization its weights were trained with, and `classes`, the ten class names. With pretrained=True the weights
come from the release file in checkpoints/ (loaded with weights_only=True and its SHA-256 digest checked); with
pretrained=False the network is freshly initialized. Nothing is downloaded at import time.
"""
import importlib.util
import sys
from pathlib import Path

dependencies = ["torch", "torchvision", "numpy"]

HERE = Path(__file__).resolve().parent
RELEASES = {"resnet20": "checkpoints/resnet20.pth", "resnet18": "checkpoints/resnet18.pth",
            "speedrun": "checkpoints/speedrun.pth"}


def _utils():
    """This project's utils.py, imported by path under its own name (a caller may have another `utils`)."""
    if "cifar10_resnet_utils" not in sys.modules:
        spec = importlib.util.spec_from_file_location("cifar10_resnet_utils", HERE / "utils.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["cifar10_resnet_utils"]


def _entry(name):
    def entry(pretrained=False, **options):
        utils = _utils()
        if pretrained:
            if name not in RELEASES:
                raise ValueError(f"no released weights for {name}; released: {', '.join(RELEASES)}")
            loaded = utils.Loaded_model(HERE / RELEASES[name], precision="fp32", **options)
            model, preprocess, classes = loaded.model, loaded.preprocess, loaded.classes
        else:
            model = utils.build_model(name, **options)
            preprocess, classes = utils.Preprocess(size=utils.input_size(name)), list(utils.CLASSES)
        model.preprocess, model.classes = preprocess, classes
        return model.cpu().eval()

    entry.__name__ = name
    entry.__doc__ = (f"{name} for CIFAR-10" + (f"; pretrained=True loads {RELEASES[name]}" if name in RELEASES else "")
                     + "; returns an eval-mode nn.Module with .preprocess and .classes.")
    return entry


for _name in _utils().list_models():
    globals()[_name] = _entry(_name)
