"""The methods work: short DC and DSA runs beat random real images on Fashion-MNIST (IPC 1)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from ld3m.datamodules import FashionMNIST
from ld3m.datamodules.real import _Split
from ld3m.modules import DC, DSA

from ld3m.evaluation import random_real_set, train_and_test

TEST_IMAGES = 2000  # a fixed slice of the real test set keeps this quick
NET = "ConvNetW32"  # ConvNet-3 at width 32: the same method, a quarter of the cost


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("method, steps", [(DC, 30), (DSA, 30)], ids=["DC", "DSA"])
def test_short_gradient_matching_run_beats_random_real_images(data_dir: Path, method, steps: int) -> None:
    data = FashionMNIST(data_dir=str(data_dir), batch_per_class=16)
    data.setup("fit")
    test = data._test_split()
    data._test = _Split(test.labels[:TEST_IMAGES], test.cached[:TEST_IMAGES], None)

    model = method(ipc=1, network=NET, seed=0)  # DC from noise, DSA from real (seed 0's draw)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(model, data)
    distilled = model.synthetic_set()
    dsa = "none" if method is DC else "color_crop_cutout_flip_scale_rotate"

    def accuracy(synthetic, runs: int) -> float:
        return sum(train_and_test(synthetic, data, arch=NET, epochs=100, dsa=dsa, seed=run,
                                  accelerator="cpu") for run in range(runs)) / runs

    acc = accuracy(distilled, runs=2)
    # three random draws (seed 0's is also DSA's starting point): beat their mean by 2 points
    random_accs = [accuracy(random_real_set(data, 1, seed=s), runs=1) for s in (0, 1, 2)]
    # measured here: DC 58.3 %, DSA 59.2 % against draws of 53.5 / 56.5 / 51.0 % and
    # 52.2 / 58.0 / 47.3 % (the random-image accuracy varies with the evaluation's seed)
    assert acc > sum(random_accs) / len(random_accs) + 0.02, (acc, random_accs)
    if method is DSA:
        assert not torch.equal(distilled.images, random_real_set(data, 1, seed=0).images)
