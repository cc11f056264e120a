"""The expert-trajectory (buffer) format: flat parameters, shards, lazy buffer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ld3m.networks import get_network, reset_parameters
from ld3m.trajectories import (
    ExpertTrajectory,
    TrajectoryBuffer,
    flatten_parameters,
    parameter_layout,
    shard_name,
    unflatten,
)


def _net(seed: int = 0):
    return reset_parameters(get_network("ConvNetW32", 1, 10, 28), torch.Generator().manual_seed(seed))


def _expert(index: int = 0, epochs: int = 2, logits: bool = True, **overrides) -> ExpertTrajectory:
    net = _net(index)
    rows = [flatten_parameters(net)]
    for _ in range(epochs):  # stand-in for training: perturb the weights
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(index)))
        rows.append(flatten_parameters(net))
    info = {"expert": index, "network": "ConvNetW32", "dataset": "FashionMNIST", "channels": 1,
            "num_classes": 10, "image_shape": [1, 28, 28], "epochs": epochs, "lr_teacher": 0.01,
            "batch_size": 256, "dsa": "color_crop_cutout_flip_scale_rotate", "zca": False,
            "seed": index, "params": parameter_layout(net), **overrides}
    return ExpertTrajectory(torch.stack(rows), info, torch.randn(7, 10) if logits else None)


def test_flat_parameters_round_trip() -> None:
    net = _net()
    flat = flatten_parameters(net)
    assert flat.shape == (sum(p.numel() for p in net.parameters()),)
    named = unflatten(flat, parameter_layout(net))
    for name, p in net.named_parameters():
        assert torch.equal(named[name], p.detach())
    with pytest.raises(ValueError, match="does not fit"):
        unflatten(flat[:-1], parameter_layout(net))


def test_shard_round_trips(tmp_path: Path) -> None:
    expert = _expert(3)
    path = expert.save(tmp_path / shard_name(3))
    assert path.name == "expert_00003.safetensors"
    loaded = ExpertTrajectory.load(path)
    assert torch.equal(loaded.trajectory, expert.trajectory)
    assert torch.equal(loaded.logits, expert.logits)
    assert loaded.info == expert.info
    after_one = loaded.parameters_at(1)
    net = _net()
    net.load_state_dict(after_one, strict=False)
    assert torch.equal(flatten_parameters(net), expert.trajectory[1])
    with pytest.raises(ValueError, match="epoch must be"):
        loaded.parameters_at(3)
    assert ExpertTrajectory.load(_expert(1, logits=False).save(tmp_path / "x.safetensors")).logits is None


def test_bad_shards_raise(tmp_path: Path) -> None:
    expert = _expert()
    with pytest.raises(ValueError, match="epochs \\+ 1"):
        ExpertTrajectory(expert.trajectory[:2], expert.info)
    with pytest.raises(ValueError, match="parameters"):
        ExpertTrajectory(expert.trajectory[:, :-1], expert.info)
    with pytest.raises(ValueError, match="logits"):
        ExpertTrajectory(expert.trajectory, expert.info, torch.zeros(4, 3))
    with pytest.raises(ValueError, match="lack"):
        ExpertTrajectory(expert.trajectory, {"epochs": 2})
    corrupt = tmp_path / shard_name(0)
    corrupt.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a valid expert trajectory"):
        ExpertTrajectory.load(corrupt)
    with pytest.raises(FileNotFoundError):
        ExpertTrajectory.load(tmp_path / "missing.safetensors")


def test_buffer_reads_lazily_and_checks_consistency(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="ld3m buffer"):
        TrajectoryBuffer(tmp_path)
    for i in range(3):
        _expert(i).save(tmp_path / shard_name(i))
    buffer = TrajectoryBuffer(tmp_path)
    assert len(buffer) == 3 and buffer.epochs == 2
    assert torch.equal(buffer[1].trajectory, _expert(1).trajectory)
    assert torch.equal(buffer.rows(2, [2, 0]), _expert(2).trajectory[[2, 0]])
    with pytest.raises(ValueError, match="epoch must be"):
        buffer.rows(0, [3])
    draws = [buffer.sample(torch.Generator().manual_seed(5))[0] for _ in range(2)]
    assert draws[0] == draws[1]
    _expert(3, lr_teacher=0.02).save(tmp_path / shard_name(3))
    with pytest.raises(ValueError, match="lr_teacher"):
        TrajectoryBuffer(tmp_path)
