"""The command line's output: one JSON document on stdout with ``--json``, else text.

Shared by every ``ckptguard`` subcommand (``cli.py``, ``adopt.py``): the document's
envelope (``{"ok", "command", ...}``), the one schema for problems, the typed error
document and the exit codes (see ``cli.py``'s module docstring).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import traceback
from typing import TYPE_CHECKING, Any, NoReturn, ParamSpec

import click
from rich.console import Console
from rich.markup import escape

from ckptguard._errors import (
    CheckpointError,
    CorruptCheckpoint,
    ForeignRun,
    LockTimeout,
    ProtectedCheckpoint,
    StorageError,
    storage_error_from_os,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

__all__ = [
    "command_name",
    "emit",
    "emit_json",
    "error_json",
    "fail",
    "json_option",
    "out",
    "problems_json",
    "reports_errors",
    "size",
    "stderr",
]

_P = ParamSpec("_P")


def _console(*, stderr: bool) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    # Piped output is for grep and logs: never wrap a path in the middle.
    width = None if stream.isatty() else int(os.environ.get("COLUMNS", "0") or 0) or 200
    return Console(stderr=stderr, highlight=False, soft_wrap=True, width=width)


out = _console(stderr=False)
stderr = _console(stderr=True)


def size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


# -- output: one JSON document, or text --------------------------------------------------------
def emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def command_name() -> str:
    ctx = click.get_current_context(silent=True)
    return (ctx.info_name if ctx is not None else None) or "ckptguard"


def emit(*, ok: bool, **fields: Any) -> None:
    """The one JSON document of a command that ran (see the module docstring)."""
    emit_json({"ok": ok, "command": command_name(), **fields})


def problems_json(
    path: str, problems: Sequence[str], severity: str = "error"
) -> list[dict[str, str]]:
    return [{"path": path, "problem": p, "severity": severity} for p in problems]


def _typed(exc: BaseException) -> BaseException:
    """A builtin OSError as the ckptguard error of its errno (a permission error, say)."""
    if isinstance(exc, OSError) and not isinstance(exc, CheckpointError):
        typed = storage_error_from_os(exc, f"ckptguard {command_name()}")
        if type(typed) is StorageError:  # its default hint is about an aborted save
            typed.hint = "check the path and the filesystem"
        return typed
    return exc


def error_json(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, CheckpointError):
        return {
            "type": type(exc).__name__,
            "message": exc.message,
            "path": exc.path,
            "hint": exc.hint or None,
        }
    if isinstance(exc, click.ClickException):
        usage = isinstance(exc, click.UsageError)
        return {
            "type": "UsageError" if usage else type(exc).__name__,
            "message": exc.format_message(),
            "path": None,
            "hint": "see `ckptguard COMMAND --help`" if usage else None,
        }
    return {"type": type(exc).__name__, "message": str(exc), "path": None, "hint": None}


def _exit_code(exc: BaseException) -> int:
    """1 for something corrupt or a refusal, 2 for anything else (see the docstring)."""
    refusals = (CorruptCheckpoint, ProtectedCheckpoint, LockTimeout, ForeignRun)
    return 1 if isinstance(exc, refusals) else 2


def fail(exc: BaseException, *, as_json: bool) -> NoReturn:
    """Report an error the way the caller asked for output, and exit 1 or 2."""
    exc = _typed(exc)
    if as_json:
        emit(ok=False, error=error_json(exc))
    else:
        stderr.print(f"[red]error:[/] {escape(str(exc))}")
    sys.exit(_exit_code(exc))


def reports_errors(func: Callable[_P, None]) -> Callable[_P, None]:
    """Run a command; report its errors as text or JSON (its ``as_json``) and exit 1 or 2.

    With ``--json`` an unexpected error is a JSON document too (and a traceback on
    stderr), so that a script always has one document to parse.
    """

    @functools.wraps(func)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> None:
        as_json = bool(kwargs.get("as_json"))
        try:
            func(*args, **kwargs)
        except (CheckpointError, OSError, ImportError) as exc:
            fail(exc, as_json=as_json)
        except Exception as exc:
            if not as_json:
                raise
            traceback.print_exc()
            fail(exc, as_json=True)

    return run


json_option = click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="One JSON document on stdout, whatever the outcome (see `ckptguard --help`).",
)
