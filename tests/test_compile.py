"""``torch.compile`` on models with this package's adapters: the compiled model computes the same outputs and the same
gradient of every trainable parameter as the eager one (AOTAutograd's graphs, ``backend="aot_eager"``, so the test
needs no C++ compiler). SLTrain, SoRA, DyLoRA and NOLA compile to one graph, as PEFT's LoRA does (SLTrain's sparse
term as the custom ops of ``delta.custom_ops``, on both paths of the dispatcher); a layer that cannot be traced (sparse
RandLoRA's factored term, a sparse term on a 4-bit base) runs eagerly between compiled parts, one graph break per
layer (``DeltaLayer._eager_forward``)."""

from __future__ import annotations

import pytest
import torch
from _builders import BUILDERS, TARGETS, output_of
from torch._dynamo.utils import counters
from peft import get_peft_model
from test_contract import ONE_CASE_PER_TUNER

# the tuners whose whole forward and backward Dynamo captures in one graph, as it does PEFT's LoRA
ONE_GRAPH = {"SLTrainConfig", "SoraConfig", "DyLoraConfig", "NolaConfig"}


def loss_and_grads(pm, model, inputs):
    pm.zero_grad(set_to_none=True)
    out = output_of(model, inputs)
    (out.float() ** 2).mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("cfg_cls,kwargs", ONE_CASE_PER_TUNER)
def test_compiled_model_matches_eager(cfg_cls, kwargs):
    torch._dynamo.reset()
    model, make_inputs, task_type = BUILDERS["bert"]()
    one_graph = cfg_cls.__name__ in ONE_GRAPH
    pm = get_peft_model(model, cfg_cls(task_type=task_type, **TARGETS["bert"], **kwargs, init_weights=False))
    pm.eval()  # no dropout, so both runs compute the same function
    inputs = make_inputs(0)
    expected, expected_grads = loss_and_grads(pm, pm, inputs)
    if one_graph:
        compiled = torch.compile(pm, backend="aot_eager", fullgraph=True)  # any graph break raises
    else:  # each graph break costs Dynamo a resumed trace of every enclosing frame of the whole model (9 s a case on
        # 2 cores), so here only the self-attention modules holding the sparse layers are compiled (1 s)
        compiled = pm
        for layer in pm.base_model.model.bert.encoder.layer:
            layer.attention.self.compile(backend="aot_eager")
    counters.clear()
    got, grads = loss_and_grads(pm, compiled, inputs)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert grads.keys() == expected_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-6, rtol=1e-4, msg=name)
    if not one_graph:  # Dynamo stopped only where a sparse layer's forward is handed to eager mode, never inside it
        reasons = {reason.split("\n")[0] for reason in counters["graph_break"]}
        assert reasons == {"Skip inlining `torch.compiler.disable()`d function"}, reasons


def test_sltrain_compiles_to_one_graph_on_the_fused_path(monkeypatch):
    """The dispatcher's other path, forced (the tiny batches above take the SpMM path), on GPT-2's Conv1D (whose
    weight the fused op reads transposed; nn.Linear's: the op tests below): the traced forward folds the term into
    the weight through the fused op, with no graph break, and the same outputs and gradients."""
    path, family = "fused", "gpt2"
    from sparse_lowrank_peft import SLTrainConfig

    monkeypatch.setenv("SLPEFT_SPARSE_PATH", path)
    torch._dynamo.reset()
    model, make_inputs, task_type = BUILDERS[family]()
    pm = get_peft_model(model, SLTrainConfig(task_type=task_type, **TARGETS[family], r=4, sparsity=0.05,
                                             init_weights=False)).eval()
    inputs = make_inputs(1)
    expected, expected_grads = loss_and_grads(pm, pm, inputs)
    compiled = torch.compile(pm, backend="aot_eager", fullgraph=True)
    got, grads = loss_and_grads(pm, compiled, inputs)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert grads.keys() == expected_grads.keys() and any("sltrain_values" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-6, rtol=1e-4, msg=name)


def test_a_sparse_term_on_a_4bit_base_stays_eager():
    """The fused op reads a plain float weight: on a bitsandbytes base a layer with a sparse term is not traceable
    (it runs eagerly under torch.compile), one without a sparse term is."""
    pytest.importorskip("bitsandbytes")
    from sparse_lowrank_peft import SLTrainConfig, SoraConfig
    from sparse_lowrank_peft.delta.layer import DeltaLayer

    for cfg, traceable in ((SLTrainConfig(r=4, sparsity=0.05), False), (SoraConfig(r=4), True)):
        model, _, task_type = BUILDERS["bert-nf4"]()
        cfg.task_type, cfg.target_modules = task_type, TARGETS["bert-nf4"]["target_modules"]
        layers = [m for m in get_peft_model(model, cfg).modules() if isinstance(m, DeltaLayer)]
        assert layers and all(layer.traceable() is traceable for layer in layers), type(cfg).__name__
    model, _, task_type = BUILDERS["bert"]()
    pm = get_peft_model(model, SLTrainConfig(task_type=task_type, r=4, sparsity=0.05, **TARGETS["bert"]))
    assert all(m.traceable() for m in pm.modules() if isinstance(m, DeltaLayer))


# ------------------------------------------------------------------------------------------------------ the custom ops
def _op_inputs(dtype=torch.float32, terms=1, seed=0):
    from sparse_lowrank_peft.delta.support import SparseSupport

    gen = torch.Generator().manual_seed(seed)
    shape = (13, 21)
    supports = [SparseSupport.random(shape, 0.2, seed=seed + k) for k in range(terms)]
    values = [torch.randn(s.nnz, generator=gen).to(dtype).requires_grad_(True) for s in supports]
    x = torch.randn(9, shape[1], generator=gen).to(dtype).requires_grad_(True)
    weight = torch.randn(shape, generator=gen).to(dtype)
    bias = torch.randn(shape[0], generator=gen).to(dtype).requires_grad_(True)
    return shape, supports, values, x, weight, bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_custom_ops_pass_torch_library_opcheck(dtype):
    """``torch.library.opcheck``: each op's schema, its fake implementation against the real one, and its registered
    autograd (and through AOT dispatch), for the SpMM op and the fused op with two terms."""
    shape, supports, values, x, weight, bias = _op_inputs(dtype, terms=2)
    s0 = supports[0]
    torch.library.opcheck(torch.ops.slpeft.sparse_delta.default, (x, s0.indices, values[0], *shape))
    torch.library.opcheck(torch.ops.slpeft.fused_linear.default,
                          (x, weight, bias, [s.indices for s in supports], values, *shape, False))
    torch.library.opcheck(torch.ops.slpeft.fused_linear.default,
                          (x, weight.t().contiguous(), None, [s.indices for s in supports], values, *shape, True))


@pytest.mark.parametrize("sddmm", ["sampled", "dense"])
def test_custom_ops_equal_the_eager_functions(sddmm, monkeypatch):
    """The ops compute what the eager autograd Functions compute (outputs and every gradient, bit for bit: the same
    kernels), with the values' gradient by either SDDMM route."""
    from sparse_lowrank_peft.delta import custom_ops
    from sparse_lowrank_peft.delta.fused import fused_sparse_linear
    from sparse_lowrank_peft.delta.ops import sparse_delta

    monkeypatch.setenv("SLPEFT_SDDMM", sddmm)
    shape, supports, values, x, weight, bias = _op_inputs(terms=2)
    x3 = x.detach().view(3, 3, -1)
    g = torch.randn(3, 3, shape[0], generator=torch.Generator().manual_seed(5))

    def run(fn):
        xs, vs, b = x3.clone().requires_grad_(True), [v.detach().clone().requires_grad_(True) for v in values], \
            bias.detach().clone().requires_grad_(True)
        fn(xs, vs, b).backward(g)
        return fn(xs, vs, b).detach(), xs.grad, [v.grad for v in vs], b.grad

    eager_spmm = run(lambda xs, vs, b: sparse_delta(xs, supports[0], vs[0]))
    op_spmm = run(lambda xs, vs, b: custom_ops.sparse_delta(xs, supports[0].indices, vs[0], shape))
    eager_fused = run(lambda xs, vs, b: fused_sparse_linear(xs, lambda: weight.clone(), b, supports, vs,
                                                            [sddmm, sddmm]))
    op_fused = run(lambda xs, vs, b: custom_ops.fused_linear(xs, weight, b, [s.indices for s in supports], vs, shape,
                                                             False))
    for eager, op in ((eager_spmm, op_spmm), (eager_fused, op_fused)):
        assert torch.equal(op[0], eager[0]) and torch.equal(op[1], eager[1])
        assert all(torch.equal(a, b) for a, b in zip(op[2], eager[2]) if b is not None)
    assert torch.equal(op_fused[3], eager_fused[3])


def test_support_of_caches_per_buffer_and_keeps_none_alive():
    """One SparseSupport (with its layouts) per live index buffer: found again while the buffer is unchanged, made
    anew after an in-place change, and gone with the buffer (the cache holds a copy, never the buffer)."""
    import gc
    import weakref

    from sparse_lowrank_peft.delta import custom_ops
    from sparse_lowrank_peft.delta.support import SparseSupport

    buf = SparseSupport.random((30, 40), 0.1, seed=3).indices.clone()
    first = custom_ops.support_of(buf, (30, 40))
    assert custom_ops.support_of(buf, (30, 40)) is first and torch.equal(first.indices, buf)
    assert first.indices.data_ptr() != buf.data_ptr()
    buf.copy_(SparseSupport.random((30, 40), 0.1, seed=4).indices)  # e.g. a loaded checkpoint, copied in place
    second = custom_ops.support_of(buf, (30, 40))
    assert second is not first and torch.equal(second.indices, buf)
    alive, key = weakref.ref(buf), id(buf)
    del buf
    gc.collect()
    assert alive() is None and key not in custom_ops._SUPPORTS


def test_compiled_sltrain_follows_adapter_switches_autocast_and_merge(monkeypatch):
    """A compiled SLTrain layer through what a user does after compiling (fused path: two terms in one op): switch
    the active adapter, activate two, disable adapters, run under bf16 autocast, merge. Each output equals eager
    mode's (Dynamo's guards recompile where the layer's state changed). One layer is compiled: a whole model
    recompiled six times took 26 s."""
    from sparse_lowrank_peft import SLTrainConfig

    monkeypatch.setenv("SLPEFT_SPARSE_PATH", "fused")
    torch._dynamo.reset()
    model, _, task_type = BUILDERS["bert"]()

    def config(seed):
        return SLTrainConfig(task_type=task_type, **TARGETS["bert"], r=4, sparsity=0.05, init_weights=False,
                             support_seed=seed)

    pm = get_peft_model(model, config(0)).eval()
    pm.add_adapter("b", config(1))
    layer = pm.base_model.model.bert.encoder.layer[0].attention.self.query
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(3))

    def same(context=None):
        with torch.no_grad(), (context or torch.autocast("cpu", enabled=False)):
            got, want = compiled(x), layer(x)
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        return want

    outputs = []
    for names in (["default"], ["b"], ["default", "b"]):
        layer.set_adapter(names)
        outputs.append(same())
    assert not torch.allclose(outputs[0], outputs[1]) and not torch.allclose(outputs[2], outputs[0])
    with pm.disable_adapter():
        same()
    layer.set_adapter(["default"])
    assert same(torch.autocast("cpu", dtype=torch.bfloat16)).dtype == torch.bfloat16
    layer.merge()
    same()
