"""train: per (dataset, model), fit the classifier and save the checkpoints COSE needs.

Writes checkpoints/<dataset>/<model>/: epoch_NNN.pt (intermediate epochs, for the mid-training
sensitivity), final.pt, random.pt (the seeded random-init model) and metrics.json.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import torch

from cose import models
from cose.config import Config
from cose.io import atomic_write_text
from cose.selection import shared_subset
from cose.stages import common
from cose.tracking import Journal

log = logging.getLogger("cose.train")


#: a split whose decoded images would take more than this is read lazily, batch by batch
#: (DataLoader workers: train.num_workers), instead of decoded into memory up front: CIFAR-10's
#: 50,000 training images at 224 px are 30 GB of float32. Both give the same batches.
IN_MEMORY_BYTES = 2 * 2**30


def load_training_split(
    cfg: Config, dataset: str, split: str, spec, keep: int | None = None
) -> tuple[torch.Tensor | torch.utils.data.Dataset, torch.Tensor | None]:
    """(images, labels) of a split for `training.fit`: tensors when they fit IN_MEMORY_BYTES,
    else (a lazily decoded Dataset, None). `keep`: a seeded random subset of that many."""
    from cose import data

    n = data.split_size(dataset, cfg.data.root, split)
    idx = None
    if keep is not None:
        idx = list(shared_subset(n, keep, cfg.seed))
    count = n if idx is None else len(idx)
    if count * 3 * spec.crop**2 * 4 <= IN_MEMORY_BYTES:  # decoded float32 [count,3,crop,crop]
        return data.load_split(dataset, cfg.data.root, split, spec, indices=idx)
    ds = data.ManifestDataset(dataset, cfg.data.root, split, spec)
    return (ds if idx is None else torch.utils.data.Subset(ds, idx)), None


def train_one(cfg: Config, dataset: str, model_name: str, journal: Journal) -> dict:
    from cose import training

    dev = common.device()
    nc = common.num_classes(cfg, dataset)
    spec = models.preprocess(model_name)
    recipe = cfg.train_for(model_name)
    common.check_images(cfg, dataset, ("train", "test"))  # the bytes the manifest names
    tr_x, tr_y = load_training_split(cfg, dataset, "train", spec, recipe.max_train_images)
    te_x, te_y = load_training_split(cfg, dataset, "test", spec)
    out = common.ckpt_dir(dataset, model_name)
    out.mkdir(parents=True, exist_ok=True)

    head = recipe.head
    random_model = models.create(model_name, nc, seed=cfg.seed + 1, head=head)
    training.save_weights(random_model, out / "random.pt")

    weights = cfg.train.weights.get(model_name)
    model = models.create(model_name, nc, weights=weights, seed=cfg.seed, head=head).to(dev)
    run = journal.run(f"{dataset}/{model_name}", f"train {dataset}/{model_name}")
    run.log_params({"dataset": dataset, "model": model_name, "num_classes": nc,
                    "train_images": len(tr_x), "test_images": len(te_x), "device": str(dev),
                    "weights": weights or "random-init"})
    run.log_params({k: v for k, v in dataclasses.asdict(recipe).items()
                    if k not in ("weights", "per_model")}, prefix="train.")

    def on_epoch(epoch: int, metrics: dict) -> None:
        run.log_metrics(metrics, step=epoch)
        log.info("%s/%s epoch %d: %s", dataset, model_name, epoch,
                 ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))

    history = training.fit(
        model, tr_x, tr_y, te_x, te_y, recipe,
        ckpt_dir=out, save_epochs=recipe.save_epochs, seed=cfg.seed,
        normalize_fn=lambda x: models.normalize(x, model_name),
        on_epoch=on_epoch, quiet=common.quiet(),
    )
    final = history[-1]
    metrics = {"train_accuracy": final.get("train_acc"), "test_accuracy": final.get("val_acc"),
               "epochs": recipe.epochs}
    run.log_metrics({k: v for k, v in metrics.items() if v is not None}).finish()
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True))
    return metrics


def run(cfg: Config) -> None:
    journal = Journal.for_config("train", cfg)  # the resolved params go on every run
    for dataset in cfg.datasets:
        for model_name in cfg.models:
            log.info("training %s on %s", model_name, dataset)
            with common.output_lock(f"train-{dataset}-{model_name}",
                                    str(common.ckpt_dir(dataset, model_name))):
                train_one(cfg, dataset, model_name, journal)  # its run holds its accuracy
    journal.flush()

