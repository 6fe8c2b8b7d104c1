"""Merge an adapter folder into its base: a plain transformers model folder, loaded without PEFT or this package.

    slpeft merge IN OUT [--base PATH]          # or merge_adapter_folder(IN, OUT, base=PATH)

Every adapted layer becomes ``W + ΔW`` in full precision, the function the adapter computes:

* adapters of this package merge with ``merge_and_unload(safe_merge=True, dequantize=True)``: one trained on a
  quantized base (LQ-LoRA's init, ``Q + ΔW``) is merged into the dequantized ``Q``, not re-quantized;
* PEFT's LoRA merges with PEFT's ``merge_and_unload(safe_merge=True)``; a LoRA folder saved by ``save_lq_lora`` has
  factors for ``Q``, so it is loaded onto a full-precision copy of the base whose targets hold ``Q`` dequantized
  (PEFT's own merge into a quantized layer would re-quantize ``Q + ΔW``).

Trained heads (``modules_to_save``) are kept; the base's tokenizer is saved beside the model when the base has one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from .squeeze.folders import base_model_path, load_adapter_model, load_base_model

__all__ = ["merge_adapter_folder", "merged_model"]


def merge_adapter_folder(in_dir: Union[str, Path], out_dir: Union[str, Path],
                         base: Optional[Union[str, Path]] = None) -> dict:
    """Load the adapter in ``in_dir`` onto its base (``base``, else the config's ``base_model_name_or_path``), merge
    it, and ``save_pretrained`` the plain model (and the base's tokenizer, if any) to ``out_dir``. Returns what was
    written: ``{"folder", "adapter", "layers", "dequantized", "tokenizer"}``."""
    model = load_adapter_model(in_dir, base)
    info = {"adapter": _peft_type(model), "layers": _adapted_layers(model),
            "dequantized": _quantized_bases(model)}
    merged = merged_model(model, in_dir, base)
    out = Path(out_dir)
    merged.save_pretrained(out)
    info["tokenizer"] = _save_tokenizer(base_model_path(in_dir, base), out)
    return {"folder": str(out), **info}


def merged_model(peft_model, in_dir: Optional[Union[str, Path]] = None,
                 base: Optional[Union[str, Path]] = None) -> nn.Module:
    """``peft_model`` merged in full precision (see the module docstring). A LoRA of ``load_lq_lora`` needs its
    folder ``in_dir`` (and ``base`` unless its config names it) to build the full-precision copy of its base."""
    from .delta.tuner import DeltaModel

    if isinstance(peft_model.base_model, DeltaModel):
        return peft_model.merge_and_unload(safe_merge=True, dequantize=True)
    if getattr(peft_model, "lq_lora_settings", None) is not None:
        if in_dir is None:
            raise ValueError("merged_model: a LoRA on LQ-LoRA's quantized base is merged through its adapter folder. "
                             "Fix: pass in_dir, the folder save_lq_lora wrote.")
        return _merge_onto_dequantized_base(peft_model, in_dir, base)
    return peft_model.merge_and_unload(safe_merge=True)


def _merge_onto_dequantized_base(lq_model, in_dir, base) -> nn.Module:
    """PEFT's LoRA of ``lq_model`` (factors for the quantized ``Q``) loaded onto a fresh full-precision base whose
    targets hold ``Q`` dequantized, then merged by PEFT: ``Q + ΔW`` exactly."""
    from peft import PeftModel

    from .delta.quant import dequantize_weight

    fresh = load_base_model(in_dir, base)
    for name in lq_model.lq_lora_settings["targets"]:
        quantized = lq_model.base_model.model.get_submodule(name).get_base_layer()
        target = fresh.get_submodule(name)
        with torch.no_grad():
            target.weight.copy_(dequantize_weight(quantized).to(target.weight.dtype))
    return PeftModel.from_pretrained(fresh, str(in_dir)).eval().merge_and_unload(safe_merge=True)


def _peft_type(peft_model) -> str:
    peft_type = peft_model.peft_config[peft_model.active_adapter].peft_type
    return str(getattr(peft_type, "value", peft_type))


def _adapted_layers(peft_model) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(isinstance(m, BaseTunerLayer) for m in peft_model.modules())


def _quantized_bases(peft_model) -> int:
    """Adapted layers whose base weight is not a float tensor (bitsandbytes' packed codes, HQQ's ``W_q``)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    def quantized(layer: nn.Module) -> bool:
        weight = getattr(layer, "weight", None)
        return not (isinstance(weight, torch.Tensor) and weight.is_floating_point())

    return sum(isinstance(m, BaseTunerLayer) and quantized(m.get_base_layer()) for m in peft_model.modules())


#: files of which a local base folder holds at least one if it has a tokenizer (transformers 5 builds an empty
#: 5-token tokenizer from a folder with none, so loading one is no test)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")


def _save_tokenizer(path: str, out: Path) -> bool:
    """Save the base's tokenizer beside the merged model; False when the base has none."""
    from transformers import AutoTokenizer

    if Path(path).is_dir() and not any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
        return False
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        return False
    tokenizer.save_pretrained(out)
    return True
