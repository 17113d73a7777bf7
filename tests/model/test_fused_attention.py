"""The fused Triton attention against the plain path, run by Triton's interpreter on CPU."""

from __future__ import annotations

import os
import subprocess
import sys

# Before model.fused_attention is imported: its kernels are then built for the interpreter. Only
# for the import: a variable left in os.environ would reach every process the session starts.
_SAVED_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"

from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from model.config import ModelConfig, TrainConfig  # noqa: E402
from model.distributed import DistributedTrainStep  # noqa: E402
from model.fused_attention import (  # noqa: E402
    CANDIDATE_CONFIGS,
    KernelConfig,
    anomaly_attention,
)
from model.losses import KL_EPS, association_discrepancy, row_discrepancy  # noqa: E402
from model.network import AnomalyAttention, AnomalyTransformer, squash_sigma  # noqa: E402
from model.steps import TrainStep, make_optimizer, resolve_attention  # noqa: E402

if _SAVED_INTERPRET is None:
    del os.environ["TRITON_INTERPRET"]
else:
    os.environ["TRITON_INTERPRET"] = _SAVED_INTERPRET

FAST = TrainConfig(batch_size=4, device="cpu", progress=False)


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """``TRITON_INTERPRET=1`` while a test runs (``model.steps`` checks it on CPU)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


PARTS = ("q", "k", "v", "sigma")


def _attention(length: int, head_dim: int, n_heads: int = 2) -> AnomalyAttention:
    torch.manual_seed(0)
    cfg = ModelConfig(n_channels=3, win_size=length, d_model=n_heads * head_dim, n_heads=n_heads)
    return AnomalyAttention(cfg)


def _part_grads(attention: AnomalyAttention, h: torch.Tensor, loss: torch.Tensor) -> dict:
    """Gradients of ``loss`` w.r.t. the q, k, v and sigma rows of ``in_proj``, and the input."""
    weight_grad, h_grad = torch.autograd.grad(
        loss, (attention.in_proj.weight, h), retain_graph=True
    )
    d = attention.d_model
    parts = weight_grad.split([d, d, d, attention.n_heads])
    return {**dict(zip(PARTS, parts, strict=True)), "input": h_grad}


@pytest.mark.parametrize(("length", "head_dim"), [(20, 16), (37, 24)])
def test_fused_values_and_gradients_match_the_plain_attention(length: int, head_dim: int) -> None:
    """Output, discrepancy rows, and the gradients each term sends to q, k, v and sigma.

    (37, 24): L and E not powers of two, two query-row blocks with padded rows in the second.
    """
    attention = _attention(length, head_dim)
    h = torch.randn(2, length, attention.d_model, requires_grad=True)
    weights = torch.randn(2, length, attention.d_model)
    attended, series, prior, _ = attention(h)
    fused_attended, series_side, prior_side = attention.discrepancy_rows(h)
    torch.testing.assert_close(fused_attended, attended, rtol=1e-5, atol=1e-6)
    discrepancy = association_discrepancy([series], [prior])  # (B, L)
    torch.testing.assert_close(row_discrepancy([series_side]), discrepancy, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(series_side, prior_side, rtol=0, atol=0)
    plain_terms = {
        "output": (attended * weights).sum(),
        "series": association_discrepancy([series], [prior.detach()]).mean(),
        "prior": association_discrepancy([series.detach()], [prior]).mean(),
    }
    fused_terms = {
        "output": (fused_attended * weights).sum(),
        "series": row_discrepancy([series_side]).mean(),
        "prior": row_discrepancy([prior_side]).mean(),
    }
    for term, plain_loss in plain_terms.items():
        expected = _part_grads(attention, h, plain_loss)
        actual = _part_grads(attention, h, fused_terms[term])
        for name, grad in expected.items():
            scale = float(grad.abs().max()) or 1.0
            torch.testing.assert_close(
                actual[name], grad, rtol=1e-4, atol=1e-5 * scale, msg=f"{term} -> {name}"
            )


def _relative_l2(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.double() - reference.double()).norm() / reference.double().norm())


@pytest.mark.parametrize("sharpness", [1.0, 12.0], ids=["init", "sharp"])
def test_half_precision_is_as_close_to_fp32_as_the_plain_path(sharpness: float) -> None:
    """q, k, v in fp16 (the casts of the bf16 path; the interpreter's bf16 dots are wrong,
    triton-lang/triton#11584): output, rows, dq, dk, dv, dsigma against plain fp32.

    sharp: q and k scaled until 95% of the series rows put over 0.9 on one key, as minimax
    training makes them; there the softmax's gradient is a small difference of large terms."""
    attention = _attention(20, 16)
    with torch.no_grad():
        q, k, v, raw_sigma = attention._packed_heads(torch.randn(2, 20, attention.d_model))
    q, k = q * sharpness, k * sharpness
    sigma = squash_sigma(raw_sigma)
    weights = torch.randn(q.shape)

    def evaluate(fused: bool, dtype: torch.dtype) -> list[torch.Tensor]:
        inputs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        inputs.append(sigma.detach().requires_grad_())
        if fused:
            heads, series_side, prior_side = anomaly_attention(*inputs)
            series_rows, prior_rows = row_discrepancy([series_side]), row_discrepancy([prior_side])
        else:
            heads, series, prior = attention.associations(*inputs)
            series_rows = association_discrepancy([series], [prior.detach()])
            prior_rows = association_discrepancy([series.detach()], [prior])
        loss = (heads.float() * weights).mean() - series_rows.mean() + prior_rows.mean()
        return [heads.detach(), series_rows.detach(), *torch.autograd.grad(loss, inputs)]

    reference = evaluate(fused=False, dtype=torch.float32)
    plain, fused = evaluate(False, torch.float16), evaluate(True, torch.float16)
    for name, expected, p, f in zip(("out", "rows", *PARTS), reference, plain, fused, strict=True):
        plain_error, fused_error = _relative_l2(p, expected), _relative_l2(f, expected)
        assert 0 < fused_error <= 1.5 * plain_error, (name, fused_error, plain_error)


# Blocks of 16: L=37 takes three row blocks and three key blocks, the last ones partly padded.
SMALL_BLOCKS = KernelConfig(16, 16, 1, 16, 16, 1, 16, 16, 1)


@pytest.mark.parametrize(
    "config", [*CANDIDATE_CONFIGS, SMALL_BLOCKS], ids=lambda c: "-".join(map(str, c))
)
def test_every_kernel_config_matches_the_plain_attention(config: KernelConfig) -> None:
    """Per head: output, rows, and each term's gradients to q, k, v and sigma (L=37, E=24)."""
    attention = _attention(37, 24)
    with torch.no_grad():
        q, k, v, raw_sigma = attention._packed_heads(torch.randn(2, 37, attention.d_model))
    inputs = [t.detach().requires_grad_() for t in (q, k, v, squash_sigma(raw_sigma))]
    heads, series, prior = attention.associations(*inputs)
    fused_heads, series_side, prior_side = anomaly_attention(*inputs, config=config)

    def rows(s: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return ((s - p) * (torch.log(s + KL_EPS) - torch.log(p + KL_EPS))).sum(-1)  # (B, H, L)

    series_rows, prior_rows = rows(series, prior.detach()), rows(series.detach(), prior)
    torch.testing.assert_close(fused_heads, heads, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(series_side, series_rows, rtol=1e-5, atol=1e-6)
    weights = {"output": torch.randn(heads.shape), "rows": torch.randn(series_rows.shape)}
    terms = {
        "output": ((heads * weights["output"]).sum(), (fused_heads * weights["output"]).sum()),
        "series": ((series_rows * weights["rows"]).sum(), (series_side * weights["rows"]).sum()),
        "prior": ((prior_rows * weights["rows"]).sum(), (prior_side * weights["rows"]).sum()),
    }
    for term, (plain_loss, fused_loss) in terms.items():
        expected = torch.autograd.grad(plain_loss, inputs, retain_graph=True, allow_unused=True)
        actual = torch.autograd.grad(fused_loss, inputs, retain_graph=True)
        for name, grad, fused_grad in zip(PARTS, expected, actual, strict=True):
            grad = torch.zeros_like(fused_grad) if grad is None else grad
            scale = float(grad.abs().max()) or 1.0
            torch.testing.assert_close(
                fused_grad, grad, rtol=1e-4, atol=1e-5 * scale, msg=f"{term} -> d{name}"
            )


def test_every_kernel_launch_compiles_for_the_gpu() -> None:
    """Triton's GPU frontend lowers every launch of every candidate config, fp32 and bf16 (the
    interpreter the other tests use runs Python the GPU compiler rejects)."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "tests.model.triton_frontend"],
        cwd=Path(__file__).parents[2], env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("lowered ") == 3 * 2 * len(CANDIDATE_CONFIGS)


def test_each_side_sends_gradient_to_its_own_inputs_only() -> None:
    q, k, v = (torch.randn(1, 2, 20, 16, requires_grad=True) for _ in range(3))
    sigma = torch.rand(1, 2, 20).add(0.1).requires_grad_()
    _, series_side, prior_side = anomaly_attention(q, k, v, sigma)
    series_grads = torch.autograd.grad(series_side.sum(), (q, k, v, sigma), retain_graph=True)
    prior_grads = torch.autograd.grad(prior_side.sum(), (q, k, v, sigma))
    assert [bool(g.abs().sum() > 0) for g in series_grads] == [True, True, False, False]
    assert [bool(g.abs().sum() > 0) for g in prior_grads] == [False, False, False, True]


def test_without_gradients_the_forward_gives_the_same_values() -> None:
    """Under ``no_grad`` the forward keeps nothing for backward; its outputs are unchanged."""
    q, k, v = (torch.randn(2, 2, 37, 24, requires_grad=True) for _ in range(3))
    sigma = torch.rand(2, 2, 37).add(0.1).requires_grad_()
    with_grad = anomaly_attention(q, k, v, sigma)
    with torch.no_grad():
        without = anomaly_attention(q, k, v, sigma)
    for kept, not_kept in zip(with_grad, without, strict=True):
        torch.testing.assert_close(not_kept, kept.detach(), rtol=0, atol=0)


def test_a_sharp_prior_stays_finite() -> None:
    """sigma at its floor (about 1.1e-5): the prior is one-hot, its gradient zero, no NaN."""
    q, k, v = (torch.randn(1, 1, 16, 16, requires_grad=True) for _ in range(3))
    sigma = torch.full((1, 1, 16), 1.0986e-5, requires_grad=True)
    heads, series_side, prior_side = anomaly_attention(q, k, v, sigma)
    (heads.sum() + series_side.sum() + prior_side.sum()).backward()
    for t in (heads, series_side, q.grad, k.grad, v.grad, sigma.grad):
        assert torch.isfinite(t).all()


def _step(cfg: ModelConfig, train_cfg: TrainConfig, backend: str = "inductor") -> TrainStep:
    torch.manual_seed(0)
    model = AnomalyTransformer(cfg)
    return TrainStep(model, make_optimizer(model, train_cfg), cfg, train_cfg, backend=backend)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled aot_eager"])
def test_the_fused_training_step_matches_the_plain_one(
    tiny_cfg: ModelConfig, windows: torch.Tensor, compiled: bool
) -> None:
    """Same batch statistics and gradients; compiled: the custom ops traced by torch.compile."""
    plain = _step(tiny_cfg, FAST)
    fused_cfg = replace(FAST, attention="fused", compile=compiled)
    fused = _step(tiny_cfg, fused_cfg, backend="aot_eager")
    stats = [step.backward(windows) for step in (plain, fused)]
    torch.testing.assert_close(stats[1], stats[0], rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(plain.model.named_parameters(), fused.model.parameters(), strict=True):
        scale = float(a.grad.abs().max()) or 1.0
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_fused_attention_needs_a_gpu_outside_the_interpreter(
    tiny_cfg: ModelConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="attention='fused' on device cpu"):
        _step(tiny_cfg, replace(FAST, attention="fused"))


def test_fused_attention_rejects_what_the_kernels_do_not_handle(tiny_cfg: ModelConfig) -> None:
    with pytest.raises(ValueError, match="attention"):
        TrainConfig(attention="flash")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="win_size=129"):
        _step(replace(tiny_cfg, win_size=129), replace(FAST, attention="fused"))
    with pytest.raises(ValueError, match="dropout=0.1"):
        _step(replace(tiny_cfg, dropout=0.1), replace(FAST, attention="fused"))
    with pytest.raises(ValueError, match="head dimension 512"):
        _step(replace(tiny_cfg, d_model=512, n_heads=1), replace(FAST, attention="fused"))
    q = torch.randn(1, 1, 16, 16)
    with pytest.raises(ValueError, match="sigma"):
        anomaly_attention(q, q, q, torch.ones(1, 1, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="blocks in"):
        anomaly_attention(q, q, q, torch.ones(1, 1, 16), config=SMALL_BLOCKS._replace(kv_keys=24))


def test_auto_attention_is_fused_only_on_a_bf16_gpu_the_kernels_can_serve(
    tiny_cfg: ModelConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``auto`` stays plain on a CPU (even where the interpreter could run the kernels), and on a
    GPU for windows, head dimensions or dropout the kernels do not handle or where compiled plain
    attention trains faster (short windows, narrow heads, float32)."""
    auto = replace(FAST, attention="auto", precision="bf16")
    cpu = torch.device("cpu")
    paying = replace(tiny_cfg, win_size=64, d_model=64, n_heads=2)  # head dimension 32
    assert resolve_attention(auto, paying, cpu).attention == "plain"
    assert _step(tiny_cfg, auto).train_cfg.attention == "plain"
    monkeypatch.setattr("model.steps.accelerated", lambda device: True)  # a bf16 GPU
    assert resolve_attention(auto, paying, cpu).attention == "fused"
    for unserved in (
        replace(paying, win_size=129),
        replace(paying, dropout=0.1),
        replace(paying, d_model=512, n_heads=1),
        replace(paying, win_size=63),
        replace(paying, n_heads=4),  # head dimension 16
    ):
        assert resolve_attention(auto, unserved, cpu).attention == "plain"
    assert resolve_attention(replace(auto, precision="fp32"), paying, cpu).attention == "plain"
    assert resolve_attention(FAST, paying, cpu).attention == "plain"
    assert resolve_attention(replace(FAST, attention="fused"), tiny_cfg, cpu).attention == "fused"


def test_the_data_parallel_step_resolves_auto_to_the_fused_kernels(
    tiny_cfg: ModelConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where ``auto`` picks the kernels (patched: a bf16 GPU, and a float32 step the kernels
    pay for, float32 being what the interpreter computes right), the DDP step trains through
    them, as ``TrainStep`` does."""
    monkeypatch.setattr("model.steps.accelerated", lambda device: True)
    monkeypatch.setattr("model.steps.fused_attention_pays", lambda model_cfg, precision: True)
    cfg = replace(tiny_cfg, win_size=64, d_model=64, n_heads=2, e_layers=1)
    generator = torch.Generator().manual_seed(0)
    windows = torch.randn(2, cfg.win_size, cfg.n_channels, generator=generator)
    plain = _step(cfg, FAST)
    store = f"file://{tmp_path / 'store'}"
    dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = AnomalyTransformer(cfg)
        auto = replace(FAST, attention="auto")
        ddp = DistributedTrainStep(model, make_optimizer(model, auto), cfg, auto)
        assert ddp.train_cfg.attention == "fused"
        stats = [step.backward(windows) for step in (plain, ddp)]
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(stats[1], stats[0], rtol=1e-5, atol=1e-6)
