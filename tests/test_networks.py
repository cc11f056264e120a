"""Tests for ld3m.networks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ld3m.networks import (
    NETWORK_NAMES,
    VGG11,
    AlexNet,
    ConvNet,
    ResNet18,
    get_network,
    has_batchnorm,
    reset_parameters,
)


def _conv_depth(net: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d) for m in net.modules())


@pytest.mark.parametrize("name", NETWORK_NAMES)
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_every_network_gives_logits(name: str, shape: tuple[int, int, int]) -> None:
    c, h, w = shape
    if name == "ConvNetD6":
        # Six 2x poolings collapse a 32 px map to 0x0: a clear error is expected.
        with pytest.raises(ValueError, match="collapses"):
            get_network(name, c, 10, h)
        net, h, w = get_network(name, c, 10, 64), 64, 64
    else:
        net = get_network(name, c, 10, h)
    x = torch.rand(2, c, h, w)
    logits = net(x)
    assert logits.shape == (2, 10)
    assert isinstance(net.classifier, nn.Linear)
    feats = net.embed(x)
    assert feats.shape == (2, net.classifier.in_features)
    assert torch.isfinite(logits).all()


def test_get_network_is_case_insensitive() -> None:
    assert isinstance(get_network("convnetbn", 3, 10, 32), ConvNet)
    assert isinstance(get_network("RESNET18", 3, 10, 32), ResNet18)
    assert isinstance(get_network("vgg11bn", 3, 10, 32), VGG11)
    assert isinstance(get_network("alexnet", 3, 10, 32), AlexNet)


def test_convnet_28px_feature_dim() -> None:
    net = ConvNet(1, 10, image_size=28, depth=3, width=128)
    assert net.embed(torch.rand(2, 1, 28, 28)).shape == (2, 2048)
    assert net.classifier.in_features == 128 * 4 * 4


def test_convnet_auto_depth() -> None:
    assert _conv_depth(get_network("ConvNet", 3, 10, 28)) == 3
    assert _conv_depth(get_network("ConvNet", 3, 10, 32)) == 3
    net = get_network("ConvNetW32", 3, 10, 64)
    assert _conv_depth(net) == 4
    assert net.embed(torch.rand(2, 3, 64, 64)).shape == (2, 32 * 4 * 4)
    assert _conv_depth(get_network("ConvNetW32", 3, 10, (128, 96))) == 5
    assert _conv_depth(get_network("ConvNetD2", 3, 10, 64)) == 2


def test_convnet_non_square_and_variants() -> None:
    net = ConvNet(3, 5, image_size=(32, 64), depth=3, width=16)
    assert net(torch.rand(2, 3, 32, 64)).shape == (2, 5)
    assert net.classifier.in_features == 16 * 4 * 8
    ln = get_network("ConvNetLN", 3, 10, 32)
    assert any(isinstance(m, nn.GroupNorm) and m.num_groups == 1 for m in ln.modules())
    mp = get_network("ConvNetMP", 3, 10, 32)
    assert any(isinstance(m, nn.MaxPool2d) for m in mp.modules())
    assert get_network("ConvNetNP", 3, 10, 32).classifier.in_features == 128 * 32 * 32


def test_alexnet_and_vgg_sizes() -> None:
    assert AlexNet(3, 10, image_size=64)(torch.rand(2, 3, 64, 64)).shape == (2, 10)
    assert AlexNet(1, 10, image_size=28).classifier.in_features == 192 * 4 * 4
    assert VGG11(1, 10, image_size=28, norm="none").classifier.in_features == 512
    assert VGG11(3, 10, image_size=64).classifier.in_features == 512 * 2 * 2


def test_unknown_name_raises() -> None:
    with pytest.raises(ValueError, match="unknown network 'Foo'") as err:
        get_network("Foo", 3, 10, 32)
    assert "ConvNetD1" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"norm": "weird"}, "unknown norm"),
        ({"pooling": "median"}, "unknown pooling"),
        ({"depth": 0}, "depth"),
        ({"depth": 5, "image_size": 16}, "collapses"),
    ],
)
def test_convnet_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ConvNet(3, 10, **kwargs)


def test_bad_norm_for_resnet() -> None:
    with pytest.raises(ValueError, match="unknown norm"):
        ResNet18(3, 10, norm="layernorm")


def _params(net: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in net.parameters()]


def test_reset_parameters_reproducible_and_rng_free() -> None:
    net = get_network("ConvNetBN", 3, 10, 32)
    before = _params(net)
    rng_state = torch.get_rng_state()
    out = reset_parameters(net, torch.Generator().manual_seed(7))
    assert out is net
    assert torch.equal(torch.get_rng_state(), rng_state)
    first = _params(net)
    assert any(not torch.equal(a, b) for a, b in zip(before, first, strict=True))

    reset_parameters(net, torch.Generator().manual_seed(7))
    assert all(torch.equal(a, b) for a, b in zip(first, _params(net), strict=True))

    reset_parameters(net, torch.Generator().manual_seed(8))
    conv_w = next(m for m in net.modules() if isinstance(m, nn.Conv2d)).weight
    assert not torch.equal(conv_w, first[0])


def test_reset_parameters_norms_and_running_stats() -> None:
    net = get_network("ConvNetBN", 3, 10, 32)
    net.train()
    net(torch.rand(4, 3, 32, 32) * 5 + 3)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(2.0)
                m.bias.fill_(0.5)
    reset_parameters(net, torch.Generator().manual_seed(0))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
            assert torch.all(m.running_mean == 0) and torch.all(m.running_var == 1)
            assert int(m.num_batches_tracked) == 0


def test_reset_parameters_scale_matches_pytorch_default() -> None:
    torch.manual_seed(0)
    net = ConvNet(3, 10, image_size=32, depth=2, width=64)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    default_std = [c.weight.std().item() for c in convs] + [net.classifier.weight.std().item()]
    reset_parameters(net, torch.Generator().manual_seed(1))
    new_std = [c.weight.std().item() for c in convs] + [net.classifier.weight.std().item()]
    for d, n in zip(default_std, new_std, strict=True):
        assert abs(n - d) / d < 0.2
    for layer in [*convs, net.classifier]:
        fan_in = layer.weight[0].numel()
        assert layer.bias.abs().max().item() <= fan_in**-0.5 + 1e-7


def test_has_batchnorm() -> None:
    assert has_batchnorm(get_network("ConvNetBN", 3, 10, 32))
    assert has_batchnorm(get_network("ResNet18BN", 3, 10, 32))
    assert not has_batchnorm(get_network("ConvNet", 3, 10, 32))
    assert not has_batchnorm(get_network("ResNet18", 3, 10, 32))
