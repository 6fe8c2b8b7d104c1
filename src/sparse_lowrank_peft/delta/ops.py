"""``sparse_delta(x, support, values)``: the sparse term ``x · Sᵀ`` as one autograd op, and the one backend dispatcher.

Backends, chosen by ``SLPEFT_SPARSE_BACKEND`` (read on every call, so tests can switch it):

* ``auto`` (default): Triton when the tensors are on CUDA and ``triton`` imports; the reference path otherwise.
* ``triton``: always Triton. On CPU tensors this needs ``TRITON_INTERPRET=1`` (the interpreter, which is how CI tests
  the kernels without a GPU). Where Triton cannot run this raises; it never falls back silently.
* ``reference``: always the pure-PyTorch path of ``reference.py``.

Forward and backward keep only ``x`` (which the frozen base layer saves anyway) and the values: no ``(out, in)``
tensor is ever allocated. With ``add_to`` the term is added in place into another one (the low-rank output), so a
layer using it has the memory peak of plain LoRA.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

from . import reference
from .support import SparseSupport

__all__ = [
    "sparse_delta", "resolve_backend", "resolve_sparse_path", "resolve_sddmm", "plain_sparse_path", "plain_sddmm",
    "get_ops", "records_graph", "BACKEND_ENV", "PATH_ENV", "SDDMM_ENV", "SparseDeltaFunction", "SparseDeltaAddFunction",
]

BACKEND_ENV = "SLPEFT_SPARSE_BACKEND"
_BACKENDS = ("auto", "triton", "reference")
PATH_ENV = "SLPEFT_SPARSE_PATH"
_PATHS = ("auto", "fused", "spmm")
SDDMM_ENV = "SLPEFT_SDDMM"
_SDDMMS = ("auto", "sampled", "dense")

# The cost model of the dispatcher, per device type. Both paths compute the values' gradient (an SDDMM); beyond it
# the SpMM path spends ~c_s · tokens · nnz (the SpMM forward and its transpose in backward) and the fused path
# ~c_w · out · in (building W0 + S in forward and again in backward). So fused wins once
# tokens · density > c_w / c_s: FUSED_MIN_TOKENS_X_DENSITY below is that crossover, measured.
#   cpu:  bench/results/dispatch-cpu.json (bench/dispatch.py, 1 thread): fwd+bwd of one Linear + sparse term at d 768
#         and 1024, density 0.01 and 0.05, 16-4,096 tokens. Fused was within 1% at 16 tokens and faster from 32
#         (0.96x) to 4,096 (0.79x at 1024², density 0.01: 208 vs 262 ms); the latest crossover (64 tokens at 1024²,
#         density 0.05, after a 1.001x tie at 32) gives 3.2, so SpMM stays for decoding and tiny batches.
#   cuda: bench/results/sparse_delta-nvidia-h100-80gb-hbm3.json: at every measured shape (2,048-8,192 tokens,
#         density 0.001-0.05, d 768-4096) densifying W0 + S beat the Triton SpMM kernels (e.g. 2,048 x 1024²,
#         density 0.001: 0.66 vs 1.38 ms); fewer tokens were not measured, so below 2,048 · 0.001 SpMM stays.
#         bench/gpu_check.sh measures the crossover directly when a GPU is lent (bench/dispatch.py --device cuda).
FUSED_MIN_TOKENS_X_DENSITY = {"cpu": 3.2, "cuda": 2048 * 0.001}
# The SDDMM of the values' gradient: a dense gᵀx GEMM then a gather wins over the sampled kernel once the density
# reaches DENSE_SDDMM_MIN_DENSITY (the GEMM costs tokens · out · in at GEMM speed, the sampled one tokens · nnz).
#   cpu:  bench/results/dispatch-cpu.json, 4,096 x 1024², 1 thread: sampled 14 ms vs dense 87 ms at density 0.01,
#         57 vs 92 at 0.1, 97 vs 93 at 0.2.
#   cuda: the H100 densify rows above compute ∂v as a dense GEMM + gather and won at every shape; unmeasured
#         against the Triton SDDMM alone.
DENSE_SDDMM_MIN_DENSITY = {"cpu": 0.2, "cuda": 0.0}
# A factored term ``scale · L·S`` (sparse RandLoRA's ``B·T``): the SpMM path spends ~tokens · (nnz(L) + nnz(S)) per
# product, the fused path builds ``L·S`` once per forward and once per backward (nnz(L) · c multiply-adds, c the
# columns of S), so the crossover is a token count proportional to c whatever the density.
#   cpu:  bench/results/dispatch-cpu.json "factored" (bench/dispatch.py --parts factored --clock cpu, 1 thread,
#         r 32, d 768 and 1024, basis density 0.1 and 0.01, 32-4,096 tokens): fused from 1,024 tokens at d 768
#         (0.86x the two SpMMs at 0.1, 0.99x at 0.01), from 1,024 / 2,048 at d 1024; at 4,096 tokens 0.58-0.87x; at
#         32 tokens 3.3-5.3x slower (decoding keeps SpMM). The latest crossover, 2,048 tokens for 1,024 columns, gives 2.0.
#   cuda: not measured yet (bench/gpu_check.sh runs part 3 when a GPU is lent): SpMM stays.
FACTORED_FUSED_MIN_TOKENS_PER_COLUMN = {"cpu": 2.0}
# Its values' gradient: the sampled route (∂y·L by spmm_t, then the SDDMM) was 4-37% faster than the dense ``∂yᵀx``
# route at every measured row but density 0.1 from 2,048 tokens (d 1024) / 4,096 (d 768), where dense was 4-8%
# faster: sampled everywhere (the dense route stays selectable with SLPEFT_SDDMM=dense).
FACTORED_DENSE_SDDMM_MIN_DENSITY: dict[str, float] = {}


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
    if backend == "reference" or (backend == "auto" and device.type != "cuda"):
        return "reference"
    mod = _triton_module()
    if backend == "auto":
        return "triton" if (mod is not None and mod.is_available()) else "reference"
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


def _env_choice(env: str, allowed: tuple[str, ...]) -> str:
    value = os.environ.get(env, "auto").strip().lower()
    if value not in allowed:
        raise ValueError(f"{env}={value!r} is not one of {', '.join(allowed)}.")
    return value


def resolve_sparse_path(tokens: int, support: SparseSupport, device: torch.device, factor=None) -> str:
    """``"fused"`` (fold the term into the frozen weight's GEMMs, ``delta.fused``) or ``"spmm"`` (SpMM kernels) for a
    layer computing ``tokens`` rows on ``device``: ``SLPEFT_SPARSE_PATH`` if set, else the measured cost model
    (``factor``: the :class:`~.fused.FrozenFactor` of a factored term ``scale · L·S``, or None for ``ΔW = S``)."""
    if factor is None:
        return plain_sparse_path(tokens, support.density, device)
    return factored_sparse_path(tokens, support.shape[1], device)


def factored_sparse_path(tokens: int, columns: int, device: torch.device) -> str:
    """:func:`resolve_sparse_path` for a factored term ``scale · L·S`` whose ``S`` has ``columns`` columns (from numbers
    only, so a layer decides before it builds its operands)."""
    choice = _env_choice(PATH_ENV, _PATHS)
    if choice != "auto":
        return choice
    per_column = FACTORED_FUSED_MIN_TOKENS_PER_COLUMN.get(device.type)
    return "fused" if per_column is not None and tokens >= per_column * columns else "spmm"


def plain_sparse_path(tokens: int, density: float, device: torch.device) -> str:
    """:func:`resolve_sparse_path` for a term ``ΔW = S`` of the given density (from numbers only, so the traced forward
    of ``torch.compile`` calls it too: ``delta.custom_ops``)."""
    choice = _env_choice(PATH_ENV, _PATHS)
    if choice != "auto":
        return choice
    crossover = FUSED_MIN_TOKENS_X_DENSITY.get(device.type)
    if crossover is None:
        return "spmm"
    return "fused" if tokens * density >= crossover else "spmm"


def resolve_sddmm(support: SparseSupport, device: torch.device, factor=None) -> str:
    """``"sampled"`` or ``"dense"`` for the values' gradient on the fused path: ``SLPEFT_SDDMM`` if set, else the
    measured density threshold. A factored term's sampled route costs ``tokens · (nnz(S) + nnz(L))`` (``∂y·L`` and
    the SDDMM), so its density is that count over the layer's ``out · in``, against its own measured threshold."""
    if factor is None:
        return plain_sddmm(support.density, device)
    choice = _env_choice(SDDMM_ENV, _SDDMMS)
    if choice != "auto":
        return choice
    threshold = FACTORED_DENSE_SDDMM_MIN_DENSITY.get(device.type)
    p, c = factor.support.shape[0], support.shape[1]
    density = (support.nnz + factor.support.nnz) / max(p * c, 1)
    return "dense" if threshold is not None and density >= threshold else "sampled"


def plain_sddmm(density: float, device: torch.device) -> str:
    """:func:`resolve_sddmm` for a term ``ΔW = S`` of the given density (from numbers only, as
    :func:`plain_sparse_path`)."""
    choice = _env_choice(SDDMM_ENV, _SDDMMS)
    if choice != "auto":
        return choice
    threshold = DENSE_SDDMM_MIN_DENSITY.get(device.type)
    return "dense" if threshold is not None and density >= threshold else "sampled"


def get_ops(device: torch.device, backend: str | None = None) -> ModuleType:
    """The module (``reference`` or ``triton``) providing ``spmm``, ``sddmm``, ``spmm_t`` and ``backward`` for ``device``."""
    return reference if resolve_backend(device, backend) == "reference" else _triton_module()


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a 2-D ``(rows, features)`` tensor (a view when possible)."""
    t2d = t.reshape(-1, t.shape[-1])
    return t2d if t2d.is_contiguous() else t2d.contiguous()


def _backward(ctx, grad_out: torch.Tensor, need_x: bool, need_values: bool):
    """``(∂x, ∂v)`` of ``x · Sᵀ`` for the saved ``x`` and values, ``∂x`` in the input's shape and no view.

    ``∂x`` is written into a fresh tensor of ``x``'s shape (through a 2-D view of it) rather than reshaped from a
    2-D result: autograd accumulates the other gradients of ``x`` (base layer, low-rank term) into the first one in
    place only when that one is no view, and otherwise allocates their sum — one more activation-sized buffer at the
    peak of the backward (measured: 67 MB vs LoRA's 50 MB at 4096 x 1024 fp32).
    """
    x2d, values = ctx.saved_tensors
    grad_x_full = None
    if need_x:
        grad_x_full = torch.empty(ctx.x_shape, dtype=x2d.dtype, device=x2d.device)
    grad_x, grad_v = ctx.ops.backward(
        _rows(grad_out),
        x2d,
        ctx.support,
        values,
        need_x=need_x,
        need_values=need_values,
        x_dtype=x2d.dtype,
        values_dtype=values.dtype,
        grad_x_into=None if grad_x_full is None else grad_x_full.view(-1, x2d.shape[-1]),
    )
    return (grad_x_full if need_x else None), grad_v


class SparseDeltaFunction(torch.autograd.Function):
    """Autograd for ``y = x · Sᵀ`` with trainable values: ``∂x = g · S``, ``∂v = (gᵀx)[support]``.

    Saves only ``x`` (which the frozen base layer saves anyway) and the values.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, values: torch.Tensor, support: SparseSupport, backend: str | None):
        ops = get_ops(x.device, backend)
        x2d = _rows(x)
        ctx.support, ctx.ops, ctx.x_shape = support, ops, x.shape
        ctx.save_for_backward(x2d, values)
        return _forward(ops, x2d, x.shape, support, values)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x, grad_v = _backward(ctx, grad_out, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return grad_x, grad_v, None, None


class SparseDeltaAddFunction(torch.autograd.Function):
    """``add_to += x · Sᵀ`` in place (``add_to`` marked dirty); ``∂add_to = g``, ``∂x = g · S``, ``∂v = (gᵀx)[S]``."""

    @staticmethod
    def forward(ctx, add_to: torch.Tensor, x: torch.Tensor, values: torch.Tensor, support: SparseSupport, backend):
        ops = get_ops(x.device, backend)
        x2d = _rows(x)
        ctx.support, ctx.ops, ctx.x_shape = support, ops, x.shape
        ctx.save_for_backward(x2d, values)
        _forward(ops, x2d, x.shape, support, values, add_to)
        ctx.mark_dirty(add_to)
        return add_to

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x, grad_v = _backward(ctx, grad_out, ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        return (grad_out if ctx.needs_input_grad[0] else None), grad_x, grad_v, None, None


def sparse_delta(
    x: torch.Tensor,
    support: SparseSupport,
    values: torch.Tensor,
    backend: str | None = None,
    add_to: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x · Sᵀ`` for ``x`` of shape ``(..., in)``; returns ``(..., out)`` in ``x.dtype``.

    Args:
        x: activations, any leading shape, last dim ``in_features``.
        support: the fixed support of S (shape ``(out, in)``).
        values: ``(nnz,)`` values of S in the support's row-major order (trainable).
        backend: override ``SLPEFT_SPARSE_BACKEND`` for this call.
        add_to: optional ``(..., out)`` tensor (e.g. the low-rank term's output) to add ``x · Sᵀ`` into *in place*
            and return (autograd's in-place bookkeeping applies: its gradient is passed through). It saves an
            activation-sized temporary and one pass over it, so the sparse term adds no memory at the forward's
            peak. ``add_to`` must be contiguous (otherwise the out-of-place sum is returned), must not be a leaf that
            requires grad, and must not be needed by the backward of the op that produced it (a product scaled by a
            Python number is fine; autograd raises if it is not). Its dtype may differ from ``x``'s.
    """
    out_features, in_features = support.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"sparse_delta: x has {x.shape[-1]} features, the support expects {in_features}.")
    if values.shape != (support.nnz,):
        raise ValueError(f"sparse_delta: values have shape {tuple(values.shape)}, the support has {support.nnz} entries.")
    if add_to is not None:
        if add_to.shape != (*x.shape[:-1], out_features):
            raise ValueError(
                f"sparse_delta: add_to has shape {tuple(add_to.shape)}, expected {(*x.shape[:-1], out_features)}."
            )
        if not add_to.is_contiguous():
            return add_to + sparse_delta(x, support, values, backend=backend).to(add_to.dtype)
    if not records_graph(x, values, *(() if add_to is None else (add_to,))):  # inference: no autograd Function
        return _forward(get_ops(x.device, backend), _rows(x), x.shape, support, values, add_to)
    if add_to is not None:
        return SparseDeltaAddFunction.apply(add_to, x, values, support, backend)
    return SparseDeltaFunction.apply(x, values, support, backend)


def _forward(ops: ModuleType, x2d: torch.Tensor, x_shape: torch.Size, support: SparseSupport, values: torch.Tensor,
             add_to: torch.Tensor | None = None) -> torch.Tensor:
    """The forward kernel on the rows of ``x``: added into ``add_to`` in place (returned), or a new ``(..., out)``."""
    out_features = support.shape[0]
    if add_to is not None:
        ops.spmm(x2d, support, values, add_to=add_to.view(-1, out_features))
        return add_to
    y = ops.spmm(x2d, support, values)
    return y if len(x_shape) == 2 else y.view(*x_shape[:-1], out_features)


def records_graph(*tensors: torch.Tensor) -> bool:
    """Whether autograd records an op on ``tensors``. Where it does not (inference, ``torch.no_grad``), the kernels
    are called without an autograd Function (nothing saved, no graph node)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
