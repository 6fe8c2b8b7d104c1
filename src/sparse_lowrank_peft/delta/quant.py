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
``L = D_r⁻¹ · SVD_r(D_r (W − Q) D_c) · D_c⁻¹`` (the weights: ``delta.fisher``).
"""

from __future__ import annotations

import copy as _copy
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch
from torch import nn

# Fisher weighting is delta.fisher's and the checks before LQ initialisation are delta.lq_checks'; the two public
# Fisher names stay importable from here, where earlier versions had them.
from .fisher import fisher_row_col_weights, use_fisher  # noqa: F401
from .lq_checks import names_module

__all__ = [
    "LQResult",
    "QUANT_TYPES",
    "can_repack_for_cpu",
    "dequantize_4bit",
    "dequantize_4bit_reference",
    "dequantize_weight",
    "fisher_row_col_weights",
    "give_back_repack_settings",
    "keep_standard_layout",
    "keep_standard_layouts",
    "linear4bit_forward",
    "lq_decompose",
    "quantize_dequantize",
    "quantize_linears",
    "quantize_vector",
    "dequantize_vector",
    "lq_offset",
    "record_lq_offset",
    "restore_full_precision",
    "restore_standard_layout",
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
    return dequantize_4bit(q, state)


# ---------------------------------------------------------------------------------------------- reading 4-bit weights
#: How 4-bit weights are dequantized on the CPU: ``"bnb"`` (bitsandbytes' native kernel, given the weight as one flat
#: row) or ``"torch"`` (:func:`dequantize_4bit_reference`). Both are exact (tests/test_bnb_cpu_paths.py checks them
#: against each other on every machine). "bnb" is the default because it is 3-11x faster from 384x384 up (equal on
#: tiny weights): 768x768 0.14 vs 1.51 ms, 4096x4096 29 vs 92 ms on 2 Zen 4 threads (bench/results/dequant-cpu.json).
#: The flat row costs 1.5-1.9x the 2-D call (0.14 vs 0.075 ms at 768x768), nothing beside the 25 ms GEMM of a
#: 4,096-token forward.
CPU_DEQUANTIZE = "bnb"


def _blockwise_absmax(state) -> torch.Tensor:
    """The fp32 absmax of every block of a 4-bit weight (dequantizing bitsandbytes' nested 8-bit absmax if needed)."""
    if getattr(state, "nested", False):
        F = _bnb().functional
        return (F.dequantize_blockwise(state.absmax, state.state2) + state.offset).to(torch.float32)
    return state.absmax.to(torch.float32)


def _is_cpu_packed(state) -> bool:
    return bool(getattr(state, "packing_format_for_cpu", False))


def _unpack_cpu_layout(data: torch.Tensor, state):
    """bitsandbytes' AVX-512-BF16 layout -> its standard one, without touching ``data`` or ``state``.

    ``Linear4bit.forward`` repacks a weight in place on CPUs with AVX-512-BF16 (eval mode, input without grad): the
    codes are interleaved in blocks of 32 output rows, the nested absmax is expanded, rounded to bf16 and stored
    transposed as ``(in / blocksize, out)``. Returns ``(codes, absmax, state)`` in the standard layout: codes as
    ``quantize_4bit`` returns them, absmax fp32 one per block in row-major order, ``state`` a shallow copy describing
    them (not nested). The bf16 rounding of the absmax is kept (it is what the repacked layer computes with).
    """
    F = _bnb().functional
    copy_ = _copy.copy(state)
    copy_.original_nested = False  # keep the expanded absmax exactly; bitsandbytes would re-quantize it (lossy)
    codes, copy_ = F._convert_weight_packed_for_cpu_inverse(data, copy_)
    absmax = copy_.absmax
    if absmax.dim() == 2:  # stored (in / blocksize, out): bitsandbytes' inverse leaves it so when not nested
        absmax = absmax.T.reshape(-1)
    copy_.absmax = absmax.to(torch.float32).contiguous()
    copy_.nested, copy_.state2, copy_.offset = False, None, None
    copy_.packing_format_for_cpu = False
    return codes, copy_.absmax, copy_


def dequantize_4bit_reference(
    codes: torch.Tensor, absmax: torch.Tensor, quant_type: str, blocksize: int, shape, dtype=torch.float32
) -> torch.Tensor:
    """Pure-PyTorch dequantization of bitsandbytes' standard 4-bit layout: the specification of the CPU path.

    ``codes`` holds two 4-bit codes a byte (first value in the high nibble) of the weight flattened row-major;
    value ``k`` is ``code_table[codes_k] · absmax[k // blocksize]``, so blocks run over the flat weight and may
    straddle rows.
    """
    table = _bnb().functional.get_4bit_type(quant_type, device=codes.device)
    b = codes.reshape(-1).view(torch.uint8)
    n = math.prod(int(d) for d in shape)
    idx = torch.stack([b >> 4, b & 0xF], dim=1).reshape(-1)[:n].long()
    values = table[idx]
    pad = (-n) % blocksize
    if pad:
        values = torch.nn.functional.pad(values, (0, pad))
    values = values.view(-1, blocksize) * absmax.to(torch.float32).reshape(-1, 1)
    return values.reshape(-1)[:n].reshape(tuple(shape)).to(dtype)


def _dequantize_4bit_cpu(codes: torch.Tensor, absmax: torch.Tensor, state) -> torch.Tensor:
    shape = tuple(state.shape)
    if CPU_DEQUANTIZE == "torch":
        return dequantize_4bit_reference(codes, absmax, state.quant_type, state.blocksize, shape)
    if CPU_DEQUANTIZE != "bnb":
        raise ValueError(f"CPU_DEQUANTIZE={CPU_DEQUANTIZE!r} is not 'bnb' or 'torch'.")
    # The weight goes in as one flat row. bitsandbytes' AVX-512 kernel walks a 2-D weight row by row and reads the
    # wrong absmax where a block straddles two rows: on a Zen 4 CPU a 64x48 NF4 weight dequantizes 0.39 (relative)
    # away from the right values, 96x80 0.25 (wrong whenever in_features is a multiple of 16 but not of the block
    # size 64; bench/results/dequant-cpu.json). A flat row has no row boundary: the same kernel is exact on every
    # shape.
    numel = math.prod(shape)
    flat = torch.ops.bitsandbytes.dequantize_4bit.default(
        codes.reshape(-1).view(torch.uint8), absmax, state.blocksize, state.quant_type, [numel], torch.float32
    )
    return flat.reshape(shape)


def dequantize_4bit(data: torch.Tensor, quant_state) -> torch.Tensor:
    """The logical fp32 weight of a bitsandbytes 4-bit parameter (``weight.data``, ``weight.quant_state``), whatever
    its layout: standard or repacked for the AVX-512-BF16 CPU kernel, nested absmax or not. Reads, never mutates.

    Every place in this package that reads a 4-bit weight (merge, unmerge, ``get_delta_weight``'s base, dequantize,
    LQ-LoRA, export, squeeze) goes through here.
    """
    if _is_cpu_packed(quant_state):
        codes, absmax, quant_state = _unpack_cpu_layout(data, quant_state)
    else:
        codes, absmax = data, None
    if codes.device.type == "cpu":
        absmax = _blockwise_absmax(quant_state) if absmax is None else absmax
        return _dequantize_4bit_cpu(codes, absmax, quant_state)
    return _bnb().functional.dequantize_4bit(codes, quant_state).to(torch.float32)


def _is_linear4bit(layer: nn.Module) -> bool:
    return getattr(getattr(layer, "weight", None), "quant_state", None) is not None or (
        type(layer).__name__ in ("Linear4bit", "LinearNF4", "LinearFP4")
    )


def _quant_state(layer: nn.Module):
    """``layer.weight.quant_state``, or the module's copy (bitsandbytes keeps one there after FSDP re-wraps params)."""
    state = getattr(layer.weight, "quant_state", None)
    return state if state is not None else getattr(layer, "quant_state", None)


def restore_standard_layout(layer: nn.Module) -> bool:
    """If bitsandbytes repacked ``layer``'s 4-bit weight for its AVX-512-BF16 CPU kernel, put it back in the standard
    layout in place (absmax kept as the repacked layer computes with it: fp32 values of its bf16 rounding, not
    nested). Returns whether it was repacked."""
    state = _quant_state(layer)
    if not _is_cpu_packed(state):
        return False
    codes, _, new_state = _unpack_cpu_layout(layer.weight.data, state)
    layer.weight.data = codes
    layer.weight.quant_state = new_state
    if getattr(layer, "quant_state", None) is not None:
        layer.quant_state = new_state
    return True


def can_repack_for_cpu(layer: nn.Module) -> bool:
    """Whether bitsandbytes' AVX-512-BF16 repacking accepts ``layer``'s shape: it asserts ``out % 32 == 0`` and needs
    ``in % blocksize == 0`` (else ``shape '[out, 0]' is invalid``)."""
    state = _quant_state(layer)
    out, inp = (int(d) for d in state.shape)
    return out % 32 == 0 and inp % int(state.blocksize) == 0


def keep_standard_layout(layer: nn.Module, give_back: bool = True) -> None:
    """Stop bitsandbytes from repacking ``layer``'s 4-bit weight for its AVX-512-BF16 CPU inference kernel (undoing
    a repack that already happened); the setting is recorded and :func:`give_back_repack_settings` restores it.
    ``give_back=False`` for a 4-bit layer this package made (a runner's base, LQ-LoRA's ``Q``, a plan's layers): it
    keeps the standard layout after an adapter is unloaded too, so an unloaded or squeezed model computes on the
    weights it was trained on (given back, the repack's bf16 absmax moved a squeezed LoRA's loss by 1e-4).

    Why, measured with bitsandbytes 0.50.2 on a Zen 4 CPU: the repack happens in place at the first eval forward and
    (1) rounds the absmax to bf16, so the frozen weight changes under a run that evaluates; (2) fails for shapes it
    cannot tile (:func:`can_repack_for_cpu`); (3) is undone in place by every ``state_dict()`` (so by each
    ``save_pretrained``), and the next eval forward repacks a non-nested absmax in the wrong order: a 384x384
    layer's output moved by 2.2% after one save; (4) its kernel fails on an input that requires grad (``a view of a
    leaf Variable ... in-place``). What it would gain: the GEMM of a 4-bit layer in eval only, 5.4 vs 7.1 ms for
    384x384 and 19.0 vs 25.6 ms for 768x768 at 4,096 tokens (1.32-1.39x; bench/results/dequant-cpu.json); training
    steps never use it.
    """
    restore_standard_layout(layer)
    if hasattr(layer, "support_avx512bf16_for_cpu"):
        if not give_back:
            layer._slpeft_repack_for_cpu = False
        elif "_slpeft_repack_for_cpu" not in layer.__dict__:
            layer._slpeft_repack_for_cpu = layer.support_avx512bf16_for_cpu
        layer.support_avx512bf16_for_cpu = False


def keep_standard_layouts(model: nn.Module, give_back: bool = True) -> list[str]:
    """:func:`keep_standard_layout` for every bitsandbytes 4-bit linear of ``model``; returns their names."""
    names = []
    for name, module in model.named_modules():
        if hasattr(module, "support_avx512bf16_for_cpu") and _quant_state(module) is not None:
            keep_standard_layout(module, give_back)
            names.append(name)
    return names


def give_back_repack_settings(modules: Iterable[nn.Module]) -> None:
    """Restore the repack setting :func:`keep_standard_layout` recorded on each of ``modules`` (unload)."""
    for module in modules:
        if "_slpeft_repack_for_cpu" in module.__dict__:
            module.support_avx512bf16_for_cpu = module.__dict__.pop("_slpeft_repack_for_cpu")


class _Linear4bitCPU(torch.autograd.Function):
    """``y = x · dequantize(Q)ᵀ + b`` keeping only the 4-bit ``Q`` for backward (dequantized again there), as
    bitsandbytes' own ``MatMul4Bit`` does: no dense weight is saved between forward and backward."""

    @staticmethod
    def forward(ctx, x, data, quant_state, bias, dtype):
        ctx.quant_state, ctx.dtype = quant_state, dtype
        ctx.save_for_backward(data)
        weight = dequantize_4bit(data, quant_state).to(dtype)
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        (data,) = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ dequantize_4bit(data, ctx.quant_state).to(grad.dtype)
        if ctx.needs_input_grad[3]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, None, None, grad_bias, None


def linear4bit_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A ``bnb.nn.Linear4bit``'s forward on the CPU with the weight read by :func:`dequantize_4bit`.

    The math of bitsandbytes' CPU path (dequantize, one GEMM in the compute dtype, output in the input's dtype) but
    exact on every shape and CPU: bitsandbytes' own forward dequantizes 2-D weights with the kernel that is wrong for
    some shapes on AVX-512 CPUs, and repacks in eval (see :func:`keep_standard_layout`). ``x``: ``(..., in)``.
    """
    state = _quant_state(layer)
    dtype = getattr(layer, "compute_dtype", None) or x.dtype
    bias = layer.bias.to(dtype) if layer.bias is not None else None
    out = _Linear4bitCPU.apply(x.to(dtype), layer.weight.data, state, bias, dtype)
    return out.to(x.dtype)


def dequantize_weight(layer: nn.Module) -> torch.Tensor:
    """The full-precision (fp32) weight of a ``bnb.nn.Linear4bit`` / ``Linear8bitLt``, HQQ or plain linear layer."""
    if hasattr(layer, "W_q") and hasattr(layer, "dequantize"):  # HQQLinear (delta.bitbudget plans)
        return layer.dequantize().to(torch.float32).reshape(layer.out_features, layer.in_features)
    weight = layer.weight
    state = _quant_state(layer) if hasattr(weight, "quant_state") or hasattr(layer, "quant_state") else None
    if state is not None and hasattr(state, "blocksize"):
        return dequantize_4bit(weight.data, state)
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
    q = q.to(device)  # moving to a device quantizes
    if hasattr(q, "support_avx512bf16_for_cpu") and not can_repack_for_cpu(q):
        q.support_avx512bf16_for_cpu = False  # bitsandbytes' eval-time CPU repack would fail on this shape
    return q


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

    def summary(self) -> dict[str, float]:
        """Relative errors of quantizing alone, of LoftQ's single pass and of the kept LQ iterate (what a layer
        reports as ``lq_errors``)."""
        return {"quant_only": self.quant_only_error, "loftq": self.errors[0], "lq": self.error}


#: ``svd="auto"`` takes LAPACK's exact SVD while the weight's smaller side is at most this, randomized subspace
#: iteration above it. Measured (``python bench/lq_svd.py``, bench/results/lq-svd-cpu.json, 2 CPU cores): a
#: 20-alternation NF4 LQ at rank 16 (in float64, see LQ_SVD_MODES) takes 0.59 s exact vs 0.12 s randomized on
#: MiniLM's 384x384 query, 7.2 vs 0.89 s at 1024x1024, 52.7 vs 4.6 s at 2048x2048 and 452 vs 20.5 s at 4096x4096; the
#: randomized error is at most 0.34% above the exact one in every pair (the most on MiniLM's query). Up to the bound
#: the exact SVD is affordable (MiniLM's 1536x384 FFN weight: 1.47 s exact vs 0.47 s randomized) and keeps that error;
#: above it the exact one grows as min(out, in)³. "auto" is part of the saved format: changing this bound changes
#: what saved adapters re-derive, so a new rule needs a new mode name.
LQ_EXACT_SVD_MAX_DIM = 512
#: extra directions the randomized solver carries beyond the rank. Halko et al. suggest 5-10 for fast-decaying
#: spectra; LQ's residual ``W − Q`` is mostly quantization noise (flat), where 8 left a Fisher-weighted LQ of a 96x80
#: weight 1.5% above the exact SVD's error after 6 alternations and 16 matched it (0.0752 vs 0.0753).
LQ_SVD_OVERSAMPLE = 16
#: ``"exact"`` and ``"randomized"`` compute the SVD, ``L = B·A`` and the errors in float64 and round ``W − L`` to fp32
#: for the quantizer. In fp32 a different thread count changes the BLAS/LAPACK summation order, ``W − L`` by ~1e-7,
#: and that flips bitsandbytes' double-quantized absmax codes: MiniLM's 12 query/value LQ bases re-derived at 1 and at 2
#: threads differed in 55% of their entries (‖ΔQ‖/‖W‖ = 3%), so a reload on another machine was not the trained
#: base. In float64 the difference is ~1e-16 and vanishes in the rounding to fp32. ``"exact-fp32"`` is the fp32
#: computation of adapters saved before ``lq_svd`` existed (loading one selects it, so it re-derives as before).
LQ_SVD_MODES = ("auto", "exact", "randomized", "exact-fp32")


def resolve_lq_svd(svd: str, shape: tuple[int, int], rank: int) -> str:
    """The SVD an LQ decomposition of an ``(out, in)`` weight at ``rank`` uses: ``svd`` itself, or for ``"auto"``
    ``"exact"`` / ``"randomized"`` by size."""
    if svd not in LQ_SVD_MODES:
        raise ValueError(f"LQ svd={svd!r} must be one of {LQ_SVD_MODES}. Fix: 'auto' (exact for small matrices).")
    if svd != "auto":
        return svd
    small = min(int(shape[0]), int(shape[1]))
    # the randomized solver only pays while its rank + oversample columns are a small part of the matrix
    return "exact" if small <= LQ_EXACT_SVD_MAX_DIM or 4 * (rank + LQ_SVD_OVERSAMPLE) > small else "randomized"


class SubspaceSVD:
    """Truncated SVD ``R ≈ U·diag(S)·Vh`` of rank ``rank + oversample`` by randomized subspace iteration (Halko,
    Martinsson & Tropp, "Finding structure with randomness", SIAM Review 2011, Algorithms 4.4 and 5.1), for LQ's
    ``L ← SVD_r(W − Q)``.

    Each call starts from the previous call's right singular subspace: LQ's successive residuals ``W − Q`` differ
    little, so one power iteration then suffices (two from the random start). Costs ``O(out·in·(rank + oversample))``
    per call instead of the full SVD's ``O(out·in·min(out, in))``. The random start comes from a CPU generator with a
    fixed seed, so a re-derivation at load computes what creation computed, and the global RNG is left alone.

    Shapes: ``R`` ``(m, n)`` -> ``U`` ``(m, k)``, ``S`` ``(k,)``, ``Vh`` ``(k, n)`` with ``k = min(rank + oversample,
    m, n)``, singular values in descending order.
    """

    def __init__(self, rank: int, oversample: int = LQ_SVD_OVERSAMPLE, cold_iters: int = 2, warm_iters: int = 1):
        self.rank, self.oversample, self.cold_iters, self.warm_iters = rank, oversample, cold_iters, warm_iters
        self._start: Optional[torch.Tensor] = None

    def __call__(self, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m, n = R.shape
        k = min(self.rank + self.oversample, m, n)
        if self._start is None or self._start.shape != (n, k):
            V = torch.randn(n, k, generator=torch.Generator().manual_seed(0)).to(R)
            iters = self.cold_iters
        else:
            V, iters = self._start, self.warm_iters
        for _ in range(iters):
            Y = torch.linalg.qr(R @ V).Q
            V = torch.linalg.qr(R.T @ Y).Q
        Y = torch.linalg.qr(R @ V).Q
        U_small, S, Vh = torch.linalg.svd(Y.T @ R, full_matrices=False)
        self._start = Vh.T.contiguous()
        return Y @ U_small, S, Vh


def _weighted_svd_r(R: torch.Tensor, rank: int, d_row: Optional[torch.Tensor], d_col: Optional[torch.Tensor],
                    svd: Optional[SubspaceSVD] = None):
    """Best rank-``rank`` ``(B, A)`` of ``R`` in the (optionally diagonally weighted) Frobenius norm (``svd``: a
    randomized solver; default LAPACK's exact SVD)."""
    if d_row is not None:
        R = d_row[:, None] * R * d_col[None, :]
    U, S, Vh = torch.linalg.svd(R, full_matrices=False) if svd is None else svd(R)
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
    quantizer: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    svd: str = "auto",
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
        quantizer: ``dequantize(quantize(M))`` of another configuration (``delta.bitbudget.QuantChoice``); default:
            bitsandbytes ``quant_type`` in blocks of 64.
        svd: ``"exact"`` (LAPACK), ``"randomized"`` (:class:`SubspaceSVD`) or ``"auto"`` (exact up to
            ``LQ_EXACT_SVD_MAX_DIM`` on the smaller side, :func:`resolve_lq_svd`), computed in float64;
            ``"exact-fp32"``: the fp32 computation of adapters saved before this argument existed.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"lq_decompose: rank={rank!r} must be a positive int.")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"lq_decompose: max_iter={max_iter!r} must be a positive int (1 is LoftQ's single pass).")
    W = W.detach().to(torch.float32)  # what the quantizer sees
    if rank > min(W.shape):
        raise ValueError(f"lq_decompose: rank={rank} exceeds min(out, in)={min(W.shape)}.")
    mode = resolve_lq_svd(svd, tuple(W.shape), rank)
    work = torch.float32 if mode == "exact-fp32" else torch.float64  # LQ_SVD_MODES says why float64
    Wd = W.to(work)
    d_row = d_col = None
    if fisher is not None:
        d_row, d_col = (t.detach().to(W.device, work).clamp_min(1e-8).sqrt() for t in fisher)
        if d_row.shape != (W.shape[0],) or d_col.shape != (W.shape[1],):
            raise ValueError(f"lq_decompose: Fisher weights have shapes {d_row.shape}, {d_col.shape} for W {tuple(W.shape)}.")
    norm = Wd.norm().clamp_min(1e-30)
    solver = SubspaceSVD(rank) if mode == "randomized" else None

    def weighted_error(Q, L):
        R = Wd - Q.to(work) - L
        if d_row is not None:
            R = d_row[:, None] * R * d_col[None, :]
        return float(R.norm() / (norm if d_row is None else (d_row[:, None] * Wd * d_col[None, :]).norm()))

    if quantizer is None:
        def quantizer(M):
            return quantize_dequantize(M, quant_type, compress_statistics)
    source = W
    Q = quantizer(source)
    quant_only = float((Wd - Q.to(work)).norm() / norm)
    best = None
    errors: list[float] = []
    rising = 0
    for it in range(max_iter):
        B, A = _weighted_svd_r(Wd - Q.to(work), rank, d_row, d_col, solver)
        L = B @ A
        err = weighted_error(Q, L)
        errors.append(err)
        if best is None or err < errors[best.best]:
            stop = best is not None and errors[best.best] - err < tol * errors[best.best]
            best = LQResult(Q, B.to(torch.float32), A.to(torch.float32), source, best=it)
            if stop:
                break
            rising = 0
        else:
            rising += 1
            if rising >= 3:
                break
        source = (Wd - L).to(torch.float32)
        Q = quantizer(source)
    best.errors = errors
    best.quant_only_error = quant_only
    return best


def lq_quantize(linear: nn.Linear, rank: int, quant_type: str = "nf4", max_iter: int = 20,
                fisher: Optional[tuple[torch.Tensor, torch.Tensor]] = None, choice=None,
                svd: str = "auto") -> tuple[nn.Module, LQResult]:
    """LQ-LoRA's split of one full-precision linear layer: the quantized layer holding ``Q`` (``choice``, a
    ``delta.bitbudget.QuantChoice``, or else a bitsandbytes ``quant_type`` ``Linear4bit``), with ``linear``'s bias,
    and the decomposition whose ``B·A`` is the ``L`` an adapter starts from."""
    result = lq_decompose(linear.weight, rank, quant_type=quant_type, max_iter=max_iter, fisher=fisher,
                          quantizer=None if choice is None else choice.quantize_dequantize, svd=svd)
    if choice is not None:  # a mixed-configuration plan (delta.bitbudget): this layer's own configuration
        return choice.quantize(result.source, linear.bias).to(linear.weight.device), result
    dtype = linear.weight.dtype if linear.weight.dtype.is_floating_point else torch.float32
    return to_linear4bit(linear, result.source, quant_type, compute_dtype=dtype), result


def record_lq_offset(layer: nn.Module, result: LQResult) -> None:
    """Keep on an LQ layer the ``L = B·A`` by which its quantized base ``Q`` falls short of the original ``W``
    (``W ≈ Q + L``; CPU, not in the state dict).

    Every adapter on that layer is trained on ``Q``, not on ``W`` (the LQ adapter itself starts at ``L``). A plain
    LoRA for the *original* weights (what LoRA servers load) is therefore ``ΔW − L``: on ``W`` it gives
    ``W − L + ΔW ≈ Q + ΔW``, the trained model up to the quantization residual ``W − Q − L``
    (:func:`sparse_lowrank_peft.export_to_lora` subtracts it). Without it the export would add ``L`` a second time
    to the LQ adapter, and leave it out for any other. Set at initialisation and again when a saved adapter is
    loaded (the decomposition is deterministic), so it is never saved.
    """
    layer.__dict__["lq_offset_factors"] = (result.B.detach().to("cpu", torch.float32),
                                           result.A.detach().to("cpu", torch.float32))


def lq_offset(layer: nn.Module) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """``(B₀, A₀)`` with ``B₀·A₀ = L`` that :func:`record_lq_offset` kept on this layer, or None."""
    return layer.__dict__.get("lq_offset_factors")


def to_linear8bit(linear: nn.Linear, threshold: float = 6.0) -> nn.Module:
    """A ``bnb.nn.Linear8bitLt`` (LLM.int8: int8 weights with one absmax per row, frozen) holding ``linear``'s weight
    and bias, as ``BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=threshold)`` makes it at load time.

    Its forward is bitsandbytes' own: the input is quantized per row too, and input columns with a value above
    ``threshold`` are computed in 16-bit (``threshold=0``: none are)."""
    bnb = _bnb()
    device = linear.weight.device
    q = bnb.nn.Linear8bitLt(
        linear.in_features, linear.out_features, bias=linear.bias is not None, has_fp16_weights=False,
        threshold=threshold,
    )
    q.weight = bnb.nn.Int8Params(
        linear.weight.detach().to("cpu", torch.float32).contiguous(), requires_grad=False, has_fp16_weights=False,
    )
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.detach().to("cpu").clone(), requires_grad=False)
    return q.to(device)  # moving to a device quantizes


#: what quantize_linears makes: the 4-bit types of ``Linear4bit`` and LLM.int8's ``Linear8bitLt``
BASE_QUANT_TYPES = QUANT_TYPES + ("int8",)


def quantize_linears(
    model: nn.Module, names: Optional[Iterable[str]] = None, quant_type: str = "nf4",
    compute_dtype: torch.dtype = torch.float32,
) -> list[str]:
    """Quantize a loaded model's ``nn.Linear`` layers in place (``names``: module names or dotted suffixes; default:
    every linear layer); returns the names replaced. The QLoRA setup for a model that was loaded in full precision:
    ``quant_type="nf4"`` / ``"fp4"`` do what ``BitsAndBytesConfig(load_in_4bit=True)`` does at load time, ``"int8"``
    what ``load_in_8bit=True`` does (``compute_dtype`` is for 4-bit only)."""
    if quant_type not in BASE_QUANT_TYPES:
        raise ValueError(f"quant_type={quant_type!r} is not one of {BASE_QUANT_TYPES}. Fix: quant_type='nf4'.")
    wanted = list(names) if names is not None else None
    replaced = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear:
            continue
        if wanted is not None and not any(names_module(w, name) for w in wanted):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if quant_type == "int8":
            quantized = to_linear8bit(module)
        else:
            quantized = to_linear4bit(module, quant_type=quant_type, compute_dtype=compute_dtype)
        setattr(parent, child, quantized.train(module.training))  # an eval-mode model stays in eval mode
        replaced.append(name)
    if wanted is not None and not replaced:
        raise ValueError(f"quantize_linears: no nn.Linear matches {wanted}. Fix: pass module names such as ['query'].")
    if replaced:
        mark_loaded_in_kbit(model, bits=8 if quant_type == "int8" else 4)
    return replaced


def mark_loaded_in_kbit(model: nn.Module, bits: int = 4) -> None:
    """Mark ``model`` as ``BitsAndBytesConfig(load_in_4bit=True)`` (or ``load_in_8bit``) does: PEFT's own LoRA wraps
    a bitsandbytes linear in its bitsandbytes layer only for such a model (else in its plain ``Linear``, whose merge
    fails on the packed weight: ``The size of tensor a (32) must match the size of tensor b (64)`` for 4-bit,
    ``result type Float can't be cast to the desired output type Char`` for 8-bit)."""
    setattr(model, f"is_loaded_in_{bits}bit", True)


def _is_bnb_linear(module: nn.Module) -> bool:
    """A bitsandbytes 4-bit or 8-bit linear layer (its weight is not a float tensor an optimizer can train)."""
    return type(module).__module__.startswith("bitsandbytes") and hasattr(module, "weight") and (
        _is_linear4bit(module) or hasattr(module, "state")
    )


def restore_full_precision(model: nn.Module, module_names: Optional[Iterable[str]]) -> list[str]:
    """Replace every bitsandbytes 4-/8-bit linear inside the modules ``module_names`` (PEFT's ``modules_to_save``
    matching: exact name or dotted suffix) by an ``nn.Linear`` holding its dequantized weight; returns the names
    replaced and warns once when there are any.

    transformers (5.25 and later) quantizes a classification head under ``BitsAndBytesConfig(load_in_4bit=True)``;
    PEFT then fails to make it trainable (``only Tensors of floating point dtype can require gradients``). The
    restored head starts from the 4-bit rounding of its initial weights, which training overwrites. To keep its exact
    weights, load with ``BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=[<their full module names>])``
    (transformers matches those from the start of a name or as a suffix: ``"pooler"`` misses ``bert.pooler.dense``).
    """
    wanted = [n for n in (module_names or []) if isinstance(n, str)]
    if not wanted:
        return []
    replaced: list[str] = []
    heads: list[str] = []
    for name, module in list(model.named_modules()):
        matches = [w for w in wanted if names_module(w, name)]
        if not name or not matches:
            continue
        for child_name, child in list(module.named_modules()):
            if not _is_bnb_linear(child):
                continue
            full = f"{name}.{child_name}" if child_name else name
            if full in replaced:
                continue
            parent_name, _, attr = full.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, _dequantized_linear(child))
            replaced.append(full)
            heads += [w for w in matches if w not in heads]
    if replaced:
        warnings.warn(
            f"modules_to_save {heads} held quantized linear layers ({', '.join(replaced)}), which cannot be trained: "
            "they were replaced by full-precision nn.Linear layers holding their dequantized weights. This happens "
            "when transformers quantizes the classification head at load time. To keep the head's weights exact, load "
            f"with BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules={replaced!r}).",
            stacklevel=3,
        )
    return replaced


def _dequantized_linear(layer: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` with ``layer``'s dequantized weight and its bias, in the bias' dtype (else compute dtype)."""
    weight = dequantize_weight(layer)
    bias = getattr(layer, "bias", None)
    dtype = bias.dtype if bias is not None and bias.is_floating_point() else (getattr(layer, "compute_dtype", None) or torch.float32)
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(weight.to(dtype))
        if bias is not None:
            linear.bias.copy_(bias.to(dtype))
    return linear


# ------------------------------------------------------------------------------------- small vectors in 4 or 8 bits
#: Block size of the vector quantization below: one fp32 absmax per 64 values (bitsandbytes' 4-bit default).
VECTOR_BLOCKSIZE = 64
VECTOR_BITS = (4, 8)


def quantize_vector(values: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, absmax)`` of a 1-D float tensor in ``bits`` (4: NF4, two codes a byte; 8: bitsandbytes' dynamic
    8-bit map, one a byte), blockwise with one fp32 absmax per :data:`VECTOR_BLOCKSIZE` values, through bitsandbytes.
    Used for adapter tensors stored quantized (NOLA's coefficients)."""
    if bits not in VECTOR_BITS:
        raise ValueError(f"quantize_vector: bits={bits!r} is not one of {VECTOR_BITS}.")
    F = _bnb().functional
    flat = values.detach().reshape(-1).to("cpu", torch.float32).contiguous()
    if bits == 4:
        codes, state = F.quantize_4bit(flat, blocksize=VECTOR_BLOCKSIZE, quant_type="nf4", compress_statistics=False)
    else:
        codes, state = F.quantize_blockwise(flat, blocksize=VECTOR_BLOCKSIZE)
    return codes.reshape(-1).view(torch.uint8).contiguous(), state.absmax.to(torch.float32).contiguous()


def dequantize_vector(codes: torch.Tensor, absmax: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """The fp32 vector of ``numel`` values that :func:`quantize_vector` stored as ``(codes, absmax)``."""
    if bits not in VECTOR_BITS:
        raise ValueError(f"dequantize_vector: bits={bits!r} is not one of {VECTOR_BITS}.")
    codes, absmax = codes.to("cpu").reshape(-1), absmax.to("cpu", torch.float32).reshape(-1)
    if bits == 4:
        return dequantize_4bit_reference(codes, absmax, "nf4", VECTOR_BLOCKSIZE, (numel,))
    F = _bnb().functional
    return F.dequantize_blockwise(codes.view(torch.uint8), absmax=absmax, blocksize=VECTOR_BLOCKSIZE).reshape(-1)[:numel]
