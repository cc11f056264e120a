"""The compiled / channels-last fast path (:mod:`ld3m.fast`) and DM's ``compile`` flag.

Only ``test_compiled_dm_equals_eager_and_compiles_once`` compiles with inductor (its first
iteration: about 40 s on the project's 2-core CPU with a cold inductor cache, a few seconds
with a warm one); deselect it with ``-m "not slow"``. The others use dynamo's cheap backends.
"""

from __future__ import annotations

import logging
import pickle

import pytest
import torch
from ld3m.modules import DM
from torch._dynamo.utils import counters

from ld3m.experts import Expert
from ld3m.fast import CompiledForward, compiled_forward, to_channels_last
from ld3m.networks import get_network, reset_parameters

# the smallest registered ConvNet (one conv block) has every layer type of the default ConvNet
# (conv, instance norm, ReLU, average pool, flatten) and compiles fastest
NET = "ConvNetD1"
SHAPE = (1, 28, 28)
CLASSES, IPC, REAL = 3, 2, 8


def _dm(**kwargs) -> DM:
    return DM(ipc=IPC, network=NET, num_classes=CLASSES, image_shape=SHAPE, **kwargs)


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST-shaped random real batch ``(K, n, 1, 28, 28)`` and synthetic images."""
    generator = torch.Generator().manual_seed(seed)
    real = torch.randn(CLASSES, REAL, *SHAPE, generator=generator)
    images = torch.randn(CLASSES * IPC, *SHAPE, generator=generator)
    return real, images


def _loss_and_grad(model: DM, real: torch.Tensor, seed: int) -> tuple[float, torch.Tensor]:
    loss = model.matching_loss(real, torch.Generator().manual_seed(seed))
    (grad,) = torch.autograd.grad(loss, model.images)
    return loss.item(), grad


@pytest.mark.slow
def test_compiled_dm_equals_eager_and_compiles_once(one_thread) -> None:
    real, images = _data()
    eager, fast = _dm(), _dm(compile=True)
    assert eager.fast_embed is None  # the default: plain eager calls
    for model in (eager, fast):
        with torch.no_grad():
            model.images.copy_(images)
    compiled_after_first, graphs_after_first, losses = None, None, []
    for step in range(3):  # three iterations: three different random networks (and DSA draws)
        loss_e, grad_e = _loss_and_grad(eager, real, seed=100 + step)
        loss_c, grad_c = _loss_and_grad(fast, real, seed=100 + step)
        assert fast.fast_embed.active, fast.fast_embed.failure  # compiled, did not fall back
        assert loss_c == pytest.approx(loss_e, rel=1e-4)
        torch.testing.assert_close(grad_c, grad_e, rtol=1e-3, atol=1e-5 * grad_e.abs().max().item())
        assert grad_e.abs().max() > 0
        losses.append(loss_e)
        if step == 0:
            compiled_after_first = fast.fast_embed.compiles
            graphs_after_first = counters["stats"]["unique_graphs"]
            # the real side (no grad) and the synthetic side (with autograd): two graphs
            assert compiled_after_first == 2
        else:  # a re-initialised network is the same network to dynamo: no recompile
            assert fast.fast_embed.compiles == compiled_after_first
            assert counters["stats"]["unique_graphs"] == graphs_after_first
    assert len(set(losses)) == 3  # the networks did differ
    # the compiled function does not travel in a pickle; the copy compiles again when used
    copy = pickle.loads(pickle.dumps(fast.fast_embed))
    assert copy.compiles == compiled_after_first and copy._compiled is None


def test_reinitialisation_does_not_recompile() -> None:
    """Dynamo's ``eager`` backend (no code generation): the guards alone decide recompiles."""
    fast = CompiledForward("forward", backend="eager")
    net = get_network(NET, 1, CLASSES, (28, 28))
    x = torch.randn(4, *SHAPE)
    for seed in range(4):
        reset_parameters(net, torch.Generator().manual_seed(seed))
        torch.testing.assert_close(fast(net, x), net(x))
        assert fast.compiles == 1
    fast(net, torch.randn(5, *SHAPE))  # a new batch size is a new graph (dynamic=False)
    assert fast.compiles == 2
    with torch.no_grad():  # so is another grad mode
        fast(net, x)
    assert fast.compiles == 3


def test_instances_keep_their_own_graphs() -> None:
    """Each instance compiles into its own cache: many DMs in one process stay below dynamo's
    recompile limit (8 graphs per compiled function) and keep compiling."""
    net = get_network(NET, 1, CLASSES, (28, 28)).requires_grad_(False)
    x = torch.randn(4, *SHAPE)
    for _ in range(5):  # the fifth would run eagerly with one cache shared by all
        fast = CompiledForward("embed", backend="eager")
        with torch.no_grad():
            fast(net, x)
        fast(net, x.requires_grad_(True))
        assert fast.compiles == 2


def test_failed_compilation_falls_back_to_eager(caplog: pytest.LogCaptureFixture) -> None:
    calls = []

    def broken(graph, example_inputs):
        calls.append(1)
        raise RuntimeError("no C++ compiler")

    fast = CompiledForward("embed", backend=broken)
    net = get_network(NET, 1, CLASSES, (28, 28))
    x = torch.randn(4, *SHAPE, requires_grad=True)
    with caplog.at_level(logging.WARNING, logger="ld3m"):
        out = fast(net, x)
        again = fast(net, x)
    torch.testing.assert_close(out, net.embed(x))
    torch.testing.assert_close(again, out)
    assert not fast.active and "no C++ compiler" in fast.failure
    assert len(calls) == 1  # the second call went straight to eager
    warnings = [r for r in caplog.records if "running it eagerly" in r.getMessage()]
    assert len(warnings) == 1 and "no C++ compiler" in warnings[0].getMessage()
    out.sum().backward()  # the fallback's output has its graph
    assert x.grad is not None and x.grad.abs().max() > 0


def test_errors_of_the_forward_itself_are_raised() -> None:
    fast = CompiledForward("embed", backend="eager")
    net = get_network(NET, 1, CLASSES, (28, 28))
    with pytest.raises(RuntimeError):
        fast(net, torch.randn(4, 3, 28, 28))  # wrong number of channels: eager raises it too


def test_channels_last_keeps_the_parameters_and_the_values() -> None:
    net = get_network("ConvNetW32", 1, CLASSES, (28, 28))
    x = torch.randn(4, *SHAPE, requires_grad=True)
    expected = net(x)
    (expected_grad,) = torch.autograd.grad(expected.sum(), x)
    weights = [p for p in net.parameters()]
    fast = compiled_forward("forward", enabled=False, channels_last=True)  # eager, channels_last
    out = fast(net, x)
    (grad,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5)
    assert [p for p in net.parameters()] == weights  # the same Parameter objects
    conv = net.features[4].weight  # the second conv (32 input channels: a real layout change)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    reset_parameters(net, torch.Generator().manual_seed(1))  # in place: the layout stays
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert to_channels_last(net) is net


def test_channels_last_dm_equals_eager() -> None:
    real, images = _data(1)
    eager, fast = _dm(dsa="none"), _dm(dsa="none", channels_last=True)
    for model in (eager, fast):
        with torch.no_grad():
            model.images.copy_(images)
    loss_e, grad_e = _loss_and_grad(eager, real, seed=5)
    loss_c, grad_c = _loss_and_grad(fast, real, seed=5)
    assert not fast.fast_embed.compile
    assert loss_c == pytest.approx(loss_e, rel=1e-4)
    torch.testing.assert_close(grad_c, grad_e, rtol=1e-3, atol=1e-5 * grad_e.abs().max().item())


@pytest.mark.parametrize("kwargs, match", [({"method": "logits"}, "method"),
                                           ({"backend": "no_such_backend"}, "unknown torch.compile"),
                                           ({"backend": 3}, "backend")])
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CompiledForward(**kwargs)


def test_dm_flags_are_hyperparameters() -> None:
    model = _dm(compile=True)
    assert model.hparams.compile is True and model.hparams.channels_last is False
    assert model.fast_embed.active and model.fast_embed.method == "embed"
    assert set(model.state_dict()) == {"images", "labels"}  # nothing of the fast path


@pytest.mark.filterwarnings("ignore:.*self.log.*")
def test_compiled_expert_steps_like_the_eager_one() -> None:
    """The experts' SGD step through the fast path (``aot_eager``: dynamo and AOT autograd, the
    backward included, without inductor's code generation) gives the eager parameters."""
    eager = Expert(NET, 1, CLASSES, 28, seed=3)  # default DSA: both draw from the same seed
    fast = Expert(NET, 1, CLASSES, 28, seed=3, compile=True)
    assert eager.fast is None and isinstance(fast.fast, CompiledForward)
    fast.fast = CompiledForward("forward", backend="aot_eager")
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, *SHAPE, generator=generator),
                torch.randint(CLASSES, (8,), generator=generator)) for _ in range(3)]
    for model in (eager, fast):
        optimizer = model.configure_optimizers()
        for step, batch in enumerate(batches):
            loss = model.training_step(batch, step)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert fast.fast.compiles == 1 and fast.fast.active  # three SGD steps, one graph
    moved = False
    for p, q, start in zip(eager.parameters(), fast.parameters(),
                           Expert(NET, 1, CLASSES, 28, seed=3).parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6)
        moved = moved or not torch.equal(p, start)
    assert moved


def test_evaluate_compiles_one_forward_per_architecture(monkeypatch, tmp_path) -> None:
    """``evaluate(compile=True)`` (``ld3m evaluate --compile``) trains every network of an
    architecture through one shared compiled forward (here torch.compile's ``aot_eager``
    backend: the same graph machinery, no C++ compile), with the eager path's accuracies."""
    from ld3m.datamodules import MNIST
    from test_data import _write_tiny_mnist

    import ld3m.evaluation as evaluation

    made: list[CompiledForward] = []

    class Recording(CompiledForward):
        def __init__(self, method: str) -> None:
            super().__init__(method, backend="aot_eager")
            made.append(self)

    monkeypatch.setattr(evaluation, "CompiledForward", Recording)
    _write_tiny_mnist(tmp_path)
    data = MNIST(data_dir=str(tmp_path))
    data.setup("fit")
    synthetic = evaluation.random_real_set(data, 1, seed=1)
    kwargs = dict(archs=["ConvNetD1"], runs=2, epochs=1, dsa="none", progress=False)
    eager = evaluation.evaluate(synthetic, data, **kwargs)
    compiled = evaluation.evaluate(synthetic, data, compile=True, **kwargs)
    assert len(made) == 1 and made[0].active and made[0].compiles >= 1
    for a, b in zip(eager.results, compiled.results, strict=True):
        assert a.accuracies == pytest.approx(b.accuracies, abs=1e-6)
