"""The core library never imports training, evaluation, serving or CLI code (CONVENTIONS.md, layers)."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "clipforge"
CORE = ["models", "tokenizer.py", "text_clean.py", "transforms.py", "loss.py", "distributed.py", "zeroshot.py",
        "checkpoints.py", "hf.py", "pretrained.py", "factory.py"]
UPPER = ("clipforge.train", "clipforge.evaluate", "clipforge.cli", "clipforge.data")


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


def test_core_modules_do_not_import_upper_layers():
    files = []
    for entry in CORE:
        path = PACKAGE / entry
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path] if path.exists() else []
    assert any(f.parent.name == "models" for f in files)
    offenders = {str(f.relative_to(PACKAGE)): sorted(n for n in _imports(f) if n.startswith(UPPER))
                 for f in files}
    assert {k: v for k, v in offenders.items() if v} == {}
