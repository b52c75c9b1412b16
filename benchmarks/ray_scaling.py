"""Explain units per second: local vs Ray with 1 and 2 workers, in one run.

    python benchmarks/ray_scaling.py --cpus 2 --json results/ray_scaling.json
    python benchmarks/ray_scaling.py --project . --workers 1,2,4   # your trained project

Every configuration computes the same units (all of the explain stage's units for the
params) from scratch in a temporary workspace, through the real executors and
`cose.stages.explain.run_job` (as the stage calls them):
- `local`: the default executor, one process, torch with all `--cpus` threads;
- `ray` with W workers (`COSE_RAY_WORKERS=W`, as the stage reads it): W actors on a local
  `--cpus`-CPU Ray cluster, each with cpus/W torch threads, models loaded once per actor.
`--threads auto,1` adds runs with one torch thread per worker (`COSE_RAY_THREADS=1`), which
separates the gain from more workers from the cost of multi-threaded torch on busy CPUs.

The Ray cluster is started once before the runs (its start-up time is reported apart); each
run's wall time includes starting its actors and loading the models in each of them.
`steady units/s` leaves out each worker's first unit (which loads data and models).

Without `--project` it builds a small workspace first: the embedded digits data, one demo model
trained for two epochs, and --images test images explained by --methods (one image per unit).
With `--project DIR` it uses DIR's params.yaml, data/ and checkpoints/ (read only; outputs go to
the temporary workspace). Prints a markdown table; `--json` writes the rows with the machine's
details. Timings on a shared machine are noisy: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

BIN = Path(sys.executable).parent
ARGS: argparse.Namespace

SMALL = {
    "seed": 0,
    "datasets": ["digits"],
    "models": ["demo_resnet"],
    "train": {"epochs": 2, "save_epochs": [1], "max_train_images": 256},
    "explain": {"shard_size": 1, "magnitudes": 3, "sample_maps": 1,  # all 13 transforms
                "settings": {"ig": {"steps": 16}, "smoothgrad": {"samples": 8}}},
    "tracking": {"retries": 0, "backoff_s": 0.1},
}


def _cose(args: list[str], cwd: Path) -> None:
    env = {**os.environ, "CI": "true"}
    res = subprocess.run([str(BIN / "cose"), *args], cwd=cwd, env=env, capture_output=True,
                         text=True)
    if res.returncode != 0:
        raise SystemExit(f"cose {' '.join(args)} failed:\n{res.stderr[-3000:]}")


def build_workspace(ws: Path, project: Path | None, images: int, methods: list[str]) -> None:
    """params.yaml, data/ and checkpoints/ in `ws` (linked from `project`, or made here)."""
    if project is not None:
        shutil.copy2(project / "params.yaml", ws / "params.yaml")
        for name in ("data", "checkpoints"):
            if not (project / name).exists():
                raise SystemExit(f"--project: {project / name} is missing; run `dvc repro train`")
            (ws / name).symlink_to((project / name).resolve())
        return
    root = Path(__file__).resolve().parents[1]
    raw = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in SMALL.items():
        if isinstance(values, dict):
            raw[section] = {**raw[section], **values}
        else:
            raw[section] = values
    raw["methods"] = methods
    raw["explain"]["images"] = images
    (ws / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    t0 = time.perf_counter()
    _cose(["data", "fetch", "digits"], ws)
    _cose(["train"], ws)
    print(f"workspace: data + training in {time.perf_counter() - t0:.0f}s", file=sys.stderr)


def run_config(backend: str, workers: int, threads: int | None, cfg, units) -> dict:
    import torch

    from cose import backends
    from cose.stages import common, explain

    shutil.rmtree(common.EXPLAIN, ignore_errors=True)
    explain.release()  # the local executor loads its models again, like a new process
    os.environ["COSE_RAY_WORKERS"] = str(workers)
    if threads:
        os.environ["COSE_RAY_THREADS"] = str(threads)
    else:
        os.environ.pop("COSE_RAY_THREADS", None)
    torch.set_num_threads(threads or ARGS.cpus)  # the local executor's process
    executor = backends.get(backend)
    stamps, seen = [], set()
    t0 = time.perf_counter()
    for res in executor.run(explain.run_job, explain.jobs(units), cfg.to_dict()):
        stamps.append(time.perf_counter() - t0)
        seen.add(res["worker"])
    wall = time.perf_counter() - t0
    assert all(explain.shard_ok(u) for u in units), "a unit left no valid shard"
    n, w = len(units), len(seen)
    steady = (n - w) / (stamps[-1] - stamps[w - 1]) if n > w and stamps[-1] > stamps[w - 1] \
        else float("nan")
    return {"backend": backend, "workers": w, "policy": threads or "auto",
            "threads": threads or (ARGS.cpus if backend == "local" else ARGS.cpus // w),
            "units": n, "wall_s": round(wall, 2),
            "units_per_s": round(n / wall, 3), "steady_units_per_s": round(steady, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--project", type=Path, default=None,
                    help="a trained project (params.yaml, data/, checkpoints/)")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    ap.add_argument("--workers", default="1,2", help="Ray worker counts to measure")
    ap.add_argument("--images", type=int, default=8, help="test images (without --project)")
    ap.add_argument("--methods", default="gradcam,gradcampp,ig,smoothgrad",
                    help="saliency methods (without --project)")
    ap.add_argument("--threads", default="auto",
                    help="torch threads per worker, comma-separated policies: auto (cpus/workers,"
                         " the executor's default) and/or numbers, e.g. auto,1")
    ap.add_argument("--no-local", action="store_true", help="skip the local baseline")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args()
    global ARGS
    ARGS = args
    policies = [None if t == "auto" else int(t) for t in args.threads.split(",")]

    import torch

    os.environ.setdefault("COSE_DEVICE", "cpu")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.pop("RAY_ADDRESS", None)
    torch.set_num_threads(args.cpus)
    project = args.project.resolve() if args.project else None
    out_json = args.json.resolve() if args.json else None
    with tempfile.TemporaryDirectory(prefix="cose-ray-scaling-") as tmp:
        ws = Path(tmp)
        build_workspace(ws, project, args.images, args.methods.split(","))
        os.chdir(ws)
        import ray

        from cose import config
        from cose.stages import explain

        cfg = config.load("params.yaml")
        units = explain.plan(cfg)
        load0 = os.getloadavg()
        rows = []
        if not args.no_local:
            for threads in policies:
                rows.append(run_config("local", 1, threads, cfg, units))
        t0 = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
                 _node_ip_address="127.0.0.1")
        ray_start = time.perf_counter() - t0
        try:
            for threads in policies:
                for w in (int(x) for x in args.workers.split(",")):
                    rows.append(run_config("ray", w, threads, cfg, units))
        finally:
            ray.shutdown()
        load1 = os.getloadavg()

    ray1 = [r for r in rows if r["backend"] == "ray" and r["workers"] == 1]
    for r in rows:  # against Ray with 1 worker under the same thread policy
        base = next((b for b in ray1 if b["policy"] == r["policy"]), r)
        r["speedup_vs_ray1"] = round(base["wall_s"] / r["wall_s"], 2)
        r["steady_speedup_vs_ray1"] = round(r["steady_units_per_s"]
                                            / base["steady_units_per_s"], 2)
    print(f"\n{len(units)} units ({', '.join(cfg.methods)} x {cfg.explain.images} images, "
          f"{', '.join(cfg.models)}), {args.cpus} CPUs, Ray start-up {ray_start:.1f}s, "
          f"load average {load0[0]:.1f} -> {load1[0]:.1f}\n")
    print("| backend | workers | torch threads each | units | wall s | units/s | steady units/s "
          "| speed-up vs ray x1 (wall / steady) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['workers']} | {r['threads']} | {r['units']} "
              f"| {r['wall_s']:.1f} "
              f"| {r['units_per_s']:.2f} | {r['steady_units_per_s']:.2f} "
              f"| {r['speedup_vs_ray1']:.2f} / {r['steady_speedup_vs_ray1']:.2f} |")
    meta = {"rows": rows, "ray_startup_s": round(ray_start, 2), "cpus": args.cpus,
            "machine_cpus": os.cpu_count(), "loadavg_before": load0, "loadavg_after": load1,
            "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "ray": ray.__version__,
            "methods": list(cfg.methods), "images": cfg.explain.images,
            "models": list(cfg.models)}
    if out_json:
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(meta, indent=1))
        print(f"\nwrote {out_json}")


if __name__ == "__main__":
    main()
