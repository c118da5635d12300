"""No import cycles inside `sdar_jax/`: the graph of its modules' imports, from the source."""

from __future__ import annotations

import ast
import pathlib

import sdar_jax

PACKAGE_DIR = pathlib.Path(sdar_jax.__file__).parent


def _module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(node: ast.Import | ast.ImportFrom, module: str, is_package: bool,
             modules: set[str]) -> set[str]:
    """The package modules an import statement runs: the module it names (for `from x import
    y`, x.y when that is a module, else x) and the packages above it, except the importer's
    own ancestors (already being initialised when it runs)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            package = module.split(".") if is_package else module.split(".")[:-1]
            base = ".".join(package[: len(package) - node.level + 1])
            source = f"{base}.{node.module}" if node.module else base
        else:
            source = node.module
        names = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                 for alias in node.names]
    ancestors = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 2)}
    ran = set()
    for name in names:
        parts = name.split(".")
        ran.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {name for name in ran - ancestors if name in modules}


def import_graph(root: pathlib.Path) -> dict[str, set[str]]:
    """module -> the modules of the same package its import statements (anywhere in its
    body, function-level ones included) run."""
    files = {_module_name(path, root): path for path in sorted(root.rglob("*.py"))}
    graph = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        graph[module] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[module] |= _imports(node, module, path.name == "__init__.py", set(files))
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, iterative)."""
    state = {}  # module -> "open" while on the stack, "done" after
    for start in sorted(graph):
        if start in state:
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        state[start] = "open"
        while stack:
            module, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                path.pop()
                state[module] = "done"
            elif state.get(child) == "open":
                return path[path.index(child):] + [child]
            elif child not in state:
                state[child] = "open"
                path.append(child)
                stack.append((child, iter(sorted(graph[child]))))
    return None


def test_sdar_jax_has_no_import_cycle():
    graph = import_graph(PACKAGE_DIR)
    assert "sdar_jax.ops.attention" in graph and graph["sdar_jax.ops.attention"]  # the walk sees imports
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_walk_finds_a_cycle_and_resolves_relative_imports(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from . import b\n")
    (package / "a.py").write_text("import os\nfrom pkg.sub import b\n")
    (package / "sub" / "b.py").write_text("def f():\n    from ..a import g\n")
    graph = import_graph(package)
    assert graph == {"pkg": set(), "pkg.sub": {"pkg.sub.b"}, "pkg.a": {"pkg.sub", "pkg.sub.b"},
                     "pkg.sub.b": {"pkg.a"}}
    assert find_cycle(graph) == ["pkg.a", "pkg.sub", "pkg.sub.b", "pkg.a"]
    (package / "sub" / "b.py").write_text("import pkg\nfrom pkg.sub import c\n")  # ancestors only
    assert find_cycle(import_graph(package)) is None
