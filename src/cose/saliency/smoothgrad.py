"""SmoothGrad (PAIR saliency's GetSmoothedMask over vanilla gradients), batched.

Per image: std = noise * (max(x) - min(x)); mean over `samples` draws of grad(x + eps)^2
(squared, PAIR's magnitude=True), eps ~ N(0, std^2), gradient of the target's softmax
probability. The standard-normal draws come from a CPU torch.Generator seeded with `seed`, one
[samples, C, H, W] block per call shared by every image of the call (each scaled by its own
std): an image's map therefore does not depend on which other images share its batch, nor on the
device (seed=None: fresh entropy, not reproducible). PAIR draws from numpy's global generator,
so maps agree with it only in distribution.
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
    samples: int,
    noise: float,
    seed: int | None,
    batch_size: int,
) -> torch.Tensor:
    """[B,C,H,W] mean squared gradient under noise."""
    x = images.detach().float()
    B = x.shape[0]
    flat = x.flatten(1)
    std = noise * (flat.max(1).values - flat.min(1).values)
    gen = torch.Generator(device="cpu")
    if seed is None:
        gen.seed()  # fresh entropy: not reproducible
    else:
        gen.manual_seed(int(seed))
    eps = torch.randn((samples, *x.shape[1:]), generator=gen, dtype=torch.float32).to(x.device)
    total = torch.zeros_like(x)

    def make(idx):
        i, k = idx // samples, idx % samples
        return x[i] + eps[k] * std[i].view(-1, 1, 1, 1), targets[i]

    _core.accumulate_grads(
        model,
        B * samples,
        make,
        lambda idx, inp, g: g * g,
        lambda idx: idx // samples,
        total,
        max_target,
        batch_size,
    )
    return total / samples


def compute(
    model, images, targets, max_target, *, samples=50, noise=0.15, seed=0, batch_size=64
) -> torch.Tensor:
    return gradient_map(
        attribution(
            model,
            images,
            targets,
            max_target,
            samples=samples,
            noise=noise,
            seed=seed,
            batch_size=batch_size,
        )
    )
