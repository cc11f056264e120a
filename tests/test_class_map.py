"""LD3M's class mapping: every data class starts from *its own* class of the generator.

An ImageNet-1k generator (a DiT folder written by the test, 1000 classes + the null row) and data
classes named by wnid: ImageNette's class 0 (n01440764, tench) is ImageNet label 0, its class 1
(n02102040, English springer) label 217. Data whose classes the generator does not know is
refused unless ``--model.class_map`` says which label each class starts from.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ld3m.datamodules.imagenet import IMAGENET_SUBSETS, imagenet_wnids
from PIL import Image
from test_dit_generator import write_dit_folder

from ld3m.classes import generator_labels
from ld3m.cli import main
from ld3m.generator import LatentGenerator
from ld3m.synthetic import SyntheticSet

TENCH, SPRINGER, CASSETTE = "n01440764", "n02102040", "n02979186"  # ImageNette's first three


def test_imagenet_wnids_map_to_their_imagenet_labels() -> None:
    labels, how = generator_labels([TENCH, SPRINGER, CASSETTE], 1000)
    assert labels[:2] == [0, 217] and labels[2] == imagenet_wnids().index(CASSETTE)
    assert how == "imagenet-1k"
    # the subsets' data classes are their published ImageNet classes, in order
    wnids = imagenet_wnids()
    for indices in IMAGENET_SUBSETS.values():
        assert generator_labels([wnids[i] for i in indices], 1000)[0] == list(indices)


def test_id2label_wnids_win_over_the_standard_index() -> None:
    id2label = {0: "n02979186", 1: "n01440764, tench", 2: "n02102040"}
    assert generator_labels([TENCH, SPRINGER], 3, id2label) == ([1, 2], "id2label")
    with pytest.raises(ValueError, match="does not know the data's classes n09999999"):
        generator_labels([TENCH, "n09999999"], 3, id2label)
    # plain names in id2label (the public DiT folders): the ImageNet-1k index
    names = {i: f"class {i}" for i in range(1000)}
    assert generator_labels([SPRINGER], 1000, names) == ([217], "imagenet-1k")


def test_identity_explicit_and_refused() -> None:
    assert generator_labels(["ant", "bee"], 2) == ([0, 1], "identity")
    assert generator_labels([TENCH, SPRINGER], 2) == ([0, 1], "identity")  # a prior of the data
    with pytest.raises(ValueError, match="has 1000 classes and the data 2 .*--model.class_map"):
        generator_labels(["ant", "bee"], 1000)
    with pytest.raises(ValueError, match="does not know the data's classes n09999999"):
        generator_labels(["n09999999"], 1000)
    assert generator_labels(["ant", "bee"], 1000, class_map=[7, 3]) == ([7, 3], "explicit")
    with pytest.raises(ValueError, match="gives 1 generator labels but the data has 2"):
        generator_labels(["ant", "bee"], 1000, class_map=[7])
    with pytest.raises(ValueError, match=r"labels \[1000\] are outside"):
        generator_labels(["ant", "bee"], 1000, class_map=[7, 1000])


def _write_folder(root: Path, names: list[str]) -> None:
    g = torch.Generator().manual_seed(0)
    for split, count in (("train", 2), ("val", 1)):
        for c, name in enumerate(names):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = (torch.randint(0, 40, (10, 10, 3), generator=g) + 60 * c).clamp(0, 255)
                Image.fromarray(pixels.to(torch.uint8).numpy()).save(root / split / name / f"{i}.png")


def _fit(dit: Path, data: Path, root: Path, *extra: str) -> int:
    return main(["fit", "--model", "LD3M", "--model.generator", str(dit), "--model.ipc", "1",
                 "--model.steps", "1", "--model.network", "ConvNetW32", "--model.dsa", "none",
                 "--model.lr_latent", "1e-12", "--model.lr_embedding", "1e-12", *extra,
                 "--data", "ImageFolder", "--data.data_dir", str(data), "--data.image_size", "8",
                 "--data.batch_per_class", "2", "--trainer.max_steps", "1",
                 "--trainer.default_root_dir", str(root), "--evaluation.at_end", "false",
                 "--trainer.enable_progress_bar", "false"])


@pytest.fixture(scope="module")
def dit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dit_folder(tmp_path_factory.mktemp("dit") / "DiT-1k")


def test_ld3m_fit_starts_each_wnid_class_from_its_imagenet_row(dit: Path, tmp_path: Path) -> None:
    data = tmp_path / "images"
    _write_folder(data, [TENCH, SPRINGER])
    assert _fit(dit, data, tmp_path / "run") == 0
    (path,) = (tmp_path / "run").rglob("synthetic.safetensors")
    synthetic = SyntheticSet.load(path)
    assert synthetic.meta["ld3m"]["generator_labels"] == [0, 217]
    table = LatentGenerator.from_pretrained(dit).class_embedding([0, 217])
    # one step at lr 1e-12: the embeddings are still the rows they started from
    torch.testing.assert_close(synthetic.extra["embeddings"], table, rtol=0, atol=1e-6)
    assert not torch.allclose(table[0], table[1])
    assert main(["evaluate", "--distilled", str(path), "--data_dir", str(data), "--archs",
                 "ConvNetW32", "--runs", "1", "--epochs", "1", "--dsa", "none",
                 "--baseline", "false"]) == 0


def test_unknown_classes_are_refused_unless_mapped(dit: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "images"
    _write_folder(data, ["ant", "bee"])
    assert _fit(dit, data, tmp_path / "refused") == 2
    err = capsys.readouterr().err
    assert "error:" in err and "pass --model.class_map" in err
    assert _fit(dit, data, tmp_path / "mapped", "--model.class_map", "[5, 6]") == 0
    (path,) = (tmp_path / "mapped").rglob("synthetic.safetensors")
    synthetic = SyntheticSet.load(path)
    assert synthetic.meta["ld3m"]["generator_labels"] == [5, 6]
    table = LatentGenerator.from_pretrained(dit).class_embedding([5, 6])
    torch.testing.assert_close(synthetic.extra["embeddings"], table, rtol=0, atol=1e-6)
