"""Short-answer reasoning-gym generators as seeded prompt/answer records, scored by each generator's own scorer."""

# A task is a registered reasoning-gym generator at a small difficulty (``TASKS``: config overrides) plus a format
# instruction appended to its question ("Answer with only the number."), so that a correct reply is the bare answer
# and exact match means ``score_answer(reply, entry) == 1.0``. Records are seeded and distinct: a small difficulty
# repeats questions, so duplicates are skipped and a train/held-out split by index never shares a prompt.
# reasoning-gym draws item i of seed s from Random(s + i): datasets of seeds s and s + 1 overlap almost entirely,
# so split one record list, never two adjacent seeds. Flower-free; reasoning-gym is imported lazily.

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from fedsb.extras import require
from fedsb.tasks.causal import PromptAnswer

NUMBER = "Answer with only the number."


@dataclass(frozen=True)
class TaskSpec:
    config: dict[str, Any]  # overrides of the generator's config (difficulty)
    instruction: str  # appended to the question: the answer format
    max_new_tokens: int = 16  # enough for a correct answer plus its end-of-turn token
    generator: str = ""  # the reasoning-gym generator, when the task's name is not one (a variant's difficulty)
    num_examples: int = 2000  # what num-examples=0 means: all distinct questions for a small generator


TASKS: dict[str, TaskSpec] = {
    "chain_sum": TaskSpec(dict(min_terms=2, max_terms=2, min_digits=1, max_digits=2), NUMBER, 8),
    # one-digit sums and differences: the 200 distinct problems SmolLM2-135M can learn to answer bare (measured,
    # BENCHMARKS.md); with two digits (chain_sum) it learns the format but not the arithmetic in a few rounds
    "digit_sum": TaskSpec(dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1), NUMBER, 6, "chain_sum", 200),
    "basic_arithmetic": TaskSpec(dict(min_terms=2, max_terms=3, min_digits=1, max_digits=2, operators=("+", "-", "*"),
                                      allow_parentheses=False, allow_negation=False), NUMBER, 8),
    "products": TaskSpec(dict(min_terms=2, max_terms=2, min_digits=1, max_digits=2), NUMBER, 8),
    "gcd": TaskSpec(dict(min_numbers=2, max_numbers=2, min_value=1, max_value=50), NUMBER, 8),
    "lcm": TaskSpec(dict(min_numbers=2, max_numbers=2, min_value=1, max_value=20), NUMBER, 8),
    "leg_counting": TaskSpec(dict(min_animals=1, max_animals=2, min_instances=1, max_instances=3), NUMBER, 8),
    "letter_counting": TaskSpec(dict(min_words=3, max_words=5), NUMBER, 8),
    "count_bits": TaskSpec(dict(min_n=1, max_n=1023), NUMBER, 8),
    "spell_backward": TaskSpec(dict(min_word_len=3, max_word_len=6), "Answer with only the reversed word.", 12),
    "word_sequence_reversal": TaskSpec(dict(min_words=3, max_words=4), "Answer with only the reversed list.", 24),
    "word_sorting": TaskSpec(dict(min_words=3, max_words=4, min_word_length=3, max_word_length=8),
                             "Answer with only the sorted list.", 32),
    "number_sorting": TaskSpec(dict(min_numbers=3, max_numbers=4, min_decimals=0, max_decimals=0, min_value=0.0,
                                    max_value=99.0), "Answer with only the list.", 32),
}
DEFAULT_TASK = "digit_sum"


@dataclass
class ReasoningRecord(PromptAnswer):
    """A prompt/answer record that keeps the generator's item, which its scorer needs (``metadata``)."""

    task: str = ""
    entry: dict[str, Any] = field(default_factory=dict, repr=False)


def spec_for(name: str) -> TaskSpec:
    if name in TASKS:
        return TASKS[name]
    DATASETS = require("reasoning_gym.factory", "the reasoning-gym tasks", "llm-task").DATASETS

    if name not in DATASETS:
        raise ValueError(f"unknown reasoning-gym generator {name!r}; tuned ones: {', '.join(sorted(TASKS))}")
    return TaskSpec({}, "Answer with only the final answer.")  # any other generator: its default difficulty


def make_dataset(name: str, size: int, seed: int, **overrides):
    """The seeded reasoning-gym dataset of a task (its small-difficulty config, updated by ``overrides``)."""
    reasoning_gym = require("reasoning_gym", "the reasoning-gym tasks", "llm-task")
    spec = spec_for(name)
    return reasoning_gym.create_dataset(spec.generator or name, size=size, seed=seed, **{**spec.config, **overrides})


def format_question(question: str, instruction: str) -> str:
    q = question.rstrip()
    return f"{q}\n{instruction}" if instruction else q


def build_records(name: str, num_examples: int, seed: int, instruction: str | None = None, unique: bool = True,
                  **overrides) -> list[ReasoningRecord]:
    """``num_examples`` records of generator ``name`` (seeded): prompt = question + format instruction.

    ``unique`` skips repeated questions (drawing further items instead); raises if the generator cannot
    produce that many distinct ones within 20× as many draws.
    """
    if num_examples <= 0:
        return []
    instr = spec_for(name).instruction if instruction is None else instruction
    pool = max(4 * num_examples, 64) if unique else num_examples
    out: list[ReasoningRecord] = []
    seen: set[str] = set()
    while True:
        ds = make_dataset(name, pool, seed, **overrides)
        out, seen = [], set()
        for i in range(pool):
            x = ds[i]
            if unique and x["question"] in seen:
                continue
            seen.add(x["question"])
            out.append(ReasoningRecord(format_question(x["question"], instr), str(x["answer"]), str(x["answer"]),
                                       task=name, entry=x))
            if len(out) == num_examples:
                return out
        if pool >= 20 * num_examples:
            raise ValueError(f"{name}: only {len(out)} distinct questions in {pool} draws (asked for {num_examples}); "
                             "raise the difficulty or ask for fewer")
        pool *= 2  # items depend on (seed, index) only: a larger pool extends the same sequence


@lru_cache(maxsize=32)
def _scorer(name: str):
    # Scorers read only the answer and the entry (its metadata), not the dataset's config or items.
    return make_dataset(name, 1, 0).score_answer


def clean_reply(text: str) -> str:
    """The generated reply as the scorer should see it: surrounding whitespace removed, nothing else."""
    return text.strip()


def score_answer(record: ReasoningRecord, generated: str) -> float:
    """The generator's own score of a generated reply (1.0 = exact; some scorers give partial credit)."""
    if not getattr(record, "task", "") or not getattr(record, "entry", None):
        raise ValueError("score_answer needs a ReasoningRecord (with task and entry) from build_records")
    return float(_scorer(record.task)(clean_reply(generated), record.entry))


def exact_match(record: ReasoningRecord, generated: str) -> bool:
    return score_answer(record, generated) == 1.0


def evaluate_generations(records: list[ReasoningRecord], generated: list[str]) -> dict[str, float]:
    """Exact match (score == 1) and mean score over paired records and generated replies."""
    if len(records) != len(generated):
        raise ValueError(f"{len(records)} records but {len(generated)} replies")
    if not records:
        return {"exact_match": float("nan"), "mean_score": float("nan"), "n": 0}
    scores = [score_answer(r, g) for r, g in zip(records, generated)]
    return {"exact_match": sum(s == 1.0 for s in scores) / len(scores), "mean_score": sum(scores) / len(scores),
            "n": len(scores)}
