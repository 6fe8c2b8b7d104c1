"""Configuration of sparse RandLoRA: RandLoRA's full-rank random-basis update, with sparse bases run sparsely."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig

from ..._peft_compat import add_peft_type
from ...common import TargetFields, check_positive_int, check_target_options

PEFT_TYPE = add_peft_type("sparse_randlora")


@dataclass
class SparseRandLoraConfig(TargetFields, PeftConfig):
    """Configuration of a :class:`SparseRandLoraModel`.

    RandLoRA (Albert et al., ICLR 2025, "RandLoRA: full-rank parameter-efficient fine-tuning of large models") sums
    ``N = ⌈min(out, in) / r⌉`` frozen random rank-``r`` products, each with trainable diagonal scalings, so the update
    can have full rank while only ``r·N + N·min(out, in)`` numbers per layer train::

        ΔW = (randlora_alpha / r) · Σ_b  B_b · diag(λ_b) · A · diag(γ_b)        (on the smaller side of W)

    with ``A`` (``r × min``) shared by the bases and ``B_b`` (``max × r``) one per basis, as in PEFT's ``randlora``.
    PEFT's ``sparse=True`` draws ternary bases but multiplies them densely (zeros included), so it saves neither time
    nor memory. Here ``basis_density < 1`` draws bases with that fraction of nonzeros (values ``±1/√density``, unit
    second moment like the dense bases) and runs both products through the shared sparse-delta op (Triton on CUDA,
    the reference path on CPU): the bases and their products cost O(density) memory and work, and no ``(rN × min)``
    or ``(out × in)`` matrix is built. ``basis_density = 1`` uses dense bases and dense matmuls: PEFT RandLoRA's math.

    Args:
        r (`int`, defaults to `32`):
            Rank of each random basis. As in RandLoRA, *fewer* trainable parameters for larger ``r``: there are
            ``N = ⌈min(out, in) / r⌉`` bases, ``λ`` is ``r × N`` and ``γ`` is ``N × min(out, in)``.
        randlora_alpha (`float`, defaults to `640`):
            Scale numerator: the update is multiplied by ``randlora_alpha / r`` (RandLoRA uses 20·r). Lower it if
            training is unstable at high learning rates.
        basis_density (`float`, defaults to `0.1`):
            Fraction of nonzero entries of the random bases, in (0, 1]. Time and memory of the adapter term fall
            with it; 1 gives dense bases (PEFT RandLoRA).
        basis_seed (`int`, defaults to `0`):
            Seed of the random bases (PEFT's ``projection_prng_key``). Drawn with a CPU generator from the seed and
            ``(r, min, max, density)``, so the same on every device and run, and shared by every layer of that shape.
            The bases are not saved; each checkpoint records seed, shape and a checksum of its bases, checked on load.
        randlora_dropout (`float`, defaults to `0.0`):
            Dropout on the input of the adapter term, in [0, 1).
        target_modules, exclude_modules, layers_to_transform, layers_pattern, modules_to_save:
            Which modules to adapt and which to train in full: see ``sparse_lowrank_peft.common.TargetFields``.
        bias (`str`, defaults to `"none"`):
            Which biases to train: ``"none"``, ``"all"``, or ``"sparse_randlora_only"`` (biases of adapted layers).
        init_weights (`bool`, defaults to `True`):
            ``True``: ``λ = 0`` (so ΔW = 0 at step 0) and ``γ = 1/max(N, min)``, PEFT RandLoRA's initialisation.
            ``False``: random ``λ`` (for tests of merge/save; never for training).
    """

    r: int = field(default=32, metadata={"help": "Rank of each random basis (N = ceil(min(out, in) / r) bases)."})
    randlora_alpha: float = field(default=640, metadata={"help": "Scale numerator (scale = randlora_alpha / r)."})
    basis_density: float = field(default=0.1, metadata={"help": "Fraction of nonzeros of the random bases, (0, 1]."})
    basis_seed: int = field(default=0, metadata={"help": "Seed of the frozen random bases."})
    randlora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter term's input."})
    bias: Literal["none", "all", "sparse_randlora_only"] = field(default="none", metadata={"help": "Biases to train."})
    init_weights: bool = field(default=True, metadata={"help": "λ = 0 (identity at step 0)."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        check_positive_int(self, "r", hint="the rank of each random basis; RandLoRA uses 10-100")
        density = self.basis_density
        if (
            isinstance(density, bool)
            or not isinstance(density, (int, float))
            or not math.isfinite(density)
            or not 0.0 < density <= 1.0
        ):
            raise ValueError(
                f"SparseRandLoraConfig.basis_density={density!r} is not a density in (0, 1]. It is the fraction of "
                "nonzero entries of the random bases (1: dense bases, PEFT RandLoRA). Fix: e.g. basis_density=0.1."
            )
        self.basis_density = float(density)
        if isinstance(self.basis_seed, bool) or not isinstance(self.basis_seed, int) or self.basis_seed < 0:
            raise ValueError(
                f"SparseRandLoraConfig.basis_seed={self.basis_seed!r} must be a non-negative integer (it seeds a CPU "
                "torch.Generator). Fix: e.g. basis_seed=0."
            )
        alpha = self.randlora_alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ValueError(
                f"SparseRandLoraConfig.randlora_alpha={alpha!r} must be a finite number. Fix: e.g. randlora_alpha=20*r."
            )
        if not 0.0 <= self.randlora_dropout < 1.0:
            raise ValueError(
                f"SparseRandLoraConfig.randlora_dropout={self.randlora_dropout!r} must be in [0, 1). Fix: e.g. 0.0."
            )
        if self.bias not in ("none", "all", "sparse_randlora_only"):
            raise ValueError(
                f"SparseRandLoraConfig.bias={self.bias!r} is not one of 'none', 'all', 'sparse_randlora_only'. "
                "Fix: bias='none'."
            )
        check_target_options(self)
