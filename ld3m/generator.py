"""The frozen class-conditional latent diffusion generator of LD3M, built from diffusers parts.

LD3M (Moser et al. 2024) learns, per synthetic image, a latent ``z`` and a class embedding ``c``
and renders the image by running a pretrained class-conditional latent diffusion model from
``z``. :class:`LatentGenerator` is that model, frozen:

- ``vae``: the first stage, an :class:`~diffusers.AutoencoderKL` or a :class:`~diffusers.VQModel`;
- ``denoiser``: a class-conditional :class:`~diffusers.UNet2DModel` built with
  ``class_embed_type=None`` and ``num_class_embeds=K`` (or ``K + 1``, the last row being the
  *null* class of classifier-free guidance), or a :class:`~diffusers.DiTTransformer2DModel`
  (a diffusers ``DiTPipeline`` folder such as ``facebook/DiT-XL-2-256``; the DiT specifics
  are in :mod:`ld3m.dit`), or a :class:`~diffusers.UNet2DConditionModel` conditioned by
  cross-attention on one context token, the class vector ``c`` (``encoder_hidden_states =
  c[:, None, :]``, as LDM's ``ClassEmbedder`` for ``cin256-v2``; see :mod:`ld3m.ldm`), its class
  table then held by the generator (``class_embedder``);
- ``scheduler``: a :class:`~diffusers.DDIMScheduler` (only its noise schedule and timestep
  spacing are used; the DDIM update with LD3M's skip is computed here);
- ``scaling_factor`` (and ``shift_factor``): ``z = (vae latent - shift) * scale``.

**Image space.** :meth:`LatentGenerator.encode` takes and :meth:`LatentGenerator.decode` returns
images in the *normalised* space of the dataset, ``(pixel - image_mean) / image_std`` with
pixels in ``[0, 1]`` (the space of ``ld3m.synthetic.SyntheticSet``). The autoencoder itself sees
pixels in ``[-1, 1]`` (``2 * pixel - 1``, the diffusers convention): a prior trained for ld3m
must be trained on that range. The default ``image_mean = image_std = 0.5`` makes the two spaces
the same. Decoded images are not clamped (clamping would stop the gradient).

**Learned class embeddings.** ``UNet2DModel.forward`` adds ``class_embedding(class_labels)`` to
the time embedding. The generator replaces the UNet's ``nn.Embedding`` by
:class:`VectorClassEmbedding`, a subclass that shares the same weight (so ``state_dict`` keys,
``save_pretrained`` and the diffusers config are unchanged) and whose forward passes a *float*
tensor ``(N, embed_dim)`` through unchanged, while integer labels are still looked up in the
table. So ``denoiser(x, t, class_labels=c)`` with ``c`` a float embedding vector conditions on
``c`` exactly as ``class_labels=k`` conditions on row ``k``, and gradients flow into ``c``.
:meth:`LatentGenerator.class_embedding` gives the table rows used to initialise ``c``. A DiT
has a (identical) copy of its class table in every block's adaLN-Zero ``norm1.emb``: each is
wrapped the same way and one vector ``c`` per image conditions every block, as DiT's single
class embedder does (see :mod:`ld3m.dit`). A ``UNet2DConditionModel`` has no table of its own:
the generator's ``class_embedder`` (a :class:`VectorClassEmbedding`) holds it, and ``c`` is the
cross-attention context.

**Rendering** (:meth:`LatentGenerator.render`): ``z_T = sqrt(a_T) z + sqrt(1 - a_T) noise`` at
the first timestep ``t_T`` of a ``T``-step DDIM schedule, then ``T`` DDIM steps (eta 0). After
each step's prediction ``x0_hat`` (and the scheduler's ``clip_sample``, if set)::

    x0_hat = (1 - i / T') * x0_hat + (i / T') * z,   i = T' ... 0,  T' = T - 1

(:meth:`skip_weights`: weight 1 at the first step, 0 at the last; ``[0.0]`` for ``T = 1``); the
step then continues with the model's noise prediction, ``x_prev = sqrt(a_prev) x0_hat +
sqrt(1 - a_prev) eps``, as in LD3M's DDIM sampler. The last step uses the scheduler's
``final_alpha_cumprod``. Optional classifier-free guidance: ``out = out_null + g (out_c -
out_null)`` on the model output, the null row of the table for ``out_null`` (one batched call).
Each denoiser call (and the decode) runs under ``torch.utils.checkpoint`` when ``checkpoint``
is set and grad is enabled.

**Noise.** ``render`` never touches the global RNG: pass a ``noise`` tensor shaped like ``z``
(e.g. a fixed tensor per synthetic image from :meth:`draw_noise`, or ``torch.zeros_like(z)``
for the noiseless ``z_T = sqrt(a_T) z``) or a ``torch.Generator`` to draw it from. The rendering
is then a deterministic function of ``(z, c, noise)``. An LD3M module should keep one noise
tensor per image (a buffer drawn from its seed) or draw a fresh one per step from its shared
generator, and pass the *same* tensor to the ``no_grad`` render and to
:meth:`backward_in_chunks`.

**Holding it in a LightningModule.** Every parameter is frozen (``requires_grad=False``) and the
generator stays in eval mode (``train()`` is a no-op), so it never receives gradients. To keep
it out of checkpoints and out of DDP's state broadcast, do not register it as a submodule: keep
it in a plain container (``self._frozen = {"generator": gen}``, as ``DM`` does with its
embedding network) and move it with ``gen.to(self.device)`` in ``setup``/``on_fit_start``; its
weights come back from the folder given to :meth:`LatentGenerator.from_pretrained`. The
rendering code casts nothing to float32, so it runs under ``torch.autocast`` (``bf16-mixed``).
:meth:`LatentGenerator.backward_in_chunks` runs several backward passes outside the
LightningModule's forward; under DDP averaging ``z.grad``/``c.grad`` across ranks is then the
caller's job (manual optimisation and an all-reduce, or ``no_sync``): not handled here.

**Folder layout** (diffusers layout plus one file)::

    folder/vae/{config.json, diffusion_pytorch_model.safetensors}
    folder/unet/{config.json, diffusion_pytorch_model.safetensors}
    folder/scheduler/scheduler_config.json
    folder/ld3m_generator.json   # format, num_classes, null_class, image_shape, latent_shape,
                                 # image_mean, image_std, scaling_factor, shift_factor, meta
    folder/class_embedder/{config.json, model.safetensors}   # only with a UNet2DConditionModel

or a diffusers ``DiTPipeline`` folder (``model_index.json``, ``transformer/``, ``vae/``,
``scheduler/``; ``ld3m_generator.json`` optional there): :meth:`LatentGenerator.from_pretrained`
tells the two apart by ``model_index.json``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiTTransformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
    VQModel,
)
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from ld3m import dit as _dit
from ld3m.files import atomic_dir, read_json_object

__all__ = ["CLASS_EMBEDDER", "CONFIG_NAME", "FORMAT_VERSION", "LatentGenerator", "VectorClassEmbedding", "skip_weights"]

log = logging.getLogger("ld3m")

CONFIG_NAME = "ld3m_generator.json"
#: The part holding a ``UNet2DConditionModel``'s class table (``config.json``, ``model.safetensors``)
CLASS_EMBEDDER = "class_embedder"
_UNET_CLASSES: dict[str, type] = {"UNet2DModel": UNet2DModel,
                                  "UNet2DConditionModel": UNet2DConditionModel}
FORMAT_VERSION = 1
_VAE_CLASSES: dict[str, type] = {"AutoencoderKL": AutoencoderKL, "VQModel": VQModel}
_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
#: diffusers' low-memory loading needs ``accelerate`` (an optional dependency): use it when it
#: is installed, and otherwise say so explicitly (diffusers would print a warning at every load)
_LOW_CPU_MEM = importlib.util.find_spec("accelerate") is not None


def skip_weights(steps: int) -> list[float]:
    """LD3M's skip weights ``i / T'`` for ``i = T' ... 0`` (``T' = steps - 1``), one per DDIM step.

    Step ``k`` (0-based, in sampling order) blends ``x0_hat = (1 - w_k) x0_hat + w_k z``: the
    weight is 1 at the first step, 0 at the last, linear in between. With one step there is no
    first-vs-last distinction; the weight is ``[0.0]`` (the model's own prediction).

    Args:
        steps: Number of DDIM steps ``T`` (at least 1).

    Returns:
        ``steps`` weights, decreasing from 1 to 0.
    """
    steps = _check_steps(steps)
    if steps == 1:
        return [0.0]
    last = steps - 1
    return [(last - k) / last for k in range(steps)]


def _check_steps(steps: int) -> int:
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    return int(steps)


class VectorClassEmbedding(nn.Embedding):
    """A class-embedding table that also accepts the embedding vectors themselves.

    ``forward(labels)`` with an integer tensor looks rows up as ``nn.Embedding`` does; with a
    floating-point tensor ``(N, embedding_dim)`` it returns it unchanged. It replaces a
    ``UNet2DModel``'s ``class_embedding`` so that learned embeddings can be fed through
    ``class_labels``; the weight is shared, so the state dict is that of the original table.
    """

    @classmethod
    def wrap(cls, table: nn.Embedding) -> VectorClassEmbedding:
        """A :class:`VectorClassEmbedding` sharing ``table``'s weight (returned as is if it is one)."""
        if isinstance(table, cls):
            return table
        wrapped = cls(table.num_embeddings, table.embedding_dim, padding_idx=table.padding_idx,
                      max_norm=table.max_norm, norm_type=table.norm_type,
                      scale_grad_by_freq=table.scale_grad_by_freq, sparse=table.sparse,
                      device="meta")
        wrapped.weight = table.weight
        return wrapped

    def forward(self, labels_or_vectors: torch.Tensor) -> torch.Tensor:
        if labels_or_vectors.is_floating_point():
            if labels_or_vectors.dim() != 2 or labels_or_vectors.shape[1] != self.embedding_dim:
                raise ValueError(f"class embedding vectors must be (N, {self.embedding_dim}), "
                                 f"got {tuple(labels_or_vectors.shape)}")
            return labels_or_vectors
        return super().forward(labels_or_vectors)


class LatentGenerator(nn.Module):
    """A frozen class-conditional latent diffusion model that renders images from ``(z, c)``.

    See the module docstring for the image space, the rendering and how a LightningModule
    should hold it.

    Args:
        vae: The first stage (``AutoencoderKL`` or ``VQModel``).
        denoiser: A ``UNet2DModel`` with an ``nn.Embedding`` class table
            (``class_embed_type=None``, ``num_class_embeds`` = ``num_classes`` (+1 for a null
            class)), a class-conditional ``DiTTransformer2DModel`` (its blocks' tables
            identical; a learned-sigma output's first half is used), or a
            ``UNet2DConditionModel`` whose cross-attention context is one class vector (with
            ``class_table``); it predicts what the scheduler's ``prediction_type`` says.
        scheduler: A ``DDIMScheduler`` (its schedule, spacing, ``clip_sample``,
            ``set_alpha_to_one`` and ``prediction_type`` are honoured; ``thresholding`` is not
            supported).
        num_classes: Number of real classes ``K`` (rows ``0 .. K-1`` of the table).
        image_shape: ``(C, H, W)`` of the images.
        null_class: Row of the null (unconditional) class, needed for guidance; ``None``: none.
        image_mean: Per-channel mean of the normalised image space (default 0.5).
        image_std: Per-channel std of the normalised image space (default 0.5).
        scaling_factor: Latent scale (default: the VAE config's ``scaling_factor``).
        shift_factor: Latent shift (default: the VAE config's ``shift_factor``, or 0).
        quantize: For a ``VQModel``: quantise in ``decode`` (straight-through gradient), as the
            LDM first stage does.
        meta: Free-form JSON-serialisable information saved with the generator (dataset,
            training budget, ...).
        id2label: Class names by table row (a DiT folder's ``model_index.json`` ``id2label``).
        class_table: For a ``UNet2DConditionModel`` (and only then): the class-embedding table
            whose rows are its cross-attention context (``embedding_dim`` =
            ``cross_attention_dim``; LDM's ``ClassEmbedder``).
    """

    def __init__(self, vae: AutoencoderKL | VQModel,
                 denoiser: UNet2DModel | DiTTransformer2DModel | UNet2DConditionModel,
                 scheduler: DDIMScheduler, num_classes: int, image_shape: Sequence[int], *,
                 null_class: int | None = None,
                 image_mean: Sequence[float] | None = None, image_std: Sequence[float] | None = None,
                 scaling_factor: float | None = None, shift_factor: float | None = None,
                 quantize: bool = True, meta: dict[str, Any] | None = None,
                 id2label: dict[int, str] | None = None,
                 class_table: nn.Embedding | None = None) -> None:
        super().__init__()
        if not isinstance(vae, AutoencoderKL | VQModel):
            raise ValueError(f"vae must be an AutoencoderKL or a VQModel, got {type(vae).__name__}")
        if not isinstance(denoiser, UNet2DModel | DiTTransformer2DModel | UNet2DConditionModel):
            raise ValueError("denoiser must be a UNet2DModel, a DiTTransformer2DModel or a "
                             f"UNet2DConditionModel, got {type(denoiser).__name__}")
        if not isinstance(scheduler, DDIMScheduler):
            raise ValueError(f"scheduler must be a DDIMScheduler, got {type(scheduler).__name__}")
        self.is_dit = isinstance(denoiser, DiTTransformer2DModel)
        #: the class vector is a UNet2DConditionModel's cross-attention context (LDM's cin256-v2)
        self.is_cross_attention = isinstance(denoiser, UNet2DConditionModel)
        if class_table is not None and not self.is_cross_attention:
            raise ValueError("class_table is only for a UNet2DConditionModel denoiser (the others "
                             "hold their own class table)")
        if self.is_dit:
            tables = _dit.class_tables(denoiser)
        elif self.is_cross_attention:
            if not isinstance(class_table, nn.Embedding):
                raise ValueError("a UNet2DConditionModel denoiser needs class_table, the nn.Embedding "
                                 "whose rows are its cross-attention context")
            if denoiser.config.cross_attention_dim != class_table.embedding_dim:
                raise ValueError(f"the class table's vectors have {class_table.embedding_dim} values "
                                 "but the denoiser's cross_attention_dim is "
                                 f"{denoiser.config.cross_attention_dim}")
            tables = [class_table]
        elif isinstance(denoiser.class_embedding, nn.Embedding):
            tables = [denoiser.class_embedding]
        else:
            raise ValueError("the denoiser has no class-embedding table: build the UNet2DModel with "
                             "class_embed_type=None and num_class_embeds=num_classes (+1 for a null "
                             "class)")
        if scheduler.config.thresholding:
            raise ValueError("scheduler thresholding is not supported (it is meant for pixel-space "
                             "models); use thresholding=False")
        if scheduler.config.prediction_type not in _PREDICTION_TYPES:
            raise ValueError(f"unknown scheduler prediction_type {scheduler.config.prediction_type!r}")
        table = tables[0]
        num_classes = int(num_classes)
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        if null_class is not None and not (0 <= int(null_class) < table.num_embeddings
                                           and int(null_class) >= num_classes):
            raise ValueError(f"null_class must be a table row after the {num_classes} classes "
                             f"(< {table.num_embeddings}), got {null_class}")
        if table.num_embeddings < num_classes:
            raise ValueError(f"the denoiser's class table has {table.num_embeddings} rows, fewer than "
                             f"num_classes={num_classes}")
        image_shape = tuple(int(s) for s in image_shape)
        if len(image_shape) != 3 or min(image_shape) < 1:
            raise ValueError(f"image_shape must be (C, H, W), got {image_shape}")
        channels = image_shape[0]
        mean = tuple(float(m) for m in (image_mean if image_mean is not None else (0.5,) * channels))
        std = tuple(float(s) for s in (image_std if image_std is not None else (0.5,) * channels))
        if len(mean) != channels or len(std) != channels or min(std) <= 0:
            raise ValueError(f"image_mean/image_std need {channels} values (std > 0), got {mean}/{std}")
        if vae.config.in_channels != channels or vae.config.out_channels != channels:
            raise ValueError(f"the vae maps {vae.config.in_channels} -> {vae.config.out_channels} "
                             f"channels but the images have {channels}")

        self.vae = vae
        self.denoiser = denoiser
        self.scheduler = scheduler
        if self.is_dit:
            for block in denoiser.transformer_blocks:
                embedder = block.norm1.emb.class_embedder
                embedder.embedding_table = VectorClassEmbedding.wrap(embedder.embedding_table)
        elif self.is_cross_attention:
            self.class_embedder = VectorClassEmbedding.wrap(table)
        else:
            denoiser.class_embedding = VectorClassEmbedding.wrap(table)
        self.id2label = None if id2label is None else {int(k): str(v) for k, v in id2label.items()}
        self.num_classes = num_classes
        self.null_class = None if null_class is None else int(null_class)
        self.image_shape = image_shape
        self.image_mean, self.image_std = mean, std
        self.scaling_factor = float(scaling_factor if scaling_factor is not None
                                    else vae.config.scaling_factor)
        if shift_factor is None:
            shift_factor = getattr(vae.config, "shift_factor", None)
        self.shift_factor = float(shift_factor or 0.0)
        self.quantize = bool(quantize)
        self.meta = dict(meta or {})
        self.latent_shape = self._latent_shape()
        if self.is_dit:
            _dit.check_transformer(denoiser, self.latent_shape)
        elif denoiser.config.in_channels != self.latent_shape[0] or \
                denoiser.config.out_channels != self.latent_shape[0]:
            raise ValueError(f"the denoiser maps {denoiser.config.in_channels} -> "
                             f"{denoiser.config.out_channels} channels but the latents have "
                             f"{self.latent_shape[0]}")
        # normalised image space -> VAE's [-1, 1]: x * 2 std + (2 mean - 1)
        self.register_buffer("_pixel_scale", torch.tensor(std).mul(2).view(-1, 1, 1),
                             persistent=False)
        self.register_buffer("_pixel_shift", torch.tensor(mean).mul(2).sub(1).view(-1, 1, 1),
                             persistent=False)
        self.requires_grad_(False)
        super().train(False)

    # ------------------------------------------------------------------------------ properties
    def _latent_shape(self) -> tuple[int, int, int]:
        cfg = self.vae.config
        channels = cfg.latent_channels
        if isinstance(self.vae, VQModel) and cfg.vq_embed_dim is not None:
            channels = cfg.vq_embed_dim
        factor = 2 ** (len(cfg.block_out_channels) - 1)
        _, h, w = self.image_shape
        if h % factor or w % factor:
            raise ValueError(f"image size {h}x{w} is not a multiple of the vae's downsampling "
                             f"factor {factor}")
        return (int(channels), h // factor, w // factor)

    @property
    def class_table(self) -> VectorClassEmbedding:
        """The class-embedding table (a DiT's block 0 table; the other blocks hold the same; a
        ``UNet2DConditionModel``'s: the generator's ``class_embedder``)."""
        if self.is_dit:
            return self.denoiser.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
        if self.is_cross_attention:
            return self.class_embedder
        return self.denoiser.class_embedding

    @property
    def embed_dim(self) -> int:
        """Size of a class embedding vector ``c``."""
        return int(self.class_table.embedding_dim)

    @property
    def config(self) -> dict[str, Any]:
        """What ``ld3m_generator.json`` holds."""
        return {"format": FORMAT_VERSION, "num_classes": self.num_classes,
                "null_class": self.null_class, "image_shape": list(self.image_shape),
                "latent_shape": list(self.latent_shape), "image_mean": list(self.image_mean),
                "image_std": list(self.image_std), "scaling_factor": self.scaling_factor,
                "shift_factor": self.shift_factor, "quantize": self.quantize,
                "vae_class": type(self.vae).__name__, "denoiser_class": type(self.denoiser).__name__,
                "meta": self.meta}

    def train(self, mode: bool = True) -> LatentGenerator:
        """No-op: the generator is frozen and always in eval mode (a parent's ``train()`` keeps it so)."""
        return super().train(False)

    # ------------------------------------------------------------------------------ encode / decode
    def encode(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Latents of ``images``: the VAE posterior mean (KL) or pre-quantisation latent (VQ),
        shifted and scaled. Deterministic; follows the caller's grad mode.

        Args:
            images: ``(N, C, H, W)`` images in the normalised space.
            batch_size: Images per VAE call.

        Returns:
            ``(N, *latent_shape)`` latents ``z``.
        """
        if images.dim() != 4 or tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(f"images must be (N, {', '.join(map(str, self.image_shape))}), "
                             f"got {tuple(images.shape)}")
        out = []
        for chunk in images.split(max(1, int(batch_size))):
            x = chunk * self._pixel_scale + self._pixel_shift
            if isinstance(self.vae, AutoencoderKL):
                latent = self.vae.encode(x).latent_dist.mean
            else:
                latent = self.vae.encode(x).latents
            out.append((latent - self.shift_factor) * self.scaling_factor)
        return torch.cat(out)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images (normalised space, not clamped) of latents ``z`` ``(N, *latent_shape)``."""
        latent = z / self.scaling_factor + self.shift_factor
        if isinstance(self.vae, VQModel):
            x = self.vae.decode(latent, force_not_quantize=not self.quantize).sample
        else:
            x = self.vae.decode(latent).sample
        return (x - self._pixel_shift) / self._pixel_scale

    def class_embedding(self, labels: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """The table rows of ``labels``: the initial class embeddings ``c`` ``(N, embed_dim)``.

        A detached copy, ready to become an ``nn.Parameter``.
        """
        table = self.class_table.weight
        labels = torch.as_tensor(labels, dtype=torch.long, device=table.device)
        if labels.dim() != 1:
            raise ValueError(f"labels must be 1-D, got shape {tuple(labels.shape)}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels must be in [0, {self.num_classes}), got "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        return table[labels].detach().clone()

    def null_embedding(self) -> torch.Tensor:
        """The null class's table row ``(embed_dim,)`` (for classifier-free guidance)."""
        if self.null_class is None:
            raise ValueError("this generator has no null class, so no classifier-free guidance")
        return self.class_table.weight[self.null_class].detach()

    def draw_noise(self, n: int, generator: torch.Generator | None = None,
                   device: torch.device | str | None = None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normal noise ``(n, *latent_shape)`` drawn from ``generator`` (on its device),
        then moved to ``device``. Without a generator a fresh one seeded 0 is used: the global
        RNG is never touched."""
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        noise = torch.randn((int(n), *self.latent_shape), generator=generator,
                            device=generator.device, dtype=dtype)
        if device is None:
            return noise
        # host -> device without waiting (as ld3m.networks' initialisation); never the other way
        return noise.to(device, non_blocking=noise.device.type == "cpu")

    # ------------------------------------------------------------------------------ sampling
    def timesteps(self, steps: int, t_start: int | None = None) -> list[int]:
        """The ``steps`` DDIM timesteps, in sampling order (decreasing).

        Args:
            steps: Number of DDIM steps ``T``.
            t_start: ``None``: the scheduler's own spacing (``set_timesteps(T)``); otherwise a
                training timestep to start from (``z_T`` is noised to it), the steps spaced
                evenly from it down to the scheduler's ``steps_offset``.

        Returns:
            ``T`` distinct training timesteps.
        """
        steps = _check_steps(steps)
        cfg = self.scheduler.config
        if steps > cfg.num_train_timesteps:
            raise ValueError(f"steps={steps} exceeds the scheduler's {cfg.num_train_timesteps} "
                             "training timesteps")
        if t_start is None:
            scheduler = DDIMScheduler.from_config(cfg)  # a copy: our scheduler is never mutated
            scheduler.set_timesteps(steps)
            return [int(t) for t in scheduler.timesteps]
        t_start, end = int(t_start), int(cfg.steps_offset)
        if not end <= t_start < cfg.num_train_timesteps:
            raise ValueError(f"t_start must be in [{end}, {cfg.num_train_timesteps}), got {t_start}")
        if steps == 1:
            return [t_start]
        ts = [round(t_start - k * (t_start - end) / (steps - 1)) for k in range(steps)]
        if len(set(ts)) != steps:
            raise ValueError(f"t_start={t_start} leaves fewer than steps={steps} distinct timesteps")
        return ts

    def skip_weights(self, steps: int) -> list[float]:
        """:func:`skip_weights` (1 at the first step, 0 at the last)."""
        return skip_weights(steps)

    def _alpha(self, t: int | None) -> float:
        if t is None:
            return float(self.scheduler.final_alpha_cumprod)
        return float(self.scheduler.alphas_cumprod[t])

    def _denoise_call(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.is_dit:
            return _dit.epsilon(self.denoiser, x, t, c)
        if self.is_cross_attention:  # one context token: LDM's ClassEmbedder output (N, 1, D)
            return self.denoiser(x, t, encoder_hidden_states=c[:, None, :], return_dict=False)[0]
        return self.denoiser(x, t, class_labels=c, return_dict=False)[0]

    def _model_output(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, guidance: float,
                      use_checkpoint: bool) -> torch.Tensor:
        if guidance != 1.0:
            null = self.null_embedding().to(c.dtype).expand_as(c)
            x, c = torch.cat([x, x]), torch.cat([c, null])
        if use_checkpoint:
            out = _checkpoint(self._denoise_call, x, t, c, use_reentrant=False,
                              preserve_rng_state=False)
        else:
            out = self._denoise_call(x, t, c)
        if guidance != 1.0:
            cond, uncond = out.chunk(2)
            out = uncond + guidance * (cond - uncond)
        return out

    def _check_inputs(self, z: torch.Tensor, c: torch.Tensor) -> None:
        if z.dim() != 4 or tuple(z.shape[1:]) != self.latent_shape:
            raise ValueError(f"z must be (N, {', '.join(map(str, self.latent_shape))}), "
                             f"got {tuple(z.shape)}")
        if c.dim() != 2 or c.shape != (z.shape[0], self.embed_dim) or not c.is_floating_point():
            raise ValueError(f"c must be a float tensor ({z.shape[0]}, {self.embed_dim}), "
                             f"got {tuple(c.shape)} {c.dtype}")

    def _resolve_noise(self, z: torch.Tensor, noise: torch.Tensor | None,
                       generator: torch.Generator | None) -> torch.Tensor:
        if noise is not None:
            if generator is not None:
                raise ValueError("pass noise or generator, not both")
            if noise.shape != z.shape:
                raise ValueError(f"noise must have z's shape {tuple(z.shape)}, got {tuple(noise.shape)}")
            return noise.to(device=z.device, dtype=z.dtype)
        if generator is None:
            raise ValueError("pass the noise of q_sample (a tensor like z, e.g. torch.zeros_like(z) "
                             "for none) or a torch.Generator to draw it from")
        return self.draw_noise(z.shape[0], generator, device=z.device, dtype=z.dtype)

    def sample(self, z: torch.Tensor, c: torch.Tensor, steps: int, *, skip: bool = True,
               guidance: float = 1.0, t_start: int | None = None, checkpoint: bool = True,
               noise: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """The DDIM sampling of :meth:`render` without the decode: the final latent ``(N, ...)``.

        Args: as :meth:`render`.
        """
        self._check_inputs(z, c)
        if guidance != 1.0 and self.null_class is None:
            raise ValueError("classifier-free guidance needs a generator with a null class")
        if not math.isfinite(guidance):
            raise ValueError(f"guidance must be finite, got {guidance}")
        ts = self.timesteps(steps, t_start)
        weights = skip_weights(len(ts)) if skip else [0.0] * len(ts)
        noise = self._resolve_noise(z, noise, generator)
        use_checkpoint = checkpoint and torch.is_grad_enabled()
        cfg = self.scheduler.config
        a_t = self._alpha(ts[0])
        x = math.sqrt(a_t) * z + math.sqrt(1.0 - a_t) * noise
        # the timesteps go to the denoiser as device tensors, copied once without blocking (a
        # Python int becomes a blocking copy inside diffusers at every call)
        t_device = torch.tensor(ts, dtype=torch.long).to(z.device, non_blocking=True)
        for k, t in enumerate(ts):
            a_t = self._alpha(t)
            a_prev = self._alpha(ts[k + 1] if k + 1 < len(ts) else None)
            out = self._model_output(x, t_device[k], c, guidance, use_checkpoint)
            if cfg.prediction_type == "epsilon":
                eps = out
                x0 = (x - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)
            elif cfg.prediction_type == "v_prediction":
                x0 = math.sqrt(a_t) * x - math.sqrt(1.0 - a_t) * out
                eps = math.sqrt(a_t) * out + math.sqrt(1.0 - a_t) * x
            else:  # "sample"
                x0 = out
                eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1.0 - a_t)
            if cfg.clip_sample:
                x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
            w = weights[k]
            if w:
                x0 = (1.0 - w) * x0 + w * z
            x = math.sqrt(a_prev) * x0 + math.sqrt(1.0 - a_prev) * eps
        return x

    def render(self, z: torch.Tensor, c: torch.Tensor, steps: int, skip: bool = True,
               guidance: float = 1.0, t_start: int | None = None, checkpoint: bool = True, *,
               noise: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Render images from latents ``z`` and class embeddings ``c`` (differentiable in both).

        Args:
            z: ``(N, *latent_shape)`` latents (the clean latent; ``z_T`` is ``q_sample(z, t_T)``).
            c: ``(N, embed_dim)`` class embedding vectors.
            steps: Number of DDIM steps ``T``: more is slower and closer to the model's samples.
            skip: Apply LD3M's skip ``x0_hat = (1 - i/T') x0_hat + (i/T') z``.
            guidance: Classifier-free guidance scale (1: none; needs a null class otherwise).
            t_start: Training timestep of ``z_T`` (``None``: the first of the scheduler's ``T``
                timesteps); see :meth:`timesteps`.
            checkpoint: Recompute each denoiser call (and the decode) in backward instead of
                storing its activations (only when grad is enabled).
            noise: The ``q_sample`` noise, shaped like ``z`` (zeros: none).
            generator: Draw the noise from this generator instead (exactly one of the two).

        Returns:
            ``(N, *image_shape)`` images in the normalised space.
        """
        latent = self.sample(z, c, steps, skip=skip, guidance=guidance, t_start=t_start,
                             checkpoint=checkpoint, noise=noise, generator=generator)
        if checkpoint and torch.is_grad_enabled():
            return _checkpoint(self.decode, latent, use_reentrant=False, preserve_rng_state=False)
        return self.decode(latent)

    def backward_in_chunks(self, z: torch.Tensor, c: torch.Tensor, image_grad: torch.Tensor,
                           steps: int, chunk_size: int, *, noise: torch.Tensor, skip: bool = True,
                           guidance: float = 1.0, t_start: int | None = None,
                           checkpoint: bool = True) -> None:
        """Back-propagate ``image_grad`` = dL/d(images) into ``z.grad`` and ``c.grad``, re-rendering
        ``chunk_size`` images at a time (the GLaD/LD3M memory trick).

        Use it as: ``with torch.no_grad(): images = gen.render(z, c, T, noise=noise)``; then
        ``x = images.detach().requires_grad_()``, ``loss(x).backward()`` and
        ``gen.backward_in_chunks(z, c, x.grad, T, chunk_size, noise=noise)``. The gradients
        accumulate (``+=``) into the leaves behind ``z`` and ``c``, as ``loss.backward()`` through
        one full-graph render would; peak memory is that of one chunk. ``noise`` and the
        rendering options must be those of the ``no_grad`` render.

        Args:
            z: ``(N, *latent_shape)`` latents (typically an ``nn.Parameter``).
            c: ``(N, embed_dim)`` class embeddings (typically an ``nn.Parameter``).
            image_grad: ``(N, *image_shape)`` gradient of the loss at the rendered images.
            steps: Number of DDIM steps ``T``.
            chunk_size: Images re-rendered per backward pass.
            noise: The ``q_sample`` noise used for the ``no_grad`` render, shaped like ``z``.
            skip: As :meth:`render`.
            guidance: As :meth:`render`.
            t_start: As :meth:`render`.
            checkpoint: As :meth:`render` (saves memory inside a chunk).
        """
        n = z.shape[0]
        if image_grad.shape != (n, *self.image_shape):
            raise ValueError(f"image_grad must be ({n}, {', '.join(map(str, self.image_shape))}), "
                             f"got {tuple(image_grad.shape)}")
        if noise is None or noise.shape != z.shape:
            raise ValueError(f"noise must be the tensor of the no-grad render, shaped {tuple(z.shape)}")
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
        if not (z.requires_grad or c.requires_grad):
            raise ValueError("neither z nor c requires grad: nothing to back-propagate into")
        chunk_size = int(chunk_size)
        with torch.enable_grad():
            for start in range(0, n, chunk_size):
                part = slice(start, min(start + chunk_size, n))
                images = self.render(z[part], c[part], steps, skip=skip, guidance=guidance,
                                     t_start=t_start, checkpoint=checkpoint, noise=noise[part])
                grad = image_grad[part].to(device=images.device, dtype=images.dtype)
                torch.autograd.backward(images, grad)

    # ------------------------------------------------------------------------------ files
    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, device: torch.device | str | None = None,
                        dtype: torch.dtype | None = None, image_mean: Sequence[float] | None = None,
                        image_std: Sequence[float] | None = None) -> LatentGenerator:
        """Load a generator from a local folder (see the module docstring); never downloads.

        The kind is read from the folder: a ``model_index.json`` naming ``DiTPipeline`` is a
        diffusers DiT folder (:mod:`ld3m.dit`), otherwise ``ld3m_generator.json`` must be there
        (a folder of ``ld3m prior``, ``ld3m convert-ldm`` or :meth:`save_pretrained`; its
        ``unet/`` a ``UNet2DModel``, or a ``UNet2DConditionModel`` with ``class_embedder/``).

        Args:
            folder: The folder written by :meth:`save_pretrained` (or ``ld3m prior``), or a
                diffusers ``DiTPipeline`` folder.
            device: Move the generator there.
            dtype: Cast its weights to this dtype.
            image_mean: The normalised image space's mean (default: the folder's; for a DiT
                folder without ``ld3m_generator.json``, ImageNet's, :data:`ld3m.dit.IMAGENET_MEAN`).
            image_std: Its std (default: as ``image_mean``).

        Returns:
            The frozen generator, in eval mode.

        Raises:
            FileNotFoundError: The folder, ``ld3m_generator.json`` or a part is missing.
            ValueError: A file is malformed or the parts do not fit together.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"no LD3M generator folder at {folder}")
        if _dit.is_dit_folder(folder):
            generator = cls._from_dit_folder(folder, image_mean, image_std)
        else:
            generator = cls._from_ld3m_folder(folder, image_mean, image_std)
        return generator.to(device=device, dtype=dtype)

    @classmethod
    def _from_ld3m_folder(cls, folder: Path, image_mean: Sequence[float] | None,
                          image_std: Sequence[float] | None) -> LatentGenerator:
        cfg_path = folder / CONFIG_NAME
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{folder} is not an LD3M generator folder: {CONFIG_NAME} (a folder "
                                    f"of ld3m prior) or {_dit.MODEL_INDEX} (a DiTPipeline) is missing")
        cfg = _read_config(cfg_path)
        _check_parts(folder, ("vae", "unet"))
        vae_class_name = _vae_class_name(folder)
        unet_class_name = _json_field(folder / "unet" / "config.json", "_class_name")
        if unet_class_name not in _UNET_CLASSES:
            raise ValueError(f"{folder / 'unet'} holds a {unet_class_name}, not a UNet2DModel or a "
                             "UNet2DConditionModel")
        class_table = (_load_class_table(folder / CLASS_EMBEDDER)
                       if unet_class_name == "UNet2DConditionModel" else None)
        vae = _load_vae(folder, vae_class_name)
        with _load_errors(folder / "unet"):
            unet = _UNET_CLASSES[unet_class_name].from_pretrained(
                folder, subfolder="unet", local_files_only=True, low_cpu_mem_usage=_LOW_CPU_MEM)
        with _load_errors(folder / "scheduler"):
            scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler",
                                                      local_files_only=True)
        with _load_errors(cfg_path):
            generator = cls(vae, unet, scheduler, num_classes=cfg["num_classes"],
                            image_shape=cfg["image_shape"], null_class=cfg.get("null_class"),
                            image_mean=cfg.get("image_mean") if image_mean is None else image_mean,
                            image_std=cfg.get("image_std") if image_std is None else image_std,
                            scaling_factor=cfg.get("scaling_factor"),
                            shift_factor=cfg.get("shift_factor"),
                            quantize=cfg.get("quantize", True), meta=cfg.get("meta"),
                            class_table=class_table)
        if "latent_shape" in cfg and list(generator.latent_shape) != list(cfg["latent_shape"]):
            raise ValueError(f"{cfg_path} says latent_shape {cfg['latent_shape']} but the vae gives "
                             f"{list(generator.latent_shape)}")
        log.info("loaded the LD3M generator %s (%s, %d classes, latent %s)", folder,
                 vae_class_name, generator.num_classes, "x".join(map(str, generator.latent_shape)))
        return generator

    @classmethod
    def _from_dit_folder(cls, folder: Path, image_mean: Sequence[float] | None,
                         image_std: Sequence[float] | None) -> LatentGenerator:
        _check_parts(folder, ("transformer", "vae"))
        vae_class_name = _vae_class_name(folder)
        transformer_class_name = _json_field(folder / "transformer" / "config.json", "_class_name")
        if transformer_class_name not in _dit.TRANSFORMER_CLASSES:
            raise ValueError(f"{folder / 'transformer'} holds a {transformer_class_name}, not a "
                             "DiTTransformer2DModel")
        vae = _load_vae(folder, vae_class_name)
        with _load_errors(folder / "transformer"):
            transformer = DiTTransformer2DModel.from_pretrained(
                folder, subfolder="transformer", local_files_only=True, low_cpu_mem_usage=_LOW_CPU_MEM)
        with _load_errors(folder / "scheduler"):
            scheduler = _dit.ddim_scheduler(folder / "scheduler")
        num_classes = int(transformer.config.num_embeds_ada_norm)
        rows = _dit.class_tables(transformer)[0].num_embeddings
        null_class = num_classes if rows > num_classes else None
        image_shape = _dit.image_shape(vae.config, transformer.config)
        cfg_path = folder / CONFIG_NAME
        cfg = _read_config(cfg_path) if cfg_path.is_file() else {}
        for key, ours in (("num_classes", num_classes), ("null_class", null_class),
                          ("image_shape", list(image_shape))):
            if key in cfg and cfg[key] != ours:
                raise ValueError(f"{cfg_path} says {key} {cfg[key]} but the DiT folder gives {ours}")
        if image_mean is None:
            image_mean = cfg.get("image_mean", _dit.IMAGENET_MEAN if image_shape[0] == 3 else None)
        if image_std is None:
            image_std = cfg.get("image_std", _dit.IMAGENET_STD if image_shape[0] == 3 else None)
        with _load_errors(folder / _dit.MODEL_INDEX):
            generator = cls(vae, transformer, scheduler, num_classes=num_classes,
                            image_shape=image_shape, null_class=null_class, image_mean=image_mean,
                            image_std=image_std, scaling_factor=cfg.get("scaling_factor"),
                            shift_factor=cfg.get("shift_factor"), meta=cfg.get("meta"),
                            id2label=_dit.id2label(_dit.read_model_index(folder), num_classes))
        log.info("loaded the DiT generator %s (%d classes, latent %s, %d blocks)", folder,
                 num_classes, "x".join(map(str, generator.latent_shape)),
                 len(transformer.transformer_blocks))
        return generator

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write the generator to ``folder`` in the layout :meth:`from_pretrained` reads (a DiT
        generator: the ``DiTPipeline`` layout, with its DDIM scheduler, plus ``ld3m_generator.json``).

        Everything is written to a temporary folder next to ``folder`` and renamed into place,
        so an interrupted save leaves any previous generator intact. An existing ``folder`` is
        replaced only if it is empty or an LD3M generator folder.

        Returns:
            ``folder`` as a ``Path``.

        Raises:
            FileExistsError: ``folder`` exists and is something else.
        """
        target = Path(folder)
        if target.exists() and not (target.is_dir() and (
                (target / CONFIG_NAME).is_file() or not any(target.iterdir()))):
            raise FileExistsError(f"{target} exists and is not an LD3M generator folder; "
                                  "not overwriting it")
        with atomic_dir(target) as tmp:
            self.vae.save_pretrained(tmp / "vae", safe_serialization=True)
            if self.is_dit:  # the DiTPipeline layout, loadable by diffusers too
                self.denoiser.save_pretrained(tmp / "transformer", safe_serialization=True)
                _dit.write_model_index(tmp, self.scheduler, self.vae, self.id2label)
            else:
                self.denoiser.save_pretrained(tmp / "unet", safe_serialization=True)
            if self.is_cross_attention:
                _save_class_table(self.class_embedder, tmp / CLASS_EMBEDDER)
            self.scheduler.save_pretrained(tmp / "scheduler")
            (tmp / CONFIG_NAME).write_text(json.dumps(self.config, indent=2) + "\n")
        log.info("saved the LD3M generator to %s", target)
        return target


# ---------------------------------------------------------------------------------- helpers
def _read_config(path: Path) -> dict[str, Any]:
    cfg = read_json_object(path)
    if cfg.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported format {cfg.get('format')!r} (expected {FORMAT_VERSION})")
    for key in ("num_classes", "image_shape"):
        if key not in cfg:
            raise ValueError(f"{path} lacks {key!r}")
    if not isinstance(cfg["num_classes"], int) or isinstance(cfg["num_classes"], bool):
        raise ValueError(f"{path}: num_classes must be an integer, got {cfg['num_classes']!r}")
    if not (isinstance(cfg["image_shape"], list) and len(cfg["image_shape"]) == 3
            and all(isinstance(s, int) for s in cfg["image_shape"])):
        raise ValueError(f"{path}: image_shape must be [C, H, W], got {cfg['image_shape']!r}")
    null_class = cfg.get("null_class")
    if null_class is not None and (not isinstance(null_class, int) or isinstance(null_class, bool)):
        raise ValueError(f"{path}: null_class must be an integer or null, got {null_class!r}")
    for key in ("image_mean", "image_std"):
        value = cfg.get(key)
        if value is not None and not (isinstance(value, list)
                                      and all(isinstance(v, int | float) for v in value)):
            raise ValueError(f"{path}: {key} must be a list of numbers, got {value!r}")
    for key in ("scaling_factor", "shift_factor"):
        value = cfg.get(key)
        if value is not None and not isinstance(value, int | float):
            raise ValueError(f"{path}: {key} must be a number, got {value!r}")
    if not isinstance(cfg.get("meta", {}), dict):
        raise ValueError(f"{path}: meta must be a JSON object")
    return cfg


def _check_parts(folder: Path, models: tuple[str, str]) -> None:
    """The two ``models`` (the vae and ``unet`` or ``transformer``, in the order they are
    checked) and the scheduler of a generator folder have their config files, and the models
    their weights."""
    for part, config_file in ((models[0], "config.json"), (models[1], "config.json"),
                              ("scheduler", "scheduler_config.json")):
        if not (folder / part / config_file).is_file():
            raise FileNotFoundError(f"{folder / part / config_file} is missing")
    for part in models:
        _check_weights(folder / part)


def _vae_class_name(folder: Path) -> str:
    """The class of ``folder/vae``, if an LD3M generator can use it."""
    name = _json_field(folder / "vae" / "config.json", "_class_name")
    if name not in _VAE_CLASSES:
        raise ValueError(f"{folder / 'vae'} holds a {name}; an LD3M generator needs "
                         f"one of {', '.join(_VAE_CLASSES)}")
    return name


def _load_vae(folder: Path, class_name: str) -> AutoencoderKL | VQModel:
    with _load_errors(folder / "vae"):
        return _VAE_CLASSES[class_name].from_pretrained(
            folder, subfolder="vae", local_files_only=True, low_cpu_mem_usage=_LOW_CPU_MEM)


def _save_class_table(table: nn.Embedding, part: Path) -> None:
    """``part/config.json`` (the table's size) and ``part/model.safetensors`` (``weight``)."""
    part.mkdir(parents=True)
    (part / "config.json").write_text(json.dumps(
        {"_class_name": "VectorClassEmbedding", "num_embeddings": table.num_embeddings,
         "embedding_dim": table.embedding_dim}, indent=2) + "\n")
    save_file({"weight": table.weight.detach().contiguous()}, str(part / "model.safetensors"))


def _load_class_table(part: Path) -> nn.Embedding:
    """The class table :func:`_save_class_table` wrote, checked against its config."""
    for name in ("config.json", "model.safetensors"):
        if not (part / name).is_file():
            raise FileNotFoundError(f"{part / name} is missing (the class table of a "
                                    "UNet2DConditionModel generator)")
    rows = _json_field(part / "config.json", "num_embeddings")
    dim = _json_field(part / "config.json", "embedding_dim")
    with _load_errors(part):
        tensors = load_file(str(part / "model.safetensors"))
    weight = tensors.get("weight")
    if set(tensors) != {"weight"} or weight is None or weight.dim() != 2 or \
            list(weight.shape) != [rows, dim]:
        raise ValueError(f"{part / 'model.safetensors'} must hold one tensor 'weight' of shape "
                         f"[{rows}, {dim}] (its config.json), got "
                         f"{ {k: list(v.shape) for k, v in tensors.items()} }")
    table = nn.Embedding(int(rows), int(dim), device="meta")
    table.weight = nn.Parameter(weight, requires_grad=False)
    return table


def _check_weights(part: Path) -> None:
    if not any(p.name.startswith("diffusion_pytorch_model") for p in part.iterdir()):
        raise FileNotFoundError(f"{part} holds no weights (diffusion_pytorch_model.safetensors)")


def _json_field(path: Path, key: str) -> Any:
    try:
        return json.loads(path.read_text()).get(key)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise ValueError(f"{path} is not a valid diffusers config: {err}") from err


@contextlib.contextmanager
def _load_errors(where: Path) -> Iterator[None]:
    """Turn what diffusers/safetensors/torch raise on a corrupt part into one clear ValueError."""
    try:
        yield
    except FileNotFoundError:
        raise
    except Exception as err:  # diffusers raises OSError, ValueError, RuntimeError, SafetensorError...
        raise ValueError(f"cannot load {where}: {type(err).__name__}: {err}") from err


