"""What a worker pays to switch to a (dataset, model): its checkpoints, in one run.

    python benchmarks/context_load.py --models resnet50,vit_b16 --checkpoints 12 --json out.json

Per model, N COSE checkpoints (final, random-init, epochs: 12 in the paper's grid) are written to
a temporary folder, then, alternating, `repeats` times each (the minimum counts):
- `create`: `cose.models.create(name, classes, weights=path)` per file (the explain stage's
  load before `load_checkpoints`: a fresh build and random init per checkpoint);
- `load_checkpoints`: `cose.models.load_checkpoints` (one build, then assigned copies).
It also times the checkpoint fingerprint that every unit's context lookup computes
(`explain.checkpoint_hash`: sha256 of all N files) uncached, and through the per-process cache
that the stage now uses, and gives both per (dataset, model) for `--units` units (34 in the paper
presets: 3 methods x 10 shards of 50 images + 4 methods x 1 shard).

With `--device cuda` it also times the move of the loaded models to the GPU (synchronised):
on a GPU the stage loads the next (dataset, model) on the host in the background while the
current one computes (`COSE_PREFETCH`), so a switch then waits only for that move instead of
the load plus the move. Not timed: decoding the explain images (about 7 ms per 500x375 JPEG on
the 2-core CPU, see docs/gpu.md; part of the prefetched load too).
Timings on a shared machine are noisy: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def _to_device(loaded: list, device: torch.device) -> float:
    t = time.perf_counter()
    for m in loaded:
        m.to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


def measure(name: str, n: int, classes: int, units: int, repeats: int, folder: Path,
            device: torch.device) -> dict:
    from cose import io, models

    paths = []
    for i in range(n):
        path = folder / f"{name}_{i:02d}.pt"
        torch.save(models.cose_checkpoint(models.create(name, classes, seed=i)), path)
        paths.append(path)
    mib = sum(p.stat().st_size for p in paths) / 2**20
    create_s, fast_s, move_s = [], [], []
    for _ in range(repeats):
        t, a = _timed(lambda: [models.create(name, classes, weights=p) for p in paths])
        create_s.append(t)
        del a
        t, b = _timed(lambda: models.load_checkpoints(name, classes, paths))
        fast_s.append(t)
        if device.type != "cpu":
            move_s.append(_to_device(b, device))
            b = [m.cpu() for m in b]
            torch.cuda.empty_cache()
    same = all(torch.equal(x, y) for m, p in zip(b, paths)
               for x, y in zip(m.state_dict().values(),
                               models.create(name, classes, weights=p).state_dict().values()))
    del b
    # files just written are not cached (io.SETTLED_NS): wait until they are settled
    settle = max(p.stat().st_ctime_ns for p in paths) + io.SETTLED_NS - time.time_ns()
    time.sleep(max(0.0, settle / 1e9))
    uncached, _ = _timed(lambda: [io.sha256_file(p) for p in paths])
    io.sha256_file_cached(paths[0])  # warm for the next line's first file too
    first, _ = _timed(lambda: [io.sha256_file_cached(p) for p in paths])
    cached, _ = _timed(lambda: [io.sha256_file_cached(p) for p in paths])
    for p in paths:
        p.unlink()
    return {
        "model": name, "checkpoints": n, "mib": round(mib, 1), "identical": same,
        "create_s": round(min(create_s), 3), "load_checkpoints_s": round(min(fast_s), 3),
        "load_speedup": round(min(create_s) / min(fast_s), 2),
        "device": str(device),
        # a switch: without prefetch, load + move; with it, the move alone
        "switch_s": round(min(fast_s) + min(move_s), 3) if move_s else None,
        "switch_prefetched_s": round(min(move_s), 3) if move_s else None,
        "hash_per_unit_uncached_s": round(uncached, 4),
        "hash_per_unit_cached_s": round(cached, 6),
        "hash_per_pair_uncached_s": round(units * uncached, 2),
        "hash_per_pair_cached_s": round(first + (units - 1) * cached, 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet50,vit_b16")
    ap.add_argument("--checkpoints", type=int, default=12)
    ap.add_argument("--classes", type=int, default=200)
    ap.add_argument("--units", type=int, default=34)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda to time the move to the GPU")
    ap.add_argument("--dir", default=None, help="where the checkpoints go (default: a temp dir)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for name in args.models.split(","):
            rows.append(measure(name, args.checkpoints, args.classes, args.units, args.repeats,
                                Path(tmp), device))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"| model | ckpts (MiB) | create s | load_checkpoints s | speedup | hash/unit s "
          f"uncached / cached | hash per (dataset, model), {args.units} units: uncached / cached s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['checkpoints']} ({r['mib']:.0f}) | {r['create_s']:.2f} | "
              f"{r['load_checkpoints_s']:.2f} | {r['load_speedup']:.1f}x | "
              f"{r['hash_per_unit_uncached_s']:.2f} / {r['hash_per_unit_cached_s']:.5f} | "
              f"{r['hash_per_pair_uncached_s']:.1f} / {r['hash_per_pair_cached_s']:.1f} |")
    if device.type != "cpu":
        print(f"\n| model | switch on {device}: load + move s | with prefetch: move s |")
        print("|---|---|---|")
        for r in rows:
            print(f"| {r['model']} | {r['switch_s']:.2f} | {r['switch_prefetched_s']:.2f} |")
    if args.json:
        meta = {"python": platform.python_version(), "torch": torch.__version__,
                "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                "threads": torch.get_num_threads(), "units": args.units,
                "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
                else None}
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
