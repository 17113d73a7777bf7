"""DDP training on two CPU processes (gloo) against one process over the same data."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import model.distributed
from model.checkpoint import load_checkpoint
from model.config import ModelConfig, TrainConfig
from model.distributed import (
    DistributedTrainStep,
    _run_workers,
    default_processes,
    fit_distributed,
    fit_in_processes,
    load_dataset,
    rank_batches,
    save_dataset,
    train_from_file,
)
from model.network import AnomalyTransformer
from model.steps import TrainStep, make_optimizer
from model.train import fit

MODEL = {"n_channels": 3, "win_size": 16, "d_model": 16, "n_heads": 2, "e_layers": 1, "d_ff": 16}
TRAIN = {
    "batch_size": 8,
    "max_epochs": 2,
    "stride": 4,
    "lr": 1e-3,
    "device": "cpu",
    "progress": False,
    "deterministic": True,
}


def _rank_worker(rank: int, world: int, folder: str) -> None:
    """One rank: train from the hand-over file, keep this rank's weights for the test."""
    torch.set_num_threads(1)
    root = Path(folder)
    dist.init_process_group(
        "gloo", init_method=f"file://{root / 'store'}", rank=rank, world_size=world
    )
    try:
        result = train_from_file(root / "data.npz", root / "model.ckpt", root / "config.json")
        torch.save(result.model.state_dict(), root / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-process run (batch 8 per rank) written to a temporary folder."""
    root = tmp_path_factory.mktemp("ddp")
    rng = np.random.default_rng(0)
    t = np.arange(400)[:, None]
    series = [
        np.sin(t / (5 + e) + np.arange(3)) + 0.1 * rng.standard_normal((400, 3)) for e in range(2)
    ]
    save_dataset(root / "data.npz", [s[:300] for s in series], [s[300:] for s in series])
    (root / "config.json").write_text(json.dumps({"model": MODEL, "train": TRAIN}))
    mp.spawn(_rank_worker, args=(2, str(root)), nprocs=2, join=True)
    return root


def _one_process(root: Path, run: Callable[..., object]) -> list[float]:
    """Training losses of ``run`` (``fit`` or a 1-rank ``fit_distributed``) at batch 16."""
    fit_series, val_series = load_dataset(root / "data.npz")
    train_cfg = TrainConfig(**{**TRAIN, "batch_size": 16})
    result = run(ModelConfig(**MODEL), train_cfg, fit_series, val_series)
    return result.history.to_dict()["train_loss"]  # type: ignore[attr-defined]


def test_both_ranks_end_with_identical_weights(two_ranks: Path) -> None:
    weights = [torch.load(two_ranks / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert weights[0].keys() == weights[1].keys()
    for name, tensor in weights[0].items():
        assert torch.equal(tensor, weights[1][name]), name


def test_the_checkpoint_holds_rank_0_weights_and_the_history(two_ranks: Path) -> None:
    checkpoint = load_checkpoint(two_ranks / "model.ckpt")
    weights = torch.load(two_ranks / "rank0.pt", weights_only=True)
    for name, tensor in checkpoint.model.state_dict().items():
        assert torch.equal(tensor, weights[name]), name
    assert checkpoint.extras["world_size"] == 2
    assert len(checkpoint.extras["history"]["train_loss"]) == TRAIN["max_epochs"]


def test_two_ranks_train_like_one_process_with_the_global_batch(
    two_ranks: Path, tmp_path: Path
) -> None:
    distributed = json.loads(json.dumps(load_checkpoint(two_ranks / "model.ckpt").extras))
    two = distributed["history"]["train_loss"]
    np.testing.assert_allclose(two, _one_process(two_ranks, fit), rtol=1e-4)
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        np.testing.assert_allclose(two, _one_process(two_ranks, fit_distributed), rtol=1e-4)
    finally:
        dist.destroy_process_group()


# Wide enough that 1 MB buckets split its gradients (DDP's first bucket is 1 MB at least).
WIDE_MODEL = {**MODEL, "d_model": 256, "e_layers": 2, "d_ff": 256}


def _wide_batch() -> tuple[ModelConfig, TrainConfig, torch.Tensor]:
    """The wide network's config, a compiled training config and a batch of 8 windows."""
    train_cfg = TrainConfig(batch_size=4, device="cpu", progress=False, compile=True)
    generator = torch.Generator().manual_seed(1)
    windows = torch.randn(8, MODEL["win_size"], MODEL["n_channels"], generator=generator)
    return ModelConfig(**WIDE_MODEL), train_cfg, windows


def _compiled_rank(rank: int, world: int, folder: str) -> None:
    """One rank's compiled DDP gradient on its half of the batch, with 1 MB buckets, and how many
    graphs AOTAutograd compiled (Dynamo's default would split the graph at each bucket)."""
    from torch._dynamo.utils import counters

    torch.set_num_threads(1)
    root = Path(folder)
    dist.init_process_group(
        "gloo", init_method=f"file://{root / 'store'}", rank=rank, world_size=world
    )
    ddp_class = torch.nn.parallel.DistributedDataParallel
    model.distributed.DistributedDataParallel = functools.partial(ddp_class, bucket_cap_mb=1)
    try:
        model_cfg, train_cfg, windows = _wide_batch()
        torch.manual_seed(0)
        network = AnomalyTransformer(model_cfg)
        optimizer = make_optimizer(network, train_cfg)
        step = DistributedTrainStep(network, optimizer, model_cfg, train_cfg, backend="aot_eager")
        step.backward(windows.chunk(world)[rank])
        grads = {name: p.grad for name, p in network.named_parameters()}
        graphs = counters["aot_autograd"]["total"]
        torch.save({"grads": grads, "graphs": graphs}, root / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_compiled_ddp_is_one_graph_and_averages_the_ranks_gradients(tmp_path: Path) -> None:
    mp.spawn(_compiled_rank, args=(2, str(tmp_path)), nprocs=2, join=True)
    model_cfg, train_cfg, windows = _wide_batch()
    torch.manual_seed(0)
    network = AnomalyTransformer(model_cfg)
    eager = replace(train_cfg, compile=False)
    TrainStep(network, make_optimizer(network, eager), model_cfg, eager).backward(windows)
    for rank in range(2):
        result = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        assert result["graphs"] == 1
        for name, parameter in network.named_parameters():
            torch.testing.assert_close(
                result["grads"][name], parameter.grad, rtol=1e-4, atol=1e-6, msg=name
            )


def test_ranks_take_disjoint_slices_of_the_same_global_batches() -> None:
    slices = [rank_batches(50, 4, torch.Generator().manual_seed(3), r, 3) for r in range(3)]
    whole = torch.cat(slices, dim=1)  # (n_batches, 12)
    expected = rank_batches(50, 12, torch.Generator().manual_seed(3), 0, 1)
    assert torch.equal(whole, expected)
    assert sorted(set(whole.flatten().tolist())) == list(range(50))


def test_two_backward_minimax_is_refused(tmp_path: Path) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    series = [np.random.default_rng(0).standard_normal((64, 3)).astype(np.float32)]
    train_cfg = TrainConfig(**{**TRAIN, "minimax": "two_backward"})
    try:
        with pytest.raises(ValueError, match="two_backward"):
            fit_distributed(ModelConfig(**MODEL), train_cfg, series, [])
    finally:
        dist.destroy_process_group()


def test_fit_in_processes_runs_the_same_training_in_torchrun_workers(two_ranks: Path) -> None:
    """The launcher the training flow uses: rank 0's weights and history come back."""
    fit_series, val_series = load_dataset(two_ranks / "data.npz")
    result = fit_in_processes(
        ModelConfig(**MODEL), TrainConfig(**TRAIN), fit_series, val_series, processes=2
    )
    expected = load_checkpoint(two_ranks / "model.ckpt")
    history = result.history.to_dict()
    for key in ("train_loss", "val_rec", "steps", "best_epoch"):
        np.testing.assert_allclose(history[key], expected.extras["history"][key], rtol=1e-6)
    weights = result.model.state_dict()
    for name, tensor in expected.model.state_dict().items():
        torch.testing.assert_close(weights[name], tensor, rtol=1e-6, atol=1e-7, msg=name)


def test_fit_in_processes_reports_what_failed_in_the_workers() -> None:
    model_cfg, train_cfg = ModelConfig(**MODEL), TrainConfig(**TRAIN)
    one_window = [np.random.default_rng(0).standard_normal((16, 3)).astype(np.float32)]
    failure = r"(?s)exited 1.*invalid data: 1 window\(s\) for 2 ranks"
    with pytest.raises(RuntimeError, match=failure):
        fit_in_processes(model_cfg, train_cfg, one_window, [], processes=2)
    with pytest.raises(ValueError, match="processes=0"):
        fit_in_processes(model_cfg, train_cfg, one_window, [], processes=0)
    with pytest.raises(ValueError, match="non-finite"):
        fit_in_processes(model_cfg, train_cfg, [np.full((32, 3), np.nan, np.float32)], [], 2)


def test_a_worker_that_aborts_in_cpp_is_reported_with_its_exception() -> None:
    """A C++ exception (gloo, NCCL) ends a worker with SIGABRT and no Python traceback: its
    ``terminate called`` and ``what()`` lines name the cause, however long torchrun's summary."""
    abort = (
        "import os\n"
        "print(\"terminate called after throwing an instance of 'gloo::IoException'\")\n"
        "print('  what():  [gloo] Connection closed by peer', flush=True)\n"
        "print('summary line\\n' * 50, flush=True)\n"
        "os.abort()"
    )
    cause = (
        r"raised: terminate called .*'gloo::IoException' \| what\(\):  \[gloo\] Connection closed"
    )
    with pytest.raises(RuntimeError, match=cause):
        _run_workers([sys.executable, "-c", abort], processes=2)


def test_one_process_per_visible_gpu_at_most_and_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert default_processes("auto") == default_processes("cpu") == 1  # this CPU machine
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert default_processes("auto") == default_processes("cuda") == 4
    assert default_processes("cuda:1") == default_processes("cpu") == 1
    model_cfg, series = ModelConfig(**MODEL), [np.zeros((32, 3), np.float32)]
    for device, processes, problem in (
        ("cuda", 5, "processes=5: this machine has 4 visible CUDA device"),
        ("cuda:1", 2, "device='cuda:1' with processes=2"),
    ):
        train_cfg = TrainConfig(**{**TRAIN, "device": device})
        with pytest.raises(ValueError, match=problem):
            fit_in_processes(model_cfg, train_cfg, series, [], processes)
