"""The picture helpers: shapes, value ranges, hooks removed, helpful errors."""
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

import utils

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return utils.build_model("resnet20").eval()


@pytest.fixture
def batch():
    return torch.randn(3, 3, 32, 32)


def _hook_count(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def test_feature_maps_shapes_and_hooks_removed(model, batch):
    maps = utils.feature_maps(model, batch, ["conv1", "layer3"])
    assert maps["conv1"].shape == (3, 16, 32, 32) and maps["layer3"].shape == (3, 64, 8, 8)
    assert _hook_count(model) == 0


def test_grad_cam_is_nonnegative_image_sized_and_clean(model, batch):
    cam, target = utils.grad_cam(model, batch, "layer3")
    assert cam.shape == (3, 32, 32) and cam.min() >= 0 and torch.allclose(cam.flatten(1).amax(1), torch.ones(3))
    assert torch.equal(target, model(batch).argmax(1))
    assert _hook_count(model) == 0 and all(p.grad is None for p in model.parameters())
    cam_cat, target_cat = utils.grad_cam(model, batch, "layer2", target=3)
    assert target_cat.tolist() == [3, 3, 3] and cam_cat.shape == (3, 32, 32)


def test_bad_layer_name_lists_valid_ones(model, batch):
    with pytest.raises(ValueError) as e:
        utils.grad_cam(model, batch, "layer9")
    assert "layer3" in str(e.value) and "layer1.0.conv1" in str(e.value)
    with pytest.raises(ValueError, match="valid layers"):
        utils.feature_maps(model, batch, ["nope"])
    assert _hook_count(model) == 0


def test_embedding_shapes(model):
    x = torch.randn(40, 3, 32, 32)
    emb, feats = utils.embed_features(model, x, "pca")
    assert emb.shape == (40, 2) and feats.shape == (40, 64)
    emb_tsne, _ = utils.embed_features(model, x, "tsne")
    assert emb_tsne.shape == (40, 2) and np.isfinite(emb_tsne).all()
    with pytest.raises(ValueError, match="pca"):
        utils.embed_features(model, x, "umap")


def test_figures_and_overlay(model):
    fig = utils.plot_filters(model.conv1.weight)
    assert len(fig.axes) == 16
    img = np.zeros((32, 32, 3), np.uint8)
    out = utils.overlay(img, np.linspace(0, 1, 32 * 32).reshape(32, 32))
    assert out.shape == (32, 32, 3) and 0 <= out.min() and out.max() <= 1
    hist = {"epoch": [0, 1, 2], "lr": [0.1, 0.1, 0.01], "train_loss": [2, 1, 0.5], "val_loss": [2, 1.2, 0.8],
            "train_acc": [0.2, 0.5, 0.8], "val_acc": [0.2, 0.45, 0.7], "stage_ends": [2, 3]}
    assert utils.lr_drops(hist) == [dict(epoch=3, lr_before=0.1, lr_after=0.01, val_before=0.325, val_after=0.7)]
    fig = utils.plot_history(hist)
    texts = [t.get_text() for t in fig.axes[1].texts]
    assert len(fig.axes) == 2 and texts == ["lr 0.1→0.01\nval +37.5 pts"]  # each drop with what it did
    assert "best validation, epoch 3: kept" in fig.axes[1].get_legend_handles_labels()[1]


def test_reliability_diagram_draws_each_model_with_its_own_ece():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 500)
    sure = np.full((500, 10), 0.001)
    sure[np.arange(500), y] = 1 - 0.009  # right and certain: ECE near 0
    unsure = np.full((500, 10), 0.1)  # uniform: confidence 0.1 against accuracy about 0.1
    fig = utils.plot_reliability({"sure": sure, "unsure": unsure}, y)
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert labels[0] == "perfect calibration" and len(labels) == 3
    assert labels[1].startswith("sure (ECE 0.00") and labels[2].startswith("unsure (ECE")
    single = utils.plot_reliability(sure, y, label="one")
    assert [line.get_label() for line in single.axes[0].get_lines()][1].startswith("one (ECE")
    plt.close("all")
