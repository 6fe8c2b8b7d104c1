"""Sparse RandLoRA: RandLoRA (Albert et al., ICLR 2025) with sparse random bases executed by the sparse-delta ops."""

from ..._peft_compat import register_method
from .config import SparseRandLoraConfig
from .layer import SparseRandLoraLayer
from .model import SparseRandLoraModel

register_method("sparse_randlora", SparseRandLoraConfig, SparseRandLoraModel)

__all__ = ["SparseRandLoraConfig", "SparseRandLoraLayer", "SparseRandLoraModel"]
