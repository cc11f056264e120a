"""Lightning callbacks: export, image grids, evaluation: ``from ld3m.callbacks import ExportSynthetic``."""

from ld3m.callbacks.evaluation import PeriodicEvaluation
from ld3m.callbacks.export import ExportSynthetic
from ld3m.callbacks.image_grid import ImageGrid

__all__ = ["ExportSynthetic", "ImageGrid", "PeriodicEvaluation"]
