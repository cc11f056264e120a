"""GSAM (``ld3m.gsam``) and DATM's sharpness-aware experts (``ld3m buffer --optimizer gsam``)."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import pytest
import torch
from ld3m.datamodules import MNIST
from test_data import _write_tiny_mnist
from torch import nn

from ld3m.cli import main
from ld3m.experts import PARTIAL, Expert, train_experts
from ld3m.gsam import GSAM
from ld3m.trajectories import TrajectoryBuffer, shard_name

QUIET = {"accelerator": "cpu", "enable_progress_bar": False}


# ----------------------------------------------------------------------------- the optimiser
def _tiny_problem(norm: bool = False):
    g = torch.Generator().manual_seed(0)
    layers = [nn.Linear(5, 6)] + ([nn.BatchNorm1d(6)] if norm else []) + [nn.Tanh(), nn.Linear(6, 3)]
    net = nn.Sequential(*layers).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(7, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (7,), generator=g)
    return net, x, y


def _gsam_step(net: nn.Module, x, y, lr: float, **kwargs) -> torch.Tensor:
    optimizer = GSAM(torch.optim.SGD(net.parameters(), lr=lr), model=net, **kwargs)

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        return loss.detach()

    return optimizer.step(closure)


def _reference(net: nn.Module, x, y, lr: float, rho: float, alpha: float, adaptive: bool):
    """The GSAM update from the paper's equations (ASAM's T = |w| when adaptive), on flat
    vectors: e = rho T^2 g / ||T g||, g_p = grad at w + e, g_par = projection of g on g_p,
    w <- w - lr (g_p - alpha (g - g_par))."""
    params = list(net.parameters())
    sizes = [p.numel() for p in params]

    def flat_grad(weights: torch.Tensor) -> torch.Tensor:
        trial = copy.deepcopy(net)
        torch.nn.utils.vector_to_parameters(weights, trial.parameters())
        loss = nn.functional.cross_entropy(trial(x), y)
        return torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, list(trial.parameters()))])

    w = torch.cat([p.detach().reshape(-1) for p in params])
    g = flat_grad(w)
    t = w.abs() if adaptive else torch.ones_like(w)
    e = rho * t**2 * g / torch.linalg.vector_norm(t * g)
    g_p = flat_grad(w + e)
    g_parallel = (g @ g_p) / (g_p @ g_p) * g_p
    new = w - lr * (g_p - alpha * (g - g_parallel))
    assert sum(sizes) == new.numel()
    return new


@pytest.mark.parametrize("adaptive", [True, False])
def test_one_step_equals_the_equations(adaptive: bool) -> None:
    net, x, y = _tiny_problem()
    lr, rho, alpha = 0.1, 0.5, 0.3
    expected = _reference(net, x, y, lr, rho, alpha, adaptive)
    loss = _gsam_step(net, x, y, lr, rho=rho, alpha=alpha, adaptive=adaptive)
    got = torch.nn.utils.parameters_to_vector(net.parameters()).detach()
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11)
    # the loss returned is the one at the unperturbed weights
    start, x0, y0 = _tiny_problem()
    assert loss.item() == pytest.approx(nn.functional.cross_entropy(start(x0), y0).item(), rel=1e-12)
    # alpha matters: without the decomposition the step is another one (SAM's)
    sam = _reference(start, x0, y0, lr, rho, 0.0, adaptive)
    assert (sam - expected).abs().max() > 1e-4


def test_rho_zero_is_a_plain_sgd_step() -> None:
    net, x, y = _tiny_problem()
    sgd_net = copy.deepcopy(net)
    _gsam_step(net, x, y, 0.1, rho=0.0, alpha=0.3)
    sgd = torch.optim.SGD(sgd_net.parameters(), lr=0.1)
    nn.functional.cross_entropy(sgd_net(x), y).backward()
    sgd.step()
    got, expected = (torch.nn.utils.parameters_to_vector(n.parameters()).detach() for n in (net, sgd_net))
    start = torch.nn.utils.parameters_to_vector(_tiny_problem()[0].parameters()).detach()
    assert (got - start).abs().max() > 1e-3, "the step did not move the weights"
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    # and a small rho is close to it, a large one is not
    near, far = _tiny_problem()[0], _tiny_problem()[0]
    _gsam_step(near, x, y, 0.1, rho=1e-7, alpha=0.3)
    _gsam_step(far, x, y, 0.1, rho=0.5, alpha=0.3)
    near_v, far_v = (torch.nn.utils.parameters_to_vector(n.parameters()).detach() for n in (near, far))
    assert (near_v - expected).abs().max() < 1e-6 < (far_v - expected).abs().max()


def test_batch_norm_statistics_come_from_the_unperturbed_pass() -> None:
    net, x, y = _tiny_problem(norm=True)
    once = copy.deepcopy(net)
    once(x)  # one training-mode forward at w
    _gsam_step(net, x, y, 0.1, rho=0.5, alpha=0.3)
    bn, expected = net[1], once[1]
    torch.testing.assert_close(bn.running_mean, expected.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(bn.running_var, expected.running_var, rtol=0, atol=0)
    assert bn.momentum == expected.momentum == 0.1


def test_the_base_state_is_checkpointed() -> None:
    """A GSAM rebuilt from its state_dict continues with the base SGD's momentum."""
    net, x, y = _tiny_problem()

    def make(model):
        return GSAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.5, model=model)

    def step(model, optimizer):
        def closure():
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        optimizer.step(closure)

    straight = make(net)
    step(net, straight)
    resumed_net = copy.deepcopy(net)
    resumed = make(resumed_net)
    resumed.load_state_dict(copy.deepcopy(straight.state_dict()))
    assert "momentum_buffer" in resumed.base_optimizer.state[next(resumed_net.parameters())]
    step(net, straight)
    step(resumed_net, resumed)
    for a, b in zip(net.parameters(), resumed_net.parameters(), strict=True):
        assert torch.equal(a, b)


def test_proportion_schedule_and_bad_values() -> None:
    net, _, _ = _tiny_problem()
    sgd = torch.optim.SGD(net.parameters(), lr=0.1)
    scheduled = GSAM(sgd, rho=0.04, rho_min=0.02, lr_max=0.1, lr_min=0.0)
    assert scheduled.rho_at(0.1) == pytest.approx(0.04)
    assert scheduled.rho_at(0.05) == pytest.approx(0.03)
    assert GSAM(sgd, rho=0.04).rho_at(0.05) == 0.04  # constant lr: constant rho
    with pytest.raises(ValueError, match="constant rho"):
        GSAM(sgd, rho=0.04, rho_min=0.02)
    with pytest.raises(ValueError, match="rho must be"):
        GSAM(sgd, rho=-1.0)
    with pytest.raises(ValueError, match="closure"):
        GSAM(sgd).step()


# ------------------------------------------------------------------------------- the experts
@pytest.fixture
def tiny(tmp_path: Path) -> MNIST:
    _write_tiny_mnist(tmp_path / "data")
    return MNIST(data_dir=str(tmp_path / "data"))


def _cli(folder: Path, *extra: str) -> list[str]:
    return ["buffer", "--data", "ld3m.testing.RandomImageData", "--data.num_classes", "4",
            "--data.image_shape", "[1, 8, 8]", "--data.train_images", "32", "--data.test_images",
            "8", "--folder", str(folder), "--experts", "1", "--epochs", "2", "--network",
            "ConvNetD1", "--batch_size", "8", "--dsa", "none", "--accelerator", "cpu",
            "--progress_bar", "false", *extra]


def test_cli_buffer_with_gsam(tmp_path: Path, capsys) -> None:
    assert main(_cli(tmp_path / "gsam", "--optimizer", "gsam")) == 0
    assert main(_cli(tmp_path / "sgd")) == 0
    gsam, sgd = TrajectoryBuffer(tmp_path / "gsam")[0], TrajectoryBuffer(tmp_path / "sgd")[0]
    assert gsam.info["optimizer"] == {"name": "gsam", "momentum": 0.0, "weight_decay": 0.0,
                                      "rho": 0.01, "alpha": 0.3, "adaptive": True}
    assert "optimizer" not in sgd.info  # MTT's plain SGD, as the buffers written before
    assert torch.equal(gsam.trajectory[0], sgd.trajectory[0]), "the same seeded initialisation"
    assert not torch.allclose(gsam.trajectory[1:], sgd.trajectory[1:], rtol=0, atol=1e-6)
    # a folder holds one setting: GSAM experts are refused where SGD ones are, and back
    assert main(_cli(tmp_path / "sgd", "--experts", "2", "--optimizer", "gsam")) == 2
    assert "another setting" in capsys.readouterr().err
    assert main(_cli(tmp_path / "gsam", "--experts", "2")) == 2
    assert main(_cli(tmp_path / "gsam", "--experts", "2", "--optimizer", "gsam", "--rho", "0.02")) == 2
    assert main(_cli(tmp_path / "x", "--optimizer", "adam")) == 2
    assert "optimizer must be one of sgd, gsam" in capsys.readouterr().err


class _Kill(L.Callback):
    """Stop the training of expert 1 at the start of its third epoch (two epochs checkpointed)."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if pl_module.hparams.seed == 1000 and trainer.current_epoch == 2:
            raise RuntimeError("simulated kill")


def test_an_interrupted_gsam_expert_resumes_exactly(tiny: MNIST, tmp_path: Path) -> None:
    # momentum on, so the resumed run also needs the SGD state restored through GSAM
    args = {"experts": 2, "epochs": 4, "network": "ConvNetD1", "batch_size": 8,
            "dsa": "color_crop_cutout_scale_rotate", "optimizer": "gsam", "rho": 0.05,
            "momentum": 0.9}
    folder = tmp_path / "buffer"
    with pytest.raises(RuntimeError, match="simulated kill"):
        train_experts(tiny, folder, trainer_kwargs={**QUIET, "callbacks": [_Kill()]}, **args)
    checkpoint = torch.load(folder / PARTIAL / "expert_00001.ckpt", weights_only=False)
    assert len(checkpoint["ld3m_expert"]["snapshots"]) == 3
    assert checkpoint["global_step"] == 2 * 4  # manual optimisation counts GSAM's steps
    assert checkpoint["optimizer_states"][0]["state"], "the SGD momentum was not checkpointed"
    assert not (folder / shard_name(1)).exists()
    resumed = train_experts(tiny, folder, trainer_kwargs=QUIET, **args)
    assert not (folder / PARTIAL).exists()
    alone = train_experts(tiny, tmp_path / "alone", trainer_kwargs=QUIET, **args)
    for i in range(2):
        assert torch.equal(resumed[i].trajectory, alone[i].trajectory)
    assert resumed[1].info["optimizer"]["momentum"] == 0.9


def test_gsam_expert_refuses_fp16_and_bad_names(tiny: MNIST, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="optimizer must be one of"):
        Expert("ConvNetD1", 1, 10, 28, optimizer="sam")
    with pytest.raises(ValueError, match="alpha"):
        Expert("ConvNetD1", 1, 10, 28, optimizer="gsam", alpha=float("nan"))
    with pytest.raises(ValueError, match="16-mixed"):
        train_experts(tiny, tmp_path / "b", experts=1, epochs=1, network="ConvNetD1", batch_size=8,
                      dsa="none", optimizer="gsam", trainer_kwargs={**QUIET, "precision": "16-mixed"})
