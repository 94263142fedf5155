"""Griffe extension: a class's fields are described once, on the fields themselves.

A dataclass field or an attribute set in ``__init__`` has no docstring of its own; its
description is in the class docstring's ``Attributes:`` (or ``Args:``) section, or on
the base class it overrides. Without this, the reference lists such a name twice: in the
section's table, and as a member with no text. This copies each description onto its
member (the site hides the attribute tables: ``show_docstring_attributes: false``).
"""

from __future__ import annotations

from typing import Any

import griffe


class FieldDocs(griffe.Extension):
    """Give each undocumented class attribute the description its class's docstring holds."""

    def on_class_members(self, *, cls: griffe.Class, **kwargs: Any) -> None:
        """Describe the members of ``cls`` that have no docstring: from its ``Attributes:`` or ``Args:``
        section (a dataclass field is both), else from the same attribute of a base class."""
        described: dict[str, str] = {}
        if cls.docstring is not None:
            for section in cls.docstring.parse("google"):
                if section.kind in (griffe.DocstringSectionKind.attributes, griffe.DocstringSectionKind.parameters):
                    for item in section.value:
                        if item.description:
                            described.setdefault(item.name, item.description)
        for name, member in cls.members.items():
            if member.is_alias or member.docstring is not None:
                continue
            text = described.get(name) or _inherited(cls, name)
            if text:
                member.docstring = griffe.Docstring(text, parent=member)


def _inherited(cls: griffe.Class, name: str) -> str | None:
    """The docstring of attribute ``name`` in the nearest base class of ``cls`` that documents it."""
    try:
        bases = cls.resolved_bases
    except Exception:  # a base outside the loaded packages
        return None
    for base in bases:
        member = base.members.get(name)
        if member is not None and not member.is_alias and member.docstring is not None:
            return member.docstring.value
        found = _inherited(base, name)
        if found:
            return found
    return None
