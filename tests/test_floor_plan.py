"""The floor plan holds: the import-linter contracts of pyproject.toml pass, no module takes part
in an import cycle, every module of m3ae and lm has a place in the layers, and the marker table
of tests/conftest.py names tests that exist."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("m3ae", "lm", "pipelines")  # configs/ is m3ae.configs (a link)


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    """Every import of our four packages, function-level and TYPE_CHECKING ones included."""
    return grimp.build_graph(*PACKAGES, cache_dir=None)


def strongly_connected(nodes: list[str], edges: dict[str, list[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components, iteratively (no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    for root in nodes:
        if root in index:
            continue
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        work = [(root, iter(edges[root]))]
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(edges[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def shortest_cycle(start: str, members: set[str], edges: dict[str, list[str]]) -> list[str]:
    """The shortest import chain from `start` back to itself inside one component."""
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in edges[node]:
                if child not in members:
                    continue
                if child == start:
                    chain = [node]
                    while chain[-1] != start:
                        chain.append(previous[chain[-1]])
                    return [start, *reversed(chain[:-1]), start]
                if child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"{start} is in a component but on no cycle")


def render(chain: list[str], graph: grimp.ImportGraph) -> str:
    lines = []
    for importer, imported in zip(chain, chain[1:], strict=False):
        details = graph.get_import_details(importer=importer, imported=imported)
        where = ", ".join(f"l.{d['line_number']}" for d in details)
        lines.append(f"    {importer} -> {imported} ({where})")
    return "\n".join(lines)


def test_strongly_connected_finds_cycles_and_only_cycles():
    edges = {"a": ["b"], "b": ["c"], "c": ["a", "d"], "d": ["e"], "e": []}
    components = strongly_connected(sorted(edges), edges)
    assert sorted(components) == [["a", "b", "c"], ["d"], ["e"]]
    assert shortest_cycle("a", {"a", "b", "c"}, edges) == ["a", "b", "c", "a"]


def test_no_import_cycle(graph):
    """No module imports itself through others, at any depth, across all four packages (the
    `acyclic` contract checks siblings of one package, so it misses m3ae <-> lm cycles)."""
    nodes = sorted(graph.modules)
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in nodes}
    cycles = [c for c in strongly_connected(nodes, edges) if len(c) > 1]
    report = [
        f"{' '.join(c)}:\n{render(shortest_cycle(c[0], set(c), edges), graph)}" for c in cycles
    ]
    assert not cycles, f"{len(cycles)} import cycle(s):\n" + "\n".join(report)


def test_import_linter_contracts_hold():
    """`lint-imports` (the contracts in pyproject.toml) passes; its report on failure."""
    lint_imports = Path(sys.executable).with_name("lint-imports")
    assert lint_imports.exists(), "import-linter is missing: make setup (it is in the dev extra)"
    res = subprocess.run(
        [str(lint_imports), "--no-cache", "--no-logo"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def layer_modules() -> set[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (layers,) = [c for c in config["contracts"] if c["type"] == "layers"]
    names = set()
    for layer in layers["layers"]:
        for name in layer.replace("|", ":").split(":"):
            names.add(name.strip().strip("()"))
    return names


def test_every_module_has_a_layer(graph):
    """A new module of m3ae or lm is placed in the layers contract, not left unconstrained."""
    placed = layer_modules()
    children = graph.find_children("m3ae") | graph.find_children("lm")
    unplaced = sorted(m for m in children if m not in placed)
    assert not unplaced, f"add to the layers contract in pyproject.toml: {unplaced}"


def test_marker_table_names_existing_tests():
    """Every test name and file in conftest's MARKERS still exists (tests move between files)."""
    import conftest

    defined = {p.name for p in Path(__file__).parent.glob("test_*.py")}
    for path in Path(__file__).parent.glob("test_*.py"):
        tree = ast.parse(path.read_text())
        defined |= {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    stale = sorted(key for key in conftest.MARKERS if key.split("[")[0] not in defined)
    assert not stale, f"tests/conftest.py MARKERS names no test: {stale}"
