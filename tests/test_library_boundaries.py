"""Library boundaries: sd_detr/ is a plain PyTorch library that loads neither Ray nor MLflow, and the
first-party packages (sd_detr, pipelines, tune) import each other without cycles."""

from __future__ import annotations

import ast
import itertools
import pkgutil
import subprocess
import sys
from pathlib import Path

import sd_detr

REPO = Path(__file__).resolve().parents[1]
FIRST_PARTY = ("sd_detr", "pipelines", "tune")

# module -> {imported first-party module -> line numbers of the import statements}
ImportGraph = dict[str, dict[str, list[int]]]


def test_sd_detr_imports_neither_ray_nor_mlflow() -> None:
    modules = [m.name for m in pkgutil.walk_packages(sd_detr.__path__, "sd_detr.")]
    assert "sd_detr.model" in modules and "sd_detr.losses" in modules
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow'))\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", f"sd_detr pulled in: {result.stdout.strip()}"


def module_files(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name -> source file of every module under ``root/<package>`` (a package is its __init__)."""
    files = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join(parts)] = path
    return files


def _imported_modules(module: str, path: Path, files: dict[str, Path]) -> list[tuple[str, int]]:
    """(first-party module, line) for every import statement in ``path``. `from a import b` imports the
    module a.b when there is one, else the module a (b is one of its names); relative imports are resolved."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            source = ".".join([*base, *([node.module] if node.module else [])])
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                found.append((submodule if submodule in files else source, node.lineno))
    return [(name, line) for name, line in found if name in files and name != module]


def import_graph(files: dict[str, Path]) -> ImportGraph:
    """Which first-party modules each module imports, counting every import statement: top level, inside
    functions and under `if TYPE_CHECKING:`. An import moved into a function gets past a cycle at import
    time, but the two modules still depend on each other, so it counts like any other."""
    graph: ImportGraph = {}
    for module, path in files.items():
        edges: dict[str, list[int]] = {}
        for name, line in _imported_modules(module, path, files):
            edges.setdefault(name, []).append(line)
        graph[module] = edges
    return graph


def import_cycles(graph: ImportGraph) -> list[list[str]]:
    """One cycle (a, b, ..., a) per group of modules that import each other directly or indirectly
    (strongly connected components of more than one module), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(_cycle_through(graph, component) for component in components)


def _cycle_through(graph: ImportGraph, component: list[str]) -> list[str]:
    """The shortest import path from the component's first module back to itself, inside the component."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node]):
                if target == start:
                    return [*paths[node], start]
                if target in members and target not in paths:
                    paths[target] = [*paths[node], target]
                    following.append(target)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {component}")


def describe(graph: ImportGraph, files: dict[str, Path], cycle: list[str]) -> str:
    """`a -> b -> a` followed by the file and line of each import on the way, one per line."""
    steps = [
        f"    {source} -> {target} at {files[source].relative_to(REPO)}:{','.join(map(str, graph[source][target]))}"
        for source, target in itertools.pairwise(cycle)
    ]
    return "\n".join([" -> ".join(cycle), *steps])


def test_first_party_packages_have_no_import_cycle() -> None:
    files = module_files(REPO, FIRST_PARTY)
    graph = import_graph(files)
    assert "sd_detr.config" in graph["sd_detr.model"] and "pipelines.config" in graph["tune.config"]
    cycles = import_cycles(graph)
    assert not cycles, (
        "modules that import each other (imports inside functions count too; move what both need into a "
        "module of its own):\n" + "\n".join(describe(graph, files, cycle) for cycle in cycles)
    )


def test_the_cycle_finder_sees_function_level_and_relative_imports(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    sources = {
        "__init__.py": "",
        "a.py": "from pkg.b import thing\n",
        "b.py": "def thing():\n    from . import c\n",
        "c.py": "import pkg.sub.d\n",
        "sub/__init__.py": "",
        "sub/d.py": "if False:\n    from ..a import x\n",
        "leaf.py": "from pkg import a\n",
    }
    for name, text in sources.items():
        (package / name).write_text(text)
    files = module_files(tmp_path, ("pkg",))
    graph = import_graph(files)
    assert graph["pkg.leaf"] == {"pkg.a": [1]}
    assert import_cycles(graph) == [["pkg.a", "pkg.b", "pkg.c", "pkg.sub.d", "pkg.a"]]
