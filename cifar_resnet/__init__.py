"""ResNets on CIFAR-10: the engine behind the notebooks, one module per concern.

Bottom to top (each module imports only from the ones above it in this list):

    runtime      device, precision names and dtypes, CPU facts, seeding, requirements   (every setup cell)
    data         files, validation split, Preprocess, augmentation, BatchLoader         (notebook 01)
    models       blocks, ResNet, the speed run's network, the registry, counts          (notebook 02)
    checkpoints  digest, atomic write, safe loading, release payload, RunFolder         (notebooks 03, 04)
    recipe       TrainConfig, learning-rate stages, optimizer, recipe comparison        (notebook 03)
    quick        the test suite's quick mode (CIFAR_QUICK=1), nothing else
    training     train_epoch, evaluate, Trainer, start_or_resume                        (notebook 03)
    views        test-time views: names, check, averaged probabilities                  (notebooks 04, 06)
    quantize     int8 inference on x86 CPUs                                             (notebook 04)
    predict      Loaded_model, per-class accuracy, mistakes, calibration                (notebook 04)
    reports      the reference reports and this project's run of each one's system      (notebook 04)
    speed        the speed run: its recipe and training                                 (notebook 06)
    pictures     every figure                                                           (notebooks 01-06)

`utils.py` at the project root re-exports every public name, so notebooks write `utils.NAME`.
"""
from . import (checkpoints, data, models, pictures, predict, quantize, quick, recipe, reports, runtime, speed,
               training, views)
from .checkpoints import *  # noqa: F401,F403
from .data import *  # noqa: F401,F403
from .models import *  # noqa: F401,F403
from .pictures import *  # noqa: F401,F403
from .predict import *  # noqa: F401,F403
from .quantize import *  # noqa: F401,F403
from .recipe import *  # noqa: F401,F403
from .reports import *  # noqa: F401,F403
from .runtime import *  # noqa: F401,F403
from .speed import *  # noqa: F401,F403
from .training import *  # noqa: F401,F403
from .views import *  # noqa: F401,F403

MODULES = (runtime, data, models, checkpoints, recipe, quick, training, views, quantize, predict, reports, speed,
           pictures)
__all__ = [name for module in MODULES if module is not quick for name in module.__all__]
