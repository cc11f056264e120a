"""Tests for DATM: the start-epoch schedule, soft labels, correct-image init, the threshold."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import cpu_trainer
from ld3m.callbacks import StartEpochSchedule
from ld3m.datamodules import FashionMNIST
from ld3m.modules import DATM
from lightning.pytorch.callbacks import ModelCheckpoint
from test_mtt import write_buffer

from ld3m.trajectories import ExpertTrajectory, TrajectoryBuffer, shard_name

pytestmark = pytest.mark.usefixtures("one_thread")


def test_schedule_grows_linearly_then_stays() -> None:
    schedule = StartEpochSchedule(current_max_start_epoch=10, max_start_epoch=20, expansion_end=100)
    assert [schedule.bound(s) for s in (0, 10, 50, 99, 100, 500)] == [10, 11, 15, 19, 20, 20]
    assert StartEpochSchedule(4, 4, 0).bound(0) == 4
    with pytest.raises(ValueError, match="current_max_start_epoch"):
        StartEpochSchedule(30, 20, 10)
    with pytest.raises(ValueError, match="expansion_end"):
        StartEpochSchedule(1, 2, -1)
    restored = StartEpochSchedule(10, 20, 100)
    schedule.upper, schedule.history = 15, [(0, 10), (50, 15)]
    restored.load_state_dict(schedule.state_dict())
    assert (restored.upper, restored.history) == (15, [(0, 10), (50, 15)])
    with pytest.raises(ValueError, match="differs"):
        StartEpochSchedule(10, 20, 50).load_state_dict(schedule.state_dict())


def _fmnist_buffer(folder: Path, data: FashionMNIST, epochs: int = 6) -> Path:
    """Stand-in experts whose stored logits favour the true class for 90% of the images."""
    write_buffer(folder, experts=2, epochs=epochs, shape=(1, 28, 28), classes=10,
                 dataset="FashionMNIST")
    labels = data.train_split.labels
    g = torch.Generator().manual_seed(0)
    wrong = torch.rand(len(labels), generator=g) < 0.1
    shown = torch.where(wrong, (labels + 1) % 10, labels)
    logits = 4 * F.one_hot(shown, 10).float() + torch.randn(len(labels), 10, generator=g)
    expert = TrajectoryBuffer(folder)[0]
    ExpertTrajectory(expert.trajectory, expert.info, logits).save(folder / shard_name(0))
    return folder




def test_init_uses_correctly_classified_images_and_their_logits(tmp_path: Path, fmnist) -> None:
    buffer = _fmnist_buffer(tmp_path / "buffer", fmnist)
    logits = TrajectoryBuffer(buffer)[0].logits
    model = DATM(str(buffer), ipc=3, syn_steps=2, max_start_epoch=4, current_max_start_epoch=2,
                 expansion_end=4, gradient="recompute", lr_y=5.0)
    trainer = cpu_trainer(tmp_path, 0)
    trainer.fit(model, datamodule=fmnist)  # set-up only
    soft = model.soft_labels.detach()
    assert soft.shape == (30, 10)
    assert (soft.argmax(1) == model.labels).all(), "an image the expert gets wrong was picked"
    # each soft-label row is the stored logit row of one real training image
    match = (soft[:, None, :] == logits[None, :, :]).all(-1)
    assert match.any(1).all()
    picked = match.float().argmax(1)
    assert torch.equal(fmnist.train_split.images(picked, fmnist), model.images.detach())


def test_soft_labels_receive_the_same_gradient_in_both_modes(tmp_path: Path) -> None:
    buffer = write_buffer(tmp_path)
    grads = {}
    for mode in ("unroll", "recompute"):
        model = DATM(str(buffer), ipc=2, syn_steps=3, max_start_epoch=2, current_max_start_epoch=None,
                     num_classes=3, image_shape=(3, 16, 16), gradient=mode)
        with torch.no_grad():
            model.images.copy_(torch.randn(model.images.shape, generator=torch.Generator().manual_seed(1)))
            model.soft_labels.copy_(torch.randn(6, 3, generator=torch.Generator().manual_seed(2)))
            model.syn_lr.fill_(0.05)
        start, target = model.draw_expert(torch.Generator().manual_seed(3))
        model.matching_loss(start, target, torch.Generator().manual_seed(4)).backward()
        grads[mode] = model.soft_labels.grad.clone()
    assert grads["unroll"].abs().sum() > 0
    relative = ((grads["recompute"] - grads["unroll"]).norm() / grads["unroll"].norm()).item()
    assert relative < 1e-4, relative


def test_schedule_and_soft_labels_survive_resume(tmp_path: Path, fmnist) -> None:
    buffer = _fmnist_buffer(tmp_path / "buffer", fmnist)
    args = {"ipc": 1, "syn_steps": 2, "max_start_epoch": 4, "current_max_start_epoch": 1,
            "expansion_end": 6, "gradient": "recompute", "lr_y": 5.0, "threshold": 100.0}

    def schedule_of(trainer: L.Trainer) -> StartEpochSchedule:
        return next(c for c in trainer.callbacks if isinstance(c, StartEpochSchedule))

    straight = cpu_trainer(tmp_path / "a", 6)
    full = DATM(str(buffer), **args)
    straight.fit(full, datamodule=fmnist)
    expected = schedule_of(straight).history
    assert expected == [(0, 1), (2, 2), (4, 3)], expected  # 1 + (3 * step) // 6

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    first = cpu_trainer(tmp_path / "b", 3, callbacks=[checkpoint], enable_checkpointing=True)
    model = DATM(str(buffer), **args)
    first.fit(model, datamodule=fmnist)
    initial_soft = model.soft_labels.detach().clone()
    resumed_trainer = cpu_trainer(tmp_path / "b", 6)
    resumed = DATM(str(buffer), **args)
    resumed_trainer.fit(resumed, datamodule=fmnist, ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=3.ckpt"))
    assert schedule_of(resumed_trainer).history == expected
    assert resumed.upper_start_epoch == 3
    assert torch.allclose(resumed.soft_labels.detach(), full.soft_labels.detach(), atol=1e-6)
    assert not torch.equal(initial_soft, full.soft_labels.detach()), "the soft labels did not train"
    exported = resumed.synthetic_set()
    assert torch.equal(exported.soft_labels, resumed.soft_labels.detach())


def test_threshold_skips_updates(tmp_path: Path, fmnist) -> None:
    buffer = _fmnist_buffer(tmp_path / "buffer", fmnist)
    model = DATM(str(buffer), ipc=1, syn_steps=2, max_start_epoch=4, current_max_start_epoch=None,
                 threshold=1e-9, gradient="recompute")
    trainer = cpu_trainer(tmp_path, 2)
    trainer.fit(model, datamodule=fmnist)
    start = DATM(str(buffer), ipc=1, syn_steps=2, max_start_epoch=4, current_max_start_epoch=None)
    cpu_trainer(tmp_path / "s", 0).fit(start, datamodule=fmnist)
    assert torch.equal(model.images.detach(), start.images.detach())


@pytest.mark.parametrize("kwargs, match", [
    ({"init": "noise"}, "init must be 'real'"),
    ({"lr_y": 0.0}, "lr_y"),
    ({"threshold": 0.0}, "threshold"),
    ({"current_max_start_epoch": 30}, "current_max_start_epoch"),
])
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DATM("nowhere", **kwargs)
