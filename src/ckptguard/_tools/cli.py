"""The ``ckptguard`` command: list, verify, inspect, clean, pin, unpin, rm; doctor.

Every ROOT or PATH may be a local path or an fsspec URL (s3://bucket/run); options for
its filesystem (an endpoint, say) go in ``CKPTGUARD_STORAGE_OPTIONS`` as JSON, and the
standard AWS environment variables work as for any boto client. Each path is turned
into a backend by the one resolver (``_protocol/backend.py``): a URL is never a local
folder.

Exit codes, every command but doctor:

- 0: all good: listed, verified, inspected, cleaned, pinned, deleted (or planned, in a
  dry run);
- 1: something is corrupt (verify, inspect), or the action was refused (rm of the newest
  valid, the best or a pinned checkpoint without --force; unpin of a checkpoint saved
  with pin=True; another process holds the root's lock);
- 2: bad usage, or a path that cannot be acted on: not there (a path, bucket or prefix),
  not reachable, empty (nothing to verify or inspect), a root where one checkpoint was
  expected (inspect), a file where a directory was expected, no permission, malformed
  ``CKPTGUARD_STORAGE_OPTIONS``.

``doctor`` keeps its own scale: 0 every check OK, 1 some warn, 2 any fails.

``--json`` (every command): exactly one JSON object on stdout, whatever the outcome,
errors and bad usage included; progress, logs and tracebacks go to stderr. Every object
has ``"ok"`` (true exactly when the exit code is 0) and ``"command"``. On an error it
holds nothing else but::

    "error": {"type": "CheckpointNotFound", "message": "...", "path": "..." | null,
              "hint": "what to do" | null}

``type`` is the ckptguard error class (``UsageError`` for bad arguments). Wherever
problems are listed, ``"problems"`` is a list of objects::

    {"path": "...", "problem": "...", "severity": "error" | "warning"}

``error``: do not load it (corrupt, no manifest, a failed check); ``warning``: usable,
but look. The rest, by command:

- list: ``root``, ``checkpoints``: [{name, path, step, created_at, size_bytes,
  shared_bytes (shared with other checkpoints by incremental saves; null off local disk), files,
  metrics, run, pinned, best, mirrored (null without --mirror), status, problems}], one
  per name (with --mirror, names only the mirror holds too: status "mirror only");
- verify: ``path``, ``kind`` ("checkpoint" or "root"), ``checkpoints``: [{path, name,
  step, ok, files_checked, bytes_checked, problems}];
- inspect: ``path``, name, step, save_id, created_at, size_bytes, shared_bytes,
  shared_files, metrics, metadata,
  writer, versions, files, tensors, and ``state``: the saved state without its tensors
  (each tensor a ``{"__tensor__": {file, name, dtype, shape}}``), or null;
- clean: ``root``, ``dry_run``, ``planned``: [{kind, path, name, action, size_bytes,
  detail, reason}], ``recovery_actions``, ``removed`` (paths);
- doctor: ``root``, ``status``, ``exit_code``, ``checks``, ``problems``;
- pin, unpin: ``root``, ``step``, ``path``, ``pinned``;
- rm: ``root``, ``step``, ``path``, ``dry_run``, ``removed``, ``size_bytes``,
  ``protected`` (why it needed --force, or null), ``forced``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import stat
import sys
from typing import TYPE_CHECKING, Any, NoReturn, ParamSpec

import click
from rich import box
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ckptguard._errors import (
    CheckpointError,
    CheckpointNotFound,
    CorruptCheckpoint,
    ProtectedCheckpoint,
    RootNotADirectory,
    storage_error_from_os,
)
from ckptguard._format.layout import (
    MANIFEST_NAME,
    META_DIR,
    RETIRED_SUFFIX,
    STATE_NAME,
    RootLayout,
    step_from_name,
)
from ckptguard._format.quarantine import read_note
from ckptguard._protocol.backend import Backend, backend_for, checkpoint_backend
from ckptguard._protocol.cleanup import check_meta_dirs
from ckptguard._protocol.filecommit import sidecar_path, verify_file
from ckptguard._protocol.locking import root_lock
from ckptguard._protocol.marker import clean_store
from ckptguard._protocol.recovery import EntryKind, RootEntry, recover, scan
from ckptguard._protocol.verify import VerifyReport
from ckptguard._protocol.verify import verify_local as verify
from ckptguard._state.serialization import _read_state_json, iter_tensor_infos
from ckptguard._storage.base import is_url
from ckptguard._storage.local import LocalStorage, tree_size
from ckptguard._tools.adopt import adopt_cmd
from ckptguard._tools.output import command_name as _command_name
from ckptguard._tools.output import emit as _emit
from ckptguard._tools.output import emit_json as _emit_json
from ckptguard._tools.output import error_json as _error_json
from ckptguard._tools.output import json_option as _json_option
from ckptguard._tools.output import out as _out
from ckptguard._tools.output import problems_json as _problems
from ckptguard._tools.output import reports_errors as _reports_errors
from ckptguard._tools.output import size as _size
from ckptguard._tools.output import stderr as _err

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    from ckptguard._format.manifest import Manifest
    from ckptguard._manager.admin import Admin
    from ckptguard._manager.catalog import CheckpointInfo
    from ckptguard._storage.base import Source

__all__ = ["main"]

_P = ParamSpec("_P")


# Verify shows a progress bar above this many bytes.
PROGRESS_MIN_BYTES = 256 * 1024 * 1024
# The non-tensor state inspect prints (the JSON has all of it).
MAX_STATE_LINES = 60
MAX_VALUE_CHARS = 100


def _when(created_at: str | None, *, seconds: bool = True) -> str:
    if not created_at:
        return "-"
    try:
        when = _dt.datetime.fromisoformat(created_at).astimezone()
    except ValueError:
        return created_at
    return when.strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M")


class _Group(click.Group):
    """The command group; with ``--json`` a usage error is a JSON document too."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,  # noqa: FBT001, FBT002 - click's own signature
        **extra: Any,
    ) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        if "--json" not in argv or not standalone_mode:
            return super().main(argv, prog_name, complete_var, standalone_mode, **extra)
        try:
            return super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as exc:
            command = next((a for a in argv if a in self.commands), "ckptguard")
            _emit_json({"ok": False, "command": command, "error": _error_json(exc)})
            sys.exit(2 if isinstance(exc, click.UsageError) else exc.exit_code)
        except click.Abort:
            _err.print("Aborted!")
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ckptguard")
def main() -> None:
    """Crash-safe, exactly-once, verified checkpoints: inspect and maintain them.

    Exit codes: 0 all good; 1 something corrupt or refused; 2 bad usage, or a path
    that is missing, unreachable, empty or of the wrong kind (doctor: 0 OK, 1 WARN,
    2 FAIL). With --json every command prints exactly one JSON object on stdout:
    {"ok": ..., "command": ..., ...}, or {"ok": false, "command": ..., "error":
    {"type", "message", "path", "hint"}}; "problems" are lists of {"path", "problem",
    "severity"}.
    """


# -- resolving a ROOT or PATH ------------------------------------------------------------------
def _root_backend(root: str) -> Backend:
    """The backend of ROOT, which must be there (CheckpointNotFound if not)."""
    backend = backend_for(root, what=f"ckptguard {_command_name()}")  # typed if unusable
    if backend.remote:
        backend.require_root()  # a missing bucket or prefix, an unreachable endpoint
        return backend
    try:
        os.listdir(backend.root)  # not only there: readable (else "does not exist" misleads)
    except FileNotFoundError:
        raise CheckpointNotFound(
            f"{root} does not exist", path=backend.root, hint="check the path"
        ) from None
    except OSError as exc:
        error = storage_error_from_os(exc, f"ckptguard {_command_name()}: reading {root}")
        error.hint = f"check the owner and mode (ls -ld {root}), or run as a user who may read it"
        raise error from None
    # A .ckptguard (or its trash, ...) that is a symlink would lead pin, rm and clean
    # into someone else's directory: refused, as recovery refuses it.
    check_meta_dirs(backend.layout)
    return backend


def _single_file(path: str) -> bool:
    """Whether ``path`` is a single-file checkpoint: a ``.ckpt``, or a file with a sidecar."""
    if is_url(path) or not os.path.isfile(path):
        return False
    return path.endswith(".ckpt") or os.path.lexists(sidecar_path(path))


def _refuse_a_file(path: str) -> None:
    """A checkpoint is a directory: refuse a local file with a message that says so."""
    if not is_url(path) and os.path.lexists(path) and not os.path.isdir(path):
        raise RootNotADirectory(
            f"{path} is a file, not a checkpoint directory",
            path=os.path.abspath(path),
            hint="pass a checkpoint directory (ROOT/checkpoint-N) or a root that holds them",
        )


def _checkpoint_names(backend: Backend) -> list[str]:
    """The names under a root that are checkpoints: a manifest, or a checkpoint name."""
    try:
        names = backend.names()  # on a store: only names that hold a manifest
    except FileNotFoundError:
        return []

    def is_checkpoint(name: str) -> bool:
        if backend.remote or step_from_name(name) is not None:
            return True
        return backend.exists(backend.join(f"{name}/{MANIFEST_NAME}"))

    def order(name: str) -> tuple[int, str]:
        step = step_from_name(name)
        return (-1 if step is None else step, name)

    return sorted((n for n in names if is_checkpoint(n)), key=order)


def _is_root(backend: Backend, checkpoints: Sequence[str]) -> bool:
    """A checkpoint root: it has ckptguard's meta dir or holds checkpoints."""
    if checkpoints:
        return True
    return not backend.remote and os.path.isdir(os.path.join(backend.root, META_DIR))


def _is_empty(backend: Backend) -> bool:
    """Nothing at all in it (a prefix on a store exists only while it holds something)."""
    return not backend.remote and not os.listdir(backend.root)


# -- list --------------------------------------------------------------------------------------
def _row(info: CheckpointInfo, backend: Backend, *, checksums: bool) -> dict[str, Any]:
    """A checkpoint as ``list`` shows it (``mirrored`` is filled in by the caller)."""
    has_manifest = info.save_id is not None or backend.exists(
        backend.join(f"{info.name}/{MANIFEST_NAME}")
    )
    if info.valid:
        status = "ok" if checksums else "ok (sizes)"
    else:
        status = "corrupt" if has_manifest else "no manifest"
    return {
        "name": info.name,
        "path": info.path,
        "step": info.step,
        "created_at": info.created_at,
        "size_bytes": info.size_bytes if has_manifest else None,
        "shared_bytes": _shared_bytes(info.path) if has_manifest and not backend.remote else None,
        "files": info.files if has_manifest else None,
        "metrics": dict(info.metrics),
        "run": info.run,
        "pinned": info.pinned,
        "best": info.best,
        "mirrored": None,
        "status": status,
        "problems": _problems(info.path, info.problems),
    }


def _shared_bytes(path: str) -> int | None:
    """How many of a local checkpoint's bytes it shares with others (incremental saves)."""
    from ckptguard._protocol.api import read_manifest  # noqa: PLC0415
    from ckptguard._state.reuse import owned_and_shared  # noqa: PLC0415

    try:
        split = owned_and_shared(path, read_manifest(path))
    except (CheckpointError, OSError):
        return None
    return None if split is None else split[1]


def _other_rows(backend: Backend, listed: set[str], *, checksums: bool) -> list[dict[str, Any]]:
    """Checkpoints whose name is not a step name (atomic_checkpoint("ROOT/best"), say)."""
    from ckptguard._manager.catalog import CheckpointInfo  # noqa: PLC0415 - as Admin

    rows = []
    for name in _checkpoint_names(backend):
        if name in listed or step_from_name(name) is not None:
            continue
        report = backend.verify(backend.join(name), checksums=checksums)
        step = report.step if report.step is not None else -1
        info = CheckpointInfo.from_report(step, report, pinned=False)
        rows.append({**_row(info, backend, checksums=checksums), "step": report.step})
    return rows


def _file_rows(backend: Backend, *, checksums: bool) -> list[dict[str, Any]]:
    """Single-file checkpoints (Lightning's ``.ckpt``): one row per name, links included.

    A file with a checksum sidecar is verified against it; a ``.ckpt`` without one was
    written without ckptguard ("no sidecar"), checked for structure only.
    """
    from ckptguard._manager.catalog import CheckpointInfo  # noqa: PLC0415 - as Admin

    if backend.remote:
        return []
    rows = []
    for name in sorted(os.listdir(backend.root)):
        path = backend.join(name)
        if name.startswith(".") or not os.path.isfile(path):
            continue  # hidden (sidecars, temp files), directories, dangling links
        if not (name.endswith(".ckpt") or os.path.lexists(sidecar_path(path))):
            continue
        target = os.path.realpath(path) if os.path.islink(path) else path
        report = verify_file(target, checksums=checksums)
        info = CheckpointInfo.from_report(report.step or -1, report, pinned=False)
        row = {**_row(info, backend, checksums=checksums), "step": report.step, "files": 1}
        row.update(name=name, path=path, size_bytes=os.stat(target).st_size)
        if report.extra.get("sidecar") is None and report.extra.get("structure") is None:
            # Written without ckptguard, and complete as far as its structure shows.
            row["status"] = "no sidecar"
            row["problems"] = _problems(path, report.problems, "warning")
        if target != path:
            row["status"] += f" (link to {os.path.basename(target)})"
        rows.append(row)
    return rows


def _list_rows(backend: Backend, *, checksums: bool, mirror: str | None) -> list[dict[str, Any]]:
    """One row per checkpoint name, of the root and (``mirror``) of its mirror."""
    from ckptguard._manager.admin import Admin  # noqa: PLC0415 - the manager's package

    rows = {
        info.name: _row(info, backend, checksums=checksums)
        for info in Admin(backend).list(checksums=checksums)
    }
    for row in _other_rows(backend, set(rows), checksums=checksums):
        rows[row["name"]] = row
    for row in _file_rows(backend, checksums=checksums):
        rows[row["name"]] = row
    if mirror is not None:
        remote = backend_for(mirror, what="ckptguard list --mirror")
        try:
            copies = {i.name: i for i in Admin(remote).list(checksums=checksums)}
        except CheckpointNotFound:
            copies = {}  # nothing mirrored yet: the prefix does not exist
        for name, row in rows.items():
            row["mirrored"] = name in copies and copies[name].valid
        for name, info in copies.items():
            if name not in rows:  # on the mirror only (deleted here, or from another host)
                row = _row(info, remote, checksums=checksums)
                row.update(mirrored=info.valid, pinned=False, best=False)
                row["status"] = "mirror only" if info.valid else "corrupt (mirror)"
                rows[name] = row
    return sorted(
        rows.values(), key=lambda r: (r["step"] if r["step"] is not None else -1, r["name"])
    )


@main.command("list")
@click.argument("root")
@click.option("--checksums", is_flag=True, help="Verify checksums too (reads every byte).")
@click.option(
    "--mirror",
    metavar="URL",
    help="Also show which checkpoints the mirror at URL holds, and those only it holds.",
)
@_json_option
@_reports_errors
def list_cmd(root: str, *, checksums: bool, mirror: str | None, as_json: bool) -> None:
    """List the checkpoints of ROOT: one row per name.

    Columns: name, time, size, files, metrics, flags (pinned; best, by the metric the
    manager ranked by; mirrored, with --mirror), status; problems below the table.

    ROOT may be an fsspec URL (s3://bucket/run); options for its filesystem (an
    endpoint, say) go in the environment variable CKPTGUARD_STORAGE_OPTIONS as JSON.
    """
    backend = _root_backend(root)
    rows = _list_rows(backend, checksums=checksums, mirror=mirror)
    if as_json:
        _emit(ok=True, root=backend.root, checkpoints=rows)
        return
    if not rows:
        _out.print(f"no checkpoints in {escape(backend.root)}")
        return
    # Narrow enough for 80 columns: the name carries the step, the flags share a column,
    # and each problem is a line of its own below the table (a cell would shred it).
    table = Table(
        title=f"checkpoints in {escape(backend.root)}",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        padding=(0, 1, 0, 0),
    )
    table.add_column("name", no_wrap=True)
    table.add_column("time", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("files", justify="right")
    table.add_column("metrics", overflow="fold")
    table.add_column("flags")
    table.add_column("status")
    problems: list[str] = []
    for row in rows:
        metrics = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in row["metrics"].items())  # fmt: skip
        style = "green" if row["status"].startswith(("ok", "mirror only")) else "red"
        style = "yellow" if row["status"] == "no manifest" else style
        table.add_row(
            escape(row["name"]),
            _when(row["created_at"], seconds=False),
            _size_cell(row),
            str(row["files"]) if row["files"] is not None else "-",
            escape(metrics) or "-",
            " ".join(f for f in ("pinned", "best", "mirrored") if row[f]),
            f"[{style}]{escape(row['status'])}[/]",
        )
        problems += [f"{row['name']}: {p['problem']}" for p in row["problems"]]
    _out.print(table)
    for problem in problems:
        _out.print(f"  {escape(problem)}")


def _size_cell(row: dict[str, Any]) -> str:
    """The size, and how much of it other checkpoints share (incremental saves)."""
    if row["size_bytes"] is None:
        return "-"
    shared = row.get("shared_bytes")
    if not shared:
        return _size(row["size_bytes"])
    return f"{_size(row['size_bytes'])} ({_size(shared)} shared)"


# -- verify ------------------------------------------------------------------------------------
def _report_json(report: VerifyReport) -> dict[str, Any]:
    return {
        "path": report.path,
        "name": report.path.rstrip("/").rsplit("/", 1)[-1],
        "step": report.step,
        "ok": report.ok,
        "files_checked": report.files_checked,
        "bytes_checked": report.bytes_checked,
        "problems": _problems(report.path, report.problems)
        + _problems(report.path, report.warnings, "warning"),
    }


def _verify_all(backend: Backend, paths: list[str], *, show_progress: bool) -> list[VerifyReport]:
    total = 0
    for path in paths:
        try:
            total += backend.read_manifest(path).total_size
        except (CheckpointError, OSError):
            continue
    if not show_progress or total < PROGRESS_MIN_BYTES:
        return [backend.verify(p) for p in paths]
    columns = (
        TextColumn("verifying"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
    )  # fmt: skip
    with Progress(*columns, console=_err, transient=True) as progress:
        task = progress.add_task("verify", total=total)
        return [backend.verify(p, progress=lambda n: progress.advance(task, n)) for p in paths]


@main.command("verify")
@click.argument("path")
@_json_option
@_reports_errors
def verify_cmd(path: str, *, as_json: bool) -> None:
    """Verify a checkpoint, or every checkpoint of a root. Exit 1 if any is corrupt.

    An empty directory, or a root with no checkpoints, has nothing to verify: exit 2.
    """
    if _single_file(path):  # a Lightning .ckpt, or any file with a checksum sidecar
        where = os.path.abspath(path)
        _verified([verify_file(where)], root=where, is_root=False, path=path, as_json=as_json)
    _refuse_a_file(path)
    backend = _root_backend(path)  # PATH taken as a root first
    show_progress = not as_json and _err.is_terminal
    has_manifest = backend.exists(backend.join(MANIFEST_NAME))
    checkpoints = [] if has_manifest else _checkpoint_names(backend)
    is_root = not has_manifest and _is_root(backend, checkpoints)
    if is_root:
        if not checkpoints:
            raise CheckpointNotFound(
                f"{path} is a checkpoint root with no checkpoints: nothing to verify",
                path=backend.root,
                hint="a checkpoint appears there once a save has committed",
            )
        reports = _verify_all(
            backend, [backend.join(n) for n in checkpoints], show_progress=show_progress
        )
    elif not has_manifest and _is_empty(backend):
        raise CheckpointNotFound(
            f"{path} is empty: there is no checkpoint to verify",
            path=backend.root,
            hint="pass a checkpoint (ROOT/checkpoint-N) or a root that holds checkpoints",
        )
    else:
        # A folder that is not a root is judged as a checkpoint: one without a manifest
        # (a half-written Trainer save, say) fails verification instead of passing.
        single, where = checkpoint_backend(path, what="ckptguard verify")
        reports = _verify_all(single, [where], show_progress=show_progress)
    _verified(reports, root=backend.root, is_root=is_root, path=path, as_json=as_json)


def _verified(
    reports: list[VerifyReport], *, root: str, is_root: bool, path: str, as_json: bool
) -> NoReturn:
    """Print what verify found (text or the JSON document) and exit 0, or 1 if corrupt."""
    bad = [r for r in reports if not r.ok]
    if as_json:
        _emit(
            ok=not bad,
            path=root,
            kind="root" if is_root else "checkpoint",
            checkpoints=[_report_json(r) for r in reports],
        )
        sys.exit(1 if bad else 0)
    for r in reports:
        if r.ok:
            _out.print(f"[green]ok[/]       {escape(r.path)}  ({r.files_checked} files, "
                       f"{_size(r.bytes_checked)} checked)")  # fmt: skip
        else:
            _out.print(f"[red]CORRUPT[/]  {escape(r.path)}")
            for problem in r.problems:
                _out.print(f"           - {escape(problem)}")
        for warning in r.warnings:
            _out.print(f"           [yellow]warning:[/] {escape(warning)}")
    if is_root:
        _out.print(
            f"{escape(root)} is a checkpoint root: {len(reports)} checkpoints verified, "
            f"{len(bad)} corrupt (`ckptguard list {escape(path)}` lists them)"
        )
    sys.exit(1 if bad else 0)


# -- inspect -----------------------------------------------------------------------------------
def _state_view(value: Any, tensors: dict[tuple[str, str], dict[str, Any]]) -> Any:
    """state.json's tree as plain JSON data: tagged values decoded, tensors as references.

    Data only (nothing is unpickled or imported); a value it does not know is shown as
    its tag, never trusted.
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [_state_view(v, tensors) for v in value]
    if not isinstance(value, dict):
        return f"<{type(value).__name__}>"
    tags = [k for k in value if k.startswith("__")]
    if not tags:
        return {k: _state_view(v, tensors) for k, v in value.items()}
    tag, body = tags[0], value[tags[0]]
    if len(value) != 1:
        return f"<malformed {tag}>"
    if tag in {"__tensor__", "__ndarray__"} and isinstance(body, dict):
        ref = (str(body.get("file")), str(body.get("name")))
        info = tensors.get(ref, {})
        return {
            tag: {"file": ref[0], "name": ref[1], "dtype": info.get("dtype"),
                  "shape": info.get("shape")}
        }  # fmt: skip
    if tag == "__tuple__" and isinstance(body, list):
        return [_state_view(v, tensors) for v in body]
    if tag == "__dict__" and isinstance(body, list):
        return {
            str(_state_view(pair[0], tensors)): _state_view(pair[1], tensors)
            for pair in body
            if isinstance(pair, list) and len(pair) == 2
        }
    if tag == "__float__" and isinstance(body, str):
        return body  # "nan", "inf", "-inf": not JSON numbers
    if tag == "__bytes__" and isinstance(body, str):
        return f"<{len(body) * 3 // 4} bytes>"
    if tag == "__npscalar__" and isinstance(body, dict):
        return _state_view(body.get("value"), tensors)
    if tag == "__torch_dtype__" and isinstance(body, str):
        return f"torch.{body}"
    return f"<{tag}>"


def _state_lines(value: Any, where: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path, value) of every non-tensor leaf; a list of scalars is one leaf."""
    if isinstance(value, dict):
        if len(value) == 1 and next(iter(value)) in {"__tensor__", "__ndarray__"}:
            return
        for k, v in value.items():
            yield from _state_lines(v, f"{where}.{k}" if where else str(k))
    elif isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        for i, v in enumerate(value):
            yield from _state_lines(v, f"{where}[{i}]")
    else:
        yield where, value


def _read_state(
    where: str, listed: Manifest, opener: Callable[[str], Source], tensors: list[dict[str, Any]]
) -> Any:
    """The state of a CheckpointManager checkpoint without its tensors (None: not one)."""
    if not any(f.path == STATE_NAME for f in listed.files):
        return None
    doc = _read_state_json(where, listed, opener)  # capped, checked against its checksum
    by_ref = {(t["file"], t["name"]): t for t in tensors}
    try:
        return _state_view(doc.get("tree"), by_ref)
    except RecursionError:
        raise CorruptCheckpoint(f"{where}/{STATE_NAME} is nested too deeply", path=where) from None


def _print_state(state: Any) -> None:
    lines = list(_state_lines(state))
    if not lines:
        return
    _out.print("  state (without its tensors):")
    for key, value in lines[:MAX_STATE_LINES]:
        text = json.dumps(value, default=str)
        if len(text) > MAX_VALUE_CHARS:
            text = text[: MAX_VALUE_CHARS - 3] + "..."
        _out.print(f"    {escape(key or '(the state)')} = {escape(text)}")
    if len(lines) > MAX_STATE_LINES:
        _out.print(f"    ... {len(lines) - MAX_STATE_LINES} more (--json shows all)")


@main.command("inspect")
@click.argument("path")
@_json_option
@_reports_errors
def inspect_cmd(path: str, *, as_json: bool) -> None:
    """Show a checkpoint's manifest, files, tensors (shapes and dtypes) and saved state.

    The state is what a CheckpointManager saved besides tensors: the step, scheduler
    state, optimizer hyper-parameters (lr, betas, weight decay), read as data.
    """
    _refuse_a_file(path)
    backend = _root_backend(path)
    if not backend.exists(backend.join(MANIFEST_NAME)):
        checkpoints = _checkpoint_names(backend)
        if _is_root(backend, checkpoints):
            example = f": inspect one of them, e.g. {backend.join(checkpoints[-1])}"
            raise CheckpointNotFound(
                f"{path} is a checkpoint root ({len(checkpoints)} checkpoints), not a checkpoint",
                path=backend.root,
                hint=f"`ckptguard list {path}` shows its checkpoints"
                + (example if checkpoints else ""),
            )
        if _is_empty(backend):
            raise CheckpointNotFound(
                f"{path} is empty: there is no checkpoint to inspect",
                path=backend.root,
                hint="pass a checkpoint directory (ROOT/checkpoint-N)",
            )
        raise CorruptCheckpoint(
            f"{path} has no {MANIFEST_NAME}: it was never committed by ckptguard",
            path=backend.root,
            hint="do not load it as a checkpoint; `ckptguard verify` says more",
        )
    single, where = checkpoint_backend(path, what="ckptguard inspect")
    try:
        manifest = single.read_manifest(where)
    except CorruptCheckpoint as exc:
        exc.path = exc.path or where  # name the checkpoint whose manifest was rejected
        raise
    listed, opener, close = single.open_files(where, manifest)
    try:
        tensors: list[dict[str, Any]] = [
            {"file": f, "name": t.name, "dtype": t.dtype, "shape": list(t.shape),
             "bytes": t.nbytes}
            for f, t in iter_tensor_infos(where, listed, opener)
        ]  # fmt: skip
        state = _read_state(where, listed, opener, tensors)
    except CheckpointNotFound:
        raise
    except FileNotFoundError as exc:
        missing = exc.filename or exc
        raise CorruptCheckpoint(
            f"{path} is not a valid checkpoint: {missing} is missing", path=where
        ) from None
    finally:
        close()
    from ckptguard._state.reuse import owned_and_shared, shared_files  # noqa: PLC0415

    shared = None if single.remote else shared_files(where, manifest)
    split = None if single.remote else owned_and_shared(where, manifest)
    if as_json:
        _emit(
            ok=True,
            path=where,
            name=manifest.name,
            step=manifest.step,
            save_id=manifest.save_id,
            created_at=manifest.created_at,
            size_bytes=manifest.total_size,
            shared_bytes=None if split is None else split[1],
            shared_files=None if shared is None else sorted(shared),
            metrics=dict(manifest.metrics),
            metadata=dict(manifest.metadata),
            writer=manifest.writer.to_dict(),
            versions=dict(manifest.versions),
            files=[f.to_dict() for f in manifest.files],
            tensors=tensors,
            state=state,
        )
        return
    w = manifest.writer
    _out.print(f"[bold]{escape(where)}[/]")
    _out.print(f"  step {manifest.step}, saved {_when(manifest.created_at)} by {escape(w.host)} "
               f"pid {w.pid} (ranks {list(w.ranks)} of {w.world_size})")  # fmt: skip
    owned = (f" ({_size(split[0])} its own, {_size(split[1])} shared with other "
             "checkpoints)") if split is not None and split[1] else ""  # fmt: skip
    _out.print(f"  save id {manifest.save_id}, {len(manifest.files)} files, "
               f"{_size(manifest.total_size)}{owned}")  # fmt: skip
    if manifest.metrics:
        _out.print(f"  metrics: {escape(json.dumps(dict(manifest.metrics)))}")
    versions = ", ".join(f"{k} {v}" for k, v in manifest.versions.items() if k != "platform")
    _out.print(f"  versions: {escape(versions)}")
    _print_state(state)
    files = Table(title="files")
    for column in ("path", "size", "xxh3-128", "shared"):
        files.add_column(column, justify="right" if column == "size" else "left")
    for f in manifest.files:
        files.add_row(
            escape(f.path), _size(f.size), f.checksum, "yes" if shared and f.path in shared else ""
        )
    _out.print(files)
    if tensors:
        table = Table(title="tensors")
        for column in ("file", "name", "dtype", "shape", "size"):
            table.add_column(column, justify="right" if column == "size" else "left")
        for t in tensors:
            table.add_row(escape(t["file"]), escape(t["name"]), t["dtype"],
                          str(tuple(t["shape"])), _size(t["bytes"]))  # fmt: skip
        _out.print(table)


# -- clean -------------------------------------------------------------------------------------
def _clean_store(backend: Backend, *, yes: bool, stale_after: float, as_json: bool) -> None:
    """On an object store: the uploads no manifest refers to."""
    gone = clean_store(backend.storage, backend.root, grace=stale_after, dry_run=not yes)
    if as_json:
        planned = [
            {"kind": "upload", "path": p, "name": p.rstrip("/").rsplit("/", 2)[-2],
             "action": "remove", "size_bytes": None,
             "detail": "an upload no manifest refers to", "reason": None}
            for p in gone
        ]  # fmt: skip
        _emit(
            ok=True,
            root=backend.root,
            dry_run=not yes,
            planned=planned,
            recovery_actions=[],
            removed=gone if yes else [],
        )
        return
    for prefix in gone:
        _out.print(f"{'removed' if yes else 'would remove'} {escape(prefix)}")
    if not gone:
        _out.print(f"nothing to clean in {escape(backend.root)}")
    elif not yes:
        _out.print("dry run: nothing removed; run again with --yes to do this")


def _plan(root: str, entry: RootEntry) -> str:
    """What clean does with an entry: "remove", "restore" or "keep" (decided before acting).

    Trash whose checkpoint name is empty goes back there (recovery); trash whose
    checkpoint name holds something that does not verify is the last good copy: kept.
    """
    if entry.kind != EntryKind.TRASH or entry.path.endswith(RETIRED_SUFFIX):
        return "remove"
    final = os.path.join(root, entry.name)
    if not os.path.lexists(final):
        return "restore" if verify(entry.path).ok else "remove"
    return "remove" if verify(final).ok else "keep"


def _entry_size(path: str) -> int | None:
    """Bytes under a staging, trash or quarantine entry (a link counts as itself)."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return tree_size(path) if stat.S_ISDIR(st.st_mode) else st.st_size


def _planned_json(entry: RootEntry, action: str) -> dict[str, Any]:
    note = read_note(entry.path) if entry.kind == EntryKind.QUARANTINE else None
    return {
        "kind": str(entry.kind),
        "path": entry.path,
        "name": entry.name,
        "action": action,
        "size_bytes": _entry_size(entry.path),
        "detail": entry.detail or None,
        # why it was quarantined, from the note the commit wrote (None: no note)
        "reason": note.reason if note else None,
    }


def _planned_text(plan: dict[str, Any], *, yes: bool) -> str:
    action = plan["action"]
    verb = action if yes else f"would {action}"
    why = [_size(plan["size_bytes"])] if plan["size_bytes"] is not None else []
    if plan["detail"]:
        why.append(plan["detail"])
    if plan["kind"] == EntryKind.QUARANTINE:
        why.append(
            f"quarantined because: {plan['reason']}" if plan["reason"] else "no reason recorded"
        )
    if action == "keep":
        why.append("the last good copy: its checkpoint does not verify")
    return f"{verb} {plan['kind']:14} {plan['path']}" + (f"  ({'; '.join(why)})" if why else "")


@main.command("clean")
@click.argument("root")
@click.option("--yes", is_flag=True, help="Really remove (default: only show what would go).")
@click.option(
    "--stale-after",
    type=float,
    default=6 * 3600.0,
    show_default=True,
    help="Seconds without change after which a staging dir of an unknown owner is stale.",
)
@_json_option
@_reports_errors
def clean_cmd(root: str, *, yes: bool, stale_after: float, as_json: bool) -> None:
    """Remove stale staging dirs, trash and quarantine of ROOT (dry run unless --yes).

    Each entry is shown with its size, and a quarantined one with the reason it was
    moved there. On an object store (an fsspec URL): the uploads no manifest refers to.
    """
    backend = _root_backend(root)
    if backend.remote:
        _clean_store(backend, yes=yes, stale_after=stale_after, as_json=as_json)
        return
    root = backend.root
    kinds = {EntryKind.STAGING_STALE, EntryKind.TRASH, EntryKind.QUARANTINE}
    entries = scan(root, checksums=False, stale_after=stale_after).entries
    planned = [_planned_json(e, _plan(root, e)) for e in entries if e.kind in kinds]
    removed: list[str] = []
    actions: list[str] = []
    if yes and planned:
        # recover() first: it rolls back an interrupted replace instead of deleting the
        # only copy, and removes stale staging; then trash and quarantine go, except
        # trash that is the last good copy of a checkpoint.
        actions = list(recover(root, checksums=True, stale_after=stale_after).actions)
        storage, layout = LocalStorage(), RootLayout(root)
        with root_lock(layout):
            for entry in scan(root, checksums=False, stale_after=stale_after).entries:
                if entry.kind == EntryKind.QUARANTINE or (
                    entry.kind == EntryKind.TRASH and _plan(root, entry) == "remove"
                ):
                    storage.remove_tree(entry.path)
                    storage.remove_file(entry.path + ".json")  # a quarantine note
                    removed.append(entry.path)
    if as_json:
        _emit(
            ok=True,
            root=root,
            dry_run=not yes,
            planned=planned,
            recovery_actions=actions,
            removed=removed,
        )
        return
    if not planned:
        _out.print(f"nothing to clean in {escape(root)}")
        return
    for plan in planned:
        _out.print(escape(_planned_text(plan, yes=yes)))
    for action_done in actions:
        _out.print(f"recovered: {escape(action_done)}")
    if not yes:
        _out.print("dry run: nothing removed; run again with --yes to do this")


# -- doctor ------------------------------------------------------------------------------------
@main.command("doctor")
@click.argument("root", required=False)
@click.option("--keep", type=int, default=3, show_default=True,
              help="Checkpoints you keep (for the free-space check).")  # fmt: skip
@click.option("--expect-empty", is_flag=True,
              help="ROOT must be empty (a new run's output dir): hidden files count.")  # fmt: skip
@_json_option
@_reports_errors
def doctor_cmd(root: str | None, *, keep: int, expect_empty: bool, as_json: bool) -> None:
    """Check versions, ROOT and its filesystem for what breaks checkpointing.

    Exit 0 if every check is OK, 1 if some warn, 2 if any fails.
    """
    from ckptguard._tools.doctor import doctor  # noqa: PLC0415

    report = doctor(root, keep=keep, expect_empty=expect_empty)
    if as_json:
        severity = {"warn": "warning", "fail": "error"}
        problems = [
            {"path": report.root or "", "problem": f"{c.name}: {c.message}",
             "severity": severity[c.status]}
            for c in report.problems()
        ]  # fmt: skip
        _emit(ok=report.exit_code == 0, **report.to_json(), problems=problems)
        sys.exit(report.exit_code)
    table = Table(title="ckptguard doctor" + (f": {escape(root)}" if root else ""))
    for column in ("check", "status", "finding", "what to do"):
        table.add_column(column)
    styles = {"ok": "green", "warn": "yellow", "fail": "red"}
    for check in report.checks:
        style = styles[check.status]
        table.add_row(check.name, f"[{style}]{check.status.upper()}[/]", escape(check.message),
                      escape(check.advice))  # fmt: skip
    _out.print(table)
    sys.exit(report.exit_code)


# -- pin, unpin, rm ----------------------------------------------------------------------------
def _admin(root: str) -> tuple[Backend, Admin]:
    from ckptguard._manager.admin import Admin  # noqa: PLC0415 - the manager's package

    backend = _root_backend(root)
    return backend, Admin(backend)


def _checkpoint_path(backend: Backend, admin: Admin, step: int) -> str:
    """The path of ``checkpoint-<step>``; CheckpointNotFound if the root has none."""
    path = backend.join(admin.naming.name(step))
    if not backend.exists(path):
        raise CheckpointNotFound(
            f"no checkpoint for step {step} in {backend.root}",
            path=path,
            hint=f"`ckptguard list {backend.root}` shows the steps there are",
        )
    return path


@main.command("pin")
@click.argument("root")
@click.argument("step", type=click.IntRange(min=0))
@_json_option
@_reports_errors
def pin_cmd(root: str, step: int, *, as_json: bool) -> None:
    """Keep checkpoint STEP of ROOT whatever the retention policy says (until unpinned)."""
    backend, admin = _admin(root)
    path = _checkpoint_path(backend, admin, step)
    admin.pin(step)
    if as_json:
        _emit(ok=True, root=backend.root, step=step, path=path, pinned=True)
        return
    _out.print(f"pinned {escape(path)}: retention keeps it until "
               f"`ckptguard unpin {escape(root)} {step}`")  # fmt: skip


@main.command("unpin")
@click.argument("root")
@click.argument("step", type=click.IntRange(min=0))
@_json_option
@_reports_errors
def unpin_cmd(root: str, step: int, *, as_json: bool) -> None:
    """Let retention delete checkpoint STEP of ROOT again (undo `ckptguard pin`).

    A checkpoint saved with pin=True stays pinned (its manifest says so): exit 1.
    """
    backend, admin = _admin(root)
    path = backend.join(admin.naming.name(step))
    if not admin.pin_file(step):
        path = _checkpoint_path(backend, admin, step)  # a pin of a gone checkpoint: unpin it
    admin.unpin(step)
    manifest = backend.manifest_or_none(path) if backend.exists(path) else None
    if admin.pinned(step, manifest):
        raise ProtectedCheckpoint(
            f"{path} stays pinned: it was saved with pin=True, which its manifest records",
            path=path,
            hint=f"`ckptguard rm {root} {step} --force --yes` deletes it anyway",
        )
    if as_json:
        _emit(ok=True, root=backend.root, step=step, path=path, pinned=False)
        return
    _out.print(f"unpinned {escape(path)}: retention may delete it again")


@main.command("rm")
@click.argument("root")
@click.argument("step", type=click.IntRange(min=0))
@click.option("--yes", is_flag=True, help="Really delete (default: only show what would go).")
@click.option(
    "--force",
    is_flag=True,
    help="Delete it even if it is the newest valid checkpoint, the best one or pinned.",
)
@click.option("--mirror", metavar="URL", help="Delete the mirror's copy at URL too.")
@_json_option
@_reports_errors
def rm_cmd(
    root: str, step: int, *, yes: bool, force: bool, mirror: str | None, as_json: bool
) -> None:
    """Delete checkpoint STEP of ROOT (a dry run unless --yes).

    Refused (exit 1) for the newest valid checkpoint (resume needs it), the best one and
    a pinned one, unless --force. The checkpoint is moved to trash under the root's lock
    first, so that a crash never leaves it half-deleted. With --mirror URL the mirror's
    copy goes too (first: a copy left behind would be "mirror only" in `list`).
    """
    backend, admin = _admin(root)
    if mirror is not None:
        remote = backend_for(mirror, what="ckptguard rm --mirror")

        def retire_copy(name: str) -> None:
            remote.retire(name)

        admin.on_retire = retire_copy
    path = _checkpoint_path(backend, admin, step)
    infos = admin.list()
    info = next((i for i in infos if i.name == admin.naming.name(step)), None)
    protected = admin.refusal(step, infos)
    if protected is not None and not force:
        raise ProtectedCheckpoint(
            f"not deleting {path}: {protected}",
            path=path,
            hint="pass --force if you really mean to delete it",
        )
    if yes:
        path = admin.delete(step, force=force)  # decides again, under the root's lock
    size = info.size_bytes if info is not None and info.save_id is not None else None
    if as_json:
        _emit(
            ok=True,
            root=backend.root,
            step=step,
            path=path,
            dry_run=not yes,
            removed=yes,
            size_bytes=size,
            protected=protected,
            forced=force and protected is not None,
        )
        return
    what = f"{escape(path)}" + (f" ({_size(size)})" if size is not None else "")
    forced = f", although {escape(protected)} (--force)" if protected else ""
    _out.print(f"{'deleted' if yes else 'would delete'} {what}{forced}")
    if not yes:
        _out.print("dry run: nothing removed; run again with --yes to do this")


main.add_command(adopt_cmd)
