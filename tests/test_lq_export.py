"""Exports of LQ-initialised adapters are for the original weights: ``ΔW − L`` (the change since the start).

An adapter with LQ-LoRA's init trains on the quantized ``Q`` with ``Q + L ≈ W``. A LoRA server loads ``W``, so the
plain LoRA written for it is ``ΔW − L``: on ``W`` it gives the trained ``Q + ΔW`` up to the quantization residual
``W − Q − L``. Writing ``ΔW`` itself (``relative_to="trained"``, the export of every earlier version) adds ``L``
a second time. Table: PEFT's LoRA (``get_lq_lora_model``) and every factored tuner with ``init_weights="lq"``,
on a planned HQQ + bitsandbytes base (bitsandbytes alone where hqq is not installed); each check compares per-layer
dense weights with the reference.
"""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch
from _builders import _ids, output_of, tiny_roberta
from peft import LoraConfig, PeftModel, get_peft_model

from sparse_lowrank_peft import DyLoraConfig, SLTrainConfig, SoraConfig, export_to_lora
from sparse_lowrank_peft.delta import quant
from sparse_lowrank_peft.lq_lora import get_lq_lora_model, save_lq_lora
from sparse_lowrank_peft.squeeze import SqueezeError, adapter_folder_to_lora, squeeze, squeeze_state

pytest.importorskip("bitsandbytes", reason="NF4 bases need bitsandbytes")

QV = [f"roberta.encoder.layer.{i}.attention.self.{m}" for i in (0, 1) for m in ("query", "value")]
# HQQ and bitsandbytes configurations where hqq is installed (the hqq extra), bitsandbytes alone elsewhere
PLAN = dict(zip(QV, ["hqq-3bit-g64", "bnb-nf4", "hqq-2bit-g32", "bnb-nf4-dq"]
                if importlib.util.find_spec("hqq") else ["bnb-nf4", "bnb-nf4-dq"] * 2))


def lq_config(cls):
    extra = {"sparsity": 0.1} if cls is SLTrainConfig else {}
    return cls(r=2, target_modules=["query", "value"], init_weights="lq", lq_plan=PLAN, lq_max_iter=3,
               task_type="SEQ_CLS", **extra)


def _lora(base):
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], task_type="SEQ_CLS")
    return get_lq_lora_model(base, config, plan=PLAN, max_iter=3)


MAKERS = {
    "lora": _lora,
    "sltrain": lambda base: get_peft_model(base, lq_config(SLTrainConfig)),
    "sora": lambda base: get_peft_model(base, lq_config(SoraConfig)),
    "dylora": lambda base: get_peft_model(base, lq_config(DyLoraConfig)),
}
# SLTrain's sparse term is not low-rank: its export is truncated, exact at the full rank 64 of a 64 x 64 layer
EXPORT_RANK = {"sltrain": 64}


def trained(name: str):
    """The LQ-initialised model with every trainable tensor moved away from its start (a stand-in for training)."""
    model = MAKERS[name](tiny_roberta())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def deltas(model) -> dict[str, torch.Tensor]:
    return {key: model.base_model.model.get_submodule(key).get_delta_weight("default").detach().float() for key in QV}


def starts(model) -> dict[str, torch.Tensor]:
    out = {}
    for key in QV:
        B0, A0 = quant.lq_offset(model.base_model.model.get_submodule(key))
        out[key] = B0 @ A0
    return out


def exported_deltas(folder) -> dict[str, torch.Tensor]:
    plain = PeftModel.from_pretrained(tiny_roberta(), str(folder))
    return deltas(plain)


@pytest.mark.parametrize("name", list(MAKERS))
def test_export_is_the_change_since_the_lq_start(name, tmp_path):
    """Default export: ``ΔW − L`` per layer (exact); ``relative_to="trained"``: ``ΔW``. On the original weights
    the default lands on the trained model up to the residual ``W − Q − L``; the other is off by ``L`` more."""
    model = trained(name)
    rank = EXPORT_RANK.get(name)
    original = export_to_lora(model, tmp_path / "original", rank=rank)
    on_q = export_to_lora(model, tmp_path / "trained", rank=rank, relative_to="trained")
    trained_delta, start = deltas(model), starts(model)
    got, got_q = exported_deltas(original), exported_deltas(on_q)
    full = tiny_roberta()
    for key in QV:
        torch.testing.assert_close(got[key], trained_delta[key] - start[key], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(got_q[key], trained_delta[key], atol=2e-5, rtol=1e-4)
        W = full.get_submodule(key).weight.detach()
        effective = quant.dequantize_weight(model.base_model.model.get_submodule(key).get_base_layer())
        effective = effective + trained_delta[key]
        assert (W + got[key] - effective).norm() < (W + got_q[key] - effective).norm()
    info = json.loads((original / "export_info.json").read_text())
    assert info["relative_to"] == "original" and all(info["layers"][k]["lq_offset_subtracted"] for k in QV)
    assert json.loads((on_q / "export_info.json").read_text())["relative_to"] == "trained"


def test_an_untrained_lq_adapter_exports_to_nothing_on_the_original_weights(tmp_path):
    """At step 0 the model is ``Q + L ≈ W``: the export for ``W`` is zero, so ``W`` is served unchanged."""
    model = MAKERS["sltrain"](tiny_roberta()).eval()
    got = exported_deltas(export_to_lora(model, tmp_path / "lora", rank=64))
    assert all(delta.abs().max() < 1e-5 for delta in got.values())


def test_dylora_nested_rank_is_the_best_truncation_of_the_change(tmp_path):
    """DyLoRA's rank ``b`` minus the start has rank up to ``b + r``: exported at ``b`` it is its optimal truncation."""
    model = trained("dylora")
    tuner = model.base_model
    tuner.set_rank(1)
    want = {key: torch.linalg.svd(d.double() - s.double()) for (key, d), s in zip(deltas(model).items(),
                                                                                   starts(model).values())}
    tuner.set_rank(2)
    got = exported_deltas(export_to_lora(model, tmp_path / "b1", rank=1))
    for key, (U, S, Vh) in want.items():
        best = (U[:, :1] * S[:1]) @ Vh[:1]
        torch.testing.assert_close(got[key].double(), best, atol=1e-5, rtol=1e-4)


def test_squeeze_keeps_the_trained_base_and_its_outputs():
    """``squeeze`` re-wraps the model's own base (``Q``), so it squeezes ``ΔW`` itself: at full rank the squeezed
    model computes what the trained one did."""
    model = trained("sora")
    with torch.no_grad():
        before = output_of(model, _ids(9))
        after = output_of(squeeze(model, 2).eval(), _ids(9))
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-4)


def test_a_reloaded_adapter_exports_the_same(tmp_path):
    """The start is re-derived when the adapter is loaded (never saved): the saved adapter, loaded onto a fresh
    full-precision model, exports what the trained model exported; the same through the folder-to-folder path
    (PEFT's LoRA saved by save_lq_lora, rebuilt with load_lq_lora)."""
    model = trained("sltrain")
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(tiny_roberta(), str(tmp_path / "adapter")).eval()
    a = exported_deltas(export_to_lora(model, tmp_path / "a", rank=64))
    b = exported_deltas(export_to_lora(reloaded, tmp_path / "b", rank=64))
    for key in QV:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)

    lora = trained("lora")
    save_lq_lora(lora, str(tmp_path / "lq-lora"))
    tiny_roberta().save_pretrained(tmp_path / "base")
    folder = adapter_folder_to_lora(tmp_path / "lq-lora", tmp_path / "served", None, base=tmp_path / "base")
    want = {key: d - s for (key, d), s in zip(deltas(lora).items(), starts(lora).values())}
    got = exported_deltas(folder)
    for key in QV:
        torch.testing.assert_close(got[key], want[key], atol=2e-5, rtol=1e-4)


def test_relative_to_is_checked():
    with pytest.raises(SqueezeError, match="relative_to='quantized' is not one of"):
        squeeze_state(trained("sora"), 2, relative_to="quantized")


def test_adapters_without_lq_init_are_the_same_either_way(tmp_path):
    base = copy.deepcopy(tiny_roberta())
    model = get_peft_model(base, SoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS")).eval()
    a = exported_deltas(export_to_lora(model, tmp_path / "a"))
    b = exported_deltas(export_to_lora(model, tmp_path / "b", relative_to="trained"))
    for key in QV:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)


def test_inspect_reports_the_delta_the_export_writes(tmp_path):
    """``slpeft inspect`` of an LQ-initialised folder reports ``ΔW − L`` (flagged), as the export writes it."""
    from sparse_lowrank_peft.squeeze import inspect_adapter

    model = trained("sltrain")
    model.save_pretrained(tmp_path / "adapter")
    tiny_roberta().save_pretrained(tmp_path / "base")
    report = inspect_adapter(tmp_path / "adapter", base=tmp_path / "base", top=8)
    want = {key: d - s for (key, d), s in zip(deltas(model).items(), starts(model).values())}
    for key in QV:
        entry = report["layers"][key]
        assert entry["lq_offset_subtracted"] and entry["fro_norm"] == pytest.approx(float(want[key].norm()), rel=1e-4)


def test_a_second_adapter_on_an_lq_layer_is_exported_for_the_original_weights_too(tmp_path):
    """``L`` belongs to the layer's base (``W ≈ Q + L``), not to the LQ adapter: another adapter added on the same
    layers also trains on ``Q``, and its export for ``W`` is ``ΔW_other − L``."""
    model = trained("sltrain")
    model.add_adapter("other", SLTrainConfig(r=2, sparsity=0.1, target_modules=["query", "value"],
                                             task_type="SEQ_CLS"))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".other" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    root, start = model.base_model.model, starts(model)
    other = {key: root.get_submodule(key).get_delta_weight("other").detach().float() for key in QV}
    got = exported_deltas(export_to_lora(model, tmp_path / "other", adapter_name="other", rank=64))
    for key in QV:
        torch.testing.assert_close(got[key], other[key] - start[key], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", list(MAKERS))
def test_merge_is_the_trained_function_in_full_precision(name, tmp_path):
    """``merge_adapter_folder`` on an adapter trained on a planned quantized base: the plain model computes ``Q + ΔW``
    (what the trained model computes), every linear in full precision; PEFT's LoRA from its save_lq_lora folder
    too (PEFT's own merge would re-quantize ``Q + ΔW``)."""
    from transformers import RobertaForSequenceClassification

    from sparse_lowrank_peft.merge import merge_adapter_folder

    model = trained(name)
    (save_lq_lora(model, str(tmp_path / "adapter")) if name == "lora"
     else model.save_pretrained(tmp_path / "adapter"))
    tiny_roberta().save_pretrained(tmp_path / "base")
    info = merge_adapter_folder(tmp_path / "adapter", tmp_path / "merged", base=tmp_path / "base")
    assert info["layers"] == info["dequantized"] == len(QV)
    merged = RobertaForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert all(type(m) is torch.nn.Linear and m.weight.dtype == torch.float32
               for n, m in merged.named_modules() if n in QV)
    with torch.no_grad():
        want, got = output_of(model, _ids(9)), output_of(merged, _ids(9))
        plain = output_of(tiny_roberta(), _ids(9))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert (want - plain).abs().max() > 1e-3  # Q and the trained adapter moved the outputs: the check can fail
    if name == "lora":  # what the folder path avoids: PEFT's merge re-quantizes Q + ΔW
        from sparse_lowrank_peft.squeeze import load_adapter_model

        requantized = load_adapter_model(tmp_path / "adapter", tmp_path / "base").merge_and_unload(safe_merge=True)
        with torch.no_grad():
            assert (output_of(requantized, _ids(9)) - want).abs().max() > 1e-4
