"""The ``atp`` command line: every command is one Prefect flow run."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from tasks.settings import apply_quiet_defaults

INGEST_KINDS = ["smd", "csv", "parquet", "nab", "skab", "ucr", "smap", "msl", "psm", "swat"]
BENCHMARK_LAYOUTS = [k for k in INGEST_KINDS if k not in ("csv", "parquet")]
COLUMN_OPTIONS = ("entity", "timestamp", "label", "sensor", "value")
# TrainFlowParams.detector's values (not imported here: the parser stays free of torch).
TRAIN_MODELS = ["anomaly_transformer", "pca", "knn", "max_z", "isolation_forest"]
# flows.params.train_preset's names, likewise.
TRAIN_PRESETS = ["default", "reference", "demo"]
# TrainFlowParams.scoring_method's values, likewise.
SCORING_METHODS = ["recon_mean_norm", "recon_mean", "recon_last", "reference_last"]
# Prefect's loggers of flow and task runs, which log a failed run's exception.
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atp", description="Anomaly Transformer pipeline.")
    commands = parser.add_subparsers(dest="command", required=True)

    ingest = commands.add_parser("ingest", help="load a source into the warehouse (idempotent)")
    ingest.add_argument("kind", choices=INGEST_KINDS, help="layout of PATH")
    ingest.add_argument("path", help="a folder or file in that layout (see docs/loaders.md)")
    ingest.add_argument(
        "--contract",
        help="data contract name or YAML path (default: the bundled contract of KIND; "
        "csv and parquet default to smd)",
    )

    contract = commands.add_parser("contract", help="draft a data contract for a new source")
    contract_commands = contract.add_subparsers(dest="contract_command", required=True)
    infer = contract_commands.add_parser("infer", help="draft a contract from a CSV/Parquet file")
    infer.add_argument("path", help="CSV or Parquet file of readings")
    infer.add_argument("--name", required=True, help="contract (and source) name")
    infer.add_argument("--out", help="where to write the YAML (default ./NAME.yaml)")
    infer.add_argument("--overwrite", action="store_true", help="replace an existing file")
    for column in COLUMN_OPTIONS:
        infer.add_argument(f"--{column}-column", help=f"the {column} column (default: detected)")

    train = commands.add_parser("train", help="train, calibrate, evaluate and register a model")
    train.add_argument("--source", default="smd", help="data contract / source name")
    train.add_argument(
        "--model",
        choices=TRAIN_MODELS,
        help="the model trained (default anomaly_transformer); a baseline is fitted per entity",
    )
    train.add_argument(
        "--preset",
        choices=TRAIN_PRESETS,
        default="default",
        help=(
            "default: the ensemble of windows 25 and 100 (docs/at_smd.md); reference: the "
            "paper's architecture alone; demo: a small CPU-friendly model"
        ),
    )
    train.add_argument(
        "--train-end",
        type=datetime.fromisoformat,
        default=None,
        help="end of the training range (default: each entity's first labelled row)",
    )
    train.add_argument(
        "--scoring-method",
        choices=SCORING_METHODS,
        help="recon_mean_norm (default): error averaged over windows, each sensor's divided by "
        "its mean on the validation tail, final win_size - 1 rows later; recon_mean: undivided; "
        "recon_last: error of the window ending at the point, final at once",
    )
    train.add_argument(
        "--score-smoothing",
        type=int,
        help="average each score over this many rows ending at it (default 10; 1: none)",
    )
    train.add_argument("--max-epochs", type=int, help="maximum epochs")
    train.add_argument("--max-steps", type=int, help="maximum optimiser steps")
    train.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    train.add_argument(
        "--precision", choices=["auto", "fp32", "bf16"], help="auto: bf16 on a CUDA GPU"
    )
    train.add_argument(
        "--attention",
        choices=["auto", "plain", "fused"],
        help="auto: the fused Triton kernels on a CUDA GPU where they train the model faster",
    )
    train.add_argument(
        "--processes",
        type=int,
        help="data-parallel training processes, one per GPU (default: every visible GPU)",
    )
    train.add_argument("--alpha", type=float, help="target false-alarm rate of the threshold")
    train.add_argument(
        "--calibration-method",
        choices=["conformal", "quantile", "pot", "reference"],
        help="threshold fit (reference leaks test data: never deploy it)",
    )
    train.add_argument("--scope", choices=["global", "entity"], help="one threshold or one each")
    train.add_argument("--gate-metric", choices=["vus_pr", "auc_pr", "auroc", "f1", "event_recall"])
    train.add_argument("--gate-margin", type=float, help="how much the challenger must win by")
    train.add_argument(
        "--false-alarm-budget", type=float, help="highest false-alarm rate the gate accepts"
    )
    train.add_argument("--promote", action="store_true", help="champion if it passes the gate")
    train.add_argument("--force", action="store_true", help="promote whatever the gate says")

    score = commands.add_parser("score", help="score rows after each entity's watermark")
    score.add_argument("--source", default="smd")
    score.add_argument("--alias", default="champion")
    score.add_argument(
        "--threshold-mode",
        choices=["static", "adaptive"],
        default="static",
        help="adaptive: keep the alarm rate at alpha as scores drift (ACI)",
    )

    backfill = commands.add_parser("backfill", help="re-score a past time range (re-runnable)")
    backfill.add_argument("--source", default="smd")
    backfill.add_argument("--start", type=datetime.fromisoformat, help="ISO timestamp, inclusive")
    backfill.add_argument("--end", type=datetime.fromisoformat, help="ISO timestamp, exclusive")
    backfill.add_argument("--alias", default="champion")
    for command in (score, backfill):
        command.add_argument(
            "--event-gap",
            type=_non_negative,
            help="quiet points that still join two alarms (default 10)",
        )
        command.add_argument(
            "--event-min-length",
            type=_positive,
            help="fewest alarm points in an event (default 1)",
        )
        command.add_argument(
            "--partitions", type=_positive, help="groups of entities scored at once (default 1)"
        )
        command.add_argument(
            "--task-runner",
            choices=["threads", "dask"],
            help="where partitions run: threads (default) or dask (ATP_DASK_ADDRESS, else local)",
        )

    events = commands.add_parser("events", help="alarm events, newest first")
    events.add_argument("--source", help="only this source")
    events.add_argument("--all", action="store_true", help="closed events too, not only open")
    events.add_argument(
        "--limit", type=_non_negative, default=100, help="most events shown (default 100)"
    )

    promote = commands.add_parser("promote", help="move the champion alias")
    promote.add_argument("--version", type=int, help="model version (default: the challenger)")

    serve = commands.add_parser("serve", help="run the scheduled scoring deployment locally")
    serve.add_argument("--source", default="smd")
    serve.add_argument("--cron", default="*/5 * * * *", help="cron schedule (default every 5 min)")
    serve.add_argument("--interval", type=_positive, help="seconds between runs (overrides --cron)")

    benchmark = commands.add_parser(
        "benchmark", help="detectors on a benchmark folder, honest and reference protocols"
    )
    benchmark.add_argument("path", help="a folder in LAYOUT (see docs/loaders.md)")
    benchmark.add_argument(
        "--layout", choices=BENCHMARK_LAYOUTS, default="smd", help="layout of PATH (default smd)"
    )
    benchmark.add_argument(
        "--detectors",
        default="random,pca,max_z,knn",
        help="comma-separated (add 'anomaly_transformer')",
    )
    benchmark.add_argument(
        "--seeds", type=_whole_numbers, default="0,1,2", help="comma-separated seeds"
    )
    benchmark.add_argument("--alpha", type=float, default=0.005, help="honest false-alarm rate")
    benchmark.add_argument(
        "--anomaly-ratio", type=float, default=0.5, help="reference protocol's percentage"
    )
    benchmark.add_argument(
        "--min-fit-rows", type=int, help="skip entities with a shorter fit part (default 100)"
    )
    benchmark.add_argument("--out", help="folder for benchmark.csv/.md (default under ATP_HOME)")

    commands.add_parser("status", help="what is in the warehouse and the registry")
    demo = commands.add_parser("demo", help="ingest the bundled sample, train, promote, score")
    demo.add_argument("--sample", help="SMD folder to use instead of the bundled sample")
    return parser


def _given(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _train_params(args: argparse.Namespace) -> Any:
    """The preset's parameters with the options given, validated as the flow validates them."""
    from pydantic import ValidationError

    from flows.params import TrainFlowParams, train_preset
    from tasks.errors import AtpError

    base = train_preset(args.preset)
    params = base.model_dump()
    params.update(
        source=args.source,
        train_end=args.train_end,
        promote=args.promote or base.promote,
        **_given(
            detector=args.model,
            scoring_method=args.scoring_method,
            score_smoothing=args.score_smoothing,
        ),
    )
    params["training"].update(
        _given(
            max_epochs=args.max_epochs,
            max_steps=args.max_steps,
            device=args.device,
            precision=args.precision,
            attention=args.attention,
            processes=args.processes,
        )
    )
    params["calibration"].update(
        _given(alpha=args.alpha, method=args.calibration_method, scope=args.scope)
    )
    params["gate"].update(
        _given(
            metric=args.gate_metric,
            margin=args.gate_margin,
            false_alarm_budget=args.false_alarm_budget,
            force=args.force or None,
        )
    )
    try:
        return TrainFlowParams.model_validate(params)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc']))} {e['msg']} (got {e['input']!r})"
            for e in error.errors()
        )
        raise AtpError(f"invalid options: {problems}") from error


def _event_rules(args: argparse.Namespace) -> dict[str, Any]:
    """The event options given; the flows' defaults apply to the others."""
    return _given(event_gap=args.event_gap, event_min_length=args.event_min_length)


def _partitioning(args: argparse.Namespace) -> dict[str, Any]:
    """The partitioning options given; the flows' defaults apply to the others."""
    return _given(partitions=args.partitions, task_runner=args.task_runner)


def _at_least(low: int, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
    return value


def _positive(text: str) -> int:
    return _at_least(1, text)


def _non_negative(text: str) -> int:
    return _at_least(0, text)


def _csv(text: str, kind: type = str) -> tuple[Any, ...]:
    return tuple(kind(part.strip()) for part in text.split(",") if part.strip())


def _whole_numbers(text: str) -> tuple[int, ...]:
    try:
        return _csv(text, int)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not comma-separated whole numbers: {text!r}") from None


def _run(args: argparse.Namespace) -> object:
    from flows import operations, report
    from flows.benchmark import benchmark_flow
    from flows.ingest import ingest_flow
    from flows.scoring import backfill_flow, scoring_flow
    from flows.training import training_flow

    match args.command:
        case "ingest":
            return ingest_flow(args.path, kind=args.kind, contract=args.contract)
        case "contract":
            columns = {f"{c}_column": getattr(args, f"{c}_column") for c in COLUMN_OPTIONS}
            return operations.contract_flow(
                args.path, args.name, args.out, args.overwrite, _given(**columns)
            )
        case "train":
            return training_flow(_train_params(args))
        case "score":
            return scoring_flow(
                source=args.source,
                alias=args.alias,
                threshold_mode=args.threshold_mode,
                **_event_rules(args),
                **_partitioning(args),
            )
        case "backfill":
            return backfill_flow(
                source=args.source,
                start=args.start,
                end=args.end,
                alias=args.alias,
                **_event_rules(args),
                **_partitioning(args),
            )
        case "events":
            return operations.events_flow(args.source, not args.all, args.limit)
        case "promote":
            return operations.promote_flow(args.version)
        case "serve":
            return report.serve_scoring(args.source, cron=args.cron, interval=args.interval)
        case "benchmark":
            return benchmark_flow(
                args.path,
                detectors=_csv(args.detectors),
                seeds=args.seeds,
                alpha=args.alpha,
                anomaly_ratio=args.anomaly_ratio,
                out_dir=args.out,
                layout=args.layout,
                **_given(min_fit_rows=args.min_fit_rows),
            )
        case "status":
            return operations.status_flow()
        case "demo":
            status = operations.demo_flow(*([args.sample] if args.sample else []))
            report.print_demo_epilogue()
            return status
    raise AssertionError(args.command)


def _refusals() -> tuple[type[Exception], ...]:
    """The errors that are deliberate refusals: their message is the whole story."""
    from data_contracts.contract import ContractError
    from tasks.errors import AtpError

    return AtpError, ContractError


class _RefusalsWithoutTraceback(logging.Filter):
    """Prefect logs a failed run's exception with its traceback; a refusal's message is enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], _refusals()):
            record.exc_info = record.exc_text = None
        return True


_REFUSAL_FILTER = _RefusalsWithoutTraceback()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``atp`` console script."""
    args = _parser().parse_args(argv)
    apply_quiet_defaults()
    from flows.report import print_result

    for name in RUN_LOGGERS:
        logging.getLogger(name).addFilter(_REFUSAL_FILTER)
    try:
        print_result(_run(args))
    except _refusals() as error:
        print(f"atp {args.command}: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
