"""The package reads bottom-up (docs/conventions.md, "Layers"; docs/development.md, "Layout").

- runtime (device, process groups, threads, allocator) imports nothing else of clipforge;
- the core (runtime, models, tokenizer, transforms, the data layer, losses, zero-shot, encoding, weights in and
  out under ``io``) imports no upper layer;
- training, evaluation and search import no top-layer code, read files of data only through
  ``clipforge.data``, and search never imports training;
- nothing imports in a circle, counting imports inside functions too.
"""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "clipforge"
MIDDLE = ("train", "evaluate", "search")  # each may use the core, not the top layer
TOP = ("cli", "apps", "serve", "__main__.py")  # programs: the command line, the demo and the study, the service
# Libraries that read data files: only clipforge.data may use them below the top layer.
DATA_READERS = ("csv", "tarfile", "webdataset", "PIL", "braceexpand", "glob")


def _layer(path: Path) -> str:
    top = path.relative_to(PACKAGE).parts[0]
    return "top" if top in TOP else "middle" if top in MIDDLE else "core"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(("clipforge",) + (parts[:-1] if parts[-1] == "__init__" else parts))


def _import_statements(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every import statement of ``path``, inside functions too, with relative
    imports resolved; ``import M`` gives (M, [])."""
    found = []
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against the module's package
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((module, [alias.name for alias in node.names]))
    return found


def _imports(path: Path) -> set[str]:
    """Every module name an import statement of ``path`` mentions, with each ``from M import N`` also as
    ``M.N`` (N may be a submodule)."""
    names = set()
    for module, imported in _import_statements(path):
        names.add(module)
        names.update(f"{module}.{name}" for name in imported)
    return names


def _modules(layer: str | None = None) -> list[Path]:
    return [p for p in sorted(PACKAGE.rglob("*.py")) if layer is None or _layer(p) == layer]


def _offenders(paths: list[Path], forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    found = {}
    for path in paths:
        bad = sorted(n for n in _imports(path) if n.startswith(forbidden))
        if bad:
            found[str(path.relative_to(PACKAGE))] = bad
    return found


def _upper(*folders: str) -> tuple[str, ...]:
    return tuple(f"clipforge.{f.removesuffix('.py')}" for f in folders)


def _import_graph() -> dict[str, set[str]]:
    """Module name -> the clipforge modules it imports (a package import is an edge to its ``__init__``)."""
    modules = {_module_name(p): p for p in _modules()}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for module, imported in _import_statements(path):
            submodules = {f"{module}.{n}" for n in imported if f"{module}.{n}" in modules}
            edges |= submodules
            if len(submodules) < len(imported) or not imported:  # names from the module itself
                edges.add(module)
        graph[name] = {n for n in edges if n in modules and n != name}
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_layers_are_found():
    core = {str(p.relative_to(PACKAGE)) for p in _modules("core")}
    assert {"models/clip.py", "data/images.py", "tokenizer.py", "zeroshot.py", "encode.py", "io/factory.py",
            "runtime/distributed.py"} <= core
    assert any(p.parts[-2] == "train" for p in _modules("middle"))
    assert any(p.parts[-2] == "cli" for p in _modules("top"))
    assert any(p.parts[-2] == "study" for p in _modules("top"))


def test_runtime_imports_nothing_else_of_clipforge():
    runtime = [p for p in _modules() if p.relative_to(PACKAGE).parts[0] == "runtime"]
    assert runtime
    found = {}
    for path in runtime:
        bad = sorted(n for n in _imports(path) if n.startswith("clipforge") and not n.startswith("clipforge.runtime"))
        if bad:
            found[str(path.relative_to(PACKAGE))] = bad
    assert found == {}


def test_core_imports_no_upper_layer():
    assert _offenders(_modules("core"), _upper(*MIDDLE, *TOP)) == {}


def test_middle_layers_import_no_top_layer():
    assert _offenders(_modules("middle"), _upper(*TOP)) == {}


def test_search_never_imports_training():
    search = [p for p in _modules() if p.relative_to(PACKAGE).parts[0] == "search"]
    assert search and _offenders(search, _upper("train")) == {}


def test_middle_layers_read_data_only_through_clipforge_data():
    readers = tuple(f"{m}." for m in DATA_READERS) + DATA_READERS
    found = {}
    for path in _modules("middle"):
        bad = sorted(n for n in _imports(path) if n in DATA_READERS or n.startswith(readers))
        if bad:
            found[str(path.relative_to(PACKAGE))] = bad
    assert found == {}


def test_circles_are_found():
    """The circle finder itself, on a graph with one circle of three and a self-contained tail."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert _circles(graph) == [["a", "b", "c"]]


def test_no_import_circles():
    assert _circles(_import_graph()) == []
