"""mkdocs hook: the docs' TeX maths, \\( inline \\) and $$ display $$, rendered to MathML when the site
is built (by latex2mathml), so pages show their equations offline, without a script from a CDN.
Browsers render MathML natively. Fenced code blocks and code spans are left as they are."""

from __future__ import annotations

import re

from latex2mathml.converter import convert

CODE = re.compile(r"(^```.*?^```|`[^`\n]+`)", re.S | re.M)
DISPLAY = re.compile(r"\$\$(.+?)\$\$", re.S)
INLINE = re.compile(r"\\\((.+?)\\\)", re.S)
# characters Markdown would read inside the MathML (emphasis, table cells, escapes), as entities
MARKDOWN_SAFE = str.maketrans({"*": "&#42;", "_": "&#95;", "|": "&#124;", "\\": "&#92;", "`": "&#96;"})


def mathml(tex: str, display: str) -> str:
    return convert(tex.strip(), display=display).replace("\n", " ").translate(MARKDOWN_SAFE)


def render(text: str) -> str:
    text = DISPLAY.sub(lambda m: "\n\n" + mathml(m.group(1), "block") + "\n\n", text)
    return INLINE.sub(lambda m: mathml(m.group(1), "inline"), text)


def on_page_markdown(markdown: str, **kwargs) -> str:
    parts = CODE.split(markdown)  # odd parts are code: kept verbatim
    return "".join(part if index % 2 else render(part) for index, part in enumerate(parts))
