"""Tasks generated in-process from a seed, for Pilots trained from scratch: any number of rows, exact answers, and
test items that never appear in training (issue "When does a Copilot pay?").

Two kinds, chosen to make different errors:

- ``arithmetic``: ``a + b`` or ``a - b`` with operands of 1 to 4 digits, written digit by digit, most significant
  first. The first digit of a sum depends on every carry below it, so a small Pilot's errors are systematic and
  depend on the operands: the kind of error a Copilot reading the input could learn.
- ``sorting``: 4 to 7 words drawn from 512, to be written back in the vocabulary's order. Nothing like arithmetic:
  the answer is a permutation of the prompt, the errors are skipped, repeated or swapped words, and they are spread
  over hundreds of possible next tokens, so the vocabulary head's width limit (d ≪ |V|) is in play.

Both share one small :class:`Vocabulary` (no tokenizer to fetch). An :class:`Item` holds token ids: the prompt
(BOS first) and the answer (EOS excluded). Only torch-free standard library here, so the GPU edition of the regime
map runs with torch and transformers alone.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

WORDS = 512
SPECIALS = ("<pad>", "<bos>", "<eos>")
SYMBOLS = tuple("0123456789") + ("+", "-", "=", "sort", ":")


class Vocabulary:
    """Symbols ↔ token ids: the specials, digits and signs, then ``WORDS`` made-up words (``w000`` ...), whose id
    order is the order ``sorting`` asks for."""

    def __init__(self, words: int = WORDS):
        self.symbols = SPECIALS + SYMBOLS + tuple(f"w{i:03d}" for i in range(words))
        self.ids = {symbol: i for i, symbol in enumerate(self.symbols)}
        self.pad_token_id, self.bos_token_id, self.eos_token_id = (self.ids[s] for s in SPECIALS)
        self.first_word = len(SPECIALS) + len(SYMBOLS)

    def __len__(self) -> int:
        return len(self.symbols)

    def encode(self, symbols) -> tuple[int, ...]:
        return tuple(self.ids[symbol] for symbol in symbols)

    def decode(self, ids) -> str:
        return " ".join(self.symbols[i] for i in ids)


VOCABULARY = Vocabulary()


@dataclass(frozen=True)
class Item:
    """One question: ``prompt`` ids (BOS first) and the exact ``answer`` ids the Pilot must write before EOS."""

    prompt: tuple[int, ...]
    answer: tuple[int, ...]

    def __str__(self) -> str:
        return f"{VOCABULARY.decode(self.prompt[1:])} {VOCABULARY.decode(self.answer)}"


def _digits(number: int) -> list[str]:
    return list(str(number))


def arithmetic_item(rng: random.Random) -> Item:
    """``a + b =`` or ``a - b =`` (each operand 1-4 digits, lengths drawn uniformly); the answer may be negative."""
    a, b = (rng.randrange(10 ** (rng.randint(1, 4))) for _ in range(2))
    plus = rng.random() < 0.5
    result = a + b if plus else a - b
    prompt = ["<bos>", *_digits(a), "+" if plus else "-", *_digits(b), "="]
    return Item(VOCABULARY.encode(prompt), VOCABULARY.encode(["-", *_digits(-result)] if result < 0
                                                             else _digits(result)))


def sorting_item(rng: random.Random) -> Item:
    """``sort w.. w.. :`` with 4-7 distinct words; the answer is the same words in vocabulary order."""
    words = rng.sample(range(WORDS), rng.randint(4, 7))
    first = VOCABULARY.first_word
    prompt = (VOCABULARY.bos_token_id, VOCABULARY.ids["sort"], *(first + w for w in words), VOCABULARY.ids[":"])
    return Item(prompt, tuple(first + w for w in sorted(words)))


TASKS: dict[str, Callable[[random.Random], Item]] = {"arithmetic": arithmetic_item, "sorting": sorting_item}


@dataclass(frozen=True)
class Splits:
    train: list[Item]
    validation: list[Item]
    test: list[Item]


def unique_items(task: str, seed: int = 0) -> Iterator[Item]:
    """The task's items in a fixed order for ``seed``, each prompt once."""
    if task not in TASKS:
        raise ValueError(f"Unknown generated task {task!r}; choose among {sorted(TASKS)}.")
    rng, seen = random.Random(f"{task}-{seed}"), set()
    while True:
        item = TASKS[task](rng)
        if item.prompt not in seen:
            seen.add(item.prompt)
            yield item


def make_splits(task: str, train_rows: int, validation_rows: int, test_rows: int, seed: int = 0) -> Splits:
    """Disjoint splits drawn from one stream of distinct prompts: test first, validation next, then training. For
    fixed evaluation sizes, a smaller training set is a prefix of a larger one, so data sizes are nested."""
    stream = unique_items(task, seed)
    test = [next(stream) for _ in range(test_rows)]
    validation = [next(stream) for _ in range(validation_rows)]
    return Splits([next(stream) for _ in range(train_rows)], validation, test)
