"""bitsandbytes' two CPU code paths, forced either way on any machine.

On a CPU with AVX-512-BF16 (``bitsandbytes.functional.has_avx512bf16()``) every ``Linear4bit`` is created with
``support_avx512bf16_for_cpu=True`` and repacks its weight in place at its first eval forward (input without grad),
then computes with a packed bf16 kernel; elsewhere it never repacks. The tests run both paths on every machine:

* :func:`bnb_cpu_path` patches the switch bitsandbytes reads when a layer is created;
* on a machine without AVX-512-BF16, bitsandbytes registers no kernel for a packed weight (its generic one would read
  the packed bytes as the standard layout), so :func:`install_packed_kernel_stand_in` puts a reference of that kernel
  (unpack, then one GEMM in bf16, as the native kernel computes) in front of ``bitsandbytes.functional.gemv_4bit``.
  Only packed weights reach it; everything else goes to bitsandbytes unchanged. On an AVX-512-BF16 machine the real
  kernel runs.
"""

from __future__ import annotations

import contextlib

import torch

PATHS = ("generic", "avx512bf16")


@contextlib.contextmanager
def bnb_cpu_path(path: str):
    """Within this block, new ``Linear4bit`` layers take bitsandbytes' ``path`` ("generic": never repack;
    "avx512bf16": repack in eval, the packed kernel run natively or by the stand-in)."""
    import bitsandbytes.nn.modules as modules

    if path not in PATHS:
        raise ValueError(f"path={path!r} is not one of {PATHS}")
    if path == "avx512bf16":
        install_packed_kernel_stand_in()
    saved = modules.has_avx512bf16
    modules.has_avx512bf16 = lambda: path == "avx512bf16"
    try:
        yield
    finally:
        modules.has_avx512bf16 = saved


_STAND_IN = {"installed": False}


def packed_gemv_reference(A: torch.Tensor, B: torch.Tensor, state) -> torch.Tensor:
    """What bitsandbytes' packed AVX-512-BF16 CPU kernel computes: ``A · Wᵀ`` in bf16, W read from the packed layout."""
    from sparse_lowrank_peft.delta.quant import dequantize_4bit

    weight = dequantize_4bit(B.reshape(int(state.shape[0]), -1), state).to(torch.bfloat16)
    return torch.nn.functional.linear(A.to(torch.bfloat16), weight)


def install_packed_kernel_stand_in() -> bool:
    """On a CPU without AVX-512-BF16, route packed weights in ``F.gemv_4bit`` to :func:`packed_gemv_reference`;
    idempotent. Returns whether the stand-in is installed (False where the native kernel exists)."""
    import bitsandbytes.functional as F

    if _STAND_IN["installed"]:
        return True
    if F.has_avx512bf16():
        return False
    original = F.gemv_4bit

    def gemv_4bit(A, B, out=None, transposed_A=False, transposed_B=False, state=None):
        if not getattr(state, "packing_format_for_cpu", False):
            return original(A, B, out=out, transposed_A=transposed_A, transposed_B=transposed_B, state=state)
        result = packed_gemv_reference(A, B, state)
        if out is not None:
            out.copy_(result)
            return out
        return result

    F.gemv_4bit = gemv_4bit
    _STAND_IN["installed"] = True
    return True


def is_packed(layer) -> bool:
    return bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False))
