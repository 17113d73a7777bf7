"""Load test: score N entities x one day of minute data with a small model, per backend.

Runs the scoring flow's task function (``score_new_rows``: read after each watermark,
validate, score, write scores + watermark per chunk) over every entity, as ``scoring_flow`` does,
without the Prefect API around it. Prints points/s, wall time and peak memory (max RSS).

    .venv/bin/python bench/load_test.py --entities 10 --backend sqlite
    .venv/bin/python bench/load_test.py --entities 10 --backend postgres
"""

from __future__ import annotations

import argparse
import resource
import secrets
import sys
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "faults"))
from fault_workers import SMD, local_model, readings, save_tiny_checkpoint  # noqa: E402

from tasks.scoring import score_new_rows  # noqa: E402
from tasks.warehouse import ensure_schema, get_engine, list_entities, upsert_readings  # noqa: E402

MINUTES_PER_DAY = 1440
ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def _warehouse(backend: str, tmp: Path) -> str:
    if backend == "sqlite":
        return f"sqlite:///{tmp / 'warehouse.db'}"
    name = f"atp_load_{secrets.token_hex(4)}"
    with sa.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT").connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    return sa.make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)


def _drop(url: str) -> None:
    get_engine(url).dispose()
    name = sa.make_url(url).database
    with sa.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT").connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE "{name}" WITH (FORCE)')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entities", type=int, default=1000)
    parser.add_argument("--backend", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--chunk-rows", type=int, default=50_000)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="atp-load-"))
    url = _warehouse(args.backend, tmp)
    names = tuple(f"machine-{i}" for i in range(args.entities))
    frame = readings(MINUTES_PER_DAY, entities=names)
    ensure_schema(url, SMD)
    upsert_readings(url, SMD, frame)
    save_tiny_checkpoint(tmp / "model.pt", frame)
    loaded = local_model(tmp / "model.pt")
    started = time.perf_counter()
    entities = list_entities(url, SMD)
    results = score_new_rows(
        url, SMD, loaded, entities, run_id="load-test", chunk_rows=args.chunk_rows
    )
    scored = sum(result.scored for result in results)
    wall = time.perf_counter() - started
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.backend == "postgres":
        _drop(url)
    print(
        f"{args.backend}: {args.entities} entities, {scored} points in {wall:.1f} s = "
        f"{scored / wall:,.0f} points/s, {wall / args.entities:.2f} s/entity, "
        f"peak RSS {peak_mib:.0f} MiB"
    )


if __name__ == "__main__":
    main()
