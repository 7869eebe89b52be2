"""One definition of each vocabulary: precision names and test-time view names, refused everywhere when unknown,
with the valid ones listed."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import utils

ROOT = Path(__file__).resolve().parents[1]
RELEASE = ROOT / "checkpoints" / "resnet20.pth"


def _lists_all(message, names):
    return all(repr(n) in message for n in names)


@pytest.mark.parametrize("entry", [
    lambda: utils.Loaded_model(RELEASE, tta="bogus"),
    lambda: utils.Loaded_model(RELEASE).predict_proba(torch.zeros(1, 3, 32, 32), tta="bogus"),
    lambda: utils.tta_probabilities(utils.build_model("resnet20").eval(), torch.zeros(1, 3, 32, 32), "bogus"),
    lambda: utils.tta_accuracy(utils.build_model("resnet20"), torch.zeros(2, 3, 32, 32), torch.zeros(2), "bogus"),
    lambda: utils.SpeedRunConfig(tta="bogus"),
], ids=["Loaded_model", "predict_proba", "tta_probabilities", "tta_accuracy", "SpeedRunConfig"])
def test_unknown_tta_names_are_refused_listing_the_views(entry):
    with pytest.raises(ValueError) as e:
        entry()
    assert _lists_all(str(e.value), utils.TTA_VIEWS), str(e.value)


@pytest.mark.parametrize("entry, names", [
    (lambda: utils.Loaded_model(RELEASE, precision="bogus"), utils.PREDICT_PRECISIONS),
    (lambda: utils.resolve_precision("cpu", "bogus"), utils.PRECISIONS),
    (lambda: utils.TrainConfig(precision="bogus"), utils.PRECISIONS),
    (lambda: utils.SpeedRunConfig(precision="bogus"), utils.PRECISIONS),
    (lambda: utils.precision_dtype("int8"), ("fp32", "bf16", "fp16")),
], ids=["Loaded_model", "resolve_precision", "TrainConfig", "SpeedRunConfig", "precision_dtype"])
def test_unknown_precision_names_are_refused_listing_the_valid_ones(entry, names):
    with pytest.raises(ValueError) as e:
        entry()
    assert _lists_all(str(e.value), names), str(e.value)


def test_every_precision_name_has_one_dtype():
    assert {name: utils.precision_dtype(name) for name in ("fp32", "bf16", "fp16")} == {
        "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    assert set(utils.DTYPES) == set(utils.PRECISIONS) - {"auto"}


def test_train_py_takes_the_library_precision_names(tmp_path):
    run = subprocess.run([sys.executable, "train.py", "--out", str(tmp_path / "run"), "--precision", "int8"],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.count("\n") == 1
    assert all(repr(n) in run.stderr for n in utils.PRECISIONS), run.stderr
