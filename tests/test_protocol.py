"""The evaluation protocol as the authors' ``evaluate_synset``, DC's augmentation, several sets."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import write_fashion_mnist_slice
from ld3m.datamodules import DistilledDataModule, FashionMNIST

from ld3m.augment import DCAugment
from ld3m.evaluation import Classifier, dc_augment_for, evaluate, random_real_set

pytestmark = pytest.mark.usefixtures("one_thread")


class _Schedule(L.Callback):
    """The lr and whether momentum buffers exist at the start of every epoch."""

    def __init__(self) -> None:
        self.epochs: list[tuple[float, bool]] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        optimizer = trainer.optimizers[0]
        self.epochs.append((optimizer.param_groups[0]["lr"], bool(optimizer.state)))


@pytest.mark.parametrize("E", [6, 7])
def test_protocol_trains_E_plus_1_epochs_and_restarts_sgd_at_the_drop(fmnist, E: int) -> None:
    """``for ep in range(E + 1)``, and after epoch ``E // 2 + 1`` a new SGD at lr x0.1: the
    momentum buffers are gone at the next epoch's start, then built again."""
    synthetic = random_real_set(fmnist, ipc=1)
    model = Classifier("ConvNetD1", 1, 10, 28, lr=0.01, epochs=E, dsa="none")
    schedule = _Schedule()
    trainer = L.Trainer(max_epochs=model.training_epochs, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[schedule])
    trainer.fit(model, datamodule=DistilledDataModule(synthetic))
    drop = E // 2 + 1
    assert len(schedule.epochs) == E + 1
    for epoch, (lr, has_momentum) in enumerate(schedule.epochs):
        assert lr == pytest.approx(0.01 if epoch <= drop else 0.001), epoch
        assert has_momentum == (epoch not in (0, drop + 1)), epoch


def test_dc_augmentation_as_the_authors() -> None:
    """One family per image; crop pads with the batch's channel means and shifts in
    [-crop, crop - 1]; rotate uses integer angles in [-45, 45); noise is tiny."""
    x = torch.rand(64, 1, 28, 28)
    g = torch.Generator().manual_seed(0)
    crop = DCAugment("crop")(x, generator=g)
    assert crop.shape == x.shape and not torch.equal(crop, x)
    mean = float(x.mean())
    for i in range(64):  # each output is a window of the mean-padded image at offset (r, s)
        padded = torch.full((1, 36, 36), mean)
        padded[:, 4:32, 4:32] = x[i]
        assert any(torch.equal(crop[i], padded[:, r:r + 28, s:s + 28])
                   for r in range(8) for s in range(8))
    noise = DCAugment("noise")(x, generator=g)
    assert 0 < (noise - x).abs().max() < 0.01
    assert torch.equal(DCAugment("none")(x), x)
    scaled = DCAugment("scale")(x, generator=g)
    assert scaled.shape == x.shape and torch.isfinite(scaled).all()
    both = DCAugment("crop_noise")(x, generator=torch.Generator().manual_seed(1))
    again = DCAugment("crop_noise")(x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(both, again)
    with pytest.raises(ValueError, match="unknown DC augmentation"):
        DCAugment("flip")


def test_dc_rotation_angles(monkeypatch) -> None:
    """scipy's spline rotation by integer angles in [-45, 45), filled with the mean."""
    import scipy.ndimage

    seen = []
    real = scipy.ndimage.rotate

    def spy(image, angle, axes, cval):
        seen.append((angle, cval))
        return real(image, angle=angle, axes=axes, cval=cval)

    monkeypatch.setattr(scipy.ndimage, "rotate", spy)
    x = torch.rand(200, 1, 8, 8)
    out = DCAugment("rotate")(x, generator=torch.Generator().manual_seed(0))
    assert out.shape == (200, 1, 8, 8) and len(seen) == 200
    angles = [a for a, _ in seen]
    assert min(angles) >= -45 and max(angles) <= 44 and len(set(angles)) > 40
    assert all(isinstance(a, int) for a in angles)
    assert seen[0][1] == pytest.approx(float(x.mean()), rel=1e-6)


def test_dc_augment_choice_follows_get_daparam() -> None:
    assert dc_augment_for("MNIST", "ConvNet") == "crop_scale_rotate"
    assert dc_augment_for("FashionMNIST", "ConvNet") == "none"
    assert dc_augment_for("CIFAR10", "ConvNetBN") == "crop_noise"
    assert dc_augment_for("MNIST", "ConvNetBN") == "crop_noise"


def test_several_sets_pool_into_one_row(fmnist: FashionMNIST, tmp_path: Path) -> None:
    """The papers' protocol: several distilled sets, each with its fresh networks, one mean."""
    small = FashionMNIST(data_dir=str(write_fashion_mnist_slice(fmnist, tmp_path, 300, 100)))
    small.setup("fit")
    sets = [random_real_set(small, ipc=1, seed=s) for s in (1, 2)]
    report = evaluate(sets, small, archs=["ConvNetD1"], runs=2, epochs=1, dsa="none",
                      progress=False)
    (row,) = [r for r in report.results if r.name.startswith("random (")]
    assert row.name == "random (IPC 1, 2 sets)" and len(row.accuracies) == 4
    assert len(report.get("random real (IPC 1)", "ConvNetD1").accuracies) == 2
    assert report.settings["sets"] == 2
    one = evaluate(sets[0], small, archs=["ConvNetD1"], runs=2, epochs=1, dsa="none",
                   baseline=False, progress=False)
    assert one.results[0].accuracies == row.accuracies[:2], "set 1's networks are its own"


@pytest.mark.parametrize("method, dataset, arch, dsa, augment, epochs", [
    ("DC", "FashionMNIST", "ConvNet", "none", "none", 300),
    ("DC", "MNIST", "ConvNet", "none", "crop_scale_rotate", 1000),
    ("DC", "FashionMNIST", "ConvNetBN", "none", "crop_noise", 1000),
    ("DSA", "FashionMNIST", "ConvNet", "color_crop_cutout_flip_scale_rotate", "none", 1000),
    ("DM", "MNIST", "ConvNet", "color_crop_cutout_flip_scale_rotate", "none", 1000),
])
def test_auto_evaluation_is_the_authors_per_method(monkeypatch, fmnist, method: str,
                                                   dataset: str, arch: str, dsa: str,
                                                   augment: str, epochs: int) -> None:
    """``dsa="auto"`` and ``epochs=None`` (the defaults): DC's sets train without DSA, with
    get_daparam's augmentation, 300 epochs without augmentation and 1000 with; the others DSA
    and 1000 epochs (main.py / main_DM.py)."""
    import dataclasses

    import ld3m.evaluation as evaluation

    seen = []
    monkeypatch.setattr(evaluation, "train_and_test",
                        lambda data, real, arch, **kw: seen.append((arch, kw)) or 0.5)
    monkeypatch.setattr(fmnist, "dataset_name", dataset)
    synthetic = dataclasses.replace(random_real_set(fmnist, ipc=1), method=method, dataset=dataset)
    evaluate(synthetic, fmnist, archs=[arch], runs=1, baseline=False, progress=False)
    ((got_arch, kwargs),) = seen
    assert (got_arch, kwargs["dsa"], kwargs["dc_augment"], kwargs["epochs"]) == (
        arch, dsa, augment, epochs)
