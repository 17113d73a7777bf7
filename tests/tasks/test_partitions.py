"""Partitions of entities: the split keeps order, the merge keeps every rejection."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prefect.task_runners import ThreadPoolTaskRunner
from prefect_dask import DaskTaskRunner

from tasks.errors import DataContractError, WarehouseUnavailableError
from tasks.partitions import merge_partitions, partition_runner, split_entities
from tasks.scoring import EntityResult


@given(st.lists(st.text(max_size=3), unique=True, max_size=30), st.integers(1, 40))
def test_split_keeps_the_order_in_near_equal_non_empty_partitions(
    entities: list[str], partitions: int
) -> None:
    groups = split_entities(entities, partitions)
    assert [e for group in groups for e in group] == entities
    assert len(groups) == max(1, min(partitions, len(entities)))
    sizes = [len(group) for group in groups]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert all(sizes) or groups == [[]]


def test_split_refuses_fewer_than_one_partition() -> None:
    with pytest.raises(ValueError, match="at least 1, got 0"):
        split_entities(["a"], 0)


def result(entity: str, scored: int = 10) -> EntityResult:
    return EntityResult(entity, scored, 0, "2024-01-01 00:00:00")


def test_merge_concatenates_the_partitions_in_order() -> None:
    outcomes = [[result("a"), result("b")], [result("c", 0)], [result("d")]]
    assert [r.entity for r in merge_partitions(outcomes)] == ["a", "b", "c", "d"]


def test_merge_names_every_rejection_and_what_the_other_partitions_scored() -> None:
    first = DataContractError("1 entity not scored: ['b'] (entities scored: a)\n\nb: m01 > 1")
    third = DataContractError("1 entity not scored: ['e'] (entities scored: none)\n\ne: ts")
    outcomes = [first, [result("c"), result("d", 0)], third]
    with pytest.raises(DataContractError) as failure:
        merge_partitions(outcomes)
    assert failure.value.report == (
        "2 of 3 partitions rejected entities (entities scored by the other partitions: c)\n\n"
        f"{first.report}\n\n{third.report}"
    )


def test_one_partition_raises_its_own_rejection_unchanged() -> None:
    rejection = DataContractError("1 entity not scored: ['a'] (entities scored: none)")
    with pytest.raises(DataContractError) as failure:
        merge_partitions([rejection])
    assert failure.value is rejection


def test_a_failure_that_is_not_a_rejection_wins() -> None:
    outage = WarehouseUnavailableError("warehouse unreachable")
    with pytest.raises(WarehouseUnavailableError) as failure:
        merge_partitions([DataContractError("rejected"), [result("b")], outage])
    assert failure.value is outage


def test_runners_threads_a_dask_scheduler_or_a_local_cluster_of_processes() -> None:
    threads = partition_runner("threads", 3)
    assert isinstance(threads, ThreadPoolTaskRunner) and threads._max_workers == 3
    remote = partition_runner("dask", 3, "tcp://10.0.0.5:8786")
    assert isinstance(remote, DaskTaskRunner) and remote.address == "tcp://10.0.0.5:8786"
    local = partition_runner("dask", 2)
    assert isinstance(local, DaskTaskRunner) and local.address is None
    assert local.cluster_kwargs == {
        "n_workers": 2,
        "threads_per_worker": 1,
        "dashboard_address": None,
    }
    with pytest.raises(ValueError, match="'threads' or 'dask', got 'ray'"):
        partition_runner("ray", 2)  # type: ignore[arg-type]
