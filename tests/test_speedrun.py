"""The speed run: its network, each trick's switch, its bench's results file and its release file."""
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import utils
from conftest import make_fake_arrays, write_npy
from test_release import release_table

ROOT = Path(__file__).resolve().parents[1]


def group_parameters(cin, cout):
    """Two 3x3 convolutions without bias and two batch norms (scale and bias each)."""
    return cin * cout * 9 + 2 * cout + cout * cout * 9 + 2 * cout


def test_parameter_count_and_macs():
    net = utils.build_model("speedrun")
    whiten = 24 * 3 * 2 * 2 + 24
    expected = whiten + group_parameters(24, 64) + group_parameters(64, 256) + group_parameters(256, 256) + 256 * 10
    assert utils.count_parameters(net) == expected == 1_972_792
    convs = 24 * 12 * 31 * 31 + 64 * 24 * 9 * 31 * 31 + 64 * 64 * 9 * 15 * 15 + 256 * 64 * 9 * 15 * 15 \
        + 256 * 256 * 9 * 7 * 7 * 2 + 256 * 256 * 9 * 3 * 3 + 256 * 10
    assert abs(utils.count_macs(net) - convs) / convs < 0.01  # the rest: pooling, GELU, batch norm
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_residual_switch_keeps_the_weights_names():
    with_shortcut, plain = utils.build_model("speedrun"), utils.build_model("speedrun", residual=False)
    assert with_shortcut.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(with_shortcut.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(with_shortcut.eval()(x), plain.eval()(x))
    with pytest.raises(TypeError, match="residual"):
        utils.build_model("speedrun", shortcut="B")


@pytest.fixture(scope="module")
def images():
    return utils.Preprocess(std=utils.TRUE_STD)(utils.images_to_tensor(make_fake_arrays(400)[0]))


def test_whitening_filters_decorrelate_the_data_patches(images):
    filters = utils.whitening_filters(images)
    assert filters.shape == (24, 3, 2, 2) and torch.equal(filters[12:], -filters[:12])
    out = F.conv2d(images, filters[:12]).permute(0, 2, 3, 1).reshape(-1, 12).double()
    cov = out.T @ out / len(out)
    assert (cov - torch.diag(cov.diag())).abs().max() < 1e-4  # uncorrelated outputs
    assert cov.diag().max() <= 1 and cov.diag()[0] > 0.99  # unit variance where eigenvalues dwarf eps
    assert not torch.allclose(filters, utils.whitening_filters(images.flip(1)))  # they come from the data


@pytest.fixture(scope="module")
def tiny_runs():
    """One short run per switch of interest, on 512 random images, seed 0."""
    x, y, _, _ = make_fake_arrays(512)
    base = utils.SpeedRunConfig(epochs=2, batch_size=128, whiten_bias_epochs=1)
    runs = {}
    for name, cfg in {"full": base, "whitening": utils.without_trick(base, "whitening"),
                      "frozen_bn_weights": utils.without_trick(base, "frozen_bn_weights"),
                      "lookahead": utils.without_trick(base, "lookahead")}.items():
        runs[name] = (cfg, utils.speedrun(cfg, x, y, log=None))
    return x, runs


def test_whitening_layer_is_initialised_from_the_data_and_frozen(tiny_runs):
    x, runs = tiny_runs
    normalized = utils.Preprocess(std=utils.TRUE_STD)(utils.images_to_tensor(x))
    assert torch.allclose(runs["full"][1]["model"].whiten.weight, utils.whitening_filters(normalized))
    assert not torch.allclose(runs["whitening"][1]["model"].whiten.weight, utils.whitening_filters(normalized))


def test_batch_norm_scales_stay_one_only_when_frozen(tiny_runs):
    _, runs = tiny_runs
    scales = lambda net: torch.cat([m.weight.detach() for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)])
    assert torch.equal(scales(runs["full"][1]["model"]), torch.ones_like(scales(runs["full"][1]["model"])))
    assert not torch.allclose(scales(runs["frozen_bn_weights"][1]["model"]), torch.tensor(1.0))


def test_lookahead_resets_the_weights_to_their_average():
    net = torch.nn.Linear(3, 2)
    lookahead = utils.Lookahead(net)
    start = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    lookahead.update(net, decay=0.75)
    assert torch.allclose(net.weight, start + 0.25)  # not the raw weights (start + 1)
    assert torch.allclose(lookahead.average["weight"], net.weight)


def test_lookahead_switch_changes_the_trained_weights(tiny_runs):
    _, runs = tiny_runs  # same seed, data and order: only the averaging differs
    assert not torch.allclose(runs["full"][1]["model"].linear.weight, runs["lookahead"][1]["model"].linear.weight)


def test_alternating_flip_mirrors_each_image_every_other_epoch():
    cfg, first = utils.SpeedRunConfig(), torch.rand(1000) < 0.5
    e0, e1, e2 = (utils.speedrun_flips(1000, e, cfg, first) for e in range(3))
    assert torch.equal(e1, ~e0) and torch.equal(e2, e0)
    random_cfg = utils.without_trick(cfg, "alternating_flip")
    r0, r1 = (utils.speedrun_flips(1000, e, random_cfg, first) for e in range(2))
    assert 0.4 < (r0 == r1).float().mean() < 0.6  # independent draws agree about half the time


def test_translate_shifts_with_reflected_borders():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32)
    draws = torch.tensor([[0, 4], [4, 1], [0, 1]])  # (row offset, column offset, flip) per image, pad 2
    out = utils.augment_batch(x, pad=2, draws=draws, padding="reflect")
    padded = F.pad(x, (2, 2, 2, 2), mode="reflect")
    assert torch.equal(out[0], padded[0, :, 0:32, 4:36])
    assert torch.equal(out[1], padded[1, :, 4:36, 1:33].flip(2))


def test_learning_rate_warms_up_then_decays_to_zero():
    cfg = utils.SpeedRunConfig(warmup=0.2)
    factors = [utils.speedrun_lr_factor(cfg, s, 100) for s in range(101)]
    assert factors[0] == pytest.approx(0.2) and factors[20] == pytest.approx(1) and factors[100] == 0
    assert max(factors) == factors[20]
    assert utils.speedrun_lr_factor(utils.without_trick(cfg, "warmup"), 0, 100) == 1


def test_learning_rate_can_end_above_zero():
    cfg = utils.speedrun_recipe("tier95")  # airbench95's triangle: 0.2x, 1x at 23% of the steps, 0.07x at the end
    factors = [utils.speedrun_lr_factor(cfg, s, 100) for s in range(101)]
    assert factors[0] == pytest.approx(0.2) and factors[23] == pytest.approx(1) and factors[100] == pytest.approx(0.07)
    assert all(a > b for a, b in zip(factors[23:], factors[24:]))  # falling all the way down
    with pytest.raises(ValueError, match="lr_end"):
        utils.SpeedRunConfig(lr_end=1.5)


def test_named_recipes_and_recorded_recipes_compare_with_the_fields_added_since():
    assert utils.SPEEDRUN_RECIPES["tier94_sgd"] == utils.SpeedRunConfig()  # the first lap's, unchanged
    first_lap = json.loads((ROOT / "checkpoints" / "speedrun_runs.json").read_text())["recipe"]
    assert "widths" not in first_lap and utils.same_recipe(first_lap, utils.speedrun_recipe("tier94_sgd"))
    assert not utils.same_recipe(first_lap, utils.speedrun_recipe("tier94_muon"))
    assert not utils.same_recipe({**first_lap, "widths": [128, 384, 384]}, utils.speedrun_recipe("tier94_sgd"))
    assert not utils.same_recipe({**first_lap, "mixup": True}, utils.SpeedRunConfig())  # a field unknown here
    muon = utils.speedrun_recipe("tier94_muon", seed=3)
    assert muon.seed == 3 and muon.muon and not muon.residual and muon.epochs == 8
    assert utils.SPEEDRUN_RECIPES["tier94_muon"].seed == 0  # the named recipe itself is not changed
    with pytest.raises(ValueError, match="unknown speed-run recipe 'tier96'; the recipes are tier94_sgd"):
        utils.speedrun_recipe("tier96")
    with pytest.raises(ValueError, match="widths must be three channel counts"):
        utils.SpeedRunConfig(widths=(64, 256))


def test_a_batch_larger_than_the_training_set_is_refused_before_any_step():
    x, y = make_fake_arrays(100)[:2]
    with pytest.raises(ValueError, match="batch of 2000 images needs at least that many training images; got 100"):
        utils.speedrun(utils.speedrun_recipe("tier94_muon"), x, y, log=None)


def test_widths_are_recorded_in_the_release_file_and_rebuilt_by_loaded_model(tmp_path):
    x, y = make_fake_arrays(256)[:2]
    cfg = utils.SpeedRunConfig(epochs=1, batch_size=64, widths=(16, 32, 48), precision="fp32")
    result = utils.speedrun(cfg, x, y, log=None)
    assert result["model"].linear.in_features == 48
    path = utils.save_checkpoint(utils.speedrun_checkpoint(cfg, result), tmp_path / "narrow.pth")
    assert torch.load(path, weights_only=True)["arch_options"] == {"residual": True, "widths": [16, 32, 48]}
    loaded = utils.Loaded_model(path, precision="fp32")
    expected = utils.tta_probabilities(result["model"].eval(), utils.speedrun_inputs(x[:8], y[:8])[0], cfg.tta)
    np.testing.assert_allclose(loaded.predict_proba(x[:8]), expected.numpy(), atol=1e-5)
    default = utils.speedrun_checkpoint(utils.SpeedRunConfig(), dict(result, model=utils.build_model("speedrun")))
    assert default["arch_options"] == {"residual": True}  # the first lap's files, as they were written


def test_tricks_switch_off_one_at_a_time():
    cfg = utils.SpeedRunConfig()
    for trick in utils.SPEEDRUN_TRICKS:
        changed = {k for k, v in asdict(utils.without_trick(cfg, trick)).items() if v != asdict(cfg)[k]}
        assert changed == {trick}
    with pytest.raises(ValueError, match="unknown trick"):
        utils.without_trick(cfg, "mixup")
    with pytest.raises(ValueError, match="tta must be one of"):
        utils.SpeedRunConfig(tta="five_crop")


def test_test_time_views_average_mirrors_and_shifts():
    torch.manual_seed(0)
    net = utils.build_model("speedrun").eval()
    x = torch.randn(4, 3, 32, 32)
    p = lambda v: net(v).softmax(1)
    assert torch.allclose(utils.tta_probabilities(net, x, "flip"), (p(x) + p(x.flip(3))) / 2, atol=1e-6)
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    shifted = [padded[:, :, :-2, :-2], padded[:, :, 2:, 2:]]
    expected = (p(x) + p(x.flip(3))) / 4 + sum(p(v) + p(v.flip(3)) for v in shifted) / 8
    assert torch.allclose(utils.tta_probabilities(net, x, "flip_translate"), expected, atol=1e-6)


def test_release_payload_loads_with_loaded_model_and_keeps_its_views(tiny_runs, tmp_path):
    cfg, result = tiny_runs[1]["full"]
    path = utils.save_checkpoint(utils.speedrun_checkpoint(cfg, result), tmp_path / "speedrun.pth")
    loaded = utils.Loaded_model(path, precision="fp32")
    assert loaded.arch == "speedrun" and loaded.tta == "flip_translate"
    x = make_fake_arrays(8)[0]
    normalized = utils.Preprocess(std=utils.TRUE_STD)(utils.images_to_tensor(x))
    expected = utils.tta_probabilities(result["model"].float().eval(), normalized, "flip_translate")
    np.testing.assert_allclose(loaded.predict_proba(x), expected.numpy(), atol=1e-5)
    assert not np.allclose(loaded.predict_proba(x, tta="none"), expected.numpy(), atol=1e-5)
    x, y = make_fake_arrays(200)[:2]  # the bench's scores are the release's scores
    assert utils.speedrun_scores(result, x, y, "flip_translate") == (loaded.score(x, y, tta="none"), loaded.score(x, y))
    assert utils.speedrun_scores(result, x, y, "none") == (loaded.score(x, y, tta="none"),) * 2
    with pytest.raises(ValueError, match="tta must be one of"):
        utils.Loaded_model(path, tta="sideways")


def run_bench(tmp_path, *args):
    return subprocess.run([sys.executable, str(ROOT / "bench" / "speedrun.py"), "--data", str(tmp_path / "data"),
                           "--epochs", "1", *args], capture_output=True, text=True, cwd=ROOT)


def test_bench_writes_and_continues_its_results_file(tmp_path):
    write_npy(tmp_path / "data", make_fake_arrays(1100, 200))
    out = tmp_path / "runs.json"
    first = run_bench(tmp_path, "--runs", "1", "--json", str(out))
    assert first.returncode == 0, first.stderr
    results = json.loads(out.read_text())
    assert {"peak_bf16_gflops", "runs", "mean_acc", "std_acc", "reported"} <= set(results)
    assert results["reported"] == "test_acc_tta"
    run = results["runs"][0]
    assert run["seed"] == 0 and 0 <= run["test_acc"] <= 1 and 0 <= run["test_acc_tta"] <= 1
    assert run["seconds_at_800"] == pytest.approx(run["seconds"] * run["peak_gflops"] / 800)
    saved = tmp_path / "seed0.pth"
    saved.write_bytes(b"seed 0's model")  # seed 0 does not run again, so its --save file is not touched
    second = run_bench(tmp_path, "--runs", "2", "--json", str(out), "--save", str(saved))
    assert second.returncode == 0, second.stderr
    assert saved.read_bytes() == b"seed 0's model"
    assert "seed 0:" not in second.stdout and "seed 1:" in second.stdout  # seed 0 kept, not rerun
    results = json.loads(out.read_text())
    assert [r["seed"] for r in results["runs"]] == [0, 1] and results["runs"][0] == run
    assert results["mean_acc"] == pytest.approx(np.mean([r["test_acc_tta"] for r in results["runs"]]))
    other = run_bench(tmp_path, "--runs", "1", "--json", str(out), "--epochs", "2")
    assert other.returncode != 0 and "another recipe" in other.stderr
    assert json.loads(out.read_text()) == results  # untouched


def test_bench_times_its_score_in_the_run_precision_and_scores_the_release_in_fp32(tmp_path):
    x, y, x_test, y_test = make_fake_arrays(1100, 200)
    write_npy(tmp_path / "data", (x, y, x_test, y_test))
    out, saved = tmp_path / "runs.json", tmp_path / "seed0.pth"
    first = run_bench(tmp_path, "--runs", "1", "--json", str(out), "--save", str(saved))
    assert first.returncode == 0, first.stderr
    run = json.loads(out.read_text())["runs"][0]
    assert run["score_precision"] == run["precision"] == utils.resolve_precision("cpu", "auto")
    release = utils.Loaded_model(saved, precision="fp32")
    assert run["release_test_acc_tta"] == release.score(x_test, y_test)
    assert run["release_test_acc"] == release.score(x_test, y_test, tta="none")
    results = json.loads(out.read_text())
    results["runs"][0]["score_precision"] = "fp32" if run["precision"] == "bf16" else "bf16"
    out.write_text(json.dumps(results))
    mixed = run_bench(tmp_path, "--runs", "2", "--json", str(out))  # one protocol is scored in one precision
    assert mixed.returncode == 2 and "scored in" in mixed.stderr
    assert json.loads(out.read_text()) == results  # untouched


def test_bench_runs_a_named_recipe_and_records_its_name(tmp_path):
    write_npy(tmp_path / "data", make_fake_arrays(2100, 100))
    out = tmp_path / "runs94.json"
    run = run_bench(tmp_path, "--recipe", "tier94_muon", "--runs", "1", "--json", str(out))
    assert run.returncode == 0, run.stderr
    results = json.loads(out.read_text())
    assert results["recipe_name"] == "tier94_muon"
    assert utils.same_recipe(results["recipe"], utils.speedrun_recipe("tier94_muon", epochs=1))
    other = run_bench(tmp_path, "--runs", "1", "--json", str(out))  # the default recipe is another one
    assert other.returncode != 0 and "another recipe" in other.stderr


def test_bench_refuses_bad_arguments_before_any_work(tmp_path):
    write_npy(tmp_path / "data", make_fake_arrays(100, 20))
    existing = tmp_path / "speedrun.pth"
    existing.write_bytes(b"keep me")
    refused = run_bench(tmp_path, "--save", str(existing))
    assert refused.returncode == 2 and "exists" in refused.stderr and existing.read_bytes() == b"keep me"
    assert run_bench(tmp_path, "--runs", "0").returncode == 2


@pytest.mark.parametrize("release", release_table.speedrun_releases())
def test_release_scores_the_readme_figures(release, real_cifar10):
    from test_release import readme_speedrun_figures
    _, _, x_test, y_test = real_cifar10
    single, views = readme_speedrun_figures(release)
    model = utils.Loaded_model(ROOT / release, precision="fp32")
    assert model.arch == "speedrun" and model.tta == "flip_translate"  # the recipe's views by default
    assert abs(model.score(x_test, y_test) * 100 - views) <= 0.05
    assert abs(model.score(x_test, y_test, tta="none") * 100 - single) <= 0.05


def test_ablation_scores_the_tta_row_from_the_full_run_and_keeps_finished_rows(tmp_path):
    write_npy(tmp_path / "data", make_fake_arrays(5600, 10))  # 5,000 validation images, 600 trained on
    out = tmp_path / "ablation.json"
    command = [sys.executable, str(ROOT / "bench" / "speedrun_ablation.py"), "--data", str(tmp_path / "data"),
               "--epochs", "1", "--limit", "600", "--json", str(out), "--tricks", "tta"]
    first = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert first.returncode == 0, first.stderr
    rows = {row["trick"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"full", "tta"}  # the full run first, then its single view is the tta row
    full, tta = rows["full"], rows["tta"]
    assert tta["val_acc_tta"] == tta["val_acc"] == full["val_acc"] and tta["seconds"] == full["seconds"]
    assert utils.same_recipe(tta["config"], utils.without_trick(utils.SpeedRunConfig(epochs=1), "tta"))
    written = out.read_text()
    second = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert second.returncode == 0 and "---" not in second.stdout and second.stdout.count("kept") == 2
    assert out.read_text() == written


# ---- Muon (tier 94's optimizer for the convolution filters) --------------------------------------------------

def test_newton_schulz_orthogonalizes_wide_and_tall_matrices():
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(144, 16))
    v, _ = torch.linalg.qr(torch.randn(16, 16))
    wide = v @ torch.diag(torch.logspace(-1, 1, 16)) @ u.T  # singular values 0.1 to 10: a spread of 100
    for grad in (wide, wide.T):
        ortho = utils.newton_schulz(grad)
        singular = torch.linalg.svdvals(ortho)
        assert ortho.shape == grad.shape
        assert 0.5 < singular.min() and singular.max() < 1.3  # every direction moves about as far
        exact = torch.linalg.svd(grad, full_matrices=False)
        polar = exact.U @ exact.Vh  # the exact nearest semi-orthogonal matrix
        assert torch.nn.functional.cosine_similarity(ortho.flatten(), polar.flatten(), dim=0) > 0.95


def test_muon_steps_filters_by_an_orthogonalized_update_and_sgd_the_rest():
    net = utils.build_model("speedrun")
    cfg = utils.SpeedRunConfig(muon=True, muon_momentum=0.0)
    opt = utils.speedrun_optimizer(net, cfg)
    conv = net.layer2.conv2.weight
    muon_params = {id(p) for group in opt.optimizers[1].param_groups for p in group["params"]}
    sgd_params = {id(p) for group in opt.optimizers[0].param_groups for p in group["params"]}
    assert id(conv) in muon_params and id(net.linear.weight) in sgd_params and not muon_params & sgd_params
    assert {id(p) for p in net.parameters()} == muon_params | sgd_params
    before = conv.detach().clone()
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    conv.grad *= torch.logspace(-1, 1, len(conv)).view(-1, 1, 1, 1)  # rows of very different sizes
    assert (lambda sv: sv.max() / sv.min())(torch.linalg.svdvals(conv.grad.reshape(len(conv), -1))) > 20
    opt.step()
    rescaled = before * len(before) ** 0.5 / before.norm()
    update = (rescaled - conv.detach()).reshape(len(conv), -1) / cfg.muon_lr
    singular = torch.linalg.svdvals(update)
    assert singular.max() / singular.min() < 2.5  # orthogonalized: the gradient's spread is gone
    sgd_only = utils.speedrun_optimizer(utils.build_model("speedrun"), utils.SpeedRunConfig())
    assert isinstance(sgd_only, torch.optim.SGD)  # the switch off: today's recipe, one SGD


def test_whiten_bias_decay_gives_that_bias_the_bn_biases_lr_falling_to_zero():
    net = utils.build_model("speedrun")
    cfg = utils.SpeedRunConfig(muon=True, whiten_bias_decay=True, whiten_bias_epochs=3)
    groups = utils.speedrun_optimizer(net, cfg).param_groups
    (whiten,) = [g for g in groups if g.get("whiten_bias")]
    assert [id(p) for p in whiten["params"]] == [id(net.whiten.bias)]
    assert all(id(p) != id(net.whiten.bias) for g in groups if g is not whiten for p in g["params"])
    assert whiten["base_lr"] == groups[0]["base_lr"] == groups[1]["base_lr"] * cfg.bias_lr_scale
    assert whiten["weight_decay"] == groups[0]["weight_decay"]  # the same decay per image as every group
    assert [utils.whiten_bias_lr_factor(cfg, step, 10) for step in (0, 15, 30, 40)] == [1.0, 0.5, 0.0, 0.0]
    off = utils.speedrun_optimizer(net, utils.SpeedRunConfig(muon=True)).param_groups
    assert not any(g.get("whiten_bias") for g in off)  # off: the bias in the base-lr group, as before


def test_whiten_bias_decay_moves_the_whitening_bias_further_in_a_run():
    x, y, _, _ = make_fake_arrays(256)
    moved = {}
    for decay in (False, True):
        cfg = utils.SpeedRunConfig(epochs=2, batch_size=64, whiten_bias_epochs=1, muon=True, precision="fp32",
                                   whiten_bias_decay=decay, lookahead=False)
        torch.manual_seed(cfg.seed)  # the run's own initialization, which it starts from
        start = utils.build_model("speedrun").whiten.bias.detach()
        end = utils.speedrun(cfg, x, y, log=None)["model"].whiten.bias.detach()
        moved[decay] = (end - start).abs().max().item()
    assert moved[True] > 5 * moved[False] > 0  # 36x the lr for its one epoch, even falling to zero


def test_speedrun_with_muon_trains(tmp_path):
    x, y, _, _ = make_fake_arrays(256)
    cfg = utils.SpeedRunConfig(epochs=2, batch_size=64, whiten_bias_epochs=1, muon=True, precision="fp32")
    result = utils.speedrun(cfg, x, y, log=None)
    losses = result["history"]["train_loss"]
    assert all(np.isfinite(losses)) and losses[1] < losses[0]



def test_micro_batches_sum_the_batch_gradient_with_their_own_batch_statistics():
    x, y, _, _ = make_fake_arrays(256)
    cfg = utils.SpeedRunConfig(epochs=1, batch_size=128, whiten_bias_epochs=1, precision="fp32", lookahead=False)
    whole, one_pass, passes = (utils.speedrun(utils.SpeedRunConfig(**{**asdict(cfg), "micro_batch": m}), x, y,
                                              log=None)["model"] for m in (0, 128, 32))
    for name, weight in whole.state_dict().items():  # one pass of the whole batch is the same arithmetic
        assert torch.equal(weight, one_pass.state_dict()[name]), name
    # four passes: running averages over as many images (momentum 1 - 0.6 ** (1/4) a pass), and each pass
    # normalized by its own statistics, so the weights move differently
    assert passes.layer1.bn1.momentum == pytest.approx(1 - 0.6 ** 0.25) and whole.layer1.bn1.momentum == 0.4
    assert not torch.allclose(passes.layer2.conv1.weight, whole.layer2.conv1.weight)
    with pytest.raises(ValueError, match="micro_batch must divide batch_size 128"):
        utils.SpeedRunConfig(batch_size=128, micro_batch=48)


def test_single_view_and_views_accuracies_come_from_one_pass():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10)).eval()  # views disagree
    calls = []
    net.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
    x = torch.randn(20, 3, 32, 32)
    y = net(x).argmax(1)  # the single view's own predictions: it scores 1, the views less
    calls.clear()
    single, views = utils.tta_accuracies(net, x, y, "flip_translate", batch_size=10)
    assert calls == [10] * 12  # six views of each of the two batches, the single view among them
    assert single == 1.0
    assert views == (utils.tta_probabilities(net, x, "flip_translate").argmax(1) == y).sum().item() / 20 < 1
    assert utils.tta_accuracy(net, x, y, "flip_translate") == views

# ---- the peer's own code on the CPU (bench/peer.py) ------------------------------------------------------------

sys.path.insert(0, str(ROOT / "bench"))
import peer  # noqa: E402


def torch_entry_points():
    return (torch.load, torch.cuda.Event, torch.cuda.synchronize, torch.Tensor.half, torch.nn.Module.half,
            torch.nn.Module.cuda)


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_stand_ins_compute_in_the_run_precision_and_are_undone(precision, dtype):
    before = torch_entry_points()
    with peer.cpu_stand_ins(precision):
        conv = torch.nn.Conv2d(3, 4, 3).half().cuda()  # what airbench does to its network
        assert conv.weight.dtype == torch.float32  # fp32 weights: its lookahead averages them
        assert conv(torch.rand(1, 3, 8, 8).half()).dtype == dtype
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        end.record()
        torch.cuda.synchronize()
        assert 0 <= start.elapsed_time(end) < 1000
    assert torch_entry_points() == before and torch.ones(1).half().dtype == torch.float16


def test_peer_steps_compute_with_the_updated_weights_inside_a_bf16_run():
    # the whole peer run is one autocast region: with autocast's weight cache on, every forward pass used the
    # first step's bf16 copy of each weight, and airbench94's loss stayed at 2.3
    conv, x = torch.nn.Conv2d(3, 4, 3), torch.rand(2, 3, 8, 8)
    with peer.cpu_stand_ins("bf16"):
        before = conv(x)
        with torch.no_grad():
            conv.weight.mul_(2)  # what an optimizer step does: in place
        after = conv(x)
    assert not torch.allclose(before, after)


def test_peer_whitening_is_computed_in_fp32_inside_a_bf16_run():
    # bf16 autocast rounded the patches' covariance: on CIFAR-10 its smallest eigenvalues came out negative, the
    # filters NaN, and airbench94 scored 10%
    import airbench.utils
    patches = torch.rand(500, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    fp32 = torch.nn.Conv2d(3, 24, 2, padding=0)
    airbench.utils.init_whitening_conv(fp32, patches)
    swapped = airbench.utils.init_whitening_conv
    with peer.cpu_stand_ins("bf16"), peer.whitening_in_fp32(airbench.utils):
        assert airbench.utils.init_whitening_conv is not swapped
        in_run = torch.nn.Conv2d(3, 24, 2, padding=0)
        airbench.utils.init_whitening_conv(in_run, patches)
    assert airbench.utils.init_whitening_conv is swapped
    torch.testing.assert_close(in_run.weight, fp32.weight)


def test_peer_trains_airbench_on_the_cpu_from_our_arrays(tmp_path):
    x, y, x_test, y_test = make_fake_arrays(1024, 200)
    peer.write_peer_data(tmp_path, x, y, x_test, y_test, utils.CLASSES)
    here, before = Path.cwd(), torch_entry_points()
    result = peer.run_peer("airbench94", tmp_path, "fp32", epochs=1)  # one step of 1,024 images
    assert 0 <= result["test_acc"] <= 1 and 0 <= result["test_acc_tta"] <= 1 and result["seconds"] > 0
    assert result["peer"] == "airbench94" and result["airbench_version"]
    assert Path.cwd() == here and torch_entry_points() == before
    with pytest.raises(ValueError, match="airbench94, airbench95"):
        peer.run_peer("airbench99", tmp_path, "fp32")


def test_peer_bench_refuses_what_it_cannot_do_before_any_work(tmp_path):
    write_npy(tmp_path / "data", make_fake_arrays(64))
    refused = run_bench(tmp_path, "--peer", "airbench94", "--save", str(tmp_path / "x.pth"))
    assert refused.returncode == 2 and "--peer runs on the CPU, without --save" in refused.stderr


def test_peaks_skip_emulated_bf16_unless_the_run_trains_in_it(monkeypatch):
    """Timing bf16 matmuls on a CPU without bf16 instructions took minutes per bench start (AMD EPYC family 25)."""
    import speedrun as bench
    monkeypatch.setattr(bench, "matmul_gflops", lambda kind, device="cpu": {"fp32": 175.0, "bf16": 9.0}[kind])
    monkeypatch.setattr(utils, "cpu_has_native_bf16", lambda: False)
    assert bench.measured_peaks() == {"fp32": 175.0}
    assert bench.measured_peaks(also=["bf16"]) == {"bf16": 9.0, "fp32": 175.0}  # forced: measured all the same
    monkeypatch.setattr(utils, "cpu_has_native_bf16", lambda: True)
    assert set(bench.measured_peaks()) == {"bf16", "fp32"}
    assert bench.describe_peaks({"bf16": 411.2, "fp32": 175.0}) == "411 GFLOP/s bf16, 175 GFLOP/s fp32"


def test_throughput_profile_finds_the_convolutions_and_accounts_for_the_whole_step():
    """bench/train_throughput.py --profile: the categories are the step's operators, not empty matches."""
    import train_throughput
    x, y = make_fake_arrays(128)[:2]
    batches = utils.BatchLoader(x, y, 32, augment=True, shuffle=True)
    model = train_throughput.fresh_model("resnet20", "cpu", True)
    shares = train_throughput.step_profile(model, batches, train_throughput.sgd_step("cpu", "fp32"), 1, steps=2)
    assert set(shares) == {"convolutions", "batch norm", "ReLU", "additions", "other"}
    assert sum(shares.values()) == pytest.approx(1)
    # each category matched operators of the step (which is largest is a timing, the bench's to measure: under
    # load batch norm's share once came out above the convolutions')
    assert all(shares[kind] > 0 for kind in ("convolutions", "batch norm", "ReLU", "additions"))


def test_throughput_refuses_passes_that_do_not_divide_the_batch_before_any_work(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "train_throughput.py"), "--passes", "2000", "300",
                          "--data", str(tmp_path / "nothing here")], capture_output=True, text=True)
    assert run.returncode == 2 and "must divide the speed run's batch of 2,000 images" in run.stderr
