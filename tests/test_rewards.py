"""Rewards: math (math-verify), Countdown (parsed, never eval'd), Sudoku, the code sandbox, user rewards."""
import os
import textwrap

import pytest

from bgpo.rewards import (RewardOutput, code_reward, countdown_reward, evaluate_arithmetic, final_answer,
                          get_reward, math_reward, run_sandboxed, sudoku_reward)


@pytest.mark.parametrize("completion, score", [
    ("<answer>(3 + 5) * 2</answer>", 1.0),
    ("2*(5+3)", 1.0),
    ("5*3+2 = 17", 0.1),            # well-formed, other value
    ("(3 + 5) * 3", 0.1),           # well-formed, other numbers
    ("3 + 5", 0.1),                 # a number missing
    ("16", 0.1),
    ("sixteen", 0.0),
    ("__import__('os').system('echo pwned')", 0.0),
    ("(3 + 5) ** 2", 0.0),          # only + - * / are arithmetic here
    ("3 / 0 + 5 * 2", 0.0),
])
def test_countdown_reward(completion, score):
    assert countdown_reward(completion, {"numbers": [2, 3, 5], "target": 16}).score == score


def test_countdown_division_is_exact_and_hub_field_names_work():
    assert countdown_reward("(6 / 4) * 8", {"nums": [4, 6, 8], "target": 12}).score == 1.0
    value, used = evaluate_arithmetic("7 / 3 * 3")
    assert value == 7 and used == [7, 3, 3]


def test_countdown_never_evaluates_code(tmp_path):
    marker = tmp_path / "ran"
    countdown_reward(f"open({str(marker)!r}, 'w')", {"numbers": [1], "target": 1})
    assert not marker.exists()


def test_sudoku_reward_counts_empty_cells_only():
    example = {"puzzle": "1030302001400302", "solution": "1234342121434312"}
    assert sudoku_reward("1234342121434312", example).score == 1.0
    assert sudoku_reward("<answer>1234 3421 2143 4312</answer>", example).score == 1.0
    assert all(p in "0" + s for p, s in zip(example["puzzle"], example["solution"]))
    wrong_given = "4234342121434312"  # a given cell is wrong: it is not scored
    assert sudoku_reward(wrong_given, example).score == 1.0
    empty = [i for i, c in enumerate(example["puzzle"]) if c == "0"]
    one_wrong = list(example["solution"])
    one_wrong[empty[0]] = "4" if one_wrong[empty[0]] != "4" else "1"
    assert sudoku_reward("".join(one_wrong), example).score == pytest.approx(1 - 1 / len(empty))
    partial = sudoku_reward("1234", example)
    assert partial.score == pytest.approx(2 / len(empty)) and partial.reason == "incomplete grid"


@pytest.mark.parametrize("completion, answer, score", [
    ("So she has 18 apples. #### 18", "She buys 3 bags ... #### 18", 1.0),
    ("The answer is \\boxed{18}.", "#### 18", 1.0),
    ("\\boxed{\\frac{1}{2}}", "\\boxed{0.5}", 1.0),
    ("\\boxed{3}", "#### 1,234", 0.0),
    ("\\boxed{1234}", "#### 1,234", 1.0),
    ("no idea", "#### 4", 0.0),
])
def test_math_reward(completion, answer, score):
    assert math_reward(completion, {"answer": answer}).score == score


def test_final_answer_takes_the_last_balanced_box():
    assert final_answer("\\boxed{1} then \\boxed{\\frac{a}{b}}") == "\\frac{a}{b}"


def test_code_reward_passes_and_fails_with_a_reason():
    example = {"test_list": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]}
    good = "Here:\n```python\ndef add(a, b):\n    return a + b\n```"
    assert code_reward(good, example) == RewardOutput(1.0)
    bad = code_reward("```python\ndef add(a, b):\n    return a - b\n```", example)
    assert bad.score == 0.0 and "AssertionError" in bad.reason
    broken = code_reward("```python\ndef add(a, b)\n    return a\n```", example)
    assert broken.score == 0.0 and "SyntaxError" in broken.reason


def test_code_reward_humaneval_style_prepends_the_signature():
    example = {"prompt": "def inc(x):\n", "entry_point": "inc",
               "test": "def check(f):\n    assert f(1) == 2\n"}
    assert code_reward("    return x + 1\n", example).score == 1.0


def test_sandbox_time_limit_and_no_secrets(monkeypatch):
    out = run_sandboxed("while True:\n    pass\n", time_limit=1.0)
    assert out.score == 0.0 and ("timeout" in out.reason or "SIGXCPU" in out.reason or "SIGKILL" in out.reason)
    monkeypatch.setenv("BGPO_TEST_SECRET", "hunter2")
    program = textwrap.dedent("""
        import os, sys
        assert "BGPO_TEST_SECRET" not in os.environ
        assert os.getcwd().split(os.sep)[-1].startswith("bgpo-sandbox-")
        assert sys.stdin.read() == ""
    """)
    assert run_sandboxed(program).score == 1.0


def test_sandbox_limits_memory_and_file_size():
    assert run_sandboxed("x = bytearray(4 << 30)\n").score == 0.0
    big = run_sandboxed("open('f', 'wb').write(b'x' * (8 << 20))\n")
    assert big.score == 0.0


def test_sandbox_workdir_is_removed():
    out = run_sandboxed("import os\nprint(os.getcwd())\nopen('left.txt', 'w').write('x')\n")
    assert out.score == 1.0
    assert not any(name.startswith("bgpo-sandbox-") and os.path.exists(os.path.join(d, name, "left.txt"))
                   for d in ("/tmp",) for name in os.listdir(d))


def test_user_reward_module_function(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def length_bonus(completion, example):\n    return len(completion) / example['scale']\n"
        "def with_reason(completion, example):\n    return 0.5, 'half'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert get_reward("my_rewards:length_bonus")("abcd", {"scale": 8}) == RewardOutput(0.5)
    assert get_reward("my_rewards:with_reason")("", {}) == RewardOutput(0.5, "half")
    with pytest.raises(ValueError, match="reward.function"):
        get_reward("my_rewards:missing")
    with pytest.raises(ValueError, match="reward.function"):
        get_reward("nonsense")


def test_non_finite_user_reward_is_an_error(tmp_path, monkeypatch):
    (tmp_path / "nan_reward.py").write_text("def f(c, e):\n    return float('nan')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="non-finite"):
        get_reward("nan_reward:f")("x", {})
