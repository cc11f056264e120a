"""Write the synthetic set as a ``.safetensors`` file at the end of ``fit``."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from ld3m.outputs import check_before_writing, output_dir_of

log = logging.getLogger("ld3m")


class ExportSynthetic(L.Callback):
    """Save the method's synthetic set (atomically) when training ends, and every N steps.

    If training stops on an exception, the last finite images are written under another name
    (``synthetic.interrupted.safetensors`` after Ctrl-C or SIGTERM, ``synthetic.failed.safetensors``
    after an error such as a NaN loss), so no progress is lost and a finished set already in the
    folder is never replaced by an unfinished one.

    Args:
        dirpath: Folder of the file (default: the run's output folder, see ``ld3m.outputs``).
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

    def path(self, trainer: L.Trainer, pl_module: L.LightningModule | None = None,
             filename: str | None = None) -> Path:
        if self.dirpath:
            folder = Path(self.dirpath)
        else:
            folder = output_dir_of(trainer, pl_module)
        return folder / (filename or self.filename)

    @rank_zero_only
    def save(self, trainer: L.Trainer, pl_module: L.LightningModule,
             filename: str | None = None) -> Path:
        if filename is None:  # a finished or periodic set: never from non-finite values
            check_before_writing(pl_module)
        self.last_path = pl_module.synthetic_set().save(self.path(trainer, pl_module, filename))
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
            stopped = isinstance(exception, KeyboardInterrupt | SystemExit)  # Ctrl-C, SIGTERM
            stem = self.filename[: -len(".safetensors")]
            self.save(trainer, pl_module, f"{stem}.{'interrupted' if stopped else 'failed'}.safetensors")
