"""Differentiable Siamese Augmentation (DSA).

DSA (Zhao & Bilen, 2021) augments real and synthetic images with the *same*
randomly drawn transformation, and every transformation is differentiable with
respect to the image, so that the matching loss can be backpropagated into the
synthetic set.

Instead of reseeding the global random number generator, the random parameters
are drawn (optionally from a ``torch.Generator``) into a :class:`DSAParams`
object which can be replayed on any number of batches of any size::

    dsa = DSA("color_crop_cutout_flip_scale_rotate")
    params = dsa.sample(n=1, image_size=(32, 32), generator=gen)
    real_aug, syn_aug = dsa.apply(real, params), dsa.apply(syn, params)
    # or, equivalently: real_aug, syn_aug = dsa.siamese(real, syn, generator=gen)

Images are channels-first ``(N, C, H, W)`` tensors with arbitrary real values
(already normalised).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from kornia.geometry.transform import hflip, translate

__all__ = ["DC_FAMILIES", "DEFAULT_STRATEGY", "FAMILIES", "DCAugment", "DSA", "DSAParams"]

FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")
DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"
_MODES = ("S", "M")


def _round_half_up(value: float) -> int:
    """Round to the nearest integer, halves away from zero (not banker's rounding)."""
    return int(value + 0.5)


@dataclass
class DSAParams:
    """Replayable parameters of one DSA draw.

    ``values`` holds, per family, a tensor whose leading dimension is ``n``:

    * ``color``: ``(n, 3)`` float, the uniforms ``u1, u2, u3`` for brightness, saturation, contrast;
    * ``crop``: ``(n, 2)`` long, the integer shift ``(dx, dy)`` in pixels (content moves by it);
    * ``cutout``: ``(n, 2)`` long, the centre ``(cx, cy)`` of the zeroed square;
    * ``flip``: ``(n,)`` bool, whether to flip horizontally;
    * ``scale``: ``(n, 2)`` float, the factors ``(sx, sy)`` of the output-to-input map (the
      content is magnified by ``1 / s``, as the authors');
    * ``rotate``: ``(n,)`` float, the angle in degrees of the authors' rotation matrix.

    ``n == 1`` means the parameters are shared by every image of a batch.
    """

    families: tuple[str, ...]
    values: dict[str, torch.Tensor]
    n: int

    def to(self, device: torch.device | str, non_blocking: bool = False) -> DSAParams:
        """Return a copy whose parameter tensors live on ``device``."""
        return DSAParams(
            families=tuple(self.families),
            values={k: v.to(device, non_blocking=non_blocking) for k, v in self.values.items()},
            n=self.n,
        )


class DSA:
    """Differentiable Siamese Augmentation.

    Args:
        strategy: Augmentation families joined by ``"_"``, chosen from ``color``, ``crop``,
            ``cutout``, ``flip``, ``scale`` and ``rotate``. ``""`` or ``"none"`` disables DSA.
        mode: ``"S"`` applies one family per call, drawn uniformly from the strategy;
            ``"M"`` applies every family of the strategy in order.
        scale: Scale factors ``sx`` and ``sy`` are drawn independently from
            ``U[1/scale, scale]``.
        rotate: Rotation angles are drawn from ``U[-rotate, rotate]`` degrees.
        crop: Maximal integer translation as a fraction of the image side (zero fill).
        cutout: Side of the zeroed square as a fraction of the image side.
        brightness: Brightness adds ``(u - 0.5) * brightness`` with ``u ~ U[0, 1]``.
        saturation: Saturation scales the deviation from the channel mean by ``u * saturation``.
        contrast: Contrast scales the deviation from the image mean by ``u + contrast``.
    """

    def __init__(
        self,
        strategy: str = "color_crop_cutout_flip_scale_rotate",
        mode: str = "S",
        scale: float = 1.2,
        rotate: float = 15.0,
        crop: float = 0.125,
        cutout: float = 0.5,
        brightness: float = 1.0,
        saturation: float = 2.0,
        contrast: float = 0.5,
    ) -> None:
        strategy = strategy.strip().lower()
        if strategy in ("", "none"):
            families: tuple[str, ...] = ()
        else:
            families = tuple(name for name in strategy.split("_") if name)
        unknown = [name for name in families if name not in FAMILIES]
        if unknown:
            raise ValueError(
                f"Unknown DSA augmentation family {unknown} in strategy {strategy!r}; "
                f"expected names from {FAMILIES} joined by '_', or 'none'."
            )
        mode = mode.upper()
        if mode not in _MODES:
            raise ValueError(f"Unknown DSA mode {mode!r}; expected 'S' (one family) or 'M' (all).")
        if scale < 1.0:
            raise ValueError(f"DSA scale ratio must be >= 1, got {scale}.")
        self.strategy = strategy
        self.families = families
        self.mode = mode
        self.scale = scale
        self.rotate = rotate
        self.crop = crop
        self.cutout = cutout
        self.brightness = brightness
        self.saturation = saturation
        self.contrast = contrast

    @property
    def enabled(self) -> bool:
        """Whether any augmentation family is active."""
        return len(self.families) > 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(strategy={self.strategy!r}, mode={self.mode!r})"

    # ------------------------------------------------------------------ sampling
    def sample(
        self,
        n: int = 1,
        image_size: tuple[int, int] = (32, 32),
        generator: torch.Generator | None = None,
    ) -> DSAParams:
        """Draw parameters for ``n`` images (``n = 1``: shared by a whole batch).

        Args:
            n: Number of parameter rows.
            image_size: ``(H, W)`` of the images, used for the crop and cutout ranges.
            generator: Source of randomness; the global RNG is used when ``None``.
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}.")
        height, width = int(image_size[0]), int(image_size[1])
        device = generator.device if generator is not None else torch.device("cpu")

        def uniform(*shape: int) -> torch.Tensor:
            return torch.rand(shape, generator=generator, device=device)

        def integers(low: int, high: int, *shape: int) -> torch.Tensor:
            return torch.randint(low, high, shape, generator=generator, device=device)

        if not self.families:
            families: tuple[str, ...] = ()
        elif self.mode == "S":
            index = int(integers(0, len(self.families), 1).item())
            families = (self.families[index],)
        else:
            families = self.families

        values: dict[str, torch.Tensor] = {}
        for family in families:
            if family in values:  # a family repeated in the strategy replays the same draw
                continue
            if family == "color":
                values[family] = uniform(n, 3)
            elif family == "crop":
                sx = _round_half_up(self.crop * width)
                sy = _round_half_up(self.crop * height)
                values[family] = torch.stack(
                    [integers(-sx, sx + 1, n), integers(-sy, sy + 1, n)], dim=1
                )
            elif family == "cutout":
                # the authors' randint(0, side + (1 - size % 2)): the centre may sit on the far
                # edge (29 values at 28 px) when the square's side is even
                side_w = _round_half_up(self.cutout * width)
                side_h = _round_half_up(self.cutout * height)
                values[family] = torch.stack([integers(0, width + 1 - side_w % 2, n),
                                              integers(0, height + 1 - side_h % 2, n)], dim=1)
            elif family == "flip":
                values[family] = uniform(n) < 0.5
            elif family == "scale":
                low = 1.0 / self.scale
                values[family] = low + (self.scale - low) * uniform(n, 2)
            elif family == "rotate":
                values[family] = (uniform(n) * 2.0 - 1.0) * self.rotate
        return DSAParams(families=families, values=values, n=n)

    # ----------------------------------------------------------------- applying
    def apply(self, x: torch.Tensor, params: DSAParams) -> torch.Tensor:
        """Replay ``params`` on the batch ``x`` of shape ``(N, C, H, W)``."""
        if x.dim() != 4:
            raise ValueError(f"DSA expects an (N, C, H, W) tensor, got shape {tuple(x.shape)}.")
        if params.n not in (1, x.shape[0]):
            raise ValueError(
                f"DSAParams has n={params.n} rows but the batch has {x.shape[0]} images; "
                "n must be 1 (shared) or the batch size."
            )
        for family in params.families:
            if family not in FAMILIES:
                raise ValueError(f"Unknown DSA augmentation family {family!r} in DSAParams.")
            # Values stay where they are (the CPU, usually): the shared fast paths read them as
            # Python numbers without a device sync; the vectorised paths move them to x.device
            # without blocking (a few numbers staged by the driver: no host-device sync).
            x = getattr(self, f"_{family}")(x, params.values[family])
        return x

    def __call__(
        self,
        x: torch.Tensor,
        params: DSAParams | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Augment ``x``; without ``params``, each image gets its own independent draw."""
        if params is None:
            if not self.families:
                return x
            params = self.sample(x.shape[0], tuple(x.shape[-2:]), generator)
        return self.apply(x, params)

    def siamese(
        self, *batches: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, ...]:
        """Apply one shared draw (``n = 1``) to every batch, e.g. real and synthetic images."""
        if not batches:
            return ()
        params = self.sample(1, tuple(batches[0].shape[-2:]), generator)
        return tuple(self.apply(batch, params) for batch in batches)

    # --------------------------------------------------------------- families
    @staticmethod
    def _rows(value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-sample view ``(N, 1, 1, 1)`` of a one-column parameter (broadcasts when n = 1)."""
        return value.to(device=x.device, dtype=x.dtype, non_blocking=True).reshape(-1, 1, 1, 1)

    def _color(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        x = x + (self._rows(u[:, 0], x) - 0.5) * self.brightness
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * (self._rows(u[:, 1], x) * self.saturation) + mean
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - mean) * (self._rows(u[:, 2], x) + self.contrast) + mean

    def _crop(self, x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        if shift.shape[0] == 1:
            # Shared shift: a constant pad with negative amounts on the opposite side moves the
            # content by (dx, dy) and zero-fills the vacated pixels, with the shape unchanged.
            dx, dy = (int(v) for v in shift[0].tolist())
            return F.pad(x, (dx, -dx, dy, -dy))
        # Per-sample integer shifts: nearest sampling at exact pixel centres is an exact move.
        return _geometric(
            x,
            lambda t: translate(
                t,
                shift.to(t.device, t.dtype, non_blocking=True),
                mode="nearest",
                padding_mode="zeros",
                align_corners=True,
            ),
        )

    def _cutout(self, x: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        centre = centre.to(x.device, non_blocking=True)
        side_h = _round_half_up(self.cutout * height)
        side_w = _round_half_up(self.cutout * width)
        top = (centre[:, 1] - side_h // 2).view(-1, 1, 1)
        left = (centre[:, 0] - side_w // 2).view(-1, 1, 1)
        rows = torch.arange(height, device=x.device).view(1, -1, 1)
        cols = torch.arange(width, device=x.device).view(1, 1, -1)
        inside = (rows >= top) & (rows < top + side_h) & (cols >= left) & (cols < left + side_w)
        return x * (~inside).unsqueeze(1).to(x.dtype)

    def _flip(self, x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        flip = flip.bool()
        if flip.shape[0] == 1:
            return hflip(x) if bool(flip[0]) else x
        return torch.where(flip.to(x.device, non_blocking=True).view(-1, 1, 1, 1), hflip(x), x)

    def _scale(self, x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
        # As the authors: (sx, sy) is the affine grid's output-to-input map, so the content is
        # magnified by 1 / s (mean 0.994 for s ~ U[1/1.2, 1.2], zoomed in 45 % of the time).
        factors = factors.to(x.device, non_blocking=True).expand(x.shape[0], 2)
        zero = torch.zeros_like(factors[:, 0])
        theta = torch.stack([torch.stack([factors[:, 0], zero, zero], 1),
                             torch.stack([zero, factors[:, 1], zero], 1)], 1)
        return _geometric(x, lambda t: _affine(t, theta))

    def _rotate(self, x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
        # the authors' matrix: [[cos, -sin, 0], [sin, cos, 0]] of the angle, output to input
        radians = angle.to(x.device, non_blocking=True).expand(x.shape[0]).float() * (math.pi / 180)
        cos, sin, zero = torch.cos(radians), torch.sin(radians), torch.zeros_like(radians)
        theta = torch.stack([torch.stack([cos, -sin, zero], 1),
                             torch.stack([sin, cos, zero], 1)], 1)
        return _geometric(x, lambda t: _affine(t, theta))


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``grid_sample`` of ``x`` on the affine grid of ``theta`` ``(N, 2, 3)`` (bilinear, zero
    padding, ``align_corners=False``: the authors' ``F.affine_grid`` / ``F.grid_sample`` calls)."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _geometric(x: torch.Tensor, warp: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Run a kornia warp in full precision and return it in the input's dtype.

    kornia builds and inverts the affine matrix in the parameter dtype, so half / bfloat16
    would make the sampling grid inaccurate; autocast is disabled for the same reason.
    """
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    with torch.autocast(device_type=x.device.type, enabled=False):
        out = warp(x.to(dtype))
    return out.to(x.dtype)


DC_FAMILIES = ("crop", "scale", "rotate", "noise")


class DCAugment:
    """DC's own augmentation for training evaluation networks of methods without DSA, as the
    authors' ``augment`` (with ``get_daparam``'s settings). Not differentiable, and only used to
    train evaluation networks: each image gets one family drawn from the strategy.

    * ``crop``: pad by ``crop`` pixels with the batch's channel means and take a window at a
      random offset in ``[0, 2 crop)`` (a shift in ``[-crop, crop - 1]``);
    * ``scale``: resize (nearest) to ``int(u * H)`` x ``int(v * H)``, ``u, v ~ U[1 - scale,
      1 + scale]``, then centre it on a zero canvas and crop the centre back;
    * ``rotate``: rotate by an integer angle in ``[-rotate, rotate)`` degrees (cubic spline,
      ``scipy.ndimage.rotate``, the outside filled with the mean of the channel means), centre
      crop;
    * ``noise``: add ``noise`` times standard normal noise.

    Args:
        strategy: Families joined by ``"_"`` (``crop_scale_rotate`` for MNIST, ``crop_noise``
            for BatchNorm ConvNets in the authors' code), or ``"none"``.
        crop: Pad / shift of ``crop``.
        scale: Range of ``scale``.
        rotate: Range (degrees) of ``rotate``.
        noise: Scale of ``noise``.
    """

    def __init__(self, strategy: str = "none", crop: int = 4, scale: float = 0.2,
                 rotate: int = 45, noise: float = 0.001) -> None:
        strategy = strategy.strip().lower()
        families = () if strategy in ("", "none") else tuple(f for f in strategy.split("_") if f)
        unknown = [f for f in families if f not in DC_FAMILIES]
        if unknown:
            raise ValueError(f"unknown DC augmentation family {unknown} in {strategy!r}; expected "
                             f"names from {DC_FAMILIES} joined by '_', or 'none'")
        self.strategy, self.families = strategy, families
        self.crop, self.scale, self.rotate, self.noise = int(crop), float(scale), int(rotate), noise

    @property
    def enabled(self) -> bool:
        return bool(self.families)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(strategy={self.strategy!r})"

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment the batch ``x`` ``(N, C, H, W)``; a new tensor (``x`` is left as it is)."""
        if not self.families:
            return x
        x = x.detach().clone()
        means = [float(m) for m in x.mean(dim=(0, 2, 3))]  # the batch's channel means
        picks = torch.randint(len(self.families), (x.shape[0],), generator=generator).tolist()
        for i, pick in enumerate(picks):
            x[i] = getattr(self, f"_{self.families[pick]}")(x[i], means, generator)
        return x

    def _crop(self, image: torch.Tensor, means: list[float], generator) -> torch.Tensor:
        c, h, w = image.shape
        pad = self.crop
        canvas = torch.tensor(means, dtype=image.dtype, device=image.device).view(c, 1, 1)
        canvas = canvas.expand(c, h + 2 * pad, w + 2 * pad).clone()
        canvas[:, pad:pad + h, pad:pad + w] = image
        r, s = (int(v) for v in torch.randint(2 * pad, (2,), generator=generator))
        return canvas[:, r:r + h, s:s + w]

    def _scale(self, image: torch.Tensor, means: list[float], generator) -> torch.Tensor:
        c, h, w = image.shape
        u = (1 - self.scale) + 2 * self.scale * torch.rand(2, generator=generator)
        new_h, new_w = int(float(u[0]) * h), int(float(u[1]) * h)  # both from H, as theirs
        resized = F.interpolate(image[None], [new_h, new_w])[0]
        side = max(new_h, new_w, h, w)
        canvas = torch.zeros(c, side, side, dtype=image.dtype, device=image.device)
        r, s = int((side - new_h) / 2), int((side - new_w) / 2)
        canvas[:, r:r + new_h, s:s + new_w] = resized
        r, s = int((side - h) / 2), int((side - w) / 2)
        return canvas[:, r:r + h, s:s + w]

    def _rotate(self, image: torch.Tensor, means: list[float], generator) -> torch.Tensor:
        from scipy.ndimage import rotate as spline_rotate

        angle = int(torch.randint(-self.rotate, self.rotate, (1,), generator=generator))
        turned = spline_rotate(image.cpu().numpy(), angle=angle, axes=(-2, -1),
                               cval=sum(means) / len(means))
        h, w = image.shape[-2:]
        r, s = int((turned.shape[-2] - h) / 2), int((turned.shape[-1] - w) / 2)
        return torch.as_tensor(turned[:, r:r + h, s:s + w], dtype=image.dtype).to(image.device)

    def _noise(self, image: torch.Tensor, means: list[float], generator) -> torch.Tensor:
        draw = torch.randn(image.shape, generator=generator, dtype=image.dtype)
        return image + self.noise * draw.to(image.device)
