"""Batched similarity of saliency maps: SSIM and Spearman rank correlation.

Both take ``[B,H,W]`` maps (and an optional bool mask ``[B,H,W]``), run on the maps' device and
return one float64 value per sample (float32 on MPS).

- ``ssim``: skimage ``structural_similarity(a, b, win_size=5, data_range=max(range(a),
  range(b)), full=True)``: uniform 5x5 window, sample covariance, K1=0.01, K2=0.03, scipy
  ``reflect`` borders. Without a mask the mean of the SSIM image minus its 2-pixel border (what
  skimage returns); with a mask the mean of the full SSIM image over the mask eroded by a 5x5
  square as skimage's ``binary_erosion`` erodes it (outside the image counts as set, so the
  image border is not eroded): the reference's ``get_similarity``.
  NaN where undefined: both maps constant (data range 0), non-finite values, empty eroded mask.
- ``spearman``: scipy ``spearmanr`` (ranks with averaged ties, Pearson of the ranks) over all
  pixels or the masked ones. NaN where undefined: fewer than 2 pixels, a constant side,
  non-finite values.

Speed: on the CPU (float32 and float64 SSIM, float32 Spearman) the work is done by compiled
kernels (:mod:`cose._similarity_cpu`, numba: fused SSIM window sums, exact radix-sort ranks)
over chunks of pairs spread on a small thread pool (``torch.get_num_threads()`` workers);
every other device or dtype runs the torch code below, the same semantics.
See docs/metric.md for tolerances against skimage/scipy and the deliberate deviations.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["ssim", "spearman", "erode_mask", "WIN_SIZE", "K1", "K2"]

WIN_SIZE = 5
K1 = 0.01
K2 = 0.03


def _result_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _check_pair(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None, what: str):
    for label, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{what}: {label} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 3:
            raise ValueError(f"{what}: maps must be [B,H,W], got {label} of shape {tuple(t.shape)}")
    if a.shape != b.shape:
        raise ValueError(f"{what}: maps differ in shape: a {tuple(a.shape)} vs b {tuple(b.shape)}")
    if a.is_complex() or b.is_complex():
        raise ValueError(f"{what}: maps must be real-valued")
    dev = a.device
    b = b.to(dev)
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise ValueError(f"{what}: mask must be a bool torch.Tensor, got {type(mask).__name__}")
        if mask.shape != a.shape:
            raise ValueError(
                f"{what}: mask shape {tuple(mask.shape)} does not match maps {tuple(a.shape)}"
            )
        if mask.dtype != torch.bool:
            raise ValueError(f"{what}: mask must have dtype torch.bool, got {mask.dtype}")
        mask = mask.to(dev)
    work = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    if dev.type == "mps":
        work = torch.float32
    # similarity is a measurement, not part of a graph: no gradients flow through it
    return a.detach().to(work), b.detach().to(work), mask


def _row_range(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (min, max, finite) of [B, ...]; min/max propagate NaN, so no extra pass."""
    lo, hi = torch.aminmax(x.flatten(1), dim=1)
    return lo, hi, torch.isfinite(lo) & torch.isfinite(hi)


def _chunk_rows(x: torch.Tensor) -> int:
    """Rows per chunk: a few on CPU so that the working set stays in cache."""
    per_row = x[0].numel()
    if x.device.type == "cpu":
        return max(1, 2**18 // per_row)
    return max(1, 2**24 // per_row)


_POOL: ThreadPoolExecutor | None = None
_POOL_KEY: tuple[int, int] | None = None
_POOL_LOCK = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    """A process-local thread pool (rebuilt after fork or a change of torch threads)."""
    global _POOL, _POOL_KEY
    key = (os.getpid(), workers)
    with _POOL_LOCK:
        if _POOL is None or _POOL_KEY != key:
            if _POOL is not None and _POOL_KEY is not None and _POOL_KEY[0] == os.getpid():
                _POOL.shutdown(wait=False)
            _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cose-similarity")
            _POOL_KEY = key
        return _POOL


_THREADS_LOCK = threading.RLock()


def _reset_after_fork() -> None:  # locks held by threads of the parent would never be released
    global _POOL, _POOL_KEY, _POOL_LOCK, _THREADS_LOCK
    _POOL, _POOL_KEY = None, None
    _POOL_LOCK = threading.Lock()
    _THREADS_LOCK = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


@contextlib.contextmanager
def _cpu_workers(device: torch.device):
    """Yield the number of chunk workers; on the CPU run torch single-threaded meanwhile.

    On a busy machine, OpenMP-parallel torch ops stall (a descheduled OpenMP thread holds up
    every barrier: single ops took 100x their time at load 10 on 2 cores); independent chunks
    on plain Python threads do not. While this holds, torch's intra-op thread count is 1
    process-wide (restored afterwards).
    """
    workers = torch.get_num_threads()
    if device.type != "cpu" or workers <= 1:
        yield workers
        return
    with _THREADS_LOCK:
        torch.set_num_threads(1)
        try:
            yield workers
        finally:
            torch.set_num_threads(workers)


def _map_chunks(fn, chunks: list, workers: int) -> list:
    """``[fn(c) for c in chunks]``, spread over ``workers`` threads when more than one."""
    if workers <= 1 or len(chunks) <= 1:
        return [fn(c) for c in chunks]
    return list(_pool(workers).map(fn, chunks))


# --------------------------------------------------------------------------- SSIM


def _fill_reflect(p: torch.Tensor, pad: int) -> None:
    """Fill the ``pad`` border of [..., H+2p, W+2p] in place, scipy.ndimage 'reflect'
    (d c b a | a b c d | d c b a), from its interior."""
    hp, wp = p.shape[-2:]
    h, w = hp - 2 * pad, wp - 2 * pad
    inner = slice(pad, pad + w)
    p[..., :pad, inner] = p[..., pad : 2 * pad, inner].flip(-2)
    p[..., pad + h :, inner] = p[..., h : h + pad, inner].flip(-2)
    p[..., :, :pad] = p[..., :, pad : 2 * pad].flip(-1)
    p[..., :, pad + w :] = p[..., :, w : w + pad].flip(-1)


def _box5(p: torch.Tensor, dim: int) -> torch.Tensor:
    """Sums over 5 consecutive entries along ``dim`` ('valid'): 3 additions."""
    n = p.shape[dim]
    s2 = p.narrow(dim, 0, n - 1) + p.narrow(dim, 1, n - 1)  # i, i+1
    s4 = s2.narrow(dim, 0, n - 3) + s2.narrow(dim, 2, n - 3)  # i .. i+3
    return s4.narrow(dim, 0, n - 4).add_(p.narrow(dim, 4, n - 4))  # i .. i+4


def _ssim_image(a: torch.Tensor, b: torch.Tensor, centre: torch.Tensor, inv: torch.Tensor):
    """SSIM image of [c,H,W] maps (skimage, win 5), computed on (map - centre) * inv.

    Uses window sums S instead of means: with n = 25 and sample covariance
    v = (n S_xx - S_x^2) / (n (n-1)), skimage's SSIM is
    (2 Tx Ty + n^2 C1) (2 (n S_xy - S_x S_y) + n(n-1) C2)
    / ((Tx^2 + Ty^2 + n^2 C1) (n (S_xx + S_yy) - S_x^2 - S_y^2 + n(n-1) C2)),
    T = S + n * centre * inv the sums of the scaled, uncentred maps. Scaling by 1 / data_range
    makes C1 = K1^2, C2 = K2^2; centring keeps the variances well conditioned in float32.
    """
    c, h, w = a.shape
    pad = WIN_SIZE // 2
    n = WIN_SIZE * WIN_SIZE
    q = torch.empty((c, 4, h + 2 * pad, w + 2 * pad), dtype=a.dtype, device=a.device)
    for k, src in ((0, a), (1, b)):
        interior = q[:, k, pad : pad + h, pad : pad + w]
        torch.sub(src, centre, out=interior)
        interior.mul_(inv)
    _fill_reflect(q[:, :2], pad)
    x, y = q[:, 0], q[:, 1]
    torch.mul(x, x, out=q[:, 2])
    q[:, 2].addcmul_(y, y)
    torch.mul(x, y, out=q[:, 3])
    s = _box5(_box5(q, 2), 3)
    sx, sy, sxxyy, sxy = s.unbind(dim=1)
    k1 = n * n * K1 * K1
    k2 = n * (n - 1) * K2 * K2
    pc = sx * sy
    num2 = sxy.mul(2 * n).sub_(pc, alpha=2).add_(k2)
    den2 = sxxyy.mul(n).sub_(sx * sx).sub_(sy * sy).add_(k2)
    shift = centre * inv * n
    tx = sx + shift
    ty = sy + shift
    num1 = (tx * ty).mul_(2).add_(k1)
    den1 = (tx * tx).addcmul_(ty, ty).add_(k1)
    return num1.mul_(num2).div_(den1.mul_(den2))


def _and5(p: torch.Tensor, dim: int) -> torch.Tensor:
    """Logical AND over 5 consecutive entries along ``dim`` ('valid'): 3 operations."""
    n = p.shape[dim]
    a2 = p.narrow(dim, 0, n - 1) & p.narrow(dim, 1, n - 1)
    a4 = a2.narrow(dim, 0, n - 3) & a2.narrow(dim, 2, n - 3)
    return a4.narrow(dim, 0, n - 4) & p.narrow(dim, 4, n - 4)


def erode_mask(mask: torch.Tensor, win: int = WIN_SIZE) -> torch.Tensor:
    """Erode bool [B,H,W] by a ``win`` x ``win`` square; outside the image counts as True, as
    skimage's ``binary_erosion`` (the reference's ``get_similarity``) treats it: only the edges
    of the valid region inside the image are eroded, not the image border."""
    pad = win // 2
    if win != 5:
        outside = F.pad((~mask).unsqueeze(1).to(torch.float32), (pad,) * 4, value=0.0)
        return F.max_pool2d(outside, kernel_size=win, stride=1).squeeze(1) == 0
    b, h, w = mask.shape
    padded = torch.ones((b, h + 2 * pad, w + 2 * pad), dtype=torch.bool, device=mask.device)
    padded[:, pad : pad + h, pad : pad + w] = mask
    return _and5(_and5(padded, 1), 2)


def ssim(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample SSIM of maps ``a``, ``b`` [B,H,W] (skimage semantics, win 5); Tensor[B].

    ``data_range`` per sample is the larger of the two maps' ranges (max - min over the whole
    map, mask or not). With ``mask`` (bool [B,H,W]) the full SSIM image (border included) is
    averaged over the mask eroded by 5x5 (:func:`erode_mask`). NaN where undefined. SSIM
    lies in [-1, 1]: float round-off beyond is clipped, and two identical maps score exactly 1
    (a deterministic method's noise floor).
    """
    with _cpu_workers(a.device if isinstance(a, torch.Tensor) else torch.device("cpu")) as n:
        value = _ssim(a, b, mask, n)
    same = (a == b.to(a.device)).flatten(1).all(1).to(value.device)
    value = value.clamp(-1.0, 1.0)  # NaN stays NaN
    return torch.where(same & ~value.isnan(), torch.ones_like(value), value)


def _ssim(a, b, mask, workers: int) -> torch.Tensor:
    a, b, mask = _check_pair(a, b, mask, "ssim")
    bsz, h, w = a.shape
    if h < WIN_SIZE or w < WIN_SIZE:
        raise ValueError(f"ssim: maps of {h}x{w} are smaller than the {WIN_SIZE}x{WIN_SIZE} window")
    out_dtype = _result_dtype(a.device)
    if bsz == 0:
        return torch.empty(0, dtype=out_dtype, device=a.device)
    keep = erode_mask(mask) if mask is not None else None
    if _compiled_cpu(a):
        return _ssim_compiled(a, b, keep, workers)
    amin, amax, afin = _row_range(a)
    bmin, bmax, bfin = _row_range(b)
    rng = torch.maximum(amax - amin, bmax - bmin)
    ok = afin & bfin & (rng > 0)
    one = torch.ones_like(rng)
    inv = torch.where(ok, one / torch.where(ok, rng, one), one).view(-1, 1, 1)
    centre = torch.where(ok, (amin + amax + bmin + bmax) / 4, 0 * one).view(-1, 1, 1)
    keepf = keep.to(a.dtype) if keep is not None else None
    pad = WIN_SIZE // 2
    step = _chunk_rows(a)
    chunks = [slice(i, min(i + step, bsz)) for i in range(0, bsz, step)]

    def work(sl: slice) -> torch.Tensor:
        s = _ssim_image(a[sl], b[sl], centre[sl], inv[sl])
        if keepf is None:
            s = s[:, pad : h - pad, pad : w - pad]
        else:
            s = s.mul_(keepf[sl])
        return s.sum(dim=(1, 2))

    totals = _map_chunks(work, chunks, workers)
    total = torch.cat(totals).to(out_dtype)
    if keepf is None:
        count = torch.full_like(total, (h - 2 * pad) * (w - 2 * pad))
    else:
        count = keepf.sum(dim=(1, 2)).to(out_dtype)
        ok = ok & (count > 0)
    value = total / count.clamp(min=1)
    # a NaN/inf sample computes on garbage: the result is NaN whatever it gave
    return torch.where(ok, value, torch.full_like(value, float("nan")))


@functools.cache
def _kernels_available() -> bool:
    """numba is a dependency; where it cannot be imported (a bare GPU image, a platform
    without its wheels) the CPU runs the torch code, same results, slower."""
    try:
        from cose import _similarity_cpu  # noqa: F401
    except ImportError:
        return False
    return True


def _compiled_cpu(x: torch.Tensor) -> bool:
    """Whether the compiled CPU kernels (:mod:`cose._similarity_cpu`) take ``x``."""
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and sys.byteorder == "little"
        and _kernels_available()
    )


def _ssim_compiled(a, b, keep, workers: int) -> torch.Tensor:
    from cose import _similarity_cpu as kernels

    bsz = a.shape[0]
    # one original expanded against many variants: pass its one row (no copies)
    one = bsz > 1 and a.stride(0) == 0
    an = (a[:1] if one else a).contiguous().numpy()
    bn = b.contiguous().numpy()
    kn = keep.contiguous().numpy() if keep is not None else np.zeros((1, 1, 1), dtype=bool)
    total = np.empty(bsz, dtype=np.float64)
    count = np.empty(bsz, dtype=np.float64)
    ok = np.empty(bsz, dtype=bool)
    chunks = _compiled_chunks(bsz, workers)
    a_flat = an.reshape(an.shape[0], -1)
    a_lo, a_hi = a_flat.min(axis=1), a_flat.max(axis=1)  # SIMD; NaN propagates

    def work(sl: slice) -> None:
        rows = sl.stop - sl.start
        b_flat = bn[sl].reshape(rows, -1)
        lo = np.stack((np.broadcast_to(a_lo if one else a_lo[sl], rows), b_flat.min(axis=1)))
        hi = np.stack((np.broadcast_to(a_hi if one else a_hi[sl], rows), b_flat.max(axis=1)))
        ks = kn[sl] if keep is not None else kn
        kernels.ssim_sums(
            an if one else an[sl], bn[sl], lo, hi, ks, keep is not None,
            total[sl], count[sl], ok[sl],
        )  # fmt: skip

    _map_chunks(work, chunks, workers)
    ok &= count > 0
    value = np.where(ok, total / np.maximum(count, 1), np.nan)
    return torch.from_numpy(value)


# --------------------------------------------------------------------------- Spearman, torch


def _torch_sorted(x: torch.Tensor, valid: torch.Tensor | None):
    """(sorted values, permutation) per row, masked-out entries last (as +inf)."""
    if valid is not None:
        x = torch.where(valid, x, torch.full_like(x, float("inf")))
    return torch.sort(x, dim=1)


def _torch_centred_ranks(skeys: torch.Tensor, n_valid: torch.Tensor | None) -> torch.Tensor:
    """Ranks with ties averaged (scipy 'average') minus their mean (n+1)/2, in sorted order;
    0 past each row's ``n_valid``."""
    rows, n = skeys.shape
    dev = skeys.device
    rdtype = torch.float32 if rows * n < 2**22 or dev.type == "mps" else torch.float64
    pos = torch.arange(n, device=dev)
    ties = skeys[:, 1:] == skeys[:, :-1]
    if n_valid is not None:
        ties &= pos[1:].unsqueeze(0) < n_valid.unsqueeze(1)
    ranks = (pos + 1).to(rdtype).expand(rows, n)
    if bool(ties.any()):
        new = torch.ones(rows, n, dtype=torch.bool, device=dev)  # first of a run of equals
        torch.logical_not(ties, out=new[:, 1:])
        group = torch.cumsum(new.flatten(), dim=0) - 1
        counts = torch.zeros(rows * n, dtype=rdtype, device=dev)
        counts.scatter_add_(0, group, torch.ones(rows * n, dtype=rdtype, device=dev))
        # a run ending at 1-based flat position e with c members has mean rank e - (c-1)/2
        avg = torch.cumsum(counts, dim=0) - (counts - 1) / 2
        offset = (torch.arange(rows, device=dev) * n).to(rdtype).unsqueeze(1)
        ranks = avg.index_select(0, group).view(rows, n) - offset
    if n_valid is None:
        return ranks - (n + 1) / 2
    centred = ranks - ((n_valid + 1).to(rdtype) / 2).unsqueeze(1)
    inside = pos.unsqueeze(0) < n_valid.unsqueeze(1)
    return torch.where(inside, centred, torch.zeros_like(centred))


def _torch_spearman_sums(x, y, valid, n_valid):
    """(S_xy, S_xx, S_yy) of centred ranks of [c,n] rows, float64 accumulation."""
    kx, px = _torch_sorted(x, valid)
    rx = _torch_centred_ranks(kx, n_valid if valid is not None else None)
    del kx
    ky, py = _torch_sorted(y, valid)
    ry = _torch_centred_ranks(ky, n_valid if valid is not None else None)
    del ky
    rx_pixels = torch.zeros_like(rx).scatter_(1, px, rx)
    f64 = _result_dtype(x.device)
    sxy = (rx_pixels.gather(1, py) * ry).sum(dim=1, dtype=f64)
    sxx = (rx * rx).sum(dim=1, dtype=f64)
    syy = (ry * ry).sum(dim=1, dtype=f64)
    return sxy, sxx, syy


def _repeated_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """When rows of [B,n] ``x`` (a CPU array) repeat (at most B/2 distinct; as when one
    original map is compared with many variants): (index of one row per distinct value [R],
    distinct value of each row [B]). Verified bit for bit; None otherwise."""
    from cose import _similarity_cpu as kernels

    bsz = x.shape[0]
    if bsz < 2:
        return None
    if x.strides[0] == 0:  # expanded: one row by construction
        return np.zeros(1, dtype=np.int64), np.zeros(bsz, dtype=np.int64)
    bits = x.view(np.uint32 if x.dtype.itemsize == 4 else np.uint64)
    hashes = np.empty(bsz, dtype=np.uint64)
    kernels.row_hashes(bits, hashes)
    _, first, which = np.unique(hashes, return_index=True, return_inverse=True)
    if first.size > bsz // 2 or not kernels.rows_equal_to(bits, first, which):
        return None
    return first, which


def _compiled_chunks(bsz: int, workers: int) -> list[slice]:
    """A few slices per worker (the kernels allocate their scratch once per call)."""
    parts = min(bsz, workers if workers <= 1 else 4 * workers)
    edges = np.linspace(0, bsz, parts + 1).round().astype(int)
    return [slice(int(i), int(j)) for i, j in zip(edges[:-1], edges[1:]) if j > i]


def _compiled_ranks(x: torch.Tensor) -> bool:
    """Whether the compiled CPU ranking takes ``x`` [B,n] (float32; ranks stay exact)."""
    return _compiled_cpu(x) and x.dtype == torch.float32 and x.shape[1] < 2**22


def spearman(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample Spearman rank correlation of ``a``, ``b`` [B,H,W] (average ties); Tensor[B].

    With ``mask`` (bool [B,H,W]) only the masked pixels count. NaN where undefined.
    Rows of ``a`` that repeat (one original against many variants, e.g. ``map0.repeat(K, 1,
    1)`` or ``expand``) are ranked once when there is no mask (CPU float32).
    """
    with _cpu_workers(a.device if isinstance(a, torch.Tensor) else torch.device("cpu")) as n:
        return _spearman(a, b, mask, n)


def _spearman(a, b, mask, workers: int) -> torch.Tensor:
    a, b, mask = _check_pair(a, b, mask, "spearman")
    bsz = a.shape[0]
    dtype = _result_dtype(a.device)
    if bsz == 0 or a.shape[1] * a.shape[2] == 0:
        return torch.full((bsz,), float("nan"), dtype=dtype, device=a.device)
    x = a.reshape(bsz, -1)
    y = b.reshape(bsz, -1)
    valid = mask.reshape(bsz, -1) if mask is not None else None
    if _compiled_ranks(y):
        cxy, cxx, cyy, n_valid, ok = _spearman_compiled(x, y, valid, workers)
    else:
        cxy, cxx, cyy, n_valid, ok = _spearman_torch(x, y, valid, workers)
    cxy, cxx, cyy = (t.to(y.device, dtype) for t in (cxy, cxx, cyy))
    ok = ok & (n_valid >= 2) & (cxx > 0) & (cyy > 0)
    rho = cxy / torch.sqrt(torch.where(ok, cxx * cyy, torch.ones_like(cxx)))
    rho = rho.clamp(-1.0, 1.0)
    return torch.where(ok, rho, torch.full_like(rho, float("nan")))


def _spearman_torch(x, y, valid, workers: int):
    bsz, n_total = y.shape
    # +0.0 turns -0.0 into +0.0 so that the two zeros tie (and makes contiguous copies)
    x = x + 0.0
    y = y + 0.0
    if valid is None:
        ok = _row_range(x)[2] & _row_range(y)[2]
        n_valid = torch.full((bsz,), n_total, device=y.device, dtype=torch.int64)
    else:  # only the compared pixels need to be finite
        ok = ((torch.isfinite(x) & torch.isfinite(y)) | ~valid).all(dim=1)
        n_valid = valid.sum(dim=1)
    step = _chunk_rows(y)
    chunks = [slice(i, min(i + step, bsz)) for i in range(0, bsz, step)]

    def work(sl: slice):
        vs = valid[sl] if valid is not None else None
        return _torch_spearman_sums(x[sl], y[sl], vs, n_valid[sl])

    parts = _map_chunks(work, chunks, workers)
    cxy, cxx, cyy = (torch.cat(t) for t in zip(*parts))
    return cxy, cxx, cyy, n_valid, ok


def _spearman_compiled(x, y, valid, workers: int):
    from cose import _similarity_cpu as kernels

    bsz, n = y.shape
    yn = y.contiguous().numpy()
    vn = valid.contiguous().numpy() if valid is not None else np.zeros((1, 1), dtype=bool)
    sxy = np.empty(bsz, dtype=np.float64)
    sxx = np.empty(bsz, dtype=np.float64)
    syy = np.empty(bsz, dtype=np.float64)
    nvalid = np.empty(bsz, dtype=np.int64)
    finite = np.empty(bsz, dtype=bool)
    chunks = _compiled_chunks(bsz, workers)
    xn = x.numpy()  # any strides (an expanded original has stride 0)
    repeated = _repeated_rows(xn) if valid is None else None
    if repeated is not None:  # rank each distinct original once
        first, which = repeated
        reps = np.ascontiguousarray(xn[first])
        rep_ranks = np.empty(reps.shape, dtype=np.int32)  # doubled centred ranks
        rep_sumsq = np.empty(reps.shape[0], dtype=np.float64)
        rep_finite = np.empty(reps.shape[0], dtype=bool)

        def rank(sl: slice) -> None:
            kernels.pixel_ranks(reps[sl], rep_ranks[sl], rep_sumsq[sl], rep_finite[sl])

        _map_chunks(rank, _compiled_chunks(reps.shape[0], workers), workers)
        sxx[:] = rep_sumsq[which]
        xn = np.zeros((1, 1), dtype=np.float32)  # not read: the kernel takes the shared ranks
    else:
        xn = np.ascontiguousarray(xn)
        rep_ranks = np.zeros((1, 1), dtype=np.int32)
        which = np.zeros(1, dtype=np.int64)

    def work(sl: slice) -> None:
        xs = xn[sl] if repeated is None else xn
        vs = vn[sl] if valid is not None else vn
        ws = which[sl] if repeated is not None else which
        kernels.spearman_sums(
            xs, yn[sl], vs, valid is not None, rep_ranks, ws, repeated is not None,
            sxy[sl], sxx[sl], syy[sl], nvalid[sl], finite[sl],
        )  # fmt: skip

    _map_chunks(work, chunks, workers)
    if repeated is not None:
        finite &= rep_finite[which]
    return (
        torch.from_numpy(sxy),
        torch.from_numpy(sxx),
        torch.from_numpy(syy),
        torch.from_numpy(nvalid),
        torch.from_numpy(finite),
    )
