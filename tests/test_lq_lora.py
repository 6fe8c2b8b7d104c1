"""LQ-LoRA with PEFT's own LoRA (sparse_lowrank_peft.lq_lora): the adapter starts at L on the planned quantized
bases (HQQ and bitsandbytes), trains, saves and reloads in a fresh process to equal outputs (Fisher-weighted too),
merges with PEFT; bad requests are refused before the model changes."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from _builders import _ids, output_of, train_then_output
from _fresh import reload_outputs
from peft import LoraConfig

from sparse_lowrank_peft.delta import fisher as fisher_weights
from sparse_lowrank_peft.delta import quant
from sparse_lowrank_peft.delta.lq_checks import plan_choice
from sparse_lowrank_peft.lq_lora import LQ_LORA_FILE, get_lq_lora_model, load_lq_lora, save_lq_lora

pytest.importorskip("bitsandbytes", reason="NF4 bases need bitsandbytes")
pytest.importorskip("hqq", reason="the plan uses HQQ configurations")
from test_bitbudget import PLAN, encoder_linears, tiny_roberta  # noqa: E402

QV = ["roberta.encoder.layer.0.attention.self.query", "roberta.encoder.layer.0.attention.self.value",
      "roberta.encoder.layer.1.attention.self.query", "roberta.encoder.layer.1.attention.self.value"]


def lora(**extra) -> LoraConfig:
    return LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], task_type="SEQ_CLS", **extra)


def structure(model) -> dict:
    return {n: type(m).__name__ for n, m in model.named_modules()}


def test_lora_starts_at_l_on_the_planned_bases():
    """Each targeted layer computes dequantize(Q) + scaling·B·A = Q + L of the LQ decomposition, on the library the
    plan names (PEFT's HQQ and bitsandbytes LoRA layers)."""
    full = tiny_roberta()
    pm = get_lq_lora_model(tiny_roberta(), lora(), plan=PLAN, max_iter=3)
    kinds = {key: type(pm.base_model.model.get_submodule(key).base_layer).__name__ for key in QV}
    assert kinds == {QV[0]: "HQQLinear", QV[1]: "Linear4bit", QV[2]: "HQQLinear", QV[3]: "Linear4bit"}
    for key in QV:
        layer = pm.base_model.model.get_submodule(key)
        W = full.get_submodule(key).weight.detach()
        result = quant.lq_decompose(W, 2, max_iter=3, quantizer=plan_choice(PLAN, key).quantize_dequantize)
        effective = quant.dequantize_weight(layer.base_layer) + layer.get_delta_weight("default")
        torch.testing.assert_close(effective, result.Q + result.B @ result.A, atol=1e-6, rtol=1e-6)


#: fresh-process reload cases: (Fisher-weighted LQ, SVD)
RELOAD_CASES = {"plain": (False, "auto"), "fisher": (True, "auto"), "randomized-svd": (False, "randomized")}


@pytest.fixture(scope="module")
def trained_and_reloaded(tmp_path_factory):
    """Each case trained and saved, then all reloaded in one fresh process: ``{case: (model, expected, folder,
    reloaded outputs)}``."""
    root = tmp_path_factory.mktemp("lq_lora_reload")
    gen = torch.Generator().manual_seed(0)
    weights = {key: (torch.rand(64, generator=gen) * 10 + 0.01, torch.rand(64, generator=gen) * 10 + 0.01)
               for key in QV}
    trained = {}
    for case, (fisher, svd) in RELOAD_CASES.items():
        with fisher_weights.use_fisher(weights) if fisher else contextlib.nullcontext():
            pm = get_lq_lora_model(tiny_roberta(), lora(), plan=PLAN, max_iter=3, svd=svd)
        expected = train_then_output(pm, _ids, torch.tensor([0, 1, 0]))
        save_lq_lora(pm, root / case)
        trained[case] = (pm, expected, root / case)
    got = reload_outputs([("lq_lora", folder) for _, _, folder in trained.values()])
    return {case: (pm, expected, folder, got[str(folder)]) for case, (pm, expected, folder) in trained.items()}


@pytest.mark.parametrize("case", RELOAD_CASES)
def test_trains_saves_and_reloads_in_a_fresh_process(trained_and_reloaded, case):
    fisher, svd = RELOAD_CASES[case]
    pm, expected, folder, got = trained_and_reloaded[case]
    saved = json.loads((folder / LQ_LORA_FILE).read_text())
    assert saved["targets"] == QV and saved["plan"] == PLAN and saved["rank"] == 2 and saved["svd"] == svd
    assert (saved.get("fisher_file") == fisher_weights.LQ_FISHER_FILE) is fisher
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "LORA"
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    # PEFT's merge re-quantizes Q + ΔW in each layer's configuration: close, not exact
    merged = pm.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(output_of(merged, _ids(9)), expected, atol=0.05, rtol=0)


def test_nf4_without_a_plan():
    pm = get_lq_lora_model(tiny_roberta(), lora(), max_iter=2)
    assert {type(pm.base_model.model.get_submodule(k).base_layer).__name__ for k in QV} == {"Linear4bit"}


@pytest.mark.parametrize("targets, plan, wrapped", [("all-linear", None, ["Linear4bit"] * 12),
                                                   ("all-linear", "hqq", ["HQQLinear"] * 4 + ["Linear4bit"] * 8),
                                                   (["dense"], None, ["Linear4bit"] * 6)],
                         ids=["all-linear", "all-linear-hqq", "dense"])
def test_the_targets_are_the_linears_peft_wraps(targets, plan, wrapped):
    """LQ quantizes exactly the linears PEFT's LoRA then wraps, and LoRA wraps every one: ``all-linear`` (PEFT's
    shorthand; it once matched no module, and PEFT skips a target that HQQ holds) is every encoder linear, and a
    SEQ_CLS head PEFT trains instead (RoBERTa's ``classifier.dense``, which ``dense`` also names) stays full
    precision (quantizing it made PEFT fail to train it)."""
    model = tiny_roberta()
    linears = encoder_linears(model)
    if plan:  # the query/key of each layer in HQQ, the rest NF4
        plan = {n: "hqq-4bit-g64" if n.endswith(("query", "key")) else "bnb-nf4" for n in linears}
    config = LoraConfig(r=2, lora_alpha=4, target_modules=targets, task_type="SEQ_CLS")
    pm = get_lq_lora_model(model, config, plan=plan, max_iter=2)
    bases = sorted(type(m.base_layer).__name__ for m in pm.modules() if hasattr(m, "lora_A"))
    assert bases == wrapped  # 2 layers x 6 encoder linears, of which 3 are named dense
    head = pm.base_model.model.classifier.modules_to_save["default"]
    assert type(head.dense) is torch.nn.Linear and head.dense.weight.requires_grad


@pytest.mark.parametrize("config,kwargs,match", [
    (lora(use_dora=True), {}, r"sets \['use_dora'\]"),
    (lora(init_lora_weights="gaussian"), {}, r"sets \['init_lora_weights'\]"),
    (LoraConfig(r=2, task_type="SEQ_CLS"), {}, "target_modules is None"),
    (LoraConfig(r=2, target_modules=["nothing"]), {}, "matches no module"),
    (LoraConfig(r=2, target_modules=["dense"], task_type="SEQ_CLS"), {"plan": {"dense": "bnb-nf4"}},
     "not a full-precision|are not"),
    (lora(), {"plan": {"query": "hqq-3bit-g64"}}, "no configuration for the targeted module"),
    (lora(), {"plan": {**PLAN, "roberta.encoder.layer.0.attention.self.query": "hqq-2bit-g2048"}},
     "cannot do"),
    (lora(), {"quant_type": "int3"}, "quant_type"),
    (lora(), {"max_iter": 0}, "max_iter=0"),
    (lora(), {"svd": "fast"}, "svd='fast'"),
])
def test_bad_requests_are_refused_before_the_model_changes(config, kwargs, match):
    model = tiny_roberta()
    if "dense" in str(config.target_modules):
        quant.quantize_linears(model, ["roberta.encoder.layer.0.output.dense"])  # one target already 4-bit
    before = structure(model)
    with pytest.raises((ValueError, TypeError), match=match):
        get_lq_lora_model(model, config, **kwargs)
    assert structure(model) == before


LATER = "roberta.encoder.layer.1.attention.self.value"  # a target after others: a midway error left them quantized


@pytest.mark.parametrize("make", ["lora", "sltrain"])
@pytest.mark.parametrize("fisher,match", [
    (None, r"rank 65 is above what 'roberta.encoder.layer.0.attention.self.query' \(64x64\) has"),
    ({LATER: (torch.ones(63), torch.ones(64))}, r"Fisher weights of '.*layer.1.attention.self.value' have shapes"),
    ({LATER: (torch.full((64,), float("nan")), torch.ones(64))}, "not all finite and non-negative"),
])
def test_lq_inputs_of_every_target_are_checked_before_the_first_is_quantized(make, fisher, match):
    from peft import get_peft_model

    from sparse_lowrank_peft import SLTrainConfig

    model = tiny_roberta()
    before = structure(model)
    r = 65 if fisher is None else 2
    with fisher_weights.use_fisher(fisher or {}), pytest.raises(ValueError, match=match + ".*not changed"):
        if make == "lora":
            get_lq_lora_model(model, LoraConfig(r=r, target_modules=["query", "value"], task_type="SEQ_CLS"))
        else:
            get_peft_model(model, SLTrainConfig(r=r, target_modules=["query", "value"], init_weights="lq",
                                                task_type="SEQ_CLS"))
    assert structure(model) == before


def test_an_lq_adapter_is_refused_by_another_base_before_its_weights_are_replaced(tmp_path):
    """Loading re-derives Q first; PEFT checks the weights' shapes only after, when W is gone (57 modules of the
    user's model had changed). Both loaders now compare the saved factors with the layers first."""
    from peft import PeftModel, get_peft_model
    from transformers import RobertaConfig, RobertaForSequenceClassification

    from sparse_lowrank_peft import SLTrainConfig

    save_lq_lora(get_lq_lora_model(tiny_roberta(), lora(), max_iter=1), tmp_path / "lora")
    get_peft_model(tiny_roberta(), SLTrainConfig(r=2, target_modules=["query", "value"], init_weights="lq",
                                                 lq_max_iter=1, task_type="SEQ_CLS")).save_pretrained(tmp_path / "sl")
    for load in (lambda m: load_lq_lora(m, tmp_path / "lora"), lambda m: PeftModel.from_pretrained(m, tmp_path / "sl")):
        torch.manual_seed(0)
        wider = RobertaForSequenceClassification(RobertaConfig(vocab_size=97, hidden_size=128, num_hidden_layers=2,
                                                               num_attention_heads=4, intermediate_size=37,
                                                               max_position_embeddings=40))
        before = structure(wider)
        with pytest.raises(ValueError, match=r"shape \(2, 64\).*128x128.*not changed"):
            load(wider)
        assert structure(wider) == before


def test_save_and_load_refuse_what_they_cannot_rebuild(tmp_path):
    from peft import get_peft_model

    plain = get_peft_model(tiny_roberta(), lora())
    with pytest.raises(ValueError, match="not made by get_lq_lora_model"):
        save_lq_lora(plain, tmp_path)
    plain.save_pretrained(tmp_path)
    model = tiny_roberta()
    before = structure(model)
    with pytest.raises(ValueError, match=f"has no {LQ_LORA_FILE}"):
        load_lq_lora(model, tmp_path)
    assert structure(model) == before


def test_the_plans_other_linears_are_quantized_and_rebuilt(tmp_path):
    extra = "roberta.encoder.layer.1.attention.output.dense"
    pm = get_lq_lora_model(tiny_roberta(), lora(), plan={**PLAN, extra: "bnb-nf4"}, max_iter=2)
    assert type(pm.base_model.model.get_submodule(extra)).__name__ == "Linear4bit"
    expected = train_then_output(pm, _ids, torch.tensor([0, 1, 0]))
    save_lq_lora(pm, tmp_path)
    reloaded = load_lq_lora(tiny_roberta(), tmp_path).eval()
    assert type(reloaded.base_model.model.get_submodule(extra)).__name__ == "Linear4bit"
    with torch.no_grad():
        torch.testing.assert_close(output_of(reloaded, _ids(9)), expected, atol=0, rtol=0)


def test_load_warns_when_the_quantizers_differ_from_the_recorded_ones(tmp_path):
    """lq_lora.json records the versions of the libraries the plan quantizes with; loading with others warns."""
    import warnings
    from importlib.metadata import version

    pm = get_lq_lora_model(tiny_roberta(), lora(), plan=PLAN, max_iter=2)
    save_lq_lora(pm, tmp_path)
    saved = json.loads((tmp_path / LQ_LORA_FILE).read_text())
    assert saved["quantizers"] == {"bitsandbytes": version("bitsandbytes"), "hqq": version("hqq")}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        load_lq_lora(tiny_roberta(), tmp_path)
    assert not [w for w in seen if "quantizer versions" in str(w.message)]
    saved["quantizers"]["hqq"] = "0.1.0"
    (tmp_path / LQ_LORA_FILE).write_text(json.dumps(saved))
    with pytest.warns(UserWarning, match=r"hqq 0.1.0 -> "):
        load_lq_lora(tiny_roberta(), tmp_path)
