"""One explain work unit: every variant of a batch of images, its map, and its similarity.

For images x with labels y, the unit computes the map of the model's prediction on x, then for
every variant (each transform at each drawn magnitude, the random-init model, each
intermediate checkpoint) the map of the class predicted on that variant, maps geometric ones
back with the inverse transform, and scores SSIM and Spearman against the original map (over
the valid mask). Tensors stay on the images' device until the records are built.
"""

from __future__ import annotations

from collections.abc import Callable
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
) -> torch.Tensor:
    kwargs = dict(settings)
    stochastic = "seed" in saliency.defaults(method)
    out = []
    for k, (xc, tc) in enumerate(zip(x.split(batch_size), targets.split(batch_size))):
        if stochastic:
            kwargs["seed"] = seed * 7919 + k
        out.append(saliency.explain(method, model, xc, tc, **kwargs))
    return torch.cat(out)


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
) -> UnitResult:
    """Per-pair records (REFERENCE.md, step 6) for `images01` ([B,C,H,W] in [0,1]).

    ``precision`` (:mod:`cose.precision`): of the saliency passes; everything else
    (predictions, transforms, similarity) runs in fp32."""
    P.check(precision)
    settings = settings or {}
    checkpoints = checkpoints or {}
    B, _, H, W = images01.shape
    x = normalize(images01)
    pred = predict(model, x, batch_size)

    def maps(m: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, salt: int):
        """Saliency maps of `m` at the unit's precision (predictions stay fp32)."""
        run = P.wrap(m, precision, method, inputs[:1])
        with P.flags(precision):
            return _explain(method, run, inputs, targets, settings, batch_size, salt)

    map0 = maps(model, x, pred, seed)
    labels = labels.to(images01.device)

    # every variant: (type, magnitudes [B], maps [B,H,W] in the original frame, t_pred, mask)
    variants: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]] = []

    # transforms: all variants of all images in one batch through the model
    names: list[str] = []
    mags: list[torch.Tensor] = []
    for name in transforms:
        m = draw_magnitudes(name, magnitudes, test_idx, seed, W).to(images01.device)
        for j in range(m.shape[1]):
            names.append(name)
            mags.append(m[:, j])
    if names:
        xall = torch.cat([normalize(T.apply(n, images01, m)) for n, m in zip(names, mags)])
        tpred_all = predict(model, xall, batch_size)
        maps_all = maps(model, xall, tpred_all, seed + 1)
        del xall
        for k, (n, m) in enumerate(zip(names, mags)):
            mv, tp = maps_all[k * B : (k + 1) * B], tpred_all[k * B : (k + 1) * B]
            mask = None
            if n in T.GEOMETRIC:
                mv = T.invert(n, mv, m)
                mask = T.valid_mask(n, m, H, W, images01.device)
            variants.append((n, m, mv, tp, mask))

    # model changes on the original images
    zeros = torch.zeros(B, device=images01.device)
    others = ([("random", random_model)] if random_model is not None else []) + list(
        checkpoints.items()
    )
    for k, (tag, vmodel) in enumerate(others):
        tp = predict(vmodel, x, batch_size)
        mv = maps(vmodel, x, tp, seed + 2 + k)
        variants.append((tag, zeros, mv, tp, None))

    cols: dict[str, list] = {c: [] for c in PAIR_COLUMNS}
    for masked in (False, True):
        group = [v for v in variants if (v[4] is not None) == masked]
        if not group:
            continue
        a = map0.repeat(len(group), 1, 1)
        b = torch.cat([v[2] for v in group])
        mask = torch.cat([v[4] for v in group]) if masked else None
        s_all = similarity.ssim(a, b, mask).tolist()
        r_all = similarity.spearman(a, b, mask).tolist()
        for k, (n, m, _, tp, _) in enumerate(group):
            cols["test_idx"] += list(map(int, test_idx))
            cols["target_class"] += labels.tolist()
            cols["pred_class"] += pred.tolist()
            cols["transform_type"] += [n] * B
            cols["transform_magnitude"] += m.tolist()
            cols["t_pred_class"] += tp.tolist()
            cols["ssim"] += s_all[k * B : (k + 1) * B]
            cols["spearman"] += r_all[k * B : (k + 1) * B]

    keep = min(keep_samples, B)
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
            "variant_names": np.asarray([v[0] for v in variants]),
            "variant_magnitudes": np.stack([v[1][:keep].cpu().numpy() for v in variants]),
            "variant_maps": np.stack([v[2][:keep].float().cpu().numpy() for v in variants]),
            "variant_pred": np.stack([v[3][:keep].cpu().numpy() for v in variants]),
        }
    return UnitResult(pairs=pairs, samples=out)
