"""The CUDA path without a GPU: precision by compute capability (CUDA queries mocked), one-copy batches equal to
the CPU's, CPU-only checkpoints, and data-parallel ranks that agree (two gloo processes)."""
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import utils
from conftest import make_fake_arrays


@pytest.fixture
def fake_gpus(monkeypatch):
    """CUDA queries answered from a table of {index: capability}; the current device is 0."""
    table = {}

    def capability(device=None):
        device = torch.device(device) if device is not None else torch.device("cuda", 0)
        return table[0 if device.index is None else device.index]

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what torch >= 2.3 says on a T4
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    return table


@pytest.mark.parametrize("capability, precision", [((7, 5), "fp16"), ((7, 0), "fp16"), ((6, 0), "fp16"),
                                                   ((8, 0), "bf16"), ((8, 9), "bf16"), ((9, 0), "bf16")])
def test_auto_precision_on_cuda_follows_compute_capability(fake_gpus, capability, precision):
    fake_gpus[0] = capability
    assert utils.resolve_precision("cuda", "auto") == precision
    assert utils.resolve_precision(torch.device("cuda", 0), "auto") == precision


def test_the_device_given_decides_not_the_current_one(fake_gpus):
    fake_gpus.update({0: (7, 5), 1: (8, 0)})  # current device 0 is a T4-class GPU, device 1 an A100-class one
    assert utils.resolve_precision("cuda:1") == "bf16"
    assert utils.resolve_precision("cuda:0") == "fp16"
    assert utils.resolve_precision("cuda") == "fp16"


def test_hardware_label_names_tf32_where_fp32_convolutions_use_it(fake_gpus, monkeypatch):
    fake_gpus.update({0: (7, 5), 1: (8, 6)})
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert utils.hardware_label("cuda:1", "fp32") == "Fake GPU, fp32 (TF32 convolutions)"
    assert utils.hardware_label("cuda:1", "bf16") == "Fake GPU, bf16"
    assert utils.hardware_label("cuda:0", "fp32") == "Fake GPU, fp32"


def _old_batches(loader):
    """The batches as drawn before the one-copy plan: an index copy and three draws per batch."""
    g = torch.Generator().manual_seed(loader.seed * 1_000_003 + loader.epoch)
    order = loader._order(g)
    for i in range(len(loader)):
        idx = order[i * loader.batch_size:(i + 1) * loader.batch_size]
        xb = loader.x[idx]
        if loader.augment:
            n, pad = len(idx), 4
            oy = torch.randint(0, 2 * pad + 1, (n, 1), generator=g)
            ox = torch.randint(0, 2 * pad + 1, (n, 1), generator=g)
            flip = torch.rand(n, 1, generator=g) < 0.5
            rows = oy + torch.arange(32)
            cols = ox + torch.where(flip, torch.arange(31, -1, -1), torch.arange(32))
            padded = torch.nn.functional.pad(xb, (pad,) * 4).permute(0, 2, 3, 1)
            xb = padded[torch.arange(n).view(n, 1, 1), rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
        yield loader.preprocess(xb.contiguous()), loader.y[idx]


@pytest.mark.parametrize("world_size, rank, drop_last", [(1, 0, False), (1, 0, True), (2, 1, False)])
def test_epoch_plan_batches_are_bit_identical_to_per_batch_draws(world_size, rank, drop_last):
    x, y, _, _ = make_fake_arrays(n_train=300)
    loader = utils.BatchLoader(x, y, 64, augment=True, shuffle=True, drop_last=drop_last, seed=3, rank=rank,
                               world_size=world_size)
    loader.set_epoch(5)
    plan = loader.epoch_plan()
    assert plan.shape[0] == 4 and plan.dtype == torch.long  # order and draws: one tensor, one copy to a GPU
    new, old = list(loader), list(_old_batches(_reset(loader, 5)))
    assert len(new) == len(old) == len(loader)
    for (xa, ya), (xb, yb) in zip(new, old):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def _reset(loader, epoch):
    loader.set_epoch(epoch)
    return loader


def test_checkpoint_optimizer_state_is_moved_to_the_cpu(monkeypatch):
    moved = []

    class Elsewhere(torch.Tensor):  # stands for a CUDA tensor: records that it was asked to come to the CPU
        def cpu(self):
            moved.append(self.shape)
            return torch.Tensor(self.shape).zero_()

    state = {"state": {0: {"momentum_buffer": torch.zeros(3).as_subclass(Elsewhere)}}, "param_groups": [{"lr": 0.1}]}
    out = utils.to_cpu(state)
    assert moved == [torch.Size([3])] and type(out["state"][0]["momentum_buffer"]) is torch.Tensor
    assert out["param_groups"] == [{"lr": 0.1}]


def _rank_worker(rank, world_size, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        x, y, xv, yv = make_fake_arrays(n_train=512, n_test=200, seed=1)
        cfg = utils.TrainConfig(arch="resnet8", stages=[(0.1, 3), (0.01, 5), (0.001, 6)], patience=1, min_delta=0.5,
                                batch_size=64, save_every=1, precision="fp32")
        trainer = utils.Trainer(cfg, (x, y, xv, yv), Path(out_dir) / "run" if rank == 0 else None, "cpu", rank,
                                world_size, progress=False)
        trainer.fit()
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(trainer.history))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_record_the_same_validation_and_stage_ends(tmp_path):
    mp.start_processes(_rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    h0, h1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert h0["val_acc"] == h1["val_acc"] and h0["val_loss"] == h1["val_loss"]
    assert h0["stage_ends"] == h1["stage_ends"] and h0["stage"] == h1["stage"]
    assert h0["stage_ends"] == [2, 4, 6]  # min_delta 0.5: each stage's second epoch cannot improve, patience 1 ends it
    assert h0["train_loss"] == h1["train_loss"]  # over both shards, not each rank's own
    ckpt = utils.load_checkpoint(tmp_path / "run" / "ckpt_6.pth")
    assert ckpt["world_size"] == 2 and ckpt["batch_per_rank"] == 32 and ckpt["config"]["batch_size"] == 64
    assert all(v.device.type == "cpu" for s in ckpt["optimizer"]["state"].values() for v in s.values()
               if isinstance(v, torch.Tensor))


def test_batch_size_must_split_over_the_ranks():
    cfg = utils.TrainConfig(arch="resnet8", batch_size=63)
    with pytest.raises(ValueError, match="batch size 63 does not split evenly over 2 processes"):
        utils.Trainer(cfg, make_fake_arrays(), None, "cpu", 0, 2, progress=False)


def test_gpu_check_says_there_is_no_cuda_and_exits_0(monkeypatch, capsys):
    sys.path.insert(0, str(utils.PROJECT_DIR / "bench"))
    import gpu_check
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 0
    assert "no CUDA device here" in capsys.readouterr().out


def test_gpu_check_reports_the_precision_against_the_capability(fake_gpus):
    sys.path.insert(0, str(utils.PROJECT_DIR / "bench"))
    import gpu_check
    fake_gpus.update({0: (7, 5)})
    assert "compute capability 7.5, precision 'auto' -> fp16" in gpu_check.precision_report(torch.device("cuda"))


REMOVED_BY_PYTHON_3_13 = {"aifc", "audioop", "cgi", "cgitb", "chunk", "crypt", "imghdr", "mailcap", "msilib", "nis",
                          "nntplib", "ossaudiodev", "pipes", "sndhdr", "spwd", "sunau", "telnetlib", "uu", "xdrlib",
                          "lib2to3", "distutils", "imp", "asynchat", "asyncore", "smtpd"}


def test_no_module_that_colabs_python_3_13_lacks_is_imported():
    import ast
    import nbformat
    root = utils.PROJECT_DIR
    sources = {p: p.read_text() for p in [*root.glob("*.py"), *root.glob("bench/*.py"), *root.glob("tests/*.py")]}
    for nb in root.glob("notebooks/*.ipynb"):
        code = [c.source for c in nbformat.read(nb, 4).cells if c.cell_type == "code"]
        sources[nb] = "\n".join(line for c in code for line in c.splitlines() if not line.lstrip().startswith(("!", "%")))
    for path, text in sources.items():
        for node in ast.walk(ast.parse(text)):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad = {n.split(".")[0] for n in names} & REMOVED_BY_PYTHON_3_13
            assert not bad, f"{path.name} imports {bad}, which Python 3.13 (Colab's) no longer has"
