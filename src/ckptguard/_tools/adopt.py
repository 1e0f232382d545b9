"""``ckptguard adopt ROOT``: seal checkpoints written before ckptguard with manifests.

Without ``--yes`` it only shows what it would do (a dry run): each checkpoint without a
manifest (a Trainer's ``checkpoint-N``, Accelerate's ``checkpoint_N``) or without a
checksum sidecar (Lightning's ``.ckpt`` files), its size, and
whether it passes the structural check (see ``_manager/adoption.py``). With ``--yes`` it
seals each one that passes, in place, and leaves the others alone (named, with why).
Exit codes: 0 every candidate sealed (or none to seal); 1 some failed the structural
check; 2 bad usage or a root that is not there.
"""

from __future__ import annotations

import os
from typing import Any

import click

from ckptguard._errors import CheckpointError, CheckpointNotFound, UnsupportedRoot
from ckptguard._format.layout import ACCELERATE_NAMING, HF_NAMING
from ckptguard._manager.adoption import Adoptable, adopt, adoptable, adoptable_files
from ckptguard._storage.base import is_url
from ckptguard._tools.output import emit, json_option, problems_json, reports_errors, size

__all__ = ["adopt_cmd"]


def _candidates(root: str) -> list[Adoptable]:
    seen: dict[str, Adoptable] = {}
    for naming in (HF_NAMING, ACCELERATE_NAMING):
        for found in adoptable(root, naming):
            seen.setdefault(found.path, found)
    for found in adoptable_files(root):  # Lightning's .ckpt files
        seen.setdefault(found.path, found)
    return sorted(seen.values(), key=lambda a: (a.step, a.path))


@click.command("adopt")
@click.argument("root", type=click.Path(file_okay=False))
@click.option("--yes", is_flag=True, help="Really seal them (default: only show what would be).")
@json_option
@reports_errors
def adopt_cmd(root: str, *, yes: bool, as_json: bool) -> None:
    """Seal checkpoints written without ckptguard with manifests (dry run without --yes)."""
    if is_url(root):
        raise UnsupportedRoot(
            f"{root} is a URL: adopt works on local and shared filesystems",
            path=root,
            hint="adopt on the filesystem the checkpoints were written to, then mirror",
        )
    if not os.path.isdir(root):
        raise CheckpointNotFound(
            f"{root} is not a directory", path=root, hint="give the run's output dir"
        )
    rows: list[dict[str, Any]] = []
    failed = False
    for candidate in _candidates(os.path.abspath(root)):
        row: dict[str, Any] = {
            "path": candidate.path,
            "step": candidate.step,
            "size_bytes": candidate.size_bytes,
            "problems": problems_json(candidate.path, candidate.problems),
            "action": "seal" if candidate.ok else "skip",
            "done": False,
        }
        if candidate.ok and yes:
            try:
                adopt(candidate)
                row["done"] = True
            except (CheckpointError, OSError) as exc:
                row["action"] = "failed"
                row["problems"] += problems_json(candidate.path, [str(exc)])
        failed = failed or not candidate.ok or row["action"] == "failed"
        rows.append(row)
    if as_json:
        emit(ok=not failed, root=os.path.abspath(root), dry_run=not yes, checkpoints=rows)
    else:
        if not rows:
            click.echo(f"nothing to adopt in {root}: every checkpoint has a manifest")
        for row in rows:
            if row["action"] == "seal":
                verb = "sealed" if row["done"] else "would seal"
                click.echo(f"{verb} {row['path']} ({size(row['size_bytes'])})")
            else:
                why = "; ".join(p["problem"] for p in row["problems"])
                click.echo(f"not sealing {row['path']}: {why}")
        if rows and not yes:
            click.echo("dry run: run again with --yes to seal them")
        elif any(r["done"] for r in rows):
            click.echo(
                "each original is kept in quarantine (hard links, no extra space) until "
                "`ckptguard clean ROOT --yes`"
            )
    raise SystemExit(1 if failed else 0)
