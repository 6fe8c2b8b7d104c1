"""What LQ initialisation checks before it quantizes anything, and which configuration a bit-budget plan gives a
module.

LQ initialisation replaces each target's weight by its quantized ``Q`` one layer at a time, so an input that fails
midway would leave a half-changed model. These checks run over every target first: the plan's entries against the
model (:func:`check_plan`), the rank and Fisher weights against each weight (:func:`check_lq_layers`), a saved
adapter's factor shapes against the layers (:func:`check_saved_factors`). A plan's keys are module names or dotted
suffixes of them (:func:`plan_key`); the quantizer versions an LQ base was made with are recorded, since loading
re-derives it (:func:`quantizer_versions`).
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, Iterable, Optional, Union

import torch
from torch import nn

__all__ = ["check_lq_layers", "check_plan", "check_saved_factors", "names_each_other", "names_module", "plan_choice",
           "plan_key", "quantizer_versions", "saved_shapes", "warn_on_other_quantizers"]


def quantizer_versions(plan: Optional[dict] = None) -> dict[str, str]:
    """The installed versions of the libraries an LQ base is quantized with: bitsandbytes without a plan, and the
    libraries of the configurations a ``plan`` names. An adapter records them, since loading re-derives its base."""
    from importlib.metadata import PackageNotFoundError, version

    from .bitbudget import parse_choice

    packages = {"bnb": "bitsandbytes", "hqq": "hqq"}  # QuantChoice.library -> its distribution
    libraries = sorted({packages[parse_choice(c).library] for c in plan.values()}) if plan else ["bitsandbytes"]
    out = {}
    for library in libraries:
        try:
            out[library] = version(library)
        except PackageNotFoundError:
            out[library] = "not installed"
    return out


def warn_on_other_quantizers(recorded: Optional[dict], plan: Optional[dict], owner: str) -> None:
    """Warn when the installed quantization libraries differ from the versions ``recorded`` with an adapter: its base
    is re-derived at load, and another version may quantize some entries differently."""
    if not recorded:
        return
    installed = quantizer_versions(plan)
    changed = [f"{lib} {made} -> {installed.get(lib)}" for lib, made in sorted(recorded.items())
               if installed.get(lib, made) != made]
    if changed:
        warnings.warn(
            f"{owner}: this LQ adapter's quantized base is re-derived now with other quantizer versions than it was "
            f"trained on ({', '.join(changed)}). The base may differ slightly (bitsandbytes 0.49.2 vs 0.50.2 quantize a "
            "768x1024 weight to NF4 with double quantization with ||dQ||/||W|| = 2.5e-4), so outputs may not equal the "
            "trained model's. Fix: install the recorded versions where exact equality matters.",
            stacklevel=3,
        )


def names_module(key: str, name: str) -> bool:
    """Whether ``key`` (a plan entry, a target) names the module ``name``: equal, or a dotted suffix of it."""
    return name == key or name.endswith("." + key)


def names_each_other(key: str, name: str) -> bool:
    """Either name names the other (a loaded adapter's names may carry a prefix the model lacks, or the reverse)."""
    return names_module(name, key) or names_module(key, name)


def plan_key(plan: dict, name: str) -> Optional[str]:
    """The entry of ``plan`` that configures module ``name``, whatever the plan's key order (a saved plan comes back
    with sorted keys): the exact name, else the longest key that is a dotted suffix of it (``"layer.0.query"`` before
    ``"query"``), else a key that carries a prefix the module's name lacks (``"base_model.model.<name>"``); None if
    none does."""
    if name in plan:
        return name
    suffixes = [k for k in plan if names_module(k, name)]
    if suffixes:
        return max(suffixes, key=len)
    prefixed = [k for k in plan if names_module(name, k)]
    return min(prefixed, key=len) if prefixed else None


def plan_choice(plan: Optional[dict], key: str):
    """The ``delta.bitbudget.QuantChoice`` a mixed-configuration plan gives module ``key`` (:func:`plan_key`), or
    None without a plan."""
    if not plan:
        return None
    from .bitbudget import parse_choice

    entry = plan_key(plan, key)
    if entry is not None:
        return parse_choice(plan[entry])
    raise ValueError(
        f"lq_plan has no configuration for the targeted module '{key}'. The plan was made for other modules (or "
        "another model). Fix: measure and solve a plan over the modules this config targets (delta.bitbudget)."
    )


def check_plan(model: nn.Module, plan: dict, targeted: Iterable[str], owner: str) -> None:
    """Raise ``ValueError`` (naming ``owner``, e.g. ``"SLTrainConfig.lq_plan"``) unless the plan gives every module in
    ``targeted`` a configuration, every linear it names one the installed library can apply to its weight's shape,
    and every entry configures some linear of ``model`` (:func:`plan_key`, the matching the quantization uses):
    checked before anything is quantized."""
    targeted = list(targeted)
    for key in targeted:  # in the given (the model's) order, so the first target without one is named
        plan_choice(plan, key)  # raises, naming the target without a configuration
    targeted = set(targeted)
    configured = set()
    for name, module in model.named_modules():  # the targets and the other linears the plan quantizes
        named = _is_plain_or_adapted_linear(module) and plan_key(plan, name) is not None
        if named or name in targeted:
            configured.add(plan_key(plan, name))
        weight = getattr(module, "weight", None)
        if (name in targeted or (named and type(module) is nn.Linear)) and weight is not None:
            choice = plan_choice(plan, name)
            reason = choice.unsupported(tuple(weight.shape))
            if reason:
                raise ValueError(
                    f"{owner}['{name}'] = '{choice.name}', which the installed library cannot do: {reason}. Fix: "
                    "another configuration for that module (delta.bitbudget.measure lists only the ones each matrix "
                    "allows). The model was not changed."
                )
    unknown = [p for p in plan if p not in configured]
    if unknown:
        raise ValueError(
            f"{owner} names modules this model has no linear layer for: {unknown[:3]}"
            + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
            + ". A plan quantizes linear layers only, and this one was made for another model (or names an "
            "embedding or a block). Fix: measure and solve a plan on this model (delta.bitbudget.measure / solve). "
            "The model was not changed."
        )


def _is_plain_or_adapted_linear(module: nn.Module) -> bool:
    """A linear layer a plan configures: an ``nn.Linear``, one a plan already quantized (bitsandbytes, HQQ), or an
    adapter layer around either (the plan's targets, quantized by LQ initialisation)."""
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    return isinstance(base, nn.Linear) or (hasattr(base, "in_features") and hasattr(base, "out_features"))


def check_lq_layers(model: nn.Module, targets: Iterable[str], rank: Union[int, Callable[[str], int]],
                    fisher: Callable[[str], Optional[tuple]], owner: str) -> None:
    """What LQ initialisation of every target needs, checked before the first one is quantized (each raised midway,
    after earlier targets were replaced): a ``rank`` the weight has (at most ``min(out, in)``; an int, or the rank of
    each target, ``rank(key)``, for a config with a ``rank_pattern``), and Fisher weights (``fisher(key)``) of the
    weight's row and column sizes, finite and non-negative."""
    for key in targets:
        needed = rank(key) if callable(rank) else rank
        weight = model.get_submodule(key).weight
        out_features, in_features = weight.shape
        if needed > min(out_features, in_features):
            raise ValueError(
                f"{owner}: rank {needed} is above what '{key}' ({out_features}x{in_features}) has, min(out, in) = "
                f"{min(out_features, in_features)}, so LQ cannot split off a rank-{needed} L. Fix: a rank <= "
                f"{min(out_features, in_features)}, or leave that module out of target_modules. The model was not "
                "changed."
            )
        pair = fisher(key)
        if pair is None:
            continue
        row, col = pair
        if tuple(row.shape) != (out_features,) or tuple(col.shape) != (in_features,):
            raise ValueError(
                f"{owner}: the Fisher weights of '{key}' have shapes {tuple(row.shape)} / {tuple(col.shape)}, but its "
                f"weight is {out_features}x{in_features} (rows, columns). They were computed for another model. Fix: "
                "fisher_row_col_weights(model, batches) on this model. The model was not changed."
            )
        if not (torch.isfinite(row).all() and torch.isfinite(col).all() and (row >= 0).all() and (col >= 0).all()):
            raise ValueError(
                f"{owner}: the Fisher weights of '{key}' are not all finite and non-negative (squared gradients "
                "are). Fix: recompute them with fisher_row_col_weights; a NaN loss in the calibration batches makes "
                "NaN weights. The model was not changed."
            )


def saved_shapes(file: str) -> Optional[dict[str, tuple]]:
    """``{tensor name: shape}`` of a safetensors file, read without loading the tensors; None if there is no file."""
    if not os.path.isfile(file):
        return None
    from safetensors import safe_open

    with safe_open(file, framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def check_saved_factors(model: nn.Module, targets: Iterable[str], shapes: Optional[dict], factors: tuple[str, str],
                        owner: str) -> None:
    """An adapter's saved factors fit the model's layers before LQ replaces their weights (PEFT checks the shapes it
    loads only after injection): the tensor named ``<target>.<factors[0]>`` has the layer's input size as its last
    dimension, ``<target>.<factors[1]>`` its output size as its first."""
    for key in targets:
        layer = model.get_submodule(key)
        for factor, dim, size in ((factors[0], -1, layer.in_features), (factors[1], 0, layer.out_features)):
            shape = next((v for k, v in (shapes or {}).items() if k.endswith(f"{key}.{factor}")), None)
            if shape is not None and shape[dim] != size:
                raise ValueError(
                    f"{owner}: the adapter's {factor} of '{key}' has shape {shape}, but the layer is "
                    f"{layer.out_features}x{layer.in_features} in this model. It was saved for another base model. "
                    "Fix: load it on the base model it was trained on. The model was not changed."
                )
