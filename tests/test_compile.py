"""``torch.compile`` on models with this package's adapters: the compiled model computes the same outputs and the same
gradient of every trainable parameter as the eager one (AOTAutograd's graphs, ``backend="aot_eager"``, so the test
needs no C++ compiler). SoRA, DyLoRA and NOLA compile to one graph, as PEFT's LoRA does; a layer with a sparse term
(SLTrain, sparse RandLoRA) runs eagerly between compiled parts, one graph break per layer
(``DeltaLayer._eager_forward``)."""

from __future__ import annotations

import pytest
import torch
from _builders import BUILDERS, TARGETS, output_of
from torch._dynamo.utils import counters
from peft import get_peft_model
from test_contract import ONE_CASE_PER_TUNER

# the tuners whose whole forward and backward Dynamo captures in one graph, as it does PEFT's LoRA
ONE_GRAPH = {"SoraConfig", "DyLoraConfig", "NolaConfig"}


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
