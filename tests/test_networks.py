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


def test_convnet_is_depth_3_at_every_size() -> None:
    """The authors' ``ConvNet`` is depth 3 whatever the image size; the deeper ones are named."""
    for size in (28, 32, 64, 128):
        assert _conv_depth(get_network("ConvNet", 3, 10, size)) == 3
    net = get_network("ConvNetW32", 3, 10, 64)
    assert _conv_depth(net) == 3
    assert net.embed(torch.rand(2, 3, 64, 64)).shape == (2, 32 * 8 * 8)
    assert _conv_depth(get_network("ConvNetD4", 3, 10, 64)) == 4
    assert _conv_depth(get_network("ConvNetD5", 3, 10, 128)) == 5
    assert _conv_depth(get_network("ConvNetD2", 3, 10, 64)) == 2


@pytest.mark.parametrize("name", ["ConvNet", "VGG11"])
def test_first_conv_pads_by_3_for_one_channel(name: str) -> None:
    """3 when the input has one channel, whatever its size (so 1x32x32 too), 1 otherwise."""
    def first(net):
        return next(m for m in net.modules() if isinstance(m, nn.Conv2d))

    assert first(get_network(name, 1, 10, 28)).padding == (3, 3)
    assert first(get_network(name, 1, 10, 32)).padding == (3, 3)
    assert first(get_network(name, 3, 10, 32)).padding == (1, 1)
    assert first(get_network(name, 3, 10, 64)).padding == (1, 1)


def test_alexnet_first_conv_padding() -> None:
    assert get_network("AlexNet", 1, 10, 28).features[0].padding == (4, 4)
    assert get_network("AlexNet", 3, 10, 32).features[0].padding == (2, 2)
    assert get_network("AlexNetBN", 3, 10, 32).features[0].padding == (2, 2)
    assert get_network("AlexNet", 3, 10, 32).classifier.in_features == 192 * 4 * 4


def test_convnet_layernorm_is_per_element() -> None:
    ln = get_network("ConvNetLN", 3, 10, 32)
    norms = [m for m in ln.modules() if isinstance(m, nn.LayerNorm)]
    assert [tuple(m.normalized_shape) for m in norms] == [(128, 32, 32), (128, 16, 16),
                                                          (128, 8, 8)]
    assert norms[0].weight.shape == (128, 32, 32)
    grey = [m for m in get_network("ConvNetLN", 1, 10, 28).modules() if isinstance(m, nn.LayerNorm)]
    assert tuple(grey[0].normalized_shape) == (128, 32, 32)  # padded 28 -> 32
    gn = [m for m in get_network("ConvNetGN", 3, 10, 32).modules() if isinstance(m, nn.GroupNorm)]
    assert gn and all(m.num_groups == 4 for m in gn)


def test_the_authors_other_networks() -> None:
    """The networks of the authors' get_network that cross-architecture tables use."""
    lenet = get_network("LeNet", 1, 10, 28)
    assert lenet.features[0].padding == (2, 2) and lenet.hidden[0].in_features == 16 * 5 * 5
    assert get_network("LeNet", 3, 10, 32).features[0].padding == (0, 0)
    mlp = get_network("MLP", 1, 10, 28)
    assert [m.out_features for m in mlp.modules() if isinstance(m, nn.Linear)] == [128, 128, 10]
    ap = get_network("ResNet18BN_AP", 3, 10, 32)
    assert ap.classifier.in_features == 512 * 4 * 4 and has_batchnorm(ap)
    assert get_network("ResNet18BN_AP", 1, 10, 28).classifier.in_features == 512 * 3 * 3
    assert not any(isinstance(m, nn.Conv2d) and m.stride != (1, 1) for m in ap.modules())
    acts = {"ConvNetAS": nn.Sigmoid, "ConvNetAL": nn.LeakyReLU, "ConvNetAR": nn.ReLU}
    for name, kind in acts.items():
        assert any(isinstance(m, kind) for m in get_network(name, 3, 10, 32).modules())
    assert any(isinstance(m, nn.AvgPool2d) for m in get_network("ConvNetAP", 3, 10, 32).modules())


def test_convnet_non_square_and_variants() -> None:
    net = ConvNet(3, 5, image_size=(32, 64), depth=3, width=16)
    assert net(torch.rand(2, 3, 32, 64)).shape == (2, 5)
    assert net.classifier.in_features == 16 * 4 * 8
    mp = get_network("ConvNetMP", 3, 10, 32)
    assert any(isinstance(m, nn.MaxPool2d) for m in mp.modules())
    assert get_network("ConvNetNP", 3, 10, 32).classifier.in_features == 128 * 32 * 32


def test_alexnet_and_vgg_sizes() -> None:
    assert AlexNet(3, 10, image_size=64)(torch.rand(2, 3, 64, 64)).shape == (2, 10)
    assert AlexNet(1, 10, image_size=28).classifier.in_features == 192 * 4 * 4
    assert VGG11(1, 10, image_size=28, norm="none").classifier.in_features == 512
    assert VGG11(1, 10, image_size=32, norm="none").classifier.in_features == 512  # 36 px
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
