"""The method works: a short DM run beats random real images on Fashion-MNIST (IPC 1)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from ld3m.datamodules import FashionMNIST
from ld3m.datamodules.real import _Split
from ld3m.modules import DM

from ld3m.evaluation import random_real_set, train_and_test

TEST_IMAGES = 2000  # a fixed, class-balanced-enough slice of the real test set keeps this quick


@pytest.mark.slow
def test_short_dm_run_beats_random_real_images(data_dir: Path) -> None:
    data = FashionMNIST(data_dir=str(data_dir), batch_per_class=32)
    data.setup("fit")
    test = data._test_split()
    data._test = _Split(test.labels[:TEST_IMAGES], test.cached[:TEST_IMAGES], None)

    model = DM(ipc=1, lr_img=10.0, seed=0)
    trainer = L.Trainer(max_steps=40, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, data)
    distilled = model.synthetic_set()

    def accuracy(synthetic, runs: int) -> float:
        return sum(train_and_test(synthetic, data, epochs=100, seed=run, accelerator="cpu")
                   for run in range(runs)) / runs

    dm_acc = accuracy(distilled, runs=2)
    # the baseline: other random draws, and DM's own starting point (seed 0 draws the init)
    random_accs = [accuracy(random_real_set(data, 1, seed=s), runs=1) for s in (0, 1, 2)]
    start = DM(ipc=1, seed=0, num_classes=10, image_shape=(1, 28, 28))
    start.initialise(data)
    assert not torch.equal(start.images, model.images), "DM did not move the images"
    assert dm_acc > max(random_accs), (dm_acc, random_accs)
