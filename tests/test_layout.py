"""The house's one rule (README, Layout): a module imports only from its own folder or folders below it in
the picture, and no modules import each other in a circle. Read from the source's imports (all of them,
function-level ones included), nothing run."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "qolora"

#: Folders (and ground-floor modules) from the bottom up, as the README's Layout section draws them.
FLOORS = [
    {"errors", "moved_modules", "version", "inits"},
    {"files", "devices"},
    {"config", "data"},
    {"base"},
    {"adapters"},
    {"memory"},
    {"planning"},
    {"model"},
    {"training", "export"},
    {"cli"},
    {"__init__"},
]
FLOOR = {room: level for level, rooms in enumerate(FLOORS) for room in rooms}


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The qolora modules ``name`` imports (``from .x import y`` resolves to ``x.y`` when that is a module)."""
    package = name.split(".")[:-1]  # a module's package; for an __init__, the package itself
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1] if node.level > 1 else package
                target = [*base, *(node.module.split(".") if node.module else [])]
            elif node.module and node.module.split(".")[0] == "qolora":
                target = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:
                sub = ".".join([*target, alias.name])
                found.add(sub if sub in known else ".".join(target))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "qolora":
                    found.add(".".join(alias.name.split(".")[1:]))
    return {m for m in found if m in known and m != name}


def _room(module: str) -> str:
    return module.split(".")[0]


def test_every_module_has_a_floor():
    assert {_room(m) for m in _modules()} <= set(FLOOR), sorted({_room(m) for m in _modules()} - set(FLOOR))


def test_the_imports_are_read():
    modules = _modules()
    graph = {name: _imports(name, path, set(modules)) for name, path in modules.items()}
    assert sum(map(len, graph.values())) > 100
    assert "planning.placement" in graph["model.prepare"] and "config" in graph["planning.plan"]
    assert "adapters.compiled_layers" in graph["adapters.layer"]  # a function-level import counts too


def test_imports_go_down_or_stay_in_their_folder():
    modules = _modules()
    up = []
    for name, path in modules.items():
        for target in _imports(name, path, set(modules)):
            if _room(target) != _room(name) and FLOOR[_room(target)] >= FLOOR[_room(name)]:
                up.append(f"{name} -> {target}")
    assert not up, up


def test_no_circles():
    modules = _modules()
    graph = {name: _imports(name, path, set(modules)) for name, path in modules.items()}
    state: dict[str, int] = {}
    circles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not circles, circles
