"""Bit budgets (delta/bitbudget.py): the measurement, the integer program, a plan applied through LQ initialisation
(train, save, reload in a fresh process, exact dequantized merge) and the errors for bad input."""

from __future__ import annotations

import json

import pytest
import torch
from _builders import VOCAB, _ids, at_thread_counts, output_of, tiny_roberta, train_then_output
from _fresh import reload_outputs
from peft import get_peft_model

from sparse_lowrank_peft import SLTrainConfig, SoraConfig
from sparse_lowrank_peft.delta import bitbudget as bb
from sparse_lowrank_peft.delta import quant

pytest.importorskip("bitsandbytes", reason="bit budgets use bitsandbytes NF4 candidates")
pytest.importorskip("hqq", reason="bit budgets use HQQ candidates (pip install hqq)")

SMALL = [bb.QuantChoice("hqq", 2, 64), bb.QuantChoice("hqq", 3, 64), bb.QuantChoice("hqq", 4, 64),
         bb.QuantChoice("bnb", 4, 64, False)]


@pytest.fixture(scope="module")
def table():
    g = torch.Generator().manual_seed(0)
    # layers of different scale and spectrum: the program should spend bits where the error is large
    weights = {"a": torch.randn(64, 64, generator=g) * 3.0, "b": torch.randn(64, 128, generator=g),
               "c": torch.randn(128, 64, generator=g) * 0.3}
    return bb.measure(weights, rank=2, choices=SMALL, max_iter=2)


def test_bits_are_counted_from_the_stored_tensors():
    W = torch.randn(64, 128)
    nf4 = bb.QuantChoice("bnb", 4, 64).quantize(W)
    expected = sum(v.numel() * v.element_size() * 8 for k, v in nf4.state_dict().items() if "bias" not in k)
    assert bb.storage_bits(nf4) == expected
    # 4-bit codes + one fp32 absmax per 64 values + bitsandbytes' 16-entry code table
    assert expected == 64 * 128 * 4 + (64 * 128 // 64) * 32 + 16 * 32 + 8 * len(nf4.state_dict()["weight.quant_state.bitsandbytes__nf4"])
    hqq2 = bb.QuantChoice("hqq", 2, 64).quantize(W)
    bits = bb.storage_bits(hqq2) / W.numel()
    assert 2.5 <= bits < 2.6  # 2-bit codes + fp16 scale and zero per 64 values + ~70 bytes of metadata tensors


def test_hqq_scales_and_zeros_follow_the_model_to_another_device():
    """``model.to(device)`` moves an HQQ layer's scales and zeros with its codes (hqq 0.2.8 keeps them in a dict
    that torch does not move, so on a GPU they stayed on the CPU); a dtype change leaves them fp32 and the output
    unchanged, as it leaves the codes."""
    layer = bb.QuantChoice("hqq", 3, 64).quantize(torch.randn(96, 128, generator=torch.Generator().manual_seed(0)))
    x = torch.randn(4, 128)
    before = layer(x)
    model = torch.nn.Sequential(layer).to(torch.float64)
    assert layer.meta["scale"].dtype == torch.float32 and torch.equal(layer(x), before)
    assert layer.to("cpu") is layer and layer.cpu() is layer
    model.to(torch.device("meta"))  # a device without data: where every tensor went is all there is to see
    assert {layer.W_q.device.type, layer.meta["scale"].device.type, layer.meta["zero"].device.type} == {"meta"}


def test_the_plan_beats_every_uniform_configuration_within_its_bits(table):
    uniform = bb.uniform_points(table)
    for budget in (2.6, 3.0, 3.6, 4.4):
        plan = bb.solve(table, budget)
        got = bb.plan_summary(table, plan)
        assert got["bits_per_param"] <= budget + 1e-9
        for u in uniform:
            if u["bits_per_param"] <= got["bits_per_param"] + 1e-9:
                assert got["error"] <= u["error"] + 1e-6, (budget, u)


def test_solve_is_optimal_on_a_table_small_enough_to_enumerate(table):
    import itertools

    layers, names = list(table.numel), table.choices()
    total = sum(table.numel.values())
    for budget in (2.6, 3.3, 4.0):
        best = min(
            (sum(table.error[l][c] for l, c in zip(layers, combo)), combo)
            for combo in itertools.product(names, repeat=len(layers))
            if sum(table.bits[l][c] for l, c in zip(layers, combo)) <= budget * total
        )
        plan = bb.solve(table, budget)
        assert bb.plan_summary(table, plan)["error"] == pytest.approx(best[0], rel=1e-9)


def test_budget_below_the_cheapest_plan_is_refused(table):
    with pytest.raises(ValueError, match=r"budget_bits=1.0 is below the smallest plan.*Fix: a budget of at least"):
        bb.solve(table, 1.0)


def test_api_misuse_gets_a_clear_error(table):
    """Each raised a raw TypeError / KeyError / AttributeError, or (a misspelled choice) was silently dropped."""
    with pytest.raises(ValueError, match="budget_bits='3' must be a positive number"):
        bb.solve(table, "3")
    with pytest.raises(ValueError, match=r"choices \['bnb-nf5'\] were not measured"):
        bb.solve(table, 4.5, choices=["bnb-nf4", "bnb-nf5"])
    with pytest.raises(ValueError, match="plan_summary: the table has no measurement for"):
        bb.plan_summary(table, {"no.such.layer": "bnb-nf4"})
    layer = next(iter(table.numel))
    one = bb.plan_summary(table, {layer: "bnb-nf4"})  # over the matrices the plan covers, not the whole table
    assert one["bits_per_param"] == pytest.approx(table.bits[layer]["bnb-nf4"] / table.numel[layer])
    with pytest.raises(ValueError, match="max_iter=0 must be a positive int"):
        quant.lq_decompose(torch.randn(8, 8), 2, max_iter=0)


def test_choice_spellings():
    assert bb.parse_choice("hqq-3bit-g64") == bb.QuantChoice("hqq", 3, 64)
    assert bb.parse_choice("bnb-nf4-dq").double_quant
    for name in ("bnb-nf4", "bnb-nf4-dq", "bnb-fp4", "bnb-fp4-dq", "hqq-2bit-g128"):  # a spelling names its choice
        assert bb.parse_choice(name).name == name
    assert bb.parse_choice("bnb-fp4-dq") == bb.QuantChoice("bnb", 4, 64, True, "fp4")
    for bad in ("hqq-5bit-g64", "hqq-3bit-g48", "int4", "bnb-fp8", "bnb-fp4-q"):
        with pytest.raises(ValueError, match="quantization configuration"):
            bb.parse_choice(bad)
    assert bb.QuantChoice("hqq", 2, 64).unsupported((36, 36))  # 1296 values: not a multiple of 64
    assert bb.QuantChoice("bnb", 4, 64).unsupported((36, 36)) is None


@pytest.mark.parametrize("name", ["bnb-nf4-dq", "bnb-fp4", "bnb-fp4-dq"])
def test_bnb_choice_quantizes_as_its_name_says(name):
    """The layer a bitsandbytes choice builds holds its quant type and double quantization (its error: bnb's own)."""
    pytest.importorskip("bitsandbytes")
    from sparse_lowrank_peft.delta.quant import quantize_dequantize

    choice = bb.parse_choice(name)
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    state = choice.quantize(W).weight.quant_state
    assert state.quant_type == choice.quant_type and bool(state.nested) == choice.double_quant
    torch.testing.assert_close(choice.quantize_dequantize(W), quantize_dequantize(W, choice.quant_type, choice.double_quant))


# ---------------------------------------------------------------------------------------------- a plan applied
def encoder_linears(model) -> list[str]:
    """The names of the model's encoder ``nn.Linear`` layers (what ``all-linear`` adapts on a SEQ_CLS model)."""
    return [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and ".encoder." in n]


PLAN = {
    "roberta.encoder.layer.0.attention.self.query": "hqq-3bit-g64",
    "roberta.encoder.layer.0.attention.self.value": "bnb-nf4",
    "roberta.encoder.layer.1.attention.self.query": "hqq-2bit-g32",
    "roberta.encoder.layer.1.attention.self.value": "bnb-nf4-dq",
}


def plan_config(cls=SLTrainConfig, plan=PLAN, **extra):
    fields = {"r": 2, "target_modules": ["query", "value"], "init_weights": "lq", "lq_plan": plan, "lq_max_iter": 3,
              "task_type": "SEQ_CLS", **extra}
    if cls is SLTrainConfig:
        fields["sparsity"] = 0.1
    return cls(**fields)


RELOAD_CASES = {"sltrain": SLTrainConfig, "sora": SoraConfig}


@pytest.fixture(scope="module")
def trained_and_reloaded(tmp_path_factory):
    """Each tuner trained on the plan's base and saved, then all reloaded in one fresh process (``_fresh``):
    ``{case: (model, expected, folder, reloaded outputs)}``."""
    root = tmp_path_factory.mktemp("plan_reload")
    trained = {}
    for case, cls in RELOAD_CASES.items():
        pm = get_peft_model(tiny_roberta(), plan_config(cls))
        kinds = {n: type(m.base_layer).__name__ for n, m in pm.named_modules()
                 if n.endswith(("query", "value")) and hasattr(m, "base_layer")}
        assert sorted(kinds.values()) == ["HQQLinear", "HQQLinear", "Linear4bit", "Linear4bit"], kinds
        expected = train_then_output(pm, _ids, torch.tensor([0, 1, 0]))
        pm.save_pretrained(root / case)
        trained[case] = (pm, expected, root / case)
    got = reload_outputs([("peft", folder) for _, _, folder in trained.values()])
    return {case: (pm, expected, folder, got[str(folder)]) for case, (pm, expected, folder) in trained.items()}


@pytest.mark.parametrize("case", RELOAD_CASES)
def test_plan_trains_saves_and_reloads_in_a_fresh_process(trained_and_reloaded, case):
    pm, expected, folder, got = trained_and_reloaded[case]
    assert json.loads((folder / "adapter_config.json").read_text())["lq_plan"] == PLAN
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    # exact full-precision merge: the merged weights are the dequantized bases plus the deltas
    merged = pm.merge_and_unload(dequantize=True)
    with torch.no_grad():
        torch.testing.assert_close(output_of(merged, _ids(9)), expected, atol=1e-5, rtol=1e-5)


def test_plan_errors_come_before_anything_is_quantized():
    model = tiny_roberta()
    before = {n: type(m).__name__ for n, m in model.named_modules()}
    other = dict(PLAN)
    other["roberta.encoder.layer.7.attention.self.query"] = "bnb-nf4"
    with pytest.raises(ValueError, match=r"lq_plan names modules this model has no linear layer for.*layer\.7.*not changed"):
        get_peft_model(model, plan_config(plan=other))
    missing = {k: v for k, v in PLAN.items() if "layer.1.attention.self.value" not in k}
    with pytest.raises(ValueError, match=r"no configuration for the targeted module.*layer\.1\.attention\.self\.value"):
        get_peft_model(model, plan_config(plan=missing))
    assert {n: type(m).__name__ for n, m in model.named_modules()} == before


def test_all_linear_targets_are_resolved_before_the_checks():
    """PEFT's ``target_modules="all-linear"`` is resolved (as PEFT's injection will) before the checks that precede
    it: a plan missing one of those linears is refused with the model untouched, a whole plan quantizes every one,
    and the Fisher weights of every target are recorded for the reload. Matching the shorthand as a module name
    found no target, so the plan check came after quantizing and no Fisher weight was recorded."""
    from sparse_lowrank_peft.delta.fisher import use_fisher

    model = tiny_roberta()
    before = {n: type(m).__name__ for n, m in model.named_modules()}
    with pytest.raises(ValueError, match=r"no configuration for the targeted module.*attention\.self\.key"):
        get_peft_model(model, plan_config(target_modules="all-linear"))
    assert {n: type(m).__name__ for n, m in model.named_modules()} == before
    linears = encoder_linears(model)
    fisher = {n: (torch.rand(model.get_submodule(n).out_features) + 0.5,
                  torch.rand(model.get_submodule(n).in_features) + 0.5) for n in linears}
    config = plan_config(plan={n: "bnb-nf4" for n in linears}, target_modules="all-linear")
    with use_fisher(fisher):
        pm = get_peft_model(model, config)
    bases = [type(m.base_layer).__name__ for m in pm.modules() if hasattr(m, "sltrain_A")]
    assert bases == ["Linear4bit"] * 12  # 2 layers x 6 encoder linears; the classifier is the SEQ_CLS head
    assert sorted(config.lq_fisher) == sorted(linears)


def test_all_linear_adapts_an_hqq_base_too():
    """On a base already quantized by a plan, ``all-linear`` adapts the HQQ linears as well as the bitsandbytes
    ones: PEFT's shorthand takes only ``nn.Linear`` subclasses, which HQQ's layer is not, so PEFT (its LoRA too)
    skips those silently."""
    model = tiny_roberta()
    linears = encoder_linears(model)
    bb.apply_plan(model, {n: "hqq-4bit-g64" if n.endswith("attention.output.dense") else "bnb-nf4" for n in linears})
    pm = get_peft_model(model, SLTrainConfig(r=2, sparsity=0.1, target_modules="all-linear", task_type="SEQ_CLS"))
    bases = sorted(type(m.base_layer).__name__ for m in pm.modules() if hasattr(m, "sltrain_A"))
    assert bases == ["HQQLinear"] * 2 + ["Linear4bit"] * 10


def test_merging_into_an_hqq_base_keeps_its_bias():
    """PEFT's HQQ backend re-quantizes a merged weight into a new HQQLinear without the old bias (PEFT's LoRA loses
    it too). A zero adapter merged into HQQ 4-bit layers must leave the outputs at the re-quantization error:
    measured 4.5e-6 on this model (logits up to 5.8e-2), and 1.6e-3 with the biases lost."""
    model = tiny_roberta()
    linears = encoder_linears(model)
    with torch.no_grad():  # RoBERTa initialises biases to zero, which would hide a lost one
        for name in linears:
            model.get_submodule(name).bias.normal_(std=0.1)
    bb.apply_plan(model, {n: "hqq-4bit-g64" for n in linears if ".attention." in n})  # the 64x64 ones
    inputs = _ids(3)
    with torch.no_grad():
        base = model(**inputs).logits
    pm = get_peft_model(model, SLTrainConfig(r=2, sparsity=0.1, target_modules=["query", "value"], task_type="SEQ_CLS"))
    with pytest.warns(UserWarning, match="re-quantizes"):
        pm.merge_adapter()
    layer = pm.base_model.model.roberta.encoder.layer[0].attention.self.query
    assert layer.get_base_layer().bias is not None
    with torch.no_grad():
        merged = pm(**inputs).logits
    assert (merged - base).abs().max() <= 1e-4  # re-quantization only


def test_a_configuration_the_library_cannot_do_is_refused_before_quantizing():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    model = RobertaForSequenceClassification(RobertaConfig(vocab_size=VOCAB, hidden_size=36, num_hidden_layers=1,
                                                           num_attention_heads=4, intermediate_size=37,
                                                           max_position_embeddings=40))
    plan = {"roberta.encoder.layer.0.attention.self.query": "hqq-2bit-g64",
            "roberta.encoder.layer.0.attention.self.value": "bnb-nf4"}
    with pytest.raises(ValueError, match=r"cannot do: HQQ needs the weight's size \(36x36 = 1296\) divisible by the "
                                         r"group size 64.*not changed"):
        get_peft_model(model, plan_config(plan=plan))
    assert type(model.roberta.encoder.layer[0].attention.self.query) is torch.nn.Linear
    # HQQ's 2-bit packing takes the groups four at a time, unpadded: 37 groups of 64 (a 37x64 weight) it cannot do
    model = RobertaForSequenceClassification(RobertaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=1,
                                                           num_attention_heads=4, intermediate_size=37,
                                                           max_position_embeddings=40))
    plan = {"roberta.encoder.layer.0.intermediate.dense": "hqq-2bit-g64"}
    with pytest.raises(ValueError, match=r"cannot do: HQQ packs 4 groups' 2-bit codes together.*37.*not changed"):
        get_peft_model(model, plan_config(plan=plan, target_modules=["intermediate.dense"]))
    assert type(model.roberta.encoder.layer[0].intermediate.dense) is torch.nn.Linear
    # apply_plan on its own: the same check before the first module is quantized (HQQ asserted midway through)
    plan = {"roberta.encoder.layer.0.attention.self.query": "bnb-nf4", **plan}
    with pytest.raises(ValueError, match=r"plan\['roberta.encoder.layer.0.intermediate.dense'\] = 'hqq-2bit-g64'.*"
                                         r"cannot do.*not changed"):
        bb.apply_plan(model, plan)
    assert type(model.roberta.encoder.layer[0].attention.self.query) is torch.nn.Linear


def test_bad_plan_in_the_config():
    with pytest.raises(ValueError, match=r"lq_plan\['q'\]: quantization configuration 'hqq-9bit-g64'"):
        plan_config(plan={"q": "hqq-9bit-g64"})
    with pytest.raises(ValueError, match=r"lq_plan is set but init_weights=True"):
        SLTrainConfig(target_modules=["q"], lq_plan={"q": "bnb-nf4"})


def test_hqq_base_takes_the_spmm_path_at_training_batch_sizes(monkeypatch):
    """A base without a dense ``weight`` (HQQ) cannot be folded into: the dispatcher keeps SpMM for it, whatever the
    token count (a run of 1,024 tokens once failed reading ``HQQLinear.weight``)."""
    from sparse_lowrank_peft.delta import ops

    monkeypatch.setenv(ops.PATH_ENV, "auto")
    pm = get_peft_model(tiny_roberta(), plan_config())
    layer = pm.base_model.model.roberta.encoder.layer[0].attention.self.query
    x = torch.randn(8, 128, 64)
    assert not layer._fused_adapters(x)
    assert list(pm.base_model.model.roberta.encoder.layer[0].attention.self.value._fused_adapters(x)) == ["default"]
    out = pm(input_ids=torch.randint(3, VOCAB, (8, 32)))
    assert torch.isfinite(out.logits).all()


def test_cli_prints_and_plots_a_plan(table, tmp_path, capsys):
    from sparse_lowrank_peft import cli

    path = tmp_path / "bitbudget.json"
    path.write_text(json.dumps({"table": table.to_dict()}))
    assert cli.main(["plan", str(path), "--budget", "3.3", "--plot", str(tmp_path / "new" / "c.png"),
                     "--json", str(tmp_path / "new2" / "plan.json")]) == 0  # folders created before the work
    out = capsys.readouterr().out
    plan = json.loads((tmp_path / "new2" / "plan.json").read_text())
    assert plan == bb.solve(table, 3.3) and all(f"{n}" in out for n in plan)
    assert "bits per parameter (budget 3.3)" in out and (tmp_path / "new" / "c.png").stat().st_size > 0
    for bad in ("nan", "inf", "-1", "abc"):
        with pytest.raises(SystemExit):
            cli.main(["plan", str(path), "--budget", bad])
        assert "not a positive number of bits per parameter" in capsys.readouterr().err
    assert cli.main(["plan", str(path), "--budget", "1"]) == 2
    assert "below the smallest plan" in capsys.readouterr().err
    assert cli.main(["plan", str(tmp_path / "missing.json"), "--budget", "3"]) == 2


def test_layers_without_an_adapter_are_measured_quantized_alone():
    g = torch.Generator().manual_seed(1)
    weights = {"target": torch.randn(64, 64, generator=g), "other": torch.randn(64, 64, generator=g)}
    tab = bb.measure(weights, rank=4, choices=SMALL[:2], lq_layers=["target"])
    for choice in SMALL[:2]:
        W = weights["other"]
        alone = float((W - choice.quantize_dequantize(W)).square().sum())
        assert tab.error["other"][choice.name] == pytest.approx(alone, rel=1e-6)
        with_l = tab.error["target"][choice.name]
        W = weights["target"]
        assert with_l < float((W - choice.quantize_dequantize(W)).square().sum())


def _hidden(model, batches):
    with torch.no_grad():
        return [model(**b, output_hidden_states=True).hidden_states[-1][b["attention_mask"].bool()] for b in batches]


def test_output_objective_is_each_layers_change_of_the_models_output():
    """measure_output: e[l, c] = ‖H(W_l → Q_c + L) − H‖² / ‖H‖², L only on the LQ layers; weights restored."""
    from _builders import build_bert

    from sparse_lowrank_peft.delta.quant import lq_decompose

    model, ids, _ = build_bert(hidden=64)
    batches = [ids(0, batch=2, length=9), ids(1, batch=3, length=5)]
    batches[1]["attention_mask"][0, 3:] = 0  # padding is not output
    names = ["bert.encoder.layer.0.attention.self.value", "bert.encoder.layer.1.attention.output.dense"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tab = bb.measure_output(model, batches, names, rank=2, choices=SMALL[:2], max_iter=1, lq_layers=names[:1])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert tab.objective == "output" and tab.numel == {n: model.get_submodule(n).weight.numel() for n in names}
    reference = _hidden(model, batches)
    norm2 = sum(float(h.square().sum()) for h in reference)
    for name, with_l in zip(names, (True, False)):
        weight = model.get_submodule(name).weight
        W = weight.detach().clone()
        for choice in SMALL[:2]:
            if with_l:
                lq = lq_decompose(W, 2, max_iter=1, quantizer=choice.quantize_dequantize)
                W_hat = lq.Q + lq.B @ lq.A
            else:
                W_hat = choice.quantize_dequantize(W)
            with torch.no_grad():
                weight.copy_(W_hat)
            changed = _hidden(model, batches)
            with torch.no_grad():
                weight.copy_(W)
            expected = sum(float((h - r).square().sum()) for h, r in zip(changed, reference)) / norm2
            assert tab.error[name][choice.name] == pytest.approx(expected, rel=1e-5)
            assert tab.relative[name][choice.name] == pytest.approx(float((W - W_hat).norm() / W.norm()), rel=1e-5)
        # fewer bits change the output more
        assert tab.error[name]["hqq-2bit-g64"] > tab.error[name]["hqq-3bit-g64"] > 0
    again = bb.PlanTable.from_dict(json.loads(json.dumps(tab.to_dict())))
    assert again.objective == "output" and again.error == tab.error
    legacy = {k: v for k, v in tab.to_dict().items() if k != "objective"}  # tables saved before the field existed
    assert bb.PlanTable.from_dict(legacy).objective == "weight"


def test_output_measurement_restores_the_weight_when_the_forward_fails():
    from _builders import build_bert

    model, ids, _ = build_bert(hidden=64)
    name = "bert.encoder.layer.0.attention.self.query"
    module = model.get_submodule(name)
    W = module.weight.detach().clone()

    def fail_on_a_changed_weight(mod, args):
        if not torch.equal(mod.weight, W):
            raise RuntimeError("forward failed with the quantized weight in place")

    module.register_forward_pre_hook(fail_on_a_changed_weight)
    with pytest.raises(RuntimeError, match="quantized weight in place"):
        bb.measure_output(model, [ids(1)], [name], rank=2, choices=SMALL[:1], max_iter=1)
    assert torch.equal(module.weight, W)


@pytest.mark.parametrize("shape", [(37, 64), (64, 37), (36, 64), (64, 40), (8, 24)])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_unsupported_says_exactly_when_hqq_cannot_quantize_a_shape(shape, bits):
    """HQQ packs the codes of several groups together without padding (2-bit: 4, 4-bit: 2): the shapes it cannot
    take are named before anything is quantized, and every other shape quantizes."""
    choice = bb.QuantChoice("hqq", bits, 64)
    reason = choice.unsupported(shape)
    if reason is None:
        W = torch.randn(*shape)
        assert choice.quantize_dequantize(W).shape == W.shape
    else:
        with pytest.raises(Exception):
            choice.quantize_dequantize(torch.randn(*shape))


def test_a_plan_quantizes_the_linears_it_names_beyond_the_targets_and_reload_rebuilds_them(tmp_path):
    """The plan describes the whole base: an attention-output linear it names (not a target) is quantized plainly
    with its configuration when the adapter is created and again when it is loaded, so outputs are equal."""
    from peft import PeftModel

    extra = "roberta.encoder.layer.0.attention.output.dense"
    plan = {**PLAN, extra: "hqq-4bit-g64"}
    pm = get_peft_model(tiny_roberta(), plan_config(plan=plan))
    assert type(pm.base_model.model.get_submodule(extra)).__name__ == "HQQLinear"
    expected = train_then_output(pm, _ids, torch.tensor([0, 1, 0]))
    pm.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_roberta(), tmp_path).eval()
    assert type(reloaded.base_model.model.get_submodule(extra)).__name__ == "HQQLinear"
    with torch.no_grad():
        torch.testing.assert_close(output_of(reloaded, _ids(9)), expected, atol=0, rtol=0)
    bad = {**PLAN, "roberta.encoder.layer.0.intermediate.dense": "hqq-2bit-g64"}  # 37x64: HQQ cannot pack it
    model = tiny_roberta()
    with pytest.raises(ValueError, match=r"intermediate.dense'\] = 'hqq-2bit-g64', which the installed library"):
        get_peft_model(model, plan_config(plan=bad))
    assert all(type(m).__name__ != "HQQLinear" for m in model.modules())


def test_hqq_codes_do_not_depend_on_the_thread_count():
    """A plan's HQQ base is re-derived at load: the quantizer runs on one thread, so the machine's thread count does
    not change its codes (without that, this weight's 4-bit g64 codes differed in one group at 1 vs 2 threads)."""
    pytest.importorskip("hqq")
    choice = bb.parse_choice("hqq-4bit-g64")
    W = torch.randn(384, 1536, generator=torch.Generator().manual_seed(5)) * 0.02
    one, two = at_thread_counts(lambda: choice.quantize_dequantize(W))  # also: the quantizer gives the count back
    assert torch.equal(one, two)


def test_plan_entries_match_modules_whatever_their_order():
    """A saved plan comes back with sorted keys: the entry for a module must not depend on order (the most specific
    key wins), or a reload re-derived another base than the one trained on (NF4 at creation, HQQ after reload)."""
    from sparse_lowrank_peft.delta.lq_checks import plan_choice

    q0 = "roberta.encoder.layer.0.attention.self.query"
    for plan in ({q0: "bnb-nf4", "query": "hqq-4bit-g64"}, {"query": "hqq-4bit-g64", q0: "bnb-nf4"}):
        assert plan_choice(plan, q0).name == "bnb-nf4"
        assert plan_choice(plan, "roberta.encoder.layer.1.attention.self.query").name == "hqq-4bit-g64"
        model = tiny_roberta()
        bb.apply_plan(model, plan)
        assert type(model.get_submodule(q0)).__name__ == "Linear4bit"
        assert type(model.get_submodule(q0.replace("layer.0", "layer.1"))).__name__ == "HQQLinear"


def test_plan_names_with_a_prefix_apply_and_non_linears_are_refused():
    """A plan measured on a wrapped model (``base_model.model.`` names) quantizes the same linears (it quantized none,
    silently); an entry naming an embedding or a block is refused (it was accepted and quantized nothing)."""
    model = tiny_roberta()
    linears = encoder_linears(model)
    assert bb.apply_plan(model, {"base_model.model." + n: "bnb-nf4" for n in linears}) == len(linears)
    for bad in ("roberta.embeddings.word_embeddings", "roberta.encoder.layer.0.attention"):
        model = tiny_roberta()
        with pytest.raises(ValueError, match=f"no linear layer for: \\['{bad}'\\].*not changed"):
            bb.apply_plan(model, {bad: "bnb-nf4", linears[0]: "bnb-nf4"})
        assert type(model.get_submodule(linears[0])) is torch.nn.Linear
