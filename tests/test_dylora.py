"""DyLoRA: nested ranks, per-step rank sampling, frozen mode, merge/export at an explicit rank."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from _builders import BUILDERS, output_of
from peft import get_peft_model

from sparse_lowrank_peft import DyLoraCallback, DyLoraConfig, dylora_sample_rank
from sparse_lowrank_peft.tuners.dylora import sample_rank


def dylora_roberta(**kwargs):
    model, make_inputs, task_type = BUILDERS["roberta"]()
    fields = dict(r=6, lora_alpha=12, target_modules=["query", "value"], task_type=task_type, init_weights=False)
    fields.update(kwargs)
    return get_peft_model(model, DyLoraConfig(**fields)), make_inputs


def test_rank_b_equals_truncated_factors():
    pm, make_inputs = dylora_roberta()
    pm.eval()
    layer = next(m for m in pm.modules() if hasattr(m, "dylora_A"))
    x = torch.randn(4, layer.in_features)
    A, B = layer.dylora_A["default"], layer.dylora_B["default"]
    for b in (1, 3, 6):
        pm.base_model.set_rank(b)
        assert pm.base_model.get_rank() == b
        expected = layer.base_layer(x) + (12 / b) * (x @ A[:b].t() @ B[:, :b].t())
        torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=0)


def test_outputs_differ_by_rank_and_merge_at_rank(tmp_path):
    pm, make_inputs = dylora_roberta()
    pm.eval()
    inputs = make_inputs(0)
    outs = {}
    with torch.no_grad():
        for b in (1, 2, 6):
            pm.base_model.set_rank(b)
            outs[b] = output_of(pm, inputs).clone()
    assert not torch.allclose(outs[1], outs[6])
    merged = pm.merge_and_unload(rank=2)
    with torch.no_grad():
        torch.testing.assert_close(output_of(merged, inputs), outs[2], atol=1e-5, rtol=0)


@pytest.mark.parametrize("rank", [0, 7, -1, 2.0, True])
def test_set_rank_out_of_range(rank):
    pm, _ = dylora_roberta()
    with pytest.raises(ValueError, match=r"1\.\.r=6"):
        pm.base_model.set_rank(rank)


@pytest.mark.parametrize("kwargs,match", [({"r": 0}, r"DyLoraConfig\.r"), ({"rank_distribution": "zipf"}, "rank_distribution")])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DyLoraConfig(target_modules=["query"], **kwargs)


def test_sampler_is_deterministic_and_covers_ranks():
    draws = [sample_rank(8, step, seed=3) for step in range(2000)]
    assert draws == [sample_rank(8, step, seed=3) for step in range(2000)]  # same on every process / resume
    counts = Counter(draws)
    assert set(counts) == set(range(1, 9))
    assert max(counts.values()) / min(counts.values()) < 1.5  # roughly uniform
    geo = Counter(sample_rank(8, s, 0, "geometric") for s in range(2000))
    assert geo[8] > geo[4] > geo[1]
    assert {sample_rank(8, s, 0, "max") for s in range(10)} == {8}


def test_frozen_mode_trains_only_rank_b():
    pm, make_inputs = dylora_roberta(frozen=True)
    pm.train()
    pm.base_model.set_rank(3)
    output_of(pm, make_inputs(0)).square().mean().backward()
    layer = next(m for m in pm.modules() if hasattr(m, "dylora_A"))
    gA, gB = layer.dylora_A["default"].grad, layer.dylora_B["default"].grad
    assert gA[2].abs().sum() > 0 and gB[:, 2].abs().sum() > 0
    assert gA[:2].abs().sum() == 0 and gA[3:].abs().sum() == 0
    assert gB[:, :2].abs().sum() == 0 and gB[:, 3:].abs().sum() == 0


def test_unfrozen_mode_trains_ranks_up_to_b():
    pm, make_inputs = dylora_roberta()
    pm.train()
    pm.base_model.set_rank(3)
    output_of(pm, make_inputs(0)).square().mean().backward()
    layer = next(m for m in pm.modules() if hasattr(m, "dylora_A"))
    gA = layer.dylora_A["default"].grad
    assert (gA[:3].abs().sum(1) > 0).all() and gA[3:].abs().sum() == 0


def test_sample_rank_helper_sets_every_layer():
    pm, _ = dylora_roberta()
    b = dylora_sample_rank(pm, step=5)
    assert b == sample_rank(6, 5, 0)
    ranks = {m.dylora_rank["default"] for m in pm.modules() if hasattr(m, "dylora_rank")}
    assert ranks == {b}


def test_trainer_callback(tmp_path):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    pm, make_inputs = dylora_roberta(init_weights=True)
    seen = []

    class Spy(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            seen.append(next(m.dylora_rank["default"] for m in model.modules() if hasattr(m, "dylora_rank")))

    ranks_in_forward = []
    layer = next(m for m in pm.modules() if hasattr(m, "dylora_rank"))
    layer.register_forward_pre_hook(lambda mod, inp: ranks_in_forward.append(mod.dylora_rank["default"]))
    data = []
    for i in range(12):
        inputs = make_inputs(i)
        data.append({"input_ids": inputs["input_ids"][0], "attention_mask": inputs["attention_mask"][0],
                     "labels": torch.tensor(i % 2)})
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, num_train_epochs=2,
                             learning_rate=1e-3, report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True)
    Trainer(model=pm, args=args, train_dataset=data, callbacks=[DyLoraCallback(), Spy()]).train()
    assert ranks_in_forward == [sample_rank(6, step, 0) for step in range(6)]
    assert seen == [6] * 6  # back to full rank after each step (for evaluation and checkpoints)
