"""DyLoraModel: nested-rank adapters; one adapter, any rank b <= r at inference."""

from __future__ import annotations

from typing import Optional

import torch

from ...delta.tuner import DeltaModel
from .layer import DyLoraLayer


def sample_rank(r: int, step: int, seed: int = 0, distribution: str = "uniform") -> int:
    """The rank ``b ∈ 1..r`` for training step ``step``: a pure function of ``(seed, step)``, so every process of a
    distributed run (and a resumed run) draws the same ``b``."""
    if distribution == "max":
        return r
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step))
    if distribution == "uniform":
        return int(torch.randint(1, r + 1, (1,), generator=gen))
    if distribution == "geometric":
        weights = torch.tensor([2.0 ** -(r - b) for b in range(1, r + 1)])
        return int(torch.multinomial(weights, 1, generator=gen)) + 1
    raise ValueError(f"unknown rank distribution {distribution!r}")


class DyLoraModel(DeltaModel):
    """DyLoRA adapters for a transformers or plain PyTorch model.

    Training samples a rank per step: ``DyLoraCallback`` for ``transformers.Trainer`` or ``dylora_sample_rank(model,
    step)`` in a custom loop (``sparse_lowrank_peft.callbacks``). For inference at rank ``b``: ``set_rank(b)``;
    ``merge_and_unload(rank=b)`` and ``export_to_lora(model, dir, rank=b)`` take an explicit rank.
    """

    prefix: str = "dylora_"
    tuner_layer_cls = DyLoraLayer

    def _dylora_layers(self, adapter_name: str):
        for module in self.model.modules():
            if isinstance(module, DyLoraLayer) and module.has_adapter(adapter_name):
                yield module

    def set_rank(self, rank: int, adapter_name: Optional[str] = None) -> None:
        """Use rank ``b`` (``1 ≤ b ≤ r``) in every layer of ``adapter_name`` (default: the active adapters)."""
        names = [adapter_name] if adapter_name else self.active_adapters
        for name in names:
            r = self.peft_config[name].r
            if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= r:
                raise ValueError(
                    f"set_rank({rank!r}): the rank must be an int in 1..r={r} for adapter '{name}'. Fix: 1 <= b <= {r}."
                )
        for name in names:
            for layer in self._dylora_layers(name):
                layer.set_rank(rank, name)

    def get_rank(self, adapter_name: Optional[str] = None) -> int:
        name = adapter_name or self.active_adapters[0]
        return next(iter(self._dylora_layers(name))).dylora_rank[name]

    def sample_rank(self, step: int, adapter_name: Optional[str] = None) -> int:
        """Draw this step's rank from the config's distribution and seed, set it everywhere and return it."""
        name = adapter_name or self.active_adapters[0]
        config = self.peft_config[name]
        b = sample_rank(config.r, step, config.rank_seed, config.rank_distribution)
        self.set_rank(b, name)
        return b

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names=None, rank=None,
                         dequantize: bool = False):
        """Merge ``adapter_names`` (default: the active adapters) at ``rank`` (default: each one's current rank) and
        unload (``dequantize``: see ``DeltaModel``)."""
        if rank is not None:
            for name in adapter_names or self.active_adapters:
                self.set_rank(rank, name)
        return super().merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names,
                                        dequantize=dequantize)
