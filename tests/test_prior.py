"""``ld3m prior`` (``ld3m.prior.train_prior``): a tiny latent diffusion prior trained on a few
Fashion-MNIST batches, its round trip through the generator folder, resumption and the CLI."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import pytest
import torch
from diffusers import AutoencoderKL
from ld3m.datamodules import FashionMNIST

from ld3m.cli import main
from ld3m.generator import CONFIG_NAME, LatentGenerator
from ld3m.prior import (
    DenoiserFit,
    build_autoencoder,
    build_denoiser,
    build_scheduler,
    parts_folder,
    train_prior,
)

TINY = dict(vae_channels=(8, 16), unet_channels=(16, 32), batch_size=32, lr=2e-3,
            limit_train_batches=6, trainer_kwargs={"accelerator": "cpu", "enable_progress_bar": False})


@pytest.fixture
def messages():
    """What the ``ld3m`` logger says during the test."""
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger("ld3m")
    handler, level = Collect(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """A prior trained for 3 + 3 epochs of 6 batches of 32 images, and its folder."""
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("prior") / "fmnist"
    data = FashionMNIST(data_dir=str(data_dir))
    generator = train_prior(data, folder, ae_epochs=3, denoiser_epochs=3, **TINY)
    return generator, folder, data


def test_round_trip_through_the_folder(trained):
    generator, folder, _ = trained
    assert (folder / CONFIG_NAME).is_file()
    assert not parts_folder(folder).exists()  # work in progress is cleaned up
    loaded = LatentGenerator.from_pretrained(folder)
    assert loaded.latent_shape == generator.latent_shape == (4, 14, 14)
    assert loaded.image_shape == (1, 28, 28)
    assert loaded.num_classes == 10 and loaded.null_class == 10
    assert loaded.image_mean == pytest.approx(FashionMNIST.mean)
    assert loaded.image_std == pytest.approx(FashionMNIST.std)
    assert loaded.scaling_factor == pytest.approx(generator.scaling_factor)
    assert loaded.scheduler.config.clip_sample is False
    g = torch.Generator().manual_seed(3)
    images = torch.randn(4, 1, 28, 28, generator=g)
    with torch.no_grad():
        z = generator.encode(images)
        torch.testing.assert_close(loaded.encode(images), z)
        c = generator.class_embedding([0, 1, 2, 9])
        noise = generator.draw_noise(4, g)
        mine = generator.render(z, c, 4, noise=noise, guidance=2.0)
        theirs = loaded.render(z, loaded.class_embedding([0, 1, 2, 9]), 4, noise=noise, guidance=2.0)
    assert mine.shape == (4, 1, 28, 28)
    torch.testing.assert_close(theirs, mine)
    assert torch.isfinite(mine).all()


def test_training_reduces_both_losses(trained):
    generator, _, data = trained
    ae, dn = generator.meta["autoencoder"], generator.meta["denoiser"]
    assert len(ae["loss_per_epoch"]) == 3 and len(dn["loss_per_epoch"]) == 3
    assert ae["loss_per_epoch"][-1] < ae["loss_per_epoch"][0]
    assert dn["loss_per_epoch"][-1] < dn["loss_per_epoch"][0]
    # held-out test images: the trained parts beat the untrained ones clearly
    assert ae["test_rec_mse"] < 0.7 * ae["test_rec_mse_before"]
    assert dn["test_denoising_mse"] < 0.9 * dn["test_denoising_mse_before"]
    # and the saved generator reconstructs test images better than their mean does
    images, _ = next(iter(data.test_dataloader()))
    images = images[:64]
    with torch.no_grad():
        rec = generator.decode(generator.encode(images))
    assert torch.mean((rec - images) ** 2) < 0.8 * torch.mean((images - images.mean()) ** 2)


def test_finished_folder_is_loaded_not_retrained(trained, messages):
    generator, folder, data = trained
    stamp = (folder / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    again = train_prior(data, folder, ae_epochs=3, denoiser_epochs=3, **TINY)
    assert any("already trained" in m for m in messages)
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp
    assert again.meta == json.loads((folder / CONFIG_NAME).read_text())["meta"]
    with pytest.raises(ValueError, match="other settings"):
        train_prior(data, folder, ae_epochs=4, denoiser_epochs=3, **TINY)


class _Interrupt(L.Callback):
    """Stop the denoiser's fit at the start of its second epoch (after one epoch's checkpoint)."""

    def on_train_epoch_start(self, trainer, pl_module):
        if isinstance(pl_module, DenoiserFit) and trainer.current_epoch == 1:
            raise RuntimeError("simulated kill")


def test_resume_skips_the_finished_autoencoder_and_the_done_epochs(data_dir, tmp_path, messages):
    torch.set_num_threads(1)
    data = FashionMNIST(data_dir=str(data_dir))
    folder = tmp_path / "prior"
    kwargs = {**TINY, "limit_train_batches": 2}
    interrupted = {**kwargs, "trainer_kwargs": {**TINY["trainer_kwargs"], "callbacks": [_Interrupt()]}}
    with pytest.raises(RuntimeError, match="simulated kill"):
        train_prior(data, folder, ae_epochs=1, denoiser_epochs=2, **interrupted)
    parts = parts_folder(folder)
    vae_file = parts / "autoencoder" / "diffusion_pytorch_model.safetensors"
    assert vae_file.is_file() and (parts / "autoencoder" / "stage.json").is_file()
    assert (parts / "ckpt" / "denoiser" / "last.ckpt").is_file()
    assert not (folder / CONFIG_NAME).exists()
    saved_vae = AutoencoderKL.from_pretrained(parts / "autoencoder").state_dict()
    with pytest.raises(ValueError, match="other settings"):  # the checkpoint is another denoiser's
        train_prior(data, folder, ae_epochs=1, denoiser_epochs=2, **{**kwargs, "unet_channels": (8, 16)})
    messages.clear()
    generator = train_prior(data, folder, ae_epochs=1, denoiser_epochs=2, **kwargs)
    assert any("skipping stage 1" in m for m in messages)
    assert not any("stage 1," in m for m in messages)
    assert any("resuming from" in m for m in messages)
    assert len(generator.meta["denoiser"]["loss_per_epoch"]) == 2  # epoch 1 kept, epoch 2 trained
    for key, value in generator.vae.state_dict().items():
        torch.testing.assert_close(value, saved_vae[key])
    assert (folder / CONFIG_NAME).is_file() and not parts.exists()


def test_cli_runs_end_to_end(data_dir, tmp_path):
    torch.set_num_threads(1)
    folder = tmp_path / "cli_prior"
    status = main(["prior", "--data", "FashionMNIST", "--data.data_dir", str(data_dir), "--folder",
                   str(folder), "--vae_channels", "8,16", "--unet_channels", "16,32",
                   "--ae_epochs", "1", "--denoiser_epochs", "1", "--batch_size", "16",
                   "--limit_train_batches", "2", "--accelerator", "cpu", "--progress_bar", "false",
                   "--num_train_timesteps", "100"])
    assert status == 0
    generator = LatentGenerator.from_pretrained(folder)
    assert generator.meta["settings"]["num_train_timesteps"] == 100
    assert generator.scheduler.config.num_train_timesteps == 100
    assert main(["prior", "--data", "NoSuchData", "--folder", str(tmp_path / "x")]) == 2
    assert main(["prior", "--data.data_dir", str(data_dir), "--folder", str(tmp_path / "y"),
                 "--downsample", "3"]) == 2


def test_cli_help_mentions_the_stages(capsys):
    assert main(["prior", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--ae_epochs", "--denoiser_epochs", "--limit_train_batches", "--downsample",
                 "resume"):
        assert flag in out


@pytest.mark.parametrize("bad, match", [
    ({"downsample": 3}, "downsample"),
    ({"downsample": 4}, "vae_channels"),  # (32, 64) is 2 levels, factor 4 needs 3
    ({"downsample": 4, "vae_channels": (8, 8, 16), "unet_channels": (16, 32)}, "unet_channels"),
    ({"unet_channels": (8, 16, 32)}, "at most 2 unet_channels"),  # 14 -> 7 -> 3.5
    ({"ae_epochs": 0}, "ae_epochs"),
    ({"denoiser_epochs": -1}, "denoiser_epochs"),
    ({"batch_size": 0}, "batch_size"),
    ({"latent_channels": 0}, "latent_channels"),
    ({"lr": 0.0}, "lr"),
    ({"kl_weight": -1.0}, "kl_weight"),
    ({"num_train_timesteps": 0}, "num_train_timesteps"),
    ({"vae_channels": "8,x"}, "vae_channels"),
    ({"unet_channels": ()}, "unet_channels"),
    ({"limit_train_batches": 0}, "limit_train_batches"),
])
def test_bad_arguments_raise_value_error(tmp_path, bad, match):
    data = FashionMNIST(data_dir=str(tmp_path / "never_read"))
    with pytest.raises(ValueError, match=match):
        train_prior(data, tmp_path / "p", **bad)
    assert not (tmp_path / "p").exists()


def test_whitened_data_and_foreign_folder_are_refused(tmp_path):
    with pytest.raises(ValueError, match="zca"):
        train_prior(FashionMNIST(data_dir=str(tmp_path), zca=True), tmp_path / "p")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an LD3M generator folder"):
        train_prior(FashionMNIST(data_dir=str(tmp_path)), foreign)


def test_factor_four_latents_fit_a_one_level_unet():
    """28x28 -> 7x7 latents with downsample 4: a one-level UNet (no resampling) renders 28x28."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        vae = build_autoencoder(1, 28, 4, (8, 8, 16))
        unet = build_denoiser(4, 7, 11, (16,))
    generator = LatentGenerator(vae, unet, build_scheduler(), 10, (1, 28, 28), null_class=10)
    assert generator.latent_shape == (4, 7, 7)
    images = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        z = generator.encode(images)
        out = generator.render(z, generator.class_embedding([0, 1]), 2, noise=torch.zeros_like(z))
    assert z.shape == (2, 4, 7, 7) and out.shape == (2, 1, 28, 28)


def test_parts_folder_is_next_to_the_output(tmp_path):
    assert parts_folder(tmp_path / "a" / "prior") == Path(tmp_path / "a" / "prior.parts")
