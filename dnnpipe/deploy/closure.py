"""Which of the package's files a board needs: the import closure of the stage runtime, computed from the code.

Every import counts, function-local ones too, so the closure is never smaller than what a run can load;
a test checks that a fresh interpreter running a stage loads nothing outside it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "dnnpipe"
DEVICE_ENTRY = "dnnpipe.runtime.command"  # what runtime_engine.py imports


def module_file(root: Path, module: str) -> Path | None:
    """dnnpipe.a.b -> root/dnnpipe/a/b.py or root/dnnpipe/a/b/__init__.py, when it exists."""
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(root: Path, module: str, path: Path) -> set[str]:
    """The package modules `module` names in any import statement, resolved to existing modules."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return {m for m in found if (m == PACKAGE or m.startswith(PACKAGE + ".")) and module_file(root, m)}


def closure(root: Path, entry: str = DEVICE_ENTRY) -> list[str]:
    """Every package module the entry module may import, and the packages containing them, sorted."""
    seen: set[str] = set()
    todo = [entry]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # importing a.b runs a/__init__.py
        path = module_file(root, module)
        if path is not None:
            todo += sorted(_imports(root, module, path) - seen)
    return sorted(seen)


def device_files(root: Path, entry: str = DEVICE_ENTRY) -> list[Path]:
    """The closure's files, relative to root (the folder holding the package)."""
    files = [module_file(root, m) for m in closure(root, entry)]
    return [f.relative_to(root) for f in files if f is not None]
