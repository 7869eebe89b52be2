"""The staged training engine: exact resume, atomic saves, stages, early stop, NaN, DDP, train.py."""
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import numpy as np
import torch

import utils
from cifar_resnet import quick, runtime, training
from conftest import make_fake_arrays

ROOT = Path(__file__).resolve().parents[1]


def tiny_data(n=192):
    x, y, _, _ = make_fake_arrays(n_train=n + 64)
    return x[:n], y[:n], x[n:], y[n:]


def tiny_trainer(run_dir, stages=((0.1, 2),), **overrides):
    settings = dict(arch="resnet8", stages=list(stages), batch_size=64, precision="fp32", save_every=1, keep_last=10)
    cfg = utils.TrainConfig(**{**settings, **overrides})
    return utils.Trainer(cfg, tiny_data(), run_dir, "cpu", progress=False)


def test_saved_history_keeps_what_the_run_trained_on_and_no_weights(tmp_path):
    """The small history files (notebook 02's experiments) say how many images each run saw, so the notebook can
    print it rather than state it in prose."""
    trainer = tiny_trainer(tmp_path / "run", stages=[(0.1, 1)])
    trainer.fit()
    record = utils.load_history(utils.save_history(tmp_path / "run" / "ckpt_1.pth", tmp_path / "history.json"))
    assert record["data"] == trainer.data and record["data"]["train_images"] == len(tiny_data()[1])
    assert set(record) == {"arch", "arch_options", "config", "history", "epoch", "data"}  # no weights


def test_resume_reproduces_uninterrupted_run_exactly(tmp_path):
    straight = tiny_trainer(tmp_path / "a")
    straight.fit()
    first = tiny_trainer(tmp_path / "b")
    first.run_epoch()
    resumed = tiny_trainer(tmp_path / "b").resume()
    assert resumed.epoch == 1
    resumed.fit()
    for k, v in straight.net.state_dict().items():
        assert torch.equal(v, resumed.net.state_dict()[k]), k
    assert resumed.history["train_loss"] == straight.history["train_loss"]


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt_5.pth"
    utils.save_checkpoint({"epoch": 5, "w": torch.ones(3)}, path)
    real_save = torch.save

    def dies_half_way(obj, f, *a, **k):
        f.write(b"partial bytes")
        raise KeyboardInterrupt("disconnect")
    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        utils.save_checkpoint({"epoch": 6, "w": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert utils.load_checkpoint(path)["epoch"] == 5
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind


def test_each_stage_lr_applies_at_its_epochs(tmp_path):
    trainer = tiny_trainer(tmp_path, stages=[(0.1, 2), (0.01, 3), (0.001, 4)])
    history = trainer.fit()
    assert history["lr"] == [0.1, 0.1, 0.01, 0.001]
    assert history["stage"] == [0, 0, 1, 2] and history["stage_ends"] == [2, 3, 4]
    assert utils.checkpoint_epochs(tmp_path) == [1, 2, 3, 4] and (tmp_path / "best.pth").is_file()


def test_best_file_holds_the_best_validation_epoch_without_optimizer_state(tmp_path):
    history = tiny_trainer(tmp_path, stages=[(0.1, 2), (0.01, 4)]).fit()
    best = utils.load_checkpoint(tmp_path / "best.pth")
    assert best["epoch"] == history["val_acc"].index(max(history["val_acc"])) + 1
    assert best["best_val_acc"] == max(history["val_acc"])
    assert "optimizer" not in best and "rng" not in best and "optimizer" in utils.load_checkpoint(tmp_path / "ckpt_4.pth")


def test_later_stage_from_earlier_checkpoint_in_one_call(tmp_path):
    tiny_trainer(tmp_path, stages=[(0.1, 3), (0.01, 4)]).fit(until_stage=0)
    second = tiny_trainer(tmp_path, stages=[(0.1, 3), (0.01, 4)]).resume(tmp_path / "ckpt_2.pth", stage=1)
    history = second.fit()
    assert history["epoch"] == [0, 1, 2, 3] and history["lr"] == [0.1, 0.1, 0.01, 0.01]


def test_extending_stage_one_from_its_last_checkpoint_matches_a_run_planned_longer(tmp_path):
    straight = tiny_trainer(tmp_path / "a", stages=[(0.1, 3), (0.01, 4)])
    straight.fit()
    tiny_trainer(tmp_path / "b", stages=[(0.1, 2), (0.01, 3)]).fit(until_stage=0)
    longer = tiny_trainer(tmp_path / "b", stages=[(0.1, 3), (0.01, 4)])
    longer.resume(tmp_path / "b" / "ckpt_2.pth", stage=0, override=True)
    history = longer.fit()
    assert history["lr"] == [0.1, 0.1, 0.1, 0.01] and history["stage_ends"] == [3, 4]
    assert history["overrides"] == ["from epoch 2: stages: recorded [(0.1, 2), (0.01, 3)], given [(0.1, 3), (0.01, 4)]"]
    assert history["train_loss"] == straight.history["train_loss"]
    for k, v in straight.net.state_dict().items():
        assert torch.equal(v, longer.net.state_dict()[k]), k


def test_history_records_each_epochs_hardware_and_marks_older_epochs_unrecorded(tmp_path):
    label = utils.hardware_label("cpu", "fp32")
    assert label.endswith(f"{torch.get_num_threads()} thread{'s' * (torch.get_num_threads() != 1)}, fp32")
    tiny_trainer(tmp_path, stages=[(0.1, 2), (0.01, 3)]).fit(until_stage=0)
    older = utils.load_checkpoint(tmp_path / "ckpt_2.pth")
    assert older["history"].pop("hardware") == [label, label]
    utils.save_checkpoint(older, tmp_path / "ckpt_2.pth")  # as written before epochs recorded their hardware
    history = tiny_trainer(tmp_path, stages=[(0.1, 2), (0.01, 3)]).resume().fit()
    assert history["hardware"] == ["not recorded", "not recorded", label]


def test_hardware_label_names_cpu_family_and_best_bf16_instructions(monkeypatch):
    info = "processor\t: 0\ncpu family\t: 26\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"
    monkeypatch.setattr(runtime, "cpu_info", lambda: info * 2)
    threads = torch.get_num_threads()
    assert utils.hardware_label("cpu", "bf16") == f"AMD EPYC family 26 (AVX512-BF16), {threads} thread{'s' * (threads != 1)}, bf16"
    monkeypatch.setattr(runtime, "get_device", lambda: torch.device("cpu"))
    assert f"| CPU AMD EPYC family 26, {threads} thread" in utils.runtime_summary()  # the setup cell's line too
    monkeypatch.setattr(runtime, "cpu_info", lambda: "")
    assert "family" not in utils.hardware_label("cpu", "fp32")


def test_cosine_schedule_and_checkpoint_pruning(tmp_path):
    cfg = utils.TrainConfig(stages=[(0.1, 10)], schedule="cosine")
    assert [round(utils.stage_lr(cfg, 0, e), 4) for e in (0, 5)] == [0.1, 0.05]
    trainer = tiny_trainer(tmp_path, stages=[(0.1, 2), (0.01, 6)], keep_last=2)
    trainer.fit()
    assert utils.checkpoint_epochs(tmp_path) == [2, 5, 6]  # the newest two and every stage end


def test_early_stop_on_plateau(tmp_path, monkeypatch):
    monkeypatch.setattr(training, "evaluate", lambda *a, **k: {"loss": 1.0, "acc": 0.5})
    trainer = tiny_trainer(tmp_path, stages=[(0.1, 10), (0.01, 12)], patience=2, min_delta=0.01)
    history = trainer.fit()
    # each stage: 1 improving epoch (from nothing) + 2 flat ones, then it stops long before its end
    assert history["stage"] == [0, 0, 0, 1, 1, 1]
    assert history["stage_ends"] == [3, 6]


def test_nan_loss_raises_and_last_good_checkpoint_stays(tmp_path):
    trainer = tiny_trainer(tmp_path, stages=[(0.1, 3)])
    trainer.run_epoch()
    trainer.criterion = lambda logits, y: logits.sum() * float("nan")
    with pytest.raises(utils.NonFiniteLossError, match="nan"):
        trainer.run_epoch()
    assert utils.checkpoint_epochs(tmp_path) == [1]
    assert utils.load_checkpoint(tmp_path / "ckpt_1.pth")["epoch"] == 1


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="increasing"):
        utils.TrainConfig(stages=[(0.1, 5), (0.01, 3)])
    with pytest.raises(ValueError, match="LR:END_EPOCH"):
        utils.parse_stages(["0.1-82"])
    with pytest.raises(ValueError, match="precision"):
        utils.resolve_precision("cpu", "fp8")


@pytest.mark.parametrize("has_bf16, speedup, expected", [
    (True, 2.2, "bf16"),   # an AMD EPYC with AVX512-BF16 measured 2.25x
    (True, 0.6, "fp32"),   # an Intel Xeon with AVX512-BF16 but no AMX measured bf16 slower
    (False, 2.2, "fp32"),  # no bf16 instructions: emulated, never picked
])
def test_auto_precision_on_cpu_picks_bf16_only_where_it_is_faster(monkeypatch, has_bf16, speedup, expected):
    monkeypatch.delenv(utils.AUTO_PRECISION_ENV, raising=False)  # the suite may run with the choice fixed
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: has_bf16)
    monkeypatch.setattr(runtime, "cpu_bf16_speedup", lambda: speedup)
    assert utils.resolve_precision("cpu") == expected
    assert utils.resolve_precision("cpu", "bf16") == "bf16"  # a forced choice is kept


@pytest.mark.parametrize("has_bf16, speedup, words", [
    (True, 2.2, "precision auto -> bf16 (bf16 instructions, bf16 matmul measured 2.2x fp32: faster)"),
    (True, 0.6, "precision auto -> fp32 (bf16 instructions, bf16 matmul measured 0.6x fp32: not faster)"),
    (False, 2.2, "precision auto -> fp32 (no bf16 instructions on this CPU)"),
])
def test_runtime_line_says_what_auto_chose_and_why(monkeypatch, has_bf16, speedup, words):
    monkeypatch.delenv(utils.AUTO_PRECISION_ENV, raising=False)
    monkeypatch.setattr(runtime, "get_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: has_bf16)
    monkeypatch.setattr(runtime, "cpu_bf16_speedup", lambda: speedup)
    assert utils.runtime_summary().endswith(words)


@pytest.mark.parametrize("fixed", ["fp32", "bf16"])
def test_the_environment_fixes_what_auto_picks_on_a_cpu_and_the_runtime_line_says_so(monkeypatch, fixed):
    # the switch that runs the whole suite both ways on one machine: it must win over the measurement either way
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: fixed == "fp32")
    monkeypatch.setattr(runtime, "cpu_bf16_speedup", lambda: 2.2 if fixed == "fp32" else 0.6)
    monkeypatch.setattr(runtime, "get_device", lambda: torch.device("cpu"))
    monkeypatch.setenv(utils.AUTO_PRECISION_ENV, fixed)
    assert utils.resolve_precision("cpu") == fixed
    assert utils.resolve_precision("cpu", "fp32") == "fp32"  # a forced choice is still kept
    assert utils.runtime_summary().endswith(f"precision auto -> {fixed} (fixed by {utils.AUTO_PRECISION_ENV})")


def test_a_bad_auto_precision_setting_is_one_line_naming_the_choices(monkeypatch):
    monkeypatch.setenv(utils.AUTO_PRECISION_ENV, "int8")
    with pytest.raises(ValueError, match=r"CIFAR_AUTO_PRECISION must be 'fp32' or 'bf16' \(or unset\); got 'int8'"):
        utils.resolve_precision("cpu")


def test_bf16_speedup_is_a_measured_ratio():
    utils.cpu_bf16_speedup.cache_clear()
    ratio = utils.cpu_bf16_speedup(n=64, reps=2)
    assert math.isfinite(ratio) and ratio > 0
    assert utils.cpu_bf16_speedup(n=64, reps=2) == ratio  # measured once, then cached


def _run(args, **env):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})


def test_ddp_two_gloo_processes_write_one_checkpoint(tmp_path, real_cifar10):
    out = tmp_path / "ddp"
    r = _run(["-m", "torch.distributed.run", "--nproc_per_node=2", "train.py", "--arch", "resnet8",
              "--stages", "0.1:1", "--limit-train", "512", "--limit-val", "256", "--precision", "fp32",
              "--device", "cpu", "--out", str(out), "--no-progress"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2 process(es)" in r.stdout and r.stdout.count("epoch   1 stage 1") == 1
    assert sorted(p.name for p in out.iterdir()) == [".lock", "best.pth", "ckpt_1.pth"]


def test_ranks_wait_for_each_other_before_tearing_the_group_down(monkeypatch):
    # the real two-process run above aborted at exit about one time in six without this order
    import train
    calls = []
    monkeypatch.setattr(train, "setup_distributed", lambda device: (1, 2, torch.device("cpu")))
    monkeypatch.setattr(train, "run", lambda *a: calls.append("run"))
    monkeypatch.setattr(train.dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(train.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(train.dist, "destroy_process_group", lambda: calls.append("destroy"))
    train.main(["--out", "unused"])
    assert calls == ["run", "barrier", "destroy"]
    calls.clear()
    monkeypatch.setattr(train, "run", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # after an error no barrier: the other rank may never reach it
        train.main(["--out", "unused"])
    assert calls == ["destroy"]


def test_train_cli_pauses_at_stop_epoch_and_resumes(tmp_path, real_cifar10):
    out = tmp_path / "cli"
    args = ["train.py", "--arch", "resnet20", "--stages", "0.1:2", "0.01:3", "0.001:4", "--limit-train", "2048",
            "--limit-val", "500", "--save-every", "1", "--out", str(out), "--no-progress"]
    r = _run(args + ["--stop-epoch", "3"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert utils.checkpoint_epochs(out) == [1, 2, 3] and "paused: epoch 3" in r.stdout
    r = _run(args + ["--resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "from epoch 3 stage 3" in r.stdout and "epoch   4 stage 3" in r.stdout and "done: epoch 4" in r.stdout
    assert utils.load_checkpoint(out / "ckpt_4.pth")["history"]["epoch"] == [0, 1, 2, 3]


def test_stages_scale_to_a_number_of_epochs_in_utils_and_train_py(tmp_path):
    release = [(0.1, 82), (0.01, 123), (0.001, 164)]
    assert utils.scale_stages(release, 30) == [(0.1, 15), (0.01, 23), (0.001, 30)]
    assert utils.scale_stages(release, 20) == [(0.1, 10), (0.01, 15), (0.001, 20)]
    assert utils.scale_stages(release, 3) == [(0.1, 1), (0.01, 2), (0.001, 3)]  # every stage keeps an epoch
    assert utils.scale_stages(release, 164) == release
    with pytest.raises(ValueError, match="cannot hold 3 stages"):
        utils.scale_stages(release, 2)
    import train
    parser, args = train.parse_args(["--out", str(tmp_path / "run"), "--epochs", "30"])
    assert train.build_config(parser, args).stages == [(0.1, 15), (0.01, 23), (0.001, 30)]


def test_fit_prints_an_estimate_after_its_first_epoch(tmp_path, capsys):
    tiny_trainer(tmp_path, stages=[(0.1, 2), (0.01, 4)]).fit(until_stage=0)
    out = capsys.readouterr().out
    assert re.search(r"estimate: about \d+ min for the remaining 3 epochs \(to epoch 4\), at \d+ s an epoch", out)
    assert out.count("estimate:") == 1


def test_quick_mode_shrinks_runs_only_under_cifar_quick(monkeypatch):
    cfg = utils.TrainConfig(stages=[(0.1, 82), (0.01, 123), (0.001, 164)])
    data = tuple(np.arange(2000) for _ in range(4))
    monkeypatch.delenv("CIFAR_QUICK", raising=False)
    assert quick.shrink_run_for_tests(cfg, data, "run") == (cfg, data, "run")
    monkeypatch.setenv("CIFAR_QUICK", "1")
    small_cfg, small_data, run_dir = quick.shrink_run_for_tests(cfg, data, "run")
    assert small_cfg.stages == [(0.1, 1), (0.01, 2), (0.001, 3)] and cfg.stages[-1] == (0.001, 164)
    assert [len(a) for a in small_data] == [1024, 1024, 500, 500]
    assert Path(run_dir).is_dir() and not any(Path(run_dir).iterdir())
    assert quick.shrink_run_for_tests(cfg, data, "run")[2] == run_dir  # the same stand-in: later cells resume
    assert [len(a) for a in quick.shrink_images_for_tests(np.arange(5000))] == [1000]


def test_input_size_trains_the_imagenet_layout_at_cifars_own_size(tmp_path):
    """The 224-pixel report's network, trained without resizing: the comparison run of the ImageNet layout."""
    assert utils.TrainConfig(arch="resnet18_imagenet").preprocess().size == 224
    cfg = utils.TrainConfig(arch="resnet18_imagenet", input_size=32, stages=[(0.1, 1)], batch_size=32,
                            precision="fp32")
    assert cfg.preprocess().size == 32
    x, y, xv, yv = tiny_data(64)
    trainer = utils.Trainer(cfg, (x, y, xv[:32], yv[:32]), tmp_path, "cpu", progress=False)
    trainer.fit()
    assert utils.load_checkpoint(tmp_path / "best.pth")["preprocess"]["size"] == 32
    assert utils.Loaded_model(tmp_path / "best.pth").predict(x[:4], verbose=False).shape == (4,)
    with pytest.raises(ValueError, match="input_size"):
        utils.TrainConfig(input_size=16)


def test_progress_in_a_saved_notebook_reads_as_its_last_state():
    """A widget bar saves only its first frame ("0%"), all GitHub shows; the notebook line saves its last."""
    import nbformat
    from nbclient import NotebookClient
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(
        f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nfrom cifar_resnet.training import _progress_bar\n"
        "with _progress_bar(2, 'run (epochs)', True, leave=True) as run:\n"
        "    for epoch in range(2):\n"
        "        with _progress_bar(5, 'epoch', True) as bar:\n"
        "            for step in range(5):\n"
        "                bar.set_postfix(loss='0.500')\n"
        "                bar.update()\n"
        "        run.update()\n")]
    NotebookClient(nb, kernel_name="python3", timeout=120).execute()
    shown = [o["data"]["text/plain"] for o in nb.cells[0].outputs if o["output_type"] == "display_data"]
    assert shown[0].startswith("run (epochs): 2/2 (100%)")  # the run's line, complete
    assert shown[1:] == ["", ""]  # each epoch's line cleared once its epoch ended (leave=False)


def test_compile_switch_trains_the_same_as_eager(tmp_path):
    """TrainConfig(compile=True) runs the network through torch.compile (Inductor); one epoch's losses agree with
    eager mode to float tolerance, and the compiled model is the one that trained."""
    eager = tiny_trainer(tmp_path / "eager", stages=[(0.1, 1)], precision="fp32", compile="off")
    compiled = tiny_trainer(tmp_path / "compiled", stages=[(0.1, 1)], precision="fp32", compile=True)
    assert compiled.model is not compiled.net and eager.model is eager.net
    eager_history, compiled_history = eager.fit(), compiled.fit()
    eager_loss, compiled_loss = eager_history["train_loss"][0], compiled_history["train_loss"][0]
    assert compiled_history["hardware"][0] == eager_history["hardware"][0] + ", compiled"  # epoch times compare
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-3)
    for (name, a), b in zip(eager.net.state_dict().items(), compiled.net.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-3), name  # the same weights after the epoch


def test_compile_auto_is_eager_on_a_cpu_and_on_falls_back_in_one_line_without_a_compiler(tmp_path, monkeypatch):
    """'auto' keeps a CPU eager (no faster compiled there) and compiles on a GPU that has a compiler; 'on' without a
    compiler trains eager and says why, instead of failing at the first step; bools read as 'on' / 'off'."""
    monkeypatch.setattr(runtime, "compiler_missing", lambda device: None)
    assert utils.resolve_compile("cpu", "auto") == (False, "auto: eager, no faster compiled on a CPU")
    assert utils.resolve_compile("cpu", "off")[0] is False
    assert utils.TrainConfig(compile=True).compile == "on" and utils.TrainConfig(compile=False).compile == "off"
    with pytest.raises(ValueError, match="compile must be one of 'auto', 'on', 'off'; got 'yes'"):
        utils.TrainConfig(compile="yes")
    assert utils.resolve_compile("cuda", "auto") == (True, "compiled (auto on a GPU)")
    assert utils.resolve_compile("cpu", "on") == (True, "compiled")
    monkeypatch.setattr(runtime, "compiler_missing", lambda device: "no C++ compiler found (g++ or $CXX)")
    trainer = tiny_trainer(tmp_path, stages=[(0.1, 1)], precision="fp32", compile="on")
    assert trainer.model is trainer.net and trainer.compile_note == "not compiled: no C++ compiler found (g++ or $CXX)"


def test_compiler_missing_detects_the_cpp_compiler_inductor_would_use():
    """On these machines g++ is there (None); with $CXX naming a compiler that does not exist and no g++ on the
    PATH, the check says so. Run in fresh interpreters: Inductor reads $CXX once, when it is imported."""
    probe = "from cifar_resnet.runtime import compiler_missing; print(compiler_missing('cpu'))"
    env = dict(os.environ, PYTHONPATH=str(utils.PROJECT_DIR))
    found = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "None"
    env |= dict(CXX="/nonexistent/c++", PATH=str(Path(sys.executable).parent))
    missing = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert missing.stdout.strip() == "no C++ compiler found (g++ or $CXX)"


@pytest.mark.parametrize("label, name", [
    ("Intel(R) Xeon(R) Processor family 6 (AVX512-BF16), 2 threads, fp32", "Intel Xeon family 6"),
    ("AMD EPYC family 25 (AVX2), 1 thread, bf16", "AMD EPYC family 25"),
    ("Intel(R) Core(TM) i7-8700 CPU @ 3.20GHz family 6, 12 threads, fp32", "Intel Core i7-8700 family 6"),
    ("Tesla T4, fp16", "Tesla T4")])
def test_machine_name_keeps_the_machine_and_drops_trademarks_threads_and_precision(label, name):
    assert utils.machine_name(label) == name
