"""Seconds per LD3M generator iteration and peak memory vs the number of DDIM steps T.

One iteration = what an LD3M training step costs on the generator side: render all synthetic
images without grad, take a stand-in loss gradient on the (detached) images, then back-propagate
it into the latents ``z`` and embeddings ``c`` (``--mode chunked``: ``backward_in_chunks`` with
``--chunk`` images at a time; ``--mode full``: one render with the whole graph, checkpointed).
The distillation loss itself (DM/DC/MTT) is not included.

The generator is ``--prior FOLDER`` (a ``LatentGenerator.save_pretrained`` / ``ld3m prior``
folder) or, by default, a random stand-in sized like a small Fashion-MNIST prior (1x28x28 images,
a 2-level AutoencoderKL to 4x14x14 latents, a UNet2DModel of ``--width`` channels); the cost
does not depend on the weights. Each configuration runs in its own process: peak memory is that
process's RSS (CPU; the baseline with the model included) or ``torch.cuda.max_memory_allocated``.

    python bench/ld3m_speed.py                                 # T = 5 10 20 40, both modes
    python bench/ld3m_speed.py --steps 5 10 --images 10 --iters 1 --mode chunked
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


def measure(args: argparse.Namespace, steps: int, mode: str) -> dict:
    import torch

    from ld3m.generator import LatentGenerator

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.prior:
        gen = LatentGenerator.from_pretrained(args.prior, device=device)
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
    parser.add_argument("--one", nargs=2, metavar=("STEPS", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args, int(args.one[0]), args.one[1])))
        return
    passthrough = [f"--{k}={v}" for k, v in (("images", args.images), ("chunk", args.chunk),
                                             ("iters", args.iters), ("guidance", args.guidance),
                                             ("width", args.width), ("classes", args.classes),
                                             ("device", args.device), ("precision", args.precision),
                                             ("threads", args.threads))]
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
