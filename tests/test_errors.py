"""Bad input gets a clear ValueError/TypeError naming the field or file, the value and the fix, before anything changes."""

from __future__ import annotations

import pytest
import torch
from _builders import BUILDERS, build_roberta_other_width, output_of, state_of
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file

import sparse_lowrank_peft
from sparse_lowrank_peft import SLTrainConfig
from sparse_lowrank_peft._peft_compat import check_peft_version


def snapshot(model):
    return state_of(model), [type(m) for m in model.modules()]


@pytest.mark.parametrize("r", [0, -3, 2.5, True])
def test_bad_rank(r):
    with pytest.raises(ValueError, match=r"SLTrainConfig\.r=.*positive integer.*Fix"):
        SLTrainConfig(r=r, target_modules=["lin0"])


@pytest.mark.parametrize("sparsity", [0, 0.0, 1, 1.0, -0.1, 1.5])
def test_bad_sparsity(sparsity):
    with pytest.raises(ValueError, match=r"SLTrainConfig\.sparsity=.*\(0, 1\).*Fix"):
        SLTrainConfig(sparsity=sparsity, target_modules=["lin0"])


def test_bad_dropout_and_bias():
    with pytest.raises(ValueError, match="lora_dropout"):
        SLTrainConfig(lora_dropout=1.0)
    with pytest.raises(ValueError, match="bias"):
        SLTrainConfig(bias="lora_only")


def test_target_modules_matching_nothing_leaves_model_unchanged():
    model, _, _ = BUILDERS["mlp"]()
    state, types = snapshot(model)
    with pytest.raises(ValueError, match="not found in the base model"):
        get_peft_model(model, SLTrainConfig(target_modules=["does_not_exist"]))
    assert [type(m) for m in model.modules()] == types
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_unsupported_layer_type_leaves_model_unchanged():
    model, _, _ = BUILDERS["roberta"]()
    state, types = snapshot(model)
    # "query" is fine but "LayerNorm" is not a linear layer: nothing may be wrapped before the error
    with pytest.raises(TypeError, match=r"cannot wrap: .*LayerNorm.*Fix.*not changed"):
        get_peft_model(model, SLTrainConfig(target_modules=["query", "LayerNorm"]))
    assert [type(m) for m in model.modules()] == types
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_no_default_targets_for_custom_model():
    model, _, _ = BUILDERS["mlp"]()
    with pytest.raises(ValueError, match="target_modules is None.*Fix"):
        get_peft_model(model, SLTrainConfig())


def test_peft_version_guard():
    for good in ("0.21.2", "0.22.0"):
        check_peft_version(good)
    for bad in ("0.20.9", "0.23.0", "1.0.0"):
        with pytest.raises(ImportError, match=r"peft>=0\.21\.0,<0\.23\.0.*Fix"):
            check_peft_version(bad)


def test_registration_is_idempotent():
    import importlib

    from peft.utils import PeftType

    importlib.reload(sparse_lowrank_peft)
    assert PeftType("SLTRAIN") is PeftType.SLTRAIN
    assert list(PeftType).count(PeftType.SLTRAIN) == 1


# ---------------------------------------------------------------------------------------------- checkpoints
def saved_adapter(tmp_path, family="roberta", **kwargs):
    model, make_inputs, task_type = BUILDERS[family]()
    cfg = SLTrainConfig(r=2, sparsity=0.1, init_weights=False, task_type=task_type, **kwargs)
    pm = get_peft_model(model, cfg)
    pm.save_pretrained(tmp_path)
    return tmp_path / "adapter_model.safetensors"


def rewrite(path, fn):
    sd = load_file(path)
    key = next(k for k in sorted(sd) if k.endswith("sltrain_support"))
    sd[key] = fn(sd[key])
    save_file(sd, path, metadata={"format": "pt"})
    return key


def test_adapter_for_other_shapes(tmp_path):
    saved_adapter(tmp_path)
    other = build_roberta_other_width()
    with pytest.raises(ValueError, match=r"does not fit this model.*other\s+layer shapes.*Fix"):
        PeftModel.from_pretrained(other, tmp_path)


@pytest.mark.parametrize(
    "corrupt,match",
    [
        (lambda s: s.clone().index_fill_(1, torch.tensor([0]), 10_000), "out of range"),
        (lambda s: torch.cat([s[:, :1], s[:, :-1]], dim=1), "duplicated"),
        (lambda s: s[:, :-1].contiguous(), "entries but the config implies"),
        (lambda s: s.flip(1).contiguous(), "not sorted"),
        (lambda s: s.float(), "must be integers"),
    ],
    ids=["out-of-range", "duplicated", "wrong-count", "unsorted", "float"],
)
def test_corrupted_support_is_refused(tmp_path, corrupt, match):
    path = saved_adapter(tmp_path)
    key = rewrite(path, corrupt)
    fresh, _, _ = BUILDERS["roberta"]()
    with pytest.raises(ValueError, match=match) as info:
        PeftModel.from_pretrained(fresh, tmp_path)
    layer_name = key.removeprefix("base_model.model.").removesuffix(".sltrain_support")
    assert layer_name in str(info.value)


def test_missing_support_is_refused(tmp_path):
    path = saved_adapter(tmp_path)
    sd = load_file(path)
    sd = {k: v for k, v in sd.items() if not k.endswith("sltrain_support")}
    save_file(sd, path, metadata={"format": "pt"})
    fresh, _, _ = BUILDERS["roberta"]()
    with pytest.raises(ValueError, match="no sparse support"):
        PeftModel.from_pretrained(fresh, tmp_path)


def test_loaded_support_replaces_drawn_one(tmp_path):
    """The support comes from the checkpoint, not from re-drawing: a different seed in a fresh model is overwritten."""
    model, make_inputs, task_type = BUILDERS["bert"]()
    pm = get_peft_model(model, SLTrainConfig(r=2, sparsity=0.1, init_weights=False, task_type=task_type))
    pm.eval()
    inputs = make_inputs(0)
    with torch.no_grad():
        expected = output_of(pm, inputs)
    pm.save_pretrained(tmp_path)
    import json

    cfg_path = tmp_path / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["support_seed"] = 999  # a fresh draw would differ; the loaded support must win
    cfg_path.write_text(json.dumps(cfg))
    loaded = PeftModel.from_pretrained(BUILDERS["bert"]()[0], tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(output_of(loaded, inputs), expected, atol=0, rtol=0)
