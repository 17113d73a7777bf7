"""Events, drift checks and adaptive thresholds out of the scheduled scoring and backfill flows.

The champion is a tiny untrained network registered by hand, so that these tests do not depend on
training: what they check is what scoring does with any model's scores.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
import torch

from data_contracts.contract import contract_from_dict, load_contract
from flows.operations import events_flow, status_flow
from flows.scoring import backfill_flow, scoring_flow
from model.adaptive import AciState, aci_scores
from model.checkpoint import save_checkpoint
from model.config import ModelConfig
from model.drift import TrainingProfile
from model.network import AnomalyTransformer
from model.scaling import Scaler
from model.scoring import score_series
from model.thresholds import conformal_threshold
from tasks.alarm_tables import adaptive_state, anomaly_events, drift_flags
from tasks.drift_monitor import NO_PROFILE, latest_drift
from tasks.errors import AtpError, DataContractError
from tasks.events import EventRules, derive_events
from tasks.ingest import read_smd
from tasks.load import load_frame
from tasks.registry import configure_tracking, load_model_version, log_and_register, set_alias
from tasks.scores_store import anomaly_scores
from tasks.scoring import check_model_source
from tasks.settings import get_settings
from tasks.warehouse import ensure_schema, get_engine, readings_table, upsert_readings

ALPHA = 0.05
TRAIN_END = pd.Timestamp("2020-01-01 05:00")  # the first 300 rows of each machine
PROFILED = "machine-9-1"  # the other machine has no training profile in the checkpoint


def _register_champion(frame: pd.DataFrame, sensors: list[str], path: Path) -> None:
    """An untrained 10-step network with scalers, calibration scores and one training profile."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        n_channels=len(sensors), win_size=10, d_model=8, n_heads=2, e_layers=1, d_ff=8
    )
    model = AnomalyTransformer(cfg).eval()
    train = frame[frame["ts"] < TRAIN_END]
    scalers, calibration = {}, []
    for entity, rows in train.groupby("entity"):
        raw = rows[sensors].to_numpy(np.float64)
        scalers[entity] = Scaler.fit(raw)
        scaled = scalers[entity].transform(raw).astype(np.float32)
        calibration.append(score_series(model, scaled, "recon_mean", skip=200).scores)
    scores = np.sort(np.concatenate(calibration)).astype(float)
    profile = TrainingProfile.fit(train.loc[train["entity"] == PROFILED, sensors].to_numpy())
    extras = {
        "source": "smd",
        "sensors": sensors,
        "scoring_method": "recon_mean",
        "scalers": {e: s.to_dict() for e, s in scalers.items()},
        "threshold": conformal_threshold(scores, ALPHA),
        "calibration_scores": scores.tolist(),
        "calibration": {"method": "conformal", "alpha": ALPHA, "n_scores": int(scores.size)},
        "training_profiles": {PROFILED: profile.to_dict()},
    }
    save_checkpoint(path, model, cfg, extras)
    settings = get_settings()
    configure_tracking(settings.mlflow_tracking_uri, settings.artifact_root)
    registered = log_and_register(
        checkpoint_path=path,
        model_name=settings.model_name,
        run_name="hand-built",
        params={},
        metrics={},
    )
    set_alias(settings.model_name, "champion", registered.version)


@pytest.fixture
def warehouse_url(sqlite_url: str) -> str:
    """SQLite only: tests/tasks run events, drift and adaptive state on PostgreSQL too."""
    return sqlite_url


@pytest.fixture
def readings(atp_env: str, smd_folder: Path, tmp_path: Path) -> pd.DataFrame:
    """The SMD folder's readings (not loaded yet) and a registered champion."""
    frame = read_smd(smd_folder).frame
    contract = load_contract("smd")
    ensure_schema(atp_env, contract)
    _register_champion(frame, contract.sensor_names, tmp_path / "model.ckpt")
    return frame


def _load(url: str, frame: pd.DataFrame, until: str | None = None) -> None:
    rows = frame if until is None else frame[frame["ts"] < pd.Timestamp(until)]
    upsert_readings(url, load_contract("smd"), rows)


def _table(url: str, table: sa.Table, *columns: str) -> pd.DataFrame:
    query = sa.select(*(table.c[c] for c in columns)).order_by(table.c.entity, table.c[columns[1]])
    with get_engine(url).connect() as conn:
        return pd.DataFrame([tuple(r) for r in conn.execute(query)], columns=list(columns))


EVENT_COLUMNS = (
    "entity",
    "start_ts",
    "end_ts",
    "status",
    "points",
    "peak_score",
    "min_p_value",
    "top_sensors",
    "model_version",
)
SCORE_COLUMNS = (
    "entity",
    "ts",
    "score",
    "threshold",
    "is_anomaly",
    "p_value",
    "top_sensors",
    "model_version",
    "provisional",
)


def _events_from_all_scores(url: str, rules: EventRules) -> pd.DataFrame:
    """The oracle: events derived in one go from every stored score of each entity."""
    scores = _table(url, anomaly_scores, *SCORE_COLUMNS)
    found = []
    for entity, rows in scores.groupby("entity"):
        rows = rows.reset_index(drop=True).assign(pos=lambda f: np.arange(len(f)))
        for event in derive_events(rows[rows["is_anomaly"]], len(rows), rules):
            found.append({"entity": entity} | event)
    return pd.DataFrame(found)[list(EVENT_COLUMNS)]


def test_events_and_drift_agree_across_split_runs_and_backfills(readings: pd.DataFrame) -> None:
    url = get_settings().warehouse_url
    rules = {"event_gap": 3, "event_min_length": 2}
    for until in ("2020-01-01 06:40", None):
        _load(url, readings, until)
        scoring_flow(source="smd", **rules)
    scheduled = _table(url, anomaly_events, *EVENT_COLUMNS)
    assert len(scheduled) >= 2 and set(scheduled["entity"]) == {"machine-9-1", "machine-9-2"}
    expected = _events_from_all_scores(url, EventRules(gap=3, min_length=2))
    pd.testing.assert_frame_equal(scheduled, expected, check_dtype=False)

    backfill_flow(source="smd", **rules)
    pd.testing.assert_frame_equal(_table(url, anomaly_events, *EVENT_COLUMNS), scheduled)

    drift = {state.entity: state for state in latest_drift(url, "smd")}
    assert set(drift) == {"machine-9-1", "machine-9-2"}
    assert drift[PROFILED].drifted_sensors and drift["machine-9-2"].drifted_sensors == []
    assert str(drift[PROFILED].batch_end) == "2020-01-01 08:19:00"
    flags = _table(
        url, drift_flags, "entity", "batch_start", "flag", "alarm_rate", "p_value", "statistics"
    )
    assert len(flags) == 4  # two scheduled batches per machine, none from the backfills
    for row in flags.itertuples():
        assert row.flag == (row.p_value <= 0.01 and row.alarm_rate >= 2 * ALPHA)
        statistics = json.loads(row.statistics)
        assert ("note" in statistics) == (row.entity != PROFILED)
    assert NO_PROFILE in flags["statistics"].iloc[-1]

    status = status_flow()
    open_events = scheduled[scheduled["status"] == "open"]
    assert {e.entity: e.open_events for e in status.entities} == {
        entity: int((open_events["entity"] == entity).sum()) for entity in drift
    }
    assert [d.entity for d in status.drifting] == [e for e, d in sorted(drift.items()) if d.flag]
    listed = events_flow(open_only=False, limit=1000)
    assert len(listed) == len(scheduled)
    assert [e.status for e in events_flow()] == ["open"] * len(open_events)


def test_backfill_bounds_with_an_offset_are_utc_and_unusable_bounds_or_rules_are_refused(
    readings: pd.DataFrame,
) -> None:
    url = get_settings().warehouse_url
    _load(url, readings)
    naive = backfill_flow(source="smd", start=datetime(2020, 1, 1, 6), end=datetime(2020, 1, 1, 7))
    plus_two = timezone(timedelta(hours=2))
    aware = backfill_flow(
        source="smd",
        start=datetime(2020, 1, 1, 8, tzinfo=plus_two),
        end=datetime(2020, 1, 1, 9, tzinfo=plus_two),
    )
    assert [(r.entity, r.scored) for r in aware] == [(r.entity, r.scored) for r in naive]
    assert {r.scored for r in naive} == {60}
    written = _table(url, anomaly_scores, *SCORE_COLUMNS)
    assert written["ts"].min() == pd.Timestamp("2020-01-01 06:00") and len(written) == 120
    with pytest.raises(AtpError, match="start 2020-01-01 07:00:00 is after end 2020-01-01 06:00"):
        backfill_flow(source="smd", start=datetime(2020, 1, 1, 7), end=datetime(2020, 1, 1, 6))
    with pytest.raises(AtpError, match="event rule gap must be an int >= 0, got -1"):
        backfill_flow(source="smd", event_gap=-1)
    with pytest.raises(AtpError, match="event rule min_length must be an int >= 1, got 0"):
        scoring_flow(source="smd", event_min_length=0)
    pd.testing.assert_frame_equal(_table(url, anomaly_scores, *SCORE_COLUMNS), written)


def test_rows_that_arrive_behind_the_watermark_are_reported_until_a_backfill_scores_them(
    readings: pd.DataFrame,
) -> None:
    url, contract = get_settings().warehouse_url, load_contract("smd")
    stamps = readings["ts"]
    gap = (readings["entity"] == PROFILED) & stamps.between("2020-01-01 06:00", "2020-01-01 06:09")
    _load(url, readings[~gap])
    scoring_flow(source="smd")
    summary = load_frame(url, contract, readings, path=Path("late.csv"), skipped=[])
    assert summary.rows_new == 10
    late = f"{PROFILED}: 10 rows from 2020-01-01 06:00:00, before 2020-01-01 08:19:00"
    assert summary.late == (late,)
    status = {e.entity: e for e in status_flow().entities}
    assert {e: (s.unscored_rows, s.late_rows) for e, s in status.items()} == {
        PROFILED: (0, 10),
        "machine-9-2": (0, 0),
    }
    backfill_flow(source="smd", start=datetime(2020, 1, 1, 6), end=datetime(2020, 1, 1, 8, 19))
    assert {e.late_rows for e in status_flow().entities} == {0}
    assert load_frame(url, contract, readings, path=Path("again.csv"), skipped=[]).late == ()


def test_a_champion_of_another_source_or_sensors_is_refused_before_scoring(
    readings: pd.DataFrame,
) -> None:
    loaded = load_model_version(get_settings().model_name, "champion")
    smd = load_contract("smd")
    check_model_source(loaded, smd)
    pumps = contract_from_dict({"name": "pumps", "version": 1, "sensors": {"columns": ["p"]}})
    with pytest.raises(AtpError, match="trained on source 'smd', not 'pumps': keep one registered"):
        check_model_source(loaded, pumps)
    fewer = contract_from_dict(
        {"name": "smd", "version": 2, "sensors": {"columns": smd.sensor_names[1:]}}
    )
    with pytest.raises(AtpError, match="reads sensors \\['m01'\\] that contract 'smd' no longer"):
        check_model_source(loaded, fewer)


def test_adaptive_mode_carries_its_state_across_batches_and_runs(readings: pd.DataFrame) -> None:
    url = get_settings().warehouse_url
    for until in ("2020-01-01 06:40", None):  # the second run re-scores 9 provisional rows
        _load(url, readings, until)
        scoring_flow(source="smd", threshold_mode="adaptive", chunk_rows=120)
    scores = _table(url, anomaly_scores, *SCORE_COLUMNS)
    calibration = load_model_version(get_settings().model_name, "champion").extras[
        "calibration_scores"
    ]
    for _, rows in scores.groupby("entity"):
        assert len(rows) == 500 and rows["provisional"].tolist() == [False] * 491 + [True] * 9
        expected = aci_scores(AciState(ALPHA), calibration, rows["score"].to_numpy())
        np.testing.assert_array_equal(rows["threshold"], expected.thresholds)
        np.testing.assert_array_equal(rows["is_anomaly"], expected.is_anomaly)
    state = _table(url, adaptive_state, "entity", "last_ts", "state")
    assert [json.loads(s)["n_scored"] for s in state["state"]] == [491, 491]  # final rows only
    assert scores["threshold"].nunique() > 1

    backfill_flow(source="smd")
    static = _table(url, anomaly_scores, *SCORE_COLUMNS)
    assert static["threshold"].nunique() == 1
    np.testing.assert_allclose(static["score"], scores["score"], rtol=1e-6)


def test_an_entity_whose_rows_break_the_contract_is_not_scored_the_others_are(
    readings: pd.DataFrame,
) -> None:
    url = get_settings().warehouse_url
    _load(url, readings)
    table = readings_table(load_contract("smd"), sa.MetaData())
    row = (table.c.entity == "machine-9-2") & (table.c.ts == datetime(2020, 1, 1, 7))
    with get_engine(url).begin() as conn:  # a writer that bypassed ingest's validation
        original = conn.scalar(sa.select(table.c.m01).where(row))
        conn.execute(sa.update(table).where(row).values(m01=99.0))
    with pytest.raises(DataContractError, match=r"(?s)\['machine-9-2'\].*m01.*99"):
        scoring_flow(source="smd")
    scored = _table(url, anomaly_scores, *SCORE_COLUMNS)
    assert set(scored["entity"]) == {"machine-9-1"} and len(scored) == 500

    with get_engine(url).begin() as conn:
        conn.execute(sa.update(table).where(row).values(m01=original))
    results = {r.entity: r for r in scoring_flow(source="smd")}
    assert (results["machine-9-1"].note, results["machine-9-2"].scored) == ("up to date", 500)
