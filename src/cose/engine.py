"""One explain work unit: every variant of a batch of images, its map, and its similarity.

For images x with labels y, the unit computes the map of the model's prediction on x, then for
every variant (each transform at each drawn magnitude, the random-init model, each
intermediate checkpoint) the map of the class predicted on that variant, maps geometric ones
back with the inverse transform, and scores SSIM and Spearman against the original map (over
the valid mask). The variants stream through in batches of ``batch_size`` images, so the
unit's memory is bounded by its images and one batch, not by the number of variants; maps stay
on the images' device and only scores (and the kept sample maps) leave it.
"""

from __future__ import annotations

import contextlib
import functools
import queue
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

from cose import precision as P
from cose import runtime, saliency, similarity
from cose import transforms as T
from cose.columns import UNIT_COLUMNS

PAIR_COLUMNS = list(UNIT_COLUMNS)


@dataclass
class UnitResult:
    pairs: pd.DataFrame
    samples: dict[str, np.ndarray] = field(default_factory=dict)


def image_generator(seed: int, test_idx: int, salt: int) -> torch.Generator:
    """Per-image generator: draws do not depend on how images are grouped into units."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + int(test_idx)) * 101 + salt)
    return g


def draw_magnitudes(
    name: str, count: int, test_idx: list[int], seed: int, size: int
) -> torch.Tensor:
    """[B, k] magnitudes for transform `name` (k = count for signed ones, else 1)."""
    salt = T.TRANSFORMS.index(name)
    if name not in T.SIGNED:
        return torch.zeros(len(test_idx), 1)
    rows = [
        T.sample_magnitudes(name, count, image_generator(seed, i, salt), size) for i in test_idx
    ]
    return torch.stack([torch.as_tensor(r, dtype=torch.float32) for r in rows])


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([model(c).argmax(1) for c in x.split(batch_size)])


def _explain(
    method: str,
    model: nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor,
    settings: dict,
    batch_size: int,
    seed: int,
    first: int = 0,
) -> torch.Tensor:
    """Maps of `x` in saliency calls of `batch_size` images; a stochastic method's call k
    (counted from `first`, so a stream of calls seeds as one long call would) gets its own
    seed."""
    kwargs = dict(settings)
    stochastic = "seed" in saliency.defaults(method)
    out = []
    for k, (xc, tc) in enumerate(zip(x.split(batch_size), targets.split(batch_size)), first):
        if stochastic:
            kwargs["seed"] = seed * 7919 + k
        out.append(saliency.explain(method, model, xc, tc, **kwargs))
    return torch.cat(out)


def _variant_batches(
    variants: list[tuple[str, torch.Tensor]],
    images01: torch.Tensor,
    normalize: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int,
) -> Iterator[tuple[list[tuple[int, int, int]], torch.Tensor]]:
    """The transformed images of every (transform, magnitudes) variant, concatenated variant
    after variant, in batches of `batch_size` rows: (pieces, normalised batch), where piece
    (v, lo, hi) is images lo:hi of variant v. Each variant is transformed over all B images
    at once; at most one variant and one batch are held at a time."""
    B = images01.shape[0]
    pieces: list[tuple[int, int, int]] = []
    parts: list[torch.Tensor] = []
    n = 0
    for v, (name, mags) in enumerate(variants):
        xv = normalize(T.apply(name, images01, mags))
        lo = 0
        while lo < B:
            hi = min(B, lo + batch_size - n)
            pieces.append((v, lo, hi))
            parts.append(xv[lo:hi])
            n += hi - lo
            lo = hi
            if n == batch_size:
                yield pieces, torch.cat(parts)
                pieces, parts, n = [], [], 0
        del xv
    if n:
        yield pieces, torch.cat(parts)


@dataclass
class Variant:
    """One change of the original images: a transform at one magnitude per image, or another
    model (random-init, a checkpoint, another seed) on the images as they are."""

    name: str  # transform_type: a transform, "random", "mid_ckpt_<tag>" or "seed"
    magnitudes: torch.Tensor  # [B] (zeros for a model variant)
    model: nn.Module | None = None  # a model variant's model

    @property
    def geometric(self) -> bool:
        return self.name in T.GEOMETRIC


def build_variants(
    transforms: tuple[str, ...],
    magnitudes: int,
    test_idx: list[int],
    seed: int,
    size: int,
    device: torch.device,
    draws: Mapping[str, torch.Tensor] | None = None,
    models: list[tuple[str, nn.Module]] = (),
) -> list[Variant]:
    """The unit's variants in record order: each transform's drawn magnitudes (k per signed
    transform, given in ``draws`` or from each image's own generator), then ``models``."""
    B = len(test_idx)
    out: list[Variant] = []
    for name in transforms:
        if draws is not None and name in T.SIGNED:
            m = torch.as_tensor(draws[name], dtype=torch.float32).reshape(B, -1).to(device)
        else:
            m = draw_magnitudes(name, magnitudes, test_idx, seed, size).to(device)
        out += [Variant(name, m[:, j]) for j in range(m.shape[1])]
    zeros = torch.zeros(B, device=device)
    return out + [Variant(tag, zeros, model) for tag, model in models]


class _Scores:
    """Per variant and image: the predicted class, SSIM and Spearman against the original
    map, and the first ``keep`` images' maps (mapped back for geometric variants)."""

    def __init__(self, variants: list[Variant], map0: torch.Tensor, keep: int) -> None:
        self.variants, self.map0, self.keep = variants, map0, keep
        B = map0.shape[0]
        self.t_pred = torch.empty(len(variants), B, dtype=torch.long)
        self.values = np.empty((2, len(variants), B), dtype=np.float64)  # SSIM, Spearman
        self.samples: list[list[torch.Tensor]] = [[] for _ in variants]

    def record(self, pieces: list[tuple[int, int, int]], maps: torch.Tensor,
               preds: torch.Tensor) -> None:
        """Pieces (v, lo, hi): images lo:hi of variant v, whose maps and predictions are the
        rows of ``maps`` / ``preds`` in piece order."""
        rows, off = [], 0
        preds = preds.cpu()
        for v, lo, hi in pieces:
            var = self.variants[v]
            m = maps[off : off + hi - lo]
            if var.geometric:
                m = T.invert(var.name, m, var.magnitudes[lo:hi])
            rows.append((v, lo, hi, m))
            self.t_pred[v, lo:hi] = preds[off : off + hi - lo]
            if lo < self.keep:
                self.samples[v].append(m[: min(hi, self.keep) - lo].float().cpu())
            off += hi - lo
        for masked in (False, True):  # geometric variants compare over the valid mask
            group = [r for r in rows if self.variants[r[0]].geometric == masked]
            if group:
                self._similarity(group, masked)

    def _similarity(self, group: list, masked: bool) -> None:
        H, W = self.map0.shape[-2:]
        a = torch.cat([self.map0[lo:hi] for _, lo, hi, _ in group])
        b = torch.cat([m for *_, m in group])
        mask = None
        if masked:
            mask = torch.cat([T.valid_mask(self.variants[v].name,
                                           self.variants[v].magnitudes[lo:hi], H, W, a.device)
                              for v, lo, hi, _ in group])
        s = similarity.ssim(a, b, mask).double().cpu().numpy()
        r = similarity.spearman(a, b, mask).double().cpu().numpy()
        i = 0
        for v, lo, hi, _ in group:
            self.values[0, v, lo:hi] = s[i : i + hi - lo]
            self.values[1, v, lo:hi] = r[i : i + hi - lo]
            i += hi - lo


def _pair_table(variants: list[Variant], scores: _Scores, test_idx: list[int],
                labels: torch.Tensor, pred: torch.Tensor) -> pd.DataFrame:
    """The records: unmasked variants (photometric, then model changes), then geometric."""
    B = len(test_idx)
    order = [v for v, var in enumerate(variants) if not var.geometric]
    order += [v for v, var in enumerate(variants) if var.geometric]
    mags = _magnitudes(variants, B)
    cols: dict[str, list] = {c: [] for c in PAIR_COLUMNS}
    for v in order:
        cols["test_idx"] += list(map(int, test_idx))
        cols["target_class"] += labels.tolist()
        cols["pred_class"] += pred.tolist()
        cols["transform_type"] += [variants[v].name] * B
        cols["transform_magnitude"] += mags[v].tolist()
        cols["t_pred_class"] += scores.t_pred[v].tolist()
        cols["ssim"] += scores.values[0, v].tolist()
        cols["spearman"] += scores.values[1, v].tolist()
    return pd.DataFrame(cols).astype(PAIR_DTYPES)


PAIR_DTYPES = {"test_idx": "int64", "target_class": "int64", "pred_class": "int64",
               "t_pred_class": "int64", "transform_magnitude": "float64", "ssim": "float64",
               "spearman": "float64"}


def _magnitudes(variants: list[Variant], B: int) -> torch.Tensor:
    return torch.stack([v.magnitudes for v in variants]).cpu() if variants else torch.zeros(0, B)


def _sample_arrays(variants: list[Variant], scores: _Scores, test_idx: list[int],
                   images01: torch.Tensor, labels: torch.Tensor, pred: torch.Tensor,
                   map0: torch.Tensor) -> dict[str, np.ndarray]:
    """The first ``keep`` images, their maps and every variant's (for the figures)."""
    keep, (B, _, H, W) = scores.keep, images01.shape
    if not keep:
        return {}
    return {
        "test_idx": np.asarray(test_idx[:keep]),
        "images": images01[:keep].float().cpu().numpy(),
        "labels": labels[:keep].cpu().numpy(),
        "pred": pred[:keep].cpu().numpy(),
        "map": map0[:keep].float().cpu().numpy(),
        "variant_names": np.asarray([v.name for v in variants]),
        "variant_magnitudes": _magnitudes(variants, B)[:, :keep].numpy(),
        "variant_maps": np.stack([torch.cat(s).numpy() for s in scores.samples])
        if variants else np.zeros((0, keep, H, W), dtype=np.float32),
        "variant_pred": scores.t_pred[:, :keep].numpy(),
    }


# ----------------------------------------------------------------------------- model variants

#: at most this many model variants mapped at once on CUDA under ``COSE_STREAMS=auto``
AUTO_STREAMS = 4
#: the share of the device's free memory the extra concurrent variants may take
STREAM_MEMORY_SHARE = 0.8

_STREAMS: dict[torch.device, list] = {}


def variant_workers(streams: int | str | None, device: torch.device, jobs: int) -> int:
    """How many of a unit's ``jobs`` model variants are mapped at once: ``streams`` (default
    ``COSE_STREAMS``) as an integer, or ``auto``: on CUDA up to :data:`AUTO_STREAMS`, as many
    as fit in :data:`STREAM_MEMORY_SHARE` of the free memory at the working set the unit's
    saliency calls have reached (the allocator's peak over what is held now: an upper bound,
    since the transform batches hold at least as many rows), 1 on other devices."""
    n = runtime.current().streams if streams is None else streams
    if n != "auto":
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"streams: expected auto or an integer >= 1, got {n!r}")
        return max(1, min(n, jobs))
    if device.type != "cuda" or jobs <= 1:
        return 1
    held = torch.cuda.memory_allocated(device)
    working = max(1, torch.cuda.max_memory_allocated(device) - held)
    free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - held
    return max(1, min(AUTO_STREAMS, jobs, int(STREAM_MEMORY_SHARE * free // working)))


def _at(precision: str, call: Callable[[], torch.Tensor]) -> torch.Tensor:
    with P.flags(precision):
        return call()


def _device_streams(device: torch.device, n: int) -> list:
    """``n`` side streams of ``device``, the same ones for every unit (the caching allocator
    keeps its blocks per stream: fresh streams per unit would strand them)."""
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    pool = _STREAMS.setdefault(device, [])
    while len(pool) < n:
        pool.append(torch.cuda.Stream(device))
    return pool[:n]


def run_models(method: str,
               jobs: list[tuple[nn.Module, nn.Module, Callable[[], torch.Tensor]]],
               example: torch.Tensor, workers: int) -> list[torch.Tensor]:
    """``[call() for *_, call in jobs]``, up to ``workers`` at a time: each job maps one model
    variant (``jobs``: (the variant's model, the module the call explains, the call)). Every
    job runs whole on one thread (on CUDA on one side stream): the same kernels on the same
    inputs as one at a time, so the same maps. Jobs of the same model run one after another
    (its eval mode, its hooks and its cached copies are per model). The caller holds the
    precision's flags; the conv+BN-folded copies are built here first, since torch.fx's
    tracing patches nn.Module for every thread. The first error is raised once every running
    job has stopped."""
    for _, run, _ in jobs:
        saliency.prepare(method, run, example)
    groups: dict[int, list[int]] = {}
    for i, (model, _, _) in enumerate(jobs):
        groups.setdefault(id(model), []).append(i)
    device = example.device
    cuda = device.type == "cuda"
    streams = _device_streams(device, workers) if cuda else [None] * workers
    main = torch.cuda.current_stream(device) if cuda else None
    free: queue.SimpleQueue = queue.SimpleQueue()
    for s in streams:
        if s is not None:
            s.wait_stream(main)  # the unit's inputs and predictions, made on the main stream
        free.put(s)
    outs: list[torch.Tensor | None] = [None] * len(jobs)

    def group(indices: list[int]) -> None:
        s = free.get()
        try:
            with torch.cuda.stream(s) if s is not None else contextlib.nullcontext():
                for i in indices:
                    outs[i] = jobs[i][2]()
        finally:
            free.put(s)

    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cose-variant") as pool:
            futures = [pool.submit(group, g) for g in groups.values()]
            try:
                for f in futures:
                    f.result()
            finally:
                for f in futures:
                    f.cancel()
    finally:  # errors included: nothing the side streams still read is freed under them
        if cuda:
            for s in streams:
                main.wait_stream(s)
    if cuda:  # the maps were made on side streams and are read on the main one
        for out in outs:
            out.record_stream(main)
    return outs


@P.flags("fp32")  # the maps' passes switch to the unit's precision inside
def explain_unit(
    model: nn.Module,
    images01: torch.Tensor,
    labels: torch.Tensor,
    test_idx: list[int],
    method: str,
    normalize: Callable[[torch.Tensor], torch.Tensor],
    *,
    transforms: tuple[str, ...] = T.TRANSFORMS,
    magnitudes: int = 6,
    seed: int = 0,
    random_model: nn.Module | None = None,
    checkpoints: dict[str, nn.Module] | None = None,
    settings: dict | None = None,
    batch_size: int = 256,
    keep_samples: int = 0,
    precision: str = "auto",
    draws: Mapping[str, torch.Tensor] | None = None,
    noise_floor: bool = False,
    streams: int | str | None = None,
) -> UnitResult:
    """Per-pair records (REFERENCE.md, step 6) for `images01` ([B,C,H,W] in [0,1]).

    ``batch_size`` bounds the images of one model or saliency call, and with B the unit's
    memory: the transformed variants stream through in batches (transform, predict, map,
    invert, score), and only the scores (and the maps of the first ``keep_samples`` images)
    are kept. The batches, and so the numbers, are the same as for one call over all variants.

    ``precision`` (:mod:`cose.precision`; ``auto``: the fastest validated for ``method``): of
    the saliency passes; everything else
    (predictions, transforms, similarity) runs in fp32. ``draws``: the magnitudes of each
    signed transform, ``[B, k]`` (``explain.selection: reference``); by default each image's
    come from its own seeded generator (:func:`draw_magnitudes`). ``noise_floor``: add the
    ``seed`` variant, the same image and model explained once more with another seed (the
    method's own self-consistency: 1 for a deterministic method). ``streams``: how many model
    variants are mapped at once (:func:`variant_workers`; default ``COSE_STREAMS``; 1 for a
    method registered without ``concurrent``): the same maps as one at a time.

    The steps: predict and map the originals; build the variants; stream the transformed
    ones through predict, map, invert and score; predict and map the model variants on the
    originals; assemble the table."""
    precision = P.resolve(precision, method)
    settings = settings or {}
    B, _, H, W = images01.shape
    dev = images01.device

    def maps(m: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, salt: int, first=0):
        """Saliency maps of `m` at the unit's precision (predictions stay fp32)."""
        run = P.wrap(m, precision, method, inputs[:1])
        with P.flags(precision):
            return _explain(method, run, inputs, targets, settings, batch_size, salt, first)

    # the originals
    x = normalize(images01)
    pred = predict(model, x, batch_size)
    map0 = maps(model, x, pred, seed)
    labels = labels.to(dev)

    # the variants: transforms, then other models (seed: another seed, same model and image)
    models_ = ([("random", random_model)] if random_model is not None else []) + list(
        (checkpoints or {}).items()) + ([("seed", model)] if noise_floor else [])
    variants = build_variants(transforms, magnitudes, test_idx, seed, W, dev, draws, models_)
    n_tf = len(variants) - len(models_)
    scores = _Scores(variants, map0, min(keep_samples, B))

    # transforms: the variants of all images stream through the model in batches
    stream = [(v.name, v.magnitudes) for v in variants[:n_tf]]
    for k, (pieces, xb) in enumerate(_variant_batches(stream, images01, normalize, batch_size)):
        tp = predict(model, xb, batch_size)
        mb = maps(model, xb, tp, seed + 1, first=k)
        del xb  # the batch's images are not needed for scoring
        scores.record(pieces, mb, tp)

    # model changes on the original images: every prediction first (fp32), then the maps,
    # up to `streams` models at a time (each on its own CUDA stream)
    changes = variants[n_tf:]
    preds = [predict(var.model, x, batch_size) for var in changes]
    jobs = []
    for k, (var, tp) in enumerate(zip(changes, preds)):
        run = P.wrap(var.model, precision, method, x[:1])
        jobs.append((var.model, run, functools.partial(
            _explain, method, run, x, tp, settings, batch_size, seed + 2 + k)))
    # several at once only for a method declared safe on threads (the seven built-ins)
    workers = variant_workers(streams, dev, len(jobs)) if saliency.get(
        method).spec.concurrent else 1
    if workers == 1:  # one at a time, each scored as it comes: one variant's maps held
        outs: Iterator[torch.Tensor] = (_at(precision, call) for *_, call in jobs)
    else:  # all held, then scored in fp32 (the flags are process-wide: not while maps run)
        with P.flags(precision):
            outs = iter(run_models(method, jobs, x[:1], workers))
    for k, (mk, tp) in enumerate(zip(outs, preds)):
        scores.record([(n_tf + k, 0, B)], mk, tp)

    return UnitResult(
        pairs=_pair_table(variants, scores, test_idx, labels, pred),
        samples=_sample_arrays(variants, scores, test_idx, images01, labels, pred, map0),
    )
