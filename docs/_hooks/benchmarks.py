"""MkDocs hook: the tables of ``BENCHMARKS.md`` appear in the site as soon as they exist.

Pages mark a block holding the text shown until then:

* ``<!-- benchmarks -->`` ... ``<!-- /benchmarks -->``: replaced by the whole body of
  ``BENCHMARKS.md`` once it holds a table;
* ``<!-- benchmarks:Summary -->`` ... ``<!-- /benchmarks -->``: replaced by the body of
  its ``## Summary`` section (any ``## `` section by name; the heading itself is left
  to the page) only once that section holds a *measured* figure: a table row
  with a time, a speed-up or a throughput (``12.3 ms``, ``1.31x``, ``511 images/s``)
  that is neither a target (``>=``) nor marked *open*.

The included text loses the file's title, its headings move two levels down, and its
relative links and pictures become plain text (they point outside the site, and a dead
link would fail the strict build).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

BLOCK = re.compile(r"<!-- benchmarks(?::([^>]*?))? -->.*?<!-- /benchmarks -->", re.DOTALL)
LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")
FIGURE = re.compile(r"\d(?:\.\d+)?\s*(?:x\b|ms\b|s\b|images/s)")


def _plain_link(match: re.Match[str]) -> str:
    bang, text, target = match.groups()
    if re.match(r"[a-z]+://", target):
        return match.group(0) if not bang else f"[{text or target}]({target})"
    return f"{text} (`{target}`)" if text else f"`{target}`"


def _section(lines: list[str], name: str) -> list[str] | None:
    """The lines under ``## name`` up to the next ``## `` heading, or None."""
    start = next((i for i, line in enumerate(lines) if line.strip() == f"## {name}"), None)
    if start is None:
        return None
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return lines[start:end]


def has_measured_figure(lines: list[str]) -> bool:
    """Whether a table row holds a measured figure (not a target, not *open*)."""
    return any(
        line.lstrip().startswith("|") and FIGURE.search(line) and ">=" not in line and "*open*" not in line
        for line in lines
    )


def benchmarks_markdown(path: Path, section: str | None = None) -> str | None:
    """The text of ``BENCHMARKS.md`` to include (see the module docstring), or None for none yet."""
    if not path.is_file():
        return None
    lines = path.read_text(encoding="utf-8").splitlines()
    if section is not None:
        chosen = _section(lines, section)
        if chosen is None or not has_measured_figure(chosen):
            return None
        lines = chosen[1:]  # the page gives the section its own heading
    elif not any(line.lstrip().startswith("|") for line in lines):
        return None
    body = []
    for line in lines:
        if line.startswith("# "):
            continue  # the file's title
        if line.startswith("#"):
            line = "##" + line
        body.append(LINK.sub(_plain_link, line))
    return "\n".join(body).strip() + "\n\n*From `BENCHMARKS.md` in the repository.*"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Replace each benchmarks block of a page whose figures exist."""
    if "<!-- benchmarks" not in markdown:
        return markdown
    path = Path(config["docs_dir"]).parent / "BENCHMARKS.md"

    def replace(match: re.Match[str]) -> str:
        included = benchmarks_markdown(path, match.group(1))
        return match.group(0) if included is None else included

    return BLOCK.sub(replace, markdown)
