"""Tiny-ImageNet and MTT's ImageNet subsets, read from their own folder layouts.

Both are image-folder datasets that fit ld3m's ``uint8`` cache (Tiny-ImageNet's 100,000
training images at 64x64 take 1.2 GB, a 10-class ImageNet subset at 128x128 about 0.6 GB), so
they are decoded once, at the first ``setup``, and then served like CIFAR: class-balanced
batches are indexing into the cache, converted and normalised on the training device.

* :class:`TinyImageNet` reads the official ``tiny-imagenet-200`` folder: the training images
  ``train/<wnid>/images/*.JPEG`` and the validation images ``val/images/*.JPEG`` labelled by
  ``val/val_annotations.txt``; the validation split is the test set, as in MTT, DATM and DM
  (which have no other labelled test images). The images are used at their own 64x64 pixels,
  ``ToTensor`` then the mean/std normalisation, as MTT's ``utils.py get_dataset('Tiny')``.
* :class:`ImageNetSubset` reads ten ImageNet-1k classes (MTT's ``utils.py Config``:
  imagenette, imagewoof, imagefruit, imageyellow, imagemeow, imagesquawk) from the ILSVRC
  folder layout ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG`` (the layout
  ``torchvision.datasets.ImageNet`` extracts), the ImageNet validation images being the test
  set, and transforms them as MTT's ``get_dataset('ImageNet')``: ``ToTensor``, normalise, then
  resize to 128x128 (both sides: the aspect ratio is not kept) with bilinear interpolation
  without antialiasing (the tensor ``Resize`` of their torchvision 0.12), then a centre crop.

Stored in the ``uint8`` cache, a resized pixel is rounded to the nearest of the 256 grey
levels (at most half a level from MTT's float value); native 64x64 Tiny-ImageNet pixels are
kept exactly.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from ld3m.datamodules.real import RealDataModule, default_data_dir
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS

import ld3m

#: ImageNet-1k's class wnids in class-index order (sorted: the order of
#: ``torchvision.datasets.ImageNet``, whose class indices MTT's subsets use).
WNIDS_FILE = Path(ld3m.__file__).parent / "data" / "imagenet_wnids.txt"

#: MTT's ImageNet subsets (GeorgeCazenavette/mtt-distillation utils.py ``Config.dict``): name ->
#: the ten ImageNet class indices, in their order; label ``c`` is the ``c``-th class listed.
IMAGENET_SUBSETS: dict[str, tuple[int, ...]] = {
    "imagenette": (0, 217, 482, 491, 497, 566, 569, 571, 574, 701),
    "imagewoof": (193, 182, 258, 162, 155, 167, 159, 273, 207, 229),
    "imagefruit": (953, 954, 949, 950, 951, 957, 952, 945, 943, 948),
    "imageyellow": (309, 986, 954, 951, 987, 779, 599, 291, 72, 11),
    "imagemeow": (281, 282, 283, 284, 285, 291, 292, 290, 289, 287),
    "imagesquawk": (84, 130, 88, 144, 145, 22, 96, 9, 100, 89),
    # GLaD's and LD3M's ImageNet-A to -E (Brian-Moser/prune_and_distill src/utils.py
    # ``Config.alpha`` .. ``Config.epsilon``, ``--dataset imagenet-a`` .. ``imagenet-e``; their
    # ``fruits``, ``yellow``, ``cats`` and ``birds`` are MTT's lists above)
    "imagenet-a": (255, 376, 984, 364, 500, 986, 333, 576, 148, 135),
    "imagenet-b": (129, 916, 90, 275, 995, 874, 102, 259, 685, 139),
    "imagenet-c": (565, 94, 554, 535, 92, 392, 291, 136, 324, 11),
    "imagenet-d": (9, 258, 13, 262, 19, 339, 321, 24, 93, 322),
    "imagenet-e": (816, 96, 100, 145, 739, 713, 783, 76, 688, 326),
}

#: How ImageNetSubset brings an image to ``image_size``: ``squash`` (MTT's ``Resize((s, s))``,
#: aspect ratio not kept) or ``crop`` (GLaD's and LD3M's ``Resize(s)`` of the shorter side, then
#: ``CenterCrop(s)``).
RESIZE_MODES = ("squash", "crop")

#: The normalisation of MTT's and DATM's ``get_dataset`` ('Tiny' and 'ImageNet') and of DM's
#: ('TinyImageNet'): ImageNet's channel statistics.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k wnids; class index ``i`` is entry ``i``."""
    lines = WNIDS_FILE.read_text().splitlines()
    wnids = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    if len(wnids) != 1000:
        raise ValueError(f"{WNIDS_FILE} lists {len(wnids)} wnids, not ImageNet-1k's 1000")
    return wnids


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())


def _class_folders(folders: list[Path], missing: str) -> tuple[list[Path], list[int]]:
    """The images of ``folders[c]``, each labelled ``c``; a folder that does not exist (with the
    hint ``missing``) or holds no image is an error."""
    files, targets = [], []
    for c, folder in enumerate(folders):
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} does not exist. {missing}")
        found = _images_in(folder)
        if not found:
            raise FileNotFoundError(f"{folder} holds no images")
        files += found
        targets += [c] * len(found)
    return files, targets


class _ImageFiles(Dataset):
    """Image files with their labels, read as RGB and transformed; ``targets`` are the labels."""

    def __init__(self, files: list[Path], targets: list[int], transform,
                 shape: tuple[int, int, int]) -> None:
        self.files, self.targets, self.transform, self.shape = files, targets, transform, shape

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.files[i]) as image:
            x = self.transform(image.convert("RGB"))
        if tuple(x.shape) != self.shape:
            raise ValueError(f"{self.files[i]} gives a {tuple(x.shape)} image, not {self.shape}")
        return x, self.targets[i]


class TinyImageNet(RealDataModule):
    """Tiny-ImageNet: 100,000 + 10,000 colour 64x64 images of 200 classes.

    Reads the official ``tiny-imagenet-200`` folder (``wnids.txt``, ``train/<wnid>/images/*.JPEG``,
    ``val/images/*.JPEG`` with ``val/val_annotations.txt``; a validation folder already sorted
    into ``val/images/<wnid>/`` is read too). Class ``i`` is the ``i``-th wnid in sorted order
    (as ``ImageFolder`` on ``train/`` in MTT and DATM). The validation images are the test set.
    Normalised with ImageNet's mean and std as MTT's, DATM's and DM's ``get_dataset``.

    Args:
        data_dir: The ``tiny-imagenet-200`` folder (default ``tiny-imagenet-200`` under
            ``$LD3M_DATA_DIR``, else under the user cache ``~/.cache/ld3m/datasets``). It is
            never downloaded.
        batch_per_class: Real images per class in every class-balanced training batch.
        batch_size: Batch size of the plain (shuffled, not class-balanced) train loader.
        test_batch_size: Batch size of the test loader.
        num_workers: DataLoader workers (more decode the JPEGs faster, once, into the cache).
        seed: Seed of the class-balanced stream (each DDP rank adds its rank).
        zca: Whiten the raw ``[0, 1]`` pixels with ZCA fitted on the training split, instead of
            the mean/std normalisation (DATM's Tiny-ImageNet configs).
        zca_eps: Regulariser of the ZCA whitening (kornia's ``eps``; MTT and DATM use 0.1).
        mean: Normalisation mean instead of ImageNet's (see :class:`RealDataModule`).
        std: Normalisation std that goes with ``mean``.
    """

    dataset_name = "TinyImageNet"
    image_shape = (3, 64, 64)
    mean = IMAGENET_MEAN
    std = IMAGENET_STD

    def __init__(self, data_dir: str | None = None, batch_per_class: int = 256,
                 batch_size: int = 256, test_batch_size: int = 1000, num_workers: int = 0,
                 seed: int = 0, zca: bool = False, zca_eps: float = 0.1,
                 mean: list[float] | None = None, std: list[float] | None = None) -> None:
        if data_dir is None:
            data_dir = os.path.join(default_data_dir(), "tiny-imagenet-200")
        super().__init__(data_dir, batch_per_class, batch_size, test_batch_size, num_workers,
                         download=False, seed=seed, zca=zca, zca_eps=zca_eps, mean=mean,
                         std=std)
        self._classes: list[str] | None = None

    def _missing_message(self) -> str:
        return (f"Tiny-ImageNet not found in {self.data_dir}: pass --data.data_dir with the "
                "tiny-imagenet-200 folder (train/<wnid>/images/*.JPEG, val/images/*.JPEG, "
                "val/val_annotations.txt); it is not downloaded")

    @property
    def class_names(self) -> list[str]:
        """The wnids of the classes, sorted (class ``i`` is the ``i``-th)."""
        if self._classes is None:
            root = self.data_dir / "train"
            if not root.is_dir():
                raise FileNotFoundError(self._missing_message())
            classes = sorted(p.name for p in root.iterdir() if p.is_dir())
            if not classes:
                raise FileNotFoundError(f"{root} has no class folders. {self._missing_message()}")
            listed = self.data_dir / "wnids.txt"
            if listed.is_file():
                wnids = sorted(w.strip() for w in listed.read_text().split() if w.strip())
                if wnids != classes:
                    raise ValueError(f"the class folders of {root} ({len(classes)}) are not the "
                                     f"{len(wnids)} wnids of {listed}")
            self._classes = classes
        return self._classes

    @property  # type: ignore[override]
    def num_classes(self) -> int:  # noqa: D102
        return len(self.class_names)

    def _dataset(self, train: bool, transform) -> Dataset:
        index = {wnid: c for c, wnid in enumerate(self.class_names)}
        files, targets = self._train_files(index) if train else self._val_files(index)
        return _ImageFiles(files, targets, transform, tuple(self.image_shape))

    def _train_files(self, index: dict[str, int]) -> tuple[list[Path], list[int]]:
        return _class_folders([self.data_dir / "train" / wnid / "images" for wnid in index],
                              self._missing_message())

    def _val_files(self, index: dict[str, int]) -> tuple[list[Path], list[int]]:
        val = self.data_dir / "val"
        annotations = val / "val_annotations.txt"
        files, targets = [], []
        if annotations.is_file():  # the official layout: one folder, labels in the annotations
            for number, line in enumerate(annotations.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                fields = line.split("\t")
                if len(fields) < 2:
                    raise ValueError(f"{annotations} line {number} is not 'file<TAB>wnid...'")
                name, wnid = fields[0].strip(), fields[1].strip()
                if wnid not in index:
                    raise ValueError(f"{annotations} line {number} labels {name} with {wnid}, "
                                     f"which is not a class of {self.data_dir / 'train'}")
                path = val / "images" / name
                if not path.is_file():
                    raise FileNotFoundError(f"{path} (in {annotations}) does not exist")
                files.append(path)
                targets.append(index[wnid])
        elif (val / "images").is_dir() and any(p.is_dir() for p in (val / "images").iterdir()):
            # the validation images already sorted into class folders (what MTT's and DATM's
            # ImageFolder(val/images) reads)
            for wnid in sorted(p.name for p in (val / "images").iterdir() if p.is_dir()):
                if wnid not in index:
                    raise ValueError(f"{val / 'images' / wnid} is not a class of "
                                     f"{self.data_dir / 'train'}")
                found = _images_in(val / "images" / wnid)
                files += found
                targets += [index[wnid]] * len(found)
        else:
            raise FileNotFoundError(f"{annotations} does not exist. {self._missing_message()}")
        if not files:
            raise FileNotFoundError(f"{val} holds no labelled images")
        return files, targets


class ImageNetSubset(RealDataModule):
    """One of the ten-class ImageNet subsets: MTT's at 128x128 (imagenette, imagewoof,
    imagefruit, imageyellow, imagemeow, imagesquawk) and GLaD's / LD3M's ImageNet-A to -E
    (imagenet-a .. imagenet-e), at 128 or 256 px.

    Reads the ILSVRC 2012 folder layout, ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG`` (as
    ``torchvision.datasets.ImageNet`` extracts it; only the subset's ten class folders are read).
    Class ``c`` is the ``c``-th ImageNet class index of the subset in MTT's ``utils.py`` order,
    its wnid the line of that index in ``ld3m/data/imagenet_wnids.txt``. The ImageNet
    validation images of the ten classes are the test set. Transformed as MTT's
    ``get_dataset('ImageNet')`` (``resize="squash"``): ``ToTensor``, ImageNet's mean/std,
    ``Resize((size, size))`` (bilinear, no antialiasing, aspect ratio not kept),
    ``CenterCrop(size)``; or as GLaD's and LD3M's ``get_dataset`` (``resize="crop"``, their
    ``src/utils.py``): ``ToTensor``, ImageNet's mean/std, ``Resize(size)`` of the shorter side
    (bilinear, antialiased: torchvision's default since 0.17, their requirements leave it
    unpinned), ``CenterCrop(size)``.

    Args:
        subset: The subset's name (MTT's ``--subset``).
        data_dir: The ImageNet folder holding ``train/`` and ``val/`` (default ``imagenet`` under
            ``$LD3M_DATA_DIR``, else under the user cache ``~/.cache/ld3m/datasets``). It is
            never downloaded.
        image_size: Side of the square images (MTT's ``get_dataset`` uses 128; LD3M's 128 or
            256, ``--res``).
        resize: ``squash`` (MTT's) or ``crop`` (GLaD's and LD3M's), see above.
        batch_per_class: Real images per class in every class-balanced training batch.
        batch_size: Batch size of the plain (shuffled, not class-balanced) train loader.
        test_batch_size: Batch size of the test loader.
        num_workers: DataLoader workers (more decode the JPEGs faster, once, into the cache).
        seed: Seed of the class-balanced stream (each DDP rank adds its rank).
        zca: Whiten the raw pixels with ZCA (refused at this size: see :class:`RealDataModule`).
        zca_eps: Regulariser of the ZCA whitening.
        mean: Normalisation mean instead of ImageNet's (see :class:`RealDataModule`).
        std: Normalisation std that goes with ``mean``.

    Raises:
        ValueError: for a subset MTT does not define (the message lists theirs).
    """

    dataset_name = "ImageNetSubset"
    num_classes = 10
    mean = IMAGENET_MEAN
    std = IMAGENET_STD

    def __init__(self, subset: str = "imagenette", data_dir: str | None = None,
                 image_size: int = 128, batch_per_class: int = 256, batch_size: int = 256,
                 test_batch_size: int = 1000, num_workers: int = 0, seed: int = 0,
                 zca: bool = False, zca_eps: float = 0.1, mean: list[float] | None = None,
                 std: list[float] | None = None, resize: str = "squash") -> None:
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        if subset not in IMAGENET_SUBSETS:
            raise ValueError(f"unknown ImageNet subset {subset!r}; choose one of: "
                             f"{', '.join(IMAGENET_SUBSETS)}")
        if image_size < 8:
            raise ValueError(f"image_size must be at least 8, got {image_size}")
        if data_dir is None:
            data_dir = os.path.join(default_data_dir(), "imagenet")
        super().__init__(data_dir, batch_per_class, batch_size, test_batch_size, num_workers,
                         download=False, seed=seed, zca=zca, zca_eps=zca_eps, mean=mean,
                         std=std)
        self.subset = subset
        self.image_size = image_size
        self.resize = resize
        self.image_shape = (3, image_size, image_size)
        # one name per subset: a set distilled from imagewoof is not evaluated on imagenette
        self.dataset_name = f"ImageNetSubset-{subset}"
        all_wnids = imagenet_wnids()
        self.class_indices = list(IMAGENET_SUBSETS[subset])
        self.wnids = [all_wnids[i] for i in self.class_indices]

    @property
    def class_names(self) -> list[str]:
        """The wnids of the ten classes, in MTT's order."""
        return list(self.wnids)

    def _missing_message(self) -> str:
        return (f"ImageNet not found in {self.data_dir}: pass --data.data_dir with the folder "
                f"holding train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (the {self.subset} wnids: "
                f"{', '.join(self.wnids)}); it is not downloaded")

    def _transform(self):
        size = (self.image_size, self.image_size)
        if self.resize == "crop":  # GLaD / LD3M: the shorter side to size, then the centre
            resize = transforms.Resize(self.image_size,
                                       interpolation=transforms.InterpolationMode.BILINEAR,
                                       antialias=True)
        else:
            resize = transforms.Resize(size, interpolation=transforms.InterpolationMode.BILINEAR,
                                       antialias=False)
        return transforms.Compose([
            transforms.ToTensor(), transforms.Normalize(self.mean, self.std), resize,
            transforms.CenterCrop(size)])

    def _dataset(self, train: bool, transform) -> Dataset:
        split = self.data_dir / ("train" if train else "val")
        files, targets = _class_folders([split / wnid for wnid in self.wnids],
                                        self._missing_message())
        return _ImageFiles(files, targets, transform, tuple(self.image_shape))
