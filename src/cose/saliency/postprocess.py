"""Turning raw attributions into the 2-D maps the reference compared (REFERENCE.md)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def quantile_rows(values: torch.Tensor, q: float) -> torch.Tensor:
    """Per-row q-quantile of a [B, N] tensor with numpy's default (linear) interpolation."""
    s, _ = torch.sort(values.double(), dim=1)
    n = s.shape[1]
    pos = q * (n - 1)
    lo = int(pos // 1)
    hi = min(lo + 1, n - 1)
    t = pos - lo
    a, b = s[:, lo], s[:, hi]
    # numpy's _lerp: a + (b - a) * t, computed from the upper end for t >= 0.5
    return torch.where(torch.as_tensor(t >= 0.5), b - (b - a) * (1 - t), a + (b - a) * t)


def gradient_map(attr: torch.Tensor, percentile: float = 99.0) -> torch.Tensor:
    """[B,C,H,W] attribution -> [B,H,W] in [0,1], as PAIR's VisualizeImageGrayscale:
    sum of |.| over channels, (m - min) / (p99 - min), clipped to [0,1].

    Where the 99th percentile equals the minimum (a constant map) the reference divides by
    zero; here the map is all zeros.
    """
    m = attr.abs().sum(1).double()
    flat = m.flatten(1)
    vmax = quantile_rows(flat, percentile / 100.0)
    vmin = flat.min(1).values
    denom = (vmax - vmin).view(-1, 1, 1)
    out = (m - vmin.view(-1, 1, 1)) / torch.where(denom > 0, denom, torch.ones_like(denom))
    out = torch.where(denom > 0, out.clamp(0.0, 1.0), torch.zeros_like(out))
    return out.to(attr.dtype if attr.is_floating_point() else torch.float32)


def cam_map(cam: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B,h,w] class activation (already ReLU'd) -> [B,H,W] in [0,1], as pytorch-grad-cam:
    min-max scaled (eps 1e-7), resized bilinearly (half-pixel centres, as cv2.resize), min-max
    scaled again."""
    cam = cam.float()
    cam = _minmax(cam)
    if tuple(cam.shape[-2:]) != tuple(size):
        cam = F.interpolate(cam[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return _minmax(cam)


def _minmax(x: torch.Tensor) -> torch.Tensor:
    flat = x.flatten(1)
    x = x - flat.min(1).values.view(-1, 1, 1)
    return x / (1e-7 + x.flatten(1).max(1).values.view(-1, 1, 1))


def lime_mask(
    segments: torch.Tensor, features: list[list[tuple[int, float]]], num_features: int
) -> torch.Tensor:
    """Per image: +1 on the `num_features` segments of largest |weight| with weight >= 0,
    -1 where the weight is negative, 0 elsewhere (lime's get_image_and_mask with
    positive_only=False). `features[i]` is lime's (segment, weight) list sorted by |weight|."""
    out = torch.zeros(segments.shape, dtype=torch.float32)
    for i, exp in enumerate(features):
        seg = segments[i]
        lut = torch.zeros(int(seg.max()) + 1, dtype=torch.float32)
        for f, w in exp[:num_features]:
            lut[int(f)] = -1.0 if w < 0 else 1.0
        out[i] = lut[seg.long()]
    return out
