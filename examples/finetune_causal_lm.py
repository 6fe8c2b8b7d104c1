"""Fine-tune a causal LM with SLTrain on a 4-bit base (QLoRA's setting), reload it, and ship it as a plain LoRA.

    python examples/finetune_causal_lm.py --model meta-llama/Llama-3.2-1B --text corpus.txt --steps 300
    python examples/finetune_causal_lm.py      # no --model: a tiny random LLaMA on this file's bytes (the tests)

Every decoder linear is NF4 (bitsandbytes; lm_head stays in full precision) and becomes W0 + (α/r)·B·A + S through
target_modules="all-linear". Printed: the validation perplexity before and after, whether the adapter reloaded onto
a fresh 4-bit base gives the same loss, and the perplexity of the plain LoRA export, which has one rank so that
PEFT, vLLM and llama.cpp read it alike (SLTrain's sparse term is folded into that rank by LoRA-Squeeze).
"""

import argparse
import math
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainingArguments

from sparse_lowrank_peft import SLTrainConfig, export_to_lora


def tiny_llama(folder: Path) -> Path:
    """A 2-layer LLaMA over bytes (vocabulary 256), saved so that it loads like any checkpoint. Widths are multiples
    of 64, as in real LLMs: bitsandbytes' AVX-512-BF16 eval kernel, which plain PEFT's LoRA runs on such CPUs, asserts
    on others (docs/quantized.md)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=256)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def token_ids(model: str | None, text: str) -> torch.Tensor:
    """The text as one stream of token ids: the model's tokenizer, or bytes for the tiny LLaMA."""
    if model is None:
        return torch.tensor(list(text.encode()))
    from transformers import AutoTokenizer

    return torch.tensor(AutoTokenizer.from_pretrained(model)(text)["input_ids"])


def blocks(ids: torch.Tensor, size: int) -> list[dict]:
    """Consecutive blocks of ``size`` tokens; the model shifts the labels itself."""
    chunks = ids[: len(ids) // size * size].view(-1, size)
    return [{"input_ids": c, "labels": c} for c in chunks]


def load_4bit(path) -> torch.nn.Module:
    """The base with every decoder linear in NF4 (double quantization), computing in bf16 on a GPU, fp32 on a CPU."""
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=["lm_head"])
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=nf4, dtype=dtype,
                                                device_map="auto" if cuda else "cpu")


def mean_loss(model, data: list[dict]) -> float:
    model.eval()
    with torch.no_grad():
        losses = [model(input_ids=b["input_ids"][None].to(model.device),
                        labels=b["labels"][None].to(model.device)).loss.item() for b in data]
    return sum(losses) / len(losses)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a causal LM folder or hub id (default: a tiny random LLaMA)")
    parser.add_argument("--text", default=__file__, help="training text; the last 10%% is the validation split")
    parser.add_argument("--out", default="causal-lm-run", help="folder for the adapter and the LoRA export")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--block", type=int, default=128, help="tokens per training sequence")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    args = parser.parse_args(argv)
    out = Path(args.out)

    path = args.model or tiny_llama(out / "tiny-llama")
    ids = token_ids(args.model, Path(args.text).read_text())
    split = int(0.9 * len(ids))
    train, dev = blocks(ids[:split], args.block), blocks(ids[split:], args.block)[:32]

    config = SLTrainConfig(r=args.rank, lora_alpha=2 * args.rank, sparsity=0.01, target_modules="all-linear",
                           task_type="CAUSAL_LM")
    model = get_peft_model(load_4bit(path), config)
    model.print_trainable_parameters()
    before = mean_loss(model, dev)
    training = TrainingArguments(output_dir=str(out / "trainer"), max_steps=args.steps, per_device_train_batch_size=8,
                                 learning_rate=args.lr, warmup_steps=max(1, args.steps // 10), lr_scheduler_type="cosine",
                                 logging_steps=max(1, args.steps // 5), save_strategy="no", report_to=[])
    Trainer(model=model, args=training, train_dataset=train).train()
    after = mean_loss(model, dev)
    print(f"validation perplexity {math.exp(before):.2f} -> {math.exp(after):.2f}")

    model.save_pretrained(out / "adapter")
    reloaded = PeftModel.from_pretrained(load_4bit(path), out / "adapter")
    print("reloaded loss equal:", abs(mean_loss(reloaded, dev) - after) < 1e-5)

    lora = export_to_lora(model, out / "lora", rank=2 * args.rank, uniform_rank=True)
    served = PeftModel.from_pretrained(load_4bit(path), lora)
    print(f"plain LoRA r={2 * args.rank} (vLLM, llama.cpp, PEFT): perplexity {math.exp(mean_loss(served, dev)):.2f}")


if __name__ == "__main__":
    main()
