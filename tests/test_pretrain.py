"""SLTrain pretraining from scratch (issue #23): the op, the replacement and its inverse, save/load, per-layer updates."""

from __future__ import annotations
from _forkserver import fresh_python

import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from sparse_lowrank_peft.delta.lowrank_sparse import lowrank_sparse_linear
from sparse_lowrank_peft.delta.support import support_nnz
from sparse_lowrank_peft.pretrain import (
    PerLayerOptimizer,
    SLTrainLinear,
    check_trainer_args,
    linear_parameter_count,
    load_sltrain,
    save_sltrain,
    to_dense,
    to_sltrain,
)

ROOT = Path(__file__).resolve().parents[1]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=61, hidden_size=40, intermediate_size=53, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=61, n_embd=36, n_layer=2, n_head=4, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def ids(seed: int = 0, batch: int = 3, length: int = 11):
    return torch.randint(0, 61, (batch, length), generator=torch.Generator().manual_seed(seed))


def randomize_factors(model):
    """B = 0 at init makes B·A vanish; give every factor values so the tests see the low-rank term too."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SLTrainLinear):
                m.lowrank_B.copy_(torch.randn(m.lowrank_B.shape, generator=g) * 0.1)


# ------------------------------------------------------------------------------------------------------------ the op
@pytest.mark.parametrize("out_f,in_f,rank,density,bias,lead", [
    (7, 13, 3, 0.2, True, (2, 5)), (13, 7, 5, 0.05, False, (9,)), (11, 11, 2, 0.0, True, (1, 3, 4)),
])
def test_op_gradients_match_float64_dense_reference(out_f, in_f, rank, density, bias, lead):
    layer = SLTrainLinear(in_f, out_f, rank, density=density, alpha=5.0, bias=bias, seed=3).double()
    with torch.no_grad():
        layer.lowrank_B.normal_()
    x = torch.randn(*lead, in_f, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()

    params = [p.detach().clone().requires_grad_() for p in (layer.lowrank_B, layer.lowrank_A)]
    B, A = params
    W = layer.scale * B @ A
    if density:
        v = layer.sparse_values.detach().clone().requires_grad_()
        W = W + torch.zeros(out_f, in_f, dtype=torch.float64).index_put((layer.support.rows(), layer.support.cols()), v)
        params.append(v)
    if bias:
        b = layer.bias.detach().clone().requires_grad_()
        params.append(b)
    x2 = x.detach().clone().requires_grad_()
    y2 = x2 @ W.t() + (b if bias else 0)
    (y2 * g).sum().backward()
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(x.grad, x2.grad)
    ours = [p.grad for p in layer.parameters()]
    assert len(ours) == len(params)
    for got, want in zip(ours, params):
        torch.testing.assert_close(got, want.grad)


def test_op_gradcheck():
    layer = SLTrainLinear(6, 5, 2, density=0.3, alpha=3.0, seed=1).double()
    flat = layer.support.flat()
    inputs = [torch.randn(4, 6, dtype=torch.float64, requires_grad=True)]
    inputs += [p.detach().clone().normal_().requires_grad_() for p in layer.parameters()]
    fn = lambda x, B, A, v, b: lowrank_sparse_linear(x, B, A, v, flat, layer.scale, b)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)


def test_layer_holds_no_dense_weight_and_paper_init():
    layer = SLTrainLinear(40, 30, 4, density=0.03, alpha=32.0, seed=0)
    names = {n for n, _ in layer.named_parameters()}
    assert names == {"lowrank_B", "lowrank_A", "sparse_values", "bias"}
    assert layer.sparse_indices.shape == (2, support_nnz((30, 40), 0.03)) and layer.sparse_indices.dtype == torch.int32
    assert torch.count_nonzero(layer.lowrank_B) == 0  # B = 0
    bound = 40 ** -0.5
    assert layer.lowrank_A.abs().max() <= bound and layer.sparse_values.abs().max() <= bound
    assert layer.scale == 8.0
    same = SLTrainLinear(40, 30, 4, density=0.03, alpha=32.0, seed=0)
    assert torch.equal(same.sparse_indices, layer.sparse_indices) and torch.equal(same.lowrank_A, layer.lowrank_A)
    with pytest.raises(ValueError, match="density"):
        SLTrainLinear(4, 4, 2, density=1.5)


# ------------------------------------------------------------------------------------------------------------ models
def test_llama_replacement_and_exact_dense_export():
    model = tiny_llama()
    dense_linear = linear_parameter_count(model, LLAMA_TARGETS)
    to_sltrain(model, LLAMA_TARGETS, rank=4, density=0.05, seed=1)
    replaced = [n for n, m in model.named_modules() if isinstance(m, SLTrainLinear)]
    assert len(replaced) == 2 * 7
    assert not any(isinstance(m, nn.Linear) for n, m in model.named_modules() if n.endswith(tuple(LLAMA_TARGETS)))
    assert isinstance(model.lm_head, nn.Linear)  # untargeted layers stay
    assert linear_parameter_count(model) < 0.6 * dense_linear
    randomize_factors(model)
    x = ids()
    with torch.no_grad():
        sparse_out = model(input_ids=x).logits
    to_dense(model)
    assert not any(isinstance(m, SLTrainLinear) for m in model.modules())
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, sparse_out, rtol=1e-6, atol=1e-6)


def test_gpt2_conv1d_replacement_and_exact_dense_export():
    model = tiny_gpt2()
    c_attn = model.transformer.h[0].attn.c_attn
    in_f, out_f = c_attn.weight.shape  # Conv1D: (in, out)
    to_sltrain(model, GPT2_TARGETS, rank=3, density=0.03, seed=0)
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, SLTrainLinear) and (layer.in_features, layer.out_features) == (in_f, out_f)
    assert layer.dense_kind == "conv1d"
    torch.testing.assert_close(layer.bias, c_attn.bias)  # the layer's own bias is kept
    randomize_factors(model)
    x = ids(1)
    with torch.no_grad():
        sparse_out = model(input_ids=x).logits
    to_dense(model)
    dense = model.transformer.h[0].attn.c_attn
    assert type(dense) is Conv1D and tuple(dense.weight.shape) == (in_f, out_f)
    torch.testing.assert_close(dense.weight.t(), layer.dense_weight())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, sparse_out, rtol=1e-6, atol=1e-6)


def test_bad_targets_raise_before_any_change():
    model = tiny_llama()
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        to_sltrain(model, ["nope"], rank=2)
    with pytest.raises(ValueError, match="neither nn.Linear"):
        to_sltrain(model, ["q_proj", "self_attn"], rank=2)
    assert not any(isinstance(m, SLTrainLinear) for m in model.modules())


def test_a_second_call_adds_its_targets_to_the_saved_settings(tmp_path):
    """Converting in two calls (attention first, MLP later) records both calls' targets, and the saved model reloads
    all 14 layers; a regex in either call leaves the names of every replaced module."""
    model = to_sltrain(tiny_llama(), ["q_proj", "v_proj"], rank=4, density=0.05)
    to_sltrain(model, ["v_proj", "up_proj"], rank=4, density=0.05)
    assert model.sltrain_settings.target_modules == ["q_proj", "v_proj", "up_proj"]
    assert len(model.sltrain_settings.modules) == 6
    mixed = to_sltrain(tiny_llama(), r".*\.q_proj", rank=4, density=0.05)
    to_sltrain(mixed, ["down_proj"], rank=4, density=0.05)
    assert mixed.sltrain_settings.target_modules == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
        "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    save_sltrain(mixed, tmp_path / "m")
    reloaded = load_sltrain(tiny_llama(seed=3), tmp_path / "m")
    assert sorted(n for n, m in reloaded.named_modules() if isinstance(m, SLTrainLinear)) == sorted(
        mixed.sltrain_settings.modules)


# ------------------------------------------------------------------------------------------------------------ per-layer
def _train(model, make_opt, per_layer: bool, steps: int = 3):
    if per_layer:
        opt = PerLayerOptimizer(model.parameters(), make_opt)
    else:
        opt = make_opt([p for p in model.parameters() if p.requires_grad])
    for step in range(steps):
        x = ids(10 + step)
        model(input_ids=x, labels=x).loss.backward()
        if per_layer:
            assert all(p.grad is None for p in model.parameters())  # stepped and freed inside backward
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    lambda ps: torch.optim.Adam(ps, lr=1e-2),
], ids=["sgd", "adam"])
def test_per_layer_updates_equal_ordinary_loop(make_opt):
    results = []
    for per_layer in (False, True):
        model = to_sltrain(tiny_llama(), LLAMA_TARGETS, rank=4, density=0.05).train()
        results.append(_train(model, make_opt, per_layer))
    ordinary, layerwise = results
    assert ordinary.keys() == layerwise.keys()
    for name in ordinary:
        torch.testing.assert_close(layerwise[name], ordinary[name], rtol=1e-6, atol=1e-7, msg=name)
    start = to_sltrain(tiny_llama(), LLAMA_TARGETS, rank=4, density=0.05)
    assert not torch.equal(start.model.layers[0].mlp.up_proj.lowrank_B, ordinary["model.layers.0.mlp.up_proj.lowrank_B"])


def test_a_new_per_layer_optimizer_takes_over_the_parameters():
    """The newest PerLayerOptimizer steps the parameters: an earlier one's hooks stepped first and freed the gradient,
    so a second optimizer (a new training phase, here one with lr 0) never stepped and the old one kept training."""
    model = to_sltrain(tiny_llama(), LLAMA_TARGETS, rank=4, density=0.05).train()
    PerLayerOptimizer(model.parameters(), lambda ps: torch.optim.SGD(ps, lr=0.1))
    with pytest.warns(UserWarning, match="earlier PerLayerOptimizer; its gradient hooks are removed"):
        PerLayerOptimizer(model.parameters(), lambda ps: torch.optim.SGD(ps, lr=0.0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = ids(3)
    model(input_ids=x, labels=x).loss.backward()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_per_layer_optimizer_under_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = to_sltrain(tiny_llama(), LLAMA_TARGETS, rank=4, density=0.05).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = PerLayerOptimizer(model.parameters(), lambda ps: torch.optim.AdamW(ps, lr=1e-2))
    data = [{"input_ids": ids(i, batch=1)[0], "labels": ids(i, batch=1)[0]} for i in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, max_grad_norm=0.0,
                             learning_rate=1e-2, lr_scheduler_type="linear", report_to=[], save_strategy="no",
                             disable_tqdm=True, use_cpu=True)
    check_trainer_args(args)
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None))
    trainer.train()
    assert trainer.state.global_step == 2
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert set(changed) == set(before)  # every parameter was stepped by its hook
    lrs = {g["lr"] for g in opt.param_groups}
    assert lrs == {0.0}  # the Trainer's linear schedule drove every inner optimizer to 0 at the last step
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        check_trainer_args(TrainingArguments(output_dir=str(tmp_path), gradient_accumulation_steps=2, max_grad_norm=0))
    with pytest.raises(ValueError, match="max_grad_norm"):
        check_trainer_args(TrainingArguments(output_dir=str(tmp_path)))


def test_accumulating_over_micro_batches_is_refused_at_the_first_step(tmp_path):
    """Per-layer updates step inside every backward, so two backward passes before ``step()`` were two updates: the
    first ``step()`` says so (a plain loop, and a Trainer with gradient accumulation whose arguments were not
    checked with ``check_trainer_args``)."""
    from transformers import Trainer, TrainingArguments

    model = to_sltrain(tiny_llama(), LLAMA_TARGETS, rank=4, density=0.05).train()
    opt = PerLayerOptimizer(model.parameters(), lambda ps: torch.optim.SGD(ps, lr=0.1))
    for step in range(2):  # one backward per step: fine
        model(input_ids=ids(step), labels=ids(step)).loss.backward()
        opt.step()
    for micro in range(2):
        model(input_ids=ids(micro), labels=ids(micro)).loss.backward()
    with pytest.raises(RuntimeError, match=r"2 backward passes ran since the last optimizer.step\(\)"):
        opt.step()
    opt.step()  # counted afresh after the error
    data = [{"input_ids": ids(i, batch=1)[0], "labels": ids(i, batch=1)[0]} for i in range(4)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=1, gradient_accumulation_steps=2,
                             max_steps=1, max_grad_norm=0.0, report_to=[], save_strategy="no", disable_tqdm=True,
                             use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None))
    with pytest.raises(RuntimeError, match="gradient_accumulation_steps=1"):
        trainer.train()


# ------------------------------------------------------------------------------------------------------------ save/load
RELOAD = textwrap.dedent(
    r"""
    import sys, torch
    from sparse_lowrank_peft.pretrain import SLTrainLinear, load_sltrain
    folder, x_path, out_path, threads = sys.argv[1:5]
    torch.set_num_threads(int(threads))  # the parent's: another thread count may sum in another order
    model = load_sltrain(None, folder).eval()  # the architecture comes from the saved config.json
    assert sum(isinstance(m, SLTrainLinear) for m in model.modules()) == 14
    with torch.no_grad():
        torch.save(model(input_ids=torch.load(x_path)).logits, out_path)
    """
)


def saved_llama(tmp_path, seed: int = 0):
    model = to_sltrain(tiny_llama(seed), LLAMA_TARGETS, rank=4, density=0.05, seed=5)
    randomize_factors(model)
    folder = tmp_path / "sltrain"
    save_sltrain(model, folder)
    return model, folder


def test_save_and_reload_in_a_fresh_process(tmp_path):
    model, folder = saved_llama(tmp_path)
    x = ids(3)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        expected = model(input_ids=x).logits
    proc = fresh_python(["-c", RELOAD, folder, tmp_path / "x.pt", tmp_path / "out.pt", torch.get_num_threads()],
                        timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, rtol=0, atol=0)
    # a model built in this process (another seed, so other supports and weights) takes the saved ones on load
    reloaded = load_sltrain(tiny_llama(seed=1), folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, expected, rtol=0, atol=0)


def test_a_bfloat16_model_reloads_from_its_config_in_bfloat16(tmp_path):
    """A model trained in bfloat16 and saved reloads from its own config.json in bfloat16 with every saved tensor
    bit for bit (the config records no dtype when the model was cast after it was built, so the settings file
    carries it). Outputs are not compared: ``.to(bfloat16)`` also cast RoPE's unsaved ``inv_freq`` buffer, which
    transformers builds in float32 for a model created in bfloat16."""
    model = to_sltrain(tiny_llama(), LLAMA_TARGETS, rank=4, density=0.05, seed=5).to(torch.bfloat16)
    randomize_factors(model)
    save_sltrain(model, tmp_path / "bf16")
    reloaded = load_sltrain(None, tmp_path / "bf16")
    assert {p.dtype for p in reloaded.parameters()} == {torch.bfloat16}
    saved, got = model.state_dict(), reloaded.state_dict()
    assert saved.keys() == got.keys()
    for name in saved:
        assert got[name].dtype == saved[name].dtype and torch.equal(got[name], saved[name]), name
    # a model passed in keeps its own dtype and takes the saved values
    fp32 = load_sltrain(tiny_llama(seed=1), tmp_path / "bf16")
    assert fp32.model.layers[0].self_attn.q_proj.lowrank_B.dtype == torch.float32
    torch.testing.assert_close(fp32.model.layers[0].self_attn.q_proj.lowrank_B,
                               model.model.layers[0].self_attn.q_proj.lowrank_B.float(), rtol=0, atol=0)


def _tamper(folder, edit):
    from safetensors.torch import load_file, save_file

    path = folder / "sltrain_model.safetensors"
    tensors = load_file(path)
    key = "model.layers.1.self_attn.v_proj.sparse_indices"
    tensors[key] = edit(tensors[key].clone())
    save_file(tensors, path)


@pytest.mark.parametrize("edit,match", [
    (lambda t: torch.cat([t[:, :1], t[:, :-1]], dim=1), "duplicated"),
    (lambda t: t.index_fill_(1, torch.tensor([t.shape[1] - 1]), 10_000), "out of range"),
    (lambda t: t[:, :-1].contiguous(), "entries but the config implies"),
    (lambda t: t.flip(1).contiguous(), "not sorted"),
], ids=["duplicates", "out-of-range", "wrong-count", "unsorted"])
def test_tampered_support_is_refused_before_the_model_changes(tmp_path, edit, match):
    _, folder = saved_llama(tmp_path)
    _tamper(folder, edit)
    fresh = tiny_llama()
    with pytest.raises(ValueError, match=match) as err:
        load_sltrain(fresh, folder)
    assert "v_proj.sparse_indices" in str(err.value)
    assert not any(isinstance(m, SLTrainLinear) for m in fresh.modules())  # refused before any change


@pytest.mark.parametrize("edit,match", [
    (lambda ts: ts.update({"model.embed_tokens.weight": ts["model.embed_tokens.weight"][:-1].contiguous()}),
     r"'model.embed_tokens.weight' is \(\d+, \d+\) in the model but"),
    (lambda ts: ts.pop("model.norm.weight"), "'model.norm.weight' is missing from the file"),
    (lambda ts: ts.update({"model.extra.weight": torch.zeros(2)}), "'model.extra.weight' is not in the model"),
], ids=["other-shape", "missing", "unexpected"])
def test_a_checkpoint_whose_other_tensors_do_not_fit_is_refused_before_the_model_changes(tmp_path, edit, match):
    """The embeddings, norms and dense layers are checked too before any layer is converted (a strict load failed
    after, with the model's layers already SLTrain ones)."""
    from safetensors.torch import load_file, save_file

    _, folder = saved_llama(tmp_path)
    path = folder / "sltrain_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)
    fresh = tiny_llama()
    with pytest.raises(ValueError, match=match + ".*not changed"):
        load_sltrain(fresh, folder)
    assert not any(isinstance(m, SLTrainLinear) for m in fresh.modules())


def test_load_state_dict_validates_support():
    layer = SLTrainLinear(9, 8, 2, density=0.2)
    state = layer.state_dict()
    state["sparse_indices"] = state["sparse_indices"].clone()
    state["sparse_indices"][0, 0] = 99
    with pytest.raises(ValueError, match="out of range"):
        layer.load_state_dict(state)


def test_low_rank_only_layers_start_away_from_the_zero_saddle():
    """density=0: B is drawn (not 0), else every block of the model is 0 and all its factor gradients vanish."""
    model = to_sltrain(tiny_llama(), LLAMA_TARGETS, rank=4, density=0.0).train()
    layer = model.model.layers[0].self_attn.v_proj
    assert layer.sparse_values is None and layer.sparse_indices is None
    assert torch.count_nonzero(layer.lowrank_B) == layer.lowrank_B.numel()
    x = ids()
    model(input_ids=x, labels=x).loss.backward()
    for m in model.modules():
        if isinstance(m, SLTrainLinear):
            assert m.lowrank_B.grad.abs().sum() > 0 and m.lowrank_A.grad.abs().sum() > 0
