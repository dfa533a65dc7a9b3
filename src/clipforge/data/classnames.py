"""Class names: the shipped sets (CLIP_benchmark's ``en_classnames.json``) and class-name files, read and
checked in one place for zero-shot classification, evaluation and validation."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from clipforge.assets import read_json

CLASSNAMES_ASSET = "en_classnames.json"


def check_classnames(classnames: Sequence[str], where: str = "class names", unique: bool = True) -> list[str]:
    """``classnames`` as a list, or ValueError for an empty list, an empty name or (if ``unique``) a duplicate."""
    names = list(classnames)
    if not names:
        raise ValueError(f"{where}: no class names given")
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{where}: class {i + 1} is an empty string; every label needs some text")
    if unique:
        _check_unique(names, where)
    return names


def _check_unique(names: list[str], where: str) -> None:
    """ValueError for two names the tokenizer cannot tell apart (it lower-cases and normalises whitespace
    and punctuation spacing), since they would be one class twice."""
    from clipforge.tokenizer import get_tokenizer  # the model sees token ids, so those decide what is a repeat

    tokenizer, seen = get_tokenizer(), {}
    for i, name in enumerate(names):
        key = tuple(tokenizer.encode(name))
        if key in seen:
            first = seen[key]
            same = "appears twice" if names[first] == name else f"and {names[first]!r} tokenize identically"
            raise ValueError(f"{where}: {name!r} {same} (positions {first + 1} and {i + 1}); class names "
                             "must be unique")
        seen[key] = i


def classname_set_names() -> list[str]:
    """Names accepted by ``load_classnames``: the class-name lists shipped in ``assets/en_classnames.json``."""
    return sorted(read_json(CLASSNAMES_ASSET))


def read_text_lines(path: str | Path, what: str) -> list[str]:
    """The non-blank lines of a UTF-8 text file (a byte-order mark dropped), stripped of line ends.

    A file that is not UTF-8 raises ValueError naming the file and ``what`` it was read as."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None
    return [line.rstrip("\r\n") for line in text.splitlines() if line.strip()]


def read_classnames(spec) -> dict[str, str] | list[str]:
    """A class-name mapping: a dict (folder/label key -> name) or a list (names by sorted key or label id).

    ``spec`` is a shipped set name (``imagenet1k``, ``pets``, ...), a JSON file (a dict or a list), or a text
    file: lines ``key<TAB>name`` (a dict), else one name per line (a list). A dict or list passes through.
    """
    if isinstance(spec, (dict, list)):
        return spec
    text = str(spec)
    sets = read_json(CLASSNAMES_ASSET)
    if text in sets:
        return list(sets[text])
    path = Path(text)
    if not path.is_file():
        raise FileNotFoundError(f"class names {text!r}: no such file and not a shipped set "
                                f"({', '.join(classname_set_names())})")
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"class-name file {path}: not valid UTF-8 JSON ({e})") from None
        if not isinstance(data, (dict, list)):
            raise ValueError(f"class-name file {path}: expected a JSON object (key -> name) or list of names")
        return {str(k): v for k, v in data.items()} if isinstance(data, dict) else data
    lines = read_text_lines(path, "class-name file")
    if lines and all("\t" in line for line in lines):
        return dict(line.split("\t", 1) for line in lines)
    return [line.strip() for line in lines]


def load_classnames(spec) -> list[str]:
    """Class names as a list: a shipped set name (``imagenet1k``, ``pets``, ...) or a file with one name per
    line (or a JSON list); a file's names must be non-empty and unique (OpenAI's ImageNet set repeats one)."""
    if isinstance(spec, str) and spec in read_json(CLASSNAMES_ASSET):
        return read_classnames(spec)
    names = read_classnames(spec)
    if isinstance(names, dict):
        names = list(names.values())
    return check_classnames(names, f"class file {spec}" if not isinstance(spec, list) else "class names")
