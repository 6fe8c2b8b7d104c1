"""SoraModel: gated-rank adapters, their proximal step, pruning and the kept-rank report."""

from __future__ import annotations

from typing import Optional

from ...delta.tuner import DeltaModel, pick_adapter
from .layer import SoraLayer


class SoraModel(DeltaModel):
    """SoRA adapters for a transformers or plain PyTorch model.

    Train with the gate's proximal step after every optimizer step: ``SoraCallback`` for ``transformers.Trainer``,
    or ``sora_prox_step(model, lr)`` in a custom loop (both in ``sparse_lowrank_peft.callbacks``). Then
    ``model.base_model.prune()`` removes the ranks whose gate is exactly zero (outputs unchanged) and records the
    per-layer ranks in the config's ``rank_pattern``, so the pruned adapter saves and reloads at its own size.
    """

    prefix: str = "sora_"
    tuner_layer_cls = SoraLayer

    def _sora_layers(self):
        for name, module in self.model.named_modules():
            if isinstance(module, SoraLayer):
                yield name, module

    def prox_step(self, threshold: float, adapter_name: Optional[str] = None) -> None:
        """Soft-threshold every gate of ``adapter_name`` (default: the active adapters) by ``threshold``."""
        names = [adapter_name] if adapter_name else self.active_adapters
        for _, layer in self._sora_layers():
            for a in names:
                if layer.has_adapter(a):
                    layer.prox_step(a, threshold)

    def kept_ranks(self, adapter_name: Optional[str] = None) -> dict[str, int]:
        """``{module name: number of nonzero gates}`` for every adapted layer of ``adapter_name`` (default: the
        active adapter)."""
        adapter_name = pick_adapter(self.peft_config, self.active_adapters, adapter_name, "kept_ranks")
        return {name: layer.kept_rank(adapter_name) for name, layer in self._sora_layers() if layer.has_adapter(adapter_name)}

    def prune(self, adapter_name: Optional[str] = None) -> dict[str, int]:
        """Remove ranks whose gate is exactly 0 from every layer of ``adapter_name`` (default: the active adapter);
        returns (and records in ``rank_pattern``) the kept ranks. The adapter's outputs do not change."""
        adapter_name = pick_adapter(self.peft_config, self.active_adapters, adapter_name, "prune")
        kept = {name: layer.prune_ranks(adapter_name) for name, layer in self._sora_layers() if layer.has_adapter(adapter_name)}
        config = self.peft_config[adapter_name]
        config.rank_pattern = {name: k for name, k in kept.items()}
        return kept

    def plot_kept_ranks(self, path, adapter_name: Optional[str] = None):
        """Bar chart of the kept rank per layer (of ``r``), written to ``path`` (PNG); returns the path."""
        adapter_name = pick_adapter(self.peft_config, self.active_adapters, adapter_name, "plot_kept_ranks")
        return plot_kept_ranks(self.kept_ranks(adapter_name), self.peft_config[adapter_name].r, path)


def plot_kept_ranks(kept: dict[str, int], r: int, path):
    """Bar chart of ``{layer: kept rank}`` against ``r`` (e.g. ``method_results.kept_ranks`` of a GLUE results
    file), written to ``path`` (PNG); returns the path."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(kept)
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names)), 4))
    ax.bar(range(len(names)), [kept[n] for n in names], color="tab:blue")
    ax.axhline(r, color="gray", linestyle="--", label=f"r = {r}")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([_short(n) for n in names], rotation=90, fontsize=7)
    ax.set_ylabel("kept rank")
    ax.set_title(f"SoRA kept ranks: {sum(kept.values())} of {r * len(names)}")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _short(name: str) -> str:
    """'roberta.encoder.layer.3.attention.self.query' -> 'L3.query'."""
    parts = name.split(".")
    digits = [p for p in parts if p.isdigit()]
    return (f"L{digits[0]}." if digits else "") + parts[-1]
