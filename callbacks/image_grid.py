"""Save the synthetic images as a PNG grid (a row per class) every N steps and at the end."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from torchvision.utils import save_image

from ld3m.files import atomic_write
from ld3m.loggers import log_image
from ld3m.outputs import check_before_writing, output_dir_of


class ImageGrid(L.Callback):
    """PNG grids of the synthetic images under ``<dirpath>/step_XXXXXX.png`` and ``final.png``.

    Each grid also goes to the trainer's loggers that show images (TensorBoard, W&B) as
    ``synthetic/images`` at its step.

    Args:
        every_n_steps: Save a grid every N optimisation steps (0: only the first and final grids).
        dirpath: Folder of the PNGs (default: ``images/`` in the run's output folder).
    """

    def __init__(self, every_n_steps: int = 100, dirpath: str | None = None) -> None:
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.dirpath = dirpath

    def folder(self, trainer: L.Trainer, pl_module: L.LightningModule | None = None) -> Path:
        if self.dirpath:
            return Path(self.dirpath)
        return output_dir_of(trainer, pl_module) / "images"

    @rank_zero_only
    def save(self, trainer: L.Trainer, pl_module: L.LightningModule, name: str) -> Path:
        check_before_writing(pl_module)
        target = self.folder(trainer, pl_module) / name
        grid = pl_module.image_grid()
        with atomic_write(target, suffix=".png") as tmp:
            save_image(grid, tmp)
        log_image(trainer, "synthetic/images", grid, trainer.global_step)
        return target

    def on_train_start(self, trainer, pl_module) -> None:
        self.save(trainer, pl_module, f"step_{trainer.global_step:06d}.png")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.save(trainer, pl_module, f"step_{trainer.global_step:06d}.png")

    def on_train_end(self, trainer, pl_module) -> None:
        self.save(trainer, pl_module, "final.png")
