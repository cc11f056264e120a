"""What every distillation method has: IPC, the learnable synthetic images, init, export.

A method subclasses :class:`DistillationModule`, implements ``training_step`` and, if it learns
more than images (an lr, soft labels), adds parameter groups in ``configure_optimizers``.
The synthetic images are an ``nn.Parameter`` of shape ``(classes * ipc, C, H, W)`` in the
dataset's normalised space, class-major (``ipc`` images of class 0, then class 1, ...).
Their shape comes from the constructor or, when not given, from the trainer's data module
at ``setup`` (so a checkpoint restores into an already allocated tensor).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torchvision.utils import make_grid

from ld3m.networks import NETWORK_NAMES, get_network
from ld3m.outputs import choose_output_dir, same_folder
from ld3m.synthetic import SyntheticSet

log = logging.getLogger("ld3m")

INITS = ("real", "noise")

#: On an accelerator the non-finite check reads its device flag every this many steps (and
#: before any file is written), instead of at every step.
FINITE_CHECK_EVERY = 50


def check_network_name(name: str) -> None:
    """Raise a ``ValueError`` naming the choices if ``name`` is not an ``ld3m.networks`` network."""
    if str(name).lower() not in {known.lower() for known in NETWORK_NAMES}:
        raise ValueError(f"unknown network {name!r}; choose one of: {', '.join(NETWORK_NAMES)}")


class DistillationModule(L.LightningModule):
    """Abstract base of the distillation methods.

    Args:
        ipc: Synthetic images per class.
        init: ``"real"`` (random real images of the class) or ``"noise"`` (standard normal).
        lr_img: Learning rate of the synthetic images.
        momentum: Momentum of the images' SGD optimiser.
        seed: Seed of the initialisation and of every random draw of the method.
        num_classes: Number of classes (default: from the data module).
        image_shape: ``(C, H, W)`` of the images (default: from the data module).
    """

    method_name: str = "base"
    #: ``None``: the finite check of :meth:`check_finite` is immediate on the CPU and deferred
    #: (device flags, read every ``FINITE_CHECK_EVERY`` steps) on accelerators; ``True`` /
    #: ``False`` force one (tests run the accelerators' path on the CPU with ``True``).
    deferred_finite_check: bool | None = None
    #: The flag to name when the images diverge.
    lr_flag: str = "--model.lr_img"
    #: Whether the method trains under fp16 mixed precision (``16-mixed``): true where every
    #: gradient goes through Lightning's loss scaling. Methods with hand-written gradients or
    #: inner optimisations (DC's inner training, DD's and MTT's unrolls, LD3M's chunked backward)
    #: refuse it and name ``bf16-mixed``, which needs no scaling.
    supports_fp16: bool = False

    def __init__(self, ipc: int = 10, init: str = "real", lr_img: float = 1.0, momentum: float = 0.5,
                 seed: int = 0, num_classes: int | None = None,
                 image_shape: tuple[int, int, int] | None = None) -> None:
        super().__init__()
        if ipc < 1:
            raise ValueError(f"ipc must be at least 1, got {ipc}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if not (lr_img > 0 and math.isfinite(lr_img)):
            raise ValueError(f"lr_img must be a positive number, got {lr_img}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.ipc = ipc
        self.init = init
        self.lr_img = lr_img
        self.momentum = momentum
        self.seed = seed
        self.num_classes = num_classes
        self.image_shape = tuple(image_shape) if image_shape is not None else None
        self.dataset_name = "unknown"
        self.mean: tuple[float, ...] = ()
        self.std: tuple[float, ...] = ()
        self.zca: dict | None = None  # the data module's ZCA settings (None: not whitened)
        self.images: nn.Parameter | None = None
        self.register_buffer("labels", torch.empty(0, dtype=torch.long))
        self._initialised = False
        #: ``{"root", "output_dir"}`` of the fit writing this module's outputs (kept in checkpoints)
        self._run_folders: dict[str, str] | None = None
        #: the first step whose gradients were not finite, on the device (accelerators only)
        self._first_bad: torch.Tensor | None = None
        if num_classes is not None and image_shape is not None:
            self._allocate(num_classes, self.image_shape)

    # ------------------------------------------------------------------------------ set-up
    def _allocate(self, num_classes: int, image_shape: tuple[int, ...]) -> None:
        if len(image_shape) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {image_shape}")
        self.num_classes = num_classes
        self.image_shape = tuple(int(s) for s in image_shape)
        self.images = nn.Parameter(torch.randn(num_classes * self.ipc, *self.image_shape,
                                               generator=torch.Generator().manual_seed(self.seed)))
        self.labels = torch.arange(num_classes).repeat_interleave(self.ipc)

    @property
    def real_data(self):
        """The trainer's real data module (a :class:`ld3m.datamodules.RealDataModule`)."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None or not hasattr(dm, "sample_per_class"):
            raise ValueError(f"{type(self).__name__} needs a real-data LightningDataModule "
                             "(e.g. ld3m.datamodules.FashionMNIST) passed to the trainer")
        return dm

    @classmethod
    def check_precision(cls, precision: str) -> None:
        """Refuse a precision the method cannot train in (fp16 where it is not supported).

        Raises:
            ValueError: naming ``bf16-mixed`` as the mixed precision to use instead.
        """
        if str(precision).startswith("16") and not cls.supports_fp16:
            raise ValueError(f"{cls.method_name} does not train in --trainer.precision "
                             f"{precision}: its hand-written gradients bypass fp16 loss scaling; "
                             "use --trainer.precision bf16-mixed (or 32-true)")

    def setup(self, stage: str) -> None:
        if stage == "fit" and self._trainer is not None:
            self.check_precision(str(self.trainer.precision))
        if stage != "fit" or self._initialised:
            return
        dm = self.real_data
        dm.setup("fit")
        self.dataset_name = dm.dataset_name
        self.mean, self.std = tuple(dm.mean), tuple(dm.std)
        self.zca = getattr(dm, "zca_settings", None)
        if self.images is None:
            self._allocate(dm.num_classes, dm.image_shape)
        elif (self.num_classes, self.image_shape) != (dm.num_classes, tuple(dm.image_shape)):
            raise ValueError(f"{type(self).__name__} was built for {self.num_classes} classes of "
                             f"{self.image_shape}, but {dm.dataset_name} has {dm.num_classes} of "
                             f"{tuple(dm.image_shape)}")
        self.initialise(dm)
        self._initialised = True
        self.keep_buffers_out_of_ddp()

    def keep_buffers_out_of_ddp(self) -> None:
        """Tell DDP not to broadcast this module's buffers (``labels``, LD3M's noise and render
        cache, DQ's selection) at every forward: they are equal on every rank by construction
        (drawn from the shared seed, or broadcast once by the method). Call it after the buffers
        exist (``setup`` does)."""
        from torch.nn.parallel import DistributedDataParallel

        names = [name for name, _ in self.named_buffers()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self, names)

    def initialise(self, dm) -> None:
        """Fill the synthetic images (identically on every rank: the draw uses ``seed``)."""
        generator = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            if self.init == "real":
                real = dm.sample_per_class(self.ipc, generator).flatten(0, 1)
                self.images.copy_(real)
            else:
                self.images.copy_(torch.randn(self.images.shape, generator=generator))

    @property
    def show_progress(self) -> bool:
        """Whether long set-up phases show a progress bar: on rank 0, when the trainer has one."""
        if self._trainer is None:
            return True
        return self.trainer.is_global_zero and self.trainer.progress_bar_callback is not None

    def shared_generator(self, step: int, salt: int = 0) -> torch.Generator:
        """A CPU generator keyed by seed, ``step`` and ``salt``: the same on every DDP rank."""
        value = (self.seed * 1_000_003 + step * 7919 + salt * 15_485_863) % (2**63)
        return torch.Generator().manual_seed(value)

    def build_network(self, name: str) -> nn.Module:
        """A default-initialised network ``name`` for this module's images and classes."""
        c, h, w = self.image_shape
        return get_network(name, c, self.num_classes, (h, w))

    def step_generator(self, salt: int = 0) -> torch.Generator:
        """A CPU generator for this step and rank: reproducible, resumable, distinct per rank."""
        rank = self.global_rank if self._trainer is not None else 0
        value = (self.seed * 1_000_003 + self.global_step * 7919 + rank * 104_729 + salt) % (2**63)
        return torch.Generator().manual_seed(value)

    # ------------------------------------------------------------------------------ outputs
    def on_fit_start(self) -> None:
        self.output_dir(decide_on_every_rank=True)

    def output_dir(self, decide_on_every_rank: bool = False) -> Path:
        """The folder this fit writes its set, grids and report to (see :mod:`ld3m.outputs`).

        Decided once per fit at ``on_fit_start`` (by rank 0, broadcast to the others) and kept
        in checkpoints, so a run resumed in the same ``default_root_dir`` writes where it did.
        """
        trainer = self.trainer
        root = Path(trainer.default_root_dir)
        known = self._run_folders
        if known is not None and same_folder(known["root"], root):
            return Path(known["output_dir"])
        log_dir = trainer.loggers[0].log_dir if trainer.loggers else None
        chosen = str(choose_output_dir(root, log_dir))
        if decide_on_every_rank:  # a collective: every rank is here (on_fit_start)
            chosen = trainer.strategy.broadcast(chosen, src=0)
        if not same_folder(chosen, root):
            log.info("%s already holds another run's outputs; this run writes its own to %s",
                     root, chosen)
        self._run_folders = {"root": str(root), "output_dir": chosen}
        return Path(chosen)

    # ------------------------------------------------------------------------------ training
    def configure_optimizers(self):
        return torch.optim.SGD([self.images], lr=self.lr_img, momentum=self.momentum)

    def check_finite(self, value: torch.Tensor, name: str = "loss") -> torch.Tensor:
        """Guard this step against a NaN/inf ``value`` (the loss, or a hand-made gradient).

        On the CPU the check is immediate: it raises before the optimizer step. On an
        accelerator reading the value would stop the host every step, so the check moves to the
        device (:meth:`on_before_optimizer_step`): a step whose gradients are not finite has them
        zeroed (the images are not updated with them), and the flag is read every
        ``FINITE_CHECK_EVERY`` steps and before any file is written (:meth:`raise_if_not_finite`),
        raising for the first bad step.
        """
        if not self._deferred_check():
            if not torch.isfinite(value.detach()).all():
                shown = f"{float(value)}" if value.numel() == 1 else "non-finite"
                raise FloatingPointError(self._not_finite_message(name, self.global_step, shown))
        return value

    def _deferred_check(self) -> bool:
        if self.deferred_finite_check is not None:
            return self.deferred_finite_check
        return self.device.type != "cpu"

    def on_before_optimizer_step(self, optimizer) -> None:
        """The device-side finite check (accelerators): zero the step's gradients where they are
        not finite, remember the first such step, read the flag every ``FINITE_CHECK_EVERY``
        steps. It looks at the gradients, which DDP has averaged: every rank decides alike."""
        if not self._deferred_check():
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]
                 if p.grad is not None]
        if not grads:
            return
        ok = torch.stack([torch.isfinite(g).all() for g in grads]).all()
        for g in grads:
            g.masked_fill_(~ok, 0.0)
        step = torch.tensor(self.global_step).to(self.device, non_blocking=True)
        bad_now = torch.where(ok, torch.full_like(step, -1), step)
        first_bad = self._first_bad
        self._first_bad = bad_now if first_bad is None else torch.where(first_bad >= 0,
                                                                        first_bad, bad_now)
        if (self.global_step + 1) % FINITE_CHECK_EVERY == 0:
            self.raise_if_not_finite()

    def raise_if_not_finite(self) -> None:
        """Raise if a step's gradients were NaN/inf (reads the device flag once: called every
        ``FINITE_CHECK_EVERY`` steps and before a file is written)."""
        if self._first_bad is not None and int(self._first_bad) >= 0:
            raise FloatingPointError(self._not_finite_message("gradients", int(self._first_bad)))

    def _not_finite_message(self, name: str, step: int, shown: str = "non-finite") -> str:
        return (f"{type(self).__name__} {name} became {shown} at step {step}; the images were "
                "not updated with them and files already written are kept (try a smaller "
                f"{self.lr_flag})")

    def device_generator(self, generator: torch.Generator) -> torch.Generator:
        """A generator on this module's device for draws that fill device tensors (network
        weights, noise), seeded from ``generator``: on an accelerator a new device generator
        (no copy from the host), on the CPU ``generator`` itself (the same draws as ever)."""
        if self.device.type in ("cpu", "meta"):
            return generator
        seed = int(torch.randint(2**62, (1,), generator=generator))  # a host draw: no sync
        return torch.Generator(device=self.device).manual_seed(seed)

    def synthetic_images(self) -> torch.Tensor:
        """The current synthetic images (normalised space), ``(classes * ipc, C, H, W)``."""
        if self.images is None:
            raise ValueError(f"{type(self).__name__} has no images yet: fit it or give "
                             "num_classes and image_shape")
        return self.images.detach()

    # ------------------------------------------------------------------------------ export
    def export_extra(self) -> dict[str, Any]:
        """Additional fields for :class:`SyntheticSet` (``lr``, ``soft_labels``, ``extra``; a
        ``meta`` dict is merged into the set's metadata)."""
        return {}

    def synthetic_set(self) -> SyntheticSet:
        """The current synthetic set, ready to save or evaluate."""
        images = self.synthetic_images().float().cpu()
        channels = images.shape[1]
        extra = self.export_extra()
        meta = {"hparams": {k: v for k, v in self.hparams.items()
                            if isinstance(v, int | float | str | bool)}}
        if self.zca is not None:
            meta["zca"] = dict(self.zca)
        meta.update(extra.pop("meta", {}))
        return SyntheticSet(
            images=images.clone(), labels=self.labels.cpu().clone(),
            mean=self.mean or (0.0,) * channels, std=self.std or (1.0,) * channels,
            num_classes=int(self.num_classes), method=self.method_name, dataset=self.dataset_name,
            ipc=self.ipc, meta=meta, **extra)

    def image_grid(self) -> torch.Tensor:
        """The images as one ``(C, H, W)`` grid in [0, 1]: a row per class."""
        return make_grid(self.synthetic_set().denormalized(), nrow=self.ipc, padding=1, pad_value=1.0)

    # keep the synthetic-set metadata in checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["ld3m"] = {"dataset": self.dataset_name, "mean": list(self.mean),
                              "std": list(self.std), "num_classes": self.num_classes,
                              "image_shape": list(self.image_shape or ()), "zca": self.zca,
                              "run": self._run_folders}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        info = checkpoint.get("ld3m")
        if info is None:
            raise ValueError("the checkpoint was not written by an ld3m method")
        if self.images is None:
            self._allocate(info["num_classes"], tuple(info["image_shape"]))
        self.dataset_name = info["dataset"]
        self.mean, self.std = tuple(info["mean"]), tuple(info["std"])
        self.zca = info.get("zca")
        self._run_folders = info.get("run")
        self._initialised = True
