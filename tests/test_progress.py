"""Long phases say what they are doing: progress bars, and DATM's computed logits kept."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import write_fashion_mnist_slice
from ld3m.datamodules import MNIST, FashionMNIST
from ld3m.modules import DATM
from test_data import _write_tiny_mnist
from test_mtt import write_buffer

from ld3m.evaluation import evaluate, random_real_set
from ld3m.experts import train_experts
from ld3m.trajectories import TrajectoryBuffer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def small(fmnist: FashionMNIST, tmp_path: Path) -> FashionMNIST:
    """Fashion-MNIST's first 500 training and 100 test images, in its own IDX layout."""
    root = write_fashion_mnist_slice(fmnist, tmp_path / "slice", train=500, test=100)
    return FashionMNIST(data_dir=str(root), batch_per_class=4)


def test_evaluate_from_python_shows_a_bar(small: FashionMNIST, capsys) -> None:
    small.setup("fit")
    synthetic = random_real_set(small, ipc=1, seed=1)
    evaluate(synthetic, small, archs=["ConvNetW32"], runs=2, epochs=1)
    err = capsys.readouterr().err
    assert "evaluation:" in err and "/4 [" in err, err  # 2 runs x (baseline + the set)
    evaluate(synthetic, small, archs=["ConvNetW32"], runs=1, epochs=1, progress=False)
    assert "evaluation:" not in capsys.readouterr().err


def test_buffer_logits_phase_shows_a_bar(tmp_path: Path, capsys) -> None:
    _write_tiny_mnist(tmp_path / "data")
    train_experts(MNIST(data_dir=str(tmp_path / "data")), tmp_path / "buffer", experts=1,
                  epochs=1, network="ConvNetD1", batch_size=8, dsa="none", logits=True,
                  trainer_kwargs={"accelerator": "cpu", "enable_progress_bar": True})
    assert "expert logits" in capsys.readouterr().err


def test_datm_stores_the_logits_it_computes(small: FashionMNIST, tmp_path: Path, capsys,
                                            monkeypatch) -> None:
    """A buffer made without ``--logits true``: DATM computes expert 0's logits once (with a
    bar) and writes them into the shard, so the next run reads them."""
    buffer = write_buffer(tmp_path / "buffer", experts=1, epochs=4, shape=(1, 28, 28),
                          classes=10, dataset="FashionMNIST")
    before = TrajectoryBuffer(buffer)[0]
    assert before.logits is None

    def datm() -> DATM:
        return DATM(str(buffer), ipc=1, syn_steps=1, max_start_epoch=2, current_max_start_epoch=1,
                    num_classes=10, image_shape=(1, 28, 28))

    small.setup("fit")
    computed = datm().expert_logits(small)
    assert "DATM: expert logits" in capsys.readouterr().err
    after = TrajectoryBuffer(buffer)[0]
    assert after.logits is not None and torch.equal(after.logits, computed)
    assert after.logits.shape == (500, 10)
    assert torch.equal(after.trajectory, before.trajectory) and after.info == before.info

    stored = []
    monkeypatch.setattr(DATM, "_store_logits", lambda self, expert, logits: stored.append(1))
    assert torch.equal(datm().expert_logits(small), computed)
    assert stored == [], "the stored logits were computed again"
