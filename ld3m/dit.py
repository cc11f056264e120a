"""DiT as the generator of LD3M: the diffusers ``DiTPipeline`` folder and the DiT specifics.

:class:`ld3m.generator.LatentGenerator` uses a :class:`~diffusers.DiTTransformer2DModel` as its
denoiser in place of a ``UNet2DModel``; this module holds what differs (the folder layout, the
class tables, the learned-sigma output, the scheduler conversion). A DiT folder is the layout
``DiTPipeline.save_pretrained`` writes, as the public ``facebook/DiT-XL-2-256`` / ``-512``
folders::

    folder/model_index.json          # "_class_name": "DiTPipeline" (+ an optional id2label)
    folder/transformer/{config.json, diffusion_pytorch_model.safetensors}
    folder/vae/{config.json, diffusion_pytorch_model.safetensors}   # AutoencoderKL
    folder/scheduler/scheduler_config.json
    folder/ld3m_generator.json       # optional: image_mean, image_std, meta (written by ld3m)

The transformer's ``config.json`` may name the class ``Transformer2DModel`` (with ``norm_type``
``ada_norm_zero``): the public folders were converted before ``DiTTransformer2DModel`` existed,
and diffusers maps the one onto the other (``diffusers/models/model_loading_utils.py``,
``_CLASS_REMAPPING_DICT``); the weights' key names are the same.

**The DiT specifics.**

- *Classes and the null class.* DiT is conditioned on ``timestep embedding + class embedding``
  through every block's adaLN-Zero (``transformer_blocks.i.norm1.emb``, a
  ``CombinedTimestepLabelEmbeddings``), whose ``class_embedder`` is a ``LabelEmbedding`` with a
  table of ``num_embeds_ada_norm + 1`` rows: the extra row, index ``num_embeds_ada_norm``, is the
  label classifier-free guidance drops to (``LabelEmbedding.token_drop`` replaces a dropped
  label by ``self.num_classes``, ``diffusers/models/embeddings.py``). So ``num_classes =
  num_embeds_ada_norm`` and ``null_class = num_embeds_ada_norm``.
- *One learnable class embedding per image, shared by all blocks.* diffusers keeps a copy of
  the class table in each block, but the model has only one: the original DiT has a single
  ``y_embedder`` whose output conditions all blocks (and the final layer), and diffusers'
  ``scripts/convert_dit_to_diffusers.py`` copies ``y_embedder.embedding_table.weight`` into
  every ``transformer_blocks.{depth}.norm1.emb.class_embedder.embedding_table.weight``
  (``DiTTransformer2DModel.forward`` conditions its final layer on block 0's ``norm1.emb``).
  LD3M's authors learn, per synthetic image, the *output* of the model's one class embedder
  (``prepare_latents`` in ``src/glad_utils.py`` of Brian-Moser/prune_and_distill: ``c =
  G.get_learned_conditioning({cond_stage_key: [imagenet label]})``, a 512-vector from the LDM's
  ``ClassEmbedder``, then passed as ``conditioning`` to every cross-attention layer; the null
  conditioning is label 1000's). We mirror that: ``c`` is one ``hidden_size`` vector per image,
  initialised to the class's table row and fed, in place of the looked-up row, to *every*
  block's class embedder (each block's table is wrapped by
  :class:`~ld3m.generator.VectorClassEmbedding`, so a float ``(N, hidden_size)`` passes
  through and integer labels are still looked up). A folder whose blocks hold *different*
  tables cannot be represented by one vector per image and is refused.
- *Learned sigma.* With ``out_channels = 2 x in_channels`` the transformer predicts the noise
  and the variance interpolation; the first half is the prediction (``DiTPipeline.__call__``:
  ``model_output, _ = torch.split(noise_pred, latent_channels, dim=1)``), used here.
- *The scheduler.* The generator samples with DDIM: a non-DDIM ``scheduler_config.json`` (the
  conversion script writes a ``DDPMScheduler``) becomes a ``DDIMScheduler`` with the same
  noise schedule (``num_train_timesteps``, ``beta_start``, ``beta_end``, ``beta_schedule``,
  ``trained_betas``) and the settings the two share (``prediction_type``, ``steps_offset``,
  ``timestep_spacing``, ``clip_sample``, ...). ``clip_sample`` is taken from the file; where the
  file has none it is off (a latent-space model: DiT's own ``sample.py`` samples with
  ``clip_denoised=False``).
- *Image space.* No ``ld3m_generator.json``: the images are assumed normalised with the
  ImageNet mean/std (:data:`IMAGENET_MEAN`, :data:`IMAGENET_STD`), the normalisation LD3M's
  code uses for its ImageNet subsets (``src/utils.py``, ``get_dataset``: ``mean = [0.485,
  0.456, 0.406]``, ``std = [0.229, 0.224, 0.225]``) and maps the generator's ``[-1, 1]`` output
  to (``ldm_latent_to_im`` in ``src/glad_utils.py``: ``(x + 1) / 2`` then ``(x - mean) / std``);
  ``LatentGenerator.from_pretrained(..., image_mean=, image_std=)`` or an
  ``ld3m_generator.json`` says otherwise. The VAE's ``scaling_factor`` (0.18215 in the public
  folders) scales the latents as in ``DiTPipeline.__call__`` (``1 / scaling_factor * latents``
  before ``vae.decode``).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel
from torch import nn

from ld3m.files import read_json_object

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "MODEL_INDEX", "PIPELINE_CLASS", "class_tables",
           "ddim_scheduler", "epsilon", "image_shape", "is_dit_folder", "read_model_index",
           "write_model_index"]

MODEL_INDEX = "model_index.json"
PIPELINE_CLASS = "DiTPipeline"
#: names a DiT transformer's ``config.json`` may carry (the public folders say the legacy one)
TRANSFORMER_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")
#: LD3M's ImageNet normalisation (prune_and_distill ``src/utils.py``, ``get_dataset``)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: what a non-DDIM scheduler config may pass on to the DDIMScheduler (DDIM's own arguments)
_DDIM_ARGS = frozenset(inspect.signature(DDIMScheduler.__init__).parameters) - {"self"}


def read_model_index(folder: Path) -> dict[str, Any] | None:
    """``folder/model_index.json`` as a dict, or ``None`` when there is none."""
    path = folder / MODEL_INDEX
    if not path.is_file():
        return None
    return read_json_object(path)


def is_dit_folder(folder: Path) -> bool:
    """Whether ``folder`` is a ``DiTPipeline`` folder (its ``model_index.json`` says so).

    Raises:
        ValueError: ``model_index.json`` names another pipeline.
    """
    index = read_model_index(folder)
    if index is None:
        return False
    name = index.get("_class_name")
    if name != PIPELINE_CLASS:
        raise ValueError(f"{folder} holds a {name} pipeline; LatentGenerator loads a {PIPELINE_CLASS} "
                         "folder or a folder written by ld3m prior / LatentGenerator.save_pretrained")
    return True


def id2label(index: dict[str, Any], num_classes: int) -> dict[int, str] | None:
    """The ``id2label`` of a ``model_index.json`` (the ImageNet class names of the public
    folders) with integer keys, or ``None``."""
    raw = index.get("id2label")
    if raw is None:
        return None
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise ValueError(f"{MODEL_INDEX}: id2label must map class ids to names")
    try:
        mapping = {int(k): v for k, v in raw.items()}
    except ValueError as err:
        raise ValueError(f"{MODEL_INDEX}: id2label keys must be class ids: {err}") from err
    if any(not 0 <= k < num_classes for k in mapping):
        raise ValueError(f"{MODEL_INDEX}: id2label has ids outside [0, {num_classes})")
    return dict(sorted(mapping.items()))


def write_model_index(folder: Path, scheduler: object, vae: object,
                      id2label: dict[int, str] | None) -> None:
    """Write the ``model_index.json`` of a DiT folder, as ``DiTPipeline.save_pretrained`` does."""
    index: dict[str, Any] = {"_class_name": PIPELINE_CLASS, "_diffusers_version": diffusers.__version__,
                             "scheduler": ["diffusers", type(scheduler).__name__],
                             "transformer": ["diffusers", "DiTTransformer2DModel"],
                             "vae": ["diffusers", type(vae).__name__]}
    if id2label is not None:
        index["id2label"] = {str(k): v for k, v in sorted(id2label.items())}
    (folder / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def class_tables(transformer: DiTTransformer2DModel) -> list[nn.Embedding]:
    """Every block's class table (``transformer_blocks.i.norm1.emb.class_embedder.embedding_table``).

    Raises:
        ValueError: The transformer is not an adaLN-Zero, class-conditional DiT, or its blocks
            hold different tables (one class vector per image could not stand for a label).
    """
    if transformer.config.norm_type != "ada_norm_zero" or not transformer.config.num_embeds_ada_norm:
        raise ValueError("the DiT transformer must be class-conditional (norm_type ada_norm_zero, "
                         "num_embeds_ada_norm set)")
    tables = []
    for i, block in enumerate(transformer.transformer_blocks):
        emb = getattr(getattr(block, "norm1", None), "emb", None)
        table = getattr(getattr(emb, "class_embedder", None), "embedding_table", None)
        if not isinstance(table, nn.Embedding):
            raise ValueError(f"transformer block {i} has no adaLN-Zero class table "
                             "(norm1.emb.class_embedder.embedding_table)")
        tables.append(table)
    if not tables:
        raise ValueError("the DiT transformer has no blocks")
    first = tables[0].weight
    for i, table in enumerate(tables[1:], start=1):
        if table.weight.shape != first.shape or not torch.equal(table.weight, first):
            raise ValueError(f"the class tables of transformer blocks 0 and {i} differ: LD3M learns one "
                             "class embedding per image for all blocks, as DiT has one class "
                             "embedder (its converted folders copy it into every block)")
    return tables


def epsilon(transformer: DiTTransformer2DModel, x: torch.Tensor, t: torch.Tensor,
            c: torch.Tensor) -> torch.Tensor:
    """The transformer's prediction for latents ``x`` at timestep ``t`` (a scalar tensor) and
    class embeddings ``c`` (floats) or labels (integers): the first ``in_channels`` output
    channels (the learned-sigma half is dropped)."""
    out = transformer(x, t.expand(x.shape[0]), class_labels=c, return_dict=False)[0]
    channels = x.shape[1]
    return out[:, :channels] if out.shape[1] != channels else out


def check_transformer(transformer: DiTTransformer2DModel, latent_shape: tuple[int, int, int]) -> None:
    """Refuse a transformer that does not fit the VAE's latents."""
    channels, h, w = latent_shape
    cfg = transformer.config
    if cfg.in_channels != channels or transformer.out_channels not in (channels, 2 * channels):
        raise ValueError(f"the DiT transformer maps {cfg.in_channels} -> {transformer.out_channels} "
                         f"channels but the latents have {channels} (out: {channels}, or "
                         f"{2 * channels} with learned sigma)")
    if (h, w) != (cfg.sample_size, cfg.sample_size):
        raise ValueError(f"the DiT transformer takes {cfg.sample_size}x{cfg.sample_size} latents but "
                         f"the images give {h}x{w}")


def image_shape(vae_config: Any, transformer_config: Any) -> tuple[int, int, int]:
    """``(C, H, W)`` of the images a DiT folder renders: the transformer's latent size times the
    VAE's downsampling factor."""
    side = int(transformer_config.sample_size) * 2 ** (len(vae_config.block_out_channels) - 1)
    return (int(vae_config.in_channels), side, side)


def ddim_scheduler(folder: Path) -> DDIMScheduler:
    """The ``DDIMScheduler`` of ``folder/scheduler/scheduler_config.json``, converted (same noise
    schedule) when the file names another scheduler."""
    path = folder / "scheduler_config.json"
    cfg = read_json_object(path)
    if cfg.get("_class_name") == "DDIMScheduler":
        return DDIMScheduler.from_pretrained(folder, local_files_only=True)
    kwargs = {k: v for k, v in cfg.items() if k in _DDIM_ARGS}
    kwargs.setdefault("clip_sample", False)
    return DDIMScheduler(**kwargs)
