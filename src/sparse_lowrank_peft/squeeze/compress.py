"""The model-level squeeze: a PEFT model's adapter to a plain LoRA state dict, config and model."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from .._peft_compat import pattern_key
from .svd import DEFAULT_OVERSAMPLING, DEFAULT_POWER_ITERS, DEFAULT_SEED, RankSpec, SqueezeError, check_rank_spec
from .targets import LayerSqueeze, _adapter_of, _check_int_rank, _squeeze_target, _targets


@dataclass
class SqueezeResult:
    """A squeezed adapter: its ``LoraConfig``, the tensors of ``adapter_model.safetensors`` and a per-layer report."""

    config: object
    state: dict
    layers: dict
    source_type: str
    relative_to: str = "original"  # RELATIVE_TO: the weights the LoRA is to be loaded on

    def info(self) -> dict:
        return {
            "exported_from": self.source_type, "relative_to": self.relative_to,
            "ranks": {name: rep.rank for name, rep in self.layers.items()},
            "layers": {name: rep.to_dict() for name, rep in self.layers.items()},
            "stored_rank": None if self.config.rank_pattern else self.config.r,
        }

    def lower_rank_layers(self) -> list[str]:
        """The layers written below the config's ``r`` (those ``rank_pattern`` names)."""
        return [name for name in self.layers if _match_pattern(self.config.rank_pattern, name) is not None]

    def with_uniform_rank(self) -> "SqueezeResult":
        """The same adapter with every layer stored at the config's ``r`` and one scale ``lora_alpha / r``.

        LoRA servers disagree on per-layer ranks: vLLM ignores ``rank_pattern`` / ``alpha_pattern`` and applies
        ``lora_alpha / r`` to every layer; llama.cpp's converter keeps only ``lora_alpha`` and divides by each
        tensor's own rank (and knows no rsLoRA); PEFT applies ``alpha_pattern[l] / rank_pattern[l]``. A layer below
        ``r`` is therefore scaled right by at most two of the three. Here it gets zero rows in ``lora_A`` and zero
        columns in ``lora_B`` up to ``r`` (ΔW unchanged), every ``lora_B`` is rescaled from its layer's scale to
        ``lora_alpha / r``, and the config has neither pattern nor rsLoRA, so all three compute the same outputs;
        the file grows by the zeros.
        """
        cfg = self.config
        if not (cfg.rank_pattern or cfg.alpha_pattern or cfg.use_rslora):
            return self
        r, scale = cfg.r, cfg.lora_alpha / cfg.r
        state = dict(self.state)
        for name in self.layers:
            k = _match_pattern(cfg.rank_pattern, name) or r
            alpha = _match_pattern(cfg.alpha_pattern, name) or cfg.lora_alpha
            own_scale = alpha / math.sqrt(k) if cfg.use_rslora else alpha / k
            key_A, key_B = (_PREFIX + key for key in _factor_keys(state, name))
            A, B = state[key_A], state[key_B]
            state[key_A] = torch.cat([A, A.new_zeros((r - k, *A.shape[1:]))], dim=0)
            B = (B.to(torch.float64) * (own_scale / scale)).to(B.dtype)
            state[key_B] = torch.cat([B, B.new_zeros((B.shape[0], r - k, *B.shape[2:]))], dim=1)
        config = _lora_config(cfg.to_dict(), rank_pattern={}, alpha_pattern={}, use_rslora=False)
        return dataclasses.replace(self, config=config, state=state)

    def save(self, out_dir: Union[str, Path]) -> Path:
        """Write ``adapter_config.json``, ``adapter_model.safetensors`` and ``export_info.json`` into ``out_dir``."""
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(str(out_dir))
        state = {k: v.detach().cpu().contiguous() for k, v in self.state.items()}
        save_file(state, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
        (out_dir / "export_info.json").write_text(json.dumps(self.info(), indent=2, sort_keys=True))
        return out_dir


_PREFIX = "base_model.model."  # of every key in a saved PEFT state dict


def _factor_keys(state: dict, name: str) -> tuple[str, str]:
    """The ``(lora_A, lora_B)`` keys of layer ``name`` in a saved LoRA state dict, without ``_PREFIX``: linear / conv
    (``<name>.lora_A.weight``) or embedding (``<name>.lora_embedding_A``)."""
    if f"{_PREFIX}{name}.lora_A.weight" in state:
        return f"{name}.lora_A.weight", f"{name}.lora_B.weight"
    return f"{name}.lora_embedding_A", f"{name}.lora_embedding_B"


def _rank_fields(kept: dict[str, int], lora_alpha: Optional[float]) -> dict:
    """The rank fields of a written LoRA config: ``r`` the largest kept rank, the others in ``rank_pattern``; scale 1
    per layer (``alpha = r``, ``alpha_pattern`` = ``rank_pattern``) unless ``lora_alpha`` is given."""
    r = max(kept.values())
    rank_pattern = {_pattern_key(n): k for n, k in kept.items() if k != r}
    if lora_alpha is None:
        return {"r": r, "rank_pattern": rank_pattern, "lora_alpha": r, "alpha_pattern": dict(rank_pattern)}
    return {"r": r, "rank_pattern": rank_pattern, "lora_alpha": float(lora_alpha), "alpha_pattern": {}}


def _lora_config(fields: dict, **updates):
    """A ``LoraConfig`` from a config's dict (a saved ``adapter_config.json``, or ``to_dict()``) with ``updates``,
    leaving out what PEFT sets itself (``peft_type``, ``auto_mapping``, ``peft_version``) and unknown fields."""
    from peft import LoraConfig

    fields = {**fields, **updates}
    own = {"peft_type", "auto_mapping", "peft_version"}
    return LoraConfig(**{k: v for k, v in fields.items() if k in LoraConfig.__dataclass_fields__ and k not in own})


def _pattern_key(name: str) -> str:
    # PEFT matches rank_pattern keys with re.match(rf"(.*\.)?({key})$", module_name): the escaped full name
    # matches this one module only.
    return re.escape(name)


def _match_pattern(patterns: dict, module_name: str):
    """PEFT's rank/alpha pattern lookup: the value of the first key naming the module (``_peft_compat.pattern_key``,
    PEFT's own rule), or None."""
    key = pattern_key(patterns, module_name)
    return None if key is None else patterns[key]


def check_squeeze_rank(peft_model, rank: Optional[RankSpec], adapter_name: Optional[str] = None,
                       relative_to: str = "original") -> None:
    """Raise :class:`SqueezeError` now if :func:`squeeze_state` (and so ``export_to_lora``) would refuse ``rank`` for
    this adapter: a bad spec, or an int above every factored layer's rank. It depends only on the adapter's shapes,
    so a runner checks it before training rather than after."""
    if rank is not None:
        check_rank_spec(rank)
    adapter_name = _adapter_of(peft_model, adapter_name)
    _check_int_rank(_targets(peft_model, adapter_name, rank, relative_to), rank)


def squeeze_state(
    peft_model,
    rank: Optional[RankSpec],
    adapter_name: Optional[str] = None,
    lora_alpha: Optional[float] = None,
    oversampling: int = DEFAULT_OVERSAMPLING,
    power_iters: int = DEFAULT_POWER_ITERS,
    seed: int = DEFAULT_SEED,
    max_energy_rank: Optional[int] = None,
    relative_to: str = "original",
) -> SqueezeResult:
    """The squeezed LoRA of ``peft_model``'s adapter as a config + state dict, without changing the model.

    Args:
        peft_model: a ``PeftModel`` with PEFT's LoRA or one of this package's tuners.
        rank: int, energy threshold in (0, 1], or None (export exactly; refused for non-low-rank deltas).
        adapter_name: the adapter to squeeze (default: the active one).
        lora_alpha: ``lora_alpha`` of the output (its scale is ``lora_alpha / r`` per layer); default: ``r`` per
            layer (scale 1). Give the recipe's value to continue training the squeezed adapter (Cont-Squeeze).
        oversampling, power_iters, seed: randomized-path settings (operator deltas only).
        max_energy_rank: with an energy threshold, the largest per-layer rank accepted on the randomized path
            (default ``min(out, in) // 2``).
        relative_to: ``"original"``: a LoRA for the weights of the model file (what servers load): on a layer
            that LQ-LoRA's init split into ``W ≈ Q + L``, an adapter trained on ``Q`` is written as ``ΔW − L``
            (for the LQ adapter, its change since its start; ``delta.quant.record_lq_offset``): on ``W`` it gives
            ``Q + ΔW`` up to the quantization residual ``W − Q − L``, where ``ΔW`` itself would add ``L`` twice.
            ``"trained"``: ``ΔW`` for the base it was trained on (what :func:`squeeze` re-wraps). The same for
            every layer without LQ init.
    """
    if rank is not None:
        check_rank_spec(rank)
    if lora_alpha is not None and not (isinstance(lora_alpha, (int, float)) and lora_alpha > 0):
        raise SqueezeError(f"lora_alpha={lora_alpha!r} must be a positive number (the output's scale numerator).")
    adapter_name = _adapter_of(peft_model, adapter_name)
    config = peft_model.peft_config[adapter_name]
    targets = _targets(peft_model, adapter_name, rank, relative_to)
    _check_int_rank(targets, rank)
    opts = {"oversampling": oversampling, "power_iters": power_iters, "seed": seed,
            "max_energy_rank": max_energy_rank, "adapter_name": adapter_name}
    is_lora = config.peft_type == "LORA"
    state = _state_besides_factors(peft_model, adapter_name, is_lora)
    layers, kept = _squeeze_factors_into(state, targets, rank, lora_alpha, opts, is_lora)
    if not kept:
        raise SqueezeError(
            f"adapter '{adapter_name}' has no layer with a nonzero delta to write (every rank pruned?). A LoRA "
            "adapter needs at least one layer of rank >= 1."
        )
    lora_config = _squeezed_lora_config(config, targets, kept, lora_alpha, is_lora)
    source = getattr(config.peft_type, "value", str(config.peft_type))
    return SqueezeResult(lora_config, state, layers, source, relative_to)


def _state_besides_factors(peft_model, adapter_name: str, is_lora: bool) -> dict:
    """The adapter's tensors that squeezing keeps as they are (the head, biases): for PEFT's LoRA every tensor but
    its factors, for this package's tuners every tensor outside the adapted layers' own."""
    from peft.utils import get_peft_model_state_dict

    state: dict = {}
    for key, value in get_peft_model_state_dict(peft_model, adapter_name=adapter_name).items():
        if is_lora:
            if ".lora_A." in key or ".lora_B." in key or ".lora_embedding_" in key:
                continue
        elif peft_model.base_model.prefix in key:
            continue
        state[key] = value.detach()
    return state


def _squeeze_factors_into(state: dict, targets, rank, lora_alpha, opts: dict, is_lora: bool
                          ) -> tuple[dict[str, "LayerSqueeze"], dict[str, int]]:
    """Squeeze every target and write its LoRA factors into ``state``; returns the per-layer reports and the rank
    written per layer (a zero delta of this package's tuners is left out; PEFT LoRA keeps the layer at rank 1
    with zero factors, so its target list is unchanged)."""
    prefix = _PREFIX
    layers: dict[str, LayerSqueeze] = {}
    kept: dict[str, int] = {}
    for t in targets:
        B, A, rep = _squeeze_target(t, rank, lora_alpha, opts)
        layers[t.name] = rep
        if rep.rank == 0:
            if not is_lora:
                continue
            B, A = torch.zeros(t.shape[0], 1, dtype=t.dtype), torch.zeros(1, t.shape[1], dtype=t.dtype)
            rep.rank = 1
        k = rep.rank
        if t.shape_A:
            A = A.reshape(k, *t.shape_A[1:])
            B = B.reshape(t.shape_B[0], k, *t.shape_B[2:])
        state[prefix + t.key_A] = A
        state[prefix + t.key_B] = B
        kept[t.name] = k
    return layers, kept


def _squeezed_lora_config(config, targets, kept: dict[str, int], lora_alpha, is_lora: bool):
    """The ``LoraConfig`` of the squeezed adapter: ``r`` the largest kept rank, the others in ``rank_pattern``;
    scale 1 per layer (``alpha = r``) unless ``lora_alpha`` is given. PEFT's LoRA keeps its own fields."""
    from peft import LoraConfig

    ranks = _rank_fields(kept, lora_alpha)
    if is_lora:
        fields = config.to_dict()
        return _lora_config(fields, **ranks, use_rslora=False, lora_dropout=fields.get("lora_dropout", 0.0),
                            inference_mode=False)
    fan = {t.fan_in_fan_out for t in targets if t.name in kept}
    if len(fan) > 1:
        raise SqueezeError(
            "the adapted layers mix Conv1D (GPT-2 style) and Linear, which one LoRA config cannot hold "
            "(fan_in_fan_out is one flag). Fix: export the two kinds as separate adapters."
        )
    own_bias = getattr(config, "bias", "none")
    return LoraConfig(
        **ranks, target_modules=sorted(kept), lora_dropout=0.0, bias="lora_only" if own_bias.endswith("_only") else own_bias,
        modules_to_save=config.modules_to_save, trainable_token_indices=getattr(config, "trainable_token_indices", None),
        fan_in_fan_out=fan.pop(), task_type=config.task_type,
        base_model_name_or_path=config.base_model_name_or_path, revision=config.revision, init_lora_weights=True,
    )


def squeeze(
    peft_model,
    rank: RankSpec,
    adapter_name: Optional[str] = None,
    lora_alpha: Optional[float] = None,
    **kwargs,
):
    """Squeeze ``peft_model``'s adapter to a plain PEFT LoRA of ``rank`` and return the new ``PeftModel``.

    Works for PEFT's own LoRA (``r`` 16 → 4, with ``rank_pattern`` / ``alpha_pattern`` / ``use_rslora`` read from
    each layer's scale) and every tuner of this package (exact for factored deltas, randomized SVD for SLTrain and
    RandLoRA). The input model is consumed, as by ``merge_and_unload``: its adapter layers are removed (unmerged
    first if merged) and the base model is wrapped again with the LoRA adapter (same name, trainable, the
    ``modules_to_save`` heads carried over). Keep ``peft_model.save_pretrained(...)`` first if you need the original.

    Args:
        rank: int or energy threshold in (0, 1] (see the module doc).
        lora_alpha: the output's ``lora_alpha`` (default ``r`` per layer, scale 1).
        kwargs: ``oversampling``, ``power_iters``, ``seed``, ``max_energy_rank`` (see :func:`squeeze_state`).

    The LoRA is relative to the base the adapter was trained on (for an LQ-initialised adapter, its quantized
    ``Q``), since that is the base it is re-wrapped around; ``export_to_lora`` writes one for the original weights.
    """
    check_rank_spec(rank)
    adapter_name = _adapter_of(peft_model, adapter_name)
    result = squeeze_state(peft_model, rank, adapter_name, lora_alpha=lora_alpha, relative_to="trained", **kwargs)
    return _rewrap(peft_model, result, adapter_name)


def _rewrap(peft_model, result: SqueezeResult, adapter_name: str):
    """Remove ``peft_model``'s adapter layers and wrap its base model with the squeezed LoRA ``result``."""
    from peft import get_peft_model
    from peft.utils import set_peft_model_state_dict

    if any(getattr(m, "merged", False) for m in peft_model.modules() if hasattr(m, "merged_adapters")):
        peft_model.base_model.unmerge_adapter()
    base = peft_model.base_model.unload()
    new = get_peft_model(base, result.config, adapter_name=adapter_name)
    load = set_peft_model_state_dict(new, result.state, adapter_name=adapter_name)
    missing = [k for k in getattr(load, "missing_keys", []) if ".lora_" in k and k.endswith(f".{adapter_name}.weight")]
    unexpected = list(getattr(load, "unexpected_keys", []))
    if missing or unexpected:
        raise SqueezeError(
            f"the squeezed adapter did not load back into the model: missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}. This is a bug; please report it with the model type."
        )
    return new
