"""The promotion gate: its rule, and its decisions on a real temporary MLflow store."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from tasks.gates import decide, gate_and_promote
from tasks.registry import CHAMPION, get_alias_version, set_alias

NAME = "gated-model"


def _metrics(vus_pr: float, fpr: float) -> dict[str, float]:
    return {"test_vus_pr": vus_pr, "test_fpr_normal": fpr, "test_auc_pr": vus_pr / 2}


@pytest.mark.parametrize(
    ("challenger", "champion", "leaks", "promoted", "reason"),
    [
        (_metrics(0.50, 0.004), None, False, True, "no champion yet"),
        (_metrics(0.50, 0.004), _metrics(0.45, 0.001), False, True, "beats champion's 0.45"),
        (
            _metrics(0.50, 0.004),
            _metrics(0.48, 0.001),
            False,
            False,
            "does not beat champion's 0.48",
        ),
        (_metrics(0.90, 0.020), _metrics(0.45, 0.001), False, False, "over the budget 0.01"),
        (_metrics(0.90, 0.004), None, True, False, "leaky 'reference'"),
    ],
)
def test_rule(
    challenger: dict, champion: dict | None, leaks: bool, promoted: bool, reason: str
) -> None:
    decision = decide(
        challenger,
        champion,
        metric="vus_pr",
        margin=0.03,
        false_alarm_budget=0.01,
        leaks_test_data=leaks,
    )
    assert decision.promoted is promoted and not decision.forced
    assert reason in decision.reason
    assert decision.challenger_value == challenger["test_vus_pr"]


def test_challenger_evaluated_on_normal_rows_only_is_held_to_the_budget() -> None:
    """Labelled rows without an anomaly give a false-alarm rate but no ranking metric."""
    kwargs = {"metric": "vus_pr", "margin": 0.0, "false_alarm_budget": 0.01}
    noisy = decide({"test_fpr_normal": 0.3}, None, leaks_test_data=False, **kwargs)
    assert not noisy.promoted and "over the budget" in noisy.reason
    quiet = decide({"test_fpr_normal": 0.004}, None, leaks_test_data=False, **kwargs)
    assert quiet.promoted and "no labelled anomaly to measure vus_pr" in quiet.reason
    later = decide({"test_fpr_normal": 0.004}, _metrics(0.4, 0.0), leaks_test_data=False, **kwargs)
    assert not later.promoted and "nothing to compare" in later.reason


@pytest.fixture
def client(mlflow_uri: str, monkeypatch: pytest.MonkeyPatch) -> MlflowClient:
    """A fresh store holding one registered model with no versions yet."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    client = MlflowClient(mlflow_uri)
    client.create_registered_model(NAME)
    return client


def _register(
    client: MlflowClient, metrics: dict[str, float], leaks: bool = False, source: str = "smd"
) -> int:
    experiment = client.get_experiment_by_name("gate") or client.get_experiment(
        client.create_experiment("gate")
    )
    run = client.create_run(experiment.experiment_id, tags={"leaks_test_data": str(leaks).lower()})
    client.log_param(run.info.run_id, "source", source)
    for key, value in metrics.items():
        client.log_metric(run.info.run_id, key, value)
    version = client.create_model_version(NAME, f"runs:/{run.info.run_id}/model", run.info.run_id)
    return int(version.version)


def _gate_tags(client: MlflowClient, version: int) -> dict[str, str]:
    run = client.get_run(client.get_model_version(NAME, str(version)).run_id)
    return {k: v for k, v in run.data.tags.items() if k.startswith("gate.")} | {
        k: v for k, v in run.data.metrics.items() if k.startswith("gate_")
    }


def test_two_versions_better_challenger_is_promoted(client: MlflowClient) -> None:
    first = _register(client, _metrics(0.40, 0.003))
    assert gate_and_promote(NAME, first, margin=0.02).promoted
    second = _register(client, _metrics(0.45, 0.004))
    decision = gate_and_promote(NAME, second, margin=0.02)
    assert decision.promoted and decision.champion_version == first
    assert get_alias_version(NAME, CHAMPION) == second
    logged = _gate_tags(client, second)
    assert logged["gate.decision"] == "promoted" and logged["gate.champion_version"] == str(first)
    assert logged["gate_champion_value"] == 0.40 and logged["gate_challenger_value"] == 0.45


def test_two_versions_weaker_challenger_stays_challenger_unless_forced(
    client: MlflowClient,
) -> None:
    first = _register(client, _metrics(0.40, 0.003))
    set_alias(NAME, CHAMPION, first)
    second = _register(client, _metrics(0.41, 0.003))
    decision = gate_and_promote(NAME, second, margin=0.02)
    assert not decision.promoted and get_alias_version(NAME, CHAMPION) == first
    assert _gate_tags(client, second)["gate.decision"] == "rejected"
    assert decision.outcome == f"kept out: {decision.reason}" and "does not beat" in decision.reason

    forced = gate_and_promote(NAME, second, margin=0.02, force=True)
    assert forced.promoted and forced.forced and get_alias_version(NAME, CHAMPION) == second
    assert _gate_tags(client, second)["gate.decision"] == "forced"
    assert forced.outcome == f"champion (forced): {forced.reason}"


def test_leaky_or_over_budget_challenger_is_refused(client: MlflowClient) -> None:
    first = _register(client, _metrics(0.40, 0.003))
    set_alias(NAME, CHAMPION, first)
    leaky = _register(client, _metrics(0.90, 0.003), leaks=True)
    noisy = _register(client, _metrics(0.90, 0.05))
    assert "leaky" in gate_and_promote(NAME, leaky).reason
    assert "budget" in gate_and_promote(NAME, noisy, false_alarm_budget=0.01).reason
    assert get_alias_version(NAME, CHAMPION) == first


def test_a_champion_of_another_source_is_never_replaced_unless_forced(
    client: MlflowClient,
) -> None:
    """One registered model name for two sources: the champion's metrics are on other data,
    and scoring its source with the challenger would fail."""
    first = _register(client, _metrics(0.40, 0.003), source="smd")
    set_alias(NAME, CHAMPION, first)
    other = _register(client, _metrics(0.90, 0.003), source="pumps")
    decision = gate_and_promote(NAME, other)
    assert not decision.promoted and get_alias_version(NAME, CHAMPION) == first
    assert "champion was trained on source 'smd'" in decision.reason
    assert gate_and_promote(NAME, other, force=True).forced


def test_unevaluated_challenger_is_promoted_only_without_a_champion() -> None:
    kwargs = {
        "metric": "vus_pr",
        "margin": 0.0,
        "false_alarm_budget": 0.01,
        "leaks_test_data": False,
    }
    first = decide({"threshold": 1.0}, None, **kwargs)
    assert first.promoted and "promoted unchecked" in first.reason
    later = decide({"threshold": 1.0}, _metrics(0.4, 0.0), **kwargs)
    assert not later.promoted and "nothing to compare" in later.reason


def test_never_evaluated_champion_leaves_the_budget_to_decide() -> None:
    """A champion promoted unchecked (trained before any label) logged no test metrics: an
    evaluated challenger is then judged on its budget alone, not refused with an error."""
    kwargs = {"metric": "vus_pr", "margin": 0.0, "false_alarm_budget": 0.01}
    unchecked = {"threshold": 1.0}
    good = decide(_metrics(0.4, 0.004), unchecked, leaks_test_data=False, **kwargs)
    assert good.promoted and "never evaluated" in good.reason and good.champion_value is None
    noisy = decide(_metrics(0.4, 0.05), unchecked, leaks_test_data=False, **kwargs)
    assert not noisy.promoted and "over the budget" in noisy.reason


def test_leaky_challenger_without_labelled_range_is_refused() -> None:
    decision = decide(
        {"threshold": 1.0},
        None,
        metric="vus_pr",
        margin=0.0,
        false_alarm_budget=0.01,
        leaks_test_data=True,
    )
    assert not decision.promoted and "leaky" in decision.reason
