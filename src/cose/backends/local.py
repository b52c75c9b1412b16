"""Run units one after another in this process (models stay loaded between units)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any


class LocalExecutor:
    name = "local"

    def run(
        self, fn: Callable[..., dict[str, Any]], units: list[Any], cfg: dict[str, Any]
    ) -> Iterator[dict[str, Any]]:
        for unit in units:
            yield fn(unit, cfg)
