"""Nothing lost to a careless command, no silent wrong answer: run folders, resume, integrity, inputs, CLI mistakes."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import utils
from conftest import make_fake_arrays, write_npy
from test_training import tiny_trainer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fake_data_dir(tmp_path_factory):
    """A CIFAR-shaped folder big enough for the 5,000-image validation split: train.py runs in seconds on it."""
    folder = tmp_path_factory.mktemp("fake_cifar")
    write_npy(folder, make_fake_arrays(n_train=5200, n_test=20))
    return folder


def train_cli(out, data, *extra, wait=True):
    args = [sys.executable, "train.py", "--arch", "resnet8", "--data", str(data), "--out", str(out), "--limit-val", "64",
            "--precision", "fp32", "--device", "cpu", "--no-progress", *extra]
    if not wait:
        return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)


def one_line_error(r, *words):
    """The process refused with exit status 2 and one line naming `words`, before training anything."""
    assert r.returncode == 2, (r.returncode, r.stdout[-500:], r.stderr[-1500:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0], r.stderr
    assert "epoch " not in r.stdout
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


# 1. a finished run's folder is not overwritten by a new run -------------------------------------------------

def test_fresh_run_refuses_a_folder_that_holds_a_run(tmp_path, fake_data_dir):
    out = tmp_path / "run"
    assert train_cli(out, fake_data_dir, "--stages", "0.1:2").returncode == 0
    before = {p.name: p.read_bytes() for p in out.glob("*.pth")}
    line = one_line_error(train_cli(out, fake_data_dir, "--stages", "0.1:2"), "--resume", "--out")
    assert "already holds a run" in line
    assert {p.name: p.read_bytes() for p in out.glob("*.pth")} == before
    trainer = tiny_trainer(out)  # the same refusal from Python, before the first epoch
    with pytest.raises(utils.RunFolderError, match="already holds"):
        trainer.run_epoch()


# 2. one process per run folder; pruning only deletes the run's own files ----------------------------------

def test_second_process_on_a_folder_exits_at_once_naming_the_holder(tmp_path, fake_data_dir):
    out = tmp_path / "busy"
    utils.RunFolder(out).lock()  # this test process holds the folder, as a running train.py would
    line = one_line_error(train_cli(out, fake_data_dir, "--stages", "0.1:1"), "in use", f"pid {os.getpid()}")
    assert "--out" in line and not list(out.glob("*.pth"))


def test_lock_is_released_when_the_holder_dies(tmp_path, fake_data_dir):
    out = tmp_path / "dies"
    holder = subprocess.Popen([sys.executable, "-c", f"import utils, time; utils.RunFolder({str(out)!r}).lock(); "
                               "print('locked', flush=True); time.sleep(60)"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    one_line_error(train_cli(out, fake_data_dir, "--stages", "0.1:1"), f"pid {holder.pid}")
    holder.kill()
    holder.wait()
    assert train_cli(out, fake_data_dir, "--stages", "0.1:1").returncode == 0


def test_pruning_never_deletes_a_file_the_run_did_not_write(tmp_path):
    tiny_trainer(tmp_path, stages=[(0.1, 6)], keep_last=1).fit(stop_epoch=2)
    foreign = tmp_path / "ckpt_1.pth"  # the run pruned its epoch 1; the user puts another run's file there
    assert not foreign.exists()
    utils.save_checkpoint({"note": "someone else's"}, foreign)
    tiny_trainer(tmp_path, stages=[(0.1, 6)], keep_last=1).resume().fit()
    assert utils.checkpoint_epochs(tmp_path) == [1, 6]
    assert utils.load_checkpoint(foreign)["note"] == "someone else's"


# 3. --stage is checked against the schedule; a finished run says so -------------------------------------

def test_stage_out_of_range_and_resuming_a_finished_run(tmp_path, fake_data_dir):
    out = tmp_path / "run"
    assert train_cli(out, fake_data_dir, "--stages", "0.1:1", "0.01:2").returncode == 0
    one_line_error(train_cli(out, fake_data_dir, "--resume", "--stage", "0"), "--stage 0", "stages 1 to 2")
    one_line_error(train_cli(out, fake_data_dir, "--resume", "--stage", "9"), "--stage 9", "stages 1 to 2")
    r = train_cli(out, fake_data_dir, "--resume")
    assert r.returncode == 0 and "nothing to train" in r.stdout and "done" not in r.stdout


# 4. image and label arrays of the wrong kind are refused, never cast --------------------------------------

@pytest.mark.parametrize("damage, message", [
    (lambda a: [a[0].astype(np.float32) / 255, *a[1:]], "uint8"),
    (lambda a: [a[0].astype(np.int16) + 200, *a[1:]], "uint8"),
    (lambda a: [a[0], a[1][:-1], *a[2:]], "one label each"),
    (lambda a: [a[0], a[1] + 5, *a[2:]], "labels 0..9"),
    (lambda a: [a[0], a[1].astype(np.float64), *a[2:]], "integer labels"),
    (lambda a: [a[0][:, :16], *a[1:]], "N x 32 x 32 x 3"),
])
def test_wrong_arrays_are_refused_naming_the_folder(tmp_path, fake_arrays, damage, message):
    write_npy(tmp_path, damage(list(fake_arrays)))
    with pytest.raises(ValueError, match=message) as e:
        utils.load_cifar10(tmp_path, download=False)
    assert str(tmp_path) in str(e.value)


# 5. resume continues the recorded recipe -------------------------------------------------------------------

def test_resume_takes_the_recorded_recipe_and_refuses_a_silent_change(tmp_path, fake_data_dir):
    out = tmp_path / "run"
    recipe = ["--arch", "resnet8", "--shortcut", "A", "--stages", "0.1:1", "0.01:3", "--label-smoothing", "0.1",
              "--save-every", "1"]
    assert train_cli(out, fake_data_dir, *recipe, "--stop-epoch", "1").returncode == 0
    r = train_cli(out, fake_data_dir, "--resume", "--stop-epoch", "2")  # no recipe flags at all
    assert r.returncode == 0, r.stderr[-1500:]
    assert "stages [(0.1, 1), (0.01, 3)]" in r.stdout
    assert utils.load_checkpoint(out / "ckpt_2.pth")["config"]["label_smoothing"] == 0.1
    line = one_line_error(train_cli(out, fake_data_dir, "--resume", "--label-smoothing", "0", "--stages", "0.1:9"),
                          "label_smoothing: recorded 0.1, given 0.0", "stages: recorded", "--override")
    assert "ckpt_2.pth" in line
    r = train_cli(out, fake_data_dir, "--resume", "--label-smoothing", "0", "--override")
    assert r.returncode == 0, r.stderr[-1500:]
    assert utils.load_checkpoint(out / "ckpt_3.pth")["history"]["overrides"] == [
        "from epoch 2: label_smoothing: recorded 0.1, given 0.0"]


def test_default_shortcut_and_its_explicit_name_are_the_same_network(tmp_path):
    tiny_trainer(tmp_path, stages=[(0.1, 2)], arch_options={"shortcut": "A"}).fit(stop_epoch=1)
    resumed = tiny_trainer(tmp_path, stages=[(0.1, 2)]).resume()  # resnet8 without options is option A
    assert resumed.epoch == 1
    with pytest.raises(utils.RecipeMismatchError, match="resnet8"):
        tiny_trainer(tmp_path, stages=[(0.1, 2)], arch_options={"shortcut": "B"}).resume()


# 6. an explicit data folder that does not exist is an error -----------------------------------------------

def test_missing_data_folder_is_an_error_not_a_fallback(tmp_path, fake_data_dir, monkeypatch):
    monkeypatch.setenv("CIFAR10_DIR", str(fake_data_dir))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        utils.load_cifar10(tmp_path / "typo", download=False)
    one_line_error(train_cli(tmp_path / "run", tmp_path / "typo", "--stages", "0.1:1"), "--data", "no such folder")


# 7. damaged or impossible weights never load silently -----------------------------------------------------

@pytest.fixture(scope="module")
def release_file(tmp_path_factory):
    run = tmp_path_factory.mktemp("release")
    trainer = tiny_trainer(run / "run", stages=[(0.1, 1)])
    trainer.fit()
    return utils.export_release(run / "run" / "best.pth", run / "release.pth")


def test_nonfinite_or_negative_variance_weights_refuse_to_load(tmp_path, release_file):
    for key, value in (("linear.weight", float("nan")), ("conv1.weight", float("inf")), ("bn1.running_var", -1.0)):
        ckpt = utils.load_checkpoint(release_file)
        weights = ckpt["model"][key]
        weights[(0,) * weights.ndim] = value
        utils.save_checkpoint(ckpt, tmp_path / "bad.pth")  # a consistent digest: the weights themselves are wrong
        with pytest.raises(utils.DamagedCheckpointError, match=key.replace(".", r"\.")):
            utils.Loaded_model(tmp_path / "bad.pth", precision="fp32")


def test_overwritten_bytes_are_detected_by_the_digest(tmp_path, release_file):
    data = bytearray(release_file.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = random.Random(0).randbytes(64)
    (tmp_path / "hit.pth").write_bytes(bytes(data))
    with pytest.raises(utils.DamagedCheckpointError, match="hit.pth is damaged"):
        utils.Loaded_model(tmp_path / "hit.pth", precision="fp32")


# 8. a damaged newest checkpoint falls back to the previous one; killed saves leave nothing behind ---------

def test_resume_falls_back_from_a_damaged_newest_checkpoint_and_cleans_temp_files(tmp_path, capsys):
    tiny_trainer(tmp_path, stages=[(0.1, 3)]).fit(stop_epoch=2)
    (tmp_path / "ckpt_2.pth").write_bytes((tmp_path / "ckpt_2.pth").read_bytes()[:1000])  # cut short, as a full disk
    (tmp_path / ".ckpt_3.pth.12345.tmp").write_bytes(b"left by a killed save")
    trainer = tiny_trainer(tmp_path, stages=[(0.1, 3)]).resume()
    out = capsys.readouterr().out
    assert trainer.epoch == 1 and "ckpt_2.pth is damaged" in out and "resuming from ckpt_1.pth instead" in out
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(utils.DamagedCheckpointError, match="ckpt_2.pth"):
        utils.load_checkpoint(tmp_path / "ckpt_2.pth")


def test_killed_training_always_resumes_to_the_uninterrupted_result(tmp_path, fake_data_dir):
    recipe = ["--stages", "0.1:25", "0.01:40", "--save-every", "1", "--limit-train", "192"]
    assert train_cli(tmp_path / "straight", fake_data_dir, *recipe).returncode == 0
    out, rng, kills = tmp_path / "killed", random.Random(1), 0
    while kills < 12:
        resume = ["--resume"] if utils.checkpoint_epochs(out) else []
        proc = train_cli(out, fake_data_dir, *recipe, *resume, wait=False)
        epochs_to_see = rng.randint(1, 3)  # an epoch line is printed just before that epoch's saves
        while epochs_to_see:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, proc.stderr.read()[-1500:]
            epochs_to_see -= line.startswith("epoch")
            if line.startswith("done"):
                break
        time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    r = train_cli(out, fake_data_dir, *recipe, "--resume")
    assert r.returncode == 0, r.stderr[-1500:]
    assert kills >= 10, f"only {kills} kills landed before the run finished"
    straight, killed = (utils.load_checkpoint(d / "ckpt_40.pth") for d in (tmp_path / "straight", out))
    for k, v in straight["model"].items():
        assert torch.equal(v, killed["model"][k]), k
    assert killed["history"]["train_loss"] == straight["history"]["train_loss"]
    assert utils.load_checkpoint(out / "best.pth")["epoch"] == utils.load_checkpoint(tmp_path / "straight" / "best.pth")["epoch"]
    assert not list(out.glob(".*.tmp"))


# 9. user mistakes: one line, exit status 2, before any training --------------------------------------------

@pytest.mark.parametrize("flags, words", [
    (["--stages", "0.1:5", "0.01:3"], ["increasing"]),
    (["--stages", "nan:5"], ["positive"]),
    (["--stages", "0.1-5"], ["LR:END_EPOCH"]),
    (["--batch-size", "0"], ["--batch-size"]),
    (["--save-every", "0"], ["--save-every"]),
    (["--limit-train", "0"], ["--limit-train"]),
    (["--device", "gpu7"], ["--device"]),
    (["--arch", "resnet19"], ["unknown model"]),
    (["--stage", "2"], ["--stage needs --resume"]),
])
def test_user_mistakes_are_one_line_before_training(tmp_path, fake_data_dir, flags, words):
    one_line_error(train_cli(tmp_path / "run", fake_data_dir, *flags), *words)


def test_unwritable_output_folder_is_one_line(tmp_path, fake_data_dir):
    (tmp_path / "a_file").write_text("not a folder")
    one_line_error(train_cli(tmp_path / "a_file" / "run", fake_data_dir, "--stages", "0.1:1"), "--out", "cannot write")


# 10. checkpoints from older PyTorch (no num_batches_tracked) load ------------------------------------------

@pytest.mark.parametrize("layout", ["kuangliu", "state_dict", "bare", "module"])
def test_old_pytorch_checkpoints_without_batch_counters_load(tmp_path, layout):
    net = utils.build_model("resnet20", shortcut="B").eval()
    sd = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    payload = {"kuangliu": {"net": sd, "acc": 91.2, "epoch": 180}, "state_dict": {"state_dict": sd}, "bare": sd,
               "module": {f"module.{k}": v for k, v in sd.items()}}[layout]
    torch.save(payload, tmp_path / "old.pth")
    model = utils.Loaded_model(tmp_path / "old.pth", arch="resnet20", shortcut="B", precision="fp32")
    images = make_fake_arrays(n_train=12)[0]
    with torch.no_grad():
        expected = net(utils.Preprocess()(utils.images_to_tensor(images))).argmax(1).numpy()
    np.testing.assert_array_equal(model.predict(images, verbose=False), expected)
    del sd["bn1.running_mean"]  # everything else stays strict
    torch.save(sd, tmp_path / "short.pth")
    with pytest.raises(ValueError, match=r"missing keys .*bn1.running_mean"):
        utils.Loaded_model(tmp_path / "short.pth", arch="resnet20", shortcut="B")


def test_predict_and_score_check_their_inputs(release_file):
    model = utils.Loaded_model(release_file, precision="fp32")
    images = make_fake_arrays(n_train=4)[0]
    with pytest.raises(ValueError, match="N x 32 x 32 x 3"):
        model.predict(np.zeros((4, 40, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="batch_size"):
        model.predict(images, batch_size=0)
    with pytest.raises(ValueError, match="4 images but y 3 labels"):
        model.score(images, [0, 1, 2])


# 9. round two: the seams between command line, run folder, data and files ------------------------------------

def test_resuming_another_folders_checkpoint_never_overwrites_a_run_in_out(tmp_path, fake_data_dir):
    a, b = tmp_path / "a", tmp_path / "b"
    assert train_cli(a, fake_data_dir, "--stages", "0.1:2", "--save-every", "1").returncode == 0
    assert train_cli(b, fake_data_dir, "--stages", "0.1:2", "--seed", "1").returncode == 0
    before = {p.name: p.read_bytes() for p in b.glob("*.pth")}
    line = one_line_error(train_cli(b, fake_data_dir, "--resume", str(a / "ckpt_1.pth")), "already holds a run")
    assert str(b) in line and {p.name: p.read_bytes() for p in b.glob("*.pth")} == before
    fresh = tmp_path / "c"  # into an empty folder it continues run a there
    r = train_cli(fresh, fake_data_dir, "--resume", str(a / "ckpt_1.pth"))
    assert r.returncode == 0 and "done: epoch 2" in r.stdout, r.stderr[-1500:]


def test_a_pause_or_a_loss_before_the_first_save_every_leaves_a_resumable_run(tmp_path, fake_data_dir):
    out = tmp_path / "run"  # save every 5 epochs (the default), paused at 2: the folder must still resume
    r = train_cli(out, fake_data_dir, "--stages", "0.1:3", "--stop-epoch", "2")
    assert r.returncode == 0 and "paused: epoch 2" in r.stdout
    assert utils.checkpoint_epochs(out) == [1, 2] and (out / "best.pth").is_file()
    r = train_cli(out, fake_data_dir, "--resume")
    assert r.returncode == 0 and "done: epoch 3" in r.stdout, r.stderr[-1500:]
    lost = tmp_path / "lost"  # a session lost during epoch 2: epoch 1 is already a resume point
    tiny_trainer(lost, stages=[(0.1, 4)], save_every=5).run_epoch()
    assert utils.checkpoint_epochs(lost) == [1] and tiny_trainer(lost, stages=[(0.1, 4)], save_every=5).resume().epoch == 1


def test_an_explicit_data_folder_without_the_data_is_an_error_not_a_fallback(tmp_path, fake_data_dir, monkeypatch):
    monkeypatch.setenv("CIFAR10_DIR", str(fake_data_dir))
    empty, half = tmp_path / "empty", tmp_path / "half"
    empty.mkdir()
    write_npy(half, make_fake_arrays(n_train=10, n_test=10))
    for name in ("y_train.npy", "x_test.npy"):
        (half / name).unlink()
    with pytest.raises(FileNotFoundError, match="holds no copy of the data"):
        utils.load_cifar10(empty)
    one_line_error(train_cli(tmp_path / "r1", empty, "--stages", "0.1:1"), str(empty), "x_train.npy")
    one_line_error(train_cli(tmp_path / "r2", half, "--stages", "0.1:1"), "lacks y_train.npy, x_test.npy")


@pytest.mark.parametrize("images, words", [
    (torch.zeros(2, 3, 32, 32, dtype=torch.int64), "dtype torch.int64"),
    (torch.zeros(2, 3, 32, 32, dtype=torch.int32), "dtype torch.int32"),
    (torch.full((2, 3, 32, 32), 200.0), "[0, 1]"),
    (torch.full((2, 3, 32, 32), float("nan")), "NaN"),
])
def test_preprocess_refuses_what_it_would_misread(images, words):
    """The hub's .preprocess is a Preprocess: int pixels or 0..255 floats gave chance-level predictions."""
    with pytest.raises(ValueError) as e:
        utils.Preprocess()(images)
    assert words in str(e.value)


def test_deleting_the_lock_file_does_not_admit_a_second_writer(tmp_path):
    out = tmp_path / "run"
    utils.RunFolder(out).lock()
    (out / ".lock").unlink()
    second = subprocess.run([sys.executable, "-c", f"import utils; utils.RunFolder({str(out)!r}).lock()"], cwd=ROOT,
                            capture_output=True, text=True)
    assert second.returncode != 0 and "in use by another training process" in second.stderr


class _Anything:
    pass


def test_a_file_naming_code_counts_as_damaged_and_resume_falls_back_past_it(tmp_path, capsys):
    trainer = tiny_trainer(tmp_path, stages=[(0.1, 3)])
    trainer.fit(stop_epoch=2)
    torch.save({"epoch": 2, "obj": _Anything()}, tmp_path / "ckpt_2.pth")  # as a bit flip in a class name reads
    with pytest.raises(utils.DamagedCheckpointError) as e:
        utils.load_checkpoint(tmp_path / "ckpt_2.pth")
    assert "weights_only=False" not in str(e.value) and "damaged" in str(e.value)
    assert tiny_trainer(tmp_path, stages=[(0.1, 3)]).resume().epoch == 1
    assert "resuming from ckpt_1.pth instead" in capsys.readouterr().out


def test_resume_on_other_data_is_a_recipe_difference(tmp_path, fake_data_dir):
    out = tmp_path / "run"
    assert train_cli(out, fake_data_dir, "--stages", "0.1:3", "--stop-epoch", "1").returncode == 0
    one_line_error(train_cli(out, fake_data_dir, "--resume", "--limit-train", "100"), "data: recorded", "--override")
    r = train_cli(out, fake_data_dir, "--resume", "--limit-train", "100", "--override")
    assert r.returncode == 0, r.stderr[-1500:]
    assert "data: recorded" in utils.load_checkpoint(out / "ckpt_3.pth")["history"]["overrides"][0]


def test_diverged_weights_are_never_saved(tmp_path):
    trainer = tiny_trainer(tmp_path, stages=[(0.1, 3)])
    trainer.run_epoch()
    step, steps = trainer.optimizer.step, []

    def poisoned_step(*args, **kwargs):  # every loss finite, then NaN weights after the last step: as lr 1e6 did
        step(*args, **kwargs)
        steps.append(1)
        if len(steps) == len(trainer.train_loader):
            trainer.net.bn1.weight.data.fill_(float("nan"))
    trainer.optimizer.step = poisoned_step
    with pytest.raises(utils.NonFiniteLossError, match="nothing was saved"):
        trainer.run_epoch()
    assert utils.checkpoint_epochs(tmp_path) == [1] and utils.load_checkpoint(tmp_path / "best.pth")["epoch"] == 1


def test_resuming_a_model_file_or_past_the_schedule_says_what_it_is(tmp_path, fake_data_dir):
    out = tmp_path / "run"
    assert train_cli(out, fake_data_dir, "--stages", "0.1:3", "--save-every", "1", "--stop-epoch", "2").returncode == 0
    one_line_error(train_cli(tmp_path / "other", fake_data_dir, "--resume", str(out / "best.pth")),
                   "model to predict with", "ckpt_<epoch>.pth")
    r = train_cli(out, fake_data_dir, "--resume", "--stages", "0.1:1", "--override")
    assert r.returncode == 0 and "at epoch 2, past the end of the given schedule (epoch 1)" in r.stdout
