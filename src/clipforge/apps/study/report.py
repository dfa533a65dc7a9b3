"""The study's report: ``report.md`` (figures as PNG files beside it) and the same as a self-contained
``report.html`` (figures inlined as base64), both rendered from one list of blocks.
"""
from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Sequence

from clipforge.apps.study.framework import CHOICES, Result, Scale
from clipforge.io.runs import write_files

PERCENT_WORDS = ("top-1", "top1", "accuracy")  # columns whose numbers are fractions shown as percentages
AGREES = {True: "yes", False: "no", None: "inconclusive"}
_STYLE = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em;line-height:1.45}"
          "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:.3em .6em;"
          "text-align:left;vertical-align:top}th{background:#f0f0f0}img{max-width:100%}")


# ----------------------------------------------------------------------------------------- cells
def format_cell(column: str, value) -> str:
    """A table value as text: ``mean ± std`` for a per-seed summary, percentages for accuracy columns."""
    percent = any(word in column.lower() for word in PERCENT_WORDS)

    def number(v: float, digits: str) -> str:
        return f"{v:.1%}" if percent else format(v, digits)

    if isinstance(value, dict) and {"mean", "std"} <= set(value):
        return f"{number(value['mean'], '.4g')} ± {number(value['std'], '.2g')}"
    if isinstance(value, bool) or value is None:
        return {True: "yes", False: "no", None: ""}[value]
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return number(value, ".4g")
    return str(value)


def _columns(rows: list[dict]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    return columns


# ---------------------------------------------------------------------------------------- blocks
def _reproduce(scale: Scale, seeds: int) -> str:
    """The command that runs this study again: the command line offers only ``CHOICES``; the tests' smaller
    scales are reached from Python."""
    if scale.name in CHOICES:
        return f"`clipforge study --scale {scale.name} --seeds {seeds}`"
    return (f"`clipforge.apps.study.run_study(OUTPUT, scale={scale.name!r}, seeds={seeds})` (a scale the command "
            "line does not offer)")


def _blocks(results: list[Result], scale: Scale, seeds: int, paper_order: Sequence[str]) -> list[tuple]:
    """The report as ("h1"|"h2"|"p"|"table"|"figure", ...) blocks, shared by the Markdown and HTML writers."""
    blocks = [("h1", "clipforge study: the CLIP paper's claims, measured at laptop scale"),
              ("p", f"Scale {scale.name!r}: model {_model_name(scale.model)}, {scale.steps} steps of batch "
                    f"{scale.batch_size} on {scale.train_samples:,} generated images of the {scale.world!r} built-in "
                    f"world; zero-shot is measured on {scale.eval_samples} images of colour-shape pairs never seen "
                    f"in training. Every number is a mean over {seeds} seed{'s' if seeds > 1 else ''} "
                    f"(± the seeds' standard deviation). Reproduce with {_reproduce(scale, seeds)}."),
              ("h2", "Summary"),
              ("table", ["experiment", "paper says", "measured here", "agrees?"],
               [[f"{r.title} [{r.section}]", r.paper, r.verdict, AGREES[r.agrees]] for r in results])]
    for result in results:
        number = f"{paper_order.index(result.name) + 1}. " if result.name in paper_order else ""
        columns = _columns(result.table)
        blocks += [("h2", f"{number}{result.title} [{result.section}]"),
                   ("p", f"**The paper:** {result.paper}"),
                   ("table", columns, [[format_cell(c, row.get(c)) for c in columns] for row in result.table]),
                   ("p", f"Mean ± standard deviation over {result.seeds} seed{'s' if result.seeds != 1 else ''}."),
                   ("figure", result.figure, result.title),
                   ("p", f"**Verdict:** {result.verdict}")]
    return blocks


def _model_name(model) -> str:
    return f"`{model}`" if isinstance(model, str) else "a custom config"


def _markdown(blocks: list[tuple]) -> str:
    lines = []
    for kind, *content in blocks:
        if kind in ("h1", "h2"):
            lines += ["#" * int(kind[1]) + " " + content[0], ""]
        elif kind == "p":
            lines += [content[0], ""]
        elif kind == "table":
            header, rows = content
            cell = lambda text: str(text).replace("|", "\\|").replace("\n", " ")  # noqa: E731
            lines += ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows] + [""]
        elif kind == "figure":
            lines += [f"![{content[1]}]({content[0]})", ""]
    return "\n".join(lines)


def _inline(text: str) -> str:
    """Escaped HTML of a paragraph, with Markdown's ``**bold**`` and ```code``` spans."""
    out, parts = [], html.escape(text).split("`")
    for i, part in enumerate(parts):
        if i % 2:
            out.append(f"<code>{part}</code>")
        else:
            bold = part.split("**")
            out.append("".join(f"<strong>{b}</strong>" if j % 2 else b for j, b in enumerate(bold)))
    return "".join(out)


def _html(blocks: list[tuple], folder: Path) -> str:
    body = []
    for kind, *content in blocks:
        if kind in ("h1", "h2"):
            body.append(f"<{kind}>{html.escape(content[0])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{_inline(content[0])}</p>")
        elif kind == "table":
            header, rows = content
            head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
            cells = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>")
        elif kind == "figure":
            data = base64.b64encode((folder / content[0]).read_bytes()).decode("ascii")
            body.append(f'<p><img alt="{html.escape(content[1])}" src="data:image/png;base64,{data}"></p>')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>clipforge study</title>"
            f"<style>{_STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(output: Path, results: list[Result], scale: Scale, seeds: int, paper_order: Sequence[str]) -> Path:
    """Write ``report.md`` and ``report.html`` into ``output`` (figures already saved there); returns report.md.

    ``paper_order``: every experiment's name in the paper's order, which numbers the report's sections."""
    blocks = _blocks(results, scale, seeds, paper_order)
    markdown, page = _markdown(blocks), _html(blocks, output)
    write_files(output, {"report.html": lambda p: p.write_text(page, encoding="utf-8")})
    write_files(output, {"report.md": lambda p: p.write_text(markdown, encoding="utf-8")})
    return output / "report.md"
