"""Atomic file writes: nothing already saved is lost when a write fails half-way.

Files and folders are created with the modes the user's umask allows (``0666 & ~umask`` and
``0777 & ~umask``, as ``open`` and ``mkdir`` do), not the private ``0600``/``0700`` that
``tempfile`` gives its temporary names, so a shared buffer or run folder stays readable.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def current_umask() -> int:
    """The process's umask (read from ``/proc`` where it can be, without changing it)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc: the classic swap (not thread-safe, hence the fallback)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a newly created file gets: ``0666 & ~umask``."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """The mode a newly created folder gets: ``0777 & ~umask``."""
    return 0o777 & ~current_umask()


@contextlib.contextmanager
def atomic_write(target: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path next to ``target``; rename it over ``target`` on success.

    On any exception (including ``KeyboardInterrupt``) the temporary file is removed and
    ``target`` keeps its old content. ``suffix`` lets writers that pick a format from the file
    name (e.g. ``.png``) see the right extension. The file ends with the umask's mode.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to ``target``; on success it replaces ``target``.

    A previous ``target`` is first renamed aside and deleted only once the new one is in place
    (restored if the final rename fails); on any exception the temporary folder is removed.
    The folder ends with the umask's mode.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        yield tmp
        os.chmod(tmp, dir_mode())
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old"))
            os.replace(target, old)  # an empty placeholder dir: rename(2) may replace it
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_writable(folder: str | os.PathLike) -> Path:
    """Create ``folder`` if needed and prove a file can be written in it.

    Raises:
        ValueError: naming the folder and the reason, if it cannot be written (checked by
            writing, not with ``os.access``, which a root user's read-only mount would pass).
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".ld3m-write-test.")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(f"cannot write to the output folder {folder}: "
                         f"{err.strerror or type(err).__name__}") from None
    return folder


def read_json_object(path: str | os.PathLike) -> dict:
    """The JSON object in the file ``path``; a ``ValueError`` naming the file if it is not
    valid JSON or not an object."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return value
