"""cose.precision: fp32 / tf32 / bf16 saliency passes through explain_unit, cose.evaluate and
the explain.precision param. On the CPU, bf16 is torch's CPU autocast (the GPU figures come from
benchmarks/explain_gpu.py and tests/test_gpu.py on a device)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import cose
from cose import config, models
from cose import precision as P
from cose.engine import explain_unit
from cose.saliency import _core

TF = ("Rotate", "FlipLR", "Brightness", "Blur")


def demo(seed: int = 0) -> nn.Module:
    return models.create("demo_resnet", 10, seed=seed, head="mlp").eval()


def images(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def unit(model, x, method: str, precision: str, **kw):
    return explain_unit(
        model, x, torch.zeros(len(x), dtype=torch.long), list(range(len(x))), method,
        lambda t: models.normalize(t, "demo_resnet"), transforms=TF, magnitudes=2,
        random_model=demo(1), checkpoints={"mid_ckpt_e001": demo(2)}, batch_size=16,
        keep_samples=len(x), precision=precision, **kw,
    )  # fmt: skip


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    return float((a @ b) / np.sqrt((a @ a) * (b @ b)))


def test_flags_set_and_restore():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    with P.flags("tf32") as f:
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert f == {"matmul_allow_tf32": True, "cudnn_allow_tf32": True}
        with P.flags("fp32"):
            assert not torch.backends.cudnn.allow_tf32
        assert torch.backends.cudnn.allow_tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    with P.flags("reference") as f:  # PyTorch's defaults, what the authors' code ran
        assert not torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert f == {"matmul_allow_tf32": False, "cudnn_allow_tf32": True}
    with P.flags("bf16") as f:
        assert f == {"matmul_allow_tf32": False, "cudnn_allow_tf32": False}
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    with pytest.raises(ValueError,
                       match="precision: got 'fp16'; allowed: fp32, reference, tf32, bf16"):
        with P.flags("fp16"):
            pass
    with pytest.raises(ValueError, match="precision: got 'auto'"):  # resolve it first
        with P.flags("auto"):
            pass


def test_auto_resolves_to_the_fastest_validated(monkeypatch):
    assert P.resolve("auto", "ig") == "fp32"  # nothing validated: fp32
    table = frozenset({("reference", "ig"), ("tf32", "ig"), ("bf16", "smoothgrad"),
                       ("reference", "lime")})
    assert P.resolve("auto", "ig", table) == "tf32"
    assert P.resolve("auto", "smoothgrad", table) == "bf16"
    assert P.resolve("auto", "lime", table) == "reference"
    assert P.resolve("auto", "gradcam", table) == "fp32"
    assert P.resolve("bf16", "gradcam", table) == "bf16"  # an explicit choice stays
    # measured fastest per method (bf16 can be slower than fp32): that one, if validated
    fastest = {"ig": "reference", "smoothgrad": "fp32", "lime": "tf32"}
    assert P.resolve("auto", "ig", table, fastest) == "reference"
    assert P.resolve("auto", "smoothgrad", table, fastest) == "fp32"
    assert P.resolve("auto", "lime", table, fastest) == "fp32"  # tf32 not validated for lime
    monkeypatch.setattr(P, "VALIDATED", table)
    assert P.resolve("auto", "ig") == "tf32"
    assert P.unvalidated("auto", ["gradcam", "ig"]) == [] and P.warning("auto", ["ig"]) is None
    with pytest.raises(ValueError, match="allowed: auto, fp32, reference, tf32, bf16"):
        P.resolve("fp16", "ig")


def test_wrap_per_method():
    m = demo()
    x = models.normalize(images(1), "demo_resnet")
    assert P.wrap(m, "fp32", "ig", x) is m and P.wrap(m, "tf32", "gradcam", x) is m
    cam = P.wrap(m, "bf16", "gradcam", x)
    grad = P.wrap(m, "bf16", "ig", x)
    assert isinstance(cam, P.Autocast) and cam.module is m  # CAMs hook the model's own layer
    assert models.cam_layer(cam)[0] is models.cam_layer(m)[0]
    assert not any(isinstance(k, nn.BatchNorm2d) for k in grad.module.modules())  # folded
    out = grad(x)
    assert out.dtype == torch.float32
    with torch.no_grad():
        assert (out - m(x)).abs().max() < 0.05 * m(x).abs().max()
    # conv+BN folding needs fx tracing, which the wrapper refuses: it stays as it is
    assert _core.fast_model(grad, x) is grad
    with pytest.raises(ValueError, match="allowed: auto, fp32, reference, tf32, bf16"):
        P.wrap(m, "half", "ig", x)
    assert P.wrap(m, "auto", "ig", x) is m and P.wrap(m, "reference", "ig", x) is m


def test_layout_channels_last_only_where_it_applies(monkeypatch):
    """channels_last: CUDA, a fast precision, a method that only calls the model, a conv net."""
    resnet, vit = demo(), models.create("demo_vit", 10, seed=0)
    for prec in ("reference", "tf32", "bf16"):
        assert P.layout(prec, "ig", resnet, "cuda") == "channels_last"
        assert P.layout(prec, "lime", resnet, "cuda") == "channels_last"
        assert P.layout(prec, "gradcam", resnet, "cuda") == "nchw"  # hooks the model's layer
        assert P.layout(prec, "ig", resnet, "cpu") == "nchw"
        assert P.layout(prec, "ig", vit, "cuda") == "nchw"  # one conv: the patch embedding
    assert P.layout("fp32", "ig", resnet, "cuda") == "nchw"
    assert P.layout("auto", "ig", resnet, "cuda") == "nchw"  # nothing validated: fp32
    monkeypatch.setattr(P, "VALIDATED", frozenset({("tf32", "ig")}))
    assert P.layout("auto", "ig", resnet, "cuda") == "channels_last"


def test_channels_last_passes_compute_the_same_function():
    """The channels_last copy (forced on the CPU with device_type="cuda"): folded, NHWC weights,
    cached, rebuilt when the model's weights change, and the same maps within float noise."""
    from cose import saliency

    m = demo()
    x = models.normalize(images(2), "demo_resnet")
    t = torch.tensor([1, 2])
    run = P.wrap(m, "tf32", "ig", x, device_type="cuda")
    assert isinstance(run, _core.ChannelsLast)
    assert not any(isinstance(k, nn.BatchNorm2d) for k in run.modules())
    convs = [k for k in run.modules() if isinstance(k, nn.Conv2d)]
    assert convs and all(k.weight.is_contiguous(memory_format=torch.channels_last)
                         for k in convs if k.weight.shape[-1] > 1)
    assert P.wrap(m, "tf32", "ig", x, device_type="cuda") is run  # cached
    with torch.no_grad():
        torch.testing.assert_close(run(x), m(x), atol=1e-4, rtol=1e-4)
    a = saliency.explain("ig", run, x, t, steps=4)
    b = saliency.explain("ig", m, x, t, steps=4)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    bf = P.wrap(m, "bf16", "lime", x, device_type="cuda")
    assert isinstance(bf, P.Autocast) and isinstance(bf.module, _core.ChannelsLast)
    assert P.wrap(m, "tf32", "ig", x) is m  # on the CPU itself: as it is
    with torch.no_grad():  # a weight change rebuilds the copy
        next(m.parameters()).mul_(1.5)
        again = P.wrap(m, "tf32", "ig", x, device_type="cuda")
        assert again is not run
        torch.testing.assert_close(again(x), m(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["gradcam", "ig"])
def test_explain_unit_precisions(method):
    """Same pairs (predictions are fp32) at every precision; on the CPU tf32 changes nothing,
    bf16 changes the maps a little."""
    model, x = demo(), images()
    ref = unit(model, x, method, "fp32")
    tf32 = unit(model, x, method, "tf32")
    bf16 = unit(model, x, method, "bf16")
    assert ref.pairs.equals(unit(model, x, method, "reference").pairs)  # no TF32 on a CPU
    assert ref.pairs.equals(unit(model, x, method, "auto").pairs)  # nothing validated: fp32
    keys = ["test_idx", "transform_type", "transform_magnitude", "pred_class", "t_pred_class"]
    assert ref.pairs[keys].equals(bf16.pairs[keys])
    assert ref.pairs.equals(tf32.pairs)
    a, b = ref.samples["variant_maps"], bf16.samples["variant_maps"]
    assert not np.array_equal(a, b)  # autocast really ran
    worst = min(pearson(a[v, i], b[v, i]) for v in range(a.shape[0]) for i in range(a.shape[1]))
    assert worst > 0.9, worst
    diff = (ref.pairs[["ssim", "spearman"]] - bf16.pairs[["ssim", "spearman"]]).abs()
    assert float(diff.max().max()) < 0.2


def test_explain_unit_restores_flags_and_rejects_unknown():
    model, x = demo(), images(1)
    torch.backends.cudnn.allow_tf32 = True  # PyTorch's default
    unit(model, x, "gradcam", "bf16")
    assert torch.backends.cudnn.allow_tf32
    with pytest.raises(ValueError, match="precision: got 'fp64'"):
        unit(model, x, "gradcam", "fp64")


def test_evaluate_precision():
    model, x = demo(), images(2)
    labels = torch.zeros(2, dtype=torch.long)
    common = dict(methods="gradcam", transforms=["FlipLR"], normalize="demo_resnet",
                  progress=False)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fp32 is the reference: no warning
        a = cose.evaluate(model, x, labels, **common)
    with pytest.warns(UserWarning, match="precision bf16: not validated for gradcam"):
        b = cose.evaluate(model, x, labels, precision="bf16", **common)
    assert a.pairs[["test_idx", "pred_class", "t_pred_class"]].equals(
        b.pairs[["test_idx", "pred_class", "t_pred_class"]]
    )
    with pytest.raises(ValueError, match="precision: got 'int8'"):
        cose.evaluate(model, x, labels, precision="int8", **common)


def test_config_precision():
    root = __import__("pathlib").Path(__file__).resolve().parent.parent / "params.yaml"
    assert config.PRECISIONS == P.PRECISIONS
    assert config.load(root).explain.precision == "auto"
    assert config.load(root, ["explain.precision=reference"]).explain.precision == "reference"
    cfg = config.load(root, ["explain.precision=bf16"])
    assert cfg.explain.precision == "bf16"
    with pytest.raises(config.ConfigError,
                       match="explain.precision: got 'fp16'; allowed: auto, fp32, reference"):
        config.load(root, ["explain.precision=fp16"])


def test_unvalidated_modes_are_named(monkeypatch):
    """reference/tf32/bf16 count as validated for a method only once a device check has
    measured its COSE within 0.005 of fp32 (P.VALIDATED); until then every such run says so."""
    methods = ["gradcam", "ig", "smoothgrad"]
    assert P.unvalidated("fp32", methods) == [] and P.warning("fp32", methods) is None
    assert P.unvalidated("bf16", methods) == methods
    monkeypatch.setattr(P, "VALIDATED", frozenset({("bf16", "smoothgrad"), ("tf32", "ig")}))
    assert P.unvalidated("bf16", methods) == ["gradcam", "ig"]
    assert P.unvalidated("tf32", methods) == ["gradcam", "smoothgrad"]
    assert P.warning("bf16", ["smoothgrad"]) is None
    assert P.warning("tf32", methods).startswith("precision tf32: not validated for gradcam, "
                                                 "smoothgrad (COSE may differ")
    assert P.unvalidated("reference", methods) == methods
    with pytest.raises(ValueError, match="allowed: auto, fp32, reference, tf32, bf16"):
        P.unvalidated("fp16", methods)
