"""validate: great-expectations suites over each dataset's manifest and files."""

from __future__ import annotations

import json
import logging

from cose.config import Config
from cose.io import atomic_write_text
from cose.stages import common

log = logging.getLogger("cose.validate")

OUT = common.Path("outputs") / "validation"


def run(cfg: Config) -> None:
    from cose.data.validate import validate_dataset

    failed = []
    for dataset in cfg.datasets:
        report = validate_dataset(common.data_dir(cfg, dataset))
        OUT.mkdir(parents=True, exist_ok=True)
        atomic_write_text(OUT / f"{dataset}.md", report.to_markdown())
        atomic_write_text(OUT / f"{dataset}.json",
                          json.dumps({"dataset": dataset, "ok": report.ok,
                                      "failures": [str(f) for f in report.failures]}, indent=2))
        log.info("validate %s: %s", dataset, "ok" if report.ok else "FAILED")
        if not report.ok:
            failed.append((dataset, report))
    if failed:
        text = "\n\n".join(r.to_markdown() for _, r in failed)
        raise ValueError(f"dataset validation failed for {', '.join(d for d, _ in failed)}:\n{text}")
