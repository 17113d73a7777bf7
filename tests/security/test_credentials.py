"""A warehouse password never reaches logs, errors or results."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from data_contracts import load_contract
from tasks.errors import WarehouseUnavailableError
from tasks.load import ingest_table
from tasks.warehouse import get_engine, list_entities, redacted_url

PASSWORD = "s3cret"
SMD = load_contract("smd")


def readings(n: int = 150) -> pd.DataFrame:
    """``n`` one-minute rows of two machines, inside the smd contract's ranges."""
    rng = np.random.default_rng(0)
    frames = []
    for entity in ("machine-1", "machine-2"):
        frame = pd.DataFrame(rng.random((n, len(SMD.sensor_names))), columns=SMD.sensor_names)
        frame.insert(0, "entity", entity)
        frame.insert(1, "ts", pd.date_range("2024-01-01", periods=n, freq="60s"))
        frames.append(frame.assign(label=pd.array([None] * n, dtype="Int64")))
    return pd.concat(frames, ignore_index=True)


@pytest.mark.postgres
def test_the_password_is_never_logged_or_shown(
    postgres_url: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = sa.make_url(postgres_url).set(password=PASSWORD).render_as_string(hide_password=False)
    path = tmp_path / "readings.csv"
    readings().to_csv(path, index=False)
    caplog.set_level(logging.DEBUG)
    logging.getLogger("sqlalchemy.engine").setLevel(logging.INFO)  # every statement logged
    summary = ingest_table(url, path, SMD.name)
    assert list_entities(url, SMD) == ["machine-1", "machine-2"]
    dead = url.replace(f":{sa.make_url(url).port}/", ":9/")
    with pytest.raises(WarehouseUnavailableError) as caught:
        list_entities(dead, SMD)
    shown = [
        caplog.text,
        *capsys.readouterr(),
        repr(summary),
        str(caught.value),
        repr(get_engine(url)),
        redacted_url(url),
    ]
    assert summary.rows_new == 300 and all(PASSWORD not in text for text in shown)
