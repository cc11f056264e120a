"""Write the synthetic set as a ``.safetensors`` file at the end of ``fit``."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger("ld3m")


class ExportSynthetic(L.Callback):
    """Save the method's synthetic set (atomically) when training ends, and every N steps.

    If training stops on an exception (e.g. a NaN loss, which is caught before the images are
    touched), the last finite images are written too, so no progress is lost.

    Args:
        dirpath: Folder of the file (default: the trainer's ``default_root_dir``).
        filename: File name of the set.
        every_n_steps: Also save every N optimisation steps (0: only at the end).
    """

    def __init__(self, dirpath: str | None = None, filename: str = "synthetic.safetensors",
                 every_n_steps: int = 0) -> None:
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0, got {every_n_steps}")
        if not filename.endswith(".safetensors"):
            raise ValueError(f"filename must end in .safetensors, got {filename!r}")
        self.dirpath = dirpath
        self.filename = filename
        self.every_n_steps = every_n_steps
        self.last_path: Path | None = None

    def path(self, trainer: L.Trainer) -> Path:
        return Path(self.dirpath or trainer.default_root_dir) / self.filename

    @rank_zero_only
    def save(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path:
        self.last_path = pl_module.synthetic_set().save(self.path(trainer))
        log.info("synthetic set written to %s", self.last_path)
        return self.last_path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.save(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.save(trainer, pl_module)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        images = getattr(pl_module, "images", None)
        if (getattr(pl_module, "_initialised", False) and images is not None
                and trainer.global_step > 0 and torch.isfinite(images).all()):
            self.save(trainer, pl_module)
