"""Reasoning-gym task records: seeded and distinct, format instruction in the prompt, scored by the generator."""

from __future__ import annotations

import pytest

from fedsb.tasks import reasoning as rt


def test_records_are_deterministic_under_a_seed():
    a = rt.build_records("chain_sum", 40, seed=7)
    b = rt.build_records("chain_sum", 40, seed=7)
    assert [(r.prompt, r.answer) for r in a] == [(r.prompt, r.answer) for r in b]
    assert [(r.prompt, r.answer) for r in a] != [(r.prompt, r.answer) for r in rt.build_records("chain_sum", 40, seed=8)]
    assert len({r.prompt for r in a}) == 40  # distinct prompts: a split by index shares none
    r = a[0]
    assert r.prompt.endswith(rt.TASKS["chain_sum"].instruction) and r.prompt.startswith(r.entry["question"].rstrip())
    assert r.answer == r.final == str(r.entry["answer"]) and r.task == "chain_sum"


def test_too_few_distinct_questions_is_an_error():
    with pytest.raises(ValueError, match="distinct"):
        rt.build_records("lcm", 500, seed=0, max_value=5)  # at most 25 distinct pairs


@pytest.mark.parametrize("name", ["chain_sum", "word_sorting", "spell_backward"])
def test_scoring_delegates_to_the_generators_scorer(name, monkeypatch):
    r = rt.build_records(name, 3, seed=1)[0]
    assert rt.score_answer(r, r.answer) == 1.0 and rt.exact_match(r, f"  {r.answer}\n")  # surrounding space ignored
    assert rt.score_answer(r, "") == 0.0 and not rt.exact_match(r, "no idea")
    own = rt.make_dataset(name, 3, seed=1).score_answer  # the generator's scorer, partial credit included
    for reply in (r.answer, r.answer[:-1], r.answer + " extra", r.answer[::-1], "0"):
        assert rt.score_answer(r, reply) == own(reply.strip(), r.entry)
    seen = []
    monkeypatch.setattr(rt, "_scorer", lambda n: lambda answer, entry: seen.append((n, answer, entry)) or 0.25)
    assert rt.score_answer(r, " x ") == 0.25 and seen == [(name, "x", r.entry)]


def test_evaluate_generations_counts_only_full_scores():
    recs = rt.build_records("word_sorting", 4, seed=0)
    words = recs[1].entry["metadata"]["sorted_words"]
    replies = [recs[0].answer, ", ".join(reversed(words)), "", recs[3].answer]
    ev = rt.evaluate_generations(recs, replies)
    assert ev["exact_match"] == 0.5 and ev["n"] == 4
    assert 0.5 < ev["mean_score"] < 1.0  # the scorer's partial credit for the reordered list shows in the mean only


def test_unknown_generator_and_foreign_records_are_refused():
    with pytest.raises(ValueError, match="unknown reasoning-gym generator"):
        rt.build_records("no_such_generator", 4, seed=0)
    from fedsb.tasks.causal import PromptAnswer

    with pytest.raises(ValueError, match="ReasoningRecord"):
        rt.score_answer(PromptAnswer("q", "a"), "a")
