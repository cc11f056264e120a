"""Lightning callbacks: export, image grids, evaluation, checkpoints, DATM's schedule: ``from ld3m.callbacks import ExportSynthetic``."""

from ld3m.callbacks.checkpoint import ResumeCheckpoint
from ld3m.callbacks.datm import StartEpochSchedule
from ld3m.callbacks.evaluation import PeriodicEvaluation
from ld3m.callbacks.export import ExportSynthetic
from ld3m.callbacks.image_grid import ImageGrid

__all__ = ["ExportSynthetic", "ImageGrid", "PeriodicEvaluation", "ResumeCheckpoint",
           "StartEpochSchedule"]
