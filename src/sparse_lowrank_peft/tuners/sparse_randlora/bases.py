"""RandLoRA's frozen random bases, dense or sparse: drawn on CPU from a seed, cached per shape, shared by layers.

For a layer with ``min = min(out, in)``, ``max = max(out, in)`` and rank ``r`` there are ``N = ⌈min / r⌉`` bases. As in
PEFT's ``randlora`` the bases are stored as

* ``A``: ``(r, min)``, shared by all ``N`` bases (the trainable scalings make them differ), and
* ``B``: ``(max, N·r)``, the ``N`` matrices ``B_b`` (``max × r``) side by side (column ``b·r + k`` is column ``k`` of
  ``B_b``; PEFT's ``randlora_B[:max, :N, :].flatten(1)``).

With the trainable ``λ`` (``r × N``) and ``γ`` (``N × min``) the scaled matrix ``T`` (``N·r × min``) has row
``m = k·N + b`` equal to ``λ[k, b] · A[k, :] ⊙ γ[b, :]`` (PEFT's ``UniqueBaseGrad`` output flattened), and
``ΔW = scale · B·T`` when ``min == in`` (``x → x·Tᵀ·Bᵀ``), ``scale · Tᵀ·Bᵀ`` otherwise (``x → x·B·T``).

Dense bases (``density == 1``): entries uniform in ``[-1, 1]``, divided by their empirical standard deviation (PEFT
divides its Kaiming-uniform bases by theirs: the same distribution). Sparse bases (``density < 1``): a uniform random
support with ``round(density·size)`` entries (:meth:`SparseSupport.random`) and values ``±1/√density`` with random
signs (unit second moment, like the dense ones; PEFT's ternary ``sparse`` bases are this at density 2/3 with the
empirical std). Everything is drawn with CPU generators seeded from ``(basis_seed, r, min, max, density)``.

For the sparse forward each layer needs the two matrices as supports in its own orientation, plus, for ``T``, the
gather indices that build its values from ``λ`` and ``γ``: :meth:`RandBasis.operands` derives them once per
(orientation, device, dtype) and keeps them with the basis.
"""

from __future__ import annotations

import math
import threading
import weakref
import zlib
from dataclasses import dataclass

import torch

from ...delta.support import SparseSupport, layer_seed

__all__ = ["RandBasis", "SparseOperands", "get_basis", "num_bases", "cache_info"]

_LOCK = threading.Lock()
_CACHE: "weakref.WeakValueDictionary[tuple, RandBasis]" = weakref.WeakValueDictionary()
_STATS = {"generated": 0}


def num_bases(min_dim: int, r: int) -> int:
    """``N = ⌈min / r⌉``: enough rank-``r`` bases for a full-rank update (PEFT RandLoRA's count)."""
    return -(-int(min_dim) // int(r))


def _crc(*tensors: torch.Tensor) -> int:
    value = 0
    for t in tensors:
        value = zlib.crc32(t.detach().to("cpu").contiguous().numpy(), value)
    return value


@dataclass
class SparseOperands:
    """The two sparse matrices of one layer orientation on one device, ready for ``sparse_delta``.

    ``first`` (``N·r × in``) is applied to ``x``, ``second`` (``out × N·r``) to the result. One of them is ``T`` (its
    values are built each step from ``λ`` and ``γ``: ``λ.flatten()[lam_idx] · γ.flatten()[gam_idx] · a_values``), the
    other holds the frozen ``B`` values. ``trainable_first`` says which.
    """

    first: SparseSupport
    second: SparseSupport
    trainable_first: bool
    frozen_values: torch.Tensor
    lam_idx: torch.Tensor
    gam_idx: torch.Tensor
    a_values: torch.Tensor


class RandBasis:
    """The frozen bases of one ``(seed, r, min, max, density)``: dense tensors or sparse (indices, values), on CPU.

    Attributes:
        dense: ``True`` for density 1.
        A, B: dense ``(r, min)`` and ``(max, N·r)`` float32 tensors (dense only).
        A_support, A_values, B_support, B_values: the sparse bases (sparse only): supports of ``(r, min)`` and
            ``(max, N·r)`` and their ``±1/√density`` values in row-major order.
        checksum: crc32 of all of it (recorded in checkpoints).
    """

    def __init__(self, seed: int, r: int, min_dim: int, max_dim: int, density: float):
        self.seed, self.r, self.min_dim, self.max_dim, self.density = int(seed), int(r), int(min_dim), int(max_dim), density
        self.N = num_bases(min_dim, r)
        self.dense = density >= 1.0
        tag = f"randlora:{self.r}x{self.min_dim}x{self.max_dim}:{density!r}"
        self._copies: dict[tuple, tuple] = {}
        self._operands: dict[tuple, SparseOperands] = {}
        if self.dense:
            gen = torch.Generator(device="cpu").manual_seed(layer_seed(seed, tag))
            A = torch.rand((self.r, self.min_dim), generator=gen).mul_(2).sub_(1)
            B = torch.rand((self.max_dim, self.N * self.r), generator=gen).mul_(2).sub_(1)
            self.A, self.B = A / A.std(), B / B.std()
            self.checksum = _crc(self.A, self.B)
        else:
            scale = 1.0 / math.sqrt(density)
            self.A_support = SparseSupport.random((self.r, self.min_dim), density, layer_seed(seed, tag + ":A"))
            self.B_support = SparseSupport.random((self.max_dim, self.N * self.r), density, layer_seed(seed, tag + ":B"))
            gen = torch.Generator(device="cpu").manual_seed(layer_seed(seed, tag + ":signs"))
            self.A_values = _signs(self.A_support.nnz, gen) * scale
            self.B_values = _signs(self.B_support.nnz, gen) * scale
            self.checksum = _crc(self.A_support.indices, self.A_values, self.B_support.indices, self.B_values)

    # ------------------------------------------------------------------ dense
    def dense_bases(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` as dense tensors on ``device`` in ``dtype`` (the sparse ones densified: merge and tests only)."""
        key = ("dense", device.type, device.index, dtype)
        cached = self._copies.get(key)
        if cached is None:
            if self.dense:
                A, B = self.A, self.B
            else:
                A, B = self.A_support.to_dense(self.A_values), self.B_support.to_dense(self.B_values)
            cached = (A.to(device=device, dtype=dtype), B.to(device=device, dtype=dtype))
            if self.dense:  # densified sparse bases are for merge only: not kept
                self._copies[key] = cached
        return cached

    # ------------------------------------------------------------------ sparse
    def operands(self, transposed: bool, device: torch.device, dtype: torch.dtype) -> SparseOperands:
        """The layer-orientation supports and gather indices (``transposed``: ``min == out < in``), built once per
        (orientation, device, dtype) and kept."""
        if self.dense:
            raise RuntimeError("dense bases have no sparse operands")
        key = (transposed, device.type, device.index, dtype)
        with _LOCK:
            cached = self._operands.get(key)
            if cached is None:
                cached = self._build_operands(transposed, device, dtype)
                self._operands[key] = cached
        return cached

    def _build_operands(self, transposed: bool, device: torch.device, dtype: torch.dtype) -> SparseOperands:
        N, r, min_dim, max_dim = self.N, self.r, self.min_dim, self.max_dim
        rank = N * r
        # T (rank × min): A's row k repeated for every basis b as row m = k·N + b, values λ[k,b]·A[k,j]·γ[b,j]
        k = self.A_support.rows("cpu")
        j = self.A_support.cols("cpu")
        b = torch.arange(N, dtype=torch.int64)
        m = (k[None, :] * N + b[:, None]).reshape(-1)  # (N·nnz_A,), also the flat index into λ (r × N)
        jj = j[None, :].expand(N, -1).reshape(-1)
        gam = (b[:, None] * min_dim + j[None, :]).reshape(-1)  # flat index into γ (N × min)
        a = self.A_values[None, :].expand(N, -1).reshape(-1)
        # frozen B (max × rank)
        br, bc = self.B_support.rows("cpu"), self.B_support.cols("cpu")
        if not transposed:  # x (…, in=min) → T → B: first = T (rank × min), second = B (max × rank)
            order = torch.argsort(m * min_dim + jj)
            t_idx = torch.stack([m[order], jj[order]])
            first = SparseSupport(t_idx.to(device, torch.int32), (rank, min_dim), validate=False)
            second = SparseSupport(self.B_support.indices.to(device), (max_dim, rank), validate=False)
            frozen = self.B_values
        else:  # x (…, in=max) → Bᵀ → Tᵀ: first = Bᵀ (rank × max), second = Tᵀ (min × rank)
            order = torch.argsort(jj * rank + m)
            t_idx = torch.stack([jj[order], m[order]])
            b_order = torch.argsort(bc * max_dim + br)
            first = SparseSupport(torch.stack([bc[b_order], br[b_order]]).to(device, torch.int32), (rank, max_dim),
                                  validate=False)
            second = SparseSupport(t_idx.to(device, torch.int32), (min_dim, rank), validate=False)
            frozen = self.B_values[b_order]
        return SparseOperands(
            first=first,
            second=second,
            trainable_first=not transposed,
            frozen_values=frozen.to(device=device, dtype=dtype),
            lam_idx=m[order].to(device),
            gam_idx=gam[order].to(device),
            a_values=a[order].to(device=device, dtype=dtype),
        )

    @property
    def nnz(self) -> dict[str, int]:
        """Stored nonzeros of ``A`` and ``B`` (dense: every entry)."""
        if self.dense:
            return {"A": self.A.numel(), "B": self.B.numel()}
        return {"A": self.A_support.nnz, "B": self.B_support.nnz}


def _signs(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, (n,), generator=gen).to(torch.float32).mul_(2).sub_(1)


def get_basis(seed: int, r: int, min_dim: int, max_dim: int, density: float) -> RandBasis:
    """The cached :class:`RandBasis` (the same object for every layer of that shape while one holds it)."""
    key = (int(seed), int(r), int(min_dim), int(max_dim), float(density))
    with _LOCK:
        basis = _CACHE.get(key)
        if basis is None:
            basis = RandBasis(*key)
            _STATS["generated"] += 1
            _CACHE[key] = basis
        return basis


def cache_info() -> dict:
    """How many bases were generated and how many are alive (for tests of the sharing)."""
    return {"generated": _STATS["generated"], "alive": len(_CACHE)}
