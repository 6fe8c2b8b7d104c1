"""Pretrain a small LLaMA from scratch with SLTrain (W = (α/r)·B·A + S) and per-layer updates; export it dense."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sparse_lowrank_peft.pretrain import PerLayerOptimizer, load_sltrain, save_sltrain, to_dense, to_sltrain

config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64)
model = LlamaForCausalLM(config)  # freshly initialised: SLTrain pretrains from scratch
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
to_sltrain(model, targets, rank=32, density=0.03, alpha=32, seed=0)  # no dense weight left in these layers
opt = PerLayerOptimizer(model.parameters(), lambda ps: torch.optim.AdamW(ps, lr=3e-3))
corpus = torch.tensor(list(open(__file__, "rb").read()))  # the bytes of this file: a toy corpus
for step in range(20):
    starts = torch.randint(0, len(corpus) - 64, (8,)).tolist()
    batch = torch.stack([corpus[s:s + 64] for s in starts])
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()  # each parameter is stepped, and its gradient freed, inside backward
    opt.step()  # a no-op with per-layer updates; kept so the loop reads as usual
    print(f"step {step} loss {loss.item():.3f}")
save_sltrain(model, "sltrain-llama")  # B, A, sparse values and support indices (safetensors)
dense = to_dense(load_sltrain(None, "sltrain-llama"))  # a plain LlamaForCausalLM with W = (α/r)·B·A + S
dense.save_pretrained("sltrain-llama-dense")  # loads anywhere; fine-tune it later with PEFT
