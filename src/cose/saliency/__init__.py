"""Saliency methods: the reference's seven, batched on any device (see docs/saliency.md).

    explain(method, model, images[B,C,H,W], targets[B], **settings) -> maps[B,H,W]

`images` are normalised model inputs; maps come back on the images' device, float32: CAMs and
gradient maps in [0,1], LIME in {-1, 0, 1}. Unset settings take the reference's values
(`defaults(method)`).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cose.saliency import _core, blur_ig, gradcam, gradcampp, guided_ig, ig, lime, smoothgrad

__all__ = [
    "METHODS", "Method", "defaults", "explain", "get", "passes_model", "register", "registered",
]

METHODS = ("gradcam", "gradcampp", "ig", "smoothgrad", "blur_ig", "guided_ig", "lime")

# model inputs per call; None = by device: AUTO_BATCH_SIZE[device type], else "other"
DEFAULT_BATCH_SIZE = None
AUTO_BATCH_SIZE = {"cpu": 32, "other": 64}


@dataclass(frozen=True)
class Method:
    """A registered saliency method: `fn(model, images, targets, max_target, **settings)`
    returns [B,H,W] maps; `defaults` names every setting it accepts, with its default."""

    name: str
    fn: Callable[..., torch.Tensor]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    doc: str = ""


_REGISTRY: dict[str, Method] = {}


def register(
    name: str,
    fn: Callable[..., torch.Tensor],
    defaults: Mapping[str, Any],
    doc: str = "",
    *,
    replace: bool = False,
) -> Method:
    """Add a method to the registry (`explain` and `defaults` then accept `name`)."""
    if not replace and name in _REGISTRY:
        raise ValueError(f"saliency method {name!r} is already registered")
    m = Method(name, fn, dict(defaults), doc)
    _REGISTRY[name] = m
    return m


def registered() -> tuple[str, ...]:
    """Every registered method: METHODS first, then any added with `register`."""
    return tuple(_REGISTRY)


def get(method: str) -> Method:
    if method not in _REGISTRY:
        raise ValueError(f"unknown saliency method {method!r}; allowed: {', '.join(registered())}")
    return _REGISTRY[method]


def defaults(method: str) -> dict[str, Any]:
    """The settings `method` accepts, with their defaults (the reference's settings)."""
    return dict(get(method).defaults)


_CAM = {"layer": None, "reshape": None, "batch_size": DEFAULT_BATCH_SIZE}
register("gradcam", gradcam.compute, _CAM, "GradCAM (pytorch-grad-cam)")
register("gradcampp", gradcampp.compute, _CAM, "GradCAM++ (pytorch-grad-cam)")
register(
    "ig",
    ig.compute,
    {"steps": 25, "batch_size": DEFAULT_BATCH_SIZE},
    "Integrated Gradients (PAIR saliency), zero baseline",
)
register(
    "smoothgrad",
    smoothgrad.compute,
    {"samples": 50, "noise": 0.15, "seed": 0, "batch_size": DEFAULT_BATCH_SIZE},
    "SmoothGrad over vanilla gradients (PAIR saliency), squared",
)
register(
    "blur_ig",
    blur_ig.compute,
    {"steps": 100, "max_sigma": 50.0, "grad_step": 0.01, "batch_size": DEFAULT_BATCH_SIZE},
    "Blur IG (PAIR saliency)",
)
register(
    "guided_ig",
    guided_ig.compute,
    {"steps": 200, "max_dist": 0.02, "fraction": 0.25, "batch_size": DEFAULT_BATCH_SIZE},
    "Guided IG (PAIR saliency), zero baseline",
)
register(
    "lime",
    lime.compute,
    {"samples": 1000, "num_features": 10, "seed": 0, "batch_size": DEFAULT_BATCH_SIZE},
    "LIME (lime), quickshift superpixels, hide colour 0",
)

# methods that only call the model (no hooks on its modules): they may run a conv+BN-folded
# copy of it (`_core.fast_model`); the CAMs hook the caller's own modules
_FUSABLE = frozenset({"ig", "smoothgrad", "blur_ig", "guided_ig", "lime"})


def passes_model(method: str, model: nn.Module, example: torch.Tensor) -> nn.Module:
    """The module `method`'s passes call: the cached conv+BN-folded copy of `model` for the
    methods that only call it, `model` itself for the CAMs and any registered method
    (`example`: one model input, to check the folding)."""
    return _core.fast_model(model, example) if method in _FUSABLE else model

_POSITIVE_INT = ("steps", "samples", "num_features", "batch_size")
_NON_NEGATIVE = ("noise", "max_sigma", "max_dist", "fraction")


def _check_settings(method: Method, settings: dict[str, Any]) -> dict[str, Any]:
    allowed = method.defaults
    unknown = sorted(set(settings) - set(allowed))
    if unknown:
        raise ValueError(
            f"{method.name}: unknown setting(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}"
        )
    out = {**allowed, **settings}
    for k, v in out.items():
        if k == "batch_size" and v is None:
            continue
        if k in _POSITIVE_INT:
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"{method.name}: {k}={v!r}; expected an integer >= 1")
            out[k] = int(v)
        elif k in _NON_NEGATIVE or k == "grad_step":
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not v >= 0:
                raise ValueError(f"{method.name}: {k}={v!r}; expected a number >= 0")
            out[k] = float(v)
        elif k == "seed":
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral)):
                raise ValueError(f"{method.name}: seed={v!r}; expected an integer or None")
        elif k == "reshape" and v is not None and not callable(v):
            raise ValueError(f"{method.name}: reshape={v!r}; expected a callable or None")
    return out


def explain(
    method: str, model: nn.Module, images: torch.Tensor, targets, **settings
) -> torch.Tensor:
    """[B,H,W] saliency maps of `model` for classes `targets` on normalised `images`.

    Runs on the model's device, returns on the images' device. The model is used in eval mode
    and left as it was (modes, requires_grad flags, no hooks), errors included.
    Raises ValueError for an unknown method or setting, bad images (NaN, shape), targets out of
    range, or a CAM method on a model without a known CAM layer and no `layer`.
    """
    spec = get(method)
    params = _check_settings(spec, settings)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    _core.check_images(images)
    dev = _core.model_device(model, images.device)
    x = images.to(device=dev, dtype=torch.float32)
    if x.is_inference():  # made under torch.inference_mode(): autograd cannot use it as is
        x = x.clone()
    t, max_target = _core.check_targets(targets, x.shape[0], dev)
    if params.get("batch_size", 0) is None:
        params["batch_size"] = AUTO_BATCH_SIZE.get(dev.type, AUTO_BATCH_SIZE["other"])
    with _core.guarded(model):
        run = passes_model(method, model, x)
        maps = spec.fn(run, x, t, max_target, **params)
    return maps.to(device=images.device, dtype=torch.float32)
