"""The entities a benchmark runs on: every layout read by its loader, one split, explicit skips.

An entity's training range is its rows before the first labelled row (``label`` null in the
loaders' warehouse frames; ``train/`` in SMD), its test range the labelled rows. The fit part is
the first ``1 - val_fraction`` of the training range, the validation tail the rest. An entity is
skipped, with its reason, when its fit part is shorter than ``min_fit_rows`` or its test range
lacks a labelled anomaly or a normal point (VUS-PR, AUC-PR and AUROC are undefined then); the
entities a loader itself skips are listed with its reason too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.errors import IngestError
from tasks.ingest import read_label_lines, read_number_rows, read_text
from tasks.loaders import LOADERS

LAYOUTS = ("smd", *LOADERS)
# One window of the benchmark's Anomaly Transformer, so every detector sees the same entities.
MIN_FIT_ROWS = 100
_SMD_PARTS = ("train", "test", "test_label")


@dataclass(frozen=True)
class Entity:
    """One series: the training range ``(T, C)``, the test range ``(T2, C)`` and its 0/1 labels."""

    name: str
    train: np.ndarray
    test: np.ndarray
    labels: np.ndarray

    def fit_rows(self, val_fraction: float) -> int:
        """Rows of the fit part: the first ``1 - val_fraction`` of the training range."""
        return int(round((1 - val_fraction) * self.train.shape[0]))


@dataclass(frozen=True)
class Selection:
    """The entities to benchmark, in the loader's order, and ``"<entity>: <reason>"`` skips."""

    entities: list[Entity]
    skipped: list[str]


def smd_machines(root: Path) -> tuple[list[str], list[str]]:
    """Machines with ``train/``, ``test/`` and ``test_label/`` files (``.txt`` or ``.txt.gz``), and
    ``"<machine>: no <part>/ file"`` for each machine that lacks one."""
    parts = {
        part: {path.name.split(".txt")[0] for path in (root / part).glob("*.txt*")}
        for part in _SMD_PARTS
    }
    names = set().union(*parts.values())
    found = sorted(name for name in names if all(name in held for held in parts.values()))
    skipped = [
        f"{name}: no {' or '.join(f'{part}/' for part, held in parts.items() if name not in held)} "
        "file"
        for name in sorted(names - set(found))
    ]
    if not found:
        raise IngestError(
            f"{root}: no machine has train/, test/ and test_label/ files (SMD layout)"
        )
    return found, skipped


def _finite(values: np.ndarray, where: str, columns: list[str]) -> np.ndarray:
    """``values`` `(T, C)`; IngestError naming the first non-finite value's column and row."""
    bad = np.argwhere(~np.isfinite(values))
    if bad.size:
        row, column = bad[0]
        raise IngestError(
            f"{where}, {columns[column]}, row {row}: {values[row, column]} "
            f"({len(bad)} non-finite values)"
        )
    return values


def load_machine(root: Path, name: str) -> Entity:
    """One SMD machine (any number of sensors, as many in test as in train); a bad file, a
    non-finite value or a label count unlike the test rows is an IngestError naming the file."""
    (train_file,), (test_file,), (label_file,) = (
        tuple((root / part).glob(f"{name}.txt*")) for part in _SMD_PARTS
    )
    width = read_text(train_file).split("\n", 1)[0].count(",") + 1
    columns = [f"value {column}" for column in range(1, width + 1)]
    train, test = (
        _finite(read_number_rows(path, width), str(path), columns)
        for path in (train_file, test_file)
    )
    labels = read_label_lines(label_file)
    if labels.shape[0] != test.shape[0]:
        raise IngestError(
            f"{label_file}: {labels.shape[0]} labels for {test.shape[0]} rows of {test_file}"
        )
    return Entity(name, train, test, labels)


def frame_entities(frame: pd.DataFrame, root: Path) -> list[Entity]:
    """Entities of a warehouse frame (``entity, ts, sensors..., label``), in order of appearance."""
    sensors = [c for c in frame.columns if c not in ("entity", "ts", "label")]
    entities = []
    for name, rows in frame.groupby("entity", sort=False):
        labelled = rows["label"].notna().to_numpy()
        if (np.diff(labelled.astype(np.int8)) < 0).any():
            raise IngestError(f"{root}: entity {name!r} has unlabelled rows after labelled ones")
        where, columns = f"{root}: entity {name!r}", [f"sensor {s!r}" for s in sensors]
        values = _finite(rows[sensors].to_numpy(np.float64), where, columns)
        n_train = int((~labelled).sum())
        labels = rows["label"].iloc[n_train:].to_numpy(np.int64)
        entities.append(Entity(str(name), values[:n_train], values[n_train:], labels))
    return entities


def read_entities(root: Path, layout: str) -> tuple[list[Entity], list[str]]:
    """Every entity of ``root`` in ``layout``, and the loader's own skips."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: choose from {list(LAYOUTS)}")
    if layout == "smd":
        if (root / "ServerMachineDataset").is_dir():
            root = root / "ServerMachineDataset"
        found, skipped = smd_machines(root)
        return [load_machine(root, name) for name in found], skipped
    load = LOADERS[layout](root)
    return frame_entities(load.frame, root), list(load.skipped)


def skip_reason(entity: Entity, val_fraction: float, min_fit_rows: int) -> str | None:
    """Why ``entity`` cannot be benchmarked, or None."""
    n_fit = entity.fit_rows(val_fraction)
    if n_fit < min_fit_rows or n_fit == entity.train.shape[0]:
        return (
            f"training range of {entity.train.shape[0]} rows: fit part {n_fit} rows, needs "
            f"{min_fit_rows} and a validation tail"
        )
    anomalies = int(entity.labels.sum())
    if entity.labels.size == 0:
        return "no test range (every row is in the training range)"
    if anomalies == 0:
        return f"no labelled anomaly in its {entity.labels.size} test rows"
    if anomalies == entity.labels.size:
        return f"no normal point in its {entity.labels.size} test rows"
    return None


def select_entities(
    root: Path,
    layout: str = "smd",
    *,
    val_fraction: float = 0.2,
    min_fit_rows: int = MIN_FIT_ROWS,
) -> Selection:
    """The entities of ``root`` that can be benchmarked; IngestError when none can."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    entities, skipped = read_entities(Path(root), layout)
    kept = []
    for entity in entities:
        reason = skip_reason(entity, val_fraction, min_fit_rows)
        if reason is None:
            kept.append(entity)
        else:
            skipped.append(f"{entity.name}: {reason}")
    if not kept:
        raise IngestError(f"{root}: no {layout} entity to benchmark; skipped {skipped}")
    return Selection(kept, skipped)
