"""Tests for the real-data modules (Fashion-MNIST, a tiny MNIST) and DistilledDataModule."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import write_idx
from ld3m.datamodules import MNIST, ClassBalancedStream, DistilledDataModule, FashionMNIST

from ld3m.synthetic import SyntheticSet

FMNIST_MEAN, FMNIST_STD = 0.2861, 0.3530


def _to_uint8(dm, images: torch.Tensor) -> torch.Tensor:
    """Normalised images back to the uint8 pixels they came from."""
    return (dm.denormalize(images) * 255).round().clamp(0, 255).to(torch.uint8)


def _assert_images_of_class(dm, images: torch.Tensor, c: int) -> None:
    """Every image of ``images`` (n, C, H, W) is a training image of class ``c``."""
    split = dm.train_split
    members = split.cached[split.class_index[c]].flatten(1)
    for img in _to_uint8(dm, images).flatten(1):
        assert (members == img).all(1).any(), f"an image of row {c} is not a class-{c} image"


def _first_batches(dm, k: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``k`` batches as a Trainer's step sees them (after the batch-transfer hook)."""
    stream = iter(dm.train_dataloader())
    return [dm.on_after_batch_transfer(next(stream), 0) for _ in range(k)]


def test_in_a_trainer_only_indices_cross_to_the_device(fmnist: FashionMNIST) -> None:
    """Attached to a trainer, the loader of a cached dataset yields each batch's indices; the
    images are gathered from the cache on the device: the same batch as the host stream's."""
    from ld3m.datamodules.real import ClassBalancedPicks

    fmnist.trainer = SimpleNamespace(global_rank=0, global_step=0)
    picks = next(iter(fmnist.train_dataloader()))
    assert isinstance(picks, ClassBalancedPicks) and picks.index.shape == (80,)
    assert picks.index.dtype == torch.long
    images, labels = fmnist.on_after_batch_transfer(picks.to("cpu"), 0)
    host_images, host_labels = ClassBalancedStream(fmnist, 8).batch(0)
    assert torch.equal(images, host_images) and torch.equal(labels, host_labels)
    fmnist.trainer = None  # outside a Trainer (no hook runs): whole batches
    assert next(iter(fmnist.train_dataloader()))[0].shape == (10, 8, 1, 28, 28)


# ------------------------------------------------------------------------------ Fashion-MNIST
def test_fashion_mnist_attributes(fmnist: FashionMNIST) -> None:
    assert fmnist.dataset_name == "FashionMNIST"
    assert fmnist.num_classes == 10
    assert tuple(fmnist.image_shape) == (1, 28, 28)
    assert fmnist.class_names[0] == "T-shirt/top" and len(fmnist.class_names) == 10
    assert fmnist.class_sizes() == [6000] * 10
    assert len(fmnist.train_split) == 60_000


def test_fashion_mnist_is_staged_uncompressed(data_dir: Path) -> None:
    raw = data_dir / "FashionMNIST" / "raw"
    names = sorted(p.name for p in raw.iterdir())
    assert names == sorted(
        ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
         "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    ), "staging left extra (temporary) files or missed one"
    assert (raw / "train-images-idx3-ubyte").stat().st_size == 16 + 60_000 * 28 * 28
    assert (raw / "t10k-labels-idx1-ubyte").stat().st_size == 8 + 10_000


def test_default_data_dir_is_one_user_cache(tmp_path: Path, monkeypatch) -> None:
    """Without ``data_dir`` or ``$LD3M_DATA_DIR`` the data lives in the user's cache, staged
    there once, whichever folder the run starts in (not a ``./data`` copy per folder)."""
    monkeypatch.delenv("LD3M_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for folder in ("one", "two"):
        (tmp_path / folder).mkdir()
        monkeypatch.chdir(tmp_path / folder)
        dm = FashionMNIST()
        assert dm.data_dir == tmp_path / "cache" / "ld3m" / "datasets"
        dm.prepare_data()
        assert not (tmp_path / folder / "data").exists()
    raw = tmp_path / "cache" / "ld3m" / "datasets" / "FashionMNIST" / "raw"
    assert (raw / "train-images-idx3-ubyte").stat().st_size == 16 + 60_000 * 28 * 28


def test_sample_per_class_shape_classes_and_distinct(fmnist: FashionMNIST) -> None:
    images = fmnist.sample_per_class(5, torch.Generator().manual_seed(0))
    assert images.shape == (10, 5, 1, 28, 28)
    assert images.dtype == torch.float32
    for c in range(10):
        _assert_images_of_class(fmnist, images[c], c)
        assert torch.unique(images[c].flatten(1), dim=0).shape[0] == 5, f"repeated image in class {c}"


def test_sample_per_class_follows_the_generator(fmnist: FashionMNIST) -> None:
    a = fmnist.sample_per_class(3, torch.Generator().manual_seed(1))
    b = fmnist.sample_per_class(3, torch.Generator().manual_seed(1))
    c = fmnist.sample_per_class(3, torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_sample_is_normalised(fmnist: FashionMNIST) -> None:
    x = fmnist.sample_per_class(300, torch.Generator().manual_seed(0))
    assert abs(x.mean().item()) < 0.05
    assert abs(x.std().item() - 1.0) < 0.05
    # black and white pixels map exactly to the ends of the normalised range
    assert x.min().item() == pytest.approx(-FMNIST_MEAN / FMNIST_STD, abs=1e-5)
    assert x.max().item() == pytest.approx((1 - FMNIST_MEAN) / FMNIST_STD, abs=1e-5)


def test_sample_more_than_a_class_has(fmnist: FashionMNIST) -> None:
    with pytest.raises(ValueError, match=r"7000.*class 0 .*6000") as info:
        fmnist.sample_per_class(7000)
    assert "\n" not in str(info.value)


def test_class_balanced_train_loader(fmnist: FashionMNIST) -> None:
    batches = _first_batches(fmnist, 2)
    for images, labels in batches:
        assert images.shape == (10, 8, 1, 28, 28)
        assert labels.shape == (10, 8)
        assert torch.equal(labels, torch.arange(10).view(10, 1).expand(10, 8))
    images = batches[0][0]
    for c in range(10):
        _assert_images_of_class(fmnist, images[c], c)
        assert torch.unique(images[c].flatten(1), dim=0).shape[0] == 8
    assert not torch.equal(batches[0][0], batches[1][0]), "the stream repeats its first batch"


def test_stream_is_seeded_by_seed_and_rank(fmnist: FashionMNIST) -> None:
    fmnist.trainer = SimpleNamespace(global_rank=0, global_step=0)
    rank0 = _first_batches(fmnist)
    rank0_again = _first_batches(fmnist)
    fmnist.trainer = SimpleNamespace(global_rank=1, global_step=0)
    rank1 = _first_batches(fmnist)
    fmnist.trainer = SimpleNamespace(global_rank=0, global_step=0)
    fmnist.seed = 1
    seed1 = _first_batches(fmnist)
    for (a, _), (b, _) in zip(rank0, rank0_again, strict=True):
        assert torch.equal(a, b)
    for other in (rank1, seed1):
        for (a, _), (b, _) in zip(rank0, other, strict=True):
            assert not torch.equal(a, b)


def test_stream_resumes_at_the_trainer_step(fmnist: FashionMNIST) -> None:
    fmnist.trainer = SimpleNamespace(global_rank=0, global_step=0)
    from_start = _first_batches(fmnist, 5)
    fmnist.trainer = SimpleNamespace(global_rank=0, global_step=3)
    resumed = _first_batches(fmnist, 2)
    for (a, _), (b, _) in zip(from_start[3:], resumed, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(from_start[0][0], resumed[0][0])


def test_missing_dataset_is_a_clear_file_not_found(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(FashionMNIST, "system_dirs", ())
    empty = tmp_path / "empty"
    dm = FashionMNIST(data_dir=str(empty))
    with pytest.raises(FileNotFoundError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert str(empty / "FashionMNIST" / "raw") in message
    assert "--data.data_dir" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "\n" not in message
    with pytest.raises(FileNotFoundError):
        dm.setup("fit")


# ------------------------------------------------------------------------------ a tiny MNIST
TINY_TRAIN, TINY_TEST = 3, 1  # images per class


def _pixel(c: int, i: int) -> int:
    """The (uniform) grey value of the i-th image of class c in the tiny MNIST."""
    return 10 * c + i + 5


def _write_tiny_mnist(root: Path) -> None:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, per_class in (("train", TINY_TRAIN), ("t10k", TINY_TEST)):
        # interleaved classes (0, 1, ..., 9, 0, 1, ...), so grouping by class is exercised
        order = [(c, i) for i in range(per_class) for c in range(10)]
        images = torch.stack([torch.full((28, 28), _pixel(c, i)) for c, i in order])
        labels = torch.tensor([c for c, _ in order])
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)


@pytest.fixture
def tiny_mnist(tmp_path: Path) -> MNIST:
    _write_tiny_mnist(tmp_path)
    dm = MNIST(data_dir=str(tmp_path), batch_per_class=2)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _decode(dm: MNIST, images: torch.Tensor) -> torch.Tensor:
    """The grey value of each (uniform) image of ``images`` (..., 1, 28, 28)."""
    pixels = _to_uint8(dm, images.flatten(0, -4)).flatten(1)
    assert (pixels == pixels[:, :1]).all(), "an image is not uniform: normalisation is wrong"
    return pixels[:, 0].long().view(images.shape[:-3])


def test_tiny_mnist_loads_and_is_normalised(tiny_mnist: MNIST) -> None:
    assert tiny_mnist.class_sizes() == [TINY_TRAIN] * 10
    images = tiny_mnist.sample_per_class(TINY_TRAIN, torch.Generator().manual_seed(0))
    assert images.shape == (10, TINY_TRAIN, 1, 28, 28)
    values = _decode(tiny_mnist, images)
    for c in range(10):
        assert sorted(values[c].tolist()) == [_pixel(c, i) for i in range(TINY_TRAIN)]
    (test_images, test_labels), = list(tiny_mnist.test_dataloader())
    assert test_images.shape == (10 * TINY_TEST, 1, 28, 28)
    assert test_labels.tolist() == list(range(10))
    assert _decode(tiny_mnist, test_images).tolist() == [_pixel(c, 0) for c in range(10)]


def test_tiny_mnist_exact_normalisation(tiny_mnist: MNIST) -> None:
    split = tiny_mnist.train_split
    first = split.images(split.class_index[3][:1], tiny_mnist)  # one image of class 3
    value = int(split.cached[split.class_index[3][0]].flatten()[0])
    assert value in {_pixel(3, i) for i in range(TINY_TRAIN)}
    assert torch.allclose(first, torch.full_like(first, (value / 255 - 0.1307) / 0.3081), atol=1e-6)


def test_tiny_mnist_class_size_limit(tiny_mnist: MNIST) -> None:
    with pytest.raises(ValueError, match=f"only {TINY_TRAIN} training images"):
        tiny_mnist.sample_per_class(TINY_TRAIN + 1)


def test_tiny_mnist_stream_is_balanced_and_distinct(tiny_mnist: MNIST) -> None:
    # every batch holds 2 distinct images of each class (3 exist), drawn afresh per step
    batches = _first_batches(tiny_mnist, 6)
    for images, labels in batches:
        assert images.shape == (10, 2, 1, 28, 28)
        assert torch.equal(labels, torch.arange(10).view(10, 1).expand(10, 2))
        values = _decode(tiny_mnist, images)
        for c in range(10):
            index = (values[c] - _pixel(c, 0)).tolist()
            assert len(set(index)) == 2 and all(0 <= i < TINY_TRAIN for i in index), index
    seen = torch.cat([_decode(tiny_mnist, images) for images, _ in batches], dim=1)
    for c in range(10):  # over 6 steps every image of the class shows up
        assert set((seen[c] - _pixel(c, 0)).tolist()) == set(range(TINY_TRAIN))


# ------------------------------------------------------------------------------ distilled sets
def _synthetic(soft: bool = False) -> SyntheticSet:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(10).repeat_interleave(2)
    return SyntheticSet(
        images=torch.randn(20, 1, 28, 28, generator=g), labels=labels,
        mean=(FMNIST_MEAN,), std=(FMNIST_STD,), num_classes=10, method="DM",
        dataset="FashionMNIST", ipc=2,
        soft_labels=torch.randn(20, 10, generator=g) if soft else None,
    )


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_distilled_datamodule_serves_a_saved_set(tmp_path: Path, soft: bool) -> None:
    synthetic = _synthetic(soft)
    path = synthetic.save(tmp_path / "set.safetensors")
    data = DistilledDataModule(str(path), batch_size=8)
    assert data.num_classes == 10
    assert tuple(data.image_shape) == (1, 28, 28)
    batches = list(data.train_dataloader())
    assert [len(x) for x, _ in batches] == [8, 8, 4]
    seen = []
    for images, targets in batches:
        for image, target in zip(images, targets, strict=True):
            (index,) = [i for i in range(20) if torch.equal(synthetic.images[i], image)]
            seen.append(index)
            expected = synthetic.soft_labels[index] if soft else synthetic.labels[index]
            assert torch.equal(target, expected)
            assert target.is_floating_point() == soft
    assert sorted(seen) == list(range(20)), "an epoch must serve every image exactly once"


def test_distilled_datamodule_test_split_and_errors(fmnist: FashionMNIST) -> None:
    data = DistilledDataModule(_synthetic(), real=fmnist)
    images, labels = next(iter(data.test_dataloader()))
    assert images.shape == (1000, 1, 28, 28)
    assert labels.shape == (1000,) and int(labels.max()) == 9
    with pytest.raises(ValueError, match="real"):
        DistilledDataModule(_synthetic()).test_dataloader()
    with pytest.raises(ValueError, match="batch_size"):
        DistilledDataModule(_synthetic(), batch_size=0)
