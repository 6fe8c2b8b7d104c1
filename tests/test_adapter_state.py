"""Operations on one adapter of a model with several: they act on the adapter named (default: the active one), and
those that change an adapter's delta are refused while it is merged, where ``unmerge`` would subtract another delta
than ``merge`` added and corrupt the base weights."""

from __future__ import annotations

import pytest
import torch
from _builders import BUILDERS, output_of
from peft import get_peft_model

from sparse_lowrank_peft import DyLoraConfig, SoraConfig, export_to_lora
from sparse_lowrank_peft.squeeze import SqueezeError


def two_adapters(cfg_cls, **kwargs):
    model, make_inputs, task_type = BUILDERS["llama"]()
    fields = {"r": 4, "target_modules": "all-linear", "task_type": task_type, "init_weights": False, **kwargs}
    pm = get_peft_model(model, cfg_cls(**fields))
    pm.add_adapter("other", cfg_cls(**fields))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if name.endswith(".other"):
                p.add_(0.3 * torch.randn_like(p))
    return pm.eval(), make_inputs(3)


def output_at_rank(pm, inputs, adapter, rank):
    pm.set_adapter(adapter)
    pm.base_model.set_rank(rank, adapter)
    with torch.no_grad():
        return output_of(pm, inputs)


def test_dylora_merges_the_named_adapter_at_the_rank_given():
    pm, inputs = two_adapters(DyLoraConfig)
    expected = output_at_rank(pm, inputs, "other", 2)
    pm.base_model.set_rank(4, "other")
    pm.set_adapter("default")  # another adapter active: the rank still goes to the adapter merged
    with torch.no_grad():
        merged = output_of(pm.merge_and_unload(adapter_names=["other"], rank=2), inputs)
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=0)


def test_changing_a_merged_adapter_is_refused_and_the_base_survives():
    pm, inputs = two_adapters(DyLoraConfig)
    with torch.no_grad(), pm.disable_adapter():
        base = output_of(pm, inputs)
    pm.merge_adapter()
    with pytest.raises(ValueError, match=r"set_rank\(2\) changes the delta of adapter 'default', which is merged"):
        pm.base_model.set_rank(2)
    with pytest.raises(ValueError, match="merged"):
        pm.base_model.merge_and_unload(rank=2)
    pm.base_model.set_rank(4)  # the rank it is merged at: nothing changes, allowed
    pm.unmerge_adapter()
    with torch.no_grad(), pm.disable_adapter():
        torch.testing.assert_close(output_of(pm, inputs), base, atol=1e-5, rtol=0)

    sora, inputs = two_adapters(SoraConfig)
    sora.merge_adapter()
    with pytest.raises(ValueError, match="proximal gate step changes the delta of adapter 'default'"):
        sora.base_model.prox_step(0.5)


def test_sora_reports_and_prunes_the_active_adapter():
    pm, _ = two_adapters(SoraConfig)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "sora_gate" in name:
                p[:2] = 0.0 if name.endswith(".other") else p[:2]
    pm.set_adapter("other")
    assert set(pm.base_model.kept_ranks().values()) == {2}
    assert set(pm.base_model.prune().values()) == {2}
    assert set(pm.base_model.kept_ranks("default").values()) == {4}  # the other adapter untouched
    with pytest.raises(ValueError, match=r"no adapter 'typo' \(adapters: \['default', 'other'\]\)"):
        pm.base_model.kept_ranks("typo")


def test_export_defaults_to_the_active_adapter(tmp_path):
    model, make_inputs, task_type = BUILDERS["llama"]()
    pm = get_peft_model(model, SoraConfig(r=4, target_modules="all-linear", task_type=task_type, init_weights=False),
                        adapter_name="tenant").eval()
    assert export_to_lora(pm, tmp_path / "lora").is_dir()  # the model's only adapter is not called "default"
    pm.base_model.set_adapter(["tenant"])
    pm.add_adapter("b", SoraConfig(r=4, target_modules="all-linear", task_type=task_type))
    pm.base_model.set_adapter(["tenant", "b"])
    with pytest.raises(SqueezeError, match="2 adapters are active"):
        export_to_lora(pm, tmp_path / "two")
