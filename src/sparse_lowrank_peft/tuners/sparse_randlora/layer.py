"""Sparse RandLoRA layer: ``y = base(x) + (α/r) · Σ_b B_b·diag(λ_b)·A·diag(γ_b) · dropout(x)`` (see ``bases``)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..._peft_compat import BufferDict
from ...delta.fused import FrozenFactor
from ...delta.layer import DeltaLayer, ParameterDict
from ...delta.ops import factored_sparse_path, get_ops, records_graph, sparse_delta
from ...delta.support import SparseSupport
from . import bases as basis_cache

#: fields of the per-layer basis record ``sparse_randlora_basis_key`` saved in every checkpoint (int64)
KEY_FIELDS = ("basis_seed", "r", "basis_density_ppm", "out_features", "in_features", "checksum")


class _FrozenSparseProduct(torch.autograd.Function):
    """``x·Sᵀ`` with *frozen* values through the shared sparse-delta ops (reference on CPU, Triton on CUDA).

    ``sparse_delta`` saves ``x`` for the values' gradient even when the values need none; for the frozen ``B`` factor
    that would keep one more ``(tokens, N·r)`` activation per layer alive until the backward (PEFT's ``F.linear`` with
    a frozen weight keeps none). This saves only the values and asks the backend for ``∂x`` alone.
    """

    @staticmethod
    def forward(ctx, x2d: torch.Tensor, values: torch.Tensor, support: SparseSupport):
        ops = get_ops(x2d.device)
        ctx.ops, ctx.support, ctx.x_dtype = ops, support, x2d.dtype
        ctx.save_for_backward(values)
        return ops.spmm(x2d, support, values)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        (values,) = ctx.saved_tensors
        grad_x, _ = ctx.ops.backward(
            grad_out.contiguous(), None, ctx.support, values, need_x=True, need_values=False, x_dtype=ctx.x_dtype,
            values_dtype=values.dtype,
        )
        return grad_x, None, None


class _GatherScaled(torch.autograd.Function):
    """``T``'s values ``λ.flat[lam_idx] · γ.flat[gam_idx] · a`` (``nnz``-sized), saving only ``λ`` and ``γ``.

    Autograd of the plain expression would keep the two gathered vectors and their product (three ``nnz``-sized
    tensors per layer) until the backward; the backward here gathers again instead (``O(nnz)``, cheap) and
    scatter-adds: ``∂λ.flat[lam_idx] += g·γ.flat[gam_idx]·a``, ``∂γ.flat[gam_idx] += g·λ.flat[lam_idx]·a``.
    """

    @staticmethod
    def forward(ctx, lam, gamma, lam_idx, gam_idx, a_values):
        lam_flat, gamma_flat = lam.reshape(-1), gamma.reshape(-1)
        ctx.save_for_backward(lam, gamma)
        ctx.indices = (lam_idx, gam_idx, a_values)
        return lam_flat.index_select(0, lam_idx) * gamma_flat.index_select(0, gam_idx) * a_values

    @staticmethod
    def backward(ctx, grad):
        lam, gamma = ctx.saved_tensors
        lam_idx, gam_idx, a_values = ctx.indices
        lam_flat, gamma_flat = lam.reshape(-1), gamma.reshape(-1)
        grad_a = grad * a_values
        grad_lam = grad_gamma = None
        if ctx.needs_input_grad[0]:
            contrib = grad_a * gamma_flat.index_select(0, gam_idx)
            grad_lam = torch.zeros_like(lam_flat).index_add_(0, lam_idx, contrib).view_as(lam)
        if ctx.needs_input_grad[1]:
            contrib = grad_a * lam_flat.index_select(0, lam_idx)
            grad_gamma = torch.zeros_like(gamma_flat).index_add_(0, gam_idx, contrib).view_as(gamma)
        return grad_lam, grad_gamma, None, None, None


def frozen_sparse_product(x: torch.Tensor, support: SparseSupport, values: torch.Tensor) -> torch.Tensor:
    """``x·Sᵀ`` for ``x`` of shape ``(..., in)`` and frozen ``values`` (no gradient for them, ``x`` not saved)."""
    out_features, in_features = support.shape
    lead = x.shape[:-1]
    x2d = x.reshape(-1, in_features)
    if not x2d.is_contiguous():
        x2d = x2d.contiguous()
    if not records_graph(x2d):
        return get_ops(x2d.device).spmm(x2d, support, values).reshape(*lead, out_features)
    return _FrozenSparseProduct.apply(x2d, values.detach(), support).reshape(*lead, out_features)


class SparseRandLoraLayer(DeltaLayer):
    """RandLoRA adapter on a frozen linear layer, with sparse bases executed sparsely.

    Trainable per layer: ``λ`` (``r × N``) and ``γ`` (``N × min(out, in)``), PEFT RandLoRA's parameters and
    initialisation. Frozen: the bases of :mod:`.bases` (shared by layers of the same shape, not saved). Saved besides
    the trainable tensors: ``sparse_randlora_basis_key``, six int64 numbers (seed, r, density in ppm, out, in,
    checksum of the bases) that loading compares with what the config regenerates.

    ``basis_density == 1``: dense bases and PEFT's computation (build ``T`` (``N·r × min``), two dense matmuls).
    ``basis_density < 1``: ``T``'s values on its fixed support are gathered from ``λ`` and ``γ`` (an ``nnz``-sized
    vector, differentiable), and ``x`` goes through two ``sparse_delta`` products (``T`` and the frozen ``B``), whose
    backward gives ``∂x`` and the values' gradient (only for ``T``) without forming any dense basis matrix.
    """

    adapter_layer_names = ("sparse_randlora_lambda", "sparse_randlora_gamma")
    other_param_names = (
        "sparse_randlora_basis_key", "sparse_randlora_basis_refs", "sparse_randlora_r", "sparse_randlora_density",
        "sparse_randlora_seed", "sparse_randlora_alpha", "sparse_randlora_scaling", "sparse_randlora_dropout",
    )

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, key: str = "", **kwargs) -> None:
        super().__init__(base_layer, **kwargs)
        self.sparse_randlora_lambda = ParameterDict({})
        self.sparse_randlora_gamma = ParameterDict({})
        self.sparse_randlora_basis_key = BufferDict({}, persistent=True)
        self.sparse_randlora_basis_refs: dict[str, basis_cache.RandBasis] = {}  # keeps the shared bases alive
        self.sparse_randlora_dropout = nn.ModuleDict({})
        self.sparse_randlora_r: dict[str, int] = {}
        self.sparse_randlora_density: dict[str, float] = {}
        self.sparse_randlora_seed: dict[str, int] = {}
        self.sparse_randlora_alpha: dict[str, float] = {}
        self.sparse_randlora_scaling: dict[str, float] = {}
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, key=key)

    @property
    def min_dim(self) -> int:
        return min(self.in_features, self.out_features)

    @property
    def max_dim(self) -> int:
        return max(self.in_features, self.out_features)

    @property
    def transposed(self) -> bool:
        """``True`` when the scaled (smaller) side is the output side (``out < in``), as in PEFT's layer."""
        return self.min_dim != self.in_features

    # ------------------------------------------------------------------ creation
    def update_layer(self, adapter_name: str, config, key: str = "", **kwargs) -> None:
        r = config.r
        self.sparse_randlora_r[adapter_name] = r
        self.sparse_randlora_density[adapter_name] = float(config.basis_density)
        self.sparse_randlora_seed[adapter_name] = int(config.basis_seed)
        self.sparse_randlora_alpha[adapter_name] = float(config.randlora_alpha)
        self.sparse_randlora_scaling[adapter_name] = float(config.randlora_alpha) / r
        self.sparse_randlora_dropout[adapter_name] = (
            nn.Dropout(config.randlora_dropout) if config.randlora_dropout > 0 else nn.Identity()
        )
        basis = self.get_basis(adapter_name)
        N = basis.N
        if config.init_weights:  # PEFT RandLoRA's reset_randlora_parameters
            lam = torch.zeros(r, N)
            gamma = torch.full((N, self.min_dim), 1.0 / max(N, self.min_dim))
        else:  # PEFT RandLoRA's construction before the reset
            lam = torch.randn(r, N)
            gamma = torch.ones(N, self.min_dim) / self.max_dim
        self.sparse_randlora_lambda[adapter_name] = nn.Parameter(lam)
        self.sparse_randlora_gamma[adapter_name] = nn.Parameter(gamma)
        self.sparse_randlora_basis_key[adapter_name] = self.expected_basis_key(adapter_name)
        self._finish_update(adapter_name, config)

    def traceable(self) -> bool:
        """Never: the bases come from a lock-guarded cache and run as sparse products (``DeltaLayer._eager_forward``)."""
        return False

    def get_basis(self, adapter_name: str) -> basis_cache.RandBasis:
        """The adapter's shared bases (drawn on first use, then a lookup)."""
        basis = self.sparse_randlora_basis_refs.get(adapter_name)
        if basis is None:
            basis = basis_cache.get_basis(
                self.sparse_randlora_seed[adapter_name], self.sparse_randlora_r[adapter_name], self.min_dim,
                self.max_dim, self.sparse_randlora_density[adapter_name],
            )
            self.sparse_randlora_basis_refs[adapter_name] = basis
        return basis

    def expected_basis_key(self, adapter_name: str) -> torch.Tensor:
        """The basis record this layer's config implies (what a checkpoint's basis key must equal)."""
        values = [
            self.sparse_randlora_seed[adapter_name],
            self.sparse_randlora_r[adapter_name],
            round(self.sparse_randlora_density[adapter_name] * 1_000_000),
            self.out_features,
            self.in_features,
            self.get_basis(adapter_name).checksum,
        ]
        return torch.tensor(values, dtype=torch.int64)

    # ------------------------------------------------------------------ math
    def scaled_T(self, adapter_name: str, A: torch.Tensor) -> torch.Tensor:
        """Dense ``T`` (``N·r × min``): row ``k·N + b`` is ``λ[k, b] · A[k] ⊙ γ[b]`` (PEFT's ``UniqueBaseGrad``)."""
        lam = self.sparse_randlora_lambda[adapter_name]
        gamma = self.sparse_randlora_gamma[adapter_name]
        lam, gamma = lam.to(A.dtype), gamma.to(A.dtype)
        # (λ ⊗ γ) first, then × A: autograd saves only λ, γ and the frozen A, not an (r, N, min) product. Never kept
        # for inference (unlike the sparse values below): T is about min × min, a dense weight's size.
        T = (lam[:, :, None] * gamma[None, :, :]) * A[:, None, :]
        return T.reshape(-1, A.shape[1])

    def sparse_T_values(self, adapter_name: str, ops: basis_cache.SparseOperands) -> torch.Tensor:
        """The values of ``T`` on its support: ``λ[k, b] · γ[b, j] · A[k, j]`` (``nnz``-sized, differentiable)."""
        lam_p = self.sparse_randlora_lambda[adapter_name]
        gamma_p = self.sparse_randlora_gamma[adapter_name]

        def gather() -> torch.Tensor:
            lam, gamma = lam_p.to(ops.a_values.dtype), gamma_p.to(ops.a_values.dtype)
            return _GatherScaled.apply(lam, gamma, ops.lam_idx, ops.gam_idx, ops.a_values)

        return self.inference_cached(adapter_name, (lam_p, gamma_p, ops.a_values, ops.lam_idx), gather)

    def lowrank_forward(self, x: torch.Tensor, adapter_name: str) -> Optional[torch.Tensor]:
        """``(α/r) · ΔW·dropout(x)`` without building ΔW: ``(..., in)`` -> ``(..., out)``."""
        x = self.sparse_randlora_dropout[adapter_name](x)
        basis = self.get_basis(adapter_name)
        lam = self.sparse_randlora_lambda[adapter_name]
        scale = self.sparse_randlora_scaling[adapter_name]
        if basis.dense:
            A, B = basis.dense_bases(lam.device, lam.dtype)
            T = self.scaled_T(adapter_name, A)
            if not self.transposed:
                return ((x @ T.t()) @ B.t()) * scale
            return ((x @ B) @ T) * scale
        ops = basis.operands(self.transposed, lam.device, lam.dtype)
        t_values = self.sparse_T_values(adapter_name, ops)
        if ops.trainable_first:  # T on x (saves x for T's values gradient), then the frozen B (saves nothing more)
            h = sparse_delta(x, ops.first, t_values)
            return frozen_sparse_product(h, ops.second, ops.frozen_values) * scale
        h = frozen_sparse_product(x, ops.first, ops.frozen_values)  # frozen Bᵀ, then Tᵀ (saves h)
        return sparse_delta(h, ops.second, t_values) * scale

    # ------------------------------------------------------------------ fused-weight path (delta.fused)
    fused_covers_lowrank = True

    def _fused_basis_operands(self, adapter_name: str) -> Optional[basis_cache.SparseOperands]:
        """``T`` (``N·r × min``) and ``B`` (``max × N·r``) in the layer-independent orientation, or None when the
        fused path cannot compute this adapter: dense bases (PEFT's two matmuls), or dropout active in training
        (the delta then sees another input than the base)."""
        basis = self.get_basis(adapter_name)
        dropout = self.sparse_randlora_dropout[adapter_name]
        if basis.dense or (self.training and not isinstance(dropout, nn.Identity)):
            return None
        lam = self.sparse_randlora_lambda[adapter_name]
        return basis.operands(False, lam.device, lam.dtype)

    def terms_may_fold(self, x: torch.Tensor) -> bool:
        """The factored term's measured choice (``factored_sparse_path``) from the token count and ``T``'s column
        count (``min(out, in)``), before any operand is built."""
        tokens = x.numel() // max(x.shape[-1], 1)
        return factored_sparse_path(tokens, self.min_dim, x.device) == "fused"

    def fused_operands(self, adapter_name: str):
        """``ΔW = scale · B·T`` (``scale · (B·T)ᵀ`` when ``out < in``) as a factored term: ``S = T``, ``L = B``."""
        ops = self._fused_basis_operands(adapter_name)
        if ops is None:
            return None
        factor = FrozenFactor(ops.second, ops.frozen_values, self.sparse_randlora_scaling[adapter_name], self.transposed)
        return ops.first, factor

    def fused_values(self, adapter_name: str) -> torch.Tensor:
        return self.sparse_T_values(adapter_name, self._fused_basis_operands(adapter_name))

    def lowrank_delta(self, adapter_name: str) -> Optional[torch.Tensor]:
        """Dense ΔW (``out × in``, fp32): ``scale·B·T`` or ``scale·Tᵀ·Bᵀ``. Merge only."""
        basis = self.get_basis(adapter_name)
        device = self.sparse_randlora_lambda[adapter_name].device
        A, B = basis.dense_bases(device, self.merge_dtype(adapter_name))
        T = self.scaled_T(adapter_name, A)
        delta = B @ T if not self.transposed else T.t() @ B.t()
        return delta * self.sparse_randlora_scaling[adapter_name]

    def lowrank_factors(self, adapter_name: str, **kwargs):
        """None: RandLoRA's ΔW has full rank, so plain LoRA can only hold a rank-capped approximation of it; export
        and LoRA-Squeeze compute that with a randomized SVD of ΔW applied as an operator (``squeeze/svd.py``)."""
        return None
