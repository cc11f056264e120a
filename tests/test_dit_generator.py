"""LD3M's generator on a diffusers DiT folder (``ld3m.dit``), written by the test in the real layout.

The folder is what ``DiTPipeline.save_pretrained`` writes (``model_index.json``,
``transformer/``, ``vae/``, ``scheduler/``), as the public ``facebook/DiT-XL-2-256``: a tiny
random ``DiTTransformer2DModel`` (4x4x4 latents, patch 2, 2 blocks, hidden 16, learned sigma,
``num_embeds_ada_norm`` classes + the null row), a 2-level ``AutoencoderKL`` (3x8x8 images) and
the ``DDPMScheduler`` diffusers' ``convert_dit_to_diffusers.py`` writes. Every block holds the
same class table, as the converted checkpoints do. Nothing is downloaded.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
)
from helpers import (
    check_render_deterministic_with_gradients,
    check_skip_then_ddim,
    generator_inputs,
)
from PIL import Image

from ld3m.cli import main
from ld3m.generator import CONFIG_NAME, LatentGenerator, VectorClassEmbedding
from ld3m.synthetic import SyntheticSet
from ld3m.testing import tiny_generator

NUM_CLASSES = 1000  # the public models' num_embeds_ada_norm (DiTPipeline's null label is 1000)


def write_dit_folder(folder: Path, num_classes: int = NUM_CLASSES, seed: int = 0,
                     same_tables: bool = True, scale: float = 0.5) -> Path:
    """A tiny random DiT pipeline folder saved by ``DiTPipeline.save_pretrained``."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        transformer = DiTTransformer2DModel(
            sample_size=4, patch_size=2, in_channels=4, out_channels=8, num_layers=2,
            attention_head_dim=8, num_attention_heads=2, num_embeds_ada_norm=num_classes)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=8,
                            down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                            layers_per_block=1, norm_num_groups=4, mid_block_add_attention=False,
                            scaling_factor=scale)
    if same_tables:  # convert_dit_to_diffusers.py copies DiT's one y_embedder into every block
        first = transformer.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight
        for block in transformer.transformer_blocks[1:]:
            block.norm1.emb.class_embedder.embedding_table.weight.data.copy_(first.data)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                              prediction_type="epsilon", clip_sample=False)
    DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dit_folder(tmp_path_factory.mktemp("dit") / "DiT-tiny")


@pytest.fixture(scope="module")
def gen(dit_dir: Path) -> LatentGenerator:
    return LatentGenerator.from_pretrained(dit_dir)



def _eps(gen: LatentGenerator, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The transformer's prediction for integer labels (its own table lookup), epsilon half."""
    out = gen.denoiser(x, t.expand(len(x)), class_labels=labels).sample
    assert out.shape[1] == 2 * x.shape[1]  # learned sigma
    return out[:, : x.shape[1]]


# ---------------------------------------------------------------------------------- loading
def test_the_dit_folder_loads_with_the_dit_settings(dit_dir: Path, gen: LatentGenerator) -> None:
    assert json.loads((dit_dir / "model_index.json").read_text())["_class_name"] == "DiTPipeline"
    assert not (dit_dir / CONFIG_NAME).exists()
    assert gen.is_dit and isinstance(gen.denoiser, DiTTransformer2DModel)
    assert (gen.num_classes, gen.null_class) == (NUM_CLASSES, NUM_CLASSES)
    assert gen.image_shape == (3, 8, 8) and gen.latent_shape == (4, 4, 4)
    assert gen.embed_dim == 16  # the hidden size: 2 heads x 8
    assert gen.scaling_factor == 0.5  # the VAE's
    assert gen.image_mean == (0.485, 0.456, 0.406) and gen.image_std == (0.229, 0.224, 0.225)
    # the DDPM schedule became a DDIM one with the same betas
    ddpm = DDPMScheduler.from_pretrained(dit_dir, subfolder="scheduler")
    assert isinstance(gen.scheduler, DDIMScheduler)
    torch.testing.assert_close(gen.scheduler.alphas_cumprod, ddpm.alphas_cumprod)
    assert gen.scheduler.config.clip_sample is False
    # every block's table is wrapped, sharing the weights (state dict keys unchanged)
    for block in gen.denoiser.transformer_blocks:
        table = block.norm1.emb.class_embedder.embedding_table
        assert isinstance(table, VectorClassEmbedding) and table.num_embeddings == NUM_CLASSES + 1
    keys = set(gen.denoiser.state_dict())
    assert "transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight" in keys
    assert not any(p.requires_grad for p in gen.parameters())


def test_the_public_folders_legacy_transformer_class_and_image_space_overrides(tmp_path: Path) -> None:
    folder = write_dit_folder(tmp_path / "dit", num_classes=3)
    config_path = folder / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config.update({"_class_name": "Transformer2DModel", "cross_attention_dim": None,
                   "num_vector_embeds": None, "only_cross_attention": False,
                   "use_linear_projection": False})  # as facebook/DiT-XL-2-256's config
    config_path.write_text(json.dumps(config))
    index = json.loads((folder / "model_index.json").read_text())
    names = {"0": "tench, Tinca tinca", "1": "goldfish", "2": "great white shark"}
    (folder / "model_index.json").write_text(json.dumps({**index, "id2label": names}))
    gen = LatentGenerator.from_pretrained(folder, image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
    assert gen.is_dit and (gen.num_classes, gen.null_class) == (3, 3)
    assert gen.image_mean == (0.5,) * 3
    assert gen.id2label == {0: "tench, Tinca tinca", 1: "goldfish", 2: "great white shark"}
    saved = gen.save_pretrained(tmp_path / "saved")  # the image space and the names are kept
    again = LatentGenerator.from_pretrained(saved)
    assert (again.image_mean, again.id2label) == ((0.5,) * 3, gen.id2label)


def test_folders_the_generator_refuses(tmp_path: Path) -> None:
    differing = write_dit_folder(tmp_path / "differing", num_classes=3, same_tables=False)
    with pytest.raises(ValueError, match="class tables of transformer blocks 0 and 1 differ"):
        LatentGenerator.from_pretrained(differing)
    other = write_dit_folder(tmp_path / "other", num_classes=3)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match="StableDiffusionPipeline"):
        LatentGenerator.from_pretrained(other)
    missing = write_dit_folder(tmp_path / "missing", num_classes=3)
    for weights in (missing / "transformer").glob("diffusion_pytorch_model*"):
        weights.unlink()
    with pytest.raises(FileNotFoundError, match="holds no weights"):
        LatentGenerator.from_pretrained(missing)


def test_an_ld3m_prior_folder_still_loads_as_a_unet(tmp_path: Path) -> None:
    folder = tiny_generator().save_pretrained(tmp_path / "prior")
    loaded = LatentGenerator.from_pretrained(folder)
    assert not loaded.is_dit and loaded.num_classes == 3 and loaded.image_shape == (1, 16, 16)
    assert not (folder / "model_index.json").exists() and (folder / "unet").is_dir()


# ---------------------------------------------------------------------------------- rendering
def test_float_class_vectors_condition_as_integer_labels(gen: LatentGenerator) -> None:
    labels = torch.tensor([0, 7, 999, NUM_CLASSES])  # NUM_CLASSES: the null row
    x = torch.randn(4, *gen.latent_shape, generator=torch.Generator().manual_seed(2))
    t = torch.tensor(500)
    rows = gen.class_table.weight[labels].detach()
    with torch.no_grad():
        by_label = gen.denoiser(x, t.expand(4), class_labels=labels).sample
        by_vector = gen.denoiser(x, t.expand(4), class_labels=rows).sample
        other = gen.denoiser(x, t.expand(4), class_labels=labels.roll(1)).sample
    torch.testing.assert_close(by_vector, by_label)
    assert not torch.allclose(other, by_label)  # the class does condition the output
    torch.testing.assert_close(gen.class_embedding(labels[:3]), rows[:3])
    torch.testing.assert_close(gen.null_embedding(), rows[3])


def test_render_is_the_dit_pipeline_with_guidance_and_no_skip(gen: LatentGenerator) -> None:
    """With z = 0, noise = the pipeline's initial latents / sqrt(1 - a_T), no skip and guidance 4,
    the render is diffusers' own DiTPipeline (DDIM, guidance on the epsilon half with label 1000,
    the learned-sigma half dropped, 1 / scaling_factor before the decode)."""
    labels, steps, scale = [3, 512], 4, 4.0
    pipe = DiTPipeline(transformer=gen.denoiser, vae=gen.vae,
                       scheduler=DDIMScheduler.from_config(gen.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        theirs = pipe(class_labels=labels, guidance_scale=scale, num_inference_steps=steps,
                      generator=torch.Generator().manual_seed(5), output_type="np").images
        start = torch.randn((2, *gen.latent_shape), generator=torch.Generator().manual_seed(5))
        a_t = float(gen.scheduler.alphas_cumprod[gen.timesteps(steps)[0]])
        z, c = torch.zeros_like(start), gen.class_embedding(labels)
        ours = gen.render(z, c, steps, skip=False, guidance=scale, noise=start / math.sqrt(1 - a_t))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (gen.image_mean, gen.image_std))
    ours = (ours * std + mean).clamp(0, 1).permute(0, 2, 3, 1)
    torch.testing.assert_close(ours, torch.from_numpy(theirs), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        unguided = gen.render(z, c, steps, skip=False, noise=start / math.sqrt(1 - a_t))
    assert not torch.allclose((unguided * std + mean).clamp(0, 1).permute(0, 2, 3, 1), ours)


def test_guidance_uses_the_null_row(tmp_path: Path) -> None:
    """A 3-class DiT: the null class is num_embeds_ada_norm = 3, the table's last row."""
    gen = LatentGenerator.from_pretrained(write_dit_folder(tmp_path / "dit3", num_classes=3))
    assert gen.null_class == 3 and gen.class_table.num_embeddings == 4
    z, c, noise = generator_inputs(gen, [0, 2])
    x = math.sqrt(float(gen.scheduler.alphas_cumprod[gen.timesteps(1)[0]])) * z.detach()
    t = torch.tensor(gen.timesteps(1)[0])
    with torch.no_grad():
        guided = gen._model_output(x, t, c, 3.0, use_checkpoint=False)
        cond = _eps(gen, x, t, torch.tensor([0, 2]))
        null = _eps(gen, x, t, torch.tensor([3, 3]))
    torch.testing.assert_close(guided, null + 3.0 * (cond - null))
    with pytest.raises(ValueError, match="labels must be in"):
        gen.class_embedding([3])


def test_the_skip_is_applied_as_for_the_unet(gen: LatentGenerator) -> None:
    """T = 2: the skip weights are (1, 0), so the first step's x0 is z itself and the second is
    diffusers' DDIM step."""
    check_skip_then_ddim(gen, [1, 2], _eps)


def test_deterministic_in_z_c_noise_and_gradients_reach_z_and_c(gen: LatentGenerator) -> None:
    check_render_deterministic_with_gradients(gen, [4, 5, 6], 3, 2, (3, 3, 8, 8))


def test_encode_decode_apply_the_vae_scaling_factor(gen: LatentGenerator) -> None:
    images = torch.randn(2, *gen.image_shape, generator=torch.Generator().manual_seed(3))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (gen.image_mean, gen.image_std))
    pixels = (images * std + mean) * 2 - 1  # the VAE's [-1, 1]
    with torch.no_grad():
        latent = gen.vae.encode(pixels).latent_dist.mean
        torch.testing.assert_close(gen.encode(images), 0.5 * latent)
        decoded = gen.vae.decode(latent).sample
        torch.testing.assert_close(gen.decode(0.5 * latent) * std + mean, (decoded + 1) / 2,
                                   rtol=1e-4, atol=1e-5)


def test_save_and_load_round_trip_in_the_dit_layout(gen: LatentGenerator, tmp_path: Path) -> None:
    folder = gen.save_pretrained(tmp_path / "saved")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "DiTPipeline" and index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert {p.name for p in folder.iterdir()} == {"model_index.json", "transformer", "vae", "scheduler",
                                                 CONFIG_NAME}
    loaded = LatentGenerator.from_pretrained(folder)
    assert loaded.is_dit and loaded.config == gen.config
    for (name, ours), theirs in zip(gen.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(ours, theirs), name
    assert DiTPipeline.from_pretrained(folder).transformer.config.num_embeds_ada_norm == NUM_CLASSES
    z, c, noise = generator_inputs(gen, [9])
    with torch.no_grad():
        torch.testing.assert_close(loaded.render(z, c, 2, noise=noise), gen.render(z, c, 2, noise=noise))


# ---------------------------------------------------------------------------------- end to end
COLOURS = {"ant": (220, 30, 30), "bee": (30, 220, 30), "cow": (30, 30, 220)}


def _write_image_folder(root: Path) -> None:
    """3 classes of small RGB images (train 3 each, val 1 each)."""
    g = torch.Generator().manual_seed(0)
    for split, count in (("train", 3), ("val", 1)):
        for name, colour in COLOURS.items():
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                noise = torch.randint(0, 30, (12, 10, 3), generator=g)
                pixels = (torch.tensor(colour) + noise).clamp(0, 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")


def test_ld3m_fit_through_a_dit_folder_exports_a_set_evaluate_reads(tmp_path: Path, capsys) -> None:
    dit = write_dit_folder(tmp_path / "dit3", num_classes=3)
    data = tmp_path / "images"
    _write_image_folder(data)
    root = tmp_path / "run"
    code = main(["fit", "--model", "LD3M", "--model.generator", str(dit), "--model.ipc", "1",
                 "--model.steps", "2", "--model.network", "ConvNetW32", "--model.dsa", "none",
                 "--data", "ImageFolder", "--data.data_dir", str(data), "--data.image_size", "8",
                 "--data.batch_per_class", "2", "--data.num_workers", "0",
                 "--trainer.max_steps", "1", "--trainer.default_root_dir", str(root),
                 "--evaluation.at_end", "false", "--trainer.enable_progress_bar", "false"])
    assert code == 0
    (path,) = root.rglob("synthetic.safetensors")
    synthetic = SyntheticSet.load(path)
    assert synthetic.images.shape == (3, 3, 8, 8) and synthetic.labels.tolist() == [0, 1, 2]
    assert synthetic.extra["embeddings"].shape == (3, 16)  # one DiT class vector per image
    assert synthetic.extra["latents"].shape == (3, 4, 4, 4)
    assert torch.isfinite(synthetic.images).all()
    capsys.readouterr()
    out = tmp_path / "report.json"
    assert main(["evaluate", "--distilled", str(path), "--data_dir", str(data), "--archs",
                 "ConvNetW32", "--runs", "1", "--epochs", "1", "--dsa", "none",
                 "--accelerator", "cpu", "--output", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert {r["arch"] for r in results} == {"ConvNetW32"} and len(results) == 2
    assert all(0.0 <= a <= 1.0 for r in results for a in r["accuracies"])
