"""NOLA's frozen random bases: drawn from a seed on CPU, cached per (seed, shape, device, dtype), shared by layers.

A basis tensor has shape ``(k, rows, cols)``: ``k`` matrices of the factor's shape (``r × in`` for ``A``, ``out × r``
for ``B``). Its entries are i.i.d. uniform in ``[-1, 1]`` scaled by ``1/√k`` (the distribution of the paper's code),
drawn from a CPU ``torch.Generator`` seeded by ``(basis_seed, side, k, rows, cols)``. So

* CPU and CUDA, this process and the next, get the same numbers (the paper's code draws from the device's global RNG,
  so its CPU and CUDA bases differ, and it stores the seed as a model parameter);
* every layer whose factor has the same shape gets the same tensor object: the cache holds one CPU float32 master per
  basis key and one copy per (device, dtype) that a layer asked for, and hands the same object to every layer.

The cache holds its tensors weakly: a basis lives as long as some layer holds it (layers keep a reference to the
copy they use), and is dropped with the last model that uses it. Generating again gives the same numbers.
"""

from __future__ import annotations

import math
import threading
import weakref
import zlib

import torch

from ...delta.support import layer_seed

__all__ = ["basis_seed_for", "get_basis", "basis_checksum", "generate_basis", "cache_info"]

_LOCK = threading.Lock()
_MASTERS: "weakref.WeakValueDictionary[tuple, torch.Tensor]" = weakref.WeakValueDictionary()
_COPIES: "weakref.WeakValueDictionary[tuple, torch.Tensor]" = weakref.WeakValueDictionary()
_CHECKSUMS: dict[tuple, int] = {}
_STATS = {"generated": 0}


def basis_seed_for(seed: int, side: str, k: int, rows: int, cols: int) -> int:
    """The CPU generator seed of one basis tensor (stable across processes: crc32 of the key, not Python's hash)."""
    return layer_seed(int(seed), f"nola:{side}:{k}x{rows}x{cols}")


def generate_basis(seed: int, side: str, k: int, rows: int, cols: int) -> torch.Tensor:
    """Draw the ``(k, rows, cols)`` basis tensor on CPU in float32 (uncached; :func:`get_basis` caches it)."""
    gen = torch.Generator(device="cpu").manual_seed(basis_seed_for(seed, side, k, rows, cols))
    basis = torch.rand((k, rows, cols), generator=gen, dtype=torch.float32)
    return basis.mul_(2.0).sub_(1.0).mul_(1.0 / math.sqrt(k))


def _master(seed: int, side: str, k: int, rows: int, cols: int) -> torch.Tensor:
    key = (int(seed), side, int(k), int(rows), int(cols))
    with _LOCK:
        basis = _MASTERS.get(key)
        if basis is None:
            basis = generate_basis(*key)
            _STATS["generated"] += 1
            _MASTERS[key] = basis
            _CHECKSUMS[key] = zlib.crc32(basis.numpy())
        return basis


def get_basis(
    seed: int, side: str, k: int, rows: int, cols: int, device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The cached ``(k, rows, cols)`` basis on ``device`` in ``dtype`` (the same object for every caller)."""
    device = torch.device(device)
    master = _master(seed, side, k, rows, cols)
    if device.type == "cpu" and dtype == torch.float32:
        return master
    key = (int(seed), side, int(k), int(rows), int(cols), device.type, device.index, dtype)
    with _LOCK:
        copy = _COPIES.get(key)
        if copy is None:
            copy = master.to(device=device, dtype=dtype)
            _COPIES[key] = copy
        return copy


def basis_checksum(seed: int, side: str, k: int, rows: int, cols: int) -> int:
    """crc32 of the float32 CPU bytes of the basis: recorded in each checkpoint to detect a basis that regenerates
    differently (another torch's generator) or a config whose seed or shapes were changed."""
    key = (int(seed), side, int(k), int(rows), int(cols))
    checksum = _CHECKSUMS.get(key)
    if checksum is None:
        _master(*key)
        checksum = _CHECKSUMS[key]
    return checksum


def cache_info() -> dict:
    """How many basis tensors were generated and how many are alive (for tests of the sharing)."""
    return {"generated": _STATS["generated"], "masters": len(_MASTERS), "copies": len(_COPIES)}
