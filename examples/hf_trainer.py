"""FW-LoRA with the Hugging Face Trainer. Offline: the bundled MiniLM and a CoLA slice.

    python examples/hf_trainer.py --data-dir ../shared/glue [--steps 60] [--output-dir runs/hf-example]
"""

import argparse

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, TrainingArguments

from fwlora import FWLoRAConfig
from fwlora.tasks.glue import encode, load_task
from fwlora.hf import FWLoRATrainer
from fwlora.models import resolve_backbone

parser = argparse.ArgumentParser()
parser.add_argument("--data-dir", default="../shared/glue")
parser.add_argument("--steps", type=int, default=60)
parser.add_argument("--warmup-steps", type=int, default=20)
parser.add_argument("--output-dir", default="runs/hf-example")
args = parser.parse_args()

path = resolve_backbone("minilm")
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, task_type="SEQ_CLS", target_modules=[
    "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
    "intermediate.dense", "output.dense"]))
train, _, _ = load_task("cola", args.data_dir)

trainer = FWLoRATrainer(
    model=model,
    args=TrainingArguments(output_dir=args.output_dir, per_device_train_batch_size=16, max_steps=args.steps,
                           learning_rate=1e-3, warmup_steps=max(1, args.steps // 16), logging_steps=10, save_strategy="no",
                           report_to=[], use_cpu=not torch.cuda.is_available()),
    train_dataset=encode(train[: 16 * args.steps], tokenizer, max_length=64),
    data_collator=DataCollatorWithPadding(tokenizer),
    fw_config=FWLoRAConfig(lambda_fw=1e-4, warmup_steps=args.warmup_steps),
)
trainer.train()
trainer.save_model(args.output_dir)  # a standard PEFT adapter + fwlora_state.safetensors
top = sorted(trainer.fw.importance.items(), key=lambda kv: -kv[1])[:3]
print("most important matrices:", ", ".join(f"{n.split('encoder.')[-1]} {i:.1%}" for n, i in top))
