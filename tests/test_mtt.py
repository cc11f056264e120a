"""Tests for MTT: the parameter-matching loss and its two gradient modes."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from ld3m.modules import MTT
from ld3m.modules.mtt import _free_memory

from ld3m.testing import write_stand_in_buffer

NET = "ConvNetW32"
TINY = (3, 16, 16)


pytestmark = pytest.mark.usefixtures("one_thread")


def write_buffer(folder: Path, experts: int = 2, epochs: int = 4, network: str = NET,
                 shape=TINY, classes: int = 3, dataset: str = "Tiny", zca: dict | None = None) -> Path:
    """Stand-in experts (``ld3m.testing``), with this file's defaults."""
    return write_stand_in_buffer(folder, experts=experts, epochs=epochs, network=network,
                                 shape=shape, classes=classes, dataset=dataset, zca=zca)


def _model(buffer: Path, **kwargs) -> MTT:
    args = {"ipc": 2, "syn_steps": 3, "expert_epochs": 2, "max_start_epoch": 2,
            "num_classes": 3, "image_shape": TINY, "init": "noise"}
    return MTT(str(buffer), **{**args, **kwargs})


@pytest.mark.parametrize("gradient", ["unroll", "recompute"])
def test_loss_is_exactly_one_when_the_student_does_not_move(tmp_path: Path, gradient: str) -> None:
    model = _model(write_buffer(tmp_path), gradient=gradient)
    with torch.no_grad():
        model.syn_lr.zero_()
    start, target = model.draw_expert(torch.Generator().manual_seed(0))
    loss = model.matching_loss(start, target, torch.Generator().manual_seed(1))
    assert loss.item() == 1.0


def _gradients(model: MTT, gradient: str, seed: int = 3, autocast: bool = False):
    model.images.grad = None
    model.syn_lr.grad = None
    start, target = model.draw_expert(torch.Generator().manual_seed(seed))
    # (as in Lightning's bf16-mixed: autocast around the forward, not around the backward)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model.matching_loss(start, target, torch.Generator().manual_seed(seed + 1),
                                   gradient=gradient)
    loss.backward()
    return loss.detach(), model.images.grad.clone(), model.syn_lr.grad.clone()


@pytest.mark.parametrize("dsa", ["none", "color_crop_cutout_flip_scale_rotate"])
@pytest.mark.parametrize("batch_syn", [None, 4])
def test_recompute_gives_the_unrolled_gradient(tmp_path: Path, dsa: str, batch_syn) -> None:
    model = _model(write_buffer(tmp_path), dsa=dsa, batch_syn=batch_syn, syn_steps=4)
    with torch.no_grad():
        model.syn_lr.fill_(0.05)  # large enough that the second-order terms matter
    loss_u, images_u, lr_u = _gradients(model, "unroll")
    loss_r, images_r, lr_r = _gradients(model, "recompute")
    assert torch.allclose(loss_u, loss_r, rtol=1e-5)
    assert images_u.abs().sum() > 0 and lr_u.abs() > 0
    # float32 round-off differs between the two orders of summation: compare relative norms
    relative = ((images_r - images_u).norm() / images_u.norm()).item()
    assert relative < 1e-4, relative
    assert torch.allclose(lr_r, lr_u, rtol=1e-4)


def test_student_autocast_is_close_to_float32(tmp_path: Path) -> None:
    """bf16 autocast reaches the student only when asked, and stays close to float32."""
    grads = {}
    for name, student_autocast in (("fp32", False), ("off", False), ("bf16", True)):
        model = _model(write_buffer(tmp_path), syn_steps=3, student_autocast=student_autocast)
        grads[name] = _gradients(model, "unroll", autocast=name != "fp32")
    assert torch.equal(grads["off"][1], grads["fp32"][1])  # autocast kept away from the student
    assert not torch.equal(grads["bf16"][1], grads["fp32"][1])
    cosine = torch.nn.functional.cosine_similarity(grads["bf16"][1].flatten(),
                                                   grads["fp32"][1].flatten(), dim=0)
    assert cosine > 0.99, cosine
    assert grads["bf16"][2].item() == pytest.approx(grads["fp32"][2].item(), rel=0.05)
    # the recompute sweep replays the forward's precision (bf16 rounding differs between the
    # two orders of evaluation, so: close, not equal)
    model = _model(write_buffer(tmp_path), syn_steps=3, student_autocast=True)
    recomputed = _gradients(model, "recompute", autocast=True)[1]
    cosine = torch.nn.functional.cosine_similarity(recomputed.flatten(), grads["bf16"][1].flatten(), dim=0)
    assert cosine > 0.99, cosine


def test_first_order_sweep_would_differ(tmp_path: Path) -> None:
    """The recompute sweep's Hessian term matters: dropping it changes the gradient (so the
    equality above is not vacuous)."""
    model = _model(write_buffer(tmp_path), dsa="none", syn_steps=4)
    with torch.no_grad():
        model.syn_lr.fill_(0.05)
    _, images_u, _ = _gradients(model, "unroll")
    # first order: every step's gradient taken at the detached parameters of the *start*
    start, target = model.draw_expert(torch.Generator().manual_seed(3))
    batches = model.plan(torch.Generator().manual_seed(4))
    labels = model.labels
    student = model.student()
    theta = start.clone()
    model.images.grad = None
    total = 0
    for index, _ in batches:
        leaf = theta.detach().requires_grad_()
        loss = torch.nn.functional.cross_entropy(student(leaf, model.images[index]), labels[index])
        g = torch.autograd.grad(loss, leaf, create_graph=True)[0]
        total = total + g
        theta = theta - model.syn_lr.detach() * g.detach()
    final = start - model.syn_lr * total
    (((final - target) ** 2).sum() / ((start - target) ** 2).sum()).backward()
    relative = ((model.images.grad - images_u).norm() / images_u.norm()).item()
    assert relative > 1e-3, relative


def test_auto_mode_follows_the_memory_estimate(tmp_path: Path, monkeypatch) -> None:
    model = _model(write_buffer(tmp_path))
    need = model.estimate_unroll_bytes()
    assert need > 0
    more = _model(write_buffer(tmp_path), syn_steps=6)
    assert more.estimate_unroll_bytes() == pytest.approx(2 * need)
    monkeypatch.setattr("ld3m.modules.mtt._free_memory", lambda device: 100 * need)
    assert model.resolved_gradient() == "unroll"
    monkeypatch.setattr("ld3m.modules.mtt._free_memory", lambda device: need)
    assert _model(write_buffer(tmp_path)).resolved_gradient() == "recompute"
    assert _free_memory(torch.device("cpu")) > 0


@pytest.mark.parametrize("kwargs, match", [
    ({"syn_steps": 0}, "syn_steps"),
    ({"max_start_epoch": 0}, "max_start_epoch"),
    ({"min_start_epoch": 3, "max_start_epoch": 2}, "min_start_epoch"),
    ({"lr_lr": 0.0}, "lr_lr"),
    ({"batch_syn": 0}, "batch_syn"),
    ({"gradient": "tesla"}, "gradient"),
])
def test_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _model(tmp_path, **kwargs)


def test_missing_buffer_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="ld3m buffer"):
        _model(tmp_path / "nothing").buffer  # noqa: B018


def test_fit_checks_the_buffer_against_the_data(tmp_path: Path, fmnist) -> None:
    wrong = write_buffer(tmp_path / "tiny")  # 3 classes of 3x16x16: not Fashion-MNIST
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="was trained on Tiny"):
        trainer.fit(MTT(str(wrong), ipc=1), datamodule=fmnist)
    short = write_buffer(tmp_path / "short", epochs=3, shape=(1, 28, 28), classes=10,
                         dataset="FashionMNIST")
    with pytest.raises(ValueError, match="needs experts of at least"):
        trainer.fit(MTT(str(short), ipc=1, max_start_epoch=3, expert_epochs=2), datamodule=fmnist)


def test_a_few_steps_train_images_and_lr(tmp_path: Path, fmnist) -> None:
    buffer = write_buffer(tmp_path / "b", epochs=4, shape=(1, 28, 28), classes=10,
                          dataset="FashionMNIST")
    model = MTT(str(buffer), ipc=1, syn_steps=2, max_start_epoch=2, lr_lr=1e-3, gradient="recompute")
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=fmnist)
    first = fmnist.sample_per_class(1, torch.Generator().manual_seed(0)).flatten(0, 1)
    assert not torch.equal(model.images.detach(), first)
    assert model.syn_lr.item() != 0.01
    synthetic = model.synthetic_set()
    assert synthetic.lr.item() == pytest.approx(model.syn_lr.item())


CONFIG_DIR = Path(__file__).parent.parent / "ld3m" / "configs"


@pytest.mark.parametrize("method", ["mtt", "datm"])
def test_recipes_follow_the_published_cifar10_settings(method: str) -> None:
    import yaml

    expected = {  # syn_steps, max_start_epoch, lr_img, lr_lr by IPC (METHODS.md)
        "mtt": {1: (50, 2, 100, 1e-7), 10: (30, 20, 100, 1e-5), 50: (30, 40, 1000, 1e-5)},
        "datm": {1: (80, 4, 100, 1e-7), 10: (80, 20, 100, 1e-5), 50: (80, 40, 1000, 1e-5)},
    }[method]
    for data in ("cifar10", "fashionmnist"):
        for ipc, values in expected.items():
            recipe = yaml.safe_load((CONFIG_DIR / f"{method}_{data}_ipc{ipc}.yaml").read_text())
            args = recipe["model"]["init_args"]
            assert recipe["model"]["class_path"] == f"ld3m.modules.{method.upper()}"
            assert (args["syn_steps"], args["max_start_epoch"], args["lr_img"], args["lr_lr"]) == values
            assert recipe["trainer"]["max_steps"] == (5000 if method == "mtt" else 10000)


def test_recipe_parses_through_the_cli(capsys) -> None:
    from ld3m.cli import main

    assert main(["fit", "--config", str(CONFIG_DIR / "datm_cifar10_ipc10.yaml"), "--print_config"]) == 0
    out = capsys.readouterr().out
    assert "class_path: ld3m.modules.DATM" in out and "current_max_start_epoch: 10" in out


# ---------------------------------------------------------------------------- the authors' sampling
def test_minibatches_are_chunks_of_one_permutation_remainder_first(tmp_path: Path) -> None:
    """distill.py: ``torch.split(randperm(n), batch_syn)`` and ``pop()`` from the end, a new
    permutation when the chunks are used up: every image once per pass."""
    model = _model(write_buffer(tmp_path), ipc=10, num_classes=10, batch_syn=30, syn_steps=8,
                   dsa="none")
    batches = model.plan(torch.Generator().manual_seed(0))
    sizes = [len(index) for index, _ in batches]
    assert sizes == [10, 30, 30, 30, 10, 30, 30, 30]  # 100 = 3 x 30 + 10: the remainder first
    for first in (0, 4):  # each pass of 4 steps sees all 100 images, once
        seen = torch.cat([batches[k][0] for k in range(first, first + 4)])
        assert sorted(seen.tolist()) == list(range(100))
    assert not torch.equal(torch.cat([b[0] for b in batches[:4]]), torch.cat([b[0] for b in batches[4:]]))
    # all images per step (the default): the whole set in every step
    full = _model(write_buffer(tmp_path), ipc=10, num_classes=10, syn_steps=2, dsa="none")
    assert all(torch.equal(i, torch.arange(100)) for i, _ in full.plan(torch.Generator()))


def test_dsa_draws_follow_the_chunk_sizes(tmp_path: Path) -> None:
    model = _model(write_buffer(tmp_path), ipc=5, num_classes=3, batch_syn=4, syn_steps=3)
    for index, params in model.plan(torch.Generator().manual_seed(1)):
        assert params is not None and params.n == len(index)


def test_experts_are_walked_in_shuffled_passes(tmp_path: Path) -> None:
    model = _model(write_buffer(tmp_path, experts=4))
    walk = [model.expert_index(step) for step in range(12)]
    for first in (0, 4, 8):  # every expert once per pass
        assert sorted(walk[first:first + 4]) == [0, 1, 2, 3]
    assert len({tuple(walk[k:k + 4]) for k in (0, 4, 8)}) > 1  # a new order per pass
    # under DDP the ranks of a step take consecutive places of the same walk
    for step in range(6):
        assert [model.expert_index(step, rank, 2) for rank in (0, 1)] == walk[2 * step:2 * step + 2]
    # draw_expert follows the walk (the step's expert's rows), whatever the generator
    start, _ = model.draw_expert(torch.Generator().manual_seed(5), step=3)
    rows = torch.stack([model.buffer.rows(walk[3], [e])[0] for e in range(model.buffer.epochs + 1)])
    assert (rows == start).all(1).any()


def test_random_experts_draw_with_replacement(tmp_path: Path) -> None:
    model = _model(write_buffer(tmp_path, experts=3), experts="random")
    picks = set()
    for seed in range(20):
        start, _ = model.draw_expert(torch.Generator().manual_seed(seed), step=0)
        picks.add(next(i for i in range(3) if any(
            torch.equal(start, model.buffer.rows(i, [e])[0]) for e in range(5))))
    assert len(picks) > 1  # at step 0 the shuffled walk would always give the same expert
    with pytest.raises(ValueError, match="experts must be one of"):
        _model(write_buffer(tmp_path), experts="cyclic")


def test_defaults_are_the_authors_argparse(tmp_path: Path, capsys) -> None:
    """distill.py: --expert_epochs 3, --max_start_epoch 25, --lr_img 1000, --syn_steps 20,
    --lr_lr 1e-05, --lr_teacher 0.01, --pix_init real, DSA's full strategy."""
    from ld3m.cli import main

    buffer = write_buffer(tmp_path, shape=(1, 28, 28), classes=10, epochs=30, dataset="FashionMNIST")
    assert main(["fit", "--model", "MTT", "--model.buffer", str(buffer), "--print_config"]) == 0
    import yaml

    args = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    assert (args["expert_epochs"], args["max_start_epoch"], args["lr_img"], args["syn_steps"],
            args["lr_lr"], args["lr_teacher"], args["init"], args["experts"]) == (
        3, 25, 1000.0, 20, 1e-5, 0.01, "real", "shuffled")
    assert args["dsa"] == "color_crop_cutout_flip_scale_rotate"
