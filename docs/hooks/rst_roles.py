"""mkdocs hook: reStructuredText habits of the docstrings, rendered as plain markdown would.

The package's docstrings cross-reference with Sphinx roles (``:func:`x```), which mkdocstrings
renders as the literal role name before the code span, and introduce literal blocks with a
paragraph ending in ``::``, which markdown keeps. Drop the role (the code span stays) and the
second colon (the indented block is already code in markdown).
"""

from __future__ import annotations

import re

_ROLE = re.compile(r":(?:func|class|data|meth|mod|attr|obj|exc):(?=<code>)")
_LITERAL_INTRO = re.compile(r"::(?=</p>)")


def on_page_content(html: str, page, config, files) -> str:
    return _LITERAL_INTRO.sub(":", _ROLE.sub("", html))
