"""Validation helpers shared by the configs of every tuner (data checks only; no PEFT internals)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

__all__ = ["LQInitFields", "TargetFields", "check_init_weights", "check_positive_int", "check_target_options"]


@dataclass
class TargetFields:
    """Config fields choosing which modules an adapter wraps, shared by every tuner (PEFT's LoRA semantics).

    Args:
        target_modules (`list[str] | str`, *optional*):
            Names (a module matches if its name equals one or ends with ``"." + name``) or one regex (full match) of
            the modules to adapt: ``nn.Linear``, transformers ``Conv1D`` or 4-bit linear layers. Default: PEFT's LoRA
            defaults for the model type (query/value for BERT and RoBERTa); a model without defaults must name them.
        exclude_modules (`list[str] | str`, *optional*):
            Names or a regex of modules not to adapt even if ``target_modules`` matches them.
        layers_to_transform (`list[int] | int`, *optional*):
            Only adapt the layers with these indices (for a regex ``target_modules``, put the indices in the regex).
        layers_pattern (`list[str] | str`, *optional*):
            Name of the layer list ``layers_to_transform`` indexes into (e.g. ``"layer"`` for BERT); only with it.
        modules_to_save (`list[str]`, *optional*):
            Modules other than the adapter layers to train and save in full: the classification head (BERT-family
            models: ``["pooler", "classifier"]``, as MiniLM's pooler is untrained; RoBERTa: ``["classifier"]``).
    """

    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to adapt."})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules not to adapt."})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "Layer indices."})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Layer list name."})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Extra modules to train and save."})


@dataclass
class LQInitFields:
    """Config fields of LQ-LoRA initialisation (``init_weights="lq"``), shared by the factored tuners.

    Args:
        lq_quant_type (`str`, defaults to `"nf4"`):
            4-bit format of the base that LQ initialisation creates: ``"nf4"`` (QLoRA's NormalFloat) or ``"fp4"``.
        lq_max_iter (`int`, defaults to `20`):
            Maximum alternations of ``L ← SVD_r(W − Q)``, ``Q ← quantize(W − L)``; the best iterate is kept. More lowers
            the reconstruction error a little more (measured on MiniLM: see the README's table) at the cost of one
            SVD and one quantization per layer and iteration, once, when the adapter is created.
        lq_plan (`dict[str, str]`, *optional*):
            A mixed-configuration plan (``delta.bitbudget.solve``): module name -> configuration
            (``"hqq-3bit-g64"``, ``"bnb-nf4"``, ``"bnb-nf4-dq"``). Each targeted layer's base is quantized with its
            planned configuration instead of ``lq_quant_type``; every targeted layer must have an entry. It is saved in
            ``adapter_config.json``, and loading re-derives the same quantized base (the LQ decomposition and both
            libraries are deterministic) before the trained adapter weights are loaded onto it.
    """

    lq_quant_type: str = field(default="nf4", metadata={"help": "4-bit format of the LQ base: nf4 or fp4."})
    lq_max_iter: int = field(default=20, metadata={"help": "Maximum LQ alternations."})
    lq_plan: Optional[dict] = field(default=None, metadata={"help": "Per-module quantization configuration (LQ)."})


def check_init_weights(config) -> None:
    """``init_weights`` is a bool or ``"lq"``; LQ fields are valid."""
    value = config.init_weights
    if not (isinstance(value, bool) or value == "lq"):
        raise ValueError(
            f"{type(config).__name__}.init_weights={value!r} must be True, False or 'lq'. Fix: init_weights=True "
            "(zero update at step 0) or 'lq' (LQ-LoRA: quantized base + low-rank part of its error)."
        )
    if config.lq_quant_type not in ("nf4", "fp4"):
        raise ValueError(f"{type(config).__name__}.lq_quant_type={config.lq_quant_type!r} must be 'nf4' or 'fp4'.")
    check_positive_int(config, "lq_max_iter")
    plan = getattr(config, "lq_plan", None)
    if plan is None:
        return
    if value != "lq":
        raise ValueError(
            f"{type(config).__name__}.lq_plan is set but init_weights={value!r}: a plan quantizes the base during LQ "
            "initialisation. Fix: init_weights='lq', or drop lq_plan."
        )
    if not isinstance(plan, dict) or not plan or not all(isinstance(k, str) for k in plan):
        raise ValueError(
            f"{type(config).__name__}.lq_plan must be a non-empty dict of module name -> configuration, got "
            f"{type(plan).__name__}. Fix: lq_plan=bitbudget.solve(table, budget_bits)."
        )
    from .delta.bitbudget import parse_choice

    for name, choice in plan.items():
        try:
            parse_choice(choice)
        except (ValueError, ImportError) as err:
            raise type(err)(f"{type(config).__name__}.lq_plan['{name}']: {err}") from None


def check_positive_int(config, field_name: str, hint: str = "") -> None:
    """Raise ``ValueError`` unless ``config.<field_name>`` is an int > 0."""
    value = getattr(config, field_name)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(
            f"{type(config).__name__}.{field_name}={value!r} must be a positive integer"
            + (f" ({hint})." if hint else ".")
            + f" Fix: pass {field_name}=<int > 0>."
        )


def check_target_options(config) -> None:
    """Normalise list-valued targeting fields to sets (as PEFT does) and check their combination."""
    for name in ("target_modules", "exclude_modules"):
        value = getattr(config, name, None)
        if isinstance(value, list):
            setattr(config, name, set(value))
    if getattr(config, "layers_pattern", None) and not getattr(config, "layers_to_transform", None):
        raise ValueError(
            f"{type(config).__name__}: layers_pattern={config.layers_pattern!r} is only used together with "
            "layers_to_transform. Fix: also pass layers_to_transform=[...], or drop layers_pattern."
        )
    if isinstance(getattr(config, "target_modules", None), str) and getattr(config, "layers_to_transform", None):
        raise ValueError(
            f"{type(config).__name__}: layers_to_transform cannot be combined with a regex target_modules string. "
            "Fix: pass target_modules as a list of names, or put the layer indices into the regex."
        )
