"""Tiny models built from configs (real transformers code, random weights, no hub) and their inputs.

Every builder returns ``(model, make_inputs)`` where ``make_inputs(seed)`` returns the kwargs of a forward call, and
``task_type`` for PEFT (``None`` for the plain MLP). Sizes are deliberately odd (not multiples of any block size).
"""

from __future__ import annotations

import torch
from torch import nn

VOCAB = 97


class MLP(nn.Module):
    """A toy MLP: the plain-PyTorch model family of PEFT's own custom-model tests."""

    def __init__(self, in_features: int = 11, hidden: int = 23, out: int = 3):
        super().__init__()
        self.lin0 = nn.Linear(in_features, hidden)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(hidden, hidden, bias=False)
        self.head = nn.Linear(hidden, out)

    def forward(self, X):
        return self.head(self.relu(self.lin1(self.relu(self.lin0(X)))))


def _ids(seed: int, batch: int = 3, length: int = 7) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def build_mlp():
    torch.manual_seed(0)
    model = MLP()

    def make_inputs(seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        return {"X": torch.randn(5, 11, generator=g)}

    return model, make_inputs, None


def build_roberta():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    cfg = RobertaConfig(
        vocab_size=VOCAB, hidden_size=36, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2,
    )
    return RobertaForSequenceClassification(cfg).eval(), _ids, "SEQ_CLS"


def build_bert(hidden: int = 36):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
    )
    return BertForSequenceClassification(cfg).eval(), _ids, "SEQ_CLS"


def build_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=VOCAB, n_embd=36, n_layer=2, n_head=4, n_positions=40, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg).eval(), _ids, "CAUSAL_LM"


def build_llama():
    """Tiny LLaMA (the decoder family most LLM fine-tuning targets): bias-free linears, grouped-query attention (k/v
    project 40 -> 20), an odd MLP width, untied lm_head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=40, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=40, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval(), _ids, "CAUSAL_LM"


def build_bert_nf4():
    """Tiny BERT whose query/value layers are quantized to NF4 after loading, on bitsandbytes' generic CPU path
    (no AVX-512-BF16 repacking, whatever this machine has)."""
    from _bnb_cpu import bnb_cpu_path

    from sparse_lowrank_peft.delta.quant import quantize_linears

    model, make_inputs, task_type = build_bert()
    with bnb_cpu_path("generic"):
        quantize_linears(model, ["query", "value"], quant_type="nf4")
    return model, make_inputs, task_type


def build_bert_int8():
    """Tiny BERT whose query/value layers are LLM.int8 ``Linear8bitLt`` after loading (``load_in_8bit=True``'s layers:
    int8 weights, inputs quantized per row at bitsandbytes' default outlier threshold 6.0)."""
    from sparse_lowrank_peft.delta.quant import quantize_linears

    model, make_inputs, task_type = build_bert()
    quantize_linears(model, ["query", "value"], quant_type="int8")
    return model, make_inputs, task_type


def build_llama_nf4():
    """Tiny LLaMA with every decoder linear in NF4 (QLoRA's LLM setting; lm_head stays fp32), on bitsandbytes'
    generic CPU path."""
    from _bnb_cpu import bnb_cpu_path

    from sparse_lowrank_peft.delta.quant import quantize_linears

    model, make_inputs, task_type = build_llama()
    with bnb_cpu_path("generic"):
        quantize_linears(model, [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n])
    return model, make_inputs, task_type


def build_bert_nf4_avx512():
    """Tiny BERT with NF4 query/value on bitsandbytes' AVX-512-BF16 CPU path (forced on any machine), already
    repacked by one eval forward, as a user's evaluation before adding an adapter leaves it. 64 wide: the repack
    tiles 32 output rows and needs whole 64-value blocks per row."""
    from _bnb_cpu import bnb_cpu_path, is_packed

    from sparse_lowrank_peft.delta.quant import quantize_linears

    model, make_inputs, task_type = build_bert(hidden=64)
    with bnb_cpu_path("avx512bf16"):
        names = quantize_linears(model, ["query", "value"], quant_type="nf4")
    with torch.no_grad():
        model(**make_inputs(99))
    assert all(is_packed(model.get_submodule(n)) for n in names), "the forced AVX-512-BF16 path did not repack"
    return model, make_inputs, task_type


BUILDERS = {"mlp": build_mlp, "roberta": build_roberta, "bert": build_bert, "gpt2": build_gpt2, "llama": build_llama,
            "llama-nf4": build_llama_nf4, "bert-nf4": build_bert_nf4, "bert-nf4-avx512": build_bert_nf4_avx512,
            "bert-int8": build_bert_int8}

#: per model family: target modules and modules_to_save (the trainable head, where the family has one)
TARGETS = {
    "mlp": {"target_modules": ["lin0", "lin1"], "modules_to_save": ["head"]},
    "roberta": {"target_modules": ["query", "value", "intermediate.dense"], "modules_to_save": ["classifier"]},
    "bert": {"target_modules": ["query", "value"], "modules_to_save": ["pooler", "classifier"]},
    "bert-nf4": {"target_modules": ["query", "value"], "modules_to_save": ["pooler", "classifier"]},
    "bert-nf4-avx512": {"target_modules": ["query", "value"], "modules_to_save": ["pooler", "classifier"]},
    "bert-int8": {"target_modules": ["query", "value"], "modules_to_save": ["pooler", "classifier"]},
    "gpt2": {"target_modules": ["c_attn", "c_proj"], "modules_to_save": None},
    "llama": {"target_modules": "all-linear", "modules_to_save": None},  # every linear but lm_head, as for LLMs
    "llama-nf4": {"target_modules": "all-linear", "modules_to_save": None},
}


def output_of(model, inputs) -> torch.Tensor:
    out = model(**inputs)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits


def train_then_output(model, make_inputs, labels: torch.Tensor, steps: int = 3, lr: float = 1e-2) -> torch.Tensor:
    """``steps`` AdamW steps on the trainable parameters (inputs ``make_inputs(step)``), then the eval-mode output
    on ``make_inputs(9)``: a trained adapter's reference output for save/reload checks."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        model(**make_inputs(step), labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        return output_of(model, make_inputs(9))


def build_roberta_other_width():
    """A RoBERTa like ``build_roberta``'s but 40 wide: a base an adapter trained on ``build_roberta`` must refuse."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    return RobertaForSequenceClassification(
        RobertaConfig(vocab_size=VOCAB, hidden_size=40, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=37, max_position_embeddings=40)
    )


def state_of(model) -> dict:
    """A detached copy of ``model``'s state dict (to check later that an error left the model unchanged)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def edit_adapter_config(folder, **fields) -> None:
    """Overwrite ``fields`` in a saved adapter's ``adapter_config.json`` (tests of mismatched configs)."""
    import json
    from pathlib import Path

    path = Path(folder) / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def at_thread_counts(fn, counts=(1, 2)) -> list:
    """``[fn() at each thread count]``, the process's thread count given back afterwards (for results that must not
    depend on the machine's thread count)."""
    threads = torch.get_num_threads()
    out = []
    try:
        for count in counts:
            torch.set_num_threads(count)
            out.append(fn())
            assert torch.get_num_threads() == count, "fn did not give the thread count back"
    finally:
        torch.set_num_threads(threads)
    return out


def structured_weight(out=96, inp=80, seed=0):
    """A weight with a decaying spectrum plus outliers, like pretrained layers (random Gaussian has a flat one)."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(out, out, generator=g))[0]
    V = torch.linalg.qr(torch.randn(inp, inp, generator=g))[0]
    s = torch.logspace(0, -2, min(out, inp))
    W = (U[:, : s.numel()] * s) @ V[:, : s.numel()].T
    W[torch.randint(0, out, (8,), generator=g), torch.randint(0, inp, (8,), generator=g)] += 0.5
    return W


def tiny_roberta():
    """A 2-layer, 64-wide RoBERTa classifier (eval mode): the bit-budget and LQ tests' model (64-wide, so every
    HQQ group size and bitsandbytes block divides its rows)."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    cfg = RobertaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=40, num_labels=2)
    return RobertaForSequenceClassification(cfg).eval()
