"""Data loading, the validation split, augmentation and the batch iterator."""
import pickle
import tarfile

import numpy as np
import pytest
import torch

import utils
from cifar_resnet import data
from conftest import make_fake_arrays, write_batches, write_npy


def _assert_same(a, b):
    for u, v in zip(a, b):
        assert u.dtype == v.dtype and u.shape == v.shape
        np.testing.assert_array_equal(u, v)


def test_npy_pickle_folder_and_tarball_load_identically(tmp_path, fake_arrays, no_default_places):
    write_npy(tmp_path / "npy", fake_arrays)
    batches = write_batches(tmp_path / "pickles", fake_arrays)
    (tmp_path / "tar").mkdir()
    with tarfile.open(tmp_path / "tar" / utils.TARBALL, "w:gz") as tar:
        tar.add(batches, arcname=utils.BATCHES_DIR)
    loaded = [utils.load_cifar10(tmp_path / form, download=False) for form in ("npy", "pickles", "tar")]
    _assert_same(loaded[0], fake_arrays)
    _assert_same(loaded[1], fake_arrays)
    _assert_same(loaded[2], fake_arrays)
    assert loaded[0][0].dtype == np.uint8 and loaded[0][1].dtype == np.int64


def test_search_order_root_then_env_then_data_dir(tmp_path, fake_arrays, no_default_places, monkeypatch):
    arrays = {name: make_fake_arrays(seed=i) for i, name in enumerate(("root", "env", "data"))}
    for name, arr in arrays.items():
        write_npy(tmp_path / name, arr)
    monkeypatch.setattr(data, "DATA_DIR", tmp_path / "data")
    monkeypatch.setenv("CIFAR10_DIR", str(tmp_path / "env"))
    _assert_same(utils.load_cifar10(tmp_path / "root", download=False), arrays["root"])
    _assert_same(utils.load_cifar10(download=False), arrays["env"])
    monkeypatch.delenv("CIFAR10_DIR")
    _assert_same(utils.load_cifar10(download=False), arrays["data"])


def test_nothing_found_lists_every_place(tmp_path, no_default_places, monkeypatch):
    monkeypatch.setenv("CIFAR10_DIR", str(tmp_path / "env_dir"))
    with pytest.raises(FileNotFoundError) as e:
        utils.load_cifar10(download=False)
    msg = str(e.value)
    for place in ("env_dir", str(no_default_places)):
        assert place in msg
    assert "CIFAR10_DIR" in msg and "x_train.npy" in msg
    (tmp_path / "root_dir").mkdir()  # a folder named explicitly is the only place searched
    with pytest.raises(FileNotFoundError) as e:
        utils.load_cifar10(tmp_path / "root_dir", download=False)
    assert "root_dir holds no copy of the data" in str(e.value) and "env_dir" not in str(e.value)


def test_failed_download_is_reported(no_default_places, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("no network")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(FileNotFoundError, match="download failed: OSError: no network"):
        utils.load_cifar10()


def test_pickle_batch_with_code_is_refused(tmp_path, fake_arrays, no_default_places):
    batches = write_batches(tmp_path, fake_arrays)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    with open(batches / "data_batch_1", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(pickle.UnpicklingError, match="builtins.print"):
        utils.load_cifar10(tmp_path, download=False)


def test_real_data_shapes_and_official_order(real_cifar10):
    x_tr, y_tr, x_te, y_te = real_cifar10
    assert (x_tr.shape, y_tr.shape, x_te.shape, y_te.shape) == ((50000, 32, 32, 3), (50000,), (10000, 32, 32, 3), (10000,))
    assert y_tr[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert y_te[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    assert np.bincount(y_tr).tolist() == [5000] * 10


def test_split_is_stratified_disjoint_and_seeded(real_cifar10):
    x, y = real_cifar10[0], real_cifar10[1]
    x_tr, y_tr, x_val, y_val = utils.train_val_split(x, y, 5000, seed=0)
    assert len(y_tr) == 45000 and len(y_val) == 5000
    assert np.bincount(y_val).tolist() == [500] * 10
    again = utils.train_val_split(x, y, 5000, seed=0)
    np.testing.assert_array_equal(again[2], x_val)
    other = utils.train_val_split(x, y, 5000, seed=1)
    assert not np.array_equal(other[3], y_val) or not np.array_equal(other[2], x_val)
    # disjoint and complete: every image lands in exactly one part
    keys = lambda a: {row.tobytes() for row in a.reshape(len(a), -1)}  # noqa: E731
    assert keys(x_tr).isdisjoint(keys(x_val)) and len(keys(x_tr) | keys(x_val)) == 50000


def test_split_of_uneven_sizes_still_sums():
    y = np.repeat(np.arange(3), [50, 30, 20])
    _, y_tr, _, y_val = utils.train_val_split(np.zeros((100, 32, 32, 3), np.uint8), y, 10)
    assert len(y_val) == 10 and np.bincount(y_val).tolist() == [5, 3, 2] and len(y_tr) == 90


def _coordinate_images(n):
    """Images whose channel 0 holds row+1 and channel 1 col+1, so a crop reveals its offset."""
    rows = torch.arange(1, 33).view(32, 1).expand(32, 32)
    img = torch.stack([rows, rows.T, torch.full((32, 32), 7)]).to(torch.uint8)
    return img.expand(n, 3, 32, 32).contiguous()


def test_augment_crops_within_four_pixels_and_flips():
    x = _coordinate_images(2000)
    out = utils.augment_batch(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    dys, dxs, flips = [], [], []
    for img in out:
        rows, cols = img[0].long(), img[1].long()
        inside = rows > 0  # padding is zero in every channel
        r0 = int(rows[inside].min()) - 1 - int(inside.any(1).nonzero()[0])
        dys.append(r0)
        row = cols[inside.any(1).nonzero()[0, 0]]
        valid = row[row > 0]
        flips.append(bool(valid[0] > valid[-1]))
        first_col = int(valid.min()) - 1
        pos = int((row == valid.min()).nonzero()[0])
        dxs.append(first_col - pos if not flips[-1] else first_col - (31 - pos))
        assert (img[2][inside] == 7).all() and (img[2][~inside] == 0).all()
    assert set(dys) == set(range(-4, 5)) and set(dxs) == set(range(-4, 5))
    assert 0.4 < np.mean(flips) < 0.6


def test_normalized_real_images_have_zero_mean_unit_std(real_cifar10):
    x = utils.images_to_tensor(real_cifar10[0][:10000])
    z = utils.Preprocess(std=utils.TRUE_STD)(x)
    assert z.mean((0, 2, 3)).abs().max() < 0.02
    assert (z.std((0, 2, 3)) - 1).abs().max() < 0.02
    common = utils.Preprocess()(x)  # the common, smaller std gives a wider spread
    assert (common.std((0, 2, 3)) > 1.15).all()


def test_per_image_standardization_and_resize():
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    z = utils.Preprocess(per_image=True)(x)
    assert torch.allclose(z.mean((1, 2, 3)), torch.zeros(4), atol=1e-5)
    assert torch.allclose(z.std((1, 2, 3), unbiased=False), torch.ones(4), atol=1e-4)
    assert utils.Preprocess(size=224)(x).shape == (4, 3, 224, 224)


def test_batch_loader_is_seeded_reshuffles_and_covers_each_image_once():
    x = np.zeros((100, 32, 32, 3), np.uint8)
    y = np.arange(100)
    loader = utils.BatchLoader(x, y, batch_size=32, augment=True, shuffle=True, seed=3)
    first = torch.cat([yb for _, yb in loader])
    second = torch.cat([yb for _, yb in loader])
    assert sorted(first.tolist()) == list(range(100)) and not torch.equal(first, second)
    replay = utils.BatchLoader(x, y, batch_size=32, augment=True, shuffle=True, seed=3)
    assert torch.equal(torch.cat([yb for _, yb in replay]), first)
    replay.set_epoch(1)
    assert torch.equal(torch.cat([yb for _, yb in replay]), second)
    xb, _ = next(iter(loader))
    assert xb.shape == (32, 3, 32, 32) and xb.dtype == torch.float32 and len(loader) == 4


def test_batch_loader_shards_for_ranks_are_disjoint():
    x, y = np.zeros((101, 32, 32, 3), np.uint8), np.arange(101)
    shards = [torch.cat([yb for _, yb in utils.BatchLoader(x, y, 16, shuffle=True, seed=1, rank=r, world_size=2)])
              for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 50
    assert set(shards[0].tolist()).isdisjoint(shards[1].tolist())
