"""Export the benchmark's entities as numpy arrays, for running a detector elsewhere (a GPU box).

For a layout and a folder, writes per entity ``<file>.npz`` with ``train`` (float32 ``(T, C)``,
raw, the whole training range), ``test`` (float32 ``(T2, C)``, raw) and ``labels`` (int8
``(T2,)``); ``<file>`` is the entity name with ``/`` replaced by ``__``. The entities, the split
and the skips are exactly those of ``atp benchmark`` (``tasks.benchmark_entities``), so the fit
part is the first ``fit_rows`` rows of ``train`` and the validation tail the rest.
``manifest.csv`` lists entity, file, train_rows, fit_rows, test_rows, anomalies; ``skipped.txt``
the skipped entities with their reasons. From the repository root::

    python -m bench.export_arrays PATH --layout nab --out .bench/nab
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from tasks.benchmark_entities import LAYOUTS, MIN_FIT_ROWS, Selection, select_entities

VAL_FRACTION = 0.2  # the benchmark's default validation tail


def file_name(entity: str) -> str:
    """``<entity>.npz`` with ``/`` (NAB, SKAB groups) replaced by ``__``."""
    return entity.replace("/", "__") + ".npz"


def export(selection: Selection, out: Path) -> int:
    """Write the arrays, ``manifest.csv`` and ``skipped.txt`` under ``out``; their bytes.

    Refuses a folder holding ``.npz`` files of other entities (a stale export)."""
    names = {file_name(entity.name) for entity in selection.entities}
    stale = sorted(p.name for p in out.glob("*.npz") if p.name not in names)
    if stale:
        raise FileExistsError(f"{out} holds arrays of other entities, e.g. {stale[:3]}")
    out.mkdir(parents=True, exist_ok=True)
    manifest = [("entity", "file", "train_rows", "fit_rows", "test_rows", "anomalies")]
    for entity in selection.entities:
        name = file_name(entity.name)
        np.savez(
            out / name,
            train=entity.train.astype(np.float32),
            test=entity.test.astype(np.float32),
            labels=entity.labels.astype(np.int8),
        )
        manifest.append(
            (
                entity.name,
                name,
                entity.train.shape[0],
                entity.fit_rows(VAL_FRACTION),
                entity.test.shape[0],
                int(entity.labels.sum()),
            )
        )
    with (out / "manifest.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows(manifest)
    (out / "skipped.txt").write_text("".join(f"{skip}\n" for skip in selection.skipped))
    written = [*names, "manifest.csv", "skipped.txt"]
    return sum((out / name).stat().st_size for name in written)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="a folder in LAYOUT (see docs/loaders.md)")
    parser.add_argument("--layout", choices=LAYOUTS, default="smd")
    parser.add_argument("--out", type=Path, required=True, help="folder for the .npz files")
    parser.add_argument("--min-fit-rows", type=int, default=MIN_FIT_ROWS)
    args = parser.parse_args()
    selection = select_entities(
        args.path, args.layout, val_fraction=VAL_FRACTION, min_fit_rows=args.min_fit_rows
    )
    size = export(selection, args.out)
    print(
        f"{len(selection.entities)} entities, {len(selection.skipped)} skipped, "
        f"{size / 2**20:.1f} MiB in {args.out}"
    )


if __name__ == "__main__":
    main()
