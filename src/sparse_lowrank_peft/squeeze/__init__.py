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

Modules, in the order a squeeze runs: ``svd`` (rank specs, the exact and randomized SVDs), ``targets`` (what each
kind of adapter layer gives: factors or an operator), ``compress`` (a model's adapter to a LoRA state, config and
model), ``folders`` (adapter folders in and out), ``report`` (spectra of a folder), ``training`` (Post-, Cont- and
In-Squeeze).
"""

from __future__ import annotations

from .compress import SqueezeResult, check_squeeze_rank, squeeze, squeeze_state
from .folders import adapter_folder_to_lora, load_adapter_model, squeeze_adapter
from .report import inspect_adapter, plot_spectra
from .svd import (
    DEFAULT_OVERSAMPLING,
    DEFAULT_POWER_ITERS,
    DEFAULT_SEED,
    SqueezeError,
    check_rank_spec,
    delta_operator,
    frobenius_norm,
    randomized_svd,
    rank_for_energy,
    squeeze_factors,
    svd_of_product,
)
from .targets import LayerSqueeze
from .training import InSqueezeCallback, SqueezeSpec, in_squeeze_schedule, post_squeeze, truncate_lora_in_place

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
