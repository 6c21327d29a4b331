"""A run's exported adapter with plain transformers + peft: load it and classify texts.

    python examples/load_adapter.py RUN_DIR "what a great day" "this is awful"

``RUN_DIR/adapter/peft`` holds the LoRA adapter (``adapter_config.json``, ``adapter_model.safetensors``) and
the head's config (``config.json``: the number of classes and their names). Its base model is the folder
the run used, or ``fedsb:default/seq-cls`` for the bundled default, which ``base_model_path`` finds on
this machine (README: "The run directory").
"""

import json
import sys
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from fedsb.tasks import base_model_path


def load(run_dir: str):
    peft_dir = Path(run_dir) / "adapter" / "peft"
    base = base_model_path(json.loads((peft_dir / "adapter_config.json").read_text())["base_model_name_or_path"])
    config = AutoConfig.from_pretrained(peft_dir)  # the base's config with the run's classes (id2label)
    model = AutoModelForSequenceClassification.from_pretrained(base, config=config)
    return PeftModel.from_pretrained(model, peft_dir).eval(), AutoTokenizer.from_pretrained(base)


if __name__ == "__main__":
    model, tokenizer = load(sys.argv[1])
    with torch.no_grad():
        logits = model(**tokenizer(sys.argv[2:], padding=True, truncation=True, return_tensors="pt")).logits
    for text, label in zip(sys.argv[2:], logits.argmax(-1).tolist()):
        print(f"{model.config.id2label[label]}\t{text}")
