"""Evaluate the synthetic set with the protocol every N steps and at the end of ``fit``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from ld3m.evaluation import PROTOCOLS, EvalReport, evaluate
from ld3m.files import atomic_write
from ld3m.loggers import log_table
from ld3m.outputs import check_before_writing, output_dir_of

log = logging.getLogger("ld3m")

#: Where ``keep_best`` writes the set of the best evaluation (next to ``synthetic.safetensors``).
BEST_FILE = "synthetic.best.safetensors"


class PeriodicEvaluation(L.Callback):
    """Train fresh networks on the current synthetic set and report real test accuracy.

    Under DDP the networks are spread over the ranks (each on its own device) and their
    accuracies gathered, so every rank logs the same report. The report (with the random-real
    baseline) is written to ``evaluation.md`` and ``evaluation.json`` in the run's output
    folder, each mean accuracy goes to the trainer's loggers as ``eval/<arch>`` and the table
    to those that show tables (TensorBoard, W&B). With ``every_n_steps`` the accuracies at
    every evaluated step are kept (in checkpoints too) and plotted against the steps in
    ``evaluation.png``.

    With ``keep_best``, as the trajectory-matching papers report (MTT, DATM: the best evaluation
    over the sets evaluated every N iterations), the set of the best evaluation so far (by the
    mean accuracy of the first of ``archs``) is written to ``synthetic.best.safetensors`` next
    to the final ``synthetic.safetensors``, and the report says which step it is and its
    accuracy (``evaluation.md``, ``evaluation.json``'s ``best``).

    Args:
        every_n_steps: Evaluate every N steps (0: never during training).
        at_end: Evaluate when training ends.
        archs: Architectures to train (comma-separated names also accepted).
        runs: Fresh networks per architecture.
        epochs: The protocol's ``E`` per network (``E + 1`` epochs are trained; the published
            protocol: 1000 with augmentation, 300 without).
        dsa: DSA strategy during evaluation training ("none" to disable; "auto": the authors'
            per method, DSA for every method but DC, which gets DC's own augmentation).
        baseline: Also evaluate random real images (same IPC) at the end.
        precision: Precision of the evaluation trainers (default: full precision).
        seed: Seed of the evaluation's draws (networks, augmentation, shuffling, baseline).
        dc_augment: DC's own augmentation when ``dsa`` is ``none`` (e.g. ``crop_scale_rotate``,
            ``auto``: the authors' choice per dataset and network; see ``ld3m.evaluation``).
        batch_size: Minibatch of the evaluation training (the papers' 256; DATM's recipes 128).
        keep_best: Also keep the set of the best evaluation (see above).
        protocol: The evaluation protocol (see ``ld3m.evaluation.evaluate``): ``auto`` (DD's
            for DD sets, else ``standard``), ``standard``, ``dd`` or ``glad`` (GLaD's and
            LD3M's: warm-up then cosine, EMA of the weights; ``epochs`` is then exactly ``E``).
        stack: Train up to this many networks of an architecture at once as one stacked model
            (``torch.func.vmap``; the same accuracies as one by one; for GPUs, where one small
            network leaves the device idle; slower on CPUs); 0: one at a time. The standard
            protocol, networks without BatchNorm only (see ``ld3m.stacked``).
        compile: Compile the evaluation networks' training forward (``torch.compile``: at each
            evaluation, once per architecture and batch shape; eager where compiling fails).
    """

    def __init__(self, every_n_steps: int = 0, at_end: bool = True, archs: list[str] | str = "ConvNet",
                 runs: int = 3, epochs: int = 300, dsa: str = "auto", baseline: bool = True,
                 precision: str | None = None, seed: int = 0, dc_augment: str = "none",
                 batch_size: int = 256, keep_best: bool = False, protocol: str = "auto",
                 stack: int = 0, compile: bool = False) -> None:
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0, got {every_n_steps}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if stack < 0:
            raise ValueError(f"stack must be >= 0, got {stack}")
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
        self.seed = seed
        self.dc_augment = dc_augment
        self.batch_size = batch_size
        self.keep_best = keep_best
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
        self.protocol = protocol
        self.stack = stack
        self.compile = compile
        #: ``{"step", "arch", "mean", "std"}`` of the best evaluation so far (``keep_best``)
        self.best: dict[str, Any] | None = None
        self.last_report: EvalReport | None = None
        #: ``[{"step", "arch", "mean", "std"}]`` of every evaluation of the synthetic set so far
        self.history: list[dict[str, Any]] = []

    def run(self, trainer: L.Trainer, pl_module, baseline: bool) -> EvalReport:
        """Evaluate now. Under DDP every rank trains its share of the networks on its own device
        and every rank gets (and logs) the whole report; rank 0 writes and plots it."""
        check_before_writing(pl_module)
        report = evaluate(pl_module.synthetic_set(), trainer.datamodule, archs=self.archs,
                          runs=self.runs, epochs=self.epochs, dsa=self.dsa, baseline=baseline,
                          seed=self.seed, precision=self.precision, progress=False,
                          dc_augment=self.dc_augment, batch_size=self.batch_size,
                          device=pl_module.device, rank=trainer.global_rank,
                          world_size=trainer.world_size, protocol=self.protocol,
                          stack=self.stack, compile=self.compile)
        self.last_report = report
        step = trainer.global_step
        name = f"{pl_module.method_name} (IPC {pl_module.ipc})"
        self.history = [h for h in self.history if h["step"] != step]
        for arch in self.archs:
            result = report.get(name, arch)
            self.history.append({"step": step, "arch": arch, "mean": result.mean,
                                 "std": result.std})
        log.info("evaluation at step %d (%d runs, %d epochs):\n%s", step, self.runs, self.epochs,
                 report.table())
        if trainer.is_global_zero:
            for arch in self.archs:
                result = report.get(name, arch)
                for logger in trainer.loggers:
                    logger.log_metrics({f"eval/{arch}": result.mean,
                                        f"eval/{arch}_std": result.std}, step)
            rows = [[r.name, r.arch, 100 * r.mean, 100 * r.std] for r in report.results]
            log_table(trainer, "evaluation", ["set", "arch", "accuracy", "std"], rows,
                      report.table(), step)
            if self.every_n_steps:
                self._plot(output_dir_of(trainer, pl_module) / "evaluation.png", name)
        if self.keep_best:
            self._keep_if_best(trainer, pl_module, report.get(name, self.archs[0]), step)
        return report

    def _keep_if_best(self, trainer, pl_module, result, step: int) -> None:
        """Write the set when this evaluation beats every earlier one (every rank decides alike:
        the report is the same on all of them; rank 0 writes)."""
        if self.best is not None and result.mean <= self.best["mean"]:
            return
        self.best = {"step": step, "arch": self.archs[0], "mean": result.mean, "std": result.std,
                     "file": BEST_FILE}
        if trainer.is_global_zero:
            path = pl_module.synthetic_set().save(output_dir_of(trainer, pl_module) / BEST_FILE)
            log.info("best evaluation so far (step %d, %s %.2f%%): set written to %s", step,
                     self.archs[0], 100 * result.mean, path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.run(trainer, pl_module, baseline=False)

    def on_train_end(self, trainer, pl_module) -> None:
        if not self.at_end:
            return
        report = self.run(trainer, pl_module, baseline=self.baseline)
        if self.keep_best and self.best is not None:
            report.settings["best"] = dict(self.best)
        self._write(output_dir_of(trainer, pl_module), report, self.best if self.keep_best else None)

    @staticmethod
    @rank_zero_only
    def _write(folder: Path, report: EvalReport, best: dict[str, Any] | None = None) -> None:
        table = report.table() + "\n"
        if best is not None:
            table += (f"\nBest evaluation: step {best['step']}, {best['arch']} "
                      f"{100 * best['mean']:.2f} +- {100 * best['std']:.2f} ({best['file']}; the "
                      f"table above is the final set's)\n")
        for name, text in (("evaluation.md", table), ("evaluation.json", report.to_json())):
            with atomic_write(folder / name) as tmp:
                tmp.write_text(text)

    def _plot(self, target: Path, name: str) -> None:
        """Test accuracy (mean +- std over the runs) against the step, one line per network."""
        from matplotlib.figure import Figure  # no pyplot: no display, no global backend switch

        figure = Figure(figsize=(6, 4), dpi=100)
        axes = figure.add_subplot()
        for arch in self.archs:
            points = sorted((h["step"], 100 * h["mean"], 100 * h["std"])
                            for h in self.history if h["arch"] == arch)
            if points:
                steps, means, stds = zip(*points, strict=True)
                axes.errorbar(steps, means, yerr=stds, marker="o", capsize=3, label=arch)
        axes.set_xlabel("step")
        axes.set_ylabel("test accuracy (%)")
        axes.set_title(name)
        axes.grid(alpha=0.3)
        axes.legend()
        with atomic_write(target, suffix=".png") as tmp:
            figure.savefig(tmp, format="png", bbox_inches="tight")

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "best": self.best}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self.best = state_dict.get("best")
