"""Data-parallel training throughput on 1 and N GPUs (same per-GPU batch), plus a bf16 NaN run.

One command runs everything and prints one table::

    PYTHONUNBUFFERED=1 python3 -m bench.bench_ddp --out "$OUT"

* ``torchrun`` workers time ``model.distributed.DistributedTrainStep`` (the step
  ``fit_distributed`` trains with: DDP, bf16 autocast, compiled, one surrogate backward) at batch
  256 per GPU on SMD-shaped data held on each GPU, on 1 GPU and on all GPUs, with and without
  CUDA graphs; windows/s = world × batch × steps ÷ the slowest rank's time; peak memory per GPU;
  at the end the ranks' weights are compared.
* While the 1-GPU variant runs on GPU 0, ``model.train.fit`` (bf16, compile, CUDA graphs) trains
  for ``--nan-steps`` steps on the last GPU and reports whether any loss or weight went non-finite.
* A short ``model.distributed.fit_in_processes`` run on all GPUs (what the training flow runs
  where several GPUs are present: ``torchrun -m model.distributed`` started from Python) checks
  the entry point end to end.

``--quick`` runs tiny sizes on CPU processes (gloo, eager) as a smoke test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from bench.measure import FULL, QUICK, Settings, flops_per_window, smd_like
from model.config import TrainConfig
from model.device import resolve_device
from model.distributed import (
    DistributedTrainStep,
    fit_in_processes,
    rank_batches,
    rank_device,
)
from model.network import AnomalyTransformer
from model.steps import make_optimizer, resolve_attention
from model.train import _window_set, fit

FLOOR_PER_GPU = 254_000  # bf16 one-backward floor of one H200 (performance_anchor.md §2)
WORKER_TIMEOUT_S = 170


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for results and logs")
    parser.add_argument("--quick", action="store_true", help="tiny sizes on CPU processes")
    parser.add_argument("--nan-steps", type=int, default=10_000, help="steps of the NaN run")
    parser.add_argument("--role", choices=("main", "worker", "nan", "e2e"), default="main")
    parser.add_argument("--processes", type=int, default=1, help="e2e: processes to train in")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="worker: compile only")
    parser.add_argument(
        "--attention",
        choices=("auto", "plain", "fused"),
        default="auto",
        help="attention of every run (auto: the fused kernels on a GPU, as the training flow)",
    )
    return parser.parse_args()


def _train_cfg(settings: Settings, args: argparse.Namespace) -> TrainConfig:
    cuda = not args.quick and torch.cuda.is_available()
    return TrainConfig(
        batch_size=settings.batch,
        precision="bf16" if cuda else "fp32",
        compile=cuda,
        device="auto" if cuda else "cpu",
        progress=False,
        attention=args.attention,
    )


def _timed_blocks(step: DistributedTrainStep, windows: Any, settings: Settings) -> list[float]:
    """Seconds of each block of ``settings.iterations`` steps, the slowest rank's."""
    rank, world = dist.get_rank(), dist.get_world_size()
    generator = torch.Generator().manual_seed(0)
    batches = rank_batches(len(windows), settings.batch, generator, rank, world).to(step.device)
    seconds = []
    for block in range(settings.blocks):
        ids = batches[block * settings.iterations : (block + 1) * settings.iterations]
        dist.barrier()
        started = time.perf_counter()
        for window_ids in ids:
            step(windows.batch(window_ids))
        if step.device.type == "cuda":
            torch.cuda.synchronize(step.device)
        elapsed = torch.tensor([time.perf_counter() - started], device=step.device)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        seconds.append(float(elapsed))
    return seconds


def _gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def worker(args: argparse.Namespace) -> None:
    """One torchrun rank: warm up, time the blocks, compare weights; rank 0 writes JSON."""
    settings = QUICK if args.quick else FULL
    train_cfg = _train_cfg(settings, args)
    device = rank_device(train_cfg)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.manual_seed(0)
    model = AnomalyTransformer(settings.model).to(device)
    step = DistributedTrainStep(
        model,
        make_optimizer(model, train_cfg),
        settings.model,
        train_cfg,
        cuda_graphs=not args.no_cuda_graphs,
    )
    series = [smd_like(settings.train_rows, settings.model.n_channels, seed=0)]
    windows = _window_set(series, settings.model, 1, device)
    started = time.perf_counter()
    warmup = replace(settings, blocks=1, iterations=settings.warmup + 5)
    _timed_blocks(step, windows, warmup)
    warmup_s = time.perf_counter() - started
    warmup_peak = _gib(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = _timed_blocks(step, windows, settings)
    checksum = torch.stack([p.detach().double().abs().sum() for p in model.parameters()])
    checksums = [torch.zeros_like(checksum) for _ in range(dist.get_world_size())]
    dist.all_gather(checksums, checksum)
    peaks: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, (_gib(device), warmup_peak))
    if dist.get_rank() == 0:
        world = dist.get_world_size()
        rates = sorted(world * settings.batch * settings.iterations / s for s in seconds)
        result = {
            "gpus": world,
            "cuda_graphs": step.cuda_graphs,
            "attention": step.train_cfg.attention,
            "windows_per_s": rates[len(rates) // 2],
            "block_range": [rates[0], rates[-1]],
            "ms_per_step": 1e3 * sorted(seconds)[len(seconds) // 2] / settings.iterations,
            "peak_gib_steady_warmup": peaks,
            "weights_identical": all(torch.equal(c, checksums[0]) for c in checksums),
            "warmup_s": warmup_s,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        }
        name = f"w{world}_{'graphs' if step.cuda_graphs else 'nographs'}.json"
        (args.out / name).write_text(json.dumps(result, indent=2))
    dist.destroy_process_group()


def nan_run(args: argparse.Namespace) -> None:
    """``fit`` for ``--nan-steps`` bf16 steps; writes whether losses and weights stayed finite."""
    settings = QUICK if args.quick else FULL
    train_cfg = replace(
        _train_cfg(settings, args), max_steps=args.nan_steps, max_epochs=1_000, patience=1_000
    )
    val_rows = settings.train_rows // 20
    data = smd_like(settings.train_rows + val_rows, settings.model.n_channels, seed=3)
    started = time.perf_counter()
    result = {"steps": args.nan_steps, "precision": train_cfg.precision, "error": None}
    device = resolve_device(train_cfg.device)
    result["attention"] = resolve_attention(train_cfg, settings.model, device).attention
    try:
        fitted = fit(settings.model, train_cfg, [data[:-val_rows]], [data[-val_rows:]])
        history = fitted.history.to_dict()
        result["train_loss"], result["val_rec"] = history["train_loss"], history["val_rec"]
        result["steps_run"] = sum(history["steps"])
        result["weights_finite"] = all(
            bool(torch.isfinite(p).all()) for p in fitted.model.parameters()
        )
    except RuntimeError as error:  # fit raises on a non-finite epoch loss
        result["error"] = str(error)
    result["seconds"] = time.perf_counter() - started
    (args.out / "nan_run.json").write_text(json.dumps(result, indent=2))


def entry_point_run(args: argparse.Namespace) -> None:
    """``fit_in_processes`` on a small two-entity dataset (2 epochs); writes ``e2e.json``."""
    settings = QUICK if args.quick else FULL
    data = smd_like(60_000 if not args.quick else 1_200, settings.model.n_channels, seed=4)
    third = len(data) // 3
    train_cfg = replace(_train_cfg(settings, args), max_epochs=2, stride=1 if not args.quick else 5)
    fit_parts, val_parts = [data[:third], data[third : 2 * third]], [data[2 * third :]]
    result = fit_in_processes(settings.model, train_cfg, fit_parts, val_parts, args.processes)
    history = result.history.to_dict()
    keys = ("train_loss", "val_rec", "seconds", "best_epoch")
    summary = {"processes": args.processes, **{key: history[key] for key in keys}}
    (args.out / "e2e.json").write_text(json.dumps(summary))


def _env(gpus: str | None) -> dict[str, str]:
    """This environment with NVLink multicast off, unbuffered output and the GPUs to use.

    Without CUDA, one thread per process (CPU smoke tests share few cores).
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1", NCCL_NVLS_ENABLE="0")
    env |= {"TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpus
    if not torch.cuda.is_available():
        env["OMP_NUM_THREADS"] = "1"
    return env


def _start(command: list[str], log: Path, gpus: str | None) -> subprocess.Popen[bytes]:
    print(f"$ {' '.join(command)}  (GPUs {gpus or 'all'}, log {log.name})", flush=True)
    with open(log, "wb") as handle:
        return subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, env=_env(gpus), start_new_session=True
        )


def _finish(process: subprocess.Popen[bytes], timeout_s: float) -> int:
    """The exit code; a process group past ``timeout_s`` is killed (exit code -9)."""
    try:
        return process.wait(timeout=max(1.0, timeout_s))
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        process.wait()
        return -9


def _torchrun(n: int, module: str, arguments: list[str]) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*launcher, f"--nproc_per_node={n}", "-m", module, *arguments]


def _variants(n_gpus: int, quick: bool) -> list[tuple[str, int, bool]]:
    """``(name, gpus, cuda_graphs)`` in order of importance; the first runs beside the NaN run."""
    if quick:
        return [("w1_nographs", 1, False), ("w2_nographs", 2, False), ("e2e", 2, False)]
    one = [("w1_graphs", 1, True)]
    if n_gpus == 1:
        return [*one, ("e2e", 1, True), ("w1_nographs", 1, False)]
    many = [(f"w{n_gpus}_graphs", n_gpus, True), ("e2e", n_gpus, True)]
    return [*one, *many, (f"w{n_gpus}_nographs", n_gpus, False), ("w1_nographs", 1, False)]


def run_all(args: argparse.Namespace, work: Path, budget_s: float) -> dict[str, Any]:
    """Every variant, the NaN run beside the first, the entry-point check; results by name."""
    started = time.perf_counter()
    n_gpus = torch.cuda.device_count() if not args.quick else 2
    common = ["--out", str(work), "--attention", args.attention]
    common += ["--quick"] if args.quick else []
    nan_gpu = str(n_gpus - 1) if n_gpus > 1 and not args.quick else None
    me = [sys.executable, "-m", "bench.bench_ddp"]
    nan_args = ["--role", "nan", "--nan-steps", str(args.nan_steps), *common]
    nan = _start([*me, *nan_args], work / "log_nan.txt", nan_gpu)
    codes: dict[str, int] = {}
    if n_gpus == 1:  # no GPU to spare: the NaN run first, then the timed runs alone
        codes["nan"] = _finish(nan, budget_s / 2)
    for name, gpus, graphs in _variants(n_gpus, args.quick):
        left = budget_s - (time.perf_counter() - started)
        if left < 60:
            print(f"skipped {name}: {left:.0f} s of the budget left", flush=True)
            continue
        if name == "e2e":
            command = [*me, "--role", "e2e", "--processes", str(gpus), *common]
        else:
            flags = [] if graphs else ["--no-cuda-graphs"]
            command = _torchrun(gpus, "bench.bench_ddp", ["--role", "worker", *common, *flags])
        visible = "0" if gpus == 1 and nan_gpu is not None else None
        timeout_s = min(left - 30, WORKER_TIMEOUT_S)
        codes[name] = _finish(_start(command, work / f"log_{name}.txt", visible), timeout_s)
        if nan.poll() is None and gpus == 1:
            codes["nan"] = _finish(nan, budget_s / 2 - (time.perf_counter() - started))
    if "nan" not in codes:
        codes["nan"] = _finish(nan, budget_s - (time.perf_counter() - started))
    results = {p.stem: json.loads(p.read_text()) for p in sorted(work.glob("*.json"))}
    results["exit_codes"] = codes
    return results


def table(results: dict[str, Any], settings: Settings) -> str:
    """Markdown table of the throughput rows, scaling against 1 GPU in the same mode."""
    flops = flops_per_window(settings.model)["one_backward"]
    lines = [
        "| GPUs | CUDA graphs | attention | windows/s [block range] | per GPU | scaling vs 1 GPU "
        "| ms/step | TFLOP/s per GPU | % of bf16 floor per GPU | peak GiB per GPU steady (warm-up) "
        "| ranks' weights identical | warm-up s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    rows = [r for k, r in results.items() if k.startswith("w") and "_" in k]
    for r in sorted(rows, key=lambda r: (not r["cuda_graphs"], r["gpus"])):
        single = results.get(f"w1_{'graphs' if r['cuda_graphs'] else 'nographs'}")
        scaling = f"{r['windows_per_s'] / single['windows_per_s']:.2f}×" if single else "–"
        per_gpu = r["windows_per_s"] / r["gpus"]
        low, high = r["block_range"]
        peaks = ", ".join(
            f"{s:.2f} ({w:.2f})" if s is not None else "–" for s, w in r["peak_gib_steady_warmup"]
        )
        lines.append(
            f"| {r['gpus']} | {'yes' if r['cuda_graphs'] else 'no'} | {r['attention']} "
            f"| **{r['windows_per_s']:,.0f}** [{low:,.0f}–{high:,.0f}] | {per_gpu:,.0f} "
            f"| {scaling} | {r['ms_per_step']:.2f} | {per_gpu * flops / 1e12:.1f} "
            f"| {100 * per_gpu / FLOOR_PER_GPU:.1f}% | {peaks} | {r['weights_identical']} "
            f"| {r['warmup_s']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.role == "worker":
        return worker(args)
    if args.role == "nan":
        return nan_run(args)
    if args.role == "e2e":
        return entry_point_run(args)
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        results = run_all(args, work, budget_s=float(os.environ.get("BENCH_BUDGET_S", "400")))
        logs = sorted(work.glob("log_*.txt"))
        (args.out / "logs.txt").write_text("".join(f"==> {p.name}\n{p.read_text()}" for p in logs))
    settings = QUICK if args.quick else FULL
    env = {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "torch": torch.__version__}
    report = "\n\n".join([
        json.dumps(env),
        f"Training, batch {settings.batch} per GPU, window {settings.model.win_size}, "
        f"{settings.model.n_channels} channels, d_model {settings.model.d_model}:",
        table(results, settings),
        "NaN run: " + json.dumps(results.get("nan_run")),
        "Entry point (fit_in_processes: torchrun -m model.distributed): "
        + json.dumps(results.get("e2e")),
        "Exit codes: " + json.dumps(results["exit_codes"]),
    ])  # fmt: skip
    print("\n" + report)
    (args.out / "bench_ddp.md").write_text(report + "\n")
    (args.out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
