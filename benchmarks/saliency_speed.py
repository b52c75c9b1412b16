"""Seconds per saliency map: cose.saliency vs the reference call pattern, in one run.

    python benchmarks/saliency_speed.py --device cpu --model resnet50 --size 64 --images 8 \
        --json results/saliency_speed_cpu.json

Reference call pattern (REFERENCE.md, BENCHMARKS.md): one image per call through the public
libraries with the reference settings and numpy round trips — pytorch-grad-cam (GradCAM,
GradCAM++; target = logit), PAIR saliency (IG 25 steps batch 20, SmoothGrad 50 samples one per
call, BlurIG 100 steps batch 20, GuidedIG 200 steps; gradient of the softmax probability, HWC
numpy in and out of every call, VisualizeImageGrayscale), lime (quickshift, 1000 samples, batch
10, hide colour 0, top label, 10 features). Ours: one `cose.saliency.explain` call over all
images with the same settings. Same model, images, targets, device, precision (fp32) and
thread count for both; both warmed up first.

Models: torchvision resnet50 / resnet18 / vit_b_16 (image_size = --size), random init (seed 0),
with the reference's 10-class MLP head (1024-256-10). Images: seeded smooth random colour
fields in [0,1] (so quickshift finds image-like superpixels), ImageNet-normalised; targets: the
model's predictions (the reference explains the prediction).

On CUDA (or with --limits) it also measures the compute limits at --limit-batch: forward +
backward to the input (img/s) and forward only (img/s), and reports each method's model passes
per second as % of the matching limit (LIME against forward-only, the rest against
forward+backward; GradCAM's partial backward is counted as a full one).

Writes a JSON list of {method, ours_s_per_map, reference_s_per_map, speedup, ...}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn

from cose import saliency
from cose.saliency import lime as lime_method
from cose.saliency.lime import KERNEL_SIZE, MAX_DIST, segmentation_settings

METHODS = saliency.METHODS
#: LIME with the project's segmentation scaled to the image (cose.saliency.lime's default) on
#: both sides, the reference given the same quickshift: not in the geometric mean. The row
#: "lime" runs both with the reference's settings: lime's quickshift defaults (4, 200) at any
#: size, which is what its call pattern does.
LIME_SCALED = "lime_scaled"
BENCH_METHODS = (*METHODS, LIME_SCALED)
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------- setup


def mlp_head(in_features: int, num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Linear(in_features, 1024),
        nn.ReLU(inplace=True),
        nn.Linear(1024, 256),
        nn.ReLU(inplace=True),
        nn.Linear(256, num_classes),
    )


def build_model(name: str, size: int) -> nn.Module:
    torch.manual_seed(0)
    tvm = torchvision.models
    if name in ("resnet50", "resnet18"):
        m = getattr(tvm, name)()
        m.fc = mlp_head(m.fc.in_features)
    elif name == "vit_b_16":
        if size % 16:
            raise SystemExit(f"--size {size}: vit_b_16 needs a multiple of 16")
        m = tvm.vit_b_16(image_size=size)
        m.heads = nn.Sequential(mlp_head(m.hidden_dim))
    else:
        raise SystemExit(f"--model {name!r}: allowed resnet50, resnet18, vit_b_16")
    return m.eval()


def make_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth random colour fields in [0,1], ImageNet-normalised."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand((n, 3, 6, 6), generator=g)
    mid = torch.rand((n, 3, 16, 16), generator=g)
    x = 0.7 * nn.functional.interpolate(low, size=(size, size), mode="bicubic") + 0.3 * (
        nn.functional.interpolate(mid, size=(size, size), mode="bilinear")
    )
    x = (x + 0.03 * torch.randn((n, 3, size, size), generator=g)).clamp(0, 1)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- reference


class _NumpyQuantileShim:
    """PAIR 0.2.1's GuidedIG calls np.quantile(..., interpolation=...), removed in numpy 2."""

    def __init__(self, np_module):
        self._np = np_module

    def __getattr__(self, name):
        return getattr(self._np, name)

    def quantile(self, a, q, *args, interpolation=None, **kwargs):
        if interpolation is not None:
            kwargs["method"] = interpolation
        return self._np.quantile(a, q, *args, **kwargs)


class Reference:
    """The original COSE call pattern: one image per call, numpy in and out."""

    def __init__(self, model: nn.Module, device: torch.device, layer, reshape):
        import saliency.core as pair
        from saliency.core import guided_ig

        guided_ig.np = _NumpyQuantileShim(np)
        self.pair = pair
        self.model = model
        self.device = device
        self.layer = layer
        self.reshape = reshape
        self._cams = {}

    # PAIR saliency's PyTorch example: HWC numpy -> NCHW tensor on the device -> softmax[target]
    # -> autograd.grad to the input -> movedim -> numpy. The example hands torch the transposed
    # numpy view, a channels-last-strided tensor that is several times slower on CPU; the
    # copy to contiguous here spares the reference that penalty.
    def _call_model_function(self, images, call_model_args=None, expected_keys=None):
        x = np.ascontiguousarray(np.transpose(np.asarray(images), (0, 3, 1, 2)))
        x = torch.tensor(x, dtype=torch.float32, device=self.device).requires_grad_(True)
        target = call_model_args["target"]
        out = torch.softmax(self.model(x), dim=1)[:, target]
        grads = torch.autograd.grad(out, x, grad_outputs=torch.ones_like(out))[0]
        grads = torch.movedim(grads, 1, 3).detach().cpu().numpy()
        return {self.pair.INPUT_OUTPUT_GRADIENTS: grads}

    def cam(self, kind: str, image: torch.Tensor, target: int) -> np.ndarray:
        from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        if kind not in self._cams:
            cls = GradCAM if kind == "gradcam" else GradCAMPlusPlus
            self._cams[kind] = cls(
                model=self.model, target_layers=[self.layer], reshape_transform=self.reshape
            )
        return self._cams[kind](
            input_tensor=image[None].to(self.device), targets=[ClassifierOutputTarget(target)]
        )[0]

    def release(self) -> None:
        """Remove pytorch-grad-cam's hooks from the model: they stay registered while its CAM
        objects live and would slow down every later forward pass, ours included."""
        for cam in self._cams.values():
            cam.activations_and_grads.release()
        self._cams.clear()

    def pair_method(self, method: str, image: torch.Tensor, target: int) -> np.ndarray:
        p = self.pair
        x = image.permute(1, 2, 0).cpu().numpy()
        args = {"target": target}
        f = self._call_model_function
        if method == "ig":
            mask = p.IntegratedGradients().GetMask(
                x, f, args, x_baseline=np.zeros_like(x), x_steps=25, batch_size=20
            )
        elif method == "smoothgrad":
            mask = p.GradientSaliency().GetSmoothedMask(
                x, f, args, stdev_spread=0.15, nsamples=50, magnitude=True
            )
        elif method == "blur_ig":
            mask = p.BlurIG().GetMask(
                x, f, args, max_sigma=50, steps=100, grad_step=0.01, batch_size=20
            )
        elif method == "guided_ig":
            mask = p.GuidedIG().GetMask(
                x, f, args, x_baseline=np.zeros_like(x), x_steps=200, max_dist=0.02, fraction=0.25
            )
        else:
            raise ValueError(method)
        return p.VisualizeImageGrayscale(mask)

    def lime(self, image: torch.Tensor, target: int,
             segmentation: tuple[float, float] | None = None) -> np.ndarray:
        """lime's call; ``segmentation`` (kernel_size, max_dist): quickshift with those instead
        of lime's defaults (4, 200)."""
        from lime import lime_image
        from lime.wrappers.scikit_image import SegmentationAlgorithm

        def classifier_fn(batch):
            x = np.ascontiguousarray(np.transpose(np.asarray(batch), (0, 3, 1, 2)))
            with torch.no_grad():
                x = torch.tensor(x, dtype=torch.float32, device=self.device)
                return torch.softmax(self.model(x), dim=1).cpu().numpy()

        explainer = lime_image.LimeImageExplainer()
        extra = {}
        if segmentation is not None:
            extra["segmentation_fn"] = SegmentationAlgorithm(
                "quickshift", kernel_size=segmentation[0], max_dist=segmentation[1], ratio=0.2,
                random_seed=0)
        exp = explainer.explain_instance(
            image.permute(1, 2, 0).double().cpu().numpy(),
            classifier_fn,
            top_labels=1,
            hide_color=0,
            num_samples=1000,
            batch_size=10,
            **extra,
        )
        _, mask = exp.get_image_and_mask(
            exp.top_labels[0], positive_only=False, num_features=10, hide_rest=False
        )
        return mask

    def run(self, method: str, image: torch.Tensor, target: int) -> np.ndarray:
        if method in ("gradcam", "gradcampp"):
            return self.cam(method, image, target)
        if method == "lime":
            return self.lime(image, target)
        if method == LIME_SCALED:
            return self.lime(image, target, segmentation_settings(*image.shape[-2:]))
        return self.pair_method(method, image, target)


# ----------------------------------------------------------------------------- limits

PASSES = {  # model passes per map at the reference settings
    "gradcam": 1,
    "gradcampp": 1,
    "ig": 25,
    "smoothgrad": 50,
    "blur_ig": 99,  # step 0 of 100 has a zero blur derivative and is skipped
    "guided_ig": 200,
    "lime": 1000,
    LIME_SCALED: 1000,
}


def measure_limits(model, size, device, batch, iters):
    x = torch.randn(batch, 3, size, size, device=device)

    def fwd_bwd():
        xi = x.detach().requires_grad_(True)
        out = model(xi)
        (g,) = torch.autograd.grad(out[:, 0].sum(), xi)
        return g

    def fwd():
        with torch.inference_mode():
            return model(x)

    res = {}
    for name, fn in (("fwd_bwd_img_s", fwd_bwd), ("fwd_img_s", fwd)):
        fn()
        sync(device)
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        sync(device)
        res[name] = batch * iters / (time.perf_counter() - t)
    return res


# ----------------------------------------------------------------------------- main


def device_and_methods(args) -> tuple[torch.device, list[str]]:
    """--threads, --device and --methods as the benchmarks take them (exits on bad values)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in BENCH_METHODS:
            raise SystemExit(f"--methods: unknown {m!r}; allowed: {', '.join(BENCH_METHODS)}")
    return device, methods


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--model", default="resnet50", choices=["resnet50", "resnet18", "vit_b_16"])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--methods", default=",".join(BENCH_METHODS),
                    help=f"comma-separated (default: the seven and {LIME_SCALED})")
    ap.add_argument(
        "--batch-size", type=int, default=None, help="ours: model inputs per call (default: auto)"
    )
    ap.add_argument(
        "--repeat", type=int, default=1, help="timed runs per side, alternating; the minimum counts"
    )
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: as is)")
    ap.add_argument(
        "--limits", action="store_true", help="measure compute limits (default on CUDA)"
    )
    ap.add_argument("--limit-batch", type=int, default=128)
    ap.add_argument("--limit-iters", type=int, default=10)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    device, methods = device_and_methods(args)

    from cose.models import cam_layer

    model = build_model(args.model, args.size).to(device)
    layer, reshape = cam_layer(model)
    x = make_images(args.images, args.size).to(device)
    with torch.inference_mode():
        targets = model(x).argmax(1)
    ref = Reference(model, device, layer, reshape)
    tl = targets.tolist()

    # warm-up: both paths, cheap settings
    saliency.explain("gradcam", model, x[:1], targets[:1])
    saliency.explain("ig", model, x[:2], targets[:2], steps=4)
    ref.run("gradcam", x[0], tl[0])
    ref.release()
    ref._call_model_function(x[:1].permute(0, 2, 3, 1).cpu().numpy(), {"target": tl[0]})
    sync(device)

    meta = {
        "device": str(device),
        "device_name": (
            torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or platform.machine()
        ),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "model": args.model,
        "size": args.size,
        "images": args.images,
        "batch_size": args.batch_size
        or saliency.AUTO_BATCH_SIZE.get(device.type, saliency.AUTO_BATCH_SIZE["other"]),
        "repeat": max(1, args.repeat),
        "precision": "fp32",
        "torch": torch.__version__,
    }
    if "lime" in methods:  # how much LIME's distinct-sample evaluation can save on these images
        from cose.saliency.lime import segment

        segs, distinct = [], []
        for i in range(args.images):
            rs = np.random.RandomState(0)
            seg = segment(x[i].permute(1, 2, 0).cpu().numpy(), 0)
            n = len(np.unique(seg))
            data = rs.randint(0, 2, 1000 * n).reshape(1000, n)
            data[0, :] = 1
            segs.append(n)
            distinct.append(len(np.unique(data, axis=0)))
        meta["lime_segments_mean"] = float(np.mean(segs))
        meta["lime_distinct_samples_mean"] = float(np.mean(distinct))
    limits = {}
    if args.limits or device.type == "cuda":
        limits = measure_limits(model, args.size, device, args.limit_batch, args.limit_iters)
        meta.update(limits)
        print(
            f"limits @ batch {args.limit_batch}: fwd+bwd {limits['fwd_bwd_img_s']:.1f} img/s, "
            f"fwd {limits['fwd_img_s']:.1f} img/s",
            flush=True,
        )

    ours_kw = {"batch_size": args.batch_size} if args.batch_size else {}
    rows = []
    for m in methods:
        method, kw = m, dict(ours_kw)
        if m == "lime":  # the reference's segmentation: lime's quickshift defaults, any size
            kw.update(kernel_size=KERNEL_SIZE, max_dist=MAX_DIST)
        elif m == LIME_SCALED:  # the project's default: scaled to the image (both sides)
            method = "lime"
        ours_runs, ref_runs, ours_cpu, ref_cpu = [], [], [], []
        for _ in range(max(1, args.repeat)):
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            saliency.explain(method, model, x, targets, **kw)
            sync(device)
            ours_runs.append((time.perf_counter() - t0) / args.images)
            ours_cpu.append((time.process_time() - c0) / args.images)
            t0, c0 = time.perf_counter(), time.process_time()
            for i in range(args.images):
                ref.run(m, x[i], tl[i])
            sync(device)
            ref_runs.append((time.perf_counter() - t0) / args.images)
            ref_cpu.append((time.process_time() - c0) / args.images)
            ref.release()  # no CAM hooks left on the model for the next timed runs
        ours, reference = min(ours_runs), min(ref_runs)
        row = {
            "method": m,
            "ours_s_per_map": round(ours, 5),
            "reference_s_per_map": round(reference, 5),
            "speedup": round(reference / ours, 3),
            "passes_per_map": PASSES[m],
            "ours_runs": [round(v, 5) for v in ours_runs],
            "reference_runs": [round(v, 5) for v in ref_runs],
            # process CPU seconds (all threads): less sensitive than wall time to other load
            "ours_cpu_s_per_map": round(min(ours_cpu), 5),
            "reference_cpu_s_per_map": round(min(ref_cpu), 5),
            **meta,
        }
        if method == "lime":  # where its time goes: the phases of one more run of ours
            phases: dict = {}
            lime_method.compute(model, x, targets, int(targets.max()), phases=phases,
                                **{k: v for k, v in kw.items() if k != "batch_size"},
                                batch_size=kw.get("batch_size") or meta["batch_size"])
            row["phases"] = {k: round(v, 4) if isinstance(v, float) else v
                             for k, v in phases.items()}
            print(f"{m:10s} phases: segment {phases['segment']:.3f} s, forward "
                  f"{phases['forward']:.3f} s ({phases['forward_rows']} rows), fit "
                  f"{phases['fit']:.3f} s, mask {phases['mask']:.3f} s of {phases['total']:.3f} "
                  f"s (segmentation {'overlapped with' if phases['overlap'] else 'before'} "
                  "the model: auto)", flush=True)
        if limits:
            limit = limits["fwd_img_s"] if method == "lime" else limits["fwd_bwd_img_s"]
            row["ours_pct_of_limit"] = round(100 * PASSES[m] / ours / limit, 1)
            row["reference_pct_of_limit"] = round(100 * PASSES[m] / reference / limit, 1)
        rows.append(row)
        print(
            f"{m:10s} ours {ours:9.4f} s/map  reference {reference:9.4f} s/map  "
            f"speedup {reference / ours:6.2f}x (CPU time {min(ref_cpu) / min(ours_cpu):6.2f}x)"
            + (f"  ours {row['ours_pct_of_limit']:.1f}% of limit" if limits else ""),
            flush=True,
        )

    seven = [r for r in rows if r["method"] in METHODS]
    if seven:
        geo = math.exp(sum(math.log(r["speedup"]) for r in seven) / len(seven))
        print(f"geometric mean speedup: {geo:.2f}x over {len(seven)} methods")
    print(json.dumps(meta))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp.write_text(json.dumps(rows, indent=2) + "\n")
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
