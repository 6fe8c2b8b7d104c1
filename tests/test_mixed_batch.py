"""Mixed-adapter batches: ``model(**inputs, adapter_names=[...])`` gives row ``i`` exactly what the model gives it with
adapter ``adapter_names[i]`` active (``'__base__'``: with adapters disabled), for every tuner, on plain, Conv1D and
quantized bases, with the ``modules_to_save`` heads of each adapter (RoBERTa's classification head and BERT's
pooler included, which PEFT's own head wrapper cannot mix); ``generate`` too, greedy and with beam search. Before
this, PEFT dropped ``adapter_names`` for these tuners and every row silently got the active adapter."""

from __future__ import annotations

import pytest
import torch
from _builders import output_of
from test_contract import ONE_CASE_PER_TUNER, make_config, peft_model

from sparse_lowrank_peft import SLTrainConfig

ATOL = 1e-5  # the adapters' terms on a sub-batch vs on the whole batch: GEMMs of other sizes, fp32 rounding only


def two_adapters(cfg_cls, kwargs, family):
    """A model with adapters 'default' and 'other' (random, so each changes the output, and heads of their own)."""
    pm, make_inputs, task_type = peft_model(cfg_cls, kwargs, family, init_weights=False)
    other = make_config(cfg_cls, kwargs, family, task_type, init_weights=False)
    if hasattr(other, "support_seed"):
        other.support_seed = 123
    pm.add_adapter("other", other)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "modules_to_save.other" in name:
                p.add_(0.5 * torch.randn_like(p))
    return pm.eval(), make_inputs


def per_adapter_outputs(pm, inputs) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        outputs = {}
        for name in ("default", "other"):
            pm.set_adapter(name)
            outputs[name] = output_of(pm, inputs).clone()
        with pm.disable_adapter():
            outputs["__base__"] = output_of(pm, inputs).clone()
    pm.set_adapter("default")
    return outputs


def names_for(rows: int) -> list[str]:
    cycle = ["other", "__base__", "default"]
    return [cycle[i % 3] for i in range(rows)]


@pytest.mark.parametrize("cfg_cls,kwargs", ONE_CASE_PER_TUNER)
@pytest.mark.parametrize("family", ["mlp", "roberta", "gpt2", "bert-nf4", "bert-int8"])
def test_each_row_gets_its_adapter(cfg_cls, kwargs, family):
    pm, make_inputs = two_adapters(cfg_cls, kwargs, family)
    inputs = make_inputs(5)
    expected = per_adapter_outputs(pm, inputs)
    rows = len(next(iter(inputs.values())))
    names = names_for(rows)
    with torch.no_grad():
        mixed = output_of(pm, {**inputs, "adapter_names": names})
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i], expected[name][i], atol=ATOL, rtol=0)
    assert not torch.allclose(expected["default"], expected["other"])  # the rows really differ by adapter
    assert not torch.allclose(expected["default"], expected["__base__"])
    with torch.no_grad():  # the hooks are gone afterwards: the active adapter on every row again
        torch.testing.assert_close(output_of(pm, inputs), expected["default"], atol=0, rtol=0)


@pytest.mark.parametrize("cfg_cls,kwargs", ONE_CASE_PER_TUNER)
@pytest.mark.parametrize("num_beams", [1, 2])
def test_generate_with_an_adapter_per_prompt(cfg_cls, kwargs, num_beams):
    """Each prompt generates what it generates alone under its adapter (beam search repeats the names per beam)."""
    pm, make_inputs = two_adapters(cfg_cls, kwargs, "llama")
    prompts = make_inputs(7)["input_ids"][:3, :5]
    names = ["other", "__base__", "default"]
    settings = dict(max_new_tokens=5, do_sample=False, num_beams=num_beams, pad_token_id=0)
    with torch.no_grad():
        mixed = pm.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), adapter_names=names, **settings)
        alone = []
        for i, name in enumerate(names):
            pm.set_adapter("default" if name == "__base__" else name)
            prompt = prompts[i : i + 1]
            if name == "__base__":
                with pm.disable_adapter():
                    alone.append(pm.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **settings))
            else:
                alone.append(pm.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **settings))
    torch.testing.assert_close(mixed, torch.cat(alone), atol=0, rtol=0)
    assert len({tuple(row.tolist()) for row in mixed[:, 5:]}) > 1  # the adapters make the continuations differ


def test_bad_adapter_names_are_refused_with_the_fix():
    pm, make_inputs = two_adapters(SLTrainConfig, {"r": 4, "sparsity": 0.05}, "bert")
    inputs = make_inputs(5)
    with pytest.raises(ValueError, match=r"does not have: 'typo'.*Loaded adapters: 'default', 'other'"):
        pm(**inputs, adapter_names=["default", "typo", "other"])
    with pytest.raises(ValueError, match="2 names but the batch has 3 rows"):
        pm(**inputs, adapter_names=["default", "other"])
    with pytest.raises(TypeError, match="one adapter name per row"):
        pm(**inputs, adapter_names="default")
    with pytest.raises(ValueError, match="alora_offsets"):
        pm(**inputs, alora_offsets=[1, 1, 1])
    pm.train()
    with pytest.raises(ValueError, match="training mode. Fix: call model.eval"):
        pm(**inputs, adapter_names=["default"] * 3)
    pm.eval()
    pm.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        pm(**inputs, adapter_names=["default"] * 3)
    pm.unmerge_adapter()
    with torch.no_grad():  # a failed call leaves no hook behind
        torch.testing.assert_close(output_of(pm, {**inputs, "adapter_names": ["default"] * 3}), output_of(pm, inputs))


def test_encoder_decoder_beam_search_repeats_the_names_for_the_decoder_only():
    """On an encoder-decoder model beam search repeats the decoder's rows, not the encoder's: each side gets the
    names for its own batch (a tiny BART, three prompts, three beams)."""
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    cfg = BartConfig(vocab_size=50, d_model=24, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
                     forced_eos_token_id=None)
    fields = dict(r=4, sparsity=0.1, target_modules=["q_proj", "v_proj"], task_type="SEQ_2_SEQ_LM", init_weights=False)
    from peft import get_peft_model

    pm = get_peft_model(BartForConditionalGeneration(cfg).eval(), SLTrainConfig(**fields))
    pm.add_adapter("other", SLTrainConfig(**fields))
    with torch.no_grad():  # adapters large enough that each gives its own continuation
        for name, p in pm.named_parameters():
            if "sltrain_" in name:
                p.add_(2.0 * torch.randn_like(p))
    pm.eval()
    prompts = torch.randint(3, 50, (3, 6), generator=torch.Generator().manual_seed(1))
    names = ["other", "__base__", "default"]
    settings = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, num_beams=3)
    with torch.no_grad():
        mixed = pm.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), adapter_names=names, **settings)
        alone = []
        for i, name in enumerate(names):
            pm.set_adapter("default" if name == "__base__" else name)
            prompt = dict(input_ids=prompts[i : i + 1], attention_mask=torch.ones_like(prompts[i : i + 1]))
            if name == "__base__":
                with pm.disable_adapter():
                    alone.append(pm.generate(**prompt, **settings))
            else:
                alone.append(pm.generate(**prompt, **settings))
    torch.testing.assert_close(mixed, torch.cat(alone), atol=0, rtol=0)
    assert len({tuple(row.tolist()) for row in mixed}) == 3
