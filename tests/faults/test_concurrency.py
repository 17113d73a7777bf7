"""Two scoring runs, or two overlapping backfills, at once: the result equals one run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from conftest import CHUNK_ROWS, ROWS, assert_same_scores, clean_scores, stored_scores, watermarks
from fault_workers import backfill_all, fork_server, readings, score_all

CONTEXT = fork_server()


def run_together(target: Any, *argument_sets: tuple[Any, ...]) -> None:
    """Start one child per argument set; they begin work at the same moment."""
    barrier = CONTEXT.Barrier(len(argument_sets))
    children = [CONTEXT.Process(target=target, args=(*args, barrier)) for args in argument_sets]
    for child in children:
        child.start()
    for child in children:
        child.join(120)
    assert [child.exitcode for child in children] == [0] * len(children)


def test_two_scoring_runs_at_once_equal_one(loaded_warehouse: str, checkpoint: Path) -> None:
    url = loaded_warehouse
    run_together(score_all, (url, checkpoint, CHUNK_ROWS), (url, checkpoint, CHUNK_ROWS))
    assert_same_scores(stored_scores(url), clean_scores(url, checkpoint))
    assert watermarks(url) == {"machine-1": pd.Timestamp(readings(ROWS)["ts"].max())}


def test_two_overlapping_backfills_at_once_equal_one(
    loaded_warehouse: str, checkpoint: Path
) -> None:
    url = loaded_warehouse
    a, b, c = (pd.Timestamp(f"2024-01-01 0{h}:00").to_pydatetime() for h in (1, 2, 4))
    first, second = (url, checkpoint, CHUNK_ROWS, a, c), (url, checkpoint, CHUNK_ROWS, b, c)
    run_together(backfill_all, first, second)
    assert_same_scores(stored_scores(url), clean_scores(url, checkpoint, a, c))
    assert watermarks(url) == {}
