"""SoRA: proximal gate step, exact zeros, pruning, kept-rank report, export to plain LoRA, Trainer callback."""

from __future__ import annotations

import math

import pytest
import torch
from _builders import BUILDERS, output_of
from peft import PeftModel, get_peft_model

from sparse_lowrank_peft import SoraCallback, SoraConfig, adapter_param_groups, sora_prox_step
from sparse_lowrank_peft.callbacks import sora_lambda_at


def sora_bert(**kwargs):
    model, make_inputs, task_type = BUILDERS["bert"]()
    cfg = SoraConfig(r=6, lora_alpha=12, target_modules=["query", "value"], modules_to_save=["pooler", "classifier"],
                     task_type=task_type, **kwargs)
    return get_peft_model(model, cfg), make_inputs


def train_with_prox(pm, make_inputs, steps=30, lr=1e-2, sparse_lambda=None):
    opt = torch.optim.AdamW(adapter_param_groups(pm, weight_decay=0.01), lr=lr)
    pm.train()
    for step in range(steps):
        inputs = make_inputs(step)
        labels = torch.randint(0, 3, (inputs["input_ids"].shape[0],), generator=torch.Generator().manual_seed(step))
        loss = pm(**inputs, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sora_prox_step(pm, lr, sparse_lambda=sparse_lambda)
    pm.eval()


def test_prox_step_is_soft_threshold():
    pm, _ = sora_bert()
    layer = next(m for m in pm.modules() if hasattr(m, "sora_gate"))
    gate = layer.sora_gate["default"]
    with torch.no_grad():
        gate.copy_(torch.tensor([0.5, -0.5, 0.05, -0.05, 0.0, 2.0]))
    layer.prox_step("default", 0.1)
    torch.testing.assert_close(gate.detach(), torch.tensor([0.4, -0.4, 0.0, 0.0, 0.0, 1.9]))


def test_prox_step_equals_the_formula_bit_for_bit():
    """The one-kernel softshrink is ``sign(g) · max(|g| − t, 0)`` exactly, gates at ±t and at 0 included."""
    pm, _ = sora_bert()
    layer = next(m for m in pm.modules() if hasattr(m, "sora_gate"))
    g = torch.randn(6, generator=torch.Generator().manual_seed(0))
    for t in (0.0, 0.3, float(g.abs()[2])):
        with torch.no_grad():
            layer.sora_gate["default"].copy_(g)
        layer.prox_step("default", t)
        assert torch.equal(layer.sora_gate["default"].detach(), torch.sign(g) * torch.clamp(g.abs() - t, min=0.0))
    assert layer.sora_gate["default"][2] == 0  # a gate exactly at the threshold closes


def test_prox_step_counts_zero_gates_or_skips_the_count():
    pm, _ = sora_bert()
    gates = [m.sora_gate["default"] for m in pm.modules() if hasattr(m, "sora_gate")]
    with torch.no_grad():
        for i, g in enumerate(gates):
            g.copy_(torch.tensor([0.5, -0.5, 0.05, -0.05, 0.0, 2.0] if i == 0 else [0.5, -0.5, 0.5, -0.5, 0.0, 2.0]))
    # lr 1, lambda 0.1: the first layer loses 3 gates (0.05, -0.05, 0); the others only their 0 gate
    assert sora_prox_step(pm, 1.0, sparse_lambda=0.1) == 3 + (len(gates) - 1)
    assert sora_prox_step(pm, 1.0, sparse_lambda=0.1, count_zeros=False) is None
    assert float(gates[0][0]) == pytest.approx(0.3)  # shrunk twice, counted or not


def test_callback_step_reads_nothing_back_from_the_device(monkeypatch):
    """SoraCallback's per-step work never converts a tensor to a Python value: on a GPU that would wait for the step
    to finish on every step (a host sync) instead of letting the next step's kernels queue up."""
    pm, _ = sora_bert(sparse_lambda=5.0)
    optimizer = torch.optim.AdamW(adapter_param_groups(pm, 0.0), lr=1e-2)

    def refuse(*args, **kwargs):
        raise AssertionError("a tensor was read back to the host during the proximal step")

    state = type("State", (), {"global_step": 3, "max_steps": 10})()
    for name in ("item", "tolist", "__int__", "__float__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    gates = [m.sora_gate["default"] for m in pm.modules() if hasattr(m, "sora_gate")]
    before = [g.detach().clone() for g in gates]
    SoraCallback().on_optimizer_step(None, state, None, model=pm, optimizer=optimizer)
    monkeypatch.undo()
    for g, g0 in zip(gates, before):  # the step did act: every gate shrank by lambda x lr = 5 x 1e-2
        torch.testing.assert_close(g.detach(), torch.nn.functional.softshrink(g0, 0.05))


def test_gates_reach_exact_zeros_and_pruned_model_is_equal(tmp_path):
    pm, make_inputs = sora_bert(sparse_lambda=2.0)
    train_with_prox(pm, make_inputs)
    kept = pm.base_model.kept_ranks()
    total = sum(kept.values())
    assert 0 < total < 6 * len(kept), f"λ > 0 should zero some (not all) gates exactly: {kept}"
    gates = torch.cat([m.sora_gate["default"].detach() for m in pm.modules() if hasattr(m, "sora_gate")])
    assert int((gates == 0).sum()) == 6 * len(kept) - total  # exact zeros, not small values
    inputs = make_inputs(99)
    with torch.no_grad():
        before = output_of(pm, inputs).clone()
    report = pm.base_model.prune()
    assert report == kept
    assert pm.peft_config["default"].rank_pattern == kept
    for m in pm.modules():
        if hasattr(m, "sora_gate"):
            assert m.sora_A["default"].shape[0] == m.sora_gate["default"].numel() == m.sora_B["default"].shape[1]
    with torch.no_grad():
        torch.testing.assert_close(output_of(pm, inputs), before, atol=1e-6, rtol=0)
    # the pruned adapter saves at its own size and reloads into a fresh base
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(BUILDERS["bert"]()[0], tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(output_of(loaded, inputs), before, atol=1e-6, rtol=0)
    png = pm.base_model.plot_kept_ranks(tmp_path / "kept.png")
    assert png.stat().st_size > 1000


def test_zero_lambda_prunes_nothing():
    pm, make_inputs = sora_bert(sparse_lambda=0.0)
    train_with_prox(pm, make_inputs, steps=3)
    assert all(k == 6 for k in pm.base_model.kept_ranks().values())


def test_gates_excluded_from_weight_decay():
    pm, _ = sora_bert()
    groups = adapter_param_groups(pm, weight_decay=0.1)
    gate_ids = {id(p) for m in pm.modules() if hasattr(m, "sora_gate") for p in m.sora_gate.values()}
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert gate_ids and not (gate_ids & decayed)
    assert any(id(p) in decayed for m in pm.modules() if hasattr(m, "sora_A") for p in m.sora_A.values())


def test_lambda_schedule():
    cfg = SoraConfig(r=4, sparse_lambda=1e-3, lambda_schedule="linear", max_lambda=7e-3, lambda_num=7,
                     target_modules=["q"])
    values = [sora_lambda_at(cfg, p) for p in (0.0, 0.14, 0.15, 0.5, 0.999, 1.0)]
    assert values[0] == pytest.approx(1e-3) and values[1] == pytest.approx(1e-3)
    assert values[2] == pytest.approx(2e-3) and values[3] == pytest.approx(4e-3)
    assert values[4] == pytest.approx(7e-3) and values[5] == pytest.approx(7e-3)
    geo = SoraConfig(r=4, sparse_lambda=1e-3, lambda_schedule="exp_linear", max_lambda=1e-1, lambda_num=3,
                     target_modules=["q"])
    assert [sora_lambda_at(geo, p) for p in (0.0, 0.5, 1.0)] == pytest.approx([1e-3, 1e-2, 1e-1])
    assert sora_lambda_at(SoraConfig(sparse_lambda=0.3, target_modules=["q"]), 0.7) == 0.3


@pytest.mark.parametrize("kwargs,match", [
    ({"sparse_lambda": -1.0}, "sparse_lambda"),
    ({"r": 0}, r"SoraConfig\.r"),
    ({"lambda_schedule": "linear"}, "max_lambda and lambda_num"),
    ({"lambda_schedule": "cosine", "max_lambda": 1.0, "lambda_num": 2}, "lambda_schedule"),
    ({"gate_init": "zeros"}, "gate_init"),
    ({"rank_pattern": {"query": 9}}, "rank_pattern"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SoraConfig(target_modules=["query"], **kwargs)


def test_prox_step_rejects_negative_values():
    pm, _ = sora_bert()
    with pytest.raises(ValueError, match="sparse_lambda"):
        sora_prox_step(pm, 1e-3, sparse_lambda=-1.0)
    with pytest.raises(ValueError, match="lr"):
        sora_prox_step(pm, -1e-3)


def test_trainer_callback(tmp_path):
    from transformers import Trainer, TrainingArguments

    pm, make_inputs = sora_bert(sparse_lambda=5.0)
    data = []
    for i in range(16):
        inputs = make_inputs(i)
        data.append({"input_ids": inputs["input_ids"][0], "attention_mask": inputs["attention_mask"][0],
                     "labels": torch.tensor(i % 3)})
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, num_train_epochs=2,
                             learning_rate=1e-2, report_to=[], save_strategy="no", logging_steps=2,
                             disable_tqdm=True, use_cpu=True)
    optimizer = torch.optim.AdamW(adapter_param_groups(pm, 0.0), lr=1e-2)
    trainer = Trainer(model=pm, args=args, train_dataset=data, callbacks=[SoraCallback()], optimizers=(optimizer, None))
    trainer.train()
    kept = sum(pm.base_model.kept_ranks().values())
    assert kept < 6 * 4, "the callback's proximal steps zeroed no gate"
    logged = [h["sora_open_ranks"] for h in trainer.state.log_history if "sora_open_ranks" in h]
    assert logged and logged[-1] == kept and math.isfinite(logged[0])
