"""The one module that touches PEFT internals.

PEFT keeps its methods in a closed ``PeftType`` enum and ``register_peft_method`` refuses a name that has no member
there. To register methods from outside PEFT we add enum members at import time, then call PEFT's own public
``register_peft_method``. Everything else in this package uses PEFT's public API (``PeftConfig``, ``BaseTuner``,
``BaseTunerLayer``, ``get_peft_model``, ...), so a change of PEFT internals breaks this file and nothing else.

The supported PEFT range is the one the tests run against. A PEFT outside it raises one clear ``ImportError`` when
this package is imported, instead of failing later in some unrelated place.
"""

from __future__ import annotations

import copy
import enum

import peft
import torch
from packaging.version import Version
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge, check_target_module_exists
from peft.tuners.tuners_utils import _get_in_out_features as get_in_out_features
from peft.tuners.tuners_utils import _maybe_include_all_linear_layers
from peft.utils import (
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    PeftType,
    TaskType,
    register_peft_method,
    resolve_quantization_backend,
)
from peft.utils.constants import INCLUDE_LINEAR_LAYERS_SHORTHAND, SEQ_CLS_HEAD_NAMES
from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper, get_pattern_key
from transformers.pytorch_utils import Conv1D

__all__ = [
    "AuxiliaryTrainingWrapper",
    "BaseTuner",
    "BaseTunerLayer",
    "BufferDict",
    "ModulesToSaveWrapper",
    "REGISTERED",
    "DEFAULT_TARGET_MODULES",
    "add_peft_type",
    "as_injected",
    "check_adapters_to_merge",
    "check_peft_version",
    "check_target_module_exists",
    "get_in_out_features",
    "head_for_adapter",
    "is_all_linear",
    "pattern_key",
    "register_method",
    "resolve_all_linear",
    "resolve_quantization_backend",
]

#: Default target modules per transformers model type (LoRA's: attention query/value), used when a config sets none.
DEFAULT_TARGET_MODULES = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING


def pattern_key(patterns, module_key: str):
    """The key of ``patterns`` (a ``rank_pattern`` / ``alpha_pattern``) that names module ``module_key`` by PEFT's rule
    for LoRA (the first key ``k`` with ``module_key`` matching ``(.*\\.)?(k)$``), or None when none does."""
    if not patterns:
        return None
    found = get_pattern_key(list(patterns), module_key)
    return found if found in patterns else None


def is_all_linear(target_modules) -> bool:
    """Whether ``target_modules`` is PEFT's ``"all-linear"`` shorthand (matched case-insensitively, as PEFT does)."""
    return isinstance(target_modules, str) and target_modules.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND


def resolve_all_linear(config, model, also) -> None:
    """Resolve ``target_modules="all-linear"`` in place to module names, as PEFT's injection does, adding what
    PEFT's list lacks: every module ``also`` accepts that is no ``nn.Linear`` / ``Conv1D`` (HQQ's ``HQQLinear``:
    PEFT's ``all-linear`` skips an HQQ base silently), and every adapter layer over such a base (a second adapter:
    PEFT recognises adapter layers by "Linear" in the class name, which ours lack), except the output embeddings
    and modules inside adapter layers. Any other ``target_modules`` is left as is."""
    if not is_all_linear(getattr(config, "target_modules", None)):
        return
    _maybe_include_all_linear_layers(config, model)
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inside = tuple(name + "." for name, m in model.named_modules() if isinstance(m, BaseTunerLayer))

    def missed(m) -> bool:  # PEFT takes an adapter layer only if "Linear" is in its class name (ours: SLTrainLayer)
        if isinstance(m, BaseTunerLayer):
            return also(m.get_base_layer())
        return not isinstance(m, (torch.nn.Linear, Conv1D)) and also(m)

    extra = {name for name, m in model.named_modules()
             if name and m is not output and not name.startswith(inside) and missed(m)}
    config.target_modules = set(config.target_modules) | extra


def as_injected(config, model):
    """A copy of ``config`` as PEFT's injection matches it against ``model``: a ``SEQ_CLS`` config's head names
    (``classifier``, ``score``) in ``modules_to_save``, which ``PeftModelForSequenceClassification`` adds before it
    injects, and ``target_modules="all-linear"`` resolved to module names: what LQ-LoRA, which quantizes the targets
    before ``get_peft_model``, must match to quantize the modules PEFT will wrap."""
    config = copy.copy(config)
    if getattr(config, "task_type", None) == TaskType.SEQ_CLS and hasattr(config, "modules_to_save"):
        config.modules_to_save = list(config.modules_to_save or []) + list(SEQ_CLS_HEAD_NAMES)
    return _maybe_include_all_linear_layers(config, model)


#: The PEFT versions this package is tested against: [min, max).
PEFT_MIN_VERSION = "0.21.0"
PEFT_MAX_VERSION = "0.23.0"


def check_peft_version(version: str | None = None) -> None:
    """Raise ``ImportError`` if ``version`` (default: the installed PEFT) is outside the tested range."""
    version = peft.__version__ if version is None else version
    v = Version(version)
    if not (Version(PEFT_MIN_VERSION) <= v < Version(PEFT_MAX_VERSION)):
        raise ImportError(
            f"sparse_lowrank_peft needs peft>={PEFT_MIN_VERSION},<{PEFT_MAX_VERSION} but peft {version} is installed. "
            "It registers its methods through PEFT internals that change between minor releases. "
            f"Fix: pip install 'peft>={PEFT_MIN_VERSION},<{PEFT_MAX_VERSION}'."
        )


def add_peft_type(name: str) -> PeftType:
    """Add ``name`` (upper case) as a member of PEFT's closed ``PeftType`` enum; idempotent.

    ``PeftType`` is a ``str`` enum, so a member is a ``str`` instance whose value is its own name. The enum machinery
    keeps three lookup tables (by name, by value, and the ordered name list); all three must know the member, or
    ``PeftType("X")`` (used when a saved config is read back) and ``list(PeftType)`` (used by
    ``register_peft_method``) would not find it.
    """
    name = name.upper()
    existing = PeftType.__members__.get(name)
    if existing is not None:
        return existing
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    assert isinstance(PeftType(name), enum.Enum)
    return member


#: method name -> config class of every tuner registered through :func:`register_method` (in import order)
REGISTERED: dict[str, type] = {}


def register_method(name: str, config_cls, model_cls) -> PeftType:
    """Register a tuner with PEFT under ``name`` (lower case, prefix ``model_cls.prefix``); idempotent.

    Each tuner package calls this from its ``__init__.py``, as PEFT's own tuners call ``register_peft_method``.
    """
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    peft_type = add_peft_type(name)
    if PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type) is not model_cls:
        register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=model_cls.prefix)
    REGISTERED[name] = config_cls
    return peft_type


check_peft_version()


def head_for_adapter(wrapper: ModulesToSaveWrapper, adapter_name: str) -> torch.nn.Module:
    """The module a ``modules_to_save`` wrapper runs for ``adapter_name``: the adapter's own trained copy, or the
    original module (``'__base__'``, or an adapter that saved no copy of it, as PEFT's wrapper does then)."""
    if adapter_name in wrapper.modules_to_save:
        return wrapper.modules_to_save[adapter_name]
    return wrapper.original_module
