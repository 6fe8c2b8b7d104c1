"""The Triton kernels of delta/triton.py against the reference, on CPU in Triton's interpreter (TRITON_INTERPRET=1).

Triton fixes interpreter-or-compiled when it is first imported, and ``peft`` imports it, so in a normal pytest session
(triton already imported, compiled mode) the kernel tests here are skipped and ``test_interpreter_suite`` re-runs this
file in a subprocess with ``TRITON_INTERPRET=1`` set from the start. Running the file directly with the variable set
(``TRITON_INTERPRET=1 pytest tests/test_triton_kernels.py``) runs them in-process. The interpreter runs every program
in numpy, so shapes are small; they are odd on purpose (not multiples of any block size) and the block sizes are
shrunk in some tests so that one call spans many row and token blocks. ``test_kernels_compile_for_a_gpu`` compiles
every kernel to a cubin for an sm_90 GPU (the H100) ahead of time, with no GPU, in the compiled-mode process: it
catches what the interpreter does not (types, loop-carried values, layouts).

Tolerances (relative to the largest |reference| of the compared tensor; both paths read the same inputs, accumulate
in fp32 and round once to the output dtype, so they differ only by the fp32 summation order and that one rounding):

==========  ============  ===============================================================================
dtype       tolerance     why
==========  ============  ===============================================================================
float64     1e-12         fp64 accumulation on both sides (only the summation order differs)
float32     1e-5          fp32 sums of up to ~100 terms in a different order: ~1e-6 relative, with margin
float16     2 * 2**-11    the fp32 results may straddle a rounding boundary of the fp16 output: 1 ulp
                          (2**-11 relative) plus one more for the layer tests, where the sparse term's
                          ulp-level difference goes through one more fp16 addition to the base output
bfloat16    2 * 2**-8     the same with bf16's 8-bit mantissa (1 ulp = 2**-8 relative)
==========  ============  ===============================================================================
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

triton = pytest.importorskip("triton")

from sparse_lowrank_peft.delta import ops  # noqa: E402
from sparse_lowrank_peft.delta import reference as ref  # noqa: E402
from sparse_lowrank_peft.delta import triton as tk  # noqa: E402
from sparse_lowrank_peft.delta.ops import BACKEND_ENV, resolve_backend, sparse_delta  # noqa: E402
from sparse_lowrank_peft.delta.support import SparseSupport  # noqa: E402

TOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 2 * 2**-11,  # 1 ulp of the fp16 rounding of an fp32 result, +1 for one more fp16 addition
    torch.bfloat16: 2 * 2**-8,  # 1 ulp of the bf16 rounding of an fp32 result, +1 for one more bf16 addition
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


tk._require_triton()
INTERPRETED = tk._stdlib_interpreted()  # this process imported triton with TRITON_INTERPRET=1
interpreted = pytest.mark.skipif(not INTERPRETED, reason="runs in the interpreter subprocess (test_interpreter_suite)")
compiled = pytest.mark.skipif(INTERPRETED, reason="needs triton in compiled mode (runs in the outer session)")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    if INTERPRETED:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@compiled
def test_interpreter_suite():
    """Run this file's kernel tests in a fresh process whose triton is imported in interpreter mode."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop(BACKEND_ENV, None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning", __file__],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and "failed" not in proc.stdout, tail


def close(got, want, dtype, name=""):
    assert got.dtype == want.dtype, name
    tol = TOL[dtype]
    scale = max(want.detach().abs().max().item(), 1e-30) if want.numel() else 1.0
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol * scale, msg=lambda m: f"{name}: {m}")


def make(shape, density, tokens, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    support = SparseSupport.random(shape, density, seed=seed)
    values = torch.randn(support.nnz, generator=gen).to(dtype)
    x = torch.randn(tokens, shape[1], generator=gen).to(dtype)
    g = torch.randn(tokens, shape[0], generator=gen).to(dtype)
    return support, values, x, g


def check_ops(support, values, x, g, dtype, **kw):
    spmm_kw = {k: v for k, v in kw.items() if k in ("coalesce", "block_r", "block_t")}
    sddmm_kw = {k: v for k, v in kw.items() if k in ("coalesce", "split", "block_n")}
    close(tk.spmm(x, support, values, **spmm_kw), ref.spmm(x, support, values), dtype, "spmm")
    close(tk.spmm_t(g, support, values, **spmm_kw), ref.spmm_t(g, support, values), dtype, "spmm_t")
    close(tk.sddmm(g, x, support, **sddmm_kw), ref.sddmm(g, x, support), dtype, "sddmm")


# ------------------------------------------------------------------------------------------------- kernels vs reference
@interpreted
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize(
    "shape,density,tokens",
    [
        ((37, 53), 0.1, 29),  # everything odd, one token block
        ((45, 38), 0.05, 67),  # tokens span two 64-token blocks, the last ragged
        ((300, 201), 1e-4, 9),  # 6 nonzeros: almost every row and column empty
    ],
)
def test_kernels_match_reference(shape, density, tokens, dtype):
    support, values, x, g = make(shape, density, tokens, dtype)
    check_ops(support, values, x, g, dtype)


@interpreted
def test_small_blocks_many_programs_and_split_tokens():
    # block sizes that do not divide anything, row-major (uncoalesced) operands, and the sddmm token split
    support, values, x, g = make((19, 13), 0.15, 21, seed=3)
    check_ops(support, values, x, g, torch.float32, block_r=4, block_t=8, block_n=8, split=3)
    check_ops(support, values, x, g, torch.float32, coalesce=False, split=2)


@interpreted
def test_empty_rows_columns_and_no_nonzeros():
    indices = torch.tensor([[0, 0, 5, 5, 20], [1, 9, 2, 9, 10]], dtype=torch.int32)
    support = SparseSupport(indices, (21, 11))
    values = torch.tensor([1.0, -2.0, 3.0, 0.5, 4.0])
    x, g = torch.randn(7, 11), torch.randn(7, 21)
    check_ops(support, values, x, g, torch.float32, block_r=4, block_t=4)
    assert tk.spmm(x, support, values)[:, 6:20].abs().max() == 0
    empty = SparseSupport(torch.zeros(2, 0, dtype=torch.int32), (4, 3))
    assert torch.equal(tk.spmm(torch.randn(5, 3), empty, torch.zeros(0)), torch.zeros(5, 4))
    assert torch.equal(tk.spmm_t(torch.randn(5, 4), empty, torch.zeros(0)), torch.zeros(5, 3))
    assert tk.sddmm(torch.randn(5, 4), torch.randn(5, 3), empty).shape == (0,)
    assert tk.spmm(torch.zeros(0, 11), support, values).shape == (0, 21)
    assert torch.equal(tk.sddmm(torch.zeros(0, 21), torch.zeros(0, 11), support), torch.zeros(5))


@interpreted
def test_density_range_1e4_to_0_1():
    for density in (1e-4, 1e-3, 1e-2, 1e-1):
        support, values, x, g = make((131, 77), density, 3, seed=int(1 / density))
        check_ops(support, values, x, g, torch.float32)


@interpreted
def test_mixed_dtypes_follow_the_reference():
    # fp32 values with bf16 activations (a bf16 model whose adapter stays fp32): output in the activation dtype;
    # and an fp32 values gradient from bf16 activations
    support, values, x, g = make((19, 26), 0.2, 10)
    xb, gb = x.bfloat16(), g.bfloat16()
    close(tk.spmm(xb, support, values), ref.spmm(xb, support, values), torch.bfloat16)
    close(tk.spmm_t(gb, support, values), ref.spmm_t(gb, support, values), torch.bfloat16)
    close(tk.sddmm(gb, xb, support, out_dtype=torch.float32), ref.sddmm(gb, xb, support, out_dtype=torch.float32),
          torch.bfloat16)


@interpreted
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_to_and_into(dtype):
    support, values, x, g = make((29, 22), 0.1, 19, dtype, seed=5)
    base = torch.randn(19, 29).to(dtype)
    want = ref.spmm(x, support, values, add_to=base.clone())
    got = base.clone()
    assert tk.spmm(x, support, values, add_to=got) is got
    close(got, want, dtype, "spmm add_to")
    buf = torch.full((19, 22), float("nan"), dtype=dtype)
    assert tk.spmm_t(g, support, values, into=buf) is buf
    close(buf, ref.spmm_t(g, support, values), dtype, "spmm_t into")
    # an fp32 accumulator for bf16/fp16 activations
    acc32 = base.float()
    close(tk.spmm(x, support, values, add_to=acc32.clone()), ref.spmm(x, support, values, add_to=acc32.clone()),
          torch.float32 if dtype == torch.float32 else dtype, "spmm add_to fp32")


@interpreted
def test_launcher_checks():
    support, values, x, g = make((9, 8), 0.3, 4)
    with pytest.raises(ValueError, match="in_features=8"):
        tk.spmm(torch.randn(4, 7), support, values)
    with pytest.raises(ValueError, match="2-D"):
        tk.spmm(torch.randn(2, 4, 8), support, values)
    with pytest.raises(ValueError, match="entries"):
        tk.spmm(x, support, values[:-1])
    with pytest.raises(TypeError, match="dtype"):
        tk.spmm(x.long(), support, values)
    with pytest.raises(ValueError, match="tokens"):
        tk.sddmm(g[:3], x, support)


# ------------------------------------------------------------------------------------------------ through autograd
@interpreted
@pytest.mark.parametrize("add", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_delta_forward_and_gradients_batched(dtype, add, monkeypatch):
    support, values, _, _ = make((23, 19), 0.1, 1, dtype)
    x = torch.randn(3, 11, 19).to(dtype)
    gy = torch.randn(3, 11, 23).to(dtype)
    A = torch.randn(19, 23).to(dtype)
    results = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv(BACKEND_ENV, backend)
        xr = x.clone().requires_grad_(True)
        vr = values.clone().requires_grad_(True)
        Ar = A.clone().requires_grad_(True)
        if add:  # in place into another term, as a layer adds the sparse term into the low-rank one
            y = sparse_delta(xr, support, vr, add_to=(xr @ Ar) * 0.5)
        else:
            y = sparse_delta(xr, support, vr)
        y.backward(gy)
        results[backend] = (y, xr.grad, vr.grad) + ((Ar.grad,) if add else ())
    for name, got, want in zip(("y", "dx", "dv", "dA"), results["triton"], results["reference"]):
        close(got, want, dtype, name)
    assert results["triton"][0].shape == (3, 11, 23)


@interpreted
@pytest.mark.parametrize("add", [False, True])
def test_sparse_delta_without_autograd_on_triton(add, monkeypatch):
    """Under ``torch.no_grad`` ``sparse_delta`` calls the backend's ``spmm`` directly (decoding): the Triton kernels
    give the reference's output, ``add_to`` written in place, for one token and for a batch."""
    support, values, _, _ = make((23, 19), 0.1, 1, torch.float32)
    for tokens in (1, 7):
        x = torch.randn(1, tokens, 19)
        results = {}
        for backend in ("reference", "triton"):
            monkeypatch.setenv(BACKEND_ENV, backend)
            base = torch.randn(1, tokens, 23, generator=torch.Generator().manual_seed(tokens))
            with torch.no_grad():
                y = sparse_delta(x, support, values, add_to=base if add else None)
            assert (y is base) == add
            results[backend] = y
        close(results["triton"], results["reference"], torch.float32, f"{tokens} tokens")


def _sltrain_model(dtype, seed=0):
    from peft import get_peft_model

    from sparse_lowrank_peft import SLTrainConfig

    torch.manual_seed(seed)
    base = nn.Sequential()
    base.add_module("lin", nn.Linear(45, 38))
    cfg = SLTrainConfig(r=4, sparsity=0.05, target_modules=["lin"], init_weights=False, support_seed=seed)
    return get_peft_model(base, cfg).to(dtype)


@interpreted
@pytest.mark.parametrize("dtype", DTYPES)
def test_sltrain_layer_triton_matches_reference(dtype, monkeypatch):
    gen = torch.Generator().manual_seed(1)
    x, gy = torch.randn(2, 13, 45, generator=gen).to(dtype), torch.randn(2, 13, 38, generator=gen).to(dtype)
    _model_matches_reference(lambda: _sltrain_model(dtype), x, gy, "sltrain_values", dtype, monkeypatch)


def _model_matches_reference(make_model, x, gy, trained: str, dtype, monkeypatch) -> None:
    """A model built by ``make_model`` on each backend: output, input gradient and every parameter gradient (among
    them ones whose name contains ``trained``) of Triton's equal the reference backend's."""
    results = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv(BACKEND_ENV, backend)
        model = make_model()
        xr = x.clone().requires_grad_(True)
        y = model(xr)
        y.backward(gy)
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert any(trained in n for n in grads)
        results[backend] = (y, xr.grad, grads)
    (y_t, dx_t, gr_t), (y_r, dx_r, gr_r) = results["triton"], results["reference"]
    close(y_t, y_r, dtype, "output")
    close(dx_t, dx_r, dtype, "input grad")
    assert gr_t.keys() == gr_r.keys()
    for name in gr_r:
        close(gr_t[name], gr_r[name], dtype, name)


def _sparse_randlora_model(dtype):
    from peft import get_peft_model

    from sparse_lowrank_peft import SparseRandLoraConfig

    torch.manual_seed(0)
    base = nn.Sequential()
    base.add_module("wide", nn.Linear(45, 38))  # the two orientations of the shared bases
    base.add_module("tall", nn.Linear(38, 45))
    cfg = SparseRandLoraConfig(r=4, randlora_alpha=8, basis_density=0.25, target_modules=["wide", "tall"],
                               init_weights=False, basis_seed=2)
    return get_peft_model(base, cfg).to(dtype)


@interpreted
def test_custom_ops_run_the_triton_kernels(monkeypatch):
    """The custom ops ``torch.compile`` traces (``delta.custom_ops``) run the backend's kernels: on Triton they equal
    the reference backend, output and every gradient, on both paths."""
    from sparse_lowrank_peft.delta import custom_ops

    gen = torch.Generator().manual_seed(6)
    S = SparseSupport.random((23, 37), 0.15, seed=4)
    W, b0 = torch.randn(23, 37, generator=gen), torch.randn(23, generator=gen)
    x0, v0, gy = torch.randn(2, 7, 37, generator=gen), torch.randn(S.nnz, generator=gen), torch.randn(2, 7, 23, generator=gen)
    results = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv(BACKEND_ENV, backend)
        got = []
        for op in (lambda x, v, b: custom_ops.sparse_delta(x, S.indices, v, S.shape),
                   lambda x, v, b: custom_ops.fused_linear(x, W, b, [S.indices], [v], S.shape, False)):
            x, v, b = (t.clone().requires_grad_(True) for t in (x0, v0, b0))
            y = op(x, v, b)
            y.backward(gy)
            got += [y, x.grad, v.grad]
        results[backend] = got
    for k, (t, r) in enumerate(zip(results["triton"], results["reference"])):
        close(t, r, torch.float32, f"tensor {k}")


@interpreted
def test_sparse_randlora_layers_triton_match_reference(monkeypatch):
    """Sparse RandLoRA's layers (``B·T`` with sparse random bases) on the Triton kernels: output, input gradient and
    every trainable gradient equal the reference backend's (the SpMM path; the fused path's kernels for the same term:
    the next test)."""
    monkeypatch.setenv("SLPEFT_SPARSE_PATH", "spmm")
    gen = torch.Generator().manual_seed(4)
    x, gy = torch.randn(2, 9, 45, generator=gen), torch.randn(2, 9, 45, generator=gen)
    _model_matches_reference(lambda: _sparse_randlora_model(torch.float32), x, gy, "sparse_randlora", torch.float32,
                             monkeypatch)


@interpreted
@pytest.mark.parametrize("sddmm", ["sampled", "dense"])
@pytest.mark.parametrize("transposed", [False, True])
def test_fused_factored_term_triton_matches_reference(transposed, sddmm, monkeypatch):
    """The fused path's factored term (sparse RandLoRA's ``B·T``: its build SpMM, the ``spmm_t`` of the values'
    gradient and the SDDMM) on the Triton kernels equals the reference backend."""
    from sparse_lowrank_peft.delta.fused import FrozenFactor, fused_sparse_linear

    gen = torch.Generator().manual_seed(3)
    out_f, in_f, k = (29, 45, 7)
    p, c = (in_f, out_f) if transposed else (out_f, in_f)
    L, S = SparseSupport.random((p, k), 0.4, seed=1), SparseSupport.random((k, c), 0.5, seed=2)
    factor = FrozenFactor(L, torch.randn(L.nnz, generator=gen), scale=0.5, transposed=transposed)
    W = torch.randn(out_f, in_f, generator=gen)
    x = torch.randn(2, 11, in_f, generator=gen)
    gy = torch.randn(2, 11, out_f, generator=gen)
    v0 = torch.randn(S.nnz, generator=gen)
    results = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv(BACKEND_ENV, backend)
        xr, v = x.clone().requires_grad_(True), v0.clone().requires_grad_(True)
        y = fused_sparse_linear(xr, lambda: W.clone(), None, [S], [v], [sddmm], [factor])
        y.backward(gy)
        results[backend] = (y, xr.grad, v.grad)
    for name, got, want in zip(("output", "input grad", "values grad"), results["triton"], results["reference"]):
        close(got, want, torch.float32, name)


# ---------------------------------------------------------------------------------------------------------- dispatch
@interpreted
def test_auto_uses_reference_on_cpu_and_triton_when_asked(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_backend(cpu) == "reference"  # auto: CPU tensors never go to Triton, even with the interpreter on
    monkeypatch.setenv(BACKEND_ENV, "triton")
    assert resolve_backend(cpu) == "triton"
    assert ops.get_ops(cpu) is tk
    monkeypatch.setenv(BACKEND_ENV, "Reference ")
    assert resolve_backend(cpu) == "reference"


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv(BACKEND_ENV, "triton")
    support, values, x, _ = make((5, 4), 0.5, 3)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        sparse_delta(x, support, values)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        tk.spmm(x, support, values)  # the launcher refuses too, rather than handing CPU pointers to a GPU kernel
    monkeypatch.setenv(BACKEND_ENV, "auto")
    torch.testing.assert_close(sparse_delta(x, support, values), ref.spmm(x, support, values))


def test_triton_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(ops, "_triton_module", lambda: None)
    monkeypatch.setenv(BACKEND_ENV, "triton")
    support, values, x, _ = make((5, 4), 0.5, 3)
    with pytest.raises(RuntimeError, match="cannot be imported"):
        sparse_delta(x, support, values)
    monkeypatch.setenv(BACKEND_ENV, "auto")
    assert resolve_backend(torch.device("cpu")) == "reference"


def test_unknown_backend_is_a_value_error(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "cusparse")
    with pytest.raises(ValueError, match="auto, triton, reference"):
        resolve_backend(torch.device("cpu"))


# ----------------------------------------------------------------------------------------- ahead-of-time GPU compile
def _compile_for_sm90(fn, signature: dict, constexprs: dict):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(signature)
    src = ASTSource(
        fn=triton.jit(fn),
        signature={n: ("constexpr" if n in constexprs else t) for n, t in signature.items()},
        constexprs={(names.index(n),): v for n, v in constexprs.items()},
    )
    return triton.compile(src, target=GPUTarget("cuda", 90, 32))


@compiled
@pytest.mark.parametrize("ty", ["fp32", "fp16", "bf16"])
def test_kernels_compile_for_a_gpu(ty):
    """Compile both kernels to a cubin for sm_90 (the H100) without a GPU: catches compile-only errors."""
    pytest.importorskip("triton.backends.nvidia")
    import triton.language as tl

    try:
        spmm_bin = _compile_for_sm90(
            tk._csr_spmm_kernel,
            {"crow_ptr": "*i32", "col_ptr": "*i32", "val_ptr": f"*{ty}", "perm_ptr": "*i32", "b_ptr": f"*{ty}",
             "out_ptr": f"*{ty}", "n_rows": "i32", "n_tok": "i32", "stride_b_tok": "i64", "stride_b_feat": "i64",
             "stride_o_tok": "i64", "stride_o_feat": "i64", "HAS_PERM": None, "ACCUMULATE": None, "ACC_DTYPE": None,
             "BLOCK_R": None, "BLOCK_T": None},
            {"HAS_PERM": True, "ACCUMULATE": True, "ACC_DTYPE": tl.float32, "BLOCK_R": tk.SPMM_BLOCK_R,
             "BLOCK_T": tk.SPMM_BLOCK_T},
        )
    except (FileNotFoundError, RuntimeError) as exc:  # pragma: no cover - no CUDA toolchain in this triton build
        if "ptxas" in str(exc) or "not found" in str(exc).lower():
            pytest.skip(f"no CUDA toolchain: {exc}")
        raise
    sddmm_bin = _compile_for_sm90(
        tk._sddmm_kernel,
        {"row_ptr": "*i32", "col_ptr": "*i32", "g_ptr": f"*{ty}", "x_ptr": f"*{ty}", "part_ptr": "*fp32", "nnz": "i32",
         "n_tok": "i32", "tok_per_split": "i32", "stride_g_tok": "i64", "stride_g_feat": "i64", "stride_x_tok": "i64",
         "stride_x_feat": "i64", "ACC_DTYPE": None, "BLOCK_N": None, "BLOCK_T": None},
        {"ACC_DTYPE": tl.float32, "BLOCK_N": tk.SDDMM_BLOCK_N, "BLOCK_T": tk.SDDMM_BLOCK_T},
    )
    for binary in (spmm_bin, sddmm_bin):
        assert "cubin" in binary.asm and len(binary.asm["cubin"]) > 0
