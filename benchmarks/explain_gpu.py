"""Explain-stage throughput on one device: our explain unit vs the reference call pattern.

    python benchmarks/explain_gpu.py --device cuda --models resnet50,vit_b16 --size 224 \
        --precision fp32,reference,bf16 --budget-s 450 --json $OUT/explain_gpu.json
    python benchmarks/explain_gpu.py --smoke --json /tmp/explain_gpu_smoke.json   # CPU, tiny

What it measures, per (model, method, precision), in one run (docs/gpu.md):

- ours: seconds per map of `cose.engine.explain_unit` on a unit of n images (--images: by
  default a full unit of the paper presets' shard_size, 50 images, for the CAMs and GuidedIG
  (GuidedIG at 8 of its 200 steps, each step the same batched call; its s/map scaled by 25
  for the projection), 16 for IG, SmoothGrad and BlurIG, 4 for LIME) with every variant the
  pipeline makes (13 transforms, 6 magnitudes, the random-init model, --checkpoints checkpoint
  models; about 60 maps per image), maps, predictions and SSIM/Spearman included; every model
  is built once, before the timing, and the unit is warmed up on a cut-down variant set first;
- reference: seconds per map of the reference call pattern, reusing benchmarks/saliency_speed.py
  (one image per call through pytorch-grad-cam / PAIR saliency / lime at the reference
  settings, numpy round trips) plus the batch-1 prediction of the variant and the reference's
  skimage SSIM + scipy Spearman against the image's first map (benchmarks/similarity_speed.py).
  Always fp32 with PyTorch's default flags (what the reference ran), on its own copy of the
  model (pytorch-grad-cam leaves hooks on the layer it watches; they are released after each
  CAM method). PIL transforms and the reference's per-image checkpoint reloads are not timed;
- limits: forward+backward to the input and forward-only img/s at --limit-batch
  (saliency_speed.measure_limits), per precision, NCHW and, for conv nets, channels_last (the
  faster counts); % of limit = model passes per map x maps/s over the limit (LIME: forward
  limit; with its segmentation added to the limit time as well); forward+backward also at
  batches 16, 50, 64 and 256 (CURVE_BATCHES: what stacking the model variants, or a
  larger saliency batch, could gain);
- model variants (--streams, COSE_STREAMS: auto, or N): every unit maps its model variants
  (random-init model, checkpoints) that many at a time, each on its own CUDA stream (the row's
  "variant_workers"); the fp32 unit's model variants are also timed alone (no transforms),
  one at a time and then at once, with whether the records are identical
  (the row's "model_variants"; --variants: by default for the CAMs and GuidedIG, which call
  each model variant with one row per image);
- in passes: the share of a gradient method's unit time spent inside its model passes
  (pass_timer: CUDA events around every prob_grad call); the rest is the method's own work
  (GuidedIG's inner loop, IG's path inputs), predictions, transforms and similarity;
- precisions: cose.precision, as explain.precision runs them: fp32 (TF32 off for matmul and
  cuDNN), reference (PyTorch's defaults: cuDNN TF32 on, matmul off), tf32 (both on), bf16 (torch.autocast around the model forward through a wrapper
  that returns float32 logits; the wrapper sits around the conv+BN-folded copy for the
  non-CAM methods; at reference/tf32/bf16 on CUDA that copy of a conv net runs in
  channels_last: cose.precision.layout, the row's "layout"); class predictions are fp32 at
  every precision. Each non-fp32 precision is
  compared with the fp32 run of the same images by what COSE reports
  (cose.scoring.agreement: |delta COSE|, |delta consistency|, |delta sensitivity| <= 0.005,
  class flips <= 0.1% of pairs, the per-pair SSIM difference p50/p99), with the per-map
  Pearson as information; a precision that agrees on every model is a
  `cose.precision.VALIDATED` candidate, and the projection at "auto" uses, per method, the
  fastest candidate (else fp32).

The budget (--budget-s): items are (method, model) pairs, every precision of a pair measured
on the same full unit of images. Each is predicted from the measured limits (and, as the run
goes, from what the finished items took); an item runs in full when its prediction fits what
is left and is skipped (said so in the table and the JSON) when it does not, so a short
budget measures fewer items at the stated unit size, never every item at one image. Items
run cheapest method first, the models interleaved.
It also projects the paper grid's GPU-hours (60 maps per image; 500 images for GradCAM,
GradCAM++ and IG, 50 for the others; per (dataset, model) and for 13 models x 5 datasets).

--smoke: CPU, demo_resnet at 32 px, 2 images per method, 2 checkpoints, reduced steps for ours (the
reference keeps its own settings, so its speedups mean nothing there), fp32 and bf16 (CPU
autocast): it exercises every code path in well under a minute. Its numbers are not results.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import importlib
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cose import models as M
from cose import precision as P
from cose import runtime, saliency, scoring, spec
from cose import transforms as T
from cose.engine import UnitResult, explain_unit, predict, variant_workers
from cose.saliency import _core

HERE = Path(__file__).resolve().parent


def _sibling(name: str):
    """A module of this folder (the reference call pattern lives in saliency_speed.py)."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    return importlib.import_module(name)


SP = _sibling("saliency_speed")  # Reference, measure_limits, make_images, PASSES, sync
SIM = _sibling("similarity_speed")  # reference_pair: skimage SSIM + scipy Spearman

SCHEMA = "cose.explain_gpu/1"
METHODS = saliency.METHODS
CAM_METHODS = tuple(m for m in spec.BUILTIN_METHODS if spec.method(m).kind == "cam")
PRECISIONS = P.PRECISIONS
MEAN = torch.tensor(SP.MEAN).view(1, 3, 1, 1)
STD = torch.tensor(SP.STD).view(1, 3, 1, 1)

# the paper's grid (BENCHMARKS.md): maps per image, models x datasets; images per method as the
# paper presets run them (explain.images, explain.images_by_method: the same in all five)
PAPER_MAPS_PER_IMAGE = 60
PAPER_PRESET = Path(__file__).resolve().parent.parent / "params" / "paper" / "cub200.yaml"
PAPER_MODELS, PAPER_DATASETS = 13, 5
TARGET_H_PER_DATASET_MODEL, TARGET_H_GRID = 0.5, 24.0  # BENCHMARKS.md: 30 min; one GPU-day

SMOKE_SETTINGS = {
    "ig": {"steps": 3},
    "smoothgrad": {"samples": 3},
    "blur_ig": {"steps": 3},
    "guided_ig": {"steps": 3},
    "lime": {"samples": 16},
}
WARM_SETTINGS = {
    "ig": {"steps": 2},
    "smoothgrad": {"samples": 2},
    "blur_ig": {"steps": 2},
    "guided_ig": {"steps": 2},
    "lime": {"samples": 10},
}
# reference calls per map: (model calls, inputs per call), at the reference's settings
REF_CALLS = {
    "gradcam": (1, 1),
    "gradcampp": (1, 1),
    "ig": (2, 13),
    "smoothgrad": (50, 1),
    "blur_ig": (5, 20),
    "guided_ig": (200, 1),
    "lime": (100, 10),
}
# reference inputs after the originals: one variant each, cycled (content barely matters)
REF_VARIANTS = (("Rotate", 45.0), ("Brightness", 0.5), ("FlipLR", 0.0), ("Blur", 0.0))
# fraction of the limit assumed before anything is measured (GuidedIG measured 22-33% of it on
# an H200, the others 60-86%: docs/gpu.md)
EFFICIENCY_PRIOR = {"guided_ig": 0.2}
EFFICIENCY_PRIOR_OTHER = 0.4
#: images of a measured unit, per method: a full unit of the paper presets' shard_size for the
#: CAMs, never fewer than 16 for the gradient methods, a stated fraction (4 of 50) for LIME,
#: which costs 1000 forward passes per map (on an H200 at fp32 a 4-image unit of ViT-B/16 is
#: about 5 minutes)
UNIT_IMAGES = {"gradcam": 50, "gradcampp": 50, "ig": 16, "smoothgrad": 16, "blur_ig": 16,
               "guided_ig": 50, "lime": 4}
#: GuidedIG is measured on a full unit (50 images) with 8 of its 200 steps: every step is the
#: same batched gradient call (50 images x 48 transform variants in unit batches, then 50 images
#: per model variant, as in the pipeline), so the per-pass rate is that of the full path at a
#: 25th of the cost; its s/map is scaled by 200 / 8 for the projection (--full-steps: the
#: paper's 200). With few steps each step moves further and needs more inner iterations (2.9
#: per step at 8 or 20 steps, 1.8 at 200, counted on a ResNet-18), so the scaled figure errs
#: high. LIME keeps its 1000 samples: 4 images already make calls of thousands of perturbations.
BENCH_SETTINGS = {"guided_ig": {"steps": 8}}
#: batches at which forward+backward throughput is also measured (beside --limit-batch): the
#: model variants of a paper unit run 50 images per call, so limit(50) / limit(128) bounds
#: what running them together (stacked models) could gain; the gradient methods' passes take
#: 64 inputs on a GPU (saliency.auto_batch_size), so limit(64) against limit(256) says whether
#: a larger default would pay
CURVE_BATCHES = (16, 50, 64, 256)
MIN_CHEAP_IMAGES = 16
#: the methods whose model variants are also timed alone (--variants): those that call a model
#: variant with one row per image (the CAMs once, GuidedIG per step), where 50-row calls leave
#: an H200 room; the others already put 25-1000 inputs per image into each call
VARIANT_METHODS = CAM_METHODS + ("guided_ig",)
EXPENSIVE = ("guided_ig", "lime")


def images_per_method(text: str, methods: list[str], smoke: bool = False) -> dict[str, int]:
    """--images: "auto" (UNIT_IMAGES), one count for every method, or "method=n,..." over
    auto. A cheap method below MIN_CHEAP_IMAGES is refused (its unit would measure overhead,
    not throughput)."""
    out = {m: UNIT_IMAGES.get(m, MIN_CHEAP_IMAGES) for m in methods}
    text = text.strip()
    if text.isdigit():
        out = {m: int(text) for m in methods}
    elif text != "auto":
        for part in filter(None, text.split(",")):
            name, _, n = part.partition("=")
            if name not in out or not n.isdigit():
                raise SystemExit(f"--images: expected auto, N or method=N,...; got {part!r}")
            out[name] = int(n)
    low = [f"{m}={n}" for m, n in out.items() if n < 1 or (
        n < MIN_CHEAP_IMAGES and m not in EXPENSIVE and not smoke)]
    if low:
        raise SystemExit(f"--images: {', '.join(low)}: cheap methods need at least "
                         f"{MIN_CHEAP_IMAGES} images per unit (GuidedIG and LIME at least 1)")
    return out


def plan_items(costs: list[float], remaining: float, margin: float = 1.1) -> list[bool]:
    """Which items run, in order, when each runs in full or not at all: an item runs when
    its predicted cost (times `margin`) fits what is left after the earlier ones that run."""
    out = []
    for c in costs:
        ok = c * margin <= remaining
        out.append(ok)
        remaining -= c if ok else 0.0
    return out


# ----------------------------------------------------------------------------- models


@dataclass
class Bundle:
    """Every model one explain unit uses, loaded once."""

    name: str
    model: nn.Module
    random: nn.Module
    checkpoints: dict[str, nn.Module]
    reference_model: nn.Module
    build_s: float = 0.0

    def all(self) -> list[nn.Module]:
        return [self.model, self.random, *self.checkpoints.values()]


def build_bundle(name: str, device: torch.device, n_ckpt: int) -> Bundle:
    """The model (seed 0), the random-init model (seed 1) and `n_ckpt` checkpoint models,
    random init with the reference's 10-class MLP head. Checkpoints are copies of the model
    with every weight perturbed by 5% of its tensor's std (building each from scratch costs
    seconds per ViT; the explain cost does not depend on the weights)."""
    t0 = time.perf_counter()
    model = M.create(name, 10, seed=0, head="mlp").to(device).eval()
    rand = M.create(name, 10, seed=1, head="mlp").to(device).eval()
    ckpts = {}
    g = torch.Generator(device="cpu")
    for k in range(n_ckpt):
        c = copy.deepcopy(model)
        g.manual_seed(100 + k)
        with torch.no_grad():
            for p in c.parameters():
                if p.numel() > 1 and p.is_floating_point():
                    noise = torch.randn(p.shape, generator=g).to(p.device, p.dtype)
                    p.add_(noise * (0.05 * float(p.float().std())))
        ckpts[f"mid_ckpt_e{2 * k + 1:03d}"] = c.eval()
    ref = copy.deepcopy(model).eval()
    return Bundle(name, model, rand, ckpts, ref, time.perf_counter() - t0)


# ----------------------------------------------------------------------------- measuring


def passes_per_map(method: str, settings: dict) -> int:
    """Model passes per map at `settings` (saliency_speed.PASSES at the reference's)."""
    s = {**saliency.defaults(method), **settings}
    if method in CAM_METHODS:
        return 1
    if method == "ig":
        return s["steps"]
    if method == "smoothgrad":
        return s["samples"]
    if method == "blur_ig":
        return max(1, s["steps"] - 1)  # step 0's blur derivative is 0: no model call
    if method == "guided_ig":
        return s["steps"]
    return s["samples"]  # lime


def maps_per_image(transforms: tuple[str, ...], magnitudes: int, n_ckpt: int) -> int:
    signed = sum(1 for t in transforms if t in T.SIGNED)
    return 1 + signed * magnitudes + (len(transforms) - signed) + 1 + n_ckpt


def limits_for(bundle: Bundle, precision: str, size: int, device, batch: int, iters: int,
               curve: tuple[int, ...] = CURVE_BATCHES):
    """Forward+backward and forward-only img/s at `precision`; channels_last too for convnets;
    and forward+backward img/s of the model as built at each batch of `curve` (and `batch`)."""
    out = {}
    variants = [("nchw", bundle.model)]
    if device.type == "cuda" and _core.conv_net(bundle.model):
        variants.append(("channels_last", copy.deepcopy(bundle.model).to(
            memory_format=torch.channels_last)))
    by_batch: dict[str, float] = {}
    with P.flags(precision):
        for fmt, m in variants:
            run = P.Autocast(m, device.type).eval() if precision == "bf16" else m
            SP.measure_limits(run, size, device, batch, 1)  # warm-up: its one call is not enough
            res = SP.measure_limits(run, size, device, batch, iters)
            out[fmt] = {k: round(v, 2) for k, v in res.items()}
            if fmt == "nchw":
                by_batch[str(batch)] = out[fmt]["fwd_bwd_img_s"]
                for b in (b for b in curve if b != batch):
                    try:
                        SP.measure_limits(run, size, device, b, 1)
                        by_batch[str(b)] = round(
                            SP.measure_limits(run, size, device, b, iters)["fwd_bwd_img_s"], 2)
                    except torch.OutOfMemoryError:  # a large model at batch 256
                        by_batch[str(b)] = None
                        torch.cuda.empty_cache()
    best = {k: max(v[k] for v in out.values()) for k in ("fwd_bwd_img_s", "fwd_img_s")}
    del variants
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"model": bundle.name, "precision": precision, "batch": batch, **best, "formats": out,
            "fwd_bwd_img_s_by_batch": dict(sorted(by_batch.items(), key=lambda kv: int(kv[0])))}


@contextlib.contextmanager
def pass_timer(device: torch.device):
    """Seconds spent inside the gradient methods' model passes (every call of
    ``cose.saliency._core.prob_grad``: IG, SmoothGrad, BlurIG, GuidedIG) while the block runs,
    in ``box["s"]`` after it; the rest of a unit's time is the methods' own work (paths,
    GuidedIG's inner loop), predictions, transforms and similarity. On CUDA each call is
    bracketed by events, so nothing waits for the device that would not wait anyway. Passes of
    model variants running at once (on their own streams, from their own threads) overlap:
    the union of the spans counts, so the share stays a share of the wall time."""
    spans: list = []
    box: dict[str, float] = {}
    plain = _core.prob_grad
    cuda = device.type == "cuda"
    if cuda:
        origin = torch.cuda.Event(enable_timing=True)
        origin.record()
    t_origin = time.perf_counter()

    def timed(*args, **kwargs):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = plain(*args, **kwargs)
            end.record()
            spans.append((start, end))
        else:
            t0 = time.perf_counter()
            out = plain(*args, **kwargs)
            spans.append((t0 - t_origin, time.perf_counter() - t_origin))
        return out

    _core.prob_grad = timed
    try:
        yield box
    finally:
        _core.prob_grad = plain
        SP.sync(device)
        if cuda:
            spans = [(origin.elapsed_time(a) / 1000, origin.elapsed_time(b) / 1000)
                     for a, b in spans]
        box["s"] = union_length(spans)


def union_length(spans: list[tuple[float, float]]) -> float:
    """The length of the union of the (start, end) intervals."""
    total, reach = 0.0, -math.inf
    for a, b in sorted(spans):
        if b > reach:
            total += b - max(a, reach)
            reach = b
    return total


def batch1_latency(model: nn.Module, size: int, device, iters: int = 3) -> float:
    """Seconds of one batch-1 forward+backward to the input (predicts the reference)."""
    x = torch.randn(1, 3, size, size, device=device)

    def once():
        xi = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(model(xi)[:, 0].sum(), xi)
        return g

    with P.flags("reference"):
        once()
        SP.sync(device)
        t = time.perf_counter()
        for _ in range(iters):
            once()
        SP.sync(device)
    return (time.perf_counter() - t) / iters


def segmentation_seconds(size: int) -> float:
    """Seconds of one lime quickshift segmentation of a `size` px image (CPU; median of 3)."""
    from cose.saliency.lime import segment

    img = SP.make_images(1, size, seed=3)[0].permute(1, 2, 0).numpy()  # float32, as LIME's
    segment(img, 0)
    times = []
    for k in range(3):
        t = time.perf_counter()
        segment(img, 1 + k)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson of two maps; 1 where both are the same constant, 0 where one is constant."""
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    sa, sb = a.std(), b.std()
    if sa == 0 or sb == 0:
        return 1.0 if (sa == 0 and sb == 0 and np.allclose(a, b)) else 0.0
    return float(np.corrcoef(a, b)[0, 1])


def compare_units(a: UnitResult, b: UnitResult) -> dict:
    """Maps and per-pair similarities of unit `b` against unit `a` (same images, settings and
    variants; both run with keep_samples covering the images compared). Maps are compared
    where the explained class agrees, pairs where both the original and the variant class do."""
    sa, sb = a.samples, b.samples
    if not sa or not sb:
        raise ValueError("compare_units: both units need keep_samples > 0")
    k = min(len(sa["pred"]), len(sb["pred"]))
    if list(sa["variant_names"]) != list(sb["variant_names"]):
        raise ValueError("compare_units: the units' variants differ")
    maps_a = np.concatenate([sa["map"][None, :k], sa["variant_maps"][:, :k]])
    maps_b = np.concatenate([sb["map"][None, :k], sb["variant_maps"][:, :k]])
    pred_a = np.concatenate([sa["pred"][None, :k], sa["variant_pred"][:, :k]])
    pred_b = np.concatenate([sb["pred"][None, :k], sb["variant_pred"][:, :k]])
    agree = pred_a == pred_b
    rs = [pearson(maps_a[v, i], maps_b[v, i]) for v, i in zip(*np.nonzero(agree))]

    pa, pb = a.pairs, b.pairs
    keys = ["test_idx", "transform_type", "transform_magnitude"]
    if len(pa) != len(pb) or not pa[keys].equals(pb[keys]):
        raise ValueError("compare_units: the units' pair records differ in order or content")
    sel = pa["test_idx"].isin(list(sa["test_idx"][:k])).to_numpy()
    same = sel & (pa["pred_class"].to_numpy() == pb["pred_class"].to_numpy()) & (
        pa["t_pred_class"].to_numpy() == pb["t_pred_class"].to_numpy()
    )

    def maxdiff(col: str) -> tuple[float, int]:
        """Largest |a - b| where both are finite; how many pairs are NaN on one side only."""
        x, y = pa[col].to_numpy()[same], pb[col].to_numpy()[same]
        both = np.isfinite(x) & np.isfinite(y)
        one = int((np.isfinite(x) != np.isfinite(y)).sum())
        return (float(np.abs(x[both] - y[both]).max()) if both.any() else 0.0), one

    ssim_d, ssim_nan = maxdiff("ssim")
    sp_d, sp_nan = maxdiff("spearman")
    # what a user reads: COSE, consistency and sensitivity of these images, each side scored
    # as compile scores it (cose.scoring.agreement; the per-map Pearson is information)
    ag = scoring.agreement(pa, pb)

    return {
        "maps": int(agree.size),
        "maps_compared": len(rs),
        "maps_class_flips": int((~agree).sum()),
        "pearson_min": round(min(rs), 5) if rs else None,
        "pearson_p05": round(float(np.percentile(rs, 5)), 5) if rs else None,
        "pearson_mean": round(float(np.mean(rs)), 5) if rs else None,
        "pearson_frac_ge_0_99": round(float(np.mean(np.asarray(rs) >= 0.99)), 4) if rs else None,
        "pairs": int(sel.sum()),
        "pairs_compared": int(same.sum()),
        "ssim_max_abs_diff": ssim_d,
        "ssim_nan_on_one_side": ssim_nan,
        "spearman_max_abs_diff": sp_d,
        "spearman_nan_on_one_side": sp_nan,
        # agreement on no scored pair (every original misclassified) is no evidence
        "cose_agrees": ag["ok"] and sum(c["n_pairs_scored"] for c in ag["cells"]) > 0,
        "pairs_scored": sum(c["n_pairs_scored"] for c in ag["cells"]),
        "delta_cose": ag["max_abs_delta"]["cose"],
        "delta_consistency": ag["max_abs_delta"]["overall_consistency"],
        "delta_sensitivity": ag["max_abs_delta"]["sensitivity"],
        "class_flip_fraction": ag["flip_fraction"],
        "ssim_diff_p50": ag["ssim_diff_p50"],
        "ssim_diff_p99": ag["ssim_diff_p99"],
        "cose_fp32": ag["cells"][0]["cose"] if ag["cells"] else None,
        "cose_other": ag["cells"][0]["cose_other"] if ag["cells"] else None,
    }


def measure_variants(b: Bundle, images01: torch.Tensor, labels: torch.Tensor, n: int,
                     method: str, norm, settings: dict, unit_batch: int, streams,
                     device: torch.device) -> dict:
    """A unit's model variants alone (no transforms: the originals, the random-init model,
    every checkpoint) at fp32, mapped one at a time and then ``streams`` at once
    (``explain_unit(streams=...)``): their seconds, the speedup, and whether the records are
    the same (exactly, and the largest per-pair SSIM difference)."""
    kw = dict(transforms=(), random_model=b.random, checkpoints=b.checkpoints, seed=0,
              precision="fp32", settings=settings, batch_size=unit_batch, keep_samples=n)
    out: dict = {"images": n, "models": 1 + len(b.checkpoints)}
    res = {}
    for label, s in (("one_at_a_time", 1), ("at_once", streams)):
        if device.type == "cuda":  # the auto sizing reads this unit's peak, not the limits'
            torch.cuda.reset_peak_memory_stats(device)
        SP.sync(device)
        t0 = time.perf_counter()
        res[label] = explain_unit(b.model, images01[:n], labels[:n], list(range(n)), method,
                                  norm, streams=s, **kw)
        SP.sync(device)
        out[f"{label}_s"] = round(time.perf_counter() - t0, 4)
        if label == "one_at_a_time":  # as the next unit sizes it: the same peak, the same held
            out["workers"] = variant_workers(streams, device, out["models"])
    a, b2 = res["one_at_a_time"], res["at_once"]
    out["speedup"] = out["one_at_a_time_s"] / max(out["at_once_s"], 1e-9)
    out["identical"] = bool(a.pairs.equals(b2.pairs) and all(
        np.array_equal(a.samples[k], b2.samples[k]) for k in a.samples))
    out["ssim_max_abs_diff"] = compare_units(a, b2)["ssim_max_abs_diff"]
    return out


def reference_inputs(images01: torch.Tensor, count: int, normalize) -> torch.Tensor:
    """`count` model inputs: the originals first, then variants of them (REF_VARIANTS)."""
    n, size = images01.shape[0], images01.shape[-1]
    rows = []
    for j in range(count):
        i, r = j % n, j // n
        x = images01[i : i + 1]
        if r:
            name, mag = REF_VARIANTS[(r - 1) % len(REF_VARIANTS)]
            if name in ("TranslateX", "TranslateY"):
                mag = mag * size / T.REFERENCE_SIZE
            x = T.apply(name, x, torch.tensor([mag], device=x.device))
        rows.append(normalize(x))
    return torch.cat(rows)


def reference_warmup(bundle: Bundle, images01: torch.Tensor, device) -> bool:
    """One cheap call of each reference library on the reference model (imports, CAM hooks,
    first kernels), as saliency_speed.py warms up; False where a library is missing."""
    try:
        import lime.lime_image
        import pytorch_grad_cam  # noqa: F401
        import saliency.core  # noqa: F401
    except ImportError:
        return False
    # lime draws a tqdm bar over its 1000 samples on every map: off (output noise; the
    # reference only gets faster for it)
    lime.lime_image.tqdm = lambda rows, *a, **k: rows
    layer, reshape = M.cam_layer(bundle.reference_model)
    ref = SP.Reference(bundle.reference_model, device, layer, reshape)
    x = M.normalize(images01[:1], bundle.name)
    with P.flags("reference"):
        ref.run("gradcam", x[0], 0)
        ref.release()
        ref._call_model_function(x.permute(0, 2, 3, 1).cpu().numpy(), {"target": 0})
        SP.sync(device)
    a = np.random.default_rng(0).random((images01.shape[-1],) * 2).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        SIM.reference_pair(a, a[::-1].copy(), None)
    return True


def measure_reference(ref, method: str, xs: torch.Tensor, max_maps: int, share_s: float,
                      deadline: float, guess_s: float, device) -> dict:
    """Reference s/map over up to `max_maps` inputs, stopping when `share_s` is spent (always
    one map unless the deadline is too close)."""
    per_map, map_only = [], []
    first: dict[int, np.ndarray] = {}
    t_start = time.perf_counter()
    est = guess_s
    n_img = max(1, min(xs.shape[0], max_maps))
    with P.flags("reference"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for j in range(max_maps):
            now = time.perf_counter()
            if j and (now - t_start + est > share_s or now + est > deadline):
                break
            if not j and now + est > deadline:
                break
            x = xs[j % xs.shape[0]]
            SP.sync(device)
            t0 = time.perf_counter()
            with torch.no_grad():  # the reference predicts every variant, batch 1
                target = int(ref.model(x[None]).argmax(1))
            m = np.asarray(ref.run(method, x, target), dtype=np.float32)
            SP.sync(device)
            t1 = time.perf_counter()
            a = first.setdefault(j % n_img, m)
            SIM.reference_pair(a, m, None)
            t2 = time.perf_counter()
            per_map.append(t2 - t0)
            map_only.append(t1 - t0)
            est = statistics.median(per_map)
    if method in CAM_METHODS:
        ref.release()
    if not per_map:
        return {"maps": 0}
    return {
        "maps": len(per_map),
        "s_per_map": statistics.median(per_map),
        "map_only_s_per_map": statistics.median(map_only),
    }


# ----------------------------------------------------------------------------- main


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--models", default="resnet50,vit_b16", help="cose model names, comma list")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--images", default="auto",
                    help="images per unit: auto (50 CAMs and GuidedIG, 16 IG/SmoothGrad/BlurIG, "
                         "4 LIME), N, or method=N,... (gradient methods but GuidedIG at least "
                         "16)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--precision", default="fp32", help="comma list of fp32, tf32, bf16")
    ap.add_argument("--checkpoints", type=int, default=10, help="checkpoint models per unit")
    ap.add_argument("--magnitudes", type=int, default=T.DEFAULT_COUNT)
    ap.add_argument("--unit-batch", type=int, default=256,
                    help="explain_unit batch_size (the pipeline's explain.batch_size)")
    ap.add_argument("--saliency-batch", type=int, default=None,
                    help="saliency batch_size setting (default: auto by device)")
    ap.add_argument("--ref-maps", type=int, default=8, help="at most this many reference maps")
    ap.add_argument("--ref-methods", default=None,
                    help="methods whose reference is measured, comma list, or none "
                         "(default: all)")
    ap.add_argument("--limit-batch", type=int, default=128)
    ap.add_argument("--limit-iters", type=int, default=10)
    ap.add_argument("--budget-s", type=float, default=360.0, help="wall-clock budget, seconds")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--streams", default="auto",
                    help="model variants mapped at once (COSE_STREAMS): auto or N; every "
                         "unit runs so, and each item's fp32 unit's model variants are also "
                         "timed alone, one at a time and so")
    ap.add_argument("--variants", default=",".join(VARIANT_METHODS),
                    help="methods whose fp32 unit's model variants are also timed alone, one "
                         "at a time and --streams at once: comma list, all, or none")
    ap.add_argument("--full-steps", action="store_true",
                    help="GuidedIG at its 200 steps (default: 8, scaled for the projection)")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU, demo_resnet at 32 px, 2 images, reduced steps: a functional check")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        args.device, args.models, args.size, args.images = "cpu", "demo_resnet", 32, "2"
        args.checkpoints, args.magnitudes, args.ref_maps = 2, 2, 2
        args.streams = "2" if args.streams == "auto" else args.streams  # auto is 1 on a CPU
        args.variants = "all"
        args.limit_batch, args.limit_iters = 8, 2
        # one thread: on a shared CPU, OpenMP barriers stall for seconds under load
        args.threads = args.threads or 1
        if args.precision == "fp32":
            args.precision = "fp32,bf16"
        # a loose allocator budget, so that every method runs on a busy CPU; the run itself
        # takes seconds
        args.budget_s = min(args.budget_s, 150.0)
    args.variants = (set(METHODS) if args.variants == "all" else set() if args.variants == "none"
                     else set(filter(None, args.variants.split(","))))
    if args.variants - set(METHODS):
        raise SystemExit(f"--variants: unknown {', '.join(sorted(args.variants - set(METHODS)))}"
                         f"; allowed: {', '.join(METHODS)}, all, none")
    try:  # COSE_STREAMS's own parser: auto or an integer >= 1
        args.streams = runtime.SETTINGS["COSE_STREAMS"].parse(args.streams)
    except ValueError:
        raise SystemExit(f"--streams: expected auto or an integer >= 1, got {args.streams!r}"
                         ) from None
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    t_start = time.perf_counter()
    deadline = t_start + args.budget_s
    device, methods = SP.device_and_methods(args)
    model_names = [m for m in args.models.split(",") if m]
    precisions = [p for p in args.precision.split(",") if p]
    for p in precisions:
        if p not in PRECISIONS:
            raise SystemExit(f"--precision: unknown {p!r}; allowed: {', '.join(PRECISIONS)}")
    if "fp32" in precisions:  # fp32 first: the other precisions are compared with it
        precisions = ["fp32"] + [p for p in precisions if p != "fp32"]
    for name in model_names:
        try:
            M.get(name)
        except ValueError as e:
            raise SystemExit(f"--models: {e}") from None
    methods.sort(key=METHODS.index)
    ref_methods = (set() if args.ref_methods == "none" else set(args.ref_methods.split(","))
                   if args.ref_methods else set(METHODS))
    settings_base = {"batch_size": args.saliency_batch} if args.saliency_batch else {}
    reduced = {} if args.full_steps else BENCH_SETTINGS
    settings = {
        m: {**(SMOKE_SETTINGS.get(m, {}) if args.smoke else reduced.get(m, {})),
            **settings_base} for m in methods
    }
    sal_batch = args.saliency_batch or saliency.auto_batch_size("ig", device.type)
    images_for = images_per_method(args.images, methods, args.smoke)
    n_max = max(images_for.values())
    transforms = T.TRANSFORMS
    mpi = maps_per_image(transforms, args.magnitudes, args.checkpoints)
    notes: list[str] = [
        "ours: cose.engine.explain_unit over n images x every variant (maps, predictions, "
        "inverse transforms, SSIM/Spearman) after a warm-up on a cut-down variant set",
        "reference: saliency_speed.Reference (one image per call, reference settings) + a "
        "batch-1 prediction + skimage SSIM / scipy Spearman per map, fp32 with PyTorch's default "
        "TF32 flags; PIL transforms and per-image checkpoint reloads not timed",
        "checkpoints: copies of the random-init model with weights perturbed by 5% of each "
        "tensor's std, built once before the timing",
    ]
    if "bf16" in precisions:
        notes.append("bf16: explain_unit(precision='bf16'): torch.autocast wrapper around the "
                     "model (conv+BN-folded copy for the non-CAM methods), float32 logits; "
                     "predictions fp32")
    if args.smoke:
        notes.append("SMOKE: tiny model, CPU, reduced steps for ours only; not a result")

    # ---- setup: models, images, limits
    print(f"setup: device {device}, models {model_names}, methods {methods}, "
          f"precisions {precisions}, budget {args.budget_s:.0f} s", flush=True)
    images01 = (SP.make_images(n_max, args.size) * STD + MEAN).clamp(0, 1).to(device)
    labels_of: dict[str, torch.Tensor] = {}
    bundles: dict[str, Bundle] = {}
    limits: dict[tuple[str, str], dict] = {}
    lat1: dict[str, float] = {}
    for name in model_names:
        b = build_bundle(name, device, args.checkpoints)
        try:
            with torch.no_grad():
                b.model(M.normalize(images01[:1], name))
        except Exception as e:  # wrong size for a ViT, ...
            raise SystemExit(f"{name} at {args.size} px: {e}") from None
        bundles[name] = b
        with torch.no_grad(), P.flags("fp32"):  # its own predictions: every pair is scored
            labels_of[name] = predict(b.model, M.normalize(images01, name), args.limit_batch)
        for p in precisions:
            limits[(name, p)] = limits_for(b, p, args.size, device, args.limit_batch,
                                           args.limit_iters)
            lm = limits[(name, p)]
            print(f"  {name} {p}: fwd+bwd {lm['fwd_bwd_img_s']:.1f} img/s, "
                  f"fwd {lm['fwd_img_s']:.1f} img/s @ batch {args.limit_batch}", flush=True)
        lat1[name] = batch1_latency(b.model, args.size, device)
        with P.flags("fp32"):  # first use of every transform and similarity kernel
            explain_unit(b.model, images01[:1], labels_of[name][:1], [0], "gradcam",
                         functools.partial(M.normalize, name_or_spec=name), magnitudes=1,
                         random_model=b.random, batch_size=args.unit_batch)
            SP.sync(device)
        if not reference_warmup(b, images01, device):
            notes.append("reference libraries missing (pytorch-grad-cam, saliency, lime): "
                         "reference not measured")
    seg_s = segmentation_seconds(args.size) if "lime" in methods else 0.0
    threads = torch.get_num_threads()
    print(f"  setup {time.perf_counter() - t_start:.1f} s (models "
          f"{sum(b.build_s for b in bundles.values()):.1f} s); quickshift {seg_s:.3f} s/image; "
          f"{threads} torch threads", flush=True)

    def pred_ours_img(method: str, name: str, prec: str) -> float:
        lm = limits[(name, prec)]
        passes = passes_per_map(method, settings[method])
        eff = EFFICIENCY_PRIOR.get(method, EFFICIENCY_PRIOR_OTHER)
        if method == "lime":
            per = passes / (lm["fwd_img_s"] * eff) + seg_s / threads
        else:
            per = passes / (lm["fwd_bwd_img_s"] * eff)
        return mpi * (per + 1.0 / lm["fwd_img_s"])

    def pred_ref_map(method: str, name: str) -> float:
        calls, per_call = REF_CALLS[method]
        lm = limits[(name, precisions[0])]
        t = calls * (max(lat1[name], per_call / lm["fwd_bwd_img_s"]) + 0.002)
        return t + (seg_s if method == "lime" else 0.0)

    # measured / predicted time, per (model, precision) for ours, per model for the reference
    ratios_ours: dict[tuple[str, str], list[float]] = {}
    ratios_ref: dict[str, list[float]] = {}

    def corr(r: list[float] | None) -> float:
        return statistics.median(r) if r else 1.0

    def c_ours(name: str, prec: str) -> float:
        own = ratios_ours.get((name, prec))
        if own:
            return corr(own)
        return corr([v for (n2, _), vs in ratios_ours.items() if n2 == name for v in vs])

    def ours_img(method: str, name: str, prec: str) -> float:
        return pred_ours_img(method, name, prec) * c_ours(name, prec)

    def item_cost(method: str, name: str) -> float:
        """Predicted seconds of an item: every precision on its full unit, plus the
        reference's maps (at least one; at most a fifth of ours once it is longer)."""
        ours = sum(ours_img(method, name, p) for p in precisions) * images_for[method]
        if "fp32" in precisions and method in args.variants:  # measure_variants: twice
            ours += (ours_img(method, name, "fp32") * images_for[method]
                     * 2 * (2 + args.checkpoints) / mpi)
        if method not in ref_methods:
            return ours
        return ours + max(pred_ref_map(method, name) * corr(ratios_ref.get(name)), 0.2 * ours)

    def snapshot(complete: bool) -> dict:
        elapsed = time.perf_counter() - t_start
        meta = {
            "device": str(device),
            "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                            else platform.processor() or platform.machine()),
            "cpu_count": os.cpu_count(),
            "torch_threads": threads,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "models": model_names,
            "methods": methods,
            "precisions": precisions,
            "size": args.size,
            "checkpoints": args.checkpoints,
            "magnitudes": args.magnitudes,
            "transforms": list(transforms),
            "maps_per_image": mpi,
            "unit_batch_size": args.unit_batch,
            "saliency_batch_size": sal_batch,
            "limit_batch": args.limit_batch,
            "settings": settings,
            "images_per_method": images_for,
            "streams": args.streams,
            "variants_timed_for": sorted(args.variants, key=METHODS.index),
            "budget_s": args.budget_s,
            "elapsed_s": round(elapsed, 2),
            "over_budget": elapsed > args.budget_s,
            "smoke": bool(args.smoke),
            "notes": notes,
            "complete": complete,
        }
        recs = recommendations(rows, model_names, precisions)
        valid = validated(recs, model_names)
        projection = project(rows, model_names, precisions, methods)
        fast = fastest(rows, valid, model_names, methods)
        projection += project_auto(rows, model_names, methods, valid, fast)
        return {
            "schema": SCHEMA, "meta": meta, "limits": list(limits.values()), "rows": rows,
            "skipped": skipped, "projection": projection,
            "grid_mean_of_models": grid_mean(projection),
            "recommendations": recs,
            "validated": valid,
            "fastest": fast,
        }

    # ---- items
    items = [(m, n) for m in methods for n in model_names]
    rows: list[dict] = []
    skipped: list[dict] = []
    # every precision of an item on the same full unit; an item runs whole or not at all
    print("plan: " + ", ".join(
        f"{n} {m} {images_for[m]} img ~{item_cost(m, n):.0f} s" for m, n in items), flush=True)
    for method, name in items:
        b = bundles[name]
        norm = functools.partial(M.normalize, name_or_spec=name)
        now = time.perf_counter()
        remaining = deadline - now
        need = item_cost(method, name)
        if not plan_items([need], remaining)[0]:
            reason = (f"budget: predicted {need:.1f} s for {images_for[method]} images at "
                      f"{len(precisions)} precision(s), {remaining:.1f} s left")
            print(f"skip {name} {method}: {reason}", flush=True)
            for p in precisions:
                skipped.append({"model": name, "method": method, "precision": p,
                                "reason": reason})
            continue
        print(f"{name} {method}: {images_for[method]} images, predicted {need:.0f} s of "
              f"{remaining:.0f} s left (at {now - t_start:.0f} s)", flush=True)

        # reference (fp32, PyTorch's default flags), on its own model copy
        ref_res, ref_cut = {"maps": 0}, ""
        if method not in ref_methods:
            ref_cut = "reference not measured (--ref-methods)"
        else:
            n_ref = max(1, args.ref_maps)
            guess = pred_ref_map(method, name) * corr(ratios_ref.get(name))
            t0 = time.perf_counter()
            try:
                layer, reshape = M.cam_layer(b.reference_model)
                ref = SP.Reference(b.reference_model, device, layer, reshape)
                xs = reference_inputs(images01, n_ref, norm)
                ref_res = measure_reference(ref, method, xs, n_ref, max(0.2 * need, guess),
                                            deadline, guess, device)
            except ImportError as e:
                ref_cut = f"reference not measured: {e}"
            if ref_res["maps"]:
                ratios_ref.setdefault(name, []).append(
                    (time.perf_counter() - t0) / ref_res["maps"] / pred_ref_map(method, name))
            if not ref_cut and ref_res["maps"] < n_ref:
                ref_cut = f"reference cut to {ref_res['maps']} of {n_ref} maps (budget)"

        # ours, every precision on the same n images
        n = images_for[method]
        keep = n if len(precisions) > 1 and "fp32" in precisions else 0
        idx_list = list(range(n))
        fp32_res: UnitResult | None = None
        for prec in precisions:
            pred = ours_img(method, name, prec) * n
            if time.perf_counter() + pred > deadline + 0.1 * args.budget_s:
                reason = (f"budget: predicted {pred:.1f} s, "
                          f"{deadline - time.perf_counter():.1f} s left")
                print(f"skip {name} {method} {prec}: {reason}", flush=True)
                skipped.append({"model": name, "method": method, "precision": prec,
                                "reason": reason})
                continue
            with P.flags(prec) as flags:  # the flags explain_unit runs its passes with
                pass
            common = dict(random_model=b.random, checkpoints=b.checkpoints, precision=prec,
                          batch_size=args.unit_batch, streams=args.streams)  # fmt: skip
            warm = {**WARM_SETTINGS.get(method, {}), **settings_base}
            labels = labels_of[name]
            explain_unit(b.model, images01[:1], labels[:1], [0], method, norm,
                         transforms=("FlipLR", "Rotate"), magnitudes=1, settings=warm, **common)
            SP.sync(device)
            if device.type == "cuda":  # the auto stream count reads this unit's peak
                torch.cuda.reset_peak_memory_stats(device)
            with pass_timer(device) as passes_s:
                t0 = time.perf_counter()
                res = explain_unit(b.model, images01[:n], labels[:n], idx_list, method, norm,
                                   transforms=transforms, magnitudes=args.magnitudes, seed=0,
                                   settings=settings[method], keep_samples=keep, **common)
                SP.sync(device)
                dt = time.perf_counter() - t0
            maps = len(res.pairs) + n  # one pair per variant map, plus the originals
            s_map = dt / maps
            ratios_ours.setdefault((name, prec), []).append(
                dt / (n * pred_ours_img(method, name, prec)))
            lm = limits[(name, prec)]
            passes = passes_per_map(method, settings[method])
            kind = "fwd_img_s" if method == "lime" else "fwd_bwd_img_s"
            pct = 100 * passes / s_map / lm[kind]
            row = {
                "model": name, "method": method, "precision": prec, "status": "ok",
                "images": n, "maps": maps,
                "maps_per_image": maps // n, "ours_s": round(dt, 4),
                "ours_s_per_map": s_map, "passes_per_map": passes,
                # at the method's own settings (the paper's), for the projection: s/map
                # scaled by the passes (the per-map fixed costs scale too: conservative)
                "paper_passes_per_map": passes_per_map(method, settings_base),
                "ours_s_per_map_paper": s_map * passes_per_map(method, settings_base) / passes,
                "limit_kind": kind, "limit_img_s": lm[kind], "pct_of_limit": round(pct, 2),
                # share of the unit's time inside the model passes (gradient methods)
                "pass_s": round(passes_s["s"], 4) if passes_s["s"] else None,
                "pass_share": round(passes_s["s"] / dt, 3) if passes_s["s"] else None,
                "reference_maps": ref_res["maps"],
                "reference_s_per_map": ref_res.get("s_per_map"),
                "reference_map_only_s_per_map": ref_res.get("map_only_s_per_map"),
                "reference_precision": "fp32 (PyTorch default flags)",
                "speedup": (ref_res["s_per_map"] / s_map) if ref_res.get("s_per_map") else None,
                "unit_batch_size": args.unit_batch,
                "saliency_batch_size": args.saliency_batch or saliency.auto_batch_size(
                    method, device.type),
                "flags": flags, "layout": P.layout(prec, method, b.model, device.type),
                "parity_vs_fp32": None, "streams": args.streams,
                # as explain_unit sized it (the same peak, the same memory held)
                "variant_workers": variant_workers(args.streams, device,
                                                   1 + len(b.checkpoints)),
                "model_variants": None,
                "notes": [],
            }
            if method == "lime":  # the target adds the segmentation to the limit time
                t_lim = passes / lm["fwd_img_s"] + seg_s / min(threads, maps)
                row["segmentation_s_per_image"] = seg_s
                row["pct_of_limit_with_segmentation"] = round(100 * t_lim / s_map, 2)
            if ref_cut:
                row["notes"].append(ref_cut)
            if prec == "fp32":
                fp32_res = res
            if prec == "fp32" and method in args.variants:
                row["model_variants"] = measure_variants(
                    b, images01, labels, n, method, norm, settings[method], args.unit_batch,
                    args.streams, device)
            elif fp32_res is not None and keep:
                row["parity_vs_fp32"] = compare_units(fp32_res, res)
            rows.append(row)
            par = row["parity_vs_fp32"]
            print(
                f"  {prec}: {n} img x {maps // n} maps, ours {s_map:.5f} s/map "
                f"({pct:.1f}% of limit"
                + (f", {100 * row['pass_share']:.0f}% of it in the passes" if row["pass_share"]
                   else "") + ")"
                + (f", reference {row['reference_s_per_map']:.4f} s/map over "
                   f"{row['reference_maps']} maps, speedup {row['speedup']:.1f}x"
                   if row["speedup"] else "")
                + (f", Pearson vs fp32 min {par['pearson_min']}" if par else ""),
                flush=True,
            )
        if device.type == "cuda":
            torch.cuda.empty_cache()

        if args.json:  # what is done so far survives a kill
            write_json(args.json, snapshot(False))

    result = snapshot(True)
    print_tables(result)
    if args.json:
        write_json(args.json, result)
    return 0


def finite(obj):
    """`obj` with NaN and infinities as None (strict JSON)."""
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def write_json(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(finite(result), indent=1, allow_nan=False) + "\n")
    tmp.replace(path)


@functools.cache
def _paper_explain():
    from cose import config

    return config.load(PAPER_PRESET, check_registries=False).explain


def paper_maps(method: str) -> int:
    return PAPER_MAPS_PER_IMAGE * _paper_explain().images_for(method)


def project(rows, model_names, precisions, methods) -> list[dict]:
    """GPU-hours of the paper grid from the measured s/map (ours, and the reference)."""
    out = []
    for name in model_names:
        for prec in precisions:
            got = {r["method"]: r for r in rows if r["model"] == name and r["precision"] == prec}
            if not got:
                continue
            ours = sum(paper_maps(m) * r["ours_s_per_map_paper"] for m, r in got.items()) / 3600
            refs = [r for r in got.values() if r["reference_s_per_map"]]
            ref = sum(paper_maps(r["method"]) * r["reference_s_per_map"] for r in refs) / 3600
            grid = PAPER_MODELS * PAPER_DATASETS
            out.append({
                "model": name, "precision": prec,
                "methods": sorted(got, key=METHODS.index),
                "missing": [m for m in METHODS if m not in got],
                "complete": all(m in got for m in METHODS),
                "ours_h_per_dataset_model": round(ours, 6),
                "reference_h_per_dataset_model": round(ref, 6) if refs else None,
                "reference_methods": sorted((r["method"] for r in refs), key=METHODS.index),
                "ours_h_grid": round(ours * grid, 4),
                "meets_30_min_per_dataset_model": ours <= TARGET_H_PER_DATASET_MODEL,
                "meets_gpu_day_grid": ours * grid <= TARGET_H_GRID,
                "reference_h_grid": round(ref * grid, 4) if refs else None,
                "grid": f"{PAPER_MODELS} models x {PAPER_DATASETS} datasets, every model "
                        f"costing what {name} costs",
            })
    return out


def project_auto(rows, model_names, methods, validated_pairs, fast) -> list[dict]:
    """The projection at ``auto``: per method the precision cose.precision.resolve picks with
    this run's candidates as VALIDATED and FASTEST (the fastest measured of fp32 and those
    agreeing on every model), at the s/map measured for it."""
    table = frozenset(tuple(v) for v in validated_pairs)
    out = []
    for name in model_names:
        chosen = {m: P.resolve(P.AUTO, m, table, fast) for m in methods}
        got = {m: next((r for r in rows if r["model"] == name and r["method"] == m
                        and r["precision"] == p), None) for m, p in chosen.items()}
        done = {m: r for m, r in got.items() if r is not None}
        if not done:
            continue
        ours = sum(paper_maps(m) * r["ours_s_per_map_paper"] for m, r in done.items()) / 3600
        grid = PAPER_MODELS * PAPER_DATASETS
        out.append({
            "model": name, "precision": "auto", "chosen": chosen,
            "missing": [m for m in METHODS if m not in done],
            "complete": all(m in done for m in METHODS),
            "ours_h_per_dataset_model": round(ours, 6), "ours_h_grid": round(ours * grid, 4),
            "meets_30_min_per_dataset_model": ours <= TARGET_H_PER_DATASET_MODEL,
            "meets_gpu_day_grid": ours * grid <= TARGET_H_GRID,
            "reference_h_per_dataset_model": None, "reference_h_grid": None,
        })
    return out


def grid_mean(projection: list[dict]) -> list[dict]:
    """The 13 x 5 grid at the mean per-(dataset, model) cost of the models measured in full."""
    out = []
    for prec in dict.fromkeys(p["precision"] for p in projection):
        full = [p for p in projection if p["precision"] == prec and p["complete"]]
        if not full:
            continue
        h = statistics.mean(p["ours_h_per_dataset_model"] for p in full)
        out.append({"precision": prec, "models": [p["model"] for p in full],
                    "ours_h_per_dataset_model": round(h, 6),
                    "ours_h_grid": round(h * PAPER_MODELS * PAPER_DATASETS, 4),
                    "meets_gpu_day_grid": h * PAPER_MODELS * PAPER_DATASETS <= TARGET_H_GRID})
    return out


def recommendations(rows, model_names, precisions) -> list[dict]:
    out = []
    for name in model_names:
        for prec in precisions:
            if prec == "fp32":
                continue
            got = [r for r in rows if r["model"] == name and r["precision"] == prec]
            par = {r["method"]: r["parity_vs_fp32"] for r in got if r["parity_vs_fp32"]}
            if not par:
                continue
            ok = {m: bool(p["cose_agrees"]) for m, p in par.items()}  # by COSE, not Pearson
            out.append({"model": name, "precision": prec, "methods_ok": ok,
                        "recommended_for": sorted((m for m, v in ok.items() if v),
                                                  key=METHODS.index)})
    return out


#: a validated precision replaces fp32 in `auto` only when it is at least this much faster
#: (a tie within the run-to-run noise keeps the exact one)
FASTER_BY = 0.05


def fastest(rows, validated_pairs, model_names, methods) -> dict[str, str]:
    """Per method, the precision `auto` should run: of the validated candidates at least
    FASTER_BY faster than fp32 (s/map summed over the models, measured on every model), the
    fastest, else fp32; the candidate for `cose.precision.FASTEST`."""
    table = {tuple(v) for v in validated_pairs}
    out = {}
    for m in methods:
        times = {}
        for prec in ["fp32", *(p for p, m2 in table if m2 == m)]:
            got = [r for r in rows if r["method"] == m and r["precision"] == prec]
            if {r["model"] for r in got} == set(model_names):
                times[prec] = sum(r["ours_s_per_map"] for r in got)
        if "fp32" not in times:
            continue
        limit = (1 - FASTER_BY) * times["fp32"]
        faster = {p: t for p, t in times.items() if p != "fp32" and t <= limit}
        out[m] = min(faster, key=faster.get) if faster else "fp32"
    return out


def validated(recs: list[dict], model_names) -> list[list[str]]:
    """[precision, method] pairs measured on every model of the run and recommended on each: the
    candidates for `cose.precision.VALIDATED` (one card; a method skipped on one model is not
    a candidate)."""
    out = []
    for prec in dict.fromkeys(r["precision"] for r in recs):
        got = {r["model"]: set(r["recommended_for"]) for r in recs if r["precision"] == prec}
        out += [[prec, m] for m in METHODS if all(m in got.get(n, ()) for n in model_names)]
    return out


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def print_tables(result: dict) -> None:
    meta = result["meta"]
    print(f"\n{meta['device_name']} ({meta['device']}), torch {meta['torch']}, "
          f"size {meta['size']}, {meta['maps_per_image']} maps/image, unit batch "
          f"{meta['unit_batch_size']}, saliency batch {meta['saliency_batch_size']}, limit batch "
          f"{meta['limit_batch']}" + (" — SMOKE, not a result" if meta["smoke"] else ""))
    print("| model | method | precision | images | ours s/map | reference s/map (maps) "
          "| speedup | % of limit | in passes | delta COSE vs fp32 (agrees) | Pearson vs fp32 (min) "
          "| notes |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        par = r["parity_vs_fp32"]
        pct = _f(r["pct_of_limit"], ".1f")
        if "pct_of_limit_with_segmentation" in r:
            pct += f" ({r['pct_of_limit_with_segmentation']:.1f} w/ seg)"
        print(f"| {r['model']} | {r['method']} | {r['precision']} | {r['images']} | "
              f"{r['ours_s_per_map']:.5f} | {_f(r['reference_s_per_map'], '.4f')} "
              f"({r['reference_maps']}) | {_f(r['speedup'], '.1f')} | {pct} | "
              + (f"{100 * r['pass_share']:.0f}% | " if r.get("pass_share") else "- | ")
              + (f"{par['delta_cose']:.4f} ({'yes' if par['cose_agrees'] else 'NO'}) | "
                 if par else "- | ")
              + f"{_f(par['pearson_min'] if par else None, '.4f')} | {'; '.join(r['notes'])} |")
    for s in result["skipped"]:
        print(f"| {s['model']} | {s['method']} | {s['precision']} | skipped | | | | | | | | "
              f"{s['reason']} |")
    print("\nlimits (img/s):")
    for lm in result["limits"]:
        print(f"  {lm['model']} {lm['precision']}: fwd+bwd {lm['fwd_bwd_img_s']:.1f}, "
              f"fwd {lm['fwd_img_s']:.1f} (batch {lm['batch']}; {sorted(lm['formats'])}); "
              "fwd+bwd by batch (as built): " + ", ".join(
                  f"{b}: {_f(v, '.1f')}" for b, v in lm.get("fwd_bwd_img_s_by_batch", {}).items()))
    print("\nmodel variants alone (fp32: originals, random-init model, checkpoints), one at a "
          "time vs at once (--streams):")
    for r in result["rows"]:
        mv = r.get("model_variants")
        if mv:
            print(f"  {r['model']} {r['method']}: {mv['images']} img x {mv['models']} models, "
                  f"{mv['one_at_a_time_s']:.3f} s one at a time, {mv['at_once_s']:.3f} s with "
                  f"{mv['workers']} at once ({mv['speedup']:.2f}x); records "
                  + ("identical" if mv["identical"]
                     else f"differ (SSIM max {_f(mv['ssim_max_abs_diff'], '.2e')})"))
    print("\npaper grid projection (hours on this device):")
    print("| model | precision | ours h per (dataset, model) | reference h | ours h, 13x5 grid "
          "| reference h, grid | missing methods |")
    print("|---|---|---|---|---|---|---|")
    for p in result["projection"]:
        print(f"| {p['model']} | {p['precision']} | {p['ours_h_per_dataset_model']:.3f} | "
              f"{_f(p['reference_h_per_dataset_model'], '.3f')} | {p['ours_h_grid']:.2f} | "
              f"{_f(p['reference_h_grid'], '.2f')} | {', '.join(p['missing']) or '-'} |")
    for g in result["grid_mean_of_models"]:
        print(f"grid at the mean of {', '.join(g['models'])} ({g['precision']}): "
              f"{g['ours_h_grid']:.2f} h for 13 models x 5 datasets")
    for rec in result["recommendations"]:
        print(f"{rec['model']} {rec['precision']}: COSE within 0.005 of fp32 (and class flips "
              f"<= 0.1%) for {', '.join(rec['recommended_for']) or 'no method'}")
    pairs = ", ".join(f"({p!r}, {m!r})" for p, m in result.get("validated", []))
    print(f"cose.precision.VALIDATED candidates (measured and agreeing on every model): "
          f"{{{pairs}}}")
    print(f"cose.precision.FASTEST candidates (auto's choice per method): "
          f"{result.get('fastest', {})}")
    print(f"elapsed {meta['elapsed_s']:.1f} s of a {meta['budget_s']:.0f} s budget"
          + (" (OVER BUDGET)" if meta["over_budget"] else ""))


if __name__ == "__main__":
    sys.exit(main())
