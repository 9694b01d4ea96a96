"""No import circles among bitalloc's modules (alloc/, sensitivity/, solvers/, kernels/), counting every import,
deferred ones inside functions included: the graph a newcomer reads is the real one."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = {"alloc": "bitalloc", "sensitivity": "bitalloc.sensitivity", "solvers": "bitalloc.solvers",
            "kernels": "bitalloc.kernels"}


def _modules() -> dict[str, Path]:
    """bitalloc module name -> file (a package is its __init__.py)."""
    out = {}
    for folder, name in PACKAGES.items():
        for path in (REPO / folder).rglob("*.py"):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((name, *parts))] = path
    return out


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The bitalloc modules ``module`` imports anywhere in its file (``from .x import y``: module x.y when it is
    one, else x)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                if not target.startswith("bitalloc"):          # beyond the top: an ImportError when it runs
                    BEYOND.append(f"{module}: {'.' * node.level}{node.module or ''}")
            else:
                target = node.module or ""
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target)
    return {m for m in found if m in known and m != module}


BEYOND: list[str] = []          # relative imports that climb out of bitalloc (found while building the graph)


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(m, p, set(modules)) for m, p in modules.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    import sys
    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_deferred_imports():
    graph = import_graph()
    assert "bitalloc.api" in graph["bitalloc.cli.flow"]            # imported inside cmd_allocate
    assert "bitalloc.sensitivity.base" in graph["bitalloc.api"] or graph["bitalloc.api"]


def test_every_relative_import_stays_inside_bitalloc():
    BEYOND.clear()
    import_graph()
    assert not BEYOND, "relative imports beyond the package: " + "; ".join(BEYOND)


def test_there_are_no_import_circles():
    found = circles(import_graph())
    assert not found, "import circles: " + "; ".join(" ↔ ".join(c) for c in found)
