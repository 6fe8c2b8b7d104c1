"""DeltaModel: the shared ``BaseTuner`` of this package's methods (injection, validation, checkpoint checks).

A method's ``model.py`` subclasses it and sets ``prefix``, ``tuner_layer_cls`` (a :class:`DeltaLayer`) and,
optionally, ``config_checks`` for its own load-time checks. This class adds to PEFT's ``BaseTuner``:

* validation before anything is changed: every module the config targets is checked to be a supported layer type,
  so a bad ``target_modules`` raises with the model untouched (PEFT itself would wrap layers until it hits the bad
  one);
* checkpoint validation when an adapter is loaded, before any tensor is copied: tensor shapes against the model's,
  and every sparse support (shape, index range, duplicates, order, count implied by the config);
* mixed-adapter batches (``model(**inputs, adapter_names=[...])``), as PEFT's LoRA has them (``delta.mixed_batch``).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Optional

import torch
from torch import nn

from .._peft_compat import DEFAULT_TARGET_MODULES, BaseTuner, BaseTunerLayer, pattern_key, resolve_all_linear
from ..common import RankPatternFields
from .layer import DeltaLayer, is_supported_base_layer
from .support import SparseSupport

__all__ = ["DeltaModel", "LayerNamesDiffer", "for_module", "pick_adapter"]


class LayerNamesDiffer(ValueError):
    """A checkpoint whose adapter layers sit under other names than the model's (trained on another class of the
    same model), raised before anything is loaded; tools that choose the base class themselves add how to change it."""


class DeltaModel(BaseTuner):
    """Shared ``BaseTuner`` for :class:`DeltaLayer` methods. Subclasses set ``prefix`` and ``tuner_layer_cls``."""

    prefix: str = ""
    tuner_layer_cls: type[DeltaLayer] = DeltaLayer
    target_module_mapping = DEFAULT_TARGET_MODULES

    # ------------------------------------------------------------------ injection
    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        resolve_all_linear(self.peft_config[adapter_name], model, also=is_supported_base_layer)  # HQQ bases too
        targeted = self._validate_targets(model, adapter_name)
        self._record_fisher(self.peft_config[adapter_name], targeted)
        self._record_quantizers(self.peft_config[adapter_name])
        self._prepare_quantized_model(model, adapter_name)
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        self._quantize_rest_of_plan(model, self.peft_config[adapter_name])

    @staticmethod
    def _quantize_rest_of_plan(model: nn.Module, config) -> None:
        """An LQ plan describes the whole quantized base: the linears it names beyond the adapter's targets (which
        LQ init quantized) are quantized plainly with their configurations, at creation and at load alike, so a
        saved adapter reloads onto the base it was trained on. Its 4-bit layers keep bitsandbytes' standard layout
        (``apply_plan``), as the layers an adapter wraps do (``_prepare_quantized_model``)."""
        plan = getattr(config, "lq_plan", None)
        if plan and getattr(config, "init_weights", None) == "lq":
            from .bitbudget import apply_plan

            apply_plan(model, plan)

    @staticmethod
    def _record_quantizers(config) -> None:
        """LQ initialisation: a config that recorded its quantizer versions (a loaded adapter) is checked against the
        installed ones (``delta.lq_checks.warn_on_other_quantizers``); a new one records them."""
        if getattr(config, "init_weights", None) != "lq":
            return
        from .lq_checks import quantizer_versions, warn_on_other_quantizers

        plan = getattr(config, "lq_plan", None)
        if config.lq_quantizers:
            warn_on_other_quantizers(config.lq_quantizers, plan, type(config).__name__)
        else:
            config.lq_quantizers = quantizer_versions(plan)

    @staticmethod
    def _record_fisher(config, targeted: list[str]) -> None:
        """LQ initialisation inside ``use_fisher``: keep the targeted layers' Fisher weights in the config
        (``lq_fisher``), which saves them beside the adapter, so that loading re-derives the same quantized base.
        Outside such a block a config's recorded weights (read back by ``from_pretrained``) are used as they are."""
        if getattr(config, "init_weights", None) != "lq":
            return
        from .fisher import LQ_FISHER_FILE, active_fisher, fisher_for_modules

        if active_fisher() is not None:
            config.lq_fisher = fisher_for_modules(targeted) or None
        if isinstance(config.lq_fisher, str):
            raise ValueError(
                f"{type(config).__name__}.lq_fisher names the file {config.lq_fisher!r} instead of holding its Fisher "
                f"weights: the config was built from adapter_config.json without reading {LQ_FISHER_FILE} beside "
                "it. Fix: load the adapter with PeftModel.from_pretrained (or the config with "
                f"{type(config).__name__}.from_pretrained), which reads it. The model was not changed."
            )

    def _prepare_quantized_model(self, model: nn.Module, adapter_name: str) -> None:
        """Before PEFT wraps anything: quantized linears in ``modules_to_save`` (a head transformers quantized at load
        time) become full-precision linears, with a warning; every 4-bit linear keeps bitsandbytes' standard layout
        while an adapter of ours is attached (``delta.quant.keep_standard_layout`` says why; unload gives the setting
        back)."""
        if not any(type(m).__module__.startswith("bitsandbytes") for m in model.modules()):
            return
        from .quant import keep_standard_layouts, restore_full_precision

        restore_full_precision(model, getattr(self.peft_config[adapter_name], "modules_to_save", None))
        keep_standard_layouts(model)

    def _validate_targets(self, model: nn.Module, adapter_name: str) -> list[str]:
        """Raise before any module is replaced if a targeted module cannot be wrapped; returns the targeted names."""
        config = self.peft_config[adapter_name]
        config = self._prepare_adapter_config(config, self.get_model_config(model))
        if not isinstance(config.target_modules, (list, set, str)):
            return []
        inside_tuner_layers: list[str] = []
        bad: list[str] = []
        targeted: list[str] = []
        for key, module in model.named_modules():
            if not key or any(key.startswith(p) for p in inside_tuner_layers):
                continue
            if isinstance(module, BaseTunerLayer):
                inside_tuner_layers.append(key + ".")
            if not self._check_target_module_exists(config, key):
                continue
            targeted.append(key)
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            if not is_supported_base_layer(base):
                bad.append(f"{key} ({type(base).__name__})")
        self._validate_patterns(config, targeted)
        self._validate_plan(model, config, targeted)
        self._validate_lq_layers(model, config, targeted)
        self._validate_token_indices(model, config)
        if bad:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise TypeError(
                f"{type(config).__name__}.target_modules={config.target_modules!r} matches modules this method cannot "
                f"wrap: {shown}. Only torch.nn.Linear, transformers' Conv1D and quantized linear layers are supported. "
                "Fix: target the linear layers only (a list of their names or a regex). The model was not changed."
            )
        return targeted

    @classmethod
    def _validate_lq_layers(cls, model: nn.Module, config, targeted: list[str]) -> None:
        """LQ initialisation: every target's rank and Fisher weights, and (loading) the saved factors' sizes, before
        the first target is quantized: PEFT checks the weights it loads only after injection, when LQ has replaced
        the full-precision weights."""
        if getattr(config, "init_weights", None) != "lq":
            return
        from .fisher import active_fisher, fisher_for, recorded_fisher
        from .lq_checks import check_lq_layers, check_saved_factors

        def fisher(key):
            return fisher_for(key) if active_fisher() is not None else recorded_fisher(config, key)

        linears = [key for key in targeted if type(model.get_submodule(key)) is nn.Linear]
        check_lq_layers(model, linears, lambda key: for_module(config, key).r, fisher, type(config).__name__)
        check_saved_factors(model, linears, getattr(config, "_saved_shapes", None),
                                  (f"{cls.prefix}A", f"{cls.prefix}B"), "The adapter checkpoint does not fit")

    @staticmethod
    def _validate_token_indices(model: nn.Module, config) -> None:
        """``trainable_token_indices`` must name embedding modules of this model and ids below their vocabulary size:
        PEFT wraps the embedding after the adapter layers and failed there with an IndexError, model changed."""
        indices = getattr(config, "trainable_token_indices", None)
        if indices is None:
            return
        if isinstance(indices, dict):
            found = {f"'{name}'": (_find_module(model, name), ids) for name, ids in indices.items()}
        else:
            embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
            found = {"the input embedding": (embedding, indices)}
        for name, (module, ids) in found.items():
            size = _embedding_rows(module)
            if size is None:
                raise ValueError(
                    f"{type(config).__name__}.trainable_token_indices names {name}, which is "
                    f"{'not a module of this model' if module is None else 'a ' + type(module).__name__}, not an "
                    "nn.Embedding. Fix: the name of an embedding module, e.g. {'embed_tokens': [ids]}. The model was "
                    "not changed."
                )
            too_big = sorted(i for i in ids if i >= size)
            if too_big:
                raise ValueError(
                    f"{type(config).__name__}.trainable_token_indices: ids {too_big[:5]} are not rows of {name} "
                    f"({size} tokens). New tokens need rows first: model.resize_token_embeddings(len(tokenizer)) "
                    "before get_peft_model. The model was not changed."
                )

    @staticmethod
    def _validate_patterns(config, targeted: list[str]) -> None:
        """Every ``rank_pattern`` / ``alpha_pattern`` key names a targeted module (PEFT's LoRA ignores a key that names
        none, so a typo silently trains every module at ``r``)."""
        if not isinstance(config, RankPatternFields):
            return
        for field_name in ("rank_pattern", "alpha_pattern"):
            pattern = getattr(config, field_name) or {}
            named = {pattern_key(pattern, key) for key in targeted}
            unused = [key for key in pattern if key not in named]
            if unused:
                shown = ", ".join(targeted[:3]) + (", ..." if len(targeted) > 3 else "")
                raise ValueError(
                    f"{type(config).__name__}.{field_name} keys {unused} name no targeted module (or only modules an "
                    f"earlier key already names); the targeted modules are {len(targeted)}: {shown}. A key is a module "
                    "name, a dotted suffix of one or a regex matching its end. Fix the key, or target that module. "
                    "The model was not changed."
                )

    @staticmethod
    def _validate_plan(model: nn.Module, config, targeted: list[str]) -> None:
        """An ``lq_plan`` must name modules of this model and give every targeted module a configuration: checked
        before anything is quantized."""
        plan = getattr(config, "lq_plan", None)
        if plan and getattr(config, "init_weights", None) == "lq":
            from .lq_checks import check_plan

            check_plan(model, plan, targeted, f"{type(config).__name__}.lq_plan")

    def _create_and_replace(
        self, config, adapter_name, target, target_name, parent, current_key=None, parameter_name=None, **kwargs
    ) -> None:
        if current_key is None:
            raise ValueError("current_key must be given")
        config = for_module(config, current_key)
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, config, key=current_key)
            return
        if isinstance(target, BaseTunerLayer):
            raise TypeError(
                f"Module {current_key} is already wrapped by {type(target).__name__}; a {self.tuner_layer_cls.__name__} "
                "cannot be stacked on another PEFT method's layer. Fix: unload the other adapter first."
            )
        new_module = self.tuner_layer_cls(target, adapter_name, config, key=current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        """Put ``new_module`` in place of ``child`` and move new adapter tensors to the base weight's device.

        Unlike ``BaseTuner._replace_module`` this never copies ``weight``/``bias`` onto ``new_module``: our layers keep
        the original as ``base_layer``, and on unload the new module is a head (``modules_to_save``) that may have
        no ``weight`` at all (RoBERTa's classification head). PEFT's LoRA overrides it the same way.
        """
        setattr(parent, child_name, new_module)
        if not isinstance(new_module, self.tuner_layer_cls):
            return
        base = new_module.get_base_layer()
        ref = getattr(base, "weight", None)
        if ref is None:
            ref = next(base.parameters(), None)
        if ref is None or ref.device.type == "meta":
            return
        for name, module in new_module.named_children():
            if name.startswith(self.prefix) and not any(p.device.type == "meta" for p in module.parameters()):
                module.to(ref.device)

    # ------------------------------------------------------------------ loading
    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        cls._check_layer_names(model, adapter_name, remapped)
        cls._validate_checkpoint(model, config, adapter_name, remapped)
        return remapped

    @classmethod
    def _check_layer_names(cls, model: nn.Module, adapter_name: str, state_dict: dict) -> None:
        """Every adapter layer of ``model`` has tensors in the checkpoint (PEFT would leave a layer it finds none for
        at its initial values, with a warning); where none are found, the error says how the names differ: most
        often the adapter was trained on another class of the same model (``BertForSequenceClassification`` holds
        the encoder at ``.bert``, ``BertModel`` at the root)."""
        marker = f".{cls.prefix}"
        saved = {key.split(marker, 1)[0] for key in state_dict if marker in key}
        layers = [name for name, module in model.named_modules()
                  if isinstance(module, cls.tuner_layer_cls) and module.has_adapter(adapter_name)]
        missing = [name for name in layers if name not in saved]
        if not missing:
            return

        def shown(name: str) -> str:
            return name.removeprefix("base_model.model.")

        pair = next(((here, there) for here in missing for there in sorted(saved)
                     if shown(there).endswith("." + shown(here)) or shown(here).endswith("." + shown(there))), None)
        if pair is not None:
            raise LayerNamesDiffer(
                f"The adapter checkpoint names its layers differently from this model: '{shown(pair[1])}' in the "
                f"checkpoint, '{shown(pair[0])}' here ({len(missing)} of {len(layers)} layers differ). It was trained "
                "on another class of this model (e.g. BertForSequenceClassification, which holds the encoder at "
                "'.bert', loaded here as BertModel). Fix: load the base with the class it was trained with "
                "(AutoModelForSequenceClassification for task_type SEQ_CLS; AutoPeftModelForSequenceClassification "
                "picks it from the adapter). Nothing was loaded."
            )
        example = f", e.g. '{shown(min(saved))}'" if saved else ""
        raise ValueError(
            f"The adapter checkpoint has no {cls.prefix}* tensors for {len(missing)} of this model's {len(layers)} "
            f"adapter layers (e.g. '{shown(missing[0])}'); it holds {len(saved)} layers{example}. It was saved for "
            "other target modules, by another method or for another model. Fix: load it on the base model it was "
            "trained on, with the adapter_config.json it was saved with. Nothing was loaded."
        )

    @classmethod
    def _validate_checkpoint(cls, model: nn.Module, config, adapter_name: str, state_dict: dict) -> None:
        """Check a remapped checkpoint against ``model`` before anything is loaded; raise ``ValueError`` if it does
        not fit (other base shapes, or a corrupted / edited support)."""
        model_state = model.state_dict()
        sparse_attrs = tuple(f".{a}." for a in (cls.tuner_layer_cls.sparse_values_attr, cls.tuner_layer_cls.support_attr) if a)
        mismatched = [
            f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(model_state[k].shape)}"
            for k, v in state_dict.items()
            if k in model_state
            and isinstance(v, torch.Tensor)
            and tuple(v.shape) != tuple(model_state[k].shape)
            and not any(a in k for a in sparse_attrs)  # supports and values get the precise checks below
        ]
        if mismatched:
            shown = "; ".join(mismatched[:4]) + (f"; and {len(mismatched) - 4} more" if len(mismatched) > 4 else "")
            raise ValueError(
                f"The adapter checkpoint does not fit this model: {shown}. It was saved for a base model with other "
                "layer shapes (or another rank r). Fix: load it on the base model it was trained on, with its own "
                "adapter_config.json."
            )
        for name, module in model.named_modules():
            if not isinstance(module, cls.tuner_layer_cls) or module.support_attr is None:
                continue
            if adapter_name not in getattr(module, module.support_attr):
                continue
            prefix = f"{name}." if name else ""
            support_key = f"{prefix}{module.support_attr}.{adapter_name}"
            values_key = f"{prefix}{module.sparse_values_attr}.{adapter_name}"
            if support_key not in state_dict:
                raise ValueError(
                    f"The adapter checkpoint has no sparse support for layer '{name}' (expected a tensor named like "
                    f"'{cls._remove_adapter_name_from_key(support_key, adapter_name)}'). It was saved by another method "
                    "or for another set of target modules: load it with the config it was saved with."
                )
            density = getattr(config, "sparsity", None)
            expected = module.expected_nnz(density) if density is not None else None
            SparseSupport.check(
                state_dict[support_key],
                (module.out_features, module.in_features),
                expected_nnz=expected,
                name=f"layer '{name}' support",
            )
            values = state_dict.get(values_key)
            nnz = state_dict[support_key].shape[1]
            if values is not None and tuple(values.shape) != (nnz,):
                raise ValueError(
                    f"layer '{name}': the checkpoint has {tuple(values.shape)} sparse values for a support of {nnz} "
                    "entries. The checkpoint is corrupted: re-save it from the trained model."
                )

    # ------------------------------------------------------------------ quantized bases
    def dequantize_base_layers(self) -> int:
        """Replace every quantized base layer under an adapter by a full-precision ``nn.Linear`` (dequantized);
        returns how many were replaced."""
        count = 0
        for module in self.model.modules():
            if isinstance(module, DeltaLayer) and module.quantization_backend is not None:
                module.dequantize_base()
                count += 1
        return count

    def _unload_and_optionally_merge(self, *args, **kwargs):
        """PEFT's unload; the 4-bit layers get bitsandbytes' CPU repack setting back (``_prepare_quantized_model``
        turned it off), so the unloaded model runs bitsandbytes' fast eval kernel again where it has it."""
        from .quant import give_back_repack_settings

        modules = list(self.model.modules())
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        give_back_repack_settings(modules)
        return model

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names=None, dequantize: bool = False):
        """PEFT's ``merge_and_unload``; with ``dequantize=True`` quantized bases are first dequantized, so the merge is
        exact and the result is a full-precision model (QLoRA-style deployment)."""
        if dequantize:
            self.dequantize_base_layers()
        return super().merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)

    # ------------------------------------------------------------------ mixed-adapter batches
    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """PEFT's ``PeftModel.forward`` / ``generate`` enter this with their keyword arguments: ``adapter_names``
        (one adapter per row, ``'__base__'`` for none) reaches every adapter layer and head (``delta.mixed_batch``)."""
        from .mixed_batch import adapter_names_hooks

        if kwargs.get("alora_offsets") is not None:
            raise ValueError(
                f"alora_offsets is an argument of PEFT's activated LoRA (LoraConfig(alora_invocation_tokens=...)); "
                f"{type(self).__name__} has no such variant and would ignore it. Fix: drop alora_offsets."
            )
        with adapter_names_hooks(self.model, self.tuner_layer_cls, kwargs.get("adapter_names"), self.training,
                                 kwargs.get("num_beams")):
            yield

    # ------------------------------------------------------------------ misc
    def _prepare_adapter_config(self, peft_config, model_config):
        if peft_config.target_modules is None and not getattr(peft_config, "target_parameters", None):
            model_type = model_config.get("model_type")
            if model_type not in self.target_module_mapping:
                raise ValueError(
                    f"{type(peft_config).__name__}.target_modules is None and there is no default for model type "
                    f"{model_type!r}. Fix: pass target_modules, e.g. target_modules=['query', 'value'], naming the "
                    "nn.Linear layers to adapt."
                )
        return super()._prepare_adapter_config(peft_config, model_config)

    def get_support(self, module_name: str, adapter_name: Optional[str] = None) -> SparseSupport:
        """The sparse support of the layer ``module_name`` (e.g. ``'roberta.encoder.layer.0.attention.self.query'``)."""
        module = self.model.get_submodule(module_name)
        return module.get_support(adapter_name or self.active_adapters[0])


def for_module(config, module_key: str):
    """``config`` with ``r`` and ``lora_alpha`` as its ``rank_pattern`` / ``alpha_pattern`` set them for the module
    ``module_key``: a shallow copy where a pattern names the module, else ``config`` itself (the adapter's config,
    saved with the adapter, keeps its patterns). Only for configs with :class:`~..common.RankPatternFields` (SoRA's
    ``rank_pattern`` is another thing: the ranks pruning kept, at the scale of ``r``)."""
    if not isinstance(config, RankPatternFields):
        return config
    rank_key = pattern_key(config.rank_pattern, module_key)
    alpha_key = pattern_key(config.alpha_pattern, module_key)
    if rank_key is None and alpha_key is None:
        return config
    view = copy.copy(config)
    if rank_key is not None:
        view.r = config.rank_pattern[rank_key]
    if alpha_key is not None:
        view.lora_alpha = config.alpha_pattern[alpha_key]
    return view


def _find_module(model: nn.Module, name: str) -> Optional[nn.Module]:
    """The module called ``name`` or ending in ``"." + name`` (PEFT's matching of module names), or None."""
    for key, module in model.named_modules():
        if key == name or key.endswith("." + name):
            return module
    return None


def _embedding_rows(module: Optional[nn.Module]) -> Optional[int]:
    """The number of rows of an ``nn.Embedding``, also under PEFT's wrappers (an earlier adapter's trainable tokens or
    ``modules_to_save``); None if ``module`` is no embedding."""
    while module is not None and not isinstance(module, nn.Embedding):
        inner = getattr(module, "token_adapter", None) or getattr(module, "original_module", None)
        module = inner.get_base_layer() if isinstance(inner, BaseTunerLayer) else inner
    return None if module is None else module.num_embeddings


def pick_adapter(adapter_names, active_adapters, adapter_name: Optional[str], action: str) -> str:
    """The adapter an operation on one adapter applies to: ``adapter_name`` if the model has it, else (None) the
    one active adapter. ``adapter_names``: the model's adapters; ``action`` names the operation in the errors."""
    names = sorted(adapter_names)
    if adapter_name is None:
        if len(active_adapters) != 1:
            raise ValueError(
                f"{action}: {len(active_adapters)} adapters are active ({list(active_adapters)}), so which one is "
                "meant is ambiguous. Fix: pass adapter_name=..."
            )
        return active_adapters[0]
    if adapter_name not in names:
        raise ValueError(f"{action}: the model has no adapter '{adapter_name}' (adapters: {names}). Fix: pass one of them.")
    return adapter_name
