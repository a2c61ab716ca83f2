"""The nezha package imports in layers: no module imports (at its top or inside a function) a module that
imports it back, directly or through others."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

NEZHA = Path(__file__).resolve().parents[1] / "nezha"


def module_files(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of `package` (a package is named by its __init__)."""
    modules = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `name` imports anywhere in its file (functions included), each with the
    packages above it, since importing `a.b.c` runs `a/b/__init__.py` first."""
    root = next(iter(modules)).split(".")[0]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            # `from a.b import c` imports a.b, and a.b.c too when c is a module
            targets.update([module, *(f"{module}.{alias.name}" for alias in node.names)])
    found = set()
    for target in targets:
        parts = target.split(".")
        if parts[0] != root:
            continue
        for end in range(1, len(parts) + 1):
            prefix = ".".join(parts[:end])
            if prefix in modules and prefix != name and not name.startswith(prefix + "."):
                found.add(prefix)
    return found


def import_cycles(package: Path) -> list[list[str]]:
    """The import cycles a depth-first walk of `package`'s modules meets, each as the path that closes it
    (none exactly when its imports form layers)."""
    modules = module_files(package)
    graph = {name: imported_modules(name, path, modules) for name, path in modules.items()}
    cycles, done = [], set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycles.append([*path[path.index(name):], name])
            return
        if name in done:
            return
        for target in sorted(graph[name]):
            visit(target, [*path, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
    return cycles


def test_nezha_has_no_import_cycle_even_through_imports_inside_functions() -> None:
    assert import_cycles(NEZHA) == []


def test_a_cycle_closed_by_an_import_inside_a_function_is_found(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.sub.b import f\n")
    (package / "sub" / "b.py").write_text("def f():\n    from pkg import a\n")
    (package / "c.py").write_text("from . import a\n")
    assert import_cycles(package) == [["pkg.a", "pkg.sub.b", "pkg.a"]]


def test_reading_prepared_data_and_quantizers_imports_no_kmeans_or_embedding_library() -> None:
    heavy = ("faiss", "sklearn", "sentence_transformers")
    code = ("import sys; import nezha.prepared, nezha.semantic_ids, nezha.live_catalog; "
            f"print(','.join(m for m in {heavy!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""
