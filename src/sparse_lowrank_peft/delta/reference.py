"""Pure-PyTorch sparse-delta ops: the specification, the CPU path and the oracle the Triton kernels are tested against.

S is an ``(out, in)`` matrix with a fixed support (``SparseSupport``, ``nnz`` entries) and values ``v`` (``(nnz,)``).
For 2-D activations ``x`` of shape ``(tokens, in)`` and output gradients ``g`` of shape ``(tokens, out)``:

* ``spmm(x, S, v)``     ``y = x · Sᵀ``                         -> ``(tokens, out)``   (forward)
* ``sddmm(g, x, S)``    ``∂v[k] = Σ_t g[t, row_k] · x[t, col_k]``   -> ``(nnz,)``  (values gradient: ``gᵀx`` sampled
  at the support, never forming the ``(out, in)`` product)
* ``spmm_t(g, S, v)``   ``∂x = g · S``                          -> ``(tokens, in)``    (input gradient)
* ``backward(g, x, S, v)``  ``spmm_t`` and ``sddmm`` in one pass over ``g`` (what the autograd Function calls)

All of them run through PyTorch's sparse CSR kernels (MKL on CPU, cuSPARSE on CUDA) on layouts cached by the
support, so memory is O(tokens·(in + out) + nnz): no ``(out, in)`` tensor, and no ``(tokens, nnz)`` gather either.
Every op accumulates in fp32 (fp64 for fp64 inputs) and returns a contiguous result in the input's dtype, the same
contract as the Triton kernels.

How it is made fast on CPU (the project's 2-core machine, d = 1024, tokens = 4096, density 0.01, fp32):

* MKL's CSR·dense wants its dense operand *feature-major* (``(features, tokens)`` row-major: 28 ms, against 137 ms
  for the column-major call that would read ``x`` as it lies), so activations are transposed. A whole-tensor
  transpose is a 16 MB copy (10-25 ms) and a 16 MB temporary, so the ops walk the tokens in chunks of about
  ``_CHUNK_ELEMS / features`` tokens: each chunk is transposed into a small buffer, multiplied, and transposed
  back into its rows of the result. Temporaries stay O(chunk·(in + out)).
* ``torch.addmm(buf, S, dense, beta=0, out=buf)`` instead of ``S @ dense``: the latter zero-fills a fresh result
  and then copies it (fill 12 ms + copy 23 ms around a 26 ms product).
* Results are contiguous: adding a transposed view to the base output costs 85 ms, a transposing copy 10 ms.
* The backward transposes each chunk of ``g`` once and feeds both of its products from it; ``sampled_addmm`` gets
  ``x`` as a transposed view of a feature-major chunk (its own internal transpose is about twice as slow).
"""

from __future__ import annotations

import warnings

import torch

from .support import SparseSupport

__all__ = ["spmm", "sddmm", "spmm_t", "backward"]

# Only float32/float64 reach the sparse kernels: MKL's CSR routines on CPU take no half types, and fp32 is the
# accumulation precision the contract promises anyway.
_ACC = torch.float32

# Token chunk on CPU: about this many elements per transposed (features, chunk) buffer (4 MiB in fp32: 1024 tokens
# at d = 1024). Smaller chunks cost the same CPU time (256 tokens: 75.6 ms of CPU time per forward + backward at
# d = 1024, tokens = 4096, density 0.01; 1024 tokens: 76.8 ms; one chunk of 4096: 89.5 ms) but run more parallel
# regions, and on a loaded machine each one waits for a descheduled OpenMP thread: with 2 threads under a load of
# ~9, the same step took 992 ms of wall time in 256-token chunks, 404 ms in 1024-token chunks, 354 ms in one chunk.
_CHUNK_ELEMS = 1 << 20
_MIN_CHUNK = 128
# Up to this many tokens (decoding) the forward is one product on a feature-major copy (`_spmm_few`): without the
# chunk buffers it cost 0.57-0.93x the chunked path at 1-32 tokens on the LLaMA shapes of bench/decode.py, and
# 0.95-1.19x at 64 (bench/results/dispatch-cpu.json "few": bench/dispatch.py --parts few --clock cpu, 1 thread).
# An ELLPACK gather instead (rows padded to the longest, three dense ops, no sparse routine) took 0.95-1.80x of MKL's
# product at 1-4 tokens after a cache sweep and up to 5x at 32, both with operands kept (dispatch-cpu.json "ell";
# 0.97-1.85x at 1-4 in dispatch-cpu-before-ee15691.json), so it is not built.
FEW_TOKENS = 32


def _acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else _ACC


_csr_warned = False


def _csr(crow, col, values, shape) -> torch.Tensor:
    global _csr_warned
    if _csr_warned:  # torch warns once per process; catching it every time cost 5 of 10 µs per construction
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)
    with warnings.catch_warnings():
        # "Sparse CSR tensor support is in beta state" fires on the first construction; the ops used here are stable.
        warnings.simplefilter("ignore", UserWarning)
        csr = torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)
    _csr_warned = True
    return csr


def _csr_of(support: SparseSupport, values: torch.Tensor, acc: torch.dtype, device: torch.device,
            few: bool = False) -> torch.Tensor:
    """The CSR tensor of S with ``values`` (as ``acc``), kept on the support while ``values`` is the same tensor at the
    same version (decoding multiplies the same frozen values at every step; a training step changes their version).
    ``few``: for a product of at most ``FEW_TOKENS`` tokens, with int32 indices (``SparseSupport.csr32``).

    Decoding pays this path's per-call work after the caches were swept by the layers in between: at 1-4 tokens the
    bare product with its operands kept took 0.52-0.66x of the whole path, building this tensor each call included
    (bench/results/dispatch-cpu-before-99e4376.json, "ell": ``bench/dispatch.py --parts ell``); 0.62-0.75x with it
    kept (dispatch-cpu-before-ee15691.json). With int32 indices (``few``) and one token added in place, that int64
    bare product takes 0.98-1.09x of the path at one token and 0.66-0.90x at 2-32 (dispatch-cpu.json). Not kept
    while autograd records ``values`` (the tensor would carry its graph)."""
    key = (values._version, acc, device, torch.is_inference_mode_enabled(), few)
    hit = support._csr_cache.entry
    if hit is not None and hit[0] is values and hit[1] == key:
        return hit[2]
    if few:
        crow, col = support.csr32(device)
    else:
        csr = support.row_csr(device)
        crow, col = csr.crow, csr.col
    S = _csr(crow, col, values.to(acc), support.shape)
    if not (values.requires_grad and torch.is_grad_enabled()):
        support._csr_cache.entry = (values, key, S)  # holding values keeps its address from being reused
    return S


def _chunks(tokens: int, features: int, device: torch.device):
    """``(t0, t1)`` token ranges on CPU: ~``_CHUNK_ELEMS / features`` tokens each, and at most a quarter of the
    tokens (so the three chunk buffers stay below one activation: a 2048 x 768 step otherwise peaked 8 MB above
    LoRA's); one range elsewhere."""
    if device.type == "cpu":
        size = max(_MIN_CHUNK, min(_CHUNK_ELEMS // max(features, 1), -(-tokens // 4)))
    else:
        size = max(tokens, 1)
    for t0 in range(0, tokens, size):
        yield t0, min(tokens, t0 + size)


def _buffer(cache: dict, key: str, rows: int, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A contiguous ``(rows, n)`` buffer, reused by the chunks of the same width."""
    buf = cache.get(key)
    if buf is None or tuple(buf.shape) != (rows, n):
        buf = cache[key] = torch.empty(rows, n, dtype=dtype, device=device)
    return buf


def _transposed(src: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """``src.t()`` as a contiguous tensor of ``buf``'s dtype: ``src.t()`` itself if it already is one, else ``buf``."""
    st = src.t()
    if st.is_contiguous() and st.dtype == buf.dtype:
        return st
    buf.copy_(st)
    return buf


def spmm(
    x: torch.Tensor, support: SparseSupport, values: torch.Tensor, add_to: torch.Tensor | None = None
) -> torch.Tensor:
    """``y = x · Sᵀ`` for ``x`` of shape ``(tokens, in)``; returns a contiguous ``(tokens, out)`` in ``x.dtype``.

    With ``add_to`` (a ``(tokens, out_features)`` tensor of any float dtype), adds ``x · Sᵀ`` into it in place
    instead and returns it: no result-sized temporary, and no separate pass to add the term to another one.
    """
    tokens = x.shape[0]
    out_features, in_features = support.shape
    acc = _acc_dtype(x, values)
    out = add_to
    if out is not None and (out.dim() != 2 or tuple(out.shape) != (tokens, out_features)):
        raise ValueError(f"spmm: add_to has shape {tuple(out.shape)}, expected {(tokens, out_features)}.")
    if support.nnz == 0 or tokens == 0:
        return x.new_zeros(tokens, out_features) if out is None else out
    device = x.device
    few = tokens <= FEW_TOKENS and support.nnz < 2**31  # (int32 indices)
    S = _csr_of(support, values, acc, device, few)
    if few:
        return _spmm_few(x, S, acc, out)
    y = torch.empty(tokens, out_features, dtype=x.dtype, device=device) if out is None else out
    bufs: dict = {}
    for t0, t1 in _chunks(tokens, max(in_features, out_features), device):
        n = t1 - t0
        xt = _transposed(x[t0:t1], _buffer(bufs, "x", in_features, n, acc, device))  # (in, n)
        yt = _buffer(bufs, "y", out_features, n, acc, device)  # (out, n)
        torch.addmm(yt, S, xt, beta=0.0, alpha=1.0, out=yt)
        if out is None:
            y[t0:t1].copy_(yt.t())
        else:  # transposing into a small contiguous buffer first makes the add a plain contiguous one
            y[t0:t1].add_(_buffer(bufs, "rows", n, out_features, acc, device).copy_(yt.t()))
    return y


def _spmm_few(x: torch.Tensor, S: torch.Tensor, acc: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
    """:func:`spmm` for a few tokens (decoding): one product on a feature-major copy of ``x``, without the chunked
    path's buffers and copies (0.57-0.93x its time at 1-32 tokens, ``FEW_TOKENS`` above). One token takes ``torch.mv``: 57 against 77 µs for ``torch.mm`` (1024², density 0.01, warm caches), 256 against 287
    µs with the caches swept before each call, as between a model's layers; 135 against 178 and 346 against 384 µs
    at 2816 x 1024 (bench/results/dispatch-cpu.json "few" / "one_token")."""
    if torch.is_autocast_enabled(x.device.type):  # it would cast S to a half type, which MKL's CSR product refuses
        with torch.autocast(x.device.type, enabled=False):
            return _spmm_few(x, S, acc, out)
    if x.shape[0] == 1:  # (a no-op .to() is still a call into torch's dispatcher)
        x0 = x[0] if x.dtype == acc else x[0].to(acc)
        if out is not None and out.dtype == acc and out.is_contiguous():
            out[0].addmv_(S, x0)  # one call into torch and no temporary, where mv + add_ made two and one
            return out
        y = torch.mv(S, x0).unsqueeze(0)
    else:
        xt = x.t()
        if not (xt.is_contiguous() and xt.dtype == acc):
            xt = torch.empty(xt.shape, dtype=acc, device=x.device).copy_(xt)
        y = torch.mm(S, xt).t()  # (tokens, out), a view
    if out is not None:
        return out.add_(y)
    if y.is_contiguous() and y.dtype == x.dtype:
        return y
    return torch.empty(y.shape, dtype=x.dtype, device=x.device).copy_(y)


def backward(
    g: torch.Tensor,
    x: torch.Tensor | None,
    support: SparseSupport,
    values: torch.Tensor | None,
    need_x: bool = True,
    need_values: bool = True,
    x_dtype: torch.dtype | None = None,
    values_dtype: torch.dtype | None = None,
    grad_x_into: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(spmm_t(g, S, v), sddmm(g, x, S))`` in one pass over ``g``; a gradient not asked for is ``None``.

    ``x`` is only read for the values gradient and ``values`` only for the input gradient (either may be ``None``
    when its gradient is not asked for). ``∂x`` has ``x_dtype`` (default ``g.dtype``), ``∂v`` has ``values_dtype``
    (default ``g.dtype``). ``grad_x_into``: a ``(tokens, in)`` tensor to write ``∂x`` into (the autograd Function
    passes a 2-D view of a tensor of the input's shape, so that the gradient it returns is no view: autograd can
    then accumulate the other input gradients into it in place instead of allocating their sum).
    """
    tokens = g.shape[0]
    out_features, in_features = support.shape
    x_dtype = x_dtype or g.dtype
    values_dtype = values_dtype or g.dtype
    if support.nnz == 0 or tokens == 0:
        grad_x = None
        if need_x:
            grad_x = g.new_zeros(tokens, in_features, dtype=x_dtype) if grad_x_into is None else grad_x_into.zero_()
        grad_v = g.new_zeros(support.nnz, dtype=values_dtype) if need_values else None
        return grad_x, grad_v
    grad_x = grad_v = None
    if not (need_x or need_values):
        return grad_x, grad_v
    device = g.device
    acc = _acc_dtype(g, *[t for t in (x if need_values else None, values if need_x else None) if t is not None])
    csr = support.row_csr(device)  # the CSR of Sᵀ only for ∂x: the fused path's sampled ∂v never builds it
    if need_x:
        _, csr_t = support.layouts(device)
        St = _csr(csr_t.crow, csr_t.col, values.to(acc)[csr_t.perm], (in_features, out_features))
        grad_x = torch.empty(tokens, in_features, dtype=x_dtype, device=device) if grad_x_into is None else grad_x_into
    if need_values:
        pattern = _csr(csr.crow, csr.col, torch.zeros(support.nnz, dtype=acc, device=device), support.shape)
        grad_v = torch.zeros(support.nnz, dtype=acc, device=device)
    bufs: dict = {}
    for t0, t1 in _chunks(tokens, max(in_features, out_features), device):
        n = t1 - t0
        gt = _transposed(g[t0:t1], _buffer(bufs, "g", out_features, n, acc, device))  # (out, n)
        if need_x:
            dxt = _buffer(bufs, "dx", in_features, n, acc, device)  # (in, n)
            torch.addmm(dxt, St, gt, beta=0.0, alpha=1.0, out=dxt)
            grad_x[t0:t1].copy_(dxt.t())
        if need_values:
            # sampled_addmm reads its second operand by columns; handing it a transposed view of a feature-major
            # copy (the same blocked transpose as above) is ~2x cheaper than letting it transpose the rows itself
            xt = _transposed(x[t0:t1], _buffer(bufs, "x", in_features, n, acc, device))  # (in, n)
            grad_v += torch.sparse.sampled_addmm(pattern, gt, xt.t(), beta=0.0, alpha=1.0).values()
    if need_values:
        grad_v = grad_v.to(values_dtype)
    return grad_x, grad_v


def spmm_t(g: torch.Tensor, support: SparseSupport, values: torch.Tensor) -> torch.Tensor:
    """``∂x = g · S`` for ``g`` of shape ``(tokens, out)``; returns a contiguous ``(tokens, in)`` in ``g.dtype``."""
    return backward(g, None, support, values, need_values=False)[0]


def sddmm(g: torch.Tensor, x: torch.Tensor, support: SparseSupport, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``∂v = (gᵀ · x)[support]`` for ``g`` ``(tokens, out)`` and ``x`` ``(tokens, in)``; returns ``(nnz,)``.

    The result has ``out_dtype`` (default: ``g.dtype``), accumulated in fp32 (fp64 for fp64 inputs).
    """
    return backward(g, x, support, None, need_x=False, values_dtype=out_dtype or g.dtype)[1]
