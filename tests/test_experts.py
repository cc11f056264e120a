"""Expert training (``ld3m buffer``): trajectories recorded per epoch, resumable, deterministic."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import lightning as L
import pytest
import torch
from ld3m.datamodules import MNIST
from test_data import TINY_TRAIN, _write_tiny_mnist

from ld3m.cli import main
from ld3m.experts import PARTIAL, Expert, train_experts
from ld3m.networks import get_network, reset_parameters
from ld3m.trajectories import TrajectoryBuffer, flatten_parameters, shard_name

QUIET = {"accelerator": "cpu", "enable_progress_bar": False}


@pytest.fixture
def tiny(tmp_path: Path) -> MNIST:
    _write_tiny_mnist(tmp_path / "data")
    return MNIST(data_dir=str(tmp_path / "data"))


def _train(data: MNIST, folder: Path, **kwargs) -> TrajectoryBuffer:
    args = {"experts": 2, "epochs": 2, "network": "ConvNetD1", "batch_size": 8, "dsa": "none",
            "trainer_kwargs": QUIET}
    return train_experts(data, folder, **{**args, **kwargs})


def test_experts_record_every_epoch_and_learn(tiny: MNIST, tmp_path: Path) -> None:
    folder = tmp_path / "buffer"
    # (the tiny images are uniform grey levels: instance norm would erase them, so no norm here)
    buffer = _train(tiny, folder, epochs=3, lr_teacher=0.01, network="ConvNetNN")
    assert len(buffer) == 2 and buffer.epochs == 3
    assert buffer.info["dataset"] == "MNIST" and buffer.info["network"] == "ConvNetNN"
    expert = buffer[0]
    assert expert.trajectory.shape[0] == 4 and expert.logits is None
    # row 0 is the seeded initialisation
    init = reset_parameters(get_network("ConvNetNN", 1, 10, 28),
                            torch.Generator().manual_seed(expert.info["seed"]))
    assert torch.equal(expert.trajectory[0], flatten_parameters(init))
    steps = expert.trajectory.diff(dim=0).norm(dim=1)
    assert (steps > 0).all(), "an epoch did not move the parameters"
    # the experts differ, and the last snapshot classifies the (tiny) training set better
    assert not torch.equal(buffer[0].trajectory, buffer[1].trajectory)
    tiny.setup("fit")
    images, labels = next(iter(torch.utils.data.DataLoader(tiny.train_split.dataset(tiny),
                                                           batch_size=10 * TINY_TRAIN)))

    def loss(row: int) -> float:
        net = get_network("ConvNetNN", 1, 10, 28)
        net.load_state_dict(expert.parameters_at(row), strict=False)
        return torch.nn.functional.cross_entropy(net(images), labels).item()

    assert loss(3) < loss(0)


def test_resume_trains_only_missing_experts_deterministically(tiny: MNIST, tmp_path: Path) -> None:
    folder = tmp_path / "buffer"
    first = _train(tiny, folder)
    second_expert = first[1].trajectory.clone()
    (folder / shard_name(1)).unlink()
    kept = (folder / shard_name(0)).stat().st_mtime_ns
    resumed = _train(tiny, folder, experts=3)
    assert len(resumed) == 3
    assert (folder / shard_name(0)).stat().st_mtime_ns == kept, "a finished expert was retrained"
    assert torch.equal(resumed[1].trajectory, second_expert), "the retrained expert differs"
    with pytest.raises(ValueError, match="another setting"):
        _train(tiny, folder, lr_teacher=0.02)


class _Kill(L.Callback):
    """Stop the training of expert 1 at the start of its third epoch (two epochs checkpointed)."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if pl_module.hparams.seed == 1000 and trainer.current_epoch == 2:
            raise RuntimeError("simulated kill")


def test_an_interrupted_expert_resumes_from_its_last_epoch(tiny: MNIST, tmp_path: Path) -> None:
    folder = tmp_path / "buffer"
    killed = {**QUIET, "callbacks": [_Kill()]}
    with pytest.raises(RuntimeError, match="simulated kill"):
        _train(tiny, folder, epochs=4, dsa="color_crop_cutout_scale_rotate", trainer_kwargs=killed)
    assert (folder / shard_name(0)).is_file() and not (folder / shard_name(1)).exists()
    checkpoint = folder / PARTIAL / "expert_00001.ckpt"
    saved = torch.load(checkpoint, weights_only=False)
    assert len(saved["ld3m_expert"]["snapshots"]) == 3  # the start and two finished epochs
    other = tmp_path / "other" / PARTIAL
    other.mkdir(parents=True)
    (other / checkpoint.name).write_bytes(checkpoint.read_bytes())
    with pytest.raises(ValueError, match="another setting"):  # another lr, same expert index
        _train(tiny, other.parent, epochs=4, dsa="color_crop_cutout_scale_rotate", lr_teacher=0.02)
    assert (other / checkpoint.name).is_file(), "the foreign checkpoint was deleted"
    resumed = _train(tiny, folder, epochs=4, dsa="color_crop_cutout_scale_rotate")
    assert not (folder / PARTIAL).exists(), "the finished expert's checkpoint was kept"
    alone = _train(tiny, tmp_path / "alone", epochs=4, dsa="color_crop_cutout_scale_rotate")
    for i in range(2):  # shuffling, augmentation and weights continue exactly
        assert torch.equal(resumed[i].trajectory, alone[i].trajectory)


def test_a_torn_checkpoint_restarts_the_expert(tiny: MNIST, tmp_path: Path) -> None:
    folder = tmp_path / "buffer"
    (folder / PARTIAL).mkdir(parents=True)
    (folder / PARTIAL / "expert_00000.ckpt").write_bytes(b"torn")
    buffer = _train(tiny, folder, experts=1)
    assert torch.equal(buffer[0].trajectory, _train(tiny, tmp_path / "alone", experts=1)[0].trajectory)


def test_logits_for_datm(tiny: MNIST, tmp_path: Path) -> None:
    buffer = _train(tiny, tmp_path / "b", experts=1, epochs=1, logits=True)
    logits = buffer[0].logits
    assert logits.shape == (10 * TINY_TRAIN, 10) and torch.isfinite(logits).all()


def test_bad_arguments(tiny: MNIST, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        _train(tiny, tmp_path, experts=0)
    with pytest.raises(ValueError, match="lr_teacher"):
        Expert("ConvNetD1", 1, 10, 28, lr_teacher=0.0)


def test_cli_buffer(tiny: MNIST, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "cli"
    args = ["buffer", "--data", "MNIST", "--data.data_dir", str(tiny.data_dir), "--folder", str(folder),
            "--experts", "1", "--epochs", "1", "--network", "ConvNetD1", "--batch_size", "8",
            "--accelerator", "cpu", "--progress_bar", "false"]
    previous = os.umask(0o022)  # shards shared with colleagues: readable, as the umask says
    try:
        assert main(args) == 0
    finally:
        os.umask(previous)
    assert TrajectoryBuffer(folder).epochs == 1
    assert stat.S_IMODE((folder / shard_name(0)).stat().st_mode) == 0o644
    assert main(["buffer", "--data", "Imagenet"]) == 2
    assert "unknown --data 'Imagenet'" in capsys.readouterr().err


def test_ranks_share_the_experts(tiny: MNIST, tmp_path: Path) -> None:
    folder = tmp_path / "shared"
    assert _train(tiny, folder, experts=3, epochs=1, rank=1, world_size=2) is None
    assert [p.name for p in sorted(folder.iterdir())] == [shard_name(1)]
    _train(tiny, folder, experts=3, epochs=1, rank=0, world_size=2)
    buffer = TrajectoryBuffer(folder)
    assert len(buffer) == 3
    # the same experts as one process would train
    alone = _train(tiny, tmp_path / "alone", experts=3, epochs=1)
    for i in range(3):
        assert torch.equal(buffer[i].trajectory, alone[i].trajectory)
    with pytest.raises(ValueError, match="rank"):
        _train(tiny, folder, rank=2, world_size=2)


def test_cli_reads_the_launcher_environment(tiny: MNIST, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    folder = tmp_path / "torchrun"
    assert main(["buffer", "--data", "MNIST", "--data.data_dir", str(tiny.data_dir), "--folder",
                 str(folder), "--experts", "2", "--epochs", "1", "--network", "ConvNetD1",
                 "--batch_size", "8", "--accelerator", "cpu", "--progress_bar", "false"]) == 0
    assert [p.name for p in folder.iterdir()] == [shard_name(1)]
