"""Guided IG (PAIR saliency's guided_ig_impl), batched across images, in torch.

The path is sequential (each step's gradient decides where the next step goes), so the steps
run one after another; all images move together, one batched gradient call per step. The
inner "move the lowest-|gradient| features" loop is vectorised over images with a per-image
active mask; the state is float64 as in PAIR, the model sees float32. The feature threshold is
numpy's quantile(|g|, fraction, method="lower") over all C*H*W features of the image.
Baseline: zeros (of the tensor the model receives).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cose.saliency import _core
from cose.saliency.postprocess import gradient_map

EPSILON = 1e-9


def _batched_grads(model, x64, shape, targets, max_target, batch_size):
    out = []
    for start, stop in _core.chunks(x64.shape[0], batch_size):
        xi = x64[start:stop].view(-1, *shape).float()
        out.append(_core.prob_grad(model, xi, targets[start:stop], max_target))
    return torch.cat(out).flatten(1).double()


def attribution(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    max_target: int,
    *,
    steps: int,
    fraction: float,
    max_dist: float,
    batch_size: int,
) -> torch.Tensor:
    """[B,C,H,W] Guided IG attribution."""
    shape = images.shape[1:]
    x_in = images.detach().double().flatten(1)
    B, N = x_in.shape
    # the baseline is zeros, so diff = x_in and x - baseline = x (exactly, signed zeros too)
    diff = x_in
    x = torch.zeros_like(x_in)
    l1_total = diff.abs().sum(1)
    attr = torch.zeros_like(x_in)
    nonzero = diff != 0
    safe_diff = torch.where(nonzero, diff, torch.ones_like(diff))
    kth = int(math.floor((N - 1) * fraction)) + 1  # numpy's "lower" quantile, 1-based
    alive = l1_total != 0  # an input equal to the baseline gets a zero attribution
    any_alive = bool(alive.any())  # every step's first iteration runs iff this (one sync)
    inf = math.inf

    for step in range(steps):
        grad_actual = _batched_grads(model, x, shape, targets, max_target, batch_size)
        # |gradient|, set to inf where a feature reaches x_max (PAIR sets the gradient itself to
        # inf; only its absolute value and the inf marks are read, and the gradient of a
        # probability is finite, so the marks are the same)
        absg = grad_actual.abs()
        alpha = (step + 1.0) / steps
        alpha_min = max(alpha - max_dist, 0.0)
        alpha_max = min(alpha + max_dist, 1.0)
        x_min = diff * alpha_min
        x_max = diff * alpha_max
        l1_target = l1_total * (1 - (step + 1) / steps)
        active = alive.clone()
        # PAIR's inner loop, over all rows at once: a row leaves `active` when its L1 distance
        # to the input reaches the step's target. An iteration changes nothing in an inactive
        # row, so every row gets exactly PAIR's iterations. Fewer full passes over the [B, N]
        # float64 state than a literal transcription (one host sync per iteration after the
        # first: the test)
        go = any_alive
        while go:
            a = active.view(-1, 1)
            x_old = x
            # features behind alpha_min (x / diff < alpha_min; a zero-diff feature counts
            # as alpha_max, never behind) jump to x_min
            behind = (x / safe_diff < alpha_min) & nonzero & a
            x = torch.where(behind, x_min, x)
            l1_current = (x - x_in).abs().sum(1)
            # math.isclose(l1_target, l1_current, rel_tol=EPSILON, abs_tol=EPSILON)
            tol = torch.clamp(
                EPSILON * torch.maximum(l1_target.abs(), l1_current.abs()), min=EPSILON
            )
            close = (l1_target - l1_current).abs() <= tol
            moving = active & ~close
            m = moving.view(-1, 1)
            d = x_max - x  # |d| = |x - x_max| and d == 0 iff x == x_max, exactly
            absg.masked_fill_(m & (d == 0), inf)
            threshold = absg.kthvalue(kth, dim=1, keepdim=True).values
            s = (absg <= threshold) & (absg != inf) & m
            l1_s = torch.where(s, d.abs(), 0.0).sum(1)
            gamma = torch.where(
                l1_s > 0,
                (l1_current - l1_target) / torch.where(l1_s > 0, l1_s, torch.ones_like(l1_s)),
                inf,
            )
            big = gamma > 1.0
            # selected features go to x_max (gamma > 1) or a gamma-fraction of the way there
            g = torch.where(big, torch.ones_like(gamma), gamma).view(-1, 1)
            x = torch.where(s, torch.where(big.view(-1, 1), x_max, x + d * g), x)
            # inactive rows did not move: x - x_old is 0 there (attr += 0 leaves them)
            attr += (x - x_old) * grad_actual
            # a row with nothing left to select would loop forever (PAIR hangs there): stop it
            active = moving & big & s.any(1)
            go = bool(active.any())
    return attr.view(B, *shape).float()


def compute(
    model, images, targets, max_target, *, steps=200, fraction=0.25, max_dist=0.02, batch_size=64
) -> torch.Tensor:
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction: got {fraction!r}, expected a value in [0, 1]")
    if not 0.0 <= max_dist <= 1.0:
        raise ValueError(f"max_dist: got {max_dist!r}, expected a value in [0, 1]")
    return gradient_map(
        attribution(
            model,
            images,
            targets,
            max_target,
            steps=steps,
            fraction=fraction,
            max_dist=max_dist,
            batch_size=batch_size,
        )
    )
