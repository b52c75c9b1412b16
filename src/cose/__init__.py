"""COSE: consistency-sensitivity evaluation of saliency methods on image classifiers.

``cose.evaluate(model, images, labels, ...)`` scores your own classifier (see
:mod:`cose.api`); it is imported on first use, so ``import cose`` stays light.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {"evaluate": "cose.api", "Evaluation": "cose.api"}

__all__ = ["Evaluation", "__version__", "evaluate"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cose' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
