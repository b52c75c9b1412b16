"""COSE of your own classifier from Python, without DVC or MLflow.

    import cose

    result = cose.evaluate(model, images01, labels, methods=["gradcam", "ig"])
    result.table()    # the COSE summary (cose.scoring.summarize), one row per method
    result.pairs      # the per-pair table (one row per image and variant)
    result.plot()     # a matplotlib figure

``evaluate`` runs :func:`cose.runner.explain_pair` (the explain stage's work units, through the
same library layer) over chunks of the images for each saliency method, so the numbers are the
pipeline's numbers for the same model, images, seed and settings. ``load_folder`` reads an image folder or a fetched dataset
folder for the ``cose evaluate`` command.
"""

from __future__ import annotations

import io
import logging
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from cose import precision as P
from cose import scoring
from cose import transforms as T
from cose.runner import Options, Pair, explain_pair

__all__ = ["DEFAULT_METHODS", "Evaluation", "evaluate", "load_folder"]

log = logging.getLogger("cose.evaluate")

DEFAULT_METHODS: tuple[str, ...] = ("gradcam", "gradcampp", "ig")
"""The three cheap methods (the paper ran them on 500 images); ``methods="all"`` runs seven."""

_CKPT_TAG = re.compile(r"^[A-Za-z0-9]+$")


@dataclass
class Evaluation:
    """What :func:`evaluate` returns: the per-pair table, sample maps per method, and views."""

    pairs: pd.DataFrame
    samples: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    image_size: int | None = None

    def table(self, column: str = "ssim") -> pd.DataFrame:
        """The COSE summary (:func:`cose.scoring.summarize`): one row per (method, dataset,
        model) with every metric and its row count. ``column``: ``ssim`` or ``spearman``."""
        return scoring.summarize(self.pairs, column)

    def intervals(self, bootstrap: int = 1000, level: float = 0.95, seed: int = 0,
                  column: str = "ssim") -> pd.DataFrame:
        """:meth:`table` with how sure each number is: ``<metric>_lo`` / ``<metric>_hi``, a
        bootstrap interval over the images (:mod:`cose.uncertainty`), ``n_images``, and the
        share of NaN pairs with its cause (``nan_share``, ``nan_cause``, ``nan_flag``)."""
        from cose import uncertainty

        return uncertainty.summarize(self.pairs, column, bootstrap=bootstrap, level=level,
                                     seed=seed)[0]

    def compare(self, bootstrap: int = 1000, level: float = 0.95, seed: int = 0) -> pd.DataFrame:
        """Every pair of methods on the images both explained: the COSE difference, its paired
        bootstrap interval, a p-value and whether the difference is significant."""
        from cose import uncertainty

        return uncertainty.compare_methods(self.pairs, bootstrap=bootstrap, level=level,
                                           seed=seed)

    def scores(self) -> pd.DataFrame:
        """Overall consistency, sensitivity and COSE per method (rows)."""
        from cose import report

        return report.method_scores(self.table())

    def plot(self, kind: str = "scores"):
        """A matplotlib figure: ``scores`` (bars of consistency, sensitivity and COSE per
        method), ``consistency`` (Fig. 5 distributions), ``magnitude`` (Fig. 6 curves) or
        ``samples`` (image, map and variant maps per method)."""
        from cose import report

        if kind == "scores":
            return report.plot_scores(self.table()).figure
        if kind == "consistency":
            return report.plot_consistency_distributions(self.pairs).figure
        if kind == "magnitude":
            return report.plot_magnitude(
                report.magnitude_curves(self.pairs, sizes=self.image_size)).figure
        if kind == "samples":
            return report.plot_samples(self.samples).figure
        raise ValueError(
            f"plot: unknown kind {kind!r}; allowed: scores, consistency, magnitude, samples")

    def save(self, out: str | Path, title: str = "COSE report") -> list[Path]:
        """Write ``pairs.parquet``, ``summary.csv``, ``cose_table.md`` and the report
        (``report.html``, ``cose_table.html``, ``figures/``) into ``out``."""
        from cose import report
        from cose.io import atomic_write_bytes

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        self.pairs.to_parquet(buf, index=False)
        atomic_write_bytes(out / "pairs.parquet", buf.getvalue())
        summary = self.table()
        paths = scoring.write_summary(summary, out)
        samples = {}
        if self.samples:
            first = self.pairs.iloc[0]
            samples = {(str(first["dataset"]), str(first["model"])): self.samples}
        versions = {k: v for k, v in report.versions().items()
                    if k in ("cose", "python", "torch", "platform")}
        written = report.write_report(out, summary, self.pairs, samples, versions=versions,
                                      sizes=self.image_size, title=title)
        return [out / "pairs.parquet", *paths.values(), *written]

    def __repr__(self) -> str:
        methods = ", ".join(pd.unique(self.pairs["saliency_method"])) if len(self.pairs) else ""
        return f"Evaluation({len(self.pairs)} pairs; methods: {methods})"


# --------------------------------------------------------------------------- arguments


def _normalizer(normalize: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    from cose import models
    from cose.data.image import PreprocessSpec

    if normalize is None:
        return lambda x: x
    if callable(normalize):
        return normalize
    if isinstance(normalize, PreprocessSpec):
        return lambda x: models.normalize(x, normalize)
    if isinstance(normalize, str):
        if normalize.lower() == "imagenet":
            spec = PreprocessSpec(resize=224, crop=224)
            return lambda x: models.normalize(x, spec)
        if normalize not in models.names():
            raise ValueError(
                f"normalize: unknown value {normalize!r}; allowed: a callable, None (images go "
                f"to the model as they are), 'imagenet', (mean, std), or a model name: "
                f"{', '.join(models.names())}")
        return lambda x, _n=normalize: models.normalize(x, _n)
    if isinstance(normalize, (tuple, list)) and len(normalize) == 2:
        mean, std = (torch.as_tensor(v, dtype=torch.float32).view(-1, 1, 1) for v in normalize)
        return lambda x: (x - mean.to(x)) / std.to(x)
    raise ValueError(
        f"normalize: {normalize!r} not allowed; use a callable, None, 'imagenet', (mean, std) "
        "or a model name")


def _methods(methods: str | Sequence[str]) -> list[str]:
    from cose import saliency

    if isinstance(methods, str):
        methods = list(saliency.METHODS) if methods == "all" else [methods]
    methods = list(dict.fromkeys(methods))
    allowed = saliency.registered()
    bad = [m for m in methods if m not in allowed]
    if bad or not methods:
        raise ValueError(f"methods: unknown value(s) {bad or methods!r}; allowed: "
                         f"{', '.join(allowed)} (or 'all')")
    return methods


def _transforms(transforms: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(transforms, str):
        transforms = [transforms]
    transforms = tuple(dict.fromkeys(transforms))
    bad = [t for t in transforms if t not in T.TRANSFORMS]
    if bad:
        raise ValueError(f"transforms: unknown value(s) {bad}; allowed: {', '.join(T.TRANSFORMS)}")
    return transforms


def _checkpoints(checkpoints: Mapping[str, nn.Module] | Sequence[nn.Module] | None
                 ) -> dict[str, nn.Module]:
    if checkpoints is None:
        return {}
    items = (checkpoints.items() if isinstance(checkpoints, Mapping)
             else ((f"{i}", m) for i, m in enumerate(checkpoints)))
    out = {}
    for key, module in items:
        tag = str(key).removeprefix("mid_ckpt_")
        if not _CKPT_TAG.match(tag):
            raise ValueError(f"checkpoints: name {key!r} must be letters and digits (e.g. "
                             "'e005'); it becomes the transform_type mid_ckpt_<name>")
        if not isinstance(module, nn.Module):
            raise ValueError(f"checkpoints[{key!r}]: expected a torch.nn.Module, got "
                             f"{type(module).__name__}")
        out[f"mid_ckpt_{tag}"] = module
    return out


def _layer_names(settings: dict[str, dict], model: nn.Module) -> dict[str, dict]:
    """A CAM ``layer`` given as a module of ``model`` becomes its dotted name, so the random
    model and the checkpoints use their own copy of that layer."""
    names = {id(m): n for n, m in model.named_modules() if n}
    out = {}
    for method, values in settings.items():
        values = dict(values)
        layer = values.get("layer")
        if isinstance(layer, nn.Module) and id(layer) in names:
            values["layer"] = names[id(layer)]
        out[method] = values
    return out


def _device(module: nn.Module) -> torch.device:
    p = next(iter(module.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _images_labels(images: Any, labels: Any, device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.as_tensor(images)
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"images: expected a float tensor [N,C,H,W] in [0,1], got "
                         f"{tuple(x.shape)} {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError("images: no images")
    if not torch.isfinite(x).all() or x.min() < -1e-6 or x.max() > 1 + 1e-6:
        raise ValueError(
            f"images: values must be finite and in [0,1] (COSE transforms act on the image "
            f"before normalisation), got min {float(x.min()):.3g} max {float(x.max()):.3g}; "
            "pass unnormalised images and normalize=... for the model's input")
    y = torch.as_tensor(labels)
    if y.ndim != 1 or len(y) != len(x) or y.is_floating_point() or y.is_complex():
        raise ValueError(f"labels: expected {len(x)} integer labels, got {tuple(y.shape)} "
                         f"{y.dtype}")
    return x.to(device=device, dtype=torch.float32).clamp(0, 1), y.to(device=device,
                                                                       dtype=torch.int64)


def _probe(model: nn.Module, x: torch.Tensor, norm, tag: str) -> int:
    """The model's class count from one forward pass on the first image; one-line errors for
    an input it does not take, an output that is not [B, C] logits, NaN or infinite logits."""
    probe = norm(x[:1])
    if tuple(probe.shape) != tuple(x[:1].shape):  # e.g. 3-channel statistics on 1 channel
        raise ValueError(f"images: {x.shape[1]} channel(s), but normalize turns an image "
                         f"{tuple(x.shape[1:])} into {tuple(probe.shape[1:])}: give the "
                         "images the channels the model and its normalisation expect")
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(probe)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0][:200]
        raise ValueError(f"{tag}: does not take images of shape {tuple(x.shape[1:])} "
                         f"(channels, height, width) after normalize ({first})") from None
    finally:
        model.train(was)
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 1:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{tag}: output {shape} for one image; expected logits [B, classes]")
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"{tag}: NaN or infinite logits on image 0 (a broken checkpoint, or "
                         "inputs outside what the model was trained on)")
    return int(out.shape[1])


def _progress(progress: bool | None) -> bool:
    if progress is not None:
        return bool(progress)
    from cose import runtime

    return not runtime.current().quiet


# --------------------------------------------------------------------------- evaluate


def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | Sequence[int],
    methods: str | Sequence[str] = DEFAULT_METHODS,
    transforms: str | Sequence[str] = T.TRANSFORMS,
    normalize: Any = "imagenet",
    random_model: nn.Module | None = None,
    checkpoints: Mapping[str, nn.Module] | Sequence[nn.Module] | None = None,
    magnitudes: int = 6,
    seed: int = 0,
    settings: Mapping[str, Mapping[str, Any]] | None = None,
    batch_size: int = 64,
    *,
    ids: Sequence[int] | None = None,
    chunk_size: int = 16,
    sample_maps: int = 2,
    dataset: str = "custom",
    model_name: str | None = None,
    progress: bool | None = None,
    precision: str = "auto",
    noise_floor: bool = True,
) -> Evaluation:
    """COSE of saliency ``methods`` on ``model`` for ``images`` (float ``[N,C,H,W]`` in [0,1],
    at the model's input size) with integer ``labels``.

    Each image is explained for the model's prediction, then every variant: each of
    ``transforms`` at ``magnitudes`` seeded magnitudes, ``random_model`` (same architecture,
    random init) and each of ``checkpoints`` (``{"e005": model_at_epoch_5, ...}`` or a list;
    they become ``mid_ckpt_<name>`` rows) on the image as is. ``normalize`` maps [0,1] images
    to the model's input: ``"imagenet"`` (default), a registry model name, ``(mean, std)``, a
    callable, or None. ``settings``: per-method saliency settings (``{"ig": {"steps": 50},
    "gradcam": {"layer": model.layer4}}``; a CAM method on a model outside the registry
    needs its ``layer``). ``seed`` fixes the magnitude draws and the stochastic methods;
    ``batch_size`` bounds images per model call, ``chunk_size`` images per work unit
    (memory). ``ids`` name the images (default 0..N-1; the draws depend on them, not on the
    chunking). ``progress``: a progress bar with ETA (default: on unless ``CI`` / quiet /
    stderr is not a terminal). ``precision``: of the saliency passes, ``"auto"`` (default: per
    method the fastest precision validated for it, else fp32), ``"fp32"``, ``"reference"``,
    ``"tf32"`` or ``"bf16"`` (:mod:`cose.precision`; predictions stay fp32). ``noise_floor``:
    for a stochastic method (SmoothGrad, LIME), add the ``seed`` variant, the same image and
    model explained with another seed (the method's self-consistency ceiling; as
    ``explain.noise_floor``). All models are put in eval mode during the run and restored.
    Returns an :class:`Evaluation`. The work runs through :mod:`cose.runner`, as the
    explain stage's does, so both give the same rows.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    method_list = _methods(methods)
    if note := P.warning(precision, method_list):
        warnings.warn(note, UserWarning, stacklevel=2)
    tf = _transforms(transforms)
    norm = _normalizer(normalize)
    ckpts = _checkpoints(checkpoints)
    if random_model is not None and not isinstance(random_model, nn.Module):
        raise ValueError(f"random_model: expected a torch.nn.Module or None, got "
                         f"{type(random_model).__name__}")
    for name, value, low in (("magnitudes", magnitudes, 1), ("batch_size", batch_size, 1),
                             ("chunk_size", chunk_size, 1), ("sample_maps", sample_maps, 0),
                             ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")
    settings = dict(settings or {})
    extra = [k for k in settings if k not in method_list]
    if extra:
        raise ValueError(f"settings: {extra} are not among the methods {method_list}")
    bad = [k for k, v in settings.items() if not isinstance(v, Mapping)]
    if bad:
        raise ValueError(f"settings: {bad[0]!r} needs a dict of settings, got "
                         f"{settings[bad[0]]!r}")
    settings = _layer_names(settings, model)
    dev = _device(model)
    for tag, other in ([("random_model", random_model)] if random_model is not None else []) + [
            (k, v) for k, v in ckpts.items()]:
        if _device(other) != dev:
            raise ValueError(f"{tag} is on {_device(other)}, the model on {dev}; move it "
                             "with .to(device)")
    x, y = _images_labels(images, labels, dev)
    n_classes = _probe(model, x, norm, "model")
    for tag, other in ([("random_model", random_model)] if random_model is not None else []) + [
            (k, v) for k, v in ckpts.items()]:
        if _probe(other, x, norm, tag) != n_classes:
            raise ValueError(f"{tag}: {_probe(other, x, norm, tag)} outputs, the model "
                             f"{n_classes}: they must classify the same classes")
    bad = (y < 0) | (y >= n_classes)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        raise ValueError(f"labels: {int(y[i])} (image {i}) outside 0..{n_classes - 1}: the "
                         f"model has {n_classes} outputs")
    n, size = len(x), int(x.shape[-1])
    ids = list(range(n)) if ids is None else [int(i) for i in ids]
    if len(ids) != n or len(set(ids)) != n:
        raise ValueError(f"ids: expected {n} distinct integers, got {len(ids)} "
                         f"({len(set(ids))} distinct)")

    modules = [model, random_model, *ckpts.values()]
    modes = [(m, m.training) for m in modules if m is not None]
    pair = Pair(model, x, y, ids, norm, random_model, ckpts, dataset,
                model_name or type(model).__name__)
    opts = Options(tf, magnitudes, seed, settings, batch_size, precision, noise_floor,
                   sample_maps)
    try:
        for m, _ in modes:
            m.eval()
        pairs, samples = explain_pair(pair, method_list, opts, chunk_size, _progress(progress))
    finally:
        for m, was_training in modes:
            m.train(was_training)
    pairs = pairs[list(scoring.PAIR_COLUMNS)]
    return Evaluation(pairs=pairs, samples=samples, image_size=size)


# --------------------------------------------------------------------------- folders


def load_folder(
    path: str | Path,
    spec: Any,
    split: str = "test",
    images: int | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, list[int], list[str]]:
    """Images of a folder as ``(images01 [N,3,H,W], labels, ids, classes)``, resized and
    centre-cropped per ``spec`` (a :class:`cose.data.PreprocessSpec`).

    ``path`` is a fetched dataset folder (``manifest.csv`` + ``classes.txt``; the ``split``
    rows) or an image folder: ``path/<split>/<class>/*`` (classes: the sorted class folders
    of all splits, as ``cose data fetch imagefolder`` numbers them) or ``path/<class>/*``
    (every image). ``images``: keep the first N of a seeded permutation (as the explain stage
    does); ``ids`` are the kept images' positions in the folder's order.
    """
    from cose.data import load_image, read_classes, read_rows
    from cose.data.sources import IMAGE_SUFFIXES
    from cose.selection import shared_subset

    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist")
    if (root / "manifest.csv").is_file():
        rows = read_rows(root)
        classes = read_classes(root)
        chosen = [r for r in rows if r["split"] == split]
        if not chosen:
            have = sorted({r["split"] for r in rows})
            raise ValueError(f"{root}: no images in split {split!r}; available: {', '.join(have)}")
        from cose.data import image_path

        files = [(image_path(root, r["path"]), int(r["label"])) for r in chosen]
    else:
        def listing(folder: Path) -> list[Path]:
            return sorted(p for p in folder.iterdir()
                          if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)

        from cose.data.sources import imagefolder_classes

        split_dirs = [d for d in ("train", "val", "test") if (root / d).is_dir()]
        if split_dirs and split not in split_dirs:
            raise ValueError(f"{root}: no {split!r} folder; available: {', '.join(split_dirs)}")
        # every split's class folders (an empty one or a link out of the folder: refused)
        classes = imagefolder_classes(root)
        base = root / split if split_dirs else root
        files = [(p, i) for i, c in enumerate(classes) if (base / c).is_dir()
                 for p in listing(base / c)]
    if not files:
        raise ValueError(f"{root}: no images found (a manifest.csv, DIR/<class>/* or "
                         f"DIR/<split>/<class>/* with {', '.join(IMAGE_SUFFIXES)})")
    order = list(range(len(files)))
    if images is not None:
        if isinstance(images, bool) or not isinstance(images, int) or images < 1:
            raise ValueError(f"images: expected an integer >= 1, got {images!r}")
        order = list(shared_subset(len(files), images, seed))
    x = torch.stack([load_image(files[i][0], spec) for i in order])
    y = torch.tensor([files[i][1] for i in order], dtype=torch.int64)
    return x, y, order, classes
