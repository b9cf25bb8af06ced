"""Rewards: math (math-verify), Countdown (parsed, never eval'd), Sudoku, the code sandbox, user rewards."""
import json
import os
import queue
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from bgpo.rewards import (RewardOutput, answer_candidates, code_reward, countdown_reward, evaluate_arithmetic,
                          extract_equation, final_answer, get_reward, math_reward, run_sandboxed, sudoku_reward)
from bgpo.rewards import math as math_module
from bgpo.rewards.base import last_boxed

FIXTURES = Path(__file__).parent / "fixtures" / "rewards"


def _fixture_records():
    sys.path.insert(0, str(FIXTURES))
    try:
        import make_fixtures
    finally:
        sys.path.remove(str(FIXTURES))
    return make_fixtures


def test_reward_fixtures_are_what_the_generator_writes():
    assert (FIXTURES / "rewards.jsonl").read_text() == _fixture_records().render()


@pytest.mark.parametrize("record", [json.loads(line) for line in (FIXTURES / "rewards.jsonl").read_text().splitlines()],
                         ids=lambda r: f"{r['task']}: {r['format']}")
def test_rewards_on_real_output_formats(record):
    out = get_reward(record["task"])(record["completion"], record["example"])
    assert out.score == pytest.approx(record["score"]), out.reason


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


def test_sudoku_copy_back_scores_zero():
    # Issue 13: the digits 1-4 were kept and the zeros dropped, shifting the given digits onto empty cells.
    example = {"puzzle": "0104000214003041", "solution": "2134431214233241"}
    assert sudoku_reward("<answer>1004000214003041</answer>", example).score == 0.0
    assert sudoku_reward(example["puzzle"], example).score == 0.0
    # A 0 is a wrong cell, not a skipped one: the cells after it keep their positions.
    assert sudoku_reward("0" + example["solution"][1:], example).score == pytest.approx(7 / 8)


@pytest.mark.parametrize("example, key", [
    ({"puzzle": "0104", "solution": "2134431214233241"}, "puzzle"),
    ({"puzzle": "0104000214003041", "solution": "2134431214233240"}, "solution"),
    ({"solution": "2134431214233241"}, "puzzle"),
])
def test_sudoku_bad_example_names_the_field(example, key):
    with pytest.raises(ValueError, match=f"example\\['{key}'\\]"):
        sudoku_reward("1234", example)


@pytest.mark.parametrize("completion, equation", [
    ("<answer>\\boxed{87 - 85 + 60}</answer>", "87 - 85 + 60"),
    ("<answer>\\boxed{(6 \\div 4) \\times 8 = 12}</answer>", "(6 / 4) * 8 "),
    ("<answer>$2 \\cdot \\frac{6}{3}$</answer>", "2 * ((6)/(3))"),
])
def test_countdown_unwraps_boxes_and_latex_operators(completion, equation):
    assert extract_equation(completion) == equation


def test_countdown_bad_example_names_the_field():
    with pytest.raises(ValueError, match="example\\['numbers'\\]"):
        countdown_reward("1 + 2", {"numbers": "1 2", "target": 3})
    with pytest.raises(ValueError, match="example\\['target'\\]"):
        countdown_reward("1 + 2", {"numbers": [1, 2], "target": "three"})


@pytest.mark.parametrize("target", [22.9, True, False, "22.9", None, [22]])
def test_countdown_target_is_never_truncated(target):
    # Regression: int(target) made 22.9 a 22 (3*5+7 scored 1.0) and True a 1.
    with pytest.raises(ValueError, match="example\\['target'\\]: expected an int"):
        countdown_reward("<answer>3*5+7</answer>", {"numbers": [3, 5, 7], "target": target})


@pytest.mark.parametrize("target", [22, 22.0, "22"])
def test_countdown_target_whole_values(target):
    assert countdown_reward("<answer>3*5+7</answer>", {"numbers": [3, 5, 7], "target": target}).score == 1.0


@pytest.mark.parametrize("text, boxed", [
    ("The answer is \\boxed 7. Check: 7 = x^{3}", "7"),   # the later { is not the box's (was: "3")
    ("\\boxed  {1}", "1"),                                # whitespace before the brace
    ("$\\boxed 42$", "42"),
    ("\\boxed 12, so", "12"),
    ("\\boxed $x^{2}$", None),                             # no token: nothing boxed
    ("\\boxed", None),
    ("\\boxedfoo{3}", None),                               # another control word
])
def test_last_boxed_reads_one_token_without_a_brace(text, boxed):
    assert last_boxed(text) == boxed


def test_boxed_without_a_brace_in_math_and_countdown():
    completion = "The answer is \\boxed 7. Check: 7 = x^{3}"
    assert math_reward(completion, {"answer": "7"}).score == 1.0
    assert math_reward(completion, {"answer": "3"}).score == 0.0
    assert extract_equation("<answer>\\boxed 1+2 {3*5+7}</answer>") == "1+2"


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
    assert final_answer("\\boxed{20") is None and final_answer("\\boxed{20", allow_unclosed=True) == "20"


@pytest.mark.parametrize("completion, candidates", [
    ("<answer>\\boxed{800 ml}</answer>", ["800 ml", "800"]),
    ("<answer>\\boxed{\\text{1,200 dollars}}</answer>", ["\\text{1,200 dollars}", "1200"]),
    ("<answer>\\boxed{2 x}</answer>", ["2 x"]),             # a single letter is no unit
    ("<answer>\\boxed{18 km/h}</answer>", ["18 km/h", "18"]),
    ("<answer>18 apples</answer>", ["18 apples", "18"]),
    ("<answer>18 apples were left over</answer>", ["18 apples were left over"]),  # a unit has two words at most
    ("\\boxed{3 dollars per hour}", ["3 dollars per hour", "3"]),
    ("\\boxed{9 square feet}", ["9 square feet", "9"]),
    ("\\boxed{800 \\text{m}}", ["800 \\text{m}", "800"]),
    ("\\boxed{12 or more}", ["12 or more"]),                 # a hedge is no unit
    ("\\boxed{12 or fewer apples}", ["12 or fewer apples"]),
    ("\\boxed{12 \\text{at least}}", ["12 \\text{at least}"]),
    ("<answer> 42 </answer>", ["42"]),
    ("\\boxed{3} <answer>\\boxed{5}</answer>", ["5"]),      # the answer tags win
    ("The result is 42.", []),                              # no box, no hashes, no tags: no answer
])
def test_math_answer_candidates(completion, candidates):
    assert answer_candidates(completion) == candidates


@pytest.mark.parametrize("completion", [
    "<answer>18 apples were left over in the small basket, so</answer>",  # took 17 s: the unit pattern backtracked
    "\\boxed{18 " + "a" * 40 + "!}",                                      # ... doubling with each letter
    "<answer>18" + " " * 20000 + "!</answer>",                              # quadratic whitespace runs
    "<answer>18 " + "word " * 4000 + ",</answer>",
])
def test_math_answer_candidates_take_linear_time(completion):
    """Regression: the answer's unit parse runs in the caller's thread, outside the checker's timeout."""
    start = time.perf_counter()
    assert answer_candidates(completion)[1:] == []  # none of them is a number with a unit
    assert time.perf_counter() - start < 0.1


def test_math_reward_is_thread_safe_and_bounded_in_time():
    # math-verify's own timeout (signal.alarm) raised in a thread; verify(5, 9^9^9^9) never ends.
    results = {}

    def score(name, completion, answer):
        results[name] = math_reward(completion, {"answer": answer}, timeout=3.0)

    threads = [threading.Thread(target=score, args=("right", "\\boxed{\\frac{1}{2}}", "0.5")),
               threading.Thread(target=score, args=("wrong", "<answer>3</answer>", "#### 4"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results["right"].score == 1.0 and results["wrong"].score == 0.0
    start = time.monotonic()
    slow = math_reward("<answer>\\boxed{9^{9^{9^{9}}}}</answer>", {"answer": "5"}, timeout=1.0)
    assert slow.score == 0.0 and "timeout" in slow.reason
    assert time.monotonic() - start < 30  # the bound, plus starting a fresh worker on a loaded CPU
    assert math_reward("\\boxed{5}", {"answer": "5"}).score == 1.0  # a new worker replaces the killed one


@pytest.mark.parametrize("completion", ["\\boxed{12 or more}", "\\boxed{12 is not the answer}",
                                        "\\boxed{12 or fewer apples}", "<answer>12, not less</answer>",
                                        "\\boxed{\\text{12 or more}}"])
def test_math_hedged_answers_score_zero(completion):
    # Regression: any words after the number were a "unit", and the bare 12 scored 1.0.
    out = math_reward(completion, {"answer": "#### 12"})
    assert out.score == 0.0 and "hedged" in out.reason


@pytest.mark.parametrize("answer", ["$" + " " * 20000 + "x", "\\text{" + " " * 20000 + "x}", "12 " + "or " * 20000])
def test_math_hedge_check_takes_linear_time(answer):
    start = time.perf_counter()
    math_module._hedged(answer)
    assert time.perf_counter() - start < 0.1


@pytest.mark.parametrize("completion", ["\\boxed{12 apples}", "\\boxed{12 km/h}", "\\boxed{12 dollars per hour}"])
def test_math_units_still_read_bare(completion):
    assert math_reward(completion, {"answer": "#### 12"}).score == 1.0


def test_math_worker_that_died_idle_is_replaced():
    example = {"answer": "#### 42"}
    assert math_reward("\\boxed{42}", example).score == 1.0
    worker = math_module._IDLE.get_nowait()
    worker.process.kill()  # e.g. the OOM killer, while the worker waits in the pool
    worker.process.wait()
    math_module._IDLE.put(worker)
    assert math_reward("\\boxed{42}", example) == RewardOutput(1.0)  # was 0, "timeout" after 0.00 s


def test_math_worker_dying_twice_says_so(tmp_path, monkeypatch):
    dies = tmp_path / "dies.py"  # says ready, then exits on its first request
    dies.write_text("import sys\nprint('\"ready\"', flush=True)\nsys.stdin.readline()\n")
    monkeypatch.setattr(math_module, "_WORKER_FILE", str(dies))
    monkeypatch.setattr(math_module, "_IDLE", queue.SimpleQueue())
    out = math_reward("\\boxed{42}", {"answer": "42"})
    assert out.score == 0.0 and "died" in out.reason and "timeout" not in out.reason


@pytest.mark.parametrize("answer", ["", "#### ", "\\boxed{}"])
def test_math_unparsable_reference_is_an_error(answer):
    # Regression: every answer scored 0 with an empty reason.
    with pytest.raises(ValueError, match="example\\['answer'\\]: could not parse"):
        math_reward("\\boxed{42}", {"answer": answer})


@pytest.mark.parametrize("timeout", [0, -1.0, float("inf"), float("nan"), "5", True])
def test_math_reward_timeout_is_checked(timeout):
    with pytest.raises(ValueError, match="timeout"):
        math_reward("\\boxed{5}", {"answer": "5"}, timeout=timeout)


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
        assert os.getcwd() == "/tmp" and os.environ["HOME"] == "/tmp"  # the sandbox's private tmpfs
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
