"""Rule-based rewards for GRPO and a small-number arithmetic task with a checker.

A reward function is any Python callable `fn(completion: str, example: dict) -> float`, where
`example` is the prompt's data record (it holds `answer` and any other field of the JSONL line).
DeepSeek-R1 (arXiv 2501.12948, Sec. 2.2.2) trains with two rule-based rewards, both here:
  * accuracy: the final answer is extracted and checked against the reference;
  * format: the output puts its reasoning in `<think>...</think>` followed by
    `<answer>...</answer>`.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Mapping, Sequence

import numpy as np

RewardFn = Callable[[str, dict], float]

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_FORMAT = re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.DOTALL)


def extract_answer(completion: str) -> str:
    """The text of the last `<answer>...</answer>`, or the whole completion when it has none."""
    found = _ANSWER.findall(completion)
    return (found[-1] if found else completion).strip()


def _as_number(text: str) -> float | None:
    try:
        value = float(text.replace(",", ""))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def answers_match(given: str, reference: str) -> bool:
    """Numeric equality when both parse as numbers, else equality up to surrounding and repeated
    whitespace."""
    a, b = _as_number(given), _as_number(reference)
    if a is not None and b is not None:
        return a == b
    return " ".join(given.split()) == " ".join(reference.split())


def accuracy_reward(completion: str, example: dict) -> float:
    """1.0 when the extracted answer matches `example["answer"]`, else 0.0."""
    if "answer" not in example:
        raise KeyError(
            f"accuracy_reward needs an 'answer' field; the example has {sorted(example)}"
        )
    return float(answers_match(extract_answer(completion), str(example["answer"])))


def format_reward(completion: str, example: dict | None = None) -> float:
    """1.0 for exactly `<think>...</think><answer>...</answer>` (whitespace around), else 0.0."""
    return float(_FORMAT.fullmatch(completion) is not None)


def score(
    completions: Sequence[str],
    examples: Sequence[dict],
    reward_fns: Mapping[str, RewardFn],
    weights: Mapping[str, float] | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Applies every reward function to every completion.

    Args:
      completions: N decoded completions.
      examples: N data records (the prompt's record, repeated for each of its completions).
      reward_fns: name -> callable.
      weights: name -> weight of that reward in the total (default 1 each).
    Returns:
      (total [N] float32 = sum of weighted rewards, {name: [N] float32}).
    Raises:
      ValueError: lengths differ, a weight names no function, or a function returns something
        that is not a finite number (the message names the function and the completion index).
    """
    if len(completions) != len(examples):
        raise ValueError(f"{len(completions)} completions but {len(examples)} examples")
    if not reward_fns:
        raise ValueError("reward_fns is empty")
    weights = dict(weights or {})
    unknown = set(weights) - set(reward_fns)
    if unknown:
        raise ValueError(f"weights name unknown reward functions {sorted(unknown)}")
    per_fn = {}
    for name, fn in reward_fns.items():
        values = np.zeros(len(completions), np.float32)
        for i, (c, ex) in enumerate(zip(completions, examples, strict=True)):
            v = fn(c, ex)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise ValueError(f"reward {name!r} returned {v!r} for completion {i}; want a float")
            values[i] = v
        per_fn[name] = values
    total = sum(weights.get(name, 1.0) * v for name, v in per_fn.items())
    return np.asarray(total, np.float32), per_fn


# ---- the arithmetic task ----------------------------------------------------------------------
def arithmetic_problem(rng: random.Random, *, max_operand: int = 9, ops: str = "+-") -> dict:
    """One problem `{"prompt": "What is 3 + 5?", "answer": "8", "a": 3, "b": 5, "op": "+"}`."""
    a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
    op = rng.choice(ops)
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return {"prompt": f"What is {a} {op} {b}?", "answer": str(value), "a": a, "b": b, "op": op}


def arithmetic_problems(
    n: int, *, seed: int = 0, max_operand: int = 9, ops: str = "+-"
) -> list[dict]:
    """n seeded problems (see `arithmetic_problem`); `ops` is a subset of "+-*"."""
    if not ops or set(ops) - set("+-*"):
        raise ValueError(f"ops={ops!r} must be a non-empty subset of '+-*'")
    if max_operand < 0:
        raise ValueError(f"max_operand={max_operand} must be >= 0")
    rng = random.Random(seed)
    return [arithmetic_problem(rng, max_operand=max_operand, ops=ops) for _ in range(n)]


def arithmetic_solution(problem: dict) -> str:
    """A correct R1-format completion: `<think>a op b = c</think><answer>c</answer>`."""
    a, b, op, ans = problem["a"], problem["b"], problem["op"], problem["answer"]
    return f"<think>{a} {op} {b} = {ans}</think><answer>{ans}</answer>"
