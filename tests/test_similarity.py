"""cose.similarity against skimage's structural_similarity and scipy's spearmanr.

Tolerances: SSIM within 1e-4 of skimage (float32 maps; 1e-9 on float64), Spearman within
1e-6 of scipy (measured: ~1e-8 and ~1e-15). The masked SSIM reference is the reference's
get_similarity: the mean of skimage's full SSIM image over the mask eroded by skimage's
binary_erosion with a 5x5 footprint (outside the image counts as set: the border is kept).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy.ndimage import binary_erosion, gaussian_filter
from scipy.stats import spearmanr
from skimage.metrics import structural_similarity

from cose import transforms as T
from cose.similarity import erode_mask, spearman, ssim

torch.set_num_threads(1)

SSIM_TOL = 1e-4
SPEARMAN_TOL = 1e-6
SEEDS = [0, 1, 2]


def ref_ssim(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    rng = max(np.ptp(a), np.ptp(b))
    if rng == 0:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mean, full = structural_similarity(a, b, win_size=5, data_range=rng, full=True)
    if mask is None:
        return float(mean)
    # skimage.morphology.binary_erosion(mask, footprint=np.ones((5, 5))) = scipy's with the
    # border set (skimage 0.26 deprecates the function, not the rule)
    eroded = binary_erosion(mask, structure=np.ones((5, 5), bool), border_value=1)
    return float(full[eroded].mean()) if eroded.any() else float("nan")


def ref_spearman(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    if mask is not None:
        a, b = a[mask], b[mask]
    if a.size < 2:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(spearmanr(a.ravel(), b.ravel()).statistic)


def check(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None, ssim_tol=SSIM_TOL):
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    tm = torch.from_numpy(mask) if mask is not None else None
    s = ssim(ta, tb, tm)
    r = spearman(ta, tb, tm)
    assert s.shape == (a.shape[0],) and r.shape == (a.shape[0],)
    for i in range(a.shape[0]):
        mi = mask[i] if mask is not None else None
        want_s = ref_ssim(a[i], b[i], mi)
        want_r = ref_spearman(a[i], b[i], mi)
        if np.isnan(want_s):
            assert torch.isnan(s[i]), i
        else:
            assert abs(float(s[i]) - want_s) <= ssim_tol, (i, float(s[i]), want_s)
        if np.isnan(want_r):
            assert torch.isnan(r[i]), i
        else:
            assert abs(float(r[i]) - want_r) <= SPEARMAN_TOL, (i, float(r[i]), want_r)
    return s, r


def varied_maps(rng: np.random.Generator, n: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of smooth, noisy, sparse-with-ties, LIME-like, clipped and shifted/scaled maps."""
    a = np.empty((n, h, w))
    b = np.empty((n, h, w))
    for i in range(n):
        kind = i % 7
        base = rng.random((h, w))
        if kind == 0:  # smooth, GradCAM-like
            x = gaussian_filter(base, 4)
            y = gaussian_filter(base + 0.5 * rng.random((h, w)), 4)
        elif kind == 1:  # noisy
            x = base
            y = 0.5 * base + 0.5 * rng.random((h, w))
        elif kind == 2:  # sparse with many ties (zeros) and quantised values
            x = np.where(base > 0.8, np.round(base * 10) / 10, 0.0)
            y = np.where(rng.random((h, w)) > 0.7, np.round(rng.random((h, w)) * 4) / 4, 0.0)
        elif kind == 3:  # LIME-like {-1, 0, 1}
            x = rng.choice([-1.0, 0.0, 1.0], size=(h, w), p=[0.1, 0.8, 0.1])
            y = np.where(rng.random((h, w)) > 0.5, x, 0.0)
        elif kind == 4:  # gradient maps clipped at the 99th percentile (ties at the top)
            x = np.minimum(base**3, np.quantile(base**3, 0.99))
            y = np.minimum(base**2, np.quantile(base**2, 0.95))
        elif kind == 5:  # very different per-sample ranges and offsets
            x = 1e-3 * base
            y = 50.0 + 7.0 * gaussian_filter(rng.random((h, w)), 2)
        else:  # negatives, anti-correlated
            x = base - 0.5
            y = -x + 0.05 * rng.standard_normal((h, w))
        a[i], b[i] = x, y
    return a, b


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("size", [(224, 224), (31, 47), (64, 20)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_unmasked_matches_reference(seed, size, dtype):
    rng = np.random.default_rng(seed)
    a, b = varied_maps(rng, 7, *size)
    tol = 1e-9 if dtype == np.float64 else SSIM_TOL
    check(a.astype(dtype), b.astype(dtype), ssim_tol=tol)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("size", [(224, 224), (40, 57)])
def test_masked_matches_reference(seed, size):
    """Random masks, geometric valid masks, near-empty and full masks."""
    rng = np.random.default_rng(10 + seed)
    a, b = varied_maps(rng, 7, *size)
    masks = np.empty(a.shape, dtype=bool)
    masks[0] = rng.random(size) > 0.3
    masks[1] = T.valid_mask("Rotate", [float(rng.choice(T.magnitude_grid("Rotate")))], *size)[
        0
    ].numpy()
    masks[2] = T.valid_mask("TranslateX", [-20.0], *size)[0].numpy()
    masks[3] = True
    masks[4] = False
    masks[4][5:12, 5:13] = True  # small block: eroded to a few pixels
    masks[5] = T.valid_mask("TranslateY", [27.7], *size)[0].numpy()
    masks[6] = False
    masks[6][0, 0] = True  # one pixel: Spearman and SSIM undefined
    for dtype in (np.float64, np.float32):
        tol = 1e-9 if dtype == np.float64 else SSIM_TOL
        s, r = check(a.astype(dtype), b.astype(dtype), masks, ssim_tol=tol)
        assert torch.isnan(s[6]) and torch.isnan(r[6])


@pytest.mark.parametrize("seed", SEEDS)
def test_batch_with_different_ranges_is_per_sample(seed):
    rng = np.random.default_rng(20 + seed)
    a, b = varied_maps(rng, 7, 48, 48)
    scale = 10.0 ** rng.uniform(-3, 3, size=(7, 1, 1))
    shift = rng.uniform(-100, 100, size=(7, 1, 1))
    a, b = a * scale + shift, b * scale + shift
    s_all, r_all = check(a, b)
    for i in range(7):  # the batch gives the same per-sample values as one by one
        s1 = ssim(torch.from_numpy(a[i : i + 1]), torch.from_numpy(b[i : i + 1]))
        r1 = spearman(torch.from_numpy(a[i : i + 1]), torch.from_numpy(b[i : i + 1]))
        torch.testing.assert_close(s1[0], s_all[i], equal_nan=True, rtol=0, atol=1e-12)
        torch.testing.assert_close(r1[0], r_all[i], equal_nan=True, rtol=0, atol=1e-12)


def test_all_true_mask_is_the_full_ssim_image():
    """skimage's mean crops the 2-pixel border; an all-True mask keeps it (the reference's
    masked rule), so the two differ, and the masked one is the full image's mean."""
    rng = np.random.default_rng(3)
    a, b = (torch.from_numpy(x) for x in varied_maps(rng, 7, 50, 60))
    full = torch.ones(a.shape, dtype=torch.bool)
    for i in range(7):
        x, y = a[i].numpy(), b[i].numpy()
        rng_ = max(np.ptp(x), np.ptp(y))
        if rng_ == 0:
            continue
        _, image = structural_similarity(x, y, win_size=5, data_range=rng_, full=True)
        assert float(ssim(a[i : i + 1], b[i : i + 1], full[i : i + 1])) == pytest.approx(
            float(image.mean()), abs=1e-9)
    torch.testing.assert_close(spearman(a, b, full), spearman(a, b), equal_nan=True)


def test_erode_mask_keeps_the_image_border():
    m = torch.ones(1, 9, 11, dtype=torch.bool)
    assert bool(erode_mask(m).all())
    m[0, :, 7:] = False  # a valid region that touches three sides of the image
    e = erode_mask(m)
    want = binary_erosion(m[0].numpy(), structure=np.ones((5, 5), bool), border_value=1)
    assert np.array_equal(e[0].numpy(), want)
    assert bool(e[0, :, :5].all()) and not e[0, :, 5:].any()


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-6), (np.float32, SSIM_TOL)])
def test_masked_ssim_equals_official_get_similarity(dtype, tol):
    """The reference's get_similarity(a, b, 'ssim', mask) with skimage's own binary_erosion,
    on maps whose valid region touches the image border (translations, rotations): 1e-6 on
    float64 maps (the reference's gradient and LIME maps); skimage computes float32 maps (its
    CAMs) in float32, whose own rounding is ~1e-5."""
    from skimage.morphology import binary_erosion as sk_erosion

    rng = np.random.default_rng(8)
    a, b = varied_maps(rng, 6, 64, 56)
    mags = [12.0, -7.0, 31.0, -25.0, 4.5, -90.0]
    names = ["TranslateX", "TranslateX", "TranslateY", "TranslateY", "Rotate", "Rotate"]
    masks = np.stack([T.valid_mask(n, [m], 64, 56)[0].numpy() for n, m in zip(names, mags)])
    ours = ssim(torch.from_numpy(a.astype(dtype)), torch.from_numpy(b.astype(dtype)),
                torch.from_numpy(masks))
    for i in range(6):
        x, y = a[i].astype(dtype), b[i].astype(dtype)
        drange = max(y.max() - y.min(), x.max() - x.min())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, full = structural_similarity(x, y, win_size=5, full=True, data_range=drange)
            eroded = sk_erosion(masks[i], footprint=np.ones((5, 5)))
        assert eroded[0].any() or eroded[-1].any() or eroded[:, 0].any()  # touches the border
        assert float(ours[i]) == pytest.approx(float(np.mean(full[eroded])), abs=tol)


def test_constant_maps():
    """Both constant: data range 0, SSIM NaN (deliberate; see docs/metric.md). One constant:
    SSIM defined (skimage's value), Spearman NaN (scipy's)."""
    rng = np.random.default_rng(0)
    const = np.full((1, 32, 32), 0.25)
    other = rng.random((1, 32, 32))
    s = ssim(torch.from_numpy(const), torch.from_numpy(const.copy()))
    assert torch.isnan(s).all()
    assert torch.isnan(ssim(torch.zeros(2, 8, 8), torch.zeros(2, 8, 8))).all()
    check(const, other)
    check(other, const)
    assert torch.isnan(spearman(torch.from_numpy(const), torch.from_numpy(other))).all()


def test_nonfinite_values_give_nan_for_that_sample_only():
    a = torch.rand(3, 16, 16, dtype=torch.float64)
    b = torch.rand(3, 16, 16, dtype=torch.float64)
    a[1, 3, 3] = float("nan")
    b[2, 0, 0] = float("inf")
    s, r = ssim(a, b), spearman(a, b)
    assert torch.isnan(s[1:]).all() and torch.isnan(r[1:]).all()
    assert abs(float(s[0]) - ref_ssim(a[0].numpy(), b[0].numpy())) < 1e-9
    assert abs(float(r[0]) - ref_spearman(a[0].numpy(), b[0].numpy())) < 1e-12


def test_signed_zeros_tie_and_large_maps_use_exact_ranks():
    """-0.0 and 0.0 are one value; 224x224 float32 maps take the radix-sort path."""
    rng = np.random.default_rng(5)
    a = np.where(rng.random((2, 224, 224)) > 0.5, 0.0, rng.standard_normal((2, 224, 224)))
    a[0][a[0] == 0.0] = -0.0
    a[0, :5, :5] = -0.0
    b = rng.standard_normal((2, 224, 224))
    check(a.astype(np.float32), b.astype(np.float32))
    positive = a.copy()
    positive[positive == 0] = 0.0  # +0.0 everywhere
    assert np.signbit(a[0, 0, 0]) and not np.signbit(positive[0, 0, 0])
    tb = torch.from_numpy(b).float()
    assert torch.equal(
        spearman(torch.from_numpy(a).float(), tb), spearman(torch.from_numpy(positive).float(), tb)
    )


def test_identical_and_reversed_maps():
    x = torch.rand(2, 30, 30, dtype=torch.float64)
    torch.testing.assert_close(ssim(x, x), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(spearman(x, x), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(spearman(x, -x), -torch.ones(2, dtype=torch.float64))


def test_empty_batch():
    e = torch.rand(0, 8, 8)
    assert ssim(e, e).shape == (0,) and spearman(e, e).shape == (0,)


def test_outputs_on_input_device_and_dtype():
    a = torch.rand(4, 20, 20)
    out = ssim(a, a * 0.5)
    assert out.dtype == torch.float64 and out.device == a.device
    assert spearman(a, a * 0.5).dtype == torch.float64


def test_bad_input():
    a = torch.rand(2, 16, 16)
    with pytest.raises(ValueError, match=r"a \(2, 16, 16\) vs b \(2, 16, 17\)"):
        ssim(a, torch.rand(2, 16, 17))
    with pytest.raises(ValueError, match=r"a \(2, 16, 16\) vs b \(3, 16, 16\)"):
        spearman(a, torch.rand(3, 16, 16))
    with pytest.raises(
        ValueError, match=r"mask shape \(2, 16, 15\) does not match maps \(2, 16, 16\)"
    ):
        ssim(a, a, torch.ones(2, 16, 15, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask shape"):
        spearman(a, a, torch.ones(16, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="torch.bool"):
        ssim(a, a, torch.ones(2, 16, 16))
    with pytest.raises(ValueError, match=r"\[B,H,W\]"):
        spearman(a[0], a[0])
    with pytest.raises(ValueError, match="smaller than the 5x5 window"):
        ssim(torch.rand(1, 4, 10), torch.rand(1, 4, 10))
    with pytest.raises(ValueError, match="torch.Tensor"):
        ssim(a.numpy(), a)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(0)
    a, b = (torch.from_numpy(x).float() for x in varied_maps(rng, 7, 224, 224))
    mask = torch.from_numpy(rng.random(a.shape) > 0.2)
    for m in (None, mask):
        s_cpu, r_cpu = ssim(a, b, m), spearman(a, b, m)
        mg = m.cuda() if m is not None else None
        s_gpu, r_gpu = ssim(a.cuda(), b.cuda(), mg), spearman(a.cuda(), b.cuda(), mg)
        assert s_gpu.device.type == "cuda"
        torch.testing.assert_close(s_gpu.cpu(), s_cpu, atol=1e-5, rtol=0, equal_nan=True)
        torch.testing.assert_close(r_gpu.cpu(), r_cpu, atol=1e-9, rtol=0, equal_nan=True)


@pytest.mark.parametrize("pattern", ["expand", "repeat"])
def test_repeated_originals_ranked_once_match_per_pair(monkeypatch, pattern):
    """Rows of ``a`` that repeat (the explain stage's ``map0.repeat(K, 1, 1)``, or ``expand``)
    are ranked once on CPU float32; results equal the per-pair path and scipy."""
    import cose.similarity as sim

    rng = np.random.default_rng(8)
    a, b = varied_maps(rng, 7, 224, 224)
    originals = torch.from_numpy(a[:3]).float()  # smooth, noisy, sparse with ties
    if pattern == "expand":
        originals = originals[2:3]
        first = originals.expand(7, 224, 224)
    else:
        first = originals.repeat(3, 1, 1)[:7]
    variants = torch.from_numpy(b).float()
    calls = []
    real = sim._repeated_rows
    monkeypatch.setattr(sim, "_repeated_rows", lambda x: calls.append(real(x)) or calls[-1])
    fast = spearman(first, variants)
    assert calls and calls[-1] is not None  # the shared path ran
    monkeypatch.setattr(sim, "_repeated_rows", lambda x: None)
    slow = spearman(first, variants)
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-12, equal_nan=True)
    # SSIM passes an expanded original as its one row: the same values as the copies
    torch.testing.assert_close(ssim(first, variants), ssim(first.contiguous(), variants))
    check(first.contiguous().numpy(), variants.numpy())
    mask = torch.from_numpy(rng.random((7, 224, 224)) > 0.3)
    check(first.contiguous().numpy(), variants.numpy(), mask.numpy())


def test_repeated_rows_detection():
    import cose.similarity as sim

    x = np.random.default_rng(0).random((3, 50)).astype(np.float32)
    rows = x[[0, 1, 2, 0, 1, 2, 0]]
    first, which = sim._repeated_rows(rows)
    assert first.size == 3 and np.array_equal(rows[first][which], rows)
    assert sim._repeated_rows(np.random.default_rng(1).random((6, 50))) is None  # distinct
    expanded = torch.from_numpy(x[1]).expand(5, 50)
    assert sim._repeated_rows(expanded.numpy())[0].tolist() == [0]
    zeros = np.zeros((4, 50), np.float32)
    zeros[1::2, 3] = -0.0  # equal values, other bits: not the same row, still the same ranks
    assert sim._repeated_rows(zeros)[0].size == 2
    nan_rows = rows.copy()
    nan_rows[:, 0] = float("nan")
    first, which = sim._repeated_rows(nan_rows)  # shared, and NaN all the same
    out = spearman(torch.from_numpy(nan_rows).view(7, 5, 10), torch.rand(7, 5, 10))
    assert torch.isnan(out).all()


@pytest.mark.parametrize("masked", [False, True])
def test_torch_path_matches_reference(monkeypatch, masked):
    """The torch path (GPU, and float64 ranks on CPU) on CPU maps, against skimage/scipy."""
    import cose.similarity as sim

    monkeypatch.setattr(sim, "_compiled_cpu", lambda x: False)
    rng = np.random.default_rng(12)
    a, b = varied_maps(rng, 7, 200, 190)
    mask = rng.random(a.shape) > 0.25 if masked else None
    check(a.astype(np.float32), b.astype(np.float32), mask)
    check(a, b, mask, ssim_tol=1e-9)


def random_float_bits(rng: np.random.Generator, shape) -> np.ndarray:
    """float32 maps drawn from random bit patterns (every exponent and sign, subnormals,
    signed zeros), non-finite ones replaced by zeros of either sign, plus repeated values."""
    bits = rng.integers(0, 2**32, size=shape, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32).copy()
    bad = ~np.isfinite(x)
    x[bad] = np.where(rng.random(int(bad.sum())) > 0.5, 0.0, -0.0)
    x.reshape(-1)[::7] = x.reshape(-1)[0]  # a large tie group
    x[rng.random(shape) < 0.05] = -0.0
    x[rng.random(shape) < 0.05] = 0.0
    x[rng.random(shape) < 0.01] = np.float32(1.4e-45)  # smallest subnormal
    return x


@pytest.mark.parametrize("seed", range(4))
def test_compiled_ranks_equal_torch_ranks_on_any_float(monkeypatch, seed):
    """The compiled radix ranking against the torch sort on maps over the whole float32
    range (not only [0, 1]): same Spearman sums exactly, with and without a mask."""
    import cose.similarity as sim

    rng = np.random.default_rng(100 + seed)
    a = torch.from_numpy(random_float_bits(rng, (5, 37, 29)))
    b = torch.from_numpy(random_float_bits(rng, (5, 37, 29)))
    mask = torch.from_numpy(rng.random((5, 37, 29)) > 0.4)
    mask[4] = False
    mask[4, 3, :2] = True  # two valid pixels
    mask[3] = False
    mask[3, 0, 0] = True  # one: undefined
    fast = [spearman(a, b), spearman(a, b, mask)]
    monkeypatch.setattr(sim, "_compiled_cpu", lambda x: False)
    slow = [spearman(a, b), spearman(a, b, mask)]
    for f, s in zip(fast, slow):
        torch.testing.assert_close(f, s, rtol=0, atol=1e-12, equal_nan=True)
    assert torch.isnan(fast[1][3]) and not torch.isnan(fast[1][4])
    af, bf = a.double().numpy(), b.double().numpy()
    for i in range(5):
        assert abs(float(fast[0][i]) - ref_spearman(af[i], bf[i])) <= SPEARMAN_TOL


@pytest.mark.parametrize("compiled", [True, False])
def test_nonfinite_values_anywhere_compared(monkeypatch, compiled):
    """+-inf and NaN of either sign among the compared pixels make that row NaN (SSIM: in the
    whole map, its data range), other rows unaffected; on the compiled and the torch path."""
    import cose.similarity as sim

    if not compiled:
        monkeypatch.setattr(sim, "_compiled_cpu", lambda x: False)
    rng = np.random.default_rng(5)
    a = torch.from_numpy(rng.random((6, 16, 16)).astype(np.float32))
    b = torch.from_numpy(rng.random((6, 16, 16)).astype(np.float32))
    bad = [float("inf"), float("-inf"), float("nan"), -float("nan")]
    for i, v in enumerate(bad):
        (a if i % 2 else b)[i, i + 3, 2 * i] = v
    mask = torch.ones(6, 16, 16, dtype=torch.bool)
    mask[0, 3, 0] = False  # the bad value of row 0 is masked out: row 0 is defined
    r = spearman(a, b)
    rm = spearman(a, b, mask)
    s = ssim(a, b)
    assert torch.isnan(r[:4]).all() and torch.isfinite(r[4:]).all()
    assert torch.isnan(rm[1:4]).all() and torch.isfinite(rm[0]) and torch.isfinite(rm[4:]).all()
    assert torch.isnan(s[:4]).all() and torch.isfinite(s[4:]).all()


def test_thread_pool_path_restores_threads():
    """CPU chunks run on a thread pool with torch single-threaded; the thread count is
    restored and results equal the sequential path. (No fork test: torch's OpenMP pool
    itself hangs in a forked child once the parent used it, cose or not.)"""
    rng = np.random.default_rng(1)
    a, b = (torch.from_numpy(x).float() for x in varied_maps(rng, 14, 224, 224))
    mask = torch.from_numpy(rng.random(a.shape) > 0.2)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        pooled = [ssim(a, b), spearman(a, b), ssim(a, b, mask), spearman(a, b, mask)]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    torch.set_num_threads(1)
    try:
        single = [ssim(a, b), spearman(a, b), ssim(a, b, mask), spearman(a, b, mask)]
    finally:
        torch.set_num_threads(before)
    for p, q in zip(pooled, single):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12, equal_nan=True)


def test_without_numba_the_torch_path_runs(monkeypatch):
    """Where numba cannot be imported, the CPU falls back to the torch code: same values."""
    import sys

    import cose.similarity as sim

    rng = np.random.default_rng(21)
    a, b = varied_maps(rng, 7, 40, 36)
    a, b = a.astype(np.float32), b.astype(np.float32)
    with_kernels = (sim.ssim(torch.from_numpy(a), torch.from_numpy(b)),
                    sim.spearman(torch.from_numpy(a), torch.from_numpy(b)))  # fmt: skip
    monkeypatch.setitem(sys.modules, "numba", None)  # import numba -> ImportError
    monkeypatch.delitem(sys.modules, "cose._similarity_cpu")
    monkeypatch.delattr(sys.modules["cose"], "_similarity_cpu")
    sim._kernels_available.cache_clear()
    try:
        assert not sim._kernels_available()
        s, r = check(a, b)
    finally:
        sim._kernels_available.cache_clear()
    torch.testing.assert_close(s, with_kernels[0], rtol=0, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(r, with_kernels[1], rtol=0, atol=1e-12, equal_nan=True)


def test_maps_that_require_grad():
    a = torch.rand(3, 12, 12, requires_grad=True)
    b = torch.rand(3, 12, 12)
    torch.testing.assert_close(ssim(a, b), ssim(a.detach(), b))
    torch.testing.assert_close(spearman(a, b, b > 0.5), spearman(a.detach(), b, b > 0.5))
