"""What a validation run's Data Docs page costs next to the validation itself (SMD contract).

Validates synthetic SMD readings (38 sensors) the way ingest (one entity, 2,000 rows) and scoring
(a batch of ``VALIDATION_ROWS`` = 200,000 rows of 20 entities) do, three times each after a warm-up,
and prints the whole ``validate_readings`` time and the part spent writing the page::

    ATP_HOME=/tmp/atp-bench nice -n 10 .venv/bin/python -m bench.data_docs_cost
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd

import tasks.validate as validate
from data_contracts import load_contract

CASES = ((2_000, 1), (200_000, 20))  # (rows, entities)
REPEATS = 3


def readings(rows: int, entities: int, sensors: list[str]) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    per = rows // entities
    parts = [
        pd.DataFrame(
            {
                "entity": f"m-{e}",
                "ts": pd.date_range("2020-01-01", periods=per, freq="min"),
                **{name: rng.uniform(0, 1, per) for name in sensors},
                "label": 0,
            }
        )
        for e in range(entities)
    ]
    return pd.concat(parts, ignore_index=True)


def main() -> None:
    contract = load_contract("smd")
    spent: list[float] = []
    write_page = validate.validation_docs

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        page = write_page(*args, **kwargs)
        spent.append(time.perf_counter() - start)
        return page

    validate.validation_docs = timed  # type: ignore[assignment]
    for rows, entities in CASES:
        frame = readings(rows, entities, contract.sensor_names)
        validate.validate_readings(frame, contract, source="warm-up")
        for _ in range(REPEATS):
            spent.clear()
            start = time.perf_counter()
            validate.validate_readings(frame, contract, source="bench")
            total = time.perf_counter() - start
            share = 100 * spent[0] / total
            print(f"rows={rows} validation={total:.2f}s page={spent[0]:.3f}s ({share:.0f}%)")


if __name__ == "__main__":
    main()
