"""Contract-table rows for the random-basis tuners, NOLA and sparse RandLoRA (collected by test_contract.py)."""

import sparse_lowrank_peft.tuners.nola  # noqa: F401  (registers the methods until the package imports them)
import sparse_lowrank_peft.tuners.sparse_randlora  # noqa: F401
from sparse_lowrank_peft.tuners.nola import NolaConfig
from sparse_lowrank_peft.tuners.sparse_randlora import SparseRandLoraConfig

CASES = [
    ("nola-r4-k16x8", NolaConfig, {"r": 4, "num_basis_A": 16, "num_basis_B": 8, "lora_alpha": 8}),
    ("nola-r2-k5x7-dropout", NolaConfig,
     {"r": 2, "num_basis_A": 5, "num_basis_B": 7, "lora_alpha": 3, "lora_dropout": 0.1}, ("mlp", "gpt2")),
    ("nola-r4-pattern", NolaConfig,
     {"r": 4, "num_basis_A": 16, "num_basis_B": 8, "lora_alpha": 8, "rank_pattern": {r".*\.0\..*": 6}},
     ("gpt2", "bert")),
    # sparse bases through sparse_delta (gpt2 has an out < in layer: the transposed orientation)
    ("sparse_randlora-r4-d0.3", SparseRandLoraConfig, {"r": 4, "randlora_alpha": 8, "basis_density": 0.3}),
    # dense bases (PEFT RandLoRA's math), with dropout
    ("sparse_randlora-r5-d1-dropout", SparseRandLoraConfig,
     {"r": 5, "randlora_alpha": 10, "basis_density": 1.0, "randlora_dropout": 0.1}, ("mlp", "gpt2")),
]
