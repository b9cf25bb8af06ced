"""Attacks on the code sandbox: each tries to score a wrong solution, touch the host or outlive the reward.

The task is ``add(a, b) -> a + b``.  An attacking program is either wrong (``WRONG``, ``INTS_ONLY``: it can
only score by cheating) or solves the task only after an attack step that must fail (``... + RIGHT``: a
hole in that defence scores 1.0).  An attack succeeds if it scores 1.0 or leaves a trace on the host
(canary read or changed, a file written, a process alive, a host port reached).  Run in a thread pool like
the trainer does, with short limits.
"""
import ast
import os
import secrets
import socket
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import bgpo
from bgpo.rewards import code_reward, run_sandboxed
from bgpo.rewards._harness import (ProtocolError, _StrictCompare, decode, encode, strict_chain, strict_compare,
                                   strict_equal)
from bgpo.rewards.sandbox import Limits, require_sandbox, run_program, sandbox_problem

PROBLEM = sandbox_problem()
if PROBLEM is not None and os.environ.get("BGPO_REQUIRE_SANDBOX") == "1":  # CI: the attack suite must run
    raise pytest.UsageError(f"BGPO_REQUIRE_SANDBOX=1 but no working code sandbox here: {PROBLEM}")
needs_sandbox = pytest.mark.skipif(PROBLEM is not None, reason=f"no working code sandbox here: {PROBLEM}")

TESTS = ("assert add(1, 2) == 3\nassert add(-4, 9) == 5\nassert add(10, 0) == 10\n"
         "assert abs(add(0.5, 0.25) - 0.75) < 1e-9\n")
INTS_ONLY = "def add(a, b):\n    return a + b if type(a) is int else 0.0\n"  # wrong on floats
WRONG = "def add(a, b):\n    return a - b\n"
RIGHT = "def add(a, b):\n    return a + b\n"  # after an attack step that must fail
LIMITS = Limits(time=4.0, memory=512 << 20, file_size=1 << 20, disk=4 << 20, processes=8)
TOKEN = secrets.token_hex(8)  # marks this run's canaries, daemons and ports
CANARIES = {path: f"canary {TOKEN}" for path in (f"/tmp/bgpo-canary-{TOKEN}", f"/root/bgpo-canary-{TOKEN}")}
SECRET_ENV = f"BGPO_SECRET_{TOKEN}"
DAEMON = int(TOKEN, 16) % 10**6  # the fraction of the daemons' `sleep 30.N` marks them as this run's
SOURCE_CANARY = os.path.join(os.path.dirname(bgpo.__file__), f"pwned-{TOKEN}")


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PORT = _port()

ATTACKS = {
    # ---- passing without solving: exit tricks, equality tricks, reading or forging the verdict
    "sys.exit(0)": WRONG + "import sys\nsys.exit(0)\n",
    "os._exit(0)": WRONG + "import os\nos._exit(0)\n",
    "os._exit(0) inside the call": "def add(a, b):\n    import os\n    os._exit(0)\n",
    "sys.exit(0) inside the call": "def add(a, b):\n    raise SystemExit(0)\n",
    "atexit exits 0": WRONG + "import atexit, os\natexit.register(lambda: os._exit(0))\n",
    "excepthook exits 0": WRONG + "import sys, os\nsys.excepthook = lambda *a: os._exit(0)\n",
    "always-True __eq__": "class Any:\n    def __eq__(self, other):\n        return True\n"
                          "def add(a, b):\n    return Any()\n",
    "int subclass with __eq__": "class I(int):\n    def __eq__(self, other):\n        return True\n"
                                "    __hash__ = int.__hash__\ndef add(a, b):\n    return I(0)\n",
    "True for 1 (types differ)": "def add(a, b):\n    return True if a + b == 1 else float(a + b)\n",
    "shadow a builtin the test uses": "def abs(x):\n    return 0\n" + INTS_ONLY,
    "import a function as a builtin's name": "from math import floor as abs\n" + INTS_ONLY,
    "replace the judge's comparison": "def __strict_equal__(a, b):\n    return True\n" + WRONG,
    "patch builtins.AssertionError": WRONG + "import builtins\nbuiltins.AssertionError = type('X', (Exception,), {})\n",
    "read the asserts from __file__": "import re\nsrc = open(__file__).read()\n"
                                      "def add(a, b):\n    m = re.search(rf'add\\({a}, {b}\\) == (\\S+)', src)\n"
                                      "    return int(m.group(1)) if m else 0\n",
    "find the tests in files and fds": textwrap.dedent("""
        import os, re
        found = ""
        for top in ("/tmp", "/sandbox", "/dev/fd"):
            for folder, _, files in os.walk(top):
                for name in files:
                    try:
                        found += open(os.path.join(folder, name), errors="ignore").read(1 << 20)
                    except Exception:
                        pass
        for fd in range(32):
            try:
                blocking = os.get_blocking(fd)
            except OSError:
                continue
            try:
                os.set_blocking(fd, False)
                found += os.read(fd, 1 << 16).decode(errors="ignore")
            except Exception:
                pass
            finally:
                os.set_blocking(fd, blocking)
        def add(a, b):
            m = re.search(rf"add\\({a}, {b}\\) == (-?\\d+)", found)
            return int(m.group(1)) if m else 0
    """),
    "search the runner's memory for the tests": textwrap.dedent("""
        import gc, re, sys
        def add(a, b):
            text, frame = "", sys._getframe()
            while frame:
                text += repr(frame.f_locals)[:100000]
                frame = frame.f_back
            for item in gc.get_objects():
                try:
                    text += repr(item)[:1000]
                except Exception:
                    pass
            m = re.search(rf"add\\({a}, {b}\\) == (-?\\d+)", text)
            return int(m.group(1)) if m else 0
    """),
    "read the judge's memory": "def add(a, b):\n    import os\n    return int(open(f'/proc/{os.getppid()}/mem', 'rb')"
                               ".read(1))\n",
    "print a fake verdict": WRONG + "import sys, os\nfor fd in range(3, 64):\n    try:\n"
                            "        os.write(fd, b'{\"nonce\": \"x\", \"passed\": true, \"reason\": \"\"}\\n')\n"
                            "    except OSError:\n        pass\nprint('PASS 3/3')\nos._exit(0)\n",
    "forge answers on the reply pipe": "import os\ndef add(a, b):\n    for fd in range(3, 16):\n        try:\n"
                                       "            os.write(fd, b'{\"result\": [\"int\", \"3\"]}\\n')\n"
                                       "        except OSError:\n            pass\n    return 0\n",
    "kill the judge": "import os, signal\ndef add(a, b):\n    os.kill(os.getppid(), signal.SIGKILL)\n    return 0\n",
    "kill every process": "import os, signal\ndef add(a, b):\n    os.kill(-1, signal.SIGKILL)\n    return 0\n",
    "ptrace the judge": "import ctypes, os\ndef add(a, b):\n"
                        "    libc = ctypes.CDLL(None, use_errno=True)\n"
                        "    assert libc.ptrace(16, os.getppid(), 0, 0) == 0, 'ptrace denied'\n    return a + b\n",
    # ---- touching the host
    "read a canary in /tmp": f"def add(a, b):\n    return len(open('/tmp/bgpo-canary-{TOKEN}').read()) and a + b\n",
    "read a canary in /root": f"def add(a, b):\n    return len(open('/root/bgpo-canary-{TOKEN}').read()) and a + b\n",
    "delete a canary": f"import os\nos.remove('/tmp/bgpo-canary-{TOKEN}')\n" + RIGHT,
    "overwrite a canary": f"open('/root/bgpo-canary-{TOKEN}', 'w').write('x')\n" + RIGHT,
    "write into the source tree": f"open({SOURCE_CANARY!r}, 'w').write('x')\n" + RIGHT,
    "write under /usr": "open('/usr/bgpo-pwned', 'w').write('x')\n" + RIGHT,
    "write outside /tmp": "open('/bgpo-pwned', 'w').write('x')\n" + RIGHT,
    "read the trainer's environment": f"import os\nassert '{SECRET_ENV}' in open(f'/proc/{{os.getppid()}}/environ')"
                                      ".read()\n" + RIGHT,
    "secret in own environment": f"import os\nassert '{SECRET_ENV}' in os.environ\n" + RIGHT,
    "connect to a host port on loopback": f"import socket\nsocket.create_connection(('127.0.0.1', {PORT}), 1)\n"
                                          + RIGHT,
    "open the network": "import socket\nsocket.create_connection(('1.1.1.1', 53), 1)\n" + RIGHT,
    "listen on loopback (own namespace only)": "import socket\ns = socket.socket()\ns.bind(('127.0.0.1', 0))\n"
                                               "s.listen()\n" + WRONG,
    "run a host command": "import subprocess\nsubprocess.run(['touch', '/tmp/pwned'], check=True)\n" + WRONG,
    # ---- exhausting the host or outliving the reward
    "fill the disk with many files": "for i in range(64):\n    open(f'f{i}', 'wb').write(b'x' * (512 << 10))\n" + RIGHT,
    "one huge file": "open('big', 'wb').write(b'x' * (64 << 20))\n" + RIGHT,
    "memory bomb": "x = bytearray(8 << 30)\n" + RIGHT,
    "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
    "many processes": "import subprocess\nps = [subprocess.Popen(['sleep', '30']) for _ in range(64)]\n" + RIGHT,
    "daemon left behind (setsid)": f"import os\nif os.fork() == 0:\n    os.setsid()\n"
                                   f"    os.execv('/bin/sleep', ['sleep', '30.{DAEMON}'])\n" + WRONG,
    "CPU loop": "while True:\n    pass\n",
    "daemon left behind by a timed-out run": f"import os\nif os.fork() == 0:\n    os.setsid()\n"
                                             f"    os.execv('/bin/sleep', ['sleep', '31.{DAEMON}'])\n"
                                             "while True:\n    pass\n",
    "open many files": "fs = [open('/dev/null') for _ in range(100000)]\n" + RIGHT,
    "nested user namespace": "import ctypes\nassert ctypes.CDLL(None).unshare(0x10000000) == 0\n" + RIGHT,
    "huge reply": "def add(a, b):\n    return 'x' * (64 << 20)\n",
    "deeply nested reply": "def add(a, b):\n    x = []\n    for _ in range(100000):\n        x = [x]\n    return x\n",
}


def _running(marker):
    """Pids of the host whose command line contains ``marker`` (read from /proc: procps may be missing)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read().replace(b"\0", b" "):
                    pids.append(int(pid))
        except OSError:  # gone meanwhile
            pass
    return pids


@pytest.fixture(scope="module")
def outcomes():
    """Every attack run once, 4 at a time (as the trainer's pool does), with canaries and a secret around."""
    for path, text in CANARIES.items():
        with open(path, "w") as f:
            f.write(text)
    os.environ[SECRET_ENV] = "hunter2"
    listener = socket.socket()
    listener.bind(("127.0.0.1", PORT))
    listener.listen()
    listener.settimeout(0.05)
    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            futures = {name: pool.submit(run_program, program, TESTS, limits=LIMITS)
                       for name, program in ATTACKS.items()}
            results = {name: future.result() for name, future in futures.items()}
        try:
            listener.accept()
            reached = True
        except OSError:
            reached = False
        canaries = {path: Path(path).read_text() if os.path.exists(path) else None for path in CANARIES}
        yield results, reached, canaries
    finally:
        listener.close()
        del os.environ[SECRET_ENV]
        for path in CANARIES:
            if os.path.exists(path):
                os.remove(path)


def test_there_are_enough_attacks():
    assert len(ATTACKS) == 47  # README: 47 here + 2 tests of their own


@needs_sandbox
@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_fails(outcomes, name):
    results, _, _ = outcomes
    assert results[name].score == 0.0, f"{name}: scored {results[name]}"


@needs_sandbox
def test_the_host_is_untouched(outcomes):
    _, reached, canaries = outcomes
    assert not reached, "a sandboxed program connected to a host port"
    assert canaries == CANARIES
    assert not any(os.path.exists(p) for p in ("/usr/bgpo-pwned", "/bgpo-pwned", "/tmp/pwned"))
    assert not os.path.exists(SOURCE_CANARY)
    for marker in (f"sleep 30.{DAEMON}", f"sleep 31.{DAEMON}"):
        assert not _running(marker), f"{marker}: the daemon outlived the reward"


@needs_sandbox
def test_killing_bwrap_at_the_time_limit_kills_everything(monkeypatch):
    """The trainer's own time limit (here: at once, before the judge's) kills the run and all it started."""
    from bgpo.rewards import sandbox

    def time_is_up(verdict_fd, stderr, time_limit):
        time.sleep(2.0)  # the daemon has started and the program loops
        return b"", b"", True

    monkeypatch.setattr(sandbox, "_collect", time_is_up)
    marker = f"32.{DAEMON}"
    program = f"import os\nif os.fork() == 0:\n    os.setsid()\n    os.execv('/bin/sleep', ['sleep', '{marker}'])\n" \
              "while True:\n    pass\n"
    assert run_program(program, TESTS, limits=LIMITS) == (0.0, "timeout after 4s")
    time.sleep(0.2)
    assert not _running(f"sleep {marker}"), "the daemon outlived the killed sandbox"


@needs_sandbox
def test_the_right_solution_still_passes_while_attacks_run():
    good = "def add(a, b):\n    return a + b\n"
    with ThreadPoolExecutor(max_workers=2) as pool:
        bomb = pool.submit(run_program, ATTACKS["fork bomb"], TESTS, limits=LIMITS)
        assert run_program(good, TESTS, limits=Limits(time=20.0)).score == 1.0  # slow only on a loaded machine
        assert bomb.result().score == 0.0


@needs_sandbox
def test_a_stop_iteration_cannot_end_the_tests_iteration():
    """Regression: a StopIteration raised by the program was re-raised in the test, where it silently ended
    the map/zip a test iterates (its asserts never ran: score 1).  It arrives as a RuntimeError."""
    stops = "def add(a, b):\n    raise StopIteration\n"
    for tests in ("assert all(map(lambda p: add(*p) == sum(p), [(1, 2), (3, 4)]))\n",
                  "for got, want in zip(map(add, [1, 3], [2, 4]), [3, 7]):\n    assert got == want\n"):
        assert run_program(RIGHT, tests, limits=LIMITS).score == 1.0
        verdict = run_program(stops, tests, limits=LIMITS)
        assert verdict.score == 0.0 and verdict.reason.startswith("RuntimeError"), verdict
    expects = "try:\n    add(1, 2)\n    raise AssertionError('no error')\nexcept ValueError:\n    pass\n"
    assert run_program("def add(a, b):\n    raise ValueError\n", expects, limits=LIMITS).score == 1.0


@needs_sandbox
def test_strict_comparison_and_plain_values():
    float_for_int = "def add(a, b):\n    return float(a + b)\n"
    assert run_program(float_for_int, TESTS, limits=LIMITS).reason.startswith("AssertionError")
    example = {"test_list": ["assert pair(2) == (2, [2.0, {'k': {1, 2}}], None, b'x', 1j)"]}
    program = "def pair(n):\n    return (n, [n / 1, {'k': {1, n}}], None, b'x', 1j)\n"
    assert code_reward(f"```python\n{program}```", example).score == 1.0
    humaneval = {"prompt": "def inc(x):\n", "entry_point": "inc",
                 "test": "def check(f):\n    assert abs(f(0.5) - 1.5) < 1e-9\n    try:\n        f('a')\n"
                         "    except TypeError:\n        pass\n    else:\n        raise AssertionError\n"}
    assert code_reward("    return x + 1\n", humaneval).score == 1.0  # a builtin exception crosses as itself
    # a chain and a membership test compare as strictly as a single == (True passed for 1 there)
    for test in ("assert one() == 1 == 1", "assert one() in [1, 2]", "assert 0 < one() == 1"):
        assert run_program("def one():\n    return 1\n", test, limits=LIMITS).score == 1.0, test
        assert run_program("def one():\n    return True\n", test, limits=LIMITS).score == 0.0, test


@needs_sandbox
def test_the_program_cannot_replace_the_prompts_helpers():
    """HumanEval/32-like: the test checks the answer with ``poly`` from the (trusted) prompt."""
    prompt = ("def poly(xs, x):\n    return sum(c * x ** i for i, c in enumerate(xs))\n"
              "def find_zero(xs):\n    \"\"\"A zero of poly(xs, x).\"\"\"\n")
    example = {"prompt": prompt, "entry_point": "find_zero",
               "test": "def check(candidate):\n    assert abs(poly([-2, 1], candidate([-2, 1]))) < 1e-9\n"}
    cheat = "def poly(xs, x):\n    return 0\ndef find_zero(xs):\n    return 123.0\n"
    assert code_reward(cheat, example).score == 0.0
    assert code_reward("def find_zero(xs):\n    return -xs[0] / xs[1]\n", example).score == 1.0


@needs_sandbox
def test_program_globals_imports_and_constants():
    program = ("import math\nimport os.path\nfrom collections import Counter\nLIMIT = 3\nsquare = lambda x: x * x\n"
               "def f(x):\n    return math.floor(x)\n")
    tests = ("assert f(2.5) == LIMIT - 1 and square(3) == 9 and f(x=1.5) == 1\n"
             "assert math.pi > 3 and os.path.join('a', 'b') == 'a/b'\n"
             "assert 'Counter' not in globals()  # a from-import could rename anything: not the test's\n")
    assert run_program(program, tests, limits=LIMITS).score == 1.0


@needs_sandbox
def test_the_program_sees_a_private_tmp_and_nothing_of_the_host():
    program = textwrap.dedent(f"""
        import os
        assert os.getcwd() == "/tmp" and os.listdir("/tmp") == []
        assert os.getuid() == 65534 and not os.path.exists("/proc/1") and not os.path.exists("/work")
        assert not os.path.exists({repr(sys.prefix + "/lib")}) or {repr(sys.prefix)} == {repr(sys.base_prefix)}
    """)
    assert run_sandboxed(program).score == 1.0


def test_unsandboxed_needs_opt_in(monkeypatch):
    from bgpo.rewards import sandbox

    monkeypatch.setattr(sandbox, "sandbox_problem", lambda: "bwrap not found: install bubblewrap")
    with pytest.raises(RuntimeError, match="install bubblewrap"):
        require_sandbox()
    with pytest.raises(RuntimeError, match="refusing to run model-written code"):
        code_reward("def add(a, b):\n    return a + b\n", {"test_list": [TESTS]})
    assert require_sandbox(allow_unsandboxed=True) is False
    out = code_reward("def add(a, b):\n    return a + b\n", {"test_list": [TESTS]}, allow_unsandboxed=True)
    assert out.score == 1.0  # the same judge, verdict and strict comparison, without the namespaces
    with pytest.raises(ValueError, match="allow_unsandboxed"):
        require_sandbox("yes")


def test_missing_bwrap_says_what_to_install(monkeypatch):
    from bgpo.rewards import sandbox

    monkeypatch.setattr(sandbox.shutil, "which", lambda tool: None)
    problem = sandbox.sandbox_problem.__wrapped__()  # not the cached answer of this machine
    assert "bwrap" in problem and "apt-get install -y bubblewrap" in problem and "allow_unsandboxed_code" in problem


def test_trainer_refuses_code_without_a_sandbox(monkeypatch, tmp_path, capsys):
    from bgpo.cli import train_main
    from bgpo.rewards import sandbox
    from bgpo.train.config import TrainConfig
    from bgpo.train.scoring import code_reward_checked
    from bgpo.train.trainer import Trainer

    monkeypatch.setattr(sandbox, "sandbox_problem", lambda: "bwrap not found: install bubblewrap")
    config = TrainConfig(output_dir=str(tmp_path))
    config.data.task, config.model.tokenizer = "code", "char"
    with pytest.raises(RuntimeError, match="refusing to run model-written code: .*install bubblewrap"):
        Trainer(config)  # at start-up, before the model is built
    assert not any(tmp_path.iterdir())
    assert train_main([f"output_dir={tmp_path}", "data.task=code", "model.tokenizer=char"]) == 1
    assert "install bubblewrap" in capsys.readouterr().err
    config.allow_unsandboxed_code = True
    with pytest.warns(RuntimeWarning, match="without isolation"):
        reward = code_reward_checked(config)
    assert reward("def add(a, b):\n    return a + b\n", {"test_list": [TESTS]}).score == 1.0
    config.data.task = "sudoku"
    assert code_reward_checked(config) is None


def test_limits_are_validated():
    for bad in (dict(time=0), dict(time=float("inf")), dict(memory=0), dict(processes=True), dict(disk=1.5)):
        with pytest.raises(ValueError, match=next(iter(bad)).replace("time", "time_limit")):
            Limits(**bad)
    with pytest.raises(ValueError, match="program: expected a str"):
        run_sandboxed(b"x")


@needs_sandbox
def test_the_command_for_a_user_that_is_not_root_runs(monkeypatch):
    """Not root: one bwrap, the host paths bound directly (run here as whoever runs the tests)."""
    from bgpo.rewards import sandbox

    monkeypatch.setattr(sandbox.os, "geteuid", lambda: 1000)
    command = sandbox._command(LIMITS, (7, 8))
    assert command.count("bwrap") == 1 and "setpriv" not in " ".join(command)
    monkeypatch.undo()
    monkeypatch.setattr(sandbox, "_command", lambda limits, fds: command[:-2] + [str(fds[0]), str(fds[1])])
    assert run_program(RIGHT, TESTS, limits=LIMITS).score == 1.0
    assert run_program(WRONG, TESTS, limits=LIMITS).score == 0.0


def test_a_payload_over_the_pipe_is_refused_not_blocked():
    out = run_program("x = 1\n" * 200_000, "", limits=LIMITS, sandboxed=False)
    assert out.score == 0.0 and "bytes" in out.reason


@needs_sandbox
def test_reward_is_fast_enough():
    start = time.monotonic()
    assert run_program("def add(a, b):\n    return a + b\n", TESTS, limits=LIMITS).score == 1.0
    assert time.monotonic() - start < 3.0


@pytest.mark.parametrize("a, b, equal", [
    (1, 1, True), (1, True, False), (1, 1.0, False), ([1, (2,)], [1, (2,)], True), ([1], (1,), False),
    ({1: "a"}, {1: "a"}, True), ({1: "a"}, {1.0: "a"}, False), ({1}, {1.0}, False), ({1: [1]}, {1: [True]}, False),
    (float("nan"), float("nan"), False), (0.0, -0.0, True), (frozenset({(1, 2)}), frozenset({(1, 2)}), True),
    (b"x", "x", False), (None, None, True),
])
def test_strict_equal(a, b, equal):
    assert strict_equal(a, b) is equal


def _passes(test: str, **names) -> bool:
    """Whether test code passes with the judge's comparisons (the transform of the test code, no sandbox)."""
    namespace = {"__strict_compare__": strict_compare, "__strict_chain__": strict_chain, **names}
    try:
        exec(compile(ast.fix_missing_locations(_StrictCompare().visit(ast.parse(test))), "test.py", "exec"), namespace)
    except AssertionError:
        return False
    return True


def test_chains_and_membership_compare_strictly():
    """Regression: a chain (``a == b == c``) and ``in`` / ``not in`` kept Python's loose comparison, so True
    passed for 1 there while a single == refused it."""
    for test in ("assert x == 1 == y", "assert 0 < x == 1", "assert x in [1, 2]", "assert x in (1,)",
                 "assert x in {1: 'a'}", "assert x in {1}", "assert 1 == x != 3"):
        assert _passes(test, x=1, y=1), test
        assert not _passes(test, x=True, y=1), test
    assert _passes("assert x not in [1.0, True] and 1.0 not in {x}", x=1)
    assert _passes("assert 'b' in x and b'a' in y and 3 in range(5)", x="abc", y=b"ab")  # substrings, ranges
    assert _passes("assert 1 < x <= 3 and x is not None", x=2) and not _passes("assert 1 < x <= 3", x=4)

    def boom():
        raise RuntimeError("evaluated past a false link")

    assert _passes("assert not (x == 2 == boom())", x=1, boom=boom)  # operands after a false link: never run
    assert _passes("assert (n := x) == 1\nassert n == 1", x=1)  # a walrus keeps binding in the test's scope
    assert _passes("assert all(a == b == c for a, b, c in [(1, 1, 1), (2, 2, 2)])")


def test_values_round_trip_and_malformed_ones_are_refused():
    value = {"k": [1, 2.5, (None, b"x", 1j, frozenset({1}))], "s": {1, 2}, "t": True, "n": -(10 ** 30)}
    assert strict_equal(decode(encode(value)), value)
    for bad in ([], "x", ["int", 3], ["bool", 1], ["none", 1], ["float", "zz"], ["set", [["list", []]]],
                ["dict", [[["int", "1"]]]], ["object", "x"], ["list", "abc"]):
        with pytest.raises(ProtocolError):
            decode(bad)
    class Sneaky(int):
        pass
    with pytest.raises(TypeError, match="Sneaky cannot cross"):
        encode([Sneaky(1)])
