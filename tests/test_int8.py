"""int8 inference: clear errors where it cannot run, calibration on the training split only, a cache that is
rebuilt whenever the release file (or anything else it depends on) changes."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import utils
from cifar_resnet import data, quantize, runtime
from conftest import make_fake_arrays, write_npy


def _distinct_arrays(n_train=5200, n_test=100):
    """Fake CIFAR-shaped data whose every image is different (its index written in its first pixels)."""
    x_tr, y_tr, x_te, y_te = make_fake_arrays(n_train=n_train, n_test=n_test)
    for x, offset in ((x_tr, 0), (x_te, n_train)):
        idx = np.arange(len(x)) + offset
        x[:, 0, 0, 0], x[:, 0, 0, 1] = idx // 256, idx % 256
    return x_tr, y_tr, x_te, y_te


@pytest.fixture
def fake_data(tmp_path, monkeypatch):
    arrays = _distinct_arrays()
    write_npy(tmp_path / "data", arrays)
    monkeypatch.setenv("CIFAR10_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(data, "DATA_DIR", tmp_path / "no_data_here")
    monkeypatch.setattr(quantize, "INT8_CALIBRATION", 64)
    return arrays


def _release(path, seed=0):
    torch.manual_seed(seed)
    net = utils.build_model("resnet8")
    utils.save_checkpoint({"arch": "resnet8", "arch_options": {}, "model": net.state_dict()}, path)
    return path


def _needs_int8():
    if reason := utils.int8_unavailable_reason("cpu"):
        (pytest.fail if os.environ.get("CI") else pytest.skip)(reason)


def test_calibration_images_come_from_the_training_split_only(fake_data):
    x_tr, y_tr, x_te, _ = fake_data
    train, _, val, _ = utils.train_val_split(x_tr, y_tr)
    key = lambda imgs: {(int(a), int(b)) for a, b in imgs[:, 0, 0, :2]}  # noqa: E731
    chosen = utils.calibration_images()
    assert len(chosen) == 64 and len(key(chosen)) == 64
    assert key(chosen) <= key(train)
    assert not key(chosen) & key(val) and not key(chosen) & key(x_te)
    assert np.array_equal(chosen, utils.calibration_images())  # a fixed seed: the same images every time


def test_int8_model_calibrates_on_calibration_images_never_the_test_set(fake_data, tmp_path, monkeypatch):
    _needs_int8()
    seen = []
    real_as_batch = utils.as_image_batch
    monkeypatch.setattr(quantize, "as_image_batch", lambda x, size=32: seen.append(np.array(x)) or real_as_batch(x, size))
    model = utils.Loaded_model(_release(tmp_path / "r8.pth"), precision="int8")
    assert len(seen) == 1 and np.array_equal(seen[0], utils.calibration_images())
    x_te = fake_data[2]
    assert not {bytes(img) for img in seen[0]} & {bytes(img) for img in x_te}
    assert model.precision == "int8" and model.predict(x_te, verbose=False).shape == (len(x_te),)


def test_cache_is_used_and_a_changed_release_file_rebuilds_it(fake_data, tmp_path, monkeypatch):
    _needs_int8()
    calls = []
    real = utils.calibration_images
    monkeypatch.setattr(quantize, "calibration_images", lambda *a, **k: calls.append(1) or real(*a, **k))
    path = _release(tmp_path / "r8.pth", seed=0)
    cache = tmp_path / "r8.int8-statistics.pth"
    x = fake_data[2][:40]
    first = utils.Loaded_model(path, precision="int8").predict_proba(x)
    assert len(calls) == 1 and cache.is_file()
    again = utils.Loaded_model(path, precision="int8").predict_proba(x)
    assert len(calls) == 1 and np.array_equal(first, again)  # calibrated once: the second load read the cache
    _release(path, seed=1)  # the release file changes: its statistics no longer hold
    changed = utils.Loaded_model(path, precision="int8").predict_proba(x)
    assert len(calls) == 2 and not np.array_equal(first, changed)
    loaded = utils.Loaded_model(path, precision="int8")  # read from the cache, not calibrated again
    assert utils.load_checkpoint(cache)["key"] == utils.int8_cache_key(path, loaded.preprocess, "resnet8")
    cache.write_bytes(cache.read_bytes()[:100])  # damaged: rebuilt, never trusted
    utils.Loaded_model(path, precision="int8")
    assert len(calls) == 3


def test_auto_never_picks_int8(tmp_path):
    assert utils.Loaded_model(_release(tmp_path / "r8.pth")).precision in ("fp32", "bf16")


def test_int8_errors_name_what_is_missing_before_any_work(tmp_path, monkeypatch):
    missing = tmp_path / "no_such_file.pth"  # the error comes before the file is even opened
    with pytest.raises(utils.Int8UnavailableError, match="CPU only.*use 'auto', 'fp32', 'fp16' or 'bf16'"):
        utils.Loaded_model(missing, device="cuda", precision="int8")
    monkeypatch.setattr(quantize, "_pt2e_tools", lambda: None)
    with pytest.raises(utils.Int8UnavailableError, match=r"pip install 'torchao>=0.11'.*'fp32', 'bf16'"):
        utils.Loaded_model(missing, precision="int8")
    monkeypatch.setattr(quantize.platform, "machine", lambda: "arm64")
    with pytest.raises(utils.Int8UnavailableError, match="x86-64 CPU.*arm64"):
        utils.Loaded_model(missing, precision="int8")


def test_int8_needs_no_cpp_compiler(tmp_path, fake_data):
    """The lowering runs oneDNN's int8 kernels directly (no Inductor code generation), so no compiler is asked for."""
    _needs_int8()
    bare = tmp_path / "bin"  # an empty PATH: Python is started by its full name
    bare.mkdir()
    assert shutil.which("gcc", path=str(bare)) is None and shutil.which("g++", path=str(bare)) is None
    code = ("import utils, numpy as np; images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), np.uint8); "
            "m = utils.Loaded_model(r'%s', precision='int8', calibration=images); "
            "print(m.predict(np.zeros((3, 32, 32, 3), np.uint8), verbose=False).shape)") % _release(tmp_path / "r8.pth")
    env = {**os.environ, "PATH": str(bare), "CC": "", "CXX": "", "PYTHONPATH": str(utils.PROJECT_DIR)}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0 and "(3,)" in run.stdout, run.stderr[-2000:]


def test_statistics_are_keyed_by_the_normalization_a_bare_state_dict_is_loaded_with(fake_data, tmp_path, monkeypatch):
    """Statistics calibrated under one normalization never serve another: int8 fell to 47.8% that way."""
    _needs_int8()
    calls = []
    real = utils.calibration_images
    monkeypatch.setattr(quantize, "calibration_images", lambda *a, **k: calls.append(1) or real(*a, **k))
    path = tmp_path / "bare.pth"
    torch.manual_seed(0)
    torch.save(utils.build_model("resnet8").state_dict(), path)  # no metadata: the caller names the normalization
    x = fake_data[2][:40]
    wrong = utils.Loaded_model(path, arch="resnet8", mean=(0, 0, 0), std=(1, 1, 1), precision="int8")
    right = utils.Loaded_model(path, arch="resnet8", precision="int8")
    assert len(calls) == 2, "the second normalization calibrated again"
    fp32 = utils.Loaded_model(path, arch="resnet8", precision="fp32").predict_proba(x)
    assert np.abs(right.predict_proba(x) - fp32).max() < np.abs(wrong.predict_proba(x) - fp32).max()


@pytest.mark.parametrize("flags, bits", [("avx2 fma", 7), ("avx2 avx512f avx512_vnni", 8), ("avx2 avx_vnni", 8),
                                         ("avx512f amx_int8 amx_tile", 8)])
def test_activations_keep_7_bits_where_the_cpu_lacks_vnni(monkeypatch, tmp_path, flags, bits):
    """Without VNNI, uint8 x int8 products are summed in 16 bits and saturate: ResNet18 lost 1.9 points that way.
    The choice is part of the statistics' key, so a cache written on the other kind of CPU is rebuilt."""
    monkeypatch.setattr(runtime, "cpu_info", lambda: f"cpu family\t: 25\nflags\t\t: {flags}\n")
    assert utils.activation_bits() == bits
    quantizer = quantize._pt2e_tools()[2]()
    assert any(spec is not None and spec.quant_max == 2 ** bits - 1
               for spec in _activation_specs(quantizer))
    path = tmp_path / "m.pth"
    path.write_bytes(b"weights")
    assert f"{bits}-bit activations" in utils.int8_cache_key(path, utils.Preprocess(), "resnet8")


def _activation_specs(quantizer):
    config = quantizer.global_config
    return [config.input_activation, config.output_activation]


@pytest.mark.parametrize("arch, options", [("resnet8", {"shortcut": "B"}), ("preact_resnet11", {}),
                                           ("resnet18_imagenet", {})])
def test_int8_follows_fp32_for_every_family_of_the_releases(arch, options, recwarn):
    """Projection shortcuts (ResNet20-B, v1-110), pre-activation bottlenecks whose batch norm comes before its
    convolution (v2-164, nothing to fold it into) and the 224-pixel ImageNet layout with its max-pool."""
    _needs_int8()
    torch.manual_seed(0)
    net = utils.build_model(arch, **options).eval()
    with torch.no_grad():  # running statistics a trained net would have, not the identity of a new one
        for bn in (m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
    preprocess = utils.Preprocess(size=utils.input_size(arch))
    images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), np.uint8)
    int8 = quantize.quantize_int8(net, preprocess, calibration=images)
    assert not [w for w in recwarn if "quantiz" in str(w.message)]  # nothing a reader of the output can act on
    x = preprocess(utils.as_image_batch(images[:8]))
    with torch.no_grad():
        want, got = net(x), int8(x)
    assert got.shape == want.shape == (8, 10)
    assert (got - want).abs().max() < 0.05 * want.abs().max()  # a few percent of the logits' range, not noise
