"""The synthetic set: distilled images (or latents), labels, learned lr and metadata.

File format: one ``.safetensors`` file. Tensors:

- ``images``: float32 ``(N, C, H, W)``, in the dataset's *normalised* space;
- ``labels``: int64 ``(N,)`` hard labels;
- ``soft_labels`` (optional): float32 ``(N, classes)`` logits (DATM);
- ``lr`` (optional): float32, the learned learning rate(s) (scalar for MTT, one per step for DD);
- ``extra.<name>`` (optional): anything else a method wants to keep (e.g. LD3M's latents).

The safetensors metadata holds one key, ``ld3m``, a JSON object with at least ``format``
(``1``), ``method``, ``dataset``, ``ipc``, ``num_classes``, ``image_shape``, ``mean``, ``std``.
Saving writes a temporary file next to the target and renames it, so an interrupted save never
leaves a half-written set behind.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch.utils.data import TensorDataset

from ld3m.files import atomic_write

FORMAT_VERSION = 1


@dataclass
class SyntheticSet:
    """A distilled dataset.

    Args:
        images: ``(N, C, H, W)`` images in normalised space.
        labels: ``(N,)`` int64 class labels.
        mean: Per-channel normalisation mean of the dataset.
        std: Per-channel normalisation std of the dataset.
        num_classes: Number of classes.
        method: Name of the method that made the set.
        dataset: Name of the real dataset.
        ipc: Images per class.
        soft_labels: Optional ``(N, num_classes)`` logits.
        lr: Optional learned learning rate(s).
        extra: Optional additional tensors (latents, embeddings, ...).
        meta: Optional additional JSON-serialisable metadata.
    """

    images: torch.Tensor
    labels: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    method: str = "unknown"
    dataset: str = "unknown"
    ipc: int = 0
    soft_labels: torch.Tensor | None = None
    lr: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.images.dim() != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must have shape ({self.images.shape[0]},), "
                             f"got {tuple(self.labels.shape)}")
        if len(self.mean) != self.images.shape[1] or len(self.std) != self.images.shape[1]:
            raise ValueError(f"mean/std need {self.images.shape[1]} channel values, "
                             f"got {len(self.mean)}/{len(self.std)}")
        if self.soft_labels is not None and self.soft_labels.shape != (len(self.labels), self.num_classes):
            raise ValueError(f"soft_labels must be ({len(self.labels)}, {self.num_classes}), "
                             f"got {tuple(self.soft_labels.shape)}")
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def denormalized(self) -> torch.Tensor:
        """Images mapped back to [0, 1] (clamped), e.g. for saving as PNG."""
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return (self.images.detach().float().cpu() * std + mean).clamp(0, 1)

    def as_dataset(self) -> TensorDataset:
        """A ``TensorDataset`` of ``(image, target)``; the target is the soft labels' logits if present."""
        targets = self.soft_labels if self.soft_labels is not None else self.labels
        return TensorDataset(self.images.detach().float().cpu(), targets.detach().cpu())

    # --------------------------------------------------------------------------------- I/O
    def _header(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION, "method": self.method, "dataset": self.dataset,
            "ipc": self.ipc, "num_classes": self.num_classes, "image_shape": list(self.image_shape),
            "mean": list(self.mean), "std": list(self.std), "meta": self.meta,
            "lr_shape": list(self.lr.shape) if self.lr is not None else None,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the set atomically to ``path`` (a ``.safetensors`` file); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"images": self.images.detach().float().cpu().contiguous(),
                   "labels": self.labels.detach().long().cpu().contiguous()}
        if self.soft_labels is not None:
            tensors["soft_labels"] = self.soft_labels.detach().float().cpu().contiguous()
        if self.lr is not None:
            tensors["lr"] = self.lr.detach().float().cpu().reshape(-1).contiguous()
        for name, value in self.extra.items():
            tensors[f"extra.{name}"] = value.detach().cpu().contiguous()
        with atomic_write(path) as tmp:
            save_file(tensors, str(tmp), metadata={"ld3m": json.dumps(self._header())})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> SyntheticSet:
        """Read a set written by :meth:`save`.

        Raises:
            FileNotFoundError: if the file does not exist.
            ValueError: if the file is not a valid ld3m synthetic set.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"synthetic set {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = json.loads((f.metadata() or {})["ld3m"])
            tensors = load_file(str(path))
        except (SafetensorError, KeyError, json.JSONDecodeError, OSError, ValueError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ValueError(f"{path} is not a valid ld3m synthetic set ({reason})") from None
        if (not isinstance(header, dict) or header.get("format") != FORMAT_VERSION
                or "images" not in tensors or "labels" not in tensors):
            fmt = header.get("format") if isinstance(header, dict) else None
            raise ValueError(f"{path} is not a valid ld3m synthetic set (format "
                             f"{fmt!r}, tensors {sorted(tensors)})")
        try:  # a well-formed file whose fields are missing or inconsistent is invalid too
            meta = dict(header.get("meta", {}))
            lr = tensors.get("lr")
            if lr is not None and header.get("lr_shape") is not None:
                lr = lr.reshape(header["lr_shape"])
            return cls(
                images=tensors["images"], labels=tensors["labels"], mean=tuple(header["mean"]),
                std=tuple(header["std"]), num_classes=int(header["num_classes"]),
                method=header.get("method", "unknown"), dataset=header.get("dataset", "unknown"),
                ipc=int(header.get("ipc", 0)), soft_labels=tensors.get("soft_labels"), lr=lr,
                extra={k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")},
                meta=meta,
            )
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ValueError(f"{path} is not a valid ld3m synthetic set ({reason})") from None
