"""Models that are not in the registry, for ``cose evaluate --model``: a timm architecture
name, a ``module:factory`` callable, or a TorchScript file.

``resolve(spec, num_classes)`` returns a :class:`Builder`: ``build(weights=None, seed=None)``
makes the model (seeded random init, then a COSE checkpoint or a state dict), with its input
size and normalisation, and whether a random-init twin can be made (not for TorchScript,
which holds its own weights).
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .builder import _seeded, create
from .registry import REGISTRY
from .weights import extract_state_dict, is_cose_checkpoint, read_checkpoint


@dataclass
class Builder:
    """How to make the model of ``--model`` (``kind``: registry, timm, factory, torchscript)."""

    kind: str
    name: str
    make: Callable[[int | None], nn.Module]  # seed -> a fresh model
    can_randomize: bool = True

    def build(self, num_classes: int, weights: Any = None, seed: int | None = None) -> nn.Module:
        if self.kind == "registry":
            head = weights.get("head") if isinstance(weights, dict) and is_cose_checkpoint(
                weights) else None
            return create(self.name, num_classes, weights=weights, seed=seed, head=head)
        if isinstance(weights, str):  # "hub" / "hub:<tag>": timm's pretrained weights
            return self._from_hub(weights, num_classes, seed)
        model = self.make(seed)
        if weights is not None:
            if self.kind == "torchscript":
                raise ValueError("--weights: a TorchScript file holds its own weights")
            state = weights["state_dict"] if is_cose_checkpoint(weights) else \
                extract_state_dict(weights)
            try:
                model.load_state_dict(state, strict=True)
            except RuntimeError as exc:
                raise ValueError(f"--weights: not a state dict of {self.name} "
                                 f"({str(exc).splitlines()[0]})") from None
        return model.eval()


    def _from_hub(self, weights: str, num_classes: int, seed: int | None) -> nn.Module:
        from cose.config import ConfigError

        if self.kind != "timm":
            raise ConfigError(f"--weights {weights}: hub weights are for registry models and timm "
                              f"architecture names, not a {self.kind} model; give a file")
        import timm

        tag = self.name if weights == "hub" else weights.removeprefix("hub:")
        try:
            with _seeded(seed):  # the new classifier head's init
                model = timm.create_model(tag, pretrained=True, num_classes=num_classes)
        except Exception as exc:  # noqa: BLE001 - network, hub or tag errors all end here
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RuntimeError(f"--weights {weights}: could not load timm hub weights {tag!r} "
                               f"(offline, or no such tag? {first[:200]}); download them where "
                               "the hub is reachable and pass the file: --weights FILE") from None
        return model.eval()


def _call_factory(factory: Callable, num_classes: int) -> nn.Module:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    takes = [p for p in params.values()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    model = factory(num_classes) if takes else (
        factory(num_classes=num_classes) if "num_classes" in params else factory())
    if not isinstance(model, nn.Module):
        raise ValueError(f"{factory!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _import_factory(text: str) -> Callable:
    module_name, _, attr = text.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--model {text!r}: expected module:factory")
    if str(Path.cwd()) not in sys.path:  # a module beside the user's files
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"--model {text!r}: cannot import {module_name!r} ({exc})") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"--model {text!r}: {module_name} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"--model {text!r}: {attr} is not callable")
    return obj


def _is_torchscript(path: Path) -> bool:
    import zipfile

    if not path.is_file() or not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("/code/") or "/code/" in n for n in zf.namelist())


def resolve(text: str, num_classes: int) -> Builder:
    """The builder of ``--model``: a registry name, a TorchScript file, ``module:factory``, or
    a timm architecture name (in that order); ValueError naming what is allowed otherwise."""
    if text in REGISTRY:
        return Builder("registry", text, lambda seed: create(text, num_classes, seed=seed))
    path = Path(text)
    if path.suffix in (".pt", ".pth", ".ts", ".torchscript") or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"--model {text}: no such file")
        if not _is_torchscript(path):
            raise ValueError(f"--model {text}: not a TorchScript file (torch.jit.save); a "
                             "state dict goes to --weights with --model NAME|module:factory")
        module = torch.jit.load(str(path), map_location="cpu")
        return Builder("torchscript", path.stem, lambda seed: module, can_randomize=False)
    if ":" in text:
        factory = _import_factory(text)

        def make(seed, _f=factory):
            with _seeded(seed):
                return _call_factory(_f, num_classes)

        return Builder("factory", text.partition(":")[2], make)
    import timm

    if timm.is_model(text):
        def make_timm(seed):
            with _seeded(seed):
                return timm.create_model(text, pretrained=False, num_classes=num_classes)

        return Builder("timm", text, make_timm)
    from cose.config import ConfigError

    raise ConfigError(f"--model: unknown value {text!r}; allowed: a registry model "
                      f"({', '.join(REGISTRY)}), a timm architecture name, module:factory or a "
                      "TorchScript file")


def checkpoint_classes(weights: Any) -> int | None:
    """The class count a checkpoint says or shows (COSE meta, else the last 2-D weight)."""
    if weights is None:
        return None
    if is_cose_checkpoint(weights):
        return int(weights["num_classes"])
    state = extract_state_dict(weights)
    matrices = [v for k, v in state.items() if k.endswith("weight") and v.ndim == 2]
    return int(matrices[-1].shape[0]) if matrices else None


def read_weights(path: str | None) -> Any:
    return None if path is None else read_checkpoint(path)
