"""Reading and computing with 4-bit weights on both of bitsandbytes' CPU code paths, on any machine.

bitsandbytes branches on the CPU: with AVX-512-BF16 a ``Linear4bit`` repacks its weight in place at the first eval
forward, and its native AVX-512 dequantize kernel is wrong for some 2-D shapes. ``tests/_bnb_cpu.py`` forces either
path; the dequantize choice of ``delta.quant`` (``CPU_DEQUANTIZE``) runs both ways too.
"""

from __future__ import annotations

import pytest
import torch
from _bnb_cpu import PATHS, bnb_cpu_path, is_packed, packed_gemv_reference
from _builders import structured_weight
from peft import get_peft_model

from sparse_lowrank_peft import SLTrainConfig
from sparse_lowrank_peft.delta import quant
from sparse_lowrank_peft.delta.quant import (
    dequantize_4bit,
    dequantize_4bit_reference,
    dequantize_weight,
    keep_standard_layout,
    linear4bit_forward,
    lq_decompose,
    keep_standard_layouts,
    quantize_dequantize,
    restore_standard_layout,
    to_linear4bit,
)

bnb = pytest.importorskip("bitsandbytes", reason="4-bit bases need bitsandbytes (the bnb extra)")
F = bnb.functional
BNB_VERSION = tuple(int(v) for v in bnb.__version__.split(".")[:2])

DEQUANTIZE_PATHS = ("bnb", "torch")
# (out, in): 64x48 and 96x80 are the shapes bitsandbytes' AVX-512 kernel dequantizes wrongly as 2-D weights (blocks of
# 64 straddle rows); 37x23 has an odd number of values; 3x5 is smaller than one block.
ODD_SHAPES = [(64, 48), (96, 80), (37, 23), (3, 5), (128, 64)]
# NF4 / FP4 round trip of a standard normal weight, relative Frobenius error: measured 0.0914-0.0925 (NF4) and
# 0.1228-0.1254 (FP4) on these shapes (seed 0, both absmax kinds) with a correct dequantization; bitsandbytes'
# AVX-512 kernel on the 2-D weight gave 0.26-0.40 (NF4).
ROUND_TRIP_BOUND = {"nf4": 0.10, "fp4": 0.135}


@pytest.fixture(params=DEQUANTIZE_PATHS)
def dequantize_path(request, monkeypatch):
    monkeypatch.setattr(quant, "CPU_DEQUANTIZE", request.param)
    return request.param


def _codes_absmax(W, quant_type, nested):
    q, state = F.quantize_4bit(W, quant_type=quant_type, blocksize=64, compress_statistics=nested)
    absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset if nested else state.absmax
    return q, state, absmax


@pytest.mark.parametrize("shape", ODD_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True], ids=["flat-absmax", "nested-absmax"])
def test_dequantize_is_exact_and_round_trip_bounded(dequantize_path, shape, quant_type, nested):
    if shape[0] * shape[1] % 2 and BNB_VERSION < (0, 50):
        pytest.skip(f"bitsandbytes {bnb.__version__} cannot quantize an odd number of values (its quantize_4bit fails)")
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    q, state, absmax = _codes_absmax(W, quant_type, nested)
    got = dequantize_4bit(q, state)
    expected = dequantize_4bit_reference(q, absmax, quant_type, 64, shape)
    assert got.dtype == torch.float32 and got.shape == shape
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    if W.numel() >= 64:  # a relative bound needs more than a handful of values
        assert float((W - got).norm() / W.norm()) < ROUND_TRIP_BOUND[quant_type]
    torch.testing.assert_close(quantize_dequantize(W, quant_type, nested), got, atol=0, rtol=0)


@pytest.mark.parametrize("shape", [(64, 48), (96, 80)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_lq_errors_decrease(dequantize_path, shape, quant_type):
    """With a wrong Q the iteration diverged (0.473, 0.760, 0.806, ...) and LQ fell back to LoftQ's iterate."""
    res = lq_decompose(structured_weight(*shape), rank=8, quant_type=quant_type)
    assert res.errors[1] < res.errors[0], res.errors
    assert res.best > 0 and res.error < res.errors[0] < res.quant_only_error, res.errors


@pytest.mark.parametrize("nested", [False, True], ids=["flat-absmax", "nested-absmax"])
def test_repacked_weight_is_read_and_restored(nested):
    """bitsandbytes' AVX-512-BF16 repack (done here directly, which runs on any CPU) changes the layout and rounds the
    absmax to bf16; the logical weight is read from it without changing it, and restored in place exactly."""
    lin = torch.nn.Linear(128, 64)
    layer = to_linear4bit(lin, compress_statistics=nested)
    before = dequantize_weight(layer)
    q, state, absmax = _codes_absmax(lin.weight.detach().float(), "nf4", nested)
    layer.weight.data, layer.weight.quant_state = F._convert_weight_packed_for_cpu(layer.weight.data, layer.weight.quant_state)
    assert is_packed(layer)
    packed_bytes = layer.weight.data.clone()
    read = dequantize_weight(layer)
    assert is_packed(layer) and torch.equal(layer.weight.data, packed_bytes), "reading changed the layer"
    bf16_absmax = absmax.to(torch.bfloat16).to(torch.float32)
    torch.testing.assert_close(read, dequantize_4bit_reference(q, bf16_absmax, "nf4", 64, (64, 128)), atol=0, rtol=0)
    assert float((read - before).norm() / before.norm()) < 2**-8  # only the absmax' bf16 rounding
    assert restore_standard_layout(layer) and not is_packed(layer)
    torch.testing.assert_close(dequantize_weight(layer), read, atol=0, rtol=0)
    assert not restore_standard_layout(layer)


def test_linear4bit_forward_matches_bitsandbytes_and_its_gradient():
    """Our CPU forward is bitsandbytes' generic CPU math (exact where its kernel is right: 128x64)."""
    lin = torch.nn.Linear(64, 128)
    with bnb_cpu_path("generic"):
        layer = to_linear4bit(lin)
    x = torch.randn(2, 5, 64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    ours, theirs = linear4bit_forward(layer, x), layer(x2)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)
    g = torch.randn_like(ours)
    ours.backward(g)
    theirs.backward(g)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)
    # and on a shape bitsandbytes' AVX-512 kernel gets wrong, against the reference dequantization
    layer = to_linear4bit(torch.nn.Linear(48, 64))
    x = torch.randn(7, 48)
    expected = x @ dequantize_4bit_reference(*_reference_inputs(layer)).T + layer.bias
    torch.testing.assert_close(linear4bit_forward(layer, x), expected, atol=1e-5, rtol=1e-5)


def _reference_inputs(layer):
    state = layer.weight.quant_state
    absmax = quant._blockwise_absmax(state)
    return layer.weight.data, absmax, state.quant_type, state.blocksize, tuple(state.shape)


class TinyNet(torch.nn.Module):
    def __init__(self, width: int, path: str):
        super().__init__()
        torch.manual_seed(0)
        with bnb_cpu_path(path):
            self.a = bnb.nn.Linear4bit(width, width, bias=True, compute_dtype=torch.float32, quant_type="nf4")
            self.b = bnb.nn.Linear4bit(width, width, bias=True, compute_dtype=torch.float32, quant_type="nf4")
        for layer in (self.a, self.b):
            layer.weight = bnb.nn.Params4bit(torch.randn(width, width) / width**0.5, requires_grad=False,
                                             quant_type="nf4", blocksize=64)
            layer.to("cpu")
        self.head = torch.nn.Linear(width, 2)

    def forward(self, x):
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))))


@pytest.mark.parametrize("path", PATHS)
def test_wrapped_base_keeps_its_layout_and_unload_gives_the_setting_back(path):
    net = TinyNet(64, path).eval()
    x = torch.randn(4, 64)
    with torch.no_grad():
        net(x)  # on the AVX-512-BF16 path this repacks both layers, as a user's evaluation would
    assert is_packed(net.a) == (path == "avx512bf16")
    pm = get_peft_model(net, SLTrainConfig(r=2, sparsity=0.1, target_modules=["a"], init_weights=False))
    layer = pm.base_model.model.a
    assert not is_packed(layer.base_layer) and layer.base_layer.support_avx512bf16_for_cpu is False
    pm.eval()
    with torch.no_grad():
        out = pm(x)
    assert not is_packed(layer.base_layer), "an eval forward repacked a wrapped base"
    # merge reads the logical weight, and the re-quantized base it writes keeps the standard layout too
    torch.testing.assert_close(layer.get_base_weight(), dequantize_4bit_reference(*_reference_inputs(layer.base_layer)))
    pm.base_model.merge_adapter()
    with torch.no_grad():
        merged = pm(x)
    assert not is_packed(layer.base_layer) and torch.isfinite(merged).all() and not torch.equal(merged, out)
    unloaded = pm.unload()
    assert unloaded.a.support_avx512bf16_for_cpu is (path == "avx512bf16")


def test_a_repack_that_would_fail_is_turned_off_until_unload():
    """On the AVX-512-BF16 path bitsandbytes asserts out % 32 == 0 at the first eval forward: a 36-wide layer fails
    as it is, and works while a tuner of ours is attached, wrapped (a) or not (b)."""
    net = TinyNet(36, "avx512bf16").eval()
    with pytest.raises(AssertionError, match="divisible by block_n"), torch.no_grad():
        net(torch.randn(2, 36))
    net = TinyNet(36, "avx512bf16").eval()
    pm = get_peft_model(net, SLTrainConfig(r=2, sparsity=0.1, target_modules=["a"]))
    assert net.b.support_avx512bf16_for_cpu is False
    pm.eval()
    with torch.no_grad():
        assert torch.isfinite(pm(torch.randn(2, 36))).all()
    unloaded = pm.unload()
    assert unloaded.a.support_avx512bf16_for_cpu is True and unloaded.b.support_avx512bf16_for_cpu is True
    assert keep_standard_layouts(TinyNet(36, "avx512bf16")) == ["a", "b"]


@pytest.mark.parametrize("path", PATHS)
def test_evaluate_save_evaluate_gives_the_same_outputs(path, tmp_path):
    """bitsandbytes undoes its repack in ``state_dict()`` and repacks a non-nested absmax in the wrong order at the
    next eval forward (a layer's output moved 2.2%); with an adapter of ours attached the layers never repack."""
    net = TinyNet(64, path)  # TinyNet's Params4bit use a flat (non-nested) absmax
    pm = get_peft_model(net, SLTrainConfig(r=2, sparsity=0.1, target_modules=["a"], init_weights=False)).eval()
    x = torch.randn(3, 64)
    with torch.no_grad():
        first = pm(x)
        pm.save_pretrained(tmp_path / "a")
        again = pm(x)
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    assert not is_packed(net.b)


def test_keep_standard_layout_undoes_a_repack():
    net = TinyNet(64, "avx512bf16")
    net.a.weight.data, net.a.weight.quant_state = F._convert_weight_packed_for_cpu(net.a.weight.data, net.a.weight.quant_state)
    keep_standard_layout(net.a)
    assert not is_packed(net.a) and net.a.support_avx512bf16_for_cpu is False


@pytest.mark.skipif(not F.has_avx512bf16(), reason="bitsandbytes' packed kernel exists only on AVX-512-BF16 CPUs")
def test_stand_in_matches_the_native_packed_kernel():
    """On a machine that has the native kernel, the stand-in the tests use elsewhere computes what it computes."""
    layer = to_linear4bit(torch.nn.Linear(128, 64))
    layer.weight.data, state = F._convert_weight_packed_for_cpu(layer.weight.data, layer.weight.quant_state)
    x = torch.randn(5, 128)
    native = F.gemv_4bit(x, layer.weight.data, state=state).float()
    torch.testing.assert_close(packed_gemv_reference(x, layer.weight.data, state).float(), native, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("path", PATHS)
def test_rest_of_an_lq_plan_keeps_its_layout(path, tmp_path):
    """An LQ plan's non-target linears are quantized by the tuner after PEFT wrapped the targets; those 4-bit layers
    too keep bitsandbytes' standard layout (an eval forward would repack them on the AVX-512-BF16 path, and a save
    between two evaluations would move their outputs)."""
    net = TinyNet(64, path)
    for name in ("a", "b"):  # TinyNet with full-precision linears, for LQ init to quantize
        setattr(net, name, torch.nn.Linear(64, 64))
    plan = {"a": "bnb-nf4-dq", "b": "bnb-nf4"}
    with bnb_cpu_path(path):
        pm = get_peft_model(net, SLTrainConfig(r=2, sparsity=0.1, target_modules=["a"], init_weights="lq",
                                               lq_plan=plan, lq_max_iter=1)).eval()
    rest = pm.base_model.model.b
    assert type(rest).__name__ == "Linear4bit" and rest.support_avx512bf16_for_cpu is False
    x = torch.randn(3, 64)
    with torch.no_grad():
        first = pm(x)
        pm.save_pretrained(tmp_path / "a")
        again = pm(x)
    assert not is_packed(rest)
    torch.testing.assert_close(again, first, atol=0, rtol=0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("make", ["apply_plan", "quantize_base"])
def test_a_base_this_package_made_keeps_its_layout_after_unload(path, make):
    """4-bit layers this package made (a plan's, a runner's base) keep the standard layout after an adapter is
    unloaded or squeezed away: the unloaded model computes on the weights the adapter was trained on. Given back,
    bitsandbytes' repack (bf16 absmax) changed them: a squeezed LoRA's loss moved by 1e-4 in the causal-LM runner."""
    net = TinyNet(64, path)
    for name in ("a", "b"):
        setattr(net, name, torch.nn.Linear(64, 64))
    with bnb_cpu_path(path):
        if make == "apply_plan":
            from sparse_lowrank_peft.delta.bitbudget import apply_plan

            apply_plan(net, {"a": "bnb-nf4-dq", "b": "bnb-nf4"})
        else:
            from glue.model import quantize_base

            quantize_base(net, ["a", "b"], "nf4")
    pm = get_peft_model(net, SLTrainConfig(r=2, sparsity=0.1, target_modules=["a"])).eval()
    x = torch.randn(3, 64)
    with torch.no_grad():
        attached = pm(x)
        unloaded = pm.unload().eval()
        after = unloaded(x)
    assert unloaded.a.support_avx512bf16_for_cpu is False and not is_packed(unloaded.a) and not is_packed(unloaded.b)
    torch.testing.assert_close(after, attached, atol=0, rtol=0)
