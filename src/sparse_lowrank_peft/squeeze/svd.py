"""Ranks and the two SVD paths of LoRA-Squeeze: exact (QR of the factors) and randomized (the delta as an operator)."""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Optional, Union

import torch
from torch import nn

from ..delta.layer import DeltaLayer


RankSpec = Union[int, float]

#: oversampling ``p`` of the randomized range finder (sketch width ``ℓ = rank + p``)
DEFAULT_OVERSAMPLING = 10
#: power iterations ``q`` of the randomized range finder
DEFAULT_POWER_ITERS = 3
#: seed of the Gaussian probes (a CPU generator, so every device draws the same probes)
DEFAULT_SEED = 0

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
