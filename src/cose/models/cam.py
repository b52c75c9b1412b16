"""CAM target layers (and token reshapes) resolved by model type, as the reference chose them."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

Reshape = Callable[[torch.Tensor], torch.Tensor]


class TokenReshape:
    """ViT tokens ``[B, N, C]`` -> ``[B, C, h, w]``, dropping the ``prefix`` tokens (CLS,
    registers) and laying the rest on a grid (the patch grid, or a square one)."""

    def __init__(self, prefix: int, grid: tuple[int, int] | None = None):
        self.prefix = prefix
        self.grid = grid

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        b, n, c = tokens.shape
        patches = tokens[:, self.prefix :, :]
        m = n - self.prefix
        if self.grid is not None and self.grid[0] * self.grid[1] == m:
            h, w = self.grid
        else:
            h = w = math.isqrt(m)
            if h * w != m:
                raise ValueError(f"{m} patch tokens do not form a square grid")
        return patches.reshape(b, h, w, c).permute(0, 3, 1, 2)

    def __repr__(self) -> str:
        return f"TokenReshape(prefix={self.prefix}, grid={self.grid})"


class NHWCToNCHW:
    """Swin activations ``[B, H, W, C]`` -> ``[B, C, H, W]``."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2)

    def __repr__(self) -> str:
        return "NHWCToNCHW()"


def _unwrap(model: nn.Module) -> nn.Module:
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if isinstance(inner, nn.Module):
            model = inner
        else:
            return model


def cam_layer(model: nn.Module) -> tuple[nn.Module, Reshape | None]:
    """The layer GradCAM hooks for ``model`` and the reshape of its activations to
    ``[B, C, h, w]`` (None when they already are). Raises ValueError for unknown types."""
    import timm.models as tm
    import torchvision.models as tvm

    model = _unwrap(model)
    registered = getattr(model, "cose_cam_layer", None)
    if registered:  # a registered model's own choice (cose.models.register(cam_layer=...))
        name, reshape = registered
        return model.get_submodule(name), reshape
    if isinstance(model, (tm.ResNet, tvm.ResNet)):
        return model.layer4[-1], None
    if isinstance(model, tm.VisionTransformer):
        prefix = model.num_prefix_tokens
        grid = tuple(model.patch_embed.grid_size) if model.patch_embed.grid_size else None
        return model.blocks[-1].norm1, TokenReshape(prefix, grid)
    if isinstance(model, tvm.VisionTransformer):
        n = model.image_size // model.patch_size
        return model.encoder.layers[-1].ln_1, TokenReshape(1, (n, n))
    if isinstance(model, tm.SwinTransformer):
        return model.layers[-1].blocks[-1].norm1, NHWCToNCHW()
    if isinstance(model, tvm.SwinTransformer):
        return model.features[-1][-1].norm1, NHWCToNCHW()
    if isinstance(model, tm.ConvNeXt):
        return model.stages[-1], None
    if isinstance(model, tvm.ConvNeXt):
        return model.features[-1], None
    if isinstance(model, (tm.VGG, tvm.VGG, tm.DenseNet, tvm.DenseNet)):
        return model.features[-1], None
    raise ValueError(
        f"no CAM layer known for model class {type(model).__name__}; supported: ResNet, "
        "VisionTransformer, SwinTransformer, ConvNeXt, VGG, DenseNet (timm or torchvision)"
    )
