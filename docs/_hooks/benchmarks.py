"""MkDocs hook: the measured tables of ``BENCHMARKS.md`` appear in the site as soon as they exist.

Pages mark a block ``<!-- benchmarks -->`` ... ``<!-- /benchmarks -->`` holding the text
shown while nothing is measured. Once ``BENCHMARKS.md`` (at the repository root) holds a
table, the block is replaced by that file's body: its title dropped, its headings moved
two levels down, and its relative links and pictures turned into plain text (they point
outside the site, and a dead link would fail the strict build).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

BLOCK = re.compile(r"<!-- benchmarks -->.*?<!-- /benchmarks -->", re.DOTALL)
LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")


def _plain_link(match: re.Match[str]) -> str:
    bang, text, target = match.groups()
    if re.match(r"[a-z]+://", target):
        return match.group(0) if not bang else f"[{text or target}]({target})"
    return f"{text} (`{target}`)" if text else f"`{target}`"


def benchmarks_markdown(path: Path) -> str | None:
    """The body of ``BENCHMARKS.md`` ready to include, or None while it holds no table."""
    if not path.is_file():
        return None
    lines = path.read_text(encoding="utf-8").splitlines()
    if not any(line.lstrip().startswith("|") for line in lines):
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
    """Replace the benchmarks block of a page once figures exist."""
    if "<!-- benchmarks -->" not in markdown:
        return markdown
    measured = benchmarks_markdown(Path(config["docs_dir"]).parent / "BENCHMARKS.md")
    return markdown if measured is None else BLOCK.sub(lambda _: measured, markdown)
