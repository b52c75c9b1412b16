"""Blur IG (PAIR saliency's BlurIG.GetMask), batched across images and steps, in torch.

Path: x blurred with sigma_k = k * max_sigma / steps, k = 0..steps-1 (sigma 0 = x itself);
attribution = -sum_k (sigma_{k+1} - sigma_k) * (blur(x, sigma_k + grad_step) - blur(x, sigma_k))
/ grad_step * grad(blur(x, sigma_k)). The blur is scipy.ndimage.gaussian_filter over the two
spatial axes exactly as PAIR calls it (truncate 4, radius int(4 sigma + 0.5), mode "constant",
i.e. zero padding), written as two banded matrix products so it runs batched on any device.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cose.saliency import _core
from cose.saliency.postprocess import gradient_map


def gaussian_matrix(sigma: float, n: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """[n, n] matrix M with (M @ v) = scipy.ndimage.gaussian_filter1d(v, sigma, mode="constant")."""
    if sigma <= 1e-15:
        return torch.eye(n, dtype=dtype, device=device)
    radius = int(4.0 * float(sigma) + 0.5)
    xs = torch.arange(-radius, radius + 1, dtype=torch.float64)
    phi = torch.exp(-0.5 / (sigma * sigma) * xs * xs)
    phi = phi / phi.sum()
    i = torch.arange(n).view(-1, 1)
    j = torch.arange(n).view(1, -1)
    off = j - i
    inside = off.abs() <= radius
    m = torch.where(inside, phi[(off + radius).clamp(0, 2 * radius)], torch.zeros(()))
    return m.to(dtype=dtype, device=device)


def blur_matrices(sigmas: list[float], n: int, device) -> torch.Tensor:
    return torch.stack([gaussian_matrix(s, n) for s in sigmas]).to(device)


def _blur(x: torch.Tensor, mh: torch.Tensor, mw: torch.Tensor) -> torch.Tensor:
    """x [N,C,H,W] float64, mh [N,H,H], mw [N,W,W] -> per-item blurred images."""
    return mh[:, None] @ x @ mw[:, None].transpose(-1, -2)


def attribution(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    max_target: int,
    *,
    steps: int,
    max_sigma: float,
    grad_step: float,
    batch_size: int,
) -> torch.Tensor:
    """[B,C,H,W] Blur IG attribution."""
    x = images.detach().float()
    B, C, H, W = x.shape
    dev = x.device
    sigmas = [float(i) * max_sigma / float(steps) for i in range(steps + 1)]
    diffs = torch.tensor(
        [sigmas[k + 1] - sigmas[k] for k in range(steps)], dtype=torch.float64, device=dev
    )
    # a step whose two blurs are the same filter adds exactly zero (k = 0 when the radius of
    # grad_step rounds to 0): skip its model call
    live = [
        k
        for k in range(steps)
        if not (sigmas[k] <= 1e-15 and int(4.0 * (sigmas[k] + grad_step) + 0.5) == 0)
    ]
    if not live:
        return torch.zeros_like(x)
    s0 = [sigmas[k] for k in live]
    s1 = [sigmas[k] + grad_step for k in live]
    h0, h1 = blur_matrices(s0, H, dev), blur_matrices(s1, H, dev)
    if W == H:
        w0, w1 = h0, h1
    else:
        w0, w1 = blur_matrices(s0, W, dev), blur_matrices(s1, W, dev)
    live_t = torch.tensor(live, device=dev)
    n_live = len(live)
    x64 = x.double()
    total = torch.zeros_like(x64)
    state = {}

    def make(idx):
        i, j = idx // n_live, idx % n_live
        xi = x64[i]
        step = _blur(xi, h0[j], w0[j])
        # the reference rounds both blurs to the input's float32 before differencing
        state["gg"] = (_blur(xi, h1[j], w1[j]).float().double() - step.float().double()) / grad_step
        return step.float(), targets[i]

    def reduce(idx, inp, g):
        k = live_t[idx % n_live]
        return diffs[k].view(-1, 1, 1, 1) * state.pop("gg") * g.double()

    _core.accumulate_grads(
        model, B * n_live, make, reduce, lambda idx: idx // n_live, total, max_target, batch_size
    )
    return (-total).float()


def compute(
    model, images, targets, max_target, *, steps=100, max_sigma=50.0, grad_step=0.01, batch_size=64
) -> torch.Tensor:
    if not math.isfinite(max_sigma) or max_sigma < 0:
        raise ValueError(f"max_sigma: got {max_sigma!r}, expected a finite value >= 0")
    if not grad_step > 0:
        raise ValueError(f"grad_step: got {grad_step!r}, expected > 0")
    return gradient_map(
        attribution(
            model,
            images,
            targets,
            max_target,
            steps=steps,
            max_sigma=max_sigma,
            grad_step=grad_step,
            batch_size=batch_size,
        )
    )
