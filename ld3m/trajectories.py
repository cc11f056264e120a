"""Expert trajectories (MTT's "buffer"): the on-disk format, read lazily, one shard per expert.

A buffer is a folder of ``expert_<i>.safetensors`` files (``i`` zero-padded to 5 digits), one
per expert network trained on the real data. Each shard holds:

- ``trajectory``: float32 ``(epochs + 1, P)``: the flat parameters (``torch.cat`` of every
  parameter's ``reshape(-1)`` in ``named_parameters`` order) at initialisation and after every
  epoch;
- ``logits`` (optional, DATM): float32 ``(N_train, classes)``: the final expert's logits on the
  training images, in the dataset's order;

and, under the safetensors metadata key ``ld3m``, a JSON object with ``format`` (1), ``kind``
(``"expert_trajectory"``), ``expert`` (its index), ``network``, ``dataset``, ``channels``,
``num_classes``, ``image_shape``, ``epochs``, ``lr_teacher``, ``batch_size``, ``dsa``, ``zca``
(``null``, or ``{"eps": 0.1}`` when the data module whitened the images), ``seed`` and ``params`` (``[[name, shape], ...]``, to unflatten). Shards are written
atomically, so an interrupted run leaves only complete experts and a resumed run trains the
missing ones. :class:`TrajectoryBuffer` checks that every shard describes the same setting and
loads one shard at a time.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from ld3m.files import atomic_write

FORMAT_VERSION = 1
KIND = "expert_trajectory"
#: The settings every shard of one buffer must share.
SHARED_KEYS = ("network", "dataset", "channels", "num_classes", "image_shape", "epochs",
               "lr_teacher", "batch_size", "dsa", "zca", "params")


def shard_name(index: int) -> str:
    """The file name of expert ``index``."""
    return f"expert_{index:05d}.safetensors"


def flatten_parameters(net: nn.Module) -> torch.Tensor:
    """The flat float32 parameters of ``net`` (``named_parameters`` order), detached."""
    return torch.cat([p.detach().float().reshape(-1) for p in net.parameters()])


def parameter_layout(net: nn.Module) -> list[list]:
    """``[[name, shape], ...]`` of ``net``'s parameters: what unflattens a trajectory row."""
    return [[name, list(p.shape)] for name, p in net.named_parameters()]


def unflatten(flat: torch.Tensor, layout: list[list]) -> dict[str, torch.Tensor]:
    """Split a flat parameter vector into named tensors (views of ``flat``)."""
    sizes = [math.prod(shape) for _, shape in layout]
    if flat.shape[-1] != sum(sizes):
        raise ValueError(f"a flat vector of {flat.shape[-1]} values does not fit a network with "
                         f"{sum(sizes)} parameters")
    parts = flat.split(sizes, dim=-1)
    return {name: part.reshape(*flat.shape[:-1], *shape) for (name, shape), part in
            zip(layout, parts, strict=True)}


@dataclass
class ExpertTrajectory:
    """One expert's parameters after every epoch (row 0: initialisation).

    Args:
        trajectory: ``(epochs + 1, P)`` flat parameters.
        info: The shard's settings (see the module docstring); ``epochs`` must match.
        logits: Optional ``(N_train, classes)`` logits of the final expert (DATM).
    """

    trajectory: torch.Tensor
    info: dict[str, Any]
    logits: torch.Tensor | None = None
    path: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        missing = [k for k in (*SHARED_KEYS, "expert") if k not in self.info]
        if missing:
            raise ValueError(f"expert trajectory settings lack {missing}")
        if self.trajectory.dim() != 2 or self.trajectory.shape[0] != self.info["epochs"] + 1:
            raise ValueError(f"trajectory must be (epochs + 1, P) = ({self.info['epochs'] + 1}, P), "
                             f"got {tuple(self.trajectory.shape)}")
        total = sum(math.prod(shape) for _, shape in self.info["params"])
        if self.trajectory.shape[1] != total:
            raise ValueError(f"trajectory rows have {self.trajectory.shape[1]} values, the "
                             f"network has {total} parameters")
        if self.logits is not None and (self.logits.dim() != 2
                                        or self.logits.shape[1] != self.info["num_classes"]):
            raise ValueError(f"logits must be (N, {self.info['num_classes']}), "
                             f"got {tuple(self.logits.shape)}")

    @property
    def epochs(self) -> int:
        return int(self.info["epochs"])

    def parameters_at(self, epoch: int) -> dict[str, torch.Tensor]:
        """The expert's named parameters after ``epoch`` epochs (0: initialisation)."""
        if not 0 <= epoch <= self.epochs:
            raise ValueError(f"epoch must be in [0, {self.epochs}], got {epoch}")
        return unflatten(self.trajectory[epoch], self.info["params"])

    def save(self, path: str | os.PathLike) -> Path:
        """Write the shard atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"trajectory": self.trajectory.detach().float().cpu().contiguous()}
        if self.logits is not None:
            tensors["logits"] = self.logits.detach().float().cpu().contiguous()
        header = {"format": FORMAT_VERSION, "kind": KIND, **self.info}
        with atomic_write(path) as tmp:
            save_file(tensors, str(tmp), metadata={"ld3m": json.dumps(header)})
        return path

    @staticmethod
    def read_info(path: str | os.PathLike) -> dict[str, Any]:
        """The settings of a shard, without reading its tensors."""
        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                header = json.loads((f.metadata() or {})["ld3m"])
        except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ValueError(f"{path} is not a valid expert trajectory ({reason})") from None
        if not isinstance(header, dict) or header.get("kind") != KIND or header.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path} is not an ld3m expert trajectory (format 1)")
        return {k: v for k, v in header.items() if k not in ("format", "kind")}

    @classmethod
    def load(cls, path: str | os.PathLike) -> ExpertTrajectory:
        """Read a shard written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"expert trajectory {path} does not exist")
        info = cls.read_info(path)
        try:
            tensors = load_file(str(path))
            return cls(tensors["trajectory"], info, tensors.get("logits"), path)
        except (SafetensorError, KeyError, OSError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ValueError(f"{path} is not a valid expert trajectory ({reason})") from None


class TrajectoryBuffer:
    """The experts of one buffer folder, opened lazily (only the settings are read up front).

    Args:
        folder: The buffer folder (``expert_*.safetensors``).

    Raises:
        FileNotFoundError: if the folder has no shard.
        ValueError: if a shard is unreadable or the shards disagree on a setting.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.paths = sorted(self.folder.glob("expert_*.safetensors")) if self.folder.is_dir() else []
        if not self.paths:
            raise FileNotFoundError(f"no expert trajectories (expert_*.safetensors) in {self.folder}; "
                                    "train them with `ld3m buffer`")
        infos = [ExpertTrajectory.read_info(p) for p in self.paths]
        self.info = {k: infos[0][k] for k in SHARED_KEYS if k in infos[0]}
        for path, info in zip(self.paths[1:], infos[1:], strict=True):
            for key in SHARED_KEYS:
                if info.get(key) != self.info.get(key):
                    raise ValueError(f"{path} has {key}={info.get(key)!r} but {self.paths[0].name} "
                                     f"has {self.info.get(key)!r}: one buffer, one setting")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def epochs(self) -> int:
        return int(self.info["epochs"])

    def __getitem__(self, index: int) -> ExpertTrajectory:
        return ExpertTrajectory.load(self.paths[index])

    def rows(self, index: int, epochs: list[int]) -> torch.Tensor:
        """Flat parameters of expert ``index`` after each of ``epochs``, ``(len(epochs), P)``.

        Reads just those rows from the shard (not the whole trajectory).
        """
        for epoch in epochs:
            if not 0 <= epoch <= self.epochs:
                raise ValueError(f"epoch must be in [0, {self.epochs}], got {epoch}")
        path = self.paths[index]
        try:
            with safe_open(str(path), framework="pt") as f:
                table = f.get_slice("trajectory")
                return torch.stack([table[epoch] for epoch in epochs]).float()
        except (SafetensorError, OSError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ValueError(f"{path} is not a valid expert trajectory ({reason})") from None

    def sample(self, generator: torch.Generator) -> tuple[int, ExpertTrajectory]:
        """A random expert (its index and trajectory)."""
        index = int(torch.randint(len(self), (1,), generator=generator))
        return index, self[index]
