"""Contract-table rows for the random-basis tuners, NOLA and sparse RandLoRA (collected by test_contract.py)."""

import sparse_lowrank_peft.tuners.nola  # noqa: F401  (registers the method until the package imports it)
from sparse_lowrank_peft.tuners.nola import NolaConfig

CASES = [
    ("nola-r4-k16x8", NolaConfig, {"r": 4, "num_basis_A": 16, "num_basis_B": 8, "lora_alpha": 8}),
    ("nola-r2-k5x7-dropout", NolaConfig,
     {"r": 2, "num_basis_A": 5, "num_basis_B": 7, "lora_alpha": 3, "lora_dropout": 0.1}, ("mlp", "gpt2")),
]
