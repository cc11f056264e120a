"""Convert a CompVis latent-diffusion class-conditional checkpoint into an LD3M generator folder.

LD3M's ImageNet generator is the LDM paper's ``cin256-v2`` (``configs/latent-diffusion/
cin256-v2.yaml`` of CompVis/latent-diffusion): a ``LatentDiffusion`` whose first stage is a
VQ-f4 ``ldm.models.autoencoder.VQModelInterface``, whose denoiser is an
``ldm.modules.diffusionmodules.openaimodel.UNetModel`` with spatial transformers
(``conditioning_key: crossattn``) and whose condition is an
``ldm.modules.encoders.modules.ClassEmbedder`` (an ``nn.Embedding`` of ``n_classes`` rows, the
last one, 1000, the null class of classifier-free guidance). :func:`convert_ldm_checkpoint`
reads the original ``.ckpt`` and YAML and writes the folder
:meth:`ld3m.generator.LatentGenerator.from_pretrained` loads:

- ``vae/``: a diffusers ``VQModel`` (``scaling_factor`` = LDM's ``scale_factor``, 1 for cin256);
- ``unet/``: a ``UNet2DConditionModel`` with ``cross_attention_dim`` = ``context_dim``;
- ``class_embedder/``: the ClassEmbedder table (the cross-attention context is one row);
- ``scheduler/``: a ``DDIMScheduler`` with LDM's schedule: LDM's ``linear`` betas are
  ``linspace(sqrt(linear_start), sqrt(linear_end), T) ** 2`` (diffusers' ``scaled_linear``),
  its DDIM timesteps ``range(0, T, T // n) + 1`` (``timestep_spacing="leading"``,
  ``steps_offset=1``) and its last step's ``alpha_prev`` ``alphas_cumprod[0]``
  (``set_alpha_to_one=False``);
- ``ld3m_generator.json``: what it is (``denoiser_class``, ``meta.source``).

Every checkpoint tensor is mapped, strictly: a key the configuration does not explain, or one
it needs that the checkpoint lacks, is refused with a ``ValueError`` naming it. Only the keys
of :data:`IGNORED_PREFIXES` and :data:`SCHEDULE_BUFFERS` are not converted (see there); the
stored ``betas`` must equal the schedule the YAML describes. The key mapping follows the module
construction of LDM's ``openaimodel.py`` and ``diffusionmodules/model.py``.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from diffusers import DDIMScheduler, UNet2DConditionModel, VQModel
from torch import nn

from ld3m import dit as _dit
from ld3m.generator import LatentGenerator

__all__ = ["IGNORED_PREFIXES", "SCHEDULE_BUFFERS", "convert_ldm", "convert_ldm_checkpoint",
           "read_ldm_config", "unet_key_map", "vq_key_map"]

log = logging.getLogger("ld3m")

#: Checkpoint keys that are not converted: ``model_ema.*`` are LitEma's shadow copies of the
#: denoiser (``use_ema``; cin256-v2 has ``use_ema: False``; with ``use_ema: True`` they replace
#: the ``model.*`` weights, as LDM's ``ema_scope`` does when sampling), and
#: ``first_stage_model.loss.*`` the first stage's training loss (LPIPS, discriminator;
#: cin256-v2's ``lossconfig`` is ``torch.nn.Identity``, without weights).
IGNORED_PREFIXES = ("model_ema.", "first_stage_model.loss.")
#: ``DDPM.register_schedule``'s buffers: derived from the schedule the scheduler config
#: reproduces (``betas`` is checked against it), plus ``logvar`` (a training-loss weight,
#: stored only with ``learn_logvar``).
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
                    "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
                    "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2", "logvar")

_UNET_PREFIX = "model.diffusion_model."
_VQ_PREFIX = "first_stage_model."
_TABLE_KEY = "cond_stage_model.embedding.weight"
_TARGETS = {
    "model": ("ldm.models.diffusion.ddpm.LatentDiffusion",),
    "unet_config": ("ldm.modules.diffusionmodules.openaimodel.UNetModel",),
    "first_stage_config": ("ldm.models.autoencoder.VQModelInterface",
                           "ldm.models.autoencoder.VQModel"),
    "cond_stage_config": ("ldm.modules.encoders.modules.ClassEmbedder",),
}
#: LDM's ``beta_schedule`` -> diffusers' (LDM's "linear" is linear in sqrt(beta))
_BETA_SCHEDULES = {"linear": "scaled_linear", "sqrt_linear": "linear"}
_PARAMETERIZATIONS = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
_MAX_NAMED = 8  # keys named in an error message (then a count)


# ---------------------------------------------------------------------------------- config
def read_ldm_config(path: str | os.PathLike) -> dict[str, Any]:
    """The ``model.params`` of an original LDM YAML, checked to be a class-conditional
    ``LatentDiffusion`` this converter handles (VQ first stage, cross-attention UNet,
    ``ClassEmbedder``).

    Args:
        path: The YAML (e.g. ``configs/latent-diffusion/cin256-v2.yaml``).

    Returns:
        ``model.params`` (with ``unet_config``, ``first_stage_config``, ``cond_stage_config``).

    Raises:
        FileNotFoundError: No such file.
        ValueError: Not such a configuration.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LDM config {path} does not exist")
    try:
        content = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a readable YAML file: {err}") from None
    model = content.get("model") if isinstance(content, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("params"), dict):
        raise ValueError(f"{path} is not an LDM config (no model.params)")
    _check_target(path, "model", model)
    params = model["params"]
    for part in ("unet_config", "first_stage_config", "cond_stage_config"):
        entry = params.get(part)
        if not isinstance(entry, dict) or not isinstance(entry.get("params"), dict):
            raise ValueError(f"{path}: model.params.{part} must be a mapping with params")
        _check_target(path, part, entry)
    if params.get("conditioning_key") != "crossattn":
        raise ValueError(f"{path}: conditioning_key must be crossattn (the class vector as "
                         f"cross-attention context), got {params.get('conditioning_key')!r}")
    return params


def _check_target(path: Path, part: str, entry: dict[str, Any]) -> None:
    if entry.get("target") not in _TARGETS[part]:
        raise ValueError(f"{path}: {part} target must be {' or '.join(_TARGETS[part])}, got "
                         f"{entry.get('target')!r}")


def _number(params: Mapping[str, Any], key: str, default: float) -> float:
    """A float setting (PyYAML reads ``1e-4``, without a dot, as a string)."""
    value = params.get(key, default)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"LDM config: {key} must be a number, got {value!r}") from None


def _ints(values: Any, key: str) -> list[int]:
    if not isinstance(values, list | tuple) or not all(isinstance(v, int) for v in values):
        raise ValueError(f"LDM config: {key} must be a list of integers, got {values!r}")
    return [int(v) for v in values]


def _unet_settings(p: Mapping[str, Any]) -> dict[str, Any]:
    """The openaimodel ``UNetModel`` settings, refusing those diffusers' UNet cannot hold."""
    # setting: (openaimodel's default, the only value supported)
    fixed = {"dims": (2, 2), "conv_resample": (True, True), "resblock_updown": (False, False),
             "num_classes": (None, None), "n_embed": (None, None),
             "use_spatial_transformer": (False, True)}
    for key, (default, needed) in fixed.items():
        if p.get(key, default) != needed:
            raise ValueError(f"LDM unet_config: {key}={p.get(key, default)!r} is not supported "
                             f"(needs {needed!r})")
    mult = _ints(p.get("channel_mult", [1, 2, 4, 8]), "channel_mult")
    if mult[0] != 1:
        raise ValueError(f"LDM unet_config: channel_mult must start with 1, got {mult}")
    context_dim, depth = p.get("context_dim"), p.get("transformer_depth", 1)
    if not isinstance(context_dim, int) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"LDM unet_config: context_dim and transformer_depth must be integers, "
                         f"got {context_dim!r}, {depth!r}")
    model_channels = int(p["model_channels"])
    heads, head_channels = int(p.get("num_heads", -1)), int(p.get("num_head_channels", -1))
    if heads == -1 and head_channels == -1:
        raise ValueError("LDM unet_config: set num_heads or num_head_channels")
    level_heads = []  # as openaimodel: num_head_channels, if set, fixes the head width
    for m in mult:
        channels = model_channels * m
        if head_channels != -1 and channels % head_channels:
            raise ValueError(f"LDM unet_config: {channels} channels do not split into heads of "
                             f"{head_channels}")
        level_heads.append(channels // head_channels if head_channels != -1 else heads)
    return {"in_channels": int(p["in_channels"]), "out_channels": int(p["out_channels"]),
            "model_channels": model_channels, "channel_mult": mult,
            "num_res_blocks": int(p["num_res_blocks"]),
            "attention_resolutions": set(_ints(p["attention_resolutions"], "attention_resolutions")),
            "heads": level_heads, "context_dim": context_dim, "depth": depth,
            "image_size": int(p.get("image_size", 64)),
            "scale_shift": bool(p.get("use_scale_shift_norm", False))}


def _vq_settings(first_stage: Mapping[str, Any]) -> dict[str, Any]:
    dd = first_stage.get("ddconfig")
    if not isinstance(dd, dict):
        raise ValueError("LDM first_stage_config: params.ddconfig is missing")
    if dd.get("double_z", True):
        raise ValueError("LDM first_stage_config: a VQ first stage has double_z: false")
    if dd.get("attn_resolutions"):
        raise ValueError("LDM first_stage_config: attention at attn_resolutions "
                         f"{dd['attn_resolutions']} is not supported (only the middle block's)")
    if dd.get("attn_type", "vanilla") != "vanilla" or dd.get("use_linear_attn") or \
            dd.get("give_pre_end") or dd.get("tanh_out") or not dd.get("resamp_with_conv", True):
        raise ValueError("LDM first_stage_config: only the vanilla-attention, conv-resampling "
                         "Encoder/Decoder is supported")
    if first_stage.get("remap") is not None:
        raise ValueError("LDM first_stage_config: a remapped codebook (remap) is not supported")
    return {"ch": int(dd["ch"]), "ch_mult": _ints(dd["ch_mult"], "ch_mult"),
            "num_res_blocks": int(dd["num_res_blocks"]), "in_channels": int(dd["in_channels"]),
            "out_ch": int(dd["out_ch"]), "z_channels": int(dd["z_channels"]),
            "resolution": int(dd["resolution"]), "embed_dim": int(first_stage["embed_dim"]),
            "n_embed": int(first_stage["n_embed"])}


# ---------------------------------------------------------------------------------- key maps
def _pairs(mapping: dict[str, str], src: str, dst: str, names: tuple[str, ...] = ("weight", "bias")) -> None:
    for name in names:
        mapping[f"{src}.{name}"] = f"{dst}.{name}"


def unet_key_map(unet_params: Mapping[str, Any]) -> dict[str, str]:
    """openaimodel ``UNetModel`` key (without ``model.diffusion_model.``) -> diffusers
    ``UNet2DConditionModel`` key, for every tensor of the configuration.

    ``input_blocks.0`` is ``conv_in``; level ``L``'s ``num_res_blocks`` resblocks (each with a
    ``SpatialTransformer`` where ``2**L`` is in ``attention_resolutions``) and its downsample
    follow; ``output_blocks`` run the levels backwards with ``num_res_blocks + 1`` resblocks,
    the last one followed by the upsample (not at level 0).

    Args:
        unet_params: ``unet_config.params`` of the LDM YAML.
    """
    s = _unet_settings(unet_params)
    mapping: dict[str, str] = {}

    def resblock(src: str, dst: str, cin: int, cout: int) -> None:
        for a, b in (("in_layers.0", "norm1"), ("in_layers.2", "conv1"),
                     ("emb_layers.1", "time_emb_proj"), ("out_layers.0", "norm2"),
                     ("out_layers.3", "conv2")):
            _pairs(mapping, f"{src}.{a}", f"{dst}.{b}")
        if cin != cout:
            _pairs(mapping, f"{src}.skip_connection", f"{dst}.conv_shortcut")

    def transformer(src: str, dst: str) -> None:
        for name in ("norm", "proj_in", "proj_out"):
            _pairs(mapping, f"{src}.{name}", f"{dst}.{name}")
        for d in range(s["depth"]):
            block = f"transformer_blocks.{d}"
            for attn in ("attn1", "attn2"):
                for proj in ("to_q", "to_k", "to_v"):  # bias=False in LDM's CrossAttention
                    _pairs(mapping, f"{src}.{block}.{attn}.{proj}", f"{dst}.{block}.{attn}.{proj}",
                           ("weight",))
                _pairs(mapping, f"{src}.{block}.{attn}.to_out.0", f"{dst}.{block}.{attn}.to_out.0")
            for name in ("ff.net.0.proj", "ff.net.2", "norm1", "norm2", "norm3"):
                _pairs(mapping, f"{src}.{block}.{name}", f"{dst}.{block}.{name}")

    _pairs(mapping, "time_embed.0", "time_embedding.linear_1")
    _pairs(mapping, "time_embed.2", "time_embedding.linear_2")
    _pairs(mapping, "input_blocks.0.0", "conv_in")
    mc, nrb, levels = s["model_channels"], s["num_res_blocks"], len(s["channel_mult"])
    ch, skips, k = mc, [mc], 1
    for level, m in enumerate(s["channel_mult"]):
        attention = 2 ** level in s["attention_resolutions"]
        for j in range(nrb):
            resblock(f"input_blocks.{k}.0", f"down_blocks.{level}.resnets.{j}", ch, m * mc)
            ch = m * mc
            if attention:
                transformer(f"input_blocks.{k}.1", f"down_blocks.{level}.attentions.{j}")
            skips.append(ch)
            k += 1
        if level != levels - 1:
            _pairs(mapping, f"input_blocks.{k}.0.op", f"down_blocks.{level}.downsamplers.0.conv")
            skips.append(ch)
            k += 1
    resblock("middle_block.0", "mid_block.resnets.0", ch, ch)
    transformer("middle_block.1", "mid_block.attentions.0")
    resblock("middle_block.2", "mid_block.resnets.1", ch, ch)
    k = 0
    for i, level in enumerate(reversed(range(levels))):
        m = s["channel_mult"][level]
        attention = 2 ** level in s["attention_resolutions"]
        for j in range(nrb + 1):
            resblock(f"output_blocks.{k}.0", f"up_blocks.{i}.resnets.{j}", ch + skips.pop(), m * mc)
            ch = m * mc
            if attention:
                transformer(f"output_blocks.{k}.1", f"up_blocks.{i}.attentions.{j}")
            if level and j == nrb:
                _pairs(mapping, f"output_blocks.{k}.{2 if attention else 1}.conv",
                       f"up_blocks.{i}.upsamplers.0.conv")
            k += 1
    _pairs(mapping, "out.0", "conv_norm_out")
    _pairs(mapping, "out.2", "conv_out")
    return mapping


def vq_key_map(first_stage_params: Mapping[str, Any]) -> dict[str, str]:
    """LDM ``VQModel`` key (without ``first_stage_model.``) -> diffusers ``VQModel`` key.

    The decoder's ``up`` list is indexed by resolution level (``up.0`` the finest), diffusers'
    ``up_blocks`` in decoding order, so ``up.{L}`` is ``up_blocks.{levels - 1 - L}``. The middle
    attention's 1x1 convolutions become diffusers' linear ``to_q``/``to_k``/``to_v``/``to_out.0``
    (their weights are reshaped by the converter).

    Args:
        first_stage_params: ``first_stage_config.params`` of the LDM YAML.
    """
    s = _vq_settings(first_stage_params)
    mapping: dict[str, str] = {}

    def resblock(src: str, dst: str, cin: int, cout: int) -> None:
        for name in ("norm1", "conv1", "norm2", "conv2"):
            _pairs(mapping, f"{src}.{name}", f"{dst}.{name}")
        if cin != cout:
            _pairs(mapping, f"{src}.nin_shortcut", f"{dst}.conv_shortcut")

    def middle(src: str, dst: str, ch: int) -> None:
        resblock(f"{src}.mid.block_1", f"{dst}.mid_block.resnets.0", ch, ch)
        for a, b in (("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"),
                     ("proj_out", "to_out.0")):
            _pairs(mapping, f"{src}.mid.attn_1.{a}", f"{dst}.mid_block.attentions.0.{b}")
        resblock(f"{src}.mid.block_2", f"{dst}.mid_block.resnets.1", ch, ch)

    ch, mult, nrb = s["ch"], s["ch_mult"], s["num_res_blocks"]
    levels = len(mult)
    _pairs(mapping, "encoder.conv_in", "encoder.conv_in")
    block_in = ch
    for level, m in enumerate(mult):
        for j in range(nrb):
            resblock(f"encoder.down.{level}.block.{j}", f"encoder.down_blocks.{level}.resnets.{j}",
                     block_in, ch * m)
            block_in = ch * m
        if level != levels - 1:
            _pairs(mapping, f"encoder.down.{level}.downsample.conv",
                   f"encoder.down_blocks.{level}.downsamplers.0.conv")
    middle("encoder", "encoder", block_in)
    _pairs(mapping, "encoder.norm_out", "encoder.conv_norm_out")
    _pairs(mapping, "encoder.conv_out", "encoder.conv_out")
    for name in ("quant_conv", "post_quant_conv"):
        _pairs(mapping, name, name)
    _pairs(mapping, "quantize.embedding", "quantize.embedding", ("weight",))
    block_in = ch * mult[-1]
    _pairs(mapping, "decoder.conv_in", "decoder.conv_in")
    middle("decoder", "decoder", block_in)
    for i, level in enumerate(reversed(range(levels))):
        for j in range(nrb + 1):
            resblock(f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{i}.resnets.{j}",
                     block_in, ch * mult[level])
            block_in = ch * mult[level]
        if level != 0:
            _pairs(mapping, f"decoder.up.{level}.upsample.conv", f"decoder.up_blocks.{i}.upsamplers.0.conv")
    _pairs(mapping, "decoder.norm_out", "decoder.conv_norm_out")
    _pairs(mapping, "decoder.conv_out", "decoder.conv_out")
    return mapping


# ---------------------------------------------------------------------------------- models
def _unet(unet_params: Mapping[str, Any]) -> UNet2DConditionModel:
    s = _unet_settings(unet_params)
    levels = range(len(s["channel_mult"]))
    attention = [2 ** level in s["attention_resolutions"] for level in levels]
    return UNet2DConditionModel(
        sample_size=s["image_size"], in_channels=s["in_channels"], out_channels=s["out_channels"],
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attention[::-1]),
        block_out_channels=tuple(s["model_channels"] * m for m in s["channel_mult"]),
        layers_per_block=s["num_res_blocks"], cross_attention_dim=s["context_dim"],
        # diffusers' attention_head_dim of this class is the number of heads (its naming quirk)
        attention_head_dim=tuple(s["heads"]), transformer_layers_per_block=s["depth"],
        norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0,
        downsample_padding=1, use_linear_projection=False, act_fn="silu",
        resnet_time_scale_shift="scale_shift" if s["scale_shift"] else "default")


def _vq(first_stage_params: Mapping[str, Any], scale_factor: float) -> VQModel:
    s = _vq_settings(first_stage_params)
    levels = len(s["ch_mult"])
    return VQModel(in_channels=s["in_channels"], out_channels=s["out_ch"],
                   down_block_types=("DownEncoderBlock2D",) * levels,
                   up_block_types=("UpDecoderBlock2D",) * levels,
                   block_out_channels=tuple(s["ch"] * m for m in s["ch_mult"]),
                   layers_per_block=s["num_res_blocks"], act_fn="silu",
                   latent_channels=s["z_channels"], sample_size=s["resolution"],
                   num_vq_embeddings=s["n_embed"], vq_embed_dim=s["embed_dim"],
                   norm_num_groups=32, scaling_factor=scale_factor)


def _scheduler(params: Mapping[str, Any]) -> DDIMScheduler:
    schedule = params.get("beta_schedule", "linear")
    if schedule not in _BETA_SCHEDULES:
        raise ValueError(f"LDM config: beta_schedule {schedule!r} is not supported "
                         f"({', '.join(_BETA_SCHEDULES)})")
    if params.get("given_betas") is not None:
        raise ValueError("LDM config: given_betas is not supported")
    parameterization = params.get("parameterization", "eps")
    if parameterization not in _PARAMETERIZATIONS:
        raise ValueError(f"LDM config: unknown parameterization {parameterization!r}")
    return DDIMScheduler(num_train_timesteps=int(params.get("timesteps", 1000)),
                         beta_start=_number(params, "linear_start", 1e-4),
                         beta_end=_number(params, "linear_end", 2e-2),
                         beta_schedule=_BETA_SCHEDULES[schedule], clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
                         prediction_type=_PARAMETERIZATIONS[parameterization])


# ---------------------------------------------------------------------------------- checkpoint
def _load_state_dict(path: Path, trusted: bool) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"LDM checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError as err:
        if trusted:
            raise ValueError(f"{path} is not a readable checkpoint ({err})") from None
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path} holds more than tensors ({reason}); if you trust its source, "
                         "convert with --trusted true (unpickles it)") from None
    except Exception as err:  # truncated zip, text file, ...
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path} is not a readable checkpoint ({reason})") from None
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not checkpoint or \
            not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in checkpoint.items()):
        raise ValueError(f"{path} is not an LDM checkpoint (no state_dict of tensors)")
    return checkpoint


def _named(keys: set[str]) -> str:
    names = sorted(keys)
    more = f" and {len(names) - _MAX_NAMED} more" if len(names) > _MAX_NAMED else ""
    return ", ".join(names[:_MAX_NAMED]) + more


def _ema_weights(state: dict[str, torch.Tensor], unet_keys: list[str]) -> dict[str, torch.Tensor]:
    """LitEma's ``model_ema.<key without dots>`` shadow of each ``model.diffusion_model`` key."""
    out, missing = {}, set()
    for key in unet_keys:
        ema = "model_ema." + ("diffusion_model." + key).replace(".", "")
        if ema in state:
            out[_UNET_PREFIX + key] = state[ema]
        else:
            missing.add(ema)
    if missing:
        raise ValueError(f"use_ema is set but the checkpoint lacks EMA weights: {_named(missing)}")
    return out


def _load_strict(model: nn.Module, tensors: dict[str, torch.Tensor], what: str) -> None:
    expected = model.state_dict()
    for key, tensor in tensors.items():
        if key in expected and tuple(expected[key].shape) != tuple(tensor.shape):
            raise ValueError(f"{what}: {key} has shape {list(tensor.shape)} in the checkpoint but "
                             f"the config gives {list(expected[key].shape)}")
    result = model.load_state_dict(tensors, strict=False)
    if result.missing_keys or result.unexpected_keys:  # a gap in this module's key map
        raise ValueError(f"{what}: the converted weights do not fill the model (missing "
                         f"{_named(set(result.missing_keys))}; unexpected "
                         f"{_named(set(result.unexpected_keys))})")


def convert_ldm_checkpoint(ckpt_path: str | os.PathLike, config_path: str | os.PathLike,
                           folder: str | os.PathLike, *, null_class: bool = True,
                           image_mean: tuple[float, ...] | None = None,
                           image_std: tuple[float, ...] | None = None,
                           trusted: bool = False) -> Path:
    """Convert an original LDM class-conditional checkpoint into an LD3M generator folder.

    The folder is written to a temporary folder next to ``folder`` and renamed into place
    (:meth:`LatentGenerator.save_pretrained`).

    Args:
        ckpt_path: The ``.ckpt`` (``torch.save`` of a dict with ``state_dict``).
        config_path: Its original YAML (e.g. ``cin256-v2.yaml``).
        folder: Where the generator goes.
        null_class: The table's last row is the null class of classifier-free guidance
            (cin256-v2: row 1000 of 1001), not a real class.
        image_mean: The normalised image space's mean (default ImageNet's for RGB images).
        image_std: Its std (default ImageNet's for RGB images).
        trusted: Unpickle a checkpoint that holds more than tensors (``weights_only=False``);
            only for a checkpoint from a trusted source.

    Returns:
        ``folder`` as a ``Path``.

    Raises:
        FileNotFoundError: The checkpoint or the config is missing.
        ValueError: The config is not supported or the checkpoint does not match it (missing,
            extra or misshapen keys, another noise schedule).
    """
    ckpt_path, config_path = Path(ckpt_path), Path(config_path)
    params = read_ldm_config(config_path)
    unet_params = params["unet_config"]["params"]
    vq_params = params["first_stage_config"]["params"]
    unet_map, vq_map = unet_key_map(unet_params), vq_key_map(vq_params)
    scheduler = _scheduler(params)
    state = _load_state_dict(ckpt_path, trusted)

    expected = {_UNET_PREFIX + k for k in unet_map} | {_VQ_PREFIX + k for k in vq_map}
    expected.add(_TABLE_KEY)
    scale_by_std = bool(params.get("scale_by_std", False))
    if scale_by_std:
        expected.add("scale_factor")  # then a buffer (1 / std of the training latents)
    known = expected | set(SCHEDULE_BUFFERS)
    missing = expected - set(state)
    extra = {k for k in state if k not in known and not k.startswith(IGNORED_PREFIXES)}
    if missing:
        raise ValueError(f"{ckpt_path} does not match {config_path.name}: missing "
                         f"{len(missing)} key(s): {_named(missing)}")
    if extra:
        raise ValueError(f"{ckpt_path} does not match {config_path.name}: {len(extra)} unexpected "
                         f"key(s): {_named(extra)}")
    if "betas" in state:  # the checkpoint's schedule must be the one the scheduler reproduces
        stored = state["betas"].double()
        ours = scheduler.betas.double()
        if stored.shape != ours.shape or not torch.allclose(stored, ours, rtol=1e-5, atol=1e-8):
            raise ValueError(f"{ckpt_path}'s betas are not the {params.get('beta_schedule', 'linear')} "
                             f"schedule of {config_path.name} (linear_start, linear_end, timesteps)")
    use_ema = bool(params.get("use_ema", True))  # DDPM's default is True
    weights = dict(state)
    if use_ema and any(k.startswith("model_ema.") for k in state):
        weights.update(_ema_weights(state, list(unet_map)))
        log.info("using the EMA weights of the denoiser (use_ema: true)")
    elif use_ema:
        log.warning("use_ema is set but %s holds no model_ema weights: converting model.*",
                    ckpt_path)

    scale_factor = float(state["scale_factor"]) if scale_by_std else _number(params, "scale_factor", 1.0)
    vae, unet = _vq(vq_params, scale_factor), _unet(unet_params)
    vq_tensors = {vq_map[k]: weights[_VQ_PREFIX + k] for k in vq_map}
    for name in ("q", "k", "v", "proj_out"):  # 1x1 convolutions -> linear layers
        for part in ("encoder", "decoder"):
            key = vq_map[f"{part}.mid.attn_1.{name}.weight"]
            if vq_tensors[key].dim() == 4:
                vq_tensors[key] = vq_tensors[key][:, :, 0, 0]
    _load_strict(vae, vq_tensors, "first_stage_model")
    _load_strict(unet, {unet_map[k]: weights[_UNET_PREFIX + k] for k in unet_map},
                 "model.diffusion_model")

    table_weight = state[_TABLE_KEY]
    n_classes = int(params["cond_stage_config"]["params"].get("n_classes", 1000))
    if table_weight.dim() != 2 or table_weight.shape[0] != n_classes:
        raise ValueError(f"{_TABLE_KEY} has shape {list(table_weight.shape)}; the config's "
                         f"ClassEmbedder has n_classes={n_classes} rows")
    table = nn.Embedding(*table_weight.shape)
    table.weight.data.copy_(table_weight)
    num_classes = n_classes - 1 if null_class else n_classes
    vq = _vq_settings(vq_params)
    image_shape = (vq["in_channels"], vq["resolution"], vq["resolution"])
    rgb = image_shape[0] == 3
    if image_mean is None and rgb:
        image_mean = _dit.IMAGENET_MEAN
    if image_std is None and rgb:
        image_std = _dit.IMAGENET_STD
    meta = {"source": {"format": "CompVis latent-diffusion", "checkpoint": ckpt_path.name,
                       "config": config_path.name, "conditioning_key": "crossattn",
                       "first_stage": params["first_stage_config"]["target"],
                       "cond_stage": params["cond_stage_config"]["target"],
                       "scale_factor": scale_factor, "use_ema": use_ema,
                       "beta_schedule": params.get("beta_schedule", "linear"),
                       "linear_start": _number(params, "linear_start", 1e-4),
                       "linear_end": _number(params, "linear_end", 2e-2)}}
    generator = LatentGenerator(vae, unet, scheduler, num_classes, image_shape,
                                null_class=num_classes if null_class else None,
                                image_mean=image_mean, image_std=image_std,
                                scaling_factor=scale_factor, shift_factor=0.0, quantize=True,
                                meta=meta, class_table=table)
    if list(generator.latent_shape[1:]) != [_unet_settings(unet_params)["image_size"]] * 2:
        log.warning("the UNet's image_size %s is not the first stage's latent side %d",
                    unet_params.get("image_size"), generator.latent_shape[1])
    target = generator.save_pretrained(folder)
    log.info("converted %s (%d tensors; %d classes%s, latent %s) into %s", ckpt_path,
             len(expected), num_classes, " + null" if null_class else "",
             "x".join(map(str, generator.latent_shape)), target)
    return target


def convert_ldm(ckpt: str, ldm_config: str, folder: str, null_class: bool = True,
                trusted: bool = False) -> Path:
    """Convert a CompVis latent-diffusion class-conditional checkpoint into an LD3M generator
    folder. It is the LDM paper's cin256-v2 layout (VQ-f4 first stage, cross-attention UNet,
    ClassEmbedder); ``--model LD3M --model.generator FOLDER`` then loads it. Every checkpoint
    key is mapped; a checkpoint that does not match its config is refused.

    Args:
        ckpt: The original checkpoint (``.ckpt``).
        ldm_config: Its original YAML (e.g. ``configs/latent-diffusion/cin256-v2.yaml``; not
            ``--config``, which is this command's own settings file).
        folder: Output folder (written atomically; an existing generator folder is replaced).
        null_class: The class table's last row is the null class of classifier-free guidance
            (cin256-v2's row 1000), not a real class.
        trusted: Unpickle a checkpoint that holds more than tensors (only from a trusted source).
    """
    return convert_ldm_checkpoint(ckpt, ldm_config, folder, null_class=null_class,
                                  trusted=trusted)

