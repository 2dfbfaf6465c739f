"""Import rules between ecfs's modules and its third-party dependencies.

* Each dependency that ties code to one concern is imported by one module
  only (see STYLE.md and ecfs/__init__.py), so that, e.g., nothing below the
  FUSE adapter knows pyfuse3 and all SQL lives in metadb.
* The packages are layers, bottom to top: core, storage, data, volume,
  frontend. A module imports only modules of its own package and of the
  packages below it, and every module lives in one of them (only the
  top-level `ecfs` with the version and `ecfs.__main__` do not).
* No import cycle among ecfs modules: a module never needs, even for type
  hints only, a module that needs it.
* Only ecfs/storage/offload.py, the one helper for blocking calls, uses
  `trio.to_thread`.

The rules are checked on the source with `ast` (no import is executed),
TYPE_CHECKING blocks included; each checker is also run on a small
synthetic violation, so that a checker that finds nothing cannot pass.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "ecfs"

# third-party module -> the ecfs files (or directories, ending in "/") that may
# import it, relative to the repository root.
ALLOWED_IMPORTERS: dict[str, tuple[str, ...]] = {
    "pyfuse3": ("ecfs/frontend/fs.py", "ecfs/frontend/mount.py"),
    "click": ("ecfs/frontend/cli.py",),
    "zfec": ("ecfs/core/codec.py",),
    "xxhash": ("ecfs/core/fragment.py",),
    "sqlite3": ("ecfs/storage/metadb/", "ecfs/storage/replicas.py"),
    "prometheus_client": ("ecfs/frontend/metrics.py",),
    "rich": ("ecfs/frontend/render.py", "ecfs/frontend/iostat.py"),  # iostat: the live table
    "obstore": ("ecfs/storage/s3store.py",),
}

MODULE_FILES = sorted(PACKAGE_DIR.rglob("*.py"))


def rel(path: Path) -> str:
    return path.relative_to(PACKAGE_DIR.parent).as_posix()


def imported_modules(tree: ast.AST) -> set[tuple[str, int]]:
    """(top-level module name, line) of every absolute import in `tree`,
    including `importlib.import_module("x")` and `__import__("x")` on literals."""
    found: set[tuple[str, int]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update((alias.name.split(".")[0], node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add((node.module.split(".")[0], node.lineno))
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                (isinstance(node.func, ast.Name) and node.func.id == "__import__")
                or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
            )
        ):
            found.add((node.args[0].value.split(".")[0], node.lineno))
    return found


def may_import(path: str, module: str) -> bool:
    allowed = ALLOWED_IMPORTERS.get(module)
    if allowed is None:
        return True
    return any(path == a or (a.endswith("/") and path.startswith(a)) for a in allowed)


@pytest.mark.parametrize("path", MODULE_FILES, ids=[rel(p) for p in MODULE_FILES])
def test_restricted_imports(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    violations = [
        f"{rel(path)}:{line}: imports {module}, which only "
        f"{', '.join(ALLOWED_IMPORTERS[module])} may import"
        for module, line in sorted(imported_modules(tree))
        if not may_import(rel(path), module)
    ]
    assert not violations, "\n".join(violations)


@pytest.mark.parametrize(
    ("source", "module", "allowed"),
    [
        ("import pyfuse3", "pyfuse3", False),
        ("from zfec import Encoder", "zfec", False),
        ("import xxhash.xxh3 as x", "xxhash", False),
        ("import importlib\nimportlib.import_module('click')", "click", False),
        ("from . import codec", "codec", True),
        ("import os.path", "os", True),
    ],
)
def test_rule_checker_sees_imports(source: str, module: str, allowed: bool) -> None:
    """The checker itself: it finds each spelling of an import."""
    modules = {name for name, _ in imported_modules(ast.parse(source))}
    found = module in modules
    assert found != (module == "codec")  # relative imports are ours, not third-party
    assert may_import("ecfs/data/namespace.py", module) == allowed


# --- no import cycle among ecfs modules ---------------------------------------------


def module_name(path: Path) -> str:
    """ecfs/storage/metadb/chunks.py -> ecfs.storage.metadb.chunks; a package's __init__ -> the package."""
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def ecfs_imports(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The ecfs modules `module` imports (relative imports resolved; for
    `from X import name`, X.name when that is a module, else X)."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                found.add(submodule if submodule in known else source)
    return {name for name in found if name in known and name != module}


def import_graph() -> dict[str, set[str]]:
    known = {module_name(p) for p in MODULE_FILES}
    return {
        module_name(path): ecfs_imports(
            ast.parse(path.read_text(encoding="utf-8"), filename=str(path)),
            module_name(path),
            path.name == "__init__.py",
            known,
        )
        for path in MODULE_FILES
    }


def find_cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (or a
    module importing itself), each as a sorted list (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(cycles)


def test_no_import_cycle_among_ecfs_modules() -> None:
    graph = import_graph()
    # the graph is real
    assert "ecfs.volume.status" in graph["ecfs.volume.assembly"]
    cycles = find_cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_cycle_checker_finds_a_cycle() -> None:
    """The checker itself, on a synthetic graph with the two cycles ecfs used
    to have (volume -> control -> volume, volume -> store_admin -> volume),
    one through TYPE_CHECKING and a relative `from . import` spelling."""
    sources = {
        "ecfs.volume.assembly": "from . import control\nfrom .store_admin import StoreAdmin\nimport ecfs.core.codec",
        "ecfs.volume.control": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .assembly import Volume",
        "ecfs.volume.store_admin": "from ecfs.volume.assembly import Volume",
        "ecfs.core.codec": "import zfec",
        "ecfs.storage.metadb": "from . import chunks",
        "ecfs.storage.metadb.chunks": "from ...core.codec import Codec",
    }  # fmt: skip
    known = set(sources)
    graph = {
        name: ecfs_imports(ast.parse(text), name, name == "ecfs.storage.metadb", known)
        for name, text in sources.items()
    }
    assert graph["ecfs.storage.metadb"] == {"ecfs.storage.metadb.chunks"}
    assert graph["ecfs.storage.metadb.chunks"] == {"ecfs.core.codec"}
    assert find_cycles(graph) == [
        ["ecfs.volume.assembly", "ecfs.volume.control", "ecfs.volume.store_admin"]
    ]
    del graph["ecfs.volume.control"]
    graph["ecfs.volume.store_admin"] = set()
    assert find_cycles(graph) == []
    assert find_cycles({"a": {"a"}}) == [["a"]]


# --- packages are layers -------------------------------------------------------------

#: The layer packages, bottom first.
LAYERS = ("core", "storage", "data", "volume", "frontend")
#: Modules outside the layers: the version (anyone may import it) and `python -m ecfs`.
OUTSIDE_LAYERS = {"ecfs", "ecfs.__main__"}


def layer_of(module: str) -> int | None:
    """The position of `module`'s layer package in LAYERS; None outside them."""
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def layer_violations(graph: Mapping[str, set[str]]) -> list[str]:
    """Imports that go up (or out of) the layers, and modules in no layer."""
    found = []
    for module, targets in sorted(graph.items()):
        if module in OUTSIDE_LAYERS:
            continue
        mine = layer_of(module)
        if mine is None:
            found.append(f"{module} is in no layer package")
            continue
        for target in sorted(targets):
            theirs = layer_of(target)
            if target != "ecfs" and (theirs is None or theirs > mine):
                found.append(f"{module} imports {target}")
    return found


def test_packages_are_layers() -> None:
    graph = import_graph()
    assert {layer_of(m) for m in graph} - {None} == set(range(len(LAYERS)))  # every layer is real
    violations = layer_violations(graph)
    assert not violations, "imports against the layers: " + "; ".join(violations)


def test_layer_checker_finds_violations() -> None:
    graph = {
        "ecfs.storage.store": {"ecfs.core.errors", "ecfs.data.reader", "ecfs"},
        "ecfs.data.reader": {"ecfs.storage.store", "ecfs.data.writer"},
        "ecfs.data.writer": set(),
        "ecfs.frontend.cli": {"ecfs.volume.assembly", "ecfs.__main__"},
        "ecfs.core.errors": set(),
        "ecfs.stray": set(),
        "ecfs.__main__": {"ecfs.frontend.cli"},
    }
    assert layer_violations(graph) == [
        "ecfs.frontend.cli imports ecfs.__main__",
        "ecfs.storage.store imports ecfs.data.reader",
        "ecfs.stray is in no layer package",
    ]


# --- only offload runs code in threads --------------------------------------------

THREAD_HELPER = "ecfs/storage/offload.py"


def to_thread_uses(tree: ast.AST) -> list[int]:
    """Lines that use trio.to_thread (attribute, from-import or import)."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "to_thread":
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and (
            (node.module == "trio" and any(a.name == "to_thread" for a in node.names))
            or (node.module or "").startswith("trio.to_thread")
        ):
            lines.append(node.lineno)
        elif isinstance(node, ast.Import) and any(
            a.name.startswith("trio.to_thread") for a in node.names
        ):
            lines.append(node.lineno)
    return sorted(lines)


def test_only_offload_uses_to_thread() -> None:
    uses = [
        f"{rel(path)}:{line}"
        for path in MODULE_FILES
        if rel(path) != THREAD_HELPER
        for line in to_thread_uses(ast.parse(path.read_text(encoding="utf-8")))
    ]
    assert not uses, "trio.to_thread outside offload (use the offload helper): " + ", ".join(uses)


@pytest.mark.parametrize(
    ("source", "found"),
    [
        ("import trio\nawait trio.to_thread.run_sync(f)", True),
        ("from trio import to_thread", True),
        ("from trio.to_thread import run_sync", True),
        ("import trio.to_thread", True),
        ("import trio\nawait trio.sleep(0)", False),
        ("from .offload import run_blocking", False),
    ],
)
def test_thread_checker_sees_to_thread(source: str, found: bool) -> None:
    """The checker itself: it finds each spelling of trio.to_thread."""
    tree = ast.parse(source.replace("await ", ""))
    assert bool(to_thread_uses(tree)) == found
