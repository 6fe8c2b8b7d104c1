"""Export any adapter of this package (and PEFT's LoRA) as a plain PEFT LoRA adapter folder.

The folder (``adapter_config.json`` with ``peft_type: LORA``, ``adapter_model.safetensors``, and
``export_info.json`` with the per-layer ranks, method and singular values) loads with plain ``peft`` -- without
importing this package -- on the same base model. Any LoRA server (vLLM, TGI, ...) can serve it.

Per layer:

* ΔW is a product of factors (``DeltaLayer.lowrank_factors`` gives ``(B, A)`` with ``ΔW = B @ A``: SoRA with its
  gate folded in, DyLoRA, NOLA with its bases mixed; PEFT's LoRA): without ``rank`` the factors are written as they
  are, exactly (``lora_alpha = r`` per layer, so PEFT's scale ``alpha / r`` is 1; per-layer ranks in
  ``rank_pattern`` / ``alpha_pattern``). With ``rank`` they are squeezed exactly to it (QR + small SVD, the optimal
  truncation); a method with nested ranks (DyLoRA, which has ``set_rank``) takes an int ``rank`` as its own rank
  ``b`` instead, which is exact for the rank-``b`` model it was trained to be.
* ΔW is not low-rank (SLTrain's sparse term, RandLoRA's full-rank sum): plain LoRA can hold it only truncated, so
  ``rank`` is required (a clear error names the layer otherwise) and ΔW is truncated by randomized SVD through the
  layer's own forward and its transpose, never building the ``out × in`` matrix (see :mod:`.squeeze`). At
  ``rank = min(out, in)`` the export is exact up to rounding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from .squeeze import DEFAULT_OVERSAMPLING, DEFAULT_POWER_ITERS, DEFAULT_SEED, squeeze_state
from .squeeze.folders import for_servers
from .squeeze.svd import RankSpec

__all__ = ["export_to_lora"]


def export_to_lora(
    peft_model,
    out_dir: Union[str, Path],
    adapter_name: Optional[str] = None,
    rank: Optional[RankSpec] = None,
    lora_alpha: Optional[float] = None,
    oversampling: int = DEFAULT_OVERSAMPLING,
    power_iters: int = DEFAULT_POWER_ITERS,
    seed: int = DEFAULT_SEED,
    uniform_rank: bool = False,
    relative_to: str = "original",
    max_energy_rank: Optional[int] = None,
) -> Path:
    """Write ``peft_model``'s adapter ``adapter_name`` as a plain PEFT LoRA adapter folder ``out_dir``.

    The model is not changed.

    Args:
        peft_model: a ``PeftModel`` whose adapter is one of this package's tuners or PEFT's LoRA.
        out_dir: the folder to write (created; existing files of the same names are overwritten).
        adapter_name: which adapter to export (default: the active one).
        rank: ``None``: exact export of factored deltas (refused, with the fix, for sparse / full-rank ones).
            An int: the LoRA rank (DyLoRA: its nested rank ``b``; factored deltas: optimal truncation, layers of
            lower rank keep theirs; sparse / full-rank deltas: randomized SVD). A float in (0, 1]: energy
            threshold, per-layer ranks into ``rank_pattern``.
        lora_alpha: ``lora_alpha`` of the written LoRA (default ``r`` per layer: scale 1).
        oversampling, power_iters, seed: the randomized SVD's settings (see :mod:`.squeeze`).
        uniform_rank: store every layer at the largest rank ``r`` (lower ranks padded with zeros, one scale
            ``lora_alpha / r``, no ``rank_pattern``), so that every LoRA server computes PEFT's outputs. Without it a
            folder with per-layer ranks (SoRA's kept ranks, an energy threshold) is smaller and exact in PEFT, but
            vLLM and llama.cpp scale its lower-rank layers differently, and a warning says so.
        relative_to: ``"original"`` (default): a LoRA for the model file's own weights, which servers load. An
            adapter with LQ-LoRA's initialisation was trained on the quantized ``Q``, with ``Q + L ≈ W``; it is
            written as its change since the start, ``ΔW − L`` (exact at rank ``k + r``), so that on ``W`` it gives
            the trained ``Q + ΔW`` up to the quantization residual ``W − Q − L``. ``"trained"``: ``ΔW`` itself, for
            the quantized base it was trained on. Other adapters are the same either way.
        max_energy_rank: with an energy threshold ``rank``, the largest per-layer rank accepted for a sparse or
            full-rank delta (default ``min(out, in) // 2``, beyond which a LoRA saves nothing over the dense delta).

    Returns:
        The folder's path. ``PeftModel.from_pretrained(base, out_dir)`` loads it with plain peft.
    """
    result = squeeze_state(
        peft_model, rank, adapter_name, lora_alpha=lora_alpha, oversampling=oversampling,
        power_iters=power_iters, seed=seed, relative_to=relative_to, max_energy_rank=max_energy_rank,
    )
    return for_servers(result, uniform_rank).save(out_dir)
