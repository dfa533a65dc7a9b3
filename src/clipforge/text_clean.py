"""OpenAI's CLIP text cleaning (ftfy, HTML unescaped twice, whitespace collapsed, lower case), exact and fast.

``clean_text`` is the plain definition. ``clean_chunks`` gives the same words without running ftfy where it
provably changes nothing (printable ASCII without '&'), and otherwise re-runs ftfy's own fixes with a
per-character table, searching for mojibake only near the characters mojibake is made of.
"""
from __future__ import annotations

import html
import re as stdlib_re
import sys
import unicodedata
from functools import cached_property
from typing import Iterable

import ftfy
import ftfy.badness
import ftfy.fixes
import regex

if sys.version_info >= (3, 11):
    from re import _parser as _sre
else:
    import sre_parse as _sre

_WHITESPACE = regex.compile(r"\s+")
# Printable ASCII, tab, CR and LF without '&' is left as it is by ftfy.fix_text but for CR -> LF (its other
# fixes need other characters) and by html.unescape (which needs '&'): it goes straight to lower-casing.
_NEEDS_FULL_CLEAN = stdlib_re.compile(r"[^\t\n\r\x20-\x25\x27-\x7e]")
# ftfy's character fixes in the order fix_text applies them. Each maps a character to a string on its own,
# except CR (CR LF), ESC (escape sequences) and surrogates (pairs).
_FTFY_CHAR_FIXES = ("fix_c1_controls", "fix_latin_ligatures", "fix_character_width", "uncurl_quotes",
                    "fix_line_breaks", "fix_surrogates", "remove_terminal_escapes", "remove_control_chars")
_NOT_LOCAL = stdlib_re.compile("[\r\x1b\ud800-\udfff]")
_MAX_FTFY_SEGMENT = 1_000_000  # fix_text's default max_decode_length


def clean_text(text: str) -> str:
    """OpenAI's text cleaning: ftfy, HTML unescaped twice, whitespace runs collapsed, lower-cased."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WHITESPACE.sub(" ", text).strip().lower()


def clean_chunks(text: str) -> list[str]:
    """``clean_text(text).split(" ")`` (nothing for empty text), fast.

    ``str.split()`` splits where regex's \\s matches, except at U+001C..U+001F, which ftfy and
    html.unescape remove; lower-casing neither makes nor removes whitespace.
    """
    if text.isascii() and "&" not in text and (text.isprintable() or _NEEDS_FULL_CLEAN.search(text) is None):
        return text.lower().split()
    return html.unescape(html.unescape(_FTFY.fix_text(text))).lower().split()


# ---- ftfy.fix_text, exactly and fast ----

def _literal_chars(item) -> set[str] | None:
    """The characters one parsed regex item matches, or None unless it is a literal or a plain class."""
    op, value = item
    if op is _sre.LITERAL:
        return {chr(value)}
    if op is not _sre.IN:
        return None
    chars = set()
    for kind, member in value:
        if kind is _sre.LITERAL:
            chars.add(chr(member))
        elif kind is _sre.RANGE:
            chars.update(map(chr, range(member[0], member[1] + 1)))
        else:  # a category or a negation: an open-ended set
            return None
    return chars


def _walk(tree) -> Iterable[tuple]:
    """All (op, value) items of a parsed regex, nested ones included."""
    for op, value in tree:
        yield op, value
        for part in value if isinstance(value, (tuple, list)) else ():
            for sub in part if isinstance(part, list) else [part]:
                if isinstance(sub, _sre.SubPattern):
                    yield from _walk(sub)


def _mojibake_prefilter(pattern: stdlib_re.Pattern) -> tuple[stdlib_re.Pattern, int] | None:
    """A character class that every match of ``pattern`` contains, and the longest match; None if not found.

    Every alternative of ftfy's mojibake regex needs one of a few hundred non-ASCII characters, and its
    matches are a few characters long, so only short windows around those characters need searching.
    Shown by parsing the pattern: lookarounds, word boundaries or long matches disable the shortcut.
    """
    safe_ops = {_sre.LITERAL, _sre.NOT_LITERAL, _sre.IN, _sre.ANY, _sre.BRANCH, _sre.SUBPATTERN,
                _sre.MAX_REPEAT, _sre.MIN_REPEAT, _sre.AT}
    edge_anchors = {_sre.AT_BEGINNING, _sre.AT_BEGINNING_STRING, _sre.AT_END, _sre.AT_END_STRING}
    if pattern.flags & (stdlib_re.IGNORECASE | stdlib_re.MULTILINE):
        return None
    try:
        tree = _sre.parse(pattern.pattern, pattern.flags)
        width = tree.getwidth()[1]
        if width > 64 or any(op not in safe_ops or op is _sre.AT and v not in edge_anchors for op, v in _walk(tree)):
            return None
        alternatives = tree.data[0][1][1] if len(tree.data) == 1 and tree.data[0][0] is _sre.BRANCH else [tree]
        witnesses = set()
        for alternative in alternatives:
            required = [s for s in map(_literal_chars, alternative) if s and min(map(ord, s)) >= 0x80]
            if not required:
                return None
            witnesses |= min(required, key=len)
    except (AttributeError, IndexError, TypeError, ValueError, stdlib_re.error):
        return None
    return stdlib_re.compile("[" + "".join(map(stdlib_re.escape, sorted(witnesses))) + "]"), width


def _ftfy_segments(text: str) -> list[str]:
    """fix_text's segments: lines with their line break."""
    if "\n" not in text:
        return [text] if text else []
    lines = text.split("\n")
    return [line + "\n" for line in lines[:-1]] + ([lines[-1]] if lines[-1] else [])


class _FtfyShortcut:
    """``ftfy.fix_text``, exactly, at a fraction of its cost.

    fix_text repeats on each line: unescape HTML, fix the encoding if the mojibake test
    (``badness.is_bad``) fires, apply fixes that act character by character, normalize to NFC. This runs
    the same loop, calling ftfy's encoding fix only where needed, searching for mojibake only around the
    characters every mojibake match holds, and taking the character fixes from a table filled as new
    characters appear. Text with CR, escape sequences or surrogates goes to ftfy itself.
    """

    def __init__(self):
        self.unchanged = {chr(c) for c in range(0x20, 0x7F)} | {"\t", "\n"}
        self.replacements: dict[str, str] = {}  # character -> its fixed string
        self.not_local: set[str] = set()

    @cached_property
    def prefilter(self) -> tuple[stdlib_re.Pattern, int] | None:
        """``_mojibake_prefilter`` of ftfy's mojibake regex, worked out when first needed (not at import)."""
        return _mojibake_prefilter(ftfy.badness.BADNESS_RE)

    def fix_text(self, text: str) -> str:
        """Exactly ``ftfy.fix_text(text)`` with the default configuration."""
        if len(text) > _MAX_FTFY_SEGMENT:
            return ftfy.fix_text(text)
        fixed, unescape = [], True
        for segment in _ftfy_segments(text):
            unescape = unescape and "<" not in segment  # fix_text stops unescaping HTML from the first '<' on
            fixed_segment = self._fix_segment(segment, unescape)
            if fixed_segment is None:
                return ftfy.fix_text(text)
            fixed.append(fixed_segment)
        return "".join(fixed)

    def _fix_segment(self, text: str, unescape: bool) -> str | None:
        """fix_and_explain's loop on one segment; None if a character fix is not local."""
        while True:
            start = text
            if unescape and "&" in text:
                text = ftfy.fixes.unescape_html(text)
            if not text.isascii() and self._may_be_mojibake(text):
                text = ftfy.fix_encoding(text)  # fix_text calls it always; it returns early unless is_bad
            fixes = self._character_fixes(set(text) - self.unchanged)
            if fixes is None:
                return None
            if fixes:
                text = _replace_characters(text, fixes)
            if not unicodedata.is_normalized("NFC", text):
                text = unicodedata.normalize("NFC", text)
            if text == start:
                return text

    def _may_be_mojibake(self, text: str) -> bool:
        """``ftfy.badness.is_bad(text)``, searching only the windows around characters all matches contain."""
        if self.prefilter is None:
            return ftfy.badness.is_bad(text)
        witnesses, width = self.prefilter
        windows: list[list[int]] = []
        for match in witnesses.finditer(text):
            start, end = max(0, match.start() - width + 1), match.start() + width
            if windows and start <= windows[-1][1]:
                windows[-1][1] = end
            else:
                windows.append([start, end])
        bad = ftfy.badness.BADNESS_RE
        return any(bad.search(text, start, end) for start, end in windows)  # '^' still means the real start

    def _character_fixes(self, chars: set[str]) -> dict[str, str] | None:
        """The fixed strings of those ``chars`` that change, learning new ones; None if one is not local."""
        fixes = {}
        for c in chars:
            if c in self.not_local:
                return None
            fixed = self.replacements.get(c)
            if fixed is None:
                fixed = c
                for name in _FTFY_CHAR_FIXES:
                    fixed = getattr(ftfy.fixes, name)(fixed)
                if _NOT_LOCAL.search(c + fixed):
                    self.not_local.add(c)
                    return None
                if fixed == c:
                    self.unchanged.add(c)
                    continue
                self.replacements[c] = fixed
            fixes[c] = fixed
        return fixes


def _replace_characters(text: str, fixes: dict[str, str]) -> str:
    """Replace each character of ``fixes`` in ``text`` by its string, all at once as str.translate does."""
    if any(c in fixes for fixed in fixes.values() for c in fixed):
        return text.translate({ord(c): fixed for c, fixed in fixes.items()})
    for c, fixed in fixes.items():  # no replacement holds another replaced character: one pass each
        text = text.replace(c, fixed)
    return text


_FTFY = _FtfyShortcut()
