"""The explain path's library layer, under both ``cose.evaluate`` and the explain stage.

- :class:`Pair`: one (dataset, model)'s loaded inputs: the model, its random-init copy and
  checkpoints, the images in [0,1] with labels and ids, the normalisation.
- :class:`Options`: what a unit computes (transforms, magnitudes, seed, per-method settings,
  batch size, precision, noise floor, kept sample maps); :meth:`Options.from_config` reads
  them from params, ``cose.evaluate`` from its arguments.
- :func:`explain_chunk`: one work unit (images of one method) through
  :func:`cose.engine.explain_unit`; :func:`explain_pair` every method and chunk of a pair
  (the API's loop); :func:`tag_rows` the per-pair table's (dataset, model, method) columns.

The stage plans units, runs :func:`explain_chunk` on a backend and merges the shards; the API
calls :func:`explain_pair`. Both reach the engine through the same two calls, so the same
images, models and options give the same rows (tests/test_architecture.py checks it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import nn

from cose import engine, spec

__all__ = ["Options", "Pair", "explain_chunk", "explain_pair", "tag_rows"]

log = logging.getLogger("cose.explain")


@dataclass
class Pair:
    """A (dataset, model)'s inputs, on the model's device. ``ids``: the images' ids (test-split
    indices); each image's magnitude draws depend on its id, not on its position."""

    model: nn.Module
    images: torch.Tensor  # [N,C,H,W] in [0,1]
    labels: torch.Tensor  # [N] int64
    ids: list[int]
    normalize: Callable[[torch.Tensor], torch.Tensor]
    random_model: nn.Module | None = None
    checkpoints: dict[str, nn.Module] = field(default_factory=dict)  # transform_type -> model
    dataset: str = "custom"
    name: str = "model"

    def __post_init__(self) -> None:
        self._row = {int(i): r for r, i in enumerate(self.ids)}

    def select(self, ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The images and labels of ``ids`` (in that order)."""
        rows = torch.tensor([self._row[int(i)] for i in ids], device=self.images.device)
        return self.images[rows], self.labels[rows]


@dataclass(frozen=True)
class Options:
    """What each unit computes; the same for every unit of a run."""

    transforms: tuple[str, ...]
    magnitudes: int = 6
    seed: int = 0
    settings: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    batch_size: int = 256
    precision: str = "auto"
    noise_floor: bool = True  # the "seed" variant, for the stochastic methods
    sample_maps: int = 2  # maps kept of the first images (of a method's first chunk)

    @classmethod
    def from_config(cls, cfg: Any) -> Options:
        e = cfg.explain
        return cls(transforms=tuple(e.transforms), magnitudes=e.magnitudes, seed=e.seed,
                   settings=e.settings, batch_size=e.batch_size, precision=e.precision,
                   noise_floor=e.noise_floor, sample_maps=e.sample_maps)

    def noise_floor_for(self, method: str) -> bool:
        return self.noise_floor and spec.method(method).stochastic


def explain_chunk(pair: Pair, method: str, ids: Sequence[int], opts: Options, *,
                  first: bool = False, draws: Mapping[str, torch.Tensor] | None = None
                  ) -> engine.UnitResult:
    """One unit: the images ``ids`` of ``pair`` under ``method``. ``first``: the method's
    first chunk, which keeps the sample maps; ``draws``: given magnitudes (reference
    selection) instead of each image's own generator's."""
    ids = [int(i) for i in ids]
    images, labels = pair.select(ids)
    return engine.explain_unit(
        pair.model, images, labels, ids, method, pair.normalize,
        transforms=opts.transforms, magnitudes=opts.magnitudes, seed=opts.seed,
        random_model=pair.random_model, checkpoints=pair.checkpoints,
        settings=dict(opts.settings.get(method, {})), batch_size=opts.batch_size,
        keep_samples=opts.sample_maps if first else 0, precision=opts.precision,
        draws=draws or None, noise_floor=opts.noise_floor_for(method))


def tag_rows(pairs: pd.DataFrame, dataset: str, model: str, method: str) -> pd.DataFrame:
    """A unit's records with their (dataset, model, saliency_method) columns in front."""
    out = pairs.copy()
    out.insert(0, "saliency_method", method)
    out.insert(0, "model", model)
    out.insert(0, "dataset", dataset)
    return out


def explain_pair(pair: Pair, methods: Sequence[str], opts: Options, chunk_size: int,
                 progress: bool = False) -> tuple[pd.DataFrame, dict[str, dict]]:
    """Every method on every image of ``pair``, in chunks of ``chunk_size`` images (as the
    stage's shards): the tagged per-pair table and each method's sample maps."""
    from tqdm.auto import tqdm

    n = len(pair.ids)
    chunks = [pair.ids[s : s + chunk_size] for s in range(0, n, chunk_size)]
    frames, samples = [], {}
    with tqdm(total=len(methods) * len(chunks), desc="cose.evaluate", unit="unit",
              disable=not progress, dynamic_ncols=True) as bar:
        for method in methods:
            parts = []
            for k, ids in enumerate(chunks):
                bar.set_postfix_str(f"{method} images {k * chunk_size}-"
                                    f"{k * chunk_size + len(ids) - 1}")
                res = explain_chunk(pair, method, ids, opts, first=k == 0)
                parts.append(res.pairs)
                if res.samples:
                    samples[method] = res.samples
                bar.update()
                log.debug("%s: chunk %d: %d pairs", method, k, len(res.pairs))
            frames.append(tag_rows(pd.concat(parts, ignore_index=True), pair.dataset,
                                   pair.name, method))
    return pd.concat(frames, ignore_index=True), samples
