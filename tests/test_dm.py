"""Tests for the DM (distribution matching) method and what it inherits from DistillationModule."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from helpers import cpu_trainer
from ld3m.callbacks import ExportSynthetic, ImageGrid
from ld3m.datamodules import FashionMNIST
from ld3m.modules import DM

from ld3m.augment import DEFAULT_STRATEGY
from ld3m.networks import get_network, reset_parameters
from ld3m.synthetic import SyntheticSet

SMALL_NET = "ConvNetW32"  # ConvNet-3 with 32 channels: a quarter of the default's width
SHAPE = (1, 28, 28)


def _dm(**kwargs) -> DM:
    args = {"ipc": 2, "network": SMALL_NET, "dsa": "none", "num_classes": 10, "image_shape": SHAPE}
    return DM(**{**args, **kwargs})




def _real(dm: FashionMNIST, n: int = 8, seed: int = 0) -> torch.Tensor:
    return dm.sample_per_class(n, torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ construction
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"ipc": 0}, "ipc"),
        ({"ipc": -3}, "ipc"),
        ({"init": "zeros"}, "init"),
        ({"lr_img": 0.0}, "lr_img"),
        ({"lr_img": float("nan")}, "lr_img"),
        ({"momentum": 1.0}, "momentum"),
        ({"network": "Foo"}, "unknown network 'Foo'"),
        ({"image_shape": (28, 28)}, "image_shape"),
    ],
    ids=["ipc0", "ipc-neg", "init", "lr0", "lr-nan", "momentum", "network", "shape"],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    _dm()  # the valid baseline builds
    with pytest.raises(ValueError, match=match):
        _dm(**kwargs)


def test_unknown_network_without_shape_fails_at_fit(fmnist: FashionMNIST, tmp_path: Path) -> None:
    model = DM(ipc=1, network="Foo")  # cannot be checked before the data is known
    with pytest.raises(ValueError, match="unknown network 'Foo'"):
        cpu_trainer(tmp_path, 1).fit(model, datamodule=fmnist)


def test_shape_mismatch_with_the_data(fmnist: FashionMNIST, tmp_path: Path) -> None:
    model = DM(ipc=1, network=SMALL_NET, num_classes=5, image_shape=SHAPE)
    with pytest.raises(ValueError, match="5 classes"):
        cpu_trainer(tmp_path, 1).fit(model, datamodule=fmnist)


def test_images_before_fit() -> None:
    model = _dm(ipc=3, num_classes=4, image_shape=(3, 8, 8))
    assert model.images.shape == (12, 3, 8, 8)
    assert model.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    with pytest.raises(ValueError, match="no images yet"):
        DM(ipc=1).synthetic_images()


def test_only_the_images_are_state(fmnist: FashionMNIST) -> None:
    model = _dm()
    model.embedding_network(torch.Generator().manual_seed(0))  # builds the scratch network
    assert set(model.state_dict()) == {"images", "labels"}
    assert [p.shape for p in model.parameters()] == [model.images.shape]


def test_step_generator_depends_on_seed_step_and_rank() -> None:
    def draw(seed: int, step: int, rank: int) -> torch.Tensor:
        model = _dm(seed=seed)
        model.trainer = SimpleNamespace(global_step=step, global_rank=rank)
        return torch.rand(4, generator=model.step_generator())

    base = draw(0, 5, 0)
    assert torch.equal(base, draw(0, 5, 0))
    for other in (draw(1, 5, 0), draw(0, 6, 0), draw(0, 5, 1)):
        assert not torch.equal(base, other)


# ------------------------------------------------------------------------------ the loss
def test_matching_loss_is_distribution_matching(fmnist: FashionMNIST) -> None:
    model = _dm()
    model.initialise(fmnist)
    real = _real(fmnist)
    loss = model.matching_loss(real, torch.Generator().manual_seed(7))
    # the same network drawn independently, the same formula written out
    net = reset_parameters(get_network(SMALL_NET, 1, 10, (28, 28)), torch.Generator().manual_seed(7))
    with torch.no_grad():
        syn = model.images.view(10, 2, *SHAPE)
        expected = sum(((net.embed(real[c]).mean(0) - net.embed(syn[c]).mean(0)) ** 2).sum()
                       for c in range(10))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert loss.item() > 0
    # synthetic images equal to the real batch match it perfectly
    with torch.no_grad():
        model.images.copy_(real[:, :2].flatten(0, 1))
    assert model.matching_loss(real[:, :2], torch.Generator().manual_seed(7)).item() < 1e-6


def test_batchnorm_loss_is_one_forward_of_all_classes(fmnist: FashionMNIST) -> None:
    """As the authors' BN branch: the real images of every class go through one forward (the
    batch statistics of all of them), so the chunking of the real batch changes nothing."""
    model = _dm(network="ConvNetBN", dsa="none")
    model.initialise(fmnist)
    real = _real(fmnist)
    losses = []
    for chunk in (640, 8):
        model.real_chunk = chunk
        losses.append(model.matching_loss(real, torch.Generator().manual_seed(7)).item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    net = reset_parameters(get_network("ConvNetBN", 1, 10, (28, 28)),
                           torch.Generator().manual_seed(7)).train()
    with torch.no_grad():
        syn = model.images.view(10, 2, *SHAPE)
        real_mean = net.embed(real.flatten(0, 1)).view(10, -1, 2048).mean(1)
        syn_mean = net.embed(syn.flatten(0, 1)).view(10, 2, 2048).mean(1)
    assert losses[0] == pytest.approx(((real_mean - syn_mean) ** 2).sum().item(), rel=1e-4)


@pytest.mark.parametrize("dsa", ["none", DEFAULT_STRATEGY], ids=["no-dsa", "dsa"])
def test_gradients_reach_every_image(fmnist: FashionMNIST, dsa: str) -> None:
    model = _dm(dsa=dsa)
    model.initialise(fmnist)
    loss = model.matching_loss(_real(fmnist), torch.Generator().manual_seed(3))
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    grad = model.images.grad
    assert grad is not None and grad.shape == model.images.shape
    assert torch.isfinite(grad).all()
    assert (grad.flatten(1).norm(dim=1) > 0).all(), "some synthetic image got no gradient"


@pytest.mark.slow
def test_dm_loss_falls(fmnist: FashionMNIST) -> None:
    """A few dozen DM steps lower the loss measured on held-out (network, real batch) pairs."""
    model = _dm(ipc=1, seed=3)
    model.initialise(fmnist)
    g = torch.Generator().manual_seed(123)
    held_out = [(10_000 + i, fmnist.sample_per_class(16, g)) for i in range(5)]

    def held_out_loss() -> float:
        with torch.no_grad():
            return sum(model.matching_loss(real, torch.Generator().manual_seed(seed)).item()
                       for seed, real in held_out) / len(held_out)

    before = held_out_loss()
    optimizer = model.configure_optimizers()
    stream = iter(fmnist.train_dataloader())
    for step in range(20):
        real, _ = next(stream)
        optimizer.zero_grad()
        model.matching_loss(real, torch.Generator().manual_seed(step)).backward()
        optimizer.step()
    after = held_out_loss()
    assert after < 0.8 * before, f"held-out DM loss {before:.1f} -> {after:.1f}"


# ------------------------------------------------------------------------------ NaN handling
@pytest.mark.parametrize("where", ["images", "real"])
def test_nan_loss_raises_before_any_update(fmnist: FashionMNIST, where: str) -> None:
    model = _dm()
    model.initialise(fmnist)
    real, labels = next(iter(fmnist.train_dataloader()))
    with torch.no_grad():
        (model.images if where == "images" else real).view(-1)[100] = float("nan")
    with pytest.raises(FloatingPointError, match="DM loss became nan at step 0"):
        model.training_step((real, labels), 0)


def test_unbalanced_batch_is_rejected(fmnist: FashionMNIST) -> None:
    model = _dm()
    real, labels = next(iter(fmnist.train_dataloader()))
    with pytest.raises(ValueError, match="class-balanced"):
        model.training_step((real[:5], labels[:5]), 0)


class _NaNAtStep(L.Callback):
    """Poison the real batch of one step; remember the images just before it."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.images_before: torch.Tensor | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            self.images_before = pl_module.images.detach().clone()
            batch[0].view(-1)[0] = float("nan")


def test_nan_during_fit_keeps_the_last_finite_images(fmnist: FashionMNIST, tmp_path: Path) -> None:
    model = _dm(ipc=1)
    poison, export = _NaNAtStep(step=1), ExportSynthetic()
    with pytest.raises(FloatingPointError, match="step 1"):
        cpu_trainer(tmp_path, 3, [poison, export]).fit(model, datamodule=fmnist)
    assert poison.images_before is not None
    assert torch.isfinite(model.images).all()
    assert torch.equal(model.images.detach(), poison.images_before), "the images were updated"
    # the last finite images, under another name than a finished set's
    saved = SyntheticSet.load(tmp_path / "synthetic.failed.safetensors")
    assert torch.equal(saved.images, poison.images_before)
    assert not (tmp_path / "synthetic.safetensors").exists()


@pytest.mark.parametrize("writer", ["none", "grid"])
def test_deferred_finite_check(fmnist: FashionMNIST, tmp_path: Path, monkeypatch,
                               writer: str) -> None:
    """The accelerators' check (run here on the CPU): no host read per step; the poisoned
    step's gradient is dropped, the flags are read every few steps, and before any file is
    written (a grid after every step here), raising for the first bad step."""
    import ld3m.modules.base as base

    monkeypatch.setattr(base, "FINITE_CHECK_EVERY", 4)
    model = _dm(ipc=1)
    model.deferred_finite_check = True
    poison, export = _NaNAtStep(step=1), ExportSynthetic()
    callbacks = [poison, export] + ([ImageGrid(every_n_steps=1)] if writer == "grid" else [])
    with pytest.raises(FloatingPointError, match="DM gradients became non-finite at step 1"):
        cpu_trainer(tmp_path, 6, callbacks).fit(model, datamodule=fmnist)
    # found at step 1's grid, or at the periodic read in step 3 (the 4th, before its update)
    assert model.global_step == (2 if writer == "grid" else 3)
    assert torch.isfinite(model.images).all(), "a non-finite gradient reached the images"
    assert torch.isfinite(SyntheticSet.load(tmp_path / "synthetic.failed.safetensors").images).all()
    assert not (tmp_path / "synthetic.safetensors").exists()


# ------------------------------------------------------------------------------ a short fit
class _Initial(L.Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.images = pl_module.images.detach().clone()


def test_synthetic_set_after_one_step(fmnist: FashionMNIST, tmp_path: Path) -> None:
    model = DM(ipc=2, network=SMALL_NET, seed=4)  # shape and classes come from the data
    initial = _Initial()
    cpu_trainer(tmp_path, 1, [initial]).fit(model, datamodule=fmnist)
    assert model.global_step == 1
    s = model.synthetic_set()
    assert s.images.shape == (20, 1, 28, 28)
    assert s.labels.tolist() == [c for c in range(10) for _ in range(2)]
    assert (s.method, s.dataset, s.ipc, s.num_classes) == ("DM", "FashionMNIST", 2, 10)
    assert s.mean == pytest.approx((0.2861,)) and s.std == pytest.approx((0.3530,))
    assert s.meta["hparams"]["network"] == SMALL_NET and s.meta["hparams"]["ipc"] == 2
    assert torch.isfinite(s.images).all()
    assert not torch.equal(s.images, initial.images), "one step did not change the images"
    # init="real": the images started as real images of their own class, drawn from the seed
    assert torch.equal(initial.images.view(10, 2, *SHAPE),
                       fmnist.sample_per_class(2, torch.Generator().manual_seed(4)))
    loaded = SyntheticSet.load(s.save(tmp_path / "set.safetensors"))
    assert torch.equal(loaded.images, s.images) and loaded.meta == s.meta
