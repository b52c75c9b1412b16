"""explain: per (dataset, model, method), the per-pair table of REFERENCE.md.

The work is split into units (dataset, model, method, image shard), enumerated
deterministically from params. Each unit writes its shard atomically (parquet, then a JSON
sidecar with the shard's sha256 and fingerprint: the sidecar is the commit marker). On start
the stage counts the finished shards, recomputes missing, truncated or stale ones, and runs
the rest on the chosen backend (`--backend` / `COSE_BACKEND`: local or ray). Finished shards
survive a killed run (the DVC output is `persist`), and a shard from other params, code or
checkpoints has another fingerprint and is recomputed.

A worker loads the data and models of a (dataset, model) once, keeps them for all its units
of that pair, and (`COSE_PREFETCH`, on by default on a GPU) loads the run's next pair in a
background thread meanwhile.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import shutil
import time
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cose import closure, engine, models, precision, runner, runtime, saliency
from cose.config import Config, from_dict
from cose.io import (
    atomic_write_bytes,
    atomic_write_text,
    remove_temp_files,
    sha256_file,
    sha256_file_cached,
)
from cose.stages import common
from cose.tracking import Journal

log = logging.getLogger("cose.explain")


@dataclass(frozen=True)
class Unit:
    dataset: str
    model: str
    method: str
    shard: int
    start: int
    stop: int
    fingerprint: str

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.model}/{self.method}/shard_{self.shard:04d}"

    @property
    def parquet(self) -> Path:
        return common.explain_dir(self.dataset, self.model, self.method) / "shards" / (
            f"shard_{self.shard:04d}.parquet"
        )

    @property
    def sidecar(self) -> Path:
        return self.parquet.with_suffix(".json")

    @property
    def samples(self) -> Path:
        """The (dataset, model, method)'s sample maps: written by its first shard."""
        return self.parquet.parent.parent / "samples.npz"


def checkpoint_hash(dataset: str, model: str) -> str:
    d = common.ckpt_dir(dataset, model)
    files = sorted(d.glob("*.pt"))
    if not files:
        raise FileNotFoundError(
            f"no checkpoints in {d}; run the train stage first (`cose train` or `dvc repro train`)"
        )
    h = hashlib.sha256()
    for f in files:
        if f.name == "last.pt":  # resume state, not part of the result
            continue
        h.update(f.name.encode())
        h.update(sha256_file_cached(f).encode())  # read once per file version and process
    return h.hexdigest()[:16]


def plan(cfg: Config) -> list[Unit]:
    """All units of the stage, in a fixed order."""
    code = closure.code_hash()
    # not fingerprinted: the batch size (same numbers); the image counts and the selection rule
    # (a unit's fingerprint holds the test images and magnitudes it explains, so fewer or more
    # images leave its shard as it is); other methods' settings
    explain = {k: v for k, v in cfg.to_dict()["explain"].items()
               if k not in ("batch_size", "images", "images_by_method", "selection",
                            "reference_models", "settings")}
    units = []
    for dataset in cfg.datasets:
        for model in cfg.models:
            ckpt = checkpoint_hash(dataset, model)
            model_code = _plugin_code(models.get(model).factory)
            sels = {m: common.selection(cfg, dataset, model, m) for m in cfg.methods}
            # the bytes each unit reads: its images' checksums (checked against the files)
            digests = common.image_digests(
                cfg, dataset, dict.fromkeys(i for s in sels.values() for i in s.test_idx))
            for method in cfg.methods:
                sel = sels[method]
                settings = cfg.explain.settings.get(method, {})
                # a plugin method's or model's own source (its edit recomputes its units only)
                plugin = _plugin_code(saliency.get(method).fn) + model_code
                # the precision its passes run at (auto resolved: a change of the validated
                # table recomputes the units whose precision it changes, and only those)
                prec = precision.resolve(cfg.explain.precision, method)
                for shard in range(math.ceil(len(sel) / cfg.explain.shard_size)):
                    start = shard * cfg.explain.shard_size
                    stop = min(start + cfg.explain.shard_size, len(sel))
                    blob = json.dumps(
                        {"seed": cfg.seed, "explain": {**explain, "precision": prec},
                         "dataset": dataset,
                         "model": model, "method": method, "settings": settings,
                         "images": [[i, *digests[i]] for i in sel.test_idx[start:stop]],
                         "draws": {t: d[start:stop].tolist() for t, d in sel.draws.items()},
                         "code": code, "plugin": plugin, "ckpt": ckpt,
                         "save_epochs": cfg.train_for(model).save_epochs},
                        sort_keys=True, default=str,
                    )
                    fp = hashlib.sha256(blob.encode()).hexdigest()[:20]
                    units.append(Unit(dataset, model, method, shard, start, stop, fp))
    return units


def _plugin_code(*objects) -> str:
    """sha256 of the plugin files (outside cose) that define ``objects``; '' for built-ins."""
    from cose.plugins import source_files

    h = hashlib.sha256()
    files = source_files(*objects)
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16] if files else ""


def shard_ok(unit: Unit) -> bool:
    """The shard exists, is complete (checksum) and was made from the same inputs."""
    try:
        meta = json.loads(unit.sidecar.read_text())
    except (OSError, ValueError):
        return False
    if meta.get("fingerprint") != unit.fingerprint or not unit.parquet.exists():
        return False
    if sha256_file(unit.parquet) != meta.get("sha256"):
        return False
    want = meta.get("samples_sha256")
    if want is not None:  # the sample maps this unit wrote: present and whole
        return unit.samples.is_file() and sha256_file(unit.samples) == want
    return True


# --------------------------------------------------------------------------- unit compute

def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """`np.savez_compressed` without the wall-clock timestamps: same arrays, same bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.asanyarray(arrays[name]), allow_pickle=False)
    return buf.getvalue()


def prefetch_enabled(dev: torch.device) -> bool:
    """`COSE_PREFETCH`: 1 loads the next (dataset, model) in the background while this one
    computes, 0 never; unset or auto: on a GPU only (on the CPU the load would take cores
    from the compute). An env choice like the backend: it changes no result."""
    return runtime.current().prefetch_on(dev.type)


def _context_key(cfg: Config, dataset: str, model: str) -> tuple:
    """What a loaded (dataset, model) depends on: code, checkpoint bytes, the images."""
    e = cfg.explain
    images = tuple(common.selection(cfg, dataset, model, m).test_idx for m in cfg.methods)
    return (dataset, model, closure.code_hash(), checkpoint_hash(dataset, model), cfg.data.root,
            images, cfg.train_for(model).save_epochs, e.random_model, e.mid_ckpt)


def _load_host(cfg: Config, dataset: str, model: str) -> tuple[tuple, dict[str, Any]]:
    """Key, then images, labels and every model of a (dataset, model), on the CPU."""
    key = _context_key(cfg, dataset, model)
    images, labels, test_idx = common.explain_subset(cfg, dataset, model)
    d = common.ckpt_dir(dataset, model)
    files = {"final": d / "final.pt"}
    if cfg.explain.random_model:
        files["random"] = d / "random.pt"
    for e in cfg.train_for(model).save_epochs if cfg.explain.mid_ckpt else ():
        files[f"mid_ckpt_e{e:03d}"] = d / f"epoch_{e:03d}.pt"
    nc = common.num_classes(cfg, dataset)
    loaded = dict(zip(files, models.load_checkpoints(model, nc, list(files.values()))))
    return key, {"images": images, "labels": labels, "test_idx": test_idx, "models": loaded}


class Worker:
    """One process's explain worker (the local run, or one Ray actor): it owns the loaded
    (dataset, model), kept on the device for all its units of that pair (one pair at a time
    bounds memory), and the background load of the run's next pair (``COSE_PREFETCH``)."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.pair: runner.Pair | None = None
        self.loads = 0  # pairs loaded in this process: once per worker and model
        self.prefetched = 0  # of these, loads done in the background meanwhile
        # the next pair being loaded on the host: {(dataset, model): Future[(key, host)]}
        self.pending: dict[tuple[str, str], Future] = {}
        self._pool: ThreadPoolExecutor | None = None

    def pair_for(self, cfg: Config, dataset: str, model: str) -> runner.Pair:
        """The loaded pair, loading it (or taking its prefetch) when it is another one."""
        key = _context_key(cfg, dataset, model)
        if key == self.key:
            return self.pair
        self.loads += 1
        self.key = self.pair = None
        host = None
        future = self.pending.pop((dataset, model), None)
        if future is not None:
            ready_key, host = future.result()  # a load error surfaces here, for this unit
            if ready_key != key:  # files changed since the prefetch began
                host = None
        self.drop_prefetch()
        if host is None:
            _, host = _load_host(cfg, dataset, model)
        else:
            self.prefetched += 1
        dev = common.device()
        loaded = {k: m.to(dev) for k, m in host["models"].items()}
        self.pair = runner.Pair(
            model=loaded.pop("final"), images=host["images"].to(dev),
            labels=host["labels"].to(dev), ids=list(host["test_idx"]),
            normalize=lambda x, _m=model: models.normalize(x, _m),
            random_model=loaded.pop("random", None), checkpoints=loaded, dataset=dataset,
            name=model)
        self.key = key
        return self.pair

    def prefetch(self, cfg: Config, dataset: str, model: str) -> None:
        """Start loading (dataset, model) on the host in the background, unless it is."""
        if (dataset, model) in self.pending:
            return
        self.drop_prefetch()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cose-prefetch")
        self.pending[(dataset, model)] = self._pool.submit(_load_host, cfg, dataset, model)

    def drop_prefetch(self) -> None:
        """Forget a prefetch nobody asked for, after it ends (two loads never overlap)."""
        for future in self.pending.values():
            future.cancel() or future.exception()
        self.pending.clear()

    def release(self) -> None:
        """Free the loaded pair and any prefetch: the next unit loads again, as in a new
        worker."""
        self.drop_prefetch()
        self.key = self.pair = None

    def compute(self, unit: Unit, cfg: Config, upcoming: tuple[str, str] | None
                ) -> engine.UnitResult:
        pair = self.pair_for(cfg, unit.dataset, unit.model)
        if upcoming and tuple(upcoming) != (unit.dataset, unit.model) and prefetch_enabled(
                common.device()):
            self.prefetch(cfg, *upcoming)
        sel = common.selection(cfg, unit.dataset, unit.model, unit.method)
        draws = {t: torch.from_numpy(d[unit.start : unit.stop]) for t, d in sel.draws.items()}
        return runner.explain_chunk(pair, unit.method, sel.test_idx[unit.start : unit.stop],
                                    runner.Options.from_config(cfg), first=unit.shard == 0,
                                    draws=draws)


WORKER = Worker()  # this process's


def release() -> None:
    """Free this process's loaded (dataset, model) and any prefetch of the next one."""
    WORKER.release()


def write_shard(unit: Unit, result: engine.UnitResult) -> int:
    """The unit's parquet, its sample maps, then the sidecar (the commit marker): nothing
    run-dependent, so the same unit gives the same bytes on any backend and a rerun is
    byte-identical. Returns the rows."""
    buf = io.BytesIO()
    result.pairs.to_parquet(buf, index=False)
    atomic_write_bytes(unit.parquet, buf.getvalue())
    meta = {"fingerprint": unit.fingerprint, "sha256": sha256_file(unit.parquet),
            "rows": len(result.pairs), "unit": asdict(unit)}
    if result.samples:  # under the same commit marker as the shard
        blob = npz_bytes(result.samples)
        atomic_write_bytes(unit.samples, blob)
        meta["samples_sha256"] = hashlib.sha256(blob).hexdigest()
    atomic_write_text(unit.sidecar, json.dumps(meta, indent=1, sort_keys=True))
    return len(result.pairs)


def compute_unit(
    unit: Unit, cfg_dict: dict[str, Any], root: str | None = None,
    upcoming: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """Compute one unit and write its shard; safe to call from any worker process.

    `upcoming`: the (dataset, model) this worker will likely need after this one's units;
    where `prefetch_enabled`, its data and models load in the background meanwhile.
    """
    if root:
        os.chdir(root)
    from cose import plugins

    plugins.load()  # a worker process registers the project's own methods and models too
    t0 = time.perf_counter()
    rows = write_shard(unit, WORKER.compute(unit, from_dict(cfg_dict), upcoming))
    return {"key": unit.key, "rows": rows, "seconds": time.perf_counter() - t0,
            "worker": f"{os.uname().nodename}:{os.getpid()}", "loads": WORKER.loads,
            "prefetched": WORKER.prefetched}


def run_job(job: tuple[Unit, tuple[str, str] | None], cfg_dict: dict[str, Any],
            root: str | None = None) -> dict[str, Any]:
    """An executor's call: (unit, the next other (dataset, model) in the run) -> compute_unit."""
    unit, upcoming = job
    return compute_unit(unit, cfg_dict, root, upcoming=upcoming)


def jobs(todo: list[Unit]) -> list[tuple[Unit, tuple[str, str] | None]]:
    """Each unit with the first (dataset, model) after its own in the run's order: what its
    worker will need next (executors hand units out in this order)."""
    out: list[tuple[Unit, tuple[str, str] | None]] = []
    current = after = None
    for u in reversed(todo):
        if (u.dataset, u.model) != current:
            after, current = current, (u.dataset, u.model)
        out.append((u, after))
    return out[::-1]


# --------------------------------------------------------------------------- driver


def _prune(units: list[Unit]) -> None:
    """Remove shards and folders that the current params do not produce, and the temp files
    a killed run left behind (they would otherwise end up in DVC's cached output)."""
    wanted_dirs = {common.explain_dir(u.dataset, u.model, u.method) for u in units}
    wanted_files = {u.parquet for u in units} | {u.sidecar for u in units}
    if not common.EXPLAIN.exists():
        return
    remove_temp_files(common.EXPLAIN)
    for d in sorted(common.EXPLAIN.glob("*/*/*")):
        if d.is_dir() and d not in wanted_dirs:
            shutil.rmtree(d)
    for d in wanted_dirs:
        for f in (d / "shards").glob("*"):
            if f not in wanted_files:
                f.unlink()


def merge(cfg: Config, units: list[Unit]) -> dict[tuple[str, str, str], pd.DataFrame]:
    """Concatenate the shards of each (dataset, model, method) into pairs.parquet."""
    tables: dict[tuple[str, str, str], list[pd.DataFrame]] = {}
    for u in units:
        tables.setdefault((u.dataset, u.model, u.method), []).append(pd.read_parquet(u.parquet))
    out = {}
    for (dataset, model, method), parts in tables.items():
        df = runner.tag_rows(pd.concat(parts, ignore_index=True), dataset, model, method)
        buf = io.BytesIO()
        df.to_parquet(buf, index=False)
        folder = common.explain_dir(dataset, model, method)
        atomic_write_bytes(folder / "pairs.parquet", buf.getvalue())
        atomic_write_text(folder / common.CELL_PARAMS, json.dumps(
            common.cell_params(cfg, dataset, model, method), indent=1, sort_keys=True,
            default=str) + "\n")
        out[(dataset, model, method)] = df
    return out


def _progress_bar(total: int):
    """Overall progress with ETA on a terminal; disabled under CI, --quiet or without a TTY."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="explain", unit="unit", dynamic_ncols=True,
                disable=common.quiet() or total == 0)


def _redirect_logging(bar):
    """Log lines above the bar instead of through it (only while the bar is shown)."""
    import contextlib

    if bar.disable:
        return contextlib.nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm()


def run(cfg: Config, backend: str | None = None) -> None:
    prefetch_enabled(common.device())  # a bad COSE_PREFETCH fails here, before any work
    journal = Journal.for_config("explain", cfg)  # tracking.required: checks MLflow first
    if note := precision.warning(cfg.explain.precision, cfg.methods):
        log.warning("explain: %s", note)
    with common.output_lock("explain", str(common.EXPLAIN)):
        tables, executor, spans = _run_units(cfg, backend)
    journal.root_run.set_tags({
        "cose.backend": executor.name,
        "cose.precision_unvalidated": ",".join(precision.unvalidated(cfg.explain.precision,
                                                                     cfg.methods)) or "none",
    })
    for (dataset, model, method), df in tables.items():
        run_ = journal.run(f"{dataset}/{model}/{method}", f"explain {dataset}/{model}/{method}")
        run_.log_params({"dataset": dataset, "model": model, "saliency_method": method,
                         "precision": precision.resolve(cfg.explain.precision, method)})
        run_.log_params(cfg.explain.settings.get(method, {}), prefix="settings.")
        # what this stage computes: the pairs and their time (COSE is compile's metric)
        span = spans.get((dataset, model, method))
        run_.log_metrics({"pairs": len(df), "nan_ssim": int(df["ssim"].isna().sum()),
                          "units_run": span[2] if span else 0})
        if span:  # the real time its units ran (none when every shard was reused)
            run_.start_ms, run_.end_ms = span[0], span[1]
            run_.log_metric("compute_seconds", span[3])
        run_.log_artifact(common.explain_dir(dataset, model, method) / "pairs.parquet")
    journal.flush()


def _warn_capped(cfg: Config) -> None:
    """More images asked than a test split holds: say so (all of them are explained)."""
    from cose import data

    for dataset in cfg.datasets:
        n = data.split_size(dataset, cfg.data.root, "test")
        asked = cfg.explain.images + (cfg.explain.selection == "reference")
        if asked > n:
            log.warning("explain.images: %d asked, but %s has %d test images: explaining all %d",
                        cfg.explain.images, dataset, n, n)


def _run_units(cfg: Config, backend: str | None):
    """Plan, prune, compute the missing units, merge: under the explain lock."""
    from cose import backends

    _warn_capped(cfg)
    units = plan(cfg)
    _prune(units)
    todo = [u for u in units if not shard_ok(u)]
    done = len(units) - len(todo)
    if done and todo:
        log.info("explain: resumed: %d of %d units already done, %d to run",
                 done, len(units), len(todo))
    else:
        log.info("explain: %d units, %d done, %d to run", len(units), done, len(todo))
    executor = backends.get(backend)
    t0 = time.perf_counter()
    loads: dict[str, int] = {}
    prefetched: dict[str, int] = {}
    spans: dict[tuple[str, str, str], list] = {}  # start ms, end ms, units, seconds
    bar = _progress_bar(len(todo))
    with bar, _redirect_logging(bar):
        for i, res in enumerate(executor.run(run_job, jobs(todo), cfg.to_dict()), 1):
            end = int(time.time() * 1000)
            cell = tuple(res["key"].split("/")[:3])
            span = spans.setdefault(cell, [end - int(res["seconds"] * 1000), end, 0, 0.0])
            span[0] = min(span[0], end - int(res["seconds"] * 1000))
            span[1], span[2], span[3] = max(span[1], end), span[2] + 1, span[3] + res["seconds"]
            elapsed = time.perf_counter() - t0
            eta = elapsed / i * (len(todo) - i)
            loads[res["worker"]] = max(loads.get(res["worker"], 0), res["loads"])
            prefetched[res["worker"]] = max(prefetched.get(res["worker"], 0), res["prefetched"])
            bar.set_postfix_str(res["key"], refresh=False)
            bar.update()
            log.info("explain [%d/%d] %s: %d pairs in %.1fs (elapsed %.0fs, eta %.0fs)",
                     i, len(todo), res["key"], res["rows"], res["seconds"], elapsed, eta)
    if todo:
        log.info("explain: ran %d units on backend %s: %d workers, %d model loads "
                 "(%d prefetched), %.1fs", len(todo), executor.name, len(loads),
                 sum(loads.values()), sum(prefetched.values()), time.perf_counter() - t0)
    bad = [u.key for u in units if not shard_ok(u)]
    if bad:
        raise RuntimeError(f"explain: {len(bad)} units did not produce a valid shard: {bad[:5]}")
    return merge(cfg, units), executor, spans
