"""Small helpers shared by the test modules (import with ``from helpers import ...``)."""

from __future__ import annotations

import struct
from pathlib import Path

import lightning as L
import torch


def cpu_trainer(root: Path, max_steps: int, callbacks=(), **kwargs) -> L.Trainer:
    """A quiet single-CPU ``Trainer`` (no logger, bar, summary or checkpoints unless asked)."""
    settings = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
                "enable_progress_bar": False, "enable_model_summary": False, **kwargs}
    return L.Trainer(max_steps=max_steps, default_root_dir=str(root), callbacks=list(callbacks),
                     **settings)


def error_line(capsys) -> str:
    """The one ``error:`` line a command printed: the last line of stderr, no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert err.rstrip().splitlines()[-1] == lines[0], "the error line must be the last one"
    return lines[0]


def write_idx(path: Path, data: torch.Tensor) -> None:
    """An IDX file of unsigned bytes: magic 0x0000080N, N big-endian int32 sizes, the data."""
    header = struct.pack(">I", 0x0800 | data.dim()) + struct.pack(f">{data.dim()}I", *data.shape)
    path.write_bytes(header + data.to(torch.uint8).contiguous().numpy().tobytes())


def write_fashion_mnist_slice(source, root: Path, train: int, test: int) -> Path:
    """The first ``train`` training and ``test`` test images of the set-up Fashion-MNIST data
    module ``source``, written as the four IDX files of ``root/FashionMNIST/raw``; returns
    ``root``. A smaller real dataset in its own on-disk format, for tests where the whole
    training set would be slow (e.g. in subprocesses)."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, split, n in (("train", source.train_split, train),
                             ("t10k", source._test_split(), test)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", split.cached[:n, 0])
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", split.labels[:n])
    return root


class SigintAt(L.Callback):
    """Send this process a SIGINT (a Ctrl-C) when ``global_step`` is ``step``, at the end of that
    step (``when="end"``) or between it and the next (``"start"`` of the next batch): the
    interruption lands at a known place, so a test can compare the resumed run with an
    uninterrupted one."""

    def __init__(self, step: int, when: str = "end") -> None:
        self.step, self.when = step, when

    def _send(self, trainer) -> None:
        if trainer.global_step == self.step:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGINT)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.when == "end":
            self._send(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.when == "start":
            self._send(trainer)


class Pace(L.Callback):
    """Sleep ``seconds`` after every step, so that a signal sent from outside lands mid-run."""

    def __init__(self, seconds: float = 0.2) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import time

        time.sleep(self.seconds)
