"""Class activation maps (GradCAM, GradCAM++), batched, with pytorch-grad-cam's semantics.

Target: the logit of the class (pytorch-grad-cam's ClassifierOutputTarget). Activations and
their gradients are taken at the output of `layer`, passed through `reshape` (token models:
tokens -> [B,C,h,w]); the CAM is ReLU'd, min-max scaled, resized to the input, and scaled again.
Only the head above `layer` is differentiated: no input or weight gradients are computed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from cose.saliency import _core
from cose.saliency.postprocess import cam_map

Reshape = Callable[[torch.Tensor], torch.Tensor]


def resolve_layer(
    model: nn.Module, layer: nn.Module | str | None, reshape: Reshape | None
) -> tuple[nn.Module, Reshape | None]:
    """The module whose output the CAM uses: `layer` (a module or a dotted name within `model`),
    else what `cose.models.cam_layer(model)` resolves for registry architectures."""
    if isinstance(layer, str):
        try:
            layer = model.get_submodule(layer)
        except AttributeError as e:
            raise ValueError(
                f"layer: {layer!r} is not a submodule of {type(model).__name__}"
            ) from e
    if layer is not None:
        if not isinstance(layer, nn.Module):
            raise ValueError(f"layer: expected an nn.Module or a submodule name, got {layer!r}")
        return layer, reshape
    try:
        from cose.models import cam_layer
    except ImportError as e:  # pragma: no cover - models package not importable
        raise ValueError(
            f"no CAM layer for model {type(model).__name__}: cose.models.cam_layer is "
            f"unavailable ({e}); pass layer= (and reshape= for token models)"
        ) from e
    try:
        module, default_reshape = cam_layer(model)
    except Exception as e:
        raise ValueError(
            f"no known CAM layer for model {type(model).__name__} ({e}); "
            "pass layer= (and reshape= for token models)"
        ) from e
    if module is None:
        raise ValueError(
            f"no known CAM layer for model {type(model).__name__}; "
            "pass layer= (and reshape= for token models)"
        )
    return module, (reshape if reshape is not None else default_reshape)


def _weights_gradcam(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    return grads.mean(dim=(2, 3))


def _weights_gradcampp(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    g2 = grads * grads
    g3 = g2 * grads
    sum_acts = acts.sum(dim=(2, 3), keepdim=True)
    aij = g2 / (2 * g2 + sum_acts * g3 + 1e-6)
    aij = torch.where(grads != 0, aij, torch.zeros_like(aij))
    return (grads.clamp_min(0) * aij).sum(dim=(2, 3))


WEIGHTS = {"gradcam": _weights_gradcam, "gradcampp": _weights_gradcampp}


def compute(
    kind: str,
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    max_target: int,
    *,
    layer: nn.Module | str | None,
    reshape: Reshape | None,
    batch_size: int,
) -> torch.Tensor:
    """[B,H,W] CAMs in [0,1] for `kind` in WEIGHTS."""
    module, reshape = resolve_layer(model, layer, reshape)
    weight_fn = WEIGHTS[kind]
    H, W = images.shape[-2:]
    captured: list[torch.Tensor] = []

    def hook(_m, _inp, output):
        captured.append(output)
        if isinstance(output, torch.Tensor):
            # hand the model a copy: an in-place op after the layer (DenseNet's final ReLU)
            # must not alter the activation the CAM reads (pytorch-grad-cam on CUDA copies too)
            return output.clone()
        return None

    maps = []
    handle = module.register_forward_hook(hook)
    try:
        for start, stop in _core.chunks(images.shape[0], batch_size):
            captured.clear()
            x = images[start:stop].detach().requires_grad_(True)
            with torch.enable_grad():
                logits = model(x)
                _core.check_num_classes(logits, max_target)
                if not captured:
                    raise ValueError(
                        f"layer: {type(module).__name__} was not called in the forward pass "
                        f"of {type(model).__name__}"
                    )
                act = captured[-1]
                if not isinstance(act, torch.Tensor):
                    raise ValueError(
                        f"layer: {type(module).__name__} returns {type(act).__name__}, "
                        "expected a tensor"
                    )
                score = logits.gather(1, targets[start:stop].view(-1, 1)).sum()
                (grad,) = torch.autograd.grad(score, act)
            act = act.detach()
            if reshape is not None:
                act, grad = reshape(act), reshape(grad)
            if act.dim() != 4:
                raise ValueError(
                    f"layer: activation of {type(module).__name__} has shape "
                    f"{tuple(act.shape)}; a CAM needs [B,C,h,w] (pass reshape= for token or "
                    "channels-last layers)"
                )
            act, grad = act.float(), grad.float()
            w = weight_fn(act, grad)
            cam = (w[:, :, None, None] * act).sum(1).clamp_min(0)
            maps.append(cam_map(cam, (H, W)))
            captured.clear()
    finally:
        handle.remove()
        captured.clear()
    return torch.cat(maps)
