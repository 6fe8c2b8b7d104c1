"""The compiled Triton kernels on a real CUDA GPU against the reference path (skipped without one; CI has none, so
these run where a GPU is lent: ``python -m pytest tests/test_triton_cuda.py``). The interpreter tests in
``test_triton_kernels.py`` check the same kernels' logic on CPU; these check the compiled code: outputs and both
gradients, odd shapes, empty rows and columns, 3-D inputs, fp32/fp16/bf16, and the SLTrain layer end to end."""

from __future__ import annotations

import pytest
import torch

from sparse_lowrank_peft.delta.ops import sparse_delta
from sparse_lowrank_peft.delta.support import SparseSupport

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Relative error bounds (max |a - b| / max |b|) against the fp32 reference on the same inputs. fp32: the kernels
# accumulate in fp32 like the reference, only the summation order differs. fp16/bf16: the inputs and the result are
# rounded to 11 / 8 significant bits (unit roundoff 4.9e-4 / 3.9e-3), so the bound is a few units of that.
RTOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}

SHAPES = [  # (tokens, in, out, density)
    (1, 1, 1, 1.0),
    (37, 129, 65, 0.1),
    (1000, 333, 777, 0.01),
    (4099, 1024, 1023, 0.001),
    (2048, 768, 3072, 0.05),
]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.float().abs().max().clamp_min(1e-12)
    return float((a.float() - b.float()).abs().max() / scale)


def _run(backend, x, support, values, g):
    x = x.detach().clone().requires_grad_(True)
    v = values.detach().clone().requires_grad_(True)
    y = sparse_delta(x, support, v, backend=backend)
    y.backward(g)
    return y.detach(), x.grad, v.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tokens,fin,fout,density", SHAPES)
def test_compiled_kernels_match_the_reference(tokens, fin, fout, density, dtype):
    gen = torch.Generator().manual_seed(tokens + fin)
    support = SparseSupport.random((fout, fin), density, seed=fin * 7 + fout)
    x = torch.randn(tokens, fin, generator=gen).to("cuda", dtype)
    values = torch.randn(support.nnz, generator=gen).to("cuda", dtype)
    g = torch.randn(tokens, fout, generator=gen).to("cuda", dtype)
    got = _run("triton", x, support, values, g)
    want = _run("reference", x.float(), support, values.float(), g.float())
    for name, a, b in zip(("y", "dx", "dv"), got, want):
        assert a.dtype == dtype and a.device.type == "cuda"
        assert _rel(a, b) <= RTOL[dtype], (name, _rel(a, b))


def test_3d_input_and_empty_rows_and_columns():
    support = SparseSupport(torch.tensor([[0, 0, 5], [1, 7, 7]], dtype=torch.int32), (9, 11))  # rows 1-4, 6-8 empty
    x = torch.randn(3, 50, 11, device="cuda")
    values = torch.randn(3, device="cuda")
    g = torch.randn(3, 50, 9, device="cuda")
    got = _run("triton", x, support, values, g)
    want = _run("reference", x, support, values, g)
    for a, b in zip(got, want):
        assert a.shape == b.shape and _rel(a, b) <= 1e-5


def test_sltrain_layer_on_cuda_uses_triton_and_matches_the_reference(monkeypatch):
    from peft import get_peft_model

    from sparse_lowrank_peft import SLTrainConfig

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(300, 500), torch.nn.ReLU(), torch.nn.Linear(500, 70))
    config = SLTrainConfig(r=4, sparsity=0.02, target_modules=["0", "2"], init_weights=False)
    model = get_peft_model(base, config).cuda()
    x = torch.randn(4, 33, 300, device="cuda")
    grads = {}
    for backend in ("triton", "reference"):
        monkeypatch.setenv("SLPEFT_SPARSE_BACKEND", backend)
        model.zero_grad()
        out = model(x)
        out.square().mean().backward()
        grads[backend] = (out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    (o1, g1), (o2, g2) = grads["triton"], grads["reference"]
    assert _rel(o1, o2) <= 1e-5
    assert g1.keys() == g2.keys() and any("sltrain_values" in n for n in g1)
    for n in g1:
        assert _rel(g1[n], g2[n]) <= 1e-4, n
