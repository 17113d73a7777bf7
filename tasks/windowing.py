"""Cut each entity's training range, fit its scaler and write the scaled series as Parquet."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE

from data_contracts import Contract
from model.scaling import Scaler
from tasks.errors import DataContractError
from tasks.validate import validate_readings
from tasks.warehouse import get_engine, read_readings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EntitySplit:
    """Row counts of one entity's training range: the fit part, then the validation tail."""

    entity: str
    file: str
    fit_rows: int
    val_rows: int
    first_ts: str
    last_ts: str


@dataclass(frozen=True)
class DatasetRef:
    """A training dataset on disk: one Parquet file per entity, ``scalers.json``, ``index.json``.

    Windows are cut on the fly by the trainer from each entity's rows, so they never cross entities
    and nothing is copied 100 times on disk.
    """

    root: Path
    source: str
    sensors: tuple[str, ...]
    splits: tuple[EntitySplit, ...]
    skipped: tuple[str, ...]
    nullable: tuple[str, ...] = ()  # sensors the contract lets have gaps

    @property
    def entities(self) -> list[str]:
        return [s.entity for s in self.splits]

    def scalers(self) -> dict[str, Scaler]:
        raw = json.loads((self.root / "scalers.json").read_text())
        return {entity: Scaler.from_dict(d) for entity, d in raw.items()}

    def _read(self, entity: str) -> tuple[np.ndarray, np.ndarray]:
        """Scaled float32 values of one entity (NaN in the gaps of nullable sensors), and which
        rows are the validation tail."""
        split = next(s for s in self.splits if s.entity == entity)
        frame = pq.read_table(self.root / split.file).to_pandas()
        values = frame[list(self.sensors)].to_numpy(np.float32)
        return values, frame["part"].to_numpy() == "val"

    def load(self, entity: str) -> tuple[np.ndarray, np.ndarray]:
        """Scaled float32 ``(fit, val)`` arrays of one entity, gaps filled with the training mean
        (0 once scaled, as :meth:`Scaler.impute`)."""
        values, is_val = self._read(entity)
        values = np.nan_to_num(values, nan=0.0)
        return values[~is_val], values[is_val]

    def observed(self, entity: str) -> tuple[np.ndarray, np.ndarray]:
        """Boolean ``(fit, val)`` masks `(T, C)` of the values that were read, not filled."""
        values, is_val = self._read(entity)
        observed = ~np.isnan(values)
        return observed[~is_val], observed[is_val]

    def tail_with_context(self, entity: str, context_rows: int) -> tuple[np.ndarray, int]:
        """The entity's validation tail led by up to ``context_rows`` rows of its fit part, and
        how many rows of context lead it (empty when the entity has no tail)."""
        fit_part, val_part = self.load(entity)
        if not len(val_part):
            return val_part, 0
        context = fit_part[max(0, len(fit_part) - context_rows) :]
        return np.concatenate([context, val_part]), len(context)


def training_range(
    frame: pd.DataFrame, contract: Contract, train_end: datetime | None
) -> pd.DataFrame:
    """Rows before ``train_end``; without it, each entity's rows before its first labelled row."""
    if train_end is not None:
        return frame[frame["ts"] < pd.Timestamp(train_end)]
    if not contract.has_label:
        return frame
    labelled = frame["label"].notna()
    first_labelled = frame["ts"].where(labelled).groupby(frame["entity"]).transform("min")
    return frame[first_labelled.isna() | (frame["ts"] < first_labelled)]


def split_entity(rows: int, val_fraction: float, win_size: int) -> tuple[int, int]:
    """Fit/validation row counts; the tail holds at least one window when it exists at all."""
    val = int(round(rows * val_fraction))
    if val_fraction > 0:
        val = max(val, win_size)
    return rows - val, val


def _require_observed(values: np.ndarray, sensors: list[str], where: str) -> None:
    """Refuse a fit part in which a (nullable) sensor never has a value: no mean to fill with."""
    empty = [name for name, column in zip(sensors, values.T, strict=True) if np.isnan(column).all()]
    if empty:
        raise DataContractError(
            f"{where}: sensor(s) {empty} have no value in the {len(values)} rows the scaler is "
            "fitted on; drop them from the contract or train on a range where they report"
        )


def build_dataset(
    warehouse_url: str,
    contract: Contract,
    out_dir: Path,
    *,
    win_size: int,
    val_fraction: float,
    train_end: datetime | None = None,
) -> DatasetRef:
    """Validate the training range, fit one scaler per entity on its fit part, write Parquet.

    Gaps of nullable sensors are filled with the entity's training mean (:meth:`Scaler.impute`),
    as scoring fills them.

    An entity whose training range is empty (its first row labelled) or cannot hold a fit window
    and a validation window is skipped and named in ``skipped``; if none is left the run fails
    with a contract error.
    """
    readings = read_readings(get_engine(warehouse_url), contract)
    frame = training_range(readings, contract, train_end)
    before = "before train_end" if train_end is not None else "before its first labelled row"
    skipped = [
        f"{entity}: no training rows (none {before})"
        for entity in sorted(set(readings["entity"]) - set(frame["entity"]))
    ]
    if frame.empty:
        raise _too_short(contract, win_size, skipped)
    validate_readings(frame, contract, source=f"{contract.table_name} (training range)", min_rows=1)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    sensors = contract.sensor_names
    splits, scalers = [], {}
    for number, (entity, rows) in enumerate(frame.groupby("entity", sort=True)):
        fit_rows, val_rows = split_entity(len(rows), val_fraction, win_size)
        if fit_rows < win_size:
            skipped.append(f"{entity}: {len(rows)} training rows, needs {win_size + val_rows}")
            continue
        values = rows[sensors].to_numpy(np.float64)
        _require_observed(values[:fit_rows], sensors, f"{contract.table_name} entity {entity!r}")
        scaler = Scaler.fit(values[:fit_rows], missing_ok=True)
        scalers[str(entity)] = scaler.to_dict()
        file = f"entity-{number:05d}.parquet"
        scaled = scaler.transform(scaler.impute(values))
        scaled[np.isnan(values)] = np.nan  # kept as gaps on disk: ``load`` fills them
        _write_entity(out_dir / file, str(entity), rows["ts"], scaled, sensors, fit_rows)
        first, last = str(rows["ts"].iloc[0]), str(rows["ts"].iloc[-1])
        splits.append(EntitySplit(str(entity), file, fit_rows, val_rows, first, last))
    if not splits:
        raise _too_short(contract, win_size, skipped)
    for reason in skipped:
        log.warning("skipped entity %s", reason)
    (out_dir / "scalers.json").write_text(json.dumps(scalers))
    nullable = tuple(rule.name for rule in contract.sensors if rule.nullable)
    ref = DatasetRef(
        out_dir, contract.name, tuple(sensors), tuple(splits), tuple(skipped), nullable
    )
    (out_dir / "index.json").write_text(
        json.dumps(
            {"source": ref.source, "splits": [s.__dict__ for s in splits], "skipped": skipped}
        )
    )
    return ref


def _too_short(contract: Contract, win_size: int, skipped: list[str]) -> DataContractError:
    return DataContractError(
        f"{contract.table_name}: no entity has enough training rows for one window of "
        f"{win_size} plus a validation tail; entities: {skipped or 'none'}"
    )


def _write_entity(
    path: Path, entity: str, ts: pd.Series, scaled: np.ndarray, sensors: list[str], fit_rows: int
) -> None:
    part = np.where(np.arange(len(scaled)) < fit_rows, "fit", "val")
    columns = {
        "entity": pa.array([entity] * len(scaled)),
        "ts": pa.array(ts.to_numpy()),
        "part": pa.array(part),
    }
    columns.update(
        {name: pa.array(scaled[:, i].astype(np.float32)) for i, name in enumerate(sensors)}
    )
    pq.write_table(pa.table(columns), path)


build_dataset_task = task(name="build-dataset", cache_policy=NO_CACHE)(build_dataset)
