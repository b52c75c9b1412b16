"""Checkpoints: COSE's own format, and the published layouts of the pretrained backbones.

Loading an external checkpoint (``load_pretrained``):

1. ``torch.load(weights_only=True)``; the state dict is found under ``state_dict``, ``model``,
   ``teacher``, ``module`` or ``net`` (nested dicts are unwrapped).
2. Sub-models are selected by prefix: MoCo v3 ``module.base_encoder.``, MoCo v1/2
   ``module.encoder_q.``, iBOT/DINO ``backbone.``; a prefix every key shares (``module.``,
   ``model.``, ``_orig_mod.``) is stripped.
3. The layout is converted to timm's: torchvision ViT / Swin / ConvNeXt / VGG / DenseNet,
   Microsoft Swin (iBOT), facebookresearch ConvNeXt (``downsample_layers``, ``dwconv``).
4. The backbone must match exactly (no missing key, no shape mismatch, no unexpected key beyond
   pretraining extras such as projection heads and mask tokens); else a ValueError listing them.
   The checkpoint's classifier is loaded only if it has the new head's keys and shapes; a
   pretraining head or an ImageNet classifier is dropped and the new head keeps its init.

A COSE checkpoint (written by ``cose.training``) carries model name, architecture, class count
and head; it must match the requested model exactly.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .heads import classifier_path

COSE_FORMAT = "cose-checkpoint"
COSE_VERSION = 1

_NESTED_KEYS = ("state_dict", "model", "teacher", "module", "net")
_SELECT_PREFIXES = (
    "module.base_encoder.",
    "base_encoder.",
    "module.encoder_q.",
    "encoder_q.",
    "module.backbone.",
    "backbone.",
)
_STRIP_PREFIXES = ("module.", "_orig_mod.", "model.")
# keys of pretraining-only parts or non-persistent buffers that may be ignored
_IGNORABLE = re.compile(
    r"(relative_position_index|attn_mask|masked_embed|mask_token|relative_coords_table)"
)
# parts a pretraining checkpoint may lack; they keep their init (SparK's ConvNeXt encoder has no
# final norm: it is built with num_classes=0)
_MAY_BE_MISSING = {"convnext": ("head.norm.",)}


def read_checkpoint(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU with readable errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ValueError(
            f"{path}: cannot be read as a weights-only checkpoint ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); re-save its state dict with torch.save"
        ) from e


def is_cose_checkpoint(obj: Any) -> bool:
    return isinstance(obj, Mapping) and obj.get("format") == COSE_FORMAT


def cose_checkpoint(model: nn.Module, **extra: Any) -> dict[str, Any]:
    """A COSE checkpoint dict for ``model`` (built by ``cose.models.create``)."""
    meta = getattr(model, "cose_meta", None)
    if not meta:
        raise ValueError("model has no cose_meta; build it with cose.models.create")
    return {
        "format": COSE_FORMAT,
        "version": COSE_VERSION,
        **meta,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **extra,
    }


def check_cose_checkpoint(
    ckpt: Mapping[str, Any], spec: Any, num_classes: int, head: str | None, source: str
) -> str:
    """Check that a COSE checkpoint fits ``spec``/``num_classes``/``head``; returns its head."""
    if ckpt.get("arch") != spec.arch:
        raise ValueError(
            f"{source}: checkpoint is for model {ckpt.get('model')!r} (architecture "
            f"{ckpt.get('arch')!r}), not {spec.name!r} ({spec.arch!r})"
        )
    if ckpt.get("num_classes") != num_classes:
        raise ValueError(
            f"{source}: checkpoint has {ckpt.get('num_classes')} classes, model asked for "
            f"{num_classes}"
        )
    if head is not None and ckpt.get("head") != head:
        raise ValueError(f"{source}: checkpoint has head {ckpt.get('head')!r}, asked for {head!r}")
    return ckpt["head"]


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and all(isinstance(v, torch.Tensor) for v in obj.values())
    )


def extract_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """Find the backbone state dict in a published checkpoint and strip its wrappers."""
    for _ in range(4):
        if _is_state_dict(obj):
            break
        if not isinstance(obj, Mapping):
            raise ValueError(f"checkpoint is a {type(obj).__name__}, not a dict of tensors")
        for key in _NESTED_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
        else:
            raise ValueError(
                "checkpoint holds no state dict (looked for tensors at the top level and under "
                f"{', '.join(_NESTED_KEYS)}; found keys {sorted(map(str, obj))[:8]})"
            )
    else:
        raise ValueError("checkpoint nests state dicts too deeply")
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    changed = True
    while changed:
        changed = False
        for p in _SELECT_PREFIXES:
            if any(k.startswith(p) for k in sd):
                sd = {k[len(p) :]: v for k, v in sd.items() if k.startswith(p)}
                changed = True
        for p in _STRIP_PREFIXES:
            if sd and all(k.startswith(p) for k in sd):
                sd = {k[len(p) :]: v for k, v in sd.items()}
                changed = True
    return sd


# ---------------------------------------------------------------- layout conversions to timm


def _tv_vit(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        k2 = {
            "class_token": "cls_token",
            "conv_proj.weight": "patch_embed.proj.weight",
            "conv_proj.bias": "patch_embed.proj.bias",
            "encoder.pos_embedding": "pos_embed",
            "encoder.ln.weight": "norm.weight",
            "encoder.ln.bias": "norm.bias",
            "heads.head.weight": "head.weight",
            "heads.head.bias": "head.bias",
        }.get(k)
        if k2 is None:
            m = re.match(r"encoder\.layers\.encoder_layer_(\d+)\.(.*)", k)
            if m is None:
                k2 = k
            else:
                rest = m.group(2)
                for a, b in (
                    ("ln_1.", "norm1."),
                    ("ln_2.", "norm2."),
                    ("self_attention.in_proj_weight", "attn.qkv.weight"),
                    ("self_attention.in_proj_bias", "attn.qkv.bias"),
                    ("self_attention.out_proj.", "attn.proj."),
                    ("mlp.0.", "mlp.fc1."),
                    ("mlp.3.", "mlp.fc2."),
                    ("mlp.linear_1.", "mlp.fc1."),
                    ("mlp.linear_2.", "mlp.fc2."),
                ):
                    if rest.startswith(a):
                        rest = b + rest[len(a) :]
                        break
                k2 = f"blocks.{m.group(1)}.{rest}"
        out[k2] = v
    return out


def _tv_swin(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        m = re.match(r"features\.(\d+)\.(.*)", k)
        if k.startswith("head."):
            k2 = "head.fc." + k[5:]
        elif m is None:
            k2 = k
        else:
            i, rest = int(m.group(1)), m.group(2)
            if i == 0:
                idx, _, tail = rest.partition(".")  # 0: conv, 1: permute, 2: norm
                k2 = {"0": "patch_embed.proj.", "2": "patch_embed.norm."}.get(idx, f"features.0.{idx}.") + tail
            elif i % 2 == 0:  # patch merging before stage i // 2
                k2 = f"layers.{i // 2}.downsample.{rest}"
            else:
                j, _, tail = rest.partition(".")
                tail = tail.replace("mlp.0.", "mlp.fc1.").replace("mlp.3.", "mlp.fc2.")
                k2 = f"layers.{i // 2}.blocks.{j}.{tail}"
        out[k2] = v
    return out


def _ms_swin(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Microsoft / iBOT Swin: downsample at the end of a stage, ``head`` a plain Linear."""
    old = any(re.match(r"layers\.0\.downsample\.", k) for k in sd)
    out = {}
    for k, v in sd.items():
        if old:
            k = re.sub(r"layers\.(\d+)\.downsample", lambda x: f"layers.{int(x.group(1)) + 1}.downsample", k)
        if k.startswith("head.") and not k.startswith("head.fc."):
            k = "head.fc." + k[5:]
        out[k] = v
    return out


def _tv_convnext(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        m = re.match(r"features\.(\d+)\.(\d+)\.(.*)", k)
        if k.startswith("classifier."):
            idx, _, tail = k[len("classifier.") :].partition(".")
            k2 = {"0": "head.norm.", "2": "head.fc."}.get(idx, f"classifier.{idx}.") + tail
        elif m is None:
            k2 = k
        else:
            i, j, tail = int(m.group(1)), m.group(2), m.group(3)
            if i == 0:
                k2 = f"stem.{j}.{tail}"
            elif i % 2 == 0:
                k2 = f"stages.{i // 2}.downsample.{j}.{tail}"
            else:
                if tail == "layer_scale":
                    tail, v = "gamma", v.reshape(-1)
                else:
                    for a, b in (("block.0.", "conv_dw."), ("block.2.", "norm."),
                                 ("block.3.", "mlp.fc1."), ("block.5.", "mlp.fc2.")):
                        if tail.startswith(a):
                            tail = b + tail[len(a) :]
                            break
                k2 = f"stages.{i // 2}.blocks.{j}.{tail}"
        out[k2] = v
    return out


def to_timm_layout(sd: dict[str, torch.Tensor], family: str, model: nn.Module) -> dict[str, torch.Tensor]:
    """Convert a state dict in any supported published layout of ``family`` to timm's keys."""
    if family == "vit" and "conv_proj.weight" in sd:
        return _tv_vit(sd)
    if family == "swin":
        if "features.0.0.weight" in sd:
            return _tv_swin(sd)
        return _ms_swin(sd)
    if family == "convnext":
        if "features.0.0.weight" in sd:
            return _tv_convnext(sd)
        if any(k.startswith("downsample_layers.") for k in sd):
            from timm.models.convnext import checkpoint_filter_fn

            try:
                return checkpoint_filter_fn(sd, model)
            except KeyError as e:
                raise ValueError(f"unexpected ConvNeXt checkpoint key {e}") from None
    if family == "vgg" and any(k.startswith("classifier.") for k in sd):
        from timm.models.vgg import _filter_fn

        return _filter_fn(sd)
    if family == "densenet":
        from timm.models.densenet import _filter_torchvision_pretrained

        return _filter_torchvision_pretrained(dict(sd))
    return sd


def _examples(keys: list[str], n: int = 4) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... (+{len(keys) - n})" if len(keys) > n else "")


def load_pretrained(model: nn.Module, ckpt: Any, spec: Any, source: str = "<checkpoint>") -> None:
    """Load an external checkpoint's backbone into ``model`` (see the module docstring)."""
    sd = to_timm_layout(extract_state_dict(ckpt), spec.family, model)
    target = model.state_dict()
    head_prefix = classifier_path(model) + "."

    head_ckpt = {k: v for k, v in sd.items() if k.startswith(head_prefix)}
    head_model = {k: v for k, v in target.items() if k.startswith(head_prefix)}
    load_head = set(head_ckpt) == set(head_model) and all(
        head_ckpt[k].shape == head_model[k].shape for k in head_ckpt
    )
    body = {k: v for k, v in sd.items() if not k.startswith(head_prefix)}
    optional = _MAY_BE_MISSING.get(spec.family, ())
    missing = [k for k in target if not k.startswith(head_prefix) and k not in body
               and not k.endswith("num_batches_tracked") and not k.startswith(optional)]
    unexpected = [k for k in body if k not in target and not _IGNORABLE.search(k)
                  and not _is_pretraining_head(k)]
    mismatched = [
        f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}"
        for k, v in body.items()
        if k in target and v.shape != target[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_examples(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_examples(unexpected)})")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches ({_examples(mismatched, 3)})")
        raise ValueError(
            f"{source}: does not fit {spec.name} ({type(model).__name__}, architecture "
            f"{spec.arch}): " + "; ".join(parts)
        )
    state = {k: v for k, v in body.items() if k in target}
    if load_head:
        state.update(head_ckpt)
    model.load_state_dict(state, strict=False)


def _is_pretraining_head(key: str) -> bool:
    """Projection / prediction heads of self-supervised checkpoints and ImageNet classifiers
    outside the new head's path (e.g. MoCo's ``head.`` MLP on a ViT whose head is ``head``)."""
    return key.startswith(("head.", "fc.", "classifier.", "predictor.", "pre_logits.head"))
