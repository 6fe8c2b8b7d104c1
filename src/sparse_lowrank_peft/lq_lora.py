"""LQ-LoRA with PEFT's own LoRA: ``W ≈ Q + (α/r)·B·A``, the base ``Q`` quantized, ``lora_B``/``lora_A`` starting at L.

LQ-LoRA (Guo et al., "LQ-LoRA: Low-rank plus quantized matrix decomposition for efficient language model
finetuning", ICLR 2024) splits every targeted weight into a quantized ``Q`` (kept frozen) and the rank-``r`` part
``L`` of its error, from which LoRA starts; with a bit-budget plan (``delta.bitbudget.solve``) each matrix gets its
own configuration. This is what PEFT's LoftQ (``init_lora_weights="loftq"``) does with one NF4 pass, here with LQ's
alternating decomposition (``delta.quant.lq_decompose``), optionally Fisher-weighted (``delta.fisher.use_fisher``),
and any configuration of a plan (HQQ 2/3/4/8 bits, bitsandbytes NF4)::

    model = get_lq_lora_model(base, LoraConfig(r=8, target_modules=["query", "value"]), plan=plan)
    ...                                   # train: PEFT's LoRA on HQQ / bitsandbytes bases
    save_lq_lora(model, "out")            # PEFT's adapter files + lq_lora.json (targets, rank, plan, settings)
    model = load_lq_lora(base, "out")     # re-derives Q (deterministic), then PeftModel.from_pretrained

The saved adapter is a plain PEFT LoRA adapter, but for the base ``Q``, not ``W``: :func:`load_lq_lora` rebuilds
that base from the full-precision model. For a LoRA server, which loads ``W``, ``export_to_lora(model, dir)`` writes
the change since the start, ``ΔW − L`` (rank ``2r`` when exact). ``merge_and_unload()`` is PEFT's: it re-quantizes
``Q + ΔW`` in the layer's own configuration.
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional

import torch
from torch import nn

from ._peft_compat import as_injected, check_target_module_exists, is_all_linear
from .delta import fisher as fisher_weights
from .delta import lq_checks, quant

__all__ = ["LQ_LORA_FILE", "get_lq_lora_model", "load_lq_lora", "save_lq_lora"]

#: the settings file :func:`save_lq_lora` writes beside PEFT's adapter files
LQ_LORA_FILE = "lq_lora.json"
_FORMAT = 1


def get_lq_lora_model(model: nn.Module, config, plan: Optional[dict] = None, quant_type: str = "nf4",
                      max_iter: int = 20, adapter_name: str = "default", svd: str = "auto"):
    """PEFT's ``get_peft_model(model, config)`` on a base whose targeted linears hold LQ-LoRA's ``Q``, with every
    LoRA adapter starting at its layer's ``L`` (so the model computes ``Q + L ≈ W`` at step 0).

    Args:
        model: a full-precision model (its targeted layers ``nn.Linear``); it is changed in place, as by PEFT.
        config: a ``peft.LoraConfig`` with ``target_modules``; plain LoRA (no DoRA, rank/alpha patterns or bias).
        plan: ``{module name: configuration}`` (``delta.bitbudget.solve``) covering every target; the other
            linears it names are quantized plainly (the whole base the plan describes). None: the targets in
            ``quant_type`` (bitsandbytes ``"nf4"`` / ``"fp4"``, with double quantization).
        max_iter: LQ alternations per layer (the best iterate is kept; the first is LoftQ's pass).
        svd: LQ's SVD: ``"auto"`` (exact for small matrices, randomized for large), ``"exact"`` or ``"randomized"``
            (``delta.quant.resolve_lq_svd``).

    Everything is checked before the model is changed. Within ``delta.fisher.use_fisher(...)`` the decompositions
    are Fisher-weighted, and :func:`save_lq_lora` keeps those weights for reloading.
    """
    targets = _check_request(model, config, plan, quant_type, max_iter, svd)
    settings = {"format": _FORMAT, "targets": targets, "rank": config.r, "quant_type": quant_type,
                "max_iter": max_iter, "plan": plan, "svd": svd, "quantizers": lq_checks.quantizer_versions(plan)}
    fisher = fisher_weights.fisher_for_modules(targets)
    factors = _quantize_targets(model, settings, fisher)
    if is_all_linear(config.target_modules):  # PEFT's shorthand would now skip the targets HQQ holds
        config.target_modules = set(targets)
    from peft import get_peft_model

    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    _start_at(peft_model, factors, adapter_name)
    peft_model.lq_lora_settings = {**settings, "fisher": fisher or None}
    return peft_model


def save_lq_lora(peft_model, save_directory: str, **kwargs) -> None:
    """``peft_model.save_pretrained(save_directory, **kwargs)``, plus ``lq_lora.json`` (and the Fisher weights the
    decomposition used, ``lq_fisher.safetensors``): what :func:`load_lq_lora` needs to rebuild the same base."""
    settings = getattr(peft_model, "lq_lora_settings", None)
    if settings is None:
        raise ValueError("save_lq_lora: this model was not made by get_lq_lora_model (it has no lq_lora_settings). "
                         "Fix: create it with get_lq_lora_model, or save a plain PEFT model with save_pretrained.")
    peft_model.save_pretrained(save_directory, **kwargs)
    record = {k: v for k, v in settings.items() if k != "fisher"}
    if settings.get("fisher"):
        fisher_weights.save_fisher(settings["fisher"], os.path.join(save_directory, fisher_weights.LQ_FISHER_FILE))
        record["fisher_file"] = fisher_weights.LQ_FISHER_FILE
    with open(os.path.join(save_directory, LQ_LORA_FILE), "w") as f:
        json.dump(record, f, indent=2, sort_keys=True)


def load_lq_lora(model: nn.Module, path: str, adapter_name: str = "default", **kwargs):
    """The full-precision ``model`` with its targets re-quantized as :func:`save_lq_lora` recorded (the LQ
    decomposition and both libraries are deterministic, so ``Q`` is the trained one), and the LoRA adapter in
    ``path`` loaded onto it (``PeftModel.from_pretrained(model, path, adapter_name, **kwargs)``)."""
    settings = _read_settings(path)
    _check_targets(model, settings["targets"], f"{LQ_LORA_FILE} in {path!r}")
    lq_checks.warn_on_other_quantizers(settings.get("quantizers"), settings["plan"], f"{LQ_LORA_FILE} in {path!r}")
    fisher = (fisher_weights.load_fisher(os.path.join(path, settings["fisher_file"]))
              if settings.get("fisher_file") else {})
    saved = lq_checks.saved_shapes(os.path.join(path, "adapter_model.safetensors"))
    lq_checks.check_saved_factors(model, settings["targets"], saved, ("lora_A.weight", "lora_B.weight"),
                              f"load_lq_lora({path!r})")
    if settings["plan"]:
        lq_checks.check_plan(model, settings["plan"], settings["targets"], f"{LQ_LORA_FILE} in {path!r}: plan")
    lq_checks.check_lq_layers(model, settings["targets"], settings["rank"], fisher.get, f"{LQ_LORA_FILE} in {path!r}")
    factors = _quantize_targets(model, settings, fisher)
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, path, adapter_name=adapter_name, **kwargs)
    _record_offsets(peft_model, factors)
    peft_model.lq_lora_settings = {**settings, "fisher": fisher or None}
    return peft_model


# ---------------------------------------------------------------------------------------------------------- steps
def _check_request(model, config, plan, quant_type, max_iter, svd) -> list[str]:
    """The targeted module names, after every check of the request (nothing is changed)."""
    from peft import LoraConfig

    if not isinstance(config, LoraConfig):
        raise TypeError(f"get_lq_lora_model takes a peft.LoraConfig, got {type(config).__name__}. Fix: for this "
                        "package's tuners use their own init_weights='lq' (and lq_plan) instead.")
    unsupported = [f for f, bad in (("use_dora", config.use_dora), ("rank_pattern", config.rank_pattern),
                                    ("alpha_pattern", config.alpha_pattern), ("lora_bias", config.lora_bias),
                                    ("target_parameters", getattr(config, "target_parameters", None)),
                                    ("init_lora_weights", config.init_lora_weights is not True)) if bad]
    if unsupported:
        raise ValueError(f"get_lq_lora_model: LoraConfig sets {unsupported}; LQ-LoRA starts a plain LoRA adapter of "
                         "one rank at L, so it takes none of them. Fix: leave them at their defaults.")
    if config.target_modules is None:
        raise ValueError("get_lq_lora_model: LoraConfig.target_modules is None. Fix: name the linear layers to adapt "
                         "(e.g. target_modules=['query', 'value']); each is quantized.")
    if plan is None:
        quant._check_quant_type(quant_type)
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"get_lq_lora_model: max_iter={max_iter!r} must be a positive integer. Fix: e.g. 20.")
    if svd not in quant.LQ_SVD_MODES:
        raise ValueError(f"get_lq_lora_model: svd={svd!r} must be one of {quant.LQ_SVD_MODES}. Fix: 'auto'.")
    resolved = as_injected(config, model)  # the modules PEFT will wrap (all-linear resolved, SEQ_CLS head out)
    targets = [key for key, _ in model.named_modules() if key and check_target_module_exists(resolved, key)]
    _check_targets(model, targets, f"LoraConfig.target_modules={config.target_modules!r}")
    if plan is not None:
        lq_checks.check_plan(model, plan, targets, "get_lq_lora_model: plan")
    lq_checks.check_lq_layers(model, targets, config.r, fisher_weights.fisher_for, "get_lq_lora_model")
    return targets


def _check_targets(model, targets: list[str], source: str) -> None:
    if not targets:
        raise ValueError(f"{source} matches no module of this model. Fix: name its linear layers.")
    missing = [t for t in targets if not _has(model, t)]
    if missing:
        raise ValueError(f"{source} names modules this model does not have: {missing[:3]}. The adapter was made for "
                         "another model. Fix: load it onto the model it was trained on.")
    wrong = [f"{t} ({type(model.get_submodule(t)).__name__})" for t in targets
             if type(model.get_submodule(t)) is not nn.Linear]
    if wrong:
        raise ValueError(f"{source}: LQ-LoRA quantizes full-precision nn.Linear layers, but {wrong[:3]} are not. "
                         "Fix: load the model in full precision (no BitsAndBytesConfig) and target its linears.")


def _has(model, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def _quantize_targets(model, settings: dict, fisher: dict) -> dict[str, quant.LQResult]:
    """Replace every target by its LQ ``Q`` (in place); the decompositions, by target."""
    results = {}
    for key in settings["targets"]:
        parent_name, _, child = key.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        choice = lq_checks.plan_choice(settings["plan"], key)
        quantized, result = quant.lq_quantize(linear, settings["rank"], settings["quant_type"], settings["max_iter"],
                                              fisher=fisher.get(key), choice=choice,
                                              svd=settings.get("svd", "exact-fp32"))  # saved before svd existed
        quantized.lq_errors = result.summary()
        setattr(parent, child, quantized.train(linear.training))
        results[key] = result
    if settings["plan"]:  # the plan's other linears: quantized plainly, so the whole base is the trained one
        from .delta.bitbudget import apply_plan

        apply_plan(model, settings["plan"])
    if any(quant._is_linear4bit(m) for m in model.modules()):
        quant.mark_loaded_in_kbit(model, bits=4)
        quant.keep_standard_layouts(model, give_back=False)
    return results


def _record_offsets(peft_model, factors: dict[str, quant.LQResult]) -> None:
    """Keep on each LoRA layer the ``L`` by which its ``Q`` falls short of ``W`` (``quant.record_lq_offset``), for
    exports to the original weights."""
    root = peft_model.base_model.model
    for key, result in factors.items():
        quant.record_lq_offset(root.get_submodule(key), result)


def _start_at(peft_model, factors: dict[str, quant.LQResult], adapter_name: str) -> None:
    """Set each LoRA layer's ``lora_B``, ``lora_A`` so that ``scaling · B · A = L``."""
    root = peft_model.base_model.model
    _record_offsets(peft_model, factors)
    with torch.no_grad():
        for key, result in factors.items():
            layer = root.get_submodule(key)
            s = math.sqrt(layer.scaling[adapter_name])
            for weight, value in ((layer.lora_B[adapter_name].weight, result.B), (layer.lora_A[adapter_name].weight,
                                                                                  result.A)):
                weight.copy_((value / s).to(weight.dtype))


def _read_settings(path: str) -> dict:
    file = os.path.join(path, LQ_LORA_FILE)
    if not os.path.isfile(file):
        raise ValueError(f"{path!r} has no {LQ_LORA_FILE}: it is not an adapter saved by save_lq_lora, so the "
                         "quantized base it was trained on cannot be rebuilt. Fix: save it with save_lq_lora (or load "
                         "a plain LoRA adapter with PeftModel.from_pretrained).")
    with open(file) as f:
        settings = json.load(f)
    if settings.get("format") != _FORMAT:
        raise ValueError(f"{file} has format {settings.get('format')!r}; this version reads format {_FORMAT}. "
                         "Fix: load it with the sparse_lowrank_peft version that saved it.")
    return settings
