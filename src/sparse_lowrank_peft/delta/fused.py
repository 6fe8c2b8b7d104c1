"""The fused-weight path of the sparse term: ``y = x · (W0 + Σ_a S_a)ᵀ + b`` through the base layer's own GEMMs.

``x·W0ᵀ + x·Sᵀ = x·(W0 + S)ᵀ``. Scattering the ``nnz`` values of S into a transient copy of the frozen weight costs
one pass over ``out × in`` memory; after it, the forward and the input gradient ``∂x = ∂y · (W0 + S)`` are the two
GEMMs the frozen layer does anyway, and no SpMM is left. The only sparse work is the values' gradient
``∂v = (∂yᵀ · x)[support]`` (an SDDMM: sampled, or a dense ``∂yᵀ·x`` GEMM and a gather, chosen by
``ops.resolve_sddmm``). The transient ``W0 + S`` is built in the compute dtype in forward, freed after its GEMM,
rebuilt in backward; it is never saved, so at most one ``out × in`` transient is alive per layer being computed.

A 4-bit base is dequantized into the transient (what bitsandbytes does inside its own matmul anyway), so a sparse
tuner on a 4-bit base costs what QLoRA costs. Conv1D's ``(in, out)`` weight is read transposed. In a half-precision
compute dtype ``W0 + S`` is rounded to that dtype, as ``merge_and_unload`` rounds the merged weight: the forward
sees what the deployed merged model computes; the values and their gradients stay in their own dtype.

A term may also be *factored*, ``ΔW = scale · L·S`` with a frozen sparse ``L`` (:class:`FrozenFactor`): sparse
RandLoRA's ``B·T``, whose two SpMMs per product (and their transposes in backward) become one build of ``L·S`` into
the transient weight (``nnz(L) · c`` multiply-adds, in blocks of columns so no second ``out × in`` tensor exists) and
``∂v = scale · (Lᵀ · ∂yᵀx)[support]`` (sampled: ``∂y·L`` then the SDDMM; or from the dense ``∂yᵀx``).

When it pays: see ``ops.resolve_sparse_path`` (the dispatcher) and ``bench/results/dispatch-<device>.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from .support import SparseSupport

__all__ = [
    "FrozenFactor", "FusedSparseLinear", "dense_copy", "fused_backward", "fused_forward", "fused_sparse_linear",
    "weight_source",
]


def weight_source(base: torch.nn.Module, dtype: torch.dtype) -> Callable[[], torch.Tensor] | None:
    """A function returning a fresh ``(out, in)`` copy of ``base``'s weight in ``dtype`` (nn.Linear, Conv1D, 4-bit
    bitsandbytes), or None for a base this path cannot read (8-bit, HQQ, offloaded with accelerate hooks)."""
    if hasattr(base, "_hf_hook"):
        return None
    weight = getattr(base, "weight", None)
    if weight is None:
        return None
    if hasattr(weight, "quant_state"):
        from .quant import dequantize_weight

        return lambda: dequantize_weight(base).to(dtype)
    if type(weight).__module__.startswith("bitsandbytes") or not weight.is_floating_point():
        return None
    return dense_copy(weight, isinstance(base, Conv1D), dtype)


def dense_copy(weight: torch.Tensor, transposed: bool, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    """A function returning a fresh ``(out, in)`` copy of a float weight in ``dtype`` (``transposed``: a Conv1D's
    ``(in, out)`` weight, read transposed)."""
    def fresh() -> torch.Tensor:
        src = weight.detach().t() if transposed else weight.detach()
        return torch.empty(src.shape, dtype=dtype, device=src.device).copy_(src)

    return fresh


#: FrozenFactor.add_into builds a factored term in blocks of S's columns: at least BUILD_BLOCKS of them, and each
#: block's buffers (the densified block of S, the SpMM's transposed input, output and row copy) at most
#: BUILD_BLOCK_BYTES each. tests/test_memory.py, 4096², sparse RandLoRA r 256: 16 blocks alone peaked at 74.7 / 80.1
#: MiB above the unavoidable (two environments; one transient W0 + ΔW is 64 MiB, the bound 80): the four 4 MiB block
#: buffers sat on top of it. Capped at 1 MiB they add at most 4 MiB; at d 768 the 16 blocks are already smaller.
BUILD_BLOCKS = 16
BUILD_BLOCK_BYTES = 2**20


@dataclass(frozen=True)
class FrozenFactor:
    """A frozen sparse left factor ``L`` (``p × k``) of a factored sparse term: ``ΔW = scale · L·S`` (``p × c``, the
    layer's ``(out, in)``), or with ``transposed`` ``ΔW = scale · (L·S)ᵀ`` (``p = in``, ``c = out``), where ``S``
    (``k × c``) carries the trainable values. Sparse RandLoRA's ``B·T`` is one (``L = B``, ``S = T``)."""

    support: SparseSupport
    values: torch.Tensor
    scale: float = 1.0
    transposed: bool = False

    def add_into(self, W: torch.Tensor, support: SparseSupport, values: torch.Tensor) -> None:
        """``W += ΔW`` in place (``W``: ``(out, in)``, ``values`` on ``support``): one SpMM with ``L`` per block of
        ``S``'s columns, each block densified on its own (``nnz(L) · c`` multiply-adds in all).

        Blocks keep the transient small: ``S`` densified whole would be a second ``out × in``-sized tensor beside
        ``W`` for sparse RandLoRA (``k = N·r ≈ min(out, in)``); see ``BUILD_BLOCKS`` / ``BUILD_BLOCK_BYTES``.
        """
        from .ops import get_ops

        k, c = support.shape
        _, by_column = support.layouts(W.device)  # S's entries in column-major order, with column pointers
        rows = by_column.col
        cols = support.cols(W.device)[by_column.perm]
        vals = values.detach().to(W.dtype)[by_column.perm]
        l_vals = self.values.to(W.dtype) * self.scale
        target = W if self.transposed else W.t()  # (c, p): ΔWᵀ = S_denseᵀ · Lᵀ is what spmm computes
        ptr = by_column.crow.tolist()
        row_bytes = max(k, self.support.shape[0]) * W.element_size()
        step = max(1, min(-(-c // BUILD_BLOCKS), BUILD_BLOCK_BYTES // row_bytes))
        ops = get_ops(W.device)
        for j0 in range(0, c, step):
            j1 = min(c, j0 + step)
            a, b = ptr[j0], ptr[j1]
            block = W.new_zeros(j1 - j0, k)
            block.view(-1).index_put_(((cols[a:b] - j0) * k + rows[a:b],), vals[a:b])
            ops.spmm(block, self.support, l_vals, add_to=target[j0:j1])


def _fused_weight(source, supports, values, factors) -> torch.Tensor:
    """``W0 + Σ ΔW_a``: a fresh copy of W0 with each term added (plain terms scattered, factored ones by one SpMM)."""
    W = source()
    flat_w = W.view(-1)
    for support, v, factor in zip(supports, values, factors):
        if factor is None:
            flat_w.index_add_(0, support.flat(W.device), v.detach().to(W.dtype))
        else:
            factor.add_into(W, support, v)
    return W


class FusedSparseLinear(torch.autograd.Function):
    """``y = x · (W0 + Σ ΔW_a)ᵀ + b``; ``∂x = ∂y · (W0 + Σ ΔW_a)``, ``∂b = Σ ∂y``, and per term
    ``∂v_a = (∂yᵀ x)[support_a]`` (``ΔW_a = S_a``) or ``scale · (Lᵀ (∂yᵀ x))[support_a]`` (``ΔW_a = scale · L·S_a``).

    Saves ``x`` (which the frozen layer's GEMM saves anyway) and the values; the weight is rebuilt in backward.
    """

    @staticmethod
    def forward(ctx, x, bias, source, supports, sddmm_paths, factors, *values):
        y = fused_forward(x, source, bias, supports, values, factors)
        ctx.source, ctx.supports = source, supports
        ctx.sddmm_paths, ctx.factors = sddmm_paths, factors
        ctx.save_for_backward(x, *values)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, *values = ctx.saved_tensors
        grad_x, grad_bias, grad_values = fused_backward(
            grad, x, ctx.source, ctx.supports, values, ctx.sddmm_paths, ctx.factors,
            need_x=ctx.needs_input_grad[0], need_bias=ctx.needs_input_grad[1], need_values=ctx.needs_input_grad[6:],
        )
        return (grad_x, grad_bias, None, None, None, None, *grad_values)


def fused_forward(x, source, bias, supports, values, factors) -> torch.Tensor:
    """``x · (W0 + Σ ΔW_a)ᵀ + b`` with one transient ``W0 + Σ ΔW_a``, freed before returning."""
    W = _fused_weight(source, supports, values, factors)
    y = F.linear(x, W, bias)
    del W
    return y


def fused_backward(grad, x, source, supports, values, sddmm_paths, factors, need_x: bool, need_bias: bool,
                   need_values: Sequence[bool]) -> tuple[torch.Tensor | None, torch.Tensor | None, list]:
    """``(∂x, ∂b, [∂v_a])`` of :func:`fused_forward` (None where not needed)."""
    g2d = grad.reshape(-1, grad.shape[-1])
    x2d = x.reshape(-1, x.shape[-1])
    # The values' gradients first: their temporaries are gone before the transient weight and the input
    # gradient exist. bench/sparse_delta.py, 4,096 x 1024², peak above LoRA: 8.54 MB in the other order
    # (bench/results/sparse_delta-cpu.json at commit ce158d5), 4.15 MB in this one (the current file).
    dense_gx = _DenseGrad(g2d, x2d)
    grad_values = [
        _values_grad(g2d, x2d, dense_gx, support, v.dtype, path, factor) if need else None
        for support, v, path, factor, need in zip(supports, values, sddmm_paths, factors, need_values)
    ]
    del dense_gx
    grad_bias = g2d.sum(0) if need_bias else None
    grad_x = None
    if need_x:
        W = _fused_weight(source, supports, values, factors)
        grad_x = grad.matmul(W.to(grad.dtype))
        del W
    return grad_x, grad_bias, grad_values


class _DenseGrad:
    """``∂yᵀ·x`` (``out × in``, fp32 or fp64), computed on first use and shared by the terms that ask for it."""

    def __init__(self, g2d: torch.Tensor, x2d: torch.Tensor):
        self.g2d, self.x2d, self._value = g2d, x2d, None

    def get(self) -> torch.Tensor:
        if self._value is None:
            acc = torch.float64 if torch.float64 in (self.g2d.dtype, self.x2d.dtype) else torch.float32
            self._value = self.g2d.t().to(acc) @ self.x2d.to(acc)
        return self._value


def _values_grad(g2d, x2d, dense_gx: _DenseGrad, support: SparseSupport, dtype, path: str,
                 factor: FrozenFactor | None) -> torch.Tensor:
    """One term's values gradient, by the sampled SDDMM (``ops.get_ops``: reference on CPU, Triton on CUDA) or from
    the dense ``∂yᵀ·x`` (one transient ``out × in``, shared by the layer's terms) and a gather."""
    from .ops import get_ops

    ops = get_ops(g2d.device)
    if factor is None:
        if path == "dense":
            return dense_gx.get().view(-1).index_select(0, support.flat(g2d.device)).to(dtype)
        return ops.sddmm(_contiguous(g2d), _contiguous(x2d), support, out_dtype=dtype)
    if path == "dense":  # ∂S = scale · Lᵀ·G' with G' = ∂yᵀx (or its transpose): (G'ᵀ·L)ᵀ by one spmm_t
        G = dense_gx.get()
        g_prime_t = G if factor.transposed else G.t()  # (c, p)
        lt_g = ops.spmm_t(_contiguous(g_prime_t), factor.support, factor.values.to(G.dtype))  # (c, k)
        flat_t = support.flat(g2d.device, transposed=True)
        return lt_g.view(-1).index_select(0, flat_t).mul_(factor.scale).to(dtype)
    # y += scale·x·Sᵀ·Lᵀ: ∂S = scale·((∂y·L)ᵀ x)[support]; transposed, y += scale·x·L·S: ∂S = scale·((x·L)ᵀ ∂y)[support]
    through_l, other = (x2d, g2d) if factor.transposed else (g2d, x2d)
    h = ops.spmm_t(_contiguous(through_l), factor.support, factor.values.to(through_l.dtype))
    return ops.sddmm(h, _contiguous(other), support, out_dtype=dtype).mul_(factor.scale)


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def fused_sparse_linear(
    x: torch.Tensor,
    source: Callable[[], torch.Tensor],
    bias: torch.Tensor | None,
    supports: Sequence[SparseSupport],
    values: Sequence[torch.Tensor],
    sddmm_paths: Sequence[str],
    factors: Sequence[FrozenFactor | None] | None = None,
) -> torch.Tensor:
    """``x · (W0 + Σ S_a)ᵀ + b`` for ``x`` ``(..., in)`` in the compute dtype; returns ``(..., out)``.

    Args:
        source: returns a fresh ``(out, in)`` copy of W0 in ``x``'s dtype (:func:`weight_source`).
        bias: the base layer's bias (in ``x``'s dtype) or None.
        supports / values: one ``(support, (nnz,) values)`` per adapter with a sparse term.
        sddmm_paths: per adapter, ``"sampled"`` or ``"dense"`` (``ops.resolve_sddmm``).
        factors: per adapter, None (``ΔW = S``) or the :class:`FrozenFactor` of a factored term.
    """
    factors = tuple(factors) if factors is not None else (None,) * len(supports)
    return FusedSparseLinear.apply(x, bias, source, tuple(supports), tuple(sddmm_paths), factors, *values)
