"""LightningDataModules for real data and distilled sets: ``from ld3m.datamodules import FashionMNIST``."""

from ld3m.datamodules.distilled import DistilledDataModule
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
    "CIFAR10", "CIFAR100", "DATASETS", "MNIST", "SVHN", "ClassBalancedStream", "DistilledDataModule",
    "FashionMNIST", "ImageFolderData", "RealDataModule",
]
