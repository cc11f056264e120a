"""ld3m: dataset distillation as PyTorch Lightning modules."""

__version__ = "0.1.0"
