"""DQ: dataset quantization (Zhou et al., ICCV 2023). Coreset selection, not synthesis.

1. **Embedding network.** A network trained on the real training set: loaded from
   ``embed_checkpoint``, or trained by the module in a short Lightning run (the evaluation
   protocol's :class:`ld3m.evaluation.Classifier`: SGD, momentum 0.9, weight decay 5e-4,
   batch 256, no augmentation, ``embed_steps`` steps; the lr drops x0.1 at the first epoch
   boundary at or past half of them, if the run gets there). A trained network is saved to
   ``dq_embedding.pt`` in the run's output folder; pass that file as ``embed_checkpoint`` to reuse it.
2. **Features.** Every training image is embedded: ``embedding`` (the penultimate features,
   ``net.embed``) or ``gradient`` (the cross-entropy gradient of the last linear layer,
   ``(softmax - onehot) (x) [features, 1]``, the authors' choice; its cosine similarity is
   computed from the two factors, never materialised).
3. **Bins and sampling** (:mod:`ld3m.coreset`): per class, ``bins`` non-overlapping bins by
   recursive greedy GraphCut on cosine similarity (``lam`` weights the pairwise term), then the
   same fraction drawn uniformly (without replacement) from every bin. The size is set by
   exactly one of:

   - ``ipc``: ``ipc`` images per class, spread over the bins in proportion to their sizes
     (:func:`ld3m.coreset.allocate`);
   - ``fraction`` (the paper's setting, e.g. 0.1 for 10 % of the data): from every bin of every
     class ``round(fraction * len(bin))`` images, Python's ``round`` (halves to even), as the
     authors' bin sampling (``quantize_bin.py`` runs ``dq/methods/uniform.py``'s balanced
     ``Uniform`` on each bin: ``round(fraction * class size in the bin)`` per class; their
     12.5 % CIFAR-10 selection, ``data/cifar10/select_indices_CIFAR10_0.125.npy``, holds
     10 classes x 10 bins x ``round(62.5) = 62`` = 6,200 images). A class therefore keeps
     ``sum over its bins of round(fraction * len(bin))`` images, which is not one number for
     every class when the classes differ in size (see :func:`fraction_counts`). A class of which
     the fraction keeps no image is an error.
4. **Patch dropping** (optional, ``drop_ratio > 0``): in every selected image the
   ``drop_ratio`` least important ``patch_size`` patches are dropped and reconstructed by the
   ``reconstructor`` you provide; the authors use a pretrained masked autoencoder (MAE,
   ViT-L/16) and rank patches by GradCAM++. ld3m ships no such model and downloads nothing;
   importance here is the input-gradient saliency of the true class's logit under the
   embedding network (override :meth:`DQ.patch_importance` to change it).

The selected real images become ``images`` (so the export, the image grid and
``ld3m evaluate`` work unchanged), class-major (the images of class 0 bin by bin, then class 1,
...), and the export records the dataset indices (``extra.indices``) and the bin of each
(``extra.bins``). With ``fraction`` the classes may keep different numbers of images: the
exported set's ``labels`` say which (``meta.dq.class_counts`` lists the counts,
``meta.dq.fraction`` the fraction) and its ``ipc``, like :attr:`DQ.ipc` after the allocation, is
the largest per-class count (so the evaluation's random-real baseline draws that many per class:
the same number of images as DQ when the classes are equal, as in Fashion-MNIST or CIFAR-10).
The image grid shows a row per class of its first ``GRID_PER_CLASS`` (100) images, so that a
selection of thousands per class still makes a readable PNG.

Under the Trainer, ``fit`` does the whole selection in ``on_fit_start`` (after the strategy
has placed the module on its device and, with DDP, joined the process group, and after a
checkpoint has been restored) and stops before the first training step: ``on_train_start``
sets ``trainer.should_stop``. ``--trainer.max_steps`` is therefore ignored, no optimizer step
happens, and the ``on_train_end`` callbacks (export, grid, evaluation) see the selected set.
Outside a Trainer, :meth:`DQ.quantize_dataset` does the same in one process.

Under DDP rank 0 trains the embedding network (every rank reads a given checkpoint) and
broadcasts its weights, every rank embeds a contiguous slice of the training set and the
features are all-gathered, the selection runs once on rank 0 and its indices (and, with patch
dropping, the reconstructed images) are broadcast.
"""

from __future__ import annotations

import importlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from ld3m.modules.base import DistillationModule, check_network_name
from torch import nn
from torch.utils.data import DataLoader
from torchvision.utils import make_grid
from tqdm.auto import tqdm

from ld3m.coreset import (
    DEFAULT_MATRIX_BYTES,
    Features,
    Quantization,
    bin_and_sample,
    bin_sizes,
    draw_from_bins,
    feature_rows,
    quantize,
)
from ld3m.evaluation import Classifier, _quiet_lightning, trainer_device
from ld3m.files import atomic_write
from ld3m.networks import conv_backend

log = logging.getLogger("ld3m")

#: Feature kinds: penultimate features, or last-layer cross-entropy gradients.
FEATURES = ("embedding", "gradient")
#: Batch size of the embedding network's training.
EMBED_BATCH = 256
#: Images per forward when embedding the training set.
EMBED_CHUNK = 1000
#: File the trained embedding network is saved to, in the run's output folder.
EMBED_FILE = "dq_embedding.pt"
#: The image grid shows at most this many images per class (the first of each, in bin order).
GRID_PER_CLASS = 100
#: Images per class when neither ``ipc`` nor ``fraction`` is given.
DEFAULT_IPC = 10

# salts of the seeded draws
_SALT_LOADER = 21
_SALT_SAMPLE = 22

#: ``reconstruct(visible, mask) -> images``: see :func:`drop_patches`.
Reconstructor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def resolve_reconstructor(spec: str | Reconstructor) -> Reconstructor:
    """The reconstruction model named by an import path (``pkg.module:attr`` or
    ``pkg.module.attr``), or ``spec`` itself if it is callable. A class is instantiated without
    arguments; anything else callable is used as it is.

    Raises:
        ValueError: if the path cannot be imported or does not name a callable.
    """
    obj: Any = spec
    if isinstance(spec, str):
        module_name, _, attr = spec.partition(":") if ":" in spec else spec.rpartition(".")
        if not module_name or not attr:
            raise ValueError(f"reconstructor must be an import path like 'pkg.module:Class', "
                             f"got {spec!r}")
        try:
            obj = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"cannot import the reconstructor {spec!r}: {err}") from None
    if isinstance(obj, type):
        obj = obj()
    if not callable(obj):
        raise ValueError(f"the reconstructor {spec!r} is not callable")
    return obj


def drop_patches(images: torch.Tensor, importance: torch.Tensor, drop_ratio: float,
                 patch_size: int, reconstruct: Reconstructor) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace the least important patches of every image by a reconstruction.

    Args:
        images: ``(N, C, H, W)``; ``H`` and ``W`` multiples of ``patch_size``.
        importance: ``(N, P)`` importance of the ``P = (H / p) * (W / p)`` patches (row-major).
        drop_ratio: Fraction of patches dropped per image (``round(drop_ratio * P)`` of them;
            among equally important patches the first in row-major order goes first).
        patch_size: Side ``p`` of the square patches.
        reconstruct: Called as ``reconstruct(visible, mask)``: ``visible`` is ``images`` with
            the dropped pixels set to 0 (the dataset mean in normalised space), ``mask`` is
            ``(N, 1, H, W)``, 1.0 on dropped pixels; it returns ``(N, C, H, W)`` images of which
            only the dropped pixels are used.

    Returns:
        The images with their dropped patches reconstructed, and the ``(N, P)`` boolean mask of
        dropped patches.
    """
    n, _, h, w = images.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"patch_size={patch_size} does not divide the image size {h}x{w}")
    gh, gw = h // patch_size, w // patch_size
    if importance.shape != (n, gh * gw):
        raise ValueError(f"importance must be ({n}, {gh * gw}), got {tuple(importance.shape)}")
    drop = round(drop_ratio * gh * gw)
    order = torch.argsort(importance, dim=1, stable=True)  # least important first
    patch_mask = torch.zeros(n, gh * gw, dtype=torch.bool, device=images.device)
    patch_mask.scatter_(1, order[:, :drop], True)
    pixels = (patch_mask.view(n, 1, gh, gw).repeat_interleave(patch_size, 2)
              .repeat_interleave(patch_size, 3))
    mask = pixels.to(images.dtype)
    with torch.no_grad():
        reconstruction = reconstruct(images * (1 - mask), mask)
    if not isinstance(reconstruction, torch.Tensor) or reconstruction.shape != images.shape:
        shape = tuple(reconstruction.shape) if isinstance(reconstruction, torch.Tensor) else type(reconstruction)
        raise ValueError(f"the reconstructor returned {shape}, expected images of shape "
                         f"{tuple(images.shape)}")
    out = torch.where(pixels, reconstruction.to(images.device, images.dtype), images)
    return out, patch_mask


def check_fraction(fraction: float) -> float:
    """``fraction`` as a float, if it is in ``(0, 1]``.

    Raises:
        ValueError: otherwise (0 keeps nothing; NaN is refused too).
    """
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1] (the share of every class to keep, e.g. "
                         f"0.1), got {fraction!r}")
    return float(fraction)


def fraction_counts(sizes: Sequence[int], fraction: float) -> list[int]:
    """Images drawn from bins of ``sizes`` at ``fraction``: ``round(fraction * size)`` from each.

    Python's ``round`` (halves go to the even neighbour) of the float product, as the authors'
    bin sampling (``dq/methods/uniform.py``, ``Uniform.select_balance``, applied to every bin by
    ``quantize_bin.py``): e.g. 12.5 % of a bin of 500 is 62 images, 10 % of one of 600 is 60.
    """
    fraction = check_fraction(fraction)
    return [round(fraction * int(s)) for s in sizes]


def class_count(size: int, fraction: float, bins: int) -> int:
    """Images kept from a class of ``size`` split into ``bins`` GraphCut bins (sizes from
    :func:`ld3m.coreset.bin_sizes`) at ``fraction``: the sum of :func:`fraction_counts`."""
    return sum(fraction_counts(bin_sizes(size, bins), fraction))


def sample_fraction(bins: list[torch.Tensor], fraction: float,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``round(fraction * len(bin))`` members of every bin uniformly, without replacement.

    Returns:
        The drawn members (bin by bin) and the bin number of each.
    """
    return draw_from_bins(bins, fraction_counts([len(b) for b in bins], fraction), generator)


def quantize_fraction(features: Features, labels: torch.Tensor, fraction: float, bins: int = 10,
                      lam: float = 1.0, generator: torch.Generator | None = None,
                      num_classes: int | None = None,
                      max_matrix_bytes: int = DEFAULT_MATRIX_BYTES) -> Quantization:
    """Dataset quantization of a labelled set keeping ``fraction`` of every bin of every class.

    The same bins as :func:`ld3m.coreset.quantize`; the sampling of :func:`sample_fraction`.

    Args:
        features: ``(N, D)`` features of every sample (or a Kronecker pair).
        labels: ``(N,)`` integer class labels.
        fraction: Share of every bin kept, in ``(0, 1]``.
        bins: Bins per class.
        lam: Weight of GraphCut's pairwise term.
        generator: Source of the uniform sampling (default: a generator seeded with 0).
        num_classes: Number of classes (default: ``labels.max() + 1``).
        max_matrix_bytes: Memory allowed for one class's similarity matrix.

    Returns:
        The selection, class-major (class 0's images bin by bin, then class 1, ...).

    Raises:
        ValueError: on inconsistent shapes, a bad ``fraction`` or ``bins``, a class with fewer
            than ``bins`` samples or one of which the fraction keeps nothing.
    """
    fraction = check_fraction(fraction)
    n = feature_rows(features)
    if labels.dim() != 1 or len(labels) != n:
        raise ValueError(f"labels must have shape ({n},) to match the features, got "
                         f"{tuple(labels.shape)}")
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    labels = labels.detach().cpu().long()
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    members = [torch.nonzero(labels == c).flatten() for c in range(num_classes)]
    for c, m in enumerate(members):
        if bins > len(m):
            raise ValueError(f"bins={bins} is larger than class {c}, which has {len(m)} samples")
        if class_count(len(m), fraction, bins) == 0:
            raise ValueError(f"fraction={fraction:g} keeps no sample of class {c} ({len(m)} "
                             f"samples in {bins} bins)")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    return bin_and_sample(features, members, bins, lam, max_matrix_bytes,
                          lambda local: sample_fraction(local, fraction, generator))


class DQ(DistillationModule):
    """Dataset quantization: real images picked by GraphCut bins and uniform sampling.

    Give exactly one of ``ipc`` and ``fraction`` (neither: ``ipc`` 10, ``DEFAULT_IPC``).

    Args:
        ipc: Real images kept per class (the fraction of every bin follows from it).
        fraction: Share of the data kept, in ``(0, 1]`` (the paper's setting, e.g. 0.1):
            ``round(fraction * len(bin))`` images from every bin of every class, as the
            authors' ``quantize_bin.py``. The classes may then keep different numbers of
            images; ``ipc`` becomes the largest of them. A recipe that sets ``ipc`` needs
            ``--model.ipc null`` next to ``--model.fraction``.
        bins: Non-overlapping bins per class (the paper: 10).
        lam: Weight of GraphCut's pairwise (diversity) term (the paper: 1).
        network: Embedding network (see ``ld3m.networks``).
        features: ``embedding`` (penultimate features) or ``gradient`` (last-layer
            cross-entropy gradients).
        embed_checkpoint: State dict of a trained ``network`` (a plain state dict, a Lightning
            checkpoint of ``ld3m.evaluation.Classifier``, or a ``dq_embedding.pt``); if not
            given the module trains one itself.
        embed_steps: SGD steps (batch 256) of that training (0: a random network).
        embed_lr: Learning rate of that training.
        drop_ratio: Fraction of patches dropped from every selected image and reconstructed by
            ``reconstructor`` (0: off; the paper: 0.2).
        patch_size: Side of the square patches (must divide the image size).
        reconstructor: Import path (``pkg.module:attr``) or callable of the reconstruction
            model, called as ``reconstruct(visible, mask) -> images`` in the dataset's
            normalised space (see ``ld3m.modules.dq.drop_patches``); it should be a
            pretrained masked autoencoder that you provide (nothing is downloaded). A class is
            instantiated without arguments. Required when ``drop_ratio > 0``.
        max_matrix_bytes: Largest per-class similarity matrix held in memory; larger classes
            compute similarity rows on the fly (same result, bounded memory).
        seed: Seed of the embedding network, its training and the uniform sampling.
        num_classes: Number of classes (default: from the data module).
        image_shape: ``(C, H, W)`` (default: from the data module).
    """

    method_name = "DQ"
    supports_fp16 = True  # no gradient step at all

    def __init__(self, ipc: int | None = None, fraction: float | None = None, bins: int = 10,
                 lam: float = 1.0,
                 network: str = "ConvNet", features: str = "embedding",
                 embed_checkpoint: str | None = None, embed_steps: int = 300,
                 embed_lr: float = 0.01, drop_ratio: float = 0.0, patch_size: int = 4,
                 reconstructor: str | Callable[..., Any] | None = None,
                 max_matrix_bytes: int = DEFAULT_MATRIX_BYTES, seed: int = 0,
                 num_classes: int | None = None,
                 image_shape: tuple[int, int, int] | None = None) -> None:
        if ipc is not None and fraction is not None:
            raise ValueError(f"give exactly one of ipc and fraction, got ipc={ipc} and "
                             f"fraction={fraction} (with a recipe that sets ipc, add "
                             "--model.ipc null to select by --model.fraction)")
        if fraction is not None:
            fraction = check_fraction(fraction)
        elif ipc is None:
            ipc = DEFAULT_IPC
        if bins < 1:
            raise ValueError(f"bins must be at least 1, got {bins}")
        if not (lam >= 0 and math.isfinite(lam)):
            raise ValueError(f"lam must be a finite number >= 0, got {lam}")
        check_network_name(network)
        if features not in FEATURES:
            raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
        if embed_steps < 0:
            raise ValueError(f"embed_steps must be >= 0, got {embed_steps}")
        if not (embed_lr > 0 and math.isfinite(embed_lr)):
            raise ValueError(f"embed_lr must be a positive number, got {embed_lr}")
        if not 0 <= drop_ratio < 1:
            raise ValueError(f"drop_ratio must be in [0, 1), got {drop_ratio}")
        if patch_size < 1:
            raise ValueError(f"patch_size must be at least 1, got {patch_size}")
        if drop_ratio > 0 and reconstructor is None:
            raise ValueError("drop_ratio > 0 needs a reconstructor (--model.reconstructor "
                             "pkg.module:Class): a pretrained masked autoencoder that you "
                             "provide; ld3m downloads none")
        if max_matrix_bytes < 0:
            raise ValueError(f"max_matrix_bytes must be >= 0, got {max_matrix_bytes}")
        if embed_checkpoint is not None and not Path(embed_checkpoint).is_file():
            raise FileNotFoundError(f"embedding checkpoint {embed_checkpoint} does not exist")
        # allocated below, once the patch settings that _allocate checks are known; with
        # fraction the ipc (the largest class count) is known once the class sizes are
        super().__init__(ipc=ipc if ipc is not None else 1, init="real", seed=seed)
        self.save_hyperparameters(ignore=["reconstructor"])
        self.hparams["ipc"] = ipc  # the resolved setting (DEFAULT_IPC when neither was given)
        if fraction is not None:
            self.ipc = 0  # not known until the class sizes are (the allocation)
        self.fraction = fraction
        #: images per class (known at the allocation; with ``fraction`` from the class sizes)
        self.class_counts: list[int] | None = None
        #: the training set's class sizes, from the data module (``fraction`` only)
        self._class_sizes: list[int] | None = None
        self.bins, self.lam = bins, float(lam)
        self.network, self.features = network, features
        self.embed_checkpoint, self.embed_steps, self.embed_lr = embed_checkpoint, embed_steps, embed_lr
        self.drop_ratio, self.patch_size = float(drop_ratio), patch_size
        self.max_matrix_bytes = max_matrix_bytes
        self.reconstructor_name = (reconstructor if isinstance(reconstructor, str) or reconstructor is None
                                   else getattr(reconstructor, "__name__", type(reconstructor).__name__))
        self.hparams["reconstructor"] = self.reconstructor_name
        # scratch space, not a submodule: a reconstruction model stays out of the state dict,
        # the checkpoints and DDP
        self._scratch: dict[str, Any] = {
            "reconstructor": resolve_reconstructor(reconstructor) if reconstructor is not None else None}
        if num_classes is not None and image_shape is not None:
            if fraction is None:
                self._allocate(num_classes, tuple(image_shape))
            else:  # allocated once the data module gives the class sizes
                self.num_classes, self.image_shape = num_classes, tuple(int(s) for s in image_shape)
            self.build_network(network)  # fail early on a network that does not fit the images

    # ------------------------------------------------------------------------------ state
    def counts_for(self, class_sizes: Sequence[int]) -> list[int]:
        """Images kept from classes of ``class_sizes``: ``ipc`` each, or with ``fraction`` the
        sum over every class's bins (:func:`ld3m.coreset.bin_sizes`) of
        ``round(fraction * len(bin))``.

        Raises:
            ValueError: if a class is smaller than ``bins`` (or ``ipc``), or the fraction keeps
                none of its images.
        """
        counts = []
        for c, size in enumerate(class_sizes):
            if self.bins > size:
                raise ValueError(f"bins={self.bins} is larger than class {c}, which has {size} "
                                 "training images")
            if self.fraction is None:
                counts.append(self.ipc)
                continue
            count = class_count(int(size), self.fraction, self.bins)
            if count == 0:
                raise ValueError(f"fraction={self.fraction:g} keeps no image of class {c} "
                                 f"({size} training images in {self.bins} bins): raise it")
            counts.append(count)
        return counts

    def _allocate(self, num_classes: int, image_shape: tuple[int, ...]) -> None:
        if self.fraction is None:
            counts = [self.ipc] * num_classes
        elif self._class_sizes is not None and len(self._class_sizes) == num_classes:
            counts = self.counts_for(self._class_sizes)
        elif self.class_counts is not None and len(self.class_counts) == num_classes:
            counts = list(self.class_counts)  # restored from a checkpoint
        else:
            raise ValueError("DQ with a fraction needs the class sizes of the training set "
                             "before its images exist: fit it, or call quantize_dataset")
        self.class_counts = counts
        self.ipc = max(counts)
        super()._allocate(num_classes, image_shape)
        n = sum(counts)
        if n != num_classes * self.ipc:  # unequal classes: one row per selected image
            self.images = nn.Parameter(torch.zeros(n, *self.image_shape))
            self.labels = torch.arange(num_classes).repeat_interleave(torch.tensor(counts))
        _, h, w = self.image_shape
        if self.drop_ratio > 0 and (h % self.patch_size or w % self.patch_size):
            raise ValueError(f"patch_size={self.patch_size} does not divide the image size {h}x{w}")
        # the selection, kept in checkpoints: dataset indices (-1: not selected yet), bins, and
        # the dropped patches
        self.register_buffer("indices", torch.full((n,), -1, dtype=torch.long))
        self.register_buffer("bin_ids", torch.full((n,), -1, dtype=torch.long))
        patches = (h // self.patch_size) * (w // self.patch_size) if self.drop_ratio > 0 else 0
        self.register_buffer("patch_mask", torch.zeros(n, patches, dtype=torch.bool))

    @property
    def selected(self) -> bool:
        """Whether the selection has been made (or restored from a checkpoint)."""
        indices = getattr(self, "indices", None)
        return indices is not None and indices.numel() > 0 and bool((indices >= 0).all())

    def setup(self, stage: str) -> None:
        if (stage == "fit" and self.fraction is not None and not self._initialised
                and self._trainer is not None):
            dm = self.real_data
            dm.setup("fit")
            self._class_sizes = list(dm.class_sizes())  # for the allocation
        super().setup(stage)

    def initialise(self, dm) -> None:
        """Check that every class can give ``ipc`` images (or the fraction's) and ``bins``
        bins; the images are selected in ``on_fit_start`` (:meth:`quantize_dataset`)."""
        sizes = dm.class_sizes()
        for c, size in enumerate(sizes):
            if self.fraction is None and max(self.ipc, self.bins) > size:
                what = f"ipc={self.ipc}" if self.ipc > size else f"bins={self.bins}"
                raise ValueError(f"{what} is larger than class {c} ({dm.class_names[c]!r}) of "
                                 f"{dm.dataset_name}, which has {size} training images")
        counts = self.counts_for(sizes)
        if counts != self.class_counts:
            setting = f"ipc={self.ipc}" if self.fraction is None else f"fraction={self.fraction:g}"
            raise ValueError(f"DQ was allocated for {self.class_counts} images per class, but "
                             f"{dm.dataset_name} gives {counts} at {setting}")

    # ------------------------------------------------------------------------------ processes
    def _rank_world(self) -> tuple[int, int]:
        if self._trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def _broadcast(self, obj: Any) -> Any:
        if self._rank_world()[1] == 1:
            return obj
        return self.trainer.strategy.broadcast(obj, src=0)

    def _device_kwargs(self) -> dict[str, Any]:
        accelerator, devices = trainer_device(device=self.device)
        return {"accelerator": accelerator, "devices": devices}

    # ------------------------------------------------------------------------------ network
    def train_embedding_network(self, dm) -> dict[str, torch.Tensor]:
        """Train ``network`` on the real training set (a short Lightning run); its weights."""
        c, h, _ = self.image_shape
        loader = DataLoader(dm.train_split.dataset(dm), batch_size=EMBED_BATCH, shuffle=True,
                            generator=self.shared_generator(0, _SALT_LOADER),
                            num_workers=dm.num_workers)
        # Classifier drops its lr x0.1 at epoch epochs // 2: the first epoch boundary at or past
        # half of the steps
        epochs = 2 * max(1, math.ceil(self.embed_steps / (2 * len(loader))))
        model = Classifier(self.network, c, self.num_classes, h, lr=self.embed_lr, epochs=epochs,
                           dsa="none", seed=self.seed)
        if self.embed_steps:
            start = time.perf_counter()
            with _quiet_lightning():
                trainer = L.Trainer(max_steps=self.embed_steps, max_epochs=-1, logger=False,
                                    enable_checkpointing=False,
                                    enable_progress_bar=self.show_progress,
                                    enable_model_summary=False, num_sanity_val_steps=0,
                                    **self._device_kwargs())
                trainer.fit(model, train_dataloaders=loader)
            log.info("DQ: trained the %s embedding network for %d steps in %.1f s",
                     self.network, self.embed_steps, time.perf_counter() - start)
        return {k: v.detach().cpu().clone() for k, v in model.net.state_dict().items()}

    def load_embedding_network(self, path: str | Path) -> dict[str, torch.Tensor]:
        """Read the weights of ``network`` from ``path`` (see ``embed_checkpoint``)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"embedding checkpoint {path} does not exist")
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001  (any unreadable file gets the same message)
            raise ValueError(f"{path} is not a readable PyTorch state dict "
                             f"({type(err).__name__})") from None
        state = saved.get("state_dict", saved) if isinstance(saved, dict) else None
        if not isinstance(state, dict) or not state:
            raise ValueError(f"{path} holds no state dict")
        if all(k.startswith("net.") for k in state):  # a checkpoint of ld3m.evaluation.Classifier
            state = {k[len("net."):]: v for k, v in state.items()}
        try:
            self.build_network(self.network).load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(f"{path} does not hold {self.network} weights for "
                             f"{self.num_classes} classes of {self.image_shape}: "
                             f"{str(err).splitlines()[0]}") from None
        return state

    def embedding_network(self, dm) -> nn.Module:
        """The trained embedding network (loaded, or trained on rank 0 and broadcast), frozen."""
        rank, _ = self._rank_world()
        if self.embed_checkpoint:
            state = self.load_embedding_network(self.embed_checkpoint)
        else:
            state = None
            if rank == 0:
                state = self.train_embedding_network(dm)
                if self._trainer is not None:
                    path = self.output_dir() / EMBED_FILE
                    with atomic_write(path) as tmp:
                        torch.save({"state_dict": state, "network": self.network,
                                    "dataset": self.dataset_name, "steps": self.embed_steps,
                                    "seed": self.seed}, tmp)
                    log.info("DQ: embedding network saved to %s (reuse it with "
                             "--model.embed_checkpoint)", path)
            state = self._broadcast(state)
        net = self.build_network(self.network)
        net.load_state_dict(state)
        return net.to(self.device).eval().requires_grad_(False)

    # ------------------------------------------------------------------------------ features
    @torch.no_grad()
    def embed(self, net: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Features of a batch, ``(B, D)``; for ``gradient`` the two Kronecker factors side by
        side, ``[softmax - onehot, features, 1]``."""
        with conv_backend(self.device):
            h = net.embed(images).float()
        if self.features == "embedding":
            return h
        error = F.softmax(net.classifier(h), dim=1) - F.one_hot(labels, self.num_classes).float()
        return torch.cat([error, h, torch.ones_like(h[:, :1])], dim=1)

    def embed_training_set(self, dm, net: nn.Module):
        """Features of every training image. Under DDP each rank embeds a contiguous slice and
        the slices are gathered on rank 0, which alone gets them (the others get ``None``)."""
        split = dm.train_split
        n = len(split)
        rank, world = self._rank_world()
        per_rank = math.ceil(n / world)
        index = torch.arange(rank * per_rank, min(n, (rank + 1) * per_rank))
        chunks = tqdm(index.split(EMBED_CHUNK), desc="DQ: embedding the training set",
                      unit="chunk", leave=False, disable=not self.show_progress)
        parts = [self.embed(net, split.images(chunk, dm).to(self.device),
                            split.labels[chunk].to(self.device)) for chunk in chunks]
        local = torch.cat(parts) if parts else None
        if world > 1:  # only rank 0 bins: the slices go to it alone (the others get None)
            width = self._broadcast(local.shape[1] if local is not None else None)
            padded = torch.zeros(per_rank, width, device=self.device)
            if local is not None:
                padded[:len(local)] = local
            slices = [torch.empty_like(padded) for _ in range(world)] if rank == 0 else None
            torch.distributed.gather(padded, slices, dst=0)
            if rank != 0:
                return None
            local = torch.cat(slices)[:n]
        if self.features == "gradient":
            k = self.num_classes
            return local[:, :k], local[:, k:]
        return local

    # ------------------------------------------------------------------------------ patches
    def patch_importance(self, net: nn.Module, images: torch.Tensor,
                         labels: torch.Tensor) -> torch.Tensor:
        """``(N, P)`` importance of every patch: the mean absolute input gradient of the true
        class's logit over the patch (summed over channels)."""
        with torch.enable_grad():
            x = images.detach().clone().requires_grad_(True)
            score = net(x).gather(1, labels.view(-1, 1)).sum()
            (grad,) = torch.autograd.grad(score, x)
        saliency = grad.abs().sum(1, keepdim=True)
        return F.avg_pool2d(saliency, self.patch_size).flatten(1)

    # ------------------------------------------------------------------------------ selection
    def sampling_generator(self) -> torch.Generator:
        """The generator of the uniform sampling from the bins (keyed by ``seed`` alone: the
        same on every rank; the bins draw nothing from it)."""
        return self.shared_generator(0, _SALT_SAMPLE)

    def quantize_dataset(self, dm) -> torch.Tensor:
        """Run DQ on ``dm``'s training set; fill ``images``; return the selected indices.

        Collective under DDP (every rank must call it).
        """
        dm.setup("fit")
        self.dataset_name, self.mean, self.std = dm.dataset_name, tuple(dm.mean), tuple(dm.std)
        if self.images is None:
            self._class_sizes = list(dm.class_sizes())
            self._allocate(dm.num_classes, tuple(dm.image_shape))
        self.initialise(dm)
        net = self.embedding_network(dm)
        start = time.perf_counter()
        features = self.embed_training_set(dm, net)
        log.info("DQ: embedded %d training images (%s) in %.1f s", len(dm.train_split),
                 self.features, time.perf_counter() - start)
        split = dm.train_split
        payload = None
        if self._rank_world()[0] == 0:
            start = time.perf_counter()
            generator = self.sampling_generator()
            if self.fraction is None:
                result = quantize(features, split.labels, self.ipc, self.bins, self.lam,
                                  generator=generator, num_classes=self.num_classes,
                                  max_matrix_bytes=self.max_matrix_bytes)
                log.info("DQ: %d bins per class, %d images per class selected in %.1f s",
                         self.bins, self.ipc, time.perf_counter() - start)
            else:
                result = quantize_fraction(features, split.labels, self.fraction, self.bins,
                                           self.lam, generator=generator,
                                           num_classes=self.num_classes,
                                           max_matrix_bytes=self.max_matrix_bytes)
                log.info("DQ: %d bins per class, %d images (fraction %g, %d to %d per class) "
                         "selected in %.1f s", self.bins, len(result.indices), self.fraction,
                         min(self.class_counts), max(self.class_counts),
                         time.perf_counter() - start)
            if len(result.indices) != len(self.indices):  # the allocation follows the same sizes
                raise RuntimeError(f"DQ selected {len(result.indices)} images for "
                                   f"{len(self.indices)} slots")
            payload = {"indices": result.indices, "bins": result.bins}
            if self.drop_ratio > 0:
                images = split.images(result.indices, dm).to(self.device)
                labels = self.labels.to(self.device)
                importance = self.patch_importance(net, images, labels)
                reconstructor = self._scratch["reconstructor"]
                if isinstance(reconstructor, nn.Module):
                    reconstructor = reconstructor.to(self.device).eval()
                payload["images"], payload["patch_mask"] = (t.cpu() for t in drop_patches(
                    images, importance, self.drop_ratio, self.patch_size, reconstructor))
        del features
        payload = self._broadcast(payload)
        images = payload.get("images")
        if images is None:
            images = split.images(payload["indices"], dm)
        with torch.no_grad():
            self.images.copy_(images.to(self.images.device, self.images.dtype))
        self.indices.copy_(payload["indices"])
        self.bin_ids.copy_(payload["bins"])
        if "patch_mask" in payload:
            self.patch_mask.copy_(payload["patch_mask"])
        self._initialised = True
        return self.indices.detach().cpu().clone()

    # ------------------------------------------------------------------------------ Lightning
    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.selected:
            log.info("DQ: selection restored from the checkpoint")
            return
        self.quantize_dataset(self.real_data)

    def on_train_start(self) -> None:
        # the selection is the whole method: leave the fit loop before its first step (the
        # on_train_end callbacks still run)
        self.trainer.should_stop = True

    def training_step(self, batch, batch_idx: int) -> None:
        """Never reached: ``fit`` stops in ``on_train_start``. Returns ``None`` (no update)."""
        return None

    # ------------------------------------------------------------------------------ export
    def export_extra(self) -> dict[str, Any]:
        extra = {"indices": self.indices.detach().cpu().clone(),
                 "bins": self.bin_ids.detach().cpu().clone()}
        if self.drop_ratio > 0:
            extra["patch_mask"] = self.patch_mask.detach().cpu().to(torch.uint8)
        embedding = self.embed_checkpoint or f"trained {self.embed_steps} steps, lr {self.embed_lr}"
        return {"extra": extra, "meta": {"dq": {
            "network": self.network, "features": self.features, "bins": self.bins,
            "lam": self.lam, "embedding": embedding, "drop_ratio": self.drop_ratio,
            "patch_size": self.patch_size, "reconstructor": self.reconstructor_name,
            "fraction": self.fraction, "class_counts": list(self.class_counts or [])}}}

    def image_grid(self) -> torch.Tensor:
        """The images as one grid in [0, 1], a row per class: its first ``GRID_PER_CLASS``
        images (bin order), a class that kept fewer padded with blank tiles."""
        images = self.synthetic_set().denormalized()
        counts = self.class_counts or [self.ipc] * int(self.num_classes)
        width = min(max(counts), GRID_PER_CLASS)
        rows, start = [], 0
        for count in counts:
            row = images[start:start + min(count, width)]
            blank = torch.ones(width - len(row), *row.shape[1:], dtype=row.dtype)
            rows.append(torch.cat([row, blank]))
            start += count
        return make_grid(torch.cat(rows), nrow=width, padding=1, pad_value=1.0)

    # keep the per-class counts in checkpoints (with a fraction they follow from the data)
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["ld3m"]["dq_class_counts"] = list(self.class_counts or [])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        counts = (checkpoint.get("ld3m") or {}).get("dq_class_counts")
        if self.images is None and counts:
            self.class_counts = [int(c) for c in counts]
        super().on_load_checkpoint(checkpoint)
