"""Model registry: shapes, norms, heads, frozen BatchNorm statistics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from samtune.models.heads import freeze_batchnorm_stats, head_parameter_names, replace_head
from samtune.models.zoo import MODELS, build_model

SMALL = ["mlp", "cnn", "resnet20", "resnet18", "wrn16_8"]


@pytest.mark.parametrize("name", ["mlp", "cnn", "cnn_small", "resnet20"])
@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_models_map_digits_and_cifar_shapes_to_logits(name, norm):
    for shape in [(1, 8, 8), (3, 32, 32)]:
        model = build_model(name, 7, shape, norm=norm)
        out = model(torch.randn(4, *shape))
        assert out.shape == (4, 7)
        kinds = {type(m) for m in model.modules()}
        assert (nn.BatchNorm2d in kinds or nn.BatchNorm1d in kinds) == (norm == "batch")
        assert (nn.GroupNorm in kinds) == (norm == "group")


@pytest.mark.parametrize(
    "name,params",
    [
        ("cnn", 94762),
        ("cnn_small", 24346),
        ("resnet20", 0.27e6),
        ("resnet32", 0.46e6),
        ("resnet56", 0.85e6),
        ("resnet18", 11.2e6),
        ("wrn16_8", 11.0e6),
        ("wrn28_10", 36.5e6),
    ],
)
def test_reference_architectures_have_their_published_size(name, params):
    model = build_model(name, 10, (3, 32, 32))
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - params) / params < 0.03, count


def test_wide_and_deep_models_run_on_cifar_shape():
    for name in ["resnet18", "wrn16_8"]:
        assert build_model(name, 10, (3, 32, 32), "group")(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_torchvision_backbone_gets_a_new_head_and_norm_option():
    model = build_model("torchvision:resnet18", 5, (3, 32, 32))
    assert model.fc.out_features == 5
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    assert head_parameter_names(model) == {"fc.weight", "fc.bias"}
    gn = build_model("torchvision:resnet18", 5, (3, 32, 32), norm="group")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gn.modules())
    with pytest.raises(ValueError, match="3-channel"):
        build_model("torchvision:resnet18", 5, (1, 8, 8))
    with pytest.raises(ValueError, match="unknown torchvision model"):
        build_model("torchvision:nonexistent_net", 5, (3, 32, 32))


def test_replace_head_keeps_backbone_and_changes_output_size():
    model = build_model("cnn", 10, (1, 8, 8))
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head.")}
    replace_head(model, 3)
    assert model.head.out_features == 3
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_frozen_batchnorm_stats_survive_train_mode():
    model = build_model("cnn", 10, (1, 8, 8))
    freeze_batchnorm_stats(model)
    model.train()
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    x = torch.randn(8, 1, 8, 8)
    out = model(x)
    out.sum().backward()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in stats.items())
    # Train mode now computes what eval mode does, per example: no batch coupling.
    torch.testing.assert_close(model(x[:1]), model.eval()(x)[:1])
    assert any(p.grad is not None for n, p in model.named_parameters() if n.endswith(".weight") and p.dim() == 1)


def test_unknown_names_are_value_errors():
    with pytest.raises(ValueError, match="unknown model 'vgg99'"):
        build_model("vgg99", 10, (3, 32, 32))
    with pytest.raises(ValueError, match="unknown norm 'layer'"):
        build_model("cnn", 10, (3, 32, 32), norm="layer")
    assert set(SMALL) <= set(MODELS)


def test_param_groups_split_head_and_backbone_learning_rates():
    from samtune.models.heads import param_groups

    model = build_model("resnet20", 10, (3, 32, 32))
    everything = {id(p) for p in model.parameters()}
    (one,) = param_groups(model, 0.1)
    assert {id(p) for p in one["params"]} == everything and one["lr"] == 0.1
    head, body = param_groups(model, 0.1, backbone_lr_scale=0.25)
    assert {id(p) for p in head["params"]} == {id(model.head.weight), id(model.head.bias)}
    assert {id(p) for p in body["params"]} == everything - {id(p) for p in head["params"]}
    assert body["lr"] == pytest.approx(0.025)
    (probe,) = param_groups(model, 0.1, backbone_lr_scale=0.0)  # a linear probe: backbone left out
    assert len(probe["params"]) == 2
    with pytest.raises(ValueError, match="backbone_lr_scale must be >= 0"):
        param_groups(model, 0.1, backbone_lr_scale=-1.0)


def test_frozen_batchnorm_covers_the_mlp_too():
    model = freeze_batchnorm_stats(build_model("mlp", 10, (1, 8, 8))).train()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model(torch.randn(16, 1, 8, 8))
    assert before and all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
