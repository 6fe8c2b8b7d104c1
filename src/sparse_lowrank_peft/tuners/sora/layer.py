"""SoRA layer: ``y = base(x) + (α/r) · ((dropout(x) · Aᵀ) ⊙ g) · Bᵀ``."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...delta.layer import DeltaLayer, ParameterDict


class SoraLayer(DeltaLayer):
    """Gated low-rank adapter: ``ΔW = (lora_alpha / r) · B · diag(g) · A``.

    ``A`` (``k × in``, Kaiming-uniform), ``B`` (``out × k``, zero at init), gate ``g`` (``k``); ``k = r`` at creation
    and the kept rank after :meth:`prune_ranks`. The scale stays ``lora_alpha / r`` with the configured ``r`` so
    pruning never changes outputs. SoRA: Ding et al., EMNLP 2023, arXiv:2311.11696.
    """

    adapter_layer_names = ("sora_A", "sora_B", "sora_gate")
    other_param_names = ("sora_r", "sora_alpha", "sora_scaling", "sora_dropout")
    #: excluded from weight decay (the L1 proximal step is their only regulariser)
    no_decay_names = ("sora_gate",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, key: str = "", **kwargs) -> None:
        super().__init__(base_layer, **kwargs)
        self.sora_A = ParameterDict({})
        self.sora_B = ParameterDict({})
        self.sora_gate = ParameterDict({})
        self.sora_dropout = nn.ModuleDict({})
        self.sora_r: dict[str, int] = {}
        self.sora_alpha: dict[str, float] = {}
        self.sora_scaling: dict[str, float] = {}
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, key=key)

    def update_layer(self, adapter_name: str, config, key: str = "", **kwargs) -> None:
        r = config.r
        kept = _pattern_rank(config.rank_pattern, key, r)
        self.sora_r[adapter_name] = r
        self.sora_alpha[adapter_name] = float(config.lora_alpha)
        self.sora_scaling[adapter_name] = float(config.lora_alpha) / r
        self.sora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        A = torch.empty(kept, self.in_features)
        if kept:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        B = torch.zeros(self.out_features, kept)
        if not config.init_weights:
            nn.init.normal_(B, std=0.1)
        gate = torch.randn(kept) if config.gate_init == "normal" else torch.ones(kept)
        if config.init_weights == "lq" and kept:
            B, A = self.lq_init(adapter_name, config, kept, self.sora_scaling[adapter_name], key)
            gate = torch.ones(kept)
        self.sora_A[adapter_name] = nn.Parameter(A)
        self.sora_B[adapter_name] = nn.Parameter(B)
        self.sora_gate[adapter_name] = nn.Parameter(gate)
        self._finish_update(adapter_name, config)

    def lowrank_forward(self, x: torch.Tensor, adapter_name: str) -> Optional[torch.Tensor]:
        """``(..., in)`` -> ``(..., out)``: ``(α/r) · ((dropout(x) Aᵀ) ⊙ g) Bᵀ``."""
        h = F.linear(self.sora_dropout[adapter_name](x), self.sora_A[adapter_name]) * self.sora_gate[adapter_name]
        return F.linear(h, self.sora_B[adapter_name]) * self.sora_scaling[adapter_name]

    def lowrank_factors(self, adapter_name: str, rank: Optional[int] = None, **kwargs):
        """``(α/r) · B[:, kept] · g[kept]`` and ``A[kept]``: only the ranks whose gate is nonzero (exact)."""
        if rank is not None:
            raise ValueError(
                "SoRA's export is exact at the ranks its gates kept; it takes no rank. Fix: drop rank=..., or "
                "squeeze the exported adapter afterwards."
            )
        gate = self.sora_gate[adapter_name]
        keep = (gate != 0).nonzero().squeeze(1)
        B = self.sora_B[adapter_name][:, keep] * (gate[keep] * self.sora_scaling[adapter_name])
        return B, self.sora_A[adapter_name][keep]

    def lowrank_delta(self, adapter_name: str) -> Optional[torch.Tensor]:
        B, A = self.lowrank_factors(adapter_name)
        dtype = self.merge_dtype(adapter_name)
        return B.to(dtype) @ A.to(dtype)

    # ------------------------------------------------------------------ SoRA specifics
    @torch.no_grad()
    def prox_step(self, adapter_name: str, threshold: float) -> None:
        """Soft-threshold the gate in place: ``g ← sign(g) · max(|g| − threshold, 0)``.

        ``softshrink`` is that formula bit for bit (``x ∓ t`` outside ``[−t, t]``, exactly 0 inside) in one kernel
        instead of five; it runs after every optimizer step on every adapted layer."""
        self.check_unmerged(adapter_name, "the proximal gate step")
        gate = self.sora_gate[adapter_name]
        gate.copy_(torch.nn.functional.softshrink(gate, threshold))

    def kept_rank(self, adapter_name: str) -> int:
        return int((self.sora_gate[adapter_name] != 0).sum())

    @torch.no_grad()
    def prune_ranks(self, adapter_name: str) -> int:
        """Drop the ranks whose gate is exactly 0 (outputs unchanged); returns the kept rank."""
        gate = self.sora_gate[adapter_name]
        keep = (gate != 0).nonzero().squeeze(1)
        for name in ("sora_A", "sora_B", "sora_gate"):
            container = getattr(self, name)
            old = container[adapter_name]
            new = old.index_select(1 if name == "sora_B" else 0, keep).clone()
            container[adapter_name] = nn.Parameter(new, requires_grad=old.requires_grad)
        return int(keep.numel())


def _pattern_rank(rank_pattern: dict, key: str, default: int) -> int:
    """The rank of module ``key`` from ``rank_pattern`` (exact name or a suffix after a dot), else ``default``."""
    for name, k in (rank_pattern or {}).items():
        if key == name or key.endswith("." + name):
            return int(k)
    return default
