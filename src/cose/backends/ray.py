"""Run units on a Ray cluster: one actor per worker slot, models loaded once per actor.

`RAY_ADDRESS` selects an existing cluster (e.g. `ray://head:10001` or `auto`); otherwise a
local one is started with `COSE_RAY_CPUS` CPUs (default: all). When the cluster has GPUs each
actor requests one. Workers read data and checkpoints and write shards under the project root,
so a multi-node cluster needs the project on a shared filesystem at the same path (see
docs/scale-out.md). Only the driver talks to MLflow.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


class RayExecutor:
    name = "ray"

    def __init__(self, workers: int | None = None) -> None:
        try:
            import ray  # noqa: F401
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise RuntimeError(
                "backend 'ray' needs Ray: pip install -e '.[ray]'"
            ) from exc
        self.workers = workers or (int(os.environ["COSE_RAY_WORKERS"])
                                   if os.environ.get("COSE_RAY_WORKERS") else None)

    def _init(self) -> None:
        import ray

        if ray.is_initialized():
            return
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            cpus = os.environ.get("COSE_RAY_CPUS")
            ray.init(num_cpus=int(cpus) if cpus else None, include_dashboard=False,
                     log_to_driver=False)

    def run(
        self, fn: Callable[..., dict[str, Any]], units: list[Any], cfg: dict[str, Any]
    ) -> Iterator[dict[str, Any]]:
        if not units:
            return
        import ray

        self._init()
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        cpus = max(1, int(resources.get("CPU", 1)))
        slots = gpus if gpus else cpus
        n = max(1, min(self.workers or slots, slots, len(units)))
        root = str(Path.cwd().resolve())
        threads = max(1, cpus // n)

        @ray.remote(num_gpus=1 if gpus else 0, num_cpus=0 if gpus else threads)
        class UnitWorker:
            def __init__(self, threads: int) -> None:
                import torch

                torch.set_num_threads(threads)
                os.chdir(root)

            def run(self, unit: Any, cfg: dict[str, Any]) -> dict[str, Any]:
                return fn(unit, cfg, root)

        actors = [UnitWorker.remote(threads) for _ in range(n)]
        pending: dict[Any, Any] = {}
        queue = list(units)
        free = list(actors)
        try:
            while queue or pending:
                while queue and free:
                    actor = free.pop()
                    pending[actor.run.remote(queue.pop(0), cfg)] = actor
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    free.append(pending.pop(ref))
                    yield ray.get(ref)
        finally:
            for actor in actors:
                ray.kill(actor)
