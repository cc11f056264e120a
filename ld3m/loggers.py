"""ld3m and the trainer's loggers: the default pair, and images and tables for any of them.

Lightning's loggers agree on scalars (``log_metrics``) but not on images or text, so the two
helpers here speak to each kind that can show them: TensorBoard (``add_image``/``add_text``),
and loggers with a W&B-style ``log_image``/``log_table`` (W&B, and others that copy it). A CSV
logger has nowhere to put an image; it still gets the scalars from the callbacks.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment

from ld3m.outputs import LOGS

log = logging.getLogger("ld3m")


class ContinuedCSVLogger(CSVLogger):
    """A ``CSVLogger`` that continues the ``metrics.csv`` of a run resumed at step ``resume_step``
    (Lightning's deletes it): the rows before that step are kept, later ones dropped (the resumed
    run logs those steps again).

    Args:
        resume_step: The step the run resumes from (``None``: a new run, Lightning's behaviour).
        *args, **kwargs: Those of ``CSVLogger``.
    """

    def __init__(self, *args, resume_step: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is None:
            rows = self._earlier_rows()
            writer = CSVLogger.experiment.fget(self)  # a new writer (it deletes the old file)
            if rows:
                writer.metrics = rows
        return self._experiment

    def _earlier_rows(self) -> list[dict]:
        path = Path(self.log_dir) / "metrics.csv"
        if self.resume_step is None or not path.is_file():
            return []
        with path.open(newline="") as f:
            return [{k: v for k, v in row.items() if v not in ("", None)}
                    for row in csv.DictReader(f)
                    if row.get("step") not in (None, "") and int(row["step"]) < self.resume_step]


def default_loggers(root: str | Path, version: int, resume_step: int | None = None) -> list[Logger]:
    """The ``ld3m fit`` loggers: CSV (``metrics.csv``) and TensorBoard, both in
    ``<root>/lightning_logs/version_<version>`` (``tensorboard --logdir <root>`` shows the
    losses, the synthetic images and the evaluation tables). ``resume_step``: the run continues
    that version's logs from that step."""
    loggers: list[Logger] = [ContinuedCSVLogger(str(root), name=LOGS, version=version,
                                                resume_step=resume_step)]
    try:
        loggers.append(TensorBoardLogger(str(root), name=LOGS, version=version,
                                         default_hp_metric=False))
    except ModuleNotFoundError:  # tensorboard (a dependency) uninstalled by hand
        log.debug("tensorboard is not installed: logging to CSV only")
    return loggers


def log_image(trainer: L.Trainer, key: str, image: torch.Tensor, step: int) -> None:
    """Send a ``(C, H, W)`` image in ``[0, 1]`` to every logger that shows images."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, image, step)
        elif callable(getattr(logger, "log_image", None)):
            logger.log_image(key=key, images=[image], step=step)


def log_table(trainer: L.Trainer, key: str, columns: list[str], rows: list[list],
              markdown: str, step: int) -> None:
    """Send a table to every logger that shows tables (TensorBoard gets the Markdown text)."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text(key, markdown, step)
        elif callable(getattr(logger, "log_table", None)):
            logger.log_table(key=key, columns=columns, data=rows, step=step)
