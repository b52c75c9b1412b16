"""Parity of cose.saliency with the reference libraries on the same model, inputs and settings.

pytorch-grad-cam (GradCAM, GradCAM++), PAIR saliency (IG, SmoothGrad, BlurIG, GuidedIG, called
as in PAIR's PyTorch example: HWC numpy, softmax probability of the target, gradients to the
input) and lime (quickshift, hide colour 0). Random-init models in eval mode, fixed seeds,
several random inputs. Pearson >= 0.99 per map (SmoothGrad, whose noise differs: >= 0.95 with
many samples); LIME: identical masks.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from cose import saliency as S

pytest.importorskip("pytorch_grad_cam")
pytest.importorskip("saliency.core")
pytest.importorskip("lime")

torch.set_num_threads(2)


# ----------------------------------------------------------------------------- reference side


def _numpy_quantile_shim():
    """The shim PAIR 0.2.1's GuidedIG needs under numpy 2 (it passes interpolation= to
    np.quantile): the one the benchmark's reference side uses."""
    bench = Path(__file__).resolve().parent.parent / "benchmarks"
    if str(bench) not in sys.path:
        sys.path.insert(0, str(bench))
    from saliency_speed import _NumpyQuantileShim

    return _NumpyQuantileShim(np)


@pytest.fixture
def pair(monkeypatch):
    import saliency.core as pair_core
    from saliency.core import guided_ig

    monkeypatch.setattr(guided_ig, "np", _numpy_quantile_shim())
    return pair_core


def _call_model_function(model, pair_core):
    def fn(images, call_model_args=None, expected_keys=None):
        x = torch.tensor(np.ascontiguousarray(np.transpose(np.asarray(images), (0, 3, 1, 2))),
                         dtype=torch.float32).requires_grad_(True)
        out = torch.softmax(model(x), dim=1)[:, call_model_args["target"]]
        g = torch.autograd.grad(out, x, grad_outputs=torch.ones_like(out))[0]
        return {pair_core.INPUT_OUTPUT_GRADIENTS: torch.movedim(g, 1, 3).detach().numpy()}

    return fn


def pair_map(pair_core, method, model, image, target, settings):
    x = image.permute(1, 2, 0).numpy()
    fn = _call_model_function(model, pair_core)
    args = {"target": int(target)}
    if method == "ig":
        mask = pair_core.IntegratedGradients().GetMask(
            x, fn, args, x_baseline=np.zeros_like(x), x_steps=settings["steps"], batch_size=20)
    elif method == "smoothgrad":
        np.random.seed(0)
        mask = pair_core.GradientSaliency().GetSmoothedMask(
            x, fn, args, stdev_spread=settings["noise"], nsamples=settings["samples"],
            magnitude=True)
    elif method == "blur_ig":
        mask = pair_core.BlurIG().GetMask(
            x, fn, args, max_sigma=settings["max_sigma"], steps=settings["steps"],
            grad_step=settings["grad_step"], batch_size=20)
    elif method == "guided_ig":
        mask = pair_core.GuidedIG().GetMask(
            x, fn, args, x_baseline=np.zeros_like(x), x_steps=settings["steps"],
            fraction=settings["fraction"], max_dist=settings["max_dist"])
    else:
        raise ValueError(method)
    return pair_core.VisualizeImageGrayscale(mask)


def gradcam_maps(kind, model, layer, reshape, images, targets):
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cls = GradCAM if kind == "gradcam" else GradCAMPlusPlus
    with cls(model=model, target_layers=[layer], reshape_transform=reshape) as cam:
        return np.stack([
            cam(input_tensor=images[i : i + 1], targets=[ClassifierOutputTarget(int(t))])[0]
            for i, t in enumerate(targets)
        ])


def pearson(a, b) -> float:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.std() == 0 or b.std() == 0:
        return 1.0 if np.allclose(a, b, atol=1e-5) else 0.0
    return float(np.corrcoef(a, b)[0, 1])


# ----------------------------------------------------------------------------- models, inputs


def _resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


def _tv_vit():
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=64, patch_size=8, num_layers=2, num_heads=2,
                              hidden_dim=32, mlp_dim=64, num_classes=10)
    nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision zero-inits the head
    return model.eval()


def _tv_swin():
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                           window_size=[4, 4], num_classes=10).eval()


def _tv_convnext():
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    torch.manual_seed(0)
    return ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=10).eval()


def _tv_densenet():
    torch.manual_seed(0)
    return torchvision.models.densenet121(num_classes=10).eval()


def _layer(model):
    """The CAM layer and reshape the reference used for this family (own resolution)."""
    from torchvision.models.convnext import ConvNeXt
    from torchvision.models.swin_transformer import SwinTransformer
    from torchvision.models.vision_transformer import VisionTransformer

    if isinstance(model, torchvision.models.ResNet):
        return model.layer4[-1], None
    if isinstance(model, VisionTransformer):
        n = model.image_size // model.patch_size

        def tokens(t):  # drop CLS, tokens -> [B, C, n, n]
            return t[:, 1:, :].reshape(t.shape[0], n, n, t.shape[2]).permute(0, 3, 1, 2)

        return model.encoder.layers[-1].ln_1, tokens
    if isinstance(model, SwinTransformer):
        return model.features[-1][-1].norm1, lambda t: t.permute(0, 3, 1, 2)
    if isinstance(model, (ConvNeXt, torchvision.models.DenseNet)):
        return model.features[-1], None
    raise AssertionError(type(model))


def _inputs(n, size, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def _targets(model, x, seed):
    """Predictions for half, random classes for the rest: not one hand-picked case."""
    with torch.no_grad():
        pred = model(x).argmax(1)
    g = torch.Generator().manual_seed(seed)
    rnd = torch.randint(0, 10, (x.shape[0],), generator=g)
    return torch.where(torch.arange(x.shape[0]) % 2 == 0, pred, rnd)


# ----------------------------------------------------------------------------- CAMs


CAM_MODELS = {
    "resnet18": _resnet18,
    "vit": _tv_vit,
    "swin": _tv_swin,
    "convnext": _tv_convnext,
    "densenet121": _tv_densenet,
}


class _NoInplaceReLU:
    """torch.nn.functional with relu(inplace=True) made out of place."""

    def __getattr__(self, name):
        return getattr(nn.functional, name)

    @staticmethod
    def relu(x, inplace=False):
        return nn.functional.relu(x)


@pytest.mark.parametrize("arch", sorted(CAM_MODELS))
@pytest.mark.parametrize("kind", ["gradcam", "gradcampp"])
def test_cam_parity_with_pytorch_grad_cam(arch, kind, monkeypatch):
    if arch == "densenet121":
        # DenseNet applies F.relu(features, inplace=True) after the CAM layer. pytorch-grad-cam
        # stores `output.cpu().detach()`: on CUDA (the reference) a copy of the pre-ReLU
        # activation, on CPU the same storage, which the in-place ReLU then overwrites. Ours
        # reads the pre-ReLU activation on every device; to compare with the reference's CUDA
        # behaviour on this CPU, the ReLU is made out of place for the test.
        monkeypatch.setattr(torchvision.models.densenet, "F", _NoInplaceReLU())
    model = CAM_MODELS[arch]()
    layer, reshape = _layer(model)
    x = _inputs(4, 64, seed=11)
    t = _targets(model, x, seed=12)
    ours = S.explain(kind, model, x, t, layer=layer, reshape=reshape).numpy()
    ref = gradcam_maps(kind, model, layer, reshape, x, t)
    assert ours.shape == ref.shape == (4, 64, 64)
    assert sum(float(r.std()) > 0 for r in ref) >= 3  # real maps, not constant ones
    for i in range(4):
        r = pearson(ours[i], ref[i])
        assert r >= 0.99, (arch, kind, i, r)
    # min-max scaled like the reference, so the values agree too, not only the shape of the map
    np.testing.assert_allclose(ours, ref, atol=2e-3)


# ----------------------------------------------------------------------------- PAIR methods


GRAD_CASES = [
    ("ig", {"steps": 25}),  # the reference setting
    ("blur_ig", {"steps": 100, "max_sigma": 50.0, "grad_step": 0.01}),  # the reference settings
    ("guided_ig", {"steps": 60, "max_dist": 0.02, "fraction": 0.25}),
    ("guided_ig", {"steps": 30, "max_dist": 0.1, "fraction": 0.1}),
]


@pytest.mark.parametrize("method,settings", GRAD_CASES, ids=lambda v: str(v))
def test_gradient_methods_parity_with_pair(pair, method, settings):
    model = _resnet18()
    x = _inputs(3, 32, seed=21)
    t = _targets(model, x, seed=22)
    ours = S.explain(method, model, x, t, **settings).numpy()
    for i in range(3):
        ref = pair_map(pair, method, model, x[i], t[i], settings)
        r = pearson(ours[i], ref)
        assert r >= 0.99, (method, i, r)


def test_ig_attribution_matches_pair_before_postprocessing(pair):
    """The integration rule itself (alphas linspace(0,1,steps), sum / steps), not only the map."""
    from cose.saliency import ig

    model = _resnet18()
    x = _inputs(2, 32, seed=31)
    t = torch.tensor([3, 8])
    ours = ig.attribution(model, x, t, 9, steps=7, batch_size=5).permute(0, 2, 3, 1).numpy()
    for i in range(2):
        xi = x[i].permute(1, 2, 0).numpy()
        ref = pair.IntegratedGradients().GetMask(
            xi, _call_model_function(model, pair), {"target": int(t[i])},
            x_baseline=np.zeros_like(xi), x_steps=7, batch_size=3)
        np.testing.assert_allclose(ours[i], ref, rtol=1e-4, atol=1e-8)


def test_blur_matches_scipy_gaussian_filter():
    from scipy import ndimage

    from cose.saliency.blur_ig import _blur, gaussian_matrix

    img = np.random.RandomState(0).rand(20, 23, 3)
    x = torch.from_numpy(img).permute(2, 0, 1)[None]
    for sigma in (0.0, 0.01, 0.3, 1.7, 12.5, 50.0):
        ref = ndimage.gaussian_filter(img, sigma=[sigma, sigma, 0], mode="constant")
        mh, mw = gaussian_matrix(sigma, 20)[None], gaussian_matrix(sigma, 23)[None]
        ours = _blur(x, mh, mw)[0].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(ours, ref, atol=1e-12)


def test_guided_ig_attribution_matches_pair(pair):
    """The sequential path itself, step for step, on float64 state (before post-processing).

    Each step's gradient picks the next step's features, so float32 gradient differences
    compound: one image at a time (PAIR's calls) the model sees the same batches as PAIR's and
    the path is identical; batched, the convolutions may round differently (seen with torch
    2.14 on an AMD EPYC: 5% apart in the attribution sum, Pearson 0.9997)."""
    from cose.saliency import guided_ig

    model = _resnet18()
    x = _inputs(2, 32, seed=41)
    t = torch.tensor([1, 6])
    batched = guided_ig.attribution(model, x, t, 9, steps=20, fraction=0.25, max_dist=0.02,
                                    batch_size=8).permute(0, 2, 3, 1).numpy()
    for i in range(2):
        ours = guided_ig.attribution(model, x[i : i + 1], t[i : i + 1], 9, steps=20,
                                     fraction=0.25, max_dist=0.02, batch_size=8)
        ours = ours[0].permute(1, 2, 0).numpy()
        xi = x[i].permute(1, 2, 0).numpy()
        ref = pair.GuidedIG().GetMask(
            xi, _call_model_function(model, pair), {"target": int(t[i])},
            x_baseline=np.zeros_like(xi), x_steps=20, fraction=0.25, max_dist=0.02)
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-8)
        # the path integral telescopes: sum of attributions ~ p(x) - p(baseline)
        np.testing.assert_allclose(ours.sum(), ref.sum(), rtol=1e-5, atol=1e-8)
        assert pearson(batched[i], ref) > 0.99


def test_smoothgrad_parity_with_pair_many_samples(pair):
    settings = {"samples": 150, "noise": 0.15}
    model = _resnet18()
    x = _inputs(3, 32, seed=51)
    t = _targets(model, x, seed=52)
    ours = S.explain("smoothgrad", model, x, t, seed=3, **settings).numpy()
    for i in range(3):
        ref = pair_map(pair, "smoothgrad", model, x[i], t[i], settings)
        r = pearson(ours[i], ref)
        assert r >= 0.95, (i, r)


# ----------------------------------------------------------------------------- LIME


def _structured(n, size, seed):
    """Random 5x5 colour patchworks (normalised): quickshift finds 15+ superpixels in them."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand((n, 3, 5, 5), generator=g)
    x = nn.functional.interpolate(low, size=(size, size), mode="nearest")
    x = x + 0.02 * torch.randn(x.shape, generator=g)
    return (x - 0.45) / 0.225


def _lime_reference(model, image, target, samples, seed, top_label):
    """The reference's call (utils/transforms.py explain_img): the float32 HWC model input,
    LimeImageExplainer() on numpy's global stream (freshly seeded here), top_labels=5,
    hide_color=0, random_seed=seed, the mask of top_labels[0]; or, for a given target,
    the same call explaining that label."""
    from lime import lime_image

    def classifier_fn(batch):
        xb = np.ascontiguousarray(np.transpose(batch, (0, 3, 1, 2)))
        with torch.no_grad():
            return torch.softmax(model(torch.tensor(xb, dtype=torch.float32)), 1).numpy()

    np.random.seed(seed)
    explainer = lime_image.LimeImageExplainer()
    kw = {"top_labels": 5} if top_label else {"labels": (int(target),), "top_labels": None}
    exp = explainer.explain_instance(np.moveaxis(image.numpy(), 0, 2), classifier_fn,
                                     hide_color=0, random_seed=seed, num_samples=samples, **kw)
    label = exp.top_labels[0] if top_label else int(target)
    assert label == int(target)
    _, mask = exp.get_image_and_mask(label, positive_only=False, num_features=10,
                                     hide_rest=False)
    return mask, len(np.unique(exp.segments))


@pytest.mark.parametrize("top_label", [True, False], ids=["top_label", "given_target"])
def test_lime_identical_masks(top_label):
    model = _resnet18()
    x = _structured(3, 96, seed=61)
    if top_label:
        with torch.no_grad():
            t = model(x).argmax(1)
    else:
        t = torch.tensor([2, 5, 9])
    seed = 5
    # lime's own defaults (kernel 4, max_dist 200): away from 224 px ours scale them
    ours = S.explain("lime", model, x, t, samples=150, seed=seed, kernel_size=4,
                     max_dist=200).numpy()
    n_segments = []
    for i in range(3):
        ref, n = _lime_reference(model, x[i], t[i], 150, seed, top_label)
        n_segments.append(n)
        np.testing.assert_array_equal(ours[i], ref)
    assert max(n_segments) > 10  # the top-10 choice mattered


def test_lime_official_call_on_transformed_224px_images():
    """At the paper's size, on transformed images (a rotation, a translation, a photometric
    change): the reference's call and ours give the same superpixels and the same mask, at the
    reference's 1000 samples. A small CNN keeps the 1000 forward passes cheap."""
    from cose import transforms as T

    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 8, 8, stride=8), nn.ReLU(), nn.Conv2d(8, 16, 4, stride=4),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    model.eval()
    g = torch.Generator().manual_seed(12)
    low = torch.rand((1, 3, 7, 7), generator=g)
    base = nn.functional.interpolate(low, size=(224, 224), mode="bilinear", align_corners=False)
    base = torch.floor(base * 255 + 0.5) / 255  # 8-bit levels, as a loaded image
    variants = [T.apply("Rotate", base, [31.5]), T.apply("TranslateX", base, [-15.999999]),
                T.apply("Contrast", base, [0.528])]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (torch.cat(variants) - mean) / std
    with torch.no_grad():
        t = model(x).argmax(1)
    ours = S.explain("lime", model, x, t, samples=1000, seed=0).numpy()
    for i in range(3):
        ref, n = _lime_reference(model, x[i], t[i], 1000, 0, top_label=True)
        np.testing.assert_array_equal(ours[i], ref)
        assert n > 10


def test_lime_segments_the_float32_input():
    """quickshift on a float64 copy of the input finds other superpixels on some images; ours
    segments what the model receives (float32), as the reference does."""
    from skimage.segmentation import quickshift

    from cose.saliency.lime import segment

    x = _structured(4, 96, seed=7)
    for i in range(4):
        img = np.moveaxis(x[i].numpy(), 0, 2)
        want = quickshift(img, kernel_size=4, max_dist=200, ratio=0.2, rng=0)
        np.testing.assert_array_equal(segment(img, 0), want)


