"""Weight loaders: synthetic state dicts in each published key layout.

Each test builds a small model of the family, writes its weights in the layout a project
publishes (DINO, MoCo v3, iBOT, SparK, facebookresearch ConvNeXt, Microsoft Swin, timm,
torchvision), loads it through ``cose.models`` and checks the weights (or the outputs) match.
"""

from __future__ import annotations

import re

import pytest
import timm
import torch
from torch import nn

import cose.models as M
from cose.models.registry import ModelSpec

torch.set_num_threads(2)


def _spec(family: str, name: str = "test") -> ModelSpec:
    return ModelSpec(name, "-", family, f"{name}_arch", M.preprocess("demo_resnet"))


def _same_backbone(a: nn.Module, b: nn.Module, skip: str) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        if not k.startswith(skip):
            assert torch.equal(sa[k], sb[k]), k


def _save(tmp_path, obj, name="w.pth"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


def _headless(sd, prefix):
    return {k: v for k, v in sd.items() if not k.startswith(prefix)}


# ---------------------------------------------------------------------------- ResNet family


def test_timm_state_dict_backbone_and_matching_head(tmp_path):
    src = M.create("demo_resnet", 1000, seed=5)  # an "ImageNet" classifier
    path = _save(tmp_path, src.state_dict())
    m = M.create("demo_resnet", 10, weights=path, seed=0)
    _same_backbone(src, m, "fc.")
    assert m.fc.out_features == 10  # new head, its own init
    torch.testing.assert_close(m.fc.weight, M.create("demo_resnet", 10, seed=0).fc.weight)
    same = M.create("demo_resnet", 1000, weights=path)
    assert torch.equal(same.fc.weight, src.fc.weight)  # head loaded when it matches


def test_torchvision_resnet_layout_parity():
    import torchvision.models as tvm

    tv = tvm.resnet18(num_classes=7).eval()
    m = timm.create_model("resnet18", num_classes=7).eval()
    M.load_pretrained(m, tv.state_dict(), _spec("resnet"))
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(m(x), tv(x))


def test_dino_resnet_plain_backbone(tmp_path):
    src = M.create("demo_resnet", 3, seed=1)
    path = _save(tmp_path, _headless(src.state_dict(), "fc."))  # DINO: fc = Identity
    m = M.create("demo_resnet", 5, weights=path)
    _same_backbone(src, m, "fc.")


def test_mocov3_resnet_layout(tmp_path):
    src = M.create("demo_resnet", 3, seed=2)
    body = _headless(src.state_dict(), "fc.")
    sd = {f"module.base_encoder.{k}": v for k, v in body.items()}
    sd |= {f"module.momentum_encoder.{k}": v + 1 for k, v in body.items()}
    sd |= {"module.base_encoder.fc.0.weight": torch.randn(64, 128),
           "module.base_encoder.fc.1.weight": torch.ones(64),
           "module.base_encoder.fc.1.running_mean": torch.zeros(64),
           "module.predictor.0.weight": torch.randn(64, 32)}
    path = _save(tmp_path, {"epoch": 300, "arch": "resnet50", "state_dict": sd,
                            "optimizer": {"state": {}, "param_groups": []}})
    m = M.create("demo_resnet", 4, weights=path, head="mlp")
    _same_backbone(src, m, "fc.")
    assert isinstance(m.fc, M.MLPHead)


# ------------------------------------------------------------------------------- ViT family


def _vit_src(seed=3):
    return M.create("demo_vit", 3, seed=seed)


def test_dino_vit_plain_timm_layout(tmp_path):
    src = _vit_src()
    path = _save(tmp_path, _headless(src.state_dict(), "head."))
    _same_backbone(src, M.create("demo_vit", 9, weights=path), "head.")


def test_mocov3_vit_layout(tmp_path):
    src = _vit_src()
    body = _headless(src.state_dict(), "head.")
    sd = {f"module.base_encoder.{k}": v for k, v in body.items()}
    sd |= {f"module.momentum_encoder.{k}": v for k, v in body.items()}
    sd |= {"module.base_encoder.head.0.weight": torch.randn(128, 64),
           "module.base_encoder.head.1.running_var": torch.ones(128)}
    path = _save(tmp_path, {"epoch": 300, "arch": "vit_base", "state_dict": sd})
    _same_backbone(src, M.create("demo_vit", 9, weights=path), "head.")


def test_ibot_vit_layout(tmp_path):
    src = _vit_src()
    body = _headless(src.state_dict(), "head.")
    sd = {f"backbone.{k}": v for k, v in body.items()}
    sd |= {"backbone.masked_embed": torch.zeros(1, 64), "head.mlp.0.weight": torch.randn(8, 64),
           "head.last_layer.weight_g": torch.ones(8, 1)}
    path = _save(tmp_path, {"state_dict": sd})
    _same_backbone(src, M.create("demo_vit", 9, weights=path), "head.")
    # the teacher checkpoint without the backbone prefix loads too
    path2 = _save(tmp_path, {"state_dict": body | {"masked_embed": torch.zeros(1, 64)}}, "t.pth")
    _same_backbone(src, M.create("demo_vit", 9, weights=path2), "head.")


def test_torchvision_vit_layout_parity():
    from torchvision.models.vision_transformer import VisionTransformer

    tv = VisionTransformer(32, 4, 3, 4, 64, 128, num_classes=5).eval()
    m = M.create("demo_vit", 5).eval()
    M.load_pretrained(m, tv.state_dict(), M.get("demo_vit"))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(m(x), tv(x), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------ Swin family


def _to_ms_swin(sd: dict) -> dict:
    """timm Swin keys -> Microsoft/iBOT layout (downsample at the end of the previous stage)."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"layers\.(\d+)\.downsample", lambda x: f"layers.{int(x.group(1)) - 1}.downsample", k)
        out[k.replace("head.fc.", "head.")] = v
    return out


def test_ibot_swin_ms_layout(tmp_path):
    src = M.create("demo_swin", 3, seed=4)
    ms = _to_ms_swin(_headless(src.state_dict(), "head.fc."))
    assert "layers.0.downsample.reduction.weight" in ms
    ms["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(49, dtype=torch.long)
    ms["layers.0.blocks.1.attn_mask"] = torch.zeros(4, 16, 16)
    sd = {f"backbone.{k}": v for k, v in ms.items()}
    sd["head.mlp.0.weight"] = torch.randn(8, 64)
    path = _save(tmp_path, {"state_dict": sd})
    m = M.create("demo_swin", 6, weights=path)
    _same_backbone(src, m, "head.fc.")


def test_torchvision_swin_layout_parity():
    from torchvision.models.swin_transformer import SwinTransformer

    tv = SwinTransformer([4, 4], 32, [2, 2], [2, 4], [4, 4], stochastic_depth_prob=0.0,
                         num_classes=5).eval()
    m = M.create("demo_swin", 5).eval()
    M.load_pretrained(m, tv.state_dict(), M.get("demo_swin"))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(m(x), tv(x), rtol=1e-4, atol=1e-5)


def test_swin_window_mismatch_is_an_error(tmp_path):
    other = timm.create_model("swin_tiny_patch4_window7_224", num_classes=3, img_size=32,
                              patch_size=4, window_size=2, embed_dim=32, depths=(2, 2),
                              num_heads=(2, 4))
    with pytest.raises(ValueError, match="shape mismatch.*relative_position_bias_table"):
        M.create("demo_swin", 3, weights=_save(tmp_path, other.state_dict()))


# -------------------------------------------------------------------------- ConvNeXt family


def _to_fb_convnext(sd: dict) -> dict:
    """timm ConvNeXt keys -> facebookresearch layout."""
    out = {}
    for k, v in sd.items():
        k = k.replace("stem.", "downsample_layers.0.")
        k = re.sub(r"stages\.(\d+)\.downsample\.(\d+)", r"downsample_layers.\1.\2", k)
        k = re.sub(r"stages\.(\d+)\.blocks\.(\d+)", r"stages.\1.\2", k)
        k = k.replace("conv_dw", "dwconv").replace("mlp.fc", "pwconv")
        k = k.replace("head.norm.", "norm.").replace("head.fc.", "head.")
        out[k] = v
    return out


def test_facebook_convnext_layout(tmp_path):
    src = M.create("demo_convnext", 1000, seed=6)
    fb = _to_fb_convnext(src.state_dict())
    assert "downsample_layers.1.1.weight" in fb and "stages.0.0.dwconv.weight" in fb
    path = _save(tmp_path, {"model": fb})
    m = M.create("demo_convnext", 10, weights=path)
    _same_backbone(src, m, "head.fc.")
    assert torch.equal(m.head.norm.weight, src.head.norm.weight)


def test_spark_convnext_layouts(tmp_path):
    src = M.create("demo_convnext", 3, seed=7)
    path = _save(tmp_path, {"module": _headless(src.state_dict(), "head.fc.")})  # timm style
    _same_backbone(src, M.create("demo_convnext", 4, weights=path), "head.fc.")
    # SparK's encoder (FB layout, built with num_classes=0): no final norm, no classifier
    fb = _to_fb_convnext(_headless(src.state_dict(), "head."))
    assert not [k for k in fb if k.startswith(("norm.", "head."))]
    m = M.create("demo_convnext", 4, weights=_save(tmp_path, fb, "spark.pth"), seed=0)
    _same_backbone(src, m, "head.")
    assert torch.equal(m.head.norm.weight, torch.ones(128))  # keeps its init


def test_torchvision_convnext_layout_parity():
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    dims = (16, 32, 64, 128)
    settings = [CNBlockConfig(d, dims[i + 1] if i < 3 else None, 1) for i, d in enumerate(dims)]
    tv = ConvNeXt(settings, num_classes=5).eval()
    m = timm.create_model("convnext_atto", num_classes=5, depths=(1, 1, 1, 1), dims=dims,
                          conv_mlp=False).eval()
    M.load_pretrained(m, tv.state_dict(), _spec("convnext"))
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(m(x), tv(x), rtol=1e-4, atol=1e-5)


# -------------------------------------------------------------------------------- errors


def test_other_architecture_is_a_clear_error(tmp_path):
    path = _save(tmp_path, M.create("demo_vit", 3).state_dict())
    with pytest.raises(ValueError, match=r"does not fit demo_resnet \(ResNet.*missing keys"):
        M.create("demo_resnet", 3, weights=path)
    deeper = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=64,
                               depth=4, num_heads=4, mlp_ratio=2.0, num_classes=3)
    with pytest.raises(ValueError, match=r"unexpected keys \(blocks\.3\."):
        M.create("demo_vit", 3, weights=_save(tmp_path, deeper.state_dict(), "d.pth"))
    with pytest.raises(ValueError, match="no state dict"):
        M.create("demo_vit", 3, weights=_save(tmp_path, {"epoch": 3, "args": "x"}, "e.pth"))


def test_hub_without_tag_and_bad_weights_type():
    with pytest.raises(ValueError, match="no timm hub tag"):
        M.create("mocov3_resnet50", 3, weights="hub")
    with pytest.raises(TypeError):
        M.create("demo_resnet", 3, weights=3)


# ------------------------------------------------------------------ full-size, paper names


@pytest.mark.slow
def test_paper_names_load_published_layouts(tmp_path):
    src = timm.create_model("resnet50", num_classes=0)
    sd = {f"module.base_encoder.{k}": v for k, v in src.state_dict().items()}
    m = M.create("mocov3_resnet50", 10, weights=_save(tmp_path, {"state_dict": sd}), head="mlp")
    _same_backbone(src, m, "fc.")
    import torchvision.models as tvm

    tv = tvm.densenet121(num_classes=3).eval()
    d = M.create("densenet121", 3, weights=_save(tmp_path, tv.state_dict(), "d.pth")).eval()
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(d(x), tv(x), rtol=1e-4, atol=1e-5)
    swin = timm.create_model("swin_tiny_patch4_window7_224", window_size=14, num_classes=0)
    ms = {f"backbone.{k}": v for k, v in _to_ms_swin(swin.state_dict()).items()}
    ib = M.create("ibot_swin_t", 10, weights=_save(tmp_path, {"state_dict": ms}, "s.pth"))
    _same_backbone(swin, ib, "head.fc.")
    with pytest.raises(ValueError, match="shape mismatch"):
        M.create("swin_t", 10, weights=tmp_path / "s.pth")  # window 14 into window 7


@pytest.mark.slow
def test_torchvision_vgg_layout_parity(tmp_path):
    import torchvision.models as tvm

    tv = tvm.vgg16(num_classes=3).eval()
    m = M.create("vgg16", 3, weights=_save(tmp_path, tv.state_dict())).eval()
    x = torch.randn(1, 3, 64, 64)  # both pool the 2x2 features to 7x7 before the classifier
    torch.testing.assert_close(m(x), tv(x), rtol=1e-4, atol=1e-4)
