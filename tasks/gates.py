"""Promotion gate: a challenger becomes champion only if it beats the champion and keeps its budget.

The comparison uses the evaluation metrics each version's MLflow run logged (``test_<metric>``,
honest metrics only) and the mean false-alarm rate on normal test points at the calibrated
threshold (``test_fpr_normal``), whatever the two models are (the Anomaly Transformer or a baseline;
their ``detector`` version tags are logged with the decision). A model calibrated with the leaky
``reference`` method is never promoted by the gate. The decision and its numbers are logged on the
challenger's run; a person can still override it by moving the ``champion`` alias (``atp promote``
or the MLflow UI).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

from mlflow.tracking import MlflowClient
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.errors import TRANSIENT_RETRIES
from tasks.registry import CHAMPION, DETECTOR_TAG, alias_lock, get_alias_version, move_champion
from tasks.settings import get_settings

log = logging.getLogger(__name__)

FALSE_ALARM_METRIC = "fpr_normal"
LEAK_TAG = "leaks_test_data"


@dataclass(frozen=True)
class GateDecision:
    """Whether the challenger was promoted, why, and the numbers behind it."""

    promoted: bool
    forced: bool
    reason: str
    metric: str
    challenger_value: float
    champion_value: float | None
    champion_version: int | None
    margin: float
    false_alarm_rate: float
    false_alarm_budget: float

    @property
    def outcome(self) -> str:
        """One line for a person: champion or not, and why."""
        if self.forced:
            return f"champion (forced): {self.reason}"
        return f"{'champion' if self.promoted else 'kept out'}: {self.reason}"


def _test_metric(metrics: dict[str, float], name: str) -> float:
    """``test_<name>`` of a run; NaN where it logged none (never evaluated on labelled rows)."""
    value = metrics.get(f"test_{name}")
    return math.nan if value is None else float(value)


def decide(
    challenger: dict[str, float],
    champion: dict[str, float] | None,
    *,
    metric: str,
    margin: float,
    false_alarm_budget: float,
    leaks_test_data: bool,
    champion_version: int | None = None,
    champion_source: str | None = None,
) -> GateDecision:
    """The gate's rule on two runs' logged metrics (``champion`` None: no champion yet).

    ``champion_source``: the source the champion was trained on, given when it is not the
    challenger's; such a champion is never replaced (its metrics are on other data, and scoring
    its source with the challenger would fail).

    A challenger evaluated on no labelled data (no ``test_*`` metrics) is promoted only when
    there is no champion yet, so that a first model can serve; the reason says it was unchecked.
    A challenger whose labelled rows hold no anomaly has a false-alarm rate only: the budget
    applies, and it is promoted only when there is no champion yet. A champion that was never
    evaluated so has no score to beat: the budget alone decides.
    """
    value = _test_metric(challenger, metric)
    rate = _test_metric(challenger, FALSE_ALARM_METRIC)
    best = None if champion is None else _test_metric(champion, metric)
    if best is not None and math.isnan(best):
        best = None
    if leaks_test_data:
        passed, reason = False, "calibrated with the leaky 'reference' method (it reads test data)"
    elif champion_source is not None:
        passed, reason = (
            False,
            (
                f"the champion was trained on source {champion_source!r}, this model on another; "
                "keep one registered model per source (ATP_MODEL_NAME)"
            ),
        )
    elif math.isnan(rate):
        passed = champion is None
        reason = "no labelled evaluation range: " + (
            "first model promoted unchecked" if passed else "nothing to compare with the champion"
        )
    elif rate > false_alarm_budget:
        passed, reason = (
            False,
            f"false-alarm rate {rate:.4g} is over the budget {false_alarm_budget:.4g}",
        )
    elif math.isnan(value):
        passed = champion is None
        reason = f"no labelled anomaly to measure {metric} on: " + (
            f"first model promoted on its false-alarm rate {rate:.4g}"
            if passed
            else "nothing to compare with the champion"
        )
    elif best is not None and value < best + margin:
        passed, reason = (
            False,
            f"{metric} {value:.4g} does not beat champion's {best:.4g} + margin {margin:.4g}",
        )
    else:
        if champion is None:
            versus = "no champion yet"
        elif best is None:
            versus = f"the champion has no test_{metric} (never evaluated)"
        else:
            versus = f"beats champion's {best:.4g} + margin {margin:.4g}"
        passed, reason = (
            True,
            f"{metric} {value:.4g} {versus}; false-alarm rate {rate:.4g} within budget",
        )
    return GateDecision(
        passed,
        False,
        reason,
        metric,
        value,
        best,
        champion_version,
        margin,
        rate,
        false_alarm_budget,
    )


def _log_decision(client: MlflowClient, run_id: str, decision: GateDecision) -> None:
    outcome = "promoted" if decision.promoted else "rejected"
    client.set_tag(run_id, "gate.decision", "forced" if decision.forced else outcome)
    client.set_tag(run_id, "gate.reason", decision.reason)
    client.set_tag(run_id, "gate.metric", decision.metric)
    client.set_tag(run_id, "gate.champion_version", str(decision.champion_version))
    numbers = {
        "gate_challenger_value": decision.challenger_value,
        "gate_margin": decision.margin,
        "gate_false_alarm_rate": decision.false_alarm_rate,
        "gate_false_alarm_budget": decision.false_alarm_budget,
    }
    if decision.champion_value is not None:
        numbers["gate_champion_value"] = decision.champion_value
    for key, number in numbers.items():
        if not math.isnan(number):
            client.log_metric(run_id, key, number)


def gate_and_promote(
    model_name: str,
    version: int,
    *,
    metric: str = "vus_pr",
    margin: float = 0.0,
    false_alarm_budget: float = 0.01,
    force: bool = False,
) -> GateDecision:
    """Decide on ``version`` against the current champion, log it on ``version``'s run, and move
    ``champion`` to ``version`` if it passed (or ``force``); under :func:`alias_lock`, so that the
    champion cannot move between the comparison and the promotion."""
    with alias_lock(model_name):
        decision = _gate(model_name, version, metric, margin, false_alarm_budget, force)
        if decision.promoted:
            move_champion(model_name, version)
    return decision


def _gate(
    model_name: str,
    version: int,
    metric: str,
    margin: float,
    false_alarm_budget: float,
    force: bool,
) -> GateDecision:
    """The decision on ``version`` against the champion now, logged on ``version``'s run."""
    client = MlflowClient(get_settings().mlflow_tracking_uri)
    challenger = client.get_model_version(model_name, str(version))
    run_id = challenger.run_id
    run = client.get_run(run_id)
    champion_version = get_alias_version(model_name, CHAMPION)
    champion = None
    detectors = {"gate.challenger_detector": challenger.tags.get(DETECTOR_TAG, "")}
    champion_source = None
    if champion_version is not None and champion_version != version:
        held = client.get_model_version(model_name, str(champion_version))
        held_run = client.get_run(held.run_id)
        champion = held_run.data.metrics
        detectors["gate.champion_detector"] = held.tags.get(DETECTOR_TAG, "")
        theirs, ours = held_run.data.params.get("source"), run.data.params.get("source")
        if None not in (theirs, ours) and theirs != ours:
            champion_source = theirs
    decision = decide(
        run.data.metrics,
        champion,
        metric=metric,
        margin=margin,
        false_alarm_budget=false_alarm_budget,
        leaks_test_data=run.data.tags.get(LEAK_TAG) == "true",
        champion_version=champion_version,
        champion_source=champion_source,
    )
    if force and not decision.promoted:
        decision = GateDecision(**{**asdict(decision), "promoted": True, "forced": True})
    _log_decision(client, run_id, decision)
    for key, name in detectors.items():
        client.set_tag(run_id, key, name)
    log.info(
        "%s v%s gate: %s (%s)",
        model_name,
        version,
        "promote" if decision.promoted else "keep",
        decision.reason,
    )
    return decision


gate_and_promote_task = task(name="promotion-gate", cache_policy=NO_CACHE, **TRANSIENT_RETRIES)(
    gate_and_promote
)
