"""What two parity details of the reference move, per pair: the translation grid's bin 15 and
the valid mask's erosion rule (docs/metric.md, "Official code vs this project").

On a random-init torchvision ResNet-18 (10 classes) at 224 px and scikit-image's sample
photographs (shipped with the package), for GradCAM, IG and SmoothGrad:

- bin 15: per-pair SSIM of a translation by 15 px (the float32 grid's 15.999999, as the
  reference moves it) against 16 px (what a float64 grid moved) and their neighbours;
- erosion: per-pair SSIM over the valid mask of every translation and rotation bin, eroded
  as skimage's binary_erosion does (image border kept: the reference and now the project)
  against eroding from the image border too (the project before), on the same maps.

    python benchmarks/fidelity_effects.py --json fidelity.json
"""

from __future__ import annotations

import argparse
import json
import platform

import numpy as np
import torch
from scipy.ndimage import binary_erosion
from skimage.metrics import structural_similarity

from cose import saliency, similarity
from cose import transforms as T

SETTINGS = {"gradcam": {"layer": "layer4"}, "ig": {}, "smoothgrad": {"samples": 20}}


def images(n: int) -> torch.Tensor:
    import skimage.data
    from PIL import Image

    names = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")[:n]
    out = []
    for name in names:
        img = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize((224, 224), Image.BILINEAR)
        out.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255)
    return torch.stack(out)


def normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x - mean) / std


def border_eroded_ssim(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """The previous rule: outside the image counts as unset (scipy's default)."""
    drange = max(np.ptp(a), np.ptp(b))
    _, full = structural_similarity(a, b, win_size=5, data_range=drange, full=True)
    keep = binary_erosion(mask, structure=np.ones((5, 5), bool))
    return float(full[keep].mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    import torchvision

    model = torchvision.models.resnet18(num_classes=10).eval()
    x01 = images(args.images)
    with torch.no_grad():
        pred = model(normalize(x01)).argmax(1)
    out = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
           "model": "torchvision resnet18, random init (seed 0), 224 px",
           "images": args.images, "bin15": {}, "erosion": {}}
    for method, kw in SETTINGS.items():
        maps0 = saliency.explain(method, model, normalize(x01), pred, **kw)
        shifts = {}
        for px in (14, 15, 16, 17):
            mags = torch.full((len(x01),), float(px))
            xt = T.apply("TranslateX", x01, mags)
            mt = saliency.explain(method, model, normalize(xt), pred, **kw)
            back = T.invert("TranslateX", mt, mags)
            mask = T.valid_mask("TranslateX", mags, 224, 224)
            shifts[px] = [round(float(v), 4) for v in similarity.ssim(maps0, back, mask)]
        out["bin15"][method] = shifts
        deltas = []
        for name in ("TranslateX", "TranslateY", "Rotate"):
            grid = T.magnitude_grid(name, 224)
            for mag in grid[::6]:
                mags = torch.full((len(x01),), mag)
                xt = T.apply(name, x01, mags)
                mt = saliency.explain(method, model, normalize(xt), pred, **kw)
                back = T.invert(name, mt, mags)
                mask = T.valid_mask(name, mags, 224, 224)
                ours = similarity.ssim(maps0.double(), back.double(), mask)
                for i in range(len(x01)):
                    old = border_eroded_ssim(maps0[i].double().numpy(), back[i].double().numpy(),
                                             mask[i].numpy())
                    deltas.append(abs(float(ours[i]) - old))
        out["erosion"][method] = {"pairs": len(deltas), "max_abs_delta": round(max(deltas), 5),
                                  "mean_abs_delta": round(float(np.mean(deltas)), 5)}
        print(method, "bin15", {k: float(np.mean(v)) for k, v in shifts.items()},
              "erosion", out["erosion"][method], flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
