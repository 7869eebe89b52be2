"""torch.hub: the release files load through hubconf.py in a fresh process and score the README's figures."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_release import RESULTS, TEST_ACC, readme_speedrun_figures, release_table

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import json, sys, numpy as np, torch
name, root, data = sys.argv[1:]
model = torch.hub.load(root, name, pretrained=True, source="local")
x = torch.from_numpy(np.load(data + "/x_test.npy")).permute(0, 3, 1, 2)
y = np.load(data + "/y_test.npy")
with torch.no_grad():
    pred = torch.cat([model(model.preprocess(x[i:i + 500])).argmax(1) for i in range(0, len(x), 500)]).numpy()
print(json.dumps({"acc": float((pred == y).mean()), "training": model.training, "classes": model.classes,
                  "device": str(next(model.parameters()).device), "type": type(model).__mro__[-2].__name__}))
"""


@pytest.mark.parametrize("name", [Path(path).stem for path in [*RESULTS, *release_table.speedrun_releases()]])
def test_hub_pretrained_scores_the_readme_figure(name, real_cifar10, tmp_path):
    r = subprocess.run([sys.executable, "-c", SCRIPT, name, str(ROOT), os.environ["CIFAR10_DIR"]], cwd=tmp_path,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    path = f"checkpoints/{name}.pth"  # the hub's module gives single-view predictions
    readme = readme_speedrun_figures(path)[0] if path in release_table.SPEEDRUNS else \
        float(RESULTS[path][TEST_ACC].rstrip("%"))
    assert abs(out["acc"] * 100 - readme) <= 0.05
    assert out["training"] is False and out["device"] == "cpu" and out["classes"][3] == "cat"


def test_hub_offers_every_architecture_untrained_and_refuses_unreleased_weights():
    import hubconf
    import utils
    assert hubconf.dependencies == ["torch", "torchvision", "numpy"]
    for name in utils.list_models():
        model = getattr(hubconf, name)(pretrained=False)
        assert not model.training and model.preprocess.size == utils.input_size(name) and len(model.classes) == 10
    with pytest.raises(ValueError, match="no released weights for resnet56"):
        hubconf.resnet56(pretrained=True)
    # a release's variant has its own entry: the ResNet20 report's projection-shortcut net, its 272,474 parameters
    assert utils.count_parameters(hubconf.resnet20b(pretrained=False)) == 272_474


def test_every_release_has_an_entry_point_and_its_untrained_twin_is_the_same_network():
    import hubconf
    import utils
    assert {f"checkpoints/{name}.pth" for name in hubconf.RELEASES} >= set(RESULTS)
    for name, path in hubconf.RELEASES.items():
        meta = utils.load_checkpoint(ROOT / path)
        shapes = {k: v.shape for k, v in meta["model"].items()}
        untrained = getattr(hubconf, name)(pretrained=False)
        assert {k: v.shape for k, v in untrained.state_dict().items()} == shapes, name


def test_hub_preprocess_refuses_what_loaded_model_refuses():
    """The hub's .preprocess gave chance-level predictions from int64 or 0..255 float images; now it refuses them."""
    import hubconf
    import torch
    model = hubconf.resnet20(pretrained=True)
    for images in (torch.zeros(2, 3, 32, 32, dtype=torch.int64), torch.full((2, 3, 32, 32), 255.0)):
        with pytest.raises(ValueError, match="uint8 pixels 0..255 or floats in|must lie in"):
            model.preprocess(images)
    assert model(model.preprocess(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))).shape == (2, 10)
