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
    images = model.images.detach()
    # the picks are real training images that expert 0 (its stored logits) classifies correctly
    train = fmnist.train_split.images(torch.arange(len(fmnist.train_split)), fmnist).flatten(1)
    key = torch.randn(train.shape[1], 4, generator=torch.Generator().manual_seed(0))
    distance = torch.cdist(images.flatten(1) @ key, train @ key)
    picked = distance.argmin(1)
    assert torch.equal(fmnist.train_split.images(picked, fmnist), images)
    assert (logits[picked].argmax(1) == model.labels).all(), "an image expert 0 gets wrong was picked"
    assert torch.equal(fmnist.train_split.labels[picked], model.labels)
    # the soft labels are the experts' mean logits on those images (the rule is tested below)
    soft = model.soft_labels.detach()
    assert soft.shape == (30, 10)
    assert torch.allclose(soft, model.initial_soft_labels(images, model.labels), atol=1e-5)


def test_init_real_takes_random_real_images_and_expert_0s_logits(tmp_path: Path, fmnist) -> None:
    """Their ``pix_init: real`` (CIFAR-100 IPC 50): random real images, wrong ones included,
    soft labels = expert 0's final logits on them (not the mean over the correct experts)."""
    from ld3m.networks import get_network

    buffer = _fmnist_buffer(tmp_path / "buffer", fmnist)
    model = DATM(str(buffer), ipc=3, init="real", syn_steps=2, max_start_epoch=4,
                 current_max_start_epoch=2, expansion_end=4, gradient="recompute")
    cpu_trainer(tmp_path, 0).fit(model, datamodule=fmnist)  # set-up only
    drawn = fmnist.sample_per_class(3, torch.Generator().manual_seed(0)).flatten(0, 1)
    assert torch.equal(model.images.detach(), drawn), "not the seeded random real draw"
    expert = TrajectoryBuffer(buffer)[0]
    net = get_network("ConvNetW32", 1, 10, 28).eval()
    net.load_state_dict(expert.parameters_at(expert.epochs), strict=False)
    with torch.no_grad():
        expected = net(drawn)
    assert torch.allclose(model.soft_labels.detach(), expected, atol=1e-5)
    correct = DATM(str(buffer), ipc=3, syn_steps=2, max_start_epoch=4, current_max_start_epoch=2,
                   expansion_end=4, gradient="recompute")
    cpu_trainer(tmp_path / "c", 0).fit(correct, datamodule=fmnist)
    assert not torch.equal(correct.images.detach(), model.images.detach())


def test_soft_labels_start_as_the_mean_over_the_experts_that_are_right(tmp_path: Path) -> None:
    """DATM.py: every expert of every buffer file, at Label_Model_Timestamp -1 (the last epoch),
    logits on the synthetic images; per image, the mean over the experts whose argmax is the
    image's label."""
    from ld3m.networks import get_network

    folder = write_buffer(tmp_path / "buffer", experts=4, epochs=3, shape=(1, 28, 28), classes=10,
                          dataset="FashionMNIST")
    first = TrajectoryBuffer(folder)[0]  # expert 1: a near copy of expert 0, so they mostly agree
    twin = first.trajectory + 1e-3 * torch.randn(first.trajectory.shape,
                                                  generator=torch.Generator().manual_seed(1))
    ExpertTrajectory(twin, {**first.info, "expert": 1}, None).save(folder / shard_name(1))
    model = DATM(str(folder), ipc=2, num_classes=10, image_shape=(1, 28, 28),
                 current_max_start_epoch=None, max_start_epoch=2)
    images = torch.randn(12, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    every = []  # each expert's logits, through a plain network with its final parameters loaded
    for expert in TrajectoryBuffer(folder):
        net = get_network("ConvNetW32", 1, 10, 28).eval()
        net.load_state_dict(expert.parameters_at(expert.epochs), strict=False)
        with torch.no_grad():
            every.append(net(images))
    every = torch.stack(every)  # (experts, images, classes)
    labels = every[0].argmax(1).clone()
    predicted = every.argmax(2)
    unseen = next(c for c in range(10) if not (predicted[:, -1] == c).any())
    labels[-1] = unseen  # the last image: no expert gets it right
    right = (predicted == labels).float().unsqueeze(2)
    expected = (every * right).sum(0) / right.sum(0).clamp(min=1)
    expected[-1] = every[0, -1]  # no expert right: expert 0's logits
    soft = model.initial_soft_labels(images, labels)
    assert torch.allclose(soft, expected, atol=1e-5)
    several = right.sum(0).flatten() >= 2
    assert several.any() and not torch.allclose(soft[several], every[0][several], atol=1e-5)


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
    ({"init": "noise"}, "init must be one of correct, real"),
    ({"lr_y": 0.0}, "lr_y"),
    ({"threshold": 0.0}, "threshold"),
    ({"current_max_start_epoch": 30}, "current_max_start_epoch"),
])
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DATM("nowhere", **kwargs)


CONFIG_DIR = Path(__file__).parent.parent / "ld3m" / "configs"


@pytest.mark.parametrize("ipc, expected", [
    # (threshold, sequential, expansion_end, bound at 0 / 500 / 1000 / 2000), DATM's configs
    (1, (1.1, False, None, (4, 4, 4, 4))),
    (10, (1.0, True, 1000, (10, 15, 20, 20))),
    (50, (1.0, True, 2000, (20, 25, 30, 40))),
])
def test_recipes_follow_their_cifar10_configs(ipc: int, expected: tuple, capsys, tmp_path: Path) -> None:
    """NUS-HPC-AI-Lab/DATM configs/CIFAR-10/ConvIN/IPC{1,10,50}.yaml, read through the CLI."""
    import yaml

    from ld3m.cli import main

    threshold, sequential, end, bounds = expected
    assert main(["fit", "--config", f"datm_cifar10_ipc{ipc}", "--print_config"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    model = config["model"]["init_args"]
    assert model["threshold"] == threshold
    assert config["data"]["init_args"]["zca"] is True  # ZCA at every IPC
    evaluation = config["evaluation"]
    assert (evaluation["batch_size"], evaluation["every_n_steps"], evaluation["runs"],
            evaluation["keep_best"]) == (128, 500, 1, True)
    kept = {k: v for k, v in model.items() if k not in ("buffer", "num_classes", "image_shape")}
    datm = DATM(str(write_buffer(tmp_path)), **kept, num_classes=3, image_shape=(3, 16, 16))
    schedules = datm.configure_callbacks()
    assert bool(schedules) == sequential
    if sequential:
        assert schedules[0].expansion_end == end
        assert tuple(schedules[0].bound(it) for it in (0, 500, 1000, 2000)) == bounds
    else:
        assert datm.start_epoch_range() == (0, bounds[0])


def test_defaults_are_their_cfg(tmp_path: Path, capsys) -> None:
    """DATM utils/cfg.py: max_start_epoch 25, current_max_start_epoch 20, expansion_end 3000,
    lr_img 1000, syn_steps 80, expert_epochs 2, lr_y 2, threshold 1.0, lr_lr 1e-5."""
    import yaml

    from ld3m.cli import main

    buffer = write_buffer(tmp_path, shape=(1, 28, 28), classes=10, epochs=30, dataset="FashionMNIST")
    assert main(["fit", "--model", "DATM", "--model.buffer", str(buffer), "--print_config"]) == 0
    args = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    assert (args["max_start_epoch"], args["current_max_start_epoch"], args["expansion_end"],
            args["lr_img"], args["syn_steps"], args["expert_epochs"], args["lr_y"],
            args["threshold"], args["lr_lr"]) == (25, 20, 3000, 1000.0, 80, 2, 2.0, 1.0, 1e-5)
