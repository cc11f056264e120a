"""Where a run writes its outputs: runs don't overwrite runs.

A fit writes its set, PNG grids and evaluation report into the trainer's ``default_root_dir``
when that folder holds no earlier run's outputs. When it does, the new run writes them into its
own log folder (``<root>/lightning_logs/version_N``, next to its logs and checkpoints) and says
so, so the earlier run's files stay as they were. A run resumed from a checkpoint in the same
root keeps writing where it wrote before (the choice is stored in the checkpoint).
"""

from __future__ import annotations

import re
from pathlib import Path

#: Files and folders that mark a folder as holding a run's outputs.
OUTPUT_NAMES = ("synthetic.safetensors", "synthetic.best.safetensors", "images", "evaluation.md",
                "evaluation.json", "evaluation.png")

#: The folder in ``default_root_dir`` where Lightning's loggers keep ``version_N``.
LOGS = "lightning_logs"


def holds_outputs(folder: str | Path) -> bool:
    """Whether ``folder`` already holds a run's outputs (a set, grids or a report)."""
    folder = Path(folder)
    return any((folder / name).exists() for name in OUTPUT_NAMES)


def next_version(logs: str | Path) -> int:
    """The first ``N`` for which ``<logs>/version_N`` does not exist yet."""
    logs = Path(logs)
    taken = [int(m.group(1)) for p in (logs.iterdir() if logs.is_dir() else ())
             if (m := re.fullmatch(r"version_(\d+)", p.name))]
    return max(taken, default=-1) + 1


def version_of(path: str | Path, root: str | Path) -> int | None:
    """``N`` if ``path`` lies in ``<root>/lightning_logs/version_N``, else ``None``."""
    try:
        relative = Path(path).resolve().relative_to((Path(root) / LOGS).resolve())
    except ValueError:
        return None
    match = re.fullmatch(r"version_(\d+)", relative.parts[0]) if relative.parts else None
    return int(match.group(1)) if match else None


def choose_output_dir(root: str | Path, log_dir: str | Path | None) -> Path:
    """The folder a new run in ``root`` writes its outputs to (see the module notes).

    Args:
        root: The trainer's ``default_root_dir``.
        log_dir: The run's own log folder (``None`` without a logger).
    """
    root = Path(root)
    if not holds_outputs(root):
        return root
    if log_dir is not None and Path(log_dir).resolve() != root.resolve() and not holds_outputs(log_dir):
        return Path(log_dir)
    return root / LOGS / f"version_{next_version(root / LOGS)}"


def output_dir_of(trainer, pl_module) -> Path:
    """The run's output folder: the module's choice (``DistillationModule.output_dir``), or
    the trainer's ``default_root_dir`` for a module that does not make one."""
    choose = getattr(pl_module, "output_dir", None)
    return choose() if callable(choose) else Path(trainer.default_root_dir)


def check_before_writing(pl_module) -> None:
    """Raise if the module's finite check saw a NaN/inf (on an accelerator the check is read
    every few steps; here, before a file is written from possibly diverged values)."""
    check = getattr(pl_module, "raise_if_not_finite", None)
    if callable(check):
        check()


def same_folder(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name the same folder (resolved; either may not exist yet)."""
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
