"""Benchmark flow: detectors on a folder in any loader's layout, reference and honest protocol."""

from pathlib import Path

from prefect import flow

from tasks.benchmark import (
    BenchmarkTables,
    log_benchmark_task,
    prepare_out_dir_task,
    run_benchmark_task,
    write_tables_task,
)
from tasks.benchmark_entities import MIN_FIT_ROWS
from tasks.settings import get_settings


@flow(name="benchmark", log_prints=True)
def benchmark_flow(
    path: str,
    detectors: tuple[str, ...] = ("random", "pca", "max_z", "knn"),
    seeds: tuple[int, ...] = (0, 1, 2),
    alpha: float = 0.005,
    anomaly_ratio: float = 0.5,
    out_dir: str | None = None,
    layout: str = "smd",
    min_fit_rows: int = MIN_FIT_ROWS,
) -> BenchmarkTables:
    """Write ``benchmark.csv`` and ``benchmark.md`` (default: under ATP_HOME); log to MLflow."""
    settings = get_settings()
    out = prepare_out_dir_task(Path(out_dir) if out_dir else settings.home / "benchmark")
    run = run_benchmark_task(
        Path(path),
        list(detectors),
        list(seeds),
        layout=layout,
        alpha=alpha,
        anomaly_ratio=anomaly_ratio,
        min_fit_rows=min_fit_rows,
    )
    tables = write_tables_task(run, out)
    params = {
        "path": path,
        "layout": layout,
        "detectors": detectors,
        "seeds": seeds,
        "alpha": alpha,
        "anomaly_ratio": anomaly_ratio,
        "min_fit_rows": min_fit_rows,
    }
    log_benchmark_task(settings, tables, params)
    return tables
