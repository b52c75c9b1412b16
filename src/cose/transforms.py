"""The 13 COSE transforms: magnitude grid, batched forward on [0,1] images, inverses for maps.

Semantics follow the reference (torchvision's TrivialAugmentWide operations applied to PIL
images, plus flips and PIL's BLUR/SMOOTH filters); see docs/metric.md for the exact rules and
the measured differences to PIL.

- Geometric (TranslateX, TranslateY, Rotate, FlipLR, FlipUD): nearest interpolation, fill 0,
  bit-exact to PIL on any image.
  Translations move by ``int(magnitude)`` pixels (truncation toward zero, as torchvision's
  ``_apply_op`` does); rotations are counter-clockwise in degrees about the image centre,
  reproducing PIL's 16.16 fixed-point nearest-neighbour sampling.
- Photometric (Brightness, Color, Contrast, Sharpness, AutoContrast, Equalize, Blur, Smooth):
  PIL ImageEnhance / ImageOps / ImageFilter semantics computed in floating point (PIL rounds or
  truncates to uint8 after each step; these do not), within 2/255 of PIL on uint8-valued
  inputs. Equalize works on 256 levels (the input is rounded to k/255 first).

All functions are batched over the first dimension, take per-sample magnitudes and run on the
images' device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "GEOMETRIC",
    "PHOTOMETRIC",
    "TRANSFORMS",
    "SIGNED",
    "UNSIGNED",
    "NUM_BINS",
    "DEFAULT_COUNT",
    "REFERENCE_SIZE",
    "MAX_MAGNITUDE",
    "MASK_TOLERANCE",
    "magnitude_grid",
    "sample_magnitudes",
    "apply",
    "invert",
    "valid_mask",
    "is_geometric",
    "translation_pixels",
]

GEOMETRIC: tuple[str, ...] = ("TranslateX", "TranslateY", "Rotate", "FlipLR", "FlipUD")
PHOTOMETRIC: tuple[str, ...] = (
    "Brightness",
    "Color",
    "Contrast",
    "Sharpness",
    "AutoContrast",
    "Equalize",
    "Blur",
    "Smooth",
)
TRANSFORMS: tuple[str, ...] = GEOMETRIC + PHOTOMETRIC
SIGNED: tuple[str, ...] = (
    "TranslateX",
    "TranslateY",
    "Rotate",
    "Brightness",
    "Color",
    "Contrast",
    "Sharpness",
)
UNSIGNED: tuple[str, ...] = tuple(t for t in TRANSFORMS if t not in SIGNED)

NUM_BINS = 31
"""Bins of the magnitude grid, zero included (``linspace(0, max, 31)``)."""
DEFAULT_COUNT = 6
"""Signed magnitudes drawn per image and transform in the reference."""
REFERENCE_SIZE = 224
"""Image side at which the translation maximum is 32 px."""
MAX_MAGNITUDE: dict[str, float] = {
    "TranslateX": 32.0,  # pixels at REFERENCE_SIZE, scaled by W / 224
    "TranslateY": 32.0,  # pixels at REFERENCE_SIZE, scaled by H / 224
    "Rotate": 135.0,  # degrees
    "Brightness": 0.99,  # factor 1 + m
    "Color": 0.99,
    "Contrast": 0.99,
    "Sharpness": 0.99,
}
MASK_TOLERANCE = 1e-6
"""An all-ones image through apply + invert counts as valid where it exceeds this."""

# PIL's RGB -> L weights (fixed point 16.16: L = (19595 R + 38470 G + 7471 B + 0x8000) >> 16)
_GRAY_WEIGHTS = (19595 / 65536, 38470 / 65536, 7471 / 65536)
# PIL ImageFilter.SMOOTH (3x3, scale 13) and ImageFilter.BLUR (5x5 ring, scale 16)
_SMOOTH_KERNEL = ((1.0, 1.0, 1.0), (1.0, 5.0, 1.0), (1.0, 1.0, 1.0))
_SMOOTH_SCALE = 13.0
_BLUR_KERNEL = (
    (1.0, 1.0, 1.0, 1.0, 1.0),
    (1.0, 0.0, 0.0, 0.0, 1.0),
    (1.0, 0.0, 0.0, 0.0, 1.0),
    (1.0, 0.0, 0.0, 0.0, 1.0),
    (1.0, 1.0, 1.0, 1.0, 1.0),
)
_BLUR_SCALE = 16.0


def _check_name(name: str) -> str:
    if name not in TRANSFORMS:
        raise ValueError(f"unknown transform {name!r}; allowed: {', '.join(TRANSFORMS)}")
    return name


def is_geometric(name: str) -> bool:
    """True for the geometric transforms (those whose maps are inverted before comparison)."""
    return _check_name(name) in GEOMETRIC


def _size_hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        hw = (size, size)
    else:
        hw = tuple(int(s) for s in size)
        if len(hw) != 2:
            raise ValueError(f"size must be an int or (height, width), got {size!r}")
    if hw[0] < 1 or hw[1] < 1:
        raise ValueError(f"size must be positive, got {size!r}")
    return hw  # type: ignore[return-value]


def _max_magnitude(name: str, size: int | Sequence[int]) -> float:
    h, w = _size_hw(size)
    base = MAX_MAGNITUDE[name]
    if name == "TranslateX":
        return base * w / REFERENCE_SIZE
    if name == "TranslateY":
        return base * h / REFERENCE_SIZE
    return base


def magnitude_grid(name: str, size: int | Sequence[int] = REFERENCE_SIZE) -> list[float]:
    """The 60 non-zero signed magnitudes ``±linspace(0, max, 31)[1:]`` (ascending), or ``[0.0]``.

    ``size`` is the image side (int) or ``(height, width)``; only translations depend on it
    (32 px at 224 px, scaled linearly).
    """
    _check_name(name)
    if name in UNSIGNED:
        return [0.0]
    top = _max_magnitude(name, size)
    steps = NUM_BINS - 1
    positive = [top * k / steps for k in range(1, NUM_BINS)]
    return [-v for v in reversed(positive)] + positive


def sample_magnitudes(
    name: str,
    count: int = DEFAULT_COUNT,
    generator: torch.Generator | int | None = None,
    size: int | Sequence[int] = REFERENCE_SIZE,
) -> torch.Tensor:
    """Draw ``count`` magnitudes of ``name`` without replacement (float64, CPU).

    Unsigned transforms have one variant: the result is ``tensor([0.0])`` whatever ``count``.
    ``generator`` is a CPU ``torch.Generator`` or an int seed (required: draws are explicit).
    """
    grid = magnitude_grid(name, size)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive int, got {count!r}")
    if len(grid) == 1:
        return torch.tensor(grid, dtype=torch.float64)
    if count > len(grid):
        raise ValueError(f"count {count} exceeds the {len(grid)} magnitudes of {name}")
    if generator is None:
        raise ValueError("sample_magnitudes needs a torch.Generator or an int seed")
    if isinstance(generator, int):
        generator = torch.Generator().manual_seed(generator)
    order = torch.randperm(len(grid), generator=generator)[:count]
    return torch.tensor(grid, dtype=torch.float64)[order]


def _magnitudes(name: str, magnitudes, batch: int) -> torch.Tensor:
    """Per-sample magnitudes as a float64 CPU tensor of shape [batch]."""
    if magnitudes is None:
        if name in SIGNED:
            raise ValueError(f"{name} needs magnitudes (one per image)")
        return torch.zeros(batch, dtype=torch.float64)
    m = torch.as_tensor(magnitudes).detach().to("cpu", torch.float64).reshape(-1)
    if m.numel() == 1 and batch != 1:
        m = m.expand(batch)
    if m.numel() != batch:
        raise ValueError(
            f"{name}: got {m.numel()} magnitudes for a batch of {batch} (need one per image)"
        )
    if not torch.isfinite(m).all():
        raise ValueError(f"{name}: magnitudes must be finite, got {m.tolist()}")
    return m.contiguous()


def translation_pixels(magnitudes: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """Whole-pixel shifts applied for translation magnitudes: ``int(m)`` (toward zero)."""
    return torch.trunc(torch.as_tensor(magnitudes, dtype=torch.float64)).to(torch.int64)


# --------------------------------------------------------------------------- geometry


def _shift(images: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Move content by (dx, dy) whole pixels per sample (right/down positive), fill 0.

    ``images`` is [B,C,H,W]; ``dx``/``dy`` int64 [B] on any device.
    """
    b, c, h, w = images.shape
    dev = images.device
    dx = dx.to(dev)
    dy = dy.to(dev)
    ys = torch.arange(h, device=dev).unsqueeze(0) - dy.unsqueeze(1)  # [B,H] source rows
    xs = torch.arange(w, device=dev).unsqueeze(0) - dx.unsqueeze(1)  # [B,W] source cols
    valid = ((ys >= 0) & (ys < h)).unsqueeze(2) & ((xs >= 0) & (xs < w)).unsqueeze(1)
    ys = ys.clamp(0, h - 1)
    xs = xs.clamp(0, w - 1)
    out = images.gather(2, ys.view(b, 1, h, 1).expand(b, c, h, w))
    out = out.gather(3, xs.view(b, 1, 1, w).expand(b, c, h, w))
    return out * valid.unsqueeze(1).to(out.dtype)


def _pil_rotation_coefficients(angle: float, w: int, h: int) -> list[float]:
    """PIL ``Image.rotate`` inverse affine matrix (a, b, c, d, e, f), default centre."""
    angle = angle % 360.0
    rad = -math.radians(angle)
    a = round(math.cos(rad), 15)
    b = round(math.sin(rad), 15)
    d = round(-math.sin(rad), 15)
    e = round(math.cos(rad), 15)
    cx, cy = w / 2, h / 2
    c = a * -cx + b * -cy + cx
    f = d * -cx + e * -cy + cy
    return [a, b, c, d, e, f]


def _rotate_nearest(images: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """PIL ``rotate(angle, NEAREST, fillcolor=0)`` per sample, via its 16.16 fixed-point sampler."""
    b, c, h, w = images.shape
    dev = images.device

    def fix(v: float) -> int:
        return math.floor(v * 65536.0 + 0.5)

    rows = []
    for angle in angles.tolist():
        a = _pil_rotation_coefficients(angle, w, h)
        rows.append(
            [
                fix(a[0]),
                fix(a[1]),
                fix(a[2] + a[0] * 0.5 + a[1] * 0.5),
                fix(a[3]),
                fix(a[4]),
                fix(a[5] + a[3] * 0.5 + a[4] * 0.5),
            ]
        )
    k = torch.tensor(rows, dtype=torch.int64, device=dev).view(b, 6, 1, 1)
    y = torch.arange(h, device=dev, dtype=torch.int64).view(1, h, 1)
    x = torch.arange(w, device=dev, dtype=torch.int64).view(1, 1, w)
    xx = k[:, 2] + y * k[:, 1] + x * k[:, 0]  # [B,H,W] fixed-point source x
    yy = k[:, 5] + y * k[:, 4] + x * k[:, 3]
    xin = torch.div(xx, 65536, rounding_mode="floor")
    yin = torch.div(yy, 65536, rounding_mode="floor")
    valid = (xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)
    idx = (yin.clamp(0, h - 1) * w + xin.clamp(0, w - 1)).view(b, 1, h * w)
    out = images.reshape(b, c, h * w).gather(2, idx.expand(b, c, h * w)).view(b, c, h, w)
    return out * valid.unsqueeze(1).to(out.dtype)


def _rotate_bilinear(maps: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate [B,1,H,W] counter-clockwise by ``angles`` degrees about the centre, bilinear,
    zero outside: ``skimage.transform.rotate(m, angle, order=1)`` semantics."""
    b, _, h, w = maps.shape
    dev = maps.device
    coord_dtype = torch.float32 if dev.type == "mps" else torch.float64
    rad = torch.deg2rad(angles.to(torch.float64)).to(dev, coord_dtype)
    cos = torch.cos(rad).view(b, 1, 1)
    sin = torch.sin(rad).view(b, 1, 1)
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    y = torch.arange(h, device=dev, dtype=coord_dtype).view(1, h, 1) - cy
    x = torch.arange(w, device=dev, dtype=coord_dtype).view(1, 1, w) - cx
    # output pixel p samples the input at R(angle) (p - c) + c, in (x=col, y=row) coordinates
    xin = (cos * x - sin * y + cx).expand(b, h, w)
    yin = (sin * x + cos * y + cy).expand(b, h, w)
    # bilinear by hand (coordinates and weights in float64, unlike grid_sample's float32
    # grid): neighbours outside the image count as 0, as skimage's constant mode
    x0 = torch.floor(xin)
    y0 = torch.floor(yin)
    wx = (xin - x0).to(maps.dtype)
    wy = (yin - y0).to(maps.dtype)
    x0 = x0.to(torch.int64)
    y0 = y0.to(torch.int64)
    flat = maps.reshape(b, h * w)
    out = torch.zeros(b, h, w, dtype=maps.dtype, device=dev)
    for dy, fy in ((0, 1 - wy), (1, wy)):
        for dx, fx in ((0, 1 - wx), (1, wx)):
            xi = x0 + dx
            yi = y0 + dy
            inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
            idx = (yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)).view(b, h * w)
            vals = flat.gather(1, idx).view(b, h, w)
            out += torch.where(inside, vals * (fx * fy), torch.zeros_like(vals))
    return out.unsqueeze(1)


# --------------------------------------------------------------------------- photometric


def _gray(images: torch.Tensor, name: str) -> torch.Tensor:
    """PIL 'L' conversion (unrounded) as [B,1,H,W]."""
    c = images.shape[1]
    if c == 1:
        return images
    if c == 3:
        wr, wg, wb = _GRAY_WEIGHTS
        return images[:, 0:1] * wr + images[:, 1:2] * wg + images[:, 2:3] * wb
    raise ValueError(f"{name} needs 1 or 3 channels, got {c}")


def _blend(degenerate: torch.Tensor, images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL ``Image.blend(degenerate, image, factor)`` in float, clipped to [0, 1]."""
    f = factor.view(-1, 1, 1, 1)
    return (degenerate + f * (images - degenerate)).clamp(0.0, 1.0)


def _filter_keep_border(images: torch.Tensor, kernel, scale: float) -> torch.Tensor:
    """PIL ``ImageFilter`` built-in kernel: interior convolved, border pixels left unchanged."""
    b, c, h, w = images.shape
    k = len(kernel)
    r = k // 2
    if h < k or w < k:  # PIL returns a copy when the image is smaller than the kernel
        return images.clone()
    weight = torch.tensor(kernel, dtype=images.dtype, device=images.device) / scale
    inner = F.conv2d(images.reshape(b * c, 1, h, w), weight.view(1, 1, k, k)).view(
        b, c, h - 2 * r, w - 2 * r
    )
    out = images.clone()
    out[:, :, r : h - r, r : w - r] = inner.clamp(0.0, 1.0)
    return out


def _contrast_degenerate(images: torch.Tensor) -> torch.Tensor:
    """PIL Contrast: ``int(mean(L) + 0.5)`` of the 8-bit grayscale image, as [B,1,1,1]."""
    _gray(images, "Contrast")  # channel check
    q = torch.floor(images.to(torch.float64) * 255.0 + 0.5).clamp(0, 255)
    if q.shape[1] == 3:  # PIL: L = (19595 R + 38470 G + 7471 B + 0x8000) >> 16
        q = torch.floor((q[:, 0] * 19595 + q[:, 1] * 38470 + q[:, 2] * 7471 + 32768) / 65536)
    mean = q.mean(dim=tuple(range(1, q.ndim)))
    return (torch.floor(mean + 0.5) / 255.0).to(images.dtype).view(-1, 1, 1, 1)


def _autocontrast(images: torch.Tensor) -> torch.Tensor:
    lo = images.amin(dim=(2, 3), keepdim=True)
    hi = images.amax(dim=(2, 3), keepdim=True)
    span = hi - lo
    ok = span > 0
    out = (images - lo) / torch.where(ok, span, torch.ones_like(span))
    return torch.where(ok, out.clamp(0.0, 1.0), images)


def _equalize(images: torch.Tensor) -> torch.Tensor:
    """PIL ``ImageOps.equalize`` per channel on 256 levels (input rounded half up to k/255)."""
    b, c, h, w = images.shape
    q = torch.floor(images * 255.0 + 0.5).clamp(0, 255).to(torch.int64).reshape(b * c, h * w)
    hist = torch.zeros(b * c, 256, dtype=torch.int64, device=images.device)
    hist.scatter_add_(1, q, torch.ones_like(q))
    levels = torch.arange(256, device=images.device)
    occupied = hist > 0
    last = torch.where(occupied, levels, -1).amax(dim=1, keepdim=True)  # last non-empty level
    h_last = hist.gather(1, last.clamp(min=0))
    step = (hist.sum(dim=1, keepdim=True) - h_last) // 255
    identity = (occupied.sum(dim=1, keepdim=True) <= 1) | (step == 0)
    n = step // 2 + torch.cumsum(hist, dim=1) - hist  # PIL: lut[i] = n // step
    lut = torch.div(n, torch.where(identity, torch.ones_like(step), step), rounding_mode="floor")
    lut = lut.clamp(0, 255)
    mapped = (lut.gather(1, q).to(images.dtype) / 255.0).view(b, c, h, w)
    return torch.where(identity.view(b, c, 1, 1), images, mapped)


# --------------------------------------------------------------------------- public API


def _check_images(images: torch.Tensor, name: str) -> None:
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{name}: images must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"{name}: images must be [B,C,H,W], got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{name}: images must be float in [0, 1], got dtype {images.dtype}")


def apply(
    name: str, images01: torch.Tensor, magnitudes: torch.Tensor | Sequence[float] | float | None
) -> torch.Tensor:
    """Apply transform ``name`` to ``images01`` [B,C,H,W] in [0,1] with per-sample magnitudes [B].

    Unsigned transforms ignore the magnitudes (``None`` allowed). Returns a new tensor of the
    same shape, dtype and device.
    """
    _check_name(name)
    _check_images(images01, name)
    bsz = images01.shape[0]
    m = _magnitudes(name, magnitudes, bsz)
    x = images01
    if name in ("TranslateX", "TranslateY"):
        shift = translation_pixels(m)
        zero = torch.zeros_like(shift)
        return _shift(x, shift, zero) if name == "TranslateX" else _shift(x, zero, shift)
    if name == "Rotate":
        return _rotate_nearest(x, m)
    if name == "FlipLR":
        return torch.flip(x, dims=(3,))
    if name == "FlipUD":
        return torch.flip(x, dims=(2,))
    factor = (1.0 + m).to(x.device, x.dtype)
    if name == "Brightness":
        return _blend(torch.zeros_like(x), x, factor)
    if name == "Color":
        if x.shape[1] == 1:
            return x.clone()
        return _blend(_gray(x, name).expand_as(x), x, factor)
    if name == "Contrast":
        return _blend(_contrast_degenerate(x).expand_as(x), x, factor)
    if name == "Sharpness":
        return _blend(_filter_keep_border(x, _SMOOTH_KERNEL, _SMOOTH_SCALE), x, factor)
    if name == "AutoContrast":
        return _autocontrast(x)
    if name == "Equalize":
        return _equalize(x)
    if name == "Blur":
        return _filter_keep_border(x, _BLUR_KERNEL, _BLUR_SCALE)
    if name == "Smooth":
        return _filter_keep_border(x, _SMOOTH_KERNEL, _SMOOTH_SCALE)
    raise AssertionError(name)  # pragma: no cover


def invert(
    name: str, maps: torch.Tensor, magnitudes: torch.Tensor | Sequence[float] | float | None
) -> torch.Tensor:
    """Map saliency maps [B,H,W] of transformed images back to the original frame.

    Translations shift back by the same whole pixels, rotations rotate by the opposite angle
    (bilinear, zero outside), flips flip again; photometric transforms return ``maps``
    unchanged (same tensor).
    """
    _check_name(name)
    if not isinstance(maps, torch.Tensor) or maps.ndim != 3:
        shape = tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__
        raise ValueError(f"{name}: maps must be a [B,H,W] tensor, got {shape}")
    if name in PHOTOMETRIC:
        return maps
    m = _magnitudes(name, magnitudes, maps.shape[0])
    x = maps.unsqueeze(1)
    if not x.is_floating_point():
        x = x.to(torch.float32)
    if name in ("TranslateX", "TranslateY"):
        shift = -translation_pixels(m)
        zero = torch.zeros_like(shift)
        out = _shift(x, shift, zero) if name == "TranslateX" else _shift(x, zero, shift)
    elif name == "Rotate":
        out = _rotate_bilinear(x, -m)
    elif name == "FlipLR":
        out = torch.flip(x, dims=(3,))
    else:  # FlipUD
        out = torch.flip(x, dims=(2,))
    return out.squeeze(1)


def valid_mask(
    name: str,
    magnitudes: torch.Tensor | Sequence[float] | float | None,
    H: int,
    W: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Bool [B,H,W]: where an all-ones image survives ``apply`` then ``invert`` (> 1e-6).

    All True for photometric transforms and flips. ``B`` is the number of magnitudes (1 for
    unsigned transforms given ``None``).
    """
    _check_name(name)
    if magnitudes is None:
        bsz = 1
    else:
        bsz = torch.as_tensor(magnitudes).reshape(-1).numel()
    m = _magnitudes(name, magnitudes, bsz)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if name in PHOTOMETRIC or name in ("FlipLR", "FlipUD"):
        return torch.ones(bsz, H, W, dtype=torch.bool, device=dev)
    dtype = torch.float32 if dev.type == "mps" else torch.float64
    tol = 1e-3 if dtype == torch.float32 else MASK_TOLERANCE
    ones = torch.ones(bsz, 1, H, W, dtype=dtype, device=dev)
    back = invert(name, apply(name, ones, m).squeeze(1), m)
    return back > tol
