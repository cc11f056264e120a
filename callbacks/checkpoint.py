"""Keep one resumable ``last.ckpt`` per run: on a cadence, at the end, and when interrupted."""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Checkpoint

from ld3m.files import atomic_write
from ld3m.outputs import check_before_writing, output_dir_of

log = logging.getLogger("ld3m")

#: Steps between the first time-based decisions, before a step time is known.
_PROBE_STEPS = 10


class ResumeCheckpoint(Checkpoint):
    """One ``last.ckpt`` that resumes the run where it stopped (``--ckpt_path .../last.ckpt``).

    It is written every ``every_n_steps`` steps and/or about every ``every_n_minutes`` minutes of
    training, when training ends and when the run is stopped: the first Ctrl-C (SIGINT) finishes
    the current step (and its logging), writes the checkpoint and stops (a second Ctrl-C stops at once); SIGTERM (a
    scheduler's preemption, which Lightning turns into a stop between two steps) writes it too.
    An error (e.g. a NaN loss) does not: the last good checkpoint stays. The file is replaced
    atomically, so there is exactly one ``last.ckpt``, never ``last-v1.ckpt`` beside it.

    The time cadence is turned into a step count by rank 0 (from the measured step time) and
    broadcast at each save, so every DDP rank saves at the same step with one collective per save.

    Args:
        every_n_steps: Save every N optimisation steps (0: no step cadence).
        every_n_minutes: Save about every M minutes of training (0: no time cadence).
        dirpath: Folder of ``last.ckpt`` (default: ``checkpoints/`` in the run's log folder).
        on_interrupt: Finish the step, save and stop on the first Ctrl-C, and save on SIGTERM.
    """

    FILENAME = "last.ckpt"

    def __init__(self, every_n_steps: int = 0, every_n_minutes: float = 10.0,
                 dirpath: str | None = None, on_interrupt: bool = True) -> None:
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0, got {every_n_steps}")
        if not (every_n_minutes >= 0 and math.isfinite(every_n_minutes)):
            raise ValueError(f"every_n_minutes must be >= 0, got {every_n_minutes}")
        self.every_n_steps = every_n_steps
        self.every_n_minutes = every_n_minutes
        self.dirpath = dirpath
        self.on_interrupt = on_interrupt
        self.last_path: Path | None = None
        self._folder: Path | None = None
        self._saved_step = -1
        self._interrupted = False
        self._previous_handler: Any = None
        self._next_timed: int | None = None  # the step of the next time-based decision
        self._mark: tuple[int, float] = (0, 0.0)  # (step, time) of the last time-based save

    # ------------------------------------------------------------------------------ where
    def path(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path:
        """``<dirpath>/last.ckpt`` (decided at the start of training, the same on every rank)."""
        if self._folder is None:
            self._folder = self._choose_folder(trainer, pl_module)
        return self._folder / self.FILENAME

    def _choose_folder(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path:
        if self.dirpath:
            return Path(self.dirpath)
        if trainer.loggers:
            return Path(trainer.log_dir) / "checkpoints"  # broadcast from rank 0 by Lightning
        return output_dir_of(trainer, pl_module) / "checkpoints"

    # ------------------------------------------------------------------------------ saving
    def save(self, trainer: L.Trainer, pl_module: L.LightningModule, check: bool = True) -> Path:
        """Write ``last.ckpt`` now (rank 0 writes; no collective, so any rank may call it);
        ``check``: first make sure no step went non-finite (the last good checkpoint stays)."""
        if check:
            check_before_writing(pl_module)
        target = self.path(trainer, pl_module)
        if trainer.is_global_zero:
            checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
            with atomic_write(target) as tmp:
                trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, tmp)
            log.info("checkpoint at step %d written to %s", trainer.global_step, target)
        self._saved_step = trainer.global_step
        self.last_path = target
        return target

    def on_train_start(self, trainer, pl_module) -> None:
        self._folder = self._choose_folder(trainer, pl_module)
        self._saved_step = -1  # nothing written by this fit yet (DQ's selection has no steps)
        self._mark = (trainer.global_step, time.monotonic())
        self._next_timed = trainer.global_step + _PROBE_STEPS if self.every_n_minutes else None
        self._interrupted = False
        if self.on_interrupt and threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum, frame) -> None:
        if self._interrupted:  # the second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self._interrupted = True
        log.warning("Ctrl-C: stopping after this step and writing a checkpoint "
                    "(Ctrl-C again to stop at once)")

    def _restore_handler(self) -> None:
        if self._previous_handler is not None:
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # a Ctrl-C during step k: saved at its end (where Lightning's own checkpoints are), the
        # stop comes here, once step k's metrics are logged too (a Ctrl-C that lands between two
        # steps lets one more step run, so that it is saved at a step's end as well)
        if self._interrupted and self._saved_step == trainer.global_step:
            self._restore_handler()
            raise KeyboardInterrupt(f"stopped by Ctrl-C at step {trainer.global_step}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self._interrupted:
            self.save(trainer, pl_module)
            return
        due = bool(self.every_n_steps) and step % self.every_n_steps == 0
        if self._next_timed is not None and step >= self._next_timed:
            due = self._timed_decision(trainer, step) or due
        if due and step != self._saved_step:
            self.save(trainer, pl_module)

    def _timed_decision(self, trainer: L.Trainer, step: int) -> bool:
        """Whether to save now for the time cadence, and the step of the next decision (rank 0's
        clock, broadcast: one collective per decision, every rank decides alike)."""
        mark_step, mark_time = self._mark
        now = time.monotonic()
        interval = 60.0 * self.every_n_minutes
        save = now - mark_time >= interval
        per_step = (now - mark_time) / max(step - mark_step, 1)
        remaining = interval if save else interval - (now - mark_time)
        next_step = step + max(1, int(remaining / max(per_step, 1e-9)))
        save, next_step = trainer.strategy.broadcast((save, next_step), src=0)
        if save:
            self._mark = (step, now)
        self._next_timed = next_step
        return save

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore_handler()
        if trainer.global_step != self._saved_step:
            self.save(trainer, pl_module)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore_handler()
        # SIGTERM: Lightning stops between two steps with a SystemExit; errors keep the last save
        stopped = isinstance(exception, SystemExit) and not isinstance(exception, KeyboardInterrupt)
        if (stopped and self.on_interrupt and self._folder is not None
                and trainer.global_step != self._saved_step):
            try:
                self.save(trainer, pl_module)
            except FloatingPointError as err:  # diverged before the stop: keep the last good one
                log.warning("no checkpoint at the stop: %s", err)
