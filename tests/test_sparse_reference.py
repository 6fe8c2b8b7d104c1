"""The pure-PyTorch sparse-delta path (delta/reference.py) and the support it runs on (delta/support.py).

The reference is the specification the Triton kernels are tested against, so it is itself checked against a dense
oracle (``torch.zeros(out, in)`` with the values scattered in: fine in a test, never in the library), against
``torch.autograd.gradcheck`` in float64, and for memory: a 4096 x 4096 layer's forward + backward must not allocate
anything of the size of an ``out x in`` matrix.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sparse_lowrank_peft.delta import reference as ref
from sparse_lowrank_peft.delta.ops import SparseDeltaFunction, sparse_delta
from sparse_lowrank_peft.delta.support import SparseSupport, layer_seed, support_nnz

# Odd sizes (no multiple of any block or chunk size) and densities from 1e-4 to 0.1.
SHAPES = [(1, 1), (7, 5), (37, 53), (64, 130), (300, 201)]
DENSITIES = [1e-4, 1e-3, 0.01, 0.1]


def dense(support: SparseSupport, values: torch.Tensor) -> torch.Tensor:
    """The oracle: S as a dense (out, in) matrix (test-only)."""
    S = torch.zeros(support.shape, dtype=values.dtype)
    S[support.rows(), support.cols()] = values
    return S


def make(shape, density, tokens, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    support = SparseSupport.random(shape, density, seed=seed)
    values = torch.randn(support.nnz, generator=gen, dtype=torch.float64).to(dtype)
    x = torch.randn(tokens, shape[1], generator=gen, dtype=torch.float64).to(dtype)
    g = torch.randn(tokens, shape[0], generator=gen, dtype=torch.float64).to(dtype)
    return support, values, x, g


def oracle(support, values, x, g):
    S = dense(support, values.double())
    xd, gd = x.double(), g.double()
    return xd @ S.T, gd @ S, (gd.T @ xd)[support.rows(), support.cols()]


# ------------------------------------------------------------------------------------------------ ops vs dense oracle
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", DENSITIES)
def test_ops_match_dense_oracle(shape, density):
    support, values, x, g = make(shape, density, tokens=29, seed=len(shape) + int(1 / density))
    y, dx, dv = oracle(support, values, x, g)
    torch.testing.assert_close(ref.spmm(x, support, values).double(), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref.spmm_t(g, support, values).double(), dx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref.sddmm(g, x, support).double(), dv, rtol=1e-5, atol=1e-5)


def test_many_token_chunks_and_a_ragged_tail(monkeypatch):
    # Force tiny chunks so one call walks many of them, the last one shorter.
    monkeypatch.setattr(ref, "_CHUNK_ELEMS", 1)
    monkeypatch.setattr(ref, "_MIN_CHUNK", 7)
    support, values, x, g = make((19, 23), 0.2, tokens=45)
    y, dx, dv = oracle(support, values, x, g)
    torch.testing.assert_close(ref.spmm(x, support, values).double(), y, rtol=1e-5, atol=1e-5)
    gx, gv = ref.backward(g, x, support, values)
    torch.testing.assert_close(gx.double(), dx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gv.double(), dv, rtol=1e-5, atol=1e-5)


def test_empty_rows_and_columns():
    # Only rows 0 and 5 and columns 1, 2 and 9 have entries; everything else of y / dx must be exactly zero.
    indices = torch.tensor([[0, 0, 5, 5], [1, 9, 2, 9]], dtype=torch.int32)
    support = SparseSupport(indices, (8, 11))
    values = torch.tensor([1.0, -2.0, 3.0, 0.5])
    gen = torch.Generator().manual_seed(0)
    x, g = torch.randn(6, 11, generator=gen), torch.randn(6, 8, generator=gen)
    y, dx, dv = oracle(support, values, x, g)  # float64; the ops compute in float32: compared at its tolerance
    out = ref.spmm(x, support, values)
    torch.testing.assert_close(out, y.float())
    assert out[:, [1, 2, 3, 4, 6, 7]].abs().max() == 0
    gx = ref.spmm_t(g, support, values)
    torch.testing.assert_close(gx, dx.float())
    assert gx[:, [0, 3, 4, 5, 6, 7, 8, 10]].abs().max() == 0
    torch.testing.assert_close(ref.sddmm(g, x, support), dv.float())


def test_no_nonzeros_and_no_tokens():
    empty = SparseSupport(torch.zeros(2, 0, dtype=torch.int32), (4, 3))
    x, g = torch.randn(5, 3), torch.randn(5, 4)
    assert torch.equal(ref.spmm(x, empty, torch.zeros(0)), torch.zeros(5, 4))
    assert torch.equal(ref.spmm_t(g, empty, torch.zeros(0)), torch.zeros(5, 3))
    assert ref.sddmm(g, x, empty).shape == (0,)
    support, values, _, _ = make((4, 3), 0.5, tokens=1)
    assert ref.spmm(torch.zeros(0, 3), support, values).shape == (0, 4)
    assert ref.spmm_t(torch.zeros(0, 4), support, values).shape == (0, 3)
    assert torch.equal(ref.sddmm(torch.zeros(0, 4), torch.zeros(0, 3), support), torch.zeros(support.nnz))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_dtypes_and_contiguous_results(dtype):
    support, values, x, g = make((37, 53), 0.05, tokens=31, dtype=dtype)
    y, dx, dv = oracle(support, values, x, g)
    # fp32 accumulation, one rounding to the output dtype at the end: 2 ulps of the output dtype at most.
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2 * 2**-11, torch.bfloat16: 2 * 2**-8}[dtype]
    for got, want in ((ref.spmm(x, support, values), y), (ref.spmm_t(g, support, values), dx)):
        assert got.dtype == dtype and got.is_contiguous()
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * want.abs().max().item())
    got = ref.sddmm(g, x, support, out_dtype=torch.float32)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), dv, rtol=max(tol, 1e-5), atol=1e-5 * dv.abs().max().item())
    assert ref.sddmm(g, x, support).dtype == dtype


def test_strided_inputs():
    support, values, x, g = make((21, 34), 0.1, tokens=40)
    y, dx, dv = oracle(support, values, x, g)
    x_fm = x.t().contiguous().t()  # feature-major view
    g_strided = torch.randn(40, 2 * 21)[:, ::2]
    g_strided.copy_(g)
    torch.testing.assert_close(ref.spmm(x_fm, support, values).double(), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref.spmm_t(g_strided, support, values).double(), dx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref.sddmm(g_strided, x_fm, support).double(), dv, rtol=1e-5, atol=1e-5)


def test_fused_backward_asks_only_for_what_is_needed():
    support, values, x, g = make((13, 17), 0.2, tokens=9)
    _, dx, dv = oracle(support, values, x, g)
    gx, gv = ref.backward(g, None, support, values, need_values=False)
    assert gv is None
    torch.testing.assert_close(gx.double(), dx, rtol=1e-5, atol=1e-5)
    gx, gv = ref.backward(g, x, support, None, need_x=False, values_dtype=torch.float64)
    assert gx is None and gv.dtype == torch.float64
    torch.testing.assert_close(gv, dv, rtol=1e-5, atol=1e-5)


def test_spmm_adds_into_a_given_tensor_and_backward_writes_into_a_given_buffer():
    support, values, x, g = make((21, 34), 0.1, tokens=40)
    y, dx, _ = oracle(support, values, x, g)
    for dtype in (torch.float32, torch.float64):
        base = torch.randn(40, 21, dtype=dtype)
        out = base.clone()
        assert ref.spmm(x, support, values, add_to=out) is out
        torch.testing.assert_close(out.double(), base.double() + y, rtol=1e-5, atol=1e-5)
    buf = torch.full((40, 34), float("nan"))
    gx, _ = ref.backward(g, None, support, values, need_values=False, grad_x_into=buf)
    assert gx is buf
    torch.testing.assert_close(buf.double(), dx, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="add_to"):
        ref.spmm(x, support, values, add_to=torch.zeros(40, 20))


@pytest.mark.parametrize("tokens", [1, 2, ref.FEW_TOKENS, ref.FEW_TOKENS + 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_few_tokens_forward_matches_the_oracle(tokens, dtype):
    """The decoding forward (one product, ``_spmm_few``, up to ``FEW_TOKENS``) and the chunked one past it: the
    oracle's result, contiguous in the input's dtype, added in place with ``add_to``, from a strided input too."""
    support, values, x, g = make((37, 53), 0.1, tokens=tokens, dtype=dtype)
    y, _, _ = oracle(support, values, x, g)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2 * 2**-8}[dtype]
    scale = y.abs().max().item()
    for xin in (x, x.t().contiguous().t()):
        got = ref.spmm(xin, support, values)
        assert got.dtype == dtype and got.is_contiguous()
        torch.testing.assert_close(got.double(), y, rtol=tol, atol=tol * scale)
        base = torch.randn(tokens, 37, generator=torch.Generator().manual_seed(tokens)).to(dtype)
        out = base.clone()
        assert ref.spmm(xin, support, values, add_to=out) is out
        torch.testing.assert_close(out.double(), base.double() + y, rtol=tol, atol=2 * tol * (scale + 4))
        with torch.autocast("cpu", dtype=torch.bfloat16):  # MKL's CSR product has no half types: computed in fp32
            under_autocast = ref.spmm(xin, support, values)
        assert under_autocast.dtype == dtype
        torch.testing.assert_close(under_autocast.double(), y, rtol=tol, atol=tol * scale)


def test_without_autograd_the_kernels_are_called_directly(monkeypatch):
    """Where autograd records nothing (``torch.no_grad``, or no input needs a gradient) ``sparse_delta`` skips its
    autograd Functions and returns what they return, ``add_to`` written in place; with a gradient wanted it uses them."""
    from sparse_lowrank_peft.delta import ops

    support, values, x, _ = make((21, 34), 0.1, tokens=6)
    x3 = x.view(2, 3, 34)
    with_graph = sparse_delta(x3, support, values.clone().requires_grad_(True)).detach()
    base = torch.randn(2, 3, 21, generator=torch.Generator().manual_seed(1))
    with_graph_add = sparse_delta(x3, support, values.clone().requires_grad_(True), add_to=base.clone() * 1.0)

    def refuse(*args):
        raise AssertionError("the autograd Function ran without a graph to record")

    monkeypatch.setattr(ops.SparseDeltaFunction, "apply", refuse)
    monkeypatch.setattr(ops.SparseDeltaAddFunction, "apply", refuse)
    with torch.no_grad():
        torch.testing.assert_close(sparse_delta(x3, support, values.requires_grad_(True)), with_graph)
        out = base.clone()
        assert sparse_delta(x3, support, values, add_to=out) is out
        torch.testing.assert_close(out, with_graph_add.detach())
    values.requires_grad_(False)
    torch.testing.assert_close(sparse_delta(x3, support, values), with_graph)  # grad mode on, nothing needs one
    with pytest.raises(AssertionError, match="autograd Function ran"):
        sparse_delta(x3, support, values.requires_grad_(True))


# -------------------------------------------------------------------------------------------- autograd (gradcheck)
@pytest.mark.parametrize("shape,density", [((5, 7), 0.3), ((11, 4), 0.5), ((9, 13), 0.05)])
def test_gradcheck_float64(shape, density):
    support = SparseSupport.random(shape, density, seed=3)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, shape[1], dtype=torch.float64, generator=gen, requires_grad=True)
    values = torch.randn(support.nnz, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, v: sparse_delta(a, support, v, backend="reference"), (x, values))


@pytest.mark.parametrize("lead", [(6,), (2, 3)])
def test_gradcheck_add_to_in_place(lead):
    """``sparse_delta(x, S, v, add_to=t)``: t += x·Sᵀ in place; gradients of t (passed through), x and v."""
    support = SparseSupport.random((5, 7), 0.3, seed=4)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*lead, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    values = torch.randn(support.nnz, dtype=torch.float64, generator=gen, requires_grad=True)
    A = torch.randn(7, 5, dtype=torch.float64, generator=gen, requires_grad=True)

    def fn(x, values, A):
        lowrank = (x @ A) * 0.5  # a product scaled by a number: its backward does not need its output
        return sparse_delta(x, support, values, backend="reference", add_to=lowrank)

    assert torch.autograd.gradcheck(fn, (x, values, A))
    want = (x @ A) * 0.5 + sparse_delta(x, support, values, backend="reference")
    torch.testing.assert_close(fn(x, values, A), want)


def test_add_to_checks_and_non_contiguous_fallback():
    support, values, x, _ = make((6, 5), 0.4, tokens=4)
    with pytest.raises(ValueError, match="add_to"):
        sparse_delta(x, support, values, add_to=torch.zeros(4, 5))
    strided = torch.zeros(6, 4).t()  # not contiguous: the out-of-place sum is returned, the tensor is untouched
    got = sparse_delta(x, support, values, add_to=strided)
    torch.testing.assert_close(got, ref.spmm(x, support, values))
    assert strided.abs().max() == 0


def test_input_gradient_is_not_a_view():
    # Autograd accumulates the other gradients of x into the first one in place only if it is no view; a view
    # costs one more activation-sized buffer at the backward's peak.
    support, values, _, _ = make((6, 5), 0.4, tokens=1)
    for shape in ((4, 5), (2, 3, 5)):
        x = torch.randn(*shape, requires_grad=True)
        y = sparse_delta(x, support, values.clone().requires_grad_(True), backend="reference")
        (grad_x,) = torch.autograd.grad(y, x, torch.ones_like(y))
        assert grad_x.shape == x.shape and grad_x._base is None


def test_autograd_batched_3d_matches_dense():
    support, values, _, _ = make((10, 12), 0.2, tokens=1, dtype=torch.float64)
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    v = values.clone().requires_grad_(True)
    y = sparse_delta(x, support, v, backend="reference")
    assert y.shape == (2, 5, 10)
    gy = torch.randn_like(y)
    y.backward(gy)
    x2 = x.detach().clone().requires_grad_(True)
    v2 = values.clone().requires_grad_(True)
    S = torch.zeros(10, 12, dtype=torch.float64).index_put((support.rows(), support.cols()), v2)
    (F.linear(x2, S) * gy).sum().backward()
    torch.testing.assert_close(y, F.linear(x2, S).detach())
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(v.grad, v2.grad)


def test_only_values_or_only_input_need_grad():
    support, values, x, _ = make((8, 9), 0.3, tokens=4, dtype=torch.float64)
    v = values.clone().requires_grad_(True)
    sparse_delta(x, support, v, backend="reference").sum().backward()
    assert v.grad is not None and x.grad is None
    xr = x.clone().requires_grad_(True)
    sparse_delta(xr, support, values, backend="reference").sum().backward()
    assert xr.grad is not None


# ------------------------------------------------------------------------------------------------- support sampling
def test_support_is_sorted_distinct_and_has_nnz():
    for shape, density in [((37, 53), 0.01), ((64, 64), 0.3), ((20, 30), 0.9), ((1, 1), 1.0), ((1000, 999), 1e-4)]:
        s = SparseSupport.random(shape, density, seed=7)
        assert s.nnz == support_nnz(shape, density)
        assert s.indices.dtype == torch.int32 and s.indices.shape == (2, s.nnz)
        flat = s.rows() * shape[1] + s.cols()
        assert bool((flat[1:] > flat[:-1]).all()), "row-major sorted and distinct"
        SparseSupport.check(s.indices, shape)  # valid by the loader's own check


def test_support_is_deterministic_per_seed_and_device_independent():
    a = SparseSupport.random((300, 200), 0.01, seed=11)
    b = SparseSupport.random((300, 200), 0.01, seed=11)
    c = SparseSupport.random((300, 200), 0.01, seed=12)
    assert torch.equal(a.indices, b.indices)
    assert not torch.equal(a.indices, c.indices)
    # drawn on the CPU generator whatever the target device: the copy on a device has the same entries
    on_cpu = SparseSupport.random((300, 200), 0.01, seed=11, device="cpu")
    assert torch.equal(on_cpu.indices, a.indices)
    if torch.cuda.is_available():
        on_gpu = SparseSupport.random((300, 200), 0.01, seed=11, device="cuda")
        assert torch.equal(on_gpu.indices.cpu(), a.indices)
    # the per-layer seed is stable across processes (crc32, not Python's salted hash)
    assert layer_seed(0, "model.layer.0.query") == layer_seed(0, "model.layer.0.query")
    assert layer_seed(0, "a") != layer_seed(0, "b")


def test_support_is_uniform():
    # 400 draws of 16 out of 8 x 8 = 64 positions: each position is picked with p = 1/4. Count per position ~
    # Binomial(400, 1/4) (mean 100, sd 8.7); a chi-square over the 64 cells must look like chi2(63).
    shape, density, draws = (8, 8), 0.25, 400
    counts = torch.zeros(64)
    for seed in range(draws):
        s = SparseSupport.random(shape, density, seed=seed)
        counts[s.rows() * 8 + s.cols()] += 1
    expected = draws * density
    chi2 = float(((counts - expected) ** 2 / (expected * (1 - density))).sum())
    assert 63 - 5 * math.sqrt(2 * 63) < chi2 < 63 + 5 * math.sqrt(2 * 63), chi2
    # and within one large draw rows and columns are evenly covered
    big = SparseSupport.random((100, 100), 0.1, seed=5)
    per_row = torch.bincount(big.rows(), minlength=100).float()
    per_col = torch.bincount(big.cols(), minlength=100).float()
    assert per_row.mean() == 10 and per_row.std() < 5 and per_col.std() < 5


def test_support_layouts_are_consistent_and_cached():
    s = SparseSupport.random((37, 53), 0.1, seed=1)
    csr, csr_t = s.layouts()
    assert csr is s._row_csr[("cpu", None)] and csr_t is s._csr_t[("cpu", None)]  # cached
    assert s.layouts()[0] is csr and s.layouts()[1] is csr_t
    rows, cols = s.rows(), s.cols()
    # CSR of S: rows expand back to the row indices
    assert torch.equal(torch.repeat_interleave(torch.arange(37), csr.crow.diff()), rows)
    assert torch.equal(csr.col, cols)
    # CSR of S^T: column-major order through perm
    assert torch.equal(torch.repeat_interleave(torch.arange(53), csr_t.crow.diff()), cols[csr_t.perm])
    assert torch.equal(csr_t.col, rows[csr_t.perm])
    kl = s.kernel_layouts()
    assert kl is s.kernel_layouts()
    for t in (kl.row, kl.col, kl.crow, kl.ccol, kl.t_row, kl.t_perm):
        assert t.dtype == torch.int32 and t.is_contiguous()
    assert torch.equal(kl.crow.long(), csr.crow) and torch.equal(kl.ccol.long(), csr_t.crow)
    assert torch.equal(kl.t_row.long(), csr_t.col) and torch.equal(kl.t_perm.long(), csr_t.perm)
    assert torch.equal(kl.row.long(), rows) and torch.equal(kl.col.long(), cols)
    fresh = SparseSupport.random((37, 53), 0.1, seed=1)  # the kernels' layouts alone keep no int64 arrays
    fresh_kl = fresh.kernel_layouts()
    assert fresh._row_csr == fresh._csr_t == {}
    assert torch.equal(fresh_kl.t_perm, kl.t_perm) and torch.equal(fresh_kl.ccol, kl.ccol)
    assert fresh_kl.row.data_ptr() == fresh.indices[0].data_ptr()  # views of the int32 indices, no copies
    assert fresh_kl.col.data_ptr() == fresh.indices[1].data_ptr()
    forward_only = SparseSupport.random((37, 53), 0.1, seed=1)  # a forward builds S's CSR alone, no Sᵀ layout
    y = ref.spmm(torch.randn(ref.FEW_TOKENS + 8, 53), forward_only, torch.randn(forward_only.nnz))
    assert y.shape == (ref.FEW_TOKENS + 8, 37) and forward_only._csr_t == {} and len(forward_only._row_csr) == 1
    row_csr = forward_only.row_csr()
    assert torch.equal(row_csr.crow, csr.crow) and torch.equal(row_csr.col, csr.col)
    ref.sddmm(torch.randn(5, 37), torch.randn(5, 53), forward_only)  # the values' gradient alone: S's CSR
    assert forward_only._csr_t == {} and forward_only.row_csr() is row_csr
    assert forward_only.layouts()[0] is row_csr and len(forward_only._csr_t) == 1  # then reused by the pair
    assert forward_only.row_csr() is row_csr and torch.equal(forward_only.layouts()[1].perm, csr_t.perm)
    crow32, col32 = s.csr32()  # the few-token products' int32 CSR: the same arrays, built once
    assert s.csr32() == (crow32, col32) and s.csr32()[0] is crow32
    assert crow32.dtype == col32.dtype == torch.int32 and crow32.is_contiguous() and col32.is_contiguous()
    assert torch.equal(crow32.long(), csr.crow) and torch.equal(col32.long(), csr.col)


def test_flat_positions_are_int32_where_they_fit():
    """``SparseSupport.flat``: ``row · in + col`` (or ``col · out + row`` transposed) as int32 while ``out · in`` fits,
    int64 for a larger matrix, where int32 would wrap."""
    small = SparseSupport.random((37, 53), 0.1, seed=1)
    rows, cols = small.rows(), small.cols()
    assert small.flat().dtype == torch.int32 and torch.equal(small.flat().long(), rows * 53 + cols)
    assert torch.equal(small.flat(transposed=True).long(), cols * 37 + rows)
    big = SparseSupport.random((1 << 16, 1 << 16), 1e-9, seed=1)  # 2**32 positions
    flat = big.flat()
    assert flat.dtype == torch.int64 and torch.equal(flat, big.rows() * (1 << 16) + big.cols())
    assert int(flat.max()) >= 2**31  # (seed 1 draws one past int32's range)


# ---------------------------------------------------------------------------------------------------------- memory
def _largest_allocation(fn) -> int:
    """The largest number of bytes any single op allocated itself while ``fn`` ran (torch profiler, CPU)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.self_cpu_memory_usage for e in prof.events()), default=0)


def test_reference_never_allocates_an_out_by_in_buffer():
    out_features = in_features = 4096
    dense_bytes = out_features * in_features * 4  # 64 MiB
    tokens = 256  # activations are 4 MiB: anything near 64 MiB can only be an (out, in) matrix
    support = SparseSupport.random((out_features, in_features), 0.01, seed=0)
    values = torch.zeros(support.nnz, requires_grad=True)
    x = torch.randn(tokens, in_features, requires_grad=True)
    gy = torch.randn(tokens, out_features)

    def sparse_step():
        sparse_delta(x, support, values, backend="reference").backward(gy)

    def densify_step():  # PEFT's approach, as the positive control of the measurement
        W = torch.zeros(out_features, in_features).index_put((support.rows(), support.cols()), values)
        F.linear(x, W).backward(gy)

    sparse_step()  # warm the layout cache (its O(nnz) arrays are built once, not per step)
    assert _largest_allocation(densify_step) >= dense_bytes
    largest = _largest_allocation(sparse_step)
    assert largest < dense_bytes / 8, f"largest single allocation {largest / 2**20:.1f} MiB"
    assert values.grad is not None and x.grad is not None


def test_autograd_function_saves_no_dense_tensor():
    support = SparseSupport.random((512, 256), 0.01, seed=0)
    x = torch.randn(3, 256)
    values = torch.zeros(support.nnz, requires_grad=True)
    y = SparseDeltaFunction.apply(x, values, support, "reference")
    saved = y.grad_fn.saved_tensors
    assert sum(t.numel() for t in saved) == x.numel() + values.numel()


# ---------------------------------------------------------------------------------------------------- bench smoke
def _load_bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "sparse_delta.py"
    spec = importlib.util.spec_from_file_location("bench_sparse_delta", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_quick_runs_and_writes_results(tmp_path, monkeypatch):
    import json
    import os

    monkeypatch.delenv("SLPEFT_SPARSE_BACKEND", raising=False)
    bench = _load_bench()
    out = tmp_path / "sparse_delta-cpu.json"
    result = bench.main(["--quick", "--no-memory", "--device", "cpu", "--repeats", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["device"]["type"] == "cpu" and saved["versions"]["torch"] == torch.__version__
    assert "commit" in saved and "triton" in saved["versions"]
    variants = {r["variant"] for r in saved["results"]}
    assert {"lora", "densify_lora", "sparse_reference", "sltrain"} <= variants
    for row in saved["results"]:
        assert row["fwd_ms"] > 0 and row["bwd_ms"] > 0 and row["fwd_bwd_ms"] > 0
    assert "| tokens |" in bench.markdown(result)
    assert "SLPEFT_SPARSE_BACKEND" not in os.environ  # the bench restores the caller's environment


@pytest.mark.skipif(not __import__("pathlib").Path("/proc/self/clear_refs").exists(), reason="Linux /proc only")
def test_bench_cpu_peak_memory_measurement():
    bench = _load_bench()
    step = bench.Step("sltrain", (64, 48, 40, 0.05), 4, torch.device("cpu"), torch.float32)
    step.run()
    peak = bench.peak_memory_in_process(step)
    assert peak is not None and peak >= 0


def test_decoding_reuses_the_csr_tensor_only_while_the_values_are_unchanged():
    """``spmm`` keeps S's CSR tensor on the support for the values it last multiplied (one token per call, as in
    decoding): reused while the values are the same tensor at the same version; an in-place update (an optimizer
    step), another tensor, or values autograd records give fresh results; copies of the support start empty."""
    import copy
    import pickle

    support, values, _, _ = make((37, 23), 0.2, tokens=1, seed=3)
    x = torch.randn(1, 23, generator=torch.Generator().manual_seed(4))
    first = ref.spmm(x, support, values)
    cached = support._csr_cache.entry[2]
    assert cached.crow_indices().dtype == torch.int32  # (SparseSupport.csr32: faster few-token products)
    torch.testing.assert_close(ref.spmm(x, support, values), first)
    assert support._csr_cache.entry[2] is cached  # the second token reused it
    with torch.no_grad():
        values.mul_(2.0)  # an optimizer step: same tensor, new version
    torch.testing.assert_close(ref.spmm(x, support, values), 2 * first)
    other = -values
    torch.testing.assert_close(ref.spmm(x, support, other), -2 * first)
    trained = values.detach().clone().requires_grad_(True)
    before = support._csr_cache.entry
    with torch.enable_grad():
        ref.spmm(x, support, trained)
    assert support._csr_cache.entry is before  # a tensor carrying a graph is not kept
    assert copy.deepcopy(support)._csr_cache.entry is None
    assert pickle.loads(pickle.dumps(support))._csr_cache.entry is None
