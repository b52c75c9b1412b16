"""Building models: a registry entry (:mod:`.registry`) plus weights (:mod:`.weights`, the
state-dict conversion) gives an eval-mode model. The builder sits above both, as timm's
``_builder`` above its ``_registry``, so neither imports the other."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import weights as W
from .heads import head_widths, set_head
from .registry import ModelSpec, get
from .weights import COSE_FORMAT, check_cose_checkpoint, is_cose_checkpoint, read_checkpoint


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _build(spec: ModelSpec, num_classes: int, head: str, pretrained_tag: str | None) -> nn.Module:
    import timm

    kwargs = dict(spec.kwargs)
    if spec.factory is not None:
        if pretrained_tag is not None:
            raise ValueError(f"{spec.name} is a registered model: no hub weights; pass a "
                             "checkpoint file")
        model = spec.factory(num_classes)
        if not isinstance(model, nn.Module):
            raise ValueError(f"{spec.name}: its factory returned {type(model).__name__}, "
                             "not a torch.nn.Module")
        if spec.classifier:
            model.cose_classifier = spec.classifier
        if spec.cam_layer:
            model.cose_cam_layer = (spec.cam_layer, spec.cam_reshape)
        if head != "linear":
            set_head(model, head, num_classes)
        return model
    if pretrained_tag is None:
        model = timm.create_model(spec.timm_name, pretrained=False, num_classes=num_classes, **kwargs)
    else:
        try:
            model = timm.create_model(pretrained_tag, pretrained=True, num_classes=num_classes, **kwargs)
        except Exception as e:  # noqa: BLE001 - network, hub or tag errors all end here
            raise RuntimeError(
                f"could not load timm hub weights {pretrained_tag!r} for {spec.name} "
                f"(offline? pass a local checkpoint file instead): {e}"
            ) from e
    if head != "linear":
        set_head(model, head, num_classes)
    return model


def create(
    name: str,
    num_classes: int,
    weights: str | Path | Mapping[str, Any] | None = None,
    seed: int | None = None,
    head: str | None = None,
) -> nn.Module:
    """Build ``name`` with a ``head`` (``linear`` default, ``mlp`` 1024-256-C, ``mlp-<w>...``)
    for ``num_classes``.

    ``weights``: None (random init, deterministic given ``seed``); a local checkpoint file (or
    an already loaded dict) in a published layout (timm / torchvision, DINO, MoCo v3, iBOT,
    SparK, ConvNeXt) or a COSE training checkpoint; "hub" (the entry's timm tag) or
    "hub:<timm tag>" when online. The model is returned in eval mode on the CPU.
    """
    spec = get(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if head is not None:
        head_widths(head)  # ValueError naming the allowed heads

    tag = None
    ckpt = None
    source = "<state dict>"
    if isinstance(weights, str) and (weights == "hub" or weights.startswith("hub:")):
        tag = spec.hub if weights == "hub" else weights[4:]
        if not tag:
            raise ValueError(f"{name} has no timm hub tag; pass a local checkpoint file")
    elif isinstance(weights, (str, Path)):
        source = str(weights)
        ckpt = W.read_checkpoint(weights)
    elif isinstance(weights, Mapping):
        ckpt = weights
    elif weights is not None:
        raise TypeError(f"weights must be None, a path, 'hub[:tag]' or a dict, got {type(weights)}")

    if ckpt is not None and W.is_cose_checkpoint(ckpt):
        head = W.check_cose_checkpoint(ckpt, spec, num_classes, head, source)
    head = head or "linear"

    with _seeded(seed):
        model = _build(spec, num_classes, head, tag)
    if ckpt is not None:
        if W.is_cose_checkpoint(ckpt):
            model.load_state_dict(ckpt["state_dict"])
        elif spec.factory is not None:  # a registered model: its own state dict, as saved
            try:
                model.load_state_dict(W.extract_state_dict(ckpt), strict=True)
            except RuntimeError as exc:
                raise ValueError(f"{source}: not a state dict of {name} "
                                 f"({str(exc).splitlines()[0]})") from None
        else:
            W.load_pretrained(model, ckpt, spec, source)
    model.cose_meta = {"model": name, "arch": spec.arch, "num_classes": num_classes, "head": head}
    return model.eval()


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model of a COSE checkpoint file (name, classes and head from its metadata)."""
    ckpt = read_checkpoint(path)
    if not is_cose_checkpoint(ckpt):
        raise ValueError(f"{path}: not a COSE checkpoint (no format={COSE_FORMAT!r})")
    model = create(ckpt["model"], ckpt["num_classes"], weights=ckpt, head=ckpt["head"])
    return model.to(map_location)


def load_checkpoints(
    name: str, num_classes: int, paths: Sequence[str | Path]
) -> list[nn.Module]:
    """``[create(name, num_classes, weights=p) for p in paths]`` for COSE checkpoints (a run's
    final, random-init and epoch checkpoints), faster: same models, same checks, on the CPU.

    The architecture is built and initialised once, for the first file. The other models are
    copies of it whose parameters and persistent buffers are their checkpoint's own tensors,
    assigned without an init or a copy; the non-persistent buffers (e.g. Swin's relative
    position index), which no checkpoint holds, are copied from the first. For ViT-L/16 that is
    about 0.5 s a checkpoint instead of 4 s. Every file must be a COSE checkpoint with the
    first's architecture, class count and head.
    """
    if not paths:
        return []
    spec = get(name)
    out: list[nn.Module] = []
    for path in paths:
        ckpt = read_checkpoint(path)
        if not is_cose_checkpoint(ckpt):
            raise ValueError(f"{path}: not a COSE checkpoint (no format={COSE_FORMAT!r})")
        head = out[0].cose_meta["head"] if out else None
        check_cose_checkpoint(ckpt, spec, num_classes, head, str(path))
        if not out:
            out.append(create(name, num_classes, weights=ckpt))
            dtypes = {k: v.dtype for k, v in out[0].state_dict().items()}
            continue
        # as load_state_dict's copy would: tensors take the model's dtypes (a no-op for fp32)
        state = {k: v.to(dtypes[k]) if k in dtypes else v for k, v in ckpt["state_dict"].items()}
        model = _shell(out[0])
        model.load_state_dict(state, assign=True)
        model.cose_meta = dict(out[0].cose_meta)
        out.append(model.eval())
    return out


def _shell(model: nn.Module) -> nn.Module:
    """A deep copy of `model` whose parameters and persistent buffers are empty meta tensors
    of the same shapes (to be assigned from a state dict); everything else is copied."""
    memo: dict[int, Any] = {}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"),
                                           requires_grad=p.requires_grad)
        for name, b in module._buffers.items():
            if b is not None and name not in module._non_persistent_buffers_set:
                memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)
