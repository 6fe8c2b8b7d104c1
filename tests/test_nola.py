"""NOLA: the math against its definition, the seeded shared bases, memory of the training step, exact export to
plain LoRA, bit-exact reload in a fresh process, and clear errors for bad configs and mismatched checkpoints."""

from __future__ import annotations

import textwrap

import pytest
import torch
from _builders import BUILDERS, build_roberta_other_width, edit_adapter_config, output_of
from _forkserver import fresh_python
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

import sparse_lowrank_peft.tuners.nola  # noqa: F401  (registers the method)
from sparse_lowrank_peft.export import export_to_lora
from sparse_lowrank_peft.tuners.nola import NolaConfig, NolaLayer
from sparse_lowrank_peft.tuners.nola import bases as nola_bases

ROBERTA_TARGETS = {"target_modules": ["query", "value", "intermediate.dense"], "modules_to_save": ["classifier"]}


def nola_model(family="roberta", init_weights=False, **kwargs):
    model, make_inputs, task_type = BUILDERS[family]()
    fields = {"r": 4, "num_basis_A": 12, "num_basis_B": 10, "lora_alpha": 8, **ROBERTA_TARGETS, **kwargs}
    pm = get_peft_model(model, NolaConfig(task_type=task_type, init_weights=init_weights, **fields))
    return pm.eval(), make_inputs


def layers(pm):
    return [(n, m) for n, m in pm.named_modules() if isinstance(m, NolaLayer)]


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("field", ["r", "num_basis_A", "num_basis_B"])
@pytest.mark.parametrize("value", [0, -2, 1.5, True])
def test_bad_positive_ints(field, value):
    with pytest.raises(ValueError, match=rf"NolaConfig\.{field}={value!r} must be a positive integer.*Fix"):
        NolaConfig(**{field: value}, target_modules=["lin0"])


def test_bad_seed_dropout_bias():
    with pytest.raises(ValueError, match=r"NolaConfig\.basis_seed=-1.*Fix"):
        NolaConfig(basis_seed=-1)
    with pytest.raises(ValueError, match=r"NolaConfig\.lora_dropout=1\.0.*Fix"):
        NolaConfig(lora_dropout=1.0)
    with pytest.raises(ValueError, match=r"NolaConfig\.bias='lora_only'.*Fix"):
        NolaConfig(bias="lora_only")


# ---------------------------------------------------------------------------------------------- math
def test_delta_is_the_definition():
    """ΔW = (α/r)·(Σβⱼ Bⱼ)(Σαᵢ Aᵢ) with the bases drawn from the seed on a CPU generator, and the forward agrees."""
    pm, make_inputs = nola_model(basis_seed=7)
    for _, layer in layers(pm):
        out_f, in_f = layer.out_features, layer.in_features
        bases_A = nola_bases.generate_basis(7, "A", 12, 4, in_f)
        bases_B = nola_bases.generate_basis(7, "B", 10, out_f, 4)
        gen = torch.Generator().manual_seed(nola_bases.basis_seed_for(7, "A", 12, 4, in_f))
        assert torch.equal(bases_A, (torch.rand((12, 4, in_f), generator=gen) * 2 - 1) * (1.0 / 12**0.5))
        alpha, beta = layer.nola_alpha["default"].detach(), layer.nola_beta["default"].detach()
        A = torch.einsum("k,kri->ri", alpha.double(), bases_A.double())
        B = torch.einsum("k,kor->or", beta.double(), bases_B.double())
        expected = (B @ A) * (8 / 4)
        torch.testing.assert_close(layer.get_delta_weight("default").double(), expected, atol=1e-6, rtol=1e-5)
        x = torch.randn(6, in_f)
        with torch.no_grad():
            torch.testing.assert_close(layer(x) - layer.base_layer(x), x @ expected.float().t(), atol=1e-5, rtol=1e-5)


def test_init_is_identity_with_random_alpha():
    """β = 0 so ΔW = 0 exactly; α random with std 1/√in (A has LoRA's Kaiming entry variance), so β gets gradient."""
    torch.manual_seed(0)
    pm, make_inputs = nola_model(init_weights=True, num_basis_A=400)
    for _, layer in layers(pm):
        assert torch.count_nonzero(layer.get_delta_weight("default")) == 0
        alpha = layer.nola_alpha["default"]
        assert 0.7 < float(alpha.std() * layer.in_features**0.5) < 1.3
    pm.train()
    output_of(pm, make_inputs(0)).square().mean().backward()
    _, layer = layers(pm)[0]
    assert layer.nola_beta["default"].grad.abs().sum() > 0


def test_gpt2_conv1d_merge_is_exact():
    pm, make_inputs = nola_model("gpt2", target_modules=["c_attn", "c_proj"], modules_to_save=None)
    inputs = make_inputs(1)
    with torch.no_grad():
        expected = output_of(pm, inputs).clone()
        merged = pm.merge_and_unload()
        torch.testing.assert_close(output_of(merged, inputs), expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- bases
def test_bases_shared_per_shape_and_never_regenerated():
    pm, make_inputs = nola_model(basis_seed=11, num_basis_A=9, num_basis_B=6)
    by_name = dict(layers(pm))
    q = by_name["base_model.model.roberta.encoder.layer.0.attention.self.query"]
    v = by_name["base_model.model.roberta.encoder.layer.1.attention.self.value"]
    ffn = by_name["base_model.model.roberta.encoder.layer.0.intermediate.dense"]  # 36 -> 37: same A shape, other B
    qa, qb = q.get_bases("default", torch.device("cpu"), torch.float32)
    va, vb = v.get_bases("default", torch.device("cpu"), torch.float32)
    fa, fb = ffn.get_bases("default", torch.device("cpu"), torch.float32)
    assert qa is va and qb is vb and qa is fa and fb is not qb and fb.shape == (6, 37, 4)
    before = nola_bases.cache_info()["generated"]
    pm.train()
    for step in range(3):
        output_of(pm, make_inputs(step)).sum().backward()
    assert nola_bases.cache_info()["generated"] == before, "bases were drawn again during training"
    # a second model with the same seed and shapes shares the same tensors
    pm2, _ = nola_model(basis_seed=11, num_basis_A=9, num_basis_B=6)
    q2 = dict(layers(pm2))["base_model.model.roberta.encoder.layer.0.attention.self.query"]
    assert q2.get_bases("default", torch.device("cpu"), torch.float32)[0] is qa
    # another dtype is one cached copy too, shared by the layers
    half_q = q.get_bases("default", torch.device("cpu"), torch.float64)[0]
    assert half_q is v.get_bases("default", torch.device("cpu"), torch.float64)[0]
    assert torch.equal(half_q, qa.double())


def test_checkpoint_holds_coefficients_and_record_only(tmp_path):
    pm, _ = nola_model()
    pm.save_pretrained(tmp_path)
    sd = {k: v for k, v in load_file(tmp_path / "adapter_model.safetensors").items() if ".nola_" in k}  # not the head
    for key, value in sd.items():
        if key.endswith("nola_alpha"):
            assert value.shape == (12,)
        elif key.endswith("nola_beta"):
            assert value.shape == (10,)
        else:
            assert key.endswith("nola_basis_key") and value.shape == (7,) and value.dtype == torch.int64, key
    assert len(sd) == 3 * 6  # 2 layers x (query, value, intermediate.dense) x 3 tensors


def test_save_basis_stores_and_uses_them(tmp_path):
    pm, make_inputs = nola_model(save_basis=True)
    inputs = make_inputs(0)
    with torch.no_grad():
        expected = output_of(pm, inputs)
    pm.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "adapter_model.safetensors")
    key = next(k for k in sd if k.endswith("query.nola_basis_A"))
    assert sd[key].shape == (12, 4, 36)
    loaded = PeftModel.from_pretrained(BUILDERS["roberta"]()[0], tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(output_of(loaded, inputs), expected, atol=0, rtol=0)
    # the loaded bases are used, not the cache: changing them (and the record) changes the output
    layer = next(m for _, m in layers(loaded))
    assert layer.nola_basis_A["default"].data_ptr() != nola_bases.get_basis(0, "A", 12, 4, 36).data_ptr()


# ---------------------------------------------------------------------------------------------- memory
class MaxOutput(TorchDispatchMode):
    """Records the largest tensor any aten op produces (forward and backward) while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)]
        shared = {a.untyped_storage().data_ptr() for a in inputs}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in shared:  # views allocate nothing
                self.largest = max(self.largest, t.untyped_storage().nbytes() // t.element_size())
        return out


def test_training_step_builds_no_k_fold_tensor():
    """Forward + backward of a NOLA layer allocate nothing of the bases' size (k·r·in): A and B come from one
    matrix-vector product each, and ∂α, ∂β from one more; a naive Σᵢ αᵢ·Aᵢ by broadcasting builds k·r·in."""
    k, r, d, tokens = 256, 4, 64, 8

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(d, d)

        def forward(self, x):
            return self.lin(x)

    pm = get_peft_model(One(), NolaConfig(r=r, num_basis_A=k, num_basis_B=k, target_modules=["lin"], init_weights=False))
    layer = pm.base_model.model.lin
    x = torch.randn(tokens, d, requires_grad=True)
    pm(x).sum().backward()  # warm-up: bases drawn and cached
    with MaxOutput() as probe:
        pm(x).square().sum().backward()
    assert layer.nola_alpha["default"].grad is not None and layer.nola_beta["default"].grad is not None
    assert probe.largest <= max(tokens * d, r * d), probe.largest
    bases_A, _ = layer.get_bases("default", torch.device("cpu"), torch.float32)
    with MaxOutput() as naive:
        alpha = layer.nola_alpha["default"]
        (alpha[:, None, None] * bases_A).sum(0).square().sum().backward()
    assert naive.largest >= k * r * d  # the probe sees a k-fold temporary when there is one

    # saved for backward: besides the input, parameters and the shared bases, only O(r·(in + out) + tokens·r)
    keep = {t.untyped_storage().data_ptr() for t in (x, *pm.parameters(), *layer.get_bases("default", x.device, x.dtype))}
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in keep:
            saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        pm(x).square().sum()
    assert sum(saved) <= 2 * r * (2 * d) + 4 * tokens * d, saved


# ---------------------------------------------------------------------------------------------- checkpoints
def saved_nola(tmp_path, **kwargs):
    pm, make_inputs = nola_model(**kwargs)
    pm.save_pretrained(tmp_path)
    return pm, make_inputs


def test_other_base_shape_is_refused(tmp_path):
    saved_nola(tmp_path)
    other = build_roberta_other_width()
    with pytest.raises(ValueError, match=r"trained on a 36x36 layer, but this model's layer is 40x40.*Fix"):
        PeftModel.from_pretrained(other, tmp_path)


# ---------------------------------------------------------------------------------------------- fresh processes
FRESH = textwrap.dedent(
    r"""
    import sys, torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification
    base_dir, lora_dir, nola_dir, inputs_path, out_path = sys.argv[1:6]
    inputs = torch.load(inputs_path)
    # 1. the exported folder is a plain LoRA adapter: plain peft loads it without this package
    lora = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base_dir), lora_dir).eval()
    assert lora.peft_config["default"].peft_type == "LORA"
    with torch.no_grad():
        lora_out = lora(**inputs).logits
    assert not any(m.startswith("sparse_lowrank_peft") for m in sys.modules), "plain peft step imported our package"
    # 2. the NOLA checkpoint reloads in a fresh process (bases regenerated from the seed)
    import sparse_lowrank_peft.tuners.nola  # noqa: F401
    nola = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base_dir), nola_dir).eval()
    with torch.no_grad():
        nola_out = nola(**inputs).logits
    torch.save({"lora": lora_out, "nola": nola_out}, out_path)
    """
)


def test_export_to_plain_lora_and_reload_in_fresh_process(tmp_path):
    model, make_inputs, task_type = BUILDERS["roberta"]()
    model.save_pretrained(tmp_path / "base")
    pm = get_peft_model(model, NolaConfig(r=4, num_basis_A=12, num_basis_B=10, lora_alpha=8, task_type=task_type,
                                           init_weights=False, basis_seed=3, **ROBERTA_TARGETS)).eval()
    with torch.no_grad():  # a trained-looking head, so the export must carry it
        pm.base_model.model.classifier.modules_to_save["default"].dense.weight.mul_(1.5)
    inputs = make_inputs(9)
    with torch.no_grad():
        expected = output_of(pm, inputs)
    pm.save_pretrained(tmp_path / "nola")
    export_to_lora(pm, tmp_path / "lora")
    # factors of the export are exactly NOLA's mixed factors
    factors = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    layer = pm.base_model.model.roberta.encoder.layer[0].attention.self.query
    A, B = layer.factors("default")
    key = "base_model.model.roberta.encoder.layer.0.attention.self.query"
    assert torch.equal(factors[f"{key}.lora_A.weight"], A.detach())
    assert torch.equal(factors[f"{key}.lora_B.weight"], (B * layer.nola_scaling["default"]).detach())
    torch.save(inputs, tmp_path / "inputs.pt")
    proc = fresh_python(["-c", FRESH, tmp_path / "base", tmp_path / "lora", tmp_path / "nola", tmp_path / "inputs.pt",
                         tmp_path / "out.pt"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    torch.testing.assert_close(out["lora"], expected, atol=1e-5, rtol=0)
    assert torch.equal(out["nola"], expected), "NOLA checkpoint did not reload bit-exactly in a fresh process"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bases_equal_cpu_bases():
    cpu = nola_bases.get_basis(1, "A", 8, 4, 33)
    cuda = nola_bases.get_basis(1, "A", 8, 4, 33, device="cuda")
    assert torch.equal(cuda.cpu(), cpu)
    pm, make_inputs = nola_model()
    inputs = make_inputs(0)
    with torch.no_grad():
        expected = output_of(pm, inputs)
        got = output_of(pm.cuda(), {k: v.cuda() for k, v in inputs.items()}).cpu()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- coefficients in 4 / 8 bits
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_coefficients_save_small_and_reload_to_the_quantized_values(tmp_path, bits):
    pytest.importorskip("bitsandbytes")
    from sparse_lowrank_peft.delta.quant import dequantize_vector, quantize_vector

    pm, make_inputs = nola_model(coefficient_bits=bits, num_basis_A=128, num_basis_B=64)
    pm.save_pretrained(tmp_path / "q")
    full, _ = nola_model(num_basis_A=128, num_basis_B=64)
    full.save_pretrained(tmp_path / "full")
    sd = load_file(tmp_path / "q" / "adapter_model.safetensors")
    assert not any(k.endswith(("nola_alpha", "nola_beta")) for k in sd)
    codes = [v for k, v in sd.items() if k.endswith("nola_alpha_codes")]
    assert codes and all(c.dtype == torch.uint8 and c.numel() == 128 * bits // 8 for c in codes)
    assert (tmp_path / "q" / "adapter_model.safetensors").stat().st_size < (
        tmp_path / "full" / "adapter_model.safetensors").stat().st_size
    reloaded = PeftModel.from_pretrained(BUILDERS["roberta"]()[0], tmp_path / "q").eval()
    expected_model = pm
    for (name, layer), (_, again) in zip(layers(expected_model), layers(reloaded)):
        for attr, k in (("nola_alpha", 128), ("nola_beta", 64)):
            trained = getattr(layer, attr)["default"].detach()
            want = dequantize_vector(*quantize_vector(trained, bits), bits, k)
            torch.testing.assert_close(getattr(again, attr)["default"].detach(), want, atol=0, rtol=0, msg=name)
            assert 0 < float((want - trained).norm() / trained.norm()) < (0.12 if bits == 4 else 0.012)
    # the trained model keeps its full-precision coefficients (quantized at save only)
    assert all(getattr(l, "nola_alpha")["default"].dtype == torch.float32 for _, l in layers(pm))


def test_quantized_coefficients_need_their_bit_width(tmp_path):
    pytest.importorskip("bitsandbytes")
    saved_nola(tmp_path, coefficient_bits=4)
    edit_adapter_config(tmp_path, coefficient_bits=None)
    with pytest.raises(ValueError, match=r"coefficient_bits=None.*Fix: set coefficient_bits"):
        PeftModel.from_pretrained(BUILDERS["roberta"]()[0], tmp_path)
    edit_adapter_config(tmp_path, coefficient_bits=4, num_basis_A=14)
    with pytest.raises(ValueError, match=r"num_basis_A=14 needs 7.*Fix"):
        PeftModel.from_pretrained(BUILDERS["roberta"]()[0], tmp_path)


@pytest.mark.parametrize("value", [3, 16, True, "4"])
def test_bad_coefficient_bits(value):
    with pytest.raises(ValueError, match="coefficient_bits"):
        NolaConfig(coefficient_bits=value)
