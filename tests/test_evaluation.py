"""Loaded_model: round trip, foreign checkpoint layouts, helpful errors, refusal of pickles, input checks."""
import numpy as np
import pytest
import torch

import utils
from conftest import make_fake_arrays


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A resnet8 trained for one tiny epoch and saved by the engine."""
    run = tmp_path_factory.mktemp("run")
    x, y, _, _ = make_fake_arrays(n_train=192)
    cfg = utils.TrainConfig(arch="resnet8", stages=[(0.1, 1)], batch_size=64, precision="fp32")
    trainer = utils.Trainer(cfg, (x[:128], y[:128], x[128:], y[128:]), run, "cpu", progress=False)
    trainer.fit()
    return trainer, run / "ckpt_1.pth"


@pytest.fixture
def images():
    return make_fake_arrays(n_train=23)[0]


def test_round_trip_predicts_as_the_model_in_memory(trained, images):
    trainer, path = trained
    model = utils.Loaded_model(path, precision="fp32")
    x = trainer.cfg.preprocess()(utils.images_to_tensor(images))
    with torch.no_grad():
        expected = trainer.net.eval()(x).argmax(1).numpy()
    y = model.predict(images, verbose=False)
    assert y.dtype == np.int64 and y.shape == (23,)
    np.testing.assert_array_equal(y, expected)
    np.testing.assert_array_equal(model.predict(images.astype(np.float32) / 255, verbose=False), expected)
    proba = model.predict_proba(images)
    assert proba.shape == (23, 10) and np.allclose(proba.sum(1), 1, atol=1e-5)


@pytest.mark.parametrize("layout", ["kuangliu", "state_dict", "bare"])
def test_foreign_layouts_load(tmp_path, layout, images):
    net = utils.build_model("resnet20", shortcut="B").eval()
    sd = net.state_dict()
    payload = {"kuangliu": {"net": {f"module.{k}": v for k, v in sd.items()}, "acc": 92.07, "epoch": 199},
               "state_dict": {"state_dict": sd}, "bare": sd}[layout]
    torch.save(payload, tmp_path / "foreign.pth")
    model = utils.Loaded_model(tmp_path / "foreign.pth", arch="resnet20", shortcut="B", precision="fp32")
    with torch.no_grad():
        expected = net(utils.Preprocess()(utils.images_to_tensor(images))).argmax(1).numpy()
    np.testing.assert_array_equal(model.predict(images, verbose=False), expected)


def test_file_without_metadata_needs_arch_and_names_the_fit(tmp_path):
    torch.save(utils.build_model("resnet20", shortcut="B").state_dict(), tmp_path / "bare.pth")
    with pytest.raises(ValueError, match=r"pass arch=.*resnet20.*'shortcut': 'B'"):
        utils.Loaded_model(tmp_path / "bare.pth")


def test_other_architecture_gives_helpful_error(tmp_path):
    torch.save({"net": utils.build_model("resnet20").state_dict()}, tmp_path / "r20.pth")
    with pytest.raises(ValueError) as e:
        utils.Loaded_model(tmp_path / "r20.pth", arch="resnet32")
    msg = str(e.value)
    assert "missing keys" in msg and "layer1.3.bn1.weight" in msg and "arch='resnet20'" in msg
    with pytest.raises(ValueError, match="shortcut='B'"):
        torch.save({"net": utils.build_model("resnet20", shortcut="B").state_dict()}, tmp_path / "r20b.pth")
        utils.Loaded_model(tmp_path / "r20b.pth", arch="resnet20")


class Payload:
    def __reduce__(self):
        return (print, ("this would run on load",))


def test_pickled_object_is_refused(tmp_path, capsys):
    torch.save({"net": utils.build_model("resnet8").state_dict(), "extra": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="refused"):
        utils.Loaded_model(tmp_path / "evil.pth", arch="resnet8")
    assert "would run" not in capsys.readouterr().out


@pytest.mark.parametrize("bad,what", [
    (np.zeros((4, 32, 32), np.uint8), "shape"),
    (np.zeros((4, 32, 32, 1), np.uint8), "shape"),
    (np.zeros((4, 32, 32, 3), np.int32), "dtype"),
    (np.full((4, 32, 32, 3), 2.0, np.float32), r"\[0, 1\]"),
    (np.full((4, 32, 32, 3), np.nan, np.float32), "NaN"),
    (np.zeros((0, 32, 32, 3), np.uint8), "shape"),
    ([[1, 2, 3]], "list"),
])
def test_bad_inputs_raise(trained, bad, what):
    with pytest.raises(ValueError, match=what):
        utils.Loaded_model(trained[1]).predict(bad, verbose=False)


def test_progress_lines_print(trained, capsys):
    utils.Loaded_model(trained[1]).predict(make_fake_arrays(n_train=50)[0], batch_size=7)
    lines = capsys.readouterr().out.split()
    assert lines == [f"predicting...{p}%" for p in range(10, 101, 10)]
    utils.Loaded_model(trained[1]).predict(make_fake_arrays(n_train=5)[0], verbose=False)
    assert capsys.readouterr().out == ""


def test_tensor_input_and_tta(trained):
    model = utils.Loaded_model(trained[1], tta=True)
    x = torch.rand(6, 3, 32, 32)
    assert model.predict(x, verbose=False).shape == (6,)
    flipped = utils.Loaded_model(trained[1], precision="fp32").predict_proba(x.flip(3), tta=True)
    np.testing.assert_allclose(utils.Loaded_model(trained[1], precision="fp32").predict_proba(x, tta=True),
                               flipped, atol=1e-5)  # TTA is symmetric in the flip


def test_flip_tta_is_the_mean_of_the_image_and_its_mirror_image(trained, images):
    """Notebook 04 and bench/release_table.py compute flip TTA from the single view and one pass on the mirrored
    images (x[:, :, ::-1] for N x H x W x C arrays): the same probabilities as tta=True."""
    model = utils.Loaded_model(trained[1], precision="fp32")
    single = model.predict_proba(images, tta="none")
    mirrored = model.predict_proba(np.ascontiguousarray(images[:, :, ::-1]), tta="none")
    np.testing.assert_allclose((single + mirrored) / 2, model.predict_proba(images, tta=True), atol=1e-6)
    assert not np.allclose(single, mirrored, atol=1e-4)  # the mirror image is another view


def test_release_export_is_smaller_and_predicts_alike(trained, tmp_path, images):
    _, path = trained
    out = utils.export_release(path, tmp_path / "release.pth", half=True)
    assert out.stat().st_size < path.stat().st_size / 2
    assert "optimizer" not in utils.load_checkpoint(out)
    a = utils.Loaded_model(path, precision="fp32").predict_proba(images)
    b = utils.Loaded_model(out, precision="fp32").predict_proba(images)
    np.testing.assert_allclose(a, b, atol=2e-2)


def test_release_keeps_selected_weights_with_the_whole_run_history(tmp_path, trained):
    x, y, _, _ = make_fake_arrays(n_train=192)
    cfg = utils.TrainConfig(arch="resnet8", stages=[(0.1, 1), (0.01, 2)], batch_size=64, precision="fp32", seed=1)
    utils.Trainer(cfg, (x[:128], y[:128], x[128:], y[128:]), tmp_path, "cpu", progress=False).fit()
    out = utils.export_release(tmp_path / "ckpt_1.pth", tmp_path / "release.pth", run_checkpoint=tmp_path / "ckpt_2.pth")
    release, first = utils.load_checkpoint(out), utils.load_checkpoint(tmp_path / "ckpt_1.pth")
    assert release["epoch"] == 1 and release["epochs_run"] == 2 and release["history"]["lr"] == [0.1, 0.01]
    assert all(torch.equal(release["model"][k], v) for k, v in first["model"].items())
    with pytest.raises(ValueError, match="not a later checkpoint"):
        utils.export_release(tmp_path / "ckpt_1.pth", tmp_path / "bad.pth", run_checkpoint=trained[1])


def test_reports_table_reads_our_runs_from_the_release_files_and_says_which_are_missing():
    path = "checkpoints/resnet18.pth"
    rows = utils.reports_table({path: (93.63, 94.46)})
    meta = utils.load_checkpoint(utils.PROJECT_DIR / path)
    course = next(row for row in rows if row.startswith("| ResNet18 course report"))
    assert "**93.63%** | 94.46%" in course
    assert f"| {len(meta['history']['epoch'])} |" in course and f"best validation epoch ({meta['epoch']})" in course
    unmeasured = [row for row in rows[2:] if "ResNet18 course report" not in row]
    assert unmeasured and all("not released yet" in row for row in unmeasured)
