"""The documentation examples: find the fenced ``python`` and ``bash`` blocks of a Markdown page, check them
without running them, and run a page's blocks in order in a fresh folder.

A block runs unless the line right before its fence is a marker::

    <!-- example: weights -->        needs downloaded pretrained weights
    <!-- example: gpu -->            needs a GPU
    <!-- example: skip REASON -->    anything else, with the reason

Every block, marked or not, is also checked without running it: see doc_checks.py.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LANGUAGES = {"python": "python", "py": "python", "bash": "bash", "sh": "bash", "shell": "bash"}
MARKERS = ("weights", "gpu", "skip")
README_MAX_LINES = 300

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`]*?)[ \t]*$")
_MARKER_LINE = re.compile(r"^\s*<!--\s*example\b", re.IGNORECASE)
_MARKER = re.compile(r"^\s*<!--\s*example:\s*(?P<body>.*?)\s*-->\s*$")


@dataclasses.dataclass(frozen=True)
class Block:
    """One fenced example: ``line`` is the 1-based line of its first source line in ``path``."""
    path: Path
    line: int
    language: str  # "python" or "bash"
    source: str
    marker: str | None = None  # "weights", "gpu", "skip" or None (runs)
    reason: str = ""

    @property
    def where(self) -> str:
        return f"{display(self.path)}:{self.line}"


def display(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it (for messages)."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def pages() -> list[Path]:
    """README.md, every Markdown page of docs/ except the generated API reference, and the READMEs inside the
    package (the study's), in a stable order."""
    docs = REPO / "docs"
    found = [p for p in sorted(docs.rglob("*.md")) if "reference" not in p.relative_to(docs).parts[:1]]
    package = sorted((REPO / "src").rglob("README.md"))
    return ([REPO / "README.md"] if (REPO / "README.md").exists() else []) + found + package


def parse(path: Path) -> tuple[list[Block], list[str]]:
    """The example blocks of a page, in order, and the problems with its markers (as ``file:line: message``).
    A block under a bad marker is kept from running (as ``skip``); the problem is reported instead."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    blocks, problems = [], []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            if _MARKER_LINE.match(lines[i]):
                _, _, problem = _read_marker(lines[i])
                nxt = _FENCE.match(lines[i + 1]) if i + 1 < len(lines) else None
                language = LANGUAGES.get(_info_language(nxt["info"])) if nxt else None
                if problem:
                    problems.append(f"{display(path)}:{i + 1}: {problem}")
                elif language is None:
                    problems.append(f"{display(path)}:{i + 1}: example marker not on the line right before a "
                                    f"```python or ```bash fence")
            i += 1
            continue
        end = _closing(lines, i, opening)
        language = LANGUAGES.get(_info_language(opening["info"]))
        if language is not None:
            marker, reason = None, ""
            if i > 0 and _MARKER_LINE.match(lines[i - 1]):
                marker, reason, problem = _read_marker(lines[i - 1])
                if problem:
                    marker, reason = "skip", f"bad marker: {problem}"
            indent = len(opening["indent"])
            body = [_dedent(line, indent) for line in lines[i + 1:end]]
            blocks.append(Block(Path(path), i + 2, language, "\n".join(body) + "\n", marker, reason))
        i = end + 1
    return blocks, problems


def _info_language(info: str) -> str:
    words = info.strip().lstrip("{").lstrip(".").split()
    return words[0].lower() if words else ""


def _closing(lines: list[str], start: int, opening: re.Match) -> int:
    fence = opening["fence"]
    for j in range(start + 1, len(lines)):
        m = _FENCE.match(lines[j])
        if m and m["fence"][0] == fence[0] and len(m["fence"]) >= len(fence) and not m["info"]:
            return j
    return len(lines)  # unclosed: runs to the end of the page, as Markdown renders it


def _dedent(line: str, indent: int) -> str:
    strip = len(line) - len(line.lstrip(" \t"))
    return line[min(strip, indent):]


def _read_marker(line: str) -> tuple[str | None, str, str | None]:
    """(marker, reason, problem) for a ``<!-- example: ... -->`` line."""
    m = _MARKER.match(line)
    if m is None:
        return None, "", f"malformed example marker {line.strip()!r} (write <!-- example: weights|gpu|skip REASON -->)"
    word, _, reason = m["body"].partition(" ")
    if word not in MARKERS:
        return None, "", f"unknown example marker {word!r} (known: {', '.join(MARKERS)})"
    if word == "skip" and not reason.strip():
        return None, "", "<!-- example: skip --> needs a reason: <!-- example: skip REASON -->"
    return word, reason.strip(), None


# ----------------------------------------------------------------------------------------------------------
# Running a page

RUNNER = Path(__file__).with_name("run_page.py")


def run_page(path: Path, workdir: Path, timeout: float = 1200) -> subprocess.CompletedProcess:
    """Run the page's unmarked blocks in order in ``workdir`` (a fresh folder), in one subprocess of this
    Python: Python blocks share one namespace, bash blocks run with ``bash -e -o pipefail`` in the same
    folder. The result's ``stdout`` is stdout and stderr in order; it names the block that failed as
    ``FAILED file:line``. Past ``timeout`` seconds the run and what it started are killed (exit code 124)."""
    blocks, _ = parse(path)
    todo = [dataclasses.asdict(b) | {"path": str(b.path), "where": b.where} for b in blocks if b.marker is None]
    workdir.mkdir(parents=True, exist_ok=True)
    plan = workdir.parent / f"{workdir.name}.blocks.json"
    plan.write_text(json.dumps(todo))
    args = [sys.executable, "-u", str(RUNNER), str(plan)]
    process = subprocess.Popen(args, cwd=workdir, env=example_env(workdir), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _killpg(process.pid, signal.SIGTERM)
        try:
            out, _ = process.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            _killpg(process.pid, signal.SIGKILL)
            out, _ = process.communicate()
        out += f"\nTIMEOUT: {display(path)} ran for more than {timeout:.0f} s\n"
        return subprocess.CompletedProcess(args, 124, out, None)
    _killpg(process.pid, signal.SIGKILL)  # whatever a Python block left running in the background
    return subprocess.CompletedProcess(args, process.returncode, out, None)


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def example_env(workdir: Path) -> dict[str, str]:
    """The environment examples run in: this Python's bin first on PATH, one thread, a private cache, and
    offline (Hugging Face's offline switches, and every proxy pointed at a closed local port)."""
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    cache = workdir.parent / f"{workdir.name}.cache"
    env.update(PATH=bin_dir + os.pathsep + env.get("PATH", ""), CLIPFORGE_CACHE=str(cache),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(cache / "hf"),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg", PYTHONHASHSEED="0",
               PYTHONDONTWRITEBYTECODE="1")
    # No network: a download an unmarked example tries fails at once (connection refused), local servers work.
    env.update({name: "http://127.0.0.1:9" for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY",
                                                        "all_proxy", "ALL_PROXY")})
    env.update(no_proxy="localhost,127.0.0.1,::1", NO_PROXY="localhost,127.0.0.1,::1")
    env.pop("CLIPFORGE_TOKEN", None)
    return env
