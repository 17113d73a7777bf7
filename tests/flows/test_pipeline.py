"""The pipeline end to end through Prefect: ingest → train → register → score → backfill."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from flows.ingest import ingest_flow
from flows.operations import status_flow
from flows.params import TrainFlowParams
from flows.scoring import backfill_flow, scoring_flow
from flows.training import training_flow
from tasks.errors import DataContractError
from tasks.ingest import read_smd
from tasks.registry import get_alias_version
from tasks.warehouse import get_engine


def _count(url: str, table: str) -> int:
    with get_engine(url).connect() as conn:
        return int(conn.scalar(sa.text(f"SELECT count(*) FROM {table}")))


def _scores(url: str) -> pd.DataFrame:
    query = (
        "SELECT entity, ts, score, p_value, is_anomaly, provisional FROM anomaly_scores "
        "ORDER BY entity, ts"
    )
    with get_engine(url).connect() as conn:
        return pd.read_sql(sa.text(query), conn)


def test_ingest_train_score_backfill(
    atp_env: str, smd_folder: Path, tiny_training: TrainFlowParams
) -> None:
    first = ingest_flow(str(smd_folder), kind="smd")
    again = ingest_flow(str(smd_folder), kind="smd")
    assert first.rows_new == first.rows_read == 1000
    assert again.rows_new == 0 and _count(atp_env, "smd_readings") == 1000

    summary = training_flow(tiny_training)
    assert summary.version == 1 and summary.entities == 2
    assert get_alias_version("test-model", "champion") == 1
    assert 0.0 <= summary.metrics["auc_pr"] <= 1.0

    results = scoring_flow(source="smd")
    assert sum(r.scored for r in results) == 1000
    scheduled = _scores(atp_env)
    assert len(scheduled) == 1000 and scheduled["p_value"].between(0, 1).all()
    assert all(r.scored == 0 for r in scoring_flow(source="smd"))
    assert len(_scores(atp_env)) == 1000

    backfill_flow(source="smd", start=pd.Timestamp("2020-01-01 02:00"), end=None)
    backfilled = _scores(atp_env)
    assert len(backfilled) == 1000
    np.testing.assert_allclose(backfilled["score"], scheduled["score"], rtol=1e-5)
    status = status_flow()
    assert {e.unscored_rows for e in status.entities} == {0}
    assert {m.alias for m in status.models} == {"champion", "challenger"}


def _write_csv_parts(smd_folder: Path, out: Path, parts: int) -> list[Path]:
    frame = read_smd(smd_folder).frame.sort_values(["ts", "entity"])
    paths = []
    for i, chunk in enumerate(np.array_split(np.arange(len(frame)), parts)):
        path = out / f"part-{i}.csv"
        frame.iloc[chunk].to_csv(path, index=False)
        paths.append(path)
    return paths


def test_incremental_scoring_equals_one_backfill(
    atp_env: str, smd_folder: Path, tiny_training: TrainFlowParams, tmp_path: Path
) -> None:
    assert tiny_training.score_smoothing > 1  # smoothed scores: chunks read the longer context
    parts = _write_csv_parts(smd_folder, tmp_path, parts=4)
    ingest_flow(str(parts[0]), kind="csv", contract="smd")
    ingest_flow(str(parts[1]), kind="csv", contract="smd")
    training_flow(tiny_training.model_copy(update={"train_end": pd.Timestamp("2020-01-01 04:00")}))
    scoring_flow(source="smd")
    for part in parts[2:]:
        ingest_flow(str(part), kind="csv", contract="smd")
        scoring_flow(source="smd")
    incremental = _scores(atp_env)
    assert len(incremental) == 1000
    win = tiny_training.win_size  # recon_mean: the last win - 1 rows wait for later rows
    for _, rows in incremental.groupby("entity"):
        assert rows["provisional"].tolist() == [False] * (500 - win + 1) + [True] * (win - 1)

    backfill_flow(source="smd", end=pd.Timestamp("2020-01-01 06:00"))  # reads rows past `end`
    np.testing.assert_allclose(_scores(atp_env)["score"], incremental["score"], rtol=1e-5)
    assert _scores(atp_env)["provisional"].sum() == 2 * (win - 1)
    backfill_flow(source="smd")
    np.testing.assert_allclose(_scores(atp_env)["score"], incremental["score"], rtol=1e-5)


BAD_EDITS = {
    "nan": lambda f: f.assign(m03=f["m03"].where(f.index != 5)),
    "missing column": lambda f: f.drop(columns=["m07"]),
    "duplicate timestamps": lambda f: pd.concat([f, f.iloc[[3]]]),
    "text in numeric column": lambda f: f.assign(
        m01=f["m01"].astype(str).where(f.index != 2, "high")
    ),
}


@pytest.mark.parametrize("defect", sorted(BAD_EDITS))
def test_bad_file_fails_validation_and_writes_nothing(
    atp_env: str, smd_folder: Path, tmp_path: Path, defect: str
) -> None:
    ingest_flow(str(smd_folder), kind="smd")
    before = _count(atp_env, "smd_readings")
    frame = read_smd(smd_folder).frame
    fresh = (
        frame[frame["entity"] == "machine-9-1"]
        .assign(ts=lambda f: f["ts"] + pd.Timedelta(days=30))
        .reset_index(drop=True)
    )
    path = tmp_path / "bad.csv"
    BAD_EDITS[defect](fresh).to_csv(path, index=False)
    with pytest.raises(DataContractError):
        ingest_flow(str(path), kind="csv", contract="smd")
    assert _count(atp_env, "smd_readings") == before
