"""MkDocs hook: reST's ``::`` before a literal block, as the docstrings write it, renders as ``:``.

The docstrings are Google style, rendered as Markdown, where an indented block after a
paragraph is already a code block; the paragraph's closing ``::`` would stay on the page.
"""

from __future__ import annotations

import re
from typing import Any

LITERAL = re.compile(r"::(</p>)")


def on_page_content(html: str, page: Any, config: Any, files: Any) -> str:
    """Replace a paragraph's closing ``::`` with ``:``."""
    return LITERAL.sub(r":\1", html)
