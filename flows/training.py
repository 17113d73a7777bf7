"""Training flow: validate → window → train → calibrate → evaluate → register (→ promote)."""

from dataclasses import replace
from functools import partial

from prefect import flow

from data_contracts import load_contract
from flows.params import TrainFlowParams
from tasks.calibrate import calibrate_task
from tasks.data_docs import data_docs_dir, log_data_docs_task
from tasks.evaluate import evaluate_model_task
from tasks.fit import train_model_task
from tasks.gates import gate_and_promote_task
from tasks.publish import TrainingSummary, publish_task
from tasks.registry import end_killed_runs
from tasks.settings import get_settings
from tasks.windowing import build_dataset_task
from tasks.workspace import run_workspace


@flow(name="train", log_prints=True)
def training_flow(params: TrainFlowParams = TrainFlowParams()) -> TrainingSummary:  # noqa: B008
    """Train one model for a source (``params.detector``: the Anomaly Transformer or a baseline);
    it becomes the challenger, and champion if ``promote`` and it passes the promotion gate
    (``params.gate``; ``gate.force`` overrides, logged as forced). Its files live in a folder of
    its own under ``runs/<source>/``, removed when it ends (:mod:`tasks.workspace`)."""
    settings = get_settings()
    contract = load_contract(params.source)
    runs = settings.home / "runs" / params.source
    ended = partial(end_killed_runs, settings.mlflow_tracking_uri)
    with run_workspace(runs, on_killed=ended) as run_dir:
        dataset = build_dataset_task(
            settings.warehouse_url,
            contract,
            run_dir / "dataset",
            win_size=params.win_size,
            val_fraction=params.training.val_fraction,
            train_end=params.train_end,
        )
        trained = train_model_task(
            dataset,
            params.network_configs(n_channels=len(contract.sensor_names)),
            params.training.to_config(),
            run_dir / "trained.ckpt",
            scoring_method=params.scoring_method,
            score_smoothing=params.score_smoothing,
            detector=params.detector,
            processes=params.training.processes,
        )
        calibration = calibrate_task(
            trained.checkpoint,
            dataset,
            run_dir / "model.ckpt",
            **params.calibration.model_dump(),
            warehouse_url=settings.warehouse_url,
            contract=contract,
            train_end=params.train_end,
        )
        evaluation = evaluate_model_task(
            settings.warehouse_url,
            contract,
            calibration.checkpoint,
            run_dir / "plots",
            train_end=params.train_end,
        )
        summary = publish_task(
            settings,
            contract,
            params.model_dump(mode="json"),
            dataset,
            trained,
            calibration,
            evaluation,
        )
    log_data_docs_task(settings.mlflow_tracking_uri, summary.run_id, data_docs_dir(settings.home))
    if params.promote:
        decision = gate_and_promote_task(
            settings.model_name, summary.version, **params.gate_settings()
        )
        summary = replace(summary, promotion=decision.outcome)
    return summary
