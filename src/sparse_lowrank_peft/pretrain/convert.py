"""Model-level SLTrain pretraining: replace linears by :class:`SLTrainLinear`, write the dense model back, save/load.

* :func:`to_sltrain` replaces each targeted ``nn.Linear`` / transformers ``Conv1D`` by an :class:`SLTrainLinear`
  (the dense weight is dropped: pretraining starts from the paper's initialisation, not from it);
* :func:`to_dense` writes each :class:`SLTrainLinear` back as the layer type it replaced, with
  ``W = (α/r)·B·A + S`` (the very matrix the forward multiplies by, so outputs agree to rounding);
* :func:`save_sltrain` / :func:`load_sltrain` store the sparse form (``B``, ``A``, values, support indices and
  every other tensor of the model) in one safetensors file plus ``sltrain_config.json``; loading checks every
  support (shape, range, duplicates, order, count) before the model is changed.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..delta.support import SparseSupport, layer_seed, support_nnz
from .layer import SLTrainLinear

__all__ = ["SLTrainSettings", "to_sltrain", "to_dense", "save_sltrain", "load_sltrain", "linear_parameter_count"]

CONFIG_NAME = "sltrain_config.json"
WEIGHTS_NAME = "sltrain_model.safetensors"


@dataclass
class SLTrainSettings:
    """What :func:`to_sltrain` was called with and the layers it replaced (saved as ``sltrain_config.json``).

    ``modules`` maps each replaced module's name to ``[out_features, in_features, dense_kind, has_bias]``;
    ``target_modules`` is what the call (or calls) named: a second call on the same model adds its names, and where
    either call gave a regex it becomes the list of the replaced modules' names. ``dtype`` is the SLTrain layers'
    parameter dtype at save time (``"bfloat16"``...), in which :func:`load_sltrain` builds a model from a config;
    None in files saved before it was recorded (the model is then built in transformers' default dtype).
    """

    rank: int
    density: float
    alpha: float
    seed: int
    target_modules: list[str] | str
    modules: dict[str, list] = field(default_factory=dict)
    dtype: str | None = None


def _matches(name: str, targets: list[str] | str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _targets(model: nn.Module, target_modules: list[str] | str) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs to replace; raises before any change if one cannot be or none matches."""
    found = [(n, m) for n, m in model.named_modules() if n and _matches(n, target_modules)]
    bad = [f"{n} ({type(m).__name__})" for n, m in found if not isinstance(m, (nn.Linear, Conv1D, SLTrainLinear))]
    if bad:
        raise ValueError(
            f"to_sltrain: target_modules={target_modules!r} matches modules that are neither nn.Linear nor "
            f"transformers Conv1D: {', '.join(bad[:5])}. Name the linear layers themselves (e.g. 'q_proj')."
        )
    found = [(n, m) for n, m in found if not isinstance(m, SLTrainLinear)]
    if not found:
        raise ValueError(
            f"to_sltrain: target_modules={target_modules!r} matches no nn.Linear or Conv1D of this "
            f"{type(model).__name__} (names look like {[n for n, _ in model.named_modules() if n][:4]}). "
            "A module matches if its name equals a target or ends with '.' + target."
        )
    return found


def _joined_targets(before, added, added_names: list[str], before_names: list[str]) -> list[str] | str:
    """The targets of two :func:`to_sltrain` calls on one model: both lists joined, or, where either is a regex
    (which one list cannot hold beside names), the names of every module the two replaced."""
    if isinstance(before, str) or isinstance(added, str):
        return before_names + [n for n in added_names if n not in before_names]
    return list(before) + [t for t in added if t not in before]


def _shape(module: nn.Module) -> tuple[int, int, str]:
    """``(out, in, dense_kind)`` of a Linear or Conv1D (whose weight is ``(in, out)``)."""
    if isinstance(module, Conv1D):
        return int(module.weight.shape[1]), int(module.weight.shape[0]), "conv1d"
    return int(module.out_features), int(module.in_features), "linear"


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def to_sltrain(
    model: nn.Module,
    target_modules: list[str] | str,
    rank: int,
    density: float = 0.03,
    alpha: float = 32.0,
    seed: int = 0,
) -> nn.Module:
    """Replace each targeted linear of ``model`` (in place) by an :class:`SLTrainLinear` and return ``model``.

    The replaced layer's dense weight is dropped (SLTrain pretrains from its own initialisation; see
    :class:`SLTrainLinear`); its bias, if any, is kept. Each layer's support and initial values come from
    ``layer_seed(seed, name)``, so the same call on the same architecture gives the same model in any process.

    Args:
        model (`nn.Module`): e.g. a freshly initialised ``LlamaForCausalLM(config)``.
        target_modules (`list[str] | str`): module names (a module matches if its name equals one or ends with
            ``"." + name``) or one regex (full match). The paper targets every attention and MLP projection of
            LLaMA: ``["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]``; GPT-2:
            ``["c_attn", "c_proj", "c_fc"]``.
        rank (`int`): ``r`` of ``B·A``.
        density (`float`, defaults to `0.03`): ``δ`` of S (the paper's value); 0 for the low-rank-only baseline.
        alpha (`float`, defaults to `32.0`): the low-rank term is scaled by ``alpha / rank`` (the paper's value).
        seed (`int`, defaults to `0`): seeds every layer's support and initial values.
    """
    targets = _targets(model, target_modules)
    settings = SLTrainSettings(int(rank), float(density), float(alpha), int(seed), target_modules)
    previous = getattr(model, "sltrain_settings", None)
    if previous is not None:
        if (previous.rank, previous.density, previous.alpha, previous.seed) != (rank, density, alpha, seed):
            raise ValueError(
                f"to_sltrain: the model was already converted with rank={previous.rank}, density={previous.density}, "
                f"alpha={previous.alpha}, seed={previous.seed}; one model takes one setting (call to_dense first)."
            )
        settings = previous
        settings.target_modules = _joined_targets(previous.target_modules, target_modules, [n for n, _ in targets],
                                                  list(previous.modules))
    for name, old in targets:
        out_features, in_features, kind = _shape(old)
        ref = old.weight
        new = SLTrainLinear(
            in_features, out_features, rank, density=density, alpha=alpha, bias=old.bias is not None,
            seed=layer_seed(seed, name), dense_kind=kind, device=ref.device, dtype=ref.dtype,
        )
        if old.bias is not None:
            with torch.no_grad():
                new.bias.copy_(old.bias)
        _set_module(model, name, new)
        settings.modules[name] = [out_features, in_features, kind, old.bias is not None]
    model.sltrain_settings = settings
    return model


@torch.no_grad()
def to_dense(model: nn.Module) -> nn.Module:
    """Write every :class:`SLTrainLinear` of ``model`` back (in place) as the plain layer it replaced and return it.

    ``nn.Linear`` (or ``Conv1D``, weight transposed to ``(in, out)``) with weight ``(α/r)·B·A + S`` in the
    parameters' dtype, built by the same function as the forward, and the same bias: the dense model's outputs equal
    the sparse form's to float rounding. The result has no SLTrain code in it (save it with ``save_pretrained``,
    fine-tune it with PEFT).
    """
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, SLTrainLinear)]
    if not layers:
        raise ValueError("to_dense: the model has no SLTrainLinear layer (was to_sltrain called on it?).")
    for name, layer in layers:
        dtype = layer.lowrank_B.dtype
        W = layer.dense_weight(dtype)
        has_bias = layer.bias is not None
        if layer.dense_kind == "conv1d":
            dense = Conv1D(layer.out_features, layer.in_features).to(device=W.device, dtype=dtype)
            dense.weight.copy_(W.t())
            if has_bias:
                dense.bias.copy_(layer.bias)
            else:
                dense.bias = None
        else:
            dense = nn.Linear(layer.in_features, layer.out_features, bias=has_bias, device=W.device, dtype=dtype)
            dense.weight.copy_(W)
            if has_bias:
                dense.bias.copy_(layer.bias)
        _set_module(model, name, dense)
    if hasattr(model, "sltrain_settings"):
        del model.sltrain_settings
    return model


def linear_parameter_count(model: nn.Module, target_modules: list[str] | str | None = None) -> int:
    """Trainable parameters of the linear layers: every :class:`SLTrainLinear`, plus the ``nn.Linear`` / ``Conv1D``
    layers matching ``target_modules`` (for the dense model a comparison counts against). Biases included."""
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, SLTrainLinear) or (
            target_modules is not None and isinstance(module, (nn.Linear, Conv1D)) and _matches(name, target_modules)
        ):
            total += sum(p.numel() for p in module.parameters() if p.requires_grad)
    return total


def save_sltrain(model: nn.Module, folder: str | os.PathLike) -> None:
    """Save the sparse form of ``model`` to ``folder``: ``sltrain_model.safetensors`` (every tensor of the model,
    SLTrain layers as ``lowrank_B``, ``lowrank_A``, ``sparse_values`` and the int32 ``sparse_indices``),
    ``sltrain_config.json`` and, for a transformers model, its ``config.json``."""
    from safetensors.torch import save_model

    settings = getattr(model, "sltrain_settings", None)
    if settings is None:
        raise ValueError("save_sltrain: the model has no SLTrain layers (call to_sltrain first).")
    os.makedirs(folder, exist_ok=True)
    save_model(model, os.path.join(folder, WEIGHTS_NAME))  # shared (tied) tensors are stored once
    layer = next(m for m in model.modules() if isinstance(m, SLTrainLinear))
    record = {**asdict(settings), "dtype": str(layer.lowrank_B.dtype).removeprefix("torch.")}
    with open(os.path.join(folder, CONFIG_NAME), "w") as f:
        json.dump(record, f, indent=2)
    if hasattr(getattr(model, "config", None), "save_pretrained"):
        model.config.save_pretrained(folder)


def load_sltrain(model_or_config=None, folder: str | os.PathLike = ".") -> nn.Module:
    """Load a model saved by :func:`save_sltrain` and return it in its sparse form.

    Every tensor in the file is checked against the model before the model is changed: each replaced layer must
    exist with the saved shape, and each support must be a valid one for it (:meth:`SparseSupport.check`: a
    ``(2, nnz)`` integer tensor, in range, sorted, no duplicates, ``round(δ·out·in)`` entries). A tampered or
    mismatched file raises ``ValueError`` naming the tensor.

    Args:
        model_or_config: a freshly built dense model of the saved architecture (e.g. ``LlamaForCausalLM(config)``;
            its tensors keep their dtypes and take the saved values), a transformers ``PretrainedConfig`` (the model
            is built with ``AutoModelForCausalLM.from_config`` in the saved layers' dtype, so a model saved in
            bfloat16 reloads in bfloat16), or None (the ``config.json`` in ``folder`` is used).
        folder: what :func:`save_sltrain` wrote.
    """
    from safetensors import safe_open
    from safetensors.torch import load_model

    with open(os.path.join(folder, CONFIG_NAME)) as f:
        settings = SLTrainSettings(**json.load(f))
    model = _build(model_or_config, folder, settings.dtype)
    weights = os.path.join(folder, WEIGHTS_NAME)
    with safe_open(weights, framework="pt") as f:
        _check_saved(model, settings, f)
        _check_plain(model, settings, f)
    already = {n for n, m in model.named_modules() if isinstance(m, SLTrainLinear)}
    if already != set(settings.modules):
        if already:
            raise ValueError(
                f"load_sltrain: the model already has SLTrain layers {sorted(already)[:3]}... that differ from the "
                f"saved ones {sorted(settings.modules)[:3]}...; pass a freshly built dense model."
            )
        to_sltrain(model, sorted(settings.modules), settings.rank, settings.density, settings.alpha, settings.seed)
        model.sltrain_settings.target_modules = settings.target_modules
    load_model(model, weights, strict=True)
    return model


def _build(model_or_config, folder, dtype: str | None) -> nn.Module:
    if isinstance(model_or_config, nn.Module):
        return model_or_config
    from transformers import AutoConfig, AutoModelForCausalLM

    config = model_or_config if model_or_config is not None else AutoConfig.from_pretrained(folder)
    built_in = getattr(torch, dtype, dtype) if dtype is not None else None
    if built_in is not None and not (isinstance(built_in, torch.dtype) and built_in.is_floating_point):
        raise ValueError(f"load_sltrain: {CONFIG_NAME} in {folder} names dtype={dtype!r}, not a torch floating dtype; "
                         "the file was edited or corrupted: re-save the model.")
    return AutoModelForCausalLM.from_config(config, **({"dtype": built_in} if built_in is not None else {}))


def _check_plain(model: nn.Module, settings: SLTrainSettings, f) -> None:
    """Raise ``ValueError`` unless the file's other tensors (embeddings, norms, dense layers) are the model's, with
    its shapes: checked before the model's layers are converted (a strict load failed after, the model changed)."""
    inside = tuple(name + "." for name in settings.modules)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(inside)}
    saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys() if not k.startswith(inside)}
    in_file = {state[k].data_ptr() for k in saved if k in state}
    problems = [f"'{k}' is not in the model" for k in saved if k not in state]
    problems += [f"'{k}' is {tuple(state[k].shape)} in the model but {shape} in the file" for k, shape in saved.items()
                 if k in state and tuple(state[k].shape) != shape]
    problems += [f"'{k}' is missing from the file" for k, v in state.items()
                 if k not in saved and v.data_ptr() not in in_file]  # a tied copy of a saved tensor is not missing
    if problems:
        raise ValueError(f"load_sltrain: the checkpoint does not fit this model: {'; '.join(problems[:3])}"
                         + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
                         + ". Load it on the architecture it was saved from. The model was not changed.")


def _check_saved(model: nn.Module, settings: SLTrainSettings, f) -> None:
    """Raise ``ValueError`` unless every saved SLTrain layer fits ``model`` and has a valid support."""
    modules = dict(model.named_modules())
    keys = set(f.keys())
    for name, (out_features, in_features, kind, _) in settings.modules.items():
        module = modules.get(name)
        if not isinstance(module, (nn.Linear, Conv1D, SLTrainLinear)):
            raise ValueError(
                f"load_sltrain: the checkpoint has an SLTrain layer '{name}' but the model has "
                f"{'no such module' if module is None else type(module).__name__}; load it on the architecture it "
                "was saved from."
            )
        shape = (module.out_features, module.in_features) if isinstance(module, SLTrainLinear) else _shape(module)[:2]
        if tuple(shape) != (out_features, in_features):
            raise ValueError(
                f"load_sltrain: '{name}' is {shape[0]}x{shape[1]} in the model but {out_features}x{in_features} in "
                "the checkpoint; load it on the architecture it was saved from."
            )
        expected = {"lowrank_B": (out_features, settings.rank), "lowrank_A": (settings.rank, in_features)}
        if settings.density > 0:
            nnz = support_nnz((out_features, in_features), settings.density)
            key = f"{name}.sparse_indices"
            if key not in keys:
                raise ValueError(f"load_sltrain: the checkpoint lacks '{key}' (the file is incomplete or corrupted).")
            SparseSupport.check(f.get_tensor(key), (out_features, in_features), expected_nnz=nnz, name=key)
            expected["sparse_values"] = (nnz,)
        for tensor, want in expected.items():
            key = f"{name}.{tensor}"
            got = tuple(f.get_slice(key).get_shape()) if key in keys else None
            if got != want:
                raise ValueError(
                    f"load_sltrain: '{key}' has shape {got} in the checkpoint, expected {want} from "
                    f"{CONFIG_NAME} (rank {settings.rank}, density {settings.density}); the file and the config "
                    "disagree: re-save the model."
                )
