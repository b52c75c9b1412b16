"""Run units on a Ray cluster: one actor per worker slot, models loaded once per actor.

`RAY_ADDRESS` selects an existing cluster (e.g. `ray://head:10001` or `auto`); otherwise a
local one is started on loopback with `COSE_RAY_CPUS` CPUs (default: all). When the cluster
has GPUs (and `COSE_DEVICE` is not `cpu`) each actor requests one, so one node with N GPUs
runs N actors. `COSE_RAY_WORKERS` caps the number of actors; each uses CPUs/actors torch
threads (`COSE_RAY_THREADS` overrides). Actors pull the next unit as soon as they finish one,
and keep their data and models loaded between units of the same (dataset, model). Workers read data and checkpoints and write shards under the project root,
so a multi-node cluster needs the project on a shared filesystem at the same path (see
docs/scale-out.md). The driver's `COSE_*` variables are passed to every actor. Only the driver
talks to MLflow.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cose import runtime


class RayExecutor:
    name = "ray"

    def __init__(self, workers: int | None = None) -> None:
        try:
            import ray  # noqa: F401
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise RuntimeError(
                "backend 'ray' needs Ray: pip install -e '.[ray]'"
            ) from exc
        self.workers = workers or runtime.current().ray_workers  # a bad value fails here
        self._started = False

    def _init(self) -> None:
        import ray

        if ray.is_initialized():
            return
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=False)
            return
        ray.init(num_cpus=runtime.current().ray_cpus, include_dashboard=False,
                 log_to_driver=False, _node_ip_address="127.0.0.1")
        self._started = True

    def run(
        self, fn: Callable[..., dict[str, Any]], units: list[Any], cfg: dict[str, Any]
    ) -> Iterator[dict[str, Any]]:
        if not units:
            return
        import ray

        self._init()
        resources = ray.cluster_resources()
        rt = runtime.current()
        use_gpu = not (rt.device or "").startswith("cpu")
        gpus = int(resources.get("GPU", 0)) if use_gpu else 0
        cpus = max(1, int(resources.get("CPU", 1)))
        slots = gpus if gpus else cpus
        n = max(1, min(self.workers or slots, slots, len(units)))
        root = str(Path.cwd().resolve())
        share = max(1, cpus // n)  # CPUs each actor reserves (without GPUs)
        threads = rt.ray_threads or share
        env = runtime.worker_env()  # the driver's COSE_* settings, for actors on any node
        if gpus and env.get("COSE_DEVICE", "").startswith("cuda:"):
            env["COSE_DEVICE"] = "cuda"  # Ray sets CUDA_VISIBLE_DEVICES to the actor's GPU

        @ray.remote(num_gpus=1 if gpus else 0, num_cpus=0 if gpus else share,
                    max_restarts=0)
        class UnitWorker:
            def __init__(self, threads: int, env: dict[str, str]) -> None:
                import torch

                os.environ.update(env)
                torch.set_num_threads(threads)
                os.chdir(root)

            def run(self, unit: Any, cfg: dict[str, Any]) -> dict[str, Any]:
                return fn(unit, cfg, root)

        actors = [UnitWorker.remote(threads, env) for _ in range(n)]
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
            if self._started:  # a cluster this executor started ends with the run
                ray.shutdown()
                self._started = False
