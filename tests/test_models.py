"""The model zoo: exact parameter counts, forward shapes, names and MACs."""
import pytest
import torch

import utils

EXPECTED_PARAMS = {
    ("resnet18", ""): 11_173_962, ("resnet18_imagenet", ""): 11_181_642,
    ("resnet20", "A"): 269_722, ("resnet32", "A"): 464_154, ("resnet44", "A"): 658_586,
    ("resnet56", "A"): 853_018, ("resnet110", "A"): 1_727_962, ("resnet20", "B"): 272_474,
    ("preact_resnet164", ""): 1_703_258, ("preact_resnet18", ""): 11_172_170,
    ("plain20", ""): 269_722, ("plain56", ""): 853_018,  # the same weights as option A ResNets, no shortcuts
}


@pytest.mark.parametrize("name,shortcut", list(EXPECTED_PARAMS))
def test_exact_parameter_counts(name, shortcut):
    model = utils.build_model(name, **({"shortcut": shortcut} if shortcut else {}))
    assert utils.count_parameters(model) == EXPECTED_PARAMS[(name, shortcut)]


@pytest.mark.parametrize("name", utils.list_models())
def test_forward_shape(name):
    size = utils.input_size(name)
    model = utils.build_model(name, num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, size, size)).shape == (2, 7)


def test_default_shortcut_is_paper_option_a():
    assert utils.count_parameters(utils.build_model("resnet20")) == 269_722


def test_any_valid_depth_and_bad_names():
    assert len(utils.build_model("preact_resnet29").layer1) == 3
    assert len(utils.build_model("resnet8").layer3) == 1
    with pytest.raises(ValueError) as e:
        utils.build_model("resnet21")
    assert "resnet18" in str(e.value) and "preact_resnet164" in str(e.value)
    with pytest.raises(ValueError, match="shortcut"):
        utils.build_model("resnet20", shortcut="C")
    with pytest.raises(TypeError, match="unknown options"):
        utils.build_model("resnet20", width=2)


def test_plain_nets_are_resnets_without_the_addition():
    torch.manual_seed(0)
    plain = utils.build_model("plain20").eval()
    residual = utils.build_model("resnet20").eval()
    residual.load_state_dict(plain.state_dict())  # same parameters, same names
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(plain(x), residual(x))
        block_in = torch.randn(1, 16, 8, 8)
        block = plain.layer1[0]
        out = torch.relu(block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(block_in))))))
        assert torch.equal(block(block_in), out)  # F(x) alone: no + shortcut(x)
    with pytest.raises(ValueError, match="no shortcuts"):
        utils.build_model("plain20", shortcut="B")


def test_reference_state_dict_names():
    keys = utils.build_model("resnet18").state_dict().keys()
    for key in ("conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer4.1.bn2.weight",
                "layer2.0.shortcut.0.weight", "layer2.0.shortcut.1.weight", "linear.weight", "linear.bias"):
        assert key in keys
    assert not any("shortcut" in k for k in utils.build_model("resnet20").state_dict())  # option A has no weights


def test_macs_match_published_figures():
    assert abs(utils.count_macs(utils.build_model("resnet20")) / 41e6 - 1) < 0.02
    assert abs(utils.count_macs(utils.build_model("resnet18")) / 0.56e9 - 1) < 0.02
    assert abs(utils.count_macs(utils.build_model("resnet18_imagenet"), 224) / 1.82e9 - 1) < 0.02
