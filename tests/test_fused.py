"""The fused-weight path of the sparse term (delta/fused.py) and the dispatcher that picks it (delta/ops.py).

Outputs and every gradient (input, values, bias, low-rank factors) against a float64 dense oracle, on odd shapes,
for nn.Linear, Conv1D and 4-bit bases, one or two adapters, both SDDMM variants; the dispatcher's choice and its
overrides; and that nothing of the weight's size is kept between forward and backward.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model

from sparse_lowrank_peft import SLTrainConfig, SparseRandLoraConfig
from sparse_lowrank_peft.delta import ops
from sparse_lowrank_peft.delta.fused import FrozenFactor, fused_sparse_linear, weight_source
from sparse_lowrank_peft.delta.support import SparseSupport

SHAPES = [(37, 23), (5, 64), (64, 7), (1, 1)]  # (out, in)
# CUDA runs the sampled SDDMM through the Triton kernel (the device check, bench/gpu_check.sh, runs this file there)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _case(shape, density, tokens, seed=0, n_adapters=1):
    gen = torch.Generator().manual_seed(seed)
    out_f, in_f = shape
    W = torch.randn(out_f, in_f, generator=gen, dtype=torch.float64)
    b = torch.randn(out_f, generator=gen, dtype=torch.float64)
    supports = [SparseSupport.random(shape, density, seed=seed + i) for i in range(n_adapters)]
    values = [torch.randn(s.nnz, generator=gen, dtype=torch.float64) for s in supports]
    x = torch.randn(3, tokens, in_f, generator=gen, dtype=torch.float64)
    g = torch.randn(3, tokens, out_f, generator=gen, dtype=torch.float64)
    return W, b, supports, values, x, g


def _oracle(W, b, supports, values, x, g):
    W = W.clone().requires_grad_(False)
    b = b.clone().requires_grad_(True)
    x = x.clone().requires_grad_(True)
    vals = [v.clone().requires_grad_(True) for v in values]
    dense = W.clone()
    for s, v in zip(supports, vals):
        dense = dense.index_put((s.rows(), s.cols()), v, accumulate=True)
    y = F.linear(x, dense, b)
    y.backward(g)
    return y.detach(), x.grad, b.grad, [v.grad for v in vals]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("sddmm", ["sampled", "dense"])
@pytest.mark.parametrize("n_adapters", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("device", DEVICES)
def test_fused_matches_the_dense_oracle(shape, sddmm, n_adapters, dtype, device):
    W, b, supports, values, x, g = _case(shape, 0.3, tokens=5, n_adapters=n_adapters)
    y_ref, dx_ref, db_ref, dv_ref = _oracle(W, b, supports, values, x, g)
    Wt = W.to(device, dtype)
    xt = x.to(device, dtype).requires_grad_(True)
    bt = b.to(device, dtype).requires_grad_(True)
    vt = [v.to(device, torch.float32).requires_grad_(True) for v in values]  # adapter values stay fp32
    dev_supports = [SparseSupport(s.indices.to(device), s.shape) for s in supports]
    y = fused_sparse_linear(xt, lambda: Wt.clone(), bt, dev_supports, vt, [sddmm] * n_adapters)
    y.backward(g.to(device, dtype))
    # CUDA float32 GEMMs may run in TF32 (~3e-4 relative)
    loose = dtype == torch.float32
    tol = {"atol": 2e-3, "rtol": 2e-3} if loose and device == "cuda" else {"atol": 1e-4, "rtol": 1e-4} if loose \
        else {"atol": 1e-6, "rtol": 1e-6}
    torch.testing.assert_close(y.double().cpu(), y_ref, **tol)
    torch.testing.assert_close(xt.grad.double().cpu(), dx_ref, **tol)
    torch.testing.assert_close(bt.grad.double().cpu(), db_ref, **tol)
    for got, want in zip(vt, dv_ref):
        assert got.grad.dtype == torch.float32
        torch.testing.assert_close(got.grad.double().cpu(), want, atol=2e-3 if device == "cuda" else 1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ factored terms
def _factored_case(shape, transposed, k=6, seed=0):
    """A plain term S0 (out × in) and a factored one ``scale · L·S`` (``ΔW`` or ``ΔWᵀ`` = ``L·S``)."""
    gen = torch.Generator().manual_seed(seed)
    out_f, in_f = shape
    p, c = (in_f, out_f) if transposed else (out_f, in_f)
    L = SparseSupport.random((p, k), 0.4, seed=seed + 7)
    S = SparseSupport.random((k, c), 0.5, seed=seed + 8)
    S0 = SparseSupport.random(shape, 0.3, seed=seed + 9)
    L_values = torch.randn(L.nnz, generator=gen, dtype=torch.float64)
    values = [torch.randn(S0.nnz, generator=gen, dtype=torch.float64), torch.randn(S.nnz, generator=gen,
                                                                                   dtype=torch.float64)]
    factor = FrozenFactor(L, L_values, scale=0.7, transposed=transposed)
    return [S0, S], values, factor


def _factored_oracle(W, b, supports, values, factor, x, g):
    S0, S = supports
    b = b.clone().requires_grad_(True)
    x = x.clone().requires_grad_(True)
    vals = [v.clone().requires_grad_(True) for v in values]
    dense_s0 = torch.zeros(S0.shape, dtype=W.dtype).index_put((S0.rows(), S0.cols()), vals[0])
    dense_s = torch.zeros(S.shape, dtype=W.dtype).index_put((S.rows(), S.cols()), vals[1])
    LS = factor.support.to_dense(factor.values) @ dense_s * factor.scale
    y = F.linear(x, W + dense_s0 + (LS.t() if factor.transposed else LS), b)
    y.backward(g)
    return y.detach(), x.grad, b.grad, [v.grad for v in vals]


@pytest.mark.parametrize("shape", [(37, 23), (23, 37), (5, 64), (64, 7)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("transposed", [False, True], ids=["BT", "TtBt"])
@pytest.mark.parametrize("sddmm", ["sampled", "dense"])
def test_factored_term_matches_the_dense_oracle(shape, transposed, sddmm):
    """``W0 + S0 + scale · L·S`` (sparse RandLoRA's ``B·T`` beside a plain sparse term): outputs and the input, bias
    and both values' gradients against float64 autograd on the dense matrices."""
    W, b, _, _, x, g = _case(shape, 0.3, tokens=5)
    supports, values, factor = _factored_case(shape, transposed)
    y_ref, dx_ref, db_ref, dv_ref = _factored_oracle(W, b, supports, values, factor, x, g)
    xt, bt = x.clone().requires_grad_(True), b.clone().requires_grad_(True)
    vt = [v.clone().requires_grad_(True) for v in values]
    y = fused_sparse_linear(xt, lambda: W.clone(), bt, supports, vt, [sddmm, sddmm], [None, factor])
    y.backward(g)
    tol = {"atol": 1e-9, "rtol": 1e-9}
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(xt.grad, dx_ref, **tol)
    torch.testing.assert_close(bt.grad, db_ref, **tol)
    for got, want in zip(vt, dv_ref):
        torch.testing.assert_close(got.grad, want, **tol)


def test_factored_gradcheck_float64():
    W, b, _, _, x, _ = _case((9, 11), 0.3, tokens=3)
    supports, values, factor = _factored_case((9, 11), transposed=True, k=4)

    def fn(x, v1):
        return fused_sparse_linear(x, lambda: W.clone(), b, supports[1:], [v1], ["sampled"], [factor])

    assert torch.autograd.gradcheck(fn, (x[:1].requires_grad_(True), values[1].requires_grad_(True)))


@pytest.mark.parametrize("shape", [(37, 23), (23, 37)], ids=["out>in", "out<in"])
def test_sparse_randlora_layer_fused_equals_spmm_path(shape, monkeypatch):
    """Sparse RandLoRA's ``B·T`` folded into the base GEMM gives the two-SpMM path's outputs and gradients (both
    orientations of ``T``), and the layer keeps SpMM where the fused path would change the math (dropout)."""
    out_f, in_f = shape
    x0 = torch.randn(2, 9, in_f, generator=torch.Generator().manual_seed(1))
    g = torch.randn(2, 9, out_f, generator=torch.Generator().manual_seed(2))
    results = {}
    for path in ("spmm", "fused"):
        monkeypatch.setenv(ops.PATH_ENV, path)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(in_f, out_f))
        config = SparseRandLoraConfig(r=4, basis_density=0.3, target_modules=["0"], init_weights=False)
        pm = get_peft_model(model, config)
        layer = pm.base_model.model[0]
        assert list(layer._fused_adapters(x0)) == (["default"] if path == "fused" else [])
        x = x0.clone().requires_grad_(True)
        pm(x).backward(g)
        grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}
        results[path] = (pm(x0).detach(), x.grad, grads)
    (y1, dx1, g1), (y2, dx2, g2) = results["spmm"], results["fused"]
    assert g1.keys() == g2.keys() and any("sparse_randlora_gamma" in n for n in g1)
    # fp32 sums in another order: compared relative to each tensor's scale (the gradients reach ~5e4 here)
    for name, got, want in [("output", y2, y1), ("input grad", dx2, dx1)] + [(n, g2[n], g1[n]) for n in g1]:
        torch.testing.assert_close(got, want, atol=2e-6 * want.abs().max().item(), rtol=1e-5, msg=name)
    config = SparseRandLoraConfig(r=4, basis_density=0.3, target_modules=["0"], randlora_dropout=0.1)
    layer = get_peft_model(torch.nn.Sequential(torch.nn.Linear(in_f, out_f)), config).base_model.model[0]
    assert not layer.train()._fused_adapters(x0)  # dropout: the delta sees another input than the base
    assert list(layer.eval()._fused_adapters(x0)) == ["default"]


def test_gradcheck_float64():
    W, b, supports, values, x, _ = _case((11, 9), 0.4, tokens=4, n_adapters=2)
    x = x[:1].requires_grad_(True)
    vals = [v.requires_grad_(True) for v in values]

    def fn(x, b, v0, v1):
        return fused_sparse_linear(x, lambda: W.clone(), b, supports, [v0, v1], ["sampled", "dense"])

    assert torch.autograd.gradcheck(fn, (x, b.requires_grad_(True), *vals))


def test_nothing_of_the_weights_size_is_saved_for_backward():
    """The transient W0 + S is rebuilt in backward: every tensor autograd saves is smaller than out × in."""
    out_f, in_f, tokens = 96, 80, 4  # tokens · in < out · in, so a saved x is told apart from a saved weight
    W, b, supports, values, x, g = _case((out_f, in_f), 0.05, tokens=tokens)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    vals = [v.float().requires_grad_(True) for v in values]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fused_sparse_linear(x[:1].float().requires_grad_(True), lambda: W.float().clone(), b.float(), supports,
                                vals, ["sampled"])
    assert saved and max(saved) < out_f * in_f, saved
    y.backward(g[:1].float())


# ------------------------------------------------------------------------------------------------ the layer, end to end
class Net(torch.nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        torch.manual_seed(0)
        if kind == "conv1d":
            from transformers.pytorch_utils import Conv1D

            self.lin = Conv1D(37, 23)  # weight (in, out) = (23, 37)
            torch.nn.init.normal_(self.lin.weight, std=0.2)
            torch.nn.init.normal_(self.lin.bias, std=0.2)
        else:
            self.lin = torch.nn.Linear(23, 37)
        if kind == "nf4":
            bnb = pytest.importorskip("bitsandbytes")
            if tuple(int(v) for v in bnb.__version__.split(".")[:2]) < (0, 50):
                pytest.skip(f"bitsandbytes {bnb.__version__} cannot quantize an odd number of values (37 x 23)")
            from sparse_lowrank_peft.delta.quant import to_linear4bit

            self.lin = to_linear4bit(self.lin)

    def forward(self, x):
        return self.lin(x)


@pytest.mark.parametrize("kind", ["linear", "conv1d", "nf4"])
def test_layer_fused_equals_spmm_path(kind, monkeypatch):
    """The SLTrain layer computes the same outputs and gradients on both paths (nn.Linear, Conv1D, 4-bit base)."""
    results = {}
    x0 = torch.randn(2, 9, 23, generator=torch.Generator().manual_seed(1))
    g = torch.randn(2, 9, 37, generator=torch.Generator().manual_seed(2))
    for path in ("spmm", "fused"):
        monkeypatch.setenv(ops.PATH_ENV, path)
        pm = get_peft_model(Net(kind), SLTrainConfig(r=2, sparsity=0.2, target_modules=["lin"], init_weights=False))
        layer = pm.base_model.model.lin
        assert list(layer._fused_adapters(x0)) == (["default"] if path == "fused" else [])
        x = x0.clone().requires_grad_(True)
        y = pm(x)
        y.backward(g)
        grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}
        results[path] = (y.detach(), x.grad, grads)
    (y1, dx1, g1), (y2, dx2, g2) = results["spmm"], results["fused"]
    torch.testing.assert_close(y2, y1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx2, dx1, atol=1e-5, rtol=1e-5)
    assert g1.keys() == g2.keys() and any("sltrain_values" in n for n in g1)
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], atol=1e-5, rtol=1e-5, msg=name)


SPARSE_TUNERS = [
    pytest.param(SLTrainConfig, {"r": 2, "sparsity": 0.2}, id="sltrain"),
    pytest.param(SparseRandLoraConfig, {"r": 4, "basis_density": 0.3}, id="sparse_randlora"),
]


@pytest.mark.parametrize("cfg_cls,kwargs", SPARSE_TUNERS)
def test_the_path_never_changes_the_output_dtype_or_a_gradient(cfg_cls, kwargs, monkeypatch):
    """Whichever path the dispatcher takes (it switches by token count), the layer returns what the base layer would:
    under bf16 autocast a bf16 output on both paths (the fused one returned fp32), the same error for an input of
    another dtype than a bf16 base (the fused one computed it), and a trainable base weight gets its gradient (the
    fused one, reading W0 detached, dropped it)."""
    x = torch.randn(2, 9, 23, generator=torch.Generator().manual_seed(1))
    outputs = {}
    for path in ("spmm", "fused"):
        monkeypatch.setenv(ops.PATH_ENV, path)
        torch.manual_seed(0)
        pm = get_peft_model(Net("linear"), cfg_cls(**kwargs, target_modules=["lin"], init_weights=False))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = pm(x)
        assert y.dtype == torch.bfloat16
        weight = pm.base_model.model.lin.base_layer.weight.requires_grad_(True)
        (pm(x) ** 2).sum().backward()
        outputs[path] = (y.float(), weight.grad.clone())
        with pytest.raises(RuntimeError, match="same dtype"):
            get_peft_model(Net("linear").to(torch.bfloat16), cfg_cls(**kwargs, target_modules=["lin"]))(x)
    (y1, dw1), (y2, dw2) = outputs["spmm"], outputs["fused"]
    torch.testing.assert_close(y2, y1, atol=0.03 * y1.abs().max().item(), rtol=0)  # bf16 rounding, other order
    torch.testing.assert_close(dw2, dw1, atol=1e-5, rtol=1e-5)


def test_weight_source_refuses_what_it_cannot_read():
    lin = torch.nn.Linear(4, 3)
    fresh = weight_source(lin, torch.float64)
    w = fresh()
    assert w.dtype == torch.float64 and w.data_ptr() != lin.weight.data_ptr()
    torch.testing.assert_close(w, lin.weight.double())
    lin._hf_hook = object()  # offloaded by accelerate: its weight may not be where it reads
    assert weight_source(lin, torch.float32) is None


# ------------------------------------------------------------------------------------------------ the dispatcher
def test_dispatcher_follows_the_measured_crossover(monkeypatch):
    monkeypatch.delenv(ops.PATH_ENV, raising=False)
    support = SparseSupport.random((100, 100), 0.01, seed=0)  # 100 nonzeros
    crossover = ops.FUSED_MIN_TOKENS_X_DENSITY["cpu"]
    cpu = torch.device("cpu")
    assert ops.resolve_sparse_path(int(crossover / 0.01), support, cpu) == "fused"
    assert ops.resolve_sparse_path(int(crossover / 0.01) - 1, support, cpu) == "spmm"  # decoding keeps SpMM
    assert ops.resolve_sparse_path(1, support, torch.device("cuda")) == "spmm"
    assert ops.resolve_sparse_path(4096, support, torch.device("cuda")) == "fused"
    monkeypatch.setenv(ops.PATH_ENV, "spmm")
    assert ops.resolve_sparse_path(10**6, support, cpu) == "spmm"
    monkeypatch.setenv(ops.PATH_ENV, "densify")
    with pytest.raises(ValueError, match="SLPEFT_SPARSE_PATH='densify' is not one of auto, fused, spmm"):
        ops.resolve_sparse_path(1, support, cpu)


def test_dispatch_constants_are_the_committed_measurements():
    """Every CPU constant of the dispatcher is what ``bench/dispatch.py`` derived in the committed results file, so a
    rerun of the bench that moves a crossover fails here until the constant follows it."""
    import json
    from pathlib import Path

    from sparse_lowrank_peft.delta import reference

    measured = json.loads((Path(__file__).parents[1] / "bench/results/dispatch-cpu.json").read_text())
    assert ops.FUSED_MIN_TOKENS_X_DENSITY["cpu"] == measured["fused_min_tokens_x_density"]
    assert ops.DENSE_SDDMM_MIN_DENSITY["cpu"] == measured["dense_sddmm_min_density"]
    assert ops.FACTORED_FUSED_MIN_TOKENS_PER_COLUMN["cpu"] == measured["factored"]["min_tokens_per_column"]
    assert reference.FEW_TOKENS == measured["few"]["few_tokens"]


def test_factored_dispatch_follows_the_measured_crossover(monkeypatch):
    """A factored term's crossover is a token count per column of ``S`` (CPU measured, CUDA unmeasured: SpMM)."""
    monkeypatch.delenv(ops.PATH_ENV, raising=False)
    monkeypatch.delenv(ops.SDDMM_ENV, raising=False)
    supports, values, factor = _factored_case((64, 40), transposed=False)
    S = supports[1]  # (6, 40): 40 columns
    cpu = torch.device("cpu")
    per_column = ops.FACTORED_FUSED_MIN_TOKENS_PER_COLUMN["cpu"]
    assert ops.resolve_sparse_path(int(per_column * 40), S, cpu, factor) == "fused"
    assert ops.resolve_sparse_path(int(per_column * 40) - 1, S, cpu, factor) == "spmm"
    assert ops.resolve_sparse_path(10**6, S, torch.device("cuda"), factor) == "spmm"
    assert ops.resolve_sddmm(S, cpu, factor) == "sampled"
    monkeypatch.setenv(ops.SDDMM_ENV, "dense")
    assert ops.resolve_sddmm(S, cpu, factor) == "dense"


def test_sddmm_choice_follows_the_measured_density(monkeypatch):
    monkeypatch.delenv(ops.SDDMM_ENV, raising=False)
    cpu = torch.device("cpu")
    assert ops.resolve_sddmm(SparseSupport.random((50, 50), 0.01, seed=0), cpu) == "sampled"
    assert ops.resolve_sddmm(SparseSupport.random((50, 50), 0.5, seed=0), cpu) == "dense"
    monkeypatch.setenv(ops.SDDMM_ENV, "dense")
    assert ops.resolve_sddmm(SparseSupport.random((50, 50), 0.01, seed=0), cpu) == "dense"
