"""The test harness that runs inside the code sandbox (standard library only; no bgpo imports).

``python -I -S _harness.py judge JOB_FD VERDICT_FD`` (the *judge*) reads ``{"nonce", "program", "setup",
"entry", "test", "time", "limits"}`` as JSON from ``JOB_FD`` until EOF and closes it, makes itself non-dumpable (so a
process of the same uid can neither ptrace it nor read its memory or fds through /proc), sets the
resource limits and a timer, and starts
``python -I -S _harness.py runner`` (the *runner*, a fresh interpreter: it never held the nonce or the
tests) with only two pipes.  The runner imports the program as module ``program`` and answers calls.

The test code runs in the judge, where every top-level name the program binds is a stub that calls the
runner: arguments go out and results come back as type-tagged JSON of plain values (None, bool, int,
float, complex, str, bytes, list, tuple, dict, set, frozenset), so no object of the program's ever
exists in the judge and no ``__eq__`` of the program's is ever called.  No program name replaces a
builtin, and the example's own ``setup`` code (trusted: HumanEval's prompt with its helpers, MBPP's
``test_setup_code``) runs in the judge after the stubs, so its definitions win over the program's, but
for the function under test, ``entry``.  ``a == b``, ``a != b``, ``a in b`` and ``a not in b`` in the test
code, also within a chain (``a == b == c``), compare strictly: the same types all the way down (``True`` is
not ``1``, ``3.0`` is not ``3``, ``True in [1]`` is False).
The verdict — ``{"nonce", "passed", "reason"}`` — is written by the judge to ``VERDICT_FD``, which the
runner never has; the exit status of anything means nothing.
"""
import ast
import builtins
import json
import operator
import os
import signal
import subprocess
import sys

MAX_MESSAGE = 8 << 20  # bytes of one runner message


class ProtocolError(Exception):
    """The runner sent something that is not a well-formed answer (it may be hostile)."""


# ---------------------------------------------------------------- type-tagged values (both sides)
def encode(value, depth=0):
    """Plain ``value`` as tagged JSON; anything else (a subclass included) raises TypeError."""
    if depth > 100:
        raise TypeError("value nested deeper than 100")
    kind = type(value)
    if value is None:
        return ["none"]
    if kind is bool:
        return ["bool", value]
    if kind is int:
        return ["int", str(value)]
    if kind is float:
        return ["float", value.hex()]
    if kind is complex:
        return ["complex", value.real.hex(), value.imag.hex()]
    if kind is str:
        return ["str", value]
    if kind is bytes:
        return ["bytes", value.hex()]
    if kind in (list, tuple, set, frozenset):
        return [kind.__name__, [encode(item, depth + 1) for item in value]]
    if kind is dict:
        return ["dict", [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]]
    raise TypeError(f"a value of type {kind.__name__} cannot cross the sandbox (plain values only)")


_CONTAINERS = {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}


def decode(node):
    """The plain value of a tagged JSON ``node``; a malformed node raises ProtocolError."""
    if type(node) is not list or not node or type(node[0]) is not str:
        raise ProtocolError("malformed value")
    tag, args = node[0], node[1:]
    one = args[0] if len(args) == 1 else None
    try:
        if tag == "none" and not args:
            return None
        if (tag, type(one)) in (("bool", bool), ("str", str)):
            return one
        if tag == "int" and type(one) is str:
            return int(one)
        if tag == "float" and type(one) is str:
            return float.fromhex(one)
        if tag == "complex" and len(args) == 2:
            return complex(float.fromhex(args[0]), float.fromhex(args[1]))
        if tag == "bytes" and type(one) is str:
            return bytes.fromhex(one)
        if tag in _CONTAINERS and type(one) is list:
            return _CONTAINERS[tag](decode(item) for item in one)
        if tag == "dict" and type(one) is list:
            if not all(type(item) is list and len(item) == 2 for item in one):
                raise ProtocolError("malformed dict")
            return {decode(k): decode(v) for k, v in one}
    except (TypeError, ValueError, OverflowError, RecursionError) as error:  # unhashable key, bad hex, ...
        raise ProtocolError(f"malformed {tag}: {error}") from None
    raise ProtocolError(f"malformed value tagged {tag!r}")


_PLAIN = (type(None), bool, int, float, complex, str, bytes, list, tuple, set, frozenset, dict)


def strict_equal(a, b):
    """``a == b`` and the same types all the way down: ``True`` is not ``1``, ``(1,)`` is not ``[1]``, the
    key ``1`` is not ``1.0``.  Objects of the test's own (never the program's: it sends plain values)
    compare with their ``==``."""
    if type(a) not in _PLAIN or type(b) not in _PLAIN:
        return a == b
    if type(a) is not type(b):
        return False
    if type(a) in (list, tuple):
        return len(a) == len(b) and all(strict_equal(x, y) for x, y in zip(a, b))
    if type(a) in (dict, set, frozenset):
        # equal as Python sees it, then each key of a against b's own key object that equals it
        # (1 and 1.0 hash and compare equal, so {1} == {1.0} until the types are checked)
        if len(a) != len(b) or (a.keys() != b.keys() if type(a) is dict else a != b):
            return False
        b_keys = {key: key for key in b}
        return all(strict_equal(key, b_keys[key]) and (type(a) is not dict or strict_equal(a[key], b[key]))
                   for key in a)
    return a == b


_OP_NAMES = {ast.Eq: "==", ast.NotEq: "!=", ast.In: "in", ast.NotIn: "not in", ast.Lt: "<", ast.LtE: "<=",
             ast.Gt: ">", ast.GtE: ">=", ast.Is: "is", ast.IsNot: "is not"}
_STRICT_OPS = {"==", "!=", "in", "not in"}
_PLAIN_OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "is": operator.is_,
              "is not": operator.is_not}


def strict_contains(container, item) -> bool:
    """``item in container``, strict for the plain containers: ``True in [1]`` and ``1 in {1.0}`` are False."""
    if type(container) in (list, tuple, set, frozenset, dict):
        return any(strict_equal(item, element) for element in container)
    return item in container


def strict_compare(left, op: str, right) -> bool:
    """``left op right`` with ==, != and the membership tests made strict (the other operators as they are)."""
    if op in ("==", "!="):
        return strict_equal(left, right) == (op == "==")
    if op in ("in", "not in"):
        return strict_contains(right, left) == (op == "in")
    return _PLAIN_OPS[op](left, right)


def strict_chain(left, ops: tuple, rights: tuple) -> bool:
    """A comparison chain ``left ops[0] r0 ops[1] r1 ...`` of ``strict_compare``s; ``rights`` are thunks,
    evaluated in order and only while the chain holds, as Python evaluates a chain's operands."""
    for op, thunk in zip(ops, rights):
        right = thunk()
        if not strict_compare(left, op, right):
            return False
        left = right
    return True


class _StrictCompare(ast.NodeTransformer):
    """Each comparison with ==, != or (not) in -> ``__strict_compare__(x, op, y)``; a chain holding one ->
    ``__strict_chain__(x, ops, (lambda: y, ...))`` (the lambdas only there: a walrus in an operand of a single
    comparison keeps binding in the test's scope)."""

    def visit_Compare(self, node):
        self.generic_visit(node)
        ops = [_OP_NAMES[type(op)] for op in node.ops]
        if not _STRICT_OPS.intersection(ops):
            return node
        if len(ops) == 1:
            call = ast.Call(ast.Name("__strict_compare__", ast.Load()),
                            [node.left, ast.Constant(ops[0]), node.comparators[0]], [])
        else:
            no_arguments = ast.arguments(posonlyargs=[], args=[], kwonlyargs=[], kw_defaults=[], defaults=[])
            thunks = [ast.Lambda(no_arguments, right) for right in node.comparators]
            call = ast.Call(ast.Name("__strict_chain__", ast.Load()),
                            [node.left, ast.Tuple([ast.Constant(op) for op in ops], ast.Load()),
                             ast.Tuple(thunks, ast.Load())], [])
        return ast.copy_location(call, node)


# ---------------------------------------------------------------- the runner (untrusted side)
def runner():
    requests, replies = os.fdopen(os.dup(0), "rb"), os.fdopen(os.dup(1), "wb")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # the program's own output goes nowhere
        os.dup2(null, fd)

    def reply(message):
        replies.write(json.dumps(message).encode() + b"\n")
        replies.flush()

    namespace = {"__name__": "program", "__builtins__": builtins}
    try:
        source = json.loads(requests.readline())["program"]
        exec(compile(source, "program.py", "exec"), namespace)
        reply({"ok": True})
    except BaseException as error:  # noqa: BLE001 - any failure of the program is reported
        reply({"error": f"{type(error).__name__}: {error}"[:300]})
        return
    for line in requests:
        request = json.loads(line)
        try:
            value = namespace[request["name"]]
            if "args" in request:
                value = value(*decode(request["args"]), **decode(request["kwargs"]))
            reply({"result": encode(value)})
        except BaseException as error:  # noqa: BLE001
            reply({"error": f"{type(error).__name__}: {error}"[:300], "type": type(error).__name__})


# ---------------------------------------------------------------- the judge (trusted side)
def _no_dump():
    import ctypes

    if ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE = 4
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")


# Exceptions that end an iteration rather than fail: re-raised in the test, a StopIteration from the program
# would silently end the map/zip/filter a test iterates, so its asserts never run.  They arrive as errors.
_CONTROL_FLOW = (StopIteration, StopAsyncIteration)


class TimeUp(BaseException):
    """The judge's time limit (a BaseException: ``except Exception`` in a test cannot swallow it)."""


def _time_is_up(signum, frame):
    raise TimeUp("the time limit passed")


def _set_limits(limits):
    import resource

    for name, value in limits.items():
        resource.setrlimit(getattr(resource, name), (value, value))


class Runner:
    """The runner process and the calls the test code makes into it."""

    def __init__(self, program):
        here = os.path.abspath(__file__)
        self.process = subprocess.Popen([sys.executable, "-I", "-S", here, "runner"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, close_fds=True)
        self.send({"program": program})
        answer = self.receive()
        if "ok" not in answer:
            raise RuntimeError(f"the program failed to load: {answer.get('error', 'no answer')}")

    def send(self, message):
        self.process.stdin.write(json.dumps(message).encode() + b"\n")
        self.process.stdin.flush()

    def receive(self):
        line = self.process.stdout.readline(MAX_MESSAGE + 1)
        if not line.endswith(b"\n"):
            raise ProtocolError("the program died or sent no complete answer" if len(line) <= MAX_MESSAGE
                                else "an answer over the size limit")
        try:
            answer = json.loads(line)
        except (ValueError, RecursionError):
            raise ProtocolError("an answer that is not JSON") from None
        if type(answer) is not dict:
            raise ProtocolError("an answer that is not an object")
        return answer

    def call(self, name, args=None, kwargs=None):
        """``name(*args, **kwargs)`` in the program, or the value of ``name`` when ``args`` is None."""
        self.send({"name": name} if args is None else
                  {"name": name, "args": encode(tuple(args)), "kwargs": encode(dict(kwargs or {}))})
        answer = self.receive()
        if "result" in answer:
            return decode(answer["result"])
        error, kind = str(answer.get("error", "no result"))[:300], answer.get("type")
        builtin = getattr(builtins, kind, None) if type(kind) is str else None
        if (isinstance(builtin, type) and issubclass(builtin, Exception) and builtin.__module__ == "builtins"
                and builtin not in _CONTROL_FLOW):
            raise builtin(f"in the program: {error}")  # so a test may expect e.g. a ValueError
        raise RuntimeError(f"in the program: {error}")

    def stub(self, name):
        def call(*args, **kwargs):
            return self.call(name, args, kwargs)

        call.__name__ = call.__qualname__ = name
        return call


def program_globals(program, runner_):
    """The test's view of the program's top-level names: a stub per function or class, the (plain) value
    of each assigned name (a stub if it is not plain), and the judge's own import of each module the
    program imports plainly (``import math``: the sandbox's library is read-only and ``-I`` keeps the
    writable directory off ``sys.path``).  Never a builtin's or a dunder name, nor a renamed import
    (``from math import floor as abs`` would turn a test's tolerance check into a pass)."""
    import importlib

    namespace = {}
    for node in ast.parse(program).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            namespace[node.name] = runner_.stub(node.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname is None:
                    importlib.import_module(alias.name)
                    top = alias.name.split(".")[0]
                    namespace[top] = importlib.import_module(top)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for name in {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}:
                try:
                    namespace[name] = runner_.call(name)
                except Exception:  # noqa: BLE001 - not a plain value (e.g. a lambda): call it through a stub
                    namespace[name] = runner_.stub(name)
    return {name: value for name, value in namespace.items()
            if not hasattr(builtins, name) and not name.startswith("__")}


def judge(job_fd, verdict_fd):
    _no_dump()
    with os.fdopen(job_fd, "rb") as channel:
        job = json.loads(channel.read())
    verdict = os.fdopen(verdict_fd, "w")
    nonce = job.pop("nonce")
    _set_limits(job["limits"])
    signal.signal(signal.SIGALRM, _time_is_up)  # the trainer kills the sandbox too; this gives a reason
    signal.setitimer(signal.ITIMER_REAL, job["time"])
    passed, reason = False, ""
    runner_ = None
    try:
        runner_ = Runner(job["program"])
        namespace = {"__name__": "__test__", "__builtins__": builtins, "__strict_compare__": strict_compare,
                     "__strict_chain__": strict_chain}
        namespace.update(program_globals(job["program"], runner_))
        # the example's own code (e.g. HumanEval's prompt with its helpers) replaces the program's names,
        # except the function under test
        exec(compile(job["setup"], "setup.py", "exec"), namespace)
        if job["entry"]:
            namespace[job["entry"]] = runner_.stub(job["entry"])
        tree = ast.fix_missing_locations(_StrictCompare().visit(ast.parse(job["test"])))
        exec(compile(tree, "test.py", "exec"), namespace)
        passed = True
    except BaseException as error:  # noqa: BLE001 - every failure is a verdict of 0
        reason = f"{type(error).__name__}: {error}"[:300]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        if runner_ is not None:
            runner_.process.kill()
    verdict.write(json.dumps({"nonce": nonce, "passed": passed, "reason": reason}))
    verdict.close()


if __name__ == "__main__":
    if sys.argv[1:] == ["runner"]:
        runner()
    else:
        judge(int(sys.argv[2]), int(sys.argv[3]))
