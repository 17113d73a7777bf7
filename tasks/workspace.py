"""A training run's own folder under ``$ATP_HOME/runs/<source>/``: its dataset, checkpoints, plots.

A run works in ``<id>/`` (``id``: its Prefect flow run id) while it holds the lock of
``<id>.lock``, and removes both when it ends, whatever the outcome: runs at once never share a
file, and nothing of a run stays once the registry holds its model. The kernel drops the lock of a
killed run, so the next run of the source finds it free, hands its id to ``on_killed`` (ending what
it left open, such as its MLflow run) and removes its folder.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from prefect.utilities.context import get_task_and_flow_run_ids

from tasks.locks import create_locked, try_lock

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"


def remove_killed_workspaces(root: Path, on_killed: Callable[[str], None]) -> list[str]:
    """Remove the folders under ``root`` of runs that ended without removing them (killed); call
    ``on_killed`` with each one's id first, holding its lock; the ids."""
    removed = []
    for lock in sorted(root.glob(f"*{LOCK_SUFFIX}")):
        fd = try_lock(lock)
        if fd is None:  # a live run's
            continue
        try:
            run_id = lock.name.removesuffix(LOCK_SUFFIX)
            on_killed(run_id)
            shutil.rmtree(root / run_id, ignore_errors=True)
            lock.unlink(missing_ok=True)
            removed.append(run_id)
            log.warning("removed the folder of training run %s, which was killed", run_id)
        finally:
            os.close(fd)
    return removed


@contextmanager
def run_workspace(root: Path, on_killed: Callable[[str], None]) -> Iterator[Path]:
    """This run's empty folder under ``root``, removed when the run ends; the folders of killed
    runs are removed first (:func:`remove_killed_workspaces`)."""
    root.mkdir(parents=True, exist_ok=True)
    remove_killed_workspaces(root, on_killed)
    _, flow_run_id = get_task_and_flow_run_ids()
    run_id = str(flow_run_id or uuid.uuid4())
    lock = root / f"{run_id}{LOCK_SUFFIX}"
    fd = create_locked(lock)
    folder = root / run_id
    try:
        folder.mkdir()
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        lock.unlink(missing_ok=True)
        os.close(fd)
