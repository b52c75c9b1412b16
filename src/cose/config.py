"""params.yaml -> typed, validated configuration.

Every experiment parameter lives in params.yaml; `-S key=value` overrides use dotted keys (as
`dvc exp run -S`). Bad values raise `ConfigError` with one line naming the key, the value and
what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cose import spec


class ConfigError(ValueError):
    """A bad parameter: the message names the key, the value and what is allowed."""


# the names live in cose.spec (torch-free); registered plugin methods are accepted too
METHODS = spec.BUILTIN_METHODS
PRECISIONS = spec.PRECISIONS
TRANSFORM_NAMES = spec.TRANSFORMS


@dataclass(frozen=True)
class DataConfig:
    root: str = "data"


OPTIMIZERS = ("adam", "adamw", "sgd")
CLIP_MODES = ("norm", "value")
PLATEAU_METRICS = ("val_loss", "val_acc", "train_loss")
AUGMENTS = ("none", "flip", "trivial")
BACKBONE_MODES = ("eval", "train")


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe (params ``train``; ``cose.training.fit`` takes it too).

    Defaults: plain fine-tuning of the whole model (Adam 8e-4, weight decay 1e-3, gradient
    norm clipped at 0.1, ReduceLROnPlateau(patience 10, factor 0.1), epochs counted from 1).
    The paper presets (params/paper/) set the official recipe of each dataset: a frozen
    backbone in train mode, per-dataset heads, lr and epochs, clipping by value,
    ReduceLROnPlateau(patience 2, factor 1e-5), ModifiedTrivial augmentation and 0-based
    checkpoint names; ``per_model`` holds one model's exceptions (SparK, DINO ResNet50)."""

    epochs: int = 20
    save_epochs: tuple[int, ...] = ()
    # how save_epochs and checkpoint names count epochs: 1 (epoch_005 = after 5 epochs) or 0
    # (the official _eNNN: the 0-based epoch index, e004 = after 5 epochs; e019 of 20 = final)
    checkpoint_base: int = 1
    batch_size: int = 64
    lr: float = 8e-4
    weight_decay: float = 1e-3
    momentum: float = 0.9                # sgd only
    grad_clip: float = 0.1               # 0 disables
    grad_clip_mode: str = "norm"         # clip_grad_norm_, or clip_grad_value_ (official)
    optimizer: str = "adam"
    freeze_backbone: bool = False
    backbone_mode: str = "eval"          # a frozen backbone's mode: eval, or train (official)
    head: str = "linear"
    plateau_metric: str = "val_loss"     # ReduceLROnPlateau
    plateau_patience: int = 10
    plateau_factor: float = 0.1
    augment: str = "none"                # none | flip | trivial (the official ModifiedTrivial)
    amp: bool = True
    eval_batch_size: int = 256
    num_workers: int = 0
    max_train_images: int | None = None
    # model name -> pretrained weights: a local file (any published layout), "hub" or
    # "hub:<timm tag>" (online only); unlisted models start from random init
    weights: dict[str, Any] = field(default_factory=dict)
    # model name -> {param: value}: this model's exceptions to the recipe
    per_model: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.check()

    def check(self, prefix: str = "train") -> None:
        """One-line ConfigError (a ValueError) for a value outside its range."""
        def need(ok: bool, key: str, expected: str) -> None:
            if not ok:
                raise ConfigError(f"{prefix}.{key}: got {getattr(self, key)!r}, expected "
                                  f"{expected}")

        finite = math.isfinite
        need(self.epochs > 0, "epochs", "> 0")
        need(self.batch_size > 0, "batch_size", "> 0")
        for key in ("lr", "weight_decay", "momentum", "grad_clip", "plateau_factor"):
            need(finite(getattr(self, key)), key, "a finite number")
        need(self.lr > 0, "lr", "> 0")
        need(self.weight_decay >= 0, "weight_decay", ">= 0")
        need(0 <= self.momentum < 1, "momentum", "in [0, 1)")
        need(self.grad_clip >= 0, "grad_clip", ">= 0")
        need(self.grad_clip_mode in CLIP_MODES, "grad_clip_mode", f"one of {CLIP_MODES}")
        need(self.optimizer in OPTIMIZERS, "optimizer", f"one of {OPTIMIZERS}")
        need(self.backbone_mode in BACKBONE_MODES, "backbone_mode", f"one of {BACKBONE_MODES}")
        need(0 < self.plateau_factor < 1, "plateau_factor", "in (0, 1)")
        need(self.plateau_patience >= 0, "plateau_patience", ">= 0")
        need(self.plateau_metric in PLATEAU_METRICS, "plateau_metric",
             f"one of {PLATEAU_METRICS}")
        need(self.augment in AUGMENTS, "augment", f"one of {AUGMENTS}")
        need(self.eval_batch_size > 0, "eval_batch_size", "> 0")
        need(self.num_workers >= 0, "num_workers", ">= 0")
        need(self.checkpoint_base in (0, 1), "checkpoint_base", "0 or 1")
        if self.max_train_images is not None:
            need(self.max_train_images > 0, "max_train_images", "> 0 or null")
        try:
            spec.head_widths(self.head)
        except ValueError:
            raise ConfigError(f"{prefix}.head: got {self.head!r}; allowed: linear, mlp, "
                              "mlp-<width>[-<width>...]") from None
        first, last = self.epoch_range()
        for e in self.save_epochs:
            if not first <= e <= last:
                what = ("intermediate epochs" if self.checkpoint_base == 1 else
                        "0-based epoch indices")
                raise ConfigError(f"{prefix}.save_epochs: epoch {e} outside {first}..{last} "
                                  f"({what})")

    def epoch_range(self) -> tuple[int, int]:
        """The checkpoint labels ``save_epochs`` may hold: 1..epochs-1 (after that many
        epochs, final excluded) or, 0-based, 0..epochs-1 (the official, final included)."""
        return (1, self.epochs - 1) if self.checkpoint_base == 1 else (0, self.epochs - 1)

    def label(self, epoch: int) -> int:
        """The checkpoint label of the state after ``epoch`` epochs (counted from 1)."""
        return epoch - 1 + self.checkpoint_base

    def for_model(self, model: str) -> TrainConfig:
        """This recipe with ``per_model[model]`` applied (no ``per_model`` left)."""
        over = self.per_model.get(model, {})
        fields_ = {f.name: f for f in dataclasses.fields(TrainConfig)}
        kwargs = {}
        for key, value in over.items():
            where = f"train.per_model.{model}.{key}"
            if key not in fields_ or key in ("per_model", "weights"):
                allowed = sorted(k for k in fields_ if k not in ("per_model", "weights"))
                raise ConfigError(f"{where}: unknown key; allowed: {', '.join(allowed)}")
            kwargs[key] = _coerce(where, value, fields_[key].default, str(fields_[key].type))
        try:
            merged = dataclasses.replace(self, per_model={}, **kwargs)
        except ConfigError as exc:
            raise ConfigError(str(exc).replace("train.", f"train.per_model.{model}.", 1)) from None
        return merged

    @classmethod
    def from_config(cls, obj: Any) -> TrainConfig:
        """From any object or mapping with (a subset of) these fields; others are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        src = obj if isinstance(obj, dict) else {n: getattr(obj, n) for n in names
                                                 if hasattr(obj, n)}
        return cls(**{k: v for k, v in src.items() if k in names})


@dataclass(frozen=True)
class ExplainConfig:
    images: int = 8
    # method -> fewer test images for that method: the first N of the same permutation (the
    # paper: 500 for GradCAM, GradCAM++, IG and 50 for SmoothGrad, BlurIG, GuidedIG, LIME)
    images_by_method: dict[str, int] = field(default_factory=dict)
    seed: int = 0
    transforms: tuple[str, ...] = TRANSFORM_NAMES
    magnitudes: int = 6
    random_model: bool = True
    mid_ckpt: bool = True
    shard_size: int = 4
    batch_size: int = 256
    sample_maps: int = 2
    precision: str = "auto"  # cose.precision: auto = the fastest validated per method
    # shared: the same seeded images for every model; reference: the official numpy stream
    # (per model, end index inclusive), see cose.selection
    # stochastic methods (SmoothGrad, LIME, ...) also explain each image once more with another
    # seed: the "seed" variant, the method's noise floor (its self-consistency ceiling)
    noise_floor: bool = True
    selection: str = "shared"
    reference_models: tuple[str, ...] = ()  # the official run's model order (empty: models)
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)

    def images_for(self, method: str) -> int:
        """Test images `method` explains: its `images_by_method` entry, else `images`."""
        return self.images_by_method.get(method, self.images)


@dataclass(frozen=True)
class CompileConfig:
    drop_misclassified: bool = True
    # NaN similarities (both maps constant): skip = left out of the means and counted (the
    # project's rule); reference = plain means, one NaN makes the metric NaN (the reference's)
    nan: str = "skip"
    bootstrap: int = 1000        # resamples of the images behind each interval (0: none)
    level: float = 0.95          # the intervals' confidence level
    nan_share: float = 0.05      # flag a cell where more of its pairs have a NaN similarity


@dataclass(frozen=True)
class TrackingConfig:
    experiment: str = "cose"
    required: bool = False
    retries: int = 3
    backoff_s: float = 1.0


@dataclass(frozen=True)
class Config:
    seed: int = 0
    datasets: tuple[str, ...] = ("digits",)
    models: tuple[str, ...] = ("demo_resnet",)
    methods: tuple[str, ...] = METHODS
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    explain: ExplainConfig = ExplainConfig()
    compile: CompileConfig = CompileConfig()
    tracking: TrackingConfig = TrackingConfig()

    def train_for(self, model: str) -> TrainConfig:
        """The training recipe of ``model``: ``train`` with its ``train.per_model`` entry."""
        return self.train.for_model(model)

    def section_hash(self, *sections: str) -> str:
        """Stable hash of the named sections (fingerprints shards and checkpoints)."""
        raw = self.to_dict()
        blob = json.dumps({s: raw[s] for s in sections}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- parsing

_SECTIONS = {
    "data": DataConfig,
    "train": TrainConfig,
    "explain": ExplainConfig,
    "compile": CompileConfig,
    "tracking": TrackingConfig,
}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, default: Any, annotation: str) -> Any:
    """Check `value` against the field's type (taken from its annotation and default)."""
    optional = "None" in annotation
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}: got null, expected {annotation}")
    if annotation.startswith("tuple"):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: got {value!r}, expected a list")
        inner = "int" if "int" in annotation else "str"
        out = []
        for item in value:
            if inner == "int" and (isinstance(item, bool) or not isinstance(item, int)):
                raise ConfigError(f"{key}: item {item!r} is not an integer")
            if inner == "str" and not isinstance(item, str):
                raise ConfigError(f"{key}: item {item!r} is not a string")
            out.append(item)
        return tuple(out)
    if annotation.startswith("dict"):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: got {value!r}, expected a mapping")
        return copy.deepcopy(value)
    if annotation.startswith("bool"):
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: got {value!r}, expected true or false")
        return value
    if annotation.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: got {value!r}, expected an integer")
        if abs(value) > MAX_INT:  # torch and numpy take 64-bit integers at most
            raise ConfigError(f"{key}: got {value!r}, expected an integer of at most {MAX_INT}")
        return value
    if annotation.startswith("float"):
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: got {value!r}, expected a number")
        try:
            value = float(value)
        except OverflowError:  # an integer beyond any float
            raise ConfigError(f"{key}: got {value!r}, expected a finite number") from None
        if not math.isfinite(value):  # .inf, .nan: a number no stage can use
            raise ConfigError(f"{key}: got {value!r}, expected a finite number")
        return value
    if annotation.startswith("str"):
        if not isinstance(value, str):
            raise ConfigError(f"{key}: got {value!r}, expected a string")
        return value
    return value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix}: got {raw!r}, expected a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        bad = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"{bad}: unknown key; allowed: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in raw.items():
        f = fields[name]
        key = f"{prefix}.{name}" if prefix else name
        if name in _SECTIONS and cls is Config:
            kwargs[name] = _build(_SECTIONS[name], value, key)
        else:
            kwargs[name] = _coerce(key, value, f.default, str(f.type))
    return cls(**kwargs)


#: the largest integer a param may hold (64-bit signed), and a seed (numpy's RandomState)
MAX_INT = 2**63 - 1
MAX_SEED = 2**32 - 1
#: tracking's retry policy: a stage waits at most about backoff_s * 2**retries for MLflow
MAX_RETRIES, MAX_BACKOFF_S = 20, 600.0


def _check_range(key: str, value: float, lo: float, hi: float, what: str = "") -> None:
    if not lo <= value <= hi:
        raise ConfigError(f"{key}: got {value!r}, expected {lo!r}..{hi!r}{what}")


def _check_positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}: got {value!r}, expected {'>= 0' if allow_zero else '> 0'}")


def _check_names(key: str, values: tuple[str, ...], allowed: tuple[str, ...] | list[str]) -> None:
    if not values:
        raise ConfigError(f"{key}: empty list; allowed: {', '.join(allowed)}")
    for v in values:  # names become folders, stage names and MLflow keys: identifiers only
        if not v.isidentifier():
            raise ConfigError(f"{key}: {v!r} is not a name (letters, digits and _, not "
                              f"starting with a digit); allowed: {', '.join(allowed)}")
        if v not in allowed:
            raise ConfigError(f"{key}: unknown value {v!r}; allowed: {', '.join(allowed)}")
    if len(set(values)) != len(values):
        raise ConfigError(f"{key}: duplicate entries in {list(values)!r}")


def validate(cfg: Config, check_registries: bool = True) -> Config:
    """Range and name checks that go beyond types."""
    _check_range("seed", cfg.seed, 0, MAX_SEED, " (a seed)")
    _check_names("methods", cfg.methods, spec.methods())
    # the names, built-in and registered, are the spec's; without the registries (a plugin
    # not loaded) they are still checked to be names
    _check_names("datasets", cfg.datasets, spec.datasets() if check_registries else cfg.datasets)
    _check_names("models", cfg.models, spec.models() if check_registries else cfg.models)
    t = cfg.train  # its own ranges are checked when it is built (TrainConfig.check)
    for model, w in t.weights.items():
        if w is not None and not isinstance(w, str):
            raise ConfigError(f"train.weights.{model}: got {w!r}, expected a path, 'hub' or null")
        if check_registries and model not in cfg.models:
            raise ConfigError(
                f"train.weights.{model}: not in models; allowed: {', '.join(cfg.models)}"
            )
    for model, over in t.per_model.items():
        if not isinstance(over, dict):
            raise ConfigError(f"train.per_model.{model}: got {over!r}, expected a mapping")
        if check_registries and model not in spec.models():
            raise ConfigError(f"train.per_model.{model}: unknown model; allowed: "
                              f"{', '.join(spec.models())}")
        t.for_model(model)  # the merged recipe's own checks
    e = cfg.explain
    _check_positive("explain.images", e.images)
    for method, n in e.images_by_method.items():
        key = f"explain.images_by_method.{method}"
        if not spec.is_method(method):
            raise ConfigError(f"{key}: unknown method; allowed: {', '.join(spec.methods())}")
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= e.images:
            raise ConfigError(f"{key}: got {n!r}, expected an integer in 1..explain.images "
                              f"({e.images}): the first N of the explain images")
    _check_positive("explain.magnitudes", e.magnitudes)
    if e.magnitudes > 60:
        raise ConfigError(f"explain.magnitudes: got {e.magnitudes}, expected 1..60")
    _check_positive("explain.shard_size", e.shard_size)
    _check_positive("explain.batch_size", e.batch_size)
    _check_positive("explain.sample_maps", e.sample_maps, allow_zero=True)
    _check_range("explain.seed", e.seed, 0, MAX_SEED, " (a seed)")
    _check_names("explain.transforms", e.transforms, TRANSFORM_NAMES)
    if e.precision not in spec.PRECISION_CHOICES:
        raise ConfigError(f"explain.precision: got {e.precision!r}; allowed: "
                          f"{', '.join(spec.PRECISION_CHOICES)}")
    _check_selection(cfg, check_registries)
    for method, settings in e.settings.items():
        if not spec.is_method(method):
            raise ConfigError(
                f"explain.settings.{method}: unknown method; allowed: {', '.join(spec.methods())}"
            )
        if not isinstance(settings, dict):
            raise ConfigError(f"explain.settings.{method}: got {settings!r}, expected a mapping")
        try:  # each setting against the method's typed defaults and bounds
            spec.check_settings(method, settings)
        except spec.SettingError as exc:
            if exc.key is None:
                raise ConfigError(f"explain.settings.{method}.{exc.value.split(', ')[0]}: "
                                  f"unknown setting; allowed: {exc.expected}") from None
            raise ConfigError(f"explain.settings.{method}.{exc.key}: got {exc.value!r}, "
                              f"expected {exc.expected}") from None
    c = cfg.compile
    if c.nan not in ("skip", "reference"):
        raise ConfigError(f"compile.nan: got {c.nan!r}; allowed: skip, reference")
    if c.bootstrap < 0 or (0 < c.bootstrap < 100):
        raise ConfigError(f"compile.bootstrap: got {c.bootstrap}, expected 0 (no intervals) or "
                          ">= 100 resamples")
    if not 0.5 <= c.level < 1:
        raise ConfigError(f"compile.level: got {c.level}, expected a confidence level in "
                          "[0.5, 1)")
    if not 0 <= c.nan_share <= 1:
        raise ConfigError(f"compile.nan_share: got {c.nan_share}, expected a share in [0, 1]")
    _check_range("tracking.retries", cfg.tracking.retries, 0, MAX_RETRIES)
    _check_range("tracking.backoff_s", cfg.tracking.backoff_s, 0, MAX_BACKOFF_S, " seconds")
    return cfg


def _check_selection(cfg: Config, check_registries: bool) -> None:
    from cose.selection import SELECTIONS, STREAM_CONSUMERS

    e = cfg.explain
    if e.selection not in SELECTIONS:
        raise ConfigError(f"explain.selection: got {e.selection!r}; allowed: "
                          f"{', '.join(SELECTIONS)}")
    consumers = [m for m in cfg.methods if m in STREAM_CONSUMERS]
    if consumers and e.selection == "reference":
        raise ConfigError(
            f"explain.selection: reference cannot regenerate the official images and magnitudes "
            f"of {', '.join(consumers)}: the official code draws their noise/perturbations from "
            f"the same numpy stream between the magnitude draws; use selection: shared for them")
    if len(set(e.reference_models)) != len(e.reference_models):
        raise ConfigError(f"explain.reference_models: duplicate entries in "
                          f"{list(e.reference_models)!r}")
    missing = [m for m in cfg.models if e.reference_models and m not in e.reference_models]
    if missing:
        raise ConfigError(f"explain.reference_models: {missing[0]!r} (in models) is missing; "
                          "list every model of the run in the official run's order")
    if check_registries and e.reference_models:
        _check_names("explain.reference_models", e.reference_models, spec.models())


# --------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", yaml-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"-S {text!r}: expected KEY=VALUE with a dotted key")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"-S {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"-S {key}: cannot parse value {raw!r}: {exc}") from None
    return key, value


def _mapping_keys(cls: type = Config, prefix: str = "") -> set[str]:
    """Dotted keys of the mapping-valued params (their own keys are free-form)."""
    keys = set()
    for f in dataclasses.fields(cls):
        if cls is Config and f.name in _SECTIONS:
            keys |= _mapping_keys(_SECTIONS[f.name], f.name + ".")
        elif str(f.type).startswith("dict"):
            keys.add(prefix + f.name)
    return keys


def _known_keys(cls: type = Config, prefix: str = "") -> set[str]:
    keys = set()
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        keys.add(key)
        if cls is Config and f.name in _SECTIONS:
            keys |= _known_keys(_SECTIONS[f.name], key + ".")
    return keys


_MAPPINGS = _mapping_keys()


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    known = _known_keys()
    for text in overrides:
        key, value = parse_override(text)
        parts = key.split(".")
        # mappings are open-ended: explain.settings.<method>.<name>, train.weights.<model>, ...
        head = next((".".join(parts[:i]) for i in range(2, len(parts))
                     if ".".join(parts[:i]) in _MAPPINGS), key)
        if head not in known:
            section = parts[0] + "."
            near = sorted(k for k in known if k.startswith(section)) or sorted(
                k for k in known if "." not in k
            )
            raise ConfigError(f"-S {key}: unknown key; allowed: {', '.join(near)}")
        node = raw
        for part in parts[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"-S {key}: {part!r} is not a mapping")
            node = nxt
        node[parts[-1]] = value
    return raw


# --------------------------------------------------------------------------- loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml's safe loader, refusing a key given twice in one mapping (YAML keeps the last one
    silently: a typo'd copy would override the intended value)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load(
    path: str | Path = "params.yaml",
    overrides: list[str] | None = None,
    check_registries: bool = True,
) -> Config:
    """Read params.yaml (or a preset), apply `-S` overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file {str(path)!r} not found")
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        what = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise ConfigError(f"{path}: not valid YAML{line}: {what}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a text file ({exc.reason})") from None
    if raw is None or raw == {}:
        raise ConfigError(f"{path}: empty; it must set the experiment (datasets, models, "
                          "methods, train, explain, ...): see the project's params.yaml")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    raw = apply_overrides(raw, overrides or [])
    return validate(from_dict(raw), check_registries=check_registries)


def from_dict(raw: dict[str, Any]) -> Config:
    return _build(Config, raw, "")
