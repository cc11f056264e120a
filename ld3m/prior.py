"""Train a small class-conditional latent diffusion prior on real data (``ld3m prior``).

LD3M needs a frozen class-conditional latent diffusion model (:class:`ld3m.generator.LatentGenerator`).
For a domain with no pretrained model (Fashion-MNIST here) :func:`train_prior` trains one:

1. **Autoencoder** (one Lightning ``fit``): a small diffusers :class:`~diffusers.AutoencoderKL`
   (``downsample`` 2 or 4: one resolution level per factor of 2) on the real training images
   mapped to ``[-1, 1]`` (the diffusers convention the generator uses), loss
   ``L1 + L2`` reconstruction of a posterior sample plus ``kl_weight`` times the KL to N(0, I)
   (per pixel).
2. **Latent scale**: ``scaling_factor = 1 / std`` of the posterior means of up to 2,048
   training images, so the denoiser sees unit-variance latents.
3. **Denoiser** (a second Lightning ``fit``, the autoencoder frozen): a class-conditional
   :class:`~diffusers.UNet2DModel` (``class_embed_type=None``, ``num_class_embeds = K + 1``, the
   last row the *null* class; with ``null_class`` the label is replaced by it with probability
   0.1, classifier-free guidance's dropout) trained with the epsilon-prediction DDPM loss
   ``|eps - unet(add_noise(z, eps, t), t, y)|^2``, ``t`` uniform in ``[0, num_train_timesteps)``,
   the noise schedule LDM's (``scaled_linear``, betas 0.00085 .. 0.012).
4. The parts and a :class:`~diffusers.DDIMScheduler` with the same schedule (``clip_sample=False``,
   ``set_alpha_to_one=False`` as LDM's DDIM sampler, whose last step uses ``alphas_cumprod[0]``)
   become a :class:`~ld3m.generator.LatentGenerator` with the dataset's ``image_mean``/``image_std``,
   saved with ``save_pretrained(folder)``.

**Image sizes.** No padding: the image side must be a multiple of ``downsample`` (Fashion-MNIST
28x28 -> latent 14x14 with ``downsample=2``, 7x7 with 4), and the latent side a multiple of
``2 ** (len(unet_channels) - 1)`` (the UNet halves it at every level but the last): 14x14 with
two UNet levels (14 -> 7), 7x7 with one. Otherwise a ``ValueError`` says what fits.

**Resuming.** Work in progress lives next to the output, in ``<folder>.parts/``:

- ``autoencoder/`` (the trained VAE in diffusers layout plus ``stage.json``: settings, loss per
  epoch, reconstruction error, seconds), written atomically when stage 1 is done;
- ``denoiser/`` likewise for stage 2 (the UNet plus ``stage.json``, with the scaling factor);
- ``ckpt/<stage>/last.ckpt``: Lightning's checkpoint after every epoch of the running stage, from
  which an interrupted stage resumes (at the epoch boundary; the private noise generators restart,
  so a resumed run is not bit-identical to an uninterrupted one), if it was written with the
  same settings (``ckpt/<stage>.settings.json``).

A second call skips every finished stage (and returns the saved generator when ``folder`` is
done); ``<folder>.parts`` is removed once ``folder`` is written. Settings that differ from a
finished stage's raise ``ValueError`` instead of mixing two priors.

The training history (loss per epoch, reconstruction MSE in ``[0, 1]`` pixel units and denoising
MSE on held-out test images before and after training, seconds per stage) is kept in the
generator's ``meta`` (``ld3m_generator.json``); the seconds of a resumed stage are those of the
session that finished it.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DModel
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from ld3m.datamodules.real import RealDataModule
from ld3m.files import atomic_dir
from ld3m.generator import _LOW_CPU_MEM, CONFIG_NAME, LatentGenerator

__all__ = ["NULL_DROPOUT", "build_autoencoder", "build_denoiser", "build_scheduler", "parts_folder",
           "train_prior"]

log = logging.getLogger("ld3m")

#: Probability of replacing a label by the null class while training the denoiser.
NULL_DROPOUT = 0.1
#: Training images whose latents set the scaling factor.
SCALE_IMAGES = 2048
#: Held-out test images of the before/after metrics.
EVAL_IMAGES = 256
STAGE_FILE = "stage.json"


# ---------------------------------------------------------------------------------- parts
def _groups(channels: tuple[int, ...]) -> int:
    """GroupNorm groups dividing every channel count (at most 32)."""
    g = 0
    for c in channels:
        g = math.gcd(g, c)
    return math.gcd(g, 32)


def build_autoencoder(image_channels: int, image_size: int, latent_channels: int = 4,
                      vae_channels: tuple[int, ...] = (32, 64)) -> AutoencoderKL:
    """A small ``AutoencoderKL``; it downsamples by ``2 ** (len(vae_channels) - 1)``."""
    n = len(vae_channels)
    return AutoencoderKL(in_channels=image_channels, out_channels=image_channels,
                         latent_channels=latent_channels, sample_size=image_size,
                         down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n,
                         block_out_channels=tuple(vae_channels), layers_per_block=1,
                         norm_num_groups=_groups(tuple(vae_channels)),
                         mid_block_add_attention=False)


def build_denoiser(latent_channels: int, latent_size: int, num_class_embeds: int,
                   unet_channels: tuple[int, ...] = (64, 128)) -> UNet2DModel:
    """A class-conditional ``UNet2DModel`` (``class_embed_type=None``, an ``nn.Embedding`` table)."""
    n = len(unet_channels)
    return UNet2DModel(sample_size=latent_size, in_channels=latent_channels,
                       out_channels=latent_channels, block_out_channels=tuple(unet_channels),
                       layers_per_block=1, down_block_types=("DownBlock2D",) * n,
                       up_block_types=("UpBlock2D",) * n, norm_num_groups=_groups(tuple(unet_channels)),
                       add_attention=True, attention_head_dim=None,
                       class_embed_type=None, num_class_embeds=num_class_embeds)


def build_scheduler(num_train_timesteps: int = 1000) -> DDIMScheduler:
    """LDM's noise schedule as a DDIM scheduler (used for ``add_noise`` in training and by the generator)."""
    return DDIMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="scaled_linear",
                         beta_start=0.00085, beta_end=0.012, clip_sample=False,
                         set_alpha_to_one=False, steps_offset=0, prediction_type="epsilon")


def parts_folder(folder: str | Path) -> Path:
    """Where :func:`train_prior` keeps its finished stages and checkpoints: ``<folder>.parts``."""
    folder = Path(folder)
    return folder.with_name(folder.name + ".parts")


# ---------------------------------------------------------------------------------- Lightning
class _EpochHistory(L.LightningModule):
    """Mean training loss per finished epoch, kept through Lightning checkpoints."""

    def __init__(self) -> None:
        super().__init__()
        self.history: list[float] = []
        self._sum, self._count = 0.0, 0

    def _record(self, loss: torch.Tensor) -> None:
        self._sum += float(loss.detach())
        self._count += 1

    def on_train_epoch_end(self) -> None:
        self.history.append(self._sum / max(1, self._count))
        self._sum, self._count = 0.0, 0

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["ld3m_history"] = list(self.history)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.history = list(checkpoint.get("ld3m_history", []))


class AutoencoderFit(_EpochHistory):
    """Stage 1: fit an ``AutoencoderKL`` on images in ``[-1, 1]`` (reconstruction + KL)."""

    def __init__(self, vae: AutoencoderKL, image_mean: tuple[float, ...], image_std: tuple[float, ...],
                 lr: float = 1e-3, kl_weight: float = 1e-4, seed: int = 0) -> None:
        super().__init__()
        self.vae = vae
        self.lr, self.kl_weight, self.seed = lr, kl_weight, seed
        self.register_buffer("_scale", torch.tensor(image_std).mul(2).view(-1, 1, 1), persistent=False)
        self.register_buffer("_shift", torch.tensor(image_mean).mul(2).sub(1).view(-1, 1, 1),
                             persistent=False)
        self._gen: torch.Generator | None = None

    def on_fit_start(self) -> None:
        self._gen = torch.Generator(device=self.device).manual_seed(self.seed + 11)

    def training_step(self, batch, batch_idx):
        x = batch[0] * self._scale + self._shift
        posterior = self.vae.encode(x).latent_dist
        rec = self.vae.decode(posterior.sample(generator=self._gen)).sample
        rec_loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        kl = posterior.kl().mean() / x[0].numel()
        loss = rec_loss + self.kl_weight * kl
        self._record(loss)
        self.log_dict({"rec": rec_loss, "kl": kl}, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.vae.parameters(), lr=self.lr, weight_decay=0.0)


class DenoiserFit(_EpochHistory):
    """Stage 2: fit a class-conditional ``UNet2DModel`` on the frozen autoencoder's latents (DDPM loss)."""

    def __init__(self, unet: UNet2DModel, vae: AutoencoderKL, scheduler: DDIMScheduler,
                 scaling_factor: float, image_mean: tuple[float, ...], image_std: tuple[float, ...],
                 num_classes: int, null_class: bool = True, lr: float = 1e-3, seed: int = 0) -> None:
        super().__init__()
        self.unet = unet
        self._frozen = {"vae": vae.requires_grad_(False).eval()}  # not a submodule: not checkpointed
        self.scheduler = scheduler
        self.scaling_factor = float(scaling_factor)
        self.num_classes, self.null_class = num_classes, null_class
        self.lr, self.seed = lr, seed
        self.register_buffer("_scale", torch.tensor(image_std).mul(2).view(-1, 1, 1), persistent=False)
        self.register_buffer("_shift", torch.tensor(image_mean).mul(2).sub(1).view(-1, 1, 1),
                             persistent=False)
        self._gen: torch.Generator | None = None

    def on_fit_start(self) -> None:
        self._frozen["vae"].to(self.device)
        self._gen = torch.Generator(device=self.device).manual_seed(self.seed + 23)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        with torch.no_grad():
            posterior = self._frozen["vae"].encode(images * self._scale + self._shift).latent_dist
            z = posterior.sample(generator=self._gen) * self.scaling_factor
        n = z.shape[0]
        noise = torch.randn(z.shape, generator=self._gen, device=z.device, dtype=z.dtype)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (n,), generator=self._gen,
                          device=z.device)
        labels = labels.to(z.device).long()
        if self.null_class:
            drop = torch.rand(n, generator=self._gen, device=z.device) < NULL_DROPOUT
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        noisy = self.scheduler.add_noise(z, noise, t)
        pred = self.unet(noisy, t, class_labels=labels).sample
        loss = F.mse_loss(pred, noise)
        self._record(loss)
        self.log("loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.unet.parameters(), lr=self.lr, weight_decay=0.0)


# ---------------------------------------------------------------------------------- metrics
def _pixel_map(data: RealDataModule, device) -> tuple[torch.Tensor, torch.Tensor]:
    scale = torch.tensor(data.std, device=device).mul(2).view(-1, 1, 1)
    shift = torch.tensor(data.mean, device=device).mul(2).sub(1).view(-1, 1, 1)
    return scale, shift


def _eval_batch(data: RealDataModule, n: int = EVAL_IMAGES) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` test images (normalised) and labels."""
    xs, ys, have = [], [], 0
    for x, y in data.test_dataloader():
        xs.append(x)
        ys.append(y)
        have += len(x)
        if have >= n:
            break
    return torch.cat(xs)[:n], torch.cat(ys)[:n]


@torch.no_grad()
def reconstruction_mse(vae: AutoencoderKL, data: RealDataModule, images: torch.Tensor) -> float:
    """MSE of the posterior-mean reconstruction, in ``[0, 1]`` pixel units."""
    device = next(vae.parameters()).device
    scale, shift = _pixel_map(data, device)
    x = images.to(device) * scale + shift
    rec = vae.decode(vae.encode(x).latent_dist.mean).sample
    return float(F.mse_loss(rec, x)) / 4.0


@torch.no_grad()
def denoising_mse(unet: UNet2DModel, vae: AutoencoderKL, scheduler: DDIMScheduler, scaling_factor: float,
                  data: RealDataModule, images: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> float:
    """The epsilon-prediction loss on fixed (latent, noise, timestep) triples of held-out images."""
    device = next(unet.parameters()).device
    scale, shift = _pixel_map(data, device)
    z = vae.encode(images.to(device) * scale + shift).latent_dist.mean * scaling_factor
    g = torch.Generator().manual_seed(seed + 31)
    noise = torch.randn(z.shape, generator=g).to(device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(z),), generator=g).to(device)
    pred = unet(scheduler.add_noise(z, noise, t), t, class_labels=labels.to(device).long()).sample
    return float(F.mse_loss(pred, noise))


# ---------------------------------------------------------------------------------- helpers
def _channels(name: str, value) -> tuple[int, ...]:
    if isinstance(value, str):
        value = [v for v in value.replace(" ", "").split(",") if v]
    try:
        out = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a list of channel counts, got {value!r}") from None
    if not out or min(out) < 1:
        raise ValueError(f"{name} must be a non-empty list of positive channel counts, got {value!r}")
    return out


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _read_stage(path: Path) -> dict[str, Any] | None:
    file = path / STAGE_FILE
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON ({err}); delete {path} to retrain that stage") from err


def _check_same(where: Path, saved: dict[str, Any], wanted: dict[str, Any]) -> None:
    different = {k: (saved.get(k), v) for k, v in wanted.items() if saved.get(k) != v}
    if different:
        raise ValueError(f"{where} was trained with other settings (saved vs asked: {different}); "
                         "use another folder or delete it")


def _fit(module: L.LightningModule, loader: DataLoader, epochs: int, ckpt_dir: Path,
         trainer_kwargs: dict[str, Any], stage: str, settings: dict[str, Any]) -> None:
    """One Lightning fit with a ``last.ckpt`` after every epoch, resumed from it if present
    (only if it was written with the same ``settings``)."""
    kwargs = {"logger": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
              **trainer_kwargs}
    for owned in ("max_epochs", "enable_checkpointing"):
        kwargs.pop(owned, None)
    callbacks = list(kwargs.pop("callbacks", None) or [])
    settings_file = ckpt_dir.with_name(ckpt_dir.name + ".settings.json")  # not in Lightning's dir
    if settings_file.is_file():
        _check_same(ckpt_dir, json.loads(settings_file.read_text()), settings)
    else:
        ckpt_dir.parent.mkdir(parents=True, exist_ok=True)
        settings_file.write_text(json.dumps(settings, indent=2) + "\n")
    callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="last", save_top_k=1,
                                     every_n_epochs=1, enable_version_counter=False))  # overwritten
    trainer = L.Trainer(max_epochs=epochs, callbacks=callbacks, enable_checkpointing=True, **kwargs)
    last = ckpt_dir / "last.ckpt"
    if last.is_file():
        log.info("%s: resuming from %s", stage, last)
    trainer.fit(module, train_dataloaders=loader, ckpt_path=str(last) if last.is_file() else None)
    if trainer.interrupted or len(module.history) < epochs:
        raise RuntimeError(f"{stage} stopped after {len(module.history)} of {epochs} epochs; run "
                           f"again to resume from {last}")


def _loader(data: RealDataModule, batch_size: int, seed: int) -> DataLoader:
    dataset = data.train_split.dataset(data)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=data.num_workers,
                      generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _latent_scale(vae: AutoencoderKL, data: RealDataModule, seed: int, batch_size: int) -> float:
    device = next(vae.parameters()).device
    scale, shift = _pixel_map(data, device)
    latents, have = [], 0
    for x, _ in _loader(data, batch_size, seed + 5):
        latents.append(vae.encode(x.to(device) * scale + shift).latent_dist.mean.float().cpu())
        have += len(x)
        if have >= SCALE_IMAGES:
            break
    std = float(torch.cat(latents).std())
    if not math.isfinite(std) or std <= 0:
        raise FloatingPointError(f"the autoencoder's latents have std {std}; cannot scale them")
    return 1.0 / std


# ---------------------------------------------------------------------------------- main
def train_prior(data: RealDataModule, folder: str | Path, *, latent_channels: int = 4,
                downsample: int = 2, vae_channels=(32, 64), unet_channels=(64, 128),
                ae_epochs: int = 10, denoiser_epochs: int = 30, batch_size: int = 128,
                lr: float = 1e-3, kl_weight: float = 1e-4, num_train_timesteps: int = 1000,
                null_class: bool = True, seed: int = 0, trainer_kwargs: dict | None = None,
                limit_train_batches: int | float | None = None) -> LatentGenerator:
    """Train an autoencoder, then a class-conditional latent denoiser, and save a generator.

    See the module docstring for the method, the image sizes and the resumption.

    Args:
        data: The real dataset (not ZCA-whitened).
        folder: Output folder (``LatentGenerator.save_pretrained`` layout).
        latent_channels: Channels of the latent.
        downsample: Spatial factor of the autoencoder (2 or 4).
        vae_channels: Channels per autoencoder level (``log2(downsample) + 1`` levels).
        unet_channels: Channels per UNet level (the latent side must divide by
            ``2 ** (levels - 1)``).
        ae_epochs: Epochs of stage 1.
        denoiser_epochs: Epochs of stage 2.
        batch_size: Minibatch size of both stages.
        lr: AdamW learning rate of both stages.
        kl_weight: Weight of the (per-pixel) KL term of the autoencoder loss.
        num_train_timesteps: Diffusion timesteps of the noise schedule.
        null_class: Add a null class (row ``K``) trained by label dropout (p = 0.1), for
            classifier-free guidance.
        seed: Seed of the initialisations, shuffling and noise.
        trainer_kwargs: Extra ``lightning.Trainer`` arguments (accelerator, precision, ...).
        limit_train_batches: Batches per epoch (int) or fraction of the training set.

    Returns:
        The trained generator (also saved in ``folder``).

    Raises:
        ValueError: bad arguments, sizes that do not fit, or a ``folder`` (or finished stage)
            trained with other settings.
    """
    if downsample not in (2, 4):
        raise ValueError(f"downsample must be 2 or 4, got {downsample!r}")
    latent_channels = _positive_int("latent_channels", latent_channels)
    ae_epochs = _positive_int("ae_epochs", ae_epochs)
    denoiser_epochs = _positive_int("denoiser_epochs", denoiser_epochs)
    batch_size = _positive_int("batch_size", batch_size)
    num_train_timesteps = _positive_int("num_train_timesteps", num_train_timesteps)
    vae_channels = _channels("vae_channels", vae_channels)
    unet_channels = _channels("unet_channels", unet_channels)
    if not (isinstance(lr, int | float) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if not (isinstance(kl_weight, int | float) and kl_weight >= 0 and math.isfinite(kl_weight)):
        raise ValueError(f"kl_weight must be a non-negative number, got {kl_weight!r}")
    if limit_train_batches is not None and (isinstance(limit_train_batches, bool)
                                            or not limit_train_batches > 0):
        raise ValueError(f"limit_train_batches must be positive, got {limit_train_batches!r}")
    levels = int(math.log2(downsample)) + 1
    if len(vae_channels) != levels:
        raise ValueError(f"downsample={downsample} needs {levels} vae_channels (one per level), "
                         f"got {list(vae_channels)}")
    if getattr(data, "zca", False):
        raise ValueError("train the prior on unwhitened images (zca=False): the generator renders "
                         "images in the dataset's mean/std space")
    c, h, w = (int(s) for s in data.image_shape)
    if h % downsample or w % downsample:
        raise ValueError(f"{h}x{w} images do not divide by downsample={downsample}")
    lh, lw = h // downsample, w // downsample
    unet_factor = 2 ** (len(unet_channels) - 1)
    if lh % unet_factor or lw % unet_factor:
        fits = max(k for k in range(1, len(unet_channels) + 1)
                   if lh % 2 ** (k - 1) == 0 and lw % 2 ** (k - 1) == 0)
        raise ValueError(f"the {lh}x{lw} latent does not divide by {unet_factor}, the downsampling of "
                         f"{len(unet_channels)} UNet levels; use at most {fits} unet_channels")
    num_classes = int(data.num_classes)
    mean, std = tuple(float(m) for m in data.mean), tuple(float(s) for s in data.std)
    trainer_kwargs = {**(trainer_kwargs or {})}
    if limit_train_batches is not None:
        trainer_kwargs["limit_train_batches"] = limit_train_batches

    ae_settings = {"dataset": data.dataset_name, "image_shape": [c, h, w], "latent_channels": latent_channels,
                   "downsample": downsample, "vae_channels": list(vae_channels), "ae_epochs": ae_epochs,
                   "batch_size": batch_size, "lr": lr, "kl_weight": kl_weight, "seed": seed,
                   "limit_train_batches": limit_train_batches}
    dn_settings = {**ae_settings, "unet_channels": list(unet_channels), "denoiser_epochs": denoiser_epochs,
                   "num_train_timesteps": num_train_timesteps, "null_class": bool(null_class)}
    folder = Path(folder)
    parts = parts_folder(folder)

    if (folder / CONFIG_NAME).is_file():
        saved = json.loads((folder / CONFIG_NAME).read_text()).get("meta", {}).get("settings", {})
        _check_same(folder, saved, dn_settings)
        log.info("prior: %s is already trained; loading it", folder)
        return LatentGenerator.from_pretrained(folder)
    if folder.exists() and any(folder.iterdir()):
        raise ValueError(f"{folder} exists and is not an LD3M generator folder; not overwriting it")

    data.setup("fit")
    eval_images, eval_labels = _eval_batch(data)
    scheduler = build_scheduler(num_train_timesteps)

    # -------------------------------------------------------------- stage 1: the autoencoder
    ae_dir = parts / "autoencoder"
    ae_stage = _read_stage(ae_dir)
    if ae_stage is not None:
        _check_same(ae_dir, ae_stage.get("settings", {}), ae_settings)
        log.info("prior: autoencoder already trained (%s); skipping stage 1", ae_dir)
        vae = AutoencoderKL.from_pretrained(ae_dir, local_files_only=True, low_cpu_mem_usage=_LOW_CPU_MEM)
    else:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            vae = build_autoencoder(c, h, latent_channels, vae_channels)
        before = reconstruction_mse(vae, data, eval_images)
        module = AutoencoderFit(vae, mean, std, lr=lr, kl_weight=kl_weight, seed=seed)
        start = time.perf_counter()
        log.info("prior: stage 1, autoencoder %s -> latent %dx%dx%d, %d epochs", vae_channels,
                 latent_channels, lh, lw, ae_epochs)
        _fit(module, _loader(data, batch_size, seed + 1), ae_epochs, parts / "ckpt" / "autoencoder",
             trainer_kwargs, "autoencoder", ae_settings)
        vae = module.vae.cpu().eval()
        after = reconstruction_mse(vae, data, eval_images)
        ae_stage = {"settings": ae_settings, "loss_per_epoch": module.history,
                    "test_rec_mse_before": before, "test_rec_mse": after,
                    "seconds": time.perf_counter() - start}
        with atomic_dir(ae_dir) as tmp:
            vae.save_pretrained(tmp, safe_serialization=True)
            (tmp / STAGE_FILE).write_text(json.dumps(ae_stage, indent=2) + "\n")
        shutil.rmtree(parts / "ckpt" / "autoencoder", ignore_errors=True)
        (parts / "ckpt" / "autoencoder.settings.json").unlink(missing_ok=True)
        log.info("prior: autoencoder done in %.0f s, test reconstruction MSE %.4f -> %.4f",
                 ae_stage["seconds"], before, after)
    vae.requires_grad_(False).eval()

    # -------------------------------------------------------------- stage 2: the denoiser
    dn_dir = parts / "denoiser"
    dn_stage = _read_stage(dn_dir)
    if dn_stage is not None:
        _check_same(dn_dir, dn_stage.get("settings", {}), dn_settings)
        log.info("prior: denoiser already trained (%s); skipping stage 2", dn_dir)
        unet = UNet2DModel.from_pretrained(dn_dir, local_files_only=True, low_cpu_mem_usage=_LOW_CPU_MEM)
    else:
        scaling_factor = _latent_scale(vae, data, seed, batch_size)
        with torch.random.fork_rng():
            torch.manual_seed(seed + 2)
            unet = build_denoiser(latent_channels, lh, num_classes + int(bool(null_class)),
                                  unet_channels)
        before = denoising_mse(unet, vae, scheduler, scaling_factor, data, eval_images, eval_labels, seed)
        module = DenoiserFit(unet, vae, scheduler, scaling_factor, mean, std, num_classes,
                             null_class=null_class, lr=lr, seed=seed)
        start = time.perf_counter()
        log.info("prior: stage 2, denoiser %s on %dx%dx%d latents (scale %.4f), %d epochs",
                 unet_channels, latent_channels, lh, lw, scaling_factor, denoiser_epochs)
        _fit(module, _loader(data, batch_size, seed + 3), denoiser_epochs,
             parts / "ckpt" / "denoiser", trainer_kwargs, "denoiser", dn_settings)
        unet = module.unet.cpu().eval()
        vae.cpu()
        after = denoising_mse(unet, vae, scheduler, scaling_factor, data, eval_images, eval_labels, seed)
        dn_stage = {"settings": dn_settings, "scaling_factor": scaling_factor,
                    "loss_per_epoch": module.history, "test_denoising_mse_before": before,
                    "test_denoising_mse": after, "seconds": time.perf_counter() - start}
        with atomic_dir(dn_dir) as tmp:
            unet.save_pretrained(tmp, safe_serialization=True)
            (tmp / STAGE_FILE).write_text(json.dumps(dn_stage, indent=2) + "\n")
        shutil.rmtree(parts / "ckpt" / "denoiser", ignore_errors=True)
        (parts / "ckpt" / "denoiser.settings.json").unlink(missing_ok=True)
        log.info("prior: denoiser done in %.0f s, test denoising MSE %.4f -> %.4f",
                 dn_stage["seconds"], before, after)

    # -------------------------------------------------------------- the generator
    scaling_factor = float(dn_stage["scaling_factor"])
    vae.register_to_config(scaling_factor=scaling_factor)
    meta = {"trained_by": "ld3m prior", "settings": dn_settings,
            "autoencoder": {k: v for k, v in ae_stage.items() if k != "settings"},
            "denoiser": {k: v for k, v in dn_stage.items() if k != "settings"}}
    generator = LatentGenerator(vae, unet, scheduler, num_classes, (c, h, w),
                                null_class=num_classes if null_class else None, image_mean=mean,
                                image_std=std, scaling_factor=scaling_factor, meta=meta)
    generator.save_pretrained(folder)
    shutil.rmtree(parts, ignore_errors=True)
    log.info("prior: generator saved to %s", folder)
    return generator
