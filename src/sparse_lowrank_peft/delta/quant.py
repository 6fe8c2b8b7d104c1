"""Quantized bases: 4-bit helpers (bitsandbytes, imported lazily) and the LQ-LoRA decomposition W ≈ Q + L.

LQ-LoRA (Guo et al., ICLR 2024, "LQ-LoRA: Low-rank plus Quantized Matrix Decomposition for Efficient Language
Model Finetuning") splits a pretrained weight into a quantized part ``Q`` (the frozen 4-bit base) and a low-rank part
``L = L1·L2`` (the adapter's initial factors) so that the adapter starts by absorbing the quantization error. The
decomposition alternates

    L ← SVD_r(W − Q)        Q ← quantize(W − L)

and keeps the best iterate, since quantization makes the error non-monotone. The first iterate (``Q = quantize(W)``,
``L = SVD_r(W − Q)``) is LoftQ's single pass (PEFT's ``loftq_iter=1``), so the result is never worse than it.

With Fisher weighting (the paper's Section 3.2) the SVD step minimises ``‖D_r (W − Q − L) D_c‖_F`` for diagonal row
and column weights from squared gradients (``F ≈ d_r d_cᵀ``, a rank-1 approximation of the empirical Fisher):
``L = D_r⁻¹ · SVD_r(D_r (W − Q) D_c) · D_c⁻¹``.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
from torch import nn

__all__ = [
    "LQResult",
    "QUANT_TYPES",
    "dequantize_weight",
    "fisher_row_col_weights",
    "lq_decompose",
    "quantize_dequantize",
    "quantize_linears",
    "to_linear4bit",
    "use_fisher",
]

QUANT_TYPES = ("nf4", "fp4")
#: bitsandbytes' default block size for 4-bit weights (the one ``Linear4bit`` uses), so that what we compute here is
#: bit-for-bit what the quantized base layer stores.
BLOCKSIZE = 64


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "4-bit bases need bitsandbytes. Fix: pip install 'sparse-lowrank-peft[bnb]'."
        ) from err
    return bnb


def _check_quant_type(quant_type: str) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type={quant_type!r} is not one of {QUANT_TYPES}. Fix: quant_type='nf4'.")


def quantize_dequantize(W: torch.Tensor, quant_type: str = "nf4", compress_statistics: bool = True) -> torch.Tensor:
    """``dequantize(quantize(W))`` in fp32: exactly what a ``Linear4bit`` holding ``W`` computes with."""
    _check_quant_type(quant_type)
    F = _bnb().functional
    q, state = F.quantize_4bit(
        W.detach().to(torch.float32).contiguous(), quant_type=quant_type, blocksize=BLOCKSIZE,
        compress_statistics=compress_statistics,
    )
    return F.dequantize_4bit(q, state).to(torch.float32)


def dequantize_weight(layer: nn.Module) -> torch.Tensor:
    """The full-precision (fp32) weight of a ``bnb.nn.Linear4bit`` / ``Linear8bitLt`` or plain linear layer."""
    weight = layer.weight
    if hasattr(weight, "quant_state") and weight.quant_state is not None:
        return _bnb().functional.dequantize_4bit(weight.data, weight.quant_state).to(torch.float32)
    if getattr(weight, "SCB", None) is not None or getattr(getattr(layer, "state", None), "SCB", None) is not None:
        from peft.utils.integrations import dequantize_bnb_weight

        return dequantize_bnb_weight(weight, state=layer.state).to(torch.float32)
    return weight.detach().to(torch.float32)


def to_linear4bit(
    linear: nn.Linear, weight: Optional[torch.Tensor] = None, quant_type: str = "nf4",
    compute_dtype: torch.dtype = torch.float32, compress_statistics: bool = True,
) -> nn.Module:
    """A ``bnb.nn.Linear4bit`` holding ``weight`` (default: ``linear.weight``) and ``linear``'s bias."""
    _check_quant_type(quant_type)
    bnb = _bnb()
    weight = linear.weight if weight is None else weight
    device = linear.weight.device
    q = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, bias=linear.bias is not None, compute_dtype=compute_dtype,
        compress_statistics=compress_statistics, quant_type=quant_type,
    )
    q.weight = bnb.nn.Params4bit(
        weight.detach().to("cpu", torch.float32).contiguous(), requires_grad=False, quant_type=quant_type,
        compress_statistics=compress_statistics, blocksize=BLOCKSIZE,
    )
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.detach().to("cpu").clone(), requires_grad=False)
    return q.to(device)  # moving to a device quantizes


@dataclass
class LQResult:
    """``W ≈ Q + B·A``: ``Q`` dense fp32 (dequantized), ``B`` (out × r) and ``A`` (r × in) with ``B·A = L``.

    ``errors[i]`` is ``‖W − Q_i − L_i‖_F / ‖W‖_F`` of iterate ``i`` (``errors[0]``: LoftQ's single pass);
    ``best`` the index of the kept iterate; ``quant_only_error`` is ``‖W − quantize(W)‖_F / ‖W‖_F``. ``source`` is the
    matrix that was quantized into ``Q`` (``W − L`` of the previous iterate): a ``Linear4bit`` built from it holds
    exactly ``Q``.
    """

    Q: torch.Tensor
    B: torch.Tensor
    A: torch.Tensor
    source: torch.Tensor
    errors: list[float] = field(default_factory=list)
    best: int = 0
    quant_only_error: float = 0.0

    @property
    def error(self) -> float:
        return self.errors[self.best]


def _weighted_svd_r(R: torch.Tensor, rank: int, d_row: Optional[torch.Tensor], d_col: Optional[torch.Tensor]):
    """Best rank-``rank`` ``(B, A)`` of ``R`` in the (optionally diagonally weighted) Frobenius norm."""
    if d_row is not None:
        R = d_row[:, None] * R * d_col[None, :]
    U, S, Vh = torch.linalg.svd(R, full_matrices=False)
    root = S[:rank].sqrt()
    B = U[:, :rank] * root
    A = root[:, None] * Vh[:rank]
    if d_row is not None:
        B = B / d_row[:, None]
        A = A / d_col[None, :]
    return B, A


def lq_decompose(
    W: torch.Tensor,
    rank: int,
    quant_type: str = "nf4",
    max_iter: int = 20,
    fisher: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    tol: float = 1e-4,
    compress_statistics: bool = True,
) -> LQResult:
    """LQ-LoRA decomposition ``W ≈ Q + B·A`` (see module doc).

    Args:
        W: ``(out, in)`` weight (any float dtype; computed in fp32).
        rank: rank ``r`` of ``L``.
        quant_type: ``"nf4"`` or ``"fp4"``.
        max_iter: at most this many alternations; stops earlier once the error falls by less than ``tol`` (relative)
            or rises for 3 iterations in a row. The best iterate is returned.
        fisher: optional ``(d_row, d_col)`` positive weights (``fisher_row_col_weights``).
        tol: relative improvement under which the iteration stops.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"lq_decompose: rank={rank!r} must be a positive int.")
    W = W.detach().to(torch.float32)
    if rank > min(W.shape):
        raise ValueError(f"lq_decompose: rank={rank} exceeds min(out, in)={min(W.shape)}.")
    d_row = d_col = None
    if fisher is not None:
        d_row, d_col = (t.detach().to(W.device, torch.float32).clamp_min(1e-8).sqrt() for t in fisher)
        if d_row.shape != (W.shape[0],) or d_col.shape != (W.shape[1],):
            raise ValueError(f"lq_decompose: Fisher weights have shapes {d_row.shape}, {d_col.shape} for W {tuple(W.shape)}.")
    norm = W.norm().clamp_min(1e-30)

    def weighted_error(Q, B, A):
        R = W - Q - B @ A
        if d_row is not None:
            R = d_row[:, None] * R * d_col[None, :]
        return float(R.norm() / (norm if d_row is None else (d_row[:, None] * W * d_col[None, :]).norm()))

    source = W
    Q = quantize_dequantize(source, quant_type, compress_statistics)
    quant_only = float((W - Q).norm() / norm)
    best = None
    errors: list[float] = []
    rising = 0
    for it in range(max_iter):
        B, A = _weighted_svd_r(W - Q, rank, d_row, d_col)
        err = weighted_error(Q, B, A)
        errors.append(err)
        if best is None or err < errors[best.best]:
            if best is not None and errors[best.best] - err < tol * errors[best.best]:
                best = LQResult(Q, B, A, source, best=it)
                break
            best = LQResult(Q, B, A, source, best=it)
            rising = 0
        else:
            rising += 1
            if rising >= 3:
                break
        source = W - B @ A
        Q = quantize_dequantize(source, quant_type, compress_statistics)
    best.errors = errors
    best.quant_only_error = quant_only
    return best


_FISHER: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar("slpeft_lq_fisher", default=None)


@contextlib.contextmanager
def use_fisher(weights: dict[str, tuple[torch.Tensor, torch.Tensor]]):
    """Within this block, LQ initialisation (``init_weights="lq"``) weights each layer's decomposition by its Fisher
    row/column weights from ``weights`` (``fisher_row_col_weights``; keys are module names of the base model)::

        fisher = fisher_row_col_weights(base, calibration_batches)
        with use_fisher(fisher):
            model = get_peft_model(base, SLTrainConfig(init_weights="lq", ...))
    """
    token = _FISHER.set(dict(weights))
    try:
        yield
    finally:
        _FISHER.reset(token)


def fisher_for(key: str) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """The Fisher weights ``use_fisher`` set for module ``key`` (exact name or a dotted suffix), else None."""
    weights = _FISHER.get()
    if not weights:
        return None
    for name, value in weights.items():
        if key == name or key.endswith("." + name) or name.endswith("." + key):
            return value
    return None


@torch.no_grad()
def _accumulate(store: dict, name: str, grad: torch.Tensor) -> None:
    sq = grad.detach().to(torch.float32) ** 2
    row, col = sq.sum(1), sq.sum(0)
    if name in store:
        store[name][0].add_(row)
        store[name][1].add_(col)
    else:
        store[name] = [row, col]


def fisher_row_col_weights(
    model: nn.Module, batches: Iterable[dict], module_names: Optional[Iterable[str]] = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Row and column weights of the empirical Fisher of every ``nn.Linear`` weight (or those named), from the
    squared gradients of the loss on ``batches`` (dicts of model inputs with labels): ``d_row = Σ_j F_ij``,
    ``d_col = Σ_i F_ij`` with ``F = Σ_batches (∂loss/∂W)²``. Weights' ``requires_grad`` flags are restored."""
    wanted = set(module_names) if module_names is not None else None
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and (wanted is None or n in wanted)}
    flags = {n: m.weight.requires_grad for n, m in linears.items()}
    store: dict = {}
    try:
        for m in linears.values():
            m.weight.requires_grad_(True)
        was_training = model.training
        model.eval()
        for batch in batches:
            model.zero_grad(set_to_none=True)
            out = model(**batch)
            out.loss.backward()
            for n, m in linears.items():
                if m.weight.grad is not None:
                    _accumulate(store, n, m.weight.grad)
        model.train(was_training)
    finally:
        model.zero_grad(set_to_none=True)  # leave no calibration gradient behind, on any parameter
        for n, m in linears.items():
            m.weight.requires_grad_(flags[n])
    return {n: (v[0], v[1]) for n, v in store.items()}


def quantize_linears(
    model: nn.Module, names: Optional[Iterable[str]] = None, quant_type: str = "nf4",
    compute_dtype: torch.dtype = torch.float32,
) -> list[str]:
    """Quantize a loaded model's ``nn.Linear`` layers to 4-bit in place (``names``: module names or dotted suffixes;
    default: every linear layer); returns the names replaced. The QLoRA setup for a model that was loaded in full
    precision (``BitsAndBytesConfig(load_in_4bit=True)`` does the same at load time)."""
    _check_quant_type(quant_type)
    wanted = list(names) if names is not None else None
    replaced = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear:
            continue
        if wanted is not None and not any(name == w or name.endswith("." + w) for w in wanted):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, to_linear4bit(module, quant_type=quant_type, compute_dtype=compute_dtype))
        replaced.append(name)
    if wanted is not None and not replaced:
        raise ValueError(f"quantize_linears: no nn.Linear matches {wanted}. Fix: pass module names such as ['query'].")
    return replaced
