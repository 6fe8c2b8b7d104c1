"""Training hooks: Post-, Cont- and In-Squeeze (rank annealing during training)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from ..delta.layer import DeltaLayer
from .compress import _rewrap, squeeze_state
from .svd import RankSpec, SqueezeError, _split, check_rank_spec, svd_of_product
from .targets import _adapter_of, _is_lora_layer, _lora_layer_target


def post_squeeze(peft_model, rank: RankSpec, out_dir: Union[str, Path], adapter_name: Optional[str] = None,
                 lora_alpha: Optional[float] = None, **kwargs):
    """Post-Squeeze (and the first half of Cont-Squeeze): squeeze the trained model, save the LoRA folder.

    Returns ``(model, folder)``: the squeezed LoRA ``PeftModel`` (trainable, ready for more steps or evaluation)
    and ``out_dir`` with ``adapter_config.json``, ``adapter_model.safetensors`` and ``export_info.json`` (per-layer
    ranks, singular values, energy kept). ``peft_model`` is consumed (see :func:`squeeze`). Like the returned model,
    the folder is relative to the trained base (``relative_to: trained`` in ``export_info.json``; for an
    LQ-initialised adapter that is ``Q``, which plain PEFT cannot rebuild: ship ``export_to_lora`` of the trained
    adapter instead).
    """
    check_rank_spec(rank)
    adapter_name = _adapter_of(peft_model, adapter_name)
    result = squeeze_state(peft_model, rank, adapter_name, lora_alpha=lora_alpha, relative_to="trained", **kwargs)
    folder = result.save(out_dir)
    return _rewrap(peft_model, result, adapter_name), folder


@dataclass
class SqueezeSpec:
    """The ``squeeze:`` block of a GLUE recipe (validated by :meth:`from_mapping`).

    Fields:
        mode: ``post`` (train at the recipe's rank, squeeze, evaluate both), ``cont`` (post, then ``cont_steps``
            more steps of the squeezed LoRA at ``cont_learning_rate``, default the recipe's), or ``in`` (anneal
            the rank while training with :class:`InSqueezeCallback`, ``in_stages`` cuts from ``in_start`` to
            ``in_end`` of training, then squeeze, which is then exact).
        rank / energy: exactly one: the target rank (int) or energy threshold (float in (0, 1]; not for ``in``).
        lora_alpha: the squeezed LoRA's ``lora_alpha``; default :meth:`output_alpha`.
    """

    mode: str = "post"
    rank: Optional[int] = None
    energy: Optional[float] = None
    lora_alpha: Optional[float] = None
    cont_steps: int = 0
    cont_learning_rate: Optional[float] = None
    in_start: float = 0.25
    in_end: float = 0.75
    in_stages: int = 3

    MODES = ("post", "cont", "in")

    @classmethod
    def from_mapping(cls, values: dict) -> "SqueezeSpec":
        """Build and validate from a recipe mapping; raises :class:`SqueezeError` naming the field and the fix."""
        if not isinstance(values, dict):
            raise SqueezeError(f"recipe field squeeze must be a mapping (mode, rank, ...), got {values!r}.")
        known = {f for f in cls.__dataclass_fields__ if f != "MODES"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SqueezeError(f"unknown squeeze field(s) {unknown}; known: {sorted(known)}.")
        spec = cls(**values)
        spec.validate()
        return spec

    def validate(self) -> None:
        if self.mode not in self.MODES:
            raise SqueezeError(f"squeeze.mode={self.mode!r} is not one of {self.MODES}. Fix: mode: post.")
        if (self.rank is None) == (self.energy is None):
            raise SqueezeError("squeeze needs exactly one of rank (int) or energy (float in (0, 1]). Fix: rank: 4.")
        if self.rank is not None:
            if isinstance(self.rank, bool) or not isinstance(self.rank, int):
                raise SqueezeError(f"squeeze.rank={self.rank!r} must be an int >= 1 (use energy for a fraction).")
            check_rank_spec(self.rank, "squeeze.rank")
        else:
            check_rank_spec(float(self.energy), "squeeze.energy")
        if self.mode == "in" and self.rank is None:
            raise SqueezeError("squeeze.mode=in anneals to a fixed rank; it needs squeeze.rank, not energy.")
        if self.mode == "cont" and (not isinstance(self.cont_steps, int) or self.cont_steps < 1):
            raise SqueezeError(f"squeeze.cont_steps={self.cont_steps!r} must be an int >= 1 for mode cont.")
        if self.mode == "in":
            in_squeeze_schedule(16, self.rank or 1, self.in_start, self.in_end, self.in_stages)  # validates

    @property
    def target(self) -> RankSpec:
        return self.rank if self.rank is not None else float(self.energy)

    def output_alpha(self, peft_fields: dict) -> Optional[float]:
        """``lora_alpha`` of the squeezed adapter: the field if set; for ``cont``/``in`` with an int rank, the
        recipe's ratio kept, ``rank · lora_alpha / r`` (so more training sees the recipe's scale); otherwise
        None (``r`` per layer, scale 1)."""
        if self.lora_alpha is not None:
            return float(self.lora_alpha)
        if self.mode in ("cont", "in") and self.rank is not None and peft_fields.get("r"):
            return self.rank * float(peft_fields.get("lora_alpha", 8)) / float(peft_fields["r"])
        return None


def in_squeeze_schedule(start_rank: int, final_rank: int, start: float = 0.25, end: float = 0.75,
                        stages: int = 3) -> list[tuple[float, int]]:
    """``[(progress, rank), ...]``: ``stages`` rank cuts at progress ``start + j/(stages-1)·(end - start)``
    (``j = 0..stages-1``; one stage: at ``end``), ranks ``round(r₀ + (r_f − r₀)·(j+1)/stages)`` (the last is
    ``final_rank``). Progress is ``global_step / max_steps``."""
    if not (0.0 <= start <= end < 1.0):
        raise SqueezeError(f"In-Squeeze start={start}, end={end} must satisfy 0 <= start <= end < 1 (fractions of "
                           "training; leave steps after end to recover at the final rank). Fix: start=0.25, end=0.75.")
    if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
        raise SqueezeError(f"In-Squeeze stages={stages!r} must be an int >= 1.")
    if not 1 <= final_rank <= start_rank:
        raise SqueezeError(f"In-Squeeze final rank {final_rank} must be in 1..{start_rank} (the adapter's rank).")
    out = []
    for j in range(stages):
        at = end if stages == 1 else start + j * (end - start) / (stages - 1)
        r = int(round(start_rank + (final_rank - start_rank) * (j + 1) / stages))
        out.append((at, max(final_rank, r)))
    return out


def _transformers_callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


class InSqueezeCallback(_transformers_callback_base()):
    """In-Squeeze: anneal a LoRA adapter's rank during training (a ``transformers.TrainerCallback``).

    At each scheduled progress point (see :func:`in_squeeze_schedule`) every LoRA layer's ``ΔW = s·B·A`` is
    replaced, in place, by its optimal rank-``k`` truncation: ``B ← [U_k√Σ_k/√s, 0]``, ``A ← [√Σ_k V_kᵀ/√s; 0]``
    (exact path; the parameter shapes stay ``r`` so the optimizer keeps its parameters). A zero column of ``B``
    together with the matching zero row of ``A`` gets zero gradient (``∂B_j = s·G·(A_j x)ᵀ``, ``∂A_j = s·B_jᵀ·G·xᵀ``),
    and the optimizer state of the adapter factors is cleared, so the dropped ranks stay exactly zero: from then
    on the adapter has rank ``k``. After training, :func:`squeeze` to ``final_rank`` is exact.

    Args:
        final_rank: the rank at the end of annealing.
        start, end, stages: the schedule (fractions of ``max_steps``; see :func:`in_squeeze_schedule`).
        adapter_name: the LoRA adapter to anneal.
        schedule: an explicit ``[(progress, rank), ...]`` instead of ``start``/``end``/``stages``.
    """

    def __init__(self, final_rank: int, start: float = 0.25, end: float = 0.75, stages: int = 3,
                 adapter_name: str = "default", schedule: Optional[list] = None):
        check_rank_spec(final_rank, "final_rank")
        if not isinstance(final_rank, int):
            raise SqueezeError(f"In-Squeeze anneals to an int rank; got final_rank={final_rank!r}.")
        self.final_rank = final_rank
        self.start, self.end, self.stages = start, end, stages
        in_squeeze_schedule(max(final_rank, 1), final_rank, start, end, stages)  # validate early
        self.adapter_name = adapter_name
        self.schedule = [(float(p), int(r)) for p, r in schedule] if schedule is not None else None
        self.done: list[tuple[int, int]] = []  # (global_step, rank) of the cuts made
        self._pending: list[tuple[float, int]] = []

    def _lora_layers(self, model):
        layers = [(n, m) for n, m in model.named_modules() if _is_lora_layer(m) and self.adapter_name in m.r]
        for n, m in model.named_modules():
            if isinstance(m, DeltaLayer) and m.has_adapter(self.adapter_name):
                raise SqueezeError(
                    f"In-Squeeze rewrites LoRA factors in place; layer '{n}' is a {type(m).__name__}. Fix: train "
                    "PEFT LoRA for In-Squeeze, or Post-Squeeze this adapter after training."
                )
        if not layers:
            raise SqueezeError(f"In-Squeeze found no LoRA layer with adapter '{self.adapter_name}'.")
        return layers

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        layers = self._lora_layers(model)
        r0 = max(m.r[self.adapter_name] for _, m in layers)
        plan = self.schedule or in_squeeze_schedule(r0, min(self.final_rank, r0), self.start, self.end, self.stages)
        # A resumed run starts at its checkpoint's step, whose weights and optimizer state already hold the cuts made
        # up to it: they are recorded as done, not made again (a second cut cleared the optimizer state again and
        # the resumed run ended elsewhere than the uninterrupted one).
        progress = state.global_step / state.max_steps if state.global_step and state.max_steps else -1.0
        made = {math.ceil(p * state.max_steps): r for p, r in sorted(plan) if p <= progress}
        self.done = list(made.items())
        self._pending = [(p, r) for p, r in sorted(plan) if p > progress]

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if not self._pending or not state.max_steps:
            return
        progress = state.global_step / state.max_steps
        rank = None
        while self._pending and progress >= self._pending[0][0]:
            rank = self._pending.pop(0)[1]
        if rank is not None:
            truncate_lora_in_place(model, rank, self.adapter_name, optimizer)
            self.done.append((state.global_step, rank))

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self._pending:  # a run shorter than the schedule: finish at the final rank
            truncate_lora_in_place(model, self._pending[-1][1], self.adapter_name, optimizer)
            self.done.append((state.global_step, self._pending[-1][1]))
            self._pending = []


@torch.no_grad()
def truncate_lora_in_place(model, rank: int, adapter_name: str = "default", optimizer=None) -> dict[str, int]:
    """Replace every LoRA layer's ``ΔW`` by its rank-``rank`` truncation, keeping parameter shapes (zero padding);
    clear the optimizer state of the changed factors. Returns ``{layer: kept rank}``."""
    inner = getattr(optimizer, "optimizer", optimizer)
    kept = {}
    for name, m in model.named_modules():
        if not (_is_lora_layer(m) and adapter_name in m.r):
            continue
        t = _lora_layer_target(name, m, adapter_name)
        U, S, Vh = svd_of_product(t.B, t.A, t.scale)
        k = min(rank, S.numel())
        Bn, An = _split(U, S, Vh, k, t.scale, t.dtype)
        r = t.A.shape[0]
        B_full = torch.zeros(t.B.shape[0], r, dtype=t.dtype, device=t.B.device)
        A_full = torch.zeros(r, t.A.shape[1], dtype=t.dtype, device=t.A.device)
        B_full[:, :k] = Bn.to(B_full.device)
        A_full[:k] = An.to(A_full.device)
        if adapter_name in m.lora_A:
            pA, pB = m.lora_A[adapter_name].weight, m.lora_B[adapter_name].weight
        else:
            pA, pB = m.lora_embedding_A[adapter_name], m.lora_embedding_B[adapter_name]
        pA.copy_(A_full.reshape(pA.shape))
        pB.copy_(B_full.reshape(pB.shape))
        if inner is not None:
            for p in (pA, pB):
                inner.state.pop(p, None)
        kept[name] = k
    return kept
