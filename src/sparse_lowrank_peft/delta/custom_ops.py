"""The sparse term as ``torch.library`` custom ops: what ``torch.compile`` traces in place of the autograd Functions.

Eager code runs the autograd Functions of ``ops.py`` (SpMM path) and ``fused.py`` (fused-weight path). Dynamo cannot
trace them: the support's layouts are cached on a Python object, the CPU kernels build ``torch.sparse`` CSR tensors,
and the CUDA ones are Triton launchers. Before these ops, each layer with a sparse term ran eagerly under
``torch.compile``, one graph break per layer (``bench/results/compile-cpu-before-6bc1bf5.json``). Registered as custom
ops, the same kernels are opaque nodes of the graph, each with a fake implementation (output shapes and dtypes for
tracing) and a registered backward, so a model with SLTrain on every linear compiles to one graph, as LoRA does:

* ``slpeft::sparse_delta(x, indices, values, out, in)``: ``x · Sᵀ`` (the SpMM path);
  backward ``slpeft::sparse_delta_backward``: ``(g · S, (gᵀx)[support])``;
* ``slpeft::fused_linear(x, weight, bias, indices, values, ...)``: ``x · (W0 + Σ S_a)ᵀ + b`` (the fused-weight
  path, a plain float ``nn.Linear`` / ``Conv1D`` weight); backward ``slpeft::fused_linear_backward``.

The ops compute exactly what the autograd Functions compute: they call the same functions (``get_ops(device)``'s
kernels, ``fused.fused_forward`` / ``fused_backward``). A support is passed as its ``(2, nnz)`` index buffer, the
tensor the adapter saves; :func:`support_of` finds the :class:`SparseSupport` made for that buffer (its layouts
cached) by the buffer's identity and version, so a compiled step builds no layout either.

Not covered, so those layers still run eagerly (``DeltaLayer.traceable``): a factored term (sparse RandLoRA's ``B·T``,
whose bases come from a lock-guarded cache) and a base whose weight is not a plain float tensor (4-bit and 8-bit
bitsandbytes, HQQ, accelerate-offloaded).
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch

from .fused import dense_copy, fused_backward, fused_forward
from .ops import get_ops, plain_sddmm
from .support import SparseSupport

__all__ = ["fused_linear", "sparse_delta", "support_of"]

# id(index buffer) -> (weak reference to it, its _version, shape, the SparseSupport holding a copy of it)
_SUPPORTS: dict[int, tuple[weakref.ref, int, tuple[int, int], SparseSupport]] = {}


def support_of(indices: torch.Tensor, shape: tuple[int, int]) -> SparseSupport:
    """The :class:`SparseSupport` of an adapter's index buffer, made on first use and cached while the buffer lives
    unchanged (same object, same ``_version``). It holds a copy of the indices, so the cache keeps no buffer alive:
    the entry goes with the buffer."""
    shape = (int(shape[0]), int(shape[1]))
    key = id(indices)
    entry = _SUPPORTS.get(key)
    if entry is not None and entry[0]() is indices and entry[1] == indices._version and entry[2] == shape:
        return entry[3]
    support = SparseSupport(indices.detach().clone(), shape, validate=False)
    ref = weakref.ref(indices, lambda _, key=key: _SUPPORTS.pop(key, None))
    _SUPPORTS[key] = (ref, indices._version, shape, support)
    return support


# ---------------------------------------------------------------------------------------------------------- SpMM path
@torch.library.custom_op("slpeft::sparse_delta", mutates_args=())
def _sparse_delta(x: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, out_features: int,
                  in_features: int) -> torch.Tensor:
    return get_ops(x.device).spmm(x, support_of(indices, (out_features, in_features)), values)


@_sparse_delta.register_fake
def _(x, indices, values, out_features, in_features):
    return x.new_empty(x.shape[0], out_features)


@torch.library.custom_op("slpeft::sparse_delta_backward", mutates_args=())
def _sparse_delta_backward(grad: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
                           out_features: int, in_features: int, need_x: bool,
                           need_values: bool) -> tuple[torch.Tensor, torch.Tensor]:
    support = support_of(indices, (out_features, in_features))
    grad_x, grad_v = get_ops(grad.device).backward(
        grad, x, support, values, need_x=need_x, need_values=need_values, x_dtype=x.dtype, values_dtype=values.dtype,
    )
    return (grad_x if need_x else x.new_empty(0)), (grad_v if need_values else values.new_empty(0))


@_sparse_delta_backward.register_fake
def _(grad, x, indices, values, out_features, in_features, need_x, need_values):
    return (x.new_empty(x.shape) if need_x else x.new_empty(0)), (values.new_empty(values.shape) if need_values
                                                                  else values.new_empty(0))


def _sparse_delta_setup(ctx, inputs, output):
    x, indices, values, out_features, in_features = inputs
    ctx.shape = (out_features, in_features)
    ctx.save_for_backward(x, indices, values)


def _sparse_delta_grad(ctx, grad):
    x, indices, values = ctx.saved_tensors
    need_x, need_values = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    grad_x, grad_v = _sparse_delta_backward(grad.contiguous(), x, indices, values, *ctx.shape, need_x, need_values)
    return (grad_x if need_x else None), None, (grad_v if need_values else None), None, None


_sparse_delta.register_autograd(_sparse_delta_grad, setup_context=_sparse_delta_setup)


def sparse_delta(x: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """``x · Sᵀ`` for ``x`` ``(..., in)`` (S: ``indices`` and ``values`` of an ``(out, in)`` matrix); ``(..., out)``
    in ``x.dtype``. The traced twin of ``ops.sparse_delta`` (no ``add_to``: the compiler fuses the sum)."""
    out_features, in_features = shape
    x2d = x.reshape(-1, in_features).contiguous()
    y = _sparse_delta(x2d, indices, values, out_features, in_features)
    return y.view(*x.shape[:-1], out_features)


# ---------------------------------------------------------------------------------------------------------- fused path
def _supports(indices: list[torch.Tensor], out_features: int, in_features: int) -> list[SparseSupport]:
    return [support_of(i, (out_features, in_features)) for i in indices]


@torch.library.custom_op("slpeft::fused_linear", mutates_args=())
def _fused_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], indices: list[torch.Tensor],
                  values: list[torch.Tensor], out_features: int, in_features: int,
                  weight_transposed: bool) -> torch.Tensor:
    supports = _supports(indices, out_features, in_features)
    source = dense_copy(weight, weight_transposed, x.dtype)
    return fused_forward(x, source, bias, supports, values, (None,) * len(supports))


@_fused_linear.register_fake
def _(x, weight, bias, indices, values, out_features, in_features, weight_transposed):
    return x.new_empty(x.shape[0], out_features)


@torch.library.custom_op("slpeft::fused_linear_backward", mutates_args=())
def _fused_linear_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, indices: list[torch.Tensor],
                           values: list[torch.Tensor], out_features: int, in_features: int, weight_transposed: bool,
                           dense_sddmm: list[bool], need_x: bool, need_bias: bool,
                           need_values: list[bool]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    supports = _supports(indices, out_features, in_features)
    source = dense_copy(weight, weight_transposed, x.dtype)
    sddmm = ["dense" if dense else "sampled" for dense in dense_sddmm]  # a schema takes no list of strings
    grad_x, grad_bias, grad_values = fused_backward(grad, x, source, supports, values, sddmm,
                                                    (None,) * len(supports), need_x, need_bias, need_values)
    return ((grad_x if need_x else x.new_empty(0)), (grad_bias if need_bias else grad.new_empty(0)),
            [g if g is not None else v.new_empty(0) for g, v in zip(grad_values, values)])


@_fused_linear_backward.register_fake
def _(grad, x, weight, indices, values, out_features, in_features, weight_transposed, dense_sddmm, need_x, need_bias,
      need_values):
    return ((x.new_empty(x.shape) if need_x else x.new_empty(0)),
            (grad.new_empty(out_features) if need_bias else grad.new_empty(0)),
            [v.new_empty(v.shape) if need else v.new_empty(0) for v, need in zip(values, need_values)])


def _fused_linear_setup(ctx, inputs, output):
    x, weight, bias, indices, values, out_features, in_features, weight_transposed = inputs
    ctx.shape, ctx.weight_transposed, ctx.count = (out_features, in_features), weight_transposed, len(values)
    ctx.save_for_backward(x, weight, *indices, *values)


def _fused_linear_grad(ctx, grad):
    x, weight, *rest = ctx.saved_tensors
    indices, values = rest[:ctx.count], rest[ctx.count:]
    # a list input's entry of needs_input_grad is a list (torch.library unflattens it to the inputs' structure)
    need_x, need_bias, need_values = ctx.needs_input_grad[0], ctx.needs_input_grad[2], list(ctx.needs_input_grad[4])
    dense = [plain_sddmm(i.shape[1] / (ctx.shape[0] * ctx.shape[1]), grad.device) == "dense" for i in indices]
    grad_x, grad_bias, grad_values = _fused_linear_backward(
        grad.contiguous(), x, weight, list(indices), list(values), *ctx.shape, ctx.weight_transposed, dense, need_x,
        need_bias, need_values,
    )
    grads_v = [g if need else None for g, need in zip(grad_values, need_values)]
    return ((grad_x if need_x else None), None, (grad_bias if need_bias else None), [None] * ctx.count, grads_v, None,
            None, None)


_fused_linear.register_autograd(_fused_linear_grad, setup_context=_fused_linear_setup)


def fused_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], indices: list[torch.Tensor],
                 values: list[torch.Tensor], shape: tuple[int, int], weight_transposed: bool) -> torch.Tensor:
    """``x · (W0 + Σ S_a)ᵀ + b`` for ``x`` ``(..., in)`` in the compute dtype (``weight``: a Linear's ``(out, in)``
    or, ``weight_transposed``, a Conv1D's ``(in, out)``); ``(..., out)``. The traced twin of
    ``fused.fused_sparse_linear`` for plain terms on a float weight."""
    out_features, in_features = shape
    x2d = x.reshape(-1, in_features).contiguous()
    y = _fused_linear(x2d, weight, bias, list(indices), list(values), out_features, in_features, weight_transposed)
    return y.view(*x.shape[:-1], out_features)
