"""The ``atp`` command line: every command is one Prefect flow run."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from tasks.settings import apply_quiet_defaults


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atp", description="Anomaly Transformer pipeline.")
    commands = parser.add_subparsers(dest="command", required=True)

    ingest = commands.add_parser("ingest", help="load a source into the warehouse (idempotent)")
    ingest.add_argument("kind", choices=["smd", "csv", "parquet"], help="layout of PATH")
    ingest.add_argument("path", help="SMD folder, or a CSV/Parquet file")
    ingest.add_argument("--contract", default="smd", help="data contract name or YAML path")

    train = commands.add_parser("train", help="train, calibrate, evaluate and register a model")
    train.add_argument("--source", default="smd", help="data contract / source name")
    train.add_argument(
        "--preset",
        choices=["reference", "demo"],
        default="reference",
        help="reference: the paper's architecture; demo: a small CPU-friendly model",
    )
    train.add_argument(
        "--train-end",
        type=datetime.fromisoformat,
        default=None,
        help="end of the training range (default: each entity's first labelled row)",
    )
    train.add_argument("--max-epochs", type=int, help="maximum epochs")
    train.add_argument("--max-steps", type=int, help="maximum optimiser steps")
    train.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    train.add_argument("--alpha", type=float, help="target false-alarm rate of the threshold")
    train.add_argument("--promote", action="store_true", help="make the new version champion")

    score = commands.add_parser("score", help="score rows after each entity's watermark")
    score.add_argument("--source", default="smd")
    score.add_argument("--alias", default="champion")

    backfill = commands.add_parser("backfill", help="re-score a past time range (re-runnable)")
    backfill.add_argument("--source", default="smd")
    backfill.add_argument("--start", type=datetime.fromisoformat, help="ISO timestamp, inclusive")
    backfill.add_argument("--end", type=datetime.fromisoformat, help="ISO timestamp, exclusive")
    backfill.add_argument("--alias", default="champion")

    promote = commands.add_parser("promote", help="move the champion alias")
    promote.add_argument("--version", type=int, help="model version (default: the challenger)")

    serve = commands.add_parser("serve", help="run the scheduled scoring deployment locally")
    serve.add_argument("--source", default="smd")
    serve.add_argument("--cron", default="*/5 * * * *", help="cron schedule (default every 5 min)")
    serve.add_argument("--interval", type=int, help="seconds between runs (overrides --cron)")

    commands.add_parser("status", help="what is in the warehouse and the registry")
    demo = commands.add_parser("demo", help="ingest the bundled sample, train, promote, score")
    demo.add_argument("--sample", help="SMD folder to use instead of the bundled sample")
    return parser


def _train_params(args: argparse.Namespace) -> Any:
    from flows.params import DEMO_TRAINING, TrainFlowParams

    base = DEMO_TRAINING if args.preset == "demo" else TrainFlowParams()
    training = {
        k: v
        for k, v in {
            "max_epochs": args.max_epochs,
            "max_steps": args.max_steps,
            "device": args.device,
        }.items()
        if v is not None
    }
    calibration = {"alpha": args.alpha} if args.alpha is not None else {}
    return base.model_copy(
        update={
            "source": args.source,
            "train_end": args.train_end,
            "promote": args.promote or base.promote,
            "training": base.training.model_copy(update=training),
            "calibration": base.calibration.model_copy(update=calibration),
        }
    )


def _run(args: argparse.Namespace) -> object:
    from flows import operations, report
    from flows.ingest import ingest_flow
    from flows.scoring import backfill_flow, scoring_flow
    from flows.training import training_flow

    match args.command:
        case "ingest":
            return ingest_flow(args.path, kind=args.kind, contract=args.contract)
        case "train":
            return training_flow(_train_params(args))
        case "score":
            return scoring_flow(source=args.source, alias=args.alias)
        case "backfill":
            return backfill_flow(
                source=args.source, start=args.start, end=args.end, alias=args.alias
            )
        case "promote":
            return operations.promote_flow(args.version)
        case "serve":
            return report.serve_scoring(args.source, cron=args.cron, interval=args.interval)
        case "status":
            return operations.status_flow()
        case "demo":
            status = operations.demo_flow(*([args.sample] if args.sample else []))
            report.print_demo_epilogue()
            return status
    raise AssertionError(args.command)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``atp`` console script."""
    args = _parser().parse_args(argv)
    apply_quiet_defaults()
    from flows.report import print_result
    from tasks.errors import AtpError

    try:
        print_result(_run(args))
    except AtpError as error:
        print(f"atp {args.command}: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
