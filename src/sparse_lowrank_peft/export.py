"""Export an adapter of this package as a plain PEFT LoRA adapter folder.

The folder (``adapter_config.json`` with ``peft_type: LORA`` + ``adapter_model.safetensors``) loads with plain
``peft`` — without importing this package — on the same base model, and gives the same outputs. Any LoRA server
(vLLM, TGI, ...) can serve it.

Exactness: a layer whose ΔW is a product of factors (``DeltaLayer.lowrank_factors`` returns ``(B, A)`` with
``ΔW = B @ A``; SoRA with its gate folded in, DyLoRA at a chosen rank, NOLA with its bases mixed) exports exactly:
``lora_B = B``, ``lora_A = A``, ``lora_alpha = r`` per layer so PEFT's scale ``alpha / r`` is 1. Per-layer ranks go
into ``rank_pattern`` / ``alpha_pattern``. A layer whose ΔW is not low-rank (a sparse term, RandLoRA's full-rank
sum) cannot be written as LoRA exactly; exporting it needs a rank to truncate to (LoRA-Squeeze), and until that path
exists such an export is refused with a clear error rather than written approximately.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from .delta.layer import DeltaLayer

__all__ = ["export_to_lora", "collect_factors"]


def collect_factors(peft_model, adapter_name: str = "default", rank: Optional[int] = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module name relative to the base model: (B, A)}`` with ``ΔW = B @ A`` for every adapted layer.

    Layers whose factorisation has rank 0 (e.g. SoRA with every gate pruned, ΔW = 0) are left out. Raises
    ``ValueError`` for a layer whose ΔW is not an exact product of factors.
    """
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    inner = peft_model.base_model.model
    for name, module in inner.named_modules():
        if not isinstance(module, DeltaLayer) or not module.has_adapter(adapter_name):
            continue
        if module.has_sparse(adapter_name):
            raise ValueError(
                f"Layer '{name}' has a sparse term (ΔW = low-rank + S); a plain LoRA adapter cannot represent it "
                "exactly. Fix: export through LoRA-Squeeze with a target rank (squeeze(...)/export_to_lora(..., "
                "rank=k)), which truncates ΔW by randomized SVD."
            )
        pair = module.lowrank_factors(adapter_name, rank=rank)
        if pair is None:
            raise ValueError(
                f"Layer '{name}' ({type(module).__name__}) has no exact low-rank factorisation of its ΔW. Fix: "
                "export it with a target rank (LoRA-Squeeze)."
            )
        B, A = pair
        if B.shape[1] == 0:
            continue
        factors[name] = (B.detach().to(torch.float32).contiguous(), A.detach().to(torch.float32).contiguous())
    return factors


def export_to_lora(
    peft_model,
    out_dir: str | Path,
    adapter_name: str = "default",
    rank: Optional[int] = None,
) -> Path:
    """Write ``peft_model``'s adapter ``adapter_name`` as a plain PEFT LoRA adapter folder ``out_dir``.

    Args:
        peft_model: a ``PeftModel`` whose adapter is one of this package's tuners.
        out_dir: the folder to write (created; existing files of the same names are overwritten).
        adapter_name: which adapter to export.
        rank: the rank to export at, for methods with nested ranks (DyLoRA: ``rank=b``); methods whose factors
            have one exact rank (SoRA: the kept ranks) refuse it.

    Returns:
        The folder's path. ``PeftModel.from_pretrained(base, out_dir)`` loads it with plain peft.
    """
    config = peft_model.peft_config[adapter_name]
    factors = collect_factors(peft_model, adapter_name, rank=rank)
    if not factors:
        raise ValueError(
            f"Adapter '{adapter_name}' has no layer with a nonzero low-rank delta to export (every rank pruned?). "
            "A LoRA adapter needs at least one layer of rank >= 1."
        )
    ranks = {name: B.shape[1] for name, (B, A) in factors.items()}
    r = max(ranks.values())
    pattern = {re.escape(name): k for name, k in ranks.items() if k != r}
    is_conv1d = {
        name: getattr(peft_model.base_model.model.get_submodule(name), "fan_in_fan_out", False) for name in factors
    }
    if len(set(is_conv1d.values())) > 1:
        raise ValueError("export_to_lora: a mix of Conv1D and Linear targets cannot share one LoRA fan_in_fan_out flag.")
    lora_config = LoraConfig(
        r=r,
        lora_alpha=r,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        target_modules=sorted(factors),
        lora_dropout=0.0,
        bias=getattr(config, "bias", "none").replace(f"{peft_model.base_model.prefix.rstrip('_')}_only", "lora_only"),
        modules_to_save=config.modules_to_save,
        fan_in_fan_out=next(iter(is_conv1d.values())),
        task_type=config.task_type,
        base_model_name_or_path=config.base_model_name_or_path,
        revision=config.revision,
        init_lora_weights=True,
    )
    state = {}
    # everything that is not this method's own tensors: modules_to_save heads, trained biases
    prefix = peft_model.base_model.prefix
    ours = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    for key, value in ours.items():
        if prefix not in key:
            state[key] = value.detach().contiguous()
    for name, (B, A) in factors.items():
        state[f"base_model.model.{name}.lora_A.weight"] = A
        state[f"base_model.model.{name}.lora_B.weight"] = B
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lora_config.save_pretrained(out_dir)
    save_file(state, out_dir / "adapter_model.safetensors", metadata={"format": "pt"})
    meta = {"exported_from": config.peft_type.value, "ranks": ranks}
    (out_dir / "export_info.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    return out_dir
