"""The architectures of the paper (and the small demo ones) over timm, with their preprocessing."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from cose.data.image import PreprocessSpec


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry: the timm architecture (name + overrides), how its inputs are
    preprocessed, where its pretrained weights come from."""

    name: str
    timm_name: str
    family: str  # resnet | vit | swin | convnext | vgg | densenet
    arch: str  # architecture key: names with the same arch share weights layouts and shapes
    preprocess: PreprocessSpec
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    pretraining: str = "supervised"  # supervised | dino | mocov3 | ibot | spark | none
    hub: str | None = None  # timm hub tag for weights="hub"
    description: str = ""
    # a registered (plugin) model: factory(num_classes) -> nn.Module instead of timm; its CAM
    # layer (a dotted module name) and the reshape of that layer's output, its classifier
    factory: Any = None
    cam_layer: str | None = None
    cam_reshape: Any = None
    classifier: str | None = None


_RESNET = PreprocessSpec(resize=224, crop=224, interpolation="bilinear")
_256 = PreprocessSpec(resize=256, crop=224, interpolation="bilinear")
_232 = PreprocessSpec(resize=232, crop=224, interpolation="bilinear")
_DEMO = PreprocessSpec(resize=32, crop=32, interpolation="bilinear")

# torchvision's stochastic depth defaults for the architectures the reference took from it
_SWIN_T = {"drop_path_rate": 0.2}
_CONVNEXT_S = {"drop_path_rate": 0.4}

_DEMO_RESNET = dict(
    layers=(1, 1, 1, 1), channels=(16, 32, 64, 128), stem_width=16, output_stride=8
)
_DEMO_VIT = dict(img_size=32, patch_size=4, embed_dim=64, depth=3, num_heads=4, mlp_ratio=2.0)
# stem patch 1 rather than output_stride: dilated depthwise convs are very slow on CPU
_DEMO_CONVNEXT = dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128), patch_size=1, conv_mlp=False)
# patch 4 (8x8 tokens, two stages -> 4x4): patch 2 made backward ~20x slower on CPU
_DEMO_SWIN = dict(
    img_size=32, patch_size=4, window_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4),
    drop_path_rate=0.0,
)

_SPECS: tuple[ModelSpec, ...] = (
    ModelSpec("resnet50", "resnet50", "resnet", "resnet50", _RESNET, hub="resnet50.tv_in1k",
              description="ResNet-50, ImageNet supervised"),
    ModelSpec("resnet101", "resnet101", "resnet", "resnet101", _RESNET, hub="resnet101.tv_in1k",
              description="ResNet-101, ImageNet supervised"),
    ModelSpec("vit_b16", "vit_base_patch16_224", "vit", "vit_b16", _256,
              hub="vit_base_patch16_224.augreg_in21k_ft_in1k", description="ViT-B/16"),
    ModelSpec("vit_l16", "vit_large_patch16_224", "vit", "vit_l16", _256,
              hub="vit_large_patch16_224.augreg_in21k_ft_in1k", description="ViT-L/16"),
    ModelSpec("swin_t", "swin_tiny_patch4_window7_224", "swin", "swin_t_w7", _232, _SWIN_T,
              hub="swin_tiny_patch4_window7_224.ms_in1k", description="Swin-T, window 7"),
    ModelSpec("convnext_s", "convnext_small", "convnext", "convnext_s", _232, _CONVNEXT_S,
              hub="convnext_small.fb_in1k", description="ConvNeXt-S"),
    ModelSpec("vgg16", "vgg16", "vgg", "vgg16", _256, hub="vgg16.tv_in1k", description="VGG-16"),
    ModelSpec("densenet121", "densenet121", "densenet", "densenet121", _256,
              hub="densenet121.tv_in1k", description="DenseNet-121"),
    ModelSpec("dino_resnet50", "resnet50", "resnet", "resnet50", _RESNET, pretraining="dino",
              description="ResNet-50, DINO self-supervised"),
    ModelSpec("dino_vit_b16", "vit_base_patch16_224", "vit", "vit_b16", _256, pretraining="dino",
              hub="vit_base_patch16_224.dino", description="ViT-B/16, DINO self-supervised"),
    ModelSpec("mocov3_resnet50", "resnet50", "resnet", "resnet50", _RESNET, pretraining="mocov3",
              description="ResNet-50, MoCo v3 self-supervised"),
    ModelSpec("mocov3_vit_b16", "vit_base_patch16_224", "vit", "vit_b16", _256,
              pretraining="mocov3", description="ViT-B/16, MoCo v3 self-supervised"),
    ModelSpec("ibot_vit_b16", "vit_base_patch16_224", "vit", "vit_b16", _256, pretraining="ibot",
              description="ViT-B/16, iBOT self-supervised"),
    ModelSpec("ibot_swin_t", "swin_tiny_patch4_window7_224", "swin", "swin_t_w14", _232,
              {"window_size": 14, **_SWIN_T}, pretraining="ibot",
              description="Swin-T, window 14, iBOT self-supervised"),
    ModelSpec("spark_convnext_s", "convnext_small", "convnext", "convnext_s", _232, _CONVNEXT_S,
              pretraining="spark", description="ConvNeXt-S, SparK self-supervised"),
    ModelSpec("demo_resnet", "resnet18", "resnet", "demo_resnet", _DEMO, _DEMO_RESNET,
              pretraining="none", description="small ResNet for 32 px demo data (CAM 4x4)"),
    ModelSpec("demo_vit", "vit_tiny_patch16_224", "vit", "demo_vit", _DEMO, _DEMO_VIT,
              pretraining="none", description="small ViT, patch 4 at 32 px (CAM 8x8)"),
    ModelSpec("demo_convnext", "convnext_atto", "convnext", "demo_convnext", _DEMO, _DEMO_CONVNEXT,
              pretraining="none", description="small ConvNeXt, stem patch 1 at 32 px (CAM 4x4)"),
    ModelSpec("demo_swin", "swin_tiny_patch4_window7_224", "swin", "demo_swin", _DEMO, _DEMO_SWIN,
              pretraining="none", description="small Swin, patch 4, window 4 (CAM 4x4)"),
)
REGISTRY: dict[str, ModelSpec] = {s.name: s for s in _SPECS}
DEMO_MODELS = ("demo_resnet", "demo_vit", "demo_convnext", "demo_swin")


def names() -> list[str]:
    """All registered model names."""
    return list(REGISTRY)


def register(
    name: str,
    factory,
    *,
    preprocess: PreprocessSpec | int = 224,
    cam_layer: str | None = None,
    cam_reshape=None,
    classifier: str | None = None,
    family: str = "cnn",
    display: str | None = None,
    description: str = "",
    replace: bool = False,
) -> ModelSpec:
    """Add a model of your own: ``factory(num_classes) -> nn.Module`` (random init; weights
    come from ``create(..., weights=)``). ``preprocess``: its input pipeline (a
    :class:`PreprocessSpec`, or an int: resize and centre-crop to that side, ImageNet
    statistics); ``cam_layer``: the dotted name of the layer GradCAM hooks (e.g.
    ``"features.4"``), ``cam_reshape`` its output to ``[B,C,h,w]`` for token models;
    ``classifier``: the dotted name of its last layer (needed for ``train.freeze_backbone``
    and other heads); ``family``: cnn or transformer (the report's grouping). The name is
    then accepted everywhere a built-in one is (params, ``cose evaluate``, tables)."""
    from cose import spec as names_spec

    if not callable(factory):
        raise ValueError(f"model {name!r}: factory must be callable, got {type(factory).__name__}")
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"model name {name!r}: use letters, digits and _ (it names folders)")
    if name in REGISTRY and not replace:
        raise ValueError(f"model {name!r} is already registered")
    if isinstance(preprocess, int):
        preprocess = PreprocessSpec(resize=preprocess, crop=preprocess)
    spec = ModelSpec(name, name, family, name, preprocess, pretraining="none",
                     description=description, factory=factory, cam_layer=cam_layer,
                     cam_reshape=cam_reshape, classifier=classifier)
    REGISTRY[name] = spec
    names_spec.register_model(name, display or name, family)
    return spec


def get(name: str) -> ModelSpec:
    """The registry entry of ``name``; ValueError naming the allowed names otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(REGISTRY)}") from None


def preprocess(name: str) -> PreprocessSpec:
    """Resize / crop / normalisation of ``name``'s inputs."""
    return get(name).preprocess


def normalize(images01: torch.Tensor, name_or_spec: str | PreprocessSpec) -> torch.Tensor:
    """ImageNet-style normalisation of [0,1] images ``[B,3,H,W]`` (or ``[3,H,W]``) for a model."""
    spec = preprocess(name_or_spec) if isinstance(name_or_spec, str) else name_or_spec
    shape = (3, 1, 1)
    mean = torch.as_tensor(spec.mean, dtype=images01.dtype, device=images01.device).view(shape)
    std = torch.as_tensor(spec.std, dtype=images01.dtype, device=images01.device).view(shape)
    return (images01 - mean) / std
