"""Per-module ranks and scales (``rank_pattern`` / ``alpha_pattern``, PEFT LoRA's fields and matching rule, and
``use_rslora``) for the tuners whose update is ``(lora_alpha / r) · B · A``: SLTrain (plain and LQ-initialised) and
NOLA.

Table-driven: every config below goes through the same checks (each layer's rank and scale, save and reload, merge,
export to plain LoRA); bad patterns each get one clear error before the model is touched.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _builders import BUILDERS, output_of, state_of, train_then_output
from peft import PeftModel, get_peft_model

from sparse_lowrank_peft import NolaConfig, SLTrainConfig, SoraConfig, export_to_lora
from sparse_lowrank_peft.delta.layer import DeltaLayer

# Tiny RoBERTa: layers 0 and 1, each with query / value (36 x 36) and intermediate.dense (37 x 36).
TARGETS = ["query", "value", "intermediate.dense"]
RANK_PATTERN = {"value": 6, r"layer\.1\..*query": 2, "intermediate.dense": 5}
ALPHA_PATTERN = {"query": 24}
#: module (suffix) -> (rank, lora_alpha) the patterns above give it, with r=4, lora_alpha=8
EXPECTED = {
    "layer.0.attention.self.query": (4, 24), "layer.1.attention.self.query": (2, 24),
    "layer.0.attention.self.value": (6, 8), "layer.1.attention.self.value": (6, 8),
    "layer.0.intermediate.dense": (5, 8), "layer.1.intermediate.dense": (5, 8),
}

CASES = {
    "sltrain": (SLTrainConfig, dict(sparsity=0.05), "sltrain", {"rank": 36}),
    "sltrain-lq": (SLTrainConfig, dict(sparsity=0.05, init_weights="lq", lq_max_iter=2), "sltrain", {"rank": 36}),
    "nola": (NolaConfig, dict(num_basis_A=7, num_basis_B=5), "nola", {}),
    "nola-rslora": (NolaConfig, dict(num_basis_A=7, num_basis_B=5, use_rslora=True), "nola", {}),
}


def _config(case: str, **overrides):
    cls, extra, _, _ = CASES[case]
    fields = dict(r=4, lora_alpha=8, target_modules=TARGETS, modules_to_save=["classifier"], task_type="SEQ_CLS",
                  rank_pattern=RANK_PATTERN, alpha_pattern=ALPHA_PATTERN, **extra)
    fields.update(overrides)
    return cls(**fields)


def _adapted_layers(model) -> dict[str, DeltaLayer]:
    return {name.split("encoder.")[-1]: m for name, m in model.named_modules() if isinstance(m, DeltaLayer)}


@pytest.fixture(scope="module", params=list(CASES))
def trained(request, tmp_path_factory):
    """``(case, model, make_inputs, reference output, saved folder)``: a few training steps, then saved."""
    case = request.param
    model, make_inputs, _ = BUILDERS["roberta"]()
    model = get_peft_model(model, _config(case))
    ref = train_then_output(model, make_inputs, torch.tensor([0, 1, 1]))
    folder = tmp_path_factory.mktemp(case) / "adapter"
    model.save_pretrained(folder)
    return case, model, make_inputs, ref, folder


def test_each_layer_gets_the_rank_and_scale_its_pattern_gives(trained):
    case, model, _, _, _ = trained
    prefix = CASES[case][2]
    layers = _adapted_layers(model)
    assert set(layers) == set(EXPECTED)
    for name, (rank, alpha) in EXPECTED.items():
        layer = layers[name]
        assert getattr(layer, f"{prefix}_r")["default"] == rank, name
        scale = alpha / (rank**0.5 if CASES[case][1].get("use_rslora") else rank)  # rsLoRA: α / √r
        assert getattr(layer, f"{prefix}_scaling")["default"] == pytest.approx(scale), name
        B, A = layer.lowrank_factors("default")
        assert A.shape == (rank, layer.in_features) and B.shape == (layer.out_features, rank), name


def test_reload_gives_equal_outputs_and_keeps_the_patterns(trained):
    _, _, make_inputs, ref, folder = trained
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == RANK_PATTERN and saved["alpha_pattern"] == ALPHA_PATTERN
    model, _, _ = BUILDERS["roberta"]()
    reloaded = PeftModel.from_pretrained(model, folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(output_of(reloaded, make_inputs(9)), ref, rtol=0, atol=0)


def test_merge_equals_the_unmerged_model(trained):
    _, _, make_inputs, ref, folder = trained
    merged_model, _, _ = BUILDERS["roberta"]()
    merged = PeftModel.from_pretrained(merged_model, folder).eval().merge_and_unload(dequantize=True)
    with torch.no_grad():
        torch.testing.assert_close(merged(**make_inputs(9)).logits, ref, rtol=1e-4, atol=1e-5)


def test_export_to_plain_lora_keeps_each_layers_rank(trained, tmp_path):
    case, model, make_inputs, ref, _ = trained
    if CASES[case][1].get("init_weights") == "lq":
        pytest.skip("LQ export (ΔW − L onto the full-precision base) is tested in test_lq_export.py")
    rank = CASES[case][3]
    if rank:  # SLTrain's sparse term: truncated SVD at full rank (exact up to rounding)
        out = export_to_lora(model, tmp_path / "lora", **rank)
    else:  # the factors as they are, one rank per layer (and a warning that LoRA servers scale such layers apart)
        with pytest.warns(UserWarning, match="per-layer ranks"):
            out = export_to_lora(model, tmp_path / "lora")
    base, _, _ = BUILDERS["roberta"]()
    lora = PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        torch.testing.assert_close(output_of(lora, make_inputs(9)), ref, rtol=1e-4, atol=1e-5)
    if not rank:
        info = json.loads((out / "adapter_config.json").read_text())
        ranks = {k.replace("\\", ""): v for k, v in info["rank_pattern"].items()}
        for name, (want, _) in EXPECTED.items():
            assert ranks.get(f"roberta.encoder.{name}", info["r"]) == want, name


def test_sora_rank_pattern_stays_the_ranks_pruning_kept():
    """SoRA's ``rank_pattern`` is not a per-module ``r``: a pruned layer keeps the scale ``lora_alpha / r``."""
    model, _, _ = BUILDERS["roberta"]()
    model = get_peft_model(model, SoraConfig(r=4, lora_alpha=8, target_modules=["query"],
                                             rank_pattern={"layer.0.attention.self.query": 2}))
    layer = _adapted_layers(model)["layer.0.attention.self.query"]
    assert layer.sora_A["default"].shape[0] == 2 and layer.sora_scaling["default"] == pytest.approx(8 / 4)


BAD = [
    (dict(rank_pattern=["value"]), "is not a mapping"),
    (dict(rank_pattern={"value": 0}), "is not a positive int rank"),
    (dict(rank_pattern={"value": 2.0}), "is not a positive int rank"),
    (dict(rank_pattern={"value": True}), "is not a positive int rank"),
    (dict(rank_pattern={"": 2}), "non-empty strings"),
    (dict(rank_pattern={"query(": 2}), "not a valid regex"),
    (dict(alpha_pattern={"value": float("nan")}), "is not a finite lora_alpha"),
    (dict(alpha_pattern={"value": "16"}), "is not a finite lora_alpha"),
    (dict(use_rslora="yes"), "must be True or False"),
]


@pytest.mark.parametrize("case", ["sltrain", "nola"])
@pytest.mark.parametrize("fields,message", BAD, ids=[m.replace(" ", "_") + str(i) for i, (_, m) in enumerate(BAD)])
def test_bad_patterns_are_refused_by_the_config(case, fields, message):
    with pytest.raises(ValueError, match=message):
        _config(case, **{"rank_pattern": {}, "alpha_pattern": {}, **fields})


@pytest.mark.parametrize("case", ["sltrain", "nola", "sltrain-lq"])
@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_a_key_naming_no_targeted_module_is_refused_before_the_model_changes(case, field):
    model, _, _ = BUILDERS["roberta"]()
    before = state_of(model)
    config = _config(case, **{field: {"key_proj": 3}})  # a typo (or a module of another model)
    with pytest.raises(ValueError, match=rf"{field} keys \['key_proj'\] name no targeted module"):
        get_peft_model(model, config)
    assert not any(isinstance(m, DeltaLayer) for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_a_key_shadowed_by_an_earlier_one_is_refused():
    """PEFT's rule takes the first key naming a module: a later key naming only such modules would do nothing."""
    model, _, _ = BUILDERS["roberta"]()
    with pytest.raises(ValueError, match=r"keys \['layer\.0\.attention\.self\.value'\]"):
        get_peft_model(model, _config("sltrain", rank_pattern={"value": 6, "layer.0.attention.self.value": 3}))


def test_lq_rank_is_checked_per_module_before_anything_is_quantized():
    model, _, _ = BUILDERS["roberta"]()
    with pytest.raises(ValueError, match=r"rank 40 is above what '.*layer\.0\.attention\.self\.value'"):
        get_peft_model(model, _config("sltrain-lq", rank_pattern={"value": 40}))
    assert not any(isinstance(m, DeltaLayer) for m in model.modules())


def test_a_recipe_passes_the_patterns_to_the_config():
    from glue.config import build_config
    from glue.model import effective_peft_fields, make_peft_config

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "minilm" / "sltrain-rte.yaml"
    cfg = build_config(str(recipe), ["peft.rank_pattern={value: 16}", "peft.alpha_pattern={value: 32}"])
    config = make_peft_config(cfg.method, effective_peft_fields(cfg), ["pooler", "classifier"])
    assert isinstance(config, SLTrainConfig)
    assert config.rank_pattern == {"value": 16} and config.alpha_pattern == {"value": 32}
