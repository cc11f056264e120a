"""Tests for the synthetic-set file format (ld3m.synthetic)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import ld3m.synthetic
from ld3m.synthetic import FORMAT_VERSION, SyntheticSet


def _full_set(lr_shape: tuple[int, ...] = (3,)) -> SyntheticSet:
    g = torch.Generator().manual_seed(0)
    return SyntheticSet(
        images=torch.randn(6, 3, 8, 8, generator=g),
        labels=torch.tensor([0, 0, 1, 1, 2, 2]),
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2023, 0.1994, 0.2010),
        num_classes=3,
        method="DATM",
        dataset="CIFAR10",
        ipc=2,
        soft_labels=torch.randn(6, 3, generator=g),
        lr=torch.rand(lr_shape, generator=g) + 0.01,
        extra={"latents": torch.randn(6, 4, 2, 2, generator=g),
               "steps": torch.arange(5, dtype=torch.int64)},
        meta={"hparams": {"ipc": 2, "lr_img": 100.0, "network": "ConvNet"}, "note": "é ✓"},
    )


def _assert_same(a: SyntheticSet, b: SyntheticSet) -> None:
    assert torch.equal(a.images, b.images) and a.images.dtype == b.images.dtype
    assert torch.equal(a.labels, b.labels) and b.labels.dtype == torch.int64
    for name in ("soft_labels", "lr"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.shape == y.shape, name
            assert torch.equal(x, y), name
    assert a.extra.keys() == b.extra.keys()
    for key in a.extra:
        assert a.extra[key].dtype == b.extra[key].dtype, key
        assert torch.equal(a.extra[key], b.extra[key]), key
    for name in ("mean", "std", "num_classes", "method", "dataset", "ipc", "meta", "image_shape"):
        assert getattr(a, name) == getattr(b, name), name


@pytest.mark.parametrize("lr_shape", [(3,), (), (2, 2)], ids=["vector", "scalar", "matrix"])
def test_round_trip_is_exact(tmp_path: Path, lr_shape: tuple[int, ...]) -> None:
    original = _full_set(lr_shape)
    path = original.save(tmp_path / "sub" / "set.safetensors")
    assert path == tmp_path / "sub" / "set.safetensors" and path.is_file()
    loaded = SyntheticSet.load(path)
    _assert_same(original, loaded)
    assert loaded.lr.shape == lr_shape
    assert sorted(p.name for p in path.parent.iterdir()) == ["set.safetensors"]


def test_round_trip_minimal_set(tmp_path: Path) -> None:
    original = SyntheticSet(torch.rand(2, 1, 4, 4), torch.tensor([1, 0]), (0.5,), (0.25,), 2)
    loaded = SyntheticSet.load(original.save(tmp_path / "min.safetensors"))
    _assert_same(original, loaded)
    assert loaded.soft_labels is None and loaded.lr is None and loaded.extra == {}
    assert loaded.method == "unknown" and loaded.ipc == 0


def test_header_is_documented_json(tmp_path: Path) -> None:
    from safetensors import safe_open

    path = _full_set().save(tmp_path / "set.safetensors")
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["ld3m"])
        keys = set(f.keys())
    assert header["format"] == FORMAT_VERSION == 1
    assert header["method"] == "DATM" and header["dataset"] == "CIFAR10"
    assert header["ipc"] == 2 and header["num_classes"] == 3
    assert header["image_shape"] == [3, 8, 8]
    assert keys == {"images", "labels", "soft_labels", "lr", "extra.latents", "extra.steps"}


def test_denormalized_and_as_dataset() -> None:
    s = SyntheticSet(torch.tensor([[[[-2.0, 0.0, 2.0, 10.0]]]]), torch.tensor([0]), (0.5,), (0.25,), 1)
    assert s.denormalized().flatten().tolist() == [0.0, 0.5, 1.0, 1.0]
    x, y = s.as_dataset()[0]
    assert torch.equal(x, s.images[0]) and int(y) == 0
    soft = SyntheticSet(torch.zeros(1, 1, 2, 2), torch.tensor([1]), (0.0,), (1.0,), 2,
                        soft_labels=torch.tensor([[0.1, 0.9]]))
    assert torch.equal(soft.as_dataset()[0][1], torch.tensor([0.1, 0.9]))


# ------------------------------------------------------------------------------ bad files
def _valid_bytes(tmp_path: Path) -> bytes:
    return _full_set().save(tmp_path / "valid.safetensors").read_bytes()


def _header_only_file(path: Path, header, tensors: dict | None = None) -> Path:
    meta = {"ld3m": header if isinstance(header, str) else json.dumps(header)}
    save_file(tensors or {"images": torch.zeros(1, 1, 2, 2), "labels": torch.zeros(1, dtype=torch.long)},
              str(path), metadata=meta)
    return path


BAD_FILES = {
    "random-bytes": lambda tmp: os.urandom(4096),
    "empty": lambda tmp: b"",
    "truncated-half": lambda tmp: _valid_bytes(tmp)[: len(_valid_bytes(tmp)) // 2],
    "truncated-header": lambda tmp: _valid_bytes(tmp)[:40],
    "truncated-last-byte": lambda tmp: _valid_bytes(tmp)[:-1],
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_corrupt_file_is_one_line_value_error(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(BAD_FILES[kind](tmp_path))
    with pytest.raises(ValueError) as info:
        SyntheticSet.load(path)
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message
    assert "not a valid ld3m synthetic set" in message


FULL_HEADER = {"format": 1, "method": "DM", "dataset": "MNIST", "ipc": 1, "num_classes": 1,
               "image_shape": [1, 2, 2], "mean": [0.1], "std": [0.3], "meta": {}, "lr_shape": None}


@pytest.mark.parametrize(
    "header, tensors",
    [
        ({"format": 1}, {"other": torch.zeros(1)}),  # a safetensors file, not a set
        ("[1, 2]", None),  # metadata that is not a JSON object
        ("{not json", None),
        ({**FULL_HEADER, "format": 99}, None),  # a future format version
        ({k: v for k, v in FULL_HEADER.items() if k != "mean"}, None),  # a required field missing
        ({**FULL_HEADER, "lr_shape": [7]}, {"images": torch.zeros(1, 1, 2, 2),
                                            "labels": torch.zeros(1, dtype=torch.long),
                                            "lr": torch.zeros(3)}),  # lr of the wrong size
        (FULL_HEADER, {"images": torch.zeros(1, 2, 2),  # images of the wrong rank
                       "labels": torch.zeros(1, dtype=torch.long)}),
    ],
    ids=["no-images", "not-an-object", "bad-json", "format-99", "no-mean", "lr-size", "3d-images"],
)
def test_invalid_content_is_one_line_value_error(tmp_path: Path, header, tensors) -> None:
    path = _header_only_file(tmp_path / "odd.safetensors", header, tensors)
    with pytest.raises(ValueError) as info:
        SyntheticSet.load(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_file_without_ld3m_metadata(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    save_file({"images": torch.zeros(1, 1, 2, 2)}, str(path))
    with pytest.raises(ValueError, match="not a valid ld3m synthetic set"):
        SyntheticSet.load(path)


def test_minimal_valid_header_loads(tmp_path: Path) -> None:
    # the control for the invalid cases above: the same writer with a complete header works
    loaded = SyntheticSet.load(_header_only_file(tmp_path / "ok.safetensors", FULL_HEADER))
    assert loaded.method == "DM" and loaded.mean == (0.1,) and loaded.image_shape == (1, 2, 2)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SyntheticSet.load(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError):
        SyntheticSet.load(tmp_path)  # a directory is not a set either


def test_failed_save_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "set.safetensors"
    _full_set().save(target)
    before = target.read_bytes()

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")  # a partial write, then the failure
        raise OSError("disk full")

    monkeypatch.setattr(ld3m.synthetic, "save_file", crash)
    other = SyntheticSet(torch.ones(1, 1, 2, 2), torch.tensor([0]), (0.0,), (1.0,), 1)
    with pytest.raises(OSError, match="disk full"):
        other.save(target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set.safetensors"]

    class Interrupt(BaseException):
        pass

    def interrupt(tensors, filename, metadata=None):
        raise Interrupt  # e.g. KeyboardInterrupt in the middle of the write

    monkeypatch.setattr(ld3m.synthetic, "save_file", interrupt)
    with pytest.raises(Interrupt):
        other.save(target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set.safetensors"]
    _assert_same(_full_set(), SyntheticSet.load(target))


def test_save_overwrites_atomically(tmp_path: Path) -> None:
    target = tmp_path / "set.safetensors"
    _full_set().save(target)
    replacement = SyntheticSet(torch.ones(1, 1, 2, 2), torch.tensor([0]), (0.0,), (1.0,), 1)
    replacement.save(target)
    _assert_same(replacement, SyntheticSet.load(target))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set.safetensors"]


# ------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"images": torch.zeros(2, 4, 4)}, r"\(N, C, H, W\)"),
        ({"labels": torch.zeros(3, dtype=torch.long)}, "labels"),
        ({"labels": torch.zeros(2, 1, dtype=torch.long)}, "labels"),
        ({"mean": (0.0, 0.0)}, "mean/std"),
        ({"std": ()}, "mean/std"),
        ({"soft_labels": torch.zeros(2, 3)}, "soft_labels"),
        ({"soft_labels": torch.zeros(3, 2)}, "soft_labels"),
    ],
    ids=["3d-images", "label-count", "label-rank", "mean-channels", "std-channels",
         "soft-classes", "soft-rows"],
)
def test_shape_validation(kwargs: dict, match: str) -> None:
    args = {"images": torch.zeros(2, 1, 4, 4), "labels": torch.zeros(2, dtype=torch.long),
            "mean": (0.0,), "std": (1.0,), "num_classes": 2}
    SyntheticSet(**args)  # the valid baseline
    with pytest.raises(ValueError, match=match):
        SyntheticSet(**{**args, **kwargs})
