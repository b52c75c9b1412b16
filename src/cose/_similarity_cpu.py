"""Compiled CPU kernels behind :mod:`cose.similarity` (numba, no GIL held).

Each kernel handles a chunk of pairs in one call, in one pass per map where it can, so that a
224x224 pair costs tens of microseconds of SSIM and a few hundred of Spearman; the caller
spreads chunks over threads. Semantics are those documented in :mod:`cose.similarity`:

- SSIM: without a mask, the pixels at least 2 away from the border (skimage crops that
  border); with a mask, every pixel the eroded mask keeps, border included, whose windows
  reach into scipy's 'reflect' padding (d c b a | a b c d). Maps are centred and scaled by
  1/data_range in the input dtype (float32
  keeps the variances well conditioned that way); window sums are direct 5-tap sums (no
  running sums that would drift); the per-pixel SSIM values are accumulated in float64.
- Spearman: exact ranks from an LSD radix sort (3 passes of 11 bits) of the maps' float32 bits
  mapped to order-preserving unsigned keys and packed with the pixel index, ties averaged as
  scipy's ``rankdata``. Centred ranks are carried doubled, as integers, so every sum over them
  is an exact int64.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_RADIX_BITS = 11
_RADIX = 1 << _RADIX_BITS
_RADIX_MASK = _RADIX - 1
_PASSES = 3  # 33 bits >= 32
_HIGH = np.uint64(32)  # sort words: key << 32 | pixel
_LOW32 = np.uint64(0xFFFFFFFF)


# --------------------------------------------------------------------------- SSIM


@njit(nogil=True, cache=True, error_model="numpy")
def ssim_sums(a, b, lo, hi, keep, use_keep, total, count, ok):
    """For each pair p of [c,H,W] maps ``a`` (or one map [1,H,W] for every pair) and ``b``,
    with ``lo``/``hi`` [2,c] the minima and maxima of ``a`` (row 0) and ``b`` (row 1), NaN
    propagated: ``total[p]`` the sum of the
    SSIM image over the interior (``use_keep`` False) or over ``keep[p]`` (the eroded mask;
    its border pixels' windows read the reflected border), ``count[p]`` the number of pixels
    summed, ``ok[p]`` whether
    SSIM is defined (finite maps, data range > 0)."""
    c, h, w = b.shape
    n = 25.0
    k1 = n * n * 0.01 * 0.01
    k2 = n * (n - 1.0) * 0.03 * 0.03
    dt = a.dtype
    # the maps with a 2-pixel 'reflect' border (read only where a kept pixel's window is)
    x = np.empty((h + 4, w + 4), dtype=dt)
    y = np.empty((h + 4, w + 4), dtype=dt)
    pp = np.empty((h + 4, w + 4), dtype=dt)
    qq = np.empty((h + 4, w + 4), dtype=dt)
    vx = np.empty(w + 4, dtype=dt)
    vy = np.empty(w + 4, dtype=dt)
    vp = np.empty(w + 4, dtype=dt)
    vq = np.empty(w + 4, dtype=dt)
    acc = np.empty(w, dtype=np.float64)
    srow = np.empty(w, dtype=dt)
    # rows (and columns) summed: the interior without a mask, every row with one
    first, last = (0, h) if use_keep else (2, h - 2)
    jfirst, jlast = (0, w) if use_keep else (2, w - 2)
    for p in range(c):
        alo, ahi, blo, bhi = lo[0, p], hi[0, p], lo[1, p], hi[1, p]
        finite = np.isfinite(alo) and np.isfinite(ahi) and np.isfinite(blo) and np.isfinite(bhi)
        rng = max(ahi - alo, bhi - blo)
        if not (finite and rng > 0):
            ok[p] = False
            total[p] = np.nan
            count[p] = 0.0
            continue
        ok[p] = True
        inv = dt.type(1.0) / rng
        centre = (alo + ahi + blo + bhi) / dt.type(4.0)
        shift = centre * inv * dt.type(n)
        ap = a[0] if a.shape[0] == 1 else a[p]
        bp = b[p]
        for i in range(h + 4):
            si = i - 2  # reflect: -1 -> 0, -2 -> 1, h -> h-1, h+1 -> h-2
            if si < 0:
                si = -si - 1
            elif si >= h:
                si = 2 * h - si - 1
            for j in range(w + 4):
                sj = j - 2
                if sj < 0:
                    sj = -sj - 1
                elif sj >= w:
                    sj = 2 * w - sj - 1
                xv = (ap[si, sj] - centre) * inv
                yv = (bp[si, sj] - centre) * inv
                x[i, j] = xv
                y[i, j] = yv
                pp[i, j] = xv * xv + yv * yv
                qq[i, j] = xv * yv
        acc[:] = 0.0
        cnt = 0.0
        c2n = dt.type(2.0 * n)
        c2 = dt.type(2.0)
        cn = dt.type(n)
        ck1 = dt.type(k1)
        ck2 = dt.type(k2)
        for i in range(first, last):  # pixel row i: padded rows i .. i+4
            for j in range(jfirst, jlast + 4):
                vx[j] = ((x[i, j] + x[i + 1, j]) + (x[i + 2, j] + x[i + 3, j])) + x[i + 4, j]
                vy[j] = ((y[i, j] + y[i + 1, j]) + (y[i + 2, j] + y[i + 3, j])) + y[i + 4, j]
                vp[j] = ((pp[i, j] + pp[i + 1, j]) + (pp[i + 2, j] + pp[i + 3, j])) + pp[i + 4, j]
                vq[j] = ((qq[i, j] + qq[i + 1, j]) + (qq[i + 2, j] + qq[i + 3, j])) + qq[i + 4, j]
            for j in range(jfirst, jlast):
                sx = ((vx[j] + vx[j + 1]) + (vx[j + 2] + vx[j + 3])) + vx[j + 4]
                sy = ((vy[j] + vy[j + 1]) + (vy[j + 2] + vy[j + 3])) + vy[j + 4]
                sp = ((vp[j] + vp[j + 1]) + (vp[j + 2] + vp[j + 3])) + vp[j + 4]
                sq = ((vq[j] + vq[j + 1]) + (vq[j + 2] + vq[j + 3])) + vq[j + 4]
                num2 = c2n * sq - c2 * (sx * sy) + ck2
                den2 = cn * sp - sx * sx - sy * sy + ck2
                tx = sx + shift
                ty = sy + shift
                num1 = c2 * (tx * ty) + ck1
                den1 = tx * tx + ty * ty + ck1
                srow[j] = (num1 * num2) / (den1 * den2)
            if use_keep:
                kr = keep[p, i]
                for j in range(w):
                    if kr[j]:
                        acc[j] += srow[j]
                        cnt += 1.0
            else:
                for j in range(jfirst, jlast):
                    acc[j] += srow[j]
        t = 0.0
        for j in range(w):
            t += acc[j]
        total[p] = t
        count[p] = cnt if use_keep else float((h - 4) * (w - 4))


# --------------------------------------------------------------------------- Spearman
#
# Ranks are carried doubled and centred, as integers: 2 * (average rank - (m+1)/2) = s + e - m
# for a run of equal keys over sorted positions [s, e). Every sum is then an exact int64
# (|2r| <= m < 2^22, so a sum of m products stays below 2^63), and the sum of squares has a
# closed form: sum r^2 = (m^3 - m)/12 - sum over tied runs of (t^3 - t)/12.


@njit(inline="always")
def _key(f, b):
    """The float32 ``f`` (bits ``b``) as a uint32 that sorts in float order; -0.0 as +0.0.
    (numba widens uint32 arithmetic to 64 bits: cast back at each step.)"""
    if f == 0.0:
        b = np.uint32(0)
    flip = np.uint32(np.uint32(0) - np.uint32(b >> np.uint32(31)))  # all ones if negative
    return np.uint32(b ^ np.uint32(flip | np.uint32(0x80000000)))


@njit(inline="always")
def _put(k, i, m, words, hist):
    """Store key ``k`` of pixel ``i`` as word ``m`` and count its three digits."""
    words[m] = (np.uint64(k) << _HIGH) | np.uint64(i)
    hist[0, k & _RADIX_MASK] += 1
    hist[1, (k >> _RADIX_BITS) & _RADIX_MASK] += 1
    hist[2, k >> (2 * _RADIX_BITS)] += 1


@njit(nogil=True, cache=True, error_model="numpy")
def _sort(v, valid, use_valid, words, words2, hist):
    """Sort the float32 values ``v`` [n] (those with ``valid`` when ``use_valid``) by their
    order-preserving uint32 keys, each packed with its pixel index as key << 32 | pixel.
    Returns (m, the m sorted words (one of the two scratch arrays), all finite)."""
    n = v.shape[0]
    bits = v.view(np.uint32)
    hist[:] = 0
    m = 0
    if use_valid:
        for i in range(n):
            if valid[i]:
                _put(_key(v[i], bits[i]), i, m, words, hist)
                m += 1
    else:
        for i in range(n):
            _put(_key(v[i], bits[i]), i, i, words, hist)
        m = n
    src, dst = words, words2
    for pss in range(_PASSES):
        shift = _HIGH + np.uint64(pss * _RADIX_BITS)
        h = hist[pss]
        skip = False
        run = 0
        for d in range(_RADIX):
            c = h[d]
            if c == m:
                skip = True
            h[d] = run
            run += c
        if skip:  # every key has the same digit here: already in order
            continue
        for t in range(m):
            w = src[t]
            d = (w >> shift) & np.uint64(_RADIX_MASK)
            o = h[d]
            h[d] = o + 1
            dst[o] = w
        src, dst = dst, src
    # non-finite keys sort beyond those of -inf and +inf (NaN of either sign past them)
    finite = m == 0 or ((src[0] >> _HIGH) > 0x007FFFFF and (src[m - 1] >> _HIGH) < 0xFF800000)
    return m, src, finite


@njit(inline="always")
def _sum_sq(m, ties):
    """Sum of squared centred ranks of m values, ``ties`` = sum of t^3 - t over tied runs."""
    mf = np.float64(m)
    return (mf * mf * mf - mf - np.float64(ties)) / 12.0


@njit(nogil=True, cache=True, error_model="numpy")
def _scatter_ranks(m, sw, out):
    """Doubled centred ranks of the m sorted words into ``out`` (int32) at their pixels;
    returns the sum of the squared centred ranks."""
    ties = np.int64(0)
    s = 0
    while s < m:
        k = sw[s] >> _HIGH
        if s + 1 < m and (sw[s + 1] >> _HIGH) == k:  # a tied run (rare)
            e = s + 2
            while e < m and (sw[e] >> _HIGH) == k:
                e += 1
            r2 = np.int32(s + e - m)
            for t in range(s, e):
                out[sw[t] & _LOW32] = r2
            t = np.int64(e - s)
            ties += t * t * t - t
            s = e
        else:
            out[sw[s] & _LOW32] = np.int32(2 * s + 1 - m)
            s += 1
    return _sum_sq(m, ties)


@njit(nogil=True, cache=True, error_model="numpy")
def _gather_products(m, sw, rx):
    """For the m sorted words of y: (sum over their pixels of centred rank of x times centred
    rank of y, sum of squared centred ranks of y); ``rx`` the doubled centred ranks of x by
    pixel (int32)."""
    ties = np.int64(0)
    sxy4 = np.int64(0)  # sum of (2 r_x)(2 r_y)
    s = 0
    while s < m:
        k = sw[s] >> _HIGH
        if s + 1 < m and (sw[s + 1] >> _HIGH) == k:
            acc = np.int64(rx[sw[s] & _LOW32])
            e = s + 1
            while e < m and (sw[e] >> _HIGH) == k:
                acc += rx[sw[e] & _LOW32]
                e += 1
            sxy4 += np.int64(s + e - m) * acc
            t = np.int64(e - s)
            ties += t * t * t - t
            s = e
        else:
            sxy4 += np.int64(2 * s + 1 - m) * np.int64(rx[sw[s] & _LOW32])
            s += 1
    return np.float64(sxy4) / 4.0, _sum_sq(m, ties)


@njit(nogil=True, cache=True, error_model="numpy")
def pixel_ranks(x, ranks, sumsq, finite):
    """Doubled centred ranks (int32) of each unmasked float32 row of ``x`` [c,n] into
    ``ranks`` [c,n]."""
    c, n = x.shape
    words = np.empty(n, np.uint64)
    words2 = np.empty(n, np.uint64)
    hist = np.empty((_PASSES, _RADIX), np.int32)
    dummy = np.zeros(1, np.bool_)
    for p in range(c):
        m, sw, fin = _sort(x[p], dummy, False, words, words2, hist)
        sumsq[p] = _scatter_ranks(m, sw, ranks[p])
        finite[p] = fin


@njit(nogil=True, cache=True, error_model="numpy")
def spearman_sums(x, y, valid, use_valid, shared, which, use_shared, sxy, sxx, syy, nvalid, finite):
    """Per row p of float32 [c,n] ``x``, ``y``: the sums of products and squares of centred
    ranks over the pixels with ``valid[p]`` (all when not ``use_valid``), the count of such
    pixels and whether they are all finite. With ``use_shared`` the ranks of ``x[p]`` are
    ``shared[which[p]]`` (unmasked rows ranked beforehand by :func:`pixel_ranks`; ``sxx`` is
    left as it is) and ``x`` is not read."""
    c, n = y.shape
    words = np.empty(n, np.uint64)
    words2 = np.empty(n, np.uint64)
    hist = np.empty((_PASSES, _RADIX), np.int32)
    rx = np.empty(n, np.int32)
    for p in range(c):
        vp = valid[p] if use_valid else valid[0]
        if use_shared:
            xr = shared[which[p]]
            fx = True
        else:
            m, sw, fx = _sort(x[p], vp, use_valid, words, words2, hist)
            sxx[p] = _scatter_ranks(m, sw, rx)
            xr = rx
        m, sw, fy = _sort(y[p], vp, use_valid, words, words2, hist)
        nvalid[p] = m
        finite[p] = fx and fy
        sxy[p], syy[p] = _gather_products(m, sw, xr)


# --------------------------------------------------------------------------- repeated rows


@njit(nogil=True, cache=True, error_model="numpy")
def row_hashes(bits, out):
    """A 64-bit hash of each row of the integer view ``bits`` [c,n] of a map batch (sum of
    bits times position-dependent odd multipliers, mod 2^64); equal rows hash equal."""
    c, n = bits.shape
    k = np.uint64(0x9E3779B97F4A7C15)
    for p in range(c):
        h = np.uint64(0)
        for i in range(n):
            h += np.uint64(bits[p, i]) * ((np.uint64(i) * k) | np.uint64(1))
        out[p] = h


@njit(nogil=True, cache=True)
def rows_equal_to(bits, first, which):
    """Whether every row p of ``bits`` equals row ``first[which[p]]`` bit for bit."""
    c, n = bits.shape
    for p in range(c):
        q = first[which[p]]
        if q == p:
            continue
        for i in range(n):
            if bits[p, i] != bits[q, i]:
                return False
    return True
