"""Contract-table rows for the rank-adaptive tuners (collected by test_contract.py)."""

from sparse_lowrank_peft import DyLoraConfig, SoraConfig

CASES = [
    ("sora-r4", SoraConfig, {"r": 4, "lora_alpha": 8}),
    ("sora-r3-ones-dropout", SoraConfig, {"r": 3, "lora_alpha": 6, "gate_init": "ones", "lora_dropout": 0.1},
     ("mlp", "bert")),
    ("dylora-r4", DyLoraConfig, {"r": 4, "lora_alpha": 8}),
    ("dylora-r5-frozen", DyLoraConfig, {"r": 5, "lora_alpha": 5, "frozen": True}, ("mlp", "roberta")),
]
