"""Import rules between ecfs's layers and its third-party dependencies.

Each dependency that ties code to one concern is imported by one module only
(see STYLE.md and ecfs/__init__.py), so that, e.g., nothing below the FUSE
adapter knows pyfuse3 and all SQL lives in metadb. The rules are checked on
the source with `ast` (no import is executed), TYPE_CHECKING blocks included.
Modules that do not exist yet are simply not checked.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "ecfs"

# third-party module -> the ecfs files (or directories, ending in "/") that may
# import it, relative to the repository root.
ALLOWED_IMPORTERS: dict[str, tuple[str, ...]] = {
    "pyfuse3": ("ecfs/fs.py", "ecfs/mount.py"),
    "click": ("ecfs/cli.py",),
    "zfec": ("ecfs/codec.py",),
    "xxhash": ("ecfs/fragment.py",),
    "sqlite3": ("ecfs/metadb.py", "ecfs/metadb/", "ecfs/replicas.py"),
    "obstore": ("ecfs/s3store.py",),
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


def test_package_exists() -> None:
    assert (PACKAGE_DIR / "__init__.py").is_file()


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
    assert may_import("ecfs/namespace.py", module) == allowed
