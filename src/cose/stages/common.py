"""Paths, fingerprints and data selection shared by the stage drivers."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

from cose import runtime
from cose.config import Config, ConfigError

log = logging.getLogger("cose")

CHECKPOINTS = Path("checkpoints")
EXPLAIN = Path("outputs") / "explain"
RESULTS = Path("results")

LOCKS = Path("outputs") / ".locks"  # beside the DVC outputs, never inside one


def output_lock(name: str, what: str):
    """The lock of one output tree (``cose.io.exclusive``): a second writer waits
    ``COSE_LOCK_WAIT`` seconds (default 0), then stops with one line naming the holder."""
    from cose.io import exclusive

    return exclusive(LOCKS / f"{name}.lock", what, runtime.current().lock_wait)


def ckpt_dir(dataset: str, model: str) -> Path:
    return CHECKPOINTS / dataset / model


def explain_dir(dataset: str, model: str, method: str) -> Path:
    return EXPLAIN / dataset / model / method


#: beside each cell's pairs.parquet: the params that made it (compile checks them)
CELL_PARAMS = "params.json"
# explain params that do not change a pair's numbers (the batch size and the shard size split
# the same work), and those a cell holds in its own form (images, settings)
_UNLABELLED = ("batch_size", "shard_size", "images", "images_by_method", "settings")


def cell_params(cfg: Config, dataset: str, model: str, method: str) -> dict:
    """The params one explain cell's pairs and sample maps are made from, resolved (a setting
    left at its default equals the default written out): the explain stage writes them beside
    the cell's pairs.parquet, compile and the report refuse to label the cell with others."""
    from cose import spec

    explain = {k: v for k, v in cfg.to_dict()["explain"].items() if k not in _UNLABELLED}
    train = cfg.train_for(model)
    return {"seed": cfg.seed, "dataset": dataset, "model": model, "method": method,
            "explain": {**explain, "images": cfg.explain.images_for(method),
                        "settings": spec.check_settings(
                            method, cfg.explain.settings.get(method, {}))},
            "train": {"save_epochs": list(train.save_epochs),
                      "checkpoint_base": train.checkpoint_base}}


def _flat(d: dict, prefix: str = "") -> dict:
    out: dict = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_cell_params(cfg: Config, dataset: str, model: str, method: str) -> None:
    """ConfigError (one line) unless the cell's explain outputs were made with the params of
    ``cfg``: results are never labelled with settings that did not make them."""
    import json

    folder = explain_dir(dataset, model, method)
    path = folder / CELL_PARAMS
    try:
        made = json.loads(path.read_text())
    except (OSError, ValueError):
        raise ConfigError(f"{folder} holds no record of the params that made it ({path}); "
                          "run `cose explain` (or `dvc repro`) with these params first") from None
    want = _flat(json.loads(json.dumps(cell_params(cfg, dataset, model, method), default=str)))
    have = _flat(made)
    for key in sorted(set(want) | set(have)):
        if want.get(key, "<unset>") != have.get(key, "<unset>"):
            raise ConfigError(
                f"{folder} was made with {key}={have.get(key, '<unset>')!r} but the params say "
                f"{want.get(key, '<unset>')!r}: run `cose explain` (or `dvc repro`) with these "
                "params first, or compile with the params that made it")


def quiet() -> bool:
    return runtime.current().quiet


def data_dir(cfg: Config, dataset: str) -> Path:
    path = Path(cfg.data.root) / dataset
    if not (path / "manifest.csv").exists():
        raise ConfigError(
            f"datasets: {dataset!r} has no data at {path}/manifest.csv; "
            f"run `cose data fetch {dataset}` (or `dvc pull`) first"
        )
    return path


def num_classes(cfg: Config, dataset: str) -> int:
    classes = (data_dir(cfg, dataset) / "classes.txt").read_text().splitlines()
    return len([c for c in classes if c.strip()])


def selection(cfg: Config, dataset: str, model: str, method: str):
    """The test images (and, for ``explain.selection: reference``, the drawn magnitudes) of one
    (dataset, model, method): :mod:`cose.selection`."""
    return _selection(cfg.data.root, dataset, model, cfg.explain.selection,
                      cfg.explain.images_for(method), cfg.explain.seed, cfg.explain.magnitudes,
                      tuple(cfg.explain.reference_models or cfg.models))


@functools.lru_cache(maxsize=64)
def _selection(root: str, dataset: str, model: str, rule: str, images: int, seed: int,
               count: int, order: tuple[str, ...]):
    from cose import data, models
    from cose.selection import Selection, reference_stream, shared_subset

    n = data.split_size(dataset, root, "test")
    if rule == "shared":
        return Selection(shared_subset(n, images, seed))
    size = models.preprocess(model).crop
    return reference_stream(n, order, images, count=count, seed=seed, size=size)[model]


def image_digests(cfg: Config, dataset: str, test_idx) -> dict[int, tuple[str, int]]:
    """(manifest sha256, label) of each test image (by test-split index), the sha256 checked
    against the file's bytes: a changed or corrupted image is a one-line error naming it,
    never numbers from other data."""
    from cose import data

    folder = data.dataset_dir(dataset, cfg.data.root)
    rows = data.split_rows(dataset, cfg.data.root, "test")
    return {int(i): (_checked_digest(folder, dataset, rows[i]), int(rows[i]["label"]))
            for i in test_idx}


def _checked_digest(folder: Path, dataset: str, row: dict[str, str]) -> str:
    """The sha256 of one manifest row's file, checked against the manifest: a missing,
    changed or linked-out file is a one-line error naming it."""
    from cose import data
    from cose.io import sha256_file_cached

    path = data.image_path(folder, row["path"])
    if not path.is_file():
        raise FileNotFoundError(f"{path}: listed in {folder / 'manifest.csv'} but missing; "
                                f"re-fetch the dataset (`cose data fetch {dataset} --force`) or "
                                "`dvc pull` it")
    digest = sha256_file_cached(path)
    if row.get("sha256") and digest != row["sha256"]:
        raise ValueError(f"{path}: its bytes differ from the sha256 in "
                         f"{folder / 'manifest.csv'} (changed or corrupted after it was "
                         f"written); re-fetch the dataset (`cose data fetch {dataset} --force`) "
                         "or `dvc pull` it")
    return row.get("sha256") or digest


def check_images(cfg: Config, dataset: str, splits: tuple[str, ...]) -> int:
    """Every image of ``splits`` checked against the manifest's sha256 (as explain checks its
    test images), before training reads one; returns how many."""
    from cose import data

    folder = data.dataset_dir(dataset, cfg.data.root)
    rows = [r for r in data.read_rows(folder) if r["split"] in splits]
    for row in rows:
        _checked_digest(folder, dataset, row)
    return len(rows)


def explain_subset(cfg: Config, dataset: str, model: str) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Every test image any method explains on (dataset, model) (REFERENCE.md step 1): with
    ``explain.selection: shared`` the first `explain.images` of a seeded permutation.

    Returns images in [0,1] at the model's input size, labels, and their test-split indices.
    """
    from cose import data, models

    order = list(dict.fromkeys(
        i for method in cfg.methods for i in selection(cfg, dataset, model, method).test_idx))
    # only the chosen images are decoded (a test split at 224 px can be several GB)
    images, labels = data.load_split(dataset, cfg.data.root, "test", models.preprocess(model),
                                     indices=order)
    return images, labels, order


def device() -> torch.device:
    """`COSE_DEVICE` (cpu, cuda, cuda:N), else CUDA when present: an env choice, not a param."""
    return runtime.current().torch_device()


def setup_logging(level: str | None = None) -> None:
    level = (level or runtime.current().log_level).upper()
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
