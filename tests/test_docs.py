"""The documentation: the site builds offline and strictly, and its examples match the API.

The site is built once (``mkdocs build --strict`` into a temporary dir, a few seconds).
mkdocs is part of the ``dev`` extra: if it is missing, the build fails and so do these
tests (they are never skipped). The examples of the README and of every page are parsed:
each Python block must compile, and every ``ckptguard`` name, keyword argument and method
it uses must exist in the code.
"""

from __future__ import annotations

import ast
import html
import importlib
import inspect
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import ckptguard
from ckptguard._tools.cli import main as cli_main

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
_FENCE = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)

# The API pages and the module each documents.
API_PAGES = {
    "ckptguard": "api/ckptguard/index.html",
    "ckptguard.integrations.transformers": "api/transformers/index.html",
    "ckptguard.integrations.accelerate": "api/accelerate/index.html",
    "ckptguard.integrations.lightning": "api/lightning/index.html",
    "ckptguard.testing": "api/testing/index.html",
}
# Modules whose examples are checked against their real signatures: they import without
# torch or a framework. Lightning's module imports both: its names are checked statically.
IMPORTABLE = {
    "ckptguard",
    "ckptguard.testing",
    "ckptguard.integrations.transformers",
    "ckptguard.integrations.accelerate",
}


@dataclass
class Site:
    """A built site and the build's log."""

    path: Path
    log: str

    def page(self, relative: str) -> str:
        return (self.path / relative).read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    out = tmp_path_factory.mktemp("site")
    command = [sys.executable, "-m", "mkdocs", "build", "--strict"]
    build = subprocess.run(
        [*command, "-f", str(ROOT / "mkdocs.yml"), "-d", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    log = build.stdout + build.stderr
    assert build.returncode == 0, (
        f"mkdocs build --strict failed (is the dev extra installed?)\n{log}"
    )
    return Site(out, log)


def static_all(module: str) -> list[str]:
    """A module's ``__all__``, read from its source (nothing imported)."""
    parts = module.split(".")
    path = SRC.joinpath(*parts).with_suffix(".py")
    if not path.exists():
        path = SRC.joinpath(*parts, "__init__.py")
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            return [str(v) for v in ast.literal_eval(node.value)]
    raise AssertionError(f"{module} has no __all__")


# -- the site ----------------------------------------------------------------------------------
def test_site_builds_strictly_without_warnings(site: Site) -> None:
    problems = [line for line in site.log.splitlines() if re.match(r"\s*(WARNING|ERROR)\b", line)]
    assert not problems, "\n".join(problems)
    assert (site.path / "index.html").exists()


def test_every_public_name_has_its_entry_in_the_api_reference(site: Site) -> None:
    for module, page in API_PAGES.items():
        content = site.page(page)
        assert "Traceback" not in content
        names = [n for n in static_all(module) if not n.startswith("__")]
        assert names, module
        missing = [n for n in names if f'id="{module}.{n}"' not in content]
        assert not missing, f"{page} does not document {missing}"


def test_api_reference_holds_the_main_entry_points(site: Site) -> None:
    api = site.page(API_PAGES["ckptguard"])
    for name in ("CheckpointManager", "atomic_checkpoint", "verify", "recover", "doctor"):
        assert f'id="ckptguard.{name}"' in api
    for method in ("save", "restore", "latest", "list", "verify", "wait", "close", "pin"):
        assert f'id="ckptguard.CheckpointManager.{method}"' in api
    assert 'id="ckptguard.integrations.transformers.protect"' in site.page(
        API_PAGES["ckptguard.integrations.transformers"]
    )
    assert 'id="ckptguard.integrations.accelerate.protect"' in site.page(
        API_PAGES["ckptguard.integrations.accelerate"]
    )
    assert 'id="ckptguard.integrations.lightning.AtomicCheckpointIO"' in site.page(
        API_PAGES["ckptguard.integrations.lightning"]
    )
    assert 'id="ckptguard.testing.FaultyStorage"' in site.page(API_PAGES["ckptguard.testing"])


def test_pages_hold_no_unrendered_directive_or_sphinx_role(site: Site) -> None:
    for html_file in site.path.rglob("*.html"):
        content = html_file.read_text(encoding="utf-8")
        where = html_file.relative_to(site.path)
        assert "::: ckptguard" not in content, where
        assert "::: mkdocs-click" not in content, where
        assert not re.search(r":(class|func|meth|data|mod|attr|exc):<code>", content), where


def test_command_reference_lists_every_subcommand(site: Site) -> None:
    text = html.unescape(site.page("api/cli/index.html"))
    assert cli_main.commands
    for name, command in cli_main.commands.items():
        assert f"ckptguard {name}" in text, name
        assert command.get_short_help_str(limit=40)[:20] in text, name


def test_error_table_lists_every_error(site: Site) -> None:
    content = site.page("troubleshooting/index.html")
    for name in ckptguard.__all__:
        obj = getattr(ckptguard, name)
        if inspect.isclass(obj) and issubclass(obj, ckptguard.CheckpointError):
            assert f"<code>{name}</code>" in content, name


def test_site_needs_no_network(site: Site) -> None:
    """No page loads a script, a style sheet or a font from elsewhere (links are fine)."""
    remote = re.compile(
        r"<(?:script|img|iframe)[^>]+src=\"(?:https?:)?//|<link[^>]+href=\"(?:https?:)?//"
    )
    for page in [*site.path.rglob("*.html"), *site.path.rglob("*.css")]:
        text = page.read_text(encoding="utf-8", errors="replace")
        assert not remote.search(text), page.relative_to(site.path)
        if page.suffix == ".css":
            assert not re.search(r"@import\s+url\(\s*[\"']?(?:https?:)?//", text), page


# -- the examples ------------------------------------------------------------------------------
def test_readme_names_the_test_command() -> None:
    assert "make test" in (ROOT / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_python_example_compiles(page: Path) -> None:
    for source in _FENCE.findall(page.read_text(encoding="utf-8")):
        compile(source, str(page.relative_to(ROOT)), "exec")


class _Instance:
    """A variable known to hold an instance of ``cls`` (``mgr = CheckpointManager(...)``)."""

    def __init__(self, cls: type) -> None:
        self.cls = cls


def _has_attribute(cls: type, name: str) -> bool:
    """Whether instances of ``cls`` have ``name``: a class attribute, a field, or set in code."""
    if hasattr(cls, name):
        return True
    fields = getattr(cls, "__dataclass_fields__", {})
    if name in fields:
        return True
    source = inspect.getsource(cls)
    return re.search(rf"\bself\.{re.escape(name)}\b[^\n=]*=(?!=)", source) is not None


def _resolve(node: ast.expr, env: dict[str, Any], where: str) -> Any:
    """The ckptguard object an expression names, or None if it names something else."""
    if isinstance(node, ast.Name):
        return env.get(node.id)
    if isinstance(node, ast.Attribute):
        base = _resolve(node.value, env, where)
        if base is None:
            return None
        if isinstance(base, _Instance):
            assert _has_attribute(base.cls, node.attr), (
                f"{where}: {base.cls.__name__} has no {node.attr!r} ({ast.unparse(node)})"
            )
            return getattr(base.cls, node.attr, None)
        assert hasattr(base, node.attr), f"{where}: {ast.unparse(node)} does not exist"
        return getattr(base, node.attr)
    return None


def _check_call(call: ast.Call, env: dict[str, Any], where: str) -> None:
    target = _resolve(call.func, env, where)
    if target is None or not callable(target):
        return
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    names = {p.name for p in params if p.kind is not inspect.Parameter.POSITIONAL_ONLY}
    for keyword in call.keywords:
        if keyword.arg is not None:
            assert keyword.arg in names, (
                f"{where}: {ast.unparse(call.func)}() takes no argument {keyword.arg!r}"
            )


def _bind(node: ast.stmt, env: dict[str, Any], where: str) -> None:
    """Record what an import or an assignment binds (checking imported names exist)."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name in IMPORTABLE:
                env[alias.asname or alias.name] = importlib.import_module(alias.name)
    elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ckptguard"):
        module = node.module or ""
        exported = static_all(module)
        for alias in node.names:
            assert alias.name in exported, f"{where}: {module} does not export {alias.name}"
            if module in IMPORTABLE:
                env[alias.asname or alias.name] = getattr(
                    importlib.import_module(module), alias.name
                )
    elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
        made = _resolve(node.value.func, env, where)
        for target in node.targets:
            if isinstance(target, ast.Name):
                env.pop(target.id, None)
                if inspect.isclass(made):
                    env[target.id] = _Instance(made)


def check_examples(text: str, name: str) -> None:
    """Check the Python blocks of one page against the API (see the module docstring).

    What a block binds (imports, ``mgr = CheckpointManager(...)``) carries over to the
    blocks after it, in source order.
    """
    env: dict[str, Any] = {}
    for number, source in enumerate(_FENCE.findall(text), start=1):
        where = f"{name}, python block {number}"
        tree = ast.parse(source)
        statements = [n for n in ast.walk(tree) if isinstance(n, ast.stmt)]
        for statement in sorted(statements, key=lambda n: (n.lineno, n.col_offset)):
            _bind(statement, env, where)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                _check_call(node, env, where)
            elif isinstance(node, ast.Attribute):
                _resolve(node, env, where)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_examples_use_the_real_api(page: Path) -> None:
    """Every ckptguard name, method and keyword argument in an example exists."""
    check_examples(page.read_text(encoding="utf-8"), str(page.relative_to(ROOT)))


@pytest.mark.parametrize(
    ("example", "error"),
    [
        ('mgr = ckptguard.CheckpointManager("r", keep_newest=3)', "keep_newest"),
        ('mgr = ckptguard.CheckpointManager("r")\nmgr.sav(1, {})', "sav"),
        ('ckptguard.atomic_checkpoint("r/c-1", step=1, sync=False)', "sync"),
        ("x = ckptguard.CheckpointManagr", "CheckpointManagr"),
        ("from ckptguard.integrations.lightning import protect", "protect"),
    ],
)
def test_the_example_check_catches_what_does_not_exist(example: str, error: str) -> None:
    """The control: an example using a name or an argument the API lacks fails the check."""
    text = f"```python\nimport ckptguard\n{example}\n```\n"
    with pytest.raises(AssertionError, match=error):
        check_examples(text, "control")
