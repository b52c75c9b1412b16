"""Which test images a run explains, and the magnitudes drawn for each.

Two rules (``explain.selection``):

- ``shared`` (default): the first N images of one seeded permutation of the test split
  (``torch.randperm``), the same for every model and method (a method with fewer images takes
  the first N of them); each image's magnitudes come from a generator seeded by
  (seed, image, transform), so they do not depend on how images are grouped. Models are
  compared on the same images.
- ``reference``: the official explain loop's numpy stream, as ``src/explain.py`` consumes it:
  ``np.random.seed(seed)`` once, then for each model of the official run in turn a
  ``np.random.shuffle`` of the test indices, and for each image ``ctr = 0 .. end`` (the end
  index INCLUSIVE: 501 images for ``images: 500``), for each transform in the official config's
  order, ``np.random.choice`` of ``count`` signed magnitudes without replacement. Each model
  of a run sees another image set. A user holding the authors' checkpoints regenerates their
  per-pair rows (image, transform, magnitude) with it. The official SmoothGrad (PAIR's noise)
  and LIME (its perturbation matrix) draw from the same global stream between these draws, so
  their image and magnitude sequence depends on their own draws: ``reference`` is refused for
  them (:data:`STREAM_CONSUMERS`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

SELECTIONS: tuple[str, ...] = ("shared", "reference")

#: the transform_types of the official explain configs, in their order ("random" and
#: "mid_ckpt" draw no magnitude)
OFFICIAL_TRANSFORMS: tuple[str, ...] = (
    "random", "mid_ckpt", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
    "Contrast", "Sharpness", "AutoContrast", "Equalize", "FlipLR", "FlipUD", "Blur", "Smooth",
)
#: the official run's models (configs/trained_models/*.yaml, in that order; VGG16 is commented
#: out there), as registry names: the stream passes through each in turn
OFFICIAL_MODELS: tuple[str, ...] = (
    "convnext_s", "spark_convnext_s", "densenet121", "dino_resnet50", "dino_vit_b16",
    "ibot_swin_t", "ibot_vit_b16", "mocov3_resnet50", "mocov3_vit_b16", "resnet50", "swin_t",
    "vit_b16",
)
#: methods whose official implementation draws from numpy's global stream per map
STREAM_CONSUMERS: frozenset[str] = frozenset({"smoothgrad", "lime"})


def shared_subset(n: int, k: int | None, seed: int) -> tuple[int, ...]:
    """The first ``k`` of a seeded permutation of ``range(n)`` (all ``n`` for None): the
    ``shared`` rule's test images, ``cose evaluate --images``'s and ``train.max_train_images``'
    subset. ``torch.randperm`` with a generator seeded by ``seed``."""
    import torch

    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return tuple(order[:k].tolist() if k is not None else order.tolist())


@dataclass(frozen=True)
class Selection:
    """The images of one (dataset, model, method): test-split indices in explain order and,
    for ``reference``, the magnitudes drawn per image ({transform: [n, count] float32});
    empty ``draws`` means each image's magnitudes come from its own seeded generator."""

    test_idx: tuple[int, ...]
    draws: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.test_idx)


def official_grid(name: str, size: int | Sequence[int] = 224) -> np.ndarray:
    """The official choice array of a signed transform: ``(tensor([1, -1]) @ linspace(0, max,
    31))[!= 0]``, i.e. +bins 1..30 then -bins 1..30, float32."""
    from cose import transforms as T

    positive = [v for v in T.magnitude_grid(name, size) if v > 0]
    return np.asarray(positive + [-v for v in positive], dtype=np.float32)


def reference_stream(
    n_test: int,
    models: Sequence[str],
    images: int,
    *,
    count: int = 6,
    seed: int = 0,
    size: int | Sequence[int] = 224,
) -> dict[str, Selection]:
    """Each model's selection under the official stream (see the module doc): ``images`` is
    the official ``end_idx`` (``images + 1`` explained, fewer if the split is shorter),
    ``count`` the official ``mag_per_transform``, ``models`` the run's model order."""
    if n_test < 1:
        raise ValueError(f"reference selection: the test split is empty (n_test={n_test})")
    from cose import transforms as T

    grids = {t: official_grid(t, size) for t in OFFICIAL_TRANSFORMS if t in T.SIGNED}
    rs = np.random.RandomState(seed)  # np.random.seed(seed): the legacy global stream
    out: dict[str, Selection] = {}
    for model in models:
        order = np.arange(n_test)
        rs.shuffle(order)
        chosen: list[int] = []
        draws: dict[str, list[np.ndarray]] = {t: [] for t in grids}
        for ctr, i in enumerate(order):
            chosen.append(int(i))
            for t in OFFICIAL_TRANSFORMS:
                if t in grids:
                    draws[t].append(rs.choice(grids[t], size=count, replace=False))
            if ctr >= images:
                break
        out[model] = Selection(tuple(chosen), {t: np.stack(v) for t, v in draws.items()})
    return out
