"""The ``ckptguard`` command: list, verify, inspect and clean checkpoints.

Every ROOT or PATH may be a local path or an fsspec URL (s3://bucket/run); options for
its filesystem (an endpoint, say) go in ``CKPTGUARD_STORAGE_OPTIONS`` as JSON, and the
standard AWS environment variables work as for any boto client. Each path is turned
into a backend by the one resolver (``_protocol/backend.py``): a URL is never a local
folder.

Exit codes: 0 all good; 1 something is corrupt (verify, inspect); 2 bad usage, or a path,
bucket or prefix that is not there or cannot be reached. Every command takes ``--json``
for machine-readable output on stdout.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import sys
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ckptguard._errors import CheckpointError, CheckpointNotFound, CorruptCheckpoint
from ckptguard._format.layout import (
    MANIFEST_NAME,
    META_DIR,
    RETIRED_SUFFIX,
    RootLayout,
    step_from_name,
)
from ckptguard._protocol.backend import Backend, backend_for, checkpoint_backend
from ckptguard._protocol.locking import root_lock
from ckptguard._protocol.marker import clean_store
from ckptguard._protocol.recovery import EntryKind, RootEntry, recover, scan
from ckptguard._protocol.verify import VerifyReport
from ckptguard._protocol.verify import verify_local as verify
from ckptguard._state.serialization import iter_tensor_infos
from ckptguard._storage.base import is_url
from ckptguard._storage.local import LocalStorage

__all__ = ["main"]


def _console(*, stderr: bool) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    # Piped output is for grep and logs: never wrap a path in the middle.
    width = None if stream.isatty() else int(os.environ.get("COLUMNS", "0") or 0) or 200
    return Console(stderr=stderr, highlight=False, soft_wrap=True, width=width)


_out = _console(stderr=False)
_err = _console(stderr=True)
# Verify shows a progress bar above this many bytes.
PROGRESS_MIN_BYTES = 256 * 1024 * 1024


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _when(created_at: str | None) -> str:
    if not created_at:
        return "-"
    try:
        return _dt.datetime.fromisoformat(created_at).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return created_at


def _emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def _fail(message: str, *, as_json: bool, code: int = 2) -> NoReturn:
    """Report an error the way the caller asked for output, and exit."""
    if as_json:
        _emit_json({"ok": False, "error": message})
    else:
        _err.print(f"[red]error:[/] {message}")
    sys.exit(code)


def _is_root(backend: Backend) -> bool:
    """A checkpoint root: it has ckptguard's meta dir or holds checkpoints."""
    if not backend.remote and os.path.isdir(os.path.join(backend.root, META_DIR)):
        return True
    try:
        names = backend.names()
    except (CheckpointError, OSError):
        return False
    return any(backend.exists(backend.join(f"{n}/{MANIFEST_NAME}")) for n in names)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ckptguard")
def main() -> None:
    """Crash-safe, exactly-once, verified checkpoints: inspect and maintain them."""


# -- resolving a ROOT or PATH ------------------------------------------------------------------
def _backend(root: str, *, as_json: bool) -> Backend:
    """The backend of ROOT; exit 2 with the reason if it cannot be resolved or is not there."""
    try:
        backend = backend_for(root, what=f"ckptguard {click.get_current_context().info_name}")
        if backend.remote:
            backend.require_root()  # a missing bucket or prefix, an unreachable endpoint
    except (CheckpointError, OSError, ImportError) as exc:
        _fail_for(exc, as_json=as_json)
    return backend


def _fail_for(exc: BaseException, *, as_json: bool) -> NoReturn:
    """Exit 1 for a checkpoint that is there but corrupt, 2 for anything else.

    Anything else: a path, bucket or prefix that is not there or cannot be reached, bad
    credentials, an unusable root.
    """
    _fail(str(exc), as_json=as_json, code=1 if isinstance(exc, CorruptCheckpoint) else 2)


# -- list --------------------------------------------------------------------------------------
def _list_rows(report_entries: list[RootEntry]) -> list[dict[str, Any]]:
    rows = []
    for entry in report_entries:
        if entry.kind not in {
            EntryKind.COMMITTED_VALID,
            EntryKind.COMMITTED_CORRUPT,
            EntryKind.FOREIGN,
        }:  # staging, trash and quarantine (uploads without a manifest) are not listed
            continue
        if entry.kind == EntryKind.FOREIGN and step_from_name(entry.name) is None:
            continue  # user files; only checkpoint-shaped foreign folders are listed
        manifest = entry.report.manifest if entry.report else None
        if entry.kind == EntryKind.COMMITTED_VALID:
            status = "ok" if entry.report and entry.report.checksums else "ok (sizes)"
        elif entry.kind == EntryKind.COMMITTED_CORRUPT:
            status = "corrupt"
        else:
            status = "no manifest"
        rows.append(
            {
                "name": entry.name,
                "path": entry.path,
                "step": manifest.step if manifest else step_from_name(entry.name),
                "created_at": manifest.created_at if manifest else None,
                "size_bytes": manifest.total_size if manifest else None,
                "files": len(manifest.files) if manifest else None,
                "metrics": dict(manifest.metrics) if manifest else {},
                "status": status,
                "problems": entry.detail,
            }
        )
    rows.sort(key=lambda r: (r["step"] if r["step"] is not None else -1, r["name"]))
    return rows


@main.command("list")
@click.argument("root", type=click.Path(file_okay=False))
@click.option("--checksums", is_flag=True, help="Verify checksums too (reads every byte).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_cmd(root: str, *, checksums: bool, as_json: bool) -> None:
    """List the checkpoints of ROOT: step, time, size, files, metrics, status.

    ROOT may be an fsspec URL (s3://bucket/run); options for its filesystem (an
    endpoint, say) go in the environment variable CKPTGUARD_STORAGE_OPTIONS as JSON.
    """
    if not is_url(root) and not os.path.isdir(root):
        _fail(f"{root} is not a directory", as_json=as_json)
    backend = _backend(root, as_json=as_json)
    try:
        rows = _list_rows(list(scan(backend.root, checksums=checksums).entries))
    except (CheckpointError, OSError) as exc:
        _fail_for(exc, as_json=as_json)
    if as_json:
        _emit_json(rows)
        return
    table = Table(title=f"checkpoints in {backend.root}")
    for column in ("step", "time", "size", "files", "metrics", "status"):
        table.add_column(column, justify="right" if column in {"step", "size", "files"} else "left")
    for row in rows:
        metrics = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in row["metrics"].items())  # fmt: skip
        style = {"corrupt": "red", "no manifest": "yellow"}.get(row["status"], "green")
        status = f"[{style}]{row['status']}[/]"
        if row["problems"]:
            status += f" ({row['problems'][:60]})"
        table.add_row(
            str(row["step"]) if row["step"] is not None else "-",
            _when(row["created_at"]),
            _size(row["size_bytes"]) if row["size_bytes"] is not None else "-",
            str(row["files"]) if row["files"] is not None else "-",
            metrics or "-",
            status,
        )
    _out.print(table)


# -- verify ------------------------------------------------------------------------------------
def _report_json(report: VerifyReport) -> dict[str, Any]:
    return {
        "path": report.path,
        "ok": report.ok,
        "step": report.step,
        "problems": report.problems,
        "files_checked": report.files_checked,
        "bytes_checked": report.bytes_checked,
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
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def verify_cmd(path: str, *, as_json: bool) -> None:
    """Verify a checkpoint, or every checkpoint of a root. Exit 1 if any is corrupt."""
    if not is_url(path) and not os.path.isdir(path):
        _fail(f"{path} is not a directory", as_json=as_json)
    backend = _backend(path, as_json=as_json)  # PATH taken as a root first
    try:
        if backend.exists(backend.join(MANIFEST_NAME)) or not _is_root(backend):
            # A folder that is not a root is judged as a checkpoint: one without a manifest
            # (a half-written Trainer save, say) fails verification instead of passing.
            single, where = checkpoint_backend(path, what="ckptguard verify")
            reports = _verify_all(single, [where], show_progress=_progress_wanted(as_json))
        else:
            entries = scan(backend.root, checksums=False).entries
            paths = [
                e.path
                for e in entries
                if e.kind in {EntryKind.COMMITTED_VALID, EntryKind.COMMITTED_CORRUPT}
                # checkpoint-N folders without a manifest are not checkpoints: report them
                or (e.kind == EntryKind.FOREIGN and step_from_name(e.name) is not None)
            ]
            paths.sort(key=lambda p: (step_from_name(p.rstrip("/").rsplit("/", 1)[-1]) or -1, p))
            if not paths and not as_json:
                _err.print(f"no checkpoints in {path}")
            reports = _verify_all(backend, paths, show_progress=_progress_wanted(as_json))
    except (CheckpointError, OSError) as exc:
        _fail_for(exc, as_json=as_json)
    _report_and_exit(reports, as_json=as_json)


def _progress_wanted(as_json: bool) -> bool:  # noqa: FBT001 - one flag, read as such
    return not as_json and _err.is_terminal


def _report_and_exit(reports: list[VerifyReport], *, as_json: bool) -> NoReturn:
    """Print verify reports (a line each, or JSON); exit 1 if any is corrupt, else 0."""
    bad = [r for r in reports if not r.ok]
    if as_json:
        _emit_json({"ok": not bad, "checkpoints": [_report_json(r) for r in reports]})
    else:
        for r in reports:
            if r.ok:
                _out.print(f"[green]ok[/]       {r.path}  ({r.files_checked} files, "
                           f"{_size(r.bytes_checked)} checked)")  # fmt: skip
            else:
                _out.print(f"[red]CORRUPT[/]  {r.path}")
                for problem in r.problems:
                    _out.print(f"           - {problem}")
    sys.exit(1 if bad else 0)


# -- inspect -----------------------------------------------------------------------------------
@main.command("inspect")
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect_cmd(path: str, *, as_json: bool) -> None:
    """Show a checkpoint's manifest, files and tensors (shapes and dtypes)."""
    if not is_url(path) and not os.path.isdir(path):
        why = "is not a directory" if os.path.lexists(path) else "does not exist"
        _fail(f"{path} {why}", as_json=as_json)
    try:
        backend, where = checkpoint_backend(path, what="ckptguard inspect")
        if backend.remote:
            backend.require_root()
        manifest = backend.read_manifest(where)
        listed, opener, close = backend.open_files(where, manifest)
        try:
            tensors: list[dict[str, Any]] = [
                {"file": f, "name": t.name, "dtype": t.dtype, "shape": list(t.shape),
                 "bytes": t.nbytes}
                for f, t in iter_tensor_infos(where, listed, opener)
            ]  # fmt: skip
        finally:
            close()
    except CheckpointNotFound as exc:
        _fail(str(exc), as_json=as_json, code=2)
    except FileNotFoundError as exc:
        missing = exc.filename or exc
        _fail(f"{path} is not a valid checkpoint: {missing} is missing", as_json=as_json, code=1)
    except (CheckpointError, OSError) as exc:
        _fail_for(exc, as_json=as_json)
    if as_json:
        _emit_json(
            {
                "path": where,
                "name": manifest.name,
                "step": manifest.step,
                "save_id": manifest.save_id,
                "created_at": manifest.created_at,
                "size_bytes": manifest.total_size,
                "metrics": dict(manifest.metrics),
                "metadata": dict(manifest.metadata),
                "writer": manifest.writer.to_dict(),
                "versions": dict(manifest.versions),
                "files": [f.to_dict() for f in manifest.files],
                "tensors": tensors,
            }
        )
        return
    w = manifest.writer
    _out.print(f"[bold]{where}[/]")
    _out.print(f"  step {manifest.step}, saved {_when(manifest.created_at)} by {w.host} pid {w.pid}"
               f" (ranks {list(w.ranks)} of {w.world_size})")  # fmt: skip
    _out.print(f"  save id {manifest.save_id}, {len(manifest.files)} files, "
               f"{_size(manifest.total_size)}")  # fmt: skip
    if manifest.metrics:
        _out.print(f"  metrics: {json.dumps(dict(manifest.metrics))}")
    versions = ", ".join(f"{k} {v}" for k, v in manifest.versions.items() if k != "platform")
    _out.print(f"  versions: {versions}")
    files = Table(title="files")
    for column in ("path", "size", "xxh3-128"):
        files.add_column(column, justify="right" if column == "size" else "left")
    for f in manifest.files:
        files.add_row(f.path, _size(f.size), f.checksum)
    _out.print(files)
    if tensors:
        table = Table(title="tensors")
        for column in ("file", "name", "dtype", "shape", "size"):
            table.add_column(column, justify="right" if column == "size" else "left")
        for t in tensors:
            table.add_row(t["file"], t["name"], t["dtype"], str(tuple(t["shape"])),
                          _size(t["bytes"]))  # fmt: skip
        _out.print(table)


# -- clean -------------------------------------------------------------------------------------
def _clean_store(backend: Backend, *, yes: bool, stale_after: float, as_json: bool) -> None:
    """On an object store: the uploads no manifest refers to."""
    try:
        gone = clean_store(backend.storage, backend.root, grace=stale_after, dry_run=not yes)
    except (CheckpointError, OSError) as exc:
        _fail_for(exc, as_json=as_json)
    if as_json:
        _emit_json({"dry_run": not yes, "removed" if yes else "planned": gone})
        return
    for prefix in gone:
        _out.print(f"{'removed' if yes else 'would remove'} {prefix}")
    if not gone:
        _out.print(f"nothing to clean in {backend.root}")
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


@main.command("clean")
@click.argument("root", type=click.Path(file_okay=False))
@click.option("--yes", is_flag=True, help="Really remove (default: only show what would go).")
@click.option(
    "--stale-after",
    type=float,
    default=6 * 3600.0,
    show_default=True,
    help="Seconds without change after which a staging dir of an unknown owner is stale.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def clean_cmd(root: str, *, yes: bool, stale_after: float, as_json: bool) -> None:
    """Remove stale staging dirs, trash and quarantine of ROOT (dry run unless --yes).

    On an object store (an fsspec URL): the uploads no manifest refers to.
    """
    if is_url(root):
        _clean_store(_backend(root, as_json=as_json), yes=yes, stale_after=stale_after,
                     as_json=as_json)  # fmt: skip
        return
    if not os.path.isdir(root):
        _fail(f"{root} is not a directory", as_json=as_json)
    kinds = {EntryKind.STAGING_STALE, EntryKind.TRASH, EntryKind.QUARANTINE}
    try:
        entries = scan(root, checksums=False, stale_after=stale_after).entries
        planned = [(e, _plan(root, e)) for e in entries if e.kind in kinds]
        removed: list[str] = []
        actions: list[str] = []
        if yes and planned:
            # recover() first: it rolls back an interrupted replace instead of deleting
            # the only copy, and removes stale staging; then trash and quarantine go,
            # except trash that is the last good copy of a checkpoint.
            actions = list(recover(root, checksums=True, stale_after=stale_after).actions)
            storage, layout = LocalStorage(), RootLayout(os.path.abspath(root))
            with root_lock(layout):
                for entry in scan(root, checksums=False, stale_after=stale_after).entries:
                    if entry.kind == EntryKind.QUARANTINE or (
                        entry.kind == EntryKind.TRASH and _plan(root, entry) == "remove"
                    ):
                        storage.remove_tree(entry.path)
                        storage.remove_file(entry.path + ".json")  # a quarantine note
                        removed.append(entry.path)
    except (CheckpointError, OSError) as exc:
        _fail(str(exc), as_json=as_json)
    if as_json:
        _emit_json(
            {
                "dry_run": not yes,
                "planned": [
                    {"kind": str(e.kind), "path": e.path, "detail": e.detail, "action": action}
                    for e, action in planned
                ],
                "recovery_actions": actions,
                "removed": removed,
            }
        )
        return
    if not planned:
        _out.print(f"nothing to clean in {root}")
        return
    for e, action in planned:
        verb = action if yes else f"would {action}"
        why = " (the last good copy: its checkpoint does not verify)" if action == "keep" else ""
        _out.print(f"{verb} {e.kind:14} {e.path}" + (f"  ({e.detail})" if e.detail else "") + why)
    for action_done in actions:
        _out.print(f"recovered: {action_done}")
    if not yes:
        _out.print("dry run: nothing removed; run again with --yes to do this")


# -- doctor ------------------------------------------------------------------------------------
@main.command("doctor")
@click.argument("root", required=False)
@click.option("--keep", type=int, default=3, show_default=True,
              help="Checkpoints you keep (for the free-space check).")  # fmt: skip
@click.option("--expect-empty", is_flag=True,
              help="ROOT must be empty (a new run's output dir): hidden files count.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def doctor_cmd(root: str | None, *, keep: int, expect_empty: bool, as_json: bool) -> None:
    """Check versions, ROOT and its filesystem for what breaks checkpointing.

    Exit 0 if every check is OK, 1 if some warn, 2 if any fails.
    """
    from ckptguard._tools.doctor import doctor  # noqa: PLC0415

    report = doctor(root, keep=keep, expect_empty=expect_empty)
    if as_json:
        _emit_json(report.to_json())
        sys.exit(report.exit_code)
    table = Table(title="ckptguard doctor" + (f": {root}" if root else ""))
    for column in ("check", "status", "finding", "what to do"):
        table.add_column(column)
    styles = {"ok": "green", "warn": "yellow", "fail": "red"}
    for check in report.checks:
        style = styles[check.status]
        table.add_row(check.name, f"[{style}]{check.status.upper()}[/]", check.message,
                      check.advice)  # fmt: skip
    _out.print(table)
    sys.exit(report.exit_code)
