"""Numeric precision of the saliency passes: ``fp32`` (default), ``tf32``, ``bf16``.

- ``fp32``: float32 throughout, TF32 off for matmuls and cuDNN convolutions (PyTorch turns
  cuDNN's TF32 on by default; ``fp32`` here means true float32 on every device).
- ``tf32``: TF32 on for matmuls and cuDNN convolutions (Ampere and later GPUs; on other
  devices it changes nothing).
- ``bf16``: the models run under ``torch.autocast(dtype=bfloat16)`` (GPU, and CPU where torch
  supports it); logits come back as float32, so softmax, gradients to the input and all map
  post-processing stay float32. Non-CAM methods get the conv+BN-folded copy inside the
  autocast wrapper (folding needs torch.fx tracing, which the wrapper refuses: tracing would
  drop the autocast region).

The explain stage (``explain.precision``), ``cose.evaluate(precision=...)`` and
``cose.engine.explain_unit(precision=...)`` take these names. Class predictions (which decide
whether a pair counts for consistency or sensitivity) are always made in fp32, so the pairs of
a unit are the same at every precision and only the maps differ. Which methods keep maps
within Pearson 0.99 of fp32 at each precision is measured by ``benchmarks/explain_gpu.py``
(docs/gpu.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from cose.spec import PRECISIONS  # the names live in cose.spec

__all__ = [
    "PRECISIONS", "VALIDATED", "Autocast", "check", "flags", "unvalidated", "warning", "wrap",
]


#: (precision, method) pairs measured on a GPU to keep every map within Pearson 0.99 of fp32
#: (`benchmarks/explain_gpu.py`'s recommendations, docs/gpu.md). Empty until a device check has
#: measured them: every tf32/bf16 run is then reported as unvalidated.
VALIDATED: frozenset[tuple[str, str]] = frozenset()


def check(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision: got {precision!r}; allowed: {', '.join(PRECISIONS)}")
    return precision


def unvalidated(precision: str, methods) -> list[str]:
    """The methods whose maps ``precision`` has not been shown to keep within Pearson 0.99 of
    fp32 (none for fp32 itself)."""
    check(precision)
    if precision == "fp32":
        return []
    return [m for m in methods if (precision, m) not in VALIDATED]


def warning(precision: str, methods) -> str | None:
    """One line for the unvalidated methods of a run at ``precision``, or None."""
    bad = unvalidated(precision, methods)
    if not bad:
        return None
    return (f"precision {precision}: not validated for {', '.join(bad)} (maps may differ from "
            f"fp32 beyond Pearson 0.99; docs/gpu.md); use fp32 for results to report")


@contextlib.contextmanager
def flags(precision: str) -> Iterator[dict[str, bool]]:
    """TF32 flags for ``precision`` while the block runs (restored afterwards): on for
    ``tf32``, off otherwise."""
    check(precision)
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    on = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on
    try:
        yield {"matmul_allow_tf32": on, "cudnn_allow_tf32": on}
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


def wrap(model: nn.Module, precision: str, method: str, example: torch.Tensor | None = None):
    """``model`` as the saliency passes of ``method`` run it at ``precision``: itself for fp32
    and tf32 (the flags do the rest), an :class:`Autocast` wrapper for bf16, around the module
    those passes call (``saliency.passes_model``: the conv+BN-folded copy for non-CAM methods;
    ``example``: one model input, to check the folding)."""
    check(precision)
    if precision != "bf16":
        return model
    from cose import saliency
    from cose.saliency import _core

    inner = saliency.passes_model(method, model, example) if example is not None else model
    fallback = example.device if example is not None else torch.device("cpu")
    return Autocast(inner, _core.model_device(model, fallback).type).eval()
