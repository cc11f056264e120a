"""Train any Lightning model on a distilled set; test it on the real test set."""

from __future__ import annotations

import lightning as L
import torch
from ld3m.datamodules.real import RealDataModule
from torch.utils.data import DataLoader

from ld3m.synthetic import SyntheticSet


class DistilledDataModule(L.LightningDataModule):
    """A saved (or in-memory) synthetic set as training data.

    Batches are ``(images, targets)``: hard labels, or soft-label logits when the set has them.

    Args:
        distilled: Path of a ``.safetensors`` synthetic set, or a :class:`SyntheticSet`.
        batch_size: Training batch size (the evaluation protocol uses 256).
        real: Optional real data module whose test split becomes ``test_dataloader``.
        num_workers: DataLoader workers.
        seed: Seed of the shuffling (each epoch's order follows from it: the same seed, the
            same batches).
    """

    def __init__(self, distilled: str | SyntheticSet, batch_size: int = 256,
                 real: RealDataModule | None = None, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.synthetic = distilled if isinstance(distilled, SyntheticSet) else SyntheticSet.load(distilled)
        self.batch_size = batch_size
        self.real = real
        self.num_workers = num_workers
        self.seed = seed
        self._train = self.synthetic.as_dataset()

    @property
    def num_classes(self) -> int:
        return self.synthetic.num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.synthetic.image_shape

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self._train, batch_size=self.batch_size, shuffle=True,
                          num_workers=self.num_workers,
                          generator=torch.Generator().manual_seed(self.seed))

    def test_dataloader(self) -> DataLoader:
        if self.real is None:
            raise ValueError("DistilledDataModule has no real data module to test on; pass real=")
        return self.real.test_dataloader()
