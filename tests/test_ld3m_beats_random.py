"""The method works: a short LD3M+DM run, through a small prior trained here with
``ld3m prior``'s :func:`ld3m.prior.train_prior`, beats random real images on Fashion-MNIST (IPC 1)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from ld3m.datamodules import FashionMNIST
from ld3m.datamodules.real import _Split
from ld3m.modules import LD3M

from ld3m.evaluation import random_real_set, train_and_test
from ld3m.prior import train_prior

TEST_IMAGES = 2000
NET = "ConvNetW32"


@pytest.mark.slow
def test_short_ld3m_dm_run_beats_random_real_images(data_dir: Path, tmp_path: Path) -> None:
    data = FashionMNIST(data_dir=str(data_dir), batch_per_class=32)
    data.setup("fit")
    test = data._test_split()
    data._test = _Split(test.labels[:TEST_IMAGES], test.cached[:TEST_IMAGES], None)
    folder = tmp_path / "prior"
    train_prior(data, folder, ae_epochs=2, denoiser_epochs=1, vae_channels=(16, 32),
                unet_channels=(16, 32), batch_size=64, lr=2e-3, limit_train_batches=40,
                trainer_kwargs={"accelerator": "cpu", "enable_progress_bar": False})

    model = LD3M(str(folder), ipc=1, objective="dm", steps=5, network=NET, lr_latent=0.1,
                 lr_embedding=0.1, seed=0)
    trainer = L.Trainer(max_steps=40, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, data)
    distilled = model.synthetic_set()
    assert torch.isfinite(distilled.images).all()
    assert distilled.extra["latents"].shape == (10, 4, 14, 14)

    def accuracy(synthetic, runs: int) -> float:
        return sum(train_and_test(synthetic, data, arch=NET, epochs=100, seed=run,
                                  accelerator="cpu") for run in range(runs)) / runs

    ld3m_acc = accuracy(distilled, runs=2)
    random_accs = [accuracy(random_real_set(data, 1, seed=s), runs=1) for s in (0, 1, 2)]
    assert ld3m_acc > max(random_accs), (ld3m_acc, random_accs)
