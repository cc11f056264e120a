"""The LD3M latent generator (``ld3m.generator``) on tiny random diffusers models.

A tiny generator: a 2-level AutoencoderKL / VQModel (1x16x16 images -> 4x8x8 latents), a
UNet2DModel (16, 32) with 3 classes + a null class, a DDIM scheduler. Nothing is downloaded.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel

from ld3m.generator import CONFIG_NAME, LatentGenerator, VectorClassEmbedding, skip_weights
from ld3m.testing import tiny_generator

NUM_CLASSES = 3


@pytest.fixture(scope="module")
def gen() -> LatentGenerator:
    return tiny_generator()


def inputs(gen: LatentGenerator, n: int, seed: int = 1):
    """Leaf ``z`` and ``c`` that require grad (z encoded from random images), and fixed noise."""
    g = torch.Generator().manual_seed(seed)
    dtype = gen.denoiser.dtype
    with torch.no_grad():
        z = gen.encode(torch.randn(n, *gen.image_shape, generator=g, dtype=dtype))
    labels = torch.arange(n) % NUM_CLASSES
    c = gen.class_embedding(labels)
    return z.requires_grad_(), c.requires_grad_(), gen.draw_noise(n, g, dtype=dtype)


# ---------------------------------------------------------------------------------- skip weights
@pytest.mark.parametrize("steps", [2, 3, 5, 10, 40, 50])
def test_skip_weights_one_first_zero_last_linear(gen: LatentGenerator, steps: int):
    weights = gen.skip_weights(steps)
    assert weights == skip_weights(steps)
    assert len(weights) == steps
    assert weights[0] == 1.0 and weights[-1] == 0.0
    diffs = [a - b for a, b in zip(weights, weights[1:], strict=False)]
    assert all(math.isclose(d, 1 / (steps - 1)) for d in diffs)


def test_skip_weights_single_step_and_bad_steps():
    assert skip_weights(1) == [0.0]
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="steps"):
            skip_weights(bad)


# ---------------------------------------------------------------------------------- sampling
def test_no_skip_sampling_is_diffusers_ddim(gen: LatentGenerator):
    """Without the skip the sampler is exactly diffusers' DDIM (eta 0) from z_T = q_sample(z, t_T)."""
    z, c, noise = inputs(gen, 2)
    steps = 6
    with torch.no_grad():
        ours = gen.sample(z, c, steps, skip=False, noise=noise)
        scheduler = DDIMScheduler.from_config(gen.scheduler.config)
        scheduler.set_timesteps(steps)
        t_first = scheduler.timesteps[0]
        x = scheduler.add_noise(z, noise, t_first.view(1))
        labels = torch.arange(2) % NUM_CLASSES
        for t in scheduler.timesteps:
            eps = gen.denoiser(x, t, class_labels=labels).sample  # integer labels: the table
            x = scheduler.step(eps, t, x, eta=0.0).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-5)
    assert gen.timesteps(steps) == [int(t) for t in scheduler.timesteps]


def test_skip_changes_the_sample_and_t_start(gen: LatentGenerator):
    z, c, noise = inputs(gen, 2)
    with torch.no_grad():
        with_skip = gen.sample(z, c, 4, skip=True, noise=noise)
        without = gen.sample(z, c, 4, skip=False, noise=noise)
        assert not torch.allclose(with_skip, without)
        assert gen.timesteps(5, t_start=400) == [400, 300, 200, 100, 0]
        assert gen.render(z, c, 5, t_start=400, noise=noise).shape == (2, *gen.image_shape)
    with pytest.raises(ValueError, match="distinct"):
        gen.timesteps(10, t_start=3)


def test_vector_class_embedding_equals_label_conditioning(gen: LatentGenerator):
    """Feeding the table row as a vector conditions the UNet exactly as the integer label does."""
    x = torch.randn(3, *gen.latent_shape, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 2, 1])
    assert isinstance(gen.denoiser.class_embedding, VectorClassEmbedding)
    with torch.no_grad():
        by_label = gen.denoiser(x, 500, class_labels=labels).sample
        by_vector = gen.denoiser(x, 500, class_labels=gen.class_embedding(labels)).sample
    torch.testing.assert_close(by_vector, by_label)
    with torch.random.fork_rng():
        plain = UNet2DModel.from_config(gen.denoiser.config)
    assert list(gen.denoiser.state_dict()) == list(plain.state_dict())  # diffusers' own keys
    with pytest.raises(ValueError, match="labels"):
        gen.class_embedding([0, NUM_CLASSES])  # the null row is not a class


def test_gradients_reach_z_and_c_not_the_generator(gen: LatentGenerator):
    z, c, noise = inputs(gen, 3)
    direction = torch.randn(3, *gen.image_shape, generator=torch.Generator().manual_seed(3))
    grads = {}
    for use_checkpoint in (True, False):
        z.grad = c.grad = None
        images = gen.render(z, c, 5, guidance=2.0, checkpoint=use_checkpoint, noise=noise)
        (images * direction).sum().backward()
        grads[use_checkpoint] = (z.grad.clone(), c.grad.clone())
    for grad in grads[True]:
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
        assert (grad.flatten(1).norm(dim=1) > 0).all()  # every image gets a gradient
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-4, atol=1e-6)
    assert all(not p.requires_grad and p.grad is None for p in gen.parameters())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chunked_backward_equals_full_backward(dtype: torch.dtype):
    """Re-rendering in chunks gives the full-graph gradient: to rounding in float64, to a relative
    1e-5 in float32 (different batch sizes round differently; measured 2e-6)."""
    gen = tiny_generator().to(dtype=dtype)
    z, c, noise = inputs(gen, 5)
    target = torch.randn(5, *gen.image_shape, generator=torch.Generator().manual_seed(4),
                         dtype=dtype)
    options = dict(skip=True, guidance=1.5)

    images = gen.render(z, c, 4, noise=noise, **options)
    ((images - target) ** 2).sum().backward()
    full = (z.grad.clone(), c.grad.clone())

    z.grad = c.grad = None
    with torch.no_grad():
        images = gen.render(z, c, 4, noise=noise, **options)
    detached = images.detach().requires_grad_()
    ((detached - target) ** 2).sum().backward()
    gen.backward_in_chunks(z, c, detached.grad, 4, chunk_size=2, noise=noise, **options)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    for chunked, reference in zip((z.grad, c.grad), full, strict=True):
        assert chunked.dtype == dtype and reference.abs().sum() > 0
        assert (chunked - reference).norm() <= tolerance * reference.norm()


def test_determinism_and_no_global_rng(gen: LatentGenerator):
    z, c, _ = inputs(gen, 2)
    state = torch.get_rng_state()
    with torch.no_grad():
        a = gen.render(z, c, 3, generator=torch.Generator().manual_seed(7))
        b = gen.render(z, c, 3, generator=torch.Generator().manual_seed(7))
        d = gen.render(z, c, 3, generator=torch.Generator().manual_seed(8))
        zero = gen.render(z, c, 3, noise=torch.zeros_like(z))
        e1, e2 = gen.encode(torch.ones(2, *gen.image_shape)), gen.encode(torch.ones(2, *gen.image_shape))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and torch.equal(e1, e2)
    assert not torch.allclose(a, d) and not torch.allclose(a, zero)
    with pytest.raises(ValueError, match="noise"):
        gen.render(z, c, 3)  # neither noise nor generator


def test_bad_inputs(gen: LatentGenerator):
    z, c, noise = inputs(gen, 2)
    with pytest.raises(ValueError, match="z must be"):
        gen.render(z[:, :2], c, 3, noise=noise)
    with pytest.raises(ValueError, match="c must be"):
        gen.render(z, c[:1], 3, noise=noise)
    with pytest.raises(ValueError, match="null class"):
        tiny_generator(null=False).render(z, c, 3, guidance=3.0, noise=noise)
    with pytest.raises(ValueError, match="images must be"):
        gen.encode(torch.zeros(2, 3, 16, 16))


def test_stays_frozen_and_in_eval_mode(gen: LatentGenerator):
    parent = torch.nn.Sequential(gen)
    parent.train()
    assert not gen.training and not any(m.training for m in gen.modules())


def test_bf16_autocast(gen: LatentGenerator):
    z, c, noise = inputs(gen, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        images = gen.render(z, c, 3, guidance=2.0, noise=noise)
    images.float().sum().backward()
    assert torch.isfinite(z.grad).all() and torch.isfinite(c.grad).all() and z.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------- the paper's claim
def test_skip_keeps_the_latent_gradient_up_at_many_steps():
    """LD3M's claim: with the skip the gradient at the latents stays large as T grows; without it
    it shrinks.

    Measured on tiny random generators (seeds 0-5, 4 images, a random linear loss on the images),
    |dL/dz| without the skip falls 2.5-3x from T=5 to T=40 (e.g. 3.47 -> 1.37) while with it it
    is 80-190x larger at T=40 (109-250). A briefly trained denoiser (1,500 steps on Fashion-MNIST
    latents) shows the same ordering, smaller: ~28 with vs ~1.5 without at T=40. The margin
    asserted here (10x) is far below what was measured on any seed."""
    gen = tiny_generator(seed=1)
    direction = torch.randn(4, *gen.image_shape, generator=torch.Generator().manual_seed(5))
    norms = {}
    for steps in (5, 40):
        for skip in (True, False):
            z, c, noise = inputs(gen, 4, seed=6)
            (gen.render(z, c, steps, skip=skip, noise=noise) * direction).sum().backward()
            norms[steps, skip] = z.grad.norm().item()
    assert norms[40, True] > 10 * norms[40, False]
    assert norms[40, False] < norms[5, False]


# ---------------------------------------------------------------------------------- files
@pytest.mark.parametrize("vae", ["kl", "vq"])
def test_save_and_load_round_trip(tmp_path, vae: str):
    gen = tiny_generator(seed=3, vae=vae)
    folder = gen.save_pretrained(tmp_path / "prior")
    assert {p.name for p in folder.iterdir()} == {"vae", "unet", "scheduler", CONFIG_NAME}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
    loaded = LatentGenerator.from_pretrained(folder)
    assert loaded.config == gen.config and type(loaded.vae) is type(gen.vae)
    z, c, noise = inputs(gen, 2)
    with torch.no_grad():
        assert torch.equal(loaded.render(z, c, 3, guidance=2.0, noise=noise),
                           gen.render(z, c, 3, guidance=2.0, noise=noise))
        images = torch.randn(2, *gen.image_shape, generator=torch.Generator().manual_seed(9))
        assert torch.equal(loaded.encode(images), gen.encode(images))
    assert torch.equal(loaded.class_embedding([0, 1, 2]), gen.class_embedding([0, 1, 2]))
    assert all(not p.requires_grad for p in loaded.parameters()) and not loaded.training

    # saving again replaces the folder (the old generator is gone, nothing left aside)
    tiny_generator(seed=4, vae=vae).save_pretrained(folder)
    again = LatentGenerator.from_pretrained(folder)
    assert not torch.equal(again.class_embedding([0]), gen.class_embedding([0]))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_missing_or_malformed_folder(tmp_path, gen: LatentGenerator):
    with pytest.raises(FileNotFoundError, match="no LD3M generator folder"):
        LatentGenerator.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        LatentGenerator.from_pretrained(tmp_path / "empty")

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        gen.save_pretrained(tmp_path / "other")  # never overwrites a foreign folder
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"

    folder = gen.save_pretrained(tmp_path / "prior")
    config = (folder / CONFIG_NAME).read_text()
    (folder / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        LatentGenerator.from_pretrained(folder)
    bad = json.loads(config)
    bad["image_shape"] = [1, 16]
    (folder / CONFIG_NAME).write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="image_shape"):
        LatentGenerator.from_pretrained(folder)
    bad = json.loads(config)
    bad["latent_shape"] = [4, 4, 4]
    (folder / CONFIG_NAME).write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="latent_shape"):
        LatentGenerator.from_pretrained(folder)
    (folder / CONFIG_NAME).write_text(config)

    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    payload = weights.read_bytes()
    weights.write_bytes(payload[: len(payload) // 2])  # truncated
    with pytest.raises(ValueError, match="cannot load"):
        LatentGenerator.from_pretrained(folder)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="no weights"):
        LatentGenerator.from_pretrained(folder)
    weights.write_bytes(payload)
    LatentGenerator.from_pretrained(folder)  # intact again
    (folder / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        LatentGenerator.from_pretrained(folder)
