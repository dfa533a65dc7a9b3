"""Search queries: weighted, signed terms (text, an image, an indexed item) and the query syntax
``"beach + 0.5:sunset - people"``, ``./query.jpg + "at night"``, ``id:42``."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from clipforge.data import is_image_name

KINDS = ("text", "image", "bytes", "id")
_WEIGHT = re.compile(r"^([+-]?(?:\d+\.?\d*|\.\d+)):(.+)$", re.DOTALL)
_ID = re.compile(r"^id:(\d+)$")
_TAG = re.compile(r'(?<![^\s])tag:([^\s"]+)')


@dataclass(frozen=True)
class Term:
    """One part of a query: ``kind`` text | image (a path) | bytes (an encoded image) | id, and its weight."""

    kind: str
    value: object
    weight: float = 1.0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"a query term's kind must be one of {', '.join(KINDS)}, got {self.kind!r}")


@dataclass(frozen=True)
class Query:
    """A list of weighted terms; its vector is the weighted sum of the terms' L2-normalised embeddings,
    renormalised."""

    terms: tuple[Term, ...]
    tags: tuple[str, ...] = ()  # ``tag:LABEL`` filters: only items tagged with every one (``clipforge tag``)

    @classmethod
    def from_terms(cls, terms) -> "Query":
        """From ``Term`` objects, ``(kind, value[, weight])`` tuples or ``{"text": ..., "weight": ...}``
        dicts (one of the keys text / image / bytes / id)."""
        parsed = tuple(_term(t) for t in terms)
        if not parsed:
            raise ValueError("a query needs at least one term (text, an image or an item id)")
        return cls(parsed)


def _term(term) -> Term:
    if isinstance(term, Term):
        return term
    if isinstance(term, dict):
        kinds = [k for k in KINDS if k in term]
        if len(kinds) != 1:
            raise ValueError(f"a query term needs exactly one of {', '.join(KINDS)}, got {sorted(term)}")
        return Term(kinds[0], term[kinds[0]], float(term.get("weight", 1.0)))
    if isinstance(term, (tuple, list)) and len(term) in (2, 3):
        return Term(term[0], term[1], float(term[2]) if len(term) == 3 else 1.0)
    raise ValueError(f"cannot read query term {term!r}: give a Term, a (kind, value, weight) tuple or a dict")


def parse_query(text: str, look_up_files: bool = True) -> Query:
    """Parse the query syntax. Terms are separated by ``+`` or ``-`` standing alone between spaces (a minus
    negates the next term's weight); ``W:term`` weights a term; ``id:N`` is indexed item N; a word naming
    an existing file, or ending in an image extension, is an image; anything else, or text in double
    quotes, is text. ``t-shirt`` and ``"rock - paper"`` stay one text term. ``look_up_files=False`` decides
    by the name alone, never asking the file system (a service must not tell clients which files exist).
    ``tag:LABEL`` (``_`` for a space) is a filter, not a term: only items ``clipforge tag`` gave that label."""
    tags = tuple(dict.fromkeys(m.replace("_", " ") for m in _TAG.findall(text)))
    if tags:  # filters, not terms: what is left is the query; a query of tags alone searches for their names
        text = _TAG.sub(" ", text)
        text = re.sub(r"(?<!\S)([+-])(\s+[+-](?!\S))+", r"\1", text)  # "a + tag:x + b": one operator left
        text = re.sub(r"^(\s*[+-](?!\S))+|((?<!\S)[+-]\s*)+$", "", text).strip()
        if not text:
            return Query((Term("text", ", ".join(tags)),), tags)
        return Query(parse_query(text, look_up_files).terms, tags)
    terms, words, sign, quoted = [], [], 1.0, False
    for token, is_quoted in _tokens(text):
        if not is_quoted and token in ("+", "-"):
            if words:
                terms.append(_parse_term(words, sign, quoted, look_up_files))
            elif terms or token == "+":
                raise ValueError(f"query {text!r}: {token!r} must stand between two terms")
            words, quoted, sign = [], False, (-1.0 if token == "-" else 1.0)
            continue
        words.append(token)
        quoted = quoted or is_quoted
    if not words:
        raise ValueError(f"query {text!r} is empty or ends with an operator: give text, an image path or id:N")
    terms.append(_parse_term(words, sign, quoted, look_up_files))
    return Query(tuple(terms))


def _tokens(text: str):
    """(token, quoted) pairs: double-quoted runs are one token; other tokens split on whitespace."""
    for match in re.finditer(r'"([^"]*)"|(\S+)', text):
        if match.group(1) is not None:
            yield match.group(1), True
        else:
            yield match.group(2), False


def _parse_term(words: list[str], sign: float, quoted: bool, look_up_files: bool) -> Term:
    body, weight = " ".join(words), 1.0
    found = _WEIGHT.match(words[0])
    if found and not (quoted and len(words) == 1):
        weight = float(found.group(1))
        body = " ".join([found.group(2)] + words[1:])
        if body.startswith('"') and body.endswith('"') and len(body) > 1:
            body = body[1:-1]
    weight *= sign
    if quoted and not found:
        return Term("text", body, weight)
    if _ID.match(body):
        return Term("id", int(_ID.match(body).group(1)), weight)
    if len(words) == 1 or found:
        path = os.path.expanduser(body)
        if (look_up_files and os.path.isfile(path)) or (is_image_name(os.path.basename(path)) and " " not in body):
            return Term("image", path, weight)
    return Term("text", body, weight)
