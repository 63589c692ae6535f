"""Imports inside src/mtpd run one way: no module imports another that (directly or not) imports it back,
and no module takes a `_private` name from another. Read from the source (ast), so imports inside
functions and under TYPE_CHECKING count too: a cycle hidden in a function is still a cycle."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "mtpd"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def absolute(module: str, node: ast.ImportFrom) -> str:
    """The module a `from ... import` names, relative imports resolved against `module`."""
    if not node.level:
        return node.module or ""
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
    return f"{base}.{node.module}" if node.module else base


def imports(module: str) -> list[tuple[str, str | None]]:
    """(imported mtpd module, the name taken from it or None) for every import statement in `module`."""
    found = []
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names if alias.name in MODULES]
        elif isinstance(node, ast.ImportFrom):
            source = absolute(module, node)
            if source not in MODULES:
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                # `from mtpd.pkg import sub` imports the submodule, not a name of the package's __init__
                found.append((submodule, None) if submodule in MODULES else (source, alias.name))
    return found


def import_graph() -> dict[str, set[str]]:
    return {module: {target for target, _ in imports(module) if target != module} for module in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None (depth-first search, white/grey/black)."""
    done, path = set(), []
    on_path: dict[str, int] = {}

    def visit(node: str) -> list[str] | None:
        on_path[node] = len(path)
        path.append(node)
        for target in sorted(graph[node]):
            if target in on_path:
                return path[on_path[target]:] + [target]
            if target not in done and (cycle := visit(target)):
                return cycle
        path.pop()
        del on_path[node]
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done and (cycle := visit(start)):
            return cycle
    return None


def test_the_graph_sees_every_kind_of_import():
    graph = import_graph()
    assert "mtpd.decode.state" in graph["mtpd.decode.chain"]  # from mtpd.x import y
    assert "mtpd.decode.speculative" in graph["mtpd.decode"]  # a package's __init__
    assert graph["mtpd.decode.state"] <= set(MODULES)
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_src():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_private_name_crosses_modules():
    crossing = [f"{module} imports {name} from {source}" for module in MODULES
                for source, name in imports(module)
                if name is not None and name.startswith("_") and source != module]
    assert not crossing, "\n".join(crossing)
