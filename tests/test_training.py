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


def test_paper_presets_parse_with_the_reference_recipe():
    from pathlib import Path

    from cose import config

    root = Path(__file__).resolve().parents[1] / "params" / "paper"
    heads = {}
    for ds in ("cifar10", "caltech101", "cub200", "eurosat", "oxford102"):
        cfg = config.load(root / f"{ds}.yaml")
        assert cfg.datasets == (ds,)
        t = T.TrainConfig.from_config(cfg.train)
        assert (t.epochs, t.lr, t.weight_decay, t.grad_clip) == (20, 8e-4, 1e-3, 0.1)
        assert cfg.train.save_epochs == tuple(range(1, 20, 2))
        heads[ds] = t.head
    assert heads["cifar10"] == "mlp" and heads["cub200"] == "linear"
