"""The contract every tuner of this package keeps, checked on every model family.

One TEST_CASES table (config class, kwargs, model family) × shared checks, in the manner of PEFT's
``test_custom_models.py``. Later tuners add rows to TEST_CASES; the checks do not change.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import json
import warnings
from pathlib import Path

import pytest
import torch
from _builders import BUILDERS, TARGETS, edit_adapter_config, output_of, state_of
from peft import (
    AutoPeftModelForCausalLM,
    AutoPeftModelForSequenceClassification,
    PeftConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
)
from peft.tuners.tuners_utils import BaseTunerLayer

from sparse_lowrank_peft import SLTrainConfig

# peft 0.22 checks a checkpoint's adapter keys against the model and can raise on any missing or unexpected one;
# 0.21 only warns about missing ones. Every reload here asks for the strictest check the installed peft has.
STRICT_LOAD = (
    {"strict_adapter_check": "error"}
    if "strict_adapter_check" in inspect.signature(PeftModel.from_pretrained).parameters
    else {}
)

# bert-nf4 and bert-nf4-avx512: the two CPU code paths of bitsandbytes, each forced on any machine (tests/_bnb_cpu.py);
# bert-int8: an LLM.int8 (load_in_8bit) base
FAMILIES = ["mlp", "roberta", "bert", "gpt2", "llama", "llama-nf4", "bert-nf4", "bert-nf4-avx512", "bert-int8"]

# (id, config class, kwargs[, families]) — kwargs exclude targeting, which comes from the model family; a row runs on
# every family unless it names some (variants of a tuner run on two families to keep the suite fast). Each tuner adds
# its rows in a module tests/_cases_<tuner>.py defining CASES; they are all collected here.
TUNER_CASES = [
    ("sltrain-r4-s0.05", SLTrainConfig, {"r": 4, "lora_alpha": 8, "sparsity": 0.05}),
    ("sltrain-r1-s0.3-dropout", SLTrainConfig, {"r": 1, "lora_alpha": 3, "sparsity": 0.3, "lora_dropout": 0.1},
     ("mlp", "gpt2")),
    # per-module ranks and scales (the first block's layers: ".0." in every family's names but the MLP's), rsLoRA
    ("sltrain-r4-pattern-rslora", SLTrainConfig,
     {"r": 4, "lora_alpha": 8, "sparsity": 0.05, "rank_pattern": {r".*\.0\..*": 2}, "alpha_pattern": {r".*\.0\..*": 3},
      "use_rslora": True}, ("gpt2", "llama", "bert-nf4")),
]
for _path in sorted(Path(__file__).parent.glob("_cases_*.py")):
    TUNER_CASES += importlib.import_module(_path.stem).CASES

TEST_CASES = [
    pytest.param(case[1], case[2], family, id=f"{case[0]}-{family}")
    for case in TUNER_CASES
    for family in (case[3] if len(case) > 3 else FAMILIES)
]

ATOL = 1e-5  # fp32 throughout: merged vs unmerged differs only by summation order
# A 4-bit base re-quantizes W + ΔW on merge (the layer warns with the measured error, ~9e-2 relative on the changed
# weights): merged outputs and the weights restored by unmerge move by about one NF4 step. Measured on the tiny BERT
# (logits of magnitude ~1.4e-2) for SLTrain/SoRA/DyLoRA: output differences <= 1.3e-4 (about 1% of the logits),
# merge+unmerge moves the weights by ‖W' − W‖ / (‖W‖ + ‖ΔW‖) <= 0.11 (NF4's ~9% relative error of each
# re-quantized W + ΔW; the test adapters are random with ‖ΔW‖ up to 18x ‖W‖, so relative to ‖W‖ alone it is large).
# Bounds: ~8x headroom on outputs, 0.25 (two re-quantizations) on weights.
# On the 64-wide BERT of bert-nf4-avx512 (larger logits) merged outputs moved by up to 1.6e-3 (sparse RandLoRA).
# On llama-nf4 every one of the 14 decoder linears is 4-bit and re-quantized, and the errors compound: merged logits
# moved by 0.09 (SoRA) to 0.60 (sparse RandLoRA) against logits of at most 0.48, while each layer's re-quantization
# stayed NF4's (weight check below: 0.079 to 0.094). There only the weight check is the contract (None: no output
# bound); merge_and_unload(dequantize=True) is checked exact on every family.
# On bert-int8 (LLM.int8 query/value) a merge re-quantizes to int8 rows (measured rounding error 0.4-0.7%): merged
# outputs moved by at most 3.2e-5 (sparse RandLoRA; 2.3e-6 to 4.0e-6 for the others) against logits of ~1.4e-2, and
# merge+unmerge moved the weights by at most 0.0057 relative; bounds with ~6x and ~3.5x headroom.
MERGE_ATOL = {"bert-nf4": 1e-3, "bert-nf4-avx512": 5e-3, "llama-nf4": None, "bert-int8": 2e-4}
UNMERGE_WEIGHT_REL = {"bert-nf4": 0.25, "bert-nf4-avx512": 0.25, "llama-nf4": 0.25, "bert-int8": 0.02}
# The repacked base computes in bf16 (bitsandbytes' packed kernel); once wrapped, the layer keeps the standard layout
# and computes in its compute dtype (fp32) with the same weights, so at init the outputs agree to bf16 rounding.
INIT_ATOL = {"bert-nf4-avx512": 1e-3}


def make_config(cfg_cls, kwargs, family, task_type, **overrides):
    fields = {**kwargs, **TARGETS[family], **overrides}
    if task_type is not None:
        fields["task_type"] = task_type
    return cfg_cls(**fields)


def build(family):
    model, make_inputs, task_type = BUILDERS[family]()
    return model, make_inputs, task_type


def peft_model(cfg_cls, kwargs, family, **overrides):
    model, make_inputs, task_type = build(family)
    config = make_config(cfg_cls, kwargs, family, task_type, **overrides)
    return get_peft_model(model, config), make_inputs, task_type


def train_steps(model, make_inputs, steps=3, lr=1e-2):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        out = output_of(model, make_inputs(100 + step))
        loss = (out.float() ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize("cfg_cls,kwargs,family", TEST_CASES)
class TestContract:
    def test_init_equals_base(self, cfg_cls, kwargs, family):
        model, make_inputs, task_type = build(family)
        inputs = make_inputs(0)
        with torch.no_grad():
            expected = output_of(model, inputs).clone()
        pm = get_peft_model(model, make_config(cfg_cls, kwargs, family, task_type))
        pm.eval()
        with torch.no_grad():
            got = output_of(pm, inputs)
        torch.testing.assert_close(got, expected, atol=INIT_ATOL.get(family, 0), rtol=0)

    def test_training_changes_only_adapter_params(self, cfg_cls, kwargs, family):
        pm, make_inputs, _ = peft_model(cfg_cls, kwargs, family)
        before = {n: p.detach().clone() for n, p in pm.named_parameters()}
        trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
        prefix = pm.base_model.prefix
        saved = TARGETS[family]["modules_to_save"] or []
        for n in trainable:
            assert prefix in n or any(f".{m}." in n for m in saved) or "modules_to_save" in n, n
        train_steps(pm, make_inputs)
        changed = {n for n, p in pm.named_parameters() if not torch.equal(p.detach(), before[n])}
        assert changed, "three optimizer steps changed nothing"
        assert changed <= trainable, f"frozen parameters changed: {sorted(changed - trainable)[:5]}"
        adapter_changed = {n for n in changed if prefix in n}
        assert adapter_changed, "no adapter parameter changed"
        # every kind of adapter tensor received a gradient and moved (B starts at 0, so A moves from step 2 on)
        kinds = {n.split(prefix)[1].split(".")[0] for n in adapter_changed}
        expected_kinds = {n.removeprefix(prefix) for n in type(pm.base_model).tuner_layer_cls.adapter_layer_names}
        assert kinds == expected_kinds, (kinds, expected_kinds)

    def test_save_load_roundtrip(self, cfg_cls, kwargs, family, tmp_path):
        pm, make_inputs, task_type = peft_model(cfg_cls, kwargs, family, init_weights=False)
        train_steps(pm, make_inputs, steps=2)
        inputs = make_inputs(1)
        with torch.no_grad():
            expected = output_of(pm, inputs)
        pm.save_pretrained(tmp_path)
        fresh, _, _ = build(family)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = PeftModel.from_pretrained(fresh, tmp_path, **STRICT_LOAD)
        key_warnings = [str(w.message) for w in caught if "adapter keys" in str(w.message)]
        assert not key_warnings, key_warnings  # every saved tensor is one the model expects, and none is missing
        loaded.eval()
        with torch.no_grad():
            got = output_of(loaded, inputs)
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
        cfg = PeftConfig.from_pretrained(tmp_path)
        assert type(cfg) is cfg_cls
        # load_adapter under a second name gives the same outputs
        fresh2, _, _ = build(family)
        base_only = get_peft_model(fresh2, make_config(cfg_cls, kwargs, family, task_type))
        base_only.load_adapter(tmp_path, adapter_name="loaded")
        base_only.set_adapter("loaded")
        base_only.eval()
        with torch.no_grad():
            torch.testing.assert_close(output_of(base_only, inputs), expected, atol=0, rtol=0)

    def test_merge_unmerge(self, cfg_cls, kwargs, family):
        pm, make_inputs, _ = peft_model(cfg_cls, kwargs, family, init_weights=False)
        pm.eval()
        inputs = make_inputs(2)
        base_weights = {
            n: m.get_base_weight().float().clone()
            for n, m in pm.named_modules()
            if isinstance(m, BaseTunerLayer)
        }
        delta_norms = {
            n: float(m.get_delta_weight("default").float().norm())
            for n, m in pm.named_modules()
            if isinstance(m, BaseTunerLayer)
        }
        with torch.no_grad():
            unmerged = output_of(pm, inputs).clone()
            pm.base_model.merge_adapter()
            merged = output_of(pm, inputs).clone()
            pm.base_model.unmerge_adapter()
            after = output_of(pm, inputs)
        with torch.no_grad():  # (bitsandbytes' packed CPU kernel fails on an input that requires grad)
            base_out = output_of(build(family)[0], inputs)
        assert not torch.allclose(unmerged, base_out), "adapter has no effect"
        atol = MERGE_ATOL.get(family, ATOL)
        if atol is not None:
            torch.testing.assert_close(merged, unmerged, atol=atol, rtol=0)
            torch.testing.assert_close(after, unmerged, atol=atol, rtol=0)
        for n, m in pm.named_modules():
            if isinstance(m, BaseTunerLayer):
                restored = m.get_base_weight().float()
                if family in UNMERGE_WEIGHT_REL:
                    rel = float((restored - base_weights[n]).norm() / (base_weights[n].norm() + delta_norms[n]))
                    assert rel < UNMERGE_WEIGHT_REL[family], (n, rel)
                else:
                    torch.testing.assert_close(restored, base_weights[n], atol=1e-6, rtol=0)

    def test_merge_and_unload(self, cfg_cls, kwargs, family):
        pm, make_inputs, _ = peft_model(cfg_cls, kwargs, family, init_weights=False)
        pm.eval()
        inputs = make_inputs(3)
        with torch.no_grad():
            expected = output_of(pm, inputs).clone()
        # dequantize=True (a no-op for full-precision bases) makes the merge exact on 4-bit bases too
        merged = pm.merge_and_unload(safe_merge=True, dequantize=True)
        assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
        with torch.no_grad():
            torch.testing.assert_close(output_of(merged, inputs), expected, atol=ATOL, rtol=0)

    def test_unload_restores_base(self, cfg_cls, kwargs, family):
        base, make_inputs, _ = build(family)
        inputs = make_inputs(3)
        with torch.no_grad():
            expected = output_of(base, inputs).clone()
        pm = get_peft_model(base, make_config(cfg_cls, kwargs, family, build(family)[2], init_weights=False))
        unloaded = pm.unload()
        assert not any(isinstance(m, BaseTunerLayer) for m in unloaded.modules())
        unloaded.eval()
        with torch.no_grad():
            out = output_of(unloaded, inputs)
        if TARGETS[family]["modules_to_save"] is None:
            torch.testing.assert_close(out, expected, atol=0, rtol=0)
        else:  # the trained head copies are unloaded too; at init they equal the original head
            torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)

    def test_disable_adapter(self, cfg_cls, kwargs, family):
        base, make_inputs, task_type = build(family)
        inputs = make_inputs(4)
        with torch.no_grad():
            expected = output_of(base, inputs).clone()
        pm = get_peft_model(base, make_config(cfg_cls, kwargs, family, task_type, init_weights=False))
        pm.eval()
        with torch.no_grad():
            with_adapter = output_of(pm, inputs).clone()
            with pm.disable_adapter():
                disabled = output_of(pm, inputs).clone()
            again = output_of(pm, inputs)
        assert not torch.allclose(with_adapter, expected)
        torch.testing.assert_close(disabled, expected, atol=INIT_ATOL.get(family, 0), rtol=0)
        torch.testing.assert_close(again, with_adapter, atol=0, rtol=0)

    def test_two_adapters(self, cfg_cls, kwargs, family):
        pm, make_inputs, task_type = peft_model(cfg_cls, kwargs, family, init_weights=False)
        pm.eval()
        inputs = make_inputs(5)
        other = make_config(cfg_cls, kwargs, family, task_type, init_weights=False)
        if hasattr(other, "support_seed"):
            other.support_seed = 123
        other.r = kwargs["r"] + 1
        pm.add_adapter("other", other)
        with torch.no_grad():
            out_default = output_of(pm, inputs).clone()
            pm.set_adapter("other")
            out_other = output_of(pm, inputs).clone()
            pm.set_adapter("default")
            out_back = output_of(pm, inputs).clone()
        assert not torch.allclose(out_default, out_other)
        torch.testing.assert_close(out_back, out_default, atol=0, rtol=0)
        # only the active adapter trains
        trainable = [n for n, p in pm.named_parameters() if p.requires_grad and pm.base_model.prefix in n]
        assert trainable and all(n.endswith(".default") for n in trainable)
        pm.delete_adapter("other")
        for m in pm.modules():
            if isinstance(m, BaseTunerLayer):
                assert "other" not in m._all_available_adapter_names()
        with torch.no_grad():
            torch.testing.assert_close(output_of(pm, inputs), out_default, atol=0, rtol=0)

    def test_safe_merge_refuses_nan(self, cfg_cls, kwargs, family):
        pm, _, _ = peft_model(cfg_cls, kwargs, family, init_weights=False)
        layer = next(m for m in pm.modules() if isinstance(m, BaseTunerLayer))
        name = layer.adapter_layer_names[0]
        with torch.no_grad():
            getattr(layer, name)["default"].data.fill_(float("nan"))
        before = layer.get_base_weight().clone()
        with pytest.raises(ValueError, match="NaN"):
            pm.merge_and_unload(safe_merge=True)
        torch.testing.assert_close(layer.get_base_weight(), before, atol=0, rtol=0)

    def test_config_json_roundtrip(self, cfg_cls, kwargs, family, tmp_path):
        model, _, task_type = build(family)
        config = make_config(cfg_cls, kwargs, family, task_type)
        config.save_pretrained(tmp_path)
        loaded = PeftConfig.from_pretrained(tmp_path)
        assert type(loaded) is cfg_cls
        assert loaded.to_dict() == config.to_dict()
        raw = json.loads((tmp_path / "adapter_config.json").read_text())
        assert raw["peft_type"] == config.peft_type.value


@pytest.mark.parametrize("cfg_cls,kwargs", [pytest.param(c[1], c[2], id=c[0]) for c in TUNER_CASES[:1]])
@pytest.mark.parametrize("family", ["roberta", "gpt2"])
def test_auto_peft_model(cfg_cls, kwargs, family, tmp_path):
    """AutoPeftModel* loads the base from base_model_name_or_path and our adapter on top."""
    base, make_inputs, task_type = build(family)
    base.save_pretrained(tmp_path / "base")
    base = type(base).from_pretrained(tmp_path / "base").eval()
    pm = get_peft_model(base, make_config(cfg_cls, kwargs, family, task_type, init_weights=False))
    pm.eval()
    inputs = make_inputs(6)
    with torch.no_grad():
        expected = output_of(pm, inputs)
    pm.save_pretrained(tmp_path / "adapter")
    auto_cls = AutoPeftModelForSequenceClassification if task_type == "SEQ_CLS" else AutoPeftModelForCausalLM
    loaded = auto_cls.from_pretrained(tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(output_of(loaded, inputs), expected, atol=0, rtol=0)


_FIRST_CASE = {}
for _case in TUNER_CASES:
    _FIRST_CASE.setdefault(_case[1], _case)
ONE_CASE_PER_TUNER = [pytest.param(case[1], case[2], id=case[0]) for case in _FIRST_CASE.values()]


@pytest.mark.parametrize("cfg_cls,kwargs", ONE_CASE_PER_TUNER)
def test_low_cpu_mem_usage_and_inject_adapter_in_model(cfg_cls, kwargs, tmp_path):
    """PEFT's two other entry points: ``low_cpu_mem_usage=True`` creates the adapter tensors on the meta device and
    the load fills them (the same outputs as the trained model, nothing left on meta); ``inject_adapter_in_model``
    wraps a plain model without a ``PeftModel`` and ``get_peft_model_state_dict`` reads exactly the saved tensors."""
    pm, make_inputs, task_type = peft_model(cfg_cls, kwargs, "roberta", init_weights=False)
    pm.eval()
    inputs = make_inputs(6)
    with torch.no_grad():
        expected = output_of(pm, inputs)
    pm.save_pretrained(tmp_path)
    lazy = get_peft_model(build("roberta")[0], make_config(cfg_cls, kwargs, "roberta", task_type), low_cpu_mem_usage=True)
    assert any(p.device.type == "meta" for p in lazy.parameters())
    loaded = PeftModel.from_pretrained(build("roberta")[0], tmp_path, low_cpu_mem_usage=True).eval()
    assert {t.device.type for t in [*loaded.parameters(), *loaded.buffers()]} == {"cpu"}
    with torch.no_grad():
        torch.testing.assert_close(output_of(loaded, inputs), expected, atol=0, rtol=0)
    injected = inject_adapter_in_model(make_config(cfg_cls, kwargs, "roberta", task_type), build("roberta")[0])
    assert not isinstance(injected, PeftModel)
    saved = {k.removeprefix("base_model.model.") for k in get_peft_model_state_dict(pm)}
    assert set(get_peft_model_state_dict(injected)) == saved


@pytest.mark.parametrize("cfg_cls,kwargs", ONE_CASE_PER_TUNER)
@pytest.mark.parametrize("family", ["bert", "bert-nf4"])
def test_all_linear_takes_a_second_adapter(cfg_cls, kwargs, family):
    """``target_modules="all-linear"`` adapts every encoder linear, and a second adapter with it lands on the same
    layers. PEFT's shorthand recognises an adapted layer only by "Linear" in its class name, which ours lack, so the
    second adapter once matched nothing (NoMatchingPeftModuleError)."""
    model, _, task_type = build(family)
    config = lambda: make_config(cfg_cls, kwargs, family, task_type, target_modules="all-linear")  # noqa: E731
    pm = get_peft_model(model, config())
    pm.add_adapter("second", config())
    layers = [m for n, m in pm.named_modules() if isinstance(m, BaseTunerLayer) and ".encoder." in n]
    held = [{key for attr in m.adapter_layer_names for key in getattr(m, attr).keys()} for m in layers]
    assert len(layers) == 12 and all(names == {"default", "second"} for names in held), held


def test_deepcopy_and_repr():
    pm, make_inputs, _ = peft_model(SLTrainConfig, {"r": 2}, "mlp", init_weights=False)
    clone = copy.deepcopy(pm)
    inputs = make_inputs(0)
    with torch.no_grad():
        torch.testing.assert_close(output_of(clone, inputs), output_of(pm, inputs))
    assert "sltrain" in repr(pm)


@pytest.mark.parametrize("cfg_cls,kwargs", ONE_CASE_PER_TUNER)
@pytest.mark.parametrize("family", ["llama", "llama-nf4"])
def test_all_linear_on_a_causal_lm_leaves_lm_head(cfg_cls, kwargs, family):
    """On LLaMA (full precision or QLoRA's 4-bit decoder), ``all-linear`` adapts the seven projections of every decoder
    layer and not the output layer, as PEFT's LoRA does for a causal LM."""
    pm, _, _ = peft_model(cfg_cls, kwargs, family)
    adapted = {n.rsplit(".", 1)[1] for n, m in pm.named_modules() if isinstance(m, BaseTunerLayer)}
    count = sum(isinstance(m, BaseTunerLayer) for m in pm.modules())
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} and count == 14
    assert type(pm.base_model.model.lm_head) is torch.nn.Linear


@pytest.mark.parametrize("cfg_cls,kwargs", ONE_CASE_PER_TUNER)
@pytest.mark.parametrize("family", ["llama", "llama-nf4"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(cfg_cls, kwargs, family, reentrant):
    """LLM fine-tuning recomputes activations in backward (``gradient_checkpointing_enable``; QLoRA's recipe): every
    adapter gradient equals the one without checkpointing, with the non-reentrant and the reentrant implementation
    (which needs ``enable_input_require_grads``, as ``prepare_model_for_kbit_training`` sets up)."""
    grads, calls = [], []
    for checkpointing in (False, True):
        pm, make_inputs, _ = peft_model(cfg_cls, kwargs, family, init_weights=False)
        if checkpointing:
            pm.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            if reentrant:
                pm.enable_input_require_grads()
        pm.train()
        layer = pm.base_model.model.model.layers[0].self_attn.q_proj  # (torch's recompute stops early, before the MLP)
        calls.append(0)
        layer.register_forward_hook(lambda *_: calls.__setitem__(-1, calls[-1] + 1))
        (output_of(pm, make_inputs(5)).float() ** 2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad})
    assert calls == [1, 2]  # checkpointing ran the adapted layer again in backward
    plain, checkpointed = grads
    assert plain.keys() == checkpointed.keys() and sum(g.abs().sum() > 0 for g in plain.values()) > len(plain) // 2
    for name, g in plain.items():
        torch.testing.assert_close(checkpointed[name], g, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("cfg_cls,kwargs", ONE_CASE_PER_TUNER)
def test_prepare_model_for_kbit_training(cfg_cls, kwargs):
    """QLoRA's setup on a 4-bit LLaMA: ``prepare_model_for_kbit_training`` (fp32 norms, reentrant gradient
    checkpointing, input grads), then the tuner: every adapter parameter gets a finite gradient and the base none."""
    from peft import prepare_model_for_kbit_training

    model, make_inputs, task_type = build("llama-nf4")
    model = prepare_model_for_kbit_training(model)
    pm = get_peft_model(model, make_config(cfg_cls, kwargs, "llama-nf4", task_type, init_weights=False))
    pm.train()
    (output_of(pm, make_inputs(5)).float() ** 2).mean().backward()
    trainable = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable.values())
    assert sum(p.grad.abs().sum() > 0 for p in trainable.values()) > len(trainable) // 2
    assert all(p.grad is None for n, p in pm.named_parameters() if not p.requires_grad)


@pytest.mark.parametrize("cfg_cls,kwargs", ONE_CASE_PER_TUNER)
@pytest.mark.parametrize("family", ["llama", "llama-nf4"])
def test_generate_with_kv_cache_matches_full_forward(cfg_cls, kwargs, family):
    """Greedy ``generate`` with the KV cache (a prefill, then one token per sequence and step) gives every step the
    logits that one full forward of the generated sequence gives."""
    pm, make_inputs, _ = peft_model(cfg_cls, kwargs, family, init_weights=False)
    pm.eval()
    prompt = make_inputs(7)["input_ids"][:2, :5]
    with torch.no_grad():
        out = pm.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                          use_cache=True, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        full = pm(input_ids=out.sequences[:, :-1]).logits[:, prompt.shape[1] - 1:]
    assert out.sequences.shape == (2, 11)
    torch.testing.assert_close(torch.stack(out.logits, dim=1), full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("cfg_cls,kwargs", ONE_CASE_PER_TUNER)
def test_inference_follows_every_change_of_the_adapter(cfg_cls, kwargs):
    """Outputs in inference (eval mode, ``torch.no_grad``: where a layer may reuse terms built from its parameters,
    ``DeltaLayer.inference_cached``) equal the outputs computed with autograd on (nothing reused) after each way an
    adapter changes: an in-place write (an optimizer step, ``load_state_dict``), a write through ``.data`` followed
    by ``eval()``, a cast of the model, a switch of the active adapter."""
    pm, make_inputs, _ = peft_model(cfg_cls, kwargs, "llama", init_weights=False)
    inputs = make_inputs(3)

    def check(label):
        with torch.no_grad():
            reused = [output_of(pm, inputs) for _ in range(2)]
        fresh = output_of(pm, inputs).detach()
        for out in reused:
            torch.testing.assert_close(out, fresh, atol=1e-6, rtol=1e-6, msg=lambda m: f"after {label}: {m}")
        return fresh

    pm.eval()
    first = check("creation")
    trainable = [p for p in pm.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in trainable:
            p.mul_(1.5).add_(0.01)
    changed = check("an in-place write")
    assert not torch.allclose(changed, first)
    for p in trainable:
        p.data.mul_(0.5)
    pm.eval()
    check("a write through .data, then eval()")
    pm.double()
    check("a cast to float64")
    pm.add_adapter("other", make_config(cfg_cls, kwargs, "llama", None, init_weights=False))
    pm.set_adapter("other")
    pm.eval()
    check("a switch of adapters")


@pytest.mark.parametrize("cfg_cls,kwargs", ONE_CASE_PER_TUNER)
def test_float64_model_merges_and_unmerges_in_float64(cfg_cls, kwargs):
    """A float64 model (numerical checks, small-scale science) merges to float64 rounding and unmerges to the bit
    pattern's neighbourhood: the merge computed in fp32 left 3e-8 relative errors and moved W0 by 1.5e-8."""
    pm, make_inputs, _ = peft_model(cfg_cls, kwargs, "roberta", init_weights=False)
    pm = pm.double().eval()
    layer = next(m for m in pm.modules() if isinstance(m, BaseTunerLayer))
    original = layer.get_base_layer().weight.detach().clone()
    expected = original + layer.get_delta_weight("default")
    assert expected.dtype == torch.float64
    pm.merge_adapter()
    torch.testing.assert_close(layer.get_base_layer().weight, expected, atol=1e-13, rtol=0)
    pm.unmerge_adapter()
    torch.testing.assert_close(layer.get_base_layer().weight, original, atol=1e-13, rtol=0)


@pytest.mark.parametrize("cfg_cls,kwargs", ONE_CASE_PER_TUNER)
def test_bf16_base_and_autocast(cfg_cls, kwargs):
    """LLMs train in bf16: on a bf16 LLaMA the adapter stays fp32 (as PEFT's LoRA keeps it), outputs are bf16, every
    gradient is finite, and the merged bf16 model is within bf16 rounding of the unmerged one (measured: at most 1.9%
    of the largest logit, sparse RandLoRA; bound 4%). Under ``torch.autocast`` (``Trainer(bf16=True)``) an fp32 model
    trains with finite gradients too."""
    model, make_inputs, task_type = build("llama")
    pm = get_peft_model(model.to(torch.bfloat16), make_config(cfg_cls, kwargs, "llama", task_type, init_weights=False))
    assert {p.dtype for p in pm.parameters() if p.requires_grad} == {torch.float32}
    pm.train()
    out = output_of(pm, make_inputs(3))
    (out.float() ** 2).mean().backward()
    assert out.dtype == torch.bfloat16 and all(torch.isfinite(p.grad).all() for p in pm.parameters() if p.requires_grad)
    pm.eval()
    with torch.no_grad():
        unmerged = output_of(pm, make_inputs(4)).float()
        merged = output_of(pm.merge_and_unload(), make_inputs(4)).float()
    assert (merged - unmerged).abs().max() <= 0.04 * unmerged.abs().max()

    pm, make_inputs, _ = peft_model(cfg_cls, kwargs, "llama", init_weights=False)
    pm.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = output_of(pm, make_inputs(3))
    (out.float() ** 2).mean().backward()
    assert out.dtype == torch.bfloat16 and all(torch.isfinite(p.grad).all() for p in pm.parameters() if p.requires_grad)


@pytest.mark.parametrize("cfg_cls,kwargs", ONE_CASE_PER_TUNER)
def test_peft_healthcheck_finds_nothing_wrong(cfg_cls, kwargs):
    """peft 0.22's ``run_healthcheck`` (what a PEFT user runs on a model that misbehaves) reads our layers as it reads
    LoRA's: every layer counted, the trainable share right, and no finding on a correctly built model."""
    healthcheck = pytest.importorskip("peft.utils.healthcheck", reason="peft < 0.22 has no healthcheck")
    pm, _, _ = peft_model(cfg_cls, kwargs, "roberta")
    report = healthcheck.run_healthcheck(pm)
    assert report["is_ready"] and report["findings"] == [], report["findings"]
    summary = report["summary"]
    assert summary["trainable_params"] == sum(p.numel() for p in pm.parameters() if p.requires_grad), summary
    layer_cls = type(pm.base_model).tuner_layer_cls.__name__
    counts = {kind.rsplit(".", 1)[-1]: n for kind, n in summary["adapter_layer_types"]["default"].items()}
    assert counts[layer_cls] == sum(isinstance(m, BaseTunerLayer) for m in pm.modules()) > 0, counts
    assert report["adapter_state"]["requires_grad"] == {"default": True}, report["adapter_state"]


@pytest.mark.parametrize("cfg_cls,kwargs", ONE_CASE_PER_TUNER)
def test_adapter_tensor_lookup_is_torchs(cfg_cls, kwargs):
    """``delta.layer.ParameterDict`` reads ``_parameters`` directly (a forward's lookups cost 0.25 µs, not 2.2): it
    must return what ``nn.ParameterDict`` returns, before and after ``.to()`` replaces the tensors, and fail alike."""
    from sparse_lowrank_peft.delta.layer import ParameterDict

    pm, _, _ = peft_model(cfg_cls, kwargs, "roberta")
    dicts = [m for m in pm.modules() if type(m) is ParameterDict]
    assert dicts and not any(type(m) is torch.nn.ParameterDict for m in pm.modules())
    for dtype in (None, torch.float64):
        if dtype is not None:
            pm.to(dtype)
        for pdict in dicts:
            for key in pdict.keys():
                assert pdict[key] is torch.nn.ParameterDict.__getitem__(pdict, key)
                assert dtype is None or pdict[key].dtype == dtype
    with pytest.raises(AttributeError):
        dicts[0]["no-such-adapter"]
    with pytest.raises(AttributeError):
        torch.nn.ParameterDict.__getitem__(dicts[0], "no-such-adapter")


@pytest.mark.parametrize("cfg_cls,kwargs", ONE_CASE_PER_TUNER)
def test_checkpoint_of_another_model_class_is_refused_with_the_cause(cfg_cls, kwargs, tmp_path):
    """An adapter trained on ``BertForSequenceClassification`` (encoder at ``.bert``) loaded onto the ``BertModel`` of
    the same weights: no layer name matches. PEFT's LoRA would load nothing and leave every layer at its start; here
    one error names the two layouts before anything is loaded. (With ``modules_to_save`` PEFT itself fails first,
    with a KeyError on the head's weight, before it hands the checkpoint to the tuner.)"""
    pm, _, _ = peft_model(cfg_cls, kwargs, "bert", modules_to_save=None)
    pm.save_pretrained(tmp_path)
    encoder = build("bert")[0].bert
    state = state_of(encoder)
    with pytest.raises(ValueError, match=r"names its layers differently.*'bert\.encoder\.layer\.0\..*' in the "
                                         r"checkpoint, 'encoder\.layer\.0\..*' here.*Nothing was loaded"):
        PeftModel.from_pretrained(encoder, tmp_path)
    assert_state_unchanged(encoder, state)


@pytest.mark.parametrize("cfg_cls,kwargs", ONE_CASE_PER_TUNER)
def test_checkpoint_missing_some_layers_is_refused(cfg_cls, kwargs, tmp_path):
    """Saved for ``query`` only, loaded with ``target_modules`` widened to ``query`` and ``value`` (an edited config):
    the ``value`` layers would keep their initial values; the error counts them."""
    pm, _, _ = peft_model(cfg_cls, kwargs, "bert", target_modules=["query"])
    pm.save_pretrained(tmp_path)
    edit_adapter_config(tmp_path, target_modules=["query", "value"])
    with pytest.raises(ValueError, match=r"no \w+_\* tensors for 2 of this model's 4 adapter layers \(e\.g\. "
                                         r"'bert\.encoder\.layer\.0\.attention\.self\.value'\).*Nothing was loaded"):
        PeftModel.from_pretrained(build("bert")[0], tmp_path)


def assert_state_unchanged(model, state):
    """Every tensor of ``state`` is still in ``model``, unchanged (under ``base_layer`` where PEFT wrapped a layer)."""
    now = model.state_dict()
    for key, value in state.items():
        wrapped = key if key in now else key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(now[wrapped], value), key
