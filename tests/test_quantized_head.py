"""A model loaded with ``BitsAndBytesConfig(load_in_4bit=True)`` whose classification head transformers quantized
(transformers >= 5.25 does for RoBERTa's ``classifier.dense`` / ``classifier.out_proj``): every tuner of ours trains,
saves and reloads it, on both of bitsandbytes' CPU paths, and the README's 4-bit example runs. The same for
``load_in_8bit=True`` (LLM.int8), which merges too."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
from _bnb_cpu import PATHS, bnb_cpu_path
from _builders import VOCAB, _ids
from _forkserver import fresh_python
from peft import PeftModel, get_peft_model

from sparse_lowrank_peft import DyLoraConfig, NolaConfig, SLTrainConfig, SoraConfig, SparseRandLoraConfig
from sparse_lowrank_peft.delta.quant import restore_full_precision

bnb = pytest.importorskip("bitsandbytes", reason="4-bit bases need bitsandbytes (the bnb extra)")
ROOT = Path(__file__).resolve().parents[1]

CONFIGS = [
    (SLTrainConfig, {"r": 2, "sparsity": 0.1}),
    (SoraConfig, {"r": 2}),
    (DyLoraConfig, {"r": 2}),
    (NolaConfig, {"r": 2, "num_basis_A": 4, "num_basis_B": 4}),
    (SparseRandLoraConfig, {"r": 2, "basis_density": 0.3}),
]


@pytest.fixture(scope="module")
def tiny_roberta_dir(tmp_path_factory):
    """A tiny RoBERTa on disk (64 wide, so bitsandbytes' repack can tile its 64x64 layers; 37-wide FFN, which it
    cannot)."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    cfg = RobertaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=40, num_labels=3)
    folder = tmp_path_factory.mktemp("tiny-roberta")
    RobertaForSequenceClassification(cfg).save_pretrained(folder)
    return folder


def load_4bit(folder, path: str, **bnb_kwargs):
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    with bnb_cpu_path(path):
        return AutoModelForSequenceClassification.from_pretrained(
            folder, quantization_config=BitsAndBytesConfig(load_in_4bit=True, **bnb_kwargs), device_map="cpu"
        )


def load_8bit(folder):
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    return AutoModelForSequenceClassification.from_pretrained(
        folder, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu"
    )


def quantized_head(model) -> list[str]:
    return [n for n, m in model.named_modules()
            if n.startswith("classifier") and isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]


def train_three_steps(pm) -> None:
    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        out = pm(**_ids(step), labels=torch.tensor([0, 1, 2]))
        out.loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cfg_cls,kwargs", CONFIGS, ids=[c[0].__name__ for c in CONFIGS])
def test_quantized_head_trains_saves_reloads(tiny_roberta_dir, tmp_path, path, cfg_cls, kwargs):
    model = load_4bit(tiny_roberta_dir, path)
    head = quantized_head(model)
    config = cfg_cls(task_type="SEQ_CLS", target_modules=["query", "value"], init_weights=False, **kwargs)
    with pytest.warns(UserWarning, match=r"llm_int8_skip_modules=\['classifier.dense', 'classifier.out_proj'\]") if head \
            else warnings.catch_warnings():
        pm = get_peft_model(model, config)
    assert not quantized_head(pm)
    head_before = pm.base_model.model.classifier.modules_to_save["default"].out_proj.weight.detach().clone()
    train_three_steps(pm)
    assert not torch.equal(pm.base_model.model.classifier.modules_to_save["default"].out_proj.weight, head_before)
    pm.save_pretrained(tmp_path)
    pm.eval()
    inputs = _ids(7)
    with torch.no_grad():
        expected = pm(**inputs).logits
    reloaded = PeftModel.from_pretrained(load_4bit(tiny_roberta_dir, path), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("cfg_cls,kwargs", CONFIGS, ids=[c[0].__name__ for c in CONFIGS])
def test_load_in_8bit_trains_saves_reloads_and_merges(tiny_roberta_dir, tmp_path, cfg_cls, kwargs):
    """LLM.int8 bases (``Linear8bitLt``, as transformers loads them): the adapters train, only they move, the saved
    adapter reloads onto a fresh 8-bit load exactly, and merge_and_unload(dequantize=True) keeps the outputs."""
    config = cfg_cls(task_type="SEQ_CLS", target_modules=["query", "value"], init_weights=False, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the head restoration's warning, where transformers quantized it
        pm = get_peft_model(load_8bit(tiny_roberta_dir), config)
    query = pm.base_model.model.roberta.encoder.layer[0].attention.self.query
    assert isinstance(query.get_base_layer(), bnb.nn.Linear8bitLt) and not quantized_head(pm)
    int8 = query.get_base_layer().weight.detach().clone()
    train_three_steps(pm)
    assert torch.equal(query.get_base_layer().weight, int8)
    pm.save_pretrained(tmp_path)
    pm.eval()
    inputs = _ids(7)
    with torch.no_grad():
        expected = pm(**inputs).logits
    reloaded = PeftModel.from_pretrained(load_8bit(tiny_roberta_dir), tmp_path).eval()
    merged = pm.merge_and_unload(dequantize=True)
    assert type(merged.roberta.encoder.layer[0].attention.self.query) is torch.nn.Linear  # untargeted ones stay int8
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, expected, atol=0, rtol=0)
        # the int8 base quantizes its inputs per row too, which the merged fp32 layers do not: measured 4e-7 to 1.2e-4
        # (SLTrain) against logits up to 0.34; bound with 8x headroom
        torch.testing.assert_close(merged(**inputs).logits, expected, atol=1e-3, rtol=0)


def test_transformers_quantizes_the_head_or_skips_it(tiny_roberta_dir):
    """Which transformers quantizes the head decides whether the restoration above ran at all (5.25 does); with
    llm_int8_skip_modules the head stays full precision and nothing is restored."""
    import transformers

    quantized = quantized_head(load_4bit(tiny_roberta_dir, "generic"))
    major, minor = (int(v) for v in re.match(r"(\d+)\.(\d+)", transformers.__version__).groups())
    if (major, minor) >= (5, 25):
        assert quantized == ["classifier.dense", "classifier.out_proj"]
    model = load_4bit(tiny_roberta_dir, "generic", llm_int8_skip_modules=["classifier"])
    assert not quantized_head(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert restore_full_precision(model, ["classifier"]) == []


def test_restore_full_precision_keeps_the_weights():
    lin = torch.nn.Linear(64, 32)
    from sparse_lowrank_peft.delta.quant import dequantize_weight, to_linear4bit

    holder = torch.nn.Module()
    holder.head = torch.nn.Sequential(to_linear4bit(lin), torch.nn.Tanh())
    expected = dequantize_weight(holder.head[0])
    with pytest.warns(UserWarning, match="head.0"):
        assert restore_full_precision(holder, ["head"]) == ["head.0"]
    restored = holder.head[0]
    assert type(restored) is torch.nn.Linear and restored.weight.requires_grad
    torch.testing.assert_close(restored.weight, expected, atol=0, rtol=0)
    torch.testing.assert_close(restored.bias, lin.bias, atol=0, rtol=0)


def test_readme_4bit_example_runs(tmp_path):
    """The README's 4-bit block is examples/qlora_seq_cls.py, which loads a SEQ_CLS model in 4-bit and reloads it."""
    example = (ROOT / "examples" / "qlora_seq_cls.py").read_text()
    assert example.split('"""', 2)[2].strip() in (ROOT / "README.md").read_text(), "README's 4-bit block differs"
    out = fresh_python([ROOT / "examples" / "qlora_seq_cls.py"], cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "reloaded == trained: True" in out.stdout, out.stdout
