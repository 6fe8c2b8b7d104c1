"""SLTrain layer: ``y = base(x) + (α/r) · B · A · dropout(x) + x · Sᵀ``."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...delta.layer import DeltaLayer, ParameterDict


class SLTrainLayer(DeltaLayer):
    """Sparse + low-rank adapter on a frozen linear layer.

    ``ΔW = (lora_alpha / r) · B · A + S`` with ``A`` (``r × in``, Kaiming-uniform), ``B`` (``out × r``, zero at init)
    and ``S`` a sparse ``out × in`` matrix on a fixed random support of density ``sparsity`` (values zero at init).
    SLTrain: Han et al., 2024, arXiv:2406.02214. The sparse term runs through the shared layer: folded into the
    frozen weight's GEMMs for training batches, through ``sparse_delta``'s SpMM for small ones (``delta.ops``).
    """

    adapter_layer_names = ("sltrain_A", "sltrain_B", "sltrain_values")
    other_param_names = ("sltrain_support", "sltrain_r", "sltrain_alpha", "sltrain_scaling", "sltrain_dropout")
    sparse_values_attr = "sltrain_values"
    support_attr = "sltrain_support"

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, key: str = "", **kwargs) -> None:
        super().__init__(base_layer, **kwargs)
        self.sltrain_A = ParameterDict({})
        self.sltrain_B = ParameterDict({})
        self.sltrain_dropout = nn.ModuleDict({})
        self.sltrain_r: dict[str, int] = {}
        self.sltrain_alpha: dict[str, float] = {}
        self.sltrain_scaling: dict[str, float] = {}
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, key=key)

    def update_layer(self, adapter_name: str, config, key: str = "", **kwargs) -> None:
        r = config.r
        self.sltrain_r[adapter_name] = r
        self.sltrain_alpha[adapter_name] = float(config.lora_alpha)
        self.sltrain_scaling[adapter_name] = config.lowrank_scale()  # α / r (α / √r with use_rslora)
        self.sltrain_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        A = torch.empty(r, self.in_features)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # LoRA's init for A (PEFT's LoraLayer does the same)
        B = torch.zeros(self.out_features, r)
        if not config.init_weights:
            nn.init.normal_(B, std=0.1)
        if config.init_weights == "lq":
            B, A = self.lq_init(adapter_name, config, r, self.sltrain_scaling[adapter_name], key)
        self.sltrain_A[adapter_name] = nn.Parameter(A)
        self.sltrain_B[adapter_name] = nn.Parameter(B)
        self.init_sparse(adapter_name, config.sparsity, config.support_seed, key, init_zero=bool(config.init_weights))
        self._finish_update(adapter_name, config)

    def lowrank_forward(self, x: torch.Tensor, adapter_name: str) -> Optional[torch.Tensor]:
        """``(α/r) · dropout(x) · Aᵀ · Bᵀ``: ``(..., in)`` -> ``(..., out)``."""
        h = F.linear(self.sltrain_dropout[adapter_name](x), self.sltrain_A[adapter_name])
        return F.linear(h, self.sltrain_B[adapter_name]) * self.sltrain_scaling[adapter_name]

    def lowrank_factors(self, adapter_name: str, rank: Optional[int] = None, **kwargs):
        """``((α/r)·B, A)``: the low-rank term alone (export also needs the sparse term: it refuses SLTrain)."""
        return self.sltrain_B[adapter_name] * self.sltrain_scaling[adapter_name], self.sltrain_A[adapter_name]

    def lowrank_delta(self, adapter_name: str) -> Optional[torch.Tensor]:
        dtype = self.merge_dtype(adapter_name)
        A = self.sltrain_A[adapter_name].to(dtype)
        B = self.sltrain_B[adapter_name].to(dtype)
        return (B @ A) * self.sltrain_scaling[adapter_name]
