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

When it pays: see ``ops.resolve_sparse_path`` (the dispatcher) and ``bench/results/dispatch-<device>.json``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from .support import SparseSupport

__all__ = ["FusedSparseLinear", "fused_sparse_linear", "weight_source"]


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
    transposed = isinstance(base, Conv1D)

    def fresh() -> torch.Tensor:
        src = weight.detach().t() if transposed else weight.detach()
        return torch.empty(src.shape, dtype=dtype, device=src.device).copy_(src)

    return fresh


def _fused_weight(source, flats: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> torch.Tensor:
    W = source()
    flat_w = W.view(-1)
    for flat, v in zip(flats, values):
        flat_w.index_add_(0, flat, v.detach().to(W.dtype))
    return W


class FusedSparseLinear(torch.autograd.Function):
    """``y = x · (W0 + Σ S_a)ᵀ + b``; ``∂x = ∂y · (W0 + Σ S_a)``, ``∂v_a = (∂yᵀ x)[support_a]``, ``∂b = Σ ∂y``.

    Saves ``x`` (which the frozen layer's GEMM saves anyway) and the values; the weight is rebuilt in backward.
    """

    @staticmethod
    def forward(ctx, x, bias, source, supports, sddmm_paths, *values):
        flats = [s.flat(x.device) for s in supports]
        W = _fused_weight(source, flats, values)
        y = F.linear(x, W, bias)
        del W
        ctx.source, ctx.supports, ctx.flats, ctx.sddmm_paths = source, supports, flats, sddmm_paths
        ctx.save_for_backward(x, *values)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, *values = ctx.saved_tensors
        need_x, need_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g2d = grad.reshape(-1, grad.shape[-1])
        x2d = x.reshape(-1, x.shape[-1])
        # The values' gradients first: their temporaries are gone before the transient weight and the input
        # gradient exist. bench/sparse_delta.py, 4,096 x 1024², peak above LoRA: 8.54 MB in the other order
        # (bench/results/sparse_delta-cpu.json at commit ce158d5), 4.15 MB in this one (the current file).
        grad_values = [
            _values_grad(g2d, x2d, support, flat, v.dtype, path) if ctx.needs_input_grad[5 + i] else None
            for i, (support, flat, v, path) in enumerate(zip(ctx.supports, ctx.flats, values, ctx.sddmm_paths))
        ]
        grad_bias = g2d.sum(0) if need_bias else None
        grad_x = None
        if need_x:
            W = _fused_weight(ctx.source, ctx.flats, values)
            grad_x = grad.matmul(W.to(grad.dtype))
            del W
        return (grad_x, grad_bias, None, None, None, *grad_values)


def _values_grad(g2d, x2d, support: SparseSupport, flat, dtype, path: str) -> torch.Tensor:
    """``(gᵀ x)[support]`` by a sampled SDDMM (``ops.get_ops``: reference on CPU, Triton on CUDA) or by the dense
    ``gᵀ x`` GEMM and a gather (one transient ``out × in`` in fp32)."""
    if path == "dense":
        acc = torch.float64 if torch.float64 in (g2d.dtype, x2d.dtype) else torch.float32
        return (g2d.t().to(acc) @ x2d.to(acc)).view(-1).index_select(0, flat).to(dtype)
    from .ops import get_ops

    return get_ops(g2d.device).sddmm(_contiguous(g2d), _contiguous(x2d), support, out_dtype=dtype)


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def fused_sparse_linear(
    x: torch.Tensor,
    source: Callable[[], torch.Tensor],
    bias: torch.Tensor | None,
    supports: Sequence[SparseSupport],
    values: Sequence[torch.Tensor],
    sddmm_paths: Sequence[str],
) -> torch.Tensor:
    """``x · (W0 + Σ S_a)ᵀ + b`` for ``x`` ``(..., in)`` in the compute dtype; returns ``(..., out)``.

    Args:
        source: returns a fresh ``(out, in)`` copy of W0 in ``x``'s dtype (:func:`weight_source`).
        bias: the base layer's bias (in ``x``'s dtype) or None.
        supports / values: one ``(support, (nnz,) values)`` per adapter with a sparse term.
        sddmm_paths: per adapter, ``"sampled"`` or ``"dense"`` (``ops.resolve_sddmm``).
    """
    return FusedSparseLinear.apply(x, bias, source, tuple(supports), tuple(sddmm_paths), *values)
