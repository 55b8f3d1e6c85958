"""Built-in verifiable tasks, generated deterministically from a seed.

Train and held-out ("test") splits are disjoint by construction: every candidate problem
is assigned to a split by a hash of its content key (the arithmetic expression, the
reasoning-gym question), never by the seed. The same problem therefore always lands in
the same split, whatever the seed or the number of rows asked for.

- `arithmetic_rows`: short word problems with `\\boxed{}` answers and a worked solution for SFT.
- `reasoning_gym_rows`: any reasoning-gym dataset, scored later by its own `score_answer`.
- `preference_rows`: synthetic chosen/rejected pairs that follow a hidden rule
  (`hidden_rule_score`), for the reward-model leg.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ArithmeticDifficulty",
    "DIFFICULTIES",
    "HELDOUT_FRACTION",
    "parse_difficulty",
    "arithmetic_rows",
    "reasoning_gym_rows",
    "preference_rows",
    "hidden_rule_score",
    "builtin_rows",
    "in_heldout",
]

HELDOUT_FRACTION = 0.1
_SPLIT_ALIASES = {"train": "train", "test": "test", "heldout": "test", "held_out": "test", "eval": "test",
                  "validation": "test"}


def _split(split: str) -> str:
    try:
        return _SPLIT_ALIASES[split]
    except KeyError:
        raise ValueError(f"unknown split {split!r}; use 'train' or 'test' (aliases: heldout, eval)") from None


def in_heldout(key: str, fraction: float = HELDOUT_FRACTION) -> bool:
    """Whether the problem with content `key` belongs to the held-out split (stable across runs)."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return h < fraction * 2**64


def _collect(draw, n: int, split: str, fraction: float, what: str, max_draws: int) -> list[dict]:
    """Draw `(key, row)` candidates until `n` distinct rows of `split` are found."""
    want_test = _split(split) == "test"
    rows: list[dict] = []
    seen: set[str] = set()
    for _ in range(max_draws):
        key, row = draw()
        if in_heldout(key, fraction) != want_test or row["prompt"] in seen:
            continue
        seen.add(row["prompt"])
        rows.append(row)
        if len(rows) == n:
            return rows
    raise ValueError(f"could only generate {len(rows)} distinct {what} rows for split {split!r} (asked for {n}) "
                     f"in {max_draws} draws; ask for fewer rows or a larger problem space")


# ---- arithmetic word problems ---------------------------------------------------------------


@dataclass(frozen=True)
class ArithmeticDifficulty:
    """Problem shape: operand count range, operand digit-count range, allowed operations.

    `*` multiplies by a single digit 2-9 (whatever `digits` says) so answers stay small;
    `-` never takes more than there is, so every answer is a non-negative integer.
    """

    operands: tuple[int, int] = (2, 2)
    digits: tuple[int, int] = (1, 2)
    ops: str = "+-"

    def __post_init__(self) -> None:
        lo, hi = self.operands
        if not 2 <= lo <= hi:
            raise ValueError(f"operands must be a range (lo, hi) with 2 <= lo <= hi, got {self.operands}")
        lo, hi = self.digits
        if not 1 <= lo <= hi <= 9:
            raise ValueError(f"digits must be a range (lo, hi) with 1 <= lo <= hi <= 9, got {self.digits}")
        if not self.ops or set(self.ops) - set("+-*"):
            raise ValueError(f"ops must be a non-empty combination of '+', '-', '*', got {self.ops!r}")


DIFFICULTIES = {
    "tiny": ArithmeticDifficulty((2, 2), (1, 1), "+"),
    "easy": ArithmeticDifficulty((2, 2), (1, 2), "+-"),
    "medium": ArithmeticDifficulty((2, 3), (1, 2), "+-*"),
    "hard": ArithmeticDifficulty((3, 4), (2, 3), "+-*"),
}


def _range(text: str, name: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in text.split("-")]
    except ValueError:
        raise ValueError(f"arithmetic {name}={text!r}: expected N or LO-HI") from None
    if len(parts) not in (1, 2):
        raise ValueError(f"arithmetic {name}={text!r}: expected N or LO-HI")
    return (parts[0], parts[-1])


def parse_difficulty(text: str | ArithmeticDifficulty | None) -> ArithmeticDifficulty:
    """A level name (tiny, easy, medium, hard) or `operands=2-3,digits=1-2,ops=+-*`."""
    if isinstance(text, ArithmeticDifficulty):
        return text
    if not text:
        return DIFFICULTIES["easy"]
    if text in DIFFICULTIES:
        return DIFFICULTIES[text]
    if "=" not in text:
        raise ValueError(f"unknown arithmetic difficulty {text!r}; use one of {sorted(DIFFICULTIES)} "
                         "or 'operands=2-3,digits=1-2,ops=+-*'")
    fields: dict[str, Any] = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        key = key.strip()
        if key in ("operands", "digits"):
            fields[key] = _range(value.strip(), key)
        elif key == "ops":
            fields[key] = value.strip()
        else:
            raise ValueError(f"unknown arithmetic difficulty key {key!r}; use operands, digits, ops")
    return ArithmeticDifficulty(**fields)


_NAMES = [("Tom", "he"), ("Ann", "she"), ("Sam", "he"), ("Mia", "she"), ("Ben", "he"), ("Lily", "she")]
_ITEMS = ["apples", "books", "coins", "cards", "pens", "stickers"]
_STEP_TEXT = {
    "+": ["{P} buys {b} more.", "{P} finds {b} more.", "{P} gets {b} more."],
    "-": ["{P} gives away {b}.", "{P} loses {b}.", "{P} sells {b}."],
    "*": ["Then {p} has {b} times as many."],
}


def _number(rng: random.Random, digits: tuple[int, int]) -> int:
    d = rng.randint(*digits)
    return rng.randint(10 ** (d - 1), 10**d - 1)


def _draw_arithmetic(rng: random.Random, diff: ArithmeticDifficulty, level: str) -> tuple[str, dict]:
    value = _number(rng, diff.digits)
    name, pronoun = rng.choice(_NAMES)
    item = rng.choice(_ITEMS)
    sentences = [f"{name} has {value} {item}."]
    expression, steps = str(value), []
    for _ in range(rng.randint(*diff.operands) - 1):
        op = rng.choice(diff.ops)
        b = rng.randint(2, 9) if op == "*" else _number(rng, diff.digits)
        if op == "-" and b > value:
            if value == 0:
                op = "+"
            else:
                b = rng.randint(1, value)
        new = value + b if op == "+" else value - b if op == "-" else value * b
        sentences.append(rng.choice(_STEP_TEXT[op]).format(P=pronoun.capitalize(), p=pronoun, b=b))
        steps.append(f"{value} {op} {b} = {new}.")
        expression += f" {op} {b}"
        value = new
    sentences.append(f"How many {item} does {pronoun} have now?")
    answer = str(value)
    solution = " ".join(steps + [f"The final answer is $\\boxed{{{answer}}}$."])
    row = {"prompt": " ".join(sentences), "answer": answer, "task": "arithmetic", "solution": solution,
           "difficulty": level}
    return expression, row


def arithmetic_rows(n: int, seed: int, split: str = "train", difficulty: str | ArithmeticDifficulty = "easy",
                    heldout_fraction: float = HELDOUT_FRACTION) -> list[dict]:
    """`n` distinct arithmetic word problems of one split, e.g.

    prompt "Tom has 12 apples. He buys 7 more. How many apples does he have now?",
    answer "19", solution "12 + 7 = 19. The final answer is $\\boxed{19}$.".
    Held-out problems use arithmetic expressions never seen in training.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    diff = parse_difficulty(difficulty)
    if isinstance(difficulty, str) and difficulty:
        level = difficulty
    else:
        level = next((k for k, v in DIFFICULTIES.items() if v == diff),
                     f"operands={diff.operands[0]}-{diff.operands[1]},digits={diff.digits[0]}-{diff.digits[1]},"
                     f"ops={diff.ops}")
    # One stream for both splits: the hash, not the seed, decides the split.
    rng = random.Random(f"bridgerl/arithmetic/{seed}")
    return _collect(lambda: _draw_arithmetic(rng, diff, level), n, split, heldout_fraction, "arithmetic",
                    max_draws=200 * n + 10_000)


# ---- reasoning-gym --------------------------------------------------------------------------

RG_INSTRUCTION = "\nPut your final answer in \\boxed{}."


def reasoning_gym_rows(name: str, n: int, seed: int, split: str = "train",
                       heldout_fraction: float = HELDOUT_FRACTION, instruction: str = RG_INSTRUCTION,
                       **config: Any) -> list[dict]:
    """`n` rows of reasoning-gym dataset `name`: prompt, answer, task `rg:<name>` and the
    `entry` that `rewards.reasoning_gym.reasoning_gym_reward` scores with. `config` goes to the
    dataset's config (e.g. `min_terms=2`)."""
    try:
        import reasoning_gym
    except ImportError as exc:
        raise ImportError(f"task 'rg:{name}' needs the reasoning_gym package: pip install reasoning-gym "
                          "(or pip install 'bridgerl[tasks]')") from exc
    if name not in reasoning_gym.factory.DATASETS:
        raise ValueError(f"unknown reasoning-gym dataset {name!r}; known: {sorted(reasoning_gym.factory.DATASETS)}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    share = heldout_fraction if _split(split) == "test" else 1 - heldout_fraction
    chunk = int(2 * n / max(share, 1e-3)) + 100

    def items():
        for c in range(20):  # fresh chunks (new seeds) if one runs short of distinct questions
            ds = reasoning_gym.create_dataset(name, seed=(seed + c * 1_000_003) % 2**32, size=chunk, **config)
            for idx in range(chunk):
                yield ds[idx]
        while True:
            yield None

    stream = items()

    def draw() -> tuple[str, dict]:
        entry = next(stream)
        if entry is None:
            raise ValueError(f"reasoning-gym {name!r} ran out of distinct questions for {n} {split} rows")
        row = {"prompt": entry["question"] + instruction, "answer": str(entry["answer"]), "task": f"rg:{name}",
               "entry": entry}
        return entry["question"], row

    return _collect(draw, n, split, heldout_fraction, f"rg:{name}", max_draws=20 * chunk)


# ---- synthetic preferences with a hidden rule -----------------------------------------------

PREFERENCE_KEYWORD = "thanks"
_FILLERS = ["okay", "well", "so", "hmm"]
_TOPICS = {
    "color": ["red", "blue", "green", "pink"],
    "fruit": ["apple", "pear", "plum", "lime"],
    "animal": ["cat", "dog", "bird", "fish"],
    "drink": ["tea", "milk", "juice", "water"],
    "season": ["spring", "summer", "fall", "winter"],
    "sport": ["golf", "chess", "tennis", "soccer"],
}
_PROMPTS = ["What is your favorite {t}?", "Name a {t} you like.", "Which {t} do you like?"]
_ANSWERS = ["i like {x}.", "my favorite {t} is {x}.", "{x} is a nice {t}."]


def hidden_rule_score(completion: str) -> float:
    """The rule behind `preference_rows`: 1.0 if the reply says "thanks", else 0.0."""
    return 1.0 if re.search(rf"\b{PREFERENCE_KEYWORD}\b", completion, re.IGNORECASE) else 0.0


def _draw_preference(rng: random.Random) -> tuple[str, dict]:
    topic = rng.choice(sorted(_TOPICS))
    x = rng.choice(_TOPICS[topic])
    prompt = rng.choice(_PROMPTS).format(t=topic)
    base = rng.choice(_ANSWERS).format(t=topic, x=x)
    filler = rng.choice(_FILLERS)
    # Same place, one word each: the keyword is the only difference, so neither length nor
    # position can stand in for the rule.
    if rng.random() < 0.5:
        chosen, rejected = f"{PREFERENCE_KEYWORD}, {base}", f"{filler}, {base}"
    else:
        chosen, rejected = f"{base} {PREFERENCE_KEYWORD}.", f"{base} {filler}."
    row = {"prompt": prompt, "chosen": chosen, "rejected": rejected, "task": "preference"}
    return f"{prompt}|{base}", row


def preference_rows(n: int, seed: int, split: str = "train",
                    heldout_fraction: float = HELDOUT_FRACTION) -> list[dict]:
    """`n` preference rows `{prompt, chosen, rejected, task: "preference"}` whose chosen reply
    says "thanks" and whose rejected reply says a neutral filler word in its place.

    The rule is one token a tiny reward model or policy learns within tens of steps;
    `hidden_rule_score` checks it. Pairs repeat once the small space (~1.7k) is used up.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = random.Random(f"bridgerl/preference/{seed}")
    want_test = _split(split) == "test"
    rows = []
    while len(rows) < n:
        key, row = _draw_preference(rng)
        if in_heldout(key, heldout_fraction) == want_test:
            rows.append(row)
    return rows


# ---- registry -------------------------------------------------------------------------------


def _rg_config(text: str) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"reasoning-gym option {part!r}: expected key=value")
        try:
            config[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            config[key.strip()] = value.strip()
    return config


def builtin_rows(spec: str, n: int, seed: int, split: str = "train") -> list[dict]:
    """Rows of a built-in task: `arithmetic`, `arithmetic:<level or key=value,...>`,
    `rg:<name>` or `rg:<name>:<key=value,...>`, or `preference`."""
    name, _, arg = spec.partition(":")
    if name == "arithmetic":
        return arithmetic_rows(n, seed, split, difficulty=arg or "easy")
    if name == "rg":
        dataset, _, options = arg.partition(":")
        if not dataset:
            raise ValueError("rg task needs a dataset name, e.g. 'rg:basic_arithmetic'")
        return reasoning_gym_rows(dataset, n, seed, split, **_rg_config(options))
    if name == "preference":
        return preference_rows(n, seed, split)
    raise ValueError(f"unknown built-in task {spec!r}; use 'arithmetic', 'arithmetic:<tiny|easy|medium|hard>', "
                     "'rg:<reasoning-gym dataset>' or 'preference'")


def rows_from(source: str, n: int, seed: int, split: str = "train", load=None, **load_kwargs) -> list[dict]:
    """`builtin:<task>` → n generated rows of its `split`; anything else → `load(source)` (default
    `formats.load_rows`: a JSONL/JSON/CSV/Parquet file, a `datasets` folder or a hub id)."""
    if source.startswith("builtin:"):
        return builtin_rows(source.removeprefix("builtin:"), n, seed, split)
    if load is None:
        from .formats import load_rows as load
    return load(source, **load_kwargs)
