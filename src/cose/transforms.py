"""The 13 COSE transforms: magnitude grid, batched forward on [0,1] images, inverses for maps.

Semantics follow the reference (torchvision's TrivialAugmentWide operations applied to PIL
images, plus flips and PIL's BLUR/SMOOTH filters); see docs/metric.md for the exact rules.

- Magnitude grid: ``torch.linspace(0, max, 31)`` in float32, as the reference builds it, so
  every bin moves the same pixels and angles (translation bin 15 is 15.999999: 15 px).
- Geometric (TranslateX, TranslateY, Rotate, FlipLR, FlipUD): nearest interpolation, fill 0,
  bit-exact to PIL on any image.
  Translations move by ``int(magnitude)`` pixels (truncation toward zero, as torchvision's
  ``_apply_op`` does); rotations are counter-clockwise in degrees about the image centre,
  reproducing PIL's 16.16 fixed-point nearest-neighbour sampling.
- Photometric (Brightness, Color, Contrast, Sharpness, AutoContrast, Equalize, Blur, Smooth):
  PIL's uint8 arithmetic (ImageEnhance blends in float32 truncated to uint8, the grey
  conversion and filter kernels as libImaging computes them, ImageOps' lookup tables), so they
  are bit-exact to the reference's PIL path on uint8-valued inputs. The input is rounded to 8
  bits first (k/255, as a PIL image holds it); the output is k/255 in the input's dtype.

All functions are batched over the first dimension, take per-sample magnitudes and run on the
images' device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from cose import spec

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

# the names, kinds and maximum magnitudes live in cose.spec (no torch there)
GEOMETRIC, PHOTOMETRIC, TRANSFORMS = spec.GEOMETRIC, spec.PHOTOMETRIC, spec.TRANSFORMS
SIGNED, UNSIGNED, MAX_MAGNITUDE = spec.SIGNED, spec.UNSIGNED, spec.MAX_MAGNITUDE

NUM_BINS = 31
"""Bins of the magnitude grid, zero included (``linspace(0, max, 31)``)."""
DEFAULT_COUNT = 6
"""Signed magnitudes drawn per image and transform in the reference."""
REFERENCE_SIZE = 224
"""Image side at which the translation maximum is 32 px."""
MASK_TOLERANCE = 1e-6
"""An all-ones image through apply + invert counts as valid where it exceeds this."""

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
    """The 60 non-zero signed magnitudes ``±torch.linspace(0, max, 31)[1:]`` (float32 values,
    ascending), or ``[0.0]``.

    The values are the reference's float32 bins (translation bin 15 at 224 px is 15.999999,
    which moves 15 px); ``size`` is the image side (int) or ``(height, width)``; only
    translations depend on it (32 px at 224 px, scaled linearly).
    """
    _check_name(name)
    if name in UNSIGNED:
        return [0.0]
    top = _max_magnitude(name, size)
    positive = torch.linspace(0.0, top, NUM_BINS, dtype=torch.float32)[1:].tolist()
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
# PIL's uint8 arithmetic on images held as integers 0..255 (int32 tensors [B,C,H,W]): the
# same float32 operations in the same order as libImaging (Blend.c, Filter.c, Convert.c) and
# the same float64 lookup tables as ImageOps, so the results equal PIL's bytes.


def _to_u8(images: torch.Tensor) -> torch.Tensor:
    """[0,1] images as PIL's 8-bit levels (int32), rounded half up: exact on k/255 inputs."""
    return torch.floor(images.to(torch.float64) * 255.0 + 0.5).clamp(0, 255).to(torch.int32)


def _from_u8(levels: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """8-bit levels back to [0,1] in ``like``'s dtype, as ``ToTensor`` divides them."""
    return levels.to(like.dtype) / 255.0


def _check_bands(images: torch.Tensor, name: str) -> None:
    if images.shape[1] not in (1, 3):
        raise ValueError(f"{name} needs 1 or 3 channels, got {images.shape[1]}")


def _gray_u8(q: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> L conversion, [B,1,H,W] levels: (19595 R + 38470 G + 7471 B + 0x8000) >> 16
    (an L image is its own grey)."""
    if q.shape[1] == 1:
        return q
    weighted = q[:, 0:1] * 19595 + q[:, 1:2] * 38470 + q[:, 2:3] * 7471 + 0x8000
    return torch.div(weighted, 65536, rounding_mode="floor")


def _alpha(magnitudes: torch.Tensor, device: torch.device) -> torch.Tensor:
    """PIL's blend factor ``1 + m``: a Python float (float64) read by libImaging as a C float."""
    return (1.0 + magnitudes.to(torch.float64)).to(device=device, dtype=torch.float32)


def _blend_u8(degenerate: torch.Tensor, images: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """PIL ``Image.blend(degenerate, image, alpha)``: ``(UINT8)(in1 + alpha * (in2 - in1))`` in
    float32, clipped to 0..255 (alpha 0 and 1 copy an input, as PIL's shortcuts do)."""
    a = alpha.view(-1, 1, 1, 1)
    low = degenerate.expand_as(images)
    step = a * (images - low).to(torch.float32)  # product, then sum: two float32 roundings
    mixed = torch.trunc((low.to(torch.float32) + step).clamp(0.0, 255.0)).to(torch.int32)
    mixed = torch.where(a == 0.0, low, mixed)
    return torch.where(a == 1.0, images, mixed)


def _filter_u8(q: torch.Tensor, kernel, scale: float) -> torch.Tensor:
    """PIL ``ImageFilter`` built-in kernel on levels: border pixels copied, interior
    ``clip8(0.5 + sum of rows)`` in float32, each row ``in[x-r] * k[0] + ... + in[x+r] * k[-1]``
    summed left to right, the kernel's first row applied to row y+r (libImaging's Filter.c)."""
    b, c, h, w = q.shape
    k = len(kernel)
    r = k // 2
    if h < k or w < k:  # PIL returns a copy when the image is smaller than the kernel
        return q.clone()
    weights = torch.tensor(kernel, dtype=torch.float32) / torch.tensor(scale, dtype=torch.float32)
    weights = weights.to(q.device)
    x = q.to(torch.float32)
    ss = torch.full((b, c, h - 2 * r, w - 2 * r), 0.5, dtype=torch.float32, device=q.device)
    for j in range(k):
        row = x[:, :, 2 * r - j : h - j, :]  # in[y + r - j] for the interior rows y
        term = row[..., 0 : w - 2 * r] * weights[j, 0]
        for i in range(1, k):
            term = term + row[..., i : w - 2 * r + i] * weights[j, i]
        ss = ss + term
    out = q.clone()
    out[:, :, r : h - r, r : w - r] = torch.trunc(ss.clamp(0.0, 255.0)).to(torch.int32)
    return out


def _contrast_degenerate(q: torch.Tensor) -> torch.Tensor:
    """PIL Contrast's grey level ``int(mean(L) + 0.5)`` of the 8-bit grey image, [B,1,1,1]."""
    mean = _gray_u8(q).to(torch.float64).mean(dim=(1, 2, 3))
    return torch.floor(mean + 0.5).to(torch.int32).view(-1, 1, 1, 1)


def _autocontrast_u8(q: torch.Tensor) -> torch.Tensor:
    """PIL ``ImageOps.autocontrast`` (cutoff 0) per channel: lut[i] = int(i * scale + offset)
    clipped to 0..255, scale = 255 / (hi - lo), offset = -lo * scale (float64); identity where
    hi <= lo."""
    b, c, h, w = q.shape
    flat = q.reshape(b * c, h * w)
    lo, hi = torch.aminmax(flat, dim=1)
    lo, hi = lo.to(torch.float64).view(-1, 1), hi.to(torch.float64).view(-1, 1)
    span = hi - lo
    ok = span > 0
    # a true division (``255.0 / tensor`` would multiply by a rounded reciprocal)
    scale = torch.full_like(span, 255.0) / torch.where(ok, span, torch.ones_like(span))
    offset = -lo * scale
    levels = torch.arange(256, device=q.device, dtype=torch.float64).view(1, 256)
    lut = torch.trunc(levels * scale + offset).clamp(0, 255).to(torch.int32)
    lut = torch.where(ok, lut, levels.to(torch.int32))
    return lut.gather(1, flat.to(torch.int64)).view(b, c, h, w)


def _equalize_u8(q: torch.Tensor) -> torch.Tensor:
    """PIL ``ImageOps.equalize`` per channel on levels."""
    b, c, h, w = q.shape
    flat = q.reshape(b * c, h * w).to(torch.int64)
    hist = torch.zeros(b * c, 256, dtype=torch.int64, device=q.device)
    hist.scatter_add_(1, flat, torch.ones_like(flat))
    levels = torch.arange(256, device=q.device)
    occupied = hist > 0
    last = torch.where(occupied, levels, -1).amax(dim=1, keepdim=True)  # last non-empty level
    h_last = hist.gather(1, last.clamp(min=0))
    step = (hist.sum(dim=1, keepdim=True) - h_last) // 255
    identity = (occupied.sum(dim=1, keepdim=True) <= 1) | (step == 0)
    n = step // 2 + torch.cumsum(hist, dim=1) - hist  # PIL: lut[i] = n // step
    lut = torch.div(n, torch.where(identity, torch.ones_like(step), step), rounding_mode="floor")
    lut = torch.where(identity, levels.view(1, 256), lut.clamp(0, 255))
    return lut.gather(1, flat).to(torch.int32).view(b, c, h, w)


def _photometric(name: str, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Transform ``name`` of [0,1] images ``x`` (magnitudes ``m`` [B]) as PIL computes it."""
    _check_bands(x, name)
    q = _to_u8(x)
    if name in ("Brightness", "Color", "Contrast", "Sharpness"):
        if name == "Brightness":
            degenerate = torch.zeros_like(q)
        elif name == "Color":
            degenerate = _gray_u8(q)
        elif name == "Contrast":
            degenerate = _contrast_degenerate(q)
        else:
            degenerate = _filter_u8(q, _SMOOTH_KERNEL, _SMOOTH_SCALE)
        out = _blend_u8(degenerate, q, _alpha(m, q.device))
    elif name == "AutoContrast":
        out = _autocontrast_u8(q)
    elif name == "Equalize":
        out = _equalize_u8(q)
    elif name == "Blur":
        out = _filter_u8(q, _BLUR_KERNEL, _BLUR_SCALE)
    else:  # Smooth
        out = _filter_u8(q, _SMOOTH_KERNEL, _SMOOTH_SCALE)
    return _from_u8(out, x)


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
    return _photometric(name, x, m)


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
