"""No import cycle among onestep's modules, counting the imports inside functions too.

Every module under ``onestep/`` is parsed with ``ast``; each ``import`` / ``from ... import`` anywhere in
it (module level, inside functions, under ``TYPE_CHECKING``; relative ones resolved) is an edge to the
imported module. ``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to
``pkg`` (a package counts as its ``__init__``). Python importing a package's ``__init__`` before a
submodule is not an edge: ``__init__`` files re-exporting their submodules is the normal layout.
A cycle is a strongly connected component of more than one module (or a module importing itself).
"""
from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "onestep"

# Pairs of modules allowed to import each other: none (the characteristic generator's loss modules type
# against a Protocol instead of importing the generator back).
KNOWN_UNTIL_MERGE: set[frozenset[str]] = set()


def module_names(root: Path = ROOT) -> dict[str, Path]:
    """``{"onestep.x.y": path}`` for every ``.py`` file; a package's name maps to its ``__init__.py``."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[:len(package) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """The onestep modules that ``module`` imports anywhere in its source."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = _resolve_relative(module, path.name == "__init__.py", node.level, node.module)
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    edges = set()
    for name in found:  # `import onestep.a.b` names a module; strip trailing non-module parts if any
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name.startswith("onestep"):
            edges.add(name)
    return edges


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    names = module_names(root)
    return {module: imports_of(module, path, set(names)) for module, path in names.items()}


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's strongly connected components (iterative)."""
    index, low, on_stack, stack, components, counter = {}, {}, set(), [], [], [0]
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    components.append(component)
            elif child not in index:
                index[child] = low[child] = counter[0]
                counter[0] += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph.get(child, ())))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return components


def one_cycle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A concrete cycle through the component's first module (breadth-first, shortest)."""
    start = min(component)
    parents, queue = {start: None}, deque([start])
    while queue:
        node = queue.popleft()
        for child in sorted(graph[node] & component):
            if child == start:
                path = [node]
                while parents[path[-1]] is not None:
                    path.append(parents[path[-1]])
                return [*reversed(path), start]
            if child not in parents:
                parents[child] = node
                queue.append(child)
    return sorted(component)


def _known(graph: dict[str, set[str]], component: set[str], known: set[frozenset[str]]) -> bool:
    """Whether every import inside the component joins the two modules of one known pair."""
    return all(frozenset({a, b}) in known for a in component for b in graph[a] & component)


def cycles(graph: dict[str, set[str]], known: set[frozenset[str]] = frozenset()) -> list[list[str]]:
    """One concrete cycle per strongly connected component, except those made only of ``known`` pairs."""
    found = []
    for component in strongly_connected(graph):
        self_loop = len(component) == 1 and next(iter(component)) in graph[next(iter(component))]
        if (len(component) > 1 or self_loop) and not _known(graph, component, known):
            found.append(one_cycle(graph, component))
    return found


def test_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 50 and "onestep.callbacks.evaluation" in graph["onestep.cli"] | graph["onestep.callbacks"]
    found = cycles(graph, KNOWN_UNTIL_MERGE)
    assert not found, "import cycles among onestep modules:\n" + "\n".join(" -> ".join(c) for c in found)


def test_graph_sees_function_level_and_relative_imports(tmp_path):
    """The parser finds an import inside a function and a relative one, and reports their cycle."""
    package = tmp_path / "onestep"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "a.py").write_text("def f():\n    from . import b\n")
    (package / "sub" / "b.py").write_text("from onestep.sub.c import thing\n")
    (package / "sub" / "c.py").write_text("def g():\n    from ..sub import a\n")
    graph = import_graph(package)
    assert graph["onestep.sub.a"] == {"onestep.sub.b"} and graph["onestep.sub.c"] == {"onestep.sub.a"}
    assert cycles(graph) == [["onestep.sub.a", "onestep.sub.b", "onestep.sub.c", "onestep.sub.a"]]
    # a known pair is allowed only alone: a component with any other import inside it still fails
    pair = {frozenset({"onestep.sub.a", "onestep.sub.b"})}
    assert cycles({"onestep.sub.a": {"onestep.sub.b"}, "onestep.sub.b": {"onestep.sub.a"}}, pair) == []
    assert cycles(graph, pair) != []


def test_benchmark_layers_import_downwards_only():
    """``onestep benchmark`` layers: cli -> runner (plans, dispatches, reports) -> launchers -> cluster /
    parallel -> cell -> records. No lower layer imports a higher one, even inside a function (a cell that
    imported the CLI, which imports the runner, was such a loop)."""
    graph = import_graph()

    def reaches(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for child in graph[todo.pop()] - seen:
                seen.add(child)
                todo.append(child)
        return seen

    assert {"onestep.benchmark.launchers", "onestep.benchmark.cell"} <= reaches("onestep.benchmark.runner")
    for lower in ("onestep.benchmark.launchers", "onestep.benchmark.cluster", "onestep.benchmark.parallel",
                  "onestep.benchmark.cell", "onestep.benchmark.records"):
        above = reaches(lower) & {"onestep.cli", "onestep.benchmark.runner", "onestep.benchmark.launchers"} - {lower}
        assert not above, f"{lower} imports {sorted(above)}"
