"""DyLoRA layer: ``y = base(x) + (α/b) · dropout(x) · A[:b]ᵀ · B[:, :b]ᵀ`` at the current rank ``b``."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...delta.layer import DeltaLayer, ParameterDict


class DyLoraLayer(DeltaLayer):
    """Nested-rank adapter: ``ΔW_b = (lora_alpha / b) · B[:, :b] · A[:b, :]`` for the current rank ``b ≤ r``.

    ``A`` (``r × in``, Kaiming-uniform), ``B`` (``out × r``, zero at init). ``b`` is set per step while training (by
    ``DyLoraCallback`` / ``dylora_sample_rank``) and by ``set_rank`` for inference; it defaults to ``r``. In
    ``frozen`` mode only row ``b-1`` of ``A`` and column ``b-1`` of ``B`` receive gradient. DyLoRA: Valipour et al.,
    EACL 2023, arXiv:2210.07558.
    """

    adapter_layer_names = ("dylora_A", "dylora_B")
    other_param_names = ("dylora_r", "dylora_rank", "dylora_alpha", "dylora_frozen", "dylora_dropout")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, key: str = "", **kwargs) -> None:
        super().__init__(base_layer, **kwargs)
        self.dylora_A = ParameterDict({})
        self.dylora_B = ParameterDict({})
        self.dylora_dropout = nn.ModuleDict({})
        self.dylora_r: dict[str, int] = {}
        self.dylora_rank: dict[str, int] = {}
        self.dylora_alpha: dict[str, float] = {}
        self.dylora_frozen: dict[str, bool] = {}
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, key=key)

    def update_layer(self, adapter_name: str, config, key: str = "", **kwargs) -> None:
        r = config.r
        self.dylora_r[adapter_name] = r
        self.dylora_rank[adapter_name] = r
        self.dylora_alpha[adapter_name] = float(config.lora_alpha)
        self.dylora_frozen[adapter_name] = bool(config.frozen)
        self.dylora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        A = torch.empty(r, self.in_features)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        B = torch.zeros(self.out_features, r)
        if not config.init_weights:
            nn.init.normal_(B, std=0.1)
        if config.init_weights == "lq":
            B, A = self.lq_init(adapter_name, config, r, self.dylora_alpha[adapter_name] / r, key)
        self.dylora_A[adapter_name] = nn.Parameter(A)
        self.dylora_B[adapter_name] = nn.Parameter(B)
        self._finish_update(adapter_name, config)

    def set_rank(self, rank: int, adapter_name: str) -> None:
        r = self.dylora_r[adapter_name]
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= r:
            raise ValueError(f"DyLoRA rank b={rank!r} is outside 1..r={r} of adapter '{adapter_name}'. Fix: 1 <= b <= {r}.")
        if rank != self.dylora_rank[adapter_name]:
            self.check_unmerged(adapter_name, f"set_rank({rank})")
        self.dylora_rank[adapter_name] = rank

    def _factors(self, adapter_name: str, rank: int, frozen: bool):
        A = self.dylora_A[adapter_name]
        B = self.dylora_B[adapter_name]
        if frozen and rank > 1:
            # only the b-th rank trains: earlier ranks enter the product detached
            A_b = torch.cat([A[: rank - 1].detach(), A[rank - 1 : rank]], dim=0)
            B_b = torch.cat([B[:, : rank - 1].detach(), B[:, rank - 1 : rank]], dim=1)
        else:
            A_b, B_b = A[:rank], B[:, :rank]
        return B_b, A_b

    def lowrank_forward(self, x: torch.Tensor, adapter_name: str) -> Optional[torch.Tensor]:
        """``(..., in)`` -> ``(..., out)`` at the current rank ``b``."""
        b = self.dylora_rank[adapter_name]
        B_b, A_b = self._factors(adapter_name, b, self.dylora_frozen[adapter_name] and self.training)
        h = F.linear(self.dylora_dropout[adapter_name](x), A_b)
        return F.linear(h, B_b) * (self.dylora_alpha[adapter_name] / b)

    def lowrank_factors(self, adapter_name: str, rank: Optional[int] = None, **kwargs):
        """``((α/b) · B[:, :b], A[:b])`` at ``rank`` (default: the current rank)."""
        b = self.dylora_rank[adapter_name] if rank is None else rank
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= self.dylora_r[adapter_name]:
            raise ValueError(f"DyLoRA rank b={b!r} is outside 1..r={self.dylora_r[adapter_name]}.")
        A = self.dylora_A[adapter_name]
        B = self.dylora_B[adapter_name]
        return B[:, :b] * (self.dylora_alpha[adapter_name] / b), A[:b]

    def lowrank_delta(self, adapter_name: str) -> Optional[torch.Tensor]:
        B, A = self.lowrank_factors(adapter_name)
        dtype = self.merge_dtype(adapter_name)
        return B.to(dtype) @ A.to(dtype)
