"""Rewards: R1 accuracy and format rules, scoring any callables, the arithmetic task."""

import numpy as np
import pytest

from deepseek_jax.rewards import (
    accuracy_reward,
    answers_match,
    arithmetic_problems,
    arithmetic_solution,
    extract_answer,
    format_reward,
    score,
)


@pytest.mark.parametrize(
    "completion, reward",
    [
        ("<think>2 + 2 = 4</think><answer>4</answer>", 1.0),
        ("  <think>\nmulti\nline</think>\n<answer> x </answer>\n", 1.0),
        ("<answer>4</answer>", 0.0),  # no reasoning
        ("<think>t</think>", 0.0),  # no answer
        ("<answer>4</answer><think>t</think>", 0.0),  # wrong order
        ("<think>t</think><answer>4</answer> trailing", 0.0),
        ("4", 0.0),
    ],
)
def test_format_reward(completion, reward):
    assert format_reward(completion, {}) == reward


def test_accuracy_reward_and_extraction():
    ex = {"answer": "-4"}
    assert accuracy_reward("<think>5 - 9 = -4</think><answer>-4</answer>", ex) == 1.0
    assert accuracy_reward("<think>...</think><answer> -4.0 </answer>", ex) == 1.0  # numeric
    assert accuracy_reward("<think>5 - 9 = -4</think><answer>4</answer>", ex) == 0.0
    assert accuracy_reward("-4", ex) == 1.0  # no tags: the whole completion is the answer
    assert accuracy_reward("<answer>1</answer> then <answer>-4</answer>", ex) == 1.0  # the last
    assert extract_answer("no tags  ") == "no tags"
    assert answers_match("Paris  France", "Paris France") and not answers_match("4", "four")
    with pytest.raises(KeyError, match="needs an 'answer' field"):
        accuracy_reward("4", {"prompt": "q"})


def test_score_any_callable_weights_and_errors():
    comps = ["<think>a</think><answer>3</answer>", "3", "<think>b</think><answer>2</answer>"]
    exs = [{"answer": "3"}] * 3
    fns = {"accuracy": accuracy_reward, "format": format_reward, "short": lambda c, e: -len(c)}
    total, per = score(comps, exs, fns, weights={"format": 0.5, "short": 0.0})
    np.testing.assert_array_equal(per["accuracy"], [1, 1, 0])
    np.testing.assert_array_equal(per["format"], [1, 0, 1])
    np.testing.assert_array_equal(per["short"], [-len(c) for c in comps])
    np.testing.assert_allclose(total, [1.5, 1.0, 0.5])
    with pytest.raises(ValueError, match="reward 'bad' returned nan for completion 0"):
        score(comps, exs, {"bad": lambda c, e: float("nan")})
    with pytest.raises(ValueError, match="reward 'bad' returned None"):
        score(comps, exs, {"bad": lambda c, e: None})
    with pytest.raises(ValueError, match="unknown reward functions \\['acc'\\]"):
        score(comps, exs, fns, weights={"acc": 1.0})
    with pytest.raises(ValueError, match="3 completions but 2 examples"):
        score(comps, exs[:2], fns)


def test_arithmetic_task_generator_and_checker():
    probs = arithmetic_problems(200, seed=0, max_operand=9, ops="+-*")
    assert probs == arithmetic_problems(200, seed=0, max_operand=9, ops="+-*")  # seeded
    assert probs != arithmetic_problems(200, seed=1, max_operand=9, ops="+-*")
    assert {p["op"] for p in probs} == {"+", "-", "*"}
    for p in probs:
        a, b = p["a"], p["b"]
        assert 0 <= a <= 9 and 0 <= b <= 9
        assert p["prompt"] == f"What is {a} {p['op']} {b}?"
        assert int(p["answer"]) == eval(f"{a} {p['op']} {b}")  # noqa: S307 - digits only
        sol = arithmetic_solution(p)
        assert accuracy_reward(sol, p) == 1.0 and format_reward(sol, p) == 1.0
        wrong = sol.replace(f"<answer>{p['answer']}<", f"<answer>{int(p['answer']) + 1}<")
        assert accuracy_reward(wrong, p) == 0.0
    with pytest.raises(ValueError, match="ops='/'"):
        arithmetic_problems(3, ops="/")
