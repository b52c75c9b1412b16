"""Saliency methods: the reference's seven, batched on any device (see docs/saliency.md).

    explain(method, model, images[B,C,H,W], targets[B], **settings) -> maps[B,H,W]

`images` are normalised model inputs; maps come back on the images' device, float32: CAMs and
gradient maps in [0,1], LIME in {-1, 0, 1}. Unset settings take the reference's values
(`defaults(method)`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cose import spec as _spec
from cose.saliency import _core, blur_ig, gradcam, gradcampp, guided_ig, ig, lime, smoothgrad

__all__ = [
    "METHODS", "Method", "auto_batch_size", "defaults", "explain", "get", "passes_model",
    "prepare", "register", "registered",
]

#: the reference's seven methods (cose.spec.BUILTIN_METHODS)
METHODS = _spec.BUILTIN_METHODS

# model inputs per call; None = by device and method kind: auto_batch_size
DEFAULT_BATCH_SIZE = None
AUTO_BATCH_SIZE = {"cpu": 32, "other": 64}
#: the same for forward-only methods (kind "perturbation": LIME), whose calls hold no autograd
#: graph: larger batches (LIME's 1000 perturbations per map in few calls) off the CPU
AUTO_FORWARD_BATCH_SIZE = {"cpu": 32, "other": 256}


def auto_batch_size(method: str, device_type: str) -> int:
    """Model inputs per call of ``method`` on ``device_type`` when its batch_size is null."""
    kind = _spec.method(method).kind
    table = AUTO_FORWARD_BATCH_SIZE if kind == "perturbation" else AUTO_BATCH_SIZE
    return table.get(device_type, table["other"])


@dataclass(frozen=True)
class Method:
    """A registered saliency method: `fn(model, images, targets, max_target, **settings)`
    returns [B,H,W] maps; `spec` (:class:`cose.spec.MethodSpec`) names every setting it
    accepts, with its type and default, and how tables show it."""

    name: str
    fn: Callable[..., torch.Tensor]
    spec: _spec.MethodSpec

    @property
    def defaults(self) -> dict[str, Any]:
        return self.spec.defaults

    @property
    def doc(self) -> str:
        return self.spec.doc


_REGISTRY: dict[str, Method] = {}


def register(
    name: str,
    fn: Callable[..., torch.Tensor],
    defaults: Mapping[str, Any] | None = None,
    doc: str = "",
    *,
    replace: bool = False,
    display: str | None = None,
    kind: str = "other",
    stochastic: bool | None = None,
    paper_images: int | None = None,
    fusable: bool = False,
    concurrent: bool = False,
) -> Method:
    """Add a saliency method: `explain`, `defaults`, params.yaml (`methods`, `explain.settings`),
    `cose evaluate`, the tables, the report and MLflow then accept `name`.

    `fn(model, images, targets, max_target, **settings) -> [B,H,W]` maps. `defaults`: each
    setting's default (its type is taken from the default: int, float, other) or a
    :class:`cose.spec.Setting`. `display`: its column name (default: `name`); `kind`: cam,
    gradient, perturbation or other; `stochastic` (default: it takes a `seed` setting): it
    gets a new seed per call, and a noise-floor variant; `fusable`: it only calls the model,
    so a conv+BN-folded copy may stand in for it; `concurrent`: calls on different models may
    run at once on threads (no global state: torch's or numpy's global random stream, module
    globals), so a unit maps its model variants several at a time (COSE_STREAMS); off, they
    run one at a time."""
    if not callable(fn):
        raise ValueError(f"saliency method {name!r}: fn must be callable, got {type(fn).__name__}")
    if not replace and name in _REGISTRY:
        raise ValueError(f"saliency method {name!r} is already registered")
    settings = dict(defaults or {})
    spec = _spec.register_method(_spec.MethodSpec(
        name, display or name, kind, "seed" in settings if stochastic is None else stochastic,
        paper_images, settings, fusable=fusable, concurrent=concurrent, doc=doc), replace=True)
    m = Method(name, fn, spec)
    _REGISTRY[name] = m
    return m


def registered() -> tuple[str, ...]:
    """Every registered method: METHODS first, then any added with `register`."""
    return tuple(m for m in _spec.methods() if m in _REGISTRY)


def get(method: str) -> Method:
    if method not in _REGISTRY:
        raise ValueError(f"unknown saliency method {method!r}; allowed: {', '.join(registered())}")
    return _REGISTRY[method]


def defaults(method: str) -> dict[str, Any]:
    """The settings `method` accepts, with their defaults (the reference's settings)."""
    return dict(get(method).defaults)


for _name, _fn in (("gradcam", gradcam.compute), ("gradcampp", gradcampp.compute),
                   ("ig", ig.compute), ("smoothgrad", smoothgrad.compute),
                   ("blur_ig", blur_ig.compute), ("guided_ig", guided_ig.compute),
                   ("lime", lime.compute)):
    _REGISTRY[_name] = Method(_name, _fn, _spec.method(_name))


def passes_model(method: str, model: nn.Module, example: torch.Tensor) -> nn.Module:
    """The module `method`'s passes call: the cached conv+BN-folded copy of `model` for the
    methods that only call it (`fusable` in their spec), `model` itself for the CAMs and any
    method registered without `fusable` (`example`: one model input, to check the folding)."""
    return _core.fast_model(model, example) if get(method).spec.fusable else model


def prepare(method: str, model: nn.Module, example: torch.Tensor) -> None:
    """Build (and cache) the module ``method``'s passes call on ``model`` as :func:`explain`
    would, in eval mode: before ``model`` is explained from several threads at once, since the
    conv+BN folding traces it with torch.fx, which patches nn.Module for every thread."""
    with _core.guarded(model):
        passes_model(method, model, example.to(_core.model_device(model, example.device)))


def _check_settings(method: Method, settings: dict[str, Any]) -> dict[str, Any]:
    return _spec.check_settings(method.name, settings)


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
        params["batch_size"] = auto_batch_size(method, dev.type)
    with _core.guarded(model):
        run = passes_model(method, model, x)
        maps = spec.fn(run, x, t, max_target, **params)
    return maps.to(device=images.device, dtype=torch.float32)
