"""cose.transforms: magnitude grid, sampling, parity with PIL / torchvision-on-PIL, inverses
against skimage, valid masks, bad input.

On uint8-valued inputs scaled to [0, 1] every transform is bit-exact to the reference's PIL
path, at every bin of the reference's float32 magnitude grid. Inverses match skimage's
rotate/warp (order=1, constant 0) to 1e-9 on float64 maps, 1e-5 on float32.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps
from skimage.transform import AffineTransform, rotate, warp
from torchvision.transforms import InterpolationMode

from cose import transforms as T

torch.set_num_threads(1)

SEEDS = [0, 1, 2]
SIZES = [(224, 224), (37, 53), (64, 48)]


def pil_reference(name: str, image: Image.Image, magnitude: float) -> Image.Image:
    """The reference path: torchvision functional ops (TrivialAugmentWide's _apply_op) on PIL
    images, PIL ImageOps flips and ImageFilter BLUR/SMOOTH."""
    near = InterpolationMode.NEAREST
    if name == "TranslateX":
        return TF.affine(image, 0.0, [int(magnitude), 0], 1.0, [0.0, 0.0], near, None)
    if name == "TranslateY":
        return TF.affine(image, 0.0, [0, int(magnitude)], 1.0, [0.0, 0.0], near, None)
    if name == "Rotate":
        return TF.rotate(image, magnitude, interpolation=near, fill=None)
    if name == "FlipLR":
        return ImageOps.mirror(image)
    if name == "FlipUD":
        return ImageOps.flip(image)
    if name == "Brightness":
        return TF.adjust_brightness(image, 1.0 + magnitude)
    if name == "Color":
        return TF.adjust_saturation(image, 1.0 + magnitude)
    if name == "Contrast":
        return TF.adjust_contrast(image, 1.0 + magnitude)
    if name == "Sharpness":
        return TF.adjust_sharpness(image, 1.0 + magnitude)
    if name == "AutoContrast":
        return TF.autocontrast(image)
    if name == "Equalize":
        return TF.equalize(image)
    if name == "Blur":
        return image.filter(ImageFilter.BLUR)
    if name == "Smooth":
        return image.filter(ImageFilter.SMOOTH)
    raise AssertionError(name)


def random_images(
    rng: np.random.Generator, n: int, h: int, w: int, channels: int = 3
) -> np.ndarray:
    """uint8 [n,h,w,c] of varied kinds: uniform noise, smooth gradients, low contrast,
    few grey levels, a constant image."""
    out = np.empty((n, h, w, channels), dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        kind = i % 5
        if kind == 0:
            img = rng.integers(0, 256, (h, w, channels))
        elif kind == 1:
            base = (xx / max(w - 1, 1) * 200 + yy / max(h - 1, 1) * 55)[..., None]
            img = base + rng.normal(0, 8, (h, w, channels))
        elif kind == 2:  # low contrast: AutoContrast / Equalize / Contrast matter
            img = rng.integers(90, 140, (h, w, channels))
        elif kind == 3:  # few levels with many ties
            img = rng.choice([0, 17, 128, 250], size=(h, w, channels))
        else:
            img = np.full((h, w, channels), rng.integers(0, 256))
        out[i] = np.clip(np.round(img), 0, 255)
    return out


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr).permute(0, 3, 1, 2).to(torch.float32) / 255.0


def pil_batch(name: str, arr: np.ndarray, mags: torch.Tensor) -> torch.Tensor:
    outs = []
    for i in range(arr.shape[0]):
        img = Image.fromarray(arr[i] if arr.shape[3] == 3 else arr[i, :, :, 0])
        res = np.asarray(pil_reference(name, img, float(mags[i])))
        outs.append(res if res.ndim == 3 else res[..., None])
    return to_tensor(np.stack(outs))


def draw(name: str, n: int, size, rng: np.random.Generator) -> torch.Tensor:
    grid = T.magnitude_grid(name, size)
    return torch.tensor([grid[i] for i in rng.integers(0, len(grid), n)], dtype=torch.float64)


# --------------------------------------------------------------------------- grid, sampling


def test_names_partition():
    assert len(T.TRANSFORMS) == 13
    assert set(T.SIGNED) | set(T.UNSIGNED) == set(T.TRANSFORMS)
    assert not set(T.SIGNED) & set(T.UNSIGNED)
    assert set(T.GEOMETRIC) | set(T.PHOTOMETRIC) == set(T.TRANSFORMS)


def reference_grid(name: str) -> list[float]:
    """The reference's signed magnitudes: ``torch.linspace(0, max, 31)`` (float32) times +1
    and -1, zeros dropped (its ModifiedTrivial._augmentation_space and explain loop)."""
    mags = torch.linspace(0.0, T.MAX_MAGNITUDE[name], 31)
    signed = torch.tensor([1.0, -1.0]).reshape(-1, 1) @ mags.reshape(1, -1)
    return signed[signed != 0].tolist()


@pytest.mark.parametrize("name", T.SIGNED)
def test_grid_is_the_reference_float32_linspace(name):
    grid = T.magnitude_grid(name)
    assert len(grid) == 60 and 0.0 not in grid
    assert sorted(grid) == sorted(reference_grid(name))  # the same float32 values, bit for bit
    assert grid == sorted(grid)
    assert all(float(np.float32(v)) == v for v in grid)


def test_translation_bin_15_moves_15_pixels():
    """The reference's bin 15 of 0..32 px is 15.999999 in float32: int() moves 15 px."""
    positive = [v for v in T.magnitude_grid("TranslateX", 224) if v > 0]
    assert positive[14] == pytest.approx(16.0, abs=1e-5) and positive[14] < 16.0
    assert T.translation_pixels([positive[14], -positive[14]]).tolist() == [15, -15]
    x = torch.zeros(1, 1, 8, 40)
    x[..., 0] = 1.0
    moved = T.apply("TranslateX", x, [positive[14]])
    assert moved[0, 0, 0].nonzero().flatten().tolist() == [15]


def test_grid_translation_scales_with_size():
    assert max(T.magnitude_grid("TranslateX", 224)) == 32.0
    assert max(T.magnitude_grid("TranslateX", (100, 448))) == pytest.approx(64.0)
    assert max(T.magnitude_grid("TranslateY", (100, 448))) == pytest.approx(32.0 * 100 / 224)
    assert T.magnitude_grid("Rotate", 32) == T.magnitude_grid("Rotate", 224)


@pytest.mark.parametrize("name", T.UNSIGNED)
def test_unsigned_single_variant(name):
    assert T.magnitude_grid(name) == [0.0]
    out = T.sample_magnitudes(name, 6, torch.Generator().manual_seed(0))
    assert out.tolist() == [0.0]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("count", [1, 6, 60])
def test_sampling_without_replacement_and_seeded(seed, count):
    for name in T.SIGNED:
        a = T.sample_magnitudes(name, count, torch.Generator().manual_seed(seed), 224)
        b = T.sample_magnitudes(name, count, torch.Generator().manual_seed(seed), 224)
        assert a.dtype == torch.float64 and a.shape == (count,)
        assert torch.equal(a, b)
        assert len(set(a.tolist())) == count
        assert set(a.tolist()) <= set(T.magnitude_grid(name, 224))
    assert torch.equal(
        T.sample_magnitudes("Rotate", 6, seed), T.sample_magnitudes("Rotate", 6, seed)
    )


def test_sampling_varies_with_seed():
    draws = {tuple(T.sample_magnitudes("Rotate", 6, s).tolist()) for s in range(10)}
    assert len(draws) == 10


def test_sampling_bad_input():
    with pytest.raises(ValueError, match="count"):
        T.sample_magnitudes("Rotate", 61, 0)
    with pytest.raises(ValueError, match="count"):
        T.sample_magnitudes("Rotate", 0, 0)
    with pytest.raises(ValueError, match="Generator"):
        T.sample_magnitudes("Rotate", 6, None)
    with pytest.raises(ValueError, match="unknown transform 'Shear'"):
        T.magnitude_grid("Shear")


# --------------------------------------------------------------------------- parity with PIL


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", T.GEOMETRIC)
def test_geometric_bit_exact_to_pil(name, size, seed):
    rng = np.random.default_rng(seed)
    arr = random_images(rng, 5, *size)
    mags = draw(name, 5, size, rng)
    ours = T.apply(name, to_tensor(arr), mags)
    assert torch.equal(ours, pil_batch(name, arr, mags))


@pytest.mark.parametrize("size", [(224, 224), (40, 40), (31, 45)])
def test_rotate_every_grid_angle_bit_exact(size):
    """All 60 angles, including 90 (PIL's transpose fast path on square images)."""
    rng = np.random.default_rng(7)
    arr = np.repeat(random_images(rng, 1, *size), 60, axis=0)
    mags = torch.tensor(T.magnitude_grid("Rotate"), dtype=torch.float64)
    assert torch.equal(T.apply("Rotate", to_tensor(arr), mags), pil_batch("Rotate", arr, mags))


def test_translate_every_grid_shift_bit_exact():
    rng = np.random.default_rng(3)
    arr = np.repeat(random_images(rng, 1, 224, 224), 60, axis=0)
    for name in ("TranslateX", "TranslateY"):
        mags = torch.tensor(T.magnitude_grid(name, 224), dtype=torch.float64)
        assert torch.equal(T.apply(name, to_tensor(arr), mags), pil_batch(name, arr, mags))
    # int() truncation toward zero, as torchvision's _apply_op
    assert T.translation_pixels([8.533, -8.533, 0.99, 32.0]).tolist() == [8, -8, 0, 32]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", T.PHOTOMETRIC)
def test_photometric_bit_exact_to_pil(name, size, seed):
    rng = np.random.default_rng(100 + seed)
    arr = random_images(rng, 10, *size)
    mags = draw(name, 10, size, rng)
    ours = T.apply(name, to_tensor(arr), mags)
    assert torch.equal(ours, pil_batch(name, arr, mags)), name


@pytest.mark.parametrize("name", T.PHOTOMETRIC)
def test_photometric_every_grid_bin_bit_exact(name):
    """Every bin of the reference's float32 grid (both signs), on varied 224 px images."""
    rng = np.random.default_rng(21)
    grid = reference_grid(name) if name in T.SIGNED else [0.0]
    arr = random_images(rng, 5, 224, 224)
    x = to_tensor(arr)
    for mag in grid:
        mags = torch.full((5,), mag, dtype=torch.float32)  # the reference's float32 magnitudes
        assert torch.equal(T.apply(name, x, mags), pil_batch(name, arr, mags)), (name, mag)


@pytest.mark.parametrize("name", T.PHOTOMETRIC)
def test_photometric_grayscale_images(name):
    rng = np.random.default_rng(11)
    arr = random_images(rng, 5, 33, 41, channels=1)
    mags = draw(name, 5, (33, 41), rng)
    ours = T.apply(name, to_tensor(arr), mags)
    assert torch.equal(ours, pil_batch(name, arr, mags)), name


def test_photometric_rounds_unquantised_inputs_to_8_bits():
    """A PIL image holds 8-bit levels: other inputs are rounded to k/255 first."""
    x = torch.rand(3, 3, 20, 20)
    levels = torch.floor(x * 255 + 0.5) / 255
    for name in T.PHOTOMETRIC:
        mags = draw(name, 3, 20, np.random.default_rng(1))
        assert torch.equal(T.apply(name, x, mags), T.apply(name, levels, mags)), name
    assert torch.equal(T.apply("Brightness", x, [0.0] * 3), levels)


def test_filters_keep_pil_borders():
    rng = np.random.default_rng(5)
    x = to_tensor(random_images(rng, 2, 20, 30))
    blur = T.apply("Blur", x, None)
    smooth = T.apply("Smooth", x, None)
    for out, r in ((blur, 2), (smooth, 1)):
        assert torch.equal(out[..., :r, :], x[..., :r, :])
        assert torch.equal(out[..., -r:, :], x[..., -r:, :])
        assert torch.equal(out[..., :, :r], x[..., :, :r])
        assert torch.equal(out[..., :, -r:], x[..., :, -r:])
    tiny = to_tensor(random_images(rng, 1, 4, 4))
    assert torch.equal(T.apply("Blur", tiny, None), tiny)  # PIL copies images under the kernel


@pytest.mark.parametrize("name", T.TRANSFORMS)
def test_batched_equals_one_by_one(name):
    """Per-sample magnitudes: the batch result equals each image transformed on its own."""
    rng = np.random.default_rng(9)
    x = to_tensor(random_images(rng, 6, 48, 40))
    mags = draw(name, 6, (48, 40), rng)
    batch = T.apply(name, x, mags)
    for i in range(6):
        assert torch.equal(batch[i : i + 1], T.apply(name, x[i : i + 1], mags[i : i + 1]))


def test_magnitude_zero_is_identity():
    x = to_tensor(random_images(np.random.default_rng(2), 2, 30, 30))
    for name in T.SIGNED:
        assert torch.equal(T.apply(name, x, [0.0, 0.0]), x), name


def test_float64_and_unquantised_inputs():
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    for name in T.TRANSFORMS:
        mags = draw(name, 3, 32, np.random.default_rng(0))
        out = T.apply(name, x, mags)
        assert out.dtype == torch.float64 and out.shape == x.shape
        assert torch.isfinite(out).all()


# --------------------------------------------------------------------------- inverses, masks


def skimage_inverse(name: str, m: np.ndarray, magnitude: float) -> np.ndarray:
    if name == "Rotate":
        return rotate(m, -magnitude, order=1, mode="constant", cval=0.0)
    if name == "TranslateX":
        return warp(m, AffineTransform(translation=(int(magnitude), 0)), order=1)
    if name == "TranslateY":
        return warp(m, AffineTransform(translation=(0, int(magnitude))), order=1)
    if name == "FlipLR":
        return m[:, ::-1]
    if name == "FlipUD":
        return m[::-1, :]
    raise AssertionError(name)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", T.GEOMETRIC)
def test_inverse_matches_skimage(name, size, seed):
    rng = np.random.default_rng(200 + seed)
    maps = rng.random((4, *size))
    maps[1] = np.round(maps[1] * 3) / 3  # ties / plateaus
    mags = draw(name, 4, size, rng)
    ours = T.invert(name, torch.from_numpy(maps), mags).numpy()
    for i in range(4):
        ref = skimage_inverse(name, maps[i], float(mags[i]))
        np.testing.assert_allclose(ours[i], ref, rtol=0, atol=1e-9)
    ours32 = T.invert(name, torch.from_numpy(maps).float(), mags).numpy()
    np.testing.assert_allclose(ours32, ours, rtol=0, atol=1e-5)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", T.GEOMETRIC)
def test_valid_mask_matches_reference_path(name, size, seed):
    """Reference: all-ones image through PIL (torchvision) and skimage's inverse, != 0.
    Pixels where the reference holds only float round-off (< 1e-6) may differ."""
    rng = np.random.default_rng(300 + seed)
    mags = draw(name, 4, size, rng)
    ours = T.valid_mask(name, mags, *size)
    assert ours.dtype == torch.bool and ours.shape == (4, *size)
    ones = np.full((4, *size, 1), 255, dtype=np.uint8)
    forward = pil_batch(name, ones, mags)[:, 0].double().numpy()
    for i in range(4):
        back = skimage_inverse(name, forward[i], float(mags[i]))
        ref = back != 0
        disagree = ours[i].numpy() != ref
        assert not disagree.any() or np.abs(back[disagree]).max() < 1e-6


def test_valid_mask_photometric_all_true_and_translation_exact():
    m = T.valid_mask("Blur", None, 10, 12)
    assert m.shape == (1, 10, 12) and bool(m.all())
    assert bool(T.valid_mask("FlipLR", [0.0, 0.0], 8, 8).all())
    mask = T.valid_mask("TranslateX", [3.2, -5.9], 10, 20)
    # content moved right by 3 loses its last 3 columns; moved left by 5, its first 5
    assert mask[0, :, -3:].sum() == 0 and bool(mask[0, :, :-3].all())
    assert mask[1, :, :5].sum() == 0 and bool(mask[1, :, 5:].all())


@pytest.mark.parametrize("name", ["TranslateX", "TranslateY", "FlipLR", "FlipUD"])
def test_roundtrip_exact_on_valid_region(name):
    rng = np.random.default_rng(4)
    x = torch.rand(5, 1, 36, 28, dtype=torch.float64)
    mags = draw(name, 5, (36, 28), rng)
    back = T.invert(name, T.apply(name, x, mags).squeeze(1), mags)
    mask = T.valid_mask(name, mags, 36, 28)
    assert torch.equal(back[mask], x.squeeze(1)[mask])
    assert bool((back[~mask] == 0).all())


def test_rotation_roundtrip_close_inside_mask():
    x = torch.linspace(0, 1, 64).view(1, 1, 1, 64).expand(3, 1, 64, 64).contiguous()
    mags = torch.tensor([4.5, -45.0, 90.0], dtype=torch.float64)
    back = T.invert("Rotate", T.apply("Rotate", x, mags).squeeze(1), mags)
    inner = T.valid_mask("Rotate", mags, 64, 64)
    # shrink by one pixel (image border included): bilinear blends with the fill there
    outside = torch.nn.functional.pad((~inner).float().unsqueeze(1), (1, 1, 1, 1), value=1.0)
    inner = torch.nn.functional.max_pool2d(outside, 3, 1).squeeze(1) == 0
    assert float((back - x.squeeze(1))[inner].abs().max()) < 2.5 / 64


def test_invert_photometric_is_identity():
    m = torch.rand(2, 9, 9)
    assert T.invert("Equalize", m, None) is m
    assert T.invert("Brightness", m, [0.3, -0.2]) is m


# --------------------------------------------------------------------------- bad input


def test_bad_input():
    x = torch.rand(2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"\[B,C,H,W\]"):
        T.apply("Blur", x[0], None)
    with pytest.raises(ValueError, match="3 magnitudes for a batch of 2"):
        T.apply("Rotate", x, [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="needs magnitudes"):
        T.apply("Rotate", x, None)
    with pytest.raises(ValueError, match="float"):
        T.apply("Blur", (x * 255).to(torch.uint8), None)
    with pytest.raises(ValueError, match="unknown transform"):
        T.apply("Solarize", x, None)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        T.apply("Color", torch.rand(1, 4, 8, 8), [0.5])
    with pytest.raises(ValueError, match=r"\[B,H,W\]"):
        T.invert("Rotate", torch.rand(2, 1, 8, 8), [1.0, 2.0])
    with pytest.raises(ValueError, match="finite"):
        T.apply("Rotate", x, [float("nan"), 1.0])


def test_scalar_magnitude_broadcasts():
    x = torch.rand(3, 3, 20, 20)
    assert torch.equal(T.apply("Rotate", x, 13.5), T.apply("Rotate", x, [13.5] * 3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(0)
    x = to_tensor(random_images(rng, 6, 64, 64))
    for name in T.TRANSFORMS:
        mags = draw(name, 6, 64, rng)
        cpu = T.apply(name, x, mags)
        gpu = T.apply(name, x.cuda(), mags.cuda())
        assert gpu.device.type == "cuda"
        assert torch.allclose(gpu.cpu(), cpu, atol=1e-6), name
        if name in T.GEOMETRIC:
            maps = torch.rand(6, 64, 64, dtype=torch.float64)
            inv = T.invert(name, maps.cuda(), mags).cpu()
            assert torch.allclose(inv, T.invert(name, maps, mags), atol=1e-9), name
            assert torch.equal(
                T.valid_mask(name, mags, 64, 64, "cuda").cpu(), T.valid_mask(name, mags, 64, 64)
            )
