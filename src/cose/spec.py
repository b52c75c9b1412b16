"""Every name the pipeline knows, in one torch-free place.

Saliency methods (name, display name, table order, kind, stochastic or not, the paper's image
count, the reference's output folder, typed default settings), the 13 transforms (geometric
or photometric, signed, maximum magnitude), the precisions, and the display names of datasets
and models (with the reference code's folder names). ``config``, ``scoring``, ``report``,
``precision``, ``transforms``, ``saliency``, ``data.validate`` and ``api`` read them from here;
a plugin adds a method with ``cose.saliency.register`` (which registers its spec here too), so
adding a method is one registration.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Setting", "SettingError", "MethodSpec", "METHOD_KINDS", "BUILTIN_METHODS", "register_method", "methods",
    "method", "is_method", "method_display", "method_order", "reference_method_dirs",
    "check_settings", "GEOMETRIC", "PHOTOMETRIC", "TRANSFORMS", "SIGNED", "UNSIGNED",
    "MAX_MAGNITUDE", "PRECISIONS", "display_dataset", "display_model", "reference_model_names",
    "PUBLISHED_MODELS", "AUTO_PRECISION", "PRECISION_CHOICES",
]

# --------------------------------------------------------------------------- settings


class SettingError(ValueError):
    """A bad saliency setting: ``method``, ``key`` (None: unknown keys), ``value``, and what
    is ``expected``."""

    def __init__(self, method: str, key: str | None, value: Any, expected: str):
        self.method, self.key, self.value, self.expected = method, key, value, expected
        if key is None:
            super().__init__(f"{method}: unknown setting(s) {value}; allowed: {expected}")
        else:
            super().__init__(f"{method}: {key}={value!r}; expected {expected}")


@dataclass(frozen=True)
class Setting:
    """One setting of a saliency method: its default and what values it takes.

    ``kind``: ``int``, ``float``, ``seed`` (an integer or null), ``layer`` (a module name, or
    a module object through the Python API), ``callable`` (Python API only) or ``any``.
    ``minimum``: the smallest allowed value of an ``int``/``float`` setting. ``optional``:
    null is allowed (and means "the default behaviour", e.g. a batch size by device)."""

    default: Any = None
    kind: str = "any"
    minimum: float | None = None
    optional: bool = False
    help: str = ""

    def check(self, method: str, name: str, value: Any) -> Any:
        """``value`` as the setting's type; ValueError naming method, setting and value."""
        bad = SettingError(method, name, value, self._expected())
        if value is None:
            if self.optional or self.kind in ("seed", "layer", "callable", "any"):
                return None
            raise bad
        if self.kind in ("int", "seed"):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise bad
            value = int(value)
            if (not 0 <= value <= 2**32 - 1) if self.kind == "seed" else abs(value) > 2**63 - 1:
                raise bad  # a seed numpy takes, an integer torch takes
        elif self.kind == "float":
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(
                    float(value)):
                raise bad
            value = float(value)
        elif self.kind == "callable":
            if not callable(value):
                raise bad
            return value
        elif self.kind == "layer":
            if isinstance(value, str) and not value.strip():
                raise bad
            return value
        if self.minimum is not None and value < self.minimum:
            raise bad
        return value

    def _expected(self) -> str:
        what = {"int": "an integer", "float": "a finite number",
                "seed": "an integer in 0..4294967295 or null",
                "callable": "a callable or null (Python API)",
                "layer": "a module name such as 'layer4', or null"}.get(self.kind, self.kind)
        if self.minimum is not None:
            what += f" >= {self.minimum:g}"
        if self.optional and self.kind != "seed":
            what += " or null"
        return what


def _as_setting(value: Any) -> Setting:
    """A plain default becomes a typed setting (int, float or any) inferred from it."""
    if isinstance(value, Setting):
        return value
    if isinstance(value, bool) or value is None:
        return Setting(value)
    if isinstance(value, numbers.Integral):
        return Setting(int(value), "int")
    if isinstance(value, numbers.Real):
        return Setting(float(value), "float")
    return Setting(value)


# --------------------------------------------------------------------------- methods

METHOD_KINDS = ("cam", "gradient", "perturbation", "other")


@dataclass(frozen=True)
class MethodSpec:
    """A saliency method as every stage knows it.

    ``fusable``: its passes only call the model (no hooks on its modules), so they may run a
    conv+BN-folded copy of it. ``concurrent``: calls on different models may run at once on
    threads (no global state, such as torch's or numpy's global random stream), so a unit maps
    its model variants several at a time (``COSE_STREAMS``). ``paper_images``: the test images
    the paper explained with it.
    ``reference_dir``: its folder in the reference code's ``outputs/`` (None: not in it)."""

    name: str
    display: str
    kind: str = "other"
    stochastic: bool = False
    paper_images: int | None = None
    settings: Mapping[str, Setting] = field(default_factory=dict)
    reference_dir: str | None = None
    fusable: bool = False
    concurrent: bool = False
    order: float = math.inf
    doc: str = ""

    @property
    def defaults(self) -> dict[str, Any]:
        return {k: s.default for k, s in self.settings.items()}


_BATCH = Setting(None, "int", 1, optional=True, help="model inputs per call (null: by device)")
_CAM = {"layer": Setting(None, "layer", help="CAM layer (null: the model's known layer)"),
        "reshape": Setting(None, "callable", help="token activations to [B,C,h,w]"),
        "batch_size": _BATCH}

_METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec, *, replace: bool = False) -> MethodSpec:
    """Add (or with ``replace`` overwrite) a method's spec; the name must be an identifier."""
    if not isinstance(spec.name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", spec.name):
        raise ValueError(f"saliency method name {spec.name!r}: use letters, digits and _ "
                         "(it names folders, params and table columns)")
    if spec.kind not in METHOD_KINDS:
        raise ValueError(f"saliency method {spec.name!r}: kind {spec.kind!r}; allowed: "
                         f"{', '.join(METHOD_KINDS)}")
    if not replace and spec.name in _METHODS:
        raise ValueError(f"saliency method {spec.name!r} is already registered")
    settings = {k: _as_setting(v) for k, v in spec.settings.items()}
    order = spec.order if spec.order != math.inf else 100.0 + len(_METHODS)
    fixed = MethodSpec(**{**spec.__dict__, "settings": settings, "order": order})
    _METHODS[spec.name] = fixed
    return fixed


def unregister_method(name: str) -> None:
    """Remove a registered method (tests; built-ins cannot be removed)."""
    if name in BUILTIN_METHODS:
        raise ValueError(f"{name!r} is a built-in method")
    _METHODS.pop(name, None)


for _spec in (
    MethodSpec("gradcam", "GradCAM", "cam", concurrent=True, paper_images=500, settings=_CAM,
               reference_dir="gradcam", order=1, doc="GradCAM (pytorch-grad-cam)"),
    MethodSpec("gradcampp", "GradCAM++", "cam", concurrent=True, paper_images=500,
               settings=_CAM, reference_dir="gradcamPP", order=2,
               doc="GradCAM++ (pytorch-grad-cam)"),
    MethodSpec("ig", "IG", "gradient", concurrent=True, paper_images=500, reference_dir="ig",
               fusable=True, order=4,
               settings={"steps": Setting(25, "int", 1), "batch_size": _BATCH},
               doc="Integrated Gradients (PAIR saliency), zero baseline"),
    MethodSpec("smoothgrad", "SmoothGrad", "gradient", concurrent=True, stochastic=True,
               paper_images=50, reference_dir="smoothgrad", fusable=True, order=6,
               settings={"samples": Setting(50, "int", 1), "noise": Setting(0.15, "float", 0),
                         "seed": Setting(0, "seed"), "batch_size": _BATCH},
               doc="SmoothGrad over vanilla gradients (PAIR saliency), squared"),
    MethodSpec("blur_ig", "BlurIG", "gradient", concurrent=True, paper_images=50,
               reference_dir="blur_ig", fusable=True, order=0,
               settings={"steps": Setting(100, "int", 1), "max_sigma": Setting(50.0, "float", 0),
                         "grad_step": Setting(0.01, "float", 0), "batch_size": _BATCH},
               doc="Blur IG (PAIR saliency)"),
    MethodSpec("guided_ig", "GuidedIG", "gradient", concurrent=True, paper_images=50,
               reference_dir="guided_ig", fusable=True, order=3,
               settings={"steps": Setting(200, "int", 1), "max_dist": Setting(0.02, "float", 0),
                         "fraction": Setting(0.25, "float", 0), "batch_size": _BATCH},
               doc="Guided IG (PAIR saliency), zero baseline"),
    MethodSpec("lime", "LIME", "perturbation", concurrent=True, stochastic=True,
               paper_images=50, reference_dir="lime", fusable=True, order=5,
               settings={"samples": Setting(1000, "int", 1), "num_features": Setting(10, "int", 1),
                         "seed": Setting(0, "seed"), "batch_size": _BATCH,
                         "kernel_size": Setting(None, "float", 1, optional=True,
                                                help="quickshift; null: 4 x side / 224"),
                         "max_dist": Setting(None, "float", 0, optional=True,
                                             help="quickshift; null: 200 x side / 224"),
                         "ratio": Setting(0.2, "float", 0)},
               doc="LIME (lime), quickshift superpixels, hide colour 0"),
):
    register_method(_spec)

#: the reference's seven methods, in the order params.yaml lists them
BUILTIN_METHODS: tuple[str, ...] = (
    "gradcam", "gradcampp", "ig", "smoothgrad", "blur_ig", "guided_ig", "lime")


def methods() -> tuple[str, ...]:
    """Every registered method: the seven built-ins first, then registered ones in order."""
    return tuple(_METHODS)


def is_method(name: Any) -> bool:
    return isinstance(name, str) and name in _METHODS


def method(name: str) -> MethodSpec:
    """The spec of ``name``; ValueError naming the registered methods otherwise."""
    try:
        return _METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown saliency method {name!r}; allowed: "
                         f"{', '.join(_METHODS)}") from None


def method_display(name: str) -> str:
    """Display name (``gradcampp`` -> ``GradCAM++``); unknown names unchanged."""
    spec = _METHODS.get(name) if isinstance(name, str) else None
    return spec.display if spec else str(name)


def method_order(names) -> list[str]:
    """``names`` in table order: the paper's columns (BlurIG, GradCAM, GradCAM++, GuidedIG, IG,
    LIME, SmoothGrad), then registered methods in registration order, then unknown ones."""
    def key(m):
        spec = _METHODS.get(m) if isinstance(m, str) else None
        return (spec.order if spec else math.inf, str(m))
    return sorted(dict.fromkeys(names), key=key)


def reference_method_dirs() -> dict[str, str]:
    """The reference's ``outputs/<folder>`` -> method name (``gradcamPP`` -> ``gradcampp``)."""
    return dict(sorted((s.reference_dir, s.name) for s in _METHODS.values() if s.reference_dir))


def check_settings(name: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The full settings of method ``name``: defaults overlaid with ``settings``, each checked
    against its type and bounds; ValueError naming the method, setting and value."""
    spec = method(name)
    unknown = sorted(set(settings) - set(spec.settings))
    if unknown:
        raise SettingError(name, None, ", ".join(unknown), ", ".join(spec.settings) or "none")
    out = spec.defaults
    for key, value in settings.items():
        out[key] = spec.settings[key].check(name, key, value)
    return out


# --------------------------------------------------------------------------- transforms

GEOMETRIC: tuple[str, ...] = ("TranslateX", "TranslateY", "Rotate", "FlipLR", "FlipUD")
PHOTOMETRIC: tuple[str, ...] = (
    "Brightness", "Color", "Contrast", "Sharpness", "AutoContrast", "Equalize", "Blur", "Smooth",
)
TRANSFORMS: tuple[str, ...] = GEOMETRIC + PHOTOMETRIC
#: maximum magnitude of the signed transforms (the others have one variant, magnitude 0)
MAX_MAGNITUDE: dict[str, float] = {
    "TranslateX": 32.0,  # pixels at 224 px, scaled by W / 224
    "TranslateY": 32.0,  # pixels at 224 px, scaled by H / 224
    "Rotate": 135.0,  # degrees
    "Brightness": 0.99,  # factor 1 + m
    "Color": 0.99,
    "Contrast": 0.99,
    "Sharpness": 0.99,
}
SIGNED: tuple[str, ...] = tuple(t for t in TRANSFORMS if t in MAX_MAGNITUDE)
UNSIGNED: tuple[str, ...] = tuple(t for t in TRANSFORMS if t not in MAX_MAGNITUDE)

# --------------------------------------------------------------------------- precisions

#: numeric precision of the saliency passes (cose.precision), slowest and most exact first
PRECISIONS: tuple[str, ...] = ("fp32", "reference", "tf32", "bf16")
#: explain.precision's default: per method, the fastest precision validated for it (else fp32)
AUTO_PRECISION = "auto"
#: what explain.precision, cose.evaluate and `cose evaluate --precision` accept
PRECISION_CHOICES: tuple[str, ...] = (AUTO_PRECISION, *PRECISIONS)

# --------------------------------------------------------------------------- heads

#: classification heads: linear, mlp (1024-256), or mlp-<w>[-<w>...] (hidden widths)
HEADS: tuple[str, ...] = ("linear", "mlp", "mlp-<w>[-<w>...]")


def head_widths(head: Any) -> tuple[int, ...]:
    """Hidden widths of a head name (``linear`` -> (), ``mlp`` -> (1024, 256), ``mlp-256`` ->
    (256,)); ValueError naming the allowed forms otherwise."""
    if head == "linear":
        return ()
    if head == "mlp":
        return (1024, 256)
    if isinstance(head, str) and re.fullmatch(r"mlp(-[1-9][0-9]*)+", head):
        return tuple(int(w) for w in head.split("-")[1:])
    raise ValueError(f"head {head!r} not allowed; use linear, mlp (1024-256) or "
                     "mlp-<width>[-<width>...], e.g. mlp-1024")


# --------------------------------------------------------------------------- datasets, models

#: the built-in datasets (cose.data.sources.SOURCES implements them) and models
#: (cose.models.registry.REGISTRY), in their registries' order; a test keeps them equal
BUILTIN_DATASETS: tuple[str, ...] = (
    "digits", "cifar10", "caltech101", "cub200", "eurosat", "oxford102", "imagefolder")
BUILTIN_MODELS: tuple[str, ...] = (
    "resnet50", "resnet101", "vit_b16", "vit_l16", "swin_t", "convnext_s", "vgg16",
    "densenet121", "dino_resnet50", "dino_vit_b16", "mocov3_resnet50", "mocov3_vit_b16",
    "ibot_vit_b16", "ibot_swin_t", "spark_convnext_s", "demo_resnet", "demo_vit",
    "demo_convnext", "demo_swin")
_DATASETS: dict[str, None] = dict.fromkeys(BUILTIN_DATASETS)
_MODEL_NAMES: dict[str, None] = dict.fromkeys(BUILTIN_MODELS)


def datasets() -> tuple[str, ...]:
    """Every dataset name params may use: the built-ins, then registered ones."""
    return tuple(_DATASETS)


def models() -> tuple[str, ...]:
    """Every model name params may use: the built-ins, then registered ones."""
    return tuple(_MODEL_NAMES)


def register_dataset(name: str) -> None:
    """A registered dataset's name (cose.data.register)."""
    _DATASETS[name] = None


# --------------------------------------------------------------------------- display names

_DATASET_DISPLAY = {
    "caltech101": "Caltech101", "cifar10": "CIFAR10", "cub200": "CUB200", "cub": "CUB200",
    "eurosat": "EuroSAT", "oxford102": "Oxford102", "digits": "Digits",
}

# registry name -> (display name, the reference code's model folder name)
_MODELS: dict[str, tuple[str, str | None]] = {
    "convnext_s": ("ConvNext", "convnext_small"),
    "resnet50": ("ResNet50", "ResNet50"),
    "swin_t": ("Swin-T", "Swin_T_14"),
    "vit_b16": ("ViT", "ViT_B_16"),
    "resnet101": ("ResNet101", None),
    "vit_l16": ("ViT-L/16", None),
    "vgg16": ("VGG16", "VGG16"),
    "densenet121": ("DenseNet121", "DenseNet121"),
    "dino_resnet50": ("DINO ResNet50", "DINO_ResNet50"),
    "dino_vit_b16": ("DINO ViT", "DINO_ViT_B_16"),
    "mocov3_resnet50": ("MoCo v3 ResNet50", "MoCov3_ResNet50"),
    "mocov3_vit_b16": ("MoCo v3 ViT", "MoCov3_ViT_B_16"),
    "ibot_vit_b16": ("iBOT ViT", "iBOT_ViT_B_16"),
    "ibot_swin_t": ("iBOT Swin-T", "iBOT_Swin_T_14"),
    "spark_convnext_s": ("SparK ConvNext", "SparK_convnext_small"),
}
#: the published Table 1's four models, as registry names, in its row order
PUBLISHED_MODELS: tuple[str, ...] = ("convnext_s", "resnet50", "swin_t", "vit_b16")


def _key(name: Any) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


_MODEL_KEYS: dict[str, str] = {}
for _name, (_display, _folder) in _MODELS.items():
    for _alias in (_name, _folder, _display):
        if _alias:
            _MODEL_KEYS.setdefault(_key(_alias), _name)
_MODEL_KEYS.update({_key(a): n for a, n in (
    ("convnext", "convnext_s"), ("convnext_small", "convnext_s"), ("swin", "swin_t"),
    ("vit", "vit_b16"), ("vit_b_16", "vit_b16"), ("ViT-B/16", "vit_b16"),
    ("ConvNext-S", "convnext_s"))})


_FAMILIES: dict[str, str] = {}


def register_model(name: str, display: str, family: str = "cnn") -> None:
    """A registered model's name, display name and architecture family
    (cose.models.register)."""
    _MODEL_NAMES[name] = None
    _MODELS[name] = (display, None)
    _MODEL_KEYS[_key(name)] = name
    _FAMILIES[name] = family


def model_family(name: Any) -> str | None:
    """The family a registered model was given (cnn / transformer), else None."""
    return _FAMILIES.get(str(name))


def canonical_model(name: Any) -> str | None:
    """The registry name behind a model name in any known spelling (``Swin_T_14``,
    ``convnext_small``, ``ViT``), or None."""
    return _MODEL_KEYS.get(_key(name))


def display_model(name: Any) -> str:
    """Published spelling of a model (``Swin_T_14`` / ``swin_t`` -> ``Swin-T``,
    ``convnext_small`` -> ``ConvNext``); unknown names unchanged."""
    canon = canonical_model(name)
    return _MODELS[canon][0] if canon else str(name)


def display_dataset(name: Any) -> str:
    """Paper spelling of a dataset name (``cifar10`` -> ``CIFAR10``); unknown names unchanged."""
    return _DATASET_DISPLAY.get(_key(name), str(name))


def reference_model_names() -> dict[str, str]:
    """The reference code's model folder name -> registry name."""
    return {folder: name for name, (_, folder) in _MODELS.items() if folder}


def published_model(name: Any) -> str | None:
    """The registry name if ``name`` is one of the published Table 1's four models."""
    canon = canonical_model(name)
    return canon if canon in PUBLISHED_MODELS else None
