"""The published settings as ``ld3m fit`` configs: ``ld3m fit --config dm_cifar10_ipc10``.

A recipe is named ``<method>_<dataset>_ipc<N>``; ``--config`` takes the name (or the file's
path). :func:`recipes` lists them, :func:`recipe_path` finds one.
"""

from __future__ import annotations

from pathlib import Path

FOLDER = Path(__file__).parent


def recipes() -> list[str]:
    """The names of the packaged recipes."""
    return sorted(p.stem for p in FOLDER.glob("*.yaml"))


def recipe_path(name: str) -> Path | None:
    """The file of recipe ``name`` (``dm_cifar10_ipc10``, with or without ``.yaml`` or a folder
    in front), or ``None`` if there is no such recipe."""
    stem = Path(name).name.removesuffix(".yaml")
    path = FOLDER / f"{stem}.yaml"
    return path if path.is_file() else None
