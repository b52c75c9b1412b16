"""Shared machinery of the saliency methods: input checks, the model guard, batched gradients."""

from __future__ import annotations

import contextlib
import copy
import warnings
import weakref
from collections.abc import Callable, Iterator

import torch
from torch import nn


def model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    """Device of the model's first parameter (or buffer); `fallback` for a stateless model."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return fallback


def check_images(images: torch.Tensor) -> None:
    """Raise ValueError unless `images` is a finite float [B,C,H,W] tensor with B >= 1."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images: expected a torch.Tensor [B,C,H,W], got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"images: expected shape [B,C,H,W], got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError("images: empty batch (B = 0)")
    if not images.is_floating_point():
        raise ValueError(f"images: expected a floating-point tensor, got {images.dtype}")
    bad = ~torch.isfinite(images)
    if bool(bad.any()):
        rows = torch.nonzero(bad.flatten(1).any(1)).flatten().tolist()
        kind = "NaN" if bool(torch.isnan(images).any()) else "infinite values"
        raise ValueError(f"images: contain {kind} (batch rows {rows[:8]})")


def check_targets(targets, batch: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """Targets as a long tensor [B] on `device`, and their maximum (for the class-count check)."""
    t = torch.as_tensor(targets)
    if t.dim() == 0:
        t = t.reshape(1).expand(batch)
    if t.dim() != 1 or t.shape[0] != batch:
        raise ValueError(f"targets: expected shape [{batch}], got {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        if t.is_floating_point() and bool((t == t.round()).all()):
            t = t.long()
        else:
            raise ValueError(f"targets: expected integer class indices, got {t.dtype}")
    t = t.long()
    if t.is_inference():
        t = t.clone()
    lo, hi = int(t.min()), int(t.max())
    if lo < 0:
        raise ValueError(f"targets: class index {lo} out of range (must be >= 0)")
    return t.to(device), hi


def check_num_classes(logits: torch.Tensor, max_target: int) -> None:
    """Raise ValueError if a target index is beyond the model's outputs."""
    if logits.dim() != 2:
        raise ValueError(
            f"model output: expected logits [B, classes], got shape {tuple(logits.shape)}"
        )
    n = logits.shape[1]
    if max_target >= n:
        raise ValueError(
            f"targets: class index {max_target} out of range for a model with {n} classes "
            f"(allowed 0..{n - 1})"
        )


@contextlib.contextmanager
def guarded(model: nn.Module) -> Iterator[None]:
    """Run `model` in eval mode; restore every module's mode and every parameter's
    requires_grad flag afterwards, exceptions included."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in flags:
            if p.requires_grad != flag:
                p.requires_grad_(flag)


def chunks(total: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, stop) pairs covering range(total) in pieces of at most `size`, as even as
    possible (200 items at 64 -> 4 x 50, not 64, 64, 64, 8: no inefficient small tail)."""
    if total <= 0:
        return
    n = -(-total // size)
    step = -(-total // n)
    for start in range(0, total, step):
        yield start, min(total, start + step)


def prob_grad(
    model: nn.Module, x: torch.Tensor, targets: torch.Tensor, max_target: int
) -> torch.Tensor:
    """d softmax(model(x))[i, targets[i]] / d x[i], for every row i of x (one forward+backward)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        check_num_classes(logits, max_target)
        prob = torch.softmax(logits.float(), dim=1)
        sel = prob.gather(1, targets.view(-1, 1)).sum()
        (grad,) = torch.autograd.grad(sel, x)
    return grad


def accumulate_grads(
    model: nn.Module,
    n_items: int,
    make: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    reduce: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    owner: Callable[[torch.Tensor], torch.Tensor],
    out: torch.Tensor,
    max_target: int,
    batch_size: int,
) -> torch.Tensor:
    """Batched path/sample loop shared by IG, SmoothGrad and BlurIG.

    Items 0..n_items-1 (image x step pairs) are processed `batch_size` at a time:
    `make(idx) -> (inputs, targets)`, gradient of the target probability,
    `reduce(idx, inputs, grads) -> contributions`, summed into `out[owner(idx)]`.
    """
    device = out.device
    for start, stop in chunks(n_items, batch_size):
        idx = torch.arange(start, stop, device=device)
        inputs, tg = make(idx)
        grads = prob_grad(model, inputs, tg, max_target)
        out.index_add_(0, owner(idx), reduce(idx, inputs, grads).to(out.dtype))
    return out


# ----------------------------------------------------------------------------- conv+BN folding

#: fold eval-mode BatchNorm into the preceding convolution for the gradient/forward passes of
#: IG, SmoothGrad, BlurIG, GuidedIG and LIME (same function, fewer memory-bound passes)
FUSE_BN = True

_FUSED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _signature(model: nn.Module) -> tuple:
    return tuple(
        (id(t), t.data_ptr(), t._version, t.device, t.dtype)
        for t in (*model.parameters(), *model.buffers())
    )


def fast_model(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """`model` with every Conv2d -> BatchNorm2d pair folded into one Conv2d (eval mode), as a
    cached copy (rebuilt when any parameter or buffer changes); `model` itself where there is no
    BatchNorm, the model cannot be traced by torch.fx, or the copy's output differs."""
    if not FUSE_BN or model.training:
        return model
    if not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        return model
    sig = _signature(model)
    hit = _FUSED.get(model)
    if hit is not None and hit[0] == sig:
        return hit[1]
    fused: nn.Module = model
    try:
        from torch.fx.experimental.optimization import fuse

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            candidate = fuse(model, inplace=False)
        candidate.eval()
        if any(isinstance(m, nn.BatchNorm2d) for m in candidate.modules()) or _differs(
            model, candidate, example[:1]
        ):
            candidate = model
        fused = candidate
    except Exception:  # not traceable, unusual inputs: keep the model as it is
        fused = model
    _FUSED[model] = (sig, fused)
    return fused


def _differs(a: nn.Module, b: nn.Module, x: torch.Tensor) -> bool:
    """One probe forward on a real input: do the two models disagree beyond float noise?"""
    with torch.no_grad():
        ya, yb = a(x), b(x)
    if not isinstance(ya, torch.Tensor) or not isinstance(yb, torch.Tensor):
        return True
    if ya.shape != yb.shape:
        return True
    scale = ya.abs().max().clamp_min(1e-12)
    return bool(((ya - yb).abs().max() / scale) > 1e-3)


# ----------------------------------------------------------------------------- channels_last


def conv_net(model: nn.Module) -> bool:
    """More than two 2D convolutions: a conv net, not a transformer with a patch embedding."""
    return sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 2


class ChannelsLast(nn.Module):
    """``module`` (a channels_last copy) fed its input in channels_last: cuDNN's tensor-core
    convolutions (TF32, bf16) are NHWC kernels, which NCHW tensors reach through transposes."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.contiguous(memory_format=torch.channels_last))


_CHANNELS_LAST: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def channels_last(model: nn.Module) -> nn.Module:
    """A cached :class:`ChannelsLast` copy of ``model`` (rebuilt when any of its parameters or
    buffers changes): the same function, other kernels, so other last bits."""
    sig = _signature(model)
    hit = _CHANNELS_LAST.get(model)
    if hit is not None and hit[0] == sig:
        return hit[1]
    copied = copy.deepcopy(model).to(memory_format=torch.channels_last)
    copied.train(model.training)
    wrapped = ChannelsLast(copied).train(model.training)
    _CHANNELS_LAST[model] = (sig, wrapped)
    return wrapped
