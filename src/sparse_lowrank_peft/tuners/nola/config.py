"""Configuration of NOLA: LoRA factors mixed from frozen random bases."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from peft.config import PeftConfig

from ..._peft_compat import add_peft_type
from ...common import RankPatternFields, TargetFields, check_patterns, check_positive_int, check_target_options

PEFT_TYPE = add_peft_type("nola")


@dataclass
class NolaConfig(RankPatternFields, TargetFields, PeftConfig):
    """Configuration of a :class:`NolaModel`: ``ΔW = (lora_alpha / r) · B · A`` with ``A = Σᵢ αᵢ·Aᵢ``, ``B = Σⱼ βⱼ·Bⱼ``.

    NOLA (Koohpayegani et al., ICLR 2024, "NOLA: Compressing LoRA using Linear Combination of Random Basis") writes
    LoRA's factors as linear combinations of frozen random matrices and trains only the mixing coefficients, so the
    number of trainable parameters (``num_basis_A + num_basis_B`` per layer) no longer depends on the rank or the layer
    width, and an adapter is a handful of numbers plus a seed.

    The bases ``Aᵢ`` (``r × in``) and ``Bⱼ`` (``out × r``) have i.i.d. entries uniform in ``[-1, 1]`` scaled by
    ``1/√k`` (as in the paper's code). They are drawn from ``basis_seed`` with a CPU ``torch.Generator``, so they are
    the same on every device and in every process, generated once per (seed, shape, device, dtype) and shared by all
    layers of the same shape, and they are not saved in the checkpoint unless ``save_basis=True``.

    Args:
        r (`int`, defaults to `8`):
            Rank of ``A`` and ``B`` (of every basis matrix). Costs no trainable parameters; it sets the rank of ΔW and
            the size of the frozen bases (``k·r·(in + out)`` numbers per layer shape).
        num_basis_A (`int`, defaults to `256`):
            ``k_A``: number of random bases mixed into ``A``; the trainable ``α`` has this many entries per layer.
        num_basis_B (`int`, defaults to `256`):
            ``k_B``: number of random bases mixed into ``B``; the trainable ``β`` has this many entries per layer.
        lora_alpha (`float`, defaults to `16`):
            Scale numerator: ``ΔW = (lora_alpha / r) · B · A`` (``lora_alpha / sqrt(r)`` with ``use_rslora``).
        basis_seed (`int`, defaults to `0`):
            Seed of the random bases. Each basis tensor is drawn from ``(basis_seed, its shape)`` with a CPU generator:
            layers of the same shape share their bases, and a checkpoint reloads exactly from the seed alone.
        save_basis (`bool`, defaults to `False`):
            Also store the bases in the checkpoint (``k·r·(in + out)`` floats per layer), for archives that must load
            even if a future torch draws other numbers from the same seed. The loaded bases are then used as they are.
        coefficient_bits (`int` or `None`, defaults to `None`):
            Store ``α`` and ``β`` in the checkpoint in 4 or 8 bits (blockwise, one fp32 absmax per 64 values, through
            bitsandbytes: NF4 for 4, its dynamic 8-bit map for 8); ``None`` stores them in full precision. Training
            stays in full precision: the coefficients are quantized when saved and dequantized when loaded, so a
            reloaded adapter computes with the quantized values. Needs bitsandbytes. Measured
            (bench/results/nola-quant-minilm.json): a NOLA adapter trained on SST-2 (MiniLM, recipe nola-sst2) scores
            0.8154 with fp32, 0.8165 with 8-bit and 0.8177 with 4-bit coefficients; at the default 256 + 256 bases
            on query/value the file is 29,768 / 14,856 / 11,784 bytes (PEFT LoRA r=8: 298,128). So 4 bits is the
            setting to ship with; the default stays ``None`` because a default must not make ``save_pretrained`` ->
            ``from_pretrained`` give back anything but the trained adapter.
        lora_dropout (`float`, defaults to `0.0`):
            Dropout on the input of the adapter term, in [0, 1).
        target_modules, exclude_modules, layers_to_transform, layers_pattern, modules_to_save:
            Which modules to adapt and which to train in full: see ``sparse_lowrank_peft.common.TargetFields``
            (NOLA adapts ``nn.Linear`` and transformers ``Conv1D`` layers).
        rank_pattern, alpha_pattern, use_rslora:
            Per-module ``r`` and ``lora_alpha`` (PEFT LoRA's fields and matching rule), and the rank-stabilised scale
            ``lora_alpha / sqrt(r)``: see ``sparse_lowrank_peft.common.RankPatternFields``.
        bias (`str`, defaults to `"none"`):
            Which biases to train: ``"none"``, ``"all"``, or ``"nola_only"`` (biases of adapted layers).
        init_weights (`bool`, defaults to `True`):
            ``True``: ``β = 0`` (so ``B = 0`` and the adapted model equals the base at step 0) and ``α`` random with
            standard deviation ``1/√in``, which gives ``A`` the entry variance of LoRA's Kaiming-uniform ``A``. The
            paper's code instead sets both coefficient vectors to zero and adds a frozen Kaiming-uniform matrix to
            ``A`` (so ``A ≠ 0`` while ``B = 0``); random ``α`` gives the same start without an extra frozen matrix per
            layer. ``False``: ``β`` random too (for tests of merge/save; never for training).
    """

    r: int = field(default=8, metadata={"help": "Rank of the factors (and of every basis matrix)."})
    num_basis_A: int = field(default=256, metadata={"help": "k_A: number of random bases mixed into A."})
    num_basis_B: int = field(default=256, metadata={"help": "k_B: number of random bases mixed into B."})
    lora_alpha: float = field(default=16, metadata={"help": "Scale numerator (scale = lora_alpha / r)."})
    basis_seed: int = field(default=0, metadata={"help": "Seed of the frozen random bases."})
    save_basis: bool = field(default=False, metadata={"help": "Store the bases in the checkpoint too."})
    coefficient_bits: Optional[int] = field(
        default=None, metadata={"help": "Store the coefficients in 4 or 8 bits (None: full precision)."}
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter term's input."})
    bias: Literal["none", "all", "nola_only"] = field(default="none", metadata={"help": "Biases to train."})
    init_weights: bool = field(default=True, metadata={"help": "β = 0 (identity at step 0), α random."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        check_positive_int(self, "r", hint="a typical value is 8")
        check_positive_int(self, "num_basis_A", hint="the number of random bases mixed into A; NOLA uses 64-1024")
        check_positive_int(self, "num_basis_B", hint="the number of random bases mixed into B; NOLA uses 64-1024")
        if isinstance(self.basis_seed, bool) or not isinstance(self.basis_seed, int) or self.basis_seed < 0:
            raise ValueError(
                f"NolaConfig.basis_seed={self.basis_seed!r} must be a non-negative integer (it seeds a CPU "
                "torch.Generator). Fix: e.g. basis_seed=0."
            )
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)):
            raise ValueError(f"NolaConfig.lora_alpha={self.lora_alpha!r} must be a number. Fix: e.g. lora_alpha=16.")
        if self.coefficient_bits is not None and (
            isinstance(self.coefficient_bits, bool) or self.coefficient_bits not in (4, 8)
        ):
            raise ValueError(
                f"NolaConfig.coefficient_bits={self.coefficient_bits!r} is not 4, 8 or None. Fix: coefficient_bits=4 "
                "(smallest file), 8, or None (full precision)."
            )
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"NolaConfig.lora_dropout={self.lora_dropout!r} must be in [0, 1). Fix: e.g. 0.0 or 0.1.")
        if self.bias not in ("none", "all", "nola_only"):
            raise ValueError(f"NolaConfig.bias={self.bias!r} is not one of 'none', 'all', 'nola_only'. Fix: bias='none'.")
        check_target_options(self)
        check_patterns(self)
