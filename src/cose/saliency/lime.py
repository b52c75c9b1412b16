"""LIME as the `lime` package computes it, with the model calls batched across images.

Per image, exactly the reference's call: with numpy's global stream freshly seeded by `seed`,
lime_image.LimeImageExplainer().explain_instance(image, classifier_fn, top_labels=5,
hide_color=0, random_seed=seed, num_samples=samples) followed by
get_image_and_mask(target, positive_only=False, num_features=num_features):

- `image` is the tensor the model receives (normalised), as HWC float32 numpy (the reference's
  `np.moveaxis(inputs.numpy(), 0, 2)`; quickshift on a float64 copy finds other superpixels
  on some images);
- quickshift superpixels (lime's default: kernel_size=4, max_dist=200, ratio=0.2,
  random_seed=seed), through lime's own SegmentationAlgorithm wrapper; on images of another
  size the superpixels keep the reference's geometry: kernel_size = max(1, 4 side / 224),
  max_dist = 200 side / 224 (side = the shorter image side; exactly 4 and 200 at 224 px),
  so a 32 px image is not one segment (settings kernel_size, max_dist, ratio override);
- a RandomState(seed) draws the on/off matrix (row 0 all on), as the reference's explainer
  draws it from numpy's global stream (seeded once per run there: its state then depends on
  every earlier draw, which no rerun reproduces); a hidden superpixel is set to 0 (hide
  colour 0, in the normalised space the model sees);
- classifier_fn = softmax of the model; here every perturbed image of every image in the call
  goes through the model `batch_size` at a time on the model's device, each distinct on/off
  pattern of an image once (lime evaluates repeats again; the outputs are the same);
- lime's LimeBase (cosine distances, kernel sqrt(exp(-d^2/0.25^2)), "auto" feature selection,
  Ridge(alpha=1)) fits the explanation for the class `targets[i]` (the reference explained its
  top label, which is the prediction it passed as target);
- map: +1 / -1 on the `num_features` segments with the largest |weight| by sign, 0 elsewhere.

Each image gets a fresh RandomState(seed), so a map does not depend on the batch it came in
(seed=None: fresh OS entropy, not reproducible).
Single-channel images are segmented as gray2rgb (as lime does); other channel counts on the
channel mean.
"""

from __future__ import annotations

import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import nn

from cose.saliency import _core
from cose.saliency.postprocess import lime_mask

KERNEL_WIDTH = 0.25
#: fewer superpixels than this on an image makes its map nearly constant: a warning says so
MIN_SEGMENTS = 3


def _kernel(d: np.ndarray) -> np.ndarray:
    return np.sqrt(np.exp(-(d**2) / KERNEL_WIDTH**2))


REFERENCE_SIDE = 224
KERNEL_SIZE, MAX_DIST, RATIO = 4.0, 200.0, 0.2


def segmentation_settings(height: int, width: int, kernel_size: float | None = None,
                          max_dist: float | None = None) -> tuple[float, float]:
    """quickshift's (kernel_size, max_dist): lime's defaults at 224 px, scaled with the image
    (a kernel of at least 1 pixel) unless given."""
    side = min(height, width)
    if kernel_size is None:
        kernel_size = max(1.0, KERNEL_SIZE * side / REFERENCE_SIDE)
    if max_dist is None:
        max_dist = MAX_DIST * side / REFERENCE_SIDE
    return float(kernel_size), float(max_dist)


def segment(image_hwc: np.ndarray, random_seed: int, kernel_size: float = KERNEL_SIZE,
            max_dist: float = MAX_DIST, ratio: float = RATIO) -> np.ndarray:
    """lime's segmentation of one HWC image (quickshift seeded by `random_seed`; lime's
    defaults unless given)."""
    from lime.wrappers.scikit_image import SegmentationAlgorithm
    from skimage.color import gray2rgb

    if image_hwc.shape[2] == 3:
        img = image_hwc
    elif image_hwc.shape[2] == 1:
        img = gray2rgb(image_hwc[..., 0])
    else:
        img = gray2rgb(image_hwc.mean(2))
    seg = SegmentationAlgorithm(
        "quickshift", kernel_size=kernel_size, max_dist=max_dist, ratio=ratio,
        random_seed=random_seed
    )
    return seg(img)


def _forward_streamed(model: nn.Module, x: torch.Tensor, targets: torch.Tensor,
                      max_target: int, ready, batch_size: int, clock: dict[str, float]):
    """The target-class probability of each distinct perturbation of each image, as images
    arrive from ``ready`` (in order: (RandomState, segments, on/off rows) each): their
    rows are queued and go through the model ``batch_size`` at a time, a batch spanning
    images as over one concatenation of all rows. A perturbation that occurs twice is
    evaluated once (with few superpixels - small images - most of the samples repeat; with
    ~50, none do). Returns the states, segments, on/off rows, the inverse of each image's
    unique rows and each image's probabilities (float64, on the model's device)."""
    dev = x.device
    H, W = x.shape[-2:]
    states, segs, datas, inverse, probs = [], [], [], [], []
    queue: list[tuple[int, torch.Tensor, int]] = []  # (image, its unique rows, first row)
    queued = 0

    def run(rows: int) -> None:
        """The first ``rows`` queued perturbations through the model, as one batch."""
        nonlocal queued
        t0 = time.perf_counter()
        inputs, where, take = [], [], rows
        while take:
            i, onoff, lo = queue[0]
            n = min(take, onoff.shape[0] - lo)
            seg = segs_dev[i]
            keep = torch.gather(onoff[lo : lo + n], 1, seg.expand(n, -1))
            inputs.append(x[i] * keep.view(n, 1, H, W).to(x.dtype))
            where.append((i, lo, lo + n))
            take -= n
            if lo + n == onoff.shape[0]:
                queue.pop(0)
            else:
                queue[0] = (i, onoff, lo + n)
        queued -= rows
        with torch.inference_mode():
            logits = model(torch.cat(inputs))
            _core.check_num_classes(logits, max_target)
            p = torch.softmax(logits.float(), dim=1)
            idx = torch.cat([targets[i].view(1).expand(hi - lo) for i, lo, hi in where])
            p = p.gather(1, idx.view(-1, 1).to(dev))[:, 0].double()
        k = 0
        for i, lo, hi in where:
            probs[i][lo:hi] = p[k : k + hi - lo]
            k += hi - lo
        if dev.type == "cuda":  # the time the batch took, not the time to queue it
            torch.cuda.synchronize(dev)
        clock["forward"] += time.perf_counter() - t0
        clock["forward_rows"] += rows

    segs_dev: list[torch.Tensor] = []
    for i, (rs, seg, data) in enumerate(ready):
        states.append(rs)
        segs.append(seg)
        datas.append(data)
        u, inv = np.unique(data, axis=0, return_inverse=True)
        inverse.append(inv.reshape(-1))
        segs_dev.append(torch.from_numpy(seg.astype(np.int64)).to(dev).view(1, H * W))
        onoff = torch.from_numpy(u.astype(np.uint8)).to(dev)
        probs.append(torch.empty(u.shape[0], dtype=torch.float64, device=dev))
        queue.append((i, onoff, 0))
        queued += u.shape[0]
        while queued >= batch_size:
            run(batch_size)
    if queued:
        run(queued)
    return states, segs, datas, inverse, probs


def compute(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    max_target: int,
    *,
    samples: int = 1000,
    num_features: int = 10,
    seed: int | None = 0,
    batch_size: int = 64,
    kernel_size: float | None = None,
    max_dist: float | None = None,
    ratio: float = RATIO,
    overlap: bool | None = None,
    phases: dict[str, float] | None = None,
) -> torch.Tensor:
    """LIME maps of ``images`` (module docstring). ``overlap``: segment on threads while the
    model runs the perturbations of the images segmented so far (None: only when the model is
    off the CPU; on the CPU the threads would share the cores with torch's own, whose OpenMP
    barriers stall behind them: there every image is segmented first, on threads, then the
    model runs). ``phases``: a dict that receives the seconds of each phase (``segment``,
    ``forward``, ``fit``, ``mask``, ``total``), the forward rows and whether it overlapped."""
    import sklearn.metrics
    from lime.lime_base import LimeBase

    start = time.perf_counter()
    x = images.detach().float()
    B, C, H, W = x.shape
    ks, md = segmentation_settings(H, W, kernel_size, max_dist)
    hwc = x.permute(0, 2, 3, 1).cpu().numpy()  # float32, as the reference segments it
    clock = {"segment": 0.0, "forward": 0.0, "forward_rows": 0, "fit": 0.0, "mask": 0.0}

    def prepare(i):
        rs = np.random.RandomState(None if seed is None else int(seed))
        # seed None: a fresh segmentation seed too (lime draws one from its RandomState)
        seg = segment(hwc[i], rs.randint(0, high=1000) if seed is None else int(seed),
                      ks, md, ratio)
        n_feat = np.unique(seg).shape[0]
        data = rs.randint(0, 2, samples * n_feat).reshape((samples, n_feat))
        data[0, :] = 1
        return rs, seg, data

    # quickshift runs without the GIL: the images are segmented on parallel threads (each has
    # its own RandomState, so nothing depends on the scheduling); with ``overlap`` the model
    # already runs the perturbations of the images segmented so far. Either way the forward
    # batches are the same batch_size rows, in the same order, as over all images at once.
    if overlap is None:
        overlap = x.device.type != "cpu"
    workers = min(B, max(1, torch.get_num_threads()))
    pool = ThreadPoolExecutor(workers) if workers > 1 else None
    try:
        t0 = time.perf_counter()
        if pool is not None:
            futures = [pool.submit(prepare, i) for i in range(B)]
            ready = (f.result() for f in futures)
        else:
            ready = (prepare(i) for i in range(B))
        if not overlap:
            ready = list(ready)
            clock["segment"] = time.perf_counter() - t0
        states, segs, datas, inverse, probs = _forward_streamed(
            model, x, targets, max_target, ready, batch_size, clock)
        if overlap:  # the part of the stage the model did not cover
            clock["segment"] = time.perf_counter() - t0 - clock["forward"]
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    few = [int(d.shape[1]) for d in datas if d.shape[1] < MIN_SEGMENTS]
    if few:
        warnings.warn(
            f"LIME: {len(few)} of {B} images have fewer than {MIN_SEGMENTS} superpixels "
            f"({min(few)} at least): their maps are (nearly) constant; lower "
            f"explain.settings.lime.kernel_size / max_dist (now {ks:g} / {md:g})", stacklevel=2)
    seg_t = torch.from_numpy(np.stack(segs).astype(np.int64))
    probs_np = [p.cpu().numpy() for p in probs]
    labels = [probs_np[i][inverse[i]] for i in range(B)]

    t0 = time.perf_counter()
    explanations = []
    for i in range(B):
        data = datas[i]
        distances = sklearn.metrics.pairwise_distances(
            data, data[0].reshape(1, -1), metric="cosine"
        ).ravel()
        base = LimeBase(_kernel, verbose=False, random_state=states[i])
        _, exp, _, _ = base.explain_instance_with_data(
            data, labels[i].reshape(-1, 1), distances, 0, 100000, feature_selection="auto"
        )
        explanations.append(exp)
    t1 = time.perf_counter()
    out = lime_mask(seg_t, explanations, num_features).to(images.device)
    clock.update(fit=t1 - t0, mask=time.perf_counter() - t1)
    if phases is not None:
        phases.update(clock, total=time.perf_counter() - start, overlap=bool(overlap))
    return out
