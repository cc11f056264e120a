"""Small helpers shared by the test modules (import with ``from helpers import ...``)."""

from __future__ import annotations

from pathlib import Path

import lightning as L


def cpu_trainer(root: Path, max_steps: int, callbacks=(), **kwargs) -> L.Trainer:
    """A quiet single-CPU ``Trainer`` (no logger, bar, summary or checkpoints unless asked)."""
    settings = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
                "enable_progress_bar": False, "enable_model_summary": False, **kwargs}
    return L.Trainer(max_steps=max_steps, default_root_dir=str(root), callbacks=list(callbacks),
                     **settings)
