"""A never-seen CSV goes from contract inference to scores; each benchmark layout ingests once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from flows.ingest import ingest_flow
from flows.params import TrainFlowParams
from flows.scoring import scoring_flow
from flows.training import training_flow
from tasks.contract_infer import infer_contract, write_contract
from tasks.errors import DataContractError
from tasks.warehouse import get_engine
from tests.tasks.test_loaders import LAYOUT_WRITERS

ROWS = 260  # per entity: 180 unlabelled training rows, then 80 labelled rows


def _plant_frame() -> pd.DataFrame:
    """Two pumps, a minute apart, with sensor headers that are not identifiers."""
    rng = np.random.default_rng(7)
    parts = []
    for pump in ("north pump", "south pump"):
        t = np.arange(ROWS)
        frame = pd.DataFrame(
            {
                "Time": pd.date_range("2025-06-01", periods=ROWS, freq="min").strftime(
                    "%Y-%m-%dT%H:%M"
                ),
                "Pump": pump,
                "Inlet Temp (C)": 40 + 3 * np.sin(t / 9) + rng.normal(0, 0.1, ROWS),
                "flow": 12 + np.cos(t / 7) + rng.normal(0, 0.1, ROWS),
                "status": "ok",
            }
        )
        frame["anomaly"] = np.where(t < 180, np.nan, (t >= 230) & (t < 240))
        parts.append(frame)
    return pd.concat(parts, ignore_index=True)


def _write_long(frame: pd.DataFrame, path: Path) -> None:
    melted = frame.drop(columns="status").melt(
        id_vars=["Pump", "Time", "anomaly"], var_name="signal", value_name="reading"
    )
    melted.sample(frac=1.0, random_state=0).to_csv(path, index=False)  # any row order


def _count(url: str, sql: str) -> int:
    with get_engine(url).connect() as conn:
        return int(conn.scalar(sa.text(sql)))


@pytest.mark.parametrize(
    ("layout", "warehouse_url"),
    [("wide", "sqlite"), pytest.param("long", "postgres", marks=pytest.mark.postgres)],
    indirect=["warehouse_url"],
)
def test_unseen_csv_from_contract_inference_to_scores(
    atp_env: str, tmp_path: Path, tiny_training: TrainFlowParams, layout: str
) -> None:
    data = tmp_path / "plant.csv"
    if layout == "wide":
        _plant_frame().to_csv(data, index=False)
    else:
        _write_long(_plant_frame(), data)
    contract, why = infer_contract(data, name="plant")
    assert contract.layout == layout and set(contract.sensor_names) == {"inlet_temp_c", "flow"}
    assert (contract.entity_column, contract.timestamp_column) == ("Pump", "Time")
    assert contract.label_column == "anomaly" and contract.cadence_seconds == 60
    path = write_contract(contract, tmp_path / "review" / "plant.yaml", why)

    first = ingest_flow(str(data), kind="csv", contract=str(path))
    again = ingest_flow(str(data), kind="csv", contract=str(path))
    assert first.rows_read == 2 * ROWS and first.rows_new == 2 * ROWS and again.rows_new == 0
    assert first.entities == ("north pump", "south pump")

    summary = training_flow(tiny_training.model_copy(update={"source": "plant", "promote": False}))
    assert summary.entities == 2
    results = scoring_flow(source="plant", alias="challenger")
    assert sum(r.scored for r in results) == 2 * ROWS
    assert _count(atp_env, "SELECT count(*) FROM anomaly_scores WHERE source = 'plant'") == 2 * ROWS


@pytest.mark.parametrize("warehouse_url", ["sqlite"], indirect=True)
def test_a_file_breaking_the_inferred_contract_writes_nothing(atp_env: str, tmp_path: Path) -> None:
    data = tmp_path / "plant.csv"
    frame = _plant_frame()
    frame.to_csv(data, index=False)
    path = write_contract(*infer_contract(data, name="plant")[:1], tmp_path / "plant.yaml")
    frame.loc[3, "Inlet Temp (C)"] = 900.0  # far outside the widened observed range
    frame.to_csv(data, index=False)
    with pytest.raises(DataContractError, match=r"inlet_temp_c"):
        ingest_flow(str(data), kind="csv", contract=str(path))
    assert not sa.inspect(get_engine(atp_env)).has_table("plant_readings")


@pytest.mark.parametrize("warehouse_url", ["sqlite"], indirect=True)
def test_every_benchmark_layout_ingests_through_the_flow(atp_env: str, tmp_path: Path) -> None:
    for kind, write in sorted(LAYOUT_WRITERS.items()):
        expected = write(tmp_path / kind)
        summary = ingest_flow(str(tmp_path / kind), kind=kind)
        assert summary.rows_new == sum(expected.values()), kind
        assert set(summary.entities) == set(expected), kind
        assert _count(atp_env, f"SELECT count(*) FROM {kind}_readings") == sum(expected.values())
    assert ingest_flow(str(tmp_path / "nab"), kind="nab").rows_new == 0
