"""Similarity throughput: batched cose.similarity vs the reference's skimage + scipy loop.

Both run in one process on the same maps, interleaved batch by batch so that both see the
same machine load. The loop (skimage ``structural_similarity(win_size=5, data_range=...,
full=True)`` + scipy ``spearmanr``, one pair at a time, as the reference calls them) is timed
on a subset of the pairs and extrapolated per pair; ours runs on every pair. Maps are
saliency-like (smooth upsampled CAMs with zero regions, gradient maps clipped at their 99th
percentile: both have ties), 224x224 float32 by default.

    python benchmarks/similarity_speed.py --pairs 10000 --loop-pairs 300 --threads 2 --json out.json

Not a test: speed claims are measured here, as ratios in one run (see docs/metric.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F


def saliency_like(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """[n,size,size] float32 in [0,1]: half CAM-like (7x7 upsampled, ReLU, min-max), half
    gradient-like (|noise| smoothed a little, clipped at the 99th percentile, scaled)."""
    half = n // 2
    cam = torch.randn(half, 1, 7, 7, generator=generator)
    cam = F.interpolate(cam, size=(size, size), mode="bilinear", align_corners=False)
    cam = cam.squeeze(1).clamp(min=0)
    grad = torch.randn(n - half, 1, size, size, generator=generator).abs()
    grad = F.avg_pool2d(grad, 3, 1, 1).squeeze(1)
    top = torch.quantile(grad.flatten(1)[:, ::7], 0.99, dim=1).view(-1, 1, 1)
    grad = torch.minimum(grad, top)
    maps = torch.cat((cam, grad))
    lo = maps.amin(dim=(1, 2), keepdim=True)
    hi = maps.amax(dim=(1, 2), keepdim=True)
    return ((maps - lo) / (hi - lo).clamp(min=1e-12)).to(torch.float32)


def variant_of(maps: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A perturbed copy: the second map of each pair."""
    noise = torch.rand(maps.shape, generator=generator) * 0.3
    out = maps * 0.8 + noise * (maps > 0)
    return (out / out.amax(dim=(1, 2), keepdim=True).clamp(min=1e-12)).to(torch.float32)


def reference_pair(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None):
    """The reference call pattern for one pair."""
    from scipy.ndimage import binary_erosion
    from scipy.stats import spearmanr
    from skimage.metrics import structural_similarity

    rng = max(float(np.ptp(a)), float(np.ptp(b)))
    mean, full = structural_similarity(a, b, win_size=5, data_range=rng, full=True)
    if mask is None:
        s = mean
        r = spearmanr(a.ravel(), b.ravel()).statistic
    else:
        s = full[binary_erosion(mask, np.ones((5, 5), bool))].mean()
        r = spearmanr(a[mask], b[mask]).statistic
    return float(s), float(r)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=10000, help="pairs for cose.similarity")
    parser.add_argument("--loop-pairs", type=int, default=300, help="pairs for the loop")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--threads", type=int, default=2, help="torch threads for ours")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--masked", action="store_true", help="Rotate valid masks on all pairs")
    parser.add_argument(
        "--shared",
        type=int,
        default=0,
        metavar="K",
        help="pipeline pattern: each original map against K variants, passed as "
        "original.expand(...) (0: independent pairs)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", dest="json_out", default=None, help="write results here")
    args = parser.parse_args(argv)

    from cose.similarity import spearman, ssim
    from cose.transforms import magnitude_grid, valid_mask

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(args.seed)
    n_batches = -(-args.pairs // args.batch)
    loop_per_batch = max(1, -(-args.loop_pairs // n_batches))
    angles = magnitude_grid("Rotate")

    ours_s = ours_r = loop_s = 0.0
    ours_n = loop_n = 0
    max_ssim_diff = max_sp_diff = 0.0
    done = 0
    # warm-up (allocations, lazy imports, compiling the CPU kernels for each call pattern
    # timed below) on a small batch
    w = saliency_like(4, args.size, gen).to(device)
    wm = w > 0.2
    for x in (w, w[:1].expand_as(w), w[:2].repeat(2, 1, 1)):
        for m in (None, wm):
            ssim(x, w.flip(1), m)
            spearman(x, w.flip(1), m)
    reference_pair(w[0].cpu().numpy(), w[1].cpu().numpy(), None)
    while done < args.pairs:
        n = min(args.batch, args.pairs - done)
        if args.shared:
            originals = saliency_like(-(-n // args.shared), args.size, gen)
            a = originals.repeat_interleave(args.shared, dim=0)[:n]
        else:
            a = saliency_like(n, args.size, gen)
        b = variant_of(a, gen)
        mask = None
        if args.masked:
            pick = torch.randint(len(angles), (n,), generator=gen)
            mags = torch.tensor([angles[i] for i in pick.tolist()], dtype=torch.float64)
            mask = valid_mask("Rotate", mags, args.size, args.size)
        ad, bd = a.to(device), b.to(device)
        if args.shared:  # one call per original, as the explain stage would make it
            calls = [
                (
                    ad[i : i + 1].expand(min(args.shared, n - i), *ad.shape[1:]),
                    slice(i, i + args.shared),
                )
                for i in range(0, n, args.shared)
            ]
        else:
            calls = [(ad, slice(0, n))]
        md = mask.to(device) if mask is not None else None
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        s = torch.cat([ssim(x, bd[sl], md[sl] if md is not None else None) for x, sl in calls])
        if device.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        r = torch.cat([spearman(x, bd[sl], md[sl] if md is not None else None) for x, sl in calls])
        if device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        ours_s += t1 - t0
        ours_r += t2 - t1
        ours_n += n
        k = min(loop_per_batch, n, args.loop_pairs - loop_n)
        an, bn = a[:k].numpy(), b[:k].numpy()
        mn = mask[:k].numpy() if mask is not None else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t3 = time.perf_counter()
            ref = [
                reference_pair(an[i], bn[i], mn[i] if mn is not None else None) for i in range(k)
            ]
            loop_s += time.perf_counter() - t3
        loop_n += k
        for i, (rs, rr) in enumerate(ref):
            if np.isfinite(rs):
                max_ssim_diff = max(max_ssim_diff, abs(float(s[i]) - rs))
            if np.isfinite(rr):
                max_sp_diff = max(max_sp_diff, abs(float(r[i]) - rr))
        done += n

    ours_total = ours_s + ours_r
    per_loop = loop_s / loop_n
    per_ours = ours_total / ours_n
    result = {
        "pairs": args.pairs,
        "size": args.size,
        "masked": args.masked,
        "shared": args.shared,
        "device": str(device),
        "torch_threads": args.threads,
        "batch": args.batch,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "loop_pairs_measured": loop_n,
        "loop_ms_per_pair": 1e3 * per_loop,
        "loop_s_extrapolated": per_loop * args.pairs,
        "ours_ms_per_pair": 1e3 * per_ours,
        "ours_ssim_ms_per_pair": 1e3 * ours_s / ours_n,
        "ours_spearman_ms_per_pair": 1e3 * ours_r / ours_n,
        "ours_s_total": ours_total,
        "speedup": per_loop / per_ours,
        "max_abs_diff_ssim": max_ssim_diff,
        "max_abs_diff_spearman": max_sp_diff,
    }
    print(
        f"similarity of {args.pairs} {args.size}x{args.size} pairs"
        f"{' (masked)' if args.masked else ''}"
        f"{f', one original per {args.shared} variants' if args.shared else ''}"
        f", device {device}, torch threads {args.threads}"
    )
    print(f"| {'path':<34} | {'pairs timed':>11} | {'ms/pair':>8} | {'s for all':>9} |")
    print(f"|{'-' * 36}|{'-' * 13}|{'-' * 10}|{'-' * 11}|")
    print(
        f"| {'skimage + scipy loop (extrapolated)':<34} | {loop_n:>11} | "
        f"{1e3 * per_loop:>8.3f} | {per_loop * args.pairs:>9.1f} |"
    )
    print(
        f"| {'cose.similarity ssim + spearman':<34} | {ours_n:>11} | "
        f"{1e3 * per_ours:>8.3f} | {ours_total:>9.1f} |"
    )
    print(
        f"|   {'of which ssim':<32} | {'':>11} | {1e3 * ours_s / ours_n:>8.3f} | {ours_s:>9.1f} |"
    )
    print(
        f"|   {'of which spearman':<32} | {'':>11} | {1e3 * ours_r / ours_n:>8.3f} | {ours_r:>9.1f} |"
    )
    print(f"speedup: {per_loop / per_ours:.1f}x")
    print(
        f"max |ours - loop| on the timed subset: ssim {max_ssim_diff:.2e}, spearman {max_sp_diff:.2e}"
    )
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
