"""Configuration of DyLoRA: one adapter trained for every rank 1..r at once."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Union

from peft.config import PeftConfig

from ..._peft_compat import add_peft_type
from ...common import LQInitFields, TargetFields, check_init_weights, check_positive_int, check_target_options

PEFT_TYPE = add_peft_type("dylora")

RANK_DISTRIBUTIONS = ("uniform", "geometric", "max")


@dataclass
class DyLoraConfig(LQInitFields, TargetFields, PeftConfig):
    """Configuration of a :class:`DyLoraModel`: ``ΔW_b = (lora_alpha / b) · B[:, :b] · A[:b, :]``.

    DyLoRA (Valipour et al., EACL 2023, "DyLoRA: Parameter-Efficient Tuning of Pre-trained Models using Dynamic
    Search-Free Low-Rank Adaptation") samples a rank ``b ∈ {1..r}`` at every training step (the same ``b`` in every
    layer) and trains the truncated adapter, so the leading ranks are ordered by importance and one adapter serves
    any rank ``b ≤ r`` at inference (``model.base_model.set_rank(b)``).

    Args:
        r (`int`, defaults to `8`): Maximum rank.
        lora_alpha (`float`, defaults to `16`): Scale numerator; the rank-``b`` update is scaled by ``lora_alpha / b``.
        rank_distribution (`str`, defaults to `"uniform"`):
            How ``b`` is drawn each step: ``"uniform"`` over 1..r (the paper's), ``"geometric"`` (``P(b) ∝ 2^-(r-b)``:
            favours large ranks), or ``"max"`` (always ``r``: plain LoRA with DyLoRA's scaling, for ablations).
        frozen (`bool`, defaults to `False`):
            The official code's "frozen" mode: only the ``b``-th row of ``A`` and column of ``B`` get gradient at a step
            (ranks ``< b`` are held fixed). ``False``: all ranks ``≤ b`` train.
        rank_seed (`int`, defaults to `0`):
            Seed of the rank sampler; ``b`` at step ``t`` is a pure function of ``(rank_seed, t)``, so every process
            of a distributed run draws the same ``b``.
        lora_dropout (`float`, defaults to `0.0`): Dropout on the adapter's input, in [0, 1).
        target_modules, exclude_modules, layers_to_transform, layers_pattern, modules_to_save:
            Which modules to adapt and which to train in full: see ``sparse_lowrank_peft.common.TargetFields``.
        bias (`str`, defaults to `"none"`): Biases to train: ``"none"``, ``"all"`` or ``"dylora_only"``.
        init_weights (`bool | str`, defaults to `True`):
            ``True``: ``B = 0`` (identity at step 0); ``False``: random ``B`` (tests only).
            ``"lq"``: LQ-LoRA (Guo et al., ICLR 2024): the base weight ``W`` is split into ``Q + L`` with ``Q`` 4-bit
            (``lq_quant_type``) and ``L`` rank ``r``; the base layer becomes a ``Linear4bit`` holding ``Q`` and the
            factors start at ``L`` at full rank ``r`` (a truncation to ``b < r`` then starts at ``(r/b)·L_b``), so the adapted model starts at ``Q + L ≈ W`` with the quantization error
            partly absorbed. Needs full-precision ``nn.Linear`` targets (see ``delta.quant`` for Fisher weighting).
        lq_quant_type, lq_max_iter, lq_svd: see ``sparse_lowrank_peft.common.LQInitFields``.
    """

    r: int = field(default=8, metadata={"help": "Maximum rank."})
    lora_alpha: float = field(default=16, metadata={"help": "Scale numerator (rank-b scale = lora_alpha / b)."})
    rank_distribution: Literal["uniform", "geometric", "max"] = field(
        default="uniform", metadata={"help": "Distribution of the rank sampled each step."}
    )
    frozen: bool = field(default=False, metadata={"help": "Train only the b-th rank at a step."})
    rank_seed: int = field(default=0, metadata={"help": "Seed of the per-step rank sampler."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input."})
    bias: Literal["none", "all", "dylora_only"] = field(default="none", metadata={"help": "Biases to train."})
    init_weights: Union[bool, Literal["lq"]] = field(default=True, metadata={"help": "Zero-init B (identity at step 0); 'lq': LQ-LoRA init."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        check_positive_int(self, "r", hint="the maximum rank; a typical value is 8")
        if self.rank_distribution not in RANK_DISTRIBUTIONS:
            raise ValueError(
                f"DyLoraConfig.rank_distribution={self.rank_distribution!r} is not one of {RANK_DISTRIBUTIONS}. "
                "Fix: rank_distribution='uniform'."
            )
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"DyLoraConfig.lora_dropout={self.lora_dropout!r} must be in [0, 1).")
        if self.bias not in ("none", "all", "dylora_only"):
            raise ValueError(f"DyLoraConfig.bias={self.bias!r} is not one of 'none', 'all', 'dylora_only'.")
        check_init_weights(self)
        check_target_options(self)
