"""Batched similarity of saliency maps: SSIM and Spearman rank correlation.

Both take ``[B,H,W]`` maps (and an optional bool mask ``[B,H,W]``), run on the maps' device and
return one float64 value per sample (float32 on MPS).

- ``ssim``: skimage ``structural_similarity(a, b, win_size=5, data_range=max(range(a),
  range(b)), full=True)``: uniform 5x5 window, sample covariance, K1=0.01, K2=0.03, scipy
  ``reflect`` borders. Without a mask the mean of the SSIM image minus its 2-pixel border (what
  skimage returns); with a mask the mean of the SSIM image over the mask eroded by a 5x5
  square, pixels within 2 of the image border eroded too (so an all-True mask equals no mask).
  NaN where undefined: both maps constant (data range 0), non-finite values, empty eroded mask.
- ``spearman``: scipy ``spearmanr`` (ranks with averaged ties, Pearson of the ranks) over all
  pixels or the masked ones. NaN where undefined: fewer than 2 pixels, a constant side,
  non-finite values.

Speed: float32 maps on the CPU are ranked with numpy's vectorised sort of 64-bit
(value, pixel) keys in a small thread pool (``torch.get_num_threads()`` workers), several times
faster than ``torch.sort`` on CPU; everything else, and every other device or dtype, is torch.
See docs/metric.md for tolerances against skimage/scipy and the deliberate deviations.
"""

from __future__ import annotations

import contextlib
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
_INT32_MAX = np.int32(2**31 - 1)


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
    return a.to(work), b.to(work), mask


def _row_range(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (min, max, finite) of [B, ...]; min/max propagate NaN, so no extra pass."""
    lo, hi = torch.aminmax(x.flatten(1), dim=1)
    return lo, hi, torch.isfinite(lo) & torch.isfinite(hi)


def _chunk_rows(x: torch.Tensor) -> int:
    """Rows per chunk: a few on CPU so that the working set stays in cache."""
    per_row = x.shape[-1] * x.shape[-2]
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
    """Erode bool [B,H,W] by a ``win`` x ``win`` square; outside the image counts as False."""
    pad = win // 2
    if win != 5:
        outside = F.pad((~mask).unsqueeze(1).to(torch.float32), (pad,) * 4, value=1.0)
        return F.max_pool2d(outside, kernel_size=win, stride=1).squeeze(1) == 0
    b, h, w = mask.shape
    padded = torch.zeros((b, h + 2 * pad, w + 2 * pad), dtype=torch.bool, device=mask.device)
    padded[:, pad : pad + h, pad : pad + w] = mask
    return _and5(_and5(padded, 1), 2)


def ssim(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample SSIM of maps ``a``, ``b`` [B,H,W] (skimage semantics, win 5); Tensor[B].

    ``data_range`` per sample is the larger of the two maps' ranges (max - min over the whole
    map, mask or not). With ``mask`` (bool [B,H,W]) the SSIM image is averaged over the mask
    eroded by 5x5. NaN where undefined.
    """
    with _cpu_workers(a.device if isinstance(a, torch.Tensor) else torch.device("cpu")) as n:
        return _ssim(a, b, mask, n)


def _ssim(a, b, mask, workers: int) -> torch.Tensor:
    a, b, mask = _check_pair(a, b, mask, "ssim")
    bsz, h, w = a.shape
    if h < WIN_SIZE or w < WIN_SIZE:
        raise ValueError(f"ssim: maps of {h}x{w} are smaller than the {WIN_SIZE}x{WIN_SIZE} window")
    out_dtype = _result_dtype(a.device)
    if bsz == 0:
        return torch.empty(0, dtype=out_dtype, device=a.device)
    amin, amax, afin = _row_range(a)
    bmin, bmax, bfin = _row_range(b)
    rng = torch.maximum(amax - amin, bmax - bmin)
    ok = afin & bfin & (rng > 0)
    one = torch.ones_like(rng)
    inv = torch.where(ok, one / torch.where(ok, rng, one), one).view(-1, 1, 1)
    centre = torch.where(ok, (amin + amax + bmin + bmax) / 4, 0 * one).view(-1, 1, 1)
    keep = erode_mask(mask).to(a.dtype) if mask is not None else None
    pad = WIN_SIZE // 2
    step = _chunk_rows(a)
    chunks = [slice(i, min(i + step, bsz)) for i in range(0, bsz, step)]

    def work(sl: slice) -> torch.Tensor:
        s = _ssim_image(a[sl], b[sl], centre[sl], inv[sl])
        if keep is None:
            s = s[:, pad : h - pad, pad : w - pad]
        else:
            s = s.mul_(keep[sl])
        return s.sum(dim=(1, 2))

    totals = _map_chunks(work, chunks, workers)
    total = torch.cat(totals).to(out_dtype)
    if keep is None:
        count = torch.full_like(total, (h - 2 * pad) * (w - 2 * pad))
    else:
        count = keep.sum(dim=(1, 2)).to(out_dtype)
        ok = ok & (count > 0)
    value = total / count.clamp(min=1)
    # a NaN/inf sample computes on garbage: the result is NaN whatever it gave
    return torch.where(ok, value, torch.full_like(value, float("nan")))


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


# --------------------------------------------------------------------------- Spearman, numpy (CPU)


def _np_sorted(x: np.ndarray, valid: np.ndarray | None):
    """Row-wise sort of float32 [c,n] via int64 keys (order-preserving value bits << 32 | pixel):
    numpy sorts these with its SIMD sort. Returns (sorted value keys, permutation as flat
    indices row * n + pixel), both int32 [c,n] views; masked-out entries get a key above every
    float."""
    c, n = x.shape
    bits = x.view(np.int32)
    packed = np.empty((c, n, 2), dtype=np.int32)
    packed[:, :, 0] = np.arange(c * n, dtype=np.int32).reshape(c, n)  # low word: flat index
    key = packed[:, :, 1]  # high word: signed int32 in float order
    np.right_shift(bits, 31, out=key)
    np.bitwise_and(key, _INT32_MAX, out=key)
    np.bitwise_xor(key, bits, out=key)
    if valid is not None:
        np.putmask(key, ~valid, _INT32_MAX)
    packed.view(np.int64).reshape(c, n).sort(axis=1)
    return packed[:, :, 1], packed[:, :, 0]


def _np_centred_ranks(skey: np.ndarray, n_valid: np.ndarray | None):
    """As :func:`_torch_centred_ranks`, numpy, float32 (exact for these half-integers).

    Also returns the per-row sum of squared centred ranks, float64, in closed form:
    (n^3 - n) / 12 minus (t^3 - t) / 12 for every run of t tied values.
    """
    c, n = skey.shape
    new = np.empty((c, n), dtype=bool)  # first of a run of equal keys
    new[:, 0] = True
    np.not_equal(skey[:, 1:], skey[:, :-1], out=new[:, 1:])
    if n_valid is not None:  # masked-out entries (sorted last) are runs of their own
        for i in range(c):
            new[i, n_valid[i] :] = True
    nv = np.full(c, n, dtype=np.float64) if n_valid is None else n_valid.astype(np.float64)
    sumsq = (nv * nv * nv - nv) / 12
    flat = new.ravel()
    starts = np.flatnonzero(flat)
    ranks = np.empty((c, n), dtype=np.float32)
    if starts.size == c * n:  # no ties
        ranks[:] = np.arange(1, n + 1, dtype=np.float32)
    else:
        ends = np.empty_like(starts)  # exclusive
        ends[:-1] = starts[1:]
        ends[-1] = c * n
        lengths = (ends - starts).astype(np.float64)
        first_run = np.searchsorted(starts, np.arange(c) * n)  # runs never straddle rows
        sumsq -= np.add.reduceat(lengths * lengths * lengths - lengths, first_run) / 12
        # a run over 0-based flat [start, end) holds the ranks start+1 .. end: their mean
        np.add(ends, starts, out=ends)
        ends += 1
        avg = ends.astype(np.float32)
        avg *= 0.5
        group = np.cumsum(flat, dtype=np.int32)  # (int64 accumulation is ~10x slower)
        group -= 1
        np.take(avg, group, out=ranks.ravel())
        ranks -= (np.arange(c, dtype=np.float32) * n)[:, None]
    if n_valid is None:
        ranks -= np.float32((n + 1) / 2)
    else:
        ranks -= ((n_valid + 1) / 2).astype(np.float32)[:, None]
        for i in range(c):
            ranks[i, n_valid[i] :] = 0.0
    return ranks, sumsq


def _np_pixel_ranks(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centred ranks of unmasked rows [c,n] in pixel order, and their sums of squares."""
    c, n = x.shape
    kx, px = _np_sorted(x, None)
    rx, sxx = _np_centred_ranks(kx, None)
    pixels = np.empty(c * n, dtype=np.float32)
    pixels[px.ravel()] = rx.ravel()
    return pixels.reshape(c, n), sxx


def _np_spearman_sums(x, y: np.ndarray, valid, n_valid, shared=None):
    """(S_xy, S_xx, S_yy) of centred ranks, float64. ``shared``: (pixel ranks [c,n], S_xx [c])
    of the unmasked ``x`` rows, computed beforehand (``x`` is then not used)."""
    c, n = y.shape
    nv = n_valid if valid is not None else None
    if shared is None:
        kx, px = _np_sorted(x, valid)
        rx, sxx = _np_centred_ranks(kx, nv)
        rx_pixels = np.empty(c * n, dtype=np.float32)
        rx_pixels[px.ravel()] = rx.ravel()
    else:
        rx_pixels = np.ascontiguousarray(shared[0]).ravel()  # flat, like the permutations
        sxx = shared[1]
    ky, py = _np_sorted(y, valid)
    ry, syy = _np_centred_ranks(ky, nv)
    at_y = np.take(rx_pixels, py)
    sxy = np.einsum("ij,ij->i", at_y, ry, dtype=np.float64)
    return sxy, sxx, syy


_FINGERPRINT_WEIGHTS: dict[int, torch.Tensor] = {}


def _repeated_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """When rows of [B,n] ``x`` repeat (at most B/2 distinct; as when one original map is
    compared with many variants): (index of one row per distinct value [R], distinct value of
    each row [B]). Verified exactly; None otherwise."""
    bsz, n = x.shape
    if bsz < 2:
        return None
    w = _FINGERPRINT_WEIGHTS.get(n)
    if w is None:
        gen = torch.Generator().manual_seed(0)
        w = torch.randint(1, 2**31 - 1, (n,), generator=gen, dtype=torch.int32)
        _FINGERPRINT_WEIGHTS[n] = w
    # exact integer fingerprints of the bits (float sums depend on alignment and order)
    bits = x.view(torch.int32) if x.dtype == torch.float32 else x.view(torch.int64)
    prints = torch.stack((bits.sum(dim=1, dtype=torch.int64), (bits * w).sum(dim=1)), dim=1)
    _, inverse = torch.unique(prints, dim=0, return_inverse=True)
    distinct = int(inverse.max()) + 1
    if distinct > bsz // 2:
        return None
    first = torch.full((distinct,), bsz, dtype=torch.int64)
    first.scatter_reduce_(0, inverse, torch.arange(bsz), reduce="amin")
    if not torch.equal(x, x.index_select(0, first.index_select(0, inverse))):
        return None  # a fingerprint collision (or NaN): no sharing
    return first, inverse


def _use_numpy(x: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and sys.byteorder == "little"
        and x.shape[1] < 2**22  # float32 ranks stay exact
    )


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
    # +0.0 turns -0.0 into +0.0 so that the two zeros tie (and makes contiguous copies)
    x = a.reshape(bsz, -1) + 0.0
    y = b.reshape(bsz, -1) + 0.0
    n_total = y.shape[1]
    valid = mask.reshape(bsz, -1) if mask is not None else None
    ok = _row_range(x)[2] & _row_range(y)[2]
    if valid is None:
        n_valid = torch.full((bsz,), n_total, device=y.device, dtype=torch.int64)
    else:
        n_valid = valid.sum(dim=1)
    step = _chunk_rows(a)
    chunks = [slice(i, min(i + step, bsz)) for i in range(0, bsz, step)]
    if _use_numpy(y):
        xn, yn = x.numpy(), y.numpy()
        vn = valid.numpy() if valid is not None else None
        nn = n_valid.numpy()
        repeated = _repeated_rows(x) if valid is None else None
        if repeated is not None:  # rank each distinct original once
            reps = xn[repeated[0].numpy()]
            rep_chunks = [slice(i, i + step) for i in range(0, reps.shape[0], step)]
            done = _map_chunks(lambda sl: _np_pixel_ranks(reps[sl]), rep_chunks, workers)
            rep_pixels = np.concatenate([d[0] for d in done])
            rep_sumsq = np.concatenate([d[1] for d in done])
            which = repeated[1].numpy()

        def work(sl: slice):
            vs = vn[sl] if vn is not None else None
            if repeated is None:
                return _np_spearman_sums(xn[sl], yn[sl], vs, nn[sl])
            shared = (rep_pixels[which[sl]], rep_sumsq[which[sl]])
            return _np_spearman_sums(None, yn[sl], vs, nn[sl], shared)

        parts = _map_chunks(work, chunks, workers)
        cxy, cxx, cyy = (torch.from_numpy(np.concatenate(t)) for t in zip(*parts))
    else:

        def work_torch(sl: slice):
            vs = valid[sl] if valid is not None else None
            return _torch_spearman_sums(x[sl], y[sl], vs, n_valid[sl])

        parts = _map_chunks(work_torch, chunks, workers)
        cxy, cxx, cyy = (torch.cat(t) for t in zip(*parts))
    cxy, cxx, cyy = (t.to(y.device, dtype) for t in (cxy, cxx, cyy))
    ok = ok & (n_valid >= 2) & (cxx > 0) & (cyy > 0)
    rho = cxy / torch.sqrt(torch.where(ok, cxx * cyy, torch.ones_like(cxx)))
    rho = rho.clamp(-1.0, 1.0)
    return torch.where(ok, rho, torch.full_like(rho, float("nan")))
