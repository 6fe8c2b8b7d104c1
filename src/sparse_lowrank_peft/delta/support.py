"""SparseSupport: the fixed sparsity pattern of a sparse delta S (out_features x in_features).

The support is a set of ``nnz`` distinct (row, col) positions, stored as one ``(2, nnz)`` int32 tensor sorted
row-major (by row, then by column). That one tensor is what an adapter checkpoint holds; every other layout the ops
need (CSR row pointers, the column-major permutation for the transposed product) is derived from it once per device
and cached on the object, never per step.

Drawing is seeded through a CPU ``torch.Generator`` so CPU and CUDA get the same support, and uses O(nnz) memory:
a 4096 x 4096 layer at density 0.01 never materialises a 16M-entry permutation.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch

__all__ = ["SparseSupport", "KernelLayouts", "support_nnz", "layer_seed"]


def support_nnz(shape: tuple[int, int], density: float) -> int:
    """Number of nonzeros for a ``shape`` matrix at ``density``: ``round(density * out * in)``, at least 1."""
    out_features, in_features = shape
    return max(1, int(round(density * out_features * in_features)))


def layer_seed(seed: int, key: str) -> int:
    """A per-layer seed from the config's seed and the module's name (stable across processes and Python runs).

    Python's ``hash`` is salted per process, so ``crc32`` of the name is used instead.
    """
    return (int(seed) * 1_000_003 + zlib.crc32(key.encode("utf-8"))) % (2**63 - 1)


@dataclass
class _CSR:
    crow: torch.Tensor  # (rows + 1,) int64
    col: torch.Tensor  # (nnz,) int64
    perm: torch.Tensor | None  # position in the row-major order of each entry of this layout (None: identity)


@dataclass
class KernelLayouts:
    """The int32 index arrays the Triton kernels read (one device), derived from the support once and cached.

    * ``row``, ``col``: ``(nnz,)`` row and column of each entry in row-major order (the sddmm's entry list);
    * ``crow``: ``(out + 1,)`` CSR row pointers of S (spmm walks ``col[crow[i]:crow[i+1]]``);
    * ``ccol``, ``t_row``, ``t_perm``: CSR of Sᵀ (= CSC of S): ``(in + 1,)`` column pointers, the row of each entry
      in column-major order, and its position in row-major order (spmm_t reads ``values[t_perm[j]]``).
    """

    row: torch.Tensor
    col: torch.Tensor
    crow: torch.Tensor
    ccol: torch.Tensor
    t_row: torch.Tensor
    t_perm: torch.Tensor


class OneEntryCache:
    """One cached entry that is not copied or pickled with its owner (``entry``: whatever the owner keeps)."""

    __slots__ = ("entry",)

    def __init__(self):
        self.entry = None

    def __deepcopy__(self, memo) -> "OneEntryCache":
        return OneEntryCache()

    def __reduce__(self):
        return (OneEntryCache, ())


class SparseSupport:
    """A fixed, validated sparsity pattern of an ``(out_features, in_features)`` matrix.

    Args:
        indices (`torch.Tensor`): ``(2, nnz)`` integer tensor, row 0 the output (row) indices, row 1 the input
            (column) indices, sorted row-major and without duplicates.
        shape (`tuple[int, int]`): ``(out_features, in_features)``.
        validate (`bool`, defaults to `True`): check range, order and duplicates (raises ``ValueError``).
    """

    def __init__(self, indices: torch.Tensor, shape: tuple[int, int], validate: bool = True, name: str = "support"):
        if validate:
            self.check(indices, shape, name=name)
        self.indices = indices
        self.shape = (int(shape[0]), int(shape[1]))
        self._row_csr: dict[tuple, _CSR] = {}  # S's CSR, for the forward (and the sampled values gradient)
        self._csr_t: dict[tuple, _CSR] = {}  # Sᵀ's CSR, for the input gradient
        self._kernel_layouts: dict[tuple, KernelLayouts] = {}
        self._flat: dict[tuple, torch.Tensor] = {}
        self._csr32: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._csr_cache = OneEntryCache()  # delta.reference's CSR tensor of S for the values it last multiplied

    # ------------------------------------------------------------------ construction
    @classmethod
    def random(
        cls, shape: tuple[int, int], density: float, seed: int, device: torch.device | str | None = None
    ) -> "SparseSupport":
        """Draw ``support_nnz(shape, density)`` distinct positions uniformly at random from ``seed``.

        Sampling draws candidate flat positions with replacement from a CPU generator until enough distinct ones
        exist, then keeps a uniformly random subset of exactly ``nnz`` of them. A set of distinct i.i.d. uniform
        draws is a uniform random subset of its size, and a uniform subset of it is again uniform, so the result
        is an unbiased uniform sample without replacement, in O(nnz) memory. Above density 0.5 the complement is
        drawn instead, which keeps the expected number of rounds small.
        """
        out_features, in_features = int(shape[0]), int(shape[1])
        if out_features <= 0 or in_features <= 0:
            raise ValueError(f"SparseSupport.random: shape must be positive, got {shape}.")
        if not (0.0 < density <= 1.0):
            raise ValueError(f"SparseSupport.random: density must be in (0, 1], got {density}.")
        total = out_features * in_features
        nnz = support_nnz((out_features, in_features), density)
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        complement = nnz > total // 2
        k = total - nnz if complement else nnz
        flat = _sample_distinct(total, k, gen)
        if complement:
            keep = torch.ones(total, dtype=torch.bool)  # only reached at density > 0.5, where nnz ~ total anyway
            keep[flat] = False
            flat = keep.nonzero().squeeze(1)
        flat = flat.sort().values
        indices = torch.stack([flat // in_features, flat % in_features]).to(torch.int32)
        return cls(indices.to(device) if device is not None else indices, (out_features, in_features), validate=False)

    # ------------------------------------------------------------------ validation
    @staticmethod
    def check(indices: torch.Tensor, shape: tuple[int, int], expected_nnz: int | None = None, name: str = "support"):
        """Raise ``ValueError`` unless ``indices`` is a valid support of ``shape`` (and has ``expected_nnz`` entries)."""
        out_features, in_features = int(shape[0]), int(shape[1])
        if not isinstance(indices, torch.Tensor) or indices.dim() != 2 or indices.shape[0] != 2:
            got = tuple(indices.shape) if isinstance(indices, torch.Tensor) else type(indices).__name__
            raise ValueError(
                f"{name}: expected a (2, nnz) index tensor of (row, col) pairs, got shape {got}. "
                "The checkpoint was not written by this version of sparse_lowrank_peft or is corrupted."
            )
        if indices.dtype.is_floating_point or indices.dtype == torch.bool:
            raise ValueError(f"{name}: support indices must be integers, got dtype {indices.dtype}.")
        nnz = indices.shape[1]
        if expected_nnz is not None and nnz != expected_nnz:
            raise ValueError(
                f"{name}: the support has {nnz} entries but the config implies {expected_nnz} for a layer of shape "
                f"{out_features}x{in_features}. The checkpoint's adapter_config.json and weights disagree (edited "
                "sparsity, or a checkpoint from another model): load it with the config it was saved with."
            )
        if nnz == 0:
            return
        idx = indices.detach().to("cpu", torch.int64)
        rows, cols = idx[0], idx[1]
        if int(rows.min()) < 0 or int(rows.max()) >= out_features or int(cols.min()) < 0 or int(cols.max()) >= in_features:
            raise ValueError(
                f"{name}: support indices out of range for a layer of shape {out_features}x{in_features} "
                f"(rows span [{int(rows.min())}, {int(rows.max())}], cols span [{int(cols.min())}, {int(cols.max())}]). "
                "The adapter was saved for a base model with other layer shapes: load it on the base it was trained on."
            )
        flat = rows * in_features + cols
        if nnz > 1:
            steps = flat[1:] - flat[:-1]
            unsorted = bool((steps < 0).any())
            ordered = flat.sort().values if unsorted else flat
            if bool((ordered[1:] == ordered[:-1]).any()):
                raise ValueError(
                    f"{name}: the support has duplicated (row, col) positions; a valid support lists each position "
                    "once. The checkpoint is corrupted: re-save it from the trained model."
                )
            if unsorted:
                raise ValueError(
                    f"{name}: the support is not sorted row-major. A valid checkpoint always is; the file was "
                    "modified outside sparse_lowrank_peft. Re-save it from the trained model."
                )

    # ------------------------------------------------------------------ properties
    @property
    def nnz(self) -> int:
        return int(self.indices.shape[1])

    @property
    def device(self) -> torch.device:
        return self.indices.device

    @property
    def density(self) -> float:
        return self.nnz / (self.shape[0] * self.shape[1])

    def rows(self, device=None) -> torch.Tensor:
        return self.indices[0].to(device or self.device, torch.int64)

    def cols(self, device=None) -> torch.Tensor:
        return self.indices[1].to(device or self.device, torch.int64)

    def flat(self, device: torch.device | None = None, transposed: bool = False) -> torch.Tensor:
        """Positions of the entries in a row-major ``(out, in)`` matrix (``row · in + col``), or with ``transposed`` in
        a row-major ``(in, out)`` one (``col · out + row``: Conv1D's weight), for ``index_add_`` / ``index_select``;
        cached per device. int32 where every position fits (``out · in < 2**31``): half the bytes of int64, which
        the fused path and SLTrain pretraining keep per entry, and no slower: 0.96-0.99x int64's time for
        ``index_add_``, 0.92-1.02x for ``index_select`` at 10k-500k entries (CPU, 1 thread;
        ``bench/results/dispatch-cpu.json`` "flat": ``python bench/dispatch.py --parts flat --clock cpu``); int64
        above."""
        device = torch.device(device) if device is not None else self.device
        key = (device.type, device.index, transposed)
        cached = self._flat.get(key)
        if cached is None:
            rows, cols = self.rows(device), self.cols(device)
            cached = cols * self.shape[0] + rows if transposed else rows * self.shape[1] + cols
            if self.shape[0] * self.shape[1] < 2**31:
                cached = cached.to(torch.int32)
            self._flat[key] = cached
        return cached

    def layouts(self, device: torch.device | None = None) -> tuple[_CSR, _CSR]:
        """Row-major CSR of S (:meth:`row_csr`) and CSR of Sᵀ (= column-major order of S), each built once per device
        and cached.

        ``csr_t.perm[j]`` is the row-major position of the j-th entry in column-major order, so
        ``values[csr_t.perm]`` are the values of Sᵀ in its CSR order.
        """
        device = torch.device(device) if device is not None else self.device
        key = (device.type, device.index)
        csr = self.row_csr(device)
        csr_t = self._csr_t.get(key)
        if csr_t is None:
            csr_t = self._csr_t[key] = self._build_csr_t(device, csr)
        return csr, csr_t

    def row_csr(self, device: torch.device | None = None) -> _CSR:
        """The row-major CSR of S alone (int64), what a forward and the sampled values gradient read, cached per
        device. :meth:`layouts` adds the CSR of Sᵀ (16 more bytes per entry, and a sort), which only the input
        gradient reads, so inference never builds it."""
        device = torch.device(device) if device is not None else self.device
        key = (device.type, device.index)
        csr = self._row_csr.get(key)
        if csr is None:
            csr = self._row_csr[key] = self._build_row_csr(device)
        return csr

    def _build_row_csr(self, device: torch.device) -> _CSR:
        """S's CSR (not cached)."""
        return _CSR(self._row_pointers(device), self.indices[1].to(device, torch.int64), None)

    def _row_pointers(self, device: torch.device) -> torch.Tensor:
        """``(out + 1,)`` int64 CSR row pointers of S on ``device``."""
        crow = torch.zeros(self.shape[0] + 1, dtype=torch.int64, device=device)
        crow[1:] = torch.bincount(self.indices[0].to(device, torch.int64), minlength=self.shape[0]).cumsum(0)
        return crow

    def _build_csr_t(self, device: torch.device, csr: _CSR) -> _CSR:
        """The CSR of Sᵀ (not cached), from S's."""
        out_features, in_features = self.shape
        rows, cols = self.indices[0].to(device, torch.int64), csr.col
        perm = torch.sort(cols * out_features + rows).indices
        ccol = torch.zeros(in_features + 1, dtype=torch.int64, device=device)
        ccol[1:] = torch.bincount(cols, minlength=in_features).cumsum(0)
        return _CSR(ccol, rows[perm].contiguous(), perm)

    def csr32(self, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(crow, col)`` of S's row-major CSR as int32 (``(out + 1,)``, ``(nnz,)``), for torch.sparse's products of
        a few tokens (``delta.reference.FEW_TOKENS``), which run faster on int32 indices than on :meth:`layouts`'
        int64 ones: MKL's bare product took 0.80-0.95x the time after a cache sweep and 0.68-0.98x warm, at 1-32
        tokens on ``bench/decode.py``'s LLaMA shapes (``bench/results/dispatch-cpu.json`` "ell", ``csr32_vs_csr64``;
        ``python bench/dispatch.py --parts ell --clock cpu``). Built from the indices alone (no CSR of Sᵀ, which
        inference does not need), once per device."""
        device = torch.device(device) if device is not None else self.device
        key = (device.type, device.index)
        cached = self._csr32.get(key)
        if cached is None:
            crow = self._row_pointers(device).to(torch.int32)
            cached = self._csr32[key] = (crow, self.indices[1].to(device, torch.int32).contiguous())
        return cached

    def kernel_layouts(self, device: torch.device | None = None) -> KernelLayouts:
        """The int32 layouts of :class:`KernelLayouts` for ``device``, built once per device and cached.

        Built from :meth:`layouts` (same order, same permutation); int32 because every index fits (``nnz``, ``in`` and
        ``out`` are below 2**31 for any layer a support can be drawn for) and halves the index traffic of the kernels.
        The int64 layouts they are derived from are not kept unless something else asked for them, so a support on
        the device of its int32 indices holds 8 bytes per entry for the kernels (``t_row``, ``t_perm``; ``row`` and
        ``col`` are views of the indices) besides the pointers, where keeping the int64 layouts too held 24 more
        (their column indices, Sᵀ's, and the permutation).
        """
        device = torch.device(device) if device is not None else self.device
        key = (device.type, device.index)
        cached = self._kernel_layouts.get(key)
        if cached is not None:
            return cached
        if self.nnz >= 2**31:
            raise ValueError(f"{self!r}: more than 2**31 - 1 nonzeros cannot be indexed with int32.")
        csr = self._row_csr.get(key) or self._build_row_csr(device)
        csr_t = self._csr_t.get(key) or self._build_csr_t(device, csr)
        i32 = torch.int32
        layouts = KernelLayouts(
            row=self.indices[0].to(device, i32).contiguous(),
            col=self.indices[1].to(device, i32).contiguous(),
            crow=csr.crow.to(i32).contiguous(),
            ccol=csr_t.crow.to(i32).contiguous(),
            t_row=csr_t.col.to(i32).contiguous(),
            t_perm=csr_t.perm.to(i32).contiguous(),
        )
        self._kernel_layouts[key] = layouts
        return layouts

    def to_dense(self, values: torch.Tensor) -> torch.Tensor:
        """The dense ``(out, in)`` matrix S. Only for merge / get_delta_weight and test oracles."""
        dense = torch.zeros(self.shape, dtype=values.dtype, device=values.device)
        dense[self.rows(values.device), self.cols(values.device)] = values
        return dense

    def __repr__(self) -> str:
        return f"SparseSupport(shape={self.shape}, nnz={self.nnz}, density={self.density:.4g}, device={self.device})"


def _sample_distinct(total: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """``k`` distinct uniform integers in ``[0, total)`` (unsorted), O(k) memory, from a CPU generator."""
    if k == 0:
        return torch.empty(0, dtype=torch.int64)
    found = torch.empty(0, dtype=torch.int64)
    while found.numel() < k:
        need = k - found.numel()
        # Oversample by the expected collision rate plus a margin, so one round almost always suffices.
        draw = int(math.ceil(need * (1.0 + 2.0 * (found.numel() + need) / total))) + 16
        cand = torch.randint(0, total, (draw,), generator=gen, dtype=torch.int64)
        found = torch.unique(torch.cat([found, cand]))
    pick = torch.randperm(found.numel(), generator=gen)[:k]
    return found[pick]
