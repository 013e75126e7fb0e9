"""The code keeps its shape: rules about where things may live, checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "distill4all"
STORE = SRC / "store"

_SQL_CALLS = {"execute", "executemany", "executescript", "backup"}


def _store_access(path: Path) -> list[str]:
    """file:line of each SQL call, sqlite3 import or `.db` connection access in one file."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _SQL_CALLS:
            found.append((node.lineno, f".{node.func.attr}(…)"))
        elif isinstance(node, ast.Import) and any(a.name.split(".")[0] == "sqlite3" for a in node.names):
            found.append((node.lineno, "import sqlite3"))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "sqlite3":
            found.append((node.lineno, "from sqlite3 import …"))
        elif isinstance(node, ast.Attribute) and node.attr == "db":
            found.append((node.lineno, ".db"))
    where = path.relative_to(SRC.parent)
    return [f"{where}:{line}: {what}" for line, what in sorted(found)]


def test_sql_lives_only_in_the_store_package() -> None:
    """Every query goes through distill4all.store's table modules, so the schema has one owner."""
    files = sorted(p for p in SRC.rglob("*.py") if not p.is_relative_to(STORE))
    assert files, f"no sources under {SRC}"
    found = [hit for p in files for hit in _store_access(p)]
    assert not found, "SQL outside src/distill4all/store/:\n" + "\n".join(found)


STAGES = ("collect", "curate", "train", "export", "evaluate", "report")
SHARED = (
    "teacher",
    "store",
    "runtime",
    "models",
    "config",
    "errors",
    "run",
    "layout",
    "records",
    "atomic",
    "evalset",
    "redact",
)


def _imported_packages(path: Path) -> list[tuple[int, str]]:
    """(line, first package under distill4all) of every import in a file, nested ones included."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] if node.module != "distill4all" else [f"distill4all.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "distill4all" and len(parts) > 1:
                found.append((node.lineno, parts[1]))
    return found


def _owner(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def test_no_stage_imports_another_stage_and_shared_packages_import_no_stage() -> None:
    arrows = []
    for path in sorted(SRC.rglob("*.py")):
        owner = _owner(path)
        if owner not in STAGES and owner not in SHARED:
            continue  # cli, __init__, __main__, reproduce: the top, which may call any stage
        for line, package in _imported_packages(path):
            if package in STAGES and package != owner:
                arrows.append(f"{path.relative_to(SRC.parent)}:{line}: {owner} imports {package}")
    assert not arrows, "\n".join(arrows)
    assert {_owner(p) for p in SRC.rglob("*.py")} <= {*STAGES, *SHARED, "cli", "__init__", "__main__", "reproduce"}
