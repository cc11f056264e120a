"""``ld3m convert-ldm``: a CompVis latent-diffusion class-conditional checkpoint -> an LD3M folder.

The test writes a tiny random checkpoint with the ORIGINAL LDM key names (built here from the
module construction of LDM's ``openaimodel.py`` / ``diffusionmodules/model.py``: a cross-attention
``UNetModel`` of 2 levels, attention at level 1 only, heads of 16 channels; a 2-level VQ first
stage; a ``ClassEmbedder`` of 4 classes + the null row; the schedule buffers of
``DDPM.register_schedule``) and a tiny YAML in the original format (cin256-v2's layout). The
converted models are compared with a functional re-implementation of LDM's forward passes that
reads the original keys, so a wrong mapping fails even where the shapes fit. Nothing is
downloaded.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from diffusers import DDIMScheduler, UNet2DConditionModel, VQModel
from helpers import (
    check_render_deterministic_with_gradients,
    check_skip_then_ddim,
    error_line,
    generator_inputs,
)
from safetensors.torch import load_file

from ld3m.cli import main
from ld3m.generator import CLASS_EMBEDDER, CONFIG_NAME, LatentGenerator, VectorClassEmbedding
from ld3m.ldm import convert_ldm_checkpoint

LINEAR_START, LINEAR_END, T = 0.0015, 0.0195, 1000  # cin256-v2's schedule
N_CLASSES = 5  # 4 classes + the null row (cin256-v2: 1000 + 1)
HEAD_CHANNELS = 16

CONFIG = {"model": {"base_learning_rate": 1e-4, "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
                    "params": {
    "linear_start": LINEAR_START, "linear_end": LINEAR_END, "num_timesteps_cond": 1,
    "log_every_t": 200, "timesteps": T, "first_stage_key": "image",
    "cond_stage_key": "class_label", "image_size": 8, "channels": 3,
    "cond_stage_trainable": True, "conditioning_key": "crossattn", "monitor": "val/loss",
    "use_ema": False,
    "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
        "image_size": 8, "in_channels": 3, "out_channels": 3, "model_channels": 32,
        "attention_resolutions": [2], "num_res_blocks": 1, "channel_mult": [1, 2],
        "num_head_channels": HEAD_CHANNELS, "use_spatial_transformer": True,
        "transformer_depth": 1, "context_dim": 32}},
    "first_stage_config": {"target": "ldm.models.autoencoder.VQModelInterface", "params": {
        "embed_dim": 3, "n_embed": 16,
        "ddconfig": {"double_z": False, "z_channels": 3, "resolution": 16, "in_channels": 3,
                     "out_ch": 3, "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1,
                     "attn_resolutions": [], "dropout": 0.0},
        "lossconfig": {"target": "torch.nn.Identity"}}},
    "cond_stage_config": {"target": "ldm.modules.encoders.modules.ClassEmbedder",
                          "params": {"n_classes": N_CLASSES, "embed_dim": 32, "key": "class_label"}},
}}}


# ---------------------------------------------------------------------------------- the checkpoint
def _unet_shapes(p: dict) -> dict[str, tuple[int, ...]]:
    """openaimodel.UNetModel's tensors (use_spatial_transformer, no label_emb)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def lin(name: str, i: int, o: int, bias: bool = True) -> None:
        shapes[f"{name}.weight"] = (o, i)
        if bias:
            shapes[f"{name}.bias"] = (o,)

    def conv(name: str, i: int, o: int, k: int) -> None:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (o, i, k, k), (o,)

    def norm(name: str, c: int) -> None:
        shapes[f"{name}.weight"] = shapes[f"{name}.bias"] = (c,)

    def resblock(name: str, i: int, o: int) -> None:
        norm(f"{name}.in_layers.0", i)
        conv(f"{name}.in_layers.2", i, o, 3)
        lin(f"{name}.emb_layers.1", emb, o)
        norm(f"{name}.out_layers.0", o)
        conv(f"{name}.out_layers.3", o, o, 3)
        if i != o:
            conv(f"{name}.skip_connection", i, o, 1)

    def spatial(name: str, c: int) -> None:
        norm(f"{name}.norm", c)
        conv(f"{name}.proj_in", c, c, 1)
        block = f"{name}.transformer_blocks.0"
        for attn, source in (("attn1", c), ("attn2", p["context_dim"])):
            lin(f"{block}.{attn}.to_q", c, c, bias=False)
            lin(f"{block}.{attn}.to_k", source, c, bias=False)
            lin(f"{block}.{attn}.to_v", source, c, bias=False)
            lin(f"{block}.{attn}.to_out.0", c, c)
        lin(f"{block}.ff.net.0.proj", c, 8 * c)  # GEGLU: 2 x 4c
        lin(f"{block}.ff.net.2", 4 * c, c)
        for n in ("norm1", "norm2", "norm3"):
            norm(f"{block}.{n}", c)
        conv(f"{name}.proj_out", c, c, 1)

    mc, nrb, mult = p["model_channels"], p["num_res_blocks"], p["channel_mult"]
    emb = 4 * mc
    lin("time_embed.0", mc, emb)
    lin("time_embed.2", emb, emb)
    conv("input_blocks.0.0", p["in_channels"], mc, 3)
    ch, chans, k, ds = mc, [mc], 1, 1
    for level, m in enumerate(mult):
        for _ in range(nrb):
            resblock(f"input_blocks.{k}.0", ch, m * mc)
            ch = m * mc
            if ds in p["attention_resolutions"]:
                spatial(f"input_blocks.{k}.1", ch)
            chans.append(ch)
            k += 1
        if level != len(mult) - 1:
            conv(f"input_blocks.{k}.0.op", ch, ch, 3)
            chans.append(ch)
            k, ds = k + 1, ds * 2
    resblock("middle_block.0", ch, ch)
    spatial("middle_block.1", ch)
    resblock("middle_block.2", ch, ch)
    k = 0
    for level, m in list(enumerate(mult))[::-1]:
        for i in range(nrb + 1):
            resblock(f"output_blocks.{k}.0", ch + chans.pop(), m * mc)
            ch = m * mc
            sub = 1
            if ds in p["attention_resolutions"]:
                spatial(f"output_blocks.{k}.1", ch)
                sub = 2
            if level and i == nrb:
                conv(f"output_blocks.{k}.{sub}.conv", ch, ch, 3)
                ds //= 2
            k += 1
    norm("out.0", ch)
    conv("out.2", mc, p["out_channels"], 3)
    return shapes


def _vq_shapes(p: dict) -> dict[str, tuple[int, ...]]:
    """ldm.models.autoencoder.VQModel's tensors (Encoder, Decoder, quantize, quant convs)."""
    dd = p["ddconfig"]
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name: str, i: int, o: int, k: int) -> None:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (o, i, k, k), (o,)

    def norm(name: str, c: int) -> None:
        shapes[f"{name}.weight"] = shapes[f"{name}.bias"] = (c,)

    def resblock(name: str, i: int, o: int) -> None:
        norm(f"{name}.norm1", i)
        conv(f"{name}.conv1", i, o, 3)
        norm(f"{name}.norm2", o)
        conv(f"{name}.conv2", o, o, 3)
        if i != o:
            conv(f"{name}.nin_shortcut", i, o, 1)

    def mid(name: str, c: int) -> None:
        resblock(f"{name}.mid.block_1", c, c)
        norm(f"{name}.mid.attn_1.norm", c)
        for n in ("q", "k", "v", "proj_out"):
            conv(f"{name}.mid.attn_1.{n}", c, c, 1)
        resblock(f"{name}.mid.block_2", c, c)

    ch, mult, nrb = dd["ch"], dd["ch_mult"], dd["num_res_blocks"]
    conv("encoder.conv_in", dd["in_channels"], ch, 3)
    block_in = ch
    for level, m in enumerate(mult):
        for j in range(nrb):
            resblock(f"encoder.down.{level}.block.{j}", block_in, ch * m)
            block_in = ch * m
        if level != len(mult) - 1:
            conv(f"encoder.down.{level}.downsample.conv", block_in, block_in, 3)
    mid("encoder", block_in)
    norm("encoder.norm_out", block_in)
    conv("encoder.conv_out", block_in, dd["z_channels"], 3)
    conv("quant_conv", dd["z_channels"], p["embed_dim"], 1)
    shapes["quantize.embedding.weight"] = (p["n_embed"], p["embed_dim"])
    conv("post_quant_conv", p["embed_dim"], dd["z_channels"], 1)
    block_in = ch * mult[-1]
    conv("decoder.conv_in", dd["z_channels"], block_in, 3)
    mid("decoder", block_in)
    for level in reversed(range(len(mult))):
        for j in range(nrb + 1):
            resblock(f"decoder.up.{level}.block.{j}", block_in, ch * mult[level])
            block_in = ch * mult[level]
        if level:
            conv(f"decoder.up.{level}.upsample.conv", block_in, block_in, 3)
    norm("decoder.norm_out", block_in)
    conv("decoder.conv_out", block_in, dd["out_ch"], 3)
    return shapes


def ldm_betas(start: float = LINEAR_START, end: float = LINEAR_END, steps: int = T) -> torch.Tensor:
    """LDM's make_beta_schedule("linear"), computed independently of the converter."""
    return torch.linspace(start ** 0.5, end ** 0.5, steps, dtype=torch.float64) ** 2


def ldm_state_dict(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random LatentDiffusion state dict with the original key names."""
    params = config["model"]["params"]
    g = torch.Generator().manual_seed(seed)
    shapes = {f"model.diffusion_model.{k}": v for k, v in _unet_shapes(params["unet_config"]["params"]).items()}
    shapes |= {f"first_stage_model.{k}": v
               for k, v in _vq_shapes(params["first_stage_config"]["params"]).items()}
    cond = params["cond_stage_config"]["params"]
    shapes["cond_stage_model.embedding.weight"] = (cond["n_classes"], cond["embed_dim"])
    state = {}
    for key, shape in shapes.items():
        values = torch.randn(shape, generator=g)
        norm_weight = key.endswith(".weight") and len(shape) == 1
        state[key] = 1 + 0.1 * values if norm_weight else (values if "embedding" in key else 0.1 * values)
    betas = ldm_betas(params["linear_start"], params["linear_end"], params["timesteps"])
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    posterior = betas * (1 - prev) / (1 - alphas_cumprod)
    buffers = {"betas": betas, "alphas_cumprod": alphas_cumprod, "alphas_cumprod_prev": prev,
               "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
               "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
               "log_one_minus_alphas_cumprod": (1 - alphas_cumprod).log(),
               "sqrt_recip_alphas_cumprod": (1 / alphas_cumprod).sqrt(),
               "sqrt_recipm1_alphas_cumprod": (1 / alphas_cumprod - 1).sqrt(),
               "posterior_variance": posterior,
               "posterior_log_variance_clipped": posterior.clamp(min=1e-20).log(),
               "posterior_mean_coef1": betas * prev.sqrt() / (1 - alphas_cumprod),
               "posterior_mean_coef2": (1 - prev) * (1 - betas).sqrt() / (1 - alphas_cumprod)}
    state |= {k: v.float() for k, v in buffers.items()}  # DDPM stores them as float32
    return state


def write_ldm(folder: Path, config: dict | None = None, state: dict | None = None,
              extra: dict | None = None) -> tuple[Path, Path]:
    """``folder/model.ckpt`` (a dict with ``state_dict``, as Lightning saves) and ``folder/config.yaml``."""
    config = CONFIG if config is None else config
    folder.mkdir(parents=True, exist_ok=True)
    state = ldm_state_dict(config) if state is None else state
    torch.save({"state_dict": state, "global_step": 10, **(extra or {})}, folder / "model.ckpt")
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder / "model.ckpt", folder / "config.yaml"


def _with(**changes) -> dict:
    config = copy.deepcopy(CONFIG)
    for path, value in changes.items():
        node = config["model"]["params"]
        *parents, last = path.split("__")
        for name in parents:
            node = node[name] if name in node else node["params"]
        if last not in node and "params" in node:
            node = node["params"]
        node[last] = value
    return config


# ---------------------------------------------------------------------------------- LDM's forward
def _sub(state: dict, prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _gn(sd: dict, name: str, x: torch.Tensor, eps: float) -> torch.Tensor:
    return F.group_norm(x, 32, sd[f"{name}.weight"], sd[f"{name}.bias"], eps)


def _conv(sd: dict, name: str, x: torch.Tensor, stride: int = 1, padding: int | None = None) -> torch.Tensor:
    weight = sd[f"{name}.weight"]
    padding = weight.shape[-1] // 2 if padding is None else padding
    return F.conv2d(x, weight, sd[f"{name}.bias"], stride=stride, padding=padding)


def _lin(sd: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"))


def ldm_unet(sd: dict, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """openaimodel.UNetModel.forward (use_spatial_transformer) from the original keys."""
    mc = sd["input_blocks.0.0.weight"].shape[0]
    half = mc // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    emb = _lin(sd, "time_embed.2", F.silu(_lin(sd, "time_embed.0", emb)))

    def attention(name: str, h: torch.Tensor, ctx: torch.Tensor, heads: int) -> torch.Tensor:
        q, k, v = (_lin(sd, f"{name}.to_{n}", src) for n, src in (("q", h), ("k", ctx), ("v", ctx)))
        q, k, v = (a.reshape(a.shape[0], a.shape[1], heads, -1).transpose(1, 2) for a in (q, k, v))
        weights = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)
        out = (weights @ v).transpose(1, 2).reshape(h.shape)
        return _lin(sd, f"{name}.to_out.0", out)

    def spatial(name: str, h: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = h.shape
        heads = c // HEAD_CHANNELS
        y = _conv(sd, f"{name}.proj_in", _gn(sd, f"{name}.norm", h, 1e-6))
        y = y.flatten(2).transpose(1, 2)
        blk = f"{name}.transformer_blocks.0"
        ln = {n: (lambda a, n=n: F.layer_norm(a, (c,), sd[f"{blk}.{n}.weight"], sd[f"{blk}.{n}.bias"]))
              for n in ("norm1", "norm2", "norm3")}
        y = attention(f"{blk}.attn1", ln["norm1"](y), ln["norm1"](y), heads) + y
        y = attention(f"{blk}.attn2", ln["norm2"](y), context, heads) + y
        a, gate = _lin(sd, f"{blk}.ff.net.0.proj", ln["norm3"](y)).chunk(2, dim=-1)
        y = _lin(sd, f"{blk}.ff.net.2", a * F.gelu(gate)) + y
        y = y.transpose(1, 2).reshape(b, c, hh, ww)
        return _conv(sd, f"{name}.proj_out", y) + h

    def resblock(name: str, h: torch.Tensor) -> torch.Tensor:
        y = _conv(sd, f"{name}.in_layers.2", F.silu(_gn(sd, f"{name}.in_layers.0", h, 1e-5)))
        y = y + _lin(sd, f"{name}.emb_layers.1", F.silu(emb))[:, :, None, None]
        y = _conv(sd, f"{name}.out_layers.3", F.silu(_gn(sd, f"{name}.out_layers.0", y, 1e-5)))
        skip = _conv(sd, f"{name}.skip_connection", h) if f"{name}.skip_connection.weight" in sd else h
        return skip + y

    def sequential(name: str, h: torch.Tensor) -> torch.Tensor:  # TimestepEmbedSequential
        i = 0
        while any(k.startswith(f"{name}.{i}.") for k in sd):
            part = f"{name}.{i}"
            if f"{part}.in_layers.0.weight" in sd:
                h = resblock(part, h)
            elif f"{part}.proj_in.weight" in sd:
                h = spatial(part, h)
            elif f"{part}.op.weight" in sd:
                h = _conv(sd, f"{part}.op", h, stride=2)
            elif f"{part}.conv.weight" in sd:
                h = _conv(sd, f"{part}.conv", F.interpolate(h, scale_factor=2, mode="nearest"))
            else:
                h = _conv(sd, part, h)
            i += 1
        return h

    def count(name: str) -> int:
        return 1 + max(int(k.split(".")[1]) for k in sd if k.startswith(f"{name}."))

    hs, h = [], x
    for k in range(count("input_blocks")):
        h = sequential(f"input_blocks.{k}", h)
        hs.append(h)
    h = sequential("middle_block", h)
    for k in range(count("output_blocks")):
        h = sequential(f"output_blocks.{k}", torch.cat([h, hs.pop()], dim=1))
    return _conv(sd, "out.2", F.silu(_gn(sd, "out.0", h, 1e-5)))


def _vq_res(sd: dict, name: str, h: torch.Tensor) -> torch.Tensor:
    y = _conv(sd, f"{name}.conv1", F.silu(_gn(sd, f"{name}.norm1", h, 1e-6)))
    y = _conv(sd, f"{name}.conv2", F.silu(_gn(sd, f"{name}.norm2", y, 1e-6)))
    return (_conv(sd, f"{name}.nin_shortcut", h) if f"{name}.nin_shortcut.weight" in sd else h) + y


def _vq_attn(sd: dict, name: str, h: torch.Tensor) -> torch.Tensor:
    b, c, hh, ww = h.shape
    y = _gn(sd, f"{name}.norm", h, 1e-6)
    q, k, v = (_conv(sd, f"{name}.{n}", y).flatten(2) for n in "qkv")
    weights = (q.transpose(1, 2) @ k * c ** -0.5).softmax(-1)  # b, hw (q), hw (k)
    out = (v @ weights.transpose(1, 2)).reshape(b, c, hh, ww)
    return h + _conv(sd, f"{name}.proj_out", out)


def _vq_mid(sd: dict, name: str, h: torch.Tensor) -> torch.Tensor:
    h = _vq_res(sd, f"{name}.mid.block_1", h)
    return _vq_res(sd, f"{name}.mid.block_2", _vq_attn(sd, f"{name}.mid.attn_1", h))


def ldm_vq_encode(sd: dict, x: torch.Tensor, levels: int = 2, nrb: int = 1) -> torch.Tensor:
    """VQModelInterface.encode: Encoder then quant_conv."""
    h = _conv(sd, "encoder.conv_in", x)
    for level in range(levels):
        for j in range(nrb):
            h = _vq_res(sd, f"encoder.down.{level}.block.{j}", h)
        if level != levels - 1:
            h = _conv(sd, f"encoder.down.{level}.downsample.conv", F.pad(h, (0, 1, 0, 1)), stride=2,
                      padding=0)
    h = _vq_mid(sd, "encoder", h)
    h = _conv(sd, "encoder.conv_out", F.silu(_gn(sd, "encoder.norm_out", h, 1e-6)))
    return _conv(sd, "quant_conv", h)


def ldm_vq_decode(sd: dict, h: torch.Tensor, levels: int = 2, nrb: int = 1) -> torch.Tensor:
    """VQModelInterface.decode: nearest codebook vector, post_quant_conv, Decoder."""
    codebook = sd["quantize.embedding.weight"]
    flat = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])
    nearest = torch.cdist(flat, codebook).argmin(1)
    h = codebook[nearest].reshape(h.shape[0], h.shape[2], h.shape[3], -1).permute(0, 3, 1, 2)
    h = _conv(sd, "decoder.conv_in", _conv(sd, "post_quant_conv", h))
    h = _vq_mid(sd, "decoder", h)
    for level in reversed(range(levels)):
        for j in range(nrb + 1):
            h = _vq_res(sd, f"decoder.up.{level}.block.{j}", h)
        if level:
            h = _conv(sd, f"decoder.up.{level}.upsample.conv", F.interpolate(h, scale_factor=2.0))
    return _conv(sd, "decoder.conv_out", F.silu(_gn(sd, "decoder.norm_out", h, 1e-6)))


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_ldm(tmp_path_factory.mktemp("ldm") / "cin-tiny")


@pytest.fixture(scope="module")
def converted(original: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    ckpt, config = original
    return convert_ldm_checkpoint(ckpt, config, tmp_path_factory.mktemp("out") / "generator")


@pytest.fixture(scope="module")
def gen(converted: Path) -> LatentGenerator:
    return LatentGenerator.from_pretrained(converted)


@pytest.fixture(scope="module")
def state(original: tuple[Path, Path]) -> dict[str, torch.Tensor]:
    return torch.load(original[0], weights_only=True)["state_dict"]



def _eps(gen: LatentGenerator, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The UNet's prediction with the table rows of ``labels`` as one context token each."""
    context = gen.class_table.weight[labels][:, None, :]
    return gen.denoiser(x, t.expand(len(x)), encoder_hidden_states=context).sample


# ---------------------------------------------------------------------------------- the folder
def test_the_converted_folder_loads_as_a_cross_attention_generator(converted: Path,
                                                                   gen: LatentGenerator,
                                                                   state: dict) -> None:
    assert {p.name for p in converted.iterdir()} == {"vae", "unet", "scheduler", CLASS_EMBEDDER,
                                                     CONFIG_NAME}
    info = json.loads((converted / CONFIG_NAME).read_text())
    assert info["denoiser_class"] == "UNet2DConditionModel" and info["vae_class"] == "VQModel"
    assert info["meta"]["source"]["format"] == "CompVis latent-diffusion"
    assert isinstance(gen.vae, VQModel) and isinstance(gen.denoiser, UNet2DConditionModel)
    assert gen.is_cross_attention and not gen.is_dit
    assert gen.denoiser.config.cross_attention_dim == 32
    assert (gen.num_classes, gen.null_class) == (N_CLASSES - 1, N_CLASSES - 1)
    assert gen.image_shape == (3, 16, 16) and gen.latent_shape == (3, 8, 8)
    assert gen.embed_dim == 32 and gen.scaling_factor == 1.0 and gen.quantize
    assert isinstance(gen.class_table, VectorClassEmbedding)
    torch.testing.assert_close(gen.class_table.weight, state["cond_stage_model.embedding.weight"],
                               rtol=0, atol=0)
    assert not any(p.requires_grad for p in gen.parameters())


def test_every_checkpoint_tensor_is_in_the_converted_weights(gen: LatentGenerator, state: dict,
                                                             converted: Path) -> None:
    """Each model tensor of the checkpoint appears once, unchanged (the VAE attention's 1x1
    convolutions as linear weights), and nothing else is in the generator."""
    def fingerprint(t: torch.Tensor) -> tuple[int, float, float]:
        t = t.detach().double().flatten()
        return t.numel(), round(float(t.sum()), 6), round(float(t.square().sum()), 6)

    originals = sorted(fingerprint(v) for k, v in state.items()
                       if k.startswith(("model.", "first_stage_model.", "cond_stage_model.")))
    ours = gen.state_dict()
    assert sorted(fingerprint(v) for v in ours.values()) == originals
    assert sum(v.numel() for v in ours.values()) == sum(n for n, _, _ in originals)
    # each saved part fills a fresh model of its config under a strict load
    for part, model in (("vae", gen.vae), ("unet", gen.denoiser)):
        fresh = type(model).from_config(model.config)
        saved = load_file(str(converted / part / "diffusion_pytorch_model.safetensors"))
        fresh.load_state_dict(saved, strict=True)
        assert set(saved) == set(model.state_dict())


def test_the_unet_is_ldms_unet(gen: LatentGenerator, state: dict) -> None:
    """The converted UNet2DConditionModel computes what openaimodel.UNetModel computes from the
    original weights (re-implemented above), with the ClassEmbedder output as the context."""
    sd = _sub(state, "model.diffusion_model.")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, *gen.latent_shape, generator=g)
    t = torch.tensor([1, 500, 999])
    labels = torch.tensor([0, 3, N_CLASSES - 1])
    context = state["cond_stage_model.embedding.weight"][labels][:, None, :]  # ClassEmbedder: (N, 1, D)
    with torch.no_grad():
        theirs = ldm_unet(sd, x, t, context)
        ours = gen.denoiser(x, t, encoder_hidden_states=context).sample
        other = gen.denoiser(x, t, encoder_hidden_states=context.roll(1, 0)).sample
    assert theirs.shape == ours.shape == x.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(other, ours, atol=1e-3)  # the class does condition the output


def test_the_first_stage_is_ldms_vq_model(gen: LatentGenerator, state: dict) -> None:
    sd = _sub(state, "first_stage_model.")
    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        latent = ldm_vq_encode(sd, pixels)
        torch.testing.assert_close(gen.vae.encode(pixels).latents, latent, rtol=1e-4, atol=1e-4)
        theirs = ldm_vq_decode(sd, latent)
        torch.testing.assert_close(gen.vae.decode(latent).sample, theirs, rtol=1e-4, atol=1e-4)
        # through the generator's image space (ImageNet normalisation, scale factor 1)
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (gen.image_mean, gen.image_std))
        images = ((pixels + 1) / 2 - mean) / std
        torch.testing.assert_close(gen.encode(images), latent, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close((gen.decode(latent) * std + mean) * 2 - 1, theirs,
                                   rtol=1e-4, atol=1e-4)


def test_the_scheduler_is_ldms_schedule(gen: LatentGenerator, converted: Path) -> None:
    scheduler = DDIMScheduler.from_pretrained(converted, subfolder="scheduler")
    assert scheduler.config.num_train_timesteps == T
    torch.testing.assert_close(scheduler.betas.double(), ldm_betas(), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(gen.scheduler.alphas_cumprod.double(),
                               torch.cumprod(1 - ldm_betas(), 0), rtol=1e-5, atol=1e-9)
    assert scheduler.config.prediction_type == "epsilon" and not scheduler.config.clip_sample
    # LDM's DDIM sampler: make_ddim_timesteps("uniform") = range(0, T, T // n) + 1, and the last
    # step's alpha_prev is alphas_cumprod[0]
    for steps in (50, 8, 4):  # (LDM gives more steps than asked where T % n != 0)
        assert gen.timesteps(steps) == [t + 1 for t in range(0, T, T // steps)][::-1]
    assert float(gen.scheduler.final_alpha_cumprod) == float(gen.scheduler.alphas_cumprod[0])


# ---------------------------------------------------------------------------------- rendering
def test_the_skip_is_applied_and_the_render_is_ddim(gen: LatentGenerator) -> None:
    """T = 2: the skip weights are (1, 0), so the first step's x0 is z itself and the second is
    diffusers' DDIM step, with the class row as the cross-attention context."""
    check_skip_then_ddim(gen, [1, 2], _eps)


def test_guidance_uses_the_null_row(gen: LatentGenerator) -> None:
    z, c, _ = generator_inputs(gen, [0, 3])
    t = torch.tensor(gen.timesteps(1)[0])
    x = math.sqrt(float(gen.scheduler.alphas_cumprod[t])) * z.detach()
    with torch.no_grad():
        guided = gen._model_output(x, t, c, 3.0, use_checkpoint=False)
        cond = _eps(gen, x, t, torch.tensor([0, 3]))
        null = _eps(gen, x, t, torch.tensor([N_CLASSES - 1] * 2))
    torch.testing.assert_close(guided, null + 3.0 * (cond - null), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="labels must be in"):
        gen.class_embedding([N_CLASSES - 1])  # the null row is not a class


def test_deterministic_in_z_c_noise_and_gradients_reach_z_and_c(gen: LatentGenerator) -> None:
    check_render_deterministic_with_gradients(gen, [0, 2], 2, 1, (2, 3, 16, 16))


def test_save_and_load_round_trip(gen: LatentGenerator, tmp_path: Path) -> None:
    folder = gen.save_pretrained(tmp_path / "saved")
    loaded = LatentGenerator.from_pretrained(folder)
    assert loaded.is_cross_attention and loaded.config == gen.config
    for (name, ours), theirs in zip(gen.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(ours, theirs), name
    (folder / CLASS_EMBEDDER / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="class table"):
        LatentGenerator.from_pretrained(folder)


# ---------------------------------------------------------------------------------- refusals
def test_a_missing_or_an_extra_key_is_refused(state: dict, tmp_path: Path) -> None:
    missing = dict(state)
    gone = "model.diffusion_model.output_blocks.1.0.in_layers.0.weight"
    del missing[gone]
    ckpt, config = write_ldm(tmp_path / "missing", state=missing)
    with pytest.raises(ValueError, match=f"missing 1 key.*{gone}"):
        convert_ldm_checkpoint(ckpt, config, tmp_path / "out")
    bogus = "model.diffusion_model.input_blocks.1.2.weight"
    ckpt, config = write_ldm(tmp_path / "extra", state={**state, bogus: torch.zeros(3)})
    with pytest.raises(ValueError, match=f"1 unexpected key.*{bogus}"):
        convert_ldm_checkpoint(ckpt, config, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written


def test_documented_unused_keys_are_ignored_and_ema_weights_used(state: dict, tmp_path: Path) -> None:
    ema = {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7)}
    ema |= {"model_ema." + k[len("model."):].replace(".", ""): v + 1 for k, v in state.items()
            if k.startswith("model.diffusion_model.")}
    unused = {**ema, "first_stage_model.loss.logvar": torch.zeros(())}
    ckpt, config = write_ldm(tmp_path / "plain", state={**state, **unused})
    plain = LatentGenerator.from_pretrained(convert_ldm_checkpoint(ckpt, config, tmp_path / "a"))
    torch.testing.assert_close(plain.denoiser.conv_in.weight,
                               state["model.diffusion_model.input_blocks.0.0.weight"])
    ckpt, config = write_ldm(tmp_path / "ema", config=_with(use_ema=True), state={**state, **unused})
    averaged = LatentGenerator.from_pretrained(convert_ldm_checkpoint(ckpt, config, tmp_path / "b"))
    torch.testing.assert_close(averaged.denoiser.conv_in.weight,
                               state["model.diffusion_model.input_blocks.0.0.weight"] + 1)


def test_a_checkpoint_that_does_not_fit_its_config_is_refused(state: dict, tmp_path: Path) -> None:
    ckpt, config = write_ldm(tmp_path / "schedule", config=_with(linear_end=0.012), state=state)
    with pytest.raises(ValueError, match="betas are not the linear schedule"):
        convert_ldm_checkpoint(ckpt, config, tmp_path / "out")
    ckpt, config = write_ldm(tmp_path / "context", config=_with(unet_config__context_dim=16),
                             state=state)
    with pytest.raises(ValueError, match="attn2.to_k.weight has shape"):
        convert_ldm_checkpoint(ckpt, config, tmp_path / "out")
    ckpt, config = write_ldm(tmp_path / "kl", state=state, config=_with(
        first_stage_config__target="ldm.models.autoencoder.AutoencoderKL"))
    with pytest.raises(ValueError, match="first_stage_config target must be"):
        convert_ldm_checkpoint(ckpt, config, tmp_path / "out")


def test_a_pickled_checkpoint_needs_trusted(state: dict, tmp_path: Path) -> None:
    ckpt, config = write_ldm(tmp_path / "pickled", state=state,
                             extra={"hyper_parameters": {"note": Path("x")}})
    with pytest.raises(ValueError, match="--trusted true"):
        convert_ldm_checkpoint(ckpt, config, tmp_path / "out")
    folder = convert_ldm_checkpoint(ckpt, config, tmp_path / "out", trusted=True)
    assert LatentGenerator.from_pretrained(folder).num_classes == N_CLASSES - 1


# ---------------------------------------------------------------------------------- command line
def test_the_command_line(original: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    ckpt, config = original
    out = tmp_path / "cli"
    assert main(["convert-ldm", "--ckpt", str(ckpt), "--ldm_config", str(config),
                 "--folder", str(out), "--null_class", "false"]) == 0
    loaded = LatentGenerator.from_pretrained(out)
    assert (loaded.num_classes, loaded.null_class) == (N_CLASSES, None)
    capsys.readouterr()
    assert main(["convert-ldm", "--ckpt", str(tmp_path / "none.ckpt"), "--ldm_config",
                 str(config), "--folder", str(tmp_path / "x")]) == 2
    assert "does not exist" in error_line(capsys)
    assert main(["convert-ldm", "--ckpt", str(ckpt), "--ldm_config", str(ckpt),
                 "--folder", str(tmp_path / "x")]) == 2
    assert "is not a readable YAML file" in error_line(capsys)
