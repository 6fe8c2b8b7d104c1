"""Quickstart: SLTrain (sparse + low-rank) on a tiny RoBERTa, trained, saved, reloaded and merged."""
import torch
from peft import PeftModel, get_peft_model
from transformers import RobertaConfig, RobertaForSequenceClassification

from sparse_lowrank_peft import SLTrainConfig  # importing registers the methods with PEFT

cfg = RobertaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
make_base = lambda: torch.manual_seed(0) and RobertaForSequenceClassification(cfg)  # same random "pretrained" base
model = get_peft_model(make_base(), SLTrainConfig(r=8, sparsity=0.01, target_modules=["query", "value"], task_type="SEQ_CLS"))
model.print_trainable_parameters()

x, y = torch.randint(3, 100, (8, 16)), torch.randint(0, 2, (8,))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
for step in range(5):
    loss = model(input_ids=x, labels=y).loss
    loss.backward(), opt.step(), opt.zero_grad()
    print(f"step {step}: loss {loss.item():.4f}")

model.save_pretrained("quickstart-adapter")
model.eval()
reloaded = PeftModel.from_pretrained(make_base(), "quickstart-adapter").eval()
merged = model.merge_and_unload()
with torch.no_grad():
    a, b = reloaded(input_ids=x).logits, merged(input_ids=x).logits
print("reloaded == merged:", torch.allclose(a, b, atol=1e-5))
