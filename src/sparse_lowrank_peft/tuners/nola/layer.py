"""NOLA layer: ``y = base(x) + (α/r) · B · A · dropout(x)`` with ``A = Σᵢ αᵢ·Aᵢ`` and ``B = Σⱼ βⱼ·Bⱼ``."""

from __future__ import annotations

import math
import zlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..._peft_compat import BufferDict
from ...delta.layer import DeltaLayer, ParameterDict
from . import bases as basis_cache

#: fields of the per-layer basis record ``nola_basis_key`` saved in every checkpoint (int64)
KEY_FIELDS = ("basis_seed", "r", "num_basis_A", "num_basis_B", "out_features", "in_features", "checksum")


class NolaLayer(DeltaLayer):
    """NOLA adapter on a frozen linear layer.

    Trainable: ``α`` (``k_A``) and ``β`` (``k_B``) per layer. Frozen: the bases ``Aᵢ`` (``r × in``) and ``Bⱼ``
    (``out × r``), taken from the shared cache of :mod:`.bases` (not saved unless ``save_basis``). Saved besides the
    coefficients: ``nola_basis_key``, seven int64 numbers (seed, r, k_A, k_B, out, in, checksum of the bases) that
    loading compares with what the config regenerates, so a checkpoint never silently meets other bases.

    Forward: ``A = α·[A₁…A_k]`` and ``B = β·[B₁…B_k]`` are two matrix-vector products over the bases viewed as
    ``(k, r·in)`` / ``(k, out·r)``; their backward is again one product per side (``∂α = [A₁…A_k]·vec(∂A)``), so autograd
    keeps only the shared bases (already alive), ``A``, ``B`` and the ``(tokens, r)`` activation: never ``k`` matrices
    of a factor's size. Then ``y = ((x·Aᵀ)·Bᵀ)·α/r``, the LoRA product.
    """

    adapter_layer_names = ("nola_alpha", "nola_beta")
    other_param_names = (
        "nola_basis_key", "nola_basis_A", "nola_basis_B", "nola_basis_refs", "nola_r", "nola_num_basis",
        "nola_seed", "nola_lora_alpha", "nola_scaling", "nola_dropout",
    )

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, key: str = "", **kwargs) -> None:
        super().__init__(base_layer, **kwargs)
        self.nola_alpha = ParameterDict({})
        self.nola_beta = ParameterDict({})
        self.nola_basis_key = BufferDict({}, persistent=True)
        self.nola_basis_A = BufferDict({}, persistent=True)  # only adapters with save_basis=True
        self.nola_basis_B = BufferDict({}, persistent=True)
        self.nola_basis_refs: dict[str, tuple] = {}  # adapter -> ((device, dtype), A bases, B bases): keeps them alive
        self.nola_dropout = nn.ModuleDict({})
        self.nola_r: dict[str, int] = {}
        self.nola_num_basis: dict[str, tuple[int, int]] = {}
        self.nola_seed: dict[str, int] = {}
        self.nola_lora_alpha: dict[str, float] = {}
        self.nola_scaling: dict[str, float] = {}
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, key=key)

    # ------------------------------------------------------------------ creation
    def basis_shapes(self, adapter_name: str) -> tuple[tuple, tuple]:
        """``(side, k, rows, cols)`` of the A and B bases of ``adapter_name``."""
        r = self.nola_r[adapter_name]
        k_A, k_B = self.nola_num_basis[adapter_name]
        return ("A", k_A, r, self.in_features), ("B", k_B, self.out_features, r)

    def expected_basis_key(self, adapter_name: str) -> torch.Tensor:
        """The basis record this layer's config implies (what a checkpoint's ``nola_basis_key`` must equal)."""
        seed = self.nola_seed[adapter_name]
        shape_A, shape_B = self.basis_shapes(adapter_name)
        checksum = zlib.crc32(
            basis_cache.basis_checksum(seed, *shape_B).to_bytes(4, "little"),
            basis_cache.basis_checksum(seed, *shape_A),
        )
        k_A, k_B = self.nola_num_basis[adapter_name]
        values = [seed, self.nola_r[adapter_name], k_A, k_B, self.out_features, self.in_features, checksum]
        return torch.tensor(values, dtype=torch.int64)

    def update_layer(self, adapter_name: str, config, key: str = "", **kwargs) -> None:
        r, k_A, k_B = config.r, config.num_basis_A, config.num_basis_B
        self.nola_r[adapter_name] = r
        self.nola_num_basis[adapter_name] = (k_A, k_B)
        self.nola_seed[adapter_name] = int(config.basis_seed)
        self.nola_lora_alpha[adapter_name] = float(config.lora_alpha)
        self.nola_scaling[adapter_name] = config.lowrank_scale()  # α / r (α / √r with use_rslora)
        self.nola_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        # α: A gets the entry variance of LoRA's Kaiming-uniform A (1 / (3·in)): Var(Aᵢ entries) = 1/(3k), so
        # Var(A) = Σ αᵢ² / (3k) = Var(α) / 3 with Var(α) = 1/in. β = 0: B = 0, ΔW = 0 at step 0.
        alpha = torch.randn(k_A) / math.sqrt(self.in_features)
        beta = torch.zeros(k_B)
        if not config.init_weights:
            beta = torch.randn(k_B) * 0.2
        self.nola_alpha[adapter_name] = nn.Parameter(alpha)
        self.nola_beta[adapter_name] = nn.Parameter(beta)
        self.nola_basis_refs.pop(adapter_name, None)
        self.get_bases(adapter_name, alpha.device, alpha.dtype)  # draw (or share) them once; the layer holds them
        self.nola_basis_key[adapter_name] = self.expected_basis_key(adapter_name)
        if config.save_basis:
            shape_A, shape_B = self.basis_shapes(adapter_name)
            # own copies (not the shared cache): loading a checkpoint copies into these in place
            self.nola_basis_A[adapter_name] = basis_cache.get_basis(config.basis_seed, *shape_A).clone()
            self.nola_basis_B[adapter_name] = basis_cache.get_basis(config.basis_seed, *shape_B).clone()
        self._finish_update(adapter_name, config)

    # ------------------------------------------------------------------ bases and factors
    def get_bases(self, adapter_name: str, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A bases (k_A, r, in), B bases (k_B, out, r))`` on ``device`` in ``dtype``.

        The checkpoint's own bases if it stores them (``save_basis``), else the shared cached ones; a dictionary
        lookup after the first call, never a regeneration.
        """
        if adapter_name in self.nola_basis_A:
            A, B = self.nola_basis_A[adapter_name], self.nola_basis_B[adapter_name]
            return A.to(device=device, dtype=dtype), B.to(device=device, dtype=dtype)
        ref = self.nola_basis_refs.get(adapter_name)
        if ref is not None and ref[0] == (device, dtype):
            return ref[1], ref[2]
        seed = self.nola_seed[adapter_name]
        shape_A, shape_B = self.basis_shapes(adapter_name)
        A = basis_cache.get_basis(seed, *shape_A, device=device, dtype=dtype)
        B = basis_cache.get_basis(seed, *shape_B, device=device, dtype=dtype)
        self.nola_basis_refs[adapter_name] = ((device, dtype), A, B)
        return A, B

    def factors(self, adapter_name: str, dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)``: ``A = Σ αᵢAᵢ`` (``r × in``) and ``B = Σ βⱼBⱼ`` (``out × r``), differentiable in α and β;
        built once per change of the coefficients in inference (:meth:`~DeltaLayer.inference_cached`)."""
        alpha_p, beta_p = self.nola_alpha[adapter_name], self.nola_beta[adapter_name]
        alpha, beta = (alpha_p, beta_p) if dtype is None else (alpha_p.to(dtype), beta_p.to(dtype))
        bases_A, bases_B = self.get_bases(adapter_name, alpha.device, alpha.dtype)
        inputs = (alpha_p, beta_p, bases_A, bases_B)
        return self.inference_cached(adapter_name, inputs, lambda: _combine(alpha, beta, bases_A, bases_B))

    def lowrank_forward(self, x: torch.Tensor, adapter_name: str) -> Optional[torch.Tensor]:
        """``(α/r) · dropout(x) · Aᵀ · Bᵀ``: ``(..., in)`` -> ``(..., out)``."""
        A, B = self.factors(adapter_name)
        return F.linear(F.linear(self.nola_dropout[adapter_name](x), A), B) * self.nola_scaling[adapter_name]

    def lowrank_delta(self, adapter_name: str) -> Optional[torch.Tensor]:
        A, B = self.factors(adapter_name, dtype=self.merge_dtype(adapter_name))
        return (B @ A) * self.nola_scaling[adapter_name]

    def lowrank_factors(self, adapter_name: str, **kwargs):
        """``(B·α/r, A)``: NOLA's ΔW is exactly a rank-``r`` product, so it exports to plain LoRA without loss."""
        A, B = self.factors(adapter_name, dtype=torch.float32)
        return B * self.nola_scaling[adapter_name], A


def _combine(alpha: torch.Tensor, beta: torch.Tensor, bases_A: torch.Tensor, bases_B: torch.Tensor):
    """``(Σ αᵢAᵢ, Σ βⱼBⱼ)`` for bases ``(k_A, r, in)`` and ``(k_B, out, r)``. Each is one ``(k,) @ (k, r·in)``
    matrix-vector product, whose backward needs only the bases and ``∂A``: no k-fold temporary."""
    k_A, r, in_features = bases_A.shape
    k_B, out_features, _ = bases_B.shape
    A = (alpha @ bases_A.reshape(k_A, r * in_features)).view(r, in_features)
    B = (beta @ bases_B.reshape(k_B, out_features * r)).view(out_features, r)
    return A, B
