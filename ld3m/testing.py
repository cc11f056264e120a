"""Small random stand-ins for tests and benchmarks: a dataset, an expert buffer, a generator.

Nothing here is trained or downloaded: the images are seeded random bytes, the buffer's experts
are seeded random walks and the generator's diffusers models are randomly initialised, in the
real file layouts and key names, so code that reads a data module, a buffer folder or
``LatentGenerator.from_pretrained`` runs end to end in seconds (your own tests can use them too).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DModel, VQModel

from ld3m.datamodules.real import RealDataModule
from ld3m.generator import LatentGenerator
from ld3m.networks import get_network, reset_parameters
from ld3m.trajectories import ExpertTrajectory, flatten_parameters, parameter_layout, shard_name

__all__ = ["RandomImageData", "tiny_generator", "write_stand_in_buffer"]


class RandomImageData(RealDataModule):
    """Seeded random ``uint8`` images in a dataset's shapes (CIFAR's by default: 50,000
    training and 1,000 test images of 3 x 32 x 32 in 10 classes of equal size), cached like
    the real small datasets.

    Args:
        num_classes: Classes.
        image_shape: ``(C, H, W)``.
        train_images: Training images (spread evenly over the classes).
        test_images: Test images.
        **kwargs: Those of :class:`~ld3m.datamodules.real.RealDataModule`.
    """

    dataset_name = "RandomImages"

    def __init__(self, num_classes: int = 10, image_shape: tuple[int, int, int] = (3, 32, 32),
                 train_images: int = 50_000, test_images: int = 1_000, **kwargs) -> None:
        super().__init__(**{"data_dir": "unused", **kwargs})
        self.num_classes, self.image_shape = int(num_classes), tuple(image_shape)
        channels = self.image_shape[0]  # raw pixels when whitened, as every data module's
        self.mean, self.std = ((0.0,) * channels, (1.0,) * channels) if self.zca else (
            (0.5,) * channels, (0.25,) * channels)
        self.sizes = {True: int(train_images), False: int(test_images)}

    def _dataset(self, train: bool, transform):
        n = self.sizes[train]
        g = torch.Generator().manual_seed(0 if train else 1)
        return SimpleNamespace(data=torch.randint(0, 256, (n, *self.image_shape), generator=g,
                                                  dtype=torch.uint8),
                               targets=torch.arange(n) % self.num_classes)

    @staticmethod
    def _tensors(dataset):
        return dataset.data, dataset.targets


def write_stand_in_buffer(folder: str | Path, experts: int = 2, epochs: int = 4,
                          network: str = "ConvNetW32", shape: tuple[int, int, int] = (3, 16, 16),
                          classes: int = 3, dataset: str = "Tiny",
                          labels: torch.Tensor | None = None, zca: dict | None = None) -> Path:
    """A buffer of ``experts`` stand-in experts of ``network`` for ``classes`` classes of
    ``shape`` images: random walks (steps of 0.01) from seeded initialisations, one shard each,
    in the format ``ld3m buffer`` writes. With the training set's ``labels``, every shard also
    stores logits that classify 90 % of the images right (what DATM starts from); ``zca``: the
    whitening recorded (a data module's ``zca_settings``). Returns the folder."""
    folder = Path(folder)
    for index in range(experts):
        net = reset_parameters(get_network(network, shape[0], classes, shape[1]),
                               torch.Generator().manual_seed(index))
        g = torch.Generator().manual_seed(100 + index)
        rows = [flatten_parameters(net)]
        for _ in range(epochs):
            rows.append(rows[-1] + 0.01 * torch.randn(rows[-1].shape, generator=g))
        info = {"expert": index, "network": network, "dataset": dataset, "channels": shape[0],
                "num_classes": classes, "image_shape": list(shape), "epochs": epochs,
                "lr_teacher": 0.01, "batch_size": 256, "dsa": "none", "zca": zca or False,
                "seed": index, "params": parameter_layout(net)}
        logits = None
        if labels is not None:
            wrong = torch.rand(len(labels), generator=g) < 0.1
            shown = torch.where(wrong, (labels + 1) % classes, labels)
            logits = 4 * torch.nn.functional.one_hot(shown, classes).float() + torch.randn(
                len(labels), classes, generator=g)
        ExpertTrajectory(torch.stack(rows), info, logits).save(folder / shard_name(index))
    return folder


def tiny_generator(seed: int = 0, vae: str = "kl", null: bool = True, num_classes: int = 3,
                   image_mean: tuple[float, ...] = (0.2860,),
                   image_std: tuple[float, ...] = (0.3530,)) -> LatentGenerator:
    """A random tiny class-conditional latent diffusion model: a 2-level ``AutoencoderKL`` (or
    ``VQModel`` with ``vae="vq"``) from 1x16x16 images to 4x8x8 latents, a ``UNet2DModel``
    (16, 32) with ``num_classes`` classes (+ a null class with ``null``), a DDIM scheduler.
    The global RNG is used only under a fork, seeded by ``seed``."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        parts = dict(in_channels=1, out_channels=1, latent_channels=4, sample_size=16,
                     down_block_types=("DownEncoderBlock2D",) * 2,
                     up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                     layers_per_block=1, norm_num_groups=8, mid_block_add_attention=False)
        first_stage = (AutoencoderKL(**parts) if vae == "kl"
                       else VQModel(num_vq_embeddings=32, **parts))
        unet = UNet2DModel(sample_size=8, in_channels=4, out_channels=4,
                           block_out_channels=(16, 32), layers_per_block=1,
                           down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                           norm_num_groups=8, add_attention=False,
                           num_class_embeds=num_classes + (1 if null else 0))
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, set_alpha_to_one=True)
    return LatentGenerator(first_stage, unet, scheduler, num_classes, (1, 16, 16),
                           null_class=num_classes if null else None, image_mean=image_mean,
                           image_std=image_std, scaling_factor=1.0, meta={"test": True})
