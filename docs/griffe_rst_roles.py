"""Griffe extension for the API pages: reads our docstrings' reStructuredText habits as Markdown.

The docstrings are Google style (``Args:``, ``Returns:``) but name other objects with Sphinx
roles (``:class:`~gradgraph.GradGraph```), write equations as ``.. math::`` blocks, and
document several arguments in one entry (``scale, flip: draw scales / signs at all.``).
mkdocstrings renders Markdown and parses one name per entry, so before parsing a role becomes
inline code of the name (with ``~``, the last part only), a math directive an indented code
block, and a grouped entry one entry per name with the shared description. Roles are not
turned into links: a role naming an object the reference does not render would then be a
broken reference, which fails the strict build.
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension, Object

ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj|math|ref|const):`(~?)([^`]+)`")
NAMED_SECTION = re.compile(r"^(\s*)(?:Args|Arguments|Parameters|Attributes|Keyword Args|Other Parameters):\s*$")
MATH_DIRECTIVE = re.compile(r"^(\s*)\.\. math::\s*$", re.MULTILINE)


def _role_to_code(match: re.Match) -> str:
    tilde, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def split_grouped_entries(text: str) -> str:
    """``a, b: text`` in an Args/Attributes section becomes ``a: text`` and ``b: text``.

    A group whose names run over two lines (the first ending in a comma) is joined first.
    """
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        section = NAMED_SECTION.match(lines[i])
        out.append(lines[i])
        i += 1
        if not section:
            continue
        entry_indent = None
        while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > len(section[1])):
            line = lines[i]
            if not line.strip():
                out.append(line)
                i += 1
                continue
            entry_indent = entry_indent if entry_indent is not None else _indent(line)
            if _indent(line) != entry_indent:  # a continuation line of an entry already emitted
                out.append(line)
                i += 1
                continue
            head = line.strip()
            if ":" not in head and head.endswith(",") and i + 1 < len(lines):
                i += 1
                head = f"{head} {lines[i].strip()}"
            body = []
            i += 1
            while i < len(lines) and lines[i].strip() and _indent(lines[i]) > entry_indent:
                body.append(lines[i])
                i += 1
            names, colon, description = head.partition(":")
            for name in names.split(",") if colon and "," in names else [names]:
                out.append(" " * entry_indent + f"{name.strip()}{colon}{description}")
                out.extend(body)
    return "\n".join(out)


def rst_to_markdown(text: str) -> str:
    """Sphinx roles to inline code, ``.. math::`` to an indented code block, one name per entry."""
    return split_grouped_entries(MATH_DIRECTIVE.sub(r"\1", ROLE.sub(_role_to_code, text)))


class RstRoles(Extension):
    """Rewrites every docstring once griffe has loaded its object."""

    def on_object(self, *, obj: Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value)
