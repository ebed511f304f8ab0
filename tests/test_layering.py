"""Imports run one way: the import graph of the soulchat package has no cycle. One job per file: no module
of soulchat/ is over ``MAX_LINES`` lines.

Every module of the package (soulchat/ and kernels/, installed as soulchat.kernels) is parsed with
``ast``; every ``import`` and ``from ... import`` counts, at module level and inside functions alike (a
function-level import is still a dependency, only a later one), and so do ``if TYPE_CHECKING:`` imports
(a type taken from a module above is a dependency on it too, even if no import runs).
``from soulchat.pkg import name`` is an edge to the module ``soulchat.pkg.name`` when there is one,
else to ``soulchat.pkg``. The check reports each cycle it finds as a path of modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROOTS = {"soulchat": REPO / "soulchat", "soulchat.kernels": REPO / "kernels"}
# A module past this size does several jobs: split it by job. kernels/ is left out: it follows the
# design's one-file-per-op rule (reference, kernels, launchers, autograd function and entry point of one op).
MAX_LINES = 600

def module_files() -> dict[str, Path]:
    modules = {}
    for package, root in ROOTS.items():
        for path in sorted(root.rglob("*.py")):
            if "tests" in path.relative_to(root).parts:
                continue
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The soulchat modules that ``name`` (at ``path``) imports."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()

    def target(module: str) -> str | None:
        while module and module not in modules:  # a name inside a module: the module
            module = module.rpartition(".")[0]
        return module or None

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "soulchat" or alias.name.startswith("soulchat."):
                    found.add(target(alias.name))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module == "soulchat" or module.startswith("soulchat."):
                for alias in node.names:
                    submodule = f"{module}.{alias.name}"
                    found.add(submodule if submodule in modules else target(module))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    found.discard(None)
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """One cycle per strongly connected component of more than one module (Tarjan), as a path
    ``a -> b -> ... -> a`` starting at its smallest name."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_cycle_in(component, graph) for component in components]


def _cycle_in(component: set[str], graph: dict[str, set[str]]) -> tuple[str, ...]:
    """A shortest cycle through the smallest module of ``component`` (breadth-first back to it)."""
    start = min(component)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return (start, *reversed(path[:-1]), start) if v != start else (start, start)
                if w not in previous:
                    previous[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")  # a strongly connected component always has one


def test_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 40 and "soulchat.train" in graph and "soulchat.kernels.varlen_attention" in graph
    cycles = find_cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_cycle_finder_reports_a_cycle_and_its_path():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"d"}}
    assert find_cycles(graph) == [("a", "b", "c", "a")]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def modules_over(modules: dict[str, Path], limit: int) -> list[str]:
    """``path (N lines)`` of each module longer than ``limit`` lines, longest first."""
    lines = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in modules.items()}
    over = sorted((n for n in lines if lines[n] > limit), key=lambda n: (-lines[n], n))
    shown = {n: modules[n].relative_to(REPO) if modules[n].is_relative_to(REPO) else modules[n] for n in over}
    return [f"{shown[n]} ({lines[n]} lines)" for n in over]


def test_no_package_module_is_over_the_line_limit():
    modules = {n: p for n, p in module_files().items() if n != "soulchat.kernels" and not n.startswith("soulchat.kernels.")}
    assert len(modules) > 40 and "soulchat.train" in modules and "soulchat.data.render" in modules
    over = modules_over(modules, MAX_LINES)
    assert not over, f"modules over {MAX_LINES} lines (split them by job): " + ", ".join(over)


def test_line_limit_check_names_each_module_over_it(tmp_path):
    sizes = {"a": MAX_LINES, "b": MAX_LINES + 1, "c": MAX_LINES + 40}
    for name, n in sizes.items():
        (tmp_path / f"{name}.py").write_text("x = 1\n" * n, encoding="utf-8")
    modules = {name: tmp_path / f"{name}.py" for name in sizes}
    assert modules_over(modules, MAX_LINES) == [
        f"{tmp_path / 'c.py'} ({sizes['c']} lines)", f"{tmp_path / 'b.py'} ({sizes['b']} lines)"
    ]
