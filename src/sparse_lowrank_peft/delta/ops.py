"""``sparse_delta(x, support, values)``: the sparse term ``x · Sᵀ`` as one autograd op, and the one backend dispatcher.

Backends, chosen by ``SLPEFT_SPARSE_BACKEND`` (read on every call, so tests can switch it):

* ``auto`` (default): Triton when the tensors are on CUDA and ``triton`` imports; the reference path otherwise.
* ``triton``: always Triton. On CPU tensors this needs ``TRITON_INTERPRET=1`` (the interpreter, which is how CI tests
  the kernels without a GPU). Where Triton cannot run this raises; it never falls back silently.
* ``reference``: always the pure-PyTorch path of ``reference.py``.

Forward and backward keep only ``x`` (which the frozen base layer saves anyway) and the values: no ``(out, in)``
tensor is ever allocated.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

from . import reference
from .support import SparseSupport

__all__ = ["sparse_delta", "resolve_backend", "get_ops", "BACKEND_ENV"]

BACKEND_ENV = "SLPEFT_SPARSE_BACKEND"
_BACKENDS = ("auto", "triton", "reference")


def _triton_module() -> ModuleType | None:
    try:
        from . import triton as triton_ops  # imports triton lazily
    except ImportError:
        return None
    return triton_ops


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(device: torch.device, backend: str | None = None) -> str:
    """The backend (``"triton"`` or ``"reference"``) used for tensors on ``device``; raises if the choice cannot run."""
    backend = (backend or os.environ.get(BACKEND_ENV, "auto")).strip().lower()
    if backend not in _BACKENDS:
        raise ValueError(
            f"{BACKEND_ENV}={backend!r} is not a sparse backend; use one of {', '.join(_BACKENDS)}."
        )
    if backend == "reference":
        return "reference"
    mod = _triton_module()
    if backend == "auto":
        return "triton" if (device.type == "cuda" and mod is not None and mod.is_available()) else "reference"
    # explicit triton
    if mod is None or not mod.is_available():
        raise RuntimeError(
            f"{BACKEND_ENV}=triton but Triton cannot be imported here. Install it with "
            f"`pip install 'sparse-lowrank-peft[triton]'`, or set {BACKEND_ENV}=auto."
        )
    if device.type != "cuda" and not _interpreting():
        raise RuntimeError(
            f"{BACKEND_ENV}=triton was asked for tensors on {device}, but Triton kernels run on CUDA only. "
            f"Set TRITON_INTERPRET=1 to run them in Triton's interpreter on CPU (slow; for tests), "
            f"or set {BACKEND_ENV}=auto to use the reference path."
        )
    return "triton"


def get_ops(device: torch.device, backend: str | None = None) -> ModuleType:
    """The module (``reference`` or ``triton``) providing ``spmm``, ``sddmm``, ``spmm_t`` and ``backward`` for ``device``."""
    return reference if resolve_backend(device, backend) == "reference" else _triton_module()


class SparseDeltaFunction(torch.autograd.Function):
    """Autograd for ``y = x · Sᵀ`` with trainable values: ``∂x = g · S``, ``∂v = (gᵀx)[support]``."""

    @staticmethod
    def forward(ctx, x2d: torch.Tensor, values: torch.Tensor, support: SparseSupport, backend: str | None):
        ops = get_ops(x2d.device, backend)
        ctx.support = support
        ctx.ops = ops
        ctx.save_for_backward(x2d, values)
        return ops.spmm(x2d, support, values)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x2d, values = ctx.saved_tensors
        need_x, need_values = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # One call for both gradients: each backend reads g once for the two products (see ``backward`` there).
        grad_x, grad_v = ctx.ops.backward(
            grad_out,
            x2d,
            ctx.support,
            values,
            need_x=need_x,
            need_values=need_values,
            x_dtype=x2d.dtype,
            values_dtype=values.dtype,
        )
        return grad_x, grad_v, None, None


def sparse_delta(
    x: torch.Tensor, support: SparseSupport, values: torch.Tensor, backend: str | None = None
) -> torch.Tensor:
    """``x · Sᵀ`` for ``x`` of shape ``(..., in)``; returns ``(..., out)`` in ``x.dtype``.

    Args:
        x: activations, any leading shape, last dim ``in_features``.
        support: the fixed support of S (shape ``(out, in)``).
        values: ``(nnz,)`` values of S in the support's row-major order (trainable).
        backend: override ``SLPEFT_SPARSE_BACKEND`` for this call.
    """
    out_features, in_features = support.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"sparse_delta: x has {x.shape[-1]} features, the support expects {in_features}.")
    if values.shape != (support.nnz,):
        raise ValueError(f"sparse_delta: values have shape {tuple(values.shape)}, the support has {support.nnz} entries.")
    lead = x.shape[:-1]
    x2d = x.reshape(-1, in_features)
    if not x2d.is_contiguous():
        x2d = x2d.contiguous()
    y = SparseDeltaFunction.apply(x2d, values, support, backend)
    return y.reshape(*lead, out_features)
