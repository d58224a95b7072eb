"""docs/architecture.md against the code: its import table and module list are what the import statements say,
and its packages are listed top floor first, so an arrow that runs back up (or a new circle) fails here."""

import re
from pathlib import Path

from dnnpipe.deploy.closure import _imports
from helpers import ROOT

DOC = ROOT / "docs" / "architecture.md"
KNOWN_BACK_UP: set[tuple[str, str]] = set()  # docs/architecture.md, "Not yet right": none today


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted((ROOT / "dnnpipe").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def node(module: str) -> str:
    """A package below dnnpipe counts as one node; a core module is its own; dnnpipe/__init__.py is `dnnpipe`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "dnnpipe"


def import_table() -> dict[str, set[str]]:
    table: dict[str, set[str]] = {}
    for module, path in modules().items():
        for target in _imports(ROOT, module, path):
            if node(target) != node(module):
                table.setdefault(node(module), set()).add(node(target))
    return table


def block(name: str) -> list[tuple[str, list[str]]]:
    match = re.search(rf"```{name}\n(.*?)```", DOC.read_text(), re.S)
    assert match, f"docs/architecture.md has no ```{name} block"
    rows = [line.replace("->", " ").split() for line in match.group(1).splitlines() if line.strip()]
    return [(row[0], row[1:]) for row in rows]


def test_the_import_table_is_the_codes():
    documented = {name: set(targets) for name, targets in block("imports")}
    assert documented == import_table()


def test_the_module_list_is_the_codes():
    packages = {node(m) for m in modules() if m.count(".") >= 2}
    listed = dict(block("modules"))
    assert set(listed) == packages
    for package, names in listed.items():
        assert sorted(names) == sorted(m.rsplit(".", 1)[1] for m in modules() if m.startswith(f"dnnpipe.{package}."))


def test_packages_are_listed_top_floor_first_so_no_arrow_runs_back_up():
    order = [name for name, _ in block("imports")]
    back_up = {(name, target) for i, (name, targets) in enumerate(block("imports")) for target in targets
               if target in order and order.index(target) <= i}
    assert back_up <= KNOWN_BACK_UP, back_up - KNOWN_BACK_UP


if __name__ == "__main__":  # after an import changed: python tests/test_architecture.py prints the new table
    table = import_table()
    documented = [name for name, _ in block("imports")]
    for name in [n for n in documented if n in table] + sorted(set(table) - set(documented)):
        print(f"{name:13} -> {' '.join(sorted(table[name]))}")
