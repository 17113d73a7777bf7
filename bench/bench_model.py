"""Throughput of our Anomaly Transformer against the plain eager float32 path, in one run.

Measures on one device, with SMD-shaped synthetic data (38 channels, 708,405 train rows and
708,420 test rows with injected anomalies):

* training windows/s at batch 256, window 100: the reference-equivalent path (eager, fp32, two
  backward passes) against our fast paths (one backward of the surrogate, bf16 autocast,
  torch.compile with CUDA graphs, then also the fused Triton attention of
  ``model.fused_attention``), and each gradient's relative L2 distance to the fp32 one;
* scoring windows/s (``reference`` on non-overlapping windows; ``recon_last``, which computes
  the last position of each window alone, and ``recon_mean``, the pipeline's default, on stride-1
  windows), with each fast path's relative L2 distance to the fp32 scores and the overlap of the
  top-0.5% flagged points;
* peak memory, ms per step, and the share of the bf16 floor (performance_anchor.md §2).

Needs torch and numpy (and Triton, which CUDA builds of torch ship, for the fused variant). On the
GPU machine, from the repository root::

    PYTHONUNBUFFERED=1 python3 -m bench.bench_model --out "$OUT" --profile

``--quick`` runs a tiny configuration as a smoke test (on CPU the compiled variants are skipped
unless ``--cpu-compile``).
"""

from __future__ import annotations

import argparse
import datetime
import json
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.measure import (
    FULL,
    QUICK,
    SCORE_VARIANTS,
    TRAIN_VARIANTS,
    Settings,
    bench_score,
    bench_train,
    inject_anomalies,
    relative_l2,
    smd_like,
    top_overlap,
)
from bench.profile_step import kernel_profile, profile_markdown
from model.network import AnomalyTransformer
from model.scoring import score_series
from model.steps import TrainStep
from model.windows import WindowSet

# Issue 4 (one H200, batch 256, window 100); issue 2 asked for 25k training and 90k scoring.
TARGETS = {"train": 100_000, "score": 300_000, "overlap": 0.95}
ANCHORS = (
    "Anchors (performance_anchor.md, same machine kind): upstream fp32 4,471 train / 17,449 score "
    "windows/s; stock-PyTorch best 24,139 / 90,825; bf16 floor 254k / 759k."
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument("--out", type=Path, help="folder for bench.md, bench.json")
    parser.add_argument("--profile", action="store_true", help="kernel profile of the fast paths")
    parser.add_argument("--cpu-compile", action="store_true", help="compiled variants on CPU too")
    parser.add_argument("--train-only", action="store_true", help="skip the scoring variants")
    parser.add_argument(
        "--network",
        metavar="WIN:D_MODEL:D_FF",
        help="window, d_model and d_ff of the network instead of the reference's 100:512:512",
    )
    return parser.parse_args()


def with_network(settings: Settings, network: str | None) -> Settings:
    """``settings`` with the network of ``--network`` (``WIN:D_MODEL:D_FF``), if given."""
    if network is None:
        return settings
    try:
        win_size, d_model, d_ff = (int(part) for part in network.split(":"))
    except ValueError as error:
        raise SystemExit(f"invalid --network {network!r}: expected WIN:D_MODEL:D_FF") from error
    model = replace(settings.model, win_size=win_size, d_model=d_model, d_ff=d_ff)
    return replace(settings, model=model)


def environment(device: torch.device) -> dict[str, Any]:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none (CPU)"
    return {
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"),
        "device": gpu,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "numpy": np.__version__,
    }


def _number(value: float | None, digits: int = 0) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def train_table(rows: list[dict[str, Any]], settings: Settings) -> str:
    lines = [
        f"Training (batch {settings.batch}, window {settings.model.win_size}, "
        f"{settings.model.n_channels} channels, d_model {settings.model.d_model}):",
        "",
        "| variant | windows/s [block range] | ms/step | peak GiB steady (warm-up) | TFLOP/s "
        "| % of bf16 floor | grad rel. L2 vs fp32 | warm-up s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        low, high = r["block_range"]
        lines.append(
            f"| {r['variant']} | **{_number(r['windows_per_s'])}** "
            f"[{_number(low)}–{_number(high)}] "
            f"| {r['ms_per_step']:.2f} | {_number(r['peak_gib'], 2)} "
            f"({_number(r['warmup_peak_gib'], 2)}) | {r['tflops']:.1f} "
            f"| {100 * r['floor_share']:.1f}% | {r['grad_rel_l2']:.1e} | {r['warmup_s']:.1f} |"
        )
    return "\n".join(lines)


def score_table(rows: list[dict[str, Any]], settings: Settings) -> str:
    lines = [
        f"Scoring (batch {settings.score_batch}; `reference`: non-overlapping windows of "
        f"{settings.test_rows:,} points; `recon_last`, `recon_mean`: stride-1 windows of "
        f"{settings.recon_points + settings.model.win_size - 1:,} points). Times are whole "
        "`score_series` calls on a device-resident series, including the copy of the `(T, C)` "
        "contributions to the host (its cost alone in 'host copy ms'):",
        "",
        "| variant | windows | windows/s | points/s | ms/batch | peak GiB | % of bf16 floor "
        "| score rel. L2 vs fp32 | top-0.5% overlap | host copy ms | warm-up s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['windows']:,} | **{_number(r['windows_per_s'])}** "
            f"| {_number(r['points_per_s'])} | {r['ms_per_batch']:.2f} "
            f"| {_number(r['peak_gib'], 2)} "
            f"| {100 * r['floor_share']:.1f}% | {r['score_rel_l2']:.1e} | {r['top_overlap']:.3f} "
            f"| {r['host_copy_ms']:.1f} | {r['warmup_s']:.1f} |"
        )
    return "\n".join(lines)


def run_training(
    settings: Settings,
    device: torch.device,
    compile_ok: bool,
    profiles: dict[str, Any] | None,
) -> tuple[list[dict[str, Any]], TrainStep]:
    """Every training variant; with ``profiles``, the kernel profile of each compiled one."""
    train = smd_like(settings.train_rows, settings.model.n_channels, seed=0)
    windows = WindowSet([train], settings.model.win_size, 1, device, resident=True)
    probe_ids = torch.arange(settings.batch, device=device) * 2_767 % len(windows)
    probe = windows.batch(probe_ids)  # (B, L, C): one fixed batch for the gradient check
    rows, reference_grads, last_step = [], None, None
    for variant in TRAIN_VARIANTS:
        if variant.compile and not compile_ok:
            print(f"skipped (compiled variants need CUDA or --cpu-compile): {variant.name}")
            continue
        if variant.attention == "fused" and device.type != "cuda":
            print(f"skipped (fused attention needs CUDA): {variant.name}")
            continue
        row, grads, last_step = bench_train(variant, settings, windows, probe)
        reference_grads = grads if reference_grads is None else reference_grads
        row["grad_rel_l2"] = relative_l2(grads, reference_grads)
        print(f"train | {row['variant']}: {row['windows_per_s']:,.0f} windows/s", flush=True)
        rows.append(row)
        if variant.compile and profiles is not None:
            batch_step = partial(last_step, windows.batch(probe_ids))
            profiles[variant.name] = kernel_profile(batch_step, steps=10, top=40)
    assert last_step is not None
    return rows, last_step


def run_scoring(
    settings: Settings,
    model: AnomalyTransformer,
    device: torch.device,
    compile_ok: bool,
    profiles: dict[str, Any] | None,
) -> list[dict[str, Any]]:
    """Every scoring variant; with ``profiles``, the kernel profile of each compiled one."""
    test = inject_anomalies(smd_like(settings.test_rows, settings.model.n_channels, seed=1), seed=2)
    series = torch.from_numpy(test).to(device)  # (T, C)
    recon_rows = settings.recon_points + settings.model.win_size - 1
    values = {
        "reference": series,
        "recon_last": series[:recon_rows],
        "recon_mean": series[:recon_rows],
    }
    rows, baselines = [], {}
    for method, precision, compiled in SCORE_VARIANTS:
        if compiled and not compile_ok:
            print(f"skipped (compiled variants need CUDA or --cpu-compile): {method} {precision}")
            continue
        row, scores = bench_score(method, precision, compiled, model, values[method], settings)
        baselines.setdefault(method, scores)
        row["score_rel_l2"] = relative_l2(scores, baselines[method])
        row["top_overlap"] = top_overlap(scores, baselines[method])
        print(f"score | {row['variant']}: {row['windows_per_s']:,.0f} windows/s", flush=True)
        rows.append(row)
        if compiled and profiles is not None:
            profiles[row["variant"]] = kernel_profile(
                lambda method=method, precision=precision: score_series(
                    model,
                    values[method],
                    method,
                    batch_size=settings.score_batch,
                    precision=precision,
                    compile=True,  # type: ignore[arg-type]
                ),
                steps=1,
            )
    return rows


def verdict(train_rows: list[dict[str, Any]], score_rows: list[dict[str, Any]]) -> str:
    best_train = max(train_rows, key=lambda r: r["windows_per_s"])
    fast_scores = [r for r in score_rows if "bf16" in r["variant"]] or score_rows
    met = best_train["windows_per_s"] >= TARGETS["train"]
    lines = [
        f"- training: best {best_train['windows_per_s']:,.0f} windows/s ({best_train['variant']}): "
        f"{'meets' if met else 'misses'} the target (>= {TARGETS['train']:,} windows/s)",
    ]
    for r in fast_scores:
        met = r["windows_per_s"] >= TARGETS["score"] and r["top_overlap"] >= TARGETS["overlap"]
        lines.append(
            f"- scoring {r['variant']}: {r['windows_per_s']:,.0f} windows/s, top-0.5% overlap "
            f"{r['top_overlap']:.3f}: {'meets' if met else 'misses'} the target "
            f"(>= {TARGETS['score']:,} windows/s and overlap >= {TARGETS['overlap']})"
        )
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    settings = with_network(QUICK if args.quick else FULL, args.network)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    compile_ok = device.type == "cuda" or args.cpu_compile
    env = environment(device)
    print(json.dumps(env), flush=True)
    profiles: dict[str, Any] = {}
    profiling = args.profile and device.type == "cuda"
    score_profiles = profiles if profiling else None
    train_rows, fast_step = run_training(settings, device, compile_ok, score_profiles)
    sections = [train_table(train_rows, settings)]
    score_rows = []
    if not args.train_only:
        score_rows = run_scoring(settings, fast_step.model, device, compile_ok, score_profiles)
        sections.append(score_table(score_rows, settings))
    sections += [ANCHORS, verdict(train_rows, score_rows)]
    sections += [profile_markdown(name, summary) for name, summary in profiles.items()]
    report = f"{json.dumps(env)}\n\n" + "\n\n".join(sections)
    print("\n" + report)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench.md").write_text(report + "\n")
        results = {"environment": env, "train": train_rows, "score": score_rows}
        results["profiles"] = profiles
        (args.out / "bench.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
