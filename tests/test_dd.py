"""Tests for DD (learned images and per-step learning rates, unrolled training)."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import cpu_trainer
from ld3m.datamodules import FashionMNIST
from ld3m.datamodules.real import _Split
from ld3m.modules import DD
from ld3m.modules.dd import inverse_softplus
from torch.utils.data import DataLoader

from ld3m.cli import main
from ld3m.evaluation import UnrolledClassifier, evaluate, train_and_test_dd
from ld3m.networks import get_network, reset_parameters
from ld3m.synthetic import SyntheticSet
from ld3m.unrolled import INIT_MODES, default_steps, step_batches, unroll

SMALL_NET = "ConvNetW32"
TINY = (3, 16, 16)
TEST_IMAGES = 2000


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(**kwargs) -> DD:
    args = {"ipc": 2, "network": SMALL_NET, "num_classes": 3, "image_shape": TINY, "steps": 2,
            "epochs": 2}
    return DD(**{**args, **kwargs})




def _small_test_split(data: FashionMNIST) -> FashionMNIST:
    test = data._test_split()
    data._test = _Split(test.labels[:TEST_IMAGES], test.cached[:TEST_IMAGES], None)
    return data


# ------------------------------------------------------------------------------ the split
@pytest.mark.parametrize("ipc, steps", [(1, 1), (2, 2), (5, 5), (7, 7), (10, 10), (12, 6),
                                        (13, 1), (20, 10), (50, 10)])
def test_default_steps_is_the_largest_divisor_up_to_ten(ipc: int, steps: int) -> None:
    assert default_steps(ipc) == steps
    assert DD(ipc=ipc).steps == steps


def test_step_batches_take_the_same_slot_of_every_class() -> None:
    k, ipc, steps = 3, 4, 2
    # image i is filled with the value i, so the contents name the images
    images = torch.arange(k * ipc, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 2, 2)
    batches = step_batches(images, k, steps)
    assert len(batches) == steps
    values = [x[:, 0, 0, 0].tolist() for x, _ in batches]
    assert values == [[0, 1, 4, 5, 8, 9], [2, 3, 6, 7, 10, 11]]
    for _, y in batches:
        assert y.tolist() == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="divide"):
        step_batches(images, k, 3)
    with pytest.raises(ValueError, match="classes"):
        step_batches(images[:-1], k, 2)


# ------------------------------------------------------------------------------ arguments
@pytest.mark.parametrize("kwargs, match", [
    ({"ipc": 10, "steps": 3}, "divisor"),
    ({"ipc": 10, "steps": 0}, "divisor"),
    ({"epochs": 0}, "epochs"),
    ({"lr_init": 0.0}, "lr_init"),
    ({"lr_init": float("nan")}, "lr_init"),
    ({"init_mode": "pretrained"}, "init_mode"),
    ({"betas": (1.0, 0.9)}, "betas"),
    ({"decay_every": -1}, "decay_every"),
    ({"pretrained_nets": 0}, "pretrained_nets"),
    ({"network": "LeNet7"}, "unknown network"),
    ({"ipc": 0}, "ipc"),
])
def test_bad_arguments_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DD(**kwargs)


def test_learning_rates_start_at_lr_init_through_softplus() -> None:
    for y in (1e-3, 0.02, 1.0, 5.0):
        assert F.softplus(torch.tensor(inverse_softplus(y))).item() == pytest.approx(y, rel=1e-5)
    model = _tiny(lr_init=0.02, steps=2, epochs=3)
    assert model.lrs.shape == (3, 2)
    assert torch.allclose(model.lrs, torch.full((3, 2), 0.02))
    assert model.hparams["steps"] == 2


# ------------------------------------------------------------------------------ gradients
def _real(k: int = 3, n: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k * n, *TINY, generator=g), torch.arange(k).repeat_interleave(n)


def test_gradients_reach_the_images_and_every_learning_rate() -> None:
    model = _tiny(init="noise")
    real, labels = _real()
    loss = model.unrolled_loss(real, labels, step=0)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.images.grad is not None and torch.isfinite(model.images.grad).all()
    # every image is used by some step, so every image gets a gradient
    per_image = model.images.grad.flatten(1).abs().sum(1)
    assert (per_image > 0).all()
    assert model.raw_lrs.grad is not None and torch.isfinite(model.raw_lrs.grad).all()
    assert (model.raw_lrs.grad != 0).all(), model.raw_lrs.grad


@pytest.mark.parametrize("network", [SMALL_NET, "ConvNetBN"])
def test_outer_gradients_match_finite_differences(network: str) -> None:
    """float64 central differences of the unrolled loss w.r.t. two lrs and one pixel.

    (The loss has ReLU kinks: with BatchNorm over 3 images a step of 1e-5 already crosses some,
    so the difference step is 1e-6.)"""
    model = _tiny(init="noise", steps=1, epochs=2, ipc=1, network=network).double()
    real, labels = _real()
    real = real.double()
    model.unrolled_loss(real, labels, step=0).backward()
    eps = 1e-6

    def loss() -> float:
        return model.unrolled_loss(real, labels, step=0).item()

    for tensor, index in ((model.raw_lrs, (0,)), (model.raw_lrs, (1,)), (model.images, (1, 0, 5, 7))):
        analytic = tensor.grad[index].item()
        with torch.no_grad():
            tensor[index] += eps
            up = loss()
            tensor[index] -= 2 * eps
            down = loss()
            tensor[index] += eps
        assert analytic == pytest.approx((up - down) / (2 * eps), rel=1e-3, abs=1e-8), index


def test_unrolled_loss_falls(fmnist: FashionMNIST) -> None:
    """Adam on images and learning rates (fixed init, one real batch): the real loss drops."""
    model = DD(ipc=1, init="noise", network=SMALL_NET, init_mode="fixed", num_classes=10,
               image_shape=(1, 28, 28))
    net = reset_parameters(model.build_network(SMALL_NET), torch.Generator().manual_seed(3))
    model._scratch["initial"] = [{n: p.detach().clone() for n, p in net.named_parameters()}]
    real = fmnist.sample_per_class(16, torch.Generator().manual_seed(0)).flatten(0, 1)
    labels = torch.arange(10).repeat_interleave(16)
    optimizer = torch.optim.Adam([model.images, model.raw_lrs], lr=0.01, betas=(0.5, 0.999))
    losses = []
    for _ in range(15):
        loss = model.unrolled_loss(real, labels, step=0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    assert sum(b < a for a, b in zip(losses, losses[1:], strict=False)) >= 12, losses
    assert not torch.allclose(model.lrs, torch.full_like(model.lrs, 0.02)), "the lrs did not move"


def test_random_mode_draws_the_same_weights_for_a_step_and_new_ones_for_the_next() -> None:
    model = _tiny()
    a, b, c = (model.initial_parameters(s) for s in (0, 0, 1))
    for name in a:
        assert torch.equal(a[name], b[name])
    assert any(not torch.equal(a[n], c[n]) for n in a)


def test_sampled_networks_are_initialised_as_dds() -> None:
    """DD's init (ssnl/dataset-distillation, --init xavier --init_param 1): conv and linear
    weights xavier_normal with gain 1 (std sqrt(2 / (fan_in + fan_out))), biases 0; LeNet is
    the default network, and the DD protocol's fresh networks are drawn the same way."""
    assert DD().network == "LeNet"
    model = DD(ipc=1, network="LeNet", num_classes=10, image_shape=(1, 28, 28))
    theta = model.initial_parameters(0)
    net = get_network("LeNet", 1, 10, 28)
    for name, module in net.named_modules():
        if isinstance(module, torch.nn.Conv2d | torch.nn.Linear):
            w, b = theta[f"{name}.weight"], theta[f"{name}.bias"]
            fan_in = w[0].numel()
            fan_out = w.shape[0] * w[0, 0].numel() if w.dim() == 4 else w.shape[0]
            assert w.std().item() == pytest.approx(math.sqrt(2 / (fan_in + fan_out)), rel=0.1), name
            assert abs(w.mean().item()) < 4 * w.std().item() / math.sqrt(w.numel()), name
            assert torch.all(b == 0), name
    evaluated = UnrolledClassifier("LeNet", 1, 10, 28, lrs=[0.01], seed=3)
    assert all(torch.all(m.bias == 0) for m in evaluated.net.modules()
               if isinstance(m, torch.nn.Conv2d | torch.nn.Linear))


# ------------------------------------------------------------------------------ the protocol
def test_protocol_replays_the_unrolled_training_exactly() -> None:
    """The Lightning evaluation (UnrolledClassifier) ends at the weights the unroll computes."""
    k, ipc, steps, epochs = 3, 2, 2, 2
    g = torch.Generator().manual_seed(0)
    images = torch.randn(k * ipc, *TINY, generator=g)
    lrs = torch.tensor([0.05, 0.02, 0.03, 0.01])
    net = reset_parameters(get_network(SMALL_NET, 3, k, 16), torch.Generator().manual_seed(5))
    theta0 = {n: p.detach().clone() for n, p in net.named_parameters()}
    batches = step_batches(images, k, steps)
    expected = unroll(net, {n: t.clone().requires_grad_() for n, t in theta0.items()}, batches,
                      lrs, create_graph=False)
    model = UnrolledClassifier(SMALL_NET, 3, k, 16, lrs=lrs.tolist(), initial=theta0)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(model, train_dataloaders=DataLoader(batches, batch_size=None))
    assert trainer.global_step == steps * epochs
    for name, param in model.net.named_parameters():
        assert torch.allclose(param, expected[name], atol=1e-5), name


def test_protocol_rejects_weights_of_another_network() -> None:
    other = get_network("ConvNetD1", 3, 3, 16)
    with pytest.raises(ValueError, match="do not fit"):
        UnrolledClassifier(SMALL_NET, 3, 3, 16, lrs=[0.01],
                           initial={n: p.detach() for n, p in other.named_parameters()})


def _fit_dd(data: FashionMNIST, root: Path, steps: int = 2, **kwargs) -> DD:
    model = DD(**{"ipc": 1, "network": SMALL_NET, **kwargs})
    cpu_trainer(root, steps).fit(model, datamodule=data)
    return model


def test_fixed_init_set_round_trips_and_evaluates_deterministically(data_dir: Path, tmp_path: Path) -> None:
    data = _small_test_split(FashionMNIST(data_dir=str(data_dir), batch_per_class=4))
    model = _fit_dd(data, tmp_path, init_mode="fixed")
    synthetic = model.synthetic_set()
    assert synthetic.lr.shape == (3, 1)
    assert synthetic.meta["dd"] == {"network": SMALL_NET, "steps": 1, "epochs": 3, "init_mode": "fixed"}
    theta0 = model._scratch["initial"][0]
    assert {f"theta0.{n}" for n in theta0} == set(synthetic.extra)
    loaded = SyntheticSet.load(synthetic.save(tmp_path / "dd.safetensors"))
    assert torch.equal(loaded.lr, synthetic.lr)
    for name, tensor in theta0.items():
        assert torch.equal(loaded.extra[f"theta0.{name}"], tensor)
    # the same theta_0 every run: the runs agree exactly
    report = evaluate(loaded, data, runs=2, baseline=False, accelerator="cpu")
    assert report.settings["protocol"] == "dd"
    accs = report.get("DD (IPC 1)", SMALL_NET).accuracies
    assert accs[0] == accs[1]
    with pytest.raises(ValueError, match="protocol must be"):
        evaluate(loaded, data, protocol="unrolled")


def test_dd_protocol_needs_dd_settings(fmnist: FashionMNIST) -> None:
    from ld3m.evaluation import random_real_set
    plain = random_real_set(fmnist, 1)
    with pytest.raises(ValueError, match="no DD learning rates"):
        evaluate(plain, fmnist, protocol="dd", runs=1)
    model = _tiny(init_mode="fixed")  # never fitted: no theta_0 to store
    synthetic = model.synthetic_set()
    with pytest.raises(ValueError, match="stores no initial weights"):
        train_and_test_dd(synthetic, fmnist)


def test_pretrained_pool_is_saved_reused_and_checked(data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    data = FashionMNIST(data_dir=str(data_dir), batch_per_class=4)
    pool_file = tmp_path / "pool.pt"
    settings = {"init_mode": "random_pretrained", "pretrained_nets": 2, "pretrain_steps": 15,
                "pretrained_path": str(pool_file)}
    first = _fit_dd(data, tmp_path / "a", steps=1, **settings)
    assert pool_file.is_file()
    pool = first._scratch["initial"]
    assert len(pool) == 2
    # pre-training helped: the pool networks beat a random network on real images
    real = data.sample_per_class(20, torch.Generator().manual_seed(9)).flatten(0, 1)
    labels = torch.arange(10).repeat_interleave(20)
    net = get_network(SMALL_NET, 1, 10, 28)
    random_loss = F.cross_entropy(net(real), labels).item()
    net.load_state_dict(pool[0], strict=False)
    assert F.cross_entropy(net(real), labels).item() < random_loss
    # a second run reuses the file instead of training again
    monkeypatch.setattr(DD, "pretrain_pool", lambda self: pytest.fail("the pool was trained again"))
    second = _fit_dd(data, tmp_path / "b", steps=1, **settings)
    for a, b in zip(pool, second._scratch["initial"], strict=True):
        assert all(torch.equal(a[n], b[n]) for n in a)
    # the exported set carries the pool; fixed_pretrained carries its first network only
    assert {k.split(".")[1] for k in second.synthetic_set().extra} == {"0", "1"}
    fixed = _fit_dd(data, tmp_path / "c", steps=1, **{**settings, "init_mode": "fixed_pretrained"})
    assert all(k.startswith("theta0.") for k in fixed.synthetic_set().extra)
    # other settings, or a corrupt file: a clear error, and the file is left alone
    before = pool_file.read_bytes()
    with pytest.raises(ValueError, match="pre-trained with"):
        _fit_dd(data, tmp_path / "d", steps=1, **{**settings, "pretrain_steps": 5})
    assert pool_file.read_bytes() == before
    pool_file.write_bytes(b"not a pool")
    with pytest.raises(ValueError, match="not a readable DD pre-trained pool"):
        _fit_dd(data, tmp_path / "e", steps=1, **settings)


def test_checkpoint_keeps_the_initial_weights(data_dir: Path, tmp_path: Path) -> None:
    data = FashionMNIST(data_dir=str(data_dir), batch_per_class=4)
    model = _fit_dd(data, tmp_path, init_mode="fixed")
    checkpoint: dict = {}
    model.on_save_checkpoint(checkpoint)
    restored = DD(ipc=1, network=SMALL_NET, init_mode="fixed")
    restored.on_load_checkpoint(checkpoint)
    a, b = model._scratch["initial"][0], restored._scratch["initial"][0]
    assert all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("mode", INIT_MODES)
def test_every_init_mode_trains(data_dir: Path, tmp_path: Path, mode: str) -> None:
    data = FashionMNIST(data_dir=str(data_dir), batch_per_class=4)
    model = DD(ipc=1, network=SMALL_NET, init_mode=mode, pretrained_nets=2, pretrain_steps=2)
    start = model.raw_lrs.detach().clone()
    cpu_trainer(tmp_path, 2).fit(model, datamodule=data)
    assert not torch.equal(model.raw_lrs.detach(), start)
    assert torch.isfinite(model.images).all()


def test_cli_fits_dd(data_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "run"
    assert main(["fit", "--model", "DD", "--model.ipc", "2", "--model.network", SMALL_NET,
                 "--data.batch_per_class", "4", "--trainer.max_steps", "2",
                 "--trainer.default_root_dir", str(root), "--evaluation.at_end", "false",
                 "--trainer.enable_progress_bar", "false"]) == 0
    synthetic = SyntheticSet.load(root / "synthetic.safetensors")
    assert (synthetic.method, synthetic.ipc) == ("DD", 2)
    assert synthetic.lr.shape == (3, 2) and (synthetic.lr > 0).all()
    assert synthetic.meta["dd"]["steps"] == 2


# ------------------------------------------------------------------------------ recipes
CONFIG_DIR = Path(__file__).parent.parent / "ld3m" / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("dd_*_ipc*.yaml"))


def test_every_dd_recipe_exists_and_follows_the_paper() -> None:
    assert len(CONFIGS) == 12
    for path in CONFIGS:
        recipe = yaml.safe_load(path.read_text())
        _, data, ipc = path.stem.split("_")
        model = recipe["model"]["init_args"]
        assert recipe["model"]["class_path"] == "ld3m.modules.DD"
        assert model["ipc"] == int(ipc.removeprefix("ipc"))
        assert model["epochs"] == 3 and model["lr_img"] == 0.01 and model["betas"] == [0.5, 0.999]
        assert model["lr_init"] == (0.001 if data.startswith("cifar") else 0.02)
        per_class = recipe["data"]["init_args"]["batch_per_class"]
        classes = 100 if data == "cifar100" else 10
        assert 1000 <= per_class * classes <= 1024  # DD's real batch of 1024
        assert recipe["trainer"]["max_steps"] == 10 * model["decay_every"]  # 400 vs 40 epochs


# ------------------------------------------------------------------------------ it works
@pytest.mark.slow
def test_short_dd_run_beats_noise(data_dir: Path) -> None:
    data = _small_test_split(FashionMNIST(data_dir=str(data_dir), batch_per_class=32))
    model = DD(ipc=1, init="noise", network="LeNet", seed=0)
    noise = DD(ipc=1, init="noise", network="LeNet", seed=0, num_classes=10,
               image_shape=(1, 28, 28))
    trainer = L.Trainer(max_steps=150, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, data)
    noise.mean, noise.std, noise.dataset_name = model.mean, model.std, model.dataset_name
    report = evaluate(model.synthetic_set(), data, runs=2, baseline=False, accelerator="cpu")
    start = evaluate(noise.synthetic_set(), data, runs=2, baseline=False, accelerator="cpu")
    dd_acc = report.get("DD (IPC 1)", "LeNet").mean
    noise_acc = start.get("DD (IPC 1)", "LeNet").mean
    assert dd_acc > noise_acc + 0.1, (dd_acc, noise_acc)
    assert not math.isnan(dd_acc)
