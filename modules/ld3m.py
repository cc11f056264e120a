"""LD3M: dataset distillation in the latent space of a diffusion model (Moser et al. 2024).

Every synthetic image is rendered by a frozen class-conditional latent diffusion model
(:class:`ld3m.generator.LatentGenerator`) from a learnable latent ``z`` and a learnable class
embedding ``c``: ``T`` DDIM steps from ``q_sample(z, t_T)`` with LD3M's skip, then the decoder.
``z`` starts as the encoding of a random real image of the class, ``c`` as the class's row of
the denoiser's table.

**Noise** (``noise``): ``fresh`` (the default, as the authors') draws new ``q_sample`` noise at
every render. In their code (``src/latentdiff/ldm/models/diffusion/ddim.py``, ``ddim_sampling``)
``q_sample(x_T, ts)`` is called without a noise tensor, so every ``sampler.sample`` draws
``torch.randn_like``: the scored render of a step and the re-render of their chunked backward
(``ldm_backward_encode`` in ``src/glad_utils.py``) each get their own. Here the draws come from
a generator keyed by ``(seed, step, render)`` on the module's device (no host sync; the same on
every DDP rank), so a run is reproducible and resumable. ``step`` draws one noise per step, shared
by the scored render and its backward (the gradient is then that of the scored images);
``fixed`` keeps one tensor per image for the whole run (drawn from ``seed``; ld3m's earlier
behaviour). The ``noise`` buffer holds the noise of the latest stored render, so an exported
set can be rendered again exactly.

**Defaults as the authors' scripts** (Brian-Moser/prune_and_distill, ``src/``): classifier-free
guidance 3.0 and ``ddim_steps`` 10 (``distill_{dm,dc,mtt}_LD3M.py``); one SGD learning rate
``lr_w`` for ``z`` and ``c`` (``get_optimizer_img_LDM_encode`` in ``glad_utils.py`` puts both
groups at ``args.lr_w``, momentum 0.5; their ``lr_img`` is unused there): 1 for DM
(``distill_dm_LD3M.py``), 0.1 for DC (``distill_dc_LD3M.py``), 1000 for MTT
(``distill_mtt_LD3M.py``); DC with ``outer_loop`` = ``inner_loop`` = 1 and ``lr_net`` 0.01
(``distill_dc_LD3M.py``); MTT with ``syn_steps`` 10, ``expert_epochs`` 2, ``max_start_epoch`` 2,
``lr_teacher`` 0.01, ``lr_lr`` 1e-6 (``distill_mtt_LD3M.py``); 10,000 iterations
(``Iteration`` in ``shared_args.py``; the recipes' ``max_steps``). Their evaluation of the sets
is ``ld3m evaluate --protocol glad`` (:mod:`ld3m.evaluation`).

The objective is one of the pixel methods' losses, applied to the rendered images: ``dm``
(:meth:`ld3m.modules.DM.matching_loss`), ``dc`` (:meth:`ld3m.modules.DC.matching_loss`, with
DC's network re-drawn every ``outer_loop`` steps and trained ``inner_loop`` steps on the
rendered images in between) or ``mtt`` (:meth:`ld3m.modules.MTT.matching_loss` against an expert
of ``buffer``, with a learnable student lr ``syn_lr`` owned here). The objective is the method
itself, configured in one place: ``--model.objective MTT --model.objective.buffer DIR
--model.objective.syn_steps 10`` (jsonargparse's nested class arguments; any DM, DC/DSA or
MTT/DATM class, its flags and defaults its own), or a name (``dm``, ``dc``) for the LD3M
authors' settings (:data:`PUBLISHED_OBJECTIVES`). The method's module is held as a helper (not
a submodule), built from those settings with LD3M's IPC and seed, and is only asked for its
loss. (``dc``'s network is not saved in LD3M checkpoints: a resumed ``dc`` run re-draws it.)

**Memory** (the GLaD/LD3M trick): each step renders the images without a graph, takes
``dLoss/dImages`` at the detached images, then back-propagates it through the generator
``chunk_size`` images at a time (:meth:`LatentGenerator.backward_in_chunks`). Peak memory is
that of one chunk's render (with the denoiser checkpointed), whatever the IPC. Where the whole
graph fits (small images, few steps), ``chunk_size=None`` renders once with the graph and
back-propagates the loss directly: the same gradient for about half the time (measured with
``bench/ld3m_speed.py`` on the Fashion-MNIST prior, 100 images, CPU: 18.0 s against 33.1 s per
iteration at T = 10, 1.8 GB against 0.9 GB peak).

**Training**: manual optimisation (one SGD step of ``z`` and ``c`` per training step). The
chunked backward runs outside Lightning's backward, into fresh leaves, so DDP's reducer never
sees it; under DDP the gradients of ``z`` and ``c`` are then averaged across ranks with an
all-reduce before the step (every rank holds the same ``z`` and ``c`` and draws the same noise,
so they stay equal).

**What is stored**: ``latents``, ``embeddings`` and the ``noise`` are in the state dict (and
checkpoints); so are the last rendered ``images`` (a buffer, refreshed lazily by
:meth:`LD3M.synthetic_images`). The generator is not: it is loaded from its folder (``generator``)
and kept in a plain dict, so it stays out of checkpoints and of DDP's broadcast. The exported set
holds the decoded images plus ``extra.latents``/``extra.embeddings``/``extra.noise`` and, in its
metadata, the generator folder and the rendering settings, so :func:`rerender` can render it
again (e.g. with other ``steps``).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from ld3m.modules.base import DistillationModule, check_network_name
from ld3m.modules.dc import DC
from ld3m.modules.dm import DM
from ld3m.modules.mtt import MTT
from torch import nn

from ld3m.augment import DEFAULT_STRATEGY as DEFAULT_DSA
from ld3m.classes import generator_labels
from ld3m.generator import LatentGenerator
from ld3m.synthetic import SyntheticSet

__all__ = ["NOISE_MODES", "OBJECTIVES", "PUBLISHED_LR", "PUBLISHED_OBJECTIVES", "LD3M", "objective_kind",
           "resolve_objective", "rerender"]

log = logging.getLogger(__name__)

OBJECTIVES = ("dm", "dc", "mtt")

#: The authors' one learning rate of ``z`` and ``c`` per objective (``--lr_w`` of
#: ``src/distill_dm_LD3M.py``, ``src/distill_dc_LD3M.py``, ``src/distill_mtt_LD3M.py`` in
#: Brian-Moser/prune_and_distill).
PUBLISHED_LR = {"dm": 1.0, "dc": 0.1, "mtt": 1000.0}

#: The LD3M authors' settings of each objective (the name form ``objective="dm"``): their
#: ``src/distill_dm_LD3M.py`` (DM: ConvNet, DSA), ``src/distill_dc_LD3M.py`` (DC: ``outer_loop``
#: = ``inner_loop`` = 1, ``lr_net`` 0.01, DSA) and ``src/distill_mtt_LD3M.py`` (MTT:
#: ``syn_steps`` 10, ``expert_epochs`` 2, ``max_start_epoch`` 2, ``lr_teacher`` 0.01,
#: ``lr_lr`` 1e-6; it needs a ``buffer``, so it is given as a method object with these values);
#: ``lr_img`` is their ``lr_w`` of ``z`` and ``c``.
PUBLISHED_OBJECTIVES: dict[str, tuple[type[DistillationModule], dict[str, Any]]] = {
    "dm": (DM, {"network": "ConvNet", "dsa": DEFAULT_DSA, "lr_img": PUBLISHED_LR["dm"]}),
    "dc": (DC, {"network": "ConvNet", "dsa": DEFAULT_DSA, "lr_img": PUBLISHED_LR["dc"],
                "lr_net": 0.01, "outer_loop": 1, "inner_loop": 1}),
    "mtt": (MTT, {"dsa": DEFAULT_DSA, "lr_img": PUBLISHED_LR["mtt"], "syn_steps": 10,
                  "expert_epochs": 2, "max_start_epoch": 2, "lr_teacher": 0.01, "lr_lr": 1e-6}),
}

try:  # LightningCLI's "hyperparameters given by the command line" (see _build)
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters as _GIVEN_HPARAMS
except ImportError:  # pragma: no cover - another Lightning version: nothing to neutralise
    _GIVEN_HPARAMS = None

#: The objective's arguments LD3M sets itself.
_OWNED = ("ipc", "init", "seed", "num_classes", "image_shape")


def objective_kind(cls: type) -> str:
    """``dm``, ``dc`` or ``mtt``: which of the three losses a method class's objective is
    (subclasses count: DSA is a DC, DATM an MTT)."""
    for base, kind in ((MTT, "mtt"), (DC, "dc"), (DM, "dm")):
        if isinstance(cls, type) and issubclass(cls, base):
            return kind
    raise ValueError(f"LD3M's objective must be a DM, DC (or DSA) or MTT (or DATM) method, got "
                     f"{getattr(cls, '__name__', cls)!r}")


def resolve_objective(objective: Any) -> tuple[type[DistillationModule], dict[str, Any]]:
    """``(method class, its settings)`` of an ``objective`` argument: a method object (its own
    settings), ``{"class_path": ..., "init_args": ...}`` (a checkpoint's record) or a name of
    :data:`PUBLISHED_OBJECTIVES`. The arguments LD3M owns (``ipc``, ``init``, ``seed``,
    ``num_classes``, ``image_shape``) are left out."""
    if isinstance(objective, DistillationModule):
        cls = type(objective)
        names = inspect.signature(cls).parameters
        given = objective.hparams_initial  # as constructed (before a method resolves its Nones)
        recorded = given.get("objective")
        if "_instantiator" in given and isinstance(recorded, dict) and "class_path" in recorded:
            # built by LightningCLI inside LD3M's instantiation: the method recorded LD3M's
            # command-line settings as its own, and the objective's are the nested ones there
            return resolve_objective(recorded)
        args = {k: given[k] for k in names if k in given}
    elif isinstance(objective, dict) and "class_path" in objective:
        module, _, name = str(objective["class_path"]).rpartition(".")
        cls = getattr(importlib.import_module(module), name, None)
        if cls is None:
            raise ValueError(f"unknown objective class {objective['class_path']!r}")
        args = dict(objective.get("init_args") or {})
    elif isinstance(objective, str):
        key = objective.lower()
        if key not in PUBLISHED_OBJECTIVES:
            raise ValueError(f"objective must be a method (e.g. --model.objective DC) or one of "
                             f"{tuple(PUBLISHED_OBJECTIVES)}, got {objective!r}")
        cls, args = PUBLISHED_OBJECTIVES[key]
        args = dict(args)
        if key == "mtt":
            flags = " ".join(f"--model.objective.{k} {v}" for k, v in args.items() if k != "dsa")
            raise ValueError("objective 'mtt' needs a buffer of expert trajectories: give it as "
                             "the method, --model.objective MTT --model.objective.buffer DIR (made "
                             "with `ld3m buffer`); the LD3M authors' MTT settings are " + flags)
    else:
        raise ValueError(f"objective must be a method object or a name, got {type(objective).__name__}")
    objective_kind(cls)
    return cls, {k: v for k, v in args.items() if k not in _OWNED}


def _build(cls: type[DistillationModule], args: dict[str, Any]) -> DistillationModule:
    """The objective's method module, with its own settings as its hparams. Built here, outside
    ``LD3M.__init__`` (Lightning's ``save_hyperparameters`` collects the arguments of every
    enclosing ``__init__`` frame, and would record LD3M's as the method's), and outside
    LightningCLI's instantiation context (which hands LD3M's command-line settings to every
    ``save_hyperparameters`` call within)."""
    token = _GIVEN_HPARAMS.set(None) if _GIVEN_HPARAMS is not None else None
    try:
        return cls(**args)
    finally:
        if token is not None:
            _GIVEN_HPARAMS.reset(token)


def _plain(args: dict[str, Any]) -> dict[str, Any]:
    """JSON/YAML-friendly copy of an objective's settings (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in args.items()}


#: ``noise`` settings: new noise at every render (the authors'), one per step, or one fixed
#: tensor per image.
NOISE_MODES = ("fresh", "step", "fixed")

#: Images per generator call when rendering without a graph.
RENDER_BATCH = 256

_SALT_NOISE = 31
_SALT_FRESH = 32  # + the render's index within the step (0: scored render, 1: its backward)


def _render(gen: LatentGenerator, z: torch.Tensor, c: torch.Tensor, noise: torch.Tensor, steps: int,
            skip: bool, guidance: float) -> torch.Tensor:
    """Render without a graph, ``RENDER_BATCH`` images per call."""
    with torch.no_grad():
        parts = [gen.render(zp, cp, steps, skip=skip, guidance=guidance, checkpoint=False, noise=npart)
                 for zp, cp, npart in zip(z.split(RENDER_BATCH), c.split(RENDER_BATCH),
                                          noise.split(RENDER_BATCH), strict=True)]
    return torch.cat(parts)


class LD3M(DistillationModule):
    """Latent distillation through a frozen class-conditional latent diffusion model.

    Args:
        generator: Folder of the frozen generator (``LatentGenerator.save_pretrained`` or
            ``ld3m prior``); its classes and image shape must be the data's.
        ipc: Synthetic images per class.
        objective: The loss applied to the rendered images, a pixel method's: a method object
            with its own settings, on the command line ``--model.objective DM|DC|DSA|MTT`` and
            that method's flags as ``--model.objective.<flag>`` (e.g. ``--model.objective MTT
            --model.objective.buffer DIR --model.objective.syn_steps 10``; every setting is the
            method's own, its defaults the pixel method's), or a name, ``dm`` or ``dc``, for
            that method at the LD3M authors' settings (:data:`PUBLISHED_OBJECTIVES`). The
            objective's ``ipc``, ``init``, ``seed``, ``num_classes`` and ``image_shape`` are
            LD3M's; an ``mtt`` objective needs the method object (its ``buffer``).
        steps: DDIM steps ``T`` of each render (more: slower, closer to the model's samples;
            the authors' ``ddim_steps`` 10).
        guidance: Classifier-free guidance scale (1: none; needs a generator with a null class;
            the authors' ``unconditional_guidance_scale`` 3.0).
        skip: LD3M's skip from the initial latent (``x0_hat = (1 - i/T') x0_hat + (i/T') z``).
        chunk_size: Images re-rendered per backward pass (bounds the memory); ``None``: one
            render with the whole graph (no re-render; faster where it fits in memory).
        lr_latent: Learning rate of the latents ``z`` (SGD); ``None``: the objective's
            ``lr_img`` (the authors' one ``lr_w`` for ``z`` and ``c``: dm 1, dc 0.1, mtt 1000,
            which are the pixel methods' ``lr_img`` defaults too).
        lr_embedding: Learning rate of the class embeddings ``c`` (SGD); ``None``: as
            ``lr_latent``'s default.
        momentum: Momentum of the SGD of ``z`` and ``c``.
        network: Network of the objective, overriding the objective's own (``None``: keep it).
            ``mtt`` trains the buffer's network: another name is refused.
        dsa: DSA strategy of the objective, overriding the objective's own (``None``: keep it;
            ``"none"`` disables it).
        noise: The ``q_sample`` noise of the renders: ``fresh`` (new noise at every render, as
            the authors': the scored render and the chunked backward's re-render draw their
            own), ``step`` (one draw per step for both) or ``fixed`` (one tensor per image for
            the whole run). Draws are keyed by seed and step: reproducible, equal on every rank.
        class_map: The generator label each data class starts from (its row of the class
            table), one per data class in the data's order; default: found by
            :func:`ld3m.classes.generator_labels` (data classes named by wnid are looked up in
            the generator's ``id2label`` or ImageNet-1k's index, e.g. ImageNette's class 1 is
            label 217; a generator of the data's own classes maps ``k`` to ``k``), anything else
            refused. Recorded in the exported set (``meta.ld3m.generator_labels``).
        seed: Seed of the initialisation, the noise and every random draw of the objective.
        num_classes: Number of classes (default: from the data module).
        image_shape: ``(C, H, W)`` (default: from the data module).
    """

    method_name = "LD3M"
    lr_flag = "--model.lr_latent"

    def __init__(self, generator: str, ipc: int = 10, objective: DistillationModule | str = "dm",
                 steps: int = 10, guidance: float = 3.0, skip: bool = True,
                 chunk_size: int | None = 10, lr_latent: float | None = None,
                 lr_embedding: float | None = None, momentum: float = 0.5,
                 network: str | None = None, dsa: str | None = None, noise: str = "fresh", class_map: list[int] | None = None, seed: int = 0,
                 num_classes: int | None = None,
                 image_shape: tuple[int, int, int] | None = None) -> None:
        objective_class, objective_args = resolve_objective(objective)
        takes = inspect.signature(objective_class).parameters
        if network is not None and "network" in takes:  # (mtt: the buffer's, checked in setup)
            objective_args["network"] = network
        if dsa is not None:
            objective_args["dsa"] = dsa
        kind = objective_kind(objective_class)
        noise = str(noise).lower()
        if noise not in NOISE_MODES:
            raise ValueError(f"noise must be one of {NOISE_MODES}, got {noise!r}")
        # validated by the method itself (its own errors), as LD3M will build it
        prototype = _build(objective_class, {**objective_args, "ipc": ipc, "seed": seed})
        # the objective's lr_img where none is given (one lr for z and c, as the authors' lr_w)
        published = float(prototype.hparams.get("lr_img", PUBLISHED_LR[kind]))
        lr_latent = published if lr_latent is None else lr_latent
        lr_embedding = published if lr_embedding is None else lr_embedding
        for name, value in (("lr_latent", lr_latent), ("lr_embedding", lr_embedding)):
            if isinstance(value, bool) or not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number, got {value}")
        super().__init__(ipc=ipc, init="real", lr_img=lr_latent, momentum=momentum, seed=seed)
        if isinstance(steps, bool) or int(steps) != steps or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        if chunk_size is not None and (isinstance(chunk_size, bool) or int(chunk_size) != chunk_size
                                       or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
        if not math.isfinite(guidance):
            raise ValueError(f"guidance must be finite, got {guidance}")
        if network is not None:
            check_network_name(network)
        folder = Path(generator).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"no LD3M generator folder at {folder} (make one with `ld3m prior`)")
        self.save_hyperparameters(ignore=["objective"])
        # checkpoints (and the logged hparams) record the learning rates actually used and the
        # objective as a class path and its settings (what load_from_checkpoint rebuilds)
        self.hparams["lr_latent"], self.hparams["lr_embedding"] = lr_latent, lr_embedding
        self.hparams["objective"] = {"class_path": f"{objective_class.__module__}."
                                                   f"{objective_class.__qualname__}",
                                     "init_args": _plain(objective_args)}
        self.generator_dir = str(folder.resolve())
        self.noise_mode = noise
        self.class_map = None if class_map is None else [int(label) for label in class_map]
        self.objective = kind
        self.objective_class, self.objective_args = objective_class, objective_args
        self.steps = int(steps)
        self.chunk_size = int(chunk_size) if chunk_size is not None else None
        self.guidance, self.skip = float(guidance), bool(skip)
        self.lr_latent, self.lr_embedding = lr_latent, lr_embedding
        self.network = network
        self.buffer_dir = objective_args.get("buffer")
        self.lr_lr = float(prototype.hparams["lr_lr"]) if kind == "mtt" else None
        #: ``mtt``: the student's learnable learning rate (shared with the MTT helper).
        self.syn_lr = (nn.Parameter(torch.tensor(float(prototype.hparams["lr_teacher"])))
                       if kind == "mtt" else None)
        self.uses_real_batches = kind != "mtt"
        self.latents: nn.Parameter | None = None
        self.embeddings: nn.Parameter | None = None
        # The frozen generator and the objective's module: plain dict, not submodules (out of
        # the state dict, checkpoints and DDP).
        self._frozen: dict[str, Any] = {}
        self._stale = True  # self.images is older than the latents
        self._loaded_step = 0  # the step of a loaded checkpoint (renders outside a trainer)
        self.automatic_optimization = False
        if num_classes is not None and image_shape is not None:
            self._allocate(int(num_classes), tuple(image_shape))

    # ------------------------------------------------------------------------------ set-up
    def latent_generator(self) -> LatentGenerator:
        """The frozen generator, loaded on first use and moved to this module's device."""
        gen = self._frozen.get("generator")
        if gen is None:
            gen = self._frozen["generator"] = LatentGenerator.from_pretrained(self.generator_dir)
        if next(gen.parameters()).device != self.device:
            gen = self._frozen["generator"] = gen.to(self.device)
        return gen

    def _allocate(self, num_classes: int, image_shape: tuple[int, ...]) -> None:
        image_shape = tuple(int(s) for s in image_shape)
        gen = self.latent_generator()
        if image_shape != gen.image_shape:
            hint = ""
            if image_shape[1:] == gen.image_shape[1:] and image_shape[0] != gen.image_shape[0]:
                hint = (f" (the generator takes {gen.image_shape[0]}-channel images: give it data "
                        f"with {gen.image_shape[0]} channels"
                        + (", e.g. --data ImageFolder, which reads RGB)" if gen.image_shape[0] == 3
                           else ")"))
            elif image_shape[0] == gen.image_shape[0]:
                hint = f" (resize the data: e.g. --data.image_size {gen.image_shape[-1]})"
            raise ValueError(f"the generator {self.generator_dir} renders images of "
                             f"{gen.image_shape}, but the data's are {image_shape}{hint}")
        if self.class_map is not None and len(self.class_map) != num_classes:
            raise ValueError(f"class_map gives {len(self.class_map)} generator labels but the data "
                             f"has {num_classes} classes")
        if self.guidance != 1.0 and gen.null_class is None:
            raise ValueError(f"guidance={self.guidance} needs a generator with a null class; "
                             f"{self.generator_dir} has none (use --model.guidance 1)")
        self.num_classes, self.image_shape = num_classes, image_shape
        n = num_classes * self.ipc
        self.latents = nn.Parameter(torch.zeros(n, *gen.latent_shape))
        self.embeddings = nn.Parameter(torch.zeros(n, gen.embed_dim))
        noise = gen.draw_noise(n, torch.Generator().manual_seed(self.seed * 1_000_003 + _SALT_NOISE))
        self.register_buffer("noise", noise)
        self.__dict__.pop("images", None)  # the base class's placeholder attribute
        self.register_buffer("images", torch.zeros(n, *image_shape))
        self.labels = torch.arange(num_classes).repeat_interleave(self.ipc)
        # data class k starts from generator row generator_labels[k] (set by initialise)
        self.register_buffer("generator_labels", torch.tensor(
            self.class_map if self.class_map is not None else list(range(num_classes)),
            dtype=torch.long))
        self._stale = True

    def setup(self, stage: str) -> None:
        if stage == "fit" and not self._initialised:
            dm = self.real_data
            dm.setup("fit")
            if getattr(dm, "zca_settings", None):
                raise ValueError("LD3M renders unwhitened images: use the data without ZCA "
                                 "(--data.zca false)")
            gen = self.latent_generator()
            for name, ours, theirs in (("mean", gen.image_mean, dm.mean), ("std", gen.image_std, dm.std)):
                if len(ours) != len(theirs) or any(abs(a - b) > 2e-3 for a, b in zip(ours, theirs, strict=False)):
                    raise ValueError(f"the generator's image {name} {tuple(ours)} is not the data's "
                                     f"{tuple(theirs)}: it was trained for other data")
        super().setup(stage)
        if stage == "fit":
            self.objective_module()

    def initialise(self, dm) -> None:
        """Encode ``ipc`` random real images per class (drawn from ``seed``) into the latents and
        copy the classes' table rows into the embeddings (identically on every rank); data class
        ``k`` starts from generator row ``generator_labels[k]`` (see ``class_map``)."""
        gen = self.latent_generator()
        labels, how = generator_labels(dm.class_names, gen.num_classes, gen.id2label,
                                       self.class_map)
        self.generator_labels.copy_(torch.tensor(labels, dtype=torch.long))
        if how != "identity":
            log.info("LD3M: data classes -> generator labels (%s): %s", how,
                     ", ".join(f"{n}->{label}" for n, label in zip(dm.class_names, labels,
                                                                    strict=True)))
        real = dm.sample_per_class(self.ipc, torch.Generator().manual_seed(self.seed)).flatten(0, 1)
        with torch.no_grad():
            device, dtype = self.latents.device, self.latents.dtype
            z = gen.encode(real.to(device=device, dtype=next(gen.parameters()).dtype))
            self.latents.copy_(z.to(dtype))
            rows = self.generator_labels[self.labels.to(device)]
            self.embeddings.copy_(gen.class_embedding(rows).to(dtype))
        self._stale = True

    def objective_module(self) -> DM | DC | MTT:
        """The pixel method whose loss scores the rendered images (frozen helper, built once).

        ``mtt``: its learnable ``syn_lr`` is replaced by this module's (so it is trained,
        checkpointed and synchronised here), and the buffer is checked against the data.
        """
        helper = self._frozen.get("objective")
        if helper is None:
            helper = _build(self.objective_class, {
                **self.objective_args, "ipc": self.ipc, "init": "real", "seed": self.seed,
                "num_classes": self.num_classes, "image_shape": self.image_shape})
            if self.objective == "mtt":
                self._check_buffer(helper)
                helper.syn_lr = self.syn_lr
            helper.images.requires_grad_(False)
            self._frozen["objective"] = helper
        if self.objective == "mtt":
            helper.syn_lr = self.syn_lr  # the same Parameter (a .to() may have replaced ours)
        return helper.to(self.device)

    def _check_buffer(self, helper: MTT) -> None:
        info = helper.buffer.info
        if self.network is not None and self.network.lower() != str(info["network"]).lower():
            raise ValueError(f"objective 'mtt' trains the buffer's network: {self.buffer_dir} "
                             f"holds {info['network']} experts, not {self.network} (leave out "
                             f"--model.network, or give a buffer of {self.network} experts)")
        if (info["num_classes"], tuple(info["image_shape"])) != (self.num_classes, self.image_shape):
            raise ValueError(f"the buffer {self.buffer_dir} was trained on {info['dataset']} "
                             f"({info['num_classes']} classes of {tuple(info['image_shape'])}), "
                             f"not {self.num_classes} classes of {self.image_shape}")
        if info.get("zca"):
            raise ValueError(f"the buffer {self.buffer_dir} was trained on ZCA-whitened images; "
                             "LD3M renders unwhitened ones")
        needed = helper.max_start_epoch - 1 + helper.expert_epochs
        if needed > helper.buffer.epochs:
            raise ValueError(f"max_start_epoch {helper.max_start_epoch} + expert_epochs "
                             f"{helper.expert_epochs} needs experts of at least {needed} epochs; "
                             f"the buffer has {helper.buffer.epochs}")

    # ------------------------------------------------------------------------------ rendering
    def render_noise(self, step: int, render: int = 0) -> torch.Tensor:
        """The ``q_sample`` noise of render ``render`` (0: the scored render, 1: the chunked
        backward's re-render) of training step ``step``, shaped like the latents.

        ``fixed``: the ``noise`` buffer. ``fresh``: a new draw for every ``(step, render)``;
        ``step``: one draw per step (``render`` ignored). The draws come from a generator keyed
        by the seed and ``step`` (not the rank), on this module's device: no host sync, the same
        noise on every DDP rank, the same again for the same step.
        """
        if self.latents is None:
            raise ValueError("LD3M has no latents yet: fit it or give num_classes and image_shape")
        if self.noise_mode == "fixed":
            return self.noise
        salt = _SALT_FRESH + (int(render) if self.noise_mode == "fresh" else 0)
        generator = self.device_generator(self.shared_generator(int(step), salt))
        return self.latent_generator().draw_noise(len(self.latents), generator,
                                                  device=self.noise.device, dtype=self.noise.dtype)

    def _current_step(self) -> int:
        """The trainer's ``global_step``; outside a trainer, that of the loaded checkpoint (so a
        restored module renders the images the run exported)."""
        return self.global_step if self._trainer is not None else self._loaded_step

    def render(self, step: int | None = None) -> torch.Tensor:
        """Render the current latents (no graph) with the noise of step ``step`` (default: the
        trainer's ``global_step``, or a loaded checkpoint's outside a trainer) and store them in
        ``images`` and their noise in ``noise``; returns the images."""
        gen = self.latent_generator()
        noise = self.render_noise(self._current_step() if step is None else step, 0)
        if noise is not self.noise:
            self.noise.copy_(noise)  # what rendered the stored images (exported, re-renderable)
        images = _render(gen, self.latents.detach(), self.embeddings.detach(), self.noise,
                         self.steps, self.skip, self.guidance)
        self.images.copy_(images)
        self._stale = False
        return images

    def synthetic_images(self) -> torch.Tensor:
        """The rendered images of the current latents (normalised space), ``(classes * ipc, C, H, W)``."""
        if self.latents is None:
            raise ValueError("LD3M has no latents yet: fit it or give num_classes and image_shape")
        if self._stale:
            self.render()
        return self.images.detach()

    def backward_images(self, image_grad: torch.Tensor,
                        step: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``dLoss/dImages`` -> gradients of the latents and embeddings, by the chunked backward.

        The gradients are computed into detached leaves (DDP's reducer never sees them), averaged
        across DDP ranks, and added to ``latents.grad`` and ``embeddings.grad``. The re-render
        uses :meth:`render_noise` ``(step, 1)`` (default step: ``global_step``): with ``noise``
        ``fresh`` a draw of its own, as the authors' ``ldm_backward_encode``.

        Returns:
            The (averaged) gradients of ``z`` and ``c``.
        """
        gen = self.latent_generator()
        z = self.latents.detach().requires_grad_()
        c = self.embeddings.detach().requires_grad_()
        noise = self.render_noise(self._current_step() if step is None else step, 1)
        gen.backward_in_chunks(z, c, image_grad, self.steps, self.chunk_size or len(z),
                               noise=noise, skip=self.skip, guidance=self.guidance)
        return self._accumulate(z.grad, c.grad)

    def _accumulate(self, z_grad: torch.Tensor | None,
                    c_grad: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Average the gradients of ``z`` and ``c`` across ranks and add them to ``.grad``."""
        grads = [z_grad if z_grad is not None else torch.zeros_like(self.latents),
                 c_grad if c_grad is not None else torch.zeros_like(self.embeddings)]
        grads = self._all_reduce(grads)
        for param, g in zip((self.latents, self.embeddings), grads, strict=True):
            param.grad = g.to(param.dtype) if param.grad is None else param.grad + g.to(param.dtype)
        return grads[0], grads[1]

    def _all_reduce(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """Average ``grads`` in place across DDP ranks (a no-op on one process)."""
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1 and dist.is_available() and dist.is_initialized():
            for g in grads:
                dist.all_reduce(g)
                g.div_(world)
        return grads

    # ------------------------------------------------------------------------------ the loss
    def objective_loss(self, images: torch.Tensor, real: torch.Tensor | None, step: int,
                       generator: torch.Generator) -> torch.Tensor:
        """The objective's loss of ``images`` (class-major) against the real batch ``(K, n, ...)``
        (``mtt``: against an expert drawn from ``generator``; ``real`` is unused)."""
        helper = self.objective_module()
        if self.objective == "dm":
            return helper.matching_loss(real, generator, images=images)
        if self.objective == "mtt":
            attached = self._trainer is not None  # the helper has no trainer: walk as ours
            start, target = helper.draw_expert(
                generator, step=step, rank=self.global_rank if attached else 0,
                world_size=self.trainer.world_size if attached else 1)
            return helper.matching_loss(start, target, generator, images=images)
        net = helper._network_for(step)
        return helper.matching_loss(real, net, generator, images=images)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        real = None
        if self.objective != "mtt":  # mtt reads expert trajectories: the batches are step indices
            real, _ = batch
            if real.dim() != 5 or real.shape[0] != self.num_classes:
                raise ValueError(f"LD3M expects class-balanced batches of {self.num_classes} "
                                 f"classes, got shape {tuple(real.shape)}")
        step = self.global_step  # read before the optimizer step increments it
        optimizer = self.optimizers()
        optimizer.zero_grad()
        lr_leaf = [self.syn_lr] if self.syn_lr is not None else []
        if self.chunk_size is None:  # one render with the graph, the loss back-propagated directly
            z = self.latents.detach().requires_grad_()
            c = self.embeddings.detach().requires_grad_()
            x = self.latent_generator().render(z, c, self.steps, skip=self.skip,
                                               guidance=self.guidance,
                                               noise=self.render_noise(step, 0))
            loss = self.check_finite(self.objective_loss(x.float(), real, step,
                                                         self.step_generator()))
            z_grad, c_grad, *lr_grad = torch.autograd.grad(loss, [z, c, *lr_leaf],
                                                           allow_unused=True)
            z_grad, c_grad = self._accumulate(z_grad, c_grad)
        else:  # render without a graph, then the chunked backward from dLoss/dImages
            x = self.render(step).detach().float().requires_grad_()
            loss = self.check_finite(self.objective_loss(x, real, step, self.step_generator()))
            image_grad, *lr_grad = torch.autograd.grad(loss, [x, *lr_leaf])
            z_grad, c_grad = self.backward_images(image_grad, step)
        if lr_grad:
            self.syn_lr.grad = self._all_reduce([lr_grad[0]])[0]
            self.log("syn_lr", self.syn_lr.detach())
        self.check_finite(z_grad, "gradient of the latents")
        self.check_finite(c_grad, "gradient of the class embeddings")
        optimizer.step()
        self._stale = True
        if self.objective == "dc":
            helper = self.objective_module()
            if step % helper.outer_loop != helper.outer_loop - 1 and helper.inner_loop > 0:
                helper.train_network(step, images=self.synthetic_images().float())
        self.log("loss", loss.detach(), prog_bar=True)
        return loss.detach()

    def configure_optimizers(self):
        groups = [{"params": [self.latents], "lr": self.lr_latent},
                  {"params": [self.embeddings], "lr": self.lr_embedding}]
        if self.syn_lr is not None:
            groups.append({"params": [self.syn_lr], "lr": self.lr_lr})
        return torch.optim.SGD(groups, lr=self.lr_latent, momentum=self.momentum)

    # ------------------------------------------------------------------------------ export
    def export_extra(self) -> dict[str, Any]:
        lr = {"lr": self.syn_lr.detach().float().cpu().clone()} if self.syn_lr is not None else {}
        return {**lr, "extra": {"latents": self.latents.detach().float().cpu().clone(),
                          "embeddings": self.embeddings.detach().float().cpu().clone(),
                          "noise": self.noise.detach().float().cpu().clone()},
                "meta": {"ld3m": {"generator": self.generator_dir, "steps": self.steps,
                                  "skip": self.skip, "guidance": self.guidance,
                                  "objective": self.objective, "noise": self.noise_mode,
                                  "generator_labels": self.generator_labels.tolist()}}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict", {})
        if "latents" in state and "generator_labels" not in state and self.latents is not None:
            # a checkpoint from before the class mapping: its classes were the generator's own
            state["generator_labels"] = torch.arange(self.num_classes)
        super().on_load_checkpoint(checkpoint)
        self._loaded_step = int(checkpoint.get("global_step", 0))
        self._stale = True


def rerender(synthetic: SyntheticSet, generator: str | LatentGenerator | None = None,
             steps: int | None = None, *, device: torch.device | str | None = None) -> SyntheticSet:
    """Render an LD3M set's stored latents again, e.g. with another number of steps.

    Args:
        synthetic: A set exported by :class:`LD3M` (with ``extra.latents``, ``extra.embeddings``,
            ``extra.noise`` and ``meta["ld3m"]``).
        generator: The generator (or its folder); default: the folder recorded in the set.
        steps: DDIM steps; default: the set's.
        device: Render there (default: the CPU, or the generator's device).

    Returns:
        A copy of the set with the new images and ``meta["ld3m"]["steps"]`` updated.
    """
    info = synthetic.meta.get("ld3m")
    missing = [k for k in ("latents", "embeddings", "noise") if k not in synthetic.extra]
    if not isinstance(info, dict) or missing:
        raise ValueError("not an LD3M set: it lacks meta['ld3m'] or extra."
                         + "/".join(missing or ["latents"]))
    if generator is None:
        generator = info["generator"]
    gen = generator if isinstance(generator, LatentGenerator) else LatentGenerator.from_pretrained(generator)
    if device is not None:
        gen = gen.to(device)
    steps = int(info["steps"] if steps is None else steps)
    where = next(gen.parameters())
    z, c, noise = (synthetic.extra[k].to(device=where.device, dtype=where.dtype)
                   for k in ("latents", "embeddings", "noise"))
    images = _render(gen, z, c, noise, steps, bool(info.get("skip", True)),
                     float(info.get("guidance", 1.0))).float().cpu()
    meta = dict(synthetic.meta)
    meta["ld3m"] = {**info, "steps": steps}
    return dataclasses.replace(synthetic, images=images, meta=meta)
