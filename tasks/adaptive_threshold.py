"""Adaptive thresholds for scheduled scoring: per-entity ACI state, advanced with the scores.

With ``threshold_mode="adaptive"`` each scheduled batch is flagged by adaptive conformal inference
(:mod:`model.adaptive`) instead of the static calibration threshold: the stored ``threshold`` is
the point's own ACI threshold and ``is_anomaly = score > threshold``. The state (alpha_t and the
counts) of (source, entity, model name) lives in ``adaptive_threshold_state`` with the last ts it
covers, and moves in the transaction that writes those scores, under the entity lock. Rules:

- points at or before the state's ``last_ts`` were already flagged by an earlier (or concurrent)
  run and are not flagged again, so each point advances the state exactly once;
- provisional scores (``recon_mean``'s last points) are flagged from the state without advancing
  it; the state advances when the run that makes them final re-scores them;
- a new model version starts from a fresh state (alpha_t = alpha);
- backfills always use the static threshold and leave the state alone: a backfill of any range
  then gives the same rows whenever it runs, whatever the schedule did before.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from model.adaptive import AciState, aci_scores
from tasks.alarm_rule import alarm_rule
from tasks.alarm_tables import adaptive_state, entity_filter
from tasks.scores_store import Watermark

DEFAULT_GAMMA = 0.005


def load_state(
    conn: Connection, source: str, watermark: Watermark, alpha: float, gamma: float
) -> tuple[AciState, datetime | None]:
    """The entity's ACI state and the last ts it covers; fresh for a new model version."""
    a = adaptive_state.c
    row = conn.execute(
        sa.select(a.state, a.last_ts, a.model_version).where(
            entity_filter(adaptive_state, source, watermark.entity, watermark.model_name)
        )
    ).first()
    if row is None or row.model_version != watermark.model_version:
        return AciState(alpha, gamma), None
    return AciState.from_dict(json.loads(row.state)), row.last_ts


def _save_state(
    conn: Connection, source: str, watermark: Watermark, state: AciState, last_ts: datetime
) -> None:
    key = entity_filter(adaptive_state, source, watermark.entity, watermark.model_name)
    conn.execute(sa.delete(adaptive_state).where(key))
    conn.execute(
        sa.insert(adaptive_state).values(
            source=source,
            entity=watermark.entity,
            model_name=watermark.model_name,
            last_ts=last_ts,
            model_version=watermark.model_version,
            state=json.dumps(state.to_dict()),
            updated_at=datetime.now(UTC).replace(tzinfo=None),
        )
    )


def apply_adaptive(
    conn: Connection,
    source: str,
    watermark: Watermark,
    rows: pd.DataFrame,
    extras: dict[str, Any],
    gamma: float = DEFAULT_GAMMA,
) -> pd.DataFrame:
    """Re-flag score ``rows`` (sorted by ts) with the entity's ACI state and advance it in ``conn``
    over the final rows; provisional rows (which follow them) are flagged without advancing it.

    Rows the state already covers are dropped from the result: they are stored already.
    """
    rule = alarm_rule(extras, watermark.entity)
    state, last_ts = load_state(conn, source, watermark, rule.alpha, gamma)
    if last_ts is not None:
        rows = rows[rows["ts"] > pd.Timestamp(last_ts)]
    if rows.empty:
        return rows
    result = aci_scores(state, rule.null_scores, rows["score"].to_numpy(np.float64))
    final = int((~rows["provisional"].to_numpy(bool)).sum())
    if final:
        advanced = aci_scores(state, rule.null_scores, rows["score"].to_numpy(np.float64)[:final])
        newest = pd.Timestamp(rows["ts"].iloc[final - 1]).to_pydatetime()
        _save_state(conn, source, watermark, advanced.state, newest)
    return rows.assign(threshold=result.thresholds, is_anomaly=result.is_anomaly)
