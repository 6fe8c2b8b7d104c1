"""Sparse RandLoRA: PEFT RandLoRA's ΔW at density 1 given the same bases, the sparse path against its dense oracle
(values and gradients, both layer orientations), the seeded shared bases, no dense basis-sized tensor in the sparse
training step, bit-exact reload in a fresh process, clear errors (the Triton kernels: test_triton_kernels.py)."""

from __future__ import annotations

import textwrap
from types import SimpleNamespace

import pytest
import torch
from _builders import BUILDERS, output_of
from _forkserver import fresh_python
from peft import PeftModel, RandLoraConfig, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode

import sparse_lowrank_peft.tuners.sparse_randlora  # noqa: F401  (registers the method)
from sparse_lowrank_peft.delta.support import support_nnz
from sparse_lowrank_peft.export import export_to_lora
from sparse_lowrank_peft.tuners.sparse_randlora import SparseRandLoraConfig, SparseRandLoraLayer
from sparse_lowrank_peft.tuners.sparse_randlora import bases as rb

GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]  # 36->108, 36->36, 36->144 and mlp.c_proj 144->36 (out < in: transposed)
ROBERTA = {"target_modules": ["query", "value", "intermediate.dense"], "modules_to_save": ["classifier"]}


def srl_model(family="gpt2", **kwargs):
    model, make_inputs, task_type = BUILDERS[family]()
    fields = {"r": 4, "randlora_alpha": 8, "basis_density": 0.25, "init_weights": False, **kwargs}
    if family == "gpt2":
        fields.setdefault("target_modules", GPT2_TARGETS)
    else:
        fields = {**ROBERTA, **fields}
    return get_peft_model(model, SparseRandLoraConfig(task_type=task_type, **fields)).eval(), make_inputs


def layers(pm):
    return [(n, m) for n, m in pm.named_modules() if isinstance(m, SparseRandLoraLayer)]


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("r", [0, -4, 2.5, True])
def test_bad_rank(r):
    with pytest.raises(ValueError, match=rf"SparseRandLoraConfig\.r={r!r} must be a positive integer.*Fix"):
        SparseRandLoraConfig(r=r)


@pytest.mark.parametrize("density", [0, 0.0, -0.1, 1.0001, 2, float("nan"), True, "0.1"])
def test_bad_density(density):
    with pytest.raises(ValueError, match=r"SparseRandLoraConfig\.basis_density=.* is not a density in \(0, 1\].*Fix"):
        SparseRandLoraConfig(basis_density=density)


def test_bad_other_fields():
    for kwargs, match in [
        ({"basis_seed": -1}, r"basis_seed=-1.*Fix"),
        ({"randlora_alpha": float("inf")}, r"randlora_alpha=inf.*Fix"),
        ({"randlora_dropout": 1.0}, r"randlora_dropout=1\.0.*Fix"),
        ({"bias": "lora_only"}, r"bias='lora_only'.*Fix"),
    ]:
        with pytest.raises(ValueError, match=match):
            SparseRandLoraConfig(**kwargs)
    assert SparseRandLoraConfig(basis_density=1).basis_density == 1.0


# ---------------------------------------------------------------------------------------------- PEFT RandLoRA
@pytest.mark.parametrize("family,targets", [("mlp", ["lin0", "lin1"]), ("gpt2", GPT2_TARGETS)])
def test_density_one_is_peft_randlora(family, targets):
    """Given PEFT's bases and the same λ, γ, basis_density=1 gives PEFT RandLoRA's ΔW and outputs (Linear and
    Conv1D, out ≥ in and out < in)."""
    model, make_inputs, task_type = BUILDERS[family]()
    peft_model = get_peft_model(model, RandLoraConfig(r=4, randlora_alpha=8, target_modules=targets,
                                                      task_type=task_type, init_weights=False,
                                                      fan_in_fan_out=family == "gpt2")).eval()
    model2, _, _ = BUILDERS[family]()
    ours = get_peft_model(model2, SparseRandLoraConfig(r=4, randlora_alpha=8, basis_density=1.0, target_modules=targets,
                                                       task_type=task_type, init_weights=False)).eval()
    theirs = dict(peft_model.named_modules())
    n_layers = 0
    for name, layer in layers(ours):
        peft_layer = theirs[name]
        N = peft_layer.num_bases
        lo, hi = layer.min_dim, layer.max_dim
        A = peft_layer.randlora_A["default"][:, :N, :lo][:, 0, :].float()  # (r, min): shared by the bases
        B = peft_layer.randlora_B["default"][:hi, :N, :].flatten(1).float()  # (max, N·r)
        layer.sparse_randlora_basis_refs["default"] = SimpleNamespace(
            dense=True, N=N, dense_bases=lambda device, dtype, A=A, B=B: (A.to(device, dtype), B.to(device, dtype))
        )
        with torch.no_grad():
            layer.sparse_randlora_lambda["default"].copy_(peft_layer.randlora_lambda["default"])
            layer.sparse_randlora_gamma["default"].copy_(peft_layer.randlora_gamma["default"])
        torch.testing.assert_close(layer.get_delta_weight("default"), peft_layer.get_delta_weight("default"),
                                   atol=1e-6, rtol=1e-5)
        n_layers += 1
    assert n_layers == len([m for m in theirs.values() if type(m).__name__ == "Linear" and hasattr(m, "randlora_A")])
    inputs = make_inputs(3)
    with torch.no_grad():
        torch.testing.assert_close(output_of(ours, inputs), output_of(peft_model, inputs), atol=1e-5, rtol=1e-5)


def test_dense_parameters_are_peft_shaped():
    pm, _ = srl_model("mlp", target_modules=["lin0", "lin1"], init_weights=True, r=4)
    lin0 = pm.base_model.model.lin0  # 11 -> 23: min 11, N = ceil(11 / 4) = 3
    assert lin0.sparse_randlora_lambda["default"].shape == (4, 3)
    assert lin0.sparse_randlora_gamma["default"].shape == (3, 11)
    assert torch.count_nonzero(lin0.sparse_randlora_lambda["default"]) == 0
    assert torch.all(lin0.sparse_randlora_gamma["default"] == 1 / 11)


# ---------------------------------------------------------------------------------------------- sparse path
def test_sparse_path_matches_dense_oracle_with_gradients():
    """The two sparse_delta products equal x·ΔWᵀ built densely from the densified bases, and so do ∂x, ∂λ and ∂γ."""
    pm, _ = srl_model(basis_density=0.3)
    orientations = set()
    for _, layer in layers(pm):
        orientations.add(layer.transposed)
        x = torch.randn(2, 5, layer.in_features, dtype=torch.float64)
        layer.double()
        params = [layer.sparse_randlora_lambda["default"], layer.sparse_randlora_gamma["default"]]
        x1 = x.clone().requires_grad_(True)
        y = layer.lowrank_forward(x1, "default")
        g = torch.randn_like(y)
        grads = torch.autograd.grad(y, [x1, *params], g)
        x2 = x.clone().requires_grad_(True)
        A, B = layer.get_basis("default").dense_bases(torch.device("cpu"), torch.float64)  # densified bases
        T = layer.scaled_T("default", A)  # differentiable in λ and γ
        delta = (B @ T if not layer.transposed else T.t() @ B.t()) * layer.sparse_randlora_scaling["default"]
        y_ref = x2 @ delta.t()
        grads_ref = torch.autograd.grad(y_ref, [x2, *params], g)
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
        for got, want in zip(grads, grads_ref):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert orientations == {False, True}


def test_sparse_bases_are_seeded_sparse_and_shared():
    pm, make_inputs = srl_model(basis_density=0.25, basis_seed=5)
    by_name = dict(layers(pm))
    a0 = by_name["base_model.model.transformer.h.0.attn.c_proj"].get_basis("default")  # 36x36
    a1 = by_name["base_model.model.transformer.h.1.attn.c_proj"].get_basis("default")
    up = by_name["base_model.model.transformer.h.0.mlp.c_fc"].get_basis("default")  # 36 -> 144
    down = by_name["base_model.model.transformer.h.0.mlp.c_proj"].get_basis("default")  # 144 -> 36: same min/max
    assert a0 is a1 and up is down and up is not a0
    fresh = rb.RandBasis(5, 4, 36, 144, 0.25)  # drawn again from the seed, on CPU: the same numbers
    assert torch.equal(fresh.B_support.indices, up.B_support.indices) and torch.equal(fresh.B_values, up.B_values)
    assert fresh.checksum == up.checksum
    N = rb.num_bases(36, 4)
    assert up.A_support.nnz == support_nnz((4, 36), 0.25) and up.B_support.nnz == support_nnz((144, N * 4), 0.25)
    assert torch.all(up.A_values.abs() == 0.25**-0.5) and torch.all(up.B_values.abs() == 0.25**-0.5)
    assert 0.3 < float((up.B_values > 0).float().mean()) < 0.7
    before = rb.cache_info()["generated"]
    pm.train()
    for step in range(2):
        output_of(pm, make_inputs(step)).sum().backward()
    assert rb.cache_info()["generated"] == before, "bases were drawn again during training"


class MaxOutput(TorchDispatchMode):
    """Records the largest new tensor (not a view of an input) any aten op produces while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        def dense(t):  # a sparse CSR wrapper allocates nothing beyond its (dense) parts, which are seen separately
            return isinstance(t, torch.Tensor) and t.layout == torch.strided

        shared = {a.untyped_storage().data_ptr() for a in (*args, *(kwargs or {}).values()) if dense(a)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if dense(t) and t.untyped_storage().data_ptr() not in shared:
                self.largest = max(self.largest, t.untyped_storage().nbytes() // t.element_size())
        return out


@pytest.mark.parametrize("transposed", [False, True])
def test_sparse_training_step_builds_no_dense_basis(transposed):
    """A training step at density 0.05 allocates nothing of a basis matrix's size (N·r × min or out × in); the dense
    path (PEFT's math) builds the N·r × min matrix T every step."""
    d_in, d_out, r, tokens = (96, 128, 8, 4) if not transposed else (128, 96, 8, 4)

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(d_in, d_out)

        def forward(self, x):
            return self.lin(x)

    largest, saved = {}, {}
    for density in (0.05, 1.0):
        pm = get_peft_model(One(), SparseRandLoraConfig(r=r, basis_density=density, target_modules=["lin"],
                                                        init_weights=False))
        x = torch.randn(tokens, d_in, requires_grad=True)
        pm(x).sum().backward()  # warm-up: bases and layouts built once
        with MaxOutput() as probe:
            pm(x).square().sum().backward()
        assert pm.base_model.model.lin.sparse_randlora_gamma["default"].grad is not None
        largest[density] = probe.largest
        # what autograd keeps until the backward, besides the input and the parameters
        keep = {t.untyped_storage().data_ptr() for t in (x, *pm.parameters())}
        kept = {}

        def pack(t):
            if t.layout == torch.strided and t.untyped_storage().data_ptr() not in keep:
                kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes() // t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            pm(x)
        saved[density] = kept
    basis_size = 96 * 96  # T: N·r × min with N·r = 96
    assert largest[1.0] >= basis_size
    assert largest[0.05] < basis_size / 4, largest
    # sparse: the activation T or Bᵀ reads (tokens × 96 at most), T's nnz values and the cached frozen values;
    # dense: T itself (96 × 96) besides the activation
    assert max(saved[0.05].values()) < basis_size / 4 and max(saved[1.0].values()) >= basis_size
    assert sum(saved[0.05].values()) < sum(saved[1.0].values())


# ---------------------------------------------------------------------------------------------- checkpoints
def saved(tmp_path, **kwargs):
    pm, make_inputs = srl_model("roberta", **kwargs)
    pm.save_pretrained(tmp_path)
    return pm, make_inputs


def test_checkpoint_holds_scalings_and_record_only(tmp_path):
    saved(tmp_path)
    from safetensors.torch import load_file

    sd = {k: v for k, v in load_file(tmp_path / "adapter_model.safetensors").items() if ".sparse_randlora_" in k}
    kinds = {k.rsplit(".", 1)[1] for k in sd}
    assert kinds == {"sparse_randlora_lambda", "sparse_randlora_gamma", "sparse_randlora_basis_key"}


def test_export_to_lora_needs_a_rank_and_is_exact_at_full_rank(tmp_path):
    """RandLoRA's ΔW is full-rank: no exact LoRA factors (lowrank_factors is None), so export without a rank is
    refused; with one it goes through LoRA-Squeeze's randomized SVD on the layer's forward (exact at full rank)."""
    pm, make_inputs = srl_model("roberta", basis_density=0.25)
    assert all(layer.lowrank_factors("default") is None for _, layer in layers(pm))
    with pytest.raises(ValueError, match=r"rank"):
        export_to_lora(pm, tmp_path / "lora")
    pytest.importorskip("sparse_lowrank_peft.squeeze")
    export_to_lora(pm, tmp_path / "lora", rank=36)  # = min(out, in) of every layer: the whole ΔW
    inputs = make_inputs(2)
    with torch.no_grad():
        expected = output_of(pm, inputs)
        lora = PeftModel.from_pretrained(BUILDERS["roberta"]()[0], tmp_path / "lora").eval()
        assert lora.peft_config["default"].peft_type == "LORA"
        torch.testing.assert_close(output_of(lora, inputs), expected, atol=1e-4, rtol=1e-4)


FRESH = textwrap.dedent(
    r"""
    import sys, torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification
    import sparse_lowrank_peft.tuners.sparse_randlora  # noqa: F401
    base_dir, inputs_path, out_path, *adapters = sys.argv[1:]
    inputs = torch.load(inputs_path)
    out = {}
    for adapter in adapters:
        model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base_dir), adapter).eval()
        with torch.no_grad():
            out[adapter] = model(**inputs).logits
    torch.save(out, out_path)
    """
)


def test_reload_bit_exact_in_fresh_process(tmp_path):
    """Sparse and dense bases are regenerated from their seeds in a new process: the outputs are bit for bit the
    saved model's. (The same layers on the Triton kernels: ``test_triton_kernels.py``, in its interpreter run.)"""
    base, make_inputs, _ = BUILDERS["roberta"]()
    base.save_pretrained(tmp_path / "base")
    inputs = make_inputs(4)
    torch.save(inputs, tmp_path / "inputs.pt")
    expected = {}
    for name, density in (("sparse", 0.25), ("dense", 1.0)):
        pm, _ = saved(tmp_path / name, basis_density=density, basis_seed=2)
        with torch.no_grad():
            expected[name] = output_of(pm, inputs)
    proc = fresh_python(["-c", FRESH, tmp_path / "base", tmp_path / "inputs.pt", tmp_path / "out.pt",
                         tmp_path / "sparse", tmp_path / "dense"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    for name in ("sparse", "dense"):
        assert torch.equal(out[str(tmp_path / name)], expected[name]), f"{name} did not reload bit-exactly"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    pm, make_inputs = srl_model("roberta", basis_density=0.1)
    inputs = make_inputs(0)
    with torch.no_grad():
        expected = output_of(pm, inputs)
        got = output_of(pm.cuda(), {k: v.cuda() for k, v in inputs.items()}).cpu()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
