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

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

from cose import precision as P
from cose import saliency, similarity
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
    precision: str = "fp32",
    draws: Mapping[str, torch.Tensor] | None = None,
    noise_floor: bool = False,
) -> UnitResult:
    """Per-pair records (REFERENCE.md, step 6) for `images01` ([B,C,H,W] in [0,1]).

    ``batch_size`` bounds the images of one model or saliency call, and with B the unit's
    memory: the transformed variants stream through in batches (transform, predict, map,
    invert, score), and only the scores (and the maps of the first ``keep_samples`` images)
    are kept. The batches, and so the numbers, are the same as for one call over all variants.

    ``precision`` (:mod:`cose.precision`): of the saliency passes; everything else
    (predictions, transforms, similarity) runs in fp32. ``draws``: the magnitudes of each
    signed transform, ``[B, k]`` (``explain.selection: reference``); by default each image's
    come from its own seeded generator (:func:`draw_magnitudes`). ``noise_floor``: add the
    ``seed`` variant, the same image and model explained once more with another seed (the
    method's own self-consistency: 1 for a deterministic method)."""
    P.check(precision)
    settings = settings or {}
    checkpoints = checkpoints or {}
    B, _, H, W = images01.shape
    dev = images01.device
    keep = min(keep_samples, B)
    x = normalize(images01)
    pred = predict(model, x, batch_size)

    def maps(m: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, salt: int, first=0):
        """Saliency maps of `m` at the unit's precision (predictions stay fp32)."""
        run = P.wrap(m, precision, method, inputs[:1])
        with P.flags(precision):
            return _explain(method, run, inputs, targets, settings, batch_size, salt, first)

    map0 = maps(model, x, pred, seed)
    labels = labels.to(dev)

    # every variant: (type, magnitudes [B]); per variant and image: t_pred, SSIM, Spearman
    variants: list[tuple[str, torch.Tensor]] = []
    for name in transforms:
        if draws is not None and name in T.SIGNED:
            m = torch.as_tensor(draws[name], dtype=torch.float32).reshape(B, -1).to(dev)
        else:
            m = draw_magnitudes(name, magnitudes, test_idx, seed, W).to(dev)
        variants += [(name, m[:, j]) for j in range(m.shape[1])]
    models_ = ([("random", random_model)] if random_model is not None else []) + list(
        checkpoints.items()
    ) + ([("seed", model)] if noise_floor else [])  # seed: another seed, same model and image
    zeros = torch.zeros(B, device=dev)
    variants += [(tag, zeros) for tag, _ in models_]
    n_tf = len(variants) - len(models_)
    geometric = [name in T.GEOMETRIC for name, _ in variants]
    t_pred = torch.empty(len(variants), B, dtype=torch.long)
    scores = np.empty((2, len(variants), B), dtype=np.float64)  # SSIM, Spearman
    samples: list[list[torch.Tensor]] = [[] for _ in variants]

    def score(pieces: list[tuple[int, int, int]], mv: torch.Tensor, tp: torch.Tensor) -> None:
        """Record the pieces' predictions and their maps' similarity to the original's
        (`mv`: their maps in piece order; geometric ones are mapped back here)."""
        rows, off = [], 0
        tp = tp.cpu()
        for v, lo, hi in pieces:
            m = mv[off : off + hi - lo]
            if geometric[v]:
                m = T.invert(variants[v][0], m, variants[v][1][lo:hi])
            rows.append((v, lo, hi, m))
            t_pred[v, lo:hi] = tp[off : off + hi - lo]
            if lo < keep:
                samples[v].append(m[: min(hi, keep) - lo].float().cpu())
            off += hi - lo
        for masked in (False, True):  # geometric variants compare over the valid mask
            group = [r for r in rows if geometric[r[0]] == masked]
            if not group:
                continue
            a = torch.cat([map0[lo:hi] for _, lo, hi, _ in group])
            b = torch.cat([m for *_, m in group])
            mask = None
            if masked:
                mask = torch.cat(
                    [T.valid_mask(variants[v][0], variants[v][1][lo:hi], H, W, dev)
                     for v, lo, hi, _ in group]
                )  # fmt: skip
            s = similarity.ssim(a, b, mask).double().cpu().numpy()
            r = similarity.spearman(a, b, mask).double().cpu().numpy()
            i = 0
            for v, lo, hi, _ in group:
                scores[0, v, lo:hi] = s[i : i + hi - lo]
                scores[1, v, lo:hi] = r[i : i + hi - lo]
                i += hi - lo

    # transforms: the variants of all images stream through the model in batches
    for k, (pieces, xb) in enumerate(_variant_batches(variants[:n_tf], images01, normalize,
                                                      batch_size)):
        tp = predict(model, xb, batch_size)
        mb = maps(model, xb, tp, seed + 1, first=k)
        del xb  # the batch's images are not needed for scoring
        score(pieces, mb, tp)

    # model changes on the original images
    for k, (_, vmodel) in enumerate(models_):
        tp = predict(vmodel, x, batch_size)
        score([(n_tf + k, 0, B)], maps(vmodel, x, tp, seed + 2 + k), tp)

    # records: unmasked variants (photometric, then model changes), then the geometric ones
    order = [v for v in range(len(variants)) if not geometric[v]]
    order += [v for v in range(len(variants)) if geometric[v]]
    mags_cpu = torch.stack([m for _, m in variants]).cpu() if variants else torch.zeros(0, B)
    cols: dict[str, list] = {c: [] for c in PAIR_COLUMNS}
    for v in order:
        cols["test_idx"] += list(map(int, test_idx))
        cols["target_class"] += labels.tolist()
        cols["pred_class"] += pred.tolist()
        cols["transform_type"] += [variants[v][0]] * B
        cols["transform_magnitude"] += mags_cpu[v].tolist()
        cols["t_pred_class"] += t_pred[v].tolist()
        cols["ssim"] += scores[0, v].tolist()
        cols["spearman"] += scores[1, v].tolist()

    pairs = pd.DataFrame(cols)
    pairs = pairs.astype(
        {
            "test_idx": "int64",
            "target_class": "int64",
            "pred_class": "int64",
            "t_pred_class": "int64",
            "transform_magnitude": "float64",
            "ssim": "float64",
            "spearman": "float64",
        }
    )
    out: dict[str, np.ndarray] = {}
    if keep:
        out = {
            "test_idx": np.asarray(test_idx[:keep]),
            "images": images01[:keep].float().cpu().numpy(),
            "labels": labels[:keep].cpu().numpy(),
            "pred": pred[:keep].cpu().numpy(),
            "map": map0[:keep].float().cpu().numpy(),
            "variant_names": np.asarray([name for name, _ in variants]),
            "variant_magnitudes": mags_cpu[:, :keep].numpy(),
            "variant_maps": np.stack([torch.cat(s).numpy() for s in samples])
            if variants else np.zeros((0, keep, H, W), dtype=np.float32),
            "variant_pred": t_pred[:, :keep].numpy(),
        }
    return UnitResult(pairs=pairs, samples=out)
