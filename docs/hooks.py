"""MkDocs hooks for the ckptguard site (listed under ``hooks:`` in mkdocs.yml).

- Markers in the pages are filled from the code, so that the site never lags behind it:
  ``<!-- ckptguard:unsorted -->`` (the API page) becomes the names of ``ckptguard.__all__``
  that no section of that page documents yet, and ``<!-- ckptguard:errors -->`` (the
  troubleshooting page) the error tree with each error's meaning and hint.
- The docstrings use Sphinx roles (``:class:`ForeignRun```), which Markdown renders as
  ``:class:<code>ForeignRun</code>``; they become optional cross-references that
  mkdocs-autorefs resolves after every page is rendered: a name it knows becomes a link,
  any other stays code (no warning, so ``--strict`` builds pass). A reST ``::`` before a
  code block becomes ``:``.
"""

from __future__ import annotations

import ast
import inspect
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mkdocs.structure.pages import Page

SRC = Path(__file__).resolve().parent.parent / "src"
if str(SRC) not in sys.path:  # the package itself, even where it is not installed
    sys.path.insert(0, str(SRC))

UNSORTED = "<!-- ckptguard:unsorted -->"
ERRORS = "<!-- ckptguard:errors -->"

_ROLE = re.compile(r":(?:class|func|meth|attr|data|mod|exc|obj):<code>(~?)([\w.]+)</code>")
_DIRECTIVE = re.compile(r"^::: (ckptguard\.\w+)\s*$", re.MULTILINE)

# The module whose names an API page documents: a bare name in a docstring is looked up
# there first.
_PAGE_MODULE = {
    "api/ckptguard.md": "ckptguard",
    "api/transformers.md": "ckptguard.integrations.transformers",
    "api/accelerate.md": "ckptguard.integrations.accelerate",
    "api/lightning.md": "ckptguard.integrations.lightning",
    "api/testing.md": "ckptguard.testing",
}


def public_names() -> list[str]:
    """``ckptguard.__all__``, read from the source without importing it."""
    tree = ast.parse((SRC / "ckptguard" / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            return [str(v) for v in ast.literal_eval(node.value)]
    raise RuntimeError(f"no __all__ in {SRC / 'ckptguard' / '__init__.py'}")


def _unsorted(markdown: str) -> str:
    """A section for the public names that no ``::: ckptguard.X`` of the page documents."""
    documented = {m.removeprefix("ckptguard.") for m in _DIRECTIVE.findall(markdown)}
    missing = [n for n in public_names() if n not in documented and not n.startswith("__")]
    if not missing:
        return ""
    blocks = "\n\n".join(f"::: ckptguard.{name}" for name in missing)
    return f"## Other names\n\nNot yet sorted into a section above.\n\n{blocks}\n"


def _errors_table() -> str:
    """The error tree of ``ckptguard`` as a table: meaning, builtin base, what to do."""
    import ckptguard  # noqa: PLC0415 - the core imports without torch

    public = {n: getattr(ckptguard, n) for n in ckptguard.__all__}
    errors = {o for o in public.values() if inspect.isclass(o)}
    errors = {o for o in errors if issubclass(o, ckptguard.CheckpointError)}
    rows = [
        "| error | also a (builtin) | what it means | what to do |",
        "| --- | --- | --- | --- |",
    ]

    def walk(cls: type, depth: int) -> None:
        builtins = [c.__name__ for c in cls.__mro__[1:] if c.__module__ == "builtins"]
        builtins = [b for b in builtins if b not in {"Exception", "BaseException", "object"}]
        also = ", ".join(f"`{b}`" for b in dict.fromkeys(builtins)) or "-"
        doc = inspect.getdoc(cls) or ""
        meaning = doc.split("\n\n", 1)[0].replace("\n", " ").replace("``", "`")
        hint = str(getattr(cls, "default_hint", "") or "-").replace("|", "\\|")
        indent = "&nbsp;&nbsp;" * depth
        rows.append(
            f"| {indent}[`{cls.__name__}`][ckptguard.{cls.__name__}] | {also} | "
            f"{meaning.replace('|', chr(92) + '|')} | {hint} |"
        )
        subclasses: list[type] = sorted(cls.__subclasses__(), key=lambda c: c.__name__)
        for sub in subclasses:
            if sub in errors:
                walk(sub, depth + 1)

    walk(ckptguard.CheckpointError, 0)
    return "\n".join(rows) + "\n"


def on_page_markdown(markdown: str, **_: Any) -> str:
    """Fill the markers that are generated from the code."""
    if UNSORTED in markdown:
        markdown = markdown.replace(UNSORTED, _unsorted(markdown))
    if ERRORS in markdown:
        markdown = markdown.replace(ERRORS, _errors_table())
    return markdown


def on_page_content(html: str, page: Page, **_: Any) -> str:
    """Turn Sphinx roles left in rendered docstrings into optional cross-references."""
    module = _PAGE_MODULE.get(page.file.src_uri, "ckptguard")

    def link(match: re.Match[str]) -> str:
        tilde, name = match[1], match[2]
        identifier = name if name.startswith("ckptguard.") else f"{module}.{name}"
        title = name.rsplit(".", 1)[-1] if tilde else name
        return f'<autoref identifier="{identifier}" optional><code>{title}</code></autoref>'

    html = _ROLE.sub(link, html)
    html = html.replace("<p>::</p>", "")
    return re.sub(r"(\S)::</p>", r"\1:</p>", html)
