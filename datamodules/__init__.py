"""LightningDataModules for real data and distilled sets: ``from ld3m.datamodules import FashionMNIST``."""

# real first: its registry imports imagenet.py, whose classes subclass real's
from ld3m.datamodules import real  # noqa: F401
from ld3m.datamodules.distilled import DistilledDataModule
from ld3m.datamodules.imagenet import IMAGENET_SUBSETS, ImageNetSubset, TinyImageNet
from ld3m.datamodules.real import (
    CIFAR10,
    CIFAR100,
    DATASETS,
    MNIST,
    SVHN,
    ClassBalancedStream,
    FashionMNIST,
    ImageFolderData,
    RealDataModule,
)

__all__ = [
    "CIFAR10", "CIFAR100", "DATASETS", "IMAGENET_SUBSETS", "MNIST", "SVHN", "ClassBalancedStream",
    "DistilledDataModule", "FashionMNIST", "ImageFolderData", "ImageNetSubset", "RealDataModule",
    "TinyImageNet",
]
