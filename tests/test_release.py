"""The release checkpoints named in README.md, on the real test set: the README's figures hold, the fast
path agrees with fp32, and each file's history shows its stages and validation-based selection."""
import json
import os
import re
import sys
from pathlib import Path

import pytest

import utils

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import release_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\| \[`(checkpoints/[\w.]+\.pth)`\]")


def readme_results():
    """{release path: row cells} from the results table of README.md."""
    rows = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        if m := ROW.match(line):
            rows[m.group(1)] = [c.strip() for c in line.strip("|").split("|")]
    return rows


RESULTS = readme_results()
TEST_ACC, TTA_ACC = 3, 4  # columns of the results table (0-based)


def readme_speedrun_figures(release=release_table.SPEEDRUN):
    """(single view, with test-time views) in percent of a speed-run release, from its row in README.md."""
    for line in (ROOT / "README.md").read_text().splitlines():
        if f"[`{release}`]" in line:  # the last cell: "[`file`](card): views% / single%"
            views, single = re.findall(r"(\d+\.\d+)%", line.strip(" |").split("|")[-1])
            return float(single), float(views)
    raise AssertionError(f"README.md has no speed-run row for {release}")


def test_readme_lists_release_files():
    assert RESULTS, "README.md has no results row"
    for path in RESULTS:
        assert (ROOT / path).is_file(), f"README lists {path}, which is not in the repository"


@pytest.fixture(scope="module")
def test_set(real_cifar10):
    return real_cifar10[2], real_cifar10[3]


@pytest.fixture(scope="module")
def measured(test_set):
    """{release: (single view, flip TTA)} in percent, fp32: measured once for every test below."""
    return {path: release_table.scores(ROOT / path, *test_set) for path in release_table.RELEASES}


@pytest.mark.parametrize("path", sorted(RESULTS))
def test_readme_figures_and_fast_path_agree_with_measurement(path, test_set, measured):
    x_test, y_test = test_set
    acc, tta = measured[path]
    cells = RESULTS[path]
    assert abs(acc - float(cells[TEST_ACC].rstrip("%"))) <= 0.05, f"{path}: measured {acc:.2f}%, README {cells[TEST_ACC]}"
    assert abs(tta - float(cells[TTA_ACC].rstrip("%"))) <= 0.05, f"{path}: TTA {tta:.2f}%, README {cells[TTA_ACC]}"
    if utils.cpu_has_native_bf16():  # the path 'auto' takes where bf16 is faster; checked wherever it runs natively
        fast_acc = utils.Loaded_model(ROOT / path, precision="bf16").score(x_test, y_test) * 100
        assert abs(fast_acc - acc) <= 0.1, f"bf16 path {fast_acc:.2f}% vs fp32 {acc:.2f}%"


def test_reports_table_bolds_our_figure_only_where_it_reaches_the_reports():
    release = "checkpoints/resnet18.pth"  # the ResNet18 course report: 92.12%
    for single, bold in ((92.12, True), (93.0, True), (92.11, False)):
        row = next(line for line in utils.reports_table({release: (single, 94.0)}) if "ResNet18 course" in line)
        assert (f"**{single:.2f}%**" in row) == bold and f"{single:.2f}%" in row


def test_readme_rows_and_model_card_are_what_the_release_files_give():
    """The rows and the card regenerated from the files and the README's test figures (checked above) are the
    committed ones: a release file that changes without its card (or its row) fails here."""
    figures = {path: tuple(float(RESULTS[path][i].rstrip("%")) for i in (TEST_ACC, TTA_ACC)) for path in RESULTS}
    figures |= {release: readme_speedrun_figures(release) for release in release_table.speedrun_releases()}
    assert sorted(RESULTS) == sorted(release_table.RELEASES)
    readme = (ROOT / "README.md").read_text().splitlines()
    for path in RESULTS:
        assert release_table.row(path, figures[path]) in readme, path
    assert release_table.SPEEDRUN in release_table.speedrun_releases()
    for line in release_table.speedrun_rows():  # the speed-run table is the results files'
        assert line in readme, line
    for line in release_table.peer_rows():  # and so is the peer's, once its run has finished
        assert line in readme, line
    for line in utils.reports_table(figures):  # the reports reproduced: this project's figures are the rows'
        assert line in readme, line
    committed = (ROOT / "checkpoints" / "README.md").read_text()
    assert release_table.card(figures) == committed, \
        "the model card differs from the release files: python bench/release_table.py --card checkpoints/README.md"


def test_peer_table_gives_each_side_of_each_run_from_its_results_file(tmp_path):
    assert release_table.peer_rows(tmp_path / "none.json") == []  # no run finished: no table
    recipe = json.loads((ROOT / utils.SPEEDRUN_RESULTS["tier94_muon"][0]).read_text())["recipe"]
    side = dict(seed=3, precision="bf16", hardware="AMD EPYC family 25 (AVX512-BF16), 2 threads, bf16")
    run = dict(seed=3, peer=dict(side, test_acc=0.93, test_acc_tta=0.9401, seconds=600, seconds_at_800=300,
                                 airbench_version="0.1.8"),
               ours=dict(side, test_acc=0.92, test_acc_tta=0.9395, seconds=480, seconds_at_800=240))
    path = tmp_path / "peer.json"
    path.write_text(json.dumps(dict(recipe_name="tier94_muon", recipe=recipe, peer="airbench94", runs=[run])))
    header, rule, theirs, ours = release_table.peer_rows(path)
    assert theirs == ("| 3 | airbench 0.1.8's own `train94` | 94.01% | 93.00% | 5.0 (10.0 min, AMD EPYC family 25, "
                      "bf16) |")
    assert ours.startswith("| 3 | `tier94_muon`: 8 epochs, Muon | 93.95% | 92.00% | 4.0 (8.0 min,")


@pytest.mark.parametrize("path", sorted(RESULTS))
def test_release_history_shows_stages_and_validation_selection(path):
    meta = utils.load_checkpoint(ROOT / path)
    history = meta["history"]
    assert "optimizer" not in meta and "rng" not in meta
    assert meta[utils.DIGEST_KEY] == utils.payload_digest(meta)  # integrity: checked on every load, present here
    lrs, val = history["lr"], history["val_acc"]
    runs_of_one_lr = [lr for i, lr in enumerate(lrs) if i == 0 or lr != lrs[i - 1]]
    assert runs_of_one_lr == [lr for lr, _ in meta["config"]["stages"]]  # every stage ran, in order (a warm-up too)
    assert len(lrs) == meta.get("epochs_run", meta["epoch"])
    assert len(history["hardware"]) == len(lrs)  # where and in what precision each epoch ran
    assert val.index(max(val)) + 1 == meta["epoch"] and max(val) == meta["best_val_acc"]  # chosen on validation


def _int8_ready():
    """Skip (or, under CI, fail) where int8 cannot run. Its accuracy is checked on every x86 CPU, with VNNI or
    without (there 7-bit activations keep it: cifar_resnet.quantize.activation_bits)."""
    if reason := utils.int8_unavailable_reason("cpu"):
        (pytest.fail if os.environ.get("CI") else pytest.skip)(reason)


@pytest.mark.parametrize("path", sorted(RESULTS))
def test_int8_keeps_accuracy_within_0_3_points_of_fp32(path, test_set, measured):
    _int8_ready()
    int8 = utils.Loaded_model(ROOT / path, precision="int8").score(*test_set) * 100
    assert abs(int8 - measured[path][0]) <= 0.3, f"{path}: int8 {int8:.2f}% vs fp32 {measured[path][0]:.2f}%"
