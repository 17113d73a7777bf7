"""Score a source's entities in partitions side by side on a Prefect task runner.

The scoring flows split the entities into consecutive partitions (:func:`split_entities`), map
the scoring task over them on :func:`partition_runner` and merge what the partitions returned
(:func:`gather_partitions`). Partitions hold disjoint entities and every chunk of an entity
commits in its own transaction under the entity's lock, so partitions writing at once neither
lose nor duplicate rows, on SQLite and on PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from typing import Any, Literal

from prefect import Task, unmapped
from prefect.futures import PrefectFuture
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from tasks.errors import AtpError, DataContractError
from tasks.scoring import EntityResult

TaskRunnerKind = Literal["threads", "dask"]


def split_entities(entities: Sequence[str], partitions: int) -> list[list[str]]:
    """``entities`` in consecutive runs of near-equal length, in order, none of them empty
    (one empty partition when there are no entities).

    Raises:
        ValueError: ``partitions`` is below 1.
    """
    if partitions < 1:
        raise ValueError(f"partitions must be at least 1, got {partitions}")
    count = max(1, min(partitions, len(entities)))
    size, longer = divmod(len(entities), count)
    bounds = [i * size + min(i, longer) for i in range(count + 1)]
    return [list(entities[a:b]) for a, b in pairwise(bounds)]


def partition_runner(
    kind: TaskRunnerKind, partitions: int, dask_address: str | None = None
) -> TaskRunner[Any]:
    """A task runner (not started) that runs ``partitions`` task runs at once.

    ``threads``: a thread pool in the flow's process. ``dask``: prefect-dask's DaskTaskRunner on
    the scheduler at ``dask_address``, or without one on a temporary LocalCluster of one
    single-threaded worker process per partition.
    """
    if kind == "threads":
        return ThreadPoolTaskRunner(max_workers=partitions)
    if kind != "dask":
        raise ValueError(f"task runner must be 'threads' or 'dask', got {kind!r}")
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as error:
        raise AtpError(
            "task runner 'dask' needs prefect-dask: "
            "pip install 'anomaly-transformer-pipeline[dask]'"
        ) from error
    if dask_address:
        return DaskTaskRunner(address=dask_address)
    cluster = {"n_workers": partitions, "threads_per_worker": 1, "dashboard_address": None}
    return DaskTaskRunner(cluster_kwargs=cluster)


def merge_partitions(outcomes: Sequence[list[EntityResult] | BaseException]) -> list[EntityResult]:
    """The partitions' results in partition order, or the failure that stops the run.

    A failure other than DataContractError is raised as is (the first one). Otherwise, when
    partitions rejected entities, one DataContractError carries each such partition's report
    (the entities it rejected, their broken rules) and the entities the other partitions scored.
    """
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    for failure in failures:
        if not isinstance(failure, DataContractError):
            raise failure
    results = [r for o in outcomes if not isinstance(o, BaseException) for r in o]
    if not failures:
        return results
    if len(outcomes) == 1:
        raise failures[0]
    scored = ", ".join(r.entity for r in results if r.scored) or "none"
    reports = "\n\n".join(f.report for f in failures if isinstance(f, DataContractError))
    raise DataContractError(
        f"{len(failures)} of {len(outcomes)} partitions rejected entities "
        f"(entities scored by the other partitions: {scored})\n\n{reports}"
    )


def gather_partitions(futures: Sequence[PrefectFuture[list[EntityResult]]]) -> list[EntityResult]:
    """Wait for every partition, then :func:`merge_partitions` what they returned or raised."""
    return merge_partitions([future.result(raise_on_failure=False) for future in futures])


def map_partitions(
    scoring_task: Task[..., list[EntityResult]],
    groups: list[list[str]],
    kind: TaskRunnerKind,
    dask_address: str | None,
    **shared: Any,
) -> list[EntityResult]:
    """Run ``scoring_task`` once per group (its ``entities``) on a :func:`partition_runner`, the
    ``shared`` arguments the same for every group; :func:`gather_partitions` of the runs."""
    with partition_runner(kind, len(groups), dask_address) as runner:
        arguments = {"entities": groups} | {name: unmapped(v) for name, v in shared.items()}
        return gather_partitions(runner.map(scoring_task, arguments))
