"""The package's structure: no import circle between its modules (type-checking and
function-level imports included) nor between its subpackages, and each subpackage depends
only on the layers below it."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "adaptive_data"

# Each subpackage may import from the ones listed (and from the package's top-level helper
# modules _batch, _check, _distributed, _extras, _mix, _plot); the top-level __init__, _cli and
# _demo from all.
LAYERS = {
    "policy": set(),
    "augment": {"policy"},
    "sampling": {"policy", "augment"},
    "probe": set(),
    "gar": {"probe", "sampling"},
    "integrations": {"gar", "probe", "sampling"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """Every adaptive_data module ``path`` imports, wherever the import stands."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("adaptive_data"):
                continue
            for alias in node.names:  # `from . import x` may name a module
                found.add(f"{target}.{alias.name}")
            found.add(target)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("adaptive_data")}
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {
        name: {t for t in imports(path) if t in files and t != name} for name, path in files.items()
    }


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else ""


def test_no_module_import_circle() -> None:
    # A package's __init__ imports its modules; its modules importing a sibling through the
    # package would make every such pair a circle, so __init__ edges to children are the only
    # ones left out.
    edges = {
        m: {t for t in ts if not (m.count(".") < t.count(".") and t.startswith(m + "."))}
        for m, ts in graph().items()
    }
    assert find_cycle(edges) is None, f"import circle: {' -> '.join(find_cycle(edges) or [])}"


def test_subpackages_import_only_the_layers_below() -> None:
    wrong = []
    for module, targets in graph().items():
        mine = package_of(module)
        if mine not in LAYERS:
            continue
        for target in targets:
            theirs = package_of(target)
            if theirs and theirs != mine and theirs not in LAYERS[mine]:
                wrong.append(f"{module} -> {target}")
    assert not wrong, wrong
