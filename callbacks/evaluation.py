"""Evaluate the synthetic set with the protocol every N steps and at the end of ``fit``."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from ld3m.augment import DEFAULT_STRATEGY as DEFAULT_DSA
from ld3m.evaluation import EvalReport, evaluate
from ld3m.files import atomic_write

log = logging.getLogger("ld3m")


class PeriodicEvaluation(L.Callback):
    """Train fresh networks on the current synthetic set and report real test accuracy.

    Runs on rank 0 (the other ranks wait). The report (with the random-real baseline) is logged,
    written to ``<default_root_dir>/evaluation.md`` and ``evaluation.json``, and each mean
    accuracy goes to the trainer's logger as ``eval/<arch>``.

    Args:
        every_n_steps: Evaluate every N steps (0: never during training).
        at_end: Evaluate when training ends.
        archs: Architectures to train (comma-separated names also accepted).
        runs: Fresh networks per architecture.
        epochs: Training epochs per network (the published protocol: 1000 with DSA, 300 without).
        dsa: DSA strategy during evaluation training ("none" to disable).
        baseline: Also evaluate random real images (same IPC) at the end.
        precision: Precision of the evaluation trainers (default: full precision).
    """

    def __init__(self, every_n_steps: int = 0, at_end: bool = True, archs: list[str] | str = "ConvNet",
                 runs: int = 3, epochs: int = 300, dsa: str = DEFAULT_DSA, baseline: bool = True,
                 precision: str | None = None) -> None:
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0, got {every_n_steps}")
        if runs < 1 or epochs < 1:
            raise ValueError(f"runs and epochs must be at least 1, got {runs} and {epochs}")
        self.every_n_steps = every_n_steps
        self.at_end = at_end
        self.archs = [a.strip() for a in archs.split(",")] if isinstance(archs, str) else list(archs)
        self.runs = runs
        self.epochs = epochs
        self.dsa = dsa
        self.baseline = baseline
        self.precision = precision
        self.last_report: EvalReport | None = None

    def run(self, trainer: L.Trainer, pl_module, baseline: bool) -> EvalReport | None:
        report = None
        if trainer.is_global_zero:
            report = evaluate(pl_module.synthetic_set(), trainer.datamodule, archs=self.archs,
                              runs=self.runs, epochs=self.epochs, dsa=self.dsa, baseline=baseline,
                              accelerator=trainer.accelerator.__class__.__name__.replace(
                                  "Accelerator", "").lower() or "auto",
                              precision=self.precision)
            self.last_report = report
            for arch in self.archs:
                result = report.get(f"{pl_module.method_name} (IPC {pl_module.ipc})", arch)
                if trainer.logger is not None:
                    trainer.logger.log_metrics({f"eval/{arch}": result.mean,
                                                f"eval/{arch}_std": result.std}, trainer.global_step)
            log.info("evaluation at step %d (%d runs, %d epochs):\n%s", trainer.global_step,
                     self.runs, self.epochs, report.table())
        trainer.strategy.barrier("ld3m-evaluation")
        return report

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.run(trainer, pl_module, baseline=False)

    def on_train_end(self, trainer, pl_module) -> None:
        if not self.at_end:
            return
        report = self.run(trainer, pl_module, baseline=self.baseline)
        if report is not None:
            self._write(Path(trainer.default_root_dir), report)

    @staticmethod
    @rank_zero_only
    def _write(folder: Path, report: EvalReport) -> None:
        for name, text in (("evaluation.md", report.table() + "\n"), ("evaluation.json", report.to_json())):
            with atomic_write(folder / name) as tmp:
                tmp.write_text(text)
