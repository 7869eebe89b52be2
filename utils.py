"""The notebooks' one import: every public name of the `cifar_resnet` package, as `utils.NAME`.

Each name is defined in the package module for its concern (see cifar_resnet/__init__.py for the map and the
notebook that teaches each one); this file only gathers them, so `import utils` in a notebook, in the reference
reports' code and in train.py keeps working.
"""
from cifar_resnet import *  # noqa: F401,F403
from cifar_resnet import __all__  # noqa: F401
