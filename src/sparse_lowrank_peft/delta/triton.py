"""Triton kernels for the three sparse-delta ops, with the same contract as :mod:`.reference`.

S is an ``(out, in)`` matrix on a fixed support (``SparseSupport``, ``nnz`` entries) with values ``v``:

* :func:`spmm`    ``y  = x · Sᵀ``               ``x`` ``(tokens, in)``  -> ``(tokens, out)``   (forward)
* :func:`sddmm`   ``∂v = (gᵀ · x)[support]``    ``g`` ``(tokens, out)`` -> ``(nnz,)``         (values gradient)
* :func:`spmm_t`  ``∂x = g · S``                ``g`` ``(tokens, out)`` -> ``(tokens, in)``    (input gradient)

Layering (as in Liger-Kernel): ``@triton.jit`` kernel -> launcher (checks, allocates, launches) -> the autograd
Function in :mod:`.ops` -> the layer. All three kernels accumulate in fp32 (fp64 when an input is fp64), mask every
load and store, take fp32/fp16/bf16 (and fp64) inputs and never build an ``(out, in)`` or ``(tokens, nnz)`` tensor.

Kernels
-------
``_csr_spmm_kernel`` computes ``out[t, i] = Σ_{k in row i} val[k] · B[t, col[k]]`` for a CSR matrix M; it is the
forward (M = S, B = x) and the input gradient (M = Sᵀ, the CSR of Sᵀ kept by the support, B = g). One program owns
``BLOCK_R`` rows of M and ``BLOCK_T`` tokens; it walks the rows' nonzeros in lock step (ELL style, up to the longest
row of its block, shorter rows masked) and keeps a ``(BLOCK_R, BLOCK_T)`` fp32 accumulator.

``_sddmm_kernel`` computes ``∂v[k] = Σ_t g[t, row[k]] · x[t, col[k]]`` for ``BLOCK_N`` consecutive (row-major)
entries per program, looping over tokens in ``BLOCK_T`` chunks. When there are too few entries to fill the GPU the
token range is split over a second grid axis into a ``(split, nnz)`` fp32 buffer that is summed afterwards
(deterministic: no atomics).

Memory layout: every gathered load reads ``B[t0:t0+BLOCK_T, c]`` — one feature over a run of tokens. The launchers
therefore hand the kernels *feature-major* operands (``t.t().contiguous().t()``: a ``(tokens, features)`` view with
stride ``(1, tokens)``), so each such run is contiguous and coalesced; the copy is one pass over the activations
against ``nnz/in`` gathered passes. The kernels take any strides, so an operand that already is feature-major is not
copied again (the backward converts ``g`` once for both of its kernels).

Running without a GPU: with ``TRITON_INTERPRET=1`` in the environment the same kernels run on CPU tensors in
Triton's interpreter (slow; for tests). Triton reads the variable when it is first imported (it wraps its own
``tl.max``/``tl.sum`` then, compiled or interpreted), so it must be set before that: ``peft`` imports triton, so in
practice before anything is imported. A mismatch is reported as a clear error rather than an obscure one from inside
a kernel. This module imports triton only when a kernel is first launched, and wraps the kernels with
``triton.jit`` then, per interpreter setting.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from .support import SparseSupport

# Triton is an optional dependency (the `triton` extra), imported on the first launch (see _load); the kernels below
# refer to `tl` through these module globals, which triton.jit resolves when it compiles or interprets them.
triton = None
tl = None

__all__ = ["is_available", "interpreting", "spmm", "sddmm", "spmm_t", "backward", "feature_major"]

# Tile sizes. BLOCK_R rows of M x BLOCK_T tokens per spmm program; BLOCK_N entries x BLOCK_T tokens per sddmm step.
SPMM_BLOCK_R = 16
SPMM_BLOCK_T = 64
SDDMM_BLOCK_N = 32
SDDMM_BLOCK_T = 64

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def is_available() -> bool:
    """Whether ``triton`` is installed (whether it can run on given tensors is :mod:`.ops`'s check)."""
    return triton is not None or importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton's interpreter is on (``TRITON_INTERPRET=1``): kernels then run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ----------------------------------------------------------------------------------------------------------- kernels
# Plain functions, wrapped by triton.jit in _kernel() (see the module docstring for why not at import time).


def _csr_spmm_kernel(
    crow_ptr,  # (n_rows + 1,) int32 row pointers of M
    col_ptr,  # (nnz,) int32 column (feature of B) of each entry, in M's CSR order
    val_ptr,  # (nnz,) values, in row-major order of S
    perm_ptr,  # (nnz,) int32: CSR position -> index into val_ptr (only read when HAS_PERM)
    b_ptr,  # B: (n_tok, n_feat_b), any strides
    out_ptr,  # out: (n_tok, n_rows), any strides
    n_rows,
    n_tok,
    stride_b_tok,
    stride_b_feat,
    stride_o_tok,
    stride_o_feat,
    HAS_PERM: tl.constexpr,
    ACCUMULATE: tl.constexpr,  # out += result instead of out = result
    ACC_DTYPE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_t = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    start = tl.load(crow_ptr + rows, mask=row_mask, other=0)
    end = tl.load(crow_ptr + rows + 1, mask=row_mask, other=0)
    length = end - start  # 0 for masked rows
    max_len = tl.max(length, axis=0)
    toks = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    tok_mask = toks < n_tok
    b_tok_off = toks * stride_b_tok
    acc = tl.zeros((BLOCK_R, BLOCK_T), dtype=ACC_DTYPE)
    for j in range(0, max_len):
        live = j < length
        k = start + j
        c = tl.load(col_ptr + k, mask=live, other=0).to(tl.int64)
        if HAS_PERM:
            k = tl.load(perm_ptr + k, mask=live, other=0)
        v = tl.load(val_ptr + k, mask=live, other=0.0).to(ACC_DTYPE)
        b = tl.load(
            b_ptr + c[:, None] * stride_b_feat + b_tok_off[None, :],
            mask=live[:, None] & tok_mask[None, :],
            other=0.0,
        ).to(ACC_DTYPE)
        acc += v[:, None] * b
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_o_feat + (toks * stride_o_tok)[None, :]
    out_mask = row_mask[:, None] & tok_mask[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=out_mask, other=0.0).to(ACC_DTYPE)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def _sddmm_kernel(
    row_ptr,  # (nnz,) int32 row of each entry (row-major order)
    col_ptr,  # (nnz,) int32 column of each entry
    g_ptr,  # g: (n_tok, out), any strides
    x_ptr,  # x: (n_tok, in), any strides
    part_ptr,  # (split, nnz) partial sums, ACC_DTYPE
    nnz,
    n_tok,
    tok_per_split,  # tokens per split (a multiple of BLOCK_T)
    stride_g_tok,
    stride_g_feat,
    stride_x_tok,
    stride_x_feat,
    ACC_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    ent = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ent_mask = ent < nnz
    r = tl.load(row_ptr + ent, mask=ent_mask, other=0).to(tl.int64)
    c = tl.load(col_ptr + ent, mask=ent_mask, other=0).to(tl.int64)
    g_row = g_ptr + r[:, None] * stride_g_feat
    x_row = x_ptr + c[:, None] * stride_x_feat
    acc = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    t_begin = pid_s * tok_per_split
    t_end = tl.minimum(t_begin + tok_per_split, n_tok)
    for t0 in range(t_begin, t_end, BLOCK_T):
        toks = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        mask = ent_mask[:, None] & (toks < t_end)[None, :]
        gv = tl.load(g_row + (toks * stride_g_tok)[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
        xv = tl.load(x_row + (toks * stride_x_tok)[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
        acc += tl.sum(gv * xv, axis=1)
    tl.store(part_ptr + pid_s.to(tl.int64) * nnz + ent, acc, mask=ent_mask)


_JITTED: dict[tuple[str, bool], object] = {}


def _kernel(fn):
    """``triton.jit(fn)``, built once per interpreter setting (Triton decides compile vs. interpret when wrapping)."""
    key = (fn.__name__, interpreting())
    jitted = _JITTED.get(key)
    if jitted is None:
        jitted = _JITTED[key] = triton.jit(fn)
    return jitted


# --------------------------------------------------------------------------------------------------------- launchers
def _require_triton() -> None:
    """Import triton (once) into this module's globals; a clear error if it is missing."""
    global triton, tl
    if triton is None:
        try:
            import triton as triton_module
            import triton.language as tl_module
        except ImportError as exc:
            raise RuntimeError(
                f"Triton is not installed ({exc}). Install it with `pip install 'sparse-lowrank-peft[triton]'`, "
                "or set SLPEFT_SPARSE_BACKEND=auto to use the reference path."
            ) from exc
        triton, tl = triton_module, tl_module


def _stdlib_interpreted() -> bool:
    """Whether triton was imported in interpreter mode (its standard library is wrapped for the interpreter)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.standard.max, InterpretedFunction)


def _check_device(*tensors: torch.Tensor) -> None:
    device = tensors[0].device
    for t in tensors:
        if t.device != device:
            raise ValueError(f"sparse-delta Triton kernels: tensors on different devices ({device} and {t.device}).")
    if device.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"sparse-delta Triton kernels got tensors on {device}; they run on CUDA, or on CPU only in Triton's "
            "interpreter (TRITON_INTERPRET=1 in the environment before triton is imported; slow, for tests). "
            "Use SLPEFT_SPARSE_BACKEND=auto for the reference path on CPU."
        )
    if interpreting() != _stdlib_interpreted():
        state = "set" if interpreting() else "unset"
        raise RuntimeError(
            f"TRITON_INTERPRET is {state} now but was not when triton was first imported in this process, and "
            "triton fixes the mode of its own library at import. Set TRITON_INTERPRET=1 in the environment before "
            "the process imports anything (peft imports triton), e.g. `TRITON_INTERPRET=1 python ...`, "
            "or leave it unset to run on CUDA."
        )


def _check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"sparse-delta Triton kernels: {name} has dtype {t.dtype}; expected fp32, fp16, bf16 or fp64.")


def _check_2d(name: str, t: torch.Tensor, features: int, what: str) -> None:
    if t.dim() != 2 or t.shape[1] != features:
        raise ValueError(
            f"sparse-delta Triton kernels: {name} must be 2-D (tokens, {what}={features}), got shape {tuple(t.shape)}."
        )


def _acc(*tensors: torch.Tensor):
    return tl.float64 if any(t.dtype == torch.float64 for t in tensors) else tl.float32


def _acc_torch(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def feature_major(t: torch.Tensor) -> torch.Tensor:
    """``t`` (``(tokens, features)``) as a feature-major view (strides ``(1, tokens)``): a copy unless it already is.

    The kernels read one feature over a run of tokens at a time; in this layout that run is contiguous.
    """
    if t.dim() != 2 or (t.stride(0) == 1 and (t.shape[1] <= 1 or t.stride(1) >= max(t.shape[0], 1))):
        return t
    return t.t().contiguous().t()


def _spmm_launch(
    b: torch.Tensor,
    crow: torch.Tensor,
    col: torch.Tensor,
    values: torch.Tensor,
    perm: torch.Tensor | None,
    n_rows: int,
    out_dtype: torch.dtype,
    block_r: int,
    block_t: int,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
) -> torch.Tensor:
    n_tok = b.shape[0]
    if out is None:
        out = torch.empty((n_tok, n_rows), dtype=out_dtype, device=b.device)
    grid = (triton.cdiv(n_rows, block_r), triton.cdiv(n_tok, block_t))
    _kernel(_csr_spmm_kernel)[grid](
        crow,
        col,
        values,
        perm if perm is not None else col,  # not read when HAS_PERM is False
        b,
        out,
        n_rows,
        n_tok,
        b.stride(0),
        b.stride(1),
        out.stride(0),
        out.stride(1),
        HAS_PERM=perm is not None,
        ACCUMULATE=accumulate,
        ACC_DTYPE=_acc(b, values),
        BLOCK_R=block_r,
        BLOCK_T=block_t,
    )
    return out


def spmm(
    x: torch.Tensor,
    support: SparseSupport,
    values: torch.Tensor,
    add_to: torch.Tensor | None = None,
    *,
    coalesce: bool = True,
    block_r: int = SPMM_BLOCK_R,
    block_t: int = SPMM_BLOCK_T,
) -> torch.Tensor:
    """``y = x · Sᵀ`` for ``x`` of shape ``(tokens, in)``; returns ``(tokens, out)`` in ``x.dtype``.

    With ``add_to`` (``(tokens, out_features)``, any float dtype and strides), adds ``x · Sᵀ`` into it in place (in
    the kernel: read, add in fp32, store) and returns it. ``coalesce``: read ``x`` through a feature-major copy
    (default; see the module docstring). The block sizes are keyword-only knobs for tests and tuning.
    """
    _require_triton()
    out_features, in_features = support.shape
    _check_2d("x", x, in_features, "in_features")
    _check_float("x", x)
    _check_float("values", values)
    _check_device(x, values)
    if values.shape != (support.nnz,):
        raise ValueError(f"spmm: values have shape {tuple(values.shape)}, the support has {support.nnz} entries.")
    if add_to is not None:
        if tuple(add_to.shape) != (x.shape[0], out_features):
            raise ValueError(f"spmm: add_to has shape {tuple(add_to.shape)}, expected {(x.shape[0], out_features)}.")
        _check_float("add_to", add_to)
        _check_device(x, add_to)
    if support.nnz == 0 or x.shape[0] == 0:
        return x.new_zeros(x.shape[0], out_features) if add_to is None else add_to
    lay = support.kernel_layouts(x.device)
    b = feature_major(x) if coalesce else x
    return _spmm_launch(
        b, lay.crow, lay.col, values.contiguous(), None, out_features, x.dtype, block_r, block_t,
        out=add_to, accumulate=add_to is not None,
    )


def spmm_t(
    g: torch.Tensor,
    support: SparseSupport,
    values: torch.Tensor,
    *,
    out_dtype: torch.dtype | None = None,
    into: torch.Tensor | None = None,
    coalesce: bool = True,
    block_r: int = SPMM_BLOCK_R,
    block_t: int = SPMM_BLOCK_T,
) -> torch.Tensor:
    """``∂x = g · S`` for ``g`` of shape ``(tokens, out)``; returns ``(tokens, in)`` in ``out_dtype`` (default
    ``g.dtype``), written into ``into`` if given (then its dtype wins).

    Walks the CSR of Sᵀ (columns of S), reading each value through the cached column-major permutation.
    """
    _require_triton()
    out_features, in_features = support.shape
    _check_2d("g", g, out_features, "out_features")
    _check_float("g", g)
    _check_float("values", values)
    _check_device(g, values)
    if values.shape != (support.nnz,):
        raise ValueError(f"spmm_t: values have shape {tuple(values.shape)}, the support has {support.nnz} entries.")
    out_dtype = out_dtype or g.dtype
    if into is not None:
        if tuple(into.shape) != (g.shape[0], in_features):
            raise ValueError(f"spmm_t: into has shape {tuple(into.shape)}, expected {(g.shape[0], in_features)}.")
        _check_float("into", into)
        _check_device(g, into)
    if support.nnz == 0 or g.shape[0] == 0:
        return g.new_zeros(g.shape[0], in_features, dtype=out_dtype) if into is None else into.zero_()
    lay = support.kernel_layouts(g.device)
    b = feature_major(g) if coalesce else g
    return _spmm_launch(
        b, lay.ccol, lay.t_row, values.contiguous(), lay.t_perm, in_features, out_dtype, block_r, block_t, out=into
    )


def _sddmm_split(n_blocks: int, n_tok: int, block_t: int, device: torch.device) -> int:
    """How many token ranges to split the sddmm over so that the grid has enough programs to fill the device."""
    if device.type != "cuda":
        return 1
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(n_tok, 4 * block_t), triton.cdiv(target, n_blocks)))


def sddmm(
    g: torch.Tensor,
    x: torch.Tensor,
    support: SparseSupport,
    out_dtype: torch.dtype | None = None,
    *,
    coalesce: bool = True,
    split: int | None = None,
    block_n: int = SDDMM_BLOCK_N,
    block_t: int = SDDMM_BLOCK_T,
) -> torch.Tensor:
    """``∂v = (gᵀ · x)[support]`` for ``g`` ``(tokens, out)`` and ``x`` ``(tokens, in)``; returns ``(nnz,)``.

    The result has ``out_dtype`` (default ``g.dtype``), accumulated in fp32 (fp64 for fp64 inputs). ``split``: the
    number of token ranges (default: enough programs to fill the GPU, 1 in the interpreter).
    """
    _require_triton()
    out_features, in_features = support.shape
    _check_2d("g", g, out_features, "out_features")
    _check_2d("x", x, in_features, "in_features")
    if g.shape[0] != x.shape[0]:
        raise ValueError(f"sddmm: g has {g.shape[0]} tokens, x has {x.shape[0]}.")
    _check_float("g", g)
    _check_float("x", x)
    _check_device(g, x)
    out_dtype = out_dtype or g.dtype
    nnz, n_tok = support.nnz, g.shape[0]
    if nnz == 0:
        return g.new_zeros(0, dtype=out_dtype)
    if n_tok == 0:
        return g.new_zeros(nnz, dtype=out_dtype)
    lay = support.kernel_layouts(g.device)
    if coalesce:
        g, x = feature_major(g), feature_major(x)
    n_blocks = triton.cdiv(nnz, block_n)
    split = split or _sddmm_split(n_blocks, n_tok, block_t, g.device)
    split = max(1, min(int(split), triton.cdiv(n_tok, block_t)))
    tok_per_split = triton.cdiv(triton.cdiv(n_tok, split), block_t) * block_t
    split = triton.cdiv(n_tok, tok_per_split)
    part = torch.empty((split, nnz), dtype=_acc_torch(g, x), device=g.device)
    _kernel(_sddmm_kernel)[(n_blocks, split)](
        lay.row,
        lay.col,
        g,
        x,
        part,
        nnz,
        n_tok,
        tok_per_split,
        g.stride(0),
        g.stride(1),
        x.stride(0),
        x.stride(1),
        ACC_DTYPE=_acc(g, x),
        BLOCK_N=block_n,
        BLOCK_T=block_t,
    )
    total = part[0] if split == 1 else part.sum(0)
    return total.to(out_dtype)


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
    """``(spmm_t(g, S, v), sddmm(g, x, S))``, with ``g`` made feature-major once for both kernels.

    Same contract as :func:`sparse_lowrank_peft.delta.reference.backward`: ``x`` is read only for the values
    gradient, ``values`` only for the input gradient; a gradient not asked for is ``None``; ``∂x`` is written into
    ``grad_x_into`` when given.
    """
    if need_x or need_values:
        g = feature_major(g)
    grad_x = spmm_t(g, support, values, out_dtype=x_dtype or g.dtype, into=grad_x_into) if need_x else None
    grad_v = sddmm(g, x, support, out_dtype=values_dtype or g.dtype) if need_values else None
    return grad_x, grad_v
