"""Real labelled image datasets as ``LightningDataModule``s.

Every dataset is read through torchvision's own class. Small datasets (the MNIST family,
CIFAR, SVHN) are cached once as a ``uint8`` tensor, so class-balanced batches are plain
indexing; image folders stream through a ``DataLoader`` with workers.

Distillation consumes *class-balanced* real batches: every training batch holds ``n``
images of every class, shaped ``(classes, n, C, H, W)``. Under DDP each rank draws its
own batches (the stream is seeded by ``seed`` and the rank).

``zca=True`` whitens every image with kornia's ZCA as MTT's and DATM's code does: the raw
``[0, 1]`` pixels, without the mean/std normalisation before or after (the module's ``mean`` and
``std`` are then 0 and 1), ``eps`` 0.1 by default, fitted on the whole training split.
Everything the module serves is then whitened: class-balanced batches, samples, the plain
loaders and the test set, so expert buffers, distilled sets and their evaluation agree; their
record of it (:attr:`RealDataModule.zca_settings`) refuses data whitened otherwise.
"""

from __future__ import annotations

import gzip
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import lightning as L
import torch
from kornia.enhance import linear_transform, zca_mean
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset
from torchvision import datasets, transforms

from ld3m.files import atomic_write

_CACHE_LIMIT_BYTES = 2 << 30
#: ZCA needs a D x D matrix (D = C * H * W): refuse beyond 64 x 64 colour (Tiny-ImageNet, which
#: DATM whitens; 12288^2 float32 values are 0.6 GB, and the fit holds every training image flat).
ZCA_MAX_DIM = 3 * 64 * 64
#: What the ZCA is fitted on and applied to, as recorded in ``zca_settings``: the raw [0, 1] pixels.
ZCA_INPUT = "pixels"


def describe_zca(zca: dict | None) -> str:
    """A ``zca_settings`` record in words, for the messages that refuse mismatched whitening."""
    if not zca:
        return "not whitened"
    if zca.get("input") != ZCA_INPUT:
        return (f"ZCA-whitened (eps {zca.get('eps')}) after the mean/std normalisation, an earlier "
                "ld3m's transform that ld3m no longer applies (make it again)")
    return f"ZCA-whitened (eps {zca['eps']}, raw pixels)"


def zca_flags(zca: dict | None) -> str:
    """The data flags that give the whitening ``zca`` records."""
    return f"--data.zca true --data.zca_eps {zca['eps']}" if zca else "--data.zca false"


def default_data_dir() -> str:
    """Where datasets live when ``data_dir`` is not given: ``$LD3M_DATA_DIR``, else the user's
    cache, ``$XDG_CACHE_HOME/ld3m/datasets`` (``~/.cache/ld3m/datasets``): one copy per machine
    and user, whatever folder a run starts in."""
    if os.environ.get("LD3M_DATA_DIR"):
        return os.environ["LD3M_DATA_DIR"]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "ld3m", "datasets")


class RealDataModule(L.LightningDataModule):
    """Base class: a real labelled image dataset served for distillation and evaluation.

    Subclasses set the class attributes and implement :meth:`_dataset`.

    Args:
        data_dir: Folder holding the dataset in torchvision's layout (default ``$LD3M_DATA_DIR``,
            else the user cache ``~/.cache/ld3m/datasets``).
        batch_per_class: Real images per class in every class-balanced training batch.
        batch_size: Batch size of the plain (shuffled, not class-balanced) train loader.
        test_batch_size: Batch size of the test loader.
        num_workers: DataLoader workers (0 is fastest for cached datasets).
        download: Let torchvision download the dataset when it is missing.
        seed: Seed of the class-balanced stream (each DDP rank adds its rank).
        zca: Whiten the raw ``[0, 1]`` pixels with ZCA fitted on the training split, instead of
            the mean/std normalisation (MTT's and DATM's CIFAR recipes).
        zca_eps: Regulariser of the ZCA whitening (kornia's ``eps``; MTT used 0.1).
        mean: Normalise with this per-channel mean instead of the dataset's own (e.g. MTT's
            CIFAR-100 code normalises with CIFAR-10's); recorded in the sets, which
            ``ld3m evaluate`` then evaluates on data normalised the same way. Not with ``zca``.
        std: The per-channel std that goes with ``mean`` (both or neither).
    """

    dataset_name: str = ""
    num_classes: int = 0
    image_shape: tuple[int, int, int] = (0, 0, 0)
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def __init__(
        self,
        data_dir: str | None = None,
        batch_per_class: int = 256,
        batch_size: int = 256,
        test_batch_size: int = 1000,
        num_workers: int = 0,
        download: bool = False,
        seed: int = 0,
        zca: bool = False,
        zca_eps: float = 0.1,
        mean: list[float] | None = None,
        std: list[float] | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("batch_per_class", batch_per_class), ("batch_size", batch_size),
                            ("test_batch_size", test_batch_size)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if not zca_eps > 0:
            raise ValueError(f"zca_eps must be positive, got {zca_eps}")
        # kept in the checkpoint, not merged into the method's logged hparams: both have a
        # ``seed`` (the method's draws, the data stream's), which Lightning refuses to merge
        self.save_hyperparameters(logger=False)
        self.data_dir = Path(data_dir if data_dir is not None else default_data_dir()).expanduser()
        self.batch_per_class = batch_per_class
        self.batch_size = batch_size
        self.test_batch_size = test_batch_size
        self.num_workers = num_workers
        self.download = download
        self.seed = seed
        self.zca = bool(zca)
        self.zca_eps = float(zca_eps)
        channels = len(type(self).mean)
        if (mean is None) != (std is None):
            raise ValueError("pass both mean and std (the normalisation), or neither")
        if mean is not None and std is not None:
            if self.zca:
                raise ValueError("mean/std and zca exclude each other: ZCA whitens the raw pixels")
            if len(mean) != channels or len(std) != channels or min(std) <= 0:
                raise ValueError(f"mean and std need {channels} values each (std > 0), got "
                                 f"{list(mean)} and {list(std)}")
            self.mean, self.std = tuple(map(float, mean)), tuple(map(float, std))
        if self.zca:  # the authors whiten the raw [0, 1] pixels: no mean/std normalisation
            self.mean, self.std = (0.0,) * channels, (1.0,) * channels
        self._zca: tuple[torch.Tensor, torch.Tensor] | None = None  # (matrix, mean)
        self._on_device: dict[tuple[str, str], torch.Tensor] = {}
        self._train: _Split | None = None
        self._test: _Split | None = None

    # ----------------------------------------------------------------------------- subclass API
    def _dataset(self, train: bool, transform) -> Dataset:
        """Build the torchvision dataset for the split."""
        raise NotImplementedError

    @staticmethod
    def _tensors(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Fast path: the whole split as (uint8 NCHW images, int64 labels), or None to stream."""
        return None

    def _locate(self) -> None:
        """Make the files available under ``data_dir`` (e.g. from a system folder)."""

    def _missing_message(self) -> str:
        return (f"{self.dataset_name} not found under {self.data_dir}; "
                "pass --data.data_dir DIR or --data.download true")

    # ----------------------------------------------------------------------------- normalisation
    @property
    def class_names(self) -> list[str]:
        return [str(c) for c in range(self.num_classes)]

    def on_device(self, name: str, device: torch.device, make) -> torch.Tensor:
        """``make()`` (a host tensor) copied to ``device`` once and kept: the statistics, the ZCA
        matrix and the cached training images are not copied again at every batch."""
        key = (name, str(device))
        value = self._on_device.get(key)
        if value is None:
            value = self._on_device[key] = make().to(device, non_blocking=True)
        return value

    def _stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.on_device("mean", device, lambda: torch.tensor(self.mean).view(-1, 1, 1))
        std = self.on_device("std", device, lambda: torch.tensor(self.std).view(-1, 1, 1))
        return mean, std

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (or [0, 1] float) images -> normalised float32."""
        x = images.float()
        if images.dtype == torch.uint8:
            x = x / 255.0
        mean, std = self._stats(x.device)
        return (x - mean) / std

    def denormalize(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images -> [0, 1] range (not clamped)."""
        mean, std = self._stats(images.device)
        return images * std + mean

    def _transform(self):
        return transforms.Compose([transforms.ToTensor(), transforms.Normalize(self.mean, self.std)])

    # ----------------------------------------------------------------------------- ZCA
    @property
    def zca_settings(self) -> dict | None:
        """``{"eps": ..., "input": "pixels"}`` when the images are ZCA-whitened (fitted on the raw
        ``[0, 1]`` pixels), else ``None``; stored in sets, buffers and checkpoints, so they are
        only ever used with equally whitened data (a record without ``input`` comes from ld3m's
        earlier whitening of normalised images, and is refused)."""
        return {"eps": self.zca_eps, "input": ZCA_INPUT} if self.zca else None

    def whiten(self, images: torch.Tensor) -> torch.Tensor:
        """:meth:`normalize`'d images (with ``zca``, the raw pixels) -> ZCA-whitened images
        (unchanged when ``zca`` is off)."""
        if not self.zca:
            return images
        device = images.device
        matrix = self.on_device("zca_matrix", device, lambda: self._zca_transform()[0])
        mean = self.on_device("zca_mean", device, lambda: self._zca_transform()[1])
        return linear_transform(images, matrix, mean)

    def _zca_transform(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._zca is None:
            c, h, w = self.image_shape
            if c * h * w > ZCA_MAX_DIM:
                raise ValueError(f"ZCA whitening of {c}x{h}x{w} images needs a "
                                 f"{c * h * w}x{c * h * w} matrix; it is offered up to "
                                 f"{ZCA_MAX_DIM} values per image")
            split = self.train_split
            if split.cached is not None:
                real = self.normalize(split.cached)
            else:
                real = torch.cat([x for x, _ in DataLoader(split.source, batch_size=512,
                                                           num_workers=self.num_workers)])
            matrix, mean, _ = zca_mean(real.flatten(1), eps=self.zca_eps)
            self._zca = (matrix, mean)
        return self._zca

    # ----------------------------------------------------------------------------- loading
    def prepare_data(self) -> None:
        self._open(train=True)
        self._open(train=False)

    def _open(self, train: bool) -> Dataset:
        self._locate()
        try:
            return self._dataset(train, self._transform())
        except RuntimeError as err:
            if "not found" in str(err).lower() or "download" in str(err).lower():
                raise FileNotFoundError(self._missing_message()) from None
            raise

    def setup(self, stage: str | None = None) -> None:
        if self._train is None:
            self._train = _Split.load(self, train=True)

    def _test_split(self) -> _Split:
        if self._test is None:
            self._test = _Split.load(self, train=False)
        return self._test

    @property
    def train_split(self) -> _Split:
        self.setup()
        assert self._train is not None
        return self._train

    def class_sizes(self) -> list[int]:
        return [len(i) for i in self.train_split.class_index]

    # ----------------------------------------------------------------------------- sampling
    def sample_per_class(self, n: int, generator: torch.Generator | None = None,
                         classes: list[int] | None = None) -> torch.Tensor:
        """``n`` distinct random training images of every class: ``(classes, n, C, H, W)``.

        Raises:
            ValueError: if a class has fewer than ``n`` images.
        """
        split = self.train_split
        classes = list(range(self.num_classes)) if classes is None else classes
        index = []
        for c in classes:
            members = split.class_index[c]
            if n > len(members):
                raise ValueError(
                    f"{n} images per class requested, but class {c} ({self.class_names[c]!r}) of "
                    f"{self.dataset_name} has only {len(members)} training images")
            index.append(members[torch.randperm(len(members), generator=generator)[:n]])
        images = split.images(torch.cat(index), self)
        return images.view(len(classes), n, *images.shape[1:])

    # ----------------------------------------------------------------------------- loaders
    def train_dataloader(self) -> DataLoader:
        """Endless class-balanced batches ``(images (K, n, C, H, W), labels (K, n))``.

        In a ``Trainer``, for a cached dataset, the loader yields only each batch's indices
        (:class:`ClassBalancedPicks`, drawn on the host: one permutation per class); the images
        are gathered, converted and normalised (and whitened) on the training device from a
        copy of the ``uint8`` cache kept there (:meth:`on_after_batch_transfer`), so a step
        copies a few kilobytes of indices, not the batch. A streamed dataset (a large image
        folder) yields whole batches, built by DataLoader workers into pinned memory.

        A method that reads no real batches (``uses_real_batches = False``: MTT and DATM, which
        read expert trajectories) gets the step indices instead, so no images are loaded.
        """
        rank = self.trainer.global_rank if self.trainer is not None else 0
        start = self.trainer.global_step if self.trainer is not None else 0
        module = getattr(self.trainer, "lightning_module", None)
        if module is not None and not getattr(module, "uses_real_batches", True):
            return DataLoader(StepIndices(start), batch_size=None)
        stream = ClassBalancedStream(self, self.batch_per_class, seed=self.seed + 7919 * rank,
                                     start=start)
        if self.train_split.cached is not None and self.trainer is not None:  # the hook runs
            return DataLoader(_PickStream(stream), batch_size=None)
        return DataLoader(stream, batch_size=None, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0,
                          pin_memory=torch.cuda.is_available())

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Turn a batch's indices, now on the training device, into its images there."""
        if isinstance(batch, ClassBalancedPicks):
            return self.device_batch(batch)
        return batch

    def device_batch(self, picks: ClassBalancedPicks) -> tuple[torch.Tensor, torch.Tensor]:
        """The class-balanced batch of ``picks``, gathered from the cache on ``picks``' device:
        ``(images (K, n, C, H, W), labels (K, n))``, equal to :meth:`ClassBalancedStream.batch`."""
        device = picks.index.device
        cache = self.on_device("train", device, lambda: self.train_split.cached)
        images = self.whiten(self.normalize(cache[picks.index]))
        labels = torch.arange(picks.classes, device=device).repeat_interleave(picks.n)
        return images.view(picks.classes, picks.n, *images.shape[1:]), labels.view(picks.classes, picks.n)

    def shuffled_train_dataloader(self, batch_size: int | None = None, shuffle: bool = True) -> DataLoader:
        """Plain shuffled minibatches of the whole (normalised) training set."""
        split = self.train_split
        dataset = split.dataset(self)
        return DataLoader(dataset, batch_size=batch_size or self.batch_size, shuffle=shuffle,
                          num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        split = self._test_split()
        return DataLoader(split.dataset(self), batch_size=self.test_batch_size, shuffle=False,
                          num_workers=self.num_workers)


class _Split:
    """One split: either cached uint8 tensors or a torchvision dataset plus per-class indices."""

    def __init__(self, labels: torch.Tensor, cached: torch.Tensor | None, source: Dataset | None):
        self.labels = labels
        self.cached = cached
        self.source = source
        order = torch.argsort(labels, stable=True)
        counts = torch.bincount(labels, minlength=int(labels.max()) + 1 if len(labels) else 0)
        self.class_index = list(torch.split(order, counts.tolist()))

    @classmethod
    def load(cls, dm: RealDataModule, train: bool) -> _Split:
        dataset = dm._open(train)
        tensors = dm._tensors(dataset)
        if tensors is not None:
            images, labels = tensors
            return cls(labels.long(), images.contiguous(), None)
        labels = _dataset_labels(dataset)
        c, h, w = dm.image_shape
        if len(labels) * c * h * w <= _CACHE_LIMIT_BYTES:
            loader = DataLoader(dataset, batch_size=512, num_workers=dm.num_workers)
            images = torch.cat([(dm.denormalize(x) * 255).round().clamp(0, 255).to(torch.uint8)
                                for x, _ in loader])
            return cls(labels, images, None)
        return cls(labels, None, dataset)

    def __len__(self) -> int:
        return len(self.labels)

    def images(self, index: torch.Tensor, dm: RealDataModule) -> torch.Tensor:
        if self.cached is not None:
            return dm.whiten(dm.normalize(self.cached[index]))
        assert self.source is not None
        return dm.whiten(torch.stack([self.source[int(i)][0] for i in index]))

    def dataset(self, dm: RealDataModule) -> Dataset:
        if self.cached is not None:
            return TensorDataset(dm.whiten(dm.normalize(self.cached)), self.labels)
        assert self.source is not None
        return _Whitened(self.source, dm) if dm.zca else self.source


class _Whitened(Dataset):
    """A streamed dataset whose images are ZCA-whitened on the fly."""

    def __init__(self, source: Dataset, dm: RealDataModule) -> None:
        self.source, self.dm = source, dm

    def __len__(self) -> int:
        return len(self.source)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        x, y = self.source[i]
        return self.dm.whiten(x.unsqueeze(0))[0], y


def _dataset_labels(dataset: Dataset) -> torch.Tensor:
    for attr in ("targets", "labels"):
        if hasattr(dataset, attr):
            return torch.as_tensor(getattr(dataset, attr)).long()
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])


class StepIndices(IterableDataset):
    """Endless step indices ``start, start + 1, ...``: the batches of a method without real data."""

    def __init__(self, start: int = 0) -> None:
        self.start = start

    def __iter__(self) -> Iterator[torch.Tensor]:
        step = self.start
        while True:
            yield torch.tensor(step)
            step += 1


@dataclass
class ClassBalancedPicks:
    """The training-set indices of one class-balanced batch, class-major ``(K * n,)``: what the
    loader of a cached dataset yields, turned into images on the device by the data module."""

    index: torch.Tensor
    classes: int
    n: int

    def to(self, device, *args, **kwargs) -> ClassBalancedPicks:
        """On ``device`` (Lightning's batch transfer calls this), without blocking the host."""
        return replace(self, index=self.index.to(device, non_blocking=True))


class _PickStream(IterableDataset):
    """The indices of a :class:`ClassBalancedStream`'s batches, step after step."""

    def __init__(self, stream: ClassBalancedStream) -> None:
        self.stream = stream

    def __iter__(self) -> Iterator[ClassBalancedPicks]:
        step = self.stream.start
        k, n = len(self.stream.dm.train_split.class_index), self.stream.n
        while True:
            yield ClassBalancedPicks(self.stream.picks(step), k, n)
            step += 1


class ClassBalancedStream(IterableDataset):
    """Endless batches of ``n`` distinct random images of every class, indexed by step.

    Batch ``i`` is drawn from a generator seeded by ``(seed, i)`` alone (a fresh draw per class,
    as in the DM/DC reference code), so the stream can start at any step: a run resumed from a
    checkpoint at step ``s`` continues with exactly the batches an uninterrupted run would see.
    With several DataLoader workers, worker ``w`` yields steps ``start + w``, ``start + w + W``...,
    which the DataLoader interleaves back into step order.

    Args:
        dm: The data module whose training split is sampled.
        n: Images per class per batch.
        seed: Seed of this stream (make it differ per rank).
        start: Index of the first batch (the trainer's ``global_step`` when resuming).
    """

    def __init__(self, dm: RealDataModule, n: int, seed: int = 0, start: int = 0) -> None:
        self.dm = dm
        self.n = n
        self.seed = seed
        self.start = start
        smallest = min(dm.class_sizes())
        if n > smallest:
            raise ValueError(f"batch_per_class={n} is larger than the smallest class of "
                             f"{dm.dataset_name} ({smallest} images)")

    def picks(self, step: int) -> torch.Tensor:
        """The training-set indices of batch ``step``, class-major ``(K * n,)``."""
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + step) % (2**63))
        return torch.cat([members[torch.randperm(len(members), generator=generator)[:self.n]]
                          for members in self.dm.train_split.class_index])

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of step ``step``: ``(images (K, n, C, H, W), labels (K, n))``."""
        split = self.dm.train_split
        k = len(split.class_index)
        images = split.images(self.picks(step), self.dm)
        labels = torch.arange(k).repeat_interleave(self.n).view(k, self.n)
        return images.view(k, self.n, *images.shape[1:]), labels

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        step = self.start + worker
        while True:
            yield self.batch(step)
            step += workers


# ================================================================================ datasets
class _MNISTLike(RealDataModule):
    torchvision_class: type = datasets.MNIST
    image_shape = (1, 28, 28)
    num_classes = 10
    system_dirs: tuple[str, ...] = ()

    @property
    def class_names(self) -> list[str]:
        return list(self.torchvision_class.classes)

    def _dataset(self, train: bool, transform) -> Dataset:
        return self.torchvision_class(str(self.data_dir), train=train, transform=transform,
                                      download=self.download)

    @staticmethod
    def _tensors(dataset) -> tuple[torch.Tensor, torch.Tensor]:
        return dataset.data.unsqueeze(1), dataset.targets

    @property
    def raw_dir(self) -> Path:
        return self.data_dir / self.torchvision_class.__name__ / "raw"

    def _locate(self) -> None:
        """Stage the IDX files from a system folder (e.g. Debian's) into ``data_dir`` if missing."""
        names = [os.path.splitext(f)[0] for f, _ in self.torchvision_class.resources]
        if all((self.raw_dir / n).exists() for n in names):
            return
        for folder in self.system_dirs:
            found = {n: Path(folder) / (n + ".gz") for n in names}
            found = {n: p if p.exists() else Path(folder) / n for n, p in found.items()}
            if all(p.exists() for p in found.values()):
                self.raw_dir.mkdir(parents=True, exist_ok=True)
                for name, path in found.items():
                    target = self.raw_dir / name
                    if not target.exists():
                        _extract_atomic(path, target)
                return

    def _missing_message(self) -> str:
        places = " or ".join([str(self.raw_dir), *self.system_dirs])
        return (f"{self.dataset_name} not found in {places}; pass --data.data_dir DIR or "
                f"--data.download true")


def _extract_atomic(source: Path, target: Path) -> None:
    opener = gzip.open if source.suffix == ".gz" else open
    with atomic_write(target) as tmp, opener(source, "rb") as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst)


class FashionMNIST(_MNISTLike):
    """Fashion-MNIST (the default): 60,000 + 10,000 grey 28x28 images of 10 clothing classes.

    Found in ``data_dir`` or, if missing there, in Debian's ``/usr/share/datasets/fashion-mnist``
    (``apt-get install dataset-fashion-mnist``), from which it is staged into ``data_dir``.

    Arguments: those of :class:`RealDataModule`.
    """

    dataset_name = "FashionMNIST"
    torchvision_class = datasets.FashionMNIST
    mean = (0.2861,)
    std = (0.3530,)
    system_dirs = ("/usr/share/datasets/fashion-mnist",)

    def _missing_message(self) -> str:
        return super()._missing_message() + " (Debian: apt-get install dataset-fashion-mnist)"


class MNIST(_MNISTLike):
    """MNIST digits: 60,000 + 10,000 grey 28x28 images.

    Arguments: those of :class:`RealDataModule`.
    """

    dataset_name = "MNIST"
    torchvision_class = datasets.MNIST
    mean = (0.1307,)
    std = (0.3081,)


class CIFAR10(RealDataModule):
    """CIFAR-10: 50,000 + 10,000 colour 32x32 images of 10 classes.

    Arguments: those of :class:`RealDataModule`.
    """

    dataset_name = "CIFAR10"
    torchvision_class: type = datasets.CIFAR10
    num_classes = 10
    image_shape = (3, 32, 32)
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2023, 0.1994, 0.2010)

    @property
    def class_names(self) -> list[str]:
        return [str(i) for i in range(self.num_classes)]

    def _dataset(self, train: bool, transform) -> Dataset:
        return self.torchvision_class(str(self.data_dir), train=train, transform=transform,
                                      download=self.download)

    @staticmethod
    def _tensors(dataset) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(dataset.data).permute(0, 3, 1, 2), torch.as_tensor(dataset.targets)


class CIFAR100(CIFAR10):
    """CIFAR-100: 50,000 + 10,000 colour 32x32 images of 100 classes.

    Arguments: those of :class:`RealDataModule`.
    """

    dataset_name = "CIFAR100"
    torchvision_class = datasets.CIFAR100
    num_classes = 100
    mean = (0.5071, 0.4866, 0.4409)
    std = (0.2673, 0.2564, 0.2762)


class SVHN(RealDataModule):
    """SVHN house numbers: 73,257 + 26,032 colour 32x32 images of 10 digits.

    Arguments: those of :class:`RealDataModule`.
    """

    dataset_name = "SVHN"
    num_classes = 10
    image_shape = (3, 32, 32)
    mean = (0.4377, 0.4438, 0.4728)
    std = (0.1980, 0.2010, 0.1970)

    def _dataset(self, train: bool, transform) -> Dataset:
        return datasets.SVHN(str(self.data_dir), split="train" if train else "test",
                             transform=transform, download=self.download)

    @staticmethod
    def _tensors(dataset) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(dataset.data), torch.as_tensor(dataset.labels)


class ImageFolderData(RealDataModule):
    """Images in class folders (Tiny-ImageNet, ImageNet subsets) resized to a square size.

    Layout: ``data_dir/<train_split>/<class>/*.jpg`` and ``data_dir/<test_split>/<class>/*``.

    Args:
        data_dir: Root folder of the dataset.
        image_size: Side of the square images (64, 128 or 256 are the usual settings).
        train_split: Sub-folder with the training classes.
        test_split: Sub-folder with the test classes (same class names).
        batch_per_class: Real images per class in every class-balanced training batch.
        batch_size: Batch size of the plain train loader.
        test_batch_size: Batch size of the test loader.
        num_workers: DataLoader workers (decoding JPEGs benefits from several).
        seed: Seed of the class-balanced stream (each DDP rank adds its rank).
        zca: Whiten the images with ZCA (only for small images; see :class:`RealDataModule`).
        zca_eps: Regulariser of the ZCA whitening.
        mean: Normalisation mean instead of ImageNet's (see :class:`RealDataModule`).
        std: Normalisation std that goes with ``mean``.
    """

    dataset_name = "ImageFolder"
    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)

    def __init__(self, data_dir: str, image_size: int = 64, train_split: str = "train",
                 test_split: str = "val", batch_per_class: int = 256, batch_size: int = 256,
                 test_batch_size: int = 500, num_workers: int = 2, seed: int = 0,
                 zca: bool = False, zca_eps: float = 0.1, mean: list[float] | None = None,
                 std: list[float] | None = None) -> None:
        if image_size < 8:
            raise ValueError(f"image_size must be at least 8, got {image_size}")
        super().__init__(data_dir, batch_per_class, batch_size, test_batch_size, num_workers,
                         download=False, seed=seed, zca=zca, zca_eps=zca_eps, mean=mean, std=std)
        self.image_size = image_size
        self.train_split_name = train_split
        self.test_split_name = test_split
        self.image_shape = (3, image_size, image_size)
        self._classes: list[str] | None = None

    @property
    def class_names(self) -> list[str]:
        if self._classes is None:
            root = self.data_dir / self.train_split_name
            if not root.is_dir():
                raise FileNotFoundError(f"image folder {root} does not exist")
            self._classes = sorted(p.name for p in root.iterdir() if p.is_dir())
            if not self._classes:
                raise FileNotFoundError(f"image folder {root} has no class sub-folders")
        return self._classes

    @property  # type: ignore[override]
    def num_classes(self) -> int:  # noqa: D102
        return len(self.class_names)

    def _transform(self):
        return transforms.Compose([
            transforms.Resize(self.image_size), transforms.CenterCrop(self.image_size),
            transforms.ToTensor(), transforms.Normalize(self.mean, self.std)])

    def _dataset(self, train: bool, transform) -> Dataset:
        root = self.data_dir / (self.train_split_name if train else self.test_split_name)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist")
        ds = datasets.ImageFolder(str(root), transform=transform)
        if ds.classes != self.class_names:
            raise ValueError(f"{root} has other classes than {self.data_dir / self.train_split_name}")
        return ds


# Tiny-ImageNet and MTT's ImageNet subsets live in imagenet.py (they subclass RealDataModule, so
# they are imported once it is defined)
from ld3m.datamodules.imagenet import ImageNetSubset, TinyImageNet  # noqa: E402

DATASETS: dict[str, type[RealDataModule]] = {
    "FashionMNIST": FashionMNIST, "MNIST": MNIST, "CIFAR10": CIFAR10, "CIFAR100": CIFAR100,
    "SVHN": SVHN, "ImageFolder": ImageFolderData, "TinyImageNet": TinyImageNet,
    "ImageNetSubset": ImageNetSubset,
}
