"""The Anomaly Transformer per SMD machine, scored several ways, under the honest protocol.

Per machine and seed: fit ``model.train.fit`` (the product's reference architecture and training
defaults) on the first 80 % of ``train``, z-scored with that part's statistics; early stopping on
the last 20 % (the validation tail). Then score the fit part, the tail and ``test`` with
``recon_last`` (streaming-final) and ``recon_mean`` (averaged over the windows that hold a point),
keeping the per-sensor errors, and derive the variants:

* ``last``/``mean``: the sum over sensors (the product's scores);
* ``last_norm``/``mean_norm``: each sensor's error divided by that sensor's mean error on the
  validation tail, then summed (no sensor dominates by its own noise level);
* ``last_norm_max``/``mean_norm_max``: the largest normalised sensor error;
* ``mean_znorm``: each sensor's error minus its tail mean, over its tail standard deviation,
  negative parts dropped, summed;
* ``mean_norm_sqrt``: the sum of the square roots of the normalised errors (absolute rather than
  squared residuals: one sensor's burst weighs less against many sensors' shifts);
* ``mean_norm_ma<w>``/``mean_norm_sqrt_ma<w>``: those scores averaged over the ``w`` points
  ending at the point (``SMOOTHING``);
* ``*_ens``: the mean over seeds of a variant, each seed's score divided by its median on the
  tail (its mean where the median is 0).

Test labels only score. Metrics: VUS-PR, AUC-PR, AUROC on ``test``; the false-alarm rate on
normal test points at the split-conformal threshold (alpha 0.005) fitted on the tail. Needs torch
and numpy only. From the repository root::

    PYTHONUNBUFFERED=1 python3 -m bench.at_smd PATH/ServerMachineDataset --seeds 0 1 2 --out DIR

``--scope global`` trains one model on every entity's fit part (each z-scored with its own
statistics), as the product's training flow does, instead of one model per entity. ``--npz DIR``
reads entities from ``bench/export_arrays.py`` output (``<entity>.npz`` with ``train``, ``test``,
``labels``) instead of the SMD layout. ``--scores-out DIR`` (global scope) saves each seed's
scores as ``DIR/scores_seed<seed>.npz`` instead of computing metrics (``--save-variants`` keeps
fewer variants: smaller files); ``--from-scores FILES`` computes the metrics of saved scores, off
the GPU machine; files from several folders are one configuration each and are combined per seed
(each configuration's score divided by its tail median, then averaged). ``--quick`` trains a
tiny model for a few steps (a CPU smoke test).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.baselines_smd import ALPHA, FIT_SHARE, load_machine, machines
from model.config import ModelConfig, TrainConfig
from model.metrics import auc_pr, auroc, vus_pr
from model.scaling import Scaler
from model.scoring import score_series, trailing_mean
from model.thresholds import conformal_threshold
from model.train import fit

QUICK_MODEL = {"win_size": 20, "d_model": 16, "n_heads": 2, "e_layers": 1, "d_ff": 16}
SMOOTHING = (5, 10, 20, 50)  # trailing-mean widths of the smoothed variants
SMOOTHED = ("mean_norm", "mean_norm_sqrt")
SMOOTHED_NAMES = tuple(f"{base}_ma{width}" for base in SMOOTHED for width in SMOOTHING)
VARIANTS = (
    "last",
    "mean",
    "last_norm",
    "mean_norm",
    "last_norm_max",
    "mean_norm_max",
    "mean_znorm",
    "mean_norm_sqrt",
    *SMOOTHED_NAMES,
)


def _errors(model: torch.nn.Module, rows: np.ndarray, method: str, win: int) -> np.ndarray:
    """Per-sensor errors ``(T - win + 1, C)`` of every point from the first full window on."""
    return score_series(model, rows, method).contributions.astype(np.float64)[win - 1 :]


def variant_scores(last: np.ndarray, mean: np.ndarray, tail: slice) -> dict[str, np.ndarray]:
    """Each variant's score per point from the per-sensor errors; ``tail`` indexes the val tail."""
    scale_last = last[tail].mean(axis=0) + 1e-12
    scale_mean = mean[tail].mean(axis=0) + 1e-12
    mean_normed = mean / scale_mean
    spread = mean[tail].std(axis=0) + 1e-12
    scores = {
        "last": last.sum(axis=1),
        "mean": mean.sum(axis=1),
        "last_norm": (last / scale_last).sum(axis=1),
        "mean_norm": mean_normed.sum(axis=1),
        "last_norm_max": (last / scale_last).max(axis=1),
        "mean_norm_max": mean_normed.max(axis=1),
        "mean_znorm": np.clip((mean - mean[tail].mean(axis=0)) / spread, 0, None).sum(axis=1),
        "mean_norm_sqrt": np.sqrt(mean_normed).sum(axis=1),
    }
    return with_smoothing(scores)


def with_smoothing(scores: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``scores`` plus the trailing means of the ``SMOOTHED`` variants."""
    smoothed = {
        f"{base}_ma{width}": trailing_mean(scores[base][:, None], width)[:, 0]
        for base in SMOOTHED
        if base in scores
        for width in SMOOTHING
    }
    return {**scores, **smoothed}


def metrics(scores: np.ndarray, tail: slice, test: slice, labels: np.ndarray) -> dict[str, float]:
    threshold = conformal_threshold(scores[tail], ALPHA)
    scored = scores[test]
    return {
        "vus_pr": vus_pr(labels, scored),
        "auc_pr": auc_pr(labels, scored),
        "auroc": auroc(labels, scored),
        "fpr_normal": float((scored[labels == 0] > threshold).mean()),
    }


Entity = tuple[np.ndarray, np.ndarray, np.ndarray]  # train, test, test labels


def load_entities(args: argparse.Namespace) -> dict[str, Entity]:
    """The entities to run, from the SMD layout or an ``--npz`` folder, shortened by ``--quick``."""
    if args.npz:
        paths = sorted(args.npz.glob("*.npz"))
        wanted = set(args.machines or [p.stem for p in paths])
        found = {}
        for path in paths:
            if path.stem in wanted:
                with np.load(path) as arrays:
                    found[path.stem] = (arrays["train"], arrays["test"], arrays["labels"])
    else:
        names = args.machines or machines(args.root)
        found = {name: load_machine(args.root, name) for name in names}
    if args.quick:  # a short stretch of test around each entity's first anomaly
        for name, (train, test, labels) in found.items():
            first = max(int(np.argmax(labels)) - 200, 0)
            found[name] = train[:600], test[first : first + 400], labels[first : first + 400]
    return found


class Prepared:
    """One entity z-scored with its fit part's statistics: rows = train then test."""

    def __init__(self, entity: Entity) -> None:
        train, test, self.labels = entity
        self.n_fit, self.n_train = int(FIT_SHARE * len(train)), len(train)
        self.rows = Scaler.fit(train[: self.n_fit]).transform(np.concatenate([train, test]))
        self.tail = slice(0, self.n_train - self.n_fit)  # in the scored rows (tail + test)
        self.test = slice(self.n_train - self.n_fit, None)


def fit_model(parts: list[Prepared], seed: int, args: argparse.Namespace) -> tuple[Any, int]:
    """One model fit on the parts' fit rows, early-stopped on their tails; epochs run."""
    model_kw: dict[str, Any] = dict(QUICK_MODEL) if args.quick else {"win_size": args.win}
    if args.d_model and not args.quick:
        model_kw.update(d_model=args.d_model, d_ff=args.d_model)
    cfg = ModelConfig(n_channels=parts[0].rows.shape[1], dropout=args.dropout, k=args.k, **model_kw)
    train_cfg = TrainConfig(
        lr=args.lr,
        lr_halving=not args.constant_lr,
        seed=seed,
        device=args.device,
        precision=args.precision,
        compile=args.compile,
        attention=args.attention,
        max_epochs=args.epochs,
        stride=args.stride,
        max_steps=20 if args.quick else None,
        progress=False,
    )
    fits = [p.rows[: p.n_fit] for p in parts]
    tails = [p.rows[p.n_fit : p.n_train] for p in parts]
    result = fit(cfg, train_cfg, fits, tails)
    return result.model, len(result.history.epochs)


def score_variants(
    model: Any, part: Prepared, save_to: Path | None = None
) -> dict[str, np.ndarray]:
    """The variants' scores for the tail and test rows of one entity; ``save_to`` keeps the
    per-sensor ``recon_mean`` errors (float16 ``.npy``) for exploring other scores offline."""
    win = model.cfg.win_size
    scored = part.rows[part.n_fit - (win - 1) :]  # the tail and test, with one window of context
    last = _errors(model, scored, "recon_last", win)
    mean = _errors(model, scored, "recon_mean", win)
    if save_to is not None:
        save_to.parent.mkdir(parents=True, exist_ok=True)
        np.save(save_to, mean.astype(np.float16))
    return variant_scores(last, mean, part.tail)


def _tail_level(values: np.ndarray) -> float:
    """The tail's median (its mean where the median is 0, e.g. clipped scores): an ensemble's
    per-seed scale."""
    median = float(np.median(values))
    return median if median > 0 else float(values.mean()) + 1e-12


def entity_rows(
    name: str, part: Prepared, per_seed: dict[int, dict[str, np.ndarray]], extra: dict[str, Any]
) -> list[dict[str, Any]]:
    """Metrics per variant and seed, and of the seed ensembles, for one entity."""
    out = []
    for seed, scores in per_seed.items():
        for variant, values in scores.items():
            row = metrics(values, part.tail, part.test, part.labels)
            out.append({"machine": name, "variant": variant, "seed": seed, **row, **extra})
    if len(per_seed) > 1:
        for variant in next(iter(per_seed.values())):
            normed = [s[variant] / _tail_level(s[variant][part.tail]) for s in per_seed.values()]
            row = metrics(np.mean(normed, axis=0), part.tail, part.test, part.labels)
            out.append({"machine": name, "variant": f"{variant}_ens", "seed": -1, **row, **extra})
    return out


def run_entity(name: str, part: Prepared, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per-entity scope: one model per entity and seed."""
    per_seed, seconds, epochs = {}, 0.0, 0
    for seed in args.seeds:
        started = time.perf_counter()
        model, epochs = fit_model([part], seed, args)
        per_seed[seed] = score_variants(model, part)
        seconds = time.perf_counter() - started
    return entity_rows(name, part, per_seed, _extra(args, seconds, epochs))


def run_global(parts: dict[str, Prepared], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Global scope: one model per seed for every entity, each entity scored on its own."""
    per_entity: dict[str, dict[int, dict[str, np.ndarray]]] = {name: {} for name in parts}
    seconds, epochs = 0.0, 0
    for seed in args.seeds:
        started = time.perf_counter()
        model, epochs = fit_model(list(parts.values()), seed, args)
        for name, part in parts.items():
            save_to = args.save_errors / f"{name}_seed{seed}.npy" if args.save_errors else None
            per_entity[name][seed] = score_variants(model, part, save_to)
        seconds = time.perf_counter() - started
        print(f"global seed {seed}: {seconds:.0f} s, {epochs} epochs", flush=True)
        if args.scores_out:
            path = args.scores_out / f"scores_seed{seed}.npz"
            save_scores(path, per_entity, seed, args.save_variants)
    if args.scores_out:  # metrics later, off the GPU machine: --from-scores
        return []
    extra = _extra(args, seconds / len(parts), epochs)
    return [
        row
        for name, part in parts.items()
        for row in entity_rows(name, part, per_entity[name], extra)
    ]


PerEntity = dict[str, dict[int, dict[str, np.ndarray]]]  # entity -> seed -> variant -> scores


def save_scores(path: Path, per_entity: PerEntity, seed: int, variants: list[str]) -> None:
    """One seed's ``variants`` scores of every entity, as ``<entity>/<variant>`` arrays."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        f"{name}/{variant}": values.astype(np.float32)
        for name, by_seed in per_entity.items()
        for variant, values in by_seed[seed].items()
        if variant in variants
    }
    np.savez_compressed(path, **arrays)


def _load_scores(parts: dict[str, Prepared], paths: list[Path]) -> PerEntity:
    per_entity: PerEntity = {name: {} for name in parts}
    for path in paths:
        seed = int(path.stem.removeprefix("scores_seed"))
        with np.load(path) as arrays:
            for key in arrays.files:
                name, variant = key.split("/")
                if name in per_entity:
                    per_entity[name].setdefault(seed, {})[variant] = arrays[key]
    return per_entity


def configuration_ensemble(
    parts: dict[str, Prepared], folders: list[PerEntity], rescale: bool = True
) -> PerEntity:
    """Per entity, seed and variant: the mean over configurations (``folders``) of each one's
    scores, divided by their tail level where ``rescale`` (else as they are: the product's
    ensemble of ``*_norm`` scores, already on one scale per sensor); seeds missing from a
    configuration are left out."""
    combined: PerEntity = {}
    for name, part in parts.items():
        seeds = set.intersection(*(set(folder[name]) for folder in folders))
        combined[name] = {
            seed: {
                variant: np.mean(
                    [
                        f[name][seed][variant]
                        / (_tail_level(f[name][seed][variant][part.tail]) if rescale else 1.0)
                        for f in folders
                    ],
                    axis=0,
                )
                for variant in folders[0][name][seed]
            }
            for seed in sorted(seeds)
        }
    return combined


def rows_from_scores(
    parts: dict[str, Prepared], paths: list[Path], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Metrics of the scores that ``--scores-out`` saved (``scores_seed<seed>.npz`` files).

    Files from several folders (one per configuration) are combined per seed by
    ``configuration_ensemble`` before smoothing.
    """
    by_folder: dict[Path, list[Path]] = {}
    for path in paths:
        by_folder.setdefault(path.parent, []).append(path)
    folders = [_load_scores(parts, files) for files in by_folder.values()]
    rescale = args.ensemble == "rescaled"
    per_entity = (
        folders[0] if len(folders) == 1 else configuration_ensemble(parts, folders, rescale)
    )
    extra = _extra(args, float("nan"), 0)
    return [
        row
        for name, part in parts.items()
        for row in entity_rows(
            name, part, {seed: with_smoothing(v) for seed, v in per_entity[name].items()}, extra
        )
    ]


def _extra(args: argparse.Namespace, seconds: float, epochs: int) -> dict[str, Any]:
    return {
        "tag": args.tag,
        "scope": args.scope,
        "win": args.win,
        "max_epochs": args.epochs,
        "seconds": seconds,
        "epochs": epochs,
        "stride": args.stride,
    }


def _append_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)


def summary(rows: list[dict[str, Any]]) -> str:
    """Mean over machines per variant and seed, then mean ± sd over seeds."""
    lines = [
        "| variant | VUS-PR | AUC-PR | AUROC | FPR normal | runs |",
        "|---|---|---|---|---|---|",
    ]
    for variant in dict.fromkeys(r["variant"] for r in rows):
        cells = []
        for key in ("vus_pr", "auc_pr", "auroc", "fpr_normal"):
            by_seed: dict[int, list[float]] = {}
            for r in rows:
                if r["variant"] == variant:
                    by_seed.setdefault(r["seed"], []).append(r[key])
            means = [statistics.mean(v) for v in by_seed.values()]
            spread = f" ± {statistics.stdev(means):.3f}" if len(means) > 1 else ""
            cells.append(f"{statistics.mean(means):.3f}{spread}")
        runs = sum(r["variant"] == variant for r in rows)
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {runs} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, nargs="?", help="ServerMachineDataset folder")
    parser.add_argument("--npz", type=Path, help="folder of <entity>.npz instead of root")
    parser.add_argument("--machines", nargs="*", help="default: every entity with labels")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--scope", choices=["entity", "global"], default="entity")
    parser.add_argument("--epochs", type=int, default=10, help="most epochs (early stopping)")
    parser.add_argument("--stride", type=int, default=1, help="training window stride")
    parser.add_argument("--win", type=int, default=100, help="window length")
    parser.add_argument("--lr", type=float, default=TrainConfig.lr, help="Adam learning rate")
    parser.add_argument("--constant-lr", action="store_true", help="no halving after epoch 2")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--d-model", type=int, help="d_model and d_ff (default: the reference's)")
    parser.add_argument("--k", type=float, default=ModelConfig.k, help="minimax weight")
    parser.add_argument("--tag", default="default", help="label of this configuration in the csv")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--compile", action="store_true", help="torch.compile the training step")
    parser.add_argument("--attention", choices=["plain", "fused"], default="plain")
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps (smoke test)")
    parser.add_argument("--scores-out", type=Path, help="save scores, skip metrics (global)")
    parser.add_argument(
        "--save-variants",
        nargs="+",
        choices=[v for v in VARIANTS if v not in SMOOTHED_NAMES],
        default=[v for v in VARIANTS if v not in SMOOTHED_NAMES],
        help="unsmoothed variants --scores-out keeps (smoothing is recomputed from them)",
    )
    parser.add_argument("--from-scores", type=Path, nargs="+", help="metrics of saved scores")
    parser.add_argument(
        "--ensemble",
        choices=["rescaled", "mean"],
        default="rescaled",
        help="combine configurations' scores each divided by its tail median, or as they are",
    )
    parser.add_argument("--save-errors", type=Path, help="folder for per-sensor errors (global)")
    parser.add_argument("--out", type=Path, help="folder for at_smd.csv (appended per entity)")
    args = parser.parse_args()
    if (args.root is None) == (args.npz is None):
        parser.error("give either root or --npz")
    win = QUICK_MODEL["win_size"] if args.quick else args.win
    parts = {}
    for name, entity in load_entities(args).items():
        part = Prepared(entity)
        if part.n_fit < 2 * win or part.n_train - part.n_fit < win or not part.labels.any():
            print(f"{name}: skipped (fit part or tail shorter than the window, or no anomaly)")
        else:
            parts[name] = part
    if not parts:
        parser.error("no entity to run")
    rows = []
    if args.from_scores:
        rows = rows_from_scores(parts, args.from_scores, args)
        if args.out:
            _append_csv(args.out / "at_smd.csv", rows)
    elif args.scope == "global":
        rows = run_global(parts, args)
        if args.out:
            _append_csv(args.out / "at_smd.csv", rows)
    for name, part in parts.items() if args.scope == "entity" and not args.from_scores else ():
        started = time.perf_counter()
        found = run_entity(name, part, args)
        rows += found
        if args.out:  # after each entity, so that a run cut short keeps what it measured
            _append_csv(args.out / "at_smd.csv", found)
        best = max(found, key=lambda r: r["vus_pr"])
        print(
            f"{name}: {time.perf_counter() - started:.0f} s, best {best['variant']} "
            f"seed {best['seed']} VUS-PR {best['vus_pr']:.3f}",
            flush=True,
        )
    print(summary(rows))


if __name__ == "__main__":
    main()
