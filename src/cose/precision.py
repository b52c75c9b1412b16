"""Numeric precision of the saliency passes: ``fp32``, ``reference``, ``tf32``, ``bf16``, and
``auto`` (the default) choosing among them per method.

- ``fp32``: float32 throughout, TF32 off for matmuls and cuDNN convolutions (PyTorch turns
  cuDNN's TF32 on by default; ``fp32`` here means true float32 on every device).
- ``reference``: PyTorch's default flags, what the authors' code ran: cuDNN convolutions in
  TF32, matmuls in float32 (on Ampere and later GPUs convolutions then round their inputs to
  TF32; elsewhere it is fp32).
- ``tf32``: TF32 on for matmuls and cuDNN convolutions (Ampere and later GPUs; on other
  devices it changes nothing).
- ``bf16``: the models run under ``torch.autocast(dtype=bfloat16)`` (GPU, and CPU where torch
  supports it); logits come back as float32, so softmax, gradients to the input and all map
  post-processing stay float32. Non-CAM methods get the conv+BN-folded copy inside the
  autocast wrapper (folding needs torch.fx tracing, which the wrapper refuses: tracing would
  drop the autocast region).
- Memory layout: at ``reference``, ``tf32`` and ``bf16`` on CUDA, the conv+BN-folded copy of a
  conv net (the module the non-CAM methods call) runs in channels_last (:func:`layout`):
  cuDNN's tensor-core convolutions are NHWC kernels, which NCHW tensors reach through
  transposes. The flags are still the precision's; only the kernels (and so the last bits)
  differ, and the validation below measures the two together. ``fp32`` stays NCHW, the same
  kernels as the CPU path's parity tests.
- ``auto``: per method, the fastest of bf16, tf32, reference that :data:`VALIDATED` holds for
  it, else fp32 (:func:`resolve`). A unit's fingerprint holds the resolved precision, so a
  change of :data:`VALIDATED` recomputes exactly the units whose precision it changes.

The explain stage (``explain.precision``), ``cose.evaluate(precision=...)`` and
``cose.engine.explain_unit(precision=...)`` take these names. Class predictions (which decide
whether a pair counts for consistency or sensitivity) are always made in fp32, so the pairs of
a unit are the same at every precision and only the maps differ.

A precision is validated for a method by what COSE reports, not by how maps look:
``cose.scoring.agreement`` compares a unit run at that precision with the same unit in fp32
(per cell |delta COSE|, |delta consistency|, |delta sensitivity| <= 0.005, class flips <= 0.1%
of pairs, the per-pair SSIM difference p50/p99, the per-map Pearson as information);
``benchmarks/explain_gpu.py`` measures it on a GPU for every (precision, method, model) and
prints the pairs that pass on every model, which :data:`VALIDATED` then lists (docs/gpu.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from cose.spec import AUTO_PRECISION, PRECISION_CHOICES, PRECISIONS  # names: cose.spec

__all__ = [
    "AUTO", "CHANNELS_LAST", "FASTEST", "PRECISIONS", "VALIDATED", "Autocast", "check", "flags",
    "layout", "resolve", "unvalidated", "warning", "wrap",
]

AUTO = AUTO_PRECISION

#: (precision, method) pairs measured on a GPU to keep COSE within 0.005 of fp32 on every
#: model of the device check (`benchmarks/explain_gpu.py`'s "validated" list: per cell |delta
#: COSE|, |delta consistency|, |delta sensitivity| <= 0.005 and class flips <= 0.1%; docs/gpu.md).
#: Empty until a device check has measured them: ``auto`` then runs fp32 everywhere and every
#: explicit reference/tf32/bf16 run is reported as unvalidated.
VALIDATED: frozenset[tuple[str, str]] = frozenset()

#: per method, the validated precision the device check measured fastest (it can be fp32:
#: bf16 was slower than fp32 for the CAMs and GuidedIG on ResNet50); ``auto`` runs it
FASTEST: dict[str, str] = {}

#: the order ``auto`` tries the validated ones in for a method FASTEST does not name
FASTEST_FIRST: tuple[str, ...] = ("bf16", "tf32", "reference")

#: the precisions whose passes run a conv net in channels_last on CUDA (:func:`layout`)
CHANNELS_LAST: frozenset[str] = frozenset({"reference", "tf32", "bf16"})

#: the TF32 flags (matmul, cuDNN) of each precision
_TF32 = {"fp32": (False, False), "reference": (False, True), "tf32": (True, True),
         "bf16": (False, False)}


def check(precision: str, *, auto: bool = False) -> str:
    """``precision`` if it is a precision name (or ``auto``, where allowed), else ValueError."""
    allowed = PRECISION_CHOICES if auto else PRECISIONS
    if precision not in allowed:
        raise ValueError(f"precision: got {precision!r}; allowed: {', '.join(allowed)}")
    return precision


def resolve(precision: str, method: str, validated=None, fastest=None) -> str:
    """The precision ``method``'s passes run at: ``precision`` itself, or for ``auto`` the
    fastest one ``validated`` (default :data:`VALIDATED`) holds for ``method``: the one
    ``fastest`` (default :data:`FASTEST`) names for it, else the first of
    :data:`FASTEST_FIRST`; fp32 when none is validated."""
    check(precision, auto=True)
    if precision != AUTO:
        return precision
    pairs = VALIDATED if validated is None else validated
    chosen = (FASTEST if fastest is None else fastest).get(method)
    if chosen is not None:
        return chosen if chosen == "fp32" or (chosen, method) in pairs else "fp32"
    return next((p for p in FASTEST_FIRST if (p, method) in pairs), "fp32")


def unvalidated(precision: str, methods) -> list[str]:
    """The methods whose COSE ``precision`` has not been shown to keep within 0.005 of fp32
    (none for fp32 itself, nor for ``auto``, which only picks validated ones)."""
    check(precision, auto=True)
    if precision in ("fp32", AUTO):
        return []
    return [m for m in methods if (precision, m) not in VALIDATED]


def warning(precision: str, methods) -> str | None:
    """One line for the unvalidated methods of a run at ``precision``, or None."""
    bad = unvalidated(precision, methods)
    if not bad:
        return None
    return (f"precision {precision}: not validated for {', '.join(bad)} (COSE may differ from "
            f"fp32 by more than 0.005; docs/gpu.md); use fp32 or auto for results to report")


@contextlib.contextmanager
def flags(precision: str) -> Iterator[dict[str, bool]]:
    """TF32 flags for ``precision`` while the block runs (restored afterwards): both on for
    ``tf32``, cuDNN only for ``reference`` (PyTorch's defaults), off otherwise."""
    check(precision)
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    matmul, cudnn = _TF32[precision]
    torch.backends.cuda.matmul.allow_tf32 = matmul
    torch.backends.cudnn.allow_tf32 = cudnn
    try:
        yield {"matmul_allow_tf32": matmul, "cudnn_allow_tf32": cudnn}
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


class Autocast(nn.Module):
    """Runs ``module`` under ``torch.autocast(device_type, dtype)``, returns float32 outputs.

    ``module`` keeps its name (``cose.models.cam_layer`` unwraps ``.module``, so CAMs hook the
    inner layer). It refuses torch.fx tracing: tracing would drop the autocast region, so
    conv+BN folding (``cose.saliency._core.fast_model``) falls back to the wrapper as is."""

    def __init__(self, module: nn.Module, device_type: str, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.module = module
        self.device_type = device_type
        self.dtype = dtype

    def forward(self, x):
        if isinstance(x, torch.fx.Proxy):
            raise TypeError("Autocast wrapper: not traceable (autocast would be lost)")
        with torch.autocast(device_type=self.device_type, dtype=self.dtype):
            out = self.module(x)
        return out.float()


def layout(precision: str, method: str, model: nn.Module, device_type: str) -> str:
    """The memory layout ``method``'s passes run ``model`` in at ``precision`` on
    ``device_type``: ``channels_last`` for a conv net (more than two Conv2d) on CUDA at the
    precisions of :data:`CHANNELS_LAST`, for the methods that only call the model (``fusable``:
    not the CAMs, which hook the caller's own layer); ``nchw`` otherwise."""
    from cose import spec
    from cose.saliency import _core

    precision = resolve(precision, method)
    if (device_type == "cuda" and precision in CHANNELS_LAST and spec.method(method).fusable
            and _core.conv_net(model)):
        return "channels_last"
    return "nchw"


def wrap(model: nn.Module, precision: str, method: str, example: torch.Tensor | None = None,
         device_type: str | None = None):
    """``model`` as the saliency passes of ``method`` run it at ``precision``: itself for fp32
    (the flags do the rest), else the module those passes call (``saliency.passes_model``: the
    conv+BN-folded copy for non-CAM methods; ``example``: one model input, to check the
    folding) in the :func:`layout` for the model's device (``device_type`` overrides it: tests
    on the CPU), inside an :class:`Autocast` wrapper for bf16."""
    precision = resolve(precision, method)
    from cose import saliency
    from cose.saliency import _core

    fallback = example.device if example is not None else torch.device("cpu")
    device = _core.model_device(model, fallback)
    nhwc = layout(precision, method, model, device_type or device.type) == "channels_last"
    if precision != "bf16" and not nhwc:
        return model
    inner = saliency.passes_model(method, model, example) if example is not None else model
    if nhwc:
        inner = _core.channels_last(inner)
    if precision != "bf16":
        return inner
    return Autocast(inner, device.type).eval()
