"""The reference's training recipe as parameters, with atomic checkpoints and exact resume.

Recipe (:class:`cose.config.TrainConfig`, REFERENCE.md): a new head on a (pretrained)
backbone, frozen or fine-tuned (``freeze_backbone``; ``backbone_mode`` says whether the frozen
backbone runs in train mode, as the official ``model.train()`` does, or eval mode), Adam /
AdamW / SGD, gradients clipped by value (official) or norm, ReduceLROnPlateau on the
validation loss, ModifiedTrivial augmentation (``augment: trivial``: per image one of the 13
COSE transforms or the identity, a random bin and sign), checkpoints at the chosen epochs. On
CUDA the forward runs under bf16 autocast (``amp``).

Files in ``ckpt_dir``: ``epoch_NNN.pt`` for each label in ``save_epochs`` (``checkpoint_base``
1: after NNN epochs; 0: the official 0-based index, after NNN+1 epochs), ``last.pt`` (model,
optimizer, scheduler, RNG states, history) after every epoch, ``final.pt`` at the end (then
``last.pt`` is removed unless ``keep_last``); all are written to a temporary name and renamed.
``epoch_NNN.pt`` / ``final.pt`` are COSE checkpoints
that ``cose.models.create(name, C, weights=path)`` loads. When ``last.pt`` exists (an
interrupted run) ``fit`` continues from it; the shuffling of epoch ``e`` is drawn from a
generator seeded with ``(seed, e)`` and the global RNG state is restored, so a resumed run ends
with the same weights as an uninterrupted one (bitwise on CPU).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

# the recipe's parameters live in cose.config (one TrainConfig for params and this module)
from cose.config import AUGMENTS, CLIP_MODES, OPTIMIZERS, PLATEAU_METRICS, TrainConfig
from cose.io import atomic_torch_save
from cose.models import cose_checkpoint, head_module

log = logging.getLogger("cose.training")

__all__ = ["AUGMENTS", "CLIP_MODES", "OPTIMIZERS", "PLATEAU_METRICS", "TrainConfig",
           "atomic_save", "evaluate", "fit", "save_weights", "trivial_augment"]


# ------------------------------------------------------------------------------ checkpoints


atomic_save = atomic_torch_save  # the one atomic write (cose.io)


def save_weights(model: nn.Module, path: str | Path, **extra: Any) -> Path:
    """Write ``model`` as a COSE checkpoint (loadable by ``cose.models.create``), atomically."""
    return atomic_save(cose_checkpoint(model, **extra), path)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------- batching


def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


#: the official ModifiedTrivial's operations: the identity and the 13 COSE transforms
TRIVIAL_OPS: tuple[str, ...] = ("Identity",) + tuple(
    t for t in ("TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
                "Sharpness", "AutoContrast", "Equalize", "FlipLR", "FlipUD", "Blur", "Smooth"))


def trivial_augment(images01: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The official training augmentation (ModifiedTrivial, TrivialAugmentWide's rule over the
    COSE transforms): per image an operation drawn uniformly from :data:`TRIVIAL_OPS`, a bin
    uniformly from the 31 of its float32 grid (0 included) and a sign for the signed ones."""
    from cose import transforms as T

    b = images01.shape[0]
    op = torch.randint(len(TRIVIAL_OPS), (b,), generator=generator)
    bins = torch.randint(T.NUM_BINS, (b,), generator=generator)
    signs = torch.randint(2, (b,), generator=generator) * -2 + 1
    out = images01.clone()
    size = tuple(images01.shape[-2:])
    for k, name in enumerate(TRIVIAL_OPS):
        rows = (op == k).nonzero().flatten()
        if name == "Identity" or len(rows) == 0:
            continue
        mags = None
        if name in T.SIGNED:
            positive = torch.tensor([0.0] + [v for v in T.magnitude_grid(name, size) if v > 0])
            mags = positive[bins[rows]] * signs[rows]
        idx = rows.to(images01.device)
        out[idx] = T.apply(name, images01[idx], mags)
    return out


def _batches(
    images: torch.Tensor | Dataset, labels: torch.Tensor | None, order: torch.Tensor,
    batch_size: int, num_workers: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(images, torch.Tensor):
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            yield images[idx], labels[idx]
    else:
        loader = DataLoader(images, batch_size=batch_size, sampler=order.tolist(),
                            num_workers=num_workers)
        yield from loader


def _size(images: torch.Tensor | Dataset) -> int:
    return len(images)


@torch.no_grad()
def evaluate(
    model: nn.Module, images: torch.Tensor | Dataset, labels: torch.Tensor | None,
    normalize_fn: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 256, amp: bool = True,
) -> dict[str, float]:
    """Mean cross-entropy loss and accuracy of ``model`` (left in eval mode)."""
    device = next(model.parameters()).device
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    order = torch.arange(_size(images))
    for x, y in _batches(images, labels, order, batch_size, 0):
        x, y = x.to(device), y.to(device)
        with _autocast(device, amp):
            out = model(normalize_fn(x))
        out = out.float()
        loss_sum += nn.functional.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
        n += len(y)
    return {"loss": loss_sum / max(n, 1), "acc": correct / max(n, 1)}


def _autocast(device: torch.device, amp: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          enabled=amp and device.type == "cuda")


# -------------------------------------------------------------------------------------- fit


def _trainable(model: nn.Module, freeze: bool) -> list[nn.Parameter]:
    if not freeze:
        for p in model.parameters():
            p.requires_grad_(True)
        return list(model.parameters())
    head = head_module(model)
    head_ids = {id(p) for p in head.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in head_ids)
    return list(head.parameters())


def _train_mode(model: nn.Module, cfg: TrainConfig) -> None:
    if cfg.freeze_backbone and cfg.backbone_mode == "eval":
        model.eval()  # BatchNorm statistics and dropout of the frozen backbone stay fixed
        head_module(model).train()
    else:  # the official model.train(): a frozen backbone's BatchNorm still updates its stats
        model.train()


def _optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay)


def _read_resume_state(last: Path) -> dict[str, Any] | None:
    """``last.pt`` if it loads as a weights-only resume state; else it is moved aside (named
    in a warning) and training starts over: a truncated or foreign file must not block the
    run, and one that wants to run code is never unpickled."""
    try:
        state = torch.load(last, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or "fingerprint" not in state:
            raise ValueError("not a cose resume state")
        return state
    except Exception as exc:  # noqa: BLE001 - truncated, corrupt, code-running pickle, foreign
        aside = last.with_name(f"{last.name}.unreadable-{uuid.uuid4().hex[:8]}")
        os.replace(last, aside)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log.warning("%s cannot be resumed from (%s: %s); moved to %s, training starts over",
                    last, type(exc).__name__, first[:200], aside.name)
        return None


def _fingerprint(model: nn.Module, cfg: TrainConfig, seed: int, save_epochs: tuple[int, ...],
                 n_train: int) -> str:
    return json.dumps({"cfg": dataclasses.asdict(cfg), "seed": seed, "save_epochs": save_epochs,
                       "n_train": n_train, "model": getattr(model, "cose_meta", None)},
                      sort_keys=True)


def fit(
    model: nn.Module,
    train_images: torch.Tensor | Dataset,
    train_labels: torch.Tensor | None,
    val_images: torch.Tensor | Dataset | None,
    val_labels: torch.Tensor | None,
    cfg: TrainConfig,
    ckpt_dir: str | Path,
    save_epochs: Iterable[int] = (),
    seed: int = 0,
    normalize_fn: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    quiet: bool = False,
    resume: bool = True,
    keep_last: bool = False,
) -> list[dict[str, float]]:
    """Train ``model`` (on its device) per ``cfg``; returns the per-epoch history
    (epoch, train_loss, train_acc, val_loss, val_acc, lr). Images are [0,1] tensors
    ``[N,3,H,W]`` with int64 labels, or Datasets of ``(image, label)`` with labels None.
    ``last.pt`` (resume state, with the optimizer's moments) is removed once ``final.pt`` is
    written unless ``keep_last``."""
    ckpt_dir = Path(ckpt_dir)
    save_epochs = tuple(sorted({int(e) for e in save_epochs}))
    first, last = cfg.checkpoint_base, cfg.epochs - 1 + cfg.checkpoint_base
    bad = [e for e in save_epochs if not first <= e <= last]
    if bad:
        raise ValueError(f"save_epochs {bad} outside {first}..{last} (checkpoint_base "
                         f"{cfg.checkpoint_base})")
    n_train = _size(train_images)
    if n_train == 0:
        raise ValueError("no training images")
    device = next(model.parameters()).device
    params = _trainable(model, cfg.freeze_backbone)
    opt = _optimizer(params, cfg)
    mode = "max" if cfg.plateau_metric == "val_acc" else "min"
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode=mode, factor=cfg.plateau_factor, patience=cfg.plateau_patience)
    fingerprint = _fingerprint(model, cfg, seed, save_epochs, n_train)
    history: list[dict[str, float]] = []
    start = 1
    last = ckpt_dir / "last.pt"

    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if device.type == "cuda" else []):
        torch.manual_seed(seed)
        state = _read_resume_state(last) if resume and last.exists() else None
        if state is not None:
            if state.get("fingerprint") != fingerprint:
                raise ValueError(
                    f"{last} belongs to another training run (model, params, seed or data differ);"
                    " delete it or use another checkpoint folder"
                )
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            _set_rng_state(state["rng"])
            history = list(state["history"])
            start = int(state["epoch"]) + 1
            log.info("resuming from %s after epoch %d", last, start - 1)
            # the epochs done before the interruption reach the caller's log once, now: the
            # killed process never sent them (its run is logged only when a stage finishes)
            for done in history if on_epoch is not None else ():
                on_epoch(int(done["epoch"]), {k: v for k, v in done.items() if k != "epoch"})

        for epoch in range(start, cfg.epochs + 1):
            _train_mode(model, cfg)
            augment = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 500_009)
            loss_sum, correct, seen = 0.0, 0, 0
            order = _epoch_order(n_train, seed, epoch)
            for x, y in _batches(train_images, train_labels, order, cfg.batch_size, cfg.num_workers):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if cfg.augment == "trivial":
                    x = trivial_augment(x, augment)
                if cfg.augment == "flip":
                    flip = torch.rand(len(x), generator=None) < 0.5
                    x = torch.where(flip.to(device).view(-1, 1, 1, 1), x.flip(-1), x)
                with _autocast(device, cfg.amp):
                    out = model(normalize_fn(x))
                loss = nn.functional.cross_entropy(out.float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip > 0:
                    if cfg.grad_clip_mode == "norm":
                        nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                    else:
                        nn.utils.clip_grad_value_(params, cfg.grad_clip)
                opt.step()
                loss_sum += loss.item() * len(y)
                correct += (out.detach().argmax(1) == y).sum().item()
                seen += len(y)
            if not math.isfinite(loss_sum):
                raise FloatingPointError(f"training loss is not finite at epoch {epoch}")
            metrics = {"train_loss": loss_sum / seen, "train_acc": correct / seen}
            if val_images is not None:
                v = evaluate(model, val_images, val_labels, normalize_fn, cfg.eval_batch_size,
                             cfg.amp)
                metrics.update(val_loss=v["loss"], val_acc=v["acc"])
            monitor = metrics.get(cfg.plateau_metric, metrics["train_loss"])
            sched.step(monitor)
            metrics["lr"] = float(opt.param_groups[0]["lr"])
            history.append({"epoch": epoch, **metrics})
            label = cfg.label(epoch)
            if label in save_epochs:
                save_weights(model, ckpt_dir / f"epoch_{label:03d}.pt", epoch=epoch)
            atomic_save({
                "fingerprint": fingerprint, "epoch": epoch, "model": model.state_dict(),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "rng": _rng_state(), "history": history,
            }, last)
            if not quiet:
                log.info("epoch %d/%d: %s", epoch, cfg.epochs,
                         ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
            if on_epoch is not None:
                on_epoch(epoch, metrics)

    save_weights(model, ckpt_dir / "final.pt", epoch=cfg.epochs, history=history)
    if not keep_last:
        last.unlink(missing_ok=True)
    model.eval()
    return history
