"""SLTrainLinear: a linear layer stored as ``W = (α/r)·B·A + S`` for pretraining from scratch (no dense weight)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..delta.lowrank_sparse import lowrank_sparse_linear, lowrank_sparse_weight
from ..delta.support import SparseSupport, support_nnz

__all__ = ["SLTrainLinear"]


class SLTrainLinear(nn.Module):
    """A linear layer parametrised as SLTrain's sparse plus low-rank weight, trained from scratch.

    ``y = x · Wᵀ + b`` with ``W = (α/r) · B · A + S``: ``B`` ``(out, r)``, ``A`` ``(r, in)`` and ``S`` an
    ``(out, in)`` matrix with a fixed, uniformly random support of ``round(δ · out · in)`` positions whose values are
    trained (Han et al., "SLTrain: a sparse plus low-rank approach for parameter and memory efficient pretraining",
    NeurIPS 2024, arXiv 2406.02214, Section 3). The module holds only ``B``, ``A``, the ``nnz`` values, the
    support (buffer ``sparse_indices``, ``(2, nnz)`` int32 (row, col), sorted row-major, as adapter checkpoints
    store it) and the optional bias; ``W`` is built transiently inside one autograd op per call
    (:func:`~sparse_lowrank_peft.delta.lowrank_sparse.lowrank_sparse_linear`). With ``density=0`` it is the
    low-rank-only baseline ``W = (α/r)·B·A``.

    Initialisation (the paper's, as its released code ``splora/splora_linear.py`` in andyjm3/SLTrain does it):

    * ``A ~ kaiming_uniform(a=√5)``, i.e. ``U(−1/√in, 1/√in)``, PyTorch's default for a Linear weight of fan-in ``in``;
    * ``B = 0``, so ``B·A = 0`` at step 0 and the initial weight is ``S`` alone (LoRA's convention; ``B`` still
      gets the gradient ``(α/r)·G·Aᵀ`` at once);
    * ``values ~ U(−1/√in, 1/√in)``: each sparse entry has the scale of a dense Linear's entry, so the layer's
      initial output is that of a randomly initialised layer with a ``δ`` fraction of its entries;
    * ``s = α / r`` (the paper's scripts use ``α = 32`` at every size, with ``r`` 128-512).

    With ``density=0`` (the low-rank-only baseline) ``B`` is drawn like ``A``, ``U(−1/√r, 1/√r)`` (a Linear of
    fan-in ``r``), not zero: without S, ``B = 0`` makes every targeted weight 0, and at ``W = 0`` everywhere the
    gradients of all attention and MLP factors vanish (e.g. ``∂B_o = s·(gᵀ·attn)·Aᵀ`` with ``attn = 0`` because
    ``v = 0``), so the blocks would stay zero for good. Measured: such a model trained only its embeddings and head
    and stalled at perplexity 12.0 on tinyshakespeare (the bigram level) while full rank reached 6.1.

    Why this one (our reading; the code states it without a derivation): the sparse part alone is a full-rank
    random start (a random sparse matrix at δ = 0.03 has full rank with high probability) at a dense layer's entry
    scale, and ``B = 0`` adds no rank-``r`` component to the initial spectrum, so the model starts like a randomly
    initialised (sparse) network and the factors grow from zero. The bias (the paper's code: ``U(±1/√out)``) is
    ``U(±1/√in)`` here, as ``nn.Linear``'s; :func:`to_sltrain` keeps the replaced layer's own bias instead.

    Args:
        in_features (`int`): input features.
        out_features (`int`): output features.
        rank (`int`): ``r``, the inner dimension of ``B·A``.
        density (`float`, defaults to `0.03`): ``δ``, fraction of nonzero entries of ``S`` (0: no sparse term).
        alpha (`float`, defaults to `32.0`): ``α``; the low-rank term is scaled by ``α / r``.
        bias (`bool`, defaults to `True`): whether to learn an additive bias.
        seed (`int`, defaults to `0`): seeds the support (a CPU ``torch.Generator``, the same on every device) and
            the initial values of ``A`` and ``S`` (so a layer is reproducible without the global RNG).
        dense_kind (`str`, defaults to `"linear"`): the layer type :func:`to_dense` writes back: ``"linear"``
            (``nn.Linear``) or ``"conv1d"`` (transformers' ``Conv1D``, GPT-2, whose weight is ``(in, out)``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        density: float = 0.03,
        alpha: float = 32.0,
        bias: bool = True,
        seed: int = 0,
        dense_kind: str = "linear",
        device=None,
        dtype=None,
    ):
        super().__init__()
        _check_args(in_features, out_features, rank, density, alpha, dense_kind)
        self.in_features, self.out_features, self.rank = int(in_features), int(out_features), int(rank)
        self.density, self.alpha, self.seed, self.dense_kind = float(density), float(alpha), int(seed), dense_kind
        factory = {"device": device, "dtype": dtype}
        self.lowrank_B = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.lowrank_A = nn.Parameter(torch.empty(rank, in_features, **factory))
        if density > 0:
            support = SparseSupport.random((out_features, in_features), density, seed, device=device)
            self.register_buffer("sparse_indices", support.indices)
            self.sparse_values = nn.Parameter(torch.empty(support.nnz, **factory))
        else:
            self.register_buffer("sparse_indices", None)
            self.register_parameter("sparse_values", None)
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self._support: SparseSupport | None = None
        self.reset_parameters()

    @property
    def scale(self) -> float:
        """``α / r``."""
        return self.alpha / self.rank

    @property
    def nnz(self) -> int:
        return 0 if self.sparse_values is None else int(self.sparse_values.numel())

    @property
    def support(self) -> SparseSupport | None:
        """The :class:`SparseSupport` of ``S`` (built from the ``sparse_indices`` buffer, cached), or None."""
        if self.sparse_indices is None:
            return None
        if self._support is None or self._support.indices is not self.sparse_indices:
            self._support = SparseSupport(self.sparse_indices, (self.out_features, self.in_features), validate=False)
        return self._support

    def reset_parameters(self) -> None:
        """The paper's initialisation (see the class docstring), drawn from ``seed``."""
        gen = torch.Generator(device="cpu").manual_seed(self.seed + 1)
        bound = 1.0 / math.sqrt(self.in_features)
        with torch.no_grad():
            a = torch.empty(self.lowrank_A.shape).uniform_(-bound, bound, generator=gen)  # = kaiming_uniform(a=√5)
            self.lowrank_A.copy_(a)
            if self.sparse_values is not None:
                self.lowrank_B.zero_()
            else:  # no sparse part: B = 0 would make W = 0, a point every gradient of the block vanishes at
                rb = 1.0 / math.sqrt(self.rank)
                self.lowrank_B.copy_(torch.empty(self.lowrank_B.shape).uniform_(-rb, rb, generator=gen))
            if self.sparse_values is not None:
                self.sparse_values.copy_(torch.empty(self.nnz).uniform_(-bound, bound, generator=gen))
            if self.bias is not None:
                self.bias.copy_(torch.empty(self.out_features).uniform_(-bound, bound, generator=gen))

    def _flat(self, device: torch.device) -> torch.Tensor | None:
        support = self.support
        return None if support is None else support.flat(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(..., in_features)`` -> ``(..., out_features)`` in ``x``'s dtype."""
        return lowrank_sparse_linear(
            x, self.lowrank_B, self.lowrank_A, self.sparse_values, self._flat(x.device), self.scale, self.bias
        )

    @torch.no_grad()
    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The ``(out, in)`` matrix ``(α/r)·B·A + S`` (exactly what the forward multiplies by), a fresh tensor."""
        return lowrank_sparse_weight(
            self.lowrank_B, self.lowrank_A, self.sparse_values, self._flat(self.lowrank_B.device), self.scale, dtype
        )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        """Validate a loaded support (shape, range, duplicates, order, count) before anything is copied."""
        key = prefix + "sparse_indices"
        if key in state_dict and self.sparse_indices is not None:
            SparseSupport.check(
                state_dict[key], (self.out_features, self.in_features),
                expected_nnz=support_nnz((self.out_features, self.in_features), self.density), name=key,
            )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        self._support = None  # the buffer's contents may have changed: rebuild the cached layouts

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"density={self.density:g}, nnz={self.nnz}, alpha={self.alpha:g}, bias={self.bias is not None}"
        )


def _check_args(in_features, out_features, rank, density, alpha, dense_kind) -> None:
    if int(in_features) <= 0 or int(out_features) <= 0:
        raise ValueError(f"SLTrainLinear: in_features and out_features must be positive, got {in_features}, {out_features}.")
    if int(rank) <= 0:
        raise ValueError(f"SLTrainLinear: rank must be a positive integer, got {rank!r}.")
    if not (0.0 <= float(density) < 1.0):
        raise ValueError(
            f"SLTrainLinear: density must be in [0, 1), got {density!r} (the paper uses 0.03; 0 gives the "
            "low-rank-only layer)."
        )
    if float(alpha) <= 0:
        raise ValueError(f"SLTrainLinear: alpha must be positive, got {alpha!r} (the paper uses 32).")
    if dense_kind not in ("linear", "conv1d"):
        raise ValueError(f"SLTrainLinear: dense_kind must be 'linear' or 'conv1d', got {dense_kind!r}.")
