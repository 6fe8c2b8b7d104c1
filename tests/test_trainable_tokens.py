"""``trainable_token_indices``: some embedding rows train beside the adapter (PEFT's TrainableTokens, as
``LoraConfig`` has it), e.g. the rows of tokens added for a chat template. For every tuner: only those rows change,
the adapter reloads exactly, ``merge_and_unload`` writes them into the embedding, and the export to plain LoRA carries
them (exact for factored deltas, at full rank for the others). Bad values are refused before the model changes."""

from __future__ import annotations

import pytest
import torch
from _builders import BUILDERS, output_of
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from test_contract import ONE_CASE_PER_TUNER, make_config

from sparse_lowrank_peft import SLTrainConfig, export_to_lora

TOKENS = [3, 5]
FACTORED = {"SoraConfig", "DyLoraConfig", "NolaConfig"}  # exported exactly without a rank


def inputs_with_tokens(make_inputs, seed):
    inputs = make_inputs(seed)
    inputs["input_ids"][:, :2] = torch.tensor(TOKENS)
    return inputs


@pytest.mark.parametrize("cfg_cls,kwargs", ONE_CASE_PER_TUNER)
def test_token_rows_train_reload_merge_and_export(cfg_cls, kwargs, tmp_path):
    model, make_inputs, task_type = BUILDERS["llama"]()
    original = model.get_input_embeddings().weight.detach().clone()
    pm = get_peft_model(model, make_config(cfg_cls, kwargs, "llama", task_type, trainable_token_indices=TOKENS))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        (output_of(pm, inputs_with_tokens(make_inputs, step)).float() ** 2).mean().backward()
        opt.step(), opt.zero_grad()
    pm.eval()
    inputs = inputs_with_tokens(make_inputs, 9)
    with torch.no_grad():
        trained = output_of(pm, inputs)
    pm.save_pretrained(tmp_path / "adapter")
    exact = {} if cfg_cls.__name__ in FACTORED else {"rank": 1.0, "max_energy_rank": 40}  # full rank: exact
    export_to_lora(pm, tmp_path / "lora", **exact)

    reloaded = PeftModel.from_pretrained(BUILDERS["llama"]()[0], tmp_path / "adapter").eval()
    exported = PeftModel.from_pretrained(BUILDERS["llama"]()[0], tmp_path / "lora").eval()
    with torch.no_grad():
        torch.testing.assert_close(output_of(reloaded, inputs), trained, atol=0, rtol=0)
        torch.testing.assert_close(output_of(exported, inputs), trained, atol=1e-5, rtol=0)
        merged = pm.merge_and_unload()
        torch.testing.assert_close(output_of(merged, inputs), trained, atol=1e-5, rtol=0)
    changed = (merged.get_input_embeddings().weight != original).any(dim=1).nonzero().flatten().tolist()
    assert changed == TOKENS


BAD = [
    ([-1], "not a list of token ids"),
    ([], "not a list of token ids"),
    ("3", "not a list of token ids"),
    ([1.5], "not a list of token ids"),
    ([97], r"ids \[97\] are not rows of the input embedding \(97 tokens\).*resize_token_embeddings"),
    ({"embed_tokens": [3, 200]}, r"ids \[200\] are not rows of 'embed_tokens'"),
    ({"nope": [1]}, "'nope', which is not a module of this model"),
    ({"lm_head": [1]}, "'lm_head', which is a Linear, not an nn.Embedding"),
]


@pytest.mark.parametrize("value,message", BAD)
def test_bad_token_indices_are_refused_before_the_model_changes(value, message):
    model, _, task_type = BUILDERS["llama"]()
    with pytest.raises(ValueError, match=message):
        get_peft_model(model, SLTrainConfig(r=4, target_modules=["q_proj"], task_type=task_type,
                                            trainable_token_indices=value))
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
