"""Configuration of SLTrain: sparse + low-rank adapters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Union

from peft.config import PeftConfig

from ..._peft_compat import add_peft_type
from ...common import (
    LQInitFields, RankPatternFields, TargetFields, check_init_weights, check_patterns, check_positive_int,
    check_target_options,
)

PEFT_TYPE = add_peft_type("sltrain")


@dataclass
class SLTrainConfig(RankPatternFields, LQInitFields, TargetFields, PeftConfig):
    """Configuration of an :class:`SLTrainModel`: ``ΔW = (lora_alpha / r) · B · A + S``.

    SLTrain (Han et al., 2024, "SLTrain: a sparse plus low-rank approach for parameter and memory efficient
    pretraining") adds to each targeted weight a low-rank product and a sparse matrix ``S`` on a random support that
    is fixed when the adapter is created; only the low-rank factors and the values of ``S`` train.

    Args:
        r (`int`, defaults to `8`):
            Rank of the low-rank term. Larger captures more of the update; costs ``r·(in + out)`` parameters per layer.
        lora_alpha (`float`, defaults to `16`):
            Scale numerator: the low-rank term is multiplied by ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with
            ``use_rslora``). Raising it is like raising the learning rate of the low-rank term only.
        sparsity (`float`, defaults to `0.01`):
            Density of ``S``: the fraction of the ``out × in`` entries that are trainable, in (0, 1). Adds
            ``round(sparsity·out·in)`` parameters per layer; compute and memory of the sparse term grow linearly with
            it (0.01 on a 768x768 layer: 5,898 values, about as many as rank 4).
        support_seed (`int`, defaults to `0`):
            Seed of the random support. Each layer draws from ``(support_seed, module name)`` with a CPU generator,
            so the support is the same on every device and run. The support is also saved in the checkpoint.
        lora_dropout (`float`, defaults to `0.0`):
            Dropout on the input of the low-rank term (not of the sparse term), in [0, 1).
        target_modules, exclude_modules, layers_to_transform, layers_pattern, modules_to_save:
            Which modules to adapt and which to train in full: see ``sparse_lowrank_peft.common.TargetFields``.
        rank_pattern, alpha_pattern, use_rslora:
            Per-module ``r`` and ``lora_alpha`` (PEFT LoRA's fields and matching rule), and the rank-stabilised scale
            ``lora_alpha / sqrt(r)``: see ``sparse_lowrank_peft.common.RankPatternFields``.
        bias (`str`, defaults to `"none"`):
            Which biases to train: ``"none"``, ``"all"``, or ``"sltrain_only"`` (biases of adapted layers).
        init_weights (`bool | str`, defaults to `True`):
            ``True``: ``B = 0`` and ``S = 0`` so the adapted model equals the base at step 0 (``A`` is Kaiming-uniform
            as in LoRA). ``False``: random ``B`` and ``S`` (for tests of merge/save; never for training).
            ``"lq"``: LQ-LoRA (Guo et al., ICLR 2024): the base weight ``W`` is split into ``Q + L`` with ``Q`` 4-bit
            (``lq_quant_type``) and ``L`` rank ``r``; the base layer becomes a ``Linear4bit`` holding ``Q`` and the
            factors start at ``L`` (``S = 0``), so the adapted model starts at ``Q + L ≈ W`` with the quantization error
            partly absorbed. Needs full-precision ``nn.Linear`` targets (see ``delta.quant`` for Fisher weighting).
        lq_quant_type, lq_max_iter, lq_svd: see ``sparse_lowrank_peft.common.LQInitFields``.
    """

    r: int = field(default=8, metadata={"help": "Rank of the low-rank term."})
    lora_alpha: float = field(default=16, metadata={"help": "Low-rank scale numerator (scale = lora_alpha / r)."})
    sparsity: float = field(default=0.01, metadata={"help": "Density of the sparse term S, in (0, 1)."})
    support_seed: int = field(default=0, metadata={"help": "Seed of the random sparse support."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the low-rank term's input."})
    bias: Literal["none", "all", "sltrain_only"] = field(default="none", metadata={"help": "Biases to train."})
    init_weights: Union[bool, Literal["lq"]] = field(default=True, metadata={"help": "Zero-init B and S (identity at step 0); 'lq': LQ-LoRA init."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        check_positive_int(self, "r", hint="a typical value is 8")
        if not isinstance(self.sparsity, (int, float)) or isinstance(self.sparsity, bool) or not 0.0 < self.sparsity < 1.0:
            raise ValueError(
                f"SLTrainConfig.sparsity={self.sparsity!r} is not a density in (0, 1). It is the fraction of weight "
                "entries the sparse term trains; SLTrain uses 0.01-0.05. Fix: e.g. sparsity=0.01."
            )
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"SLTrainConfig.lora_dropout={self.lora_dropout!r} must be in [0, 1). Fix: e.g. 0.0 or 0.1.")
        if self.bias not in ("none", "all", "sltrain_only"):
            raise ValueError(
                f"SLTrainConfig.bias={self.bias!r} is not one of 'none', 'all', 'sltrain_only'. Fix: bias='none'."
            )
        check_init_weights(self)
        check_target_options(self)
        check_patterns(self)
