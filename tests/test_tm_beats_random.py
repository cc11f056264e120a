"""The methods work: short MTT and DATM runs, against a small buffer built here, beat random
real images on Fashion-MNIST (IPC 1)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from ld3m.datamodules import FashionMNIST
from ld3m.datamodules.real import _Split
from ld3m.modules import DATM, MTT

from ld3m.evaluation import random_real_set, train_and_test
from ld3m.experts import train_experts
from ld3m.trajectories import TrajectoryBuffer

TEST_IMAGES = 2000
TRAIN_IMAGES = 12000
NET = "ConvNetW32"


@pytest.fixture(scope="module")
def setting(data_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Fashion-MNIST (12,000 training and 2,000 test images) and 2 experts x 3 short epochs,
    with logits."""
    data = FashionMNIST(data_dir=str(data_dir), batch_per_class=1)
    data.setup("fit")
    test = data._test_split()
    data._test = _Split(test.labels[:TEST_IMAGES], test.cached[:TEST_IMAGES], None)
    train = data.train_split  # the first 12,000 training images: the experts' logits cost less
    data._train = _Split(train.labels[:TRAIN_IMAGES], train.cached[:TRAIN_IMAGES], None)
    folder = tmp_path_factory.mktemp("buffer")
    train_experts(data, folder, experts=2, epochs=3, network=NET, logits=True,
                  trainer_kwargs={"accelerator": "cpu", "enable_progress_bar": False,
                                  "limit_train_batches": 25})
    random_accs = [_accuracy(random_real_set(data, 1, seed=s), data, runs=1) for s in (0, 1, 2)]
    return data, folder, random_accs


class _AtStart(L.Callback):
    """Keeps DATM's soft labels as they were when training started."""

    soft_labels: torch.Tensor | None = None
    images: torch.Tensor | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        if getattr(pl_module, "soft_labels", None) is not None:
            self.soft_labels = pl_module.soft_labels.detach().clone()
            self.images = pl_module.images.detach().clone()


def _accuracy(synthetic, data, runs: int) -> float:
    return sum(train_and_test(synthetic, data, arch=NET, epochs=100, seed=run, accelerator="cpu")
               for run in range(runs)) / runs


@pytest.mark.slow
@pytest.mark.parametrize("method", [MTT, DATM], ids=["MTT", "DATM"])
def test_short_trajectory_matching_run_beats_random_real_images(setting, method) -> None:
    data, folder, random_accs = setting
    extra = {"current_max_start_epoch": None} if method is DATM else {}
    model = method(str(folder), ipc=1, syn_steps=10, expert_epochs=2, max_start_epoch=2,
                   lr_img=100.0, lr_lr=1e-5, gradient="unroll", **extra)
    start = _AtStart()
    trainer = L.Trainer(max_steps=30, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[start])
    trainer.fit(model, data)
    distilled = model.synthetic_set()
    assert distilled.lr is not None and distilled.lr.item() != 0.01  # the learned lr is exported
    acc = _accuracy(distilled, data, runs=2)
    assert acc > max(random_accs), (acc, random_accs)
    if method is DATM:
        # the soft labels start at the mean logits of the experts right on each (real,
        # correctly classified) image, are trained (DATM lets them drift, even across classes)
        # and are exported as trained
        expert_logits = TrajectoryBuffer(folder)[0].logits
        nearest = torch.cdist(start.images.flatten(1), data.train_split.images(
            torch.arange(TRAIN_IMAGES), data).flatten(1),
                              compute_mode="donot_use_mm_for_euclid_dist").min(1)
        assert torch.all(nearest.values < 1e-4), nearest.values  # real training images
        assert torch.equal(expert_logits[nearest.indices].argmax(1), distilled.labels)
        assert torch.allclose(start.soft_labels,
                              model.initial_soft_labels(start.images, distilled.labels), atol=1e-5)
        assert torch.equal(start.soft_labels.argmax(1), distilled.labels)
        assert not torch.allclose(distilled.soft_labels, start.soft_labels)
        assert torch.equal(distilled.soft_labels, model.soft_labels.detach())
