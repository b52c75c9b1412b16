"""Integrated Gradients with PAIR saliency's rule, batched across images and steps.

PAIR (saliency 0.2.1, IntegratedGradients.GetMask): alphas = linspace(0, 1, steps) (both ends
included), attribution = (x - baseline) * sum_k grad(baseline + alpha_k (x - baseline)) / steps.
Captum's Riemann rules differ from this (riemann_trapezoid has the same alphas but halves the end
weights and divides by steps - 1; the left/right/middle rules shift the alphas), so the rule is
written here rather than taken from captum. Baseline: zeros (of the tensor the model receives).
"""

from __future__ import annotations

import torch
from torch import nn

from cose.saliency import _core
from cose.saliency.postprocess import gradient_map


def attribution(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    max_target: int,
    *,
    steps: int,
    batch_size: int,
) -> torch.Tensor:
    """[B,C,H,W] IG attribution (zero baseline)."""
    x = images.detach().float()
    alphas = torch.linspace(0.0, 1.0, steps, dtype=torch.float64).to(x.device)
    total = torch.zeros_like(x)

    def make(idx):
        i, k = idx // steps, idx % steps
        return (x[i] * alphas[k].view(-1, 1, 1, 1)).float(), targets[i]

    _core.accumulate_grads(
        model,
        x.shape[0] * steps,
        make,
        lambda idx, inp, g: g,
        lambda idx: idx // steps,
        total,
        max_target,
        batch_size,
    )
    return total * x / steps


def compute(model, images, targets, max_target, *, steps=25, batch_size=64) -> torch.Tensor:
    return gradient_map(
        attribution(model, images, targets, max_target, steps=steps, batch_size=batch_size)
    )
