"""Per-layer sources of a delta: what each kind of adapter layer gives the squeeze (factors or an operator)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ..delta.layer import DeltaLayer
from ..delta.quant import lq_offset
from .svd import RankSpec, SqueezeError, _adapter_param, _choose_rank, _randomized_layer, _split, svd_of_product


#: what a squeezed or exported LoRA is relative to: the weights the user's model file holds, or the base the adapter
#: was trained on. They differ only for an LQ-initialised adapter (base ``Q``; see ``delta.quant.record_lq_offset``).
RELATIVE_TO = ("original", "trained")


@dataclass
class LayerSqueeze:
    """What squeezing did to one layer (``export_info.json`` / ``slpeft inspect`` report it)."""

    name: str
    method: str  # "exact", "randomized", "nested" (DyLoRA's own rank-b factors), "as-is" (no truncation asked)
    shape: tuple[int, int]
    rank_in: Optional[int]  # the input's factor rank (None for an operator delta)
    rank: int
    singular_values: list[float] = field(default_factory=list)  # computed ones, descending (all, or the sketch's)
    energy_kept: Optional[float] = None  # Σ_{i≤rank} σᵢ² / ‖ΔW‖_F² (None if the total is unknown)
    lq_offset_subtracted: bool = False  # ΔW − L on an LQ layer (W ≈ Q + L), for the original weights

    def to_dict(self) -> dict:
        out = {
            "method": self.method, "shape": list(self.shape), "rank_in": self.rank_in, "rank": self.rank,
            "energy_kept": self.energy_kept, "singular_values": [float(f"{s:.6g}") for s in self.singular_values],
        }
        return {**out, "lq_offset_subtracted": True} if self.lq_offset_subtracted else out


@dataclass
class _Target:
    """One adapted layer: its name (relative to the base model), output key names and layout, and its delta."""

    name: str
    shape: tuple[int, int]  # (out, in) of ΔW in the B·A layout
    key_A: str
    key_B: str
    shape_A: tuple  # original tensor shapes (conv / embedding layouts are reshaped back)
    shape_B: tuple
    dtype: torch.dtype
    B: Optional[torch.Tensor] = None  # factored: ΔW = scale·B·A
    A: Optional[torch.Tensor] = None
    scale: float = 1.0
    layer: Optional[DeltaLayer] = None  # operator delta
    nested: bool = False  # has its own nested ranks (DyLoRA: set_rank); an int rank picks them exactly
    fan_in_fan_out: bool = False
    offset: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # operator delta: its LQ layer's offset, subtracted
    minus_offset: bool = False  # the delta is ΔW − L (an LQ layer's offset subtracted)


def _minus_lq_offset(t: _Target, offset: Optional[tuple[torch.Tensor, torch.Tensor]]) -> _Target:
    """``t`` for the original weights of an LQ layer, ``ΔW − B₀·A₀`` (``W ≈ Q + B₀·A₀``; for the LQ adapter, its
    change since its start): factored, the factors ``[s·B, −B₀]`` and ``[A; A₀]``
    (rank ``k + r``, exact; DyLoRA's nested rank is then truncated like any product); an operator subtracts it in
    its products."""
    if offset is None:
        return t
    t.minus_offset = True
    if t.layer is not None:
        t.offset = offset
        return t
    B0, A0 = offset
    t.B = torch.cat([t.B.to(torch.float64) * t.scale, -B0.to(device=t.B.device, dtype=torch.float64)], dim=1)
    t.A = torch.cat([t.A.to(torch.float64), A0.to(device=t.A.device, dtype=torch.float64)], dim=0)
    t.scale, t.nested = 1.0, False
    return t


def _adapter_of(peft_model, adapter_name: Optional[str]) -> str:
    """The adapter to squeeze: ``adapter_name``, or (None) the model's one active adapter."""
    from ..delta.tuner import pick_adapter

    try:
        return pick_adapter(peft_model.peft_config, peft_model.active_adapters, adapter_name, "squeeze / export")
    except ValueError as exc:
        raise SqueezeError(str(exc)) from None


def _is_lora_layer(module) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer)


def _is_token_layer(module) -> bool:
    """PEFT's trainable-token rows (``trainable_token_indices``): not a delta to squeeze; their tensors are carried
    into the LoRA folder as they are (``_state_besides_factors``), and ``LoraConfig`` takes the same indices."""
    from peft.tuners.trainable_tokens import TrainableTokensLayer

    return isinstance(module, TrainableTokensLayer)


def _lora_layer_target(name: str, module, adapter_name: str) -> Optional[_Target]:
    """A PEFT LoRA layer's factors (flattened to ``out × r`` / ``r × in``) and scale, or None without the adapter."""
    if adapter_name not in module.r:
        return None
    variant = getattr(module, "lora_variant", {}).get(adapter_name)
    if variant is not None:
        raise SqueezeError(
            f"LoRA layer '{name}' uses the variant {type(variant).__name__} (DoRA or another), whose ΔW is not "
            "scale·B·A; squeezing it to plain LoRA would change the model. Fix: merge it (merge_and_unload) or "
            "train plain LoRA."
        )
    if getattr(module, "lora_bias", {}).get(adapter_name, False):
        raise SqueezeError(
            f"LoRA layer '{name}' has lora_bias=True (a trained bias on lora_B scaled by alpha/r); squeeze writes "
            "LoRA with another scale. Fix: train without lora_bias, or merge the adapter."
        )
    if adapter_name in module.lora_A:
        A_t, B_t = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
        key_A, key_B = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
    else:
        A_t, B_t = module.lora_embedding_A[adapter_name], module.lora_embedding_B[adapter_name]
        key_A, key_B = f"{name}.lora_embedding_A", f"{name}.lora_embedding_B"
    return _factor_target(name, key_A, key_B, A_t.detach(), B_t.detach(), float(module.scaling[adapter_name]),
                          fan_in_fan_out=bool(getattr(module, "fan_in_fan_out", False)))


def _factor_target(name, key_A, key_B, A_t, B_t, scale, fan_in_fan_out=False) -> _Target:
    r = A_t.shape[0]
    if B_t.shape[1] != r or any(d != 1 for d in B_t.shape[2:]):
        raise SqueezeError(
            f"layer '{name}': lora_A {tuple(A_t.shape)} and lora_B {tuple(B_t.shape)} are not the factors of one "
            "rank-r product (grouped convolutions are not supported). Fix: merge this adapter instead."
        )
    A = A_t.reshape(r, -1)
    B = B_t.reshape(B_t.shape[0], r)
    return _Target(name=name, shape=(B.shape[0], A.shape[1]), key_A=key_A, key_B=key_B, shape_A=tuple(A_t.shape),
                   shape_B=tuple(B_t.shape), dtype=A_t.dtype, B=B, A=A, scale=scale, fan_in_fan_out=fan_in_fan_out)


def _delta_layer_target(name: str, module: DeltaLayer, adapter_name: str, rank: Optional[RankSpec]) -> _Target:
    ref = _adapter_param(module, adapter_name)
    t = _Target(name=name, shape=(module.out_features, module.in_features), key_A=f"{name}.lora_A.weight",
                key_B=f"{name}.lora_B.weight", shape_A=(), shape_B=(), dtype=ref.dtype,
                fan_in_fan_out=bool(module.fan_in_fan_out))
    if module.has_sparse(adapter_name):
        t.layer = module
        return t
    nested = hasattr(module, "set_rank") and isinstance(rank, int)
    pair = module.lowrank_factors(adapter_name, rank=rank) if nested else module.lowrank_factors(adapter_name)
    if pair is None:
        t.layer = module
        return t
    B, A = pair
    t.B, t.A, t.nested = B.detach(), A.detach(), nested
    return t


def _layer_target(name: str, module, adapter_name: str, rank: Optional[RankSpec]) -> Optional[_Target]:
    """The delta of one module holding the adapter (this package's tuners, PEFT's LoRA), else None."""
    if isinstance(module, DeltaLayer):
        if not module.has_adapter(adapter_name):
            return None
        if isinstance(rank, int) and hasattr(module, "set_rank"):
            r_max = getattr(module, "dylora_r", {}).get(adapter_name)
            if r_max is not None and rank > r_max:
                raise SqueezeError(
                    f"rank {rank} is above what layer '{name}' has (nested ranks 1..{r_max}). Fix: a rank <= {r_max}."
                )
        return _delta_layer_target(name, module, adapter_name, rank)
    if _is_lora_layer(module):
        return _lora_layer_target(name, module, adapter_name)
    return None


def _targets(peft_model, adapter_name: str, rank: Optional[RankSpec], relative_to: str = "original"
             ) -> list[_Target]:
    """Every adapted layer's delta: relative to the original weights (an LQ layer's offset subtracted) or to the trained
    base (:data:`RELATIVE_TO`)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if relative_to not in RELATIVE_TO:
        raise SqueezeError(f"relative_to={relative_to!r} is not one of {RELATIVE_TO}. Fix: 'original' for a LoRA "
                           "to load on the model's own weights (servers), 'trained' for the base it was trained on.")

    inner = peft_model.base_model.model
    out: list[_Target] = []
    for name, module in inner.named_modules():
        t = _layer_target(name, module, adapter_name, rank)
        if t is None:
            if isinstance(module, BaseTunerLayer) and not isinstance(module, DeltaLayer) and not _is_lora_layer(
                    module) and not _is_token_layer(module) and adapter_name in getattr(module, "active_adapters", []):
                raise SqueezeError(
                    f"layer '{name}' is a {type(module).__name__}: LoRA-Squeeze reads this package's tuners and "
                    "PEFT's LoRA. Fix: for PEFT's other methods use peft.convert_to_lora (dense SVD per layer)."
                )
            continue
        out.append(_minus_lq_offset(t, lq_offset(module)) if relative_to == "original" else t)
    if not out:
        raise SqueezeError(
            f"the model has no adapted layer with adapter '{adapter_name}'. Fix: pass the adapter's name "
            f"(adapters: {sorted(getattr(peft_model, 'peft_config', {}))})."
        )
    return out


def _squeeze_target(t: _Target, rank: Optional[RankSpec], lora_alpha: Optional[float], opts: dict):
    """``(B', A', LayerSqueeze)`` for one target; ``rank=None`` writes the exact factors as they are."""
    if t.layer is not None:
        if rank is None:
            raise SqueezeError(
                f"layer '{t.name}' ({type(t.layer).__name__}) has a delta that is not low-rank (a sparse term or a "
                "full-rank sum of random bases), so plain LoRA can hold it only truncated. Fix: give a target rank "
                "(export_to_lora(model, dir, rank=16) / slpeft export IN OUT --rank 16); it is computed by "
                "randomized SVD without building ΔW."
            )
        U, S, Vh, k, total = _randomized_layer(t.layer, opts["adapter_name"], rank, t.name, opts, t.offset)
        scale_out = 1.0 if lora_alpha is None else lora_alpha / max(k, 1)
        B, A = _split(U, S, Vh, k, scale_out, t.dtype)
        kept = None if total is None or total == 0 else float((S[:k] ** 2).sum()) / total
        rep = LayerSqueeze(t.name, "randomized", t.shape, None, k, S.tolist(), kept, t.minus_offset)
        return B, A, rep
    k_in = t.B.shape[1]
    if t.nested or rank is None:
        # the factors themselves: exact; rescale for the output's lora_alpha / k
        scale_out = 1.0 if lora_alpha is None else lora_alpha / max(k_in, 1)
        factor = t.scale / scale_out
        B = (t.B.to(torch.float64) * factor).to(t.dtype).contiguous()
        A = t.A.to(t.dtype).contiguous()
        rep = LayerSqueeze(t.name, "nested" if t.nested else "as-is", t.shape, k_in, k_in,
                           lq_offset_subtracted=t.minus_offset)
        return B, A, rep
    U, S, Vh = svd_of_product(t.B, t.A, t.scale)
    k = _choose_rank(S, rank, S.numel())
    scale_out = 1.0 if lora_alpha is None else lora_alpha / max(k, 1)
    B, A = _split(U, S, Vh, k, scale_out, t.dtype)
    total = float((S.to(torch.float64) ** 2).sum())
    kept = None if total == 0 else float((S[:k] ** 2).sum()) / total
    return B, A, LayerSqueeze(t.name, "exact", t.shape, k_in, k, S.tolist(), kept, t.minus_offset)


def _check_int_rank(targets: list[_Target], rank: Optional[RankSpec]) -> None:
    """An int rank above every factored layer's rank is an error (it would silently squeeze nothing), and so is one
    above a sparse / full-rank delta's ``min(out, in)``: both known from shapes, so runners check them before
    training (the randomized SVD refused the latter only after it)."""
    if not isinstance(rank, int):
        return
    for t in targets:
        if t.layer is not None and rank > min(t.shape):
            raise SqueezeError(
                f"rank {rank} is above what layer '{t.name}' has: its ΔW is {t.shape[0]} × {t.shape[1]}, so its rank "
                f"is at most {min(t.shape)}. Fix: a rank <= {min(t.shape)}."
            )
    factored = [t for t in targets if t.layer is None and not t.nested]
    if factored and len(factored) == len(targets):
        have = max(t.B.shape[1] for t in factored)
        if rank > have:
            raise SqueezeError(
                f"rank {rank} is above what the adapter has: its largest layer rank is {have}. Squeezing can only "
                f"lower the rank. Fix: a rank <= {have} (layers of lower rank keep theirs)."
            )
