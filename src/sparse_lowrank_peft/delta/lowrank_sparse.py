"""``y = x · (s·B·A + S)ᵀ + b`` as one autograd op, with no dense weight kept: SLTrain's pretraining layer.

SLTrain (Han et al., "SLTrain: a sparse plus low-rank approach for parameter and memory efficient pretraining",
NeurIPS 2024, arXiv 2406.02214) parametrises every weight as ``W = s·B·A + S`` with ``B`` ``(out, r)``, ``A``
``(r, in)``, ``s = α / r`` and ``S`` a fixed random support (:class:`SparseSupport`) holding ``nnz`` trainable values.

Forward builds the transient ``W`` in the compute dtype (one ``out × r × in`` GEMM, then the values added into its
flat view at ``support.flat()``), does the one ``F.linear`` a dense layer does, and frees ``W``. Only ``x``, ``B``,
``A`` and the values are saved (the parameters exist anyway), so a layer keeps no ``out × in`` tensor between forward
and backward. Backward, in this order, so at most one ``out × in`` transient is alive at a time (the package's memory
rule, ``tests/test_memory.py``):

1. ``G = gᵀ·x`` (``out × in``, the weight gradient a dense layer would form), then ``∂B = s·G·Aᵀ``,
   ``∂A = s·Bᵀ·G``, ``∂v = G.flatten()[flat]``; ``G`` is freed;
2. ``W`` is rebuilt and ``∂x = g·W``; ``W`` is freed.

This is what the paper's own CUDA/C++ extension does (``sparse-lora/sparse_linear.cpp`` in andyjm3/SLTrain: forward
``W = B·A``, ``scatter_add_`` of the values, ``linear``; backward rebuilds ``W`` for ``∂x``, forms the dense
``weight_grad = gᵀ·x`` and derives ``∂B``, ``∂A`` and the values' gradient (a gather) from it). Here the scale ``s``
is applied inside the op (the paper multiplies ``A`` by it before the call, which allocates a scaled copy of ``A``
and a second autograd node) and the two transients never overlap (the paper's keeps ``W`` alive while it forms
``gᵀ·x``). The dense ``G`` costs ``tokens·out·in`` multiply-adds, the same as a dense layer's weight gradient; the
factored alternative (``∂B = s·gᵀ·(x·Aᵀ)``, ``∂A = s·(g·B)ᵀ·x`` and a sampled SDDMM for ``∂v``) costs
``2·tokens·r·(in+out)`` plus the SDDMM, so it can only pay below ``r = in·out / (2·(in+out))`` (``d/4`` for a
square layer, where the paper's ranks sit or above); it is not used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["LowRankSparseLinear", "lowrank_sparse_linear", "lowrank_sparse_weight"]


def lowrank_sparse_weight(
    B: torch.Tensor,
    A: torch.Tensor,
    values: torch.Tensor | None,
    flat: torch.Tensor | None,
    scale: float,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The dense ``(out, in)`` matrix ``scale·B·A + S`` in ``dtype`` (default: ``B``'s), a fresh tensor.

    Args:
        B (`torch.Tensor`): ``(out, r)``.
        A (`torch.Tensor`): ``(r, in)``.
        values (`torch.Tensor`, *optional*): ``(nnz,)`` values of S (None: no sparse term).
        flat (`torch.Tensor`, *optional*): ``(nnz,)`` row-major positions (int32 or int64) of the values
            (:meth:`SparseSupport.flat`).
        scale (`float`): ``α / r``.
    """
    dtype = dtype or B.dtype
    W = torch.mm(B.detach().to(dtype), A.detach().to(dtype))
    if scale != 1.0:
        W.mul_(scale)
    if values is not None and values.numel():
        W.view(-1).index_add_(0, flat, values.detach().to(dtype))
    return W


class LowRankSparseLinear(torch.autograd.Function):
    """``y = x·Wᵀ + b`` with ``W = s·B·A + S`` built per call; ``∂x = g·W``, ``∂B = s·G·Aᵀ``, ``∂A = s·Bᵀ·G``,
    ``∂v = G[support]``, ``∂b = Σ g`` with ``G = gᵀ·x``. Saves ``x``, ``B``, ``A``, the values; never ``W`` or ``G``."""

    @staticmethod
    def forward(ctx, x, B, A, values, bias, flat, scale):
        W = lowrank_sparse_weight(B, A, values, flat, scale, x.dtype)
        y = F.linear(x, W, None if bias is None else bias.to(x.dtype))
        del W
        ctx.flat, ctx.scale, ctx.has_values = flat, scale, values is not None
        ctx.save_for_backward(x, B, A, values)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, B, A, values = ctx.saved_tensors
        need_x, need_B, need_A, need_v, need_b = ctx.needs_input_grad[:5]
        g2d = grad.reshape(-1, grad.shape[-1])
        grad_B = grad_A = grad_v = grad_b = grad_x = None
        if need_B or need_A or need_v:
            x2d = x.reshape(-1, x.shape[-1])
            acc = torch.float64 if torch.float64 in (g2d.dtype, x2d.dtype, B.dtype) else torch.float32
            G = g2d.t().to(acc) @ x2d.to(acc)  # (out, in): the one transient of this phase
            if need_v and ctx.has_values:
                grad_v = G.view(-1).index_select(0, ctx.flat).to(values.dtype)
            if need_B:
                grad_B = (G @ A.detach().to(acc).t()).mul_(ctx.scale).to(B.dtype)
            if need_A:
                grad_A = (B.detach().to(acc).t() @ G).mul_(ctx.scale).to(A.dtype)
            del G
        if need_b:
            grad_b = g2d.sum(0)
        if need_x:
            W = lowrank_sparse_weight(B, A, values, ctx.flat, ctx.scale, grad.dtype)
            grad_x = grad.matmul(W).to(x.dtype)
            del W
        return grad_x, grad_B, grad_A, grad_v, grad_b, None, None


def lowrank_sparse_linear(
    x: torch.Tensor,
    B: torch.Tensor,
    A: torch.Tensor,
    values: torch.Tensor | None,
    flat: torch.Tensor | None,
    scale: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x · (scale·B·A + S)ᵀ + bias`` for ``x`` of shape ``(..., in)``; returns ``(..., out)`` in ``x.dtype``.

    Args:
        x (`torch.Tensor`): activations ``(..., in)``.
        B (`torch.Tensor`): ``(out, r)``; A (`torch.Tensor`): ``(r, in)``.
        values (`torch.Tensor`, *optional*): ``(nnz,)`` values of S in the support's row-major order, or None.
        flat (`torch.Tensor`, *optional*): ``(nnz,)`` positions (int32 or int64) from :meth:`SparseSupport.flat` on ``x``'s
            device (None with ``values``).
        scale (`float`): ``α / r``.
        bias (`torch.Tensor`, *optional*): ``(out,)``.
    """
    if x.shape[-1] != A.shape[1] or B.shape[1] != A.shape[0]:
        raise ValueError(
            f"lowrank_sparse_linear: x has {x.shape[-1]} features, B is {tuple(B.shape)} and A is {tuple(A.shape)}; "
            "expected x (..., in), B (out, r), A (r, in)."
        )
    if (values is None) != (flat is None) or (values is not None and values.shape != flat.shape):
        raise ValueError(
            "lowrank_sparse_linear: values and flat must both be given with the same (nnz,) shape, or both be None "
            f"(got values {None if values is None else tuple(values.shape)}, "
            f"flat {None if flat is None else tuple(flat.shape)})."
        )
    return LowRankSparseLinear.apply(x, B, A, values, bias, flat, float(scale))
