"""The package reads bottom-up (CONVENTIONS.md, layers): the core (models, tokenizer, transforms, the data
layer, losses, zero-shot, checkpoints) imports no upper layer; training, evaluation and search import no
top-layer code and read files of data only through ``clipforge.data``."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "clipforge"
MIDDLE = ("train", "evaluate", "search")  # each may use the core, not the top layer
TOP = ("cli", "apps", "serve", "study", "__main__.py")  # programs: the command line, the demo, the service
# Libraries that read data files: only clipforge.data may use them below the top layer.
DATA_READERS = ("csv", "tarfile", "webdataset", "PIL", "braceexpand", "glob")


def _layer(path: Path) -> str:
    top = path.relative_to(PACKAGE).parts[0]
    return "top" if top in TOP else "middle" if top in MIDDLE else "core"


def _imports(path: Path) -> set[str]:
    names = set()
    package = "clipforge." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against the module's package
                base = package.rstrip(".").split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def _modules(layer: str) -> list[Path]:
    return [p for p in sorted(PACKAGE.rglob("*.py")) if _layer(p) == layer]


def _offenders(layer: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    found = {}
    for path in _modules(layer):
        bad = sorted(n for n in _imports(path) if n.startswith(forbidden))
        if bad:
            found[str(path.relative_to(PACKAGE))] = bad
    return found


def _upper(*folders: str) -> tuple[str, ...]:
    return tuple(f"clipforge.{f}" for f in folders)


def test_layers_are_found():
    core = {str(p.relative_to(PACKAGE)) for p in _modules("core")}
    assert {"models/clip.py", "data/images.py", "tokenizer.py", "zeroshot.py", "encode.py"} <= core
    assert any(p.parts[-2] == "train" for p in _modules("middle"))
    assert any(p.parts[-2] == "cli" for p in _modules("top"))


def test_core_imports_no_upper_layer():
    assert _offenders("core", _upper(*MIDDLE, *TOP)) == {}


def test_middle_layers_import_no_top_layer():
    assert _offenders("middle", _upper(*TOP)) == {}


def test_middle_layers_read_data_only_through_clipforge_data():
    readers = tuple(f"{m}." for m in DATA_READERS) + DATA_READERS
    found = {}
    for path in _modules("middle"):
        bad = sorted(n for n in _imports(path) if n in DATA_READERS or n.startswith(readers))
        if bad:
            found[str(path.relative_to(PACKAGE))] = bad
    assert found == {}
