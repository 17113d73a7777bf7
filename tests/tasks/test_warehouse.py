"""The warehouse on SQLite and PostgreSQL: loads, reads, scores with watermarks, concurrency."""

from __future__ import annotations

import dataclasses
import multiprocessing
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from prefect.states import Failed

from data_contracts.contract import Contract, SensorRule, load_contract
from tasks.errors import AtpError, DataContractError
from tasks.scores_store import (
    LateRows,
    Watermark,
    anomaly_scores,
    first_provisional,
    get_watermark,
    late_rows,
    scoring_watermarks,
    write_scores,
)
from tasks.warehouse import (
    already_ingested,
    ensure_schema,
    entity_bounds,
    get_engine,
    list_entities,
    list_entities_task,
    read_readings,
    readings_table,
    record_ingest,
    upsert_readings,
)

SMD = load_contract("smd")
T0 = datetime(2024, 1, 1)
INJECTIONS = [
    "x'); DROP TABLE smd_readings; --",
    'a"; DELETE FROM anomaly_scores; --',
    "%s %(entity)s ? :entity",
    "ünï€ode\\n",
    "' OR '1'='1",
]


def readings(
    entity: str = "machine-1",
    n: int = 50,
    start: int = 0,
    seed: int = 0,
    labelled_from: int | None = None,
) -> pd.DataFrame:
    """``n`` one-minute rows from ``T0 + start`` minutes; labels 0/1 from row ``labelled_from``."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(rng.random((n, len(SMD.sensor_names))), columns=SMD.sensor_names)
    frame.insert(0, "entity", entity)
    frame.insert(1, "ts", pd.date_range(T0 + pd.Timedelta(minutes=start), periods=n, freq="60s"))
    labels = [None if labelled_from is None or i < labelled_from else i % 2 for i in range(n)]
    frame["label"] = pd.array(labels, dtype="Int64")
    return frame


def minutes(first: int, last: int) -> pd.DatetimeIndex:
    return pd.date_range(T0 + pd.Timedelta(minutes=first), periods=last - first + 1, freq="60s")


def scores(ts: pd.DatetimeIndex, score: float = 1.0) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "ts": ts,
            "score": score,
            "threshold": 0.5,
            "is_anomaly": score > 0.5,
            "p_value": 0.01,
            "top_sensors": [["m01", "m07"]] * len(ts),
            "provisional": False,
        }
    )


def mark(ts: pd.Timestamp, version: str = "1", entity: str = "machine-1") -> Watermark:
    return Watermark(entity, "at", ts.to_pydatetime(), version, f"run-{version}")


def count(engine: sa.Engine, name: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(sa.select(sa.func.count()).select_from(sa.table(name))).scalar_one()
        )


def snapshot(engine: sa.Engine) -> list[list[Any]]:
    with engine.connect() as conn:
        return [
            conn.execute(sa.select(t).order_by(*t.primary_key)).all()
            for t in (anomaly_scores, scoring_watermarks)
        ]


@pytest.fixture
def engine(warehouse_url: str) -> sa.Engine:
    engine = get_engine(warehouse_url)
    ensure_schema(engine, SMD)
    return engine


def test_engines_are_cached_and_sqlite_is_set_up_for_concurrent_writers(sqlite_url: str) -> None:
    engine = get_engine(sqlite_url)
    assert get_engine(sqlite_url) is engine
    with engine.connect() as conn:
        pragmas = [
            conn.exec_driver_sql(f"PRAGMA {p}").scalar()
            for p in ("journal_mode", "foreign_keys", "busy_timeout")
        ]
    assert pragmas == ["wal", 1, 60000]


def test_postgresql_urls_use_psycopg() -> None:
    assert get_engine("postgresql://postgres@127.0.0.1:5432/postgres").dialect.driver == "psycopg"


def test_ensure_schema_is_idempotent(engine: sa.Engine) -> None:
    ensure_schema(engine, SMD)
    for table in (SMD.table_name, "anomaly_scores", "scoring_watermarks", "ingest_log"):
        assert count(engine, table) == 0


def test_ensure_schema_refuses_a_table_that_differs_from_the_contract(warehouse_url: str) -> None:
    engine = get_engine(warehouse_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE smd_readings (entity TEXT, ts TIMESTAMP, m01 FLOAT)")
    with pytest.raises(DataContractError, match="table smd_readings has columns"):
        ensure_schema(engine, SMD)


def test_upsert_twice_changes_nothing(engine: sa.Engine) -> None:
    frame = readings(labelled_from=30)
    assert upsert_readings(engine, SMD, frame) == 50
    assert upsert_readings(engine, SMD, frame) == 0
    assert upsert_readings(engine, SMD, readings(n=70, labelled_from=30)) == 20
    back = read_readings(engine, SMD, end=T0 + pd.Timedelta(minutes=50))
    expected = frame.astype({name: "float32" for name in SMD.sensor_names} | {"entity": "str"})
    pd.testing.assert_frame_equal(back, expected.astype({"ts": "datetime64[us]"}))
    assert count(engine, SMD.table_name) == 70


def test_a_contradicting_row_is_refused_and_nothing_written(engine: sa.Engine) -> None:
    upsert_readings(engine, SMD, readings())
    changed = readings(n=60)
    changed.loc[45, "m03"] += 0.5
    with pytest.raises(DataContractError, match=r"entity='machine-1' ts=2024-01-01 00:45:00 m03"):
        upsert_readings(engine, SMD, changed)
    assert count(engine, SMD.table_name) == 50


def test_duplicate_keys_with_other_values_in_one_frame_are_refused(engine: sa.Engine) -> None:
    frame = pd.concat([readings(n=3), readings(n=1, seed=1)], ignore_index=True)
    with pytest.raises(DataContractError, match="contradict"):
        upsert_readings(engine, SMD, frame)
    assert count(engine, SMD.table_name) == 0
    assert upsert_readings(engine, SMD, pd.concat([readings(n=3), readings(n=1)])) == 3


def test_frame_columns_must_be_the_table_columns(engine: sa.Engine) -> None:
    with pytest.raises(ValueError, match="differ from smd_readings"):
        upsert_readings(engine, SMD, readings().drop(columns="label"))


def test_aware_timestamps_are_stored_as_naive_utc(engine: sa.Engine) -> None:
    frame = readings(n=2)
    frame["ts"] = frame["ts"].dt.tz_localize("Europe/Berlin")
    upsert_readings(engine, SMD, frame)
    stored = read_readings(engine, SMD)["ts"].tolist()
    assert stored == [datetime(2023, 12, 31, 23), datetime(2023, 12, 31, 23, 1)]


def test_unlabelled_contracts_nullable_sensors_and_float_labels(warehouse_url: str) -> None:
    tiny = Contract(name="tiny", version=1, sensors=(SensorRule("x", nullable=True),))
    ensure_schema(warehouse_url, tiny)
    frame = pd.DataFrame({"entity": ["e", "e"], "ts": minutes(0, 1), "x": [np.nan, 1.5]})
    assert upsert_readings(warehouse_url, tiny, frame) == 2
    assert upsert_readings(warehouse_url, tiny, frame) == 0
    assert read_readings(warehouse_url, tiny)["x"].isna().tolist() == [True, False]
    assert entity_bounds(warehouse_url, tiny)["e"].first_labelled_ts is None
    ensure_schema(warehouse_url, SMD)
    labels = readings(n=2).assign(label=[np.nan, 1.0])  # as a CSV with gaps reads them
    upsert_readings(warehouse_url, SMD, labels)
    assert read_readings(warehouse_url, SMD)["label"].tolist() == [pd.NA, 1]


def test_read_readings_filters_sorts_and_adds_context(engine: sa.Engine) -> None:
    upsert_readings(engine, SMD, pd.concat([readings("b", 20), readings("a", 20, seed=1)]))
    every = read_readings(engine, SMD)
    assert every["entity"].tolist() == ["a"] * 20 + ["b"] * 20
    assert every["ts"].tolist() == list(minutes(0, 19)) * 2
    assert every.dtypes[SMD.sensor_names].eq(np.float32).all()
    at = T0 + pd.Timedelta(minutes=10)
    assert read_readings(engine, SMD, entity="a", start=at, end=at + pd.Timedelta(minutes=3))[
        "ts"
    ].tolist() == list(minutes(10, 12))
    assert read_readings(engine, SMD, entity="a", after=at)["ts"].tolist() == list(minutes(11, 19))
    with_context = read_readings(engine, SMD, entity="a", after=at, limit_before=4)
    assert with_context["ts"].tolist() == list(minutes(7, 19))
    assert read_readings(engine, SMD, entity="a", start=at, end=at, limit_before=99)[
        "ts"
    ].tolist() == list(minutes(0, 9))
    assert len(read_readings(engine, SMD, entity="a", start="2024-01-01T00:15:00+00:00")) == 5
    with pytest.raises(ValueError, match="limit_before needs"):
        read_readings(engine, SMD, after=at, limit_before=4)
    end = at + pd.Timedelta(minutes=3)
    ahead = read_readings(engine, SMD, entity="a", start=at, end=end, limit_before=2, limit_after=4)
    assert ahead["ts"].tolist() == list(minutes(8, 16))
    assert read_readings(engine, SMD, entity="a", end=end, limit_after=99)["ts"].tolist() == list(
        minutes(0, 19)
    )
    with pytest.raises(ValueError, match="limit_after needs"):
        read_readings(engine, SMD, entity="a", limit_after=4)


def test_empty_read_keeps_the_dtypes(engine: sa.Engine) -> None:
    frame = read_readings(engine, SMD, entity="nobody")
    assert frame.empty
    assert str(frame["ts"].dtype) == "datetime64[us]" and str(frame["label"].dtype) == "Int64"
    assert frame.dtypes[SMD.sensor_names].eq(np.float32).all()


def test_reading_a_source_never_loaded_is_refused_naming_it(engine: sa.Engine) -> None:
    nab = load_contract("nab")
    for read in (list_entities, entity_bounds, read_readings):
        with pytest.raises(AtpError, match="no readings of source 'nab' .*atp ingest"):
            read(engine, nab)


def test_entities_and_their_bounds(engine: sa.Engine) -> None:
    upsert_readings(engine, SMD, pd.concat([readings("b", 20, labelled_from=5), readings("a", 10)]))
    assert list_entities(engine, SMD) == ["a", "b"]
    bounds = entity_bounds(engine, SMD)
    assert bounds["a"].rows == 10 and bounds["a"].first_labelled_ts is None
    assert (bounds["b"].first_ts, bounds["b"].last_ts) == (T0, T0 + pd.Timedelta(minutes=19))
    assert bounds["b"].first_labelled_ts == T0 + pd.Timedelta(minutes=5)


def test_scores_are_replaced_and_the_watermark_never_moves_back(engine: sa.Engine) -> None:
    first, second = minutes(0, 9), minutes(5, 14)
    with engine.begin() as conn:
        assert get_watermark(conn, "smd", "machine-1", "at") is None
        write_scores(conn, "smd", scores(first), mark(first[-1], "1"))
    with engine.begin() as conn:
        write_scores(conn, "smd", scores(second, 2.0), mark(second[-1], "2"))
    with engine.begin() as conn:  # a backfill of an earlier range
        write_scores(conn, "smd", scores(first[:3], 3.0), mark(first[2], "3"))
        assert get_watermark(conn, "smd", "machine-1", "at") == mark(second[-1], "2")
    with engine.connect() as conn:
        stored = conn.execute(
            sa.select(anomaly_scores.c.score, anomaly_scores.c.top_sensors).order_by(
                anomaly_scores.c.ts
            )
        ).all()
    assert [row.score for row in stored] == [3.0] * 3 + [1.0] * 2 + [2.0] * 10
    assert stored[0].top_sensors == '["m01", "m07"]'
    with engine.begin() as conn:  # a backfill that leaves the watermark alone
        write_scores(
            conn,
            "smd",
            scores(minutes(20, 21)),
            mark(minutes(20, 21)[-1], "4"),
            move_watermark=False,
        )
        assert get_watermark(conn, "smd", "machine-1", "at") == mark(second[-1], "2")


def test_late_rows_are_the_unscored_readings_before_the_watermark(engine: sa.Engine) -> None:
    upsert_readings(engine, SMD, pd.concat([readings(n=20), readings("machine-2", n=5)]))
    scored = minutes(0, 9).delete([3, 4])  # rows 3 and 4 arrived after scoring passed them
    with engine.begin() as conn:
        write_scores(conn, "smd", scores(scored), mark(scored[-1]))
        other = minutes(0, 4)
        write_scores(conn, "smd", scores(other), mark(other[-1], entity="machine-2"))
    with engine.connect() as conn:
        late = late_rows(conn, "smd")
        assert late_rows(conn, "smd", ["machine-2"]) == {}
    expected = LateRows("machine-1", 2, T0 + pd.Timedelta(minutes=3), scored[-1].to_pydatetime())
    assert late == {"machine-1": expected}
    assert str(expected) == "machine-1: 2 rows from 2024-01-01 00:03:00, before 2024-01-01 00:09:00"


def test_provisional_scores_are_replaced_but_never_replace_final_ones(engine: sa.Engine) -> None:
    first, second = minutes(0, 9), minutes(5, 14)
    with engine.begin() as conn:  # rows 5..9 provisional, as recon_mean leaves a series' end
        provisional = scores(first).assign(provisional=[False] * 5 + [True] * 5)
        write_scores(conn, "smd", provisional, mark(first[-1]))
        assert first_provisional(conn, "smd", "machine-1", "at") == first[5]
    with engine.begin() as conn:  # the next run makes them final and adds its own provisional tail
        later = scores(second, 2.0).assign(provisional=[False] * 8 + [True] * 2)
        write_scores(conn, "smd", later, mark(second[-1]))
        assert first_provisional(conn, "smd", "machine-1", "at") == second[8]
    with engine.begin() as conn:  # a slower concurrent run with older rows changes no final row
        write_scores(conn, "smd", scores(first, 3.0).assign(provisional=True), mark(first[-1]))
    with engine.connect() as conn:
        stored = conn.execute(
            sa.select(anomaly_scores.c.score, anomaly_scores.c.provisional).order_by(
                anomaly_scores.c.ts
            )
        ).all()
    assert [row.score for row in stored] == [1.0] * 5 + [2.0] * 10
    assert [row.provisional for row in stored] == [False] * 13 + [True] * 2


def test_a_failure_inside_the_transaction_leaves_scores_and_watermark_untouched(
    engine: sa.Engine,
) -> None:
    ts = minutes(0, 9)
    with engine.begin() as conn:
        write_scores(conn, "smd", scores(ts), mark(ts[-1]))
    before = snapshot(engine)
    with pytest.raises(RuntimeError, match="crash"), engine.begin() as conn:
        write_scores(conn, "smd", scores(minutes(5, 19), 9.0), mark(ts[-1] + pd.Timedelta(hours=1)))
        raise RuntimeError("crash after the scores and the watermark were written")
    assert snapshot(engine) == before
    broken = dataclasses.replace(mark(ts[-1]), model_name="other", last_ts=None)
    with pytest.raises(ValueError, match="not a timestamp"), engine.begin() as conn:
        # the scores are written, then moving the watermark fails
        write_scores(conn, "smd", scores(minutes(5, 19), 9.0), broken)
    assert snapshot(engine) == before
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:  # score is NOT NULL
        write_scores(
            conn,
            "smd",
            scores(minutes(5, 19)).assign(score=[1.0] * 14 + [np.nan]),
            mark(ts[-1] + pd.Timedelta(hours=1)),
        )
    assert snapshot(engine) == before


def test_score_frames_are_checked(engine: sa.Engine) -> None:
    ts = minutes(0, 2)
    bad = {
        "missing column": scores(ts).drop(columns="p_value"),
        "other entity": scores(ts).assign(entity="machine-2"),
        "duplicate timestamps": pd.concat([scores(ts), scores(ts)]),
    }
    for frame in bad.values():
        with pytest.raises(ValueError), engine.begin() as conn:
            write_scores(conn, "smd", frame, mark(ts[-1]))
    assert snapshot(engine) == [[], []]


def _load_in_child(url: str, barrier: Any, results: Any) -> None:
    engine = get_engine(url)
    barrier.wait()
    ensure_schema(engine, SMD)
    results.put(upsert_readings(engine, SMD, readings(n=3000)))


def test_two_processes_loading_the_same_rows_leave_exactly_one_copy(warehouse_url: str) -> None:
    get_engine(warehouse_url)  # the children inherit a cached engine and must not share its pool
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(2), context.Queue()
    children = [
        context.Process(target=_load_in_child, args=(warehouse_url, barrier, results))
        for _ in range(2)
    ]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=120)
    assert [child.exitcode for child in children] == [0, 0]
    assert sorted(results.get(timeout=5) for _ in children) == [0, 3000]
    assert count(get_engine(warehouse_url), SMD.table_name) == 3000


def test_injection_strings_are_plain_values(engine: sa.Engine) -> None:
    frame = pd.concat([readings(entity, 2) for entity in INJECTIONS], ignore_index=True)
    assert upsert_readings(engine, SMD, frame) == 2 * len(INJECTIONS)
    assert list_entities(engine, SMD) == sorted(INJECTIONS)
    entity = INJECTIONS[0]
    assert len(read_readings(engine, SMD, entity=entity)) == 2
    with engine.begin() as conn:
        write_scores(conn, "smd", scores(minutes(0, 1)), mark(minutes(0, 1)[-1], entity=entity))
        assert get_watermark(conn, "smd", entity, "at") is not None
    assert count(engine, SMD.table_name) == 2 * len(INJECTIONS)


def test_injection_strings_as_identifiers_are_refused(engine: sa.Engine) -> None:
    for bad in [*INJECTIONS, "Upper", "1starts_with_digit", "a" * 64]:
        with pytest.raises(ValueError, match="not a valid identifier"):
            readings_table(dataclasses.replace(SMD, name=bad), sa.MetaData())
        sensor = Contract(name="smd", version=1, sensors=(SensorRule(bad),))
        with pytest.raises(ValueError, match="not a valid identifier"):
            readings_table(sensor, sa.MetaData())
        with pytest.raises(ValueError, match="not a valid identifier"), engine.begin() as conn:
            get_watermark(conn, bad, "machine-1", "at")
        with pytest.raises(ValueError, match="not a valid identifier"):
            record_ingest(engine, bad, "x.csv", "0" * 64, 1)
    assert count(engine, SMD.table_name) == 0


def test_ingest_log_records_files_once(engine: sa.Engine) -> None:
    assert not already_ingested(engine, "smd", "ab" * 32)
    record_ingest(engine, "smd", "train/machine-1-1.txt.gz", "ab" * 32, 100)
    record_ingest(engine, "smd", "copy/machine-1-1.txt.gz", "ab" * 32, 100)
    assert already_ingested(engine, "smd", "ab" * 32)
    assert not already_ingested(engine, "other", "ab" * 32)
    assert count(engine, "ingest_log") == 1


def test_only_transient_database_errors_are_retried() -> None:
    retry = list_entities_task.retry_condition_fn
    assert retry is not None
    lost = sa.exc.OperationalError("SELECT 1", {}, Exception("server closed the connection"))
    assert retry(list_entities_task, None, Failed(data=lost))  # type: ignore[arg-type]
    for error in (DataContractError("bad rows"), sa.exc.IntegrityError("INSERT", {}, Exception())):
        assert not retry(list_entities_task, None, Failed(data=error))  # type: ignore[arg-type]
