"""UCR anomaly archive: ``<id>_UCR_Anomaly_<name>_<train_end>_<begin>_<end>.txt``, one series of
numbers separated by newlines or other whitespace."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.errors import IngestError
from tasks.ingest import read_text
from tasks.loaders.common import (
    SourceLoad,
    concat,
    labels,
    read_each,
    synthetic_ts,
    warehouse_frame,
)

CADENCE_SECONDS = 1  # the archive gives no sampling rate: one row per second from ORIGIN
_NAME = re.compile(r"(\d+)_UCR_Anomaly_(.+)_(\d+)_(\d+)_(\d+)\.txt")


def _values(path: Path) -> np.ndarray:
    tokens = read_text(path).split()
    try:
        return np.array(tokens, dtype=np.float64)
    except ValueError:
        bad = next(i for i, t in enumerate(tokens) if not _is_number(t))
        raise IngestError(
            f"{path}: value {bad + 1} is not a number: {tokens[bad][:40]!r}"
        ) from None


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def read_ucr_file(path: Path) -> pd.DataFrame:
    """One series: entity ``<id>_<name>``; rows before ``train_end`` unlabelled; label 1 on the
    0-based rows ``begin <= i < end`` (the TimeEval/aeon reading of the name), else 0."""
    match = _NAME.fullmatch(path.name)
    if match is None:
        raise IngestError(
            f"{path}: name is not <id>_UCR_Anomaly_<name>_<train_end>_<begin>_<end>.txt"
        )
    number, name, train_end, begin, end = match.groups()
    train_end, begin, end = int(train_end), int(begin), int(end)
    values = _values(path)
    if not 0 < train_end <= begin < end <= len(values):
        raise IngestError(
            f"{path}: needs 0 < train_end <= begin < end <= {len(values)} rows, "
            f"got {train_end}, {begin}, {end}"
        )
    test = np.zeros(len(values) - train_end, np.int64)
    test[begin - train_end : end - train_end] = 1
    frame = pd.DataFrame({"value": values})
    return warehouse_frame(
        f"{int(number):03d}_{name}",
        synthetic_ts(len(values), CADENCE_SECONDS),
        frame,
        labels(train_end, test),
    )


def read_ucr(root: Path) -> SourceLoad:
    """Every ``*_UCR_Anomaly_*.txt`` under ``root`` (any depth), one entity each; a file
    without values is skipped and reported."""
    root = Path(root)
    paths = [root] if root.is_file() else sorted(root.rglob("*_UCR_Anomaly_*.txt"))
    frames, skipped = read_each(paths, read_ucr_file, lambda p: p.name)
    return SourceLoad(concat(frames, root), skipped)
