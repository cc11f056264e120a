"""Seconds per LD3M generator iteration and peak memory vs the number of DDIM steps T.

One iteration = what an LD3M training step costs on the generator side: render all synthetic
images without grad, take a stand-in loss gradient on the (detached) images, then back-propagate
it into the latents ``z`` and embeddings ``c`` (``--mode chunked``: ``backward_in_chunks`` with
``--chunk`` images at a time; ``--mode full``: one render with the whole graph, checkpointed).
The distillation loss itself (DM/DC/MTT) is not included.

The generator is ``--prior FOLDER`` (a ``LatentGenerator.save_pretrained`` / ``ld3m prior``
folder, a DiT folder or a converted LDM) or a random stand-in (the cost does not depend on the
weights), ``--kind``:

* ``prior`` (default): sized like a small Fashion-MNIST prior (1x28x28 images, a 2-level
  AutoencoderKL to 4x14x14 latents, a UNet2DModel of ``--width`` channels);
* ``dit``: the shapes of ``facebook/DiT-XL-2-256`` (DiTTransformer2DModel: 28 blocks, hidden
  1152 = 16 heads x 72, patch 2, learned sigma; the sd-vae-ft AutoencoderKL, 128/256/512/512
  channels, 8x down) at ``--size`` px, widths and depth divided by ``--scale``;
* ``ldm``: the shapes of CompVis ``cin256-v2`` (its ``configs/latent-diffusion/cin256-v2.yaml``:
  UNet of 192 channels x (1, 2, 3, 5), 2 res blocks, cross-attention at 2/4/8x down, context 512;
  VQ-f4 first stage of 128 x (1, 2, 4) channels, 3 latent channels) at ``--size`` px, built by
  ``ld3m convert-ldm``'s own model builders, widths divided by ``--scale``.

Each configuration runs in its own process: peak memory is that process's RSS (CPU; the
baseline with the model included) or ``torch.cuda.max_memory_allocated``. ``--sizes`` prints the
full-size models' parameter counts (built on the meta device: nothing allocated) instead.

    python bench/ld3m_speed.py                                 # T = 5 10 20 40, both modes
    python bench/ld3m_speed.py --steps 5 10 --images 10 --iters 1 --mode chunked
    python bench/ld3m_speed.py --kind dit --size 256 --scale 8 --images 10 --steps 10 20 --mode chunked
    python bench/ld3m_speed.py --kind ldm --size 128 --scale 6 --images 10 --steps 10 20 --mode chunked
    python bench/ld3m_speed.py --sizes
    python bench/ld3m_speed.py --prior runs/prior/fashionmnist --device cuda --precision bf16
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def stand_in(width: int, classes: int):
    """A random LatentGenerator for 1x28x28 images (4x14x14 latents), ``classes`` + a null class."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DModel

    from ld3m.generator import LatentGenerator

    with torch.random.fork_rng():
        torch.manual_seed(0)
        vae = AutoencoderKL(in_channels=1, out_channels=1, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64),
                            layers_per_block=1, norm_num_groups=16, mid_block_add_attention=False)
        unet = UNet2DModel(sample_size=14, in_channels=4, out_channels=4,
                           block_out_channels=(width, 2 * width), layers_per_block=2,
                           down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                           norm_num_groups=min(32, width // 2), add_attention=False,
                           num_class_embeds=classes + 1)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, set_alpha_to_one=True)
    return LatentGenerator(vae, unet, scheduler, classes, (1, 28, 28), null_class=classes,
                           image_mean=(0.2860,), image_std=(0.3530,), scaling_factor=1.0)


def _channels(width: int, scale: int, multiple: int = 32) -> int:
    """``width / scale``, rounded to a multiple of ``multiple`` (group norms), at least that."""
    return max(multiple, round(width / scale / multiple) * multiple)


def _dit_parts(size: int, scale: int):
    """DiT-XL/2-256's transformer and VAE (``scale`` 1), or scaled down."""
    from diffusers import AutoencoderKL, DiTTransformer2DModel

    transformer = DiTTransformer2DModel(
        sample_size=size // 8, patch_size=2, in_channels=4, out_channels=8,
        num_layers=max(1, 28 // scale), attention_head_dim=72,
        num_attention_heads=max(1, 16 // scale), num_embeds_ada_norm=1000)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=size,
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=tuple(_channels(c, scale) for c in (128, 256, 512, 512)),
                        layers_per_block=2, norm_num_groups=32, scaling_factor=0.18215)
    return transformer, vae


def _ldm_parts(size: int, scale: int):
    """cin256-v2's UNet, VQ first stage and class table (``scale`` 1), or scaled down, built by
    the converter's model builders (the models ``ld3m convert-ldm`` writes)."""
    from torch import nn

    from ld3m.ldm import _unet, _vq

    unet_params = {"image_size": size // 4, "in_channels": 3, "out_channels": 3,
                   "model_channels": _channels(192, scale), "attention_resolutions": [8, 4, 2],
                   "num_res_blocks": 2, "channel_mult": [1, 2, 3, 5], "num_heads": 1,
                   "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 512}
    first_stage = {"embed_dim": 3, "n_embed": 8192, "ddconfig": {
        "double_z": False, "z_channels": 3, "resolution": 256, "in_channels": 3, "out_ch": 3,
        "ch": _channels(128, scale), "ch_mult": [1, 2, 4], "num_res_blocks": 2,
        "attn_resolutions": []}}
    return _unet(unet_params), _vq(first_stage, 1.0), nn.Embedding(1001, 512)


_IMAGENET = dict(image_mean=(0.485, 0.456, 0.406), image_std=(0.229, 0.224, 0.225))


def dit_stand_in(size: int, scale: int):
    """A random LatentGenerator with DiT-XL/2-256's shapes (``scale`` 1) or scaled down."""
    import torch
    from diffusers import DDIMScheduler

    from ld3m.generator import LatentGenerator

    with torch.random.fork_rng():
        torch.manual_seed(0)
        transformer, vae = _dit_parts(size, scale)
    first = transformer.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight
    for block in transformer.transformer_blocks[1:]:  # one table in every block, as converted
        block.norm1.emb.class_embedder.embedding_table.weight.data.copy_(first.data)
    scheduler = DDIMScheduler(beta_schedule="linear", clip_sample=False, set_alpha_to_one=False)
    return LatentGenerator(vae, transformer, scheduler, 1000, (3, size, size), null_class=1000,
                           **_IMAGENET)


def ldm_stand_in(size: int, scale: int):
    """A random LatentGenerator with cin256-v2's shapes (``scale`` 1) or scaled down."""
    import torch

    from ld3m.generator import LatentGenerator
    from ld3m.ldm import _scheduler

    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet, vq, table = _ldm_parts(size, scale)
    scheduler = _scheduler({"linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000})
    return LatentGenerator(vq, unet, scheduler, 1000, (3, size, size), null_class=1000,
                           class_table=table, **_IMAGENET)


def full_sizes() -> None:
    """Parameter counts and fp32 weight memory of the full-size models (meta device)."""
    import torch

    print("| model | part | parameters | fp32 weights (GB) |\n|---|---|---|---|")
    with torch.device("meta"):
        dit = dict(zip(("denoiser", "first stage"), _dit_parts(256, 1), strict=True))
        ldm = dict(zip(("denoiser", "first stage", "class table"), _ldm_parts(256, 1),
                       strict=True))
    for kind, parts in (("DiT-XL/2-256", dit), ("LDM cin256-v2", ldm)):
        for part, module in parts.items():
            n = sum(p.numel() for p in module.parameters())
            print(f"| {kind} | {part} ({type(module).__name__}) | {n / 1e6:.1f} M | "
                  f"{4 * n / 1024**3:.2f} |", flush=True)


def measure(args: argparse.Namespace, steps: int, mode: str) -> dict:
    import torch

    from ld3m.generator import LatentGenerator

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.prior:
        gen = LatentGenerator.from_pretrained(args.prior, device=device)
    elif args.kind == "dit":
        gen = dit_stand_in(args.size, args.scale).to(device)
    elif args.kind == "ldm":
        gen = ldm_stand_in(args.size, args.scale).to(device)
    else:
        gen = stand_in(args.width, args.classes).to(device)
    n = args.images
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % gen.num_classes
    images = torch.randn(n, *gen.image_shape, generator=g).to(device)
    with torch.no_grad():
        z = torch.nn.Parameter(gen.encode(images))
    c = torch.nn.Parameter(gen.class_embedding(labels))
    noise = gen.draw_noise(n, g, device=device)
    target = torch.randn(n, *gen.image_shape, generator=g).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    options = dict(guidance=args.guidance, noise=noise)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = []
    for it in range(args.iters + 1):
        sync()
        start = time.perf_counter()
        z.grad = c.grad = None
        with autocast:
            if mode == "chunked":
                with torch.no_grad():
                    rendered = gen.render(z, c, steps, **options)
                detached = rendered.detach().float().requires_grad_()
                ((detached - target) ** 2).sum().backward()
                gen.backward_in_chunks(z, c, detached.grad, steps, args.chunk, **options)
            else:
                rendered = gen.render(z, c, steps, **options)
                ((rendered.float() - target) ** 2).sum().backward()
        sync()
        if it > 0:  # the first iteration warms up allocators and kernels
            times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak_gb = torch.cuda.max_memory_allocated() / 1024**3
    else:
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    return {"steps": steps, "mode": mode, "sec_per_iter": statistics.median(times),
            "peak_gb": peak_gb, "images": n, "chunk": args.chunk, "iters": args.iters}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 40])
    parser.add_argument("--mode", nargs="+", default=["chunked", "full"], choices=["chunked", "full"])
    parser.add_argument("--images", type=int, default=100, help="synthetic images (IPC x classes)")
    parser.add_argument("--chunk", type=int, default=10, help="images per chunk (chunked mode)")
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--guidance", type=float, default=1.0)
    parser.add_argument("--prior", default=None, help="a generator folder (default: a random stand-in)")
    parser.add_argument("--width", type=int, default=64, help="stand-in UNet channels (level 1)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--kind", default="prior", choices=["prior", "dit", "ldm"])
    parser.add_argument("--size", type=int, default=128, help="dit/ldm image side (128 or 256)")
    parser.add_argument("--scale", type=int, default=8, help="dit/ldm width (and DiT depth) divisor")
    parser.add_argument("--sizes", action="store_true", help="print the full-size models' sizes")
    parser.add_argument("--one", nargs=2, metavar=("STEPS", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sizes:
        full_sizes()
        return
    if args.one:
        print(json.dumps(measure(args, int(args.one[0]), args.one[1])))
        return
    passthrough = [f"--{k}={v}" for k, v in (("images", args.images), ("chunk", args.chunk),
                                             ("iters", args.iters), ("guidance", args.guidance),
                                             ("width", args.width), ("classes", args.classes),
                                             ("device", args.device), ("precision", args.precision),
                                             ("threads", args.threads), ("kind", args.kind),
                                             ("size", args.size), ("scale", args.scale))]
    if args.prior:
        passthrough.append(f"--prior={args.prior}")
    memory = "peak CUDA (GB)" if args.device.startswith("cuda") else "peak RSS (GB)"
    print(f"| T | mode | s / iteration | {memory} |\n|---|---|---|---|", flush=True)
    for steps in args.steps:
        for mode in args.mode:
            cmd = [sys.executable, __file__, "--one", str(steps), mode, *passthrough]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            print(f"| {steps} | {mode} | {row['sec_per_iter']:.2f} | {row['peak_gb']:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
