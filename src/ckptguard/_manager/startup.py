"""What a manager does when it opens a root: repair, warn, and choose its run.

Rank 0 decides for every rank (see ``lineage.py``); repairs run on one process per node
(one for an object store, where every node sees the same root). Every rank hears of any
failure, so that no rank is left alone in a collective. A read-only manager repairs
nothing and holds nothing: it reads the newest run (or ``run_id``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ckptguard._coordination.base import gather_failures
from ckptguard._errors import ForeignRun, RankFailure
from ckptguard._manager.lineage import Lineage, RunHold, choose_and_hold, reading_run

if TYPE_CHECKING:
    from ckptguard._coordination.base import Coordinator
    from ckptguard._manager.catalog import Catalog
    from ckptguard._protocol.backend import Backend

__all__ = ["start"]

_log = logging.getLogger("ckptguard.manager")


def _on_rank_zero(
    backend: Backend,
    catalog: Catalog,
    *,
    read_only: str | None,
    check_environment: bool,
    run_id: str | None,
    new_lineage: bool,
    lock_timeout: float,
) -> tuple[Lineage, RunHold | None]:
    if check_environment:
        from ckptguard._tools.doctor import warn_at_start  # noqa: PLC0415 - packaging

        warn_at_start(backend.root, log=_log)
    if read_only is not None:
        return reading_run(catalog, run_id=run_id), None
    return choose_and_hold(
        backend, catalog, run_id=run_id, new_lineage=new_lineage, lock_timeout=lock_timeout
    )


def start(
    backend: Backend,
    catalog: Catalog,
    coord: Coordinator,
    *,
    read_only: str | None,
    check_environment: bool,
    run_id: str | None,
    new_lineage: bool,
    stale_after: float,
    lock_timeout: float,
) -> tuple[Lineage, RunHold | None]:
    """(this manager's run, its hold on it); ``read_only``: why the root is, or None."""
    error: str | None = None
    chosen: dict[str, Any] | None = None
    hold: RunHold | None = None
    try:
        repairs = coord.rank == 0 if backend.strategy.shared else coord.local_rank == 0
        if read_only is not None and coord.rank == 0:
            _log.info("%s is read-only, no start-up recovery: %s", backend.root, read_only)
        elif repairs and read_only is None:
            backend.prepare_root()
            for action in backend.repair(stale_after=stale_after, lock_timeout=lock_timeout):
                _log.info("startup recovery: %s", action)
        if coord.rank == 0:
            lineage, hold = _on_rank_zero(
                backend,
                catalog,
                read_only=read_only,
                check_environment=check_environment,
                run_id=run_id,
                new_lineage=new_lineage,
                lock_timeout=lock_timeout,
            )
            chosen = {"run": lineage.run, "legacy": lineage.legacy}
    except ForeignRun as exc:
        if coord.world_size == 1:
            raise
        chosen = {"foreign": exc.message}
    except Exception as exc:
        if coord.world_size == 1:
            raise
        error = f"{type(exc).__name__}: {exc}"
    if coord.world_size > 1:
        if failures := gather_failures(coord, error):
            raise RankFailure(
                f"starting the checkpoint manager on {backend.root} failed on rank(s) "
                f"{sorted(failures)}",
                path=backend.root,
                failures=failures,
            )
        chosen = coord.broadcast(chosen)
    if chosen is None or "foreign" in chosen:
        raise ForeignRun(str((chosen or {}).get("foreign")), path=backend.root)
    lineage = Lineage(str(chosen["run"]), legacy=bool(chosen["legacy"]))
    if hold is None and read_only is None:  # ranks but 0 follow its choice
        hold = RunHold(backend, lineage.run)
    return lineage, hold
