"""MkDocs hook: the reference index lists every public name of every documented module.

The modules are read from the ``::: module`` directives of the reference pages, their
public names from each module's ``__all__`` (through griffe, as mkdocstrings sees them),
so the index cannot fall behind the pages. The marker ``<!-- public-names -->`` in
``reference/index.md`` is replaced by one table per module.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import griffe

MARKER = "<!-- public-names -->"
OTHER_MARKER = "<!-- other-modules -->"
PACKAGE = "tokenmerge"
DIRECTIVE = re.compile(r"^:::\s+([\w.]+)\s*$", re.MULTILINE)


def _nav_pages(nav: Any, prefix: str = "reference/") -> list[str]:
    """File names of the reference pages in the order of the site's navigation."""
    found: list[str] = []
    items = nav if isinstance(nav, list) else list(nav.values()) if isinstance(nav, dict) else [nav]
    for item in items:
        if isinstance(item, str):
            if item.startswith(prefix):
                found.append(item[len(prefix) :])
        else:
            found += _nav_pages(item, prefix)
    return found


#: Reference page order, from mkdocs.yml's nav (set by `on_config`); file-name order without it.
NAV_ORDER: list[str] = []


def explicit_modules(reference_dir: Path) -> list[tuple[str, str]]:
    """``(module, page)`` for every ``::: module`` directive written in the reference pages, in nav order."""
    found = []
    pages = sorted(
        reference_dir.glob("*.md"), key=lambda p: (NAV_ORDER.index(p.name) if p.name in NAV_ORDER else 99, p.name)
    )
    for page in pages:
        for module in DIRECTIVE.findall(page.read_text(encoding="utf-8")):
            found.append((module, page.name))
    return found


def public_modules(root: Path) -> list[str]:
    """Every module of the package whose dotted path has no part starting with ``_``."""
    package = griffe.load(PACKAGE, search_paths=[str(root)], resolve_aliases=False)
    found: list[str] = []

    def walk(module: Any) -> None:
        found.append(module.path)
        for name, member in module.members.items():
            if not member.is_alias and member.is_module and not name.startswith("_"):
                walk(member)

    walk(package)
    return sorted(found)


def _exports(module: Any) -> list[str]:
    return [name for name in module.exports or [] if not name.startswith("_")]


def _canonical(module: Any, name: str) -> str:
    member = module[name]
    return member.target_path if member.is_alias else member.path


def other_modules(root: Path, reference_dir: Path) -> dict[str, list[str] | None]:
    """Public modules no reference page documents, with the names left to document (None: all).

    A module whose public names are all re-exported by an explicitly documented module
    (``tokenmerge.policies.base`` through ``tokenmerge.policies``, say) is documented there;
    one with some re-exported names lists only the others.
    """
    package = griffe.load(PACKAGE, search_paths=[str(root)], resolve_aliases=False)

    def get(path: str) -> Any:
        module = package
        for part in path.split(".")[1:]:
            module = module[part]
        return module

    explicit = {module for module, _ in explicit_modules(reference_dir)}
    covered: set[str] = set()
    for path in explicit:
        module = get(path)
        covered.update(_canonical(module, name) for name in _exports(module))
    others: dict[str, list[str] | None] = {}
    for path in public_modules(root):
        if path in explicit:
            continue
        names = _exports(get(path))
        left = [name for name in names if f"{path}.{name}" not in covered]
        if names and not left:
            continue
        others[path] = left if len(left) < len(names) else None
    return others


def other_modules_markdown(root: Path, reference_dir: Path) -> str:
    """``::: module`` directives for `other_modules`."""
    parts = []
    for module, names in other_modules(root, reference_dir).items():
        if names is None:
            parts.append(f"::: {module}")
        else:
            parts.append(f"::: {module}\n    options:\n      members: [{', '.join(names)}]")
    return "\n\n".join(parts) or "Every public module has a page of its own."


def documented_modules(reference_dir: Path) -> list[tuple[str, str, list[str] | None]]:
    """``(module, page, names)`` for every documented module: the explicit ones, then the others.

    ``names`` are the public names documented with the module (None: all of them).
    """
    root = reference_dir.parent.parent
    explicit = [(module, page, None) for module, page in explicit_modules(reference_dir)]
    return explicit + [(module, "modules.md", names) for module, names in other_modules(root, reference_dir).items()]


def _summary(obj: Any) -> str:
    docstring = obj.docstring
    if docstring is not None and docstring.value.strip():
        return docstring.value.strip().splitlines()[0].replace("|", "\\|")
    value = getattr(obj, "value", None)
    return f"`= {value}`".replace("|", "\\|") if value is not None else ""


def public_names_markdown(root: Path, reference_dir: Path) -> str:
    """One table per documented module: each public name, linked to its entry, and its summary."""
    parts = []
    loaded: dict[str, Any] = {}
    for module_path, page, only in documented_modules(reference_dir):
        package = module_path.split(".")[0]
        if package not in loaded:
            loaded[package] = griffe.load(
                package, search_paths=[str(root)], resolve_aliases=True, resolve_external=False
            )
        module = loaded[package]
        for part in module_path.split(".")[1:]:
            module = module[part]
        if not module.is_module:
            continue
        names = only if only is not None else _exports(module)  # not __version__
        if not names:
            continue
        rows = [f"| [`{name}`][{module_path}.{name}] | {_summary(module[name])} |" for name in names]
        parts.append(
            f"### `{module_path}`\n\nDocumented on [{module_path}]({page}).\n\n| name | what it is |\n| --- | --- |\n"
            + "\n".join(rows)
        )
    return "\n\n".join(parts)


def on_config(config: Any) -> Any:
    """Remember the order of the reference pages in the navigation."""
    NAV_ORDER[:] = _nav_pages(config["nav"] or [])
    return config


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Fill the markers of ``reference/index.md`` and ``reference/modules.md``."""
    docs_dir = Path(config["docs_dir"])
    reference_dir = docs_dir / "reference"
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, public_names_markdown(docs_dir.parent, reference_dir))
    if OTHER_MARKER in markdown:
        markdown = markdown.replace(OTHER_MARKER, other_modules_markdown(docs_dir.parent, reference_dir))
    return markdown
