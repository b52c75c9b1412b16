"""cose.models: registry, demo models, heads, CAM layers, COSE checkpoints."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import cose.models as M

torch.set_num_threads(2)

PAPER = [
    "resnet50", "resnet101", "vit_b16", "vit_l16", "swin_t", "convnext_s", "vgg16",
    "densenet121", "dino_resnet50", "dino_vit_b16", "mocov3_resnet50", "mocov3_vit_b16",
    "ibot_vit_b16", "ibot_swin_t", "spark_convnext_s",
]


def _cam_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    layer, reshape = M.cam_layer(model)
    acts = {}
    h = layer.register_forward_hook(lambda mod, i, o: acts.__setitem__("a", o))
    try:
        out = model(x)
    finally:
        h.remove()
    a = acts["a"]
    return out, (reshape(a) if reshape is not None else a)


def test_names_cover_paper_and_demo():
    assert set(PAPER + list(M.DEMO_MODELS)) <= set(M.names())


def test_unknown_model_names_allowed():
    with pytest.raises(ValueError, match="unknown model 'nope'.*resnet50"):
        M.create("nope", 10)
    with pytest.raises(ValueError, match="num_classes"):
        M.create("demo_resnet", 0)
    with pytest.raises(ValueError, match="head"):
        M.create("demo_resnet", 3, head="conv")


@pytest.mark.parametrize(
    "name,resize",
    [("resnet50", 224), ("vit_b16", 256), ("vgg16", 256), ("densenet121", 256),
     ("swin_t", 232), ("convnext_s", 232), ("ibot_swin_t", 232), ("demo_vit", 32)],
)
def test_preprocess_per_family(name, resize):
    spec = M.preprocess(name)
    assert spec.resize == resize and spec.interpolation == "bilinear"
    assert spec.crop == (32 if name.startswith("demo") else 224)
    assert spec.mean == (0.485, 0.456, 0.406) and spec.std == (0.229, 0.224, 0.225)


def test_normalize_matches_formula():
    x = torch.rand(2, 3, 4, 4, dtype=torch.float64)
    y = M.normalize(x, "demo_resnet")
    assert y.dtype == x.dtype
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(3, 1, 1)
    torch.testing.assert_close(y, (x - mean) / std)
    torch.testing.assert_close(M.normalize(x[0], M.preprocess("vit_b16")), y[0])


@pytest.mark.parametrize("name", M.DEMO_MODELS)
def test_demo_models(name):
    m1 = M.create(name, 10, seed=0)
    m2 = M.create(name, 10, seed=0)
    m3 = M.create(name, 10, seed=1)
    assert not m1.training
    s1, s2, s3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert any(not torch.equal(s1[k], s3[k]) for k in s1 if s1[k].is_floating_point())
    assert sum(p.numel() for p in m1.parameters()) < 500_000
    spec = M.preprocess(name)
    x = M.normalize(torch.rand(4, 3, spec.crop, spec.crop), spec).requires_grad_()
    out, cam = _cam_output(m1, x)
    assert out.shape == (4, 10)
    assert cam.shape[0] == 4 and cam.shape[2] >= 4 and cam.shape[3] >= 4
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_seed_does_not_touch_global_rng():
    torch.manual_seed(123)
    a = torch.rand(3)
    torch.manual_seed(123)
    M.create("demo_vit", 5, seed=7)
    assert torch.equal(torch.rand(3), a)


def test_mlp_head_and_head_module():
    m = M.create("demo_resnet", 7, head="mlp", seed=0)
    head = M.head_module(m)
    assert isinstance(head, M.MLPHead)
    assert [lin.out_features for lin in head if isinstance(lin, nn.Linear)] == [1024, 256, 7]
    assert m(torch.zeros(2, 3, 32, 32)).shape == (2, 7)
    for name in M.DEMO_MODELS:
        assert isinstance(M.head_module(M.create(name, 3, seed=0)), nn.Linear)


def test_cam_layer_unknown_type_names_class():
    class Tiny(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(ValueError, match="Tiny"):
        M.cam_layer(Tiny())


def test_cam_layer_torchvision_types():
    import torchvision.models as tvm
    from torchvision.models.swin_transformer import SwinTransformer
    from torchvision.models.vision_transformer import VisionTransformer

    r = tvm.resnet18(num_classes=3)
    assert M.cam_layer(r) == (r.layer4[-1], None)
    v = VisionTransformer(32, 4, 1, 2, 16, 32, num_classes=3)
    layer, reshape = M.cam_layer(v)
    assert layer is v.encoder.layers[-1].ln_1
    assert reshape(torch.zeros(2, 65, 16)).shape == (2, 16, 8, 8)
    s = SwinTransformer([2, 2], 8, [2], [2], [4, 4], num_classes=3)
    layer, reshape = M.cam_layer(s)
    assert layer is s.features[-1][-1].norm1
    assert reshape(torch.zeros(2, 8, 8, 16)).shape == (2, 16, 8, 8)
    compiled = torch.nn.DataParallel(r)
    assert M.cam_layer(compiled)[0] is r.layer4[-1]


def test_token_reshape_drops_prefix_tokens():
    tokens = torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(2, 6, 3)
    grid = M.TokenReshape(prefix=2)(tokens)  # e.g. CLS + 1 register, 4 patches
    assert grid.shape == (2, 3, 2, 2)
    assert torch.equal(grid[0, :, 0, 0], tokens[0, 2])
    assert torch.equal(grid[1, :, 1, 1], tokens[1, 5])
    with pytest.raises(ValueError, match="square"):
        M.TokenReshape(prefix=1)(torch.zeros(1, 4, 3))


def test_cose_checkpoint_roundtrip_and_mismatch(tmp_path):
    m = M.create("demo_convnext", 4, seed=3, head="mlp")
    path = tmp_path / "c.pt"
    torch.save(M.cose_checkpoint(m, epoch=2), path)
    back = M.create("demo_convnext", 4, weights=path)
    assert back.cose_meta["head"] == "mlp"
    for k, v in m.state_dict().items():
        assert torch.equal(v, back.state_dict()[k])
    assert M.load_checkpoint(path).cose_meta == m.cose_meta
    with pytest.raises(ValueError, match="5"):
        M.create("demo_convnext", 5, weights=path)
    with pytest.raises(ValueError, match="architecture"):
        M.create("demo_resnet", 4, weights=path)
    with pytest.raises(ValueError, match="head"):
        M.create("demo_convnext", 4, weights=path, head="linear")
    with pytest.raises(FileNotFoundError):
        M.create("demo_convnext", 4, weights=tmp_path / "missing.pt")


def _all_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and every buffer, the non-persistent ones (no state dict has) included."""
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


@pytest.mark.parametrize("name,head", [("demo_swin", "linear"), ("demo_vit", "mlp"),
                                       ("demo_resnet", "linear"), ("demo_convnext", "mlp")])
def test_load_checkpoints_gives_the_models_create_gives(tmp_path, name, head):
    paths = []
    for seed in range(3):
        path = tmp_path / f"{seed}.pt"
        torch.save(M.cose_checkpoint(M.create(name, 5, seed=seed, head=head)), path)
        paths.append(path)
    got = M.load_checkpoints(name, 5, paths)
    x = torch.rand(2, 3, 32, 32)
    for path, model in zip(paths, got):
        want = M.create(name, 5, weights=path)
        a, b = _all_tensors(want), _all_tensors(model)
        assert list(a) == list(b)
        for k in a:
            assert torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype, k
            assert a[k].requires_grad == b[k].requires_grad, k
        assert not model.training and model.cose_meta == want.cose_meta
        assert torch.equal(model(x), want(x))
    # the copies share no tensor with the first model or with each other
    first = got[0].state_dict()
    for model in got[1:]:
        for k, v in model.state_dict().items():
            assert v.data_ptr() != first[k].data_ptr() or v.numel() == 0, k
    with torch.no_grad():
        next(got[1].parameters()).add_(1.0)
    assert torch.equal(next(got[2].parameters()),
                       next(M.create(name, 5, weights=paths[2]).parameters()))
    assert M.load_checkpoints(name, 5, []) == []


def test_load_checkpoints_checks_every_file(tmp_path):
    ok = tmp_path / "ok.pt"
    torch.save(M.cose_checkpoint(M.create("demo_resnet", 4, seed=0)), ok)
    other_arch = tmp_path / "vit.pt"
    torch.save(M.cose_checkpoint(M.create("demo_vit", 4, seed=0)), other_arch)
    other_head = tmp_path / "mlp.pt"
    torch.save(M.cose_checkpoint(M.create("demo_resnet", 4, seed=0, head="mlp")), other_head)
    other_classes = tmp_path / "c5.pt"
    torch.save(M.cose_checkpoint(M.create("demo_resnet", 5, seed=0)), other_classes)
    plain = tmp_path / "plain.pt"
    torch.save(M.create("demo_resnet", 4, seed=0).state_dict(), plain)
    with pytest.raises(ValueError, match=r"vit\.pt.*architecture"):
        M.load_checkpoints("demo_resnet", 4, [ok, other_arch])
    with pytest.raises(ValueError, match=r"mlp\.pt.*head"):
        M.load_checkpoints("demo_resnet", 4, [ok, other_head])
    with pytest.raises(ValueError, match=r"c5\.pt.*5 classes"):
        M.load_checkpoints("demo_resnet", 4, [ok, other_classes])
    with pytest.raises(ValueError, match=r"c5\.pt.*5 classes"):
        M.load_checkpoints("demo_resnet", 4, [other_classes, ok])
    for paths in ([ok, plain], [plain, ok]):
        with pytest.raises(ValueError, match=r"plain\.pt: not a COSE checkpoint"):
            M.load_checkpoints("demo_resnet", 4, paths)
    with pytest.raises(FileNotFoundError, match="missing"):
        M.load_checkpoints("demo_resnet", 4, [ok, tmp_path / "missing.pt"])
    # a checkpoint whose state lacks a key is refused, not left half on the meta device
    sd = M.cose_checkpoint(M.create("demo_resnet", 4, seed=1))
    sd["state_dict"].pop(next(iter(sd["state_dict"])))
    torch.save(sd, tmp_path / "short.pt")
    with pytest.raises(RuntimeError, match="Missing key"):
        M.load_checkpoints("demo_resnet", 4, [ok, tmp_path / "short.pt"])


def test_load_checkpoints_casts_to_the_models_dtypes(tmp_path):
    """A half-precision checkpoint loads as create() loads it: into float32 tensors."""
    ckpt = M.cose_checkpoint(M.create("demo_vit", 3, seed=1))
    ckpt["state_dict"] = {k: v.half() if v.is_floating_point() else v
                          for k, v in ckpt["state_dict"].items()}
    torch.save(ckpt, tmp_path / "half.pt")
    torch.save(M.cose_checkpoint(M.create("demo_vit", 3, seed=0)), tmp_path / "a.pt")
    got = M.load_checkpoints("demo_vit", 3, [tmp_path / "a.pt", tmp_path / "half.pt"])[1]
    want = M.create("demo_vit", 3, weights=tmp_path / "half.pt")
    for k, v in want.state_dict().items():
        assert v.dtype == got.state_dict()[k].dtype and torch.equal(v, got.state_dict()[k]), k


def test_weights_only_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "args": _Opaque()}, path)
    with pytest.raises(ValueError, match="weights-only"):
        M.create("demo_resnet", 3, weights=path)


class _Opaque:
    pass


ARCHS_224 = ["resnet50", "resnet101", "vit_b16", "swin_t", "ibot_swin_t", "convnext_s", "vgg16",
             "densenet121"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS_224)
def test_paper_architectures_forward_backward_224(arch):
    m = M.create(arch, 10, seed=0, head="mlp").train()
    x = torch.rand(1, 3, 224, 224).requires_grad_()
    out, cam = _cam_output(m, x)
    assert out.shape == (1, 10)
    assert cam.ndim == 4 and cam.shape[2] >= 7
    out.sum().backward()
    assert x.grad.abs().sum() > 0


@pytest.mark.slow
def test_vit_l16_builds_and_cam_resolves():
    m = M.create("vit_l16", 10, seed=0)
    layer, reshape = M.cam_layer(m)
    assert layer is m.blocks[-1].norm1
    assert reshape(torch.zeros(1, 197, 1024)).shape == (1, 1024, 14, 14)
    assert sum(p.numel() for p in m.parameters()) > 300e6


def test_every_paper_name_shares_a_tested_architecture():
    """Names differ from the architectures built above only by their weights' origin."""
    built = [M.get(a) for a in [*ARCHS_224, "vit_l16"]]
    for name in PAPER:
        spec = M.get(name)
        twins = [b for b in built if (b.arch, b.timm_name, dict(b.kwargs)) ==
                 (spec.arch, spec.timm_name, dict(spec.kwargs))]
        assert twins, name
        assert spec.preprocess == twins[0].preprocess
