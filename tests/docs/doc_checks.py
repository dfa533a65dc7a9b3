"""Static checks of the documentation examples, for every block, marked or not, before any runs.

Python: the block compiles, every ``clipforge`` name it imports or reaches by attribute exists (imported and
looked up for real), and every call of a clipforge function or class fits its signature. Bash: ``bash -n``,
and every ``clipforge COMMAND ...`` line (also ``python -m clipforge`` and ``torchrun ... -m clipforge``,
joined over backslash continuations, shell expansions stood in for) parses with the CLI's own argparse parser.
Each problem is reported as ``file:line: message``, with the page's own line numbers.
"""
from __future__ import annotations

import ast
import contextlib
import functools
import importlib
import inspect
import io
import os
import re
import shlex
import subprocess
import sys

from doc_examples import Block, display


def check_page(blocks: list[Block]) -> list[str]:
    """Every problem the static checks find in a page's blocks, each starting with ``file:line:``."""
    problems: list[str] = []
    aliases: dict[str, str] = {}  # a name bound by an import of clipforge -> the dotted path it stands for
    for block in blocks:
        if block.language == "python":
            problems += check_python(block, aliases)
        else:
            problems += check_bash(block)
    return problems


def _padded(block: Block) -> str:
    """The block's source preceded by blank lines, so line numbers in errors are the page's line numbers."""
    return "\n" * (block.line - 1) + block.source


def check_python(block: Block, aliases: dict[str, str] | None = None) -> list[str]:
    """Compile the block and resolve every ``clipforge`` import and attribute chain; ``aliases`` carries the
    names earlier blocks of the page bound (updated in place)."""
    aliases = {} if aliases is None else aliases
    where = display(block.path)
    try:
        tree = ast.parse(_padded(block), filename=where)
        compile(tree, where, "exec")
    except SyntaxError as e:
        return [f"{where}:{e.lineno}: {e.msg}"]
    problems, bound_here, rebound = [], {}, _stored_names(tree)
    for node in ast.walk(tree):
        for dotted, name in _clipforge_imports(node):
            problems += _resolve_problem(where, node.lineno, dotted)
            if name:
                bound_here[name] = dotted
    for name in rebound:
        aliases.pop(name, None)
    aliases.update({k: v for k, v in bound_here.items() if k not in rebound})
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            chain = _attribute_chain(node)
            if chain and chain[0] in aliases:
                problems += _resolve_problem(where, node.lineno, ".".join([aliases[chain[0]], *chain[1:]]))
        elif isinstance(node, ast.Call):
            chain = _attribute_chain(node.func) if isinstance(node.func, ast.Attribute) else (
                [node.func.id] if isinstance(node.func, ast.Name) else None)
            if chain and chain[0] in aliases:
                problems += _call_problem(where, node, ".".join([aliases[chain[0]], *chain[1:]]))
    return sorted(set(problems), key=_line_key)


def _line_key(problem: str):
    m = re.match(r"^(.*?):(\d+):", problem)
    return (m[1], int(m[2]), problem) if m else ("", 0, problem)


def _clipforge_imports(node: ast.AST) -> list[tuple[str, str | None]]:
    """(dotted path to resolve, name it binds or None) for an import statement that touches clipforge."""
    out = []
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name == "clipforge" or alias.name.startswith("clipforge."):
                out.append((alias.name, alias.asname))
                if not alias.asname:  # import clipforge.a.b binds clipforge
                    out.append(("clipforge", "clipforge"))
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and (
            node.module == "clipforge" or node.module.startswith("clipforge.")):
        for alias in node.names:
            if alias.name == "*":
                out.append((node.module, None))
            else:
                out.append((f"{node.module}.{alias.name}", alias.asname or alias.name))
    return out


def _stored_names(tree: ast.AST) -> set[str]:
    """Names the block binds other than by importing clipforge (these shadow an earlier clipforge alias)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)) and not _clipforge_imports(node):
            names.update((a.asname or a.name.split(".")[0]) for a in node.names if a.name != "*")
    return names


def _attribute_chain(node: ast.Attribute) -> list[str] | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


def _resolve_problem(where: str, line: int, dotted: str) -> list[str]:
    error = resolve(dotted)
    return [f"{where}:{line}: {dotted}: {error}"] if error else []


def resolve(dotted: str) -> str | None:
    """None when ``dotted`` (``clipforge.a.b``) names something real: a module, or an attribute reached by
    getattr from one, importing submodules as needed; otherwise the reason it does not."""
    return lookup(dotted)[1]


@functools.lru_cache(maxsize=None)
def lookup(dotted: str) -> tuple[object, str | None]:
    """(the object ``dotted`` names, None) or (None, the reason it names nothing)."""
    parts = dotted.split(".")
    try:
        obj = importlib.import_module(parts[0])
    except Exception as e:  # noqa: BLE001 - the message is the report
        return None, f"cannot import {parts[0]}: {type(e).__name__}: {e}"
    for i, part in enumerate(parts[1:], start=1):
        try:
            obj = getattr(obj, part)
            continue
        except AttributeError as e:
            missing = e
        except Exception as e:  # noqa: BLE001 - a lazy attribute whose import fails
            return None, f"{'.'.join(parts[:i + 1])}: {type(e).__name__}: {e}"
        if not isinstance(obj, type(sys)):
            return None, f"{type(obj).__name__} {'.'.join(parts[:i])} has no attribute {part!r}"
        name = f"{obj.__name__}.{part}"
        try:
            obj = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                return None, f"cannot import {name}: {e}"
            return None, f"{missing}"
        except Exception as e:  # noqa: BLE001
            return None, f"cannot import {name}: {type(e).__name__}: {e}"
    return obj, None


def _call_problem(where: str, call: ast.Call, dotted: str) -> list[str]:
    """A call of a clipforge function or class whose arguments its signature does not accept."""
    obj, error = lookup(dotted)
    if error or not callable(obj) or any(isinstance(a, ast.Starred) for a in call.args) or any(
            k.arg is None for k in call.keywords):
        return []
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return []
    try:
        signature.bind(*call.args, **{k.arg: k.value for k in call.keywords})
    except TypeError as e:
        return [f"{where}:{call.lineno}: {dotted}(...): {e}"]
    return []


def check_bash(block: Block) -> list[str]:
    """``bash -n`` on the block, then every clipforge command in it through the CLI's argparse parser."""
    where = display(block.path)
    syntax = subprocess.run(["bash", "-n", "-c", _padded(block)], capture_output=True, text=True)
    if syntax.returncode:
        message = re.sub(r"^bash: (-c: )?line (\d+): ", lambda m: f"{where}:{m[2]}: ", syntax.stderr.strip(),
                         flags=re.MULTILINE)
        return [message if message.startswith(where) else f"{where}:{block.line}: {message}"]
    problems = []
    for line, args in clipforge_commands(block.source, block.line):
        error = parse_cli(args)
        if error:
            problems.append(f"{where}:{line}: clipforge {shlex.join(args)}: {error}")
    return problems


_VAR = "\x00"  # stands for a shell expansion ($VAR, ${...}, $(...), `...`) inside a word


def clipforge_commands(source: str, first_line: int = 1) -> list[tuple[int, list[str]]]:
    """(line, arguments after ``clipforge``) for every clipforge command in a shell script."""
    found = []
    for line, text in _logical_lines(source, first_line):
        for inner in _substitutions(text):
            found += [(line, args) for _, args in clipforge_commands(inner, line)]
        for segment in _segments(text):
            args = _clipforge_args(segment)
            if args is not None:
                found.append((line, args))
    return found


def _logical_lines(source: str, first_line: int) -> list[tuple[int, str]]:
    """Lines joined over backslash continuations, without heredoc bodies, with their first line number."""
    out, pending, start, heredoc = [], "", None, None
    for number, raw in enumerate(source.splitlines(), start=first_line):
        if heredoc is not None:
            if raw.strip() == heredoc:
                heredoc = None
            continue
        if start is None:
            start = number
        if raw.rstrip().endswith("\\") and not raw.lstrip().startswith("#"):
            pending += raw.rstrip()[:-1] + " "
            continue
        text = pending + raw
        out.append((start, text))
        pending, start = "", None
        m = re.search(r"<<-?\s*(['\"]?)(\w+)\1", text)
        if m and not re.search(r"<<<", text):
            heredoc = m[2]
    if pending:
        out.append((start, pending))
    return out


def _closing_paren(text: str, start: int) -> int:
    """The index of the ``)`` that closes the ``(`` at ``start`` (``len(text)`` when none does)."""
    depth, j = 0, start
    while j < len(text):
        depth += {"(": 1, ")": -1}.get(text[j], 0)
        if depth == 0:
            break
        j += 1
    return j


def _substitutions(text: str) -> list[str]:
    """The commands inside ``$( ... )`` (balanced, outermost) in a line."""
    out, i = [], 0
    while (i := text.find("$(", i)) != -1:
        j = _closing_paren(text, i + 1)
        if not text.startswith("$((", i):
            out.append(text[i + 2:j])
        i = j + 1
    return out


def _mask_expansions(text: str) -> str:
    """Replace shell expansions by a placeholder character, so the line tokenizes as plain words."""
    out, i = [], 0
    while i < len(text):
        if text.startswith("$(", i):
            out.append(_VAR)
            i = _closing_paren(text, i + 1) + 1
        elif text.startswith("${", i):
            j = text.find("}", i)
            out.append(_VAR)
            i = len(text) if j == -1 else j + 1
        elif text[i] == "$" and i + 1 < len(text) and re.match(r"[\w@*#?!$-]", text[i + 1]):
            m = re.match(r"\$(\w+|.)", text[i:])
            out.append(_VAR)
            i += len(m[0])
        elif text[i] == "`":
            j = text.find("`", i + 1)
            out.append(_VAR)
            i = len(text) if j == -1 else j + 1
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


_REDIRECT = re.compile(r"(?<![\w=-])\d*(?:&>>?|>>?\|?&?|<<<|<<-?|<&?|>\|)\s*(?:&?\d+(?=\s|$)|[^\s;&|<>()]+)?")
_OPERATORS = {"|", "||", "&&", ";", "&", "(", ")", ";;", "|&", "{", "}", "!"}
_PREFIX_WORDS = {"do", "then", "else", "elif", "if", "while", "until", "time", "nohup", "exec", "command",
                 "env", "sudo", "builtin", "!"}


_QUOTED = re.compile(r"""("(?:[^"\\]|\\.)*"|'[^']*')""")


def _segments(text: str) -> list[list[str]]:
    """The simple commands of a line as word lists, without redirections (outside quotes) and operators."""
    chunks = _QUOTED.split(_mask_expansions(text))  # odd chunks are quoted strings
    masked = "".join(c if i % 2 else _REDIRECT.sub(" ", c) for i, c in enumerate(chunks))
    lexer = shlex.shlex(masked, posix=True, punctuation_chars=";&|()")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        tokens = list(lexer)
    except ValueError:  # unbalanced quotes: bash -n has reported it
        return []
    segments, current = [], []
    for token in tokens:
        if token in _OPERATORS or set(token) <= set(";&|()"):
            segments.append(current)
            current = []
        else:
            current.append(token)
    segments.append(current)
    return [s for s in segments if s]


def _clipforge_args(words: list[str]) -> list[str] | None:
    while words and (words[0] in _PREFIX_WORDS or re.match(r"^[A-Za-z_]\w*=", words[0])):
        words = words[1:]
    if len(words) >= 2 and words[0] == "timeout":
        words = words[2:]
    if not words:
        return None
    if os.path.basename(words[0]) == "clipforge":
        return words[1:]
    for i in range(len(words) - 1):
        if words[i] == "-m" and words[i + 1] == "clipforge":
            return words[i + 2:]
    return None


@functools.lru_cache(maxsize=1)
def _parser():
    from clipforge.cli import build_parser
    return build_parser()


def parse_cli(args: list[str]) -> str | None:
    """None when the clipforge CLI parses ``args`` (``--help`` included); otherwise argparse's error. A word
    holding a shell expansion is tried as ``1`` and as ``x``; an error only about such a word is not reported."""
    attempts = []
    for stand_in in ("1", "x"):
        words = [w.replace(_VAR, stand_in) for w in args]
        error = _parse_once(words)
        if error is None:
            return None
        attempts.append((error, {w for w, a in zip(words, args) if _VAR in a}))
    error = attempts[0][0]
    if any(f"'{w}'" in error for _, ws in attempts for w in ws):
        return None
    return error


def _parse_once(words: list[str]) -> str | None:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            _parser().parse_args(words)
    except SystemExit as e:
        if e.code in (0, None):
            return None
        return err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else f"exit {e.code}"
    return None
