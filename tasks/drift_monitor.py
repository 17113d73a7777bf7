"""Drift monitoring per entity: each scheduled scoring batch against the model's training profile.

The FLAG is the score test (:func:`model.drift.exceedance_test`): more scores above the static
calibration threshold than the promised false-alarm rate ``alpha`` allows, by at least
``min_rate_ratio`` x ``alpha``. That is the promise an operator relies on, and it is what breaks
when a machine drifts. The per-sensor Kolmogorov-Smirnov tests against the training profile are
kept as explanation only (the sensors that moved most): on autocorrelated readings such as SMD
they reject for most sensors even on held-out training data, so they cannot be the flag.

A model without a training profile for the entity (``extras["training_profiles"][entity]``, the
dict of :class:`model.drift.TrainingProfile`) still gets the score test; the statistics then say
so in ``note``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import sqlalchemy as sa
from prefect import task
from prefect.cache_policies import NO_CACHE
from sqlalchemy.engine import Connection

from model.drift import TrainingProfile, detect_drift, exceedance_test
from model.scaling import Scaler
from tasks.alarm_rule import alarm_rule
from tasks.alarm_tables import drift_flags, entity_filter
from tasks.scores_store import Watermark
from tasks.warehouse import get_engine, read_transaction

log = logging.getLogger(__name__)
NO_PROFILE = "the model carries no training profile for this entity: score test only"


@dataclass(frozen=True)
class DriftRules:
    """When a batch is flagged, and how many drifted sensors its statistics name."""

    significance: float = 0.01
    min_rate_ratio: float = 2.0
    top_sensors: int = 5


@dataclass(frozen=True)
class DriftCheck:
    """The verdict on one batch: flag, observed alarm rate against ``alpha``, and statistics."""

    flag: bool
    alarm_rate: float
    alpha: float
    p_value: float
    statistics: dict[str, Any]


@dataclass(frozen=True)
class DriftState:
    """The latest drift check of one entity, as ``atp status`` shows it."""

    source: str
    entity: str
    model_name: str
    model_version: str
    batch_start: datetime
    batch_end: datetime
    rows: int
    flag: bool
    alarm_rate: float
    alpha: float
    drifted_sensors: list[str]


def profile_units(scaler: Scaler, values: np.ndarray) -> np.ndarray:
    """Raw readings ``(T, C)`` as a training profile holds them: rebuilt from the float32 scaled
    copy that training keeps (:func:`tasks.fit.training_profiles`), so that a reading equal to a
    training value stays equal to it (a discrete sensor's levels would otherwise differ by float32
    rounding and every batch would look shifted)."""
    return scaler.inverse_transform(scaler.transform(values))


def _sensor_explanation(
    profile: TrainingProfile, values: np.ndarray, sensors: list[str], rules: DriftRules
) -> dict[str, Any]:
    """KS distance per sensor against the profile: the most shifted sensors, with p-values."""
    report = detect_drift(profile, values, significance=rules.significance)
    order = np.argsort(-np.asarray(report.statistics))[: rules.top_sensors]
    return {
        "sensors_rejected": int(sum(report.sensors_flagged)),
        "most_shifted": [
            [sensors[i], round(report.statistics[i], 4), float(f"{report.p_adjusted[i]:.3g}")]
            for i in order
        ],
    }


def check_batch(
    extras: dict[str, Any],
    entity: str,
    values: np.ndarray,
    scores: np.ndarray,
    rules: DriftRules = DriftRules(),
) -> DriftCheck:
    """Test one batch: raw readings ``(T, C)`` in the model's sensor order (gaps filled) and
    their scores."""
    rule = alarm_rule(extras, entity)
    test = exceedance_test(
        scores,
        rule.threshold,
        rule.alpha,
        significance=rules.significance,
        min_rate_ratio=rules.min_rate_ratio,
    )
    statistics: dict[str, Any] = {"score_test": asdict(test)}
    profile = extras.get("training_profiles", {}).get(entity)
    if profile is None:
        log.info("drift check of %s: %s", entity, NO_PROFILE)
        statistics["note"] = NO_PROFILE
    else:
        scaler = Scaler.from_dict(extras["scalers"][entity])
        statistics |= _sensor_explanation(
            TrainingProfile.from_dict(profile),
            profile_units(scaler, values),
            list(extras["sensors"]),
            rules,
        )
    return DriftCheck(test.flagged, test.rate, rule.alpha, test.p_value, statistics)


def record_drift(
    conn: Connection,
    source: str,
    watermark: Watermark,
    batch_start: datetime,
    rows: int,
    check: DriftCheck,
) -> None:
    """Write one batch's check in ``conn`` (replacing a check of the same batch start)."""
    key = (source, watermark.entity, watermark.model_name)
    conn.execute(
        sa.delete(drift_flags).where(
            entity_filter(drift_flags, *key), drift_flags.c.batch_start == batch_start
        )
    )
    conn.execute(
        sa.insert(drift_flags).values(
            source=source,
            entity=watermark.entity,
            model_name=watermark.model_name,
            batch_start=batch_start,
            batch_end=watermark.last_ts,
            model_version=watermark.model_version,
            rows=rows,
            flag=check.flag,
            alarm_rate=check.alarm_rate,
            alpha=check.alpha,
            p_value=check.p_value,
            statistics=json.dumps(check.statistics),
            run_id=watermark.run_id,
            checked_at=datetime.now(UTC).replace(tzinfo=None),
        )
    )


def latest_drift(warehouse_url: str, source: str | None = None) -> list[DriftState]:
    """Per (source, entity, model name), the most recent drift check; empty before the first."""
    engine = get_engine(warehouse_url)
    if not sa.inspect(engine).has_table(drift_flags.name):
        return []
    d = drift_flags.c
    newest = sa.select(
        d.source, d.entity, d.model_name, sa.func.max(d.batch_start).label("batch_start")
    )
    if source is not None:
        newest = newest.where(d.source == source)
    newest = newest.group_by(d.source, d.entity, d.model_name).subquery()
    joined = drift_flags.join(newest, sa.and_(*(d[n] == newest.c[n] for n in newest.c.keys())))
    query = sa.select(
        d.source,
        d.entity,
        d.model_name,
        d.model_version,
        d.batch_start,
        d.batch_end,
        d.rows,
        d.flag,
        d.alarm_rate,
        d.alpha,
        d.statistics,
    )
    with read_transaction(engine) as conn:
        rows = conn.execute(query.select_from(joined).order_by(d.source, d.entity)).all()
    return [
        DriftState(*row[:10], [s[0] for s in json.loads(row[10]).get("most_shifted", [])])
        for row in rows
    ]


latest_drift_task = task(name="latest-drift", cache_policy=NO_CACHE)(latest_drift)
