"""Alarm events: merge rules, and one row per event however the scores were written."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from data_contracts.contract import load_contract
from tasks.alarm_tables import anomaly_events, lock_entity
from tasks.events import EventRules, derive_events, event_top_sensors, list_events, refresh_events
from tasks.scores_store import Watermark, write_scores
from tasks.warehouse import ensure_schema, get_engine

T0 = pd.Timestamp("2024-01-01")
EVENT_COLUMNS = [
    "start_ts",
    "end_ts",
    "status",
    "points",
    "length",
    "peak_score",
    "peak_ts",
    "min_p_value",
    "top_sensors",
    "model_version",
]


def _scores(pattern: str, *, offset: int = 0) -> pd.DataFrame:
    """One score row per character: ``X`` anomalous, ``.`` normal; scores and p-values vary."""
    flags = np.array([c == "X" for c in pattern])
    n = len(pattern)
    score = np.where(flags, 2.0, 0.5) + 0.01 * ((np.arange(n) + offset) % 7)
    top = [
        json.dumps([["m01", 0.6], ["m02", 0.4]])
        if (i + offset) % 2
        else json.dumps([["m03", 0.9], ["m01", 0.1]])
        for i in range(n)
    ]
    return pd.DataFrame(
        {
            "ts": T0 + pd.to_timedelta(np.arange(n) + offset, unit="min"),
            "score": score,
            "threshold": 1.0,
            "is_anomaly": flags,
            "p_value": np.where(flags, 0.001, 0.5),
            "top_sensors": top,
            "provisional": False,
        }
    )


def _oracle(pattern: str, rules: EventRules) -> pd.DataFrame:
    """Events of the whole pattern derived in one go, as the table would hold them."""
    frame = _scores(pattern).assign(pos=np.arange(len(pattern)), model_version="1")
    events = derive_events(frame[frame["is_anomaly"]], len(pattern), rules)
    return pd.DataFrame(events, columns=EVENT_COLUMNS)


def _write(url: str, frame: pd.DataFrame, rules: EventRules, *, model: str = "m") -> None:
    """What scoring does per chunk: lock, write scores, re-derive events, in one transaction."""
    last = pd.Timestamp(frame["ts"].iloc[-1]).to_pydatetime()
    with get_engine(url).begin() as conn:
        lock_entity(conn, "smd", "e1", model)
        write_scores(conn, "smd", frame, Watermark("e1", model, last, "1", "run"))
        refresh_events(conn, "smd", "e1", model, frame["ts"].iloc[0].to_pydatetime(), last, rules)


def _stored(url: str, model: str = "m") -> pd.DataFrame:
    e = anomaly_events.c
    query = sa.select(*(e[c] for c in EVENT_COLUMNS)).where(e.model_name == model)
    with get_engine(url).connect() as conn:
        rows = conn.execute(query.order_by(e.start_ts)).all()
    return pd.DataFrame([tuple(r) for r in rows], columns=EVENT_COLUMNS)


def _assert_same(stored: pd.DataFrame, expected: pd.DataFrame) -> None:
    for column in ("start_ts", "end_ts", "peak_ts"):
        stored[column] = pd.to_datetime(stored[column])
        expected[column] = pd.to_datetime(expected[column])
    pd.testing.assert_frame_equal(
        stored.reset_index(drop=True), expected.reset_index(drop=True), check_dtype=False
    )


@pytest.fixture
def url(warehouse_url: str) -> str:
    ensure_schema(warehouse_url, load_contract("smd"))
    return warehouse_url


def test_gap_min_length_and_status() -> None:
    pattern = "X..X...XX.X....X"  # gap 2 merges 0-3; 7-10; 15 alone, last row, still open
    frame = _scores(pattern).assign(pos=np.arange(len(pattern)), model_version="1")
    anomalous = frame[frame["is_anomaly"]]
    events = derive_events(anomalous, len(pattern), EventRules(gap=2, min_length=1))
    spans = [(e["start_ts"].minute, e["end_ts"].minute, e["status"], e["points"]) for e in events]
    assert spans == [(0, 3, "closed", 2), (7, 10, "closed", 3), (15, 15, "open", 1)]
    longer = derive_events(anomalous, len(pattern), EventRules(gap=2, min_length=4))
    assert [(e["start_ts"].minute, e["length"]) for e in longer] == [(0, 4), (7, 4)]
    wide = derive_events(anomalous, len(pattern), EventRules(gap=3, min_length=1))
    assert [(e["start_ts"].minute, e["end_ts"].minute) for e in wide] == [(0, 10), (15, 15)]
    assert derive_events(anomalous, len(pattern) + 2, EventRules(gap=2))[-1]["status"] == "open"
    assert derive_events(anomalous, len(pattern) + 3, EventRules(gap=2))[-1]["status"] == "closed"


def test_event_sensors_weigh_point_shares_by_score() -> None:
    tops = [json.dumps([["a", 0.5], ["b", 0.5]]), json.dumps([["b", 1.0]]), None]
    assert event_top_sensors(tops, np.array([2.0, 1.0, 9.0]), k=1) == [["b", 0.6667]]
    with pytest.raises(ValueError, match="gap"):
        EventRules(gap=-1)


PATTERN = ("....XX.X..........XXX....X.X..X...............X" * 3) + "...XX"


def test_split_runs_and_backfills_give_the_events_of_one_run(url: str) -> None:
    rules = EventRules(gap=3, min_length=2)
    expected = _oracle(PATTERN, rules)
    _write(url, _scores(PATTERN), rules, model="whole")
    _assert_same(_stored(url, "whole"), expected.copy())

    rng = np.random.default_rng(1)
    cuts = np.sort(rng.choice(np.arange(1, len(PATTERN)), size=12, replace=False))
    for lo, hi in zip([0, *cuts], [*cuts, len(PATTERN)], strict=True):
        _write(url, _scores(PATTERN[lo:hi], offset=lo), rules, model="split")
        _assert_same(_stored(url, "split"), _oracle(PATTERN[:hi], rules))
    for lo, hi in ((20, 90), (0, len(PATTERN)), (45, 50), (140, len(PATTERN))):
        _write(url, _scores(PATTERN[lo:hi], offset=lo), rules, model="split")
    _assert_same(_stored(url, "split"), expected.copy())


def test_rescoring_that_changes_alarms_rederives_the_touched_events(url: str) -> None:
    rules = EventRules(gap=2, min_length=1)
    _write(url, _scores(PATTERN), rules)
    patched = PATTERN[:30] + "XXXXXXXXXX" + PATTERN[40:60] + "." * 20 + PATTERN[80:]
    _write(url, _scores(patched[25:85], offset=25), rules)
    _assert_same(_stored(url), _oracle(patched, rules))


def test_an_open_event_is_extended_then_closed_and_listed(url: str) -> None:
    rules = EventRules(gap=2, min_length=1)
    _write(url, _scores("....XX"), rules)
    assert [e.status for e in list_events(url)] == ["open"]
    _write(url, _scores(".XX", offset=6), rules)
    _write(url, _scores("X..", offset=9), rules)
    (event,) = list_events(url)
    assert (event.start_ts, event.end_ts, event.points) == (
        T0 + pd.Timedelta(minutes=4),
        T0 + pd.Timedelta(minutes=9),
        5,
    )
    assert event.status == "open" and event.top_sensors[0][0] in {"m01", "m03"}
    _write(url, _scores(".", offset=12), rules)
    assert list_events(url) == [] and len(list_events(url, open_only=False)) == 1


def test_a_negative_limit_is_refused_on_every_warehouse(url: str) -> None:
    _write(url, _scores("XX"), EventRules())
    assert list_events(url, limit=0) == []
    with pytest.raises(ValueError, match="limit must be at least 0, got -1"):
        list_events(url, limit=-1)
