"""Every tuner exports to a plain PEFT LoRA folder that loads without this package and gives the same outputs.

Low-rank deltas (PEFT LoRA, SoRA, also gated to exact zeros by its proximal step and pruned, DyLoRA at a rank b,
NOLA) export exactly without a rank. Sparse / full-rank ones
(SLTrain, sparse RandLoRA with sparse and dense bases) need a rank: at ``min(out, in)`` the randomized SVD spans the
whole space and the export is exact; below it, the written ΔW is within 1% of the optimal truncation. All plain-peft
loads run in ONE subprocess that never imports ``sparse_lowrank_peft`` (it checks ``sys.modules``).
"""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from _builders import BUILDERS, output_of
from _forkserver import fresh_python
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from test_sora import train_with_prox
from test_squeeze import tail_norm

from sparse_lowrank_peft import (
    DyLoraConfig,
    NolaConfig,
    SLTrainConfig,
    SoraConfig,
    SparseRandLoraConfig,
)
from sparse_lowrank_peft.export import export_to_lora
from sparse_lowrank_peft.squeeze import SqueezeError

PLAIN_PEFT_MANY = textwrap.dedent(
    r"""
    import json, sys, torch
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForSequenceClassification, AutoModelForCausalLM
    for job in json.load(open(sys.argv[1])):
        cfg = PeftConfig.from_pretrained(job["adapter"])
        assert cfg.peft_type == "LORA", cfg.peft_type
        auto = AutoModelForSequenceClassification if cfg.task_type == "SEQ_CLS" else AutoModelForCausalLM
        model = PeftModel.from_pretrained(auto.from_pretrained(job["base"]), job["adapter"]).eval()
        with torch.no_grad():
            out = model(**torch.load(job["inputs"])).logits
        torch.save(out, job["out"])
    assert not any(m.startswith("sparse_lowrank_peft") for m in sys.modules), "plain peft run imported our package"
    """
)

D = 36  # hidden size of the tiny builders: min(out, in) of every adapted layer

def _prox_trained(prune: bool):
    """SoRA trained with its proximal gate step (gates reach exact zeros), optionally pruned, before the export."""
    def prepare(pm, make_inputs):
        train_with_prox(pm, make_inputs, steps=15)
        if prune:
            pm.base_model.prune()
    return prepare


# name: (builder, config class, config fields, export rank, DyLoRA rank to evaluate at[, prepare(pm, make_inputs)])
CASES = {
    "lora": ("bert", LoraConfig, {"r": 6, "lora_alpha": 12, "init_lora_weights": False,
                                  "rank_pattern": {"value": 3}, "use_rslora": True}, None, None),
    "sora": ("bert", SoraConfig, {"r": 6, "init_weights": False}, None, None),
    "dylora-b3": ("bert", DyLoraConfig, {"r": 6, "init_weights": False}, 3, 3),
    "sora-llama": ("llama", SoraConfig, {"r": 6, "init_weights": False}, None, None),
    "sora-prox": ("bert", SoraConfig, {"r": 6, "init_weights": False, "sparse_lambda": 2.0}, None, None,
                  _prox_trained(prune=False)),
    "sora-prox-pruned": ("bert", SoraConfig, {"r": 6, "init_weights": False, "sparse_lambda": 2.0}, None, None,
                         _prox_trained(prune=True)),
    "dylora-roberta-b2": ("roberta", DyLoraConfig, {"r": 6, "init_weights": False}, 2, 2),
    "dylora-roberta-b6": ("roberta", DyLoraConfig, {"r": 6, "init_weights": False}, 6, 6),
    "nola": ("bert", NolaConfig, {"r": 4, "num_basis_A": 16, "num_basis_B": 8, "init_weights": False}, None, None),
    "sltrain-full": ("bert", SLTrainConfig, {"r": 4, "sparsity": 0.1, "init_weights": False}, D, None),
    "sltrain-gpt2-full": ("gpt2", SLTrainConfig, {"r": 4, "sparsity": 0.1, "init_weights": False}, D, None),
    "randlora-sparse-full": ("bert", SparseRandLoraConfig, {"r": 8, "basis_density": 0.3, "init_weights": False},
                             D, None),
    "randlora-dense-full": ("bert", SparseRandLoraConfig, {"r": 8, "basis_density": 1.0, "init_weights": False},
                            D, None),
}
TARGETS = {"bert": {"target_modules": ["query", "value"], "modules_to_save": ["pooler", "classifier"]},
           "roberta": {"target_modules": ["query", "value"]},
           "gpt2": {"target_modules": ["c_attn", "c_proj"]}, "llama": {"target_modules": "all-linear"}}


def build(case: str):
    family, cls, fields = CASES[case][:3]
    model, make_inputs, task_type = BUILDERS[family]()
    pm = get_peft_model(model, cls(task_type=task_type, **TARGETS[family], **fields)).eval()
    if len(CASES[case]) > 5:
        CASES[case][5](pm, make_inputs)
    return pm, make_inputs


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Export every case, then compute all plain-peft outputs in one subprocess."""
    root = tmp_path_factory.mktemp("export_all")
    bases = {}
    for family in ("bert", "roberta", "gpt2", "llama"):
        bases[family] = root / f"base-{family}"
        BUILDERS[family]()[0].save_pretrained(bases[family])
    jobs, expected = [], {}
    for case, (family, _, _, rank, eval_rank, *_) in CASES.items():
        pm, make_inputs = build(case)
        inputs = make_inputs(11)
        if eval_rank is not None:
            pm.base_model.set_rank(eval_rank)
        with torch.no_grad():
            expected[case] = output_of(pm, inputs)
        folder = export_to_lora(pm, root / case, rank=rank)
        torch.save(inputs, root / f"{case}-inputs.pt")
        jobs.append({"base": str(bases[family]), "adapter": str(folder), "inputs": str(root / f"{case}-inputs.pt"),
                     "out": str(root / f"{case}-out.pt")})
    (root / "jobs.json").write_text(json.dumps(jobs))
    proc = fresh_python(["-c", PLAIN_PEFT_MANY, root / "jobs.json"], timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = {case: torch.load(root / f"{case}-out.pt") for case in CASES}
    return root, expected, got


@pytest.mark.parametrize("case", sorted(CASES))
def test_plain_peft_reload_gives_equal_outputs(exported, case):
    root, expected, got = exported
    torch.testing.assert_close(got[case], expected[case], atol=1e-5, rtol=0)
    info = json.loads((root / case / "export_info.json").read_text())
    methods = {layer["method"] for layer in info["layers"].values()}
    rank = CASES[case][3]
    if case.startswith(("sltrain", "randlora")):
        assert methods == {"randomized"} and set(info["ranks"].values()) == {rank}
    elif case.startswith("dylora"):
        assert methods == {"nested"}
    else:
        assert methods == {"as-is"}


@pytest.mark.parametrize("case", ["sltrain-full", "randlora-sparse-full", "sora", "nola", "lora"])
def test_export_at_a_lower_rank_is_near_optimal(tmp_path, case):
    pm, _ = build(case)
    if case.startswith("randlora"):  # a trained-like γ (at init every basis is scaled alike: ΔW has rank r)
        for m in pm.modules():
            if hasattr(m, "sparse_randlora_gamma"):
                g = m.sparse_randlora_gamma["default"]
                with torch.no_grad():
                    g.copy_(torch.randn(g.shape, generator=torch.Generator().manual_seed(2)))
    deltas = {}
    for name, m in pm.base_model.model.named_modules():
        if hasattr(m, "get_delta_weight") and hasattr(m, "base_layer"):
            W = m.get_delta_weight("default").detach().double()
            deltas[name] = W.T if getattr(m, "fan_in_fan_out", False) else W
    k = 2
    folder = export_to_lora(pm, tmp_path / "lora", rank=k)
    state = load_file(str(folder / "adapter_model.safetensors"))
    exact = not case.startswith(("sltrain", "randlora"))
    for name, W in deltas.items():
        B = state[f"base_model.model.{name}.lora_B.weight"].double()
        A = state[f"base_model.model.{name}.lora_A.weight"].double()
        assert B.shape[1] == k
        err = float(torch.linalg.norm(W - B @ A))
        assert err <= (1 + 1e-6 if exact else 1.01) * tail_norm(W, k), (name, err / tail_norm(W, k))
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"]) == ("LORA", k, k)


@pytest.mark.parametrize("case", ["sltrain-full", "randlora-sparse-full"])
def test_sparse_or_full_rank_export_needs_a_rank(tmp_path, case):
    pm, _ = build(case)
    with pytest.raises(SqueezeError, match=r"not low-rank.*rank=16"):
        export_to_lora(pm, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(SqueezeError, match="at most 36"):
        export_to_lora(pm, tmp_path / "x", rank=37)


def test_export_leaves_the_model_unchanged(tmp_path):
    pm, make_inputs = build("sltrain-full")
    pm.train()
    inputs = make_inputs(3)
    pm.eval()
    with torch.no_grad():
        before = output_of(pm, inputs)
    pm.train()
    flags = {n: p.requires_grad for n, p in pm.named_parameters()}
    export_to_lora(pm, tmp_path / "lora", rank=4)
    assert pm.training and flags == {n: p.requires_grad for n, p in pm.named_parameters()}
    pm.eval()
    with torch.no_grad():
        torch.testing.assert_close(output_of(pm, inputs), before, atol=0, rtol=0)
