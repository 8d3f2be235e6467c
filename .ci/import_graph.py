"""Print qloader's import graph in brief: modules, edges, cycles (function-level imports included), top-level rooms.

Exits 1 when there is a cycle. `make lint` runs it beside import-linter's layers contract (pyproject.toml).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's qloader, not an installed one

import grimp  # noqa: E402


def cycles(graph: grimp.ImportGraph, modules: set[str]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root) & modules)))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child) & modules))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def main() -> int:
    graph = grimp.build_graph("qloader", include_external_packages=False)
    modules = set(graph.modules)
    edges = sum(len(graph.find_modules_directly_imported_by(m) & modules) for m in modules)
    rooms = sorted({m.split(".")[1] for m in modules if m.count(".") >= 1})
    found = cycles(graph, modules)
    print(f"{len(modules)} modules, {edges} import edges (function-level imports included)")
    print(f"{len(rooms)} top-level rooms: {', '.join(rooms)}")
    print(f"{len(found)} import cycles")
    for component in found:
        print("  cycle: " + " <-> ".join(component))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
