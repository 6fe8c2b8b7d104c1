"""The shared sparse-delta layer under every tuner: support, reference ops, Triton kernels, dispatcher, layer base."""

from .ops import resolve_backend, sparse_delta
from .support import SparseSupport

__all__ = ["SparseSupport", "resolve_backend", "sparse_delta"]
