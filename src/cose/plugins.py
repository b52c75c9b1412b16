"""Plugins: your own saliency methods, models and datasets, known to every stage.

Two ways in, both loaded before params are checked (by every `cose` command, and by each
explain worker before its first unit):

- Python files in the project's ``plugins/`` folder (``plugins/*.py``, files starting with
  ``_`` skipped), imported in name order. ``plugins/`` is a DVC dependency of train, explain
  and compile: editing a plugin reruns what it may affect (the explain shards of a method or
  model whose code lives in a plugin also fingerprint that code, so other shards are reused).
- Installed packages, through the entry-point group ``cose.plugins``: the entry point names a
  module (importing it registers) or a callable (called with no arguments).

A plugin registers with ``cose.saliency.register`` (a method), ``cose.models.register`` (an
architecture factory, its preprocessing, CAM layer and classifier) and
``cose.data.register`` (an image folder or a Source). A plugin that fails to load stops the
command with one line naming the file and the error. See docs/plugins.md.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from importlib.metadata import entry_points
from pathlib import Path

FOLDER = "plugins"
GROUP = "cose.plugins"

_LOADED: dict[str, str] = {}  # what was loaded in this process: source -> module name


class PluginError(RuntimeError):
    """A plugin that cannot be loaded; the message names it."""


def plugin_files(root: str | Path | None = None) -> list[Path]:
    """The plugin files of the project at ``root`` (default: the working directory)."""
    folder = Path(root or Path.cwd()) / FOLDER
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.py") if not p.name.startswith("_"))


def load(root: str | Path | None = None, entry_point_group: str | None = GROUP) -> list[str]:
    """Import the project's plugin files and the installed ``cose.plugins`` entry points,
    each once per process; returns what was loaded now. PluginError names a broken one."""
    done = []
    for path in plugin_files(root):
        key = str(path.resolve())
        if key in _LOADED:
            continue
        name = f"cose_plugins.{path.stem}"
        try:
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 - any failure of a user's file
            sys.modules.pop(name, None)
            raise PluginError(f"plugin {path}: {type(exc).__name__}: {_first(exc)}") from exc
        _LOADED[key] = name
        done.append(str(path))
    if entry_point_group:
        for ep in entry_points(group=entry_point_group):
            key = f"entry-point:{ep.value}"
            if key in _LOADED:
                continue
            try:
                obj = ep.load()
                if callable(obj):
                    obj()
            except Exception as exc:  # noqa: BLE001
                raise PluginError(f"plugin {ep.name} ({ep.value}, entry point group "
                                  f"{entry_point_group}): {type(exc).__name__}: "
                                  f"{_first(exc)}") from exc
            _LOADED[key] = ep.value
            done.append(ep.value)
    return done


def source_files(*objects) -> list[Path]:
    """The source files of ``objects`` (a method's function, a model's factory) that lie
    outside the cose package: the plugin code a result depends on."""
    import inspect

    package = Path(__file__).resolve().parent
    out = []
    for obj in objects:
        if obj is None:
            continue
        try:
            path = Path(inspect.getsourcefile(inspect.unwrap(obj)) or "").resolve()
        except (TypeError, OSError):
            continue
        if path.is_file() and package not in path.parents:
            out.append(path)
    return sorted(set(out))


def _first(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
