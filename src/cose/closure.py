"""The import closure of cose modules: which source files a piece of the pipeline runs.

Read statically from the sources (every ``import``/``from ... import`` anywhere in a module,
function bodies included, so lazily imported modules count), following only ``cose``'s own
modules; a package brings its ``__init__.py`` and those of its parents. The explain shards'
fingerprint hashes the closure of the modules a unit's numbers flow through
(:data:`EXPLAIN_ROOTS`), and a test checks that every stage's ``dvc.yaml`` deps cover the
closure of its stage module, so a new module cannot be forgotten in either.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from collections.abc import Iterable
from pathlib import Path

PACKAGE = "cose"
SRC = Path(__file__).resolve().parent  # src/cose

#: what an explain unit's numbers depend on: the unit (engine: transforms, saliency,
#: similarity, precision), which images and magnitudes (selection, stages.common, data), and
#: the models (models); the stage driver and tracking are left out (they log, not compute)
EXPLAIN_ROOTS: tuple[str, ...] = (
    "cose.engine", "cose.runner", "cose.selection", "cose.stages.common", "cose.models",
    "cose.data",
)


def module_path(name: str) -> Path | None:
    """The source file of module ``name`` (``cose.x.y``): ``x/y.py`` or ``x/y/__init__.py``."""
    if name != PACKAGE and not name.startswith(PACKAGE + "."):
        return None
    rel = name.split(".")[1:]
    base = SRC.joinpath(*rel) if rel else SRC
    if base.is_dir() and (base / "__init__.py").is_file():
        return base / "__init__.py"
    file = base.with_suffix(".py")
    return file if rel and file.is_file() else None


def _package_of(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = [PACKAGE, *rel.parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@functools.cache
def imports_of(path: Path) -> frozenset[str]:
    """The cose modules ``path`` imports anywhere in its body."""
    tree = ast.parse(path.read_text(), filename=str(path))
    me = _package_of(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            # `from pkg import submodule` depends on the submodule; `from pkg import name`
            # on pkg itself (closure() adds the packages above every module it reaches)
            subs = {f"{mod}.{a.name}" for a in node.names}
            subs = {m for m in subs if module_path(m) is not None}
            found.update(subs)
            if len(subs) < len(node.names):
                found.add(mod)
    return frozenset(m for m in found if module_path(m) is not None)


def closure(roots: Iterable[str]) -> list[Path]:
    """Every source file the modules ``roots`` import, directly or not, sorted."""
    todo = list(roots)
    seen: set[Path] = set()
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for k in range(1, len(parts) + 1):  # the packages above load first
            path = module_path(".".join(parts[:k]))
            if path is None or path in seen:
                continue
            seen.add(path)
            todo.extend(imports_of(path))
    return sorted(seen)


def code_hash(roots: Iterable[str] = EXPLAIN_ROOTS) -> str:
    """sha256 over the closure's files (path and bytes)."""
    h = hashlib.sha256()
    for f in closure(roots):
        h.update(str(f.relative_to(SRC)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]
