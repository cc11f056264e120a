"""Shared fixtures: Fashion-MNIST staged once per session into a temporary data folder.

The real dataset comes from Debian's ``dataset-fashion-mnist`` package
(``/usr/share/datasets/fashion-mnist``). Nothing is ever downloaded: if the files are missing
the tests that need them fail with the install command, they are not skipped.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from ld3m.datamodules import FashionMNIST

SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _system_files_present() -> bool:
    return all(
        (SYSTEM_FASHION_MNIST / f"{name}.gz").is_file() or (SYSTEM_FASHION_MNIST / name).is_file()
        for name in FASHION_MNIST_FILES
    )


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory):
    """A data folder holding ``FashionMNIST/raw``, exported as ``$LD3M_DATA_DIR`` for the session."""
    if not _system_files_present():
        pytest.fail(
            f"Fashion-MNIST is missing from {SYSTEM_FASHION_MNIST}; the tests use it and never "
            "download it. Install it with: apt-get install dataset-fashion-mnist",
            pytrace=False,
        )
    folder = tmp_path_factory.mktemp("data")
    FashionMNIST(data_dir=str(folder)).prepare_data()  # stages (un-gzips) the IDX files
    previous = os.environ.get("LD3M_DATA_DIR")
    os.environ["LD3M_DATA_DIR"] = str(folder)
    try:
        yield folder
    finally:
        if previous is None:
            os.environ.pop("LD3M_DATA_DIR", None)
        else:
            os.environ["LD3M_DATA_DIR"] = previous


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core machine two OpenMP threads that compete with other
    processes make small kernels 10x slower, and the timings erratic."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def fmnist(data_dir: Path) -> FashionMNIST:
    """A set-up Fashion-MNIST data module with 8 images per class per batch."""
    dm = FashionMNIST(data_dir=str(data_dir), batch_per_class=8)
    dm.setup("fit")  # loads the (already staged) training split
    return dm
