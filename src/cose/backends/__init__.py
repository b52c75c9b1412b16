"""Executors for explain work units: `local` (default) and `ray`.

The backend is a CLI/env choice (`--backend`, `COSE_BACKEND`), never a param, so switching it
does not invalidate DVC's cache.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

BACKENDS = ("local", "ray")


class Executor(Protocol):
    name: str

    def run(
        self, fn: Callable[..., dict[str, Any]], units: list[Any], cfg: dict[str, Any]
    ) -> Iterator[dict[str, Any]]: ...


def get(name: str | None = None) -> Executor:
    from cose import runtime

    name = name or runtime.current().backend
    if name == "local":
        from cose.backends.local import LocalExecutor

        return LocalExecutor()
    if name == "ray":
        from cose.backends.ray import RayExecutor

        return RayExecutor()
    raise ValueError(f"backend: unknown value {name!r}; allowed: {', '.join(BACKENDS)}")
