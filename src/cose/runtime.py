"""The process's environment choices, read in one place: every ``COSE_*`` variable.

They choose where and how work runs, never what it computes, so none is a param and switching
one keeps DVC's cache and every shard. :data:`SETTINGS` lists them, with their values and
what they set; :func:`table` renders it (docs/environment.md holds that table, a test keeps
the two equal).

:func:`current` reads them (from ``os.environ``, each call: tests and a CLI flag may set
them) into a typed :class:`Runtime`; a bad value is a one-line ValueError naming the
variable. :func:`worker_env` is what a Ray actor on another node gets.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Runtime", "SETTINGS", "current", "worker_env", "set_quiet", "table"]


def _choice(name: str, allowed: tuple[str, ...]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in allowed:
            raise ValueError(f"{name}: got {raw!r}, expected one of {', '.join(allowed)}")
        return value
    return parse


def _prefetch(raw: str) -> str:
    value = raw.strip().lower()
    table = {"": "auto", "auto": "auto", "1": "on", "true": "on", "yes": "on", "on": "on",
             "0": "off", "false": "off", "no": "off", "off": "off"}
    if value not in table:
        raise ValueError(f"COSE_PREFETCH: got {raw!r}, expected 1, 0 or auto")
    return table[value]


def _streams(raw: str) -> int | str:
    value = raw.strip().lower() or "auto"
    if value == "auto":
        return value
    try:
        return _positive("COSE_STREAMS")(value)
    except ValueError:
        raise ValueError(f"COSE_STREAMS: got {raw!r}, expected auto or an integer >= 1") from None


def _seconds(raw: str) -> float:
    try:
        value = float(raw.strip() or "0")
    except ValueError:
        value = -1.0
    if value < 0:
        raise ValueError(f"COSE_LOCK_WAIT: got {raw!r}, expected seconds >= 0")
    return value


def _positive(name: str) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            value = 0
        if value < 1:
            raise ValueError(f"{name}: got {raw!r}, expected an integer >= 1")
        return value
    return parse


@dataclass(frozen=True)
class Setting:
    field: str
    parse: Callable[[str], Any]
    default: Any
    values: str  # the values it takes (its default)
    help: str  # what it sets


SETTINGS: dict[str, Setting] = {
    "COSE_DEVICE": Setting(
        "device", str.strip, None,
        '`cpu`, `cuda`, `cuda:N`, `mps` (CUDA when present, else CPU)',
        'the torch device of train and explain'),
    "COSE_BACKEND": Setting(
        "backend", _choice("COSE_BACKEND", ("local", "ray")), "local",
        '`local`, `ray` (`local`)',
        'the executor of explain units (`--backend` wins)'),
    "COSE_PREFETCH": Setting(
        "prefetch", _prefetch, "auto",
        '`auto`, `1`, `0` (`auto`: on with CUDA)',
        'load the next (dataset, model) in the background'),
    "COSE_STREAMS": Setting(
        "streams", _streams, "auto",
        '`auto`, an integer >= 1 (`auto`: up to 4 on CUDA, as memory allows; 1 elsewhere)',
        "a unit's model variants (random-init, checkpoints) mapped at once, each on its own "
        'CUDA stream'),
    "COSE_LOCK_WAIT": Setting(
        "lock_wait", _seconds, 0.0,
        'seconds (`0`)',
        'how long a second writer of an output tree waits for the lock'),
    "COSE_QUIET": Setting(
        "quiet_flag", bool, False,
        'any non-empty value (unset)',
        'no progress bars (also under `CI=true` or without a terminal)'),
    "COSE_LOG_LEVEL": Setting(
        "log_level", lambda r: _choice("COSE_LOG_LEVEL", ("debug", "info", "warning", "error"))(r).upper(), "INFO",
        '`DEBUG`, `INFO`, `WARNING` (`INFO`)',
        'the log level (`--log-level` wins)'),
    "COSE_DEBUG": Setting(
        "debug", bool, False,
        'any non-empty value (unset)',
        'errors with their traceback, as `--log-level DEBUG`'),
    "COSE_PROJECT_ROOT": Setting(
        "project_root", lambda r: Path(r).resolve(), None,
        'a folder (the working directory)',
        'where mlruns/ and the tracking journal live'),
    "COSE_RAY_CPUS": Setting(
        "ray_cpus", _positive("COSE_RAY_CPUS"), None,
        'an integer >= 1 (all)',
        'CPUs of a local Ray cluster'),
    "COSE_RAY_WORKERS": Setting(
        "ray_workers", _positive("COSE_RAY_WORKERS"), None,
        'an integer >= 1 (one per GPU, else per CPU)',
        'Ray actors'),
    "COSE_RAY_THREADS": Setting(
        "ray_threads", _positive("COSE_RAY_THREADS"), None,
        'an integer >= 1 (CPUs / actors)',
        'torch threads per Ray actor'),
}


@dataclass(frozen=True)
class Runtime:
    device: str | None = None
    backend: str = "local"
    prefetch: str = "auto"
    streams: int | str = "auto"
    lock_wait: float = 0.0
    quiet_flag: bool = False
    ci: bool = False
    log_level: str = "INFO"
    debug: bool = False
    project_root: Path | None = None
    ray_cpus: int | None = None
    ray_workers: int | None = None
    ray_threads: int | None = None

    @property
    def quiet(self) -> bool:
        """No progress output: COSE_QUIET, CI=true, or stderr is not a terminal."""
        return self.quiet_flag or self.ci or not sys.stderr.isatty()

    def root(self) -> Path:
        return self.project_root or Path.cwd().resolve()

    def torch_device(self):
        """COSE_DEVICE, else CUDA when present (a torch.device; imports torch)."""
        import torch

        if self.device:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def prefetch_on(self, device_type: str) -> bool:
        """COSE_PREFETCH: on, off, or auto (on a GPU only: on the CPU the background load
        would take cores from the compute)."""
        return device_type == "cuda" if self.prefetch == "auto" else self.prefetch == "on"


def current(env: Mapping[str, str] | None = None) -> Runtime:
    """The settings of ``env`` (default: the process's environment), parsed and checked."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for name, setting in SETTINGS.items():
        raw = env.get(name)
        values[setting.field] = setting.default if raw in (None, "") else setting.parse(raw)
    values["ci"] = env.get("CI", "").lower() in ("1", "true", "yes")
    return Runtime(**values)


def worker_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The ``COSE_*`` variables as set here, for a worker on another node."""
    env = os.environ if env is None else env
    return {k: v for k, v in env.items() if k in SETTINGS}


def set_quiet() -> None:
    """``cose --quiet``: no progress output in this process and its workers."""
    os.environ["COSE_QUIET"] = "1"
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # MLflow's own INFO lines


def table() -> str:
    """The settings as a Markdown table (docs/configuration.md holds a copy; a test compares)."""
    lines = ["| variable | values (default) | what it sets |", "|---|---|---|"]
    lines += [f"| `{name}` | {s.values} | {s.help} |" for name, s in SETTINGS.items()]
    return "\n".join(lines) + "\n"
