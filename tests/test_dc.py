"""Tests for DC (gradient matching) and DSA (DC with Siamese augmentation)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml
from helpers import cpu_trainer
from ld3m.datamodules import FashionMNIST
from ld3m.modules import DC, DSA
from ld3m.modules import dc as dc_module
from ld3m.modules.dc import default_loops, gradient_distance, per_class_gradients
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from ld3m.augment import DEFAULT_STRATEGY
from ld3m.cli import main
from ld3m.evaluation import dc_augment_for
from ld3m.networks import get_network, reset_parameters
from ld3m.synthetic import SyntheticSet

SMALL_NET = "ConvNetW32"  # ConvNet-3 with 32 channels
TINY = (3, 16, 16)  # images for the tests that need no real data: cheap, and padding 1 everywhere


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(cls=DC, **kwargs) -> DC:
    args = {"ipc": 2, "network": SMALL_NET, "num_classes": 3, "image_shape": TINY}
    return cls(**{**args, **kwargs})




def _grads(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for shape in ((4, 3, 3, 3), (4,), (5, 4), (5,))]


# ------------------------------------------------------------------------------ the distance
def test_distance_of_identical_gradients_is_zero() -> None:
    grads = _grads()
    assert gradient_distance(grads, [g.clone() for g in grads]).item() == pytest.approx(0, abs=1e-5)
    # and it is not zero otherwise: opposite gradients are 2 per output row (4 + 5 rows)
    opposite = gradient_distance(grads, [-g for g in grads]).item()
    assert opposite == pytest.approx(2 * (4 + 5), rel=1e-5)
    assert gradient_distance(grads, _grads(1)).item() > 1


def test_distance_ignores_one_dimensional_tensors() -> None:
    real, syn = _grads(0), _grads(1)
    before = gradient_distance(real, syn)
    syn[1] = syn[1] * -7 + 3  # a bias gradient
    syn[3] = torch.zeros(5)
    assert torch.equal(gradient_distance(real, syn), before)
    syn[2] = syn[2] + 1  # a weight gradient does count
    assert not torch.equal(gradient_distance(real, syn), before)


def test_distance_by_hand() -> None:
    a = torch.tensor([[1.0, 2.0, 2.0], [3.0, 0.0, 4.0]])
    b = torch.tensor([[2.0, 1.0, 2.0], [0.0, 5.0, 0.0]])
    # row 0: a.b = 8, |a| = |b| = 3 -> 1 - 8/9; row 1: a.b = 0 -> 1
    expected = (1 - 8 / (9 + 1e-6)) + (1 - 0 / (15 + 1e-6))
    assert gradient_distance([a], [b]).item() == pytest.approx(expected, rel=1e-6)
    assert gradient_distance([a], [b]).item() == pytest.approx(10 / 9, rel=1e-5)
    # with a leading pair dimension, the pairs' distances add up
    pairs = gradient_distance([torch.stack([a, a])], [torch.stack([b, a])], batch_dims=1)
    assert pairs.item() == pytest.approx(expected + gradient_distance([a], [a]).item(), rel=1e-6)
    assert gradient_distance([torch.stack([a, b])], [torch.stack([b, a])], batch_dims=1).item() == \
        pytest.approx(2 * expected, rel=1e-6)


def test_distance_rejects_mismatched_gradients() -> None:
    with pytest.raises(ValueError, match="shapes differ"):
        gradient_distance([torch.zeros(2, 3)], [torch.zeros(3, 2)])
    with pytest.raises(ValueError, match="1 real gradients but 2"):
        gradient_distance([torch.zeros(2, 3)], [torch.zeros(2, 3)] * 2)


# ------------------------------------------------------------------------------ per-class gradients
@pytest.mark.parametrize("network", [SMALL_NET, "ConvNetBN"])
def test_vectorised_per_class_gradients_equal_the_loop(network: str) -> None:
    g = torch.Generator().manual_seed(0)
    net = reset_parameters(get_network(network, 3, 3, TINY[1:]), g).eval()
    real = torch.randn(3, 5, *TINY, generator=g)
    syn = torch.randn(3, 2, *TINY, generator=g, requires_grad=True)
    labels = torch.arange(3).unsqueeze(1)
    results = {}
    for vectorised in (False, True):
        real_g = per_class_gradients(net, real, labels.expand(3, 5), create_graph=False,
                                     vectorised=vectorised)
        syn_g = per_class_gradients(net, syn, labels.expand(3, 2), create_graph=True,
                                    vectorised=vectorised)
        assert not any(t.requires_grad for t in real_g) and all(t.requires_grad for t in syn_g)
        loss = gradient_distance(real_g, syn_g, batch_dims=1)
        (image_grad,) = torch.autograd.grad(loss, syn)
        results[vectorised] = (real_g, syn_g, loss, image_grad)
    shapes = [(3, *p.shape) for p in net.parameters()]
    for (looped, vectorised) in zip(results[False][:2], results[True][:2], strict=True):
        assert [tuple(t.shape) for t in looped] == shapes
        for a, b in zip(looped, vectorised, strict=True):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(results[False][2], results[True][2], rtol=1e-5, atol=1e-6)
    scale = results[False][3].abs().max().item()
    assert scale > 0
    torch.testing.assert_close(results[False][3], results[True][3], rtol=1e-3, atol=1e-4 * scale)
    # class c's gradient is the plain gradient of class c's batch
    params = list(net.parameters())
    loss_1 = torch.nn.functional.cross_entropy(net(real[1]), torch.full((5,), 1))
    plain = torch.autograd.grad(loss_1, params)
    for per_class, expected in zip(results[False][0], plain, strict=True):
        torch.testing.assert_close(per_class[1], expected, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in params), "the network's own .grad was touched"


# ------------------------------------------------------------------------------ construction
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"ipc": 0}, "ipc"),
        ({"init": "zeros"}, "init"),
        ({"lr_img": -1.0}, "lr_img"),
        ({"lr_net": 0.0}, "lr_net"),
        ({"lr_net": float("inf")}, "lr_net"),
        ({"outer_loop": 0}, "outer_loop"),
        ({"inner_loop": -1}, "inner_loop"),
        ({"network": "Foo"}, "unknown network 'Foo'"),
        ({"dsa": "color_bogus"}, "bogus"),
    ],
    ids=["ipc", "init", "lr_img", "lr_net0", "lr_net-inf", "outer", "inner", "network", "dsa"],
)
@pytest.mark.parametrize("cls", [DC, DSA])
def test_bad_arguments(cls, kwargs: dict, match: str) -> None:
    _model(cls)  # the valid baseline builds
    with pytest.raises(ValueError, match=match):
        _model(cls, **kwargs)
    if "network" in kwargs:  # known before the data is: fails at construction, not at fit
        with pytest.raises(ValueError, match=match):
            cls(ipc=1, **kwargs)


def test_defaults() -> None:
    """The authors' argparse defaults (main.py: ipc 1, init noise, lr_img 0.1, lr_net 0.01,
    batch_train 256, dis_metric ours) and, for DSA, their documented DSA command's."""
    dc, dsa = DC(), DSA()
    assert (dc.method_name, dc.ipc, dc.init, dc.dsa, dc.lr_img, dc.lr_net) == (
        "DC", 1, "noise", None, 0.1, 0.01)
    assert (dc.batch_train, dc.distance, dc.momentum, dc.net_momentum) == (256, "ours", 0.5, 0.0)
    assert (dsa.method_name, dsa.ipc, dsa.init, dsa.dsa.strategy) == ("DSA", 1, "real",
                                                                       DEFAULT_STRATEGY)
    assert (dc.outer_loop, dc.inner_loop) == (1, 1)  # IPC 1
    ten = DC(ipc=10)
    assert (ten.outer_loop, ten.inner_loop) == (10, 50)
    assert dict(ten.hparams)["outer_loop"] == 10 and dict(ten.hparams)["inner_loop"] == 50
    assert (DC(ipc=50, outer_loop=3).outer_loop, DC(ipc=50, outer_loop=3).inner_loop) == (3, 10)
    assert DC(ipc=1, inner_loop=0).inner_loop == 0


@pytest.mark.parametrize("ipc, loops", [(1, (1, 1)), (10, (10, 50)), (20, (20, 25)), (30, (30, 20)),
                                        (40, (40, 15)), (50, (50, 10)), (2, (1, 1)), (5, (1, 1)),
                                        (6, (10, 50)), (15, (10, 50)), (100, (50, 10))])
def test_default_loops(ipc: int, loops: tuple[int, int]) -> None:
    assert default_loops(ipc) == loops
    assert (DC(ipc=ipc).outer_loop, DC(ipc=ipc).inner_loop) == loops


def test_network_is_not_state_and_is_the_same_on_every_rank() -> None:
    def network(step: int, rank: int) -> dict[str, torch.Tensor]:
        model = _model()
        model.trainer = SimpleNamespace(global_step=step, global_rank=rank)
        return {k: v.clone() for k, v in model.new_network(step).state_dict().items()}

    base = network(4, 0)
    assert all(torch.equal(v, network(4, 1)[k]) for k, v in base.items())
    assert not all(torch.equal(v, network(5, 0)[k]) for k, v in base.items())
    model = _model()
    model.new_network(0)
    assert set(model.state_dict()) == {"images", "labels"}
    assert [p.shape for p in model.parameters()] == [model.images.shape]


# ------------------------------------------------------------------------------ the loss
@pytest.mark.parametrize("cls", [DC, DSA])
def test_gradients_reach_every_image(cls, fmnist: FashionMNIST) -> None:
    model = cls(ipc=2, network=SMALL_NET, num_classes=10, image_shape=(1, 28, 28))
    model.initialise(fmnist)
    real = fmnist.sample_per_class(4, torch.Generator().manual_seed(0))
    net = model.new_network(0)
    loss = model.matching_loss(real, net, torch.Generator().manual_seed(3))
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    grad = model.images.grad
    assert grad is not None and grad.shape == model.images.shape and torch.isfinite(grad).all()
    assert (grad.flatten(1).norm(dim=1) > 0).all(), "some synthetic image got no gradient"
    assert all(p.grad is None for p in net.parameters())


def test_batchnorm_statistics_come_from_real_images_then_freeze() -> None:
    """Without data (LD3M's helper): the first 16 images of the batch; only the BatchNorm
    layers go to eval mode, the rest of the network stays in train mode (the authors')."""
    model = _model(network="ConvNetBN")
    real = torch.randn(3, 4, *TINY, generator=torch.Generator().manual_seed(0)) + 2.0
    net = model.new_network(0)
    loss = model.matching_loss(real, net, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and net.training
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    assert int(bns[0].num_batches_tracked) == 1, "one statistics pass on real images, then frozen"
    assert bns[0].running_mean.abs().sum() > 0


def test_batchnorm_statistics_from_a_fresh_draw_of_16_per_class(fmnist) -> None:
    """With the data module: a fresh draw of 16 real images per class (not the batch's),
    the same on every rank (from the shared generator of the step)."""
    from types import SimpleNamespace

    from ld3m.modules.dc import _SALT_BN, _SALT_NETWORK, BN_IMAGES_PER_CLASS

    from ld3m.networks import get_network, reset_parameters

    model = DC(ipc=1, network="ConvNetBN", num_classes=10, image_shape=(1, 28, 28))
    model._trainer = SimpleNamespace(datamodule=fmnist, global_step=3, global_rank=1,
                                     world_size=2)
    net = model.new_network(3)
    batch = fmnist.sample_per_class(8, torch.Generator().manual_seed(9))
    model.matching_loss(batch, net, torch.Generator().manual_seed(0))
    got = [(m.running_mean.clone(), m.running_var.clone()) for m in net.modules()
           if isinstance(m, torch.nn.BatchNorm2d)]
    fresh = fmnist.sample_per_class(BN_IMAGES_PER_CLASS, model.shared_generator(3, _SALT_BN))
    expected = reset_parameters(get_network("ConvNetBN", 1, 10, 28),
                                model.shared_generator(3, _SALT_NETWORK)).train()
    with torch.no_grad():
        expected(fresh.flatten(0, 1))
    want = [(m.running_mean, m.running_var) for m in expected.modules()
            if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(got) == len(want) == 3
    for (mean, var), (mean_want, var_want) in zip(got, want, strict=True):
        torch.testing.assert_close(mean, mean_want)
        torch.testing.assert_close(var, var_want)
    model._trainer = None


def test_inner_training_is_epochs_of_minibatches_of_256() -> None:
    """One inner-loop step is an epoch over the synthetic set in shuffled batches of 256: at
    IPC 50 on 10 classes (500 images) two SGD steps (256 + 244 images) per epoch."""
    model = DC(ipc=50, network="ConvNetD1", inner_loop=3, num_classes=10, image_shape=(1, 8, 8))
    net = model.new_network(0)
    sizes = []
    net.register_forward_hook(lambda module, args, out: sizes.append(args[0].shape[0]))
    model.train_network(0)
    assert sizes == [256, 244] * 3
    seen = []
    net._forward_hooks.clear()
    net.register_forward_hook(lambda module, args, out: seen.append(args[0].detach().clone()))
    model.train_network(1)
    epoch = torch.cat(seen[:2])  # every image once per epoch, in a shuffled order
    assert torch.equal(torch.sort(epoch.flatten(1), dim=0).values,
                       torch.sort(model.images.detach().flatten(1), dim=0).values)
    assert not torch.equal(epoch, model.images.detach())


@pytest.mark.parametrize("metric", ["mse", "cos"])
def test_the_authors_other_distances(metric: str) -> None:
    """match_loss's ``mse`` and ``cos``: over all gradients as one vector, per class, summed."""
    g = torch.Generator().manual_seed(0)
    real = [torch.randn(3, 4, 2, generator=g), torch.randn(3, 4, generator=g)]
    syn = [torch.randn(3, 4, 2, generator=g), torch.randn(3, 4, generator=g)]
    got = gradient_distance(real, syn, batch_dims=1, metric=metric)
    expected = 0.0
    for c in range(3):
        a = torch.cat([real[0][c].flatten(), real[1][c].flatten()])
        b = torch.cat([syn[0][c].flatten(), syn[1][c].flatten()])
        expected += ((b - a) ** 2).sum() if metric == "mse" else (
            1 - (a * b).sum() / (a.norm() * b.norm() + 1e-6))
    assert got.item() == pytest.approx(float(expected), rel=1e-6)
    with pytest.raises(ValueError, match="distance"):
        gradient_distance(real, syn, metric="l1")


def test_nan_loss_raises_before_any_update() -> None:
    model = _model()
    real = torch.randn(3, 4, *TINY)
    labels = torch.arange(3).unsqueeze(1).expand(3, 4)
    with torch.no_grad():
        model.images.view(-1)[5] = float("nan")
    with pytest.raises(FloatingPointError, match="DC loss became nan at step 0"):
        model.training_step((real, labels), 0)
    assert model.images.grad is None, "the loss was back-propagated"
    with pytest.raises(ValueError, match="class-balanced"):
        model.training_step((real[:2], labels[:2]), 0)


def test_dsa_augments_real_and_synthetic_alike(monkeypatch) -> None:
    model = _model(DSA, ipc=2)
    g = torch.Generator().manual_seed(0)
    real = torch.randn(3, 4, *TINY, generator=g)
    draws, seen = [], []
    sample = model.dsa.sample

    def recording_sample(*args, **kwargs):
        draws.append(sample(*args, **kwargs))
        return draws[-1]

    def recording_gradients(net, images, labels, **kwargs):
        seen.append(images.detach().clone())
        return per_class_gradients(net, images, labels, **kwargs)

    monkeypatch.setattr(model.dsa, "sample", recording_sample)
    monkeypatch.setattr(dc_module, "per_class_gradients", recording_gradients)
    model.matching_loss(real, model.new_network(0), torch.Generator().manual_seed(5))
    assert len(draws) == 3 and all(d.n == 1 for d in draws), "one shared draw per class"
    real_seen, syn_seen = seen
    syn = model.images.detach().view(3, 2, *TINY)
    changed = 0
    for c, params in enumerate(draws):
        torch.testing.assert_close(real_seen[c], model.dsa.apply(real[c], params))
        torch.testing.assert_close(syn_seen[c], model.dsa.apply(syn[c], params))
        changed += not torch.equal(real_seen[c], real[c])
    assert changed >= 2, "the augmentation did nothing"
    drawn = {repr((d.families, {k: v.tolist() for k, v in d.values.items()})) for d in draws}
    assert len(drawn) == 3, "the classes shared one draw"


# ------------------------------------------------------------------------------ fitting
class _Record(L.Callback):
    """The images at the start, and the loss of every step."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.images = pl_module.images.detach().clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(trainer.callback_metrics["loss"]))


@pytest.mark.parametrize("cls", [DC, DSA])
def test_a_few_lightning_steps(cls, data_dir: Path, tmp_path: Path) -> None:
    data = FashionMNIST(data_dir=str(data_dir), batch_per_class=4)
    model = cls(ipc=1, network=SMALL_NET, outer_loop=2, inner_loop=2, seed=1)
    record = _Record()
    trainer = cpu_trainer(tmp_path, 3, [record])
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 3, "max_steps must count image updates"
    assert len(record.losses) == 3 and all(math.isfinite(v) and v > 0 for v in record.losses)
    assert torch.isfinite(model.images).all()
    assert not torch.equal(model.images.detach(), record.images), "the images did not change"
    s = model.synthetic_set()
    assert (s.method, s.dataset, s.ipc) == (cls.method_name, "FashionMNIST", 1)
    assert s.meta["hparams"]["outer_loop"] == 2 and s.meta["hparams"]["network"] == SMALL_NET


class _FixedBatch(FashionMNIST):
    """Fashion-MNIST whose training stream repeats one class-balanced batch."""

    def train_dataloader(self) -> DataLoader:
        real = self.sample_per_class(self.batch_per_class, torch.Generator().manual_seed(0))
        labels = torch.arange(self.num_classes).unsqueeze(1).expand(real.shape[:2])
        return DataLoader([(real, labels)] * 1000, batch_size=None)


def test_loss_falls_on_a_fixed_batch_and_network(data_dir: Path, tmp_path: Path) -> None:
    # outer_loop 20 and no inner training: one network for all 20 updates and a fixed real
    # batch, so the matching loss is a fixed function of the images and must go down.
    data = _FixedBatch(data_dir=str(data_dir), batch_per_class=4)
    model = DC(ipc=1, network=SMALL_NET, outer_loop=20, inner_loop=0, seed=2)
    record = _Record()
    cpu_trainer(tmp_path, 20, [record]).fit(model, datamodule=data)
    first, last = record.losses[:3], record.losses[-3:]
    assert sum(last) < 0.8 * sum(first), f"loss {record.losses}"


def test_inner_training_changes_the_network(data_dir: Path, tmp_path: Path) -> None:
    data = FashionMNIST(data_dir=str(data_dir), batch_per_class=2)
    model = DC(ipc=1, network=SMALL_NET, outer_loop=3, inner_loop=2)
    cpu_trainer(tmp_path, 1, []).fit(model, datamodule=data)
    trained = {k: v.clone() for k, v in model._scratch["net"].state_dict().items()}
    drawn = model.new_network(0).state_dict()
    assert not all(torch.equal(v, drawn[k]) for k, v in trained.items())


def _fit_with_checkpoint(data_dir: Path, root: Path, max_steps: int, ckpt: Path | None = None):
    model = DSA(ipc=1, network=SMALL_NET, outer_loop=3, inner_loop=2, seed=0)
    data = FashionMNIST(data_dir=str(data_dir), batch_per_class=2)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(root),
        callbacks=[ModelCheckpoint(dirpath=str(root / "checkpoints"), save_last=True)])
    trainer.fit(model, datamodule=data, ckpt_path=str(ckpt) if ckpt else None)
    return model


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_resume_in_the_middle_of_a_network_block_is_exact(data_dir: Path, tmp_path: Path) -> None:
    # outer_loop 3: the checkpoint at step 2 falls inside a block, so the trained network and
    # its momentum must come back from the checkpoint for the resumed run to match.
    _fit_with_checkpoint(data_dir, tmp_path / "a", 2)
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert saved["ld3m_network"]["next_step"] == 2 and "param_groups" in saved["ld3m_network"]["optimizer"]
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        resumed = _fit_with_checkpoint(data_dir, tmp_path / "b", 3, ckpt=ckpt)
    assert not [w for w in warned if "resuming is not exact" in str(w.message)]
    straight = _fit_with_checkpoint(data_dir, tmp_path / "c", 3)
    assert torch.equal(resumed.images, straight.images)


# ------------------------------------------------------------------------------ command line
def test_cli_model_dsa(data_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "run"
    assert main(["fit", "--model", "DSA", "--model.ipc", "1", "--data.batch_per_class", "4",
                 "--trainer.max_steps", "2", "--trainer.default_root_dir", str(root),
                 "--evaluation.at_end", "false", "--trainer.enable_progress_bar", "false",
                 "--model.network", SMALL_NET]) == 0
    synthetic = SyntheticSet.load(root / "synthetic.safetensors")
    assert (synthetic.method, synthetic.ipc) == ("DSA", 1)
    assert synthetic.images.shape == (10, 1, 28, 28)
    assert synthetic.meta["hparams"]["dsa"] == DEFAULT_STRATEGY


CONFIG_DIR = Path(__file__).parent.parent / "ld3m" / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("d[cs]*_ipc*.yaml"))


DATA_CLASSES = {"mnist": "MNIST", "fashionmnist": "FashionMNIST", "cifar10": "CIFAR10",
                "cifar100": "CIFAR100", "svhn": "SVHN"}
DIGITS = ("mnist", "svhn")  # DatasetCondensation readme.md: no flip for the digit datasets


def test_every_recipe_exists() -> None:
    names = {p.stem for p in CONFIGS}
    for method in ("dc", "dsa"):
        for data in DATA_CLASSES:
            for ipc in (1, 10, 50):
                assert f"{method}_{data}_ipc{ipc}" in names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_recipe_settings(path: Path) -> None:
    recipe = yaml.safe_load(path.read_text())
    method, data, ipc = path.stem.split("_")
    ipc = int(ipc.removeprefix("ipc"))
    outer, inner = default_loops(ipc)
    model = recipe["model"]["init_args"]
    assert recipe["model"]["class_path"] == f"ld3m.modules.{method.upper()}"
    assert recipe["data"]["class_path"] == f"ld3m.datamodules.{DATA_CLASSES[data]}"
    assert (model["ipc"], model["outer_loop"], model["inner_loop"]) == (ipc, outer, inner)
    assert (model["lr_img"], model["momentum"], model["lr_net"]) == (0.1, 0.5, 0.01)
    assert recipe["data"]["init_args"]["batch_per_class"] == 256
    assert recipe["trainer"]["max_steps"] == 1000 * outer
    evaluation = recipe["evaluation"]
    assert evaluation["runs"] == 5
    if method == "dc":
        assert (model["init"], model["dsa"]) == ("noise", "none")
        augment = dc_augment_for(DATA_CLASSES[data], "ConvNet")  # the authors' get_daparam
        assert evaluation.get("dc_augment", "none") == augment
        assert evaluation["dsa"] == "none"
        assert evaluation["epochs"] == (300 if augment == "none" else 1000)
    else:
        assert model["init"] == "real" and evaluation["epochs"] == 1000
        assert evaluation.get("dsa", DEFAULT_STRATEGY) != "none"
    if data in DIGITS:
        assert "flip" not in model["dsa"] and "flip" not in evaluation.get("dsa", "flip")
    else:
        assert method == "dc" or model["dsa"] == DEFAULT_STRATEGY


@pytest.mark.parametrize("name", ["dc_cifar100_ipc50", "dsa_mnist_ipc10"])
def test_recipe_parses(name: str, capsys) -> None:
    assert main(["fit", "--config", str(CONFIG_DIR / f"{name}.yaml"), "--print_config"]) == 0
    out = capsys.readouterr().out
    assert f"class_path: ld3m.modules.{name.split('_')[0].upper()}" in out


# VICO-UoE/DatasetCondensation (commit 53f63a6) for SVHN: utils.py get_loops (outer, inner),
# readme.md (DSA: --init real, color_crop_cutout_scale_rotate for the digit datasets MNIST and
# SVHN; Table 1 for DC's accuracy, Table 2 for DSA's), main.py (evaluation: 300 epochs, or 1000
# with DSA or a DC augmentation; get_daparam gives SVHN none).
SVHN_PUBLISHED = [
    # method, ipc, outer, inner, init, strategy, evaluation epochs, evaluation DSA, accuracy
    ("dc", 1, 1, 1, "noise", "none", 300, "none", 31.2),
    ("dc", 10, 10, 50, "noise", "none", 300, "none", 76.1),
    ("dc", 50, 50, 10, "noise", "none", 300, "none", 82.3),
    ("dsa", 1, 1, 1, "real", "color_crop_cutout_scale_rotate", 1000, "color_crop_cutout_scale_rotate", 27.5),
    ("dsa", 10, 10, 50, "real", "color_crop_cutout_scale_rotate", 1000, "color_crop_cutout_scale_rotate", 79.2),
    ("dsa", 50, 50, 10, "real", "color_crop_cutout_scale_rotate", 1000, "color_crop_cutout_scale_rotate", 84.4),
]


@pytest.mark.parametrize("method, ipc, outer, inner, init, strategy, epochs, eval_dsa, accuracy",
                         SVHN_PUBLISHED, ids=[f"{row[0]}_svhn_ipc{row[1]}" for row in SVHN_PUBLISHED])
def test_svhn_recipe_is_the_published_setting(method: str, ipc: int, outer: int, inner: int,
                                              init: str, strategy: str, epochs: int, eval_dsa: str,
                                              accuracy: float, capsys) -> None:
    name = f"{method}_svhn_ipc{ipc}"
    assert main(["fit", "--config", name, "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == f"ld3m.modules.{method.upper()}"
    assert printed["data"]["class_path"] == "ld3m.datamodules.SVHN"
    model = printed["model"]["init_args"]
    assert (model["ipc"], model["outer_loop"], model["inner_loop"], model["init"],
            model["dsa"]) == (ipc, outer, inner, init, strategy)
    assert (model["lr_img"], model["momentum"], model["lr_net"], model["network"]) == (
        0.1, 0.5, 0.01, "ConvNet")
    assert printed["data"]["init_args"]["batch_per_class"] == 256
    assert printed["trainer"]["max_steps"] == 1000 * outer
    evaluation = printed["evaluation"]
    assert (evaluation["epochs"], evaluation["dsa"], evaluation["archs"]) == (epochs, eval_dsa,
                                                                              "ConvNet")
    if method == "dc":  # the evaluation augmentation is get_daparam's for SVHN: none
        assert dc_augment_for("SVHN", "ConvNet") == "none"
        assert evaluation["dc_augment"] == "none"
    header = (CONFIG_DIR / f"{name}.yaml").read_text()
    assert f"Published ConvNet accuracy: {accuracy}%" in header
    assert "VICO-UoE/DatasetCondensation" in header  # the source is cited


def test_svhn_data_is_the_authors() -> None:
    """DatasetCondensation utils.py get_dataset('SVHN'): 3x32x32, 10 classes, their mean/std."""
    from ld3m.datamodules import SVHN

    assert (SVHN.num_classes, SVHN.image_shape) == (10, (3, 32, 32))
    assert SVHN.mean == (0.4377, 0.4438, 0.4728)
    assert SVHN.std == (0.1980, 0.2010, 0.1970)
