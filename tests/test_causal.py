"""Causal LM: answer-only loss, padding, exact match, datasets, a federated run, PEFT round trips."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from fedsb import adapters
from fedsb.tasks.causal import (PromptAnswer, causal_per_example_loss, exact_match, extract_number, generate_answers,
                          load_chatterbot, load_gsm, load_jsonl_prompt_answer, tokenize_prompt_answer)
from fedsb.tasks.data import pad_collate
from fedsb.tasks.models import load_base_model, load_tokenizer
from lab.tiny import set_random_bases
from tests.conftest import minilm_dir, tiny_run_config


def _save_tokenizer(out: Path) -> None:
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_dir() / f, out / f)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                                 pad_token_id=0)).save_pretrained(out)
    _save_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    out = tmp_path_factory.mktemp("tiny-gpt2")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=30522, n_embd=32, n_layer=2, n_head=2, n_positions=256)).save_pretrained(out)
    _save_tokenizer(out)
    return out


RECORDS = [PromptAnswer("what is two plus three", "five"), PromptAnswer("say hello to the world please", "hello world"),
           PromptAnswer("count", "one two three four")]


def test_prompt_tokens_get_no_loss(tiny_llama):
    tok = load_tokenizer(str(tiny_llama))
    enc = tokenize_prompt_answer(tok, RECORDS, 64, use_chat_template=True)
    for e, r in zip(enc, RECORDS):
        n_answer = len(tok(r.answer, add_special_tokens=False)["input_ids"])
        assert sum(l != -100 for l in e["labels"]) == n_answer
        first = next(i for i, l in enumerate(e["labels"]) if l != -100)
        assert all(l == -100 for l in e["labels"][:first]) and e["labels"][first:] == e["input_ids"][first:]
    model = load_base_model(str(tiny_llama), "causal-lm", 0, 0)
    batch = pad_collate(tok.pad_token_id)([{k: torch.tensor(v) for k, v in e.items()} for e in enc])
    losses = causal_per_example_loss(model, batch)
    # hand computation over answer tokens only, one example at a time, no padding
    for i, e in enumerate(enc):
        ids = torch.tensor([e["input_ids"]])
        logits = model(input_ids=ids).logits[0, :-1]
        lab = torch.tensor(e["labels"][1:])
        m = lab != -100
        ref = torch.nn.functional.cross_entropy(logits[m], lab[m])
        assert torch.allclose(losses[i], ref, atol=1e-5), i
    # right padding: pads are masked out of attention and labels
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    assert batch["attention_mask"][0, -1] == 0 or batch["attention_mask"][0].all()


def test_truncation_keeps_the_answer(tiny_llama):
    tok = load_tokenizer(str(tiny_llama))
    long = PromptAnswer(" ".join(["word"] * 200), "the answer")
    (e,) = tokenize_prompt_answer(tok, [long], 16, use_chat_template=False)
    assert len(e["input_ids"]) == 16 and sum(l != -100 for l in e["labels"]) == len(tok("the answer", add_special_tokens=False)["input_ids"])


def test_left_padded_generation_equals_one_at_a_time(tiny_llama):
    tok = load_tokenizer(str(tiny_llama))
    model = load_base_model(str(tiny_llama), "causal-lm", 0, 0)
    prompts = [r.prompt for r in RECORDS]
    together = generate_answers(model, tok, prompts, 6, batch_size=3, use_chat_template=False)
    alone = [generate_answers(model, tok, [p], 6, batch_size=1, use_chat_template=False)[0] for p in prompts]
    assert together == alone and tok.padding_side == "right"


@pytest.mark.parametrize("text, value", [
    ("so the total is 42.", 42), ("#### 1,234", 1234), ("It costs $5.50 in all", 5.5), ("The answer is -3", -3),
    ("The answer is 7.", 7), ("\\boxed{12}", 12), ("3 apples and 4 pears: #### 7\nthen 9", 7),
    ("first 10, then 20, finally 30", 30), ("no number here", None), ("0.25 of it", 0.25), ("answer is: 1,000,000", 1e6),
])
def test_extract_number(text, value):
    assert extract_number(text) == value


def test_exact_match():
    assert exact_match("... so #### 288", "288") and exact_match("The answer is 288.0", "288")
    assert not exact_match("#### 287", "288") and not exact_match("I do not know", "288")


def test_datasets(tmp_path):
    a, b = load_gsm(5, seed=3), load_gsm(5, seed=3)
    assert [r.prompt for r in a] == [r.prompt for r in b] and a[0].prompt != load_gsm(5, seed=4)[0].prompt
    assert all(extract_number(r.answer) == float(r.final) for r in a)
    assert all(r.answer.count("####") == 1 and r.answer.endswith(f"#### {r.final}") for r in a)  # never twice
    chat = load_chatterbot()
    assert len(chat) > 1000
    # a malformed YAML entry (one long string) must not turn into pairs of its characters
    assert all(len(r.prompt) > 1 or len(r.answer) > 1 for r in chat)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "c"}\n')
    with pytest.raises(ValueError, match="line 2 has no 'answer'"):
        load_jsonl_prompt_answer(str(bad))


def test_peft_export_of_llama_generates_the_same_tokens(tiny_llama, tmp_path):
    from peft import PeftModel

    from fedsb.run.export import export_peft
    from fedsb.methods import make_method

    model = load_base_model(str(tiny_llama), "causal-lm", 0, 0)
    layers = make_method("fed-sb", 4, 2.0, 8.0, 0).build(model, adapters.find_targets(model, None))
    set_random_bases(layers, 4, seed=0, r_scale=3.0)
    export_peft(tmp_path / "peft", model, str(tiny_llama), "CAUSAL_LM")
    peft_model = PeftModel.from_pretrained(load_base_model(str(tiny_llama), "causal-lm", 0, 0), str(tmp_path / "peft"))
    tok = load_tokenizer(str(tiny_llama))
    ours = generate_answers(model, tok, [r.prompt for r in RECORDS], 8, 3, False)
    theirs = generate_answers(peft_model, tok, [r.prompt for r in RECORDS], 8, 3, False)
    plain = generate_answers(load_base_model(str(tiny_llama), "causal-lm", 0, 0), tok, [r.prompt for r in RECORDS], 8, 3, False)
    assert ours == theirs and ours != plain


def test_peft_export_of_gpt2_conv1d(tiny_gpt2, tmp_path):
    from peft import PeftModel

    from fedsb.run.export import export_peft
    from fedsb.methods import make_method

    model = load_base_model(str(tiny_gpt2), "causal-lm", 0, 0)
    names = adapters.find_targets(model, None)
    assert any(n.endswith("c_attn") for n in names)
    layers = make_method("fed-sb", 4, 1.0, 8.0, 0).build(model, names)
    g = torch.Generator().manual_seed(0)
    for l in layers.values():
        l.set_basis(torch.linalg.qr(torch.randn(l.out_features, 4, generator=g))[0],
                    torch.linalg.qr(torch.randn(l.in_features, 4, generator=g))[0].t(), torch.randn(4, 4, generator=g))
    export_peft(tmp_path / "peft", model, str(tiny_gpt2), "CAUSAL_LM")
    peft_model = PeftModel.from_pretrained(load_base_model(str(tiny_gpt2), "causal-lm", 0, 0), str(tmp_path / "peft"))
    ids = torch.randint(1000, 3000, (2, 7), generator=g)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, peft_model(input_ids=ids).logits, atol=1e-4)


def test_federated_causal_lm_loss_falls(tiny_llama, tmp_path):
    from lab.inprocess_grid import run_inprocess

    rng = random.Random(0)
    data = tmp_path / "qa.jsonl"
    with data.open("w") as fh:
        for _ in range(300):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            fh.write(json.dumps({"prompt": f"add {a} and {b}", "answer": f"{a + b}", "final": f"{a + b}"}) + "\n")
    run = run_inprocess(tiny_run_config(tiny_llama, data, tmp_path / "run", **{
        "task": "causal-lm", "text-column": "text", "label-column": "sentiment", "max-length": 32,
        "learning-rate": 0.05, "num-server-rounds": 3, "eval-generate-samples": 8, "max-new-tokens": 4}), 3)
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    ev = [r for r in recs if r["phase"] == "evaluate"]
    assert ev[-1]["loss"] < ev[0]["loss"] and ev[-1]["perplexity"] < ev[0]["perplexity"]
    assert ev[-1]["exact_match"] is not None
    s = json.loads((run / "summary.json").read_text())
    assert (run / "adapter" / "peft" / "adapter_config.json").is_file() and s["head_params"] == 0


@pytest.mark.slow
def test_bundled_smollm2_loads_and_generates():
    from fedsb.tasks.causal import load_smollm2

    path = load_smollm2()
    tok = load_tokenizer(path)
    model = load_base_model(path, "causal-lm", 0, 0)
    assert "q_proj" in " ".join(adapters.find_targets(model, None))
    (out,) = generate_answers(model, tok, ["What is 2 + 3?"], 8, 1, True)
    assert isinstance(out, str) and out.strip()


def test_reasoning_dataset_is_scored_by_its_generators_scorer(tiny_llama, tmp_path):
    """dataset=reasoning:NAME: seeded records, the generator's answer length, and exact match from the generator's
    own score_answer: "The answer is 7" holds the right number but is not the bare answer the prompt asks for."""
    from fedsb.config import FedSBConfig
    from fedsb.tasks import get_task
    from fedsb.tasks.reasoning import ReasoningRecord, score_answer

    cfg = FedSBConfig.from_run_config(tiny_run_config(tiny_llama, "reasoning:chain_sum", tmp_path, **{
        "task": "causal-lm", "num-examples": 60, "eval-generate-samples": 5, "max-length": 48}))
    task = get_task(cfg)
    recs = task.generation_records()
    assert len(recs) == 5 and all(isinstance(r, ReasoningRecord) and r.task == "chain_sum" for r in recs)
    assert task.max_new_tokens == 8  # chain_sum's own; max-new-tokens=0 means "the dataset's"
    answers = [r.answer for r in recs]
    assert task.score(recs, answers) == 1.0
    wordy = [f"The answer is {a}" for a in answers]
    assert all(exact_match(w, a) for w, a in zip(wordy, answers))  # the numeric extractor would accept them...
    assert task.score(recs, wordy) == 0.0 and 0 < score_answer(recs[0], wordy[0]) < 1  # ...the generator does not
    assert task.score(recs, [answers[0]] + wordy[1:]) == pytest.approx(0.2)
    with pytest.raises(Exception, match="dataset"):
        get_task(cfg.replace(dataset="reasoning:no_such_generator"))
