"""Configuration of SoRA: sparse low-rank adaptation with a gate per rank."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig

from ..._peft_compat import add_peft_type
from ...common import LQInitFields, TargetFields, check_init_weights, check_positive_int, check_target_options

PEFT_TYPE = add_peft_type("sora")

LAMBDA_SCHEDULES = ("linear", "log_linear", "exp_linear")


@dataclass
class SoraConfig(LQInitFields, TargetFields, PeftConfig):
    """Configuration of a :class:`SoraModel`: ``ΔW = (lora_alpha / r) · B · diag(g) · A``.

    SoRA (Ding et al., EMNLP 2023, "Sparse Low-rank Adaptation of Pre-trained Language Models") trains a gate
    ``g ∈ R^r`` per layer with a proximal (soft-threshold) step after each optimizer step, which drives gates to exact
    zeros; ranks whose gate is zero are then pruned away (``SoraModel.prune``), so each layer keeps its own rank.

    Args:
        r (`int`, defaults to `8`):
            Maximum rank ``r_max`` per layer. The gates decide how many of these survive.
        lora_alpha (`float`, defaults to `16`):
            Scale numerator: the update is multiplied by ``lora_alpha / r``.
        sparse_lambda (`float`, defaults to `0.375`):
            Strength λ of the L1 penalty on the gates. After each optimizer step every gate is soft-thresholded by
            ``sparse_lambda × lr`` (the proximal step of gradient descent with step ``lr``). Larger prunes more ranks,
            faster; 0 disables pruning (SoRA becomes a gated LoRA). The official code thresholds by a fixed ξ per step
            without the learning rate (its ξ is our ``sparse_lambda × lr``); the default 0.375 is its scripts' ratio
            (ξ = 3e-4 at lr 8e-4). Keep it below about 1: Adam moves a gate by at most about ``lr`` per step, so
            above 1 the shrinkage outpaces any gradient and only the gate's initial size decides whether its rank
            survives. Risk: on a short run the gradient moves gates very little (MiniLM SST-2, 500 steps at lr 1e-3,
            λ 0, three seeds: gates moved out by 0.02–0.03 on average, 0.08 at most, against a total shrinkage
            ``sparse_lambda × Σ lr`` of 0.094 at the default), so the ranks that close are mostly those whose gate
            started near 0, not ranks training found useless; larger λ prunes more of them and costs accuracy (three
            seeds: λ 0 / 0.375 / 0.75 / 1.5 kept 96 / ~91 / ~82 / ~69 of 96 ranks and scored 0.8291 / 0.8249 /
            0.8222 / 0.8188, LoRA 0.8307).
        lambda_schedule (`str`, *optional*):
            The sparsifying scheduler of the paper's Algorithm 1: λ rises from ``sparse_lambda`` to ``max_lambda`` in
            ``lambda_num`` equal stages over training (``"linear"``, ``"log_linear"`` or ``"exp_linear"`` spacing).
            ``None``: λ is constant.
        max_lambda (`float`, *optional*): Final λ of the schedule (needed with ``lambda_schedule``).
        lambda_num (`int`, *optional*): Number of λ stages of the schedule (needed with ``lambda_schedule``).
        gate_init (`str`, defaults to `"normal"`):
            Initial gate values: ``"normal"`` draws ``g ~ N(0, 1)`` like the official code (``torch.randn(1, r)``);
            ``"ones"`` starts every rank fully open (then SoRA starts as plain LoRA). ``B = 0`` either way, so the
            adapted model equals the base at step 0.
        lora_dropout (`float`, defaults to `0.0`): Dropout on the adapter's input, in [0, 1).
        rank_pattern (`dict[str, int]`, defaults to `{}`):
            Per-layer ranks after pruning, keyed by module name; written by ``SoraModel.prune`` so a pruned adapter
            saves and reloads with its own shapes. Leave empty when creating an adapter.
        target_modules, exclude_modules, layers_to_transform, layers_pattern, modules_to_save:
            Which modules to adapt and which to train in full: see ``sparse_lowrank_peft.common.TargetFields``.
        bias (`str`, defaults to `"none"`): Biases to train: ``"none"``, ``"all"`` or ``"sora_only"``.
        init_weights (`bool | str`, defaults to `True`):
            ``True``: ``B = 0`` (identity at step 0). ``False``: random ``B`` (tests only).
            ``"lq"``: LQ-LoRA (Guo et al., ICLR 2024): the base weight ``W`` is split into ``Q + L`` with ``Q`` 4-bit
            (``lq_quant_type``) and ``L`` rank ``r``; the base layer becomes a ``Linear4bit`` holding ``Q`` and the
            factors start at ``L`` with every gate at 1, so the adapted model starts at ``Q + L ≈ W`` with the quantization error
            partly absorbed. Needs full-precision ``nn.Linear`` targets (see ``delta.quant`` for Fisher weighting).
            Risk: every gate starting at 1 (not ``N(0, 1)``), none starts below the total shrinkage
            ``sparse_lambda × Σ lr``, so a short run prunes few ranks or none (MiniLM SST-2 at the recipe's λ, total
            0.375: 96 of 96 kept with ``"lq"``, 64 of 96 with ``True`` on the same NF4 base). To prune, bring the total
            shrinkage near 1.
        lq_quant_type, lq_max_iter, lq_svd: see ``sparse_lowrank_peft.common.LQInitFields``.
    """

    r: int = field(default=8, metadata={"help": "Maximum rank per layer."})
    lora_alpha: float = field(default=16, metadata={"help": "Scale numerator (scale = lora_alpha / r)."})
    sparse_lambda: float = field(default=0.375, metadata={"help": "L1 strength on the gates (threshold λ·lr)."})
    lambda_schedule: Optional[Literal["linear", "log_linear", "exp_linear"]] = field(
        default=None, metadata={"help": "Sparsifying schedule of λ (Algorithm 1)."}
    )
    max_lambda: Optional[float] = field(default=None, metadata={"help": "Final λ of the schedule."})
    lambda_num: Optional[int] = field(default=None, metadata={"help": "Number of λ stages."})
    gate_init: Literal["normal", "ones"] = field(default="normal", metadata={"help": "Initial gate values."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input."})
    rank_pattern: dict = field(default_factory=dict, metadata={"help": "Per-layer ranks after pruning."})
    bias: Literal["none", "all", "sora_only"] = field(default="none", metadata={"help": "Biases to train."})
    init_weights: Union[bool, Literal["lq"]] = field(default=True, metadata={"help": "Zero-init B (identity at step 0); 'lq': LQ-LoRA init."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        check_positive_int(self, "r", hint="the maximum rank; a typical value is 8")
        if not isinstance(self.sparse_lambda, (int, float)) or self.sparse_lambda < 0:
            raise ValueError(
                f"SoraConfig.sparse_lambda={self.sparse_lambda!r} must be >= 0 (the L1 strength on the gates). "
                "Fix: e.g. sparse_lambda=0.375 (the default), or 0 to disable pruning."
            )
        if self.lambda_schedule is not None:
            if self.lambda_schedule not in LAMBDA_SCHEDULES:
                raise ValueError(
                    f"SoraConfig.lambda_schedule={self.lambda_schedule!r} is not one of {LAMBDA_SCHEDULES}. "
                    "Fix: lambda_schedule='linear' (or None for a constant λ)."
                )
            if self.max_lambda is None or self.lambda_num is None:
                raise ValueError(
                    "SoraConfig.lambda_schedule needs max_lambda and lambda_num. Fix: e.g. "
                    "lambda_schedule='linear', max_lambda=0.75, lambda_num=7."
                )
            if self.max_lambda < 0:
                raise ValueError(f"SoraConfig.max_lambda={self.max_lambda!r} must be >= 0.")
            if self.lambda_schedule != "linear" and (self.sparse_lambda <= 0 or self.max_lambda <= 0):
                raise ValueError(
                    f"SoraConfig.lambda_schedule={self.lambda_schedule!r} spaces λ logarithmically and needs "
                    "sparse_lambda > 0 and max_lambda > 0. Fix: use 'linear' or positive values."
                )
            check_positive_int(self, "lambda_num")
        if self.gate_init not in ("normal", "ones"):
            raise ValueError(f"SoraConfig.gate_init={self.gate_init!r} must be 'normal' or 'ones'.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"SoraConfig.lora_dropout={self.lora_dropout!r} must be in [0, 1).")
        if self.bias not in ("none", "all", "sora_only"):
            raise ValueError(f"SoraConfig.bias={self.bias!r} is not one of 'none', 'all', 'sora_only'.")
        for name, k in (self.rank_pattern or {}).items():
            if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= self.r:
                raise ValueError(
                    f"SoraConfig.rank_pattern[{name!r}]={k!r} must be an int in [0, r={self.r}] (ranks kept after "
                    "pruning). The adapter_config.json was edited by hand: restore it from the saved adapter."
                )
        check_init_weights(self)
        check_target_options(self)
