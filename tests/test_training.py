"""cose.training: the recipe, checkpoints, exact resume, frozen backbone."""

from __future__ import annotations

import pytest
import torch

import cose.models as M
from cose import training as T

torch.set_num_threads(2)


def _data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.rand(n, 3, 32, 32, generator=g) * 0.3
    for c in range(3):  # a learnable signal: class c brightens channel c
        x[y == c, c] += 0.6
    return x, y


def _fit(tmp, model, cfg, on_epoch=None, **kw):
    x, y = _data()
    return T.fit(model, x, y, x[:48], y[:48], cfg, tmp, save_epochs=(1, 2), seed=0,
                 normalize_fn=lambda t: M.normalize(t, "demo_resnet"), on_epoch=on_epoch, **kw)


CFG = T.TrainConfig(epochs=3, batch_size=32, lr=1e-3, plateau_patience=0, plateau_factor=0.5)


def test_fit_history_and_checkpoints(tmp_path):
    model = M.create("demo_resnet", 3, seed=0)
    seen = []
    hist = _fit(tmp_path, model, CFG, on_epoch=lambda e, m: seen.append((e, dict(m))))
    assert [h["epoch"] for h in hist] == [1, 2, 3] and [e for e, _ in seen] == [1, 2, 3]
    assert set(seen[0][1]) == {"train_loss", "train_acc", "val_loss", "val_acc", "lr"}
    assert all(isinstance(v, float) for _, m in seen for v in m.values())
    assert hist[-1]["val_acc"] > 0.5  # the signal is easy
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["epoch_001.pt", "epoch_002.pt", "final.pt"]  # last.pt only while running
    back = M.create("demo_resnet", 3, weights=tmp_path / "final.pt")
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k])
    mid = M.create("demo_resnet", 3, weights=tmp_path / "epoch_001.pt")
    assert any(not torch.equal(v, mid.state_dict()[k])
               for k, v in model.state_dict().items() if v.is_floating_point())
    assert not model.training


def test_resume_after_interruption_gives_same_weights(tmp_path):
    full = M.create("demo_resnet", 3, seed=0)
    _fit(tmp_path / "a", full, CFG)

    def stop(epoch, metrics):
        if epoch == 2:
            raise KeyboardInterrupt

    part = M.create("demo_resnet", 3, seed=0)
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path / "b", part, CFG, on_epoch=stop)
    assert not (tmp_path / "b" / "final.pt").exists()
    fresh = M.create("demo_resnet", 3, seed=0)  # a new process would rebuild the model
    hist = _fit(tmp_path / "b", fresh, CFG)
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    for k, v in full.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k
    a = torch.load(tmp_path / "a" / "final.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "final.pt", weights_only=True)
    assert a["history"] == b["history"]


def test_resume_refuses_other_run(tmp_path):
    _fit(tmp_path, M.create("demo_resnet", 3, seed=0), T.TrainConfig(epochs=2, batch_size=32),
         keep_last=True)
    assert (tmp_path / "last.pt").exists()
    with pytest.raises(ValueError, match="another training run"):
        _fit(tmp_path, M.create("demo_resnet", 3, seed=0), T.TrainConfig(epochs=2, batch_size=16))


def test_frozen_backbone_trains_only_head(tmp_path):
    model = M.create("demo_resnet", 3, seed=0, head="mlp")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = T.TrainConfig(epochs=1, batch_size=32, freeze_backbone=True)
    x, y = _data()
    T.fit(model, x, y, None, None, cfg, tmp_path, seed=0)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("fc.") for k in changed)  # BN stats frozen too


def test_dataset_input_matches_tensor_input(tmp_path):
    x, y = _data(64)
    ds = torch.utils.data.TensorDataset(x, y)
    cfg = T.TrainConfig(epochs=1, batch_size=16)
    m1, m2 = M.create("demo_vit", 3, seed=1), M.create("demo_vit", 3, seed=1)
    h1 = T.fit(m1, x, y, x, y, cfg, tmp_path / "t", seed=0)
    h2 = T.fit(m2, ds, None, ds, None, cfg, tmp_path / "d", seed=0)
    assert h1 == h2


def test_large_splits_are_read_lazily_with_the_same_batches(tmp_path, monkeypatch):
    """The train stage holds a split in memory only below IN_MEMORY_BYTES (CIFAR-10 at 224 px
    would be 30 GB); above it, a lazily decoded Dataset gives the same images, subset and
    training run."""
    import cose.data as D
    from cose import config
    from cose.stages import train as S

    D.fetch("digits", tmp_path / "data")
    cfg = config.from_dict({"datasets": ["digits"], "seed": 4,
                            "data": {"root": str(tmp_path / "data")}})
    spec = M.preprocess("demo_resnet")
    x, y = S.load_training_split(cfg, "digits", "train", spec, keep=40)
    assert isinstance(x, torch.Tensor) and x.shape == (40, 3, 32, 32)
    full_x, full_y = D.load_split("digits", tmp_path / "data", "train", spec)
    keep = torch.randperm(len(full_y), generator=torch.Generator().manual_seed(4))[:40]
    assert torch.equal(x, full_x[keep]) and torch.equal(y, full_y[keep])

    monkeypatch.setattr(S, "IN_MEMORY_BYTES", x.numel() * 4 - 1)
    ds, labels = S.load_training_split(cfg, "digits", "train", spec, keep=40)
    assert labels is None and isinstance(ds, torch.utils.data.Dataset) and len(ds) == 40
    for i in (0, 17, 39):
        img, label = ds[i]
        assert torch.equal(img, x[i]) and label == y[i]
    test, labels = S.load_training_split(cfg, "digits", "test", spec)
    assert labels is None and len(test) == 359

    cfg_t = T.TrainConfig(epochs=1, batch_size=16)
    norm = lambda t: M.normalize(t, "demo_resnet")  # noqa: E731
    h1 = T.fit(M.create("demo_resnet", 10, seed=1), x, y, x, y, cfg_t, tmp_path / "m",
               seed=0, normalize_fn=norm)
    h2 = T.fit(M.create("demo_resnet", 10, seed=1), ds, None, ds, None, cfg_t, tmp_path / "l",
               seed=0, normalize_fn=norm)
    assert h1 == h2


def test_config_checks_and_from_config():
    with pytest.raises(ValueError, match="train.lr"):
        T.TrainConfig(lr=0)
    with pytest.raises(ValueError, match="optimizer"):
        T.TrainConfig(optimizer="lion")

    class Params:  # like the pipeline's config section, with extra fields
        epochs = 4
        lr = 0.01
        max_train_images = None

    cfg = T.TrainConfig.from_config(Params())
    assert cfg.epochs == 4 and cfg.lr == 0.01 and cfg.weight_decay == 1e-3
    assert T.TrainConfig.from_config({"epochs": 2, "other": 1}).epochs == 2
    with pytest.raises(ValueError, match="save_epochs"):
        T.fit(M.create("demo_resnet", 3), *_data(8), None, None, T.TrainConfig(epochs=2),
              "unused", save_epochs=(3,))


def test_save_weights_atomic(tmp_path):
    model = M.create("demo_convnext", 2, seed=0)
    T.save_weights(model, tmp_path / "w.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["w.pt"]
    assert M.create("demo_convnext", 2, weights=tmp_path / "w.pt").cose_meta["num_classes"] == 2


# The official recipe, restated from the reference's src/train_model.py (Adam/SGD from the
# config, clip_grad_value_, ReduceLROnPlateau('min', patience=2, factor=1e-5) on the test
# loss, model.train(), checkpoints every floor(10% of the epochs) named by the 0-based epoch
# index), src/utils/model.py (frozen backbone but on CUB200, heads) and
# src/configs/pred_models/*.yaml + trained_models/*.yaml (lr, epochs, the explained epochs).
# dataset -> (frozen, head, optimizer, lr, weight decay, momentum, clip value, epochs,
#             checkpoint labels); per-model exceptions below.
OFFICIAL = {
    "cifar10": (True, "mlp", "adam", 8e-4, 1e-3, None, 0.1, 20, tuple(range(1, 20, 2))),
    "eurosat": (True, "mlp-256", "adam", 1e-4, 1e-3, None, 0.1, 10, tuple(range(10))),
    "caltech101": (True, "mlp-1024", "adam", 1e-4, 0.0, None, 0.1, 20, tuple(range(1, 20, 2))),
    "oxford102": (True, "mlp-1024", "adam", 8e-4, 1e-3, None, 0.0, 30, tuple(range(2, 30, 3))),
    "cub200": (False, "linear", "sgd", 1e-3, 1e-4, 0.85, 0.1, 100, tuple(range(9, 100, 10))),
}
OFFICIAL_EXCEPTIONS = {
    ("caltech101", "spark_convnext_s"): {"epochs": 40, "save_epochs": tuple(range(3, 40, 4))},
    ("oxford102", "spark_convnext_s"): {"epochs": 100, "save_epochs": tuple(range(9, 100, 10)),
                                        "lr": 1e-3, "grad_clip": 0.1},
    ("cub200", "ibot_swin_t"): {"freeze_backbone": True},
    ("cub200", "dino_resnet50"): {"epochs": 200, "save_epochs": tuple(range(19, 200, 20))},
}
PAPER_MODELS = ("convnext_s", "resnet50", "swin_t", "vit_b16", "spark_convnext_s",
                "dino_resnet50", "ibot_swin_t", "dino_vit_b16", "mocov3_resnet50")


def test_paper_presets_are_the_official_recipe():
    from pathlib import Path

    from cose import config

    root = Path(__file__).resolve().parents[1] / "params" / "paper"
    for ds, row in OFFICIAL.items():
        cfg = config.load(root / f"{ds}.yaml")
        assert cfg.datasets == (ds,)
        for model in PAPER_MODELS:
            t = cfg.train_for(model)
            frozen, head, opt, lr, wd, momentum, clip, epochs, labels = row
            want = {"freeze_backbone": frozen, "head": head, "optimizer": opt, "lr": lr,
                    "weight_decay": wd, "grad_clip": clip, "epochs": epochs,
                    "save_epochs": labels}
            want.update(OFFICIAL_EXCEPTIONS.get((ds, model), {}))
            got = {k: getattr(t, k) for k in want}
            assert got == want, (ds, model)
            if momentum is not None:
                assert t.momentum == momentum
            assert (t.grad_clip_mode, t.checkpoint_base, t.batch_size) == ("value", 0, 32)
            assert (t.plateau_metric, t.plateau_patience, t.plateau_factor) == (
                "val_loss", 2, 1e-5)
            assert (t.augment, t.backbone_mode) == ("trivial", "train")
            # every 10% of the epochs, the last being the final model (official naming)
            step = max(1, epochs // 10) if (ds, model) not in OFFICIAL_EXCEPTIONS else None
            if step:
                assert t.save_epochs == tuple(range(step - 1, t.epochs, step))


def test_zero_based_checkpoints_and_value_clipping(tmp_path):
    """checkpoint_base 0 names a checkpoint by the 0-based epoch index (e001 after 2 epochs);
    clipping by value bounds every gradient entry of the trained parameters."""
    cfg = T.TrainConfig(epochs=3, batch_size=32, checkpoint_base=0, grad_clip=1e-4,
                        grad_clip_mode="value", save_epochs=(0, 2))
    x, y = _data(64)
    a = M.create("demo_resnet", 3, seed=0)
    seen = {}
    T.fit(a, x, y, None, None, cfg, tmp_path, save_epochs=cfg.save_epochs, seed=0,
          on_epoch=lambda e, m: seen.setdefault(e, {k: v.clone() for k, v in
                                                    a.state_dict().items()}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_000.pt", "epoch_002.pt",
                                                          "final.pt"]
    first = M.create("demo_resnet", 3, weights=tmp_path / "epoch_000.pt").state_dict()
    assert all(torch.equal(first[k], seen[1][k]) for k in first)  # e000: after epoch 1
    last = M.create("demo_resnet", 3, weights=tmp_path / "epoch_002.pt").state_dict()
    assert all(torch.equal(last[k], a.state_dict()[k]) for k in last)  # e002 of 3 = final
    with pytest.raises(ValueError, match="save_epochs"):
        T.TrainConfig(epochs=3, checkpoint_base=0, save_epochs=(3,))


def test_frozen_backbone_in_train_mode_updates_batchnorm_only(tmp_path):
    """backbone_mode train (the official model.train()): the frozen backbone's weights stay,
    its BatchNorm running statistics move; eval keeps them (test above)."""
    model = M.create("demo_resnet", 3, seed=0, head="mlp-16")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = T.TrainConfig(epochs=1, batch_size=32, freeze_backbone=True, backbone_mode="train")
    T.fit(model, *_data(), None, None, cfg, tmp_path, seed=0)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("fc.") for k in changed)
    assert any("running_mean" in k for k in changed)
    assert not any(k.endswith(".weight") and not k.startswith("fc.") and "bn" not in k
                   for k in changed)


def test_trivial_augment_is_the_official_rule():
    """Per image: one of the identity and the 13 transforms, a bin of 31 (0 included) and a
    sign; seeded; the batch result equals each image transformed alone."""
    from cose import transforms as Tr

    assert T.TRIVIAL_OPS[0] == "Identity" and set(T.TRIVIAL_OPS[1:]) == set(Tr.TRANSFORMS)
    x = torch.floor(torch.rand(64, 3, 16, 16, generator=torch.Generator().manual_seed(0))
                    * 255 + 0.5) / 255
    a = T.trivial_augment(x, torch.Generator().manual_seed(5))
    b = T.trivial_augment(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == x.shape
    changed = (a != x).flatten(1).any(1)
    assert 0 < int(changed.sum()) < 64  # some identity / zero bins, most changed
    g = torch.Generator().manual_seed(5)
    op = torch.randint(len(T.TRIVIAL_OPS), (64,), generator=g)
    assert not bool(changed[op == 0].any())  # the identity leaves its images as they are


def test_resumed_fit_reports_every_epoch_exactly_once(tmp_path):
    """A run killed after epoch 2 and resumed: the caller's log (the stage's MLflow run) gets
    epochs 1..3 once each, with the numbers the first process computed for 1 and 2."""
    first = []

    def stop(epoch, metrics):
        first.append((epoch, dict(metrics)))
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path, M.create("demo_resnet", 3, seed=0), CFG, on_epoch=stop)
    second = []
    _fit(tmp_path, M.create("demo_resnet", 3, seed=0), CFG,
         on_epoch=lambda e, m: second.append((e, dict(m))))
    assert [e for e, _ in second] == [1, 2, 3]
    assert second[:2] == first
