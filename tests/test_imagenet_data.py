"""Tiny-ImageNet and MTT's ImageNet subsets, read from tiny files written in their own layouts.

Tiny-ImageNet: the official ``tiny-imagenet-200`` folder (``wnids.txt``,
``train/<wnid>/images/*.JPEG``, ``val/images/*.JPEG`` + ``val/val_annotations.txt``). ImageNet:
the ILSVRC folder layout ``train/<wnid>/*.JPEG``, ``val/<wnid>/*.JPEG``. Nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ld3m.datamodules import DATASETS, IMAGENET_SUBSETS, ImageNetSubset, TinyImageNet
from PIL import Image

from ld3m.cli import main
from ld3m.synthetic import SyntheticSet
from ld3m.testing import write_stand_in_buffer

pytestmark = pytest.mark.usefixtures("one_thread")

# Three Tiny-ImageNet wnids, written to wnids.txt out of sorted order (as the real file is).
TINY_WNIDS = ["n02124075", "n01443537", "n01629819"]
TINY_COLOURS = {"n01443537": (250, 10, 10), "n01629819": (10, 250, 10), "n02124075": (10, 10, 250)}

# MTT utils.py Config: imagenette = [0, 217, 482, 491, 497, 566, 569, 571, 574, 701], i.e. these
# ten ImageNet-1k wnids in this order (tench, English springer, cassette player, chain saw,
# church, French horn, garbage truck, gas pump, golf ball, parachute: class 701 is n03888257,
# the ILSVRC 2012 wnid of "parachute, chute", sorted before n03888605 "parallel bars").
IMAGENETTE_WNIDS = ["n01440764", "n02102040", "n02979186", "n03000684", "n03028079",
                    "n03394916", "n03417042", "n03425413", "n03445777", "n03888257"]
# the wnids of MTT's imagewoof = [193, 182, 258, 162, 155, 167, 159, 273, 207, 229]
IMAGEWOOF_WNIDS = ["n02096294", "n02093754", "n02111889", "n02088364", "n02086240",
                   "n02089973", "n02087394", "n02115641", "n02099601", "n02105641"]


def _save_jpeg(path: Path, colour, size=(64, 64)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, quality=100)


def _write_tiny_imagenet(root: Path, per_class: int = 4,
                         val: list[str] | None = None) -> list[str]:
    """A tiny-imagenet-200 folder; returns the wnid annotated for each val image, in order."""
    (root / "wnids.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("\n".join(TINY_WNIDS) + "\n")
    for wnid in TINY_WNIDS:
        r, g, b = TINY_COLOURS[wnid]
        for i in range(per_class):
            _save_jpeg(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", (r, g + 5 * i, b))
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")  # as in the real folder
    val = val if val is not None else ["n01629819", "n02124075", "n01443537", "n02124075",
                                       "n01629819"]
    lines = []
    for i, wnid in enumerate(val):
        _save_jpeg(root / "val" / "images" / f"val_{i}.JPEG", TINY_COLOURS[wnid])
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return val


def _write_imagenet(root: Path, wnids: list[str], per_class: int = 2, size=(48, 32),
                    extra: str | None = "n09999999") -> None:
    """An ILSVRC folder with ``wnids`` (class c coloured c) and one class outside the subset."""
    for c, wnid in enumerate([*wnids, *([extra] if extra else [])]):
        colour = (20 * c, 255 - 20 * c, 128)
        for split, count in (("train", per_class), ("val", 1)):
            for i in range(count):
                _save_jpeg(root / split / wnid / f"{wnid}_{i}.JPEG", colour, size)


def _mean_rgb(dm, images: torch.Tensor) -> torch.Tensor:
    return dm.denormalize(images).mean((-2, -1)) * 255


# ------------------------------------------------------------------------------ Tiny-ImageNet
def test_tiny_imagenet_reads_the_official_layout(tmp_path: Path) -> None:
    val = _write_tiny_imagenet(tmp_path)
    dm = TinyImageNet(str(tmp_path), batch_per_class=2)
    assert dm.dataset_name == "TinyImageNet" and DATASETS["TinyImageNet"] is TinyImageNet
    # classes: the sorted wnids (ImageFolder on train/ in MTT and DATM), not wnids.txt's order
    assert dm.class_names == sorted(TINY_WNIDS) and dm.num_classes == 3
    assert dm.image_shape == (3, 64, 64)
    # MTT utils.py get_dataset('Tiny'): ImageNet's mean and std
    assert dm.mean == (0.485, 0.456, 0.406) and dm.std == (0.229, 0.224, 0.225)
    dm.setup("fit")
    split = dm.train_split
    assert split.cached is not None and split.cached.shape == (12, 3, 64, 64)
    assert split.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    # the native 64x64 pixels are kept exactly (no resize): the cache is the decoded JPEG
    first = sorted((tmp_path / "train" / "n01443537" / "images").glob("*.JPEG"))[0]
    decoded = torch.from_numpy(np.array(Image.open(first).convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(split.cached[0], decoded)
    batch = dm.sample_per_class(2, torch.Generator().manual_seed(0))
    assert batch.shape == (3, 2, 3, 64, 64)
    for c, wnid in enumerate(dm.class_names):
        rgb = _mean_rgb(dm, batch[c])
        assert torch.allclose(rgb[:, [0, 2]], torch.tensor(TINY_COLOURS[wnid]).float()[[0, 2]],
                              atol=3), wnid
    # the validation images are the test set, labelled by val_annotations.txt
    images, labels = next(iter(dm.test_dataloader()))
    assert labels.tolist() == [dm.class_names.index(w) for w in val]
    expected = torch.tensor([TINY_COLOURS[w] for w in val]).float()
    assert torch.allclose(_mean_rgb(dm, images), expected, atol=3)


def test_tiny_imagenet_zca_whitens_raw_pixels(tmp_path: Path) -> None:
    _write_tiny_imagenet(tmp_path)
    dm = TinyImageNet(str(tmp_path), zca=True)
    # DATM's Tiny configs whiten the raw [0, 1] pixels: no mean/std normalisation
    assert dm.mean == (0.0, 0.0, 0.0) and dm.std == (1.0, 1.0, 1.0)
    assert dm.zca_settings == {"eps": 0.1, "input": "pixels"}


def test_tiny_imagenet_zca_fits_3x64x64(tmp_path: Path, monkeypatch) -> None:
    """DATM whitens Tiny-ImageNet at 64 px: the fit is not refused at 12288 values per image (it
    once stopped at 4096), and it sees the raw training pixels flat."""
    import ld3m.datamodules.real as real

    seen = []

    def recording_zca_mean(flat, eps):
        seen.append((tuple(flat.shape), eps, float(flat.min()), float(flat.max())))
        raise StopIteration  # the 12288 x 12288 fit itself is not this test's business

    monkeypatch.setattr(real, "zca_mean", recording_zca_mean)
    _write_tiny_imagenet(tmp_path)
    dm = TinyImageNet(str(tmp_path), zca=True)
    dm.setup("fit")
    with pytest.raises(StopIteration):
        dm.whiten(torch.zeros(1, 3, 64, 64))
    (shape, eps, low, high), = seen
    assert shape == (4 * len(TINY_WNIDS), 3 * 64 * 64) and eps == 0.1
    assert 0.0 <= low and high <= 1.0
    _write_imagenet(tmp_path / "imagenet", IMAGENETTE_WNIDS, per_class=1)
    too_big = ImageNetSubset("imagenette", data_dir=str(tmp_path / "imagenet"), image_size=72,
                             zca=True)
    too_big.setup("fit")
    with pytest.raises(ValueError, match="offered up to 12288"):
        too_big.whiten(torch.zeros(1, 3, 72, 72))


def test_tiny_imagenet_val_sorted_into_class_folders(tmp_path: Path) -> None:
    _write_tiny_imagenet(tmp_path)
    (tmp_path / "val" / "val_annotations.txt").unlink()
    for path in (tmp_path / "val" / "images").glob("*.JPEG"):
        path.unlink()
    for wnid in ("n01629819", "n02124075"):  # MTT's and DATM's ImageFolder(val/images) layout
        _save_jpeg(tmp_path / "val" / "images" / wnid / "a.JPEG", TINY_COLOURS[wnid])
    dm = TinyImageNet(str(tmp_path))
    _, labels = next(iter(dm.test_dataloader()))
    assert labels.tolist() == [1, 2]


def test_tiny_imagenet_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tiny-imagenet-200"):
        TinyImageNet(str(tmp_path / "missing")).setup("fit")
    _write_tiny_imagenet(tmp_path / "unknown", val=["n01443537"])
    annotations = tmp_path / "unknown" / "val" / "val_annotations.txt"
    annotations.write_text("val_0.JPEG\tn09999999\t0\t0\t63\t63\n")
    with pytest.raises(ValueError, match="n09999999"):
        TinyImageNet(str(tmp_path / "unknown")).test_dataloader()
    _write_tiny_imagenet(tmp_path / "listed")
    (tmp_path / "listed" / "wnids.txt").write_text("n01443537\nn01629819\n")
    with pytest.raises(ValueError, match="wnids"):
        TinyImageNet(str(tmp_path / "listed")).setup("fit")
    _write_tiny_imagenet(tmp_path / "size")
    _save_jpeg(tmp_path / "size" / "train" / "n01443537" / "images" / "big.JPEG", (0, 0, 0),
               (80, 64))
    with pytest.raises(ValueError, match="big.JPEG"):
        TinyImageNet(str(tmp_path / "size")).setup("fit")


# ------------------------------------------------------------------------------ ImageNet subsets
def test_subsets_are_mtts_classes_in_their_order(tmp_path: Path) -> None:
    assert list(IMAGENET_SUBSETS) == ["imagenette", "imagewoof", "imagefruit", "imageyellow",
                                      "imagemeow", "imagesquawk", "imagenet-a", "imagenet-b",
                                      "imagenet-c", "imagenet-d", "imagenet-e"]
    # GLaD's / LD3M's ImageNet-A (src/utils.py Config.alpha: Leonberg, proboscis monkey, ...)
    a = ImageNetSubset("imagenet-a", data_dir=str(tmp_path))
    assert a.class_indices == [255, 376, 984, 364, 500, 986, 333, 576, 148, 135]
    assert a.class_names[0] == "n02111129" and a.dataset_name == "ImageNetSubset-imagenet-a"
    assert ImageNetSubset(data_dir=str(tmp_path)).class_names == IMAGENETTE_WNIDS  # the default
    woof = ImageNetSubset("imagewoof", data_dir=str(tmp_path))
    assert woof.class_names == IMAGEWOOF_WNIDS
    assert woof.class_indices == [193, 182, 258, 162, 155, 167, 159, 273, 207, 229]
    # one dataset name per subset: a set distilled from one is not evaluated on another
    assert woof.dataset_name == "ImageNetSubset-imagewoof"
    assert DATASETS["ImageNetSubset"] is ImageNetSubset


def test_imagenet_subset_reads_the_ilsvrc_layout(tmp_path: Path) -> None:
    _write_imagenet(tmp_path, IMAGENETTE_WNIDS)
    dm = ImageNetSubset("imagenette", data_dir=str(tmp_path), batch_per_class=2)
    assert dm.num_classes == 10 and dm.image_shape == (3, 128, 128)
    dm.setup("fit")
    split = dm.train_split
    assert split.cached.shape == (20, 3, 128, 128)  # the class outside the subset is not read
    assert split.labels.tolist() == [c for c in range(10) for _ in range(2)]
    batch = dm.sample_per_class(2, torch.Generator().manual_seed(0))
    for c in range(10):  # label c is the c-th class of MTT's list
        expected = torch.tensor([20.0 * c, 255 - 20.0 * c, 128]).expand(2, 3)
        assert torch.allclose(_mean_rgb(dm, batch[c]), expected, atol=3), c
    images, labels = next(iter(dm.test_dataloader()))
    assert images.shape == (10, 3, 128, 128) and labels.tolist() == list(range(10))


def _write_red_quarter(root: Path) -> None:
    for split in ("train", "val"):
        for wnid in IMAGENETTE_WNIDS:
            image = Image.new("RGB", (64, 32), (0, 0, 255))
            image.paste((255, 0, 0), (0, 0, 16, 32))
            path = root / split / wnid / "a.JPEG"
            path.parent.mkdir(parents=True)
            image.save(path, quality=100)


def test_imagenet_subset_crops_the_centre_as_glad_and_ld3m(tmp_path: Path) -> None:
    """GLaD's / LD3M's Resize(256) then CenterCrop(256): the 64x32 image becomes 512x256 and
    its centre 256 columns are blue: the red left quarter is cut away."""
    _write_red_quarter(tmp_path)
    dm = ImageNetSubset(data_dir=str(tmp_path), image_size=256, resize="crop")
    dm.setup("fit")
    pixels = dm.train_split.cached[0].float()
    assert pixels.shape == (3, 256, 256)
    assert pixels[2].mean() > 240 and pixels[0].mean() < 15
    with pytest.raises(ValueError, match="resize must be one of"):
        ImageNetSubset(data_dir=str(tmp_path), resize="stretch")


def test_imagenet_subset_squashes_to_128_as_mtt(tmp_path: Path) -> None:
    """MTT's Resize((128, 128)) does not keep the aspect ratio: a 64x32 image whose left quarter
    is red keeps its red quarter (a short-side resize and centre crop would cut it away)."""
    _write_red_quarter(tmp_path)
    dm = ImageNetSubset(data_dir=str(tmp_path))
    dm.setup("fit")
    pixels = dm.train_split.cached[0].float()
    assert pixels.shape == (3, 128, 128)
    assert pixels[0, :, :24].mean() > 240 and pixels[2, :, :24].mean() < 15  # red: columns 0-31
    assert pixels[2, :, 40:].mean() > 240 and pixels[0, :, 40:].mean() < 15  # blue: the rest


def test_imagenet_subset_errors(tmp_path: Path, capsys) -> None:
    with pytest.raises(ValueError, match="imagecat.*imagenette, imagewoof, imagefruit, "
                                         "imageyellow, imagemeow, imagesquawk, imagenet-a"):
        ImageNetSubset("imagecat")
    _write_imagenet(tmp_path, IMAGENETTE_WNIDS[:9], extra=None)
    with pytest.raises(FileNotFoundError, match=IMAGENETTE_WNIDS[9]):
        ImageNetSubset(data_dir=str(tmp_path)).setup("fit")
    assert main(["fit", "--model", "DM", "--data", "ImageNetSubset", "--data.subset", "imagecat",
                 "--data.data_dir", str(tmp_path), "--trainer.max_steps", "1",
                 "--trainer.default_root_dir", str(tmp_path / "run")]) == 2
    assert "unknown ImageNet subset 'imagecat'; choose one of: imagenette" in capsys.readouterr().err


# ------------------------------------------------------------------------------ through ld3m fit
def test_dm_fit_on_tiny_imagenet(tmp_path: Path) -> None:
    _write_tiny_imagenet(tmp_path / "tiny")
    out = tmp_path / "run"
    assert main(["fit", "--model", "DM", "--data", "TinyImageNet",
                 "--data.data_dir", str(tmp_path / "tiny"), "--model.ipc", "1",
                 "--model.network", "ConvNetD4", "--model.dsa", "none",
                 "--data.batch_per_class", "2", "--trainer.max_steps", "1",
                 "--trainer.default_root_dir", str(out), "--evaluation.at_end", "false",
                 "--trainer.enable_progress_bar", "false"]) == 0
    synthetic = SyntheticSet.load(out / "synthetic.safetensors")
    assert synthetic.dataset == "TinyImageNet" and synthetic.image_shape == (3, 64, 64)
    assert synthetic.num_classes == 3 and synthetic.method == "DM"


def test_mtt_fit_on_an_imagenet_subset_at_128(tmp_path: Path) -> None:
    _write_imagenet(tmp_path / "imagenet", IMAGEWOOF_WNIDS, per_class=1, extra=None)
    buffer = write_stand_in_buffer(tmp_path / "buffer", experts=1, epochs=2, network="ConvNetD5",
                                   shape=(3, 128, 128), classes=10, dataset="ImageNetSubset")
    out = tmp_path / "run"
    assert main(["fit", "--model", "MTT", "--model.buffer", str(buffer), "--model.ipc", "1",
                 "--model.syn_steps", "1", "--model.expert_epochs", "1",
                 "--model.max_start_epoch", "1", "--model.dsa", "none",
                 "--data", "ImageNetSubset", "--data.subset", "imagewoof",
                 "--data.data_dir", str(tmp_path / "imagenet"), "--trainer.max_steps", "1",
                 "--trainer.default_root_dir", str(out), "--evaluation.at_end", "false",
                 "--trainer.enable_progress_bar", "false"]) == 0
    synthetic = SyntheticSet.load(out / "synthetic.safetensors")
    assert synthetic.dataset == "ImageNetSubset-imagewoof"
    assert synthetic.image_shape == (3, 128, 128) and synthetic.num_classes == 10
    # ld3m evaluate finds the subset (and its size) from the set's dataset name
    report = tmp_path / "report.json"
    assert main(["evaluate", "--distilled", str(out / "synthetic.safetensors"), "--data_dir",
                 str(tmp_path / "imagenet"), "--runs", "1", "--epochs", "1", "--baseline", "false",
                 "--archs", "ConvNetD5", "--output", str(report)]) == 0
    settings = json.loads(report.read_text())["settings"]
    assert settings["dataset"] == "ImageNetSubset-imagewoof"
    unknown = tmp_path / "unknown.safetensors"
    dataclasses.replace(synthetic, dataset="ImageNetSubset-imagecat").save(unknown)
    assert main(["evaluate", "--distilled", str(unknown), "--data_dir", str(tmp_path / "imagenet")]) == 2
