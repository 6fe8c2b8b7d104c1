"""Quantized bases: 4-bit helpers, the LQ-LoRA decomposition and init_weights="lq" for the factored tuners."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from _builders import BUILDERS, at_thread_counts, output_of, structured_weight, train_then_output
from peft import PeftModel, get_peft_model

from sparse_lowrank_peft import DyLoraConfig, SLTrainConfig, SoraConfig
from sparse_lowrank_peft.delta.quant import (
    SubspaceSVD,
    dequantize_weight,
    fisher_row_col_weights,
    lq_decompose,
    quantize_dequantize,
    quantize_linears,
    resolve_lq_svd,
    to_linear4bit,
    use_fisher,
)

bnb = pytest.importorskip("bitsandbytes", reason="4-bit bases need bitsandbytes (the bnb extra)")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_lq_beats_quantization_and_loftq(quant_type):
    W = structured_weight()
    res = lq_decompose(W, rank=8, quant_type=quant_type)
    quant_only = float((W - quantize_dequantize(W, quant_type)).norm() / W.norm())
    assert res.quant_only_error == pytest.approx(quant_only)
    # iterate 0 is LoftQ's single pass: Q = quant(W), L = SVD_8(W - Q)
    Q0 = quantize_dequantize(W, quant_type)
    U, S, Vh = torch.linalg.svd(W - Q0, full_matrices=False)
    loftq = float((W - Q0 - (U[:, :8] * S[:8]) @ Vh[:8]).norm() / W.norm())
    assert res.errors[0] == pytest.approx(loftq, rel=1e-4)
    assert res.error == min(res.errors) < loftq < quant_only
    # the reported error is the error of the returned factors
    assert float((W - res.Q - res.B @ res.A).norm() / W.norm()) == pytest.approx(res.error, rel=1e-4)


def test_source_quantizes_to_q_exactly():
    W = structured_weight(seed=1)
    res = lq_decompose(W, rank=4, max_iter=5)
    lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
    q = to_linear4bit(lin, res.source)
    assert torch.equal(dequantize_weight(q), res.Q)


def test_fisher_weighting_lowers_the_weighted_error():
    W = structured_weight(seed=2)
    g = torch.Generator().manual_seed(3)
    d_row, d_col = torch.rand(W.shape[0], generator=g) ** 4 * 100 + 0.01, torch.rand(W.shape[1], generator=g) + 0.5
    weighted = lq_decompose(W, 4, fisher=(d_row, d_col), max_iter=8)
    plain = lq_decompose(W, 4, max_iter=8)
    r, c = d_row.sqrt()[:, None], d_col.sqrt()[None, :]

    def werr(res):
        return float((r * (W - res.Q - res.B @ res.A) * c).norm())

    assert werr(weighted) < werr(plain)


def test_bad_lq_arguments():
    W = structured_weight()
    with pytest.raises(ValueError, match="rank"):
        lq_decompose(W, 0)
    with pytest.raises(ValueError, match="quant_type"):
        lq_decompose(W, 2, quant_type="int3")
    with pytest.raises(ValueError, match="init_weights"):
        SLTrainConfig(init_weights="pissa", target_modules=["q"])


@pytest.mark.parametrize("fisher", [False, True], ids=["plain", "fisher"])
def test_randomized_svd_lq_matches_the_exact_one(fisher):
    """LQ with the randomized, warm-started SVD ends within 1% of the exact SVD's error, is deterministic (a reload
    re-derives the same Q) and leaves the global RNG alone."""
    W = structured_weight(seed=4)
    g = torch.Generator().manual_seed(5)
    weights = (torch.rand(W.shape[0], generator=g) + 0.1, torch.rand(W.shape[1], generator=g) + 0.1) if fisher else None
    exact = lq_decompose(W, 4, max_iter=6, fisher=weights, svd="exact")
    state = torch.random.get_rng_state()
    fast = lq_decompose(W, 4, max_iter=6, fisher=weights, svd="randomized")
    assert torch.equal(torch.random.get_rng_state(), state)
    assert fast.error == pytest.approx(exact.error, rel=0.01)
    assert fast.errors[0] == pytest.approx(exact.errors[0], rel=0.01)  # LoftQ's pass: first SVD from a random start
    again = lq_decompose(W, 4, max_iter=6, fisher=weights, svd="randomized")
    assert all(torch.equal(a, b) for a, b in ((fast.Q, again.Q), (fast.B, again.B), (fast.A, again.A)))


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_lq_does_not_depend_on_the_thread_count(svd):
    """The base a reload re-derives is the trained one on a machine with another thread count: LQ computes in float64
    (in fp32, 1 vs 2 threads changed 105,621 of this weight's 122,880 Q entries after 5 alternations)."""
    W = structured_weight(384, 320, seed=7) * 0.05
    one, two = at_thread_counts(lambda: lq_decompose(W, 8, max_iter=5, svd=svd))
    assert torch.equal(one.Q, two.Q)  # the base: what a reload re-derives, under the trained factors
    # the initial factors (overwritten by the trained ones at a reload) round float64 values that differ by ~1e-16,
    # so one of their fp32 roundings may land on the other side of a tie
    torch.testing.assert_close(one.B, two.B, rtol=1e-6, atol=0)
    torch.testing.assert_close(one.A, two.A, rtol=1e-6, atol=0)
    assert one.errors == pytest.approx(two.errors, rel=1e-12) and one.best == two.best  # float64 noise only


def test_subspace_svd_finds_the_top_singular_triplets_and_follows_a_moving_matrix():
    g = torch.Generator().manual_seed(6)
    U, _ = torch.linalg.qr(torch.randn(300, 40, generator=g))
    V, _ = torch.linalg.qr(torch.randn(200, 40, generator=g))
    R = (U * torch.logspace(0, -2, 40)) @ V.T + 1e-4 * torch.randn(300, 200, generator=g)
    svd = SubspaceSVD(rank=6)
    for step in range(3):  # each call warm-starts from the last one's subspace
        R = R + 1e-3 * torch.randn(300, 200, generator=g)
        Us, S, Vh = svd(R)
        exact = torch.linalg.svdvals(R)
        k = 6 + svd.oversample
        assert Us.shape == (300, k) and S.shape == (k,) and Vh.shape == (k, 200)
        torch.testing.assert_close(S[:6], exact[:6], rtol=1e-3, atol=0)
        torch.testing.assert_close(Us.T @ Us, torch.eye(k), atol=1e-5, rtol=0)


def test_auto_svd_is_exact_for_small_matrices_and_randomized_for_large_ones():
    assert resolve_lq_svd("auto", (384, 1536), 8) == "exact"  # every adapter made before the randomized solver
    assert resolve_lq_svd("auto", (4096, 11008), 16) == "randomized"
    assert resolve_lq_svd("auto", (768, 768), 200) == "exact"  # rank + oversample too large a part of the matrix
    assert resolve_lq_svd("randomized", (64, 64), 4) == "randomized"
    with pytest.raises(ValueError, match="svd='fast'"):
        lq_decompose(structured_weight(), 2, svd="fast")
    with pytest.raises(ValueError, match="lq_svd='fast'"):
        SLTrainConfig(target_modules=["q"], init_weights="lq", lq_svd="fast")


def test_an_lq_adapter_saved_before_lq_svd_existed_reloads_with_the_exact_svd(tmp_path):
    """Adapters saved before the field re-derive their base as they were made: the exact SVD in fp32, not 'auto'."""
    import json

    model, _, task_type = BUILDERS["bert"]()
    pm = get_peft_model(model, SLTrainConfig(r=2, target_modules=["query"], init_weights="lq", lq_max_iter=2,
                                             task_type=task_type))
    pm.save_pretrained(tmp_path)
    assert SLTrainConfig.from_pretrained(tmp_path).lq_svd == "auto"
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    del saved["lq_svd"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(saved))
    assert SLTrainConfig.from_pretrained(tmp_path).lq_svd == "exact-fp32"


@pytest.mark.parametrize("cfg_cls,extra", [(SLTrainConfig, {"sparsity": 0.05}), (SoraConfig, {}), (DyLoraConfig, {}),
                                           (SLTrainConfig, {"sparsity": 0.05, "lq_svd": "randomized"})],
                         ids=["sltrain", "sora", "dylora", "sltrain-randomized-svd"])
def test_lq_init(cfg_cls, extra, tmp_path):
    model, make_inputs, task_type = BUILDERS["bert"]()
    inputs = make_inputs(0)
    with torch.no_grad():
        expected = output_of(model, inputs).clone()
    cfg = cfg_cls(r=4, target_modules=["query", "value"], init_weights="lq", task_type=task_type,
                  modules_to_save=["pooler", "classifier"], **extra)
    pm = get_peft_model(model, cfg).eval()
    layer = pm.base_model.model.bert.encoder.layer[0].attention.self.query
    assert isinstance(layer.get_base_layer(), bnb.nn.Linear4bit)
    assert layer.lq_errors["lq"] < layer.lq_errors["loftq"] < layer.lq_errors["quant_only"]
    with torch.no_grad():
        out = output_of(pm, inputs)
        nf4_model = BUILDERS["bert"]()[0]
        quantize_linears(nf4_model, ["query", "value"])
        nf4_only = output_of(nf4_model, inputs)
    # Q + L reconstructs W better than Q alone, so the LQ-initialised model is closer to the full-precision one
    assert (out - expected).abs().max() < (nf4_only - expected).abs().max()
    # reload recomputes the same Q from the same full-precision base and loads the trained factors
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(BUILDERS["bert"]()[0], tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(output_of(loaded, inputs), out, atol=1e-6, rtol=0)
    merged = pm.merge_and_unload(dequantize=True)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(output_of(merged, inputs), out, atol=1e-5, rtol=0)


def test_lq_init_refuses_quantized_base_and_second_adapter():
    model, _, task_type = BUILDERS["bert-nf4"]()
    state = {k: v.clone() for k, v in model.state_dict().items() if v.dtype.is_floating_point}
    with pytest.raises(ValueError, match="full-precision nn.Linear"):
        get_peft_model(model, SLTrainConfig(target_modules=["query"], init_weights="lq", task_type=task_type))
    model, _, task_type = BUILDERS["bert"]()
    pm = get_peft_model(model, SLTrainConfig(r=2, target_modules=["query"], init_weights="lq", task_type=task_type))
    with pytest.raises(ValueError, match="full-precision|first adapter"):
        pm.add_adapter("second", SLTrainConfig(r=2, target_modules=["query"], init_weights="lq", task_type=task_type))


def test_merge_on_4bit_base_warns_with_measured_error():
    model, make_inputs, task_type = BUILDERS["bert-nf4"]()
    pm = get_peft_model(model, SoraConfig(r=3, target_modules=["query", "value"], init_weights=False, task_type=task_type))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm.base_model.merge_adapter()
    messages = [str(w.message) for w in caught if "re-quantizes" in str(w.message)]
    assert messages and "measured relative rounding error" in messages[0]
    # the warning names PEFT's merge loop, which called the layer's merge; the merge builds no autograd graph
    assert {Path(w.filename).name for w in caught if "re-quantizes" in str(w.message)} == {"tuners_utils.py"}
    assert not [w for w in caught if "requires_grad" in str(w.message)]
    err = float(messages[0].split("rounding error ")[1].split()[0])
    assert 0 < err < 0.2


def test_training_on_4bit_base_moves_only_adapters():
    model, make_inputs, task_type = BUILDERS["bert-nf4"]()
    pm = get_peft_model(model, SLTrainConfig(r=4, target_modules=["query", "value"], task_type=task_type))
    packed = {n: p.detach().clone() for n, p in pm.named_parameters() if p.dtype == torch.uint8}
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        loss = output_of(pm, make_inputs(step)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert packed and all(torch.equal(p, packed[n]) for n, p in pm.named_parameters() if n in packed)
    layer = pm.base_model.model.bert.encoder.layer[0].attention.self.query
    assert layer.sltrain_B["default"].abs().sum() > 0 and layer.sltrain_values["default"].abs().sum() > 0


def test_fisher_weights_and_context():
    model, make_inputs, task_type = BUILDERS["bert"]()
    batches = [{**make_inputs(i), "labels": torch.tensor([0, 1, 2])} for i in range(2)]
    fisher = fisher_row_col_weights(model, batches, module_names=["bert.encoder.layer.0.attention.self.query"])
    (d_row, d_col), = fisher.values()
    assert d_row.shape == (36,) and d_col.shape == (36,) and (d_row > 0).all()
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())
    with use_fisher(fisher):
        pm = get_peft_model(model, SLTrainConfig(r=2, target_modules=["query"], init_weights="lq", task_type=task_type))
    layer0 = pm.base_model.model.bert.encoder.layer[0].attention.self.query
    layer1 = pm.base_model.model.bert.encoder.layer[1].attention.self.query
    assert layer0.lq_errors != layer1.lq_errors


def test_quantize_linears_errors():
    model, _, _ = BUILDERS["bert"]()
    with pytest.raises(ValueError, match="no nn.Linear matches"):
        quantize_linears(model, ["nothing_here"])
    with pytest.raises(ValueError, match="quant_type='int4' is not one of"):
        quantize_linears(model, ["query"], quant_type="int4")


def _queries(pm) -> list:
    return [layer.attention.self.query.base_layer for layer in pm.base_model.model.bert.encoder.layer]


@pytest.mark.parametrize("cls", [SLTrainConfig, SoraConfig, DyLoraConfig])
def test_fisher_weighted_lq_adapter_reloads_onto_the_same_base(cls, tmp_path):
    """The Fisher weights an LQ initialisation used are saved beside the adapter (lq_fisher.safetensors), so loading
    without them re-derives the same quantized base: a trained adapter's outputs are equal after reload. Without the
    file the load is refused before the model is touched."""
    import copy
    import json

    model, make_inputs, task_type = BUILDERS["bert"]()
    fresh, spare, plain_base = (copy.deepcopy(model) for _ in range(3))
    gen = torch.Generator().manual_seed(0)
    fisher = {f"bert.encoder.layer.{i}.attention.self.query": (torch.rand(36, generator=gen) * 10 + 0.01,
                                                               torch.rand(36, generator=gen) * 10 + 0.01)
              for i in range(2)}
    config = lambda: cls(r=2, target_modules=["query"], init_weights="lq", task_type=task_type)  # noqa: E731
    with use_fisher(fisher):
        pm = get_peft_model(model, config())
    plain = get_peft_model(plain_base, config())
    # the weighting moved the quantized base, so a reload that ignored it would differ
    assert any(not torch.equal(dequantize_weight(a), dequantize_weight(b))
               for a, b in zip(_queries(pm), _queries(plain)))
    expected = train_then_output(pm, make_inputs, torch.tensor([0, 1, 2]))
    pm.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["lq_fisher"] == "lq_fisher.safetensors"
    reloaded = PeftModel.from_pretrained(fresh, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(output_of(reloaded, make_inputs(9)), expected, atol=0, rtol=0)
    for a, b in zip(_queries(pm), _queries(reloaded)):
        assert torch.equal(dequantize_weight(a), dequantize_weight(b))

    (tmp_path / "lq_fisher.safetensors").unlink()
    before = {n: type(m).__name__ for n, m in spare.named_modules()}
    with pytest.raises(ValueError, match=r"needs 'lq_fisher.safetensors' \(its LQ base was derived with the Fisher "
                                         r"weights.*Fix: copy lq_fisher"):
        PeftModel.from_pretrained(spare, tmp_path)
    assert {n: type(m).__name__ for n, m in spare.named_modules()} == before


def test_lq_fisher_field_is_checked():
    pair = (torch.ones(4), torch.ones(4))
    with pytest.raises(ValueError, match="lq_fisher is set but init_weights=True"):
        SLTrainConfig(lq_fisher={"q": pair})
    with pytest.raises(ValueError, match=r"lq_fisher must map module names to \(row, column\) 1-D tensors"):
        SLTrainConfig(init_weights="lq", lq_fisher={"q": torch.ones(4)})
    assert not SLTrainConfig(init_weights="lq").to_dict()["lq_fisher"]  # nothing recorded without use_fisher
    model, _, task_type = BUILDERS["bert"]()
    named = SLTrainConfig(r=2, target_modules=["query"], init_weights="lq", lq_fisher="lq_fisher.safetensors",
                          task_type=task_type)
    with pytest.raises(ValueError, match="names the file 'lq_fisher.safetensors'.*PeftModel.from_pretrained"):
        get_peft_model(model, named)


@pytest.mark.parametrize("quant_type,layer", [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_peft_lora_on_a_model_quantized_after_loading_merges(quant_type, layer):
    """quantize_linears marks the model as loaded in 4-bit (8-bit), as BitsAndBytesConfig does, so PEFT's own LoRA
    wraps the layers in its bitsandbytes layer and merge_and_unload works (a plain LoRA Linear's merge fails on them)."""
    from peft import LoraConfig

    model, make_inputs, task_type = BUILDERS["bert"]()
    quantize_linears(model, ["query", "value"], quant_type=quant_type)
    pm = get_peft_model(model, LoraConfig(r=2, target_modules=["query", "value"], task_type=task_type))
    assert {type(m).__name__ for n, m in pm.named_modules() if n.endswith(("query", "value"))} == {layer}
    for name, p in pm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    pm.eval()
    with torch.no_grad():
        expected = output_of(pm, make_inputs(0))
        merged = pm.merge_and_unload()  # re-quantizes W + ΔW: close, not exact
        torch.testing.assert_close(output_of(merged, make_inputs(0)), expected, atol=0.05, rtol=0)


def test_an_lq_adapter_records_its_quantizers_and_warns_when_loaded_with_others(tmp_path):
    """The base is re-derived at load: the adapter records the quantizer versions it was made with, and a load with
    other versions warns (with the same ones it does not)."""
    import json
    from importlib.metadata import version

    model, _, task_type = BUILDERS["bert"]()
    pm = get_peft_model(model, SLTrainConfig(r=2, target_modules=["query"], init_weights="lq", lq_max_iter=2,
                                             task_type=task_type))
    pm.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["lq_quantizers"] == {"bitsandbytes": version("bitsandbytes")}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        PeftModel.from_pretrained(BUILDERS["bert"]()[0], tmp_path)
    assert not [w for w in seen if "quantizer versions" in str(w.message)]
    saved["lq_quantizers"] = {"bitsandbytes": "0.0.1"}
    (tmp_path / "adapter_config.json").write_text(json.dumps(saved))
    with pytest.warns(UserWarning, match=r"other quantizer versions .*bitsandbytes 0.0.1 -> "):
        PeftModel.from_pretrained(BUILDERS["bert"]()[0], tmp_path)
    with pytest.raises(ValueError, match="lq_quantizers"):
        SLTrainConfig(target_modules=["q"], lq_quantizers={"bitsandbytes": "0.50.2"})  # without LQ init
