"""RM_reasoning for code: the completion's program against the row's tests, judged outside the program.

The row's `tests` column is a list of Python test snippets: assertions (`"assert add(1, 2) == 3"`, as in MBPP and
the bundled tasks) or a HumanEval-style `check(candidate)` definition followed by its call (`data_formats` builds
that from `test` + `entry_point`). The completion's last fenced code block (```python ... ```), or the whole
completion when it has none, is the program. The score is the share of tests that pass.

Why the verdict cannot be forged. Anything that runs in the program's interpreter can be rewritten by the program
(frames and `gc` reach every object; builtins, `exec` and `print` can be replaced; objects can claim to equal
anything), so the tests do not run there. The program runs alone in the OS sandbox (`rewards.sandbox`), in a small
server (`_SERVER`) that, once the program's top level has run, answers calls: function name + arguments in, the
return value (or the name of the exception raised) out, over a pipe. The tests run here, in the trusted process,
with each of the program's top-level functions replaced by a proxy that makes such a call. Values cross the pipe
in a strict plain-data encoding (`encode` / `decode`: None, bool, int, float, complex, str, bytes, and lists,
tuples, dicts, sets, frozensets of those; anything else is refused), so what comes back is a real `int`, `list`,
... and never an object with its own `__eq__`; the expected values never enter the sandbox, and the tally is
counted here. A program can only choose what its functions return — which is what is being scored. Its output
goes to /dev/null (nothing is parsed from it, so its size does not matter).

A syntax error or a crash of the program's top level scores 0; so does a program that does not answer within the
wall-clock limit (timeouts are counted in `reward/<name>/timeouts`). Test code is trusted (it comes from the
dataset, like the reward's own code) and runs in this process: tests that pass the program values which are not
plain data (a callback, say) fail.
"""

from __future__ import annotations

import builtins
import concurrent.futures as cf
import json
import os
import re
import select

from .registry import RewardResult, reward_factory
from .sandbox import (
    SandboxLimits,
    SandboxProcess,
    isolation_problem,
    unavailable_message,
)

_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.DOTALL)
MAX_REPLY = 1 << 20  # bytes per answer from the sandbox

# The plain-data codec, [tag, payload] in JSON. The same source runs here and in the sandbox (the server encodes
# return values and decodes arguments with it); the program may tamper with its copy, but only `decode` here decides
# what a returned value is.
_CODEC = r'''
import re
MAX_DEPTH = 64
SEQUENCES = {list: "l", tuple: "t", set: "S", frozenset: "F"}


def encode(v, depth=0):
    if depth > MAX_DEPTH:
        raise ValueError("nested too deeply")
    t = type(v)
    if v is None:
        return ["n", None]
    if t is bool:
        return ["b", v]
    if t is int:
        return ["i", str(v)]
    if t is float:
        return ["f", repr(v)]
    if t is complex:
        return ["c", [repr(v.real), repr(v.imag)]]
    if t is str:
        return ["s", v]
    if t is bytes:
        return ["y", v.hex()]
    if t in SEQUENCES:
        return [SEQUENCES[t], [encode(x, depth + 1) for x in v]]
    if t is dict:
        return ["d", [[encode(k, depth + 1), encode(x, depth + 1)] for k, x in v.items()]]
    raise TypeError("not plain data: " + t.__name__)


def decode(x, depth=0):
    """A plain value from its encoding; anything malformed raises ValueError."""
    if depth > MAX_DEPTH or not (type(x) is list and len(x) == 2 and type(x[0]) is str):
        raise ValueError("malformed value")
    tag, p = x
    if tag == "n" and p is None:
        return None
    if tag == "b" and type(p) is bool:
        return p
    if tag == "i" and type(p) is str and re.fullmatch(r"-?[0-9]{1,4300}", p):
        return int(p)
    if tag == "f" and type(p) is str:
        return float(p)
    if tag == "c" and type(p) is list and len(p) == 2 and all(type(v) is str for v in p):
        return complex(float(p[0]), float(p[1]))
    if tag == "s" and type(p) is str:
        return p
    if tag == "y" and type(p) is str:
        return bytes.fromhex(p)
    if tag in ("l", "t", "S", "F") and type(p) is list:
        kind = {"l": list, "t": tuple, "S": set, "F": frozenset}[tag]
        return kind(decode(v, depth + 1) for v in p)
    if tag == "d" and type(p) is list and all(type(q) is list and len(q) == 2 for q in p):
        return {decode(k, depth + 1): decode(v, depth + 1) for k, v in p}
    raise ValueError("malformed value (tag %r)" % (tag,))
'''
_codec: dict = {}
exec(_CODEC, _codec)
encode, decode = _codec["encode"], _codec["decode"]

_SERVER = _CODEC + r'''
import json, os, sys
rpc_in, rpc_out = os.fdopen(os.dup(0), "r"), os.fdopen(os.dup(1), "w")
null = os.open("/dev/null", os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(null, fd)
sys.stdin, sys.stdout, sys.stderr = open(os.devnull), open(os.devnull, "w"), open(os.devnull, "w")


def send(msg):
    rpc_out.write(json.dumps(msg) + "\n")
    rpc_out.flush()


ns = {"__name__": "solution"}
try:
    exec(compile(open("solution.py", encoding="utf-8").read(), "solution.py", "exec"), ns)
except BaseException as e:
    send(["error", type(e).__name__])
    raise SystemExit(0)
send(["ready", [k for k, v in ns.items() if callable(v) and not k.startswith("__")]])
for line in rpc_in:
    name, args, kwargs = json.loads(line)
    try:
        value = ns[name](*[decode(a) for a in args], **{k: decode(v) for k, v in kwargs.items()})
        reply = ["ok", encode(value)]
    except BaseException as e:
        reply = ["raise", type(e).__name__]
    send(reply)
'''


class ProgramTimeout(BaseException):
    """The program did not answer in time (a BaseException: a test's `except Exception` cannot swallow it)."""


class ProgramGone(BaseException):
    """The program's process ended or answered something malformed."""


def _exception(name: str) -> BaseException:
    """The builtin exception class of that name (so tests that expect a ValueError see one), else RuntimeError."""
    cls = getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        return cls(f"raised by the program: {name}")
    return RuntimeError(f"raised by the program: {name}")


class _Program:
    """The program running in the sandbox, called through its pipe."""

    def __init__(self, box: SandboxProcess):
        self.box, self.buffer = box, b""

    def _read(self):
        while b"\n" not in self.buffer:
            left = self.box.remaining()
            if left <= 0:
                raise ProgramTimeout()
            ready, _, _ = select.select([self.box.proc.stdout], [], [], left)
            if not ready:
                raise ProgramTimeout()
            chunk = os.read(self.box.proc.stdout.fileno(), 65536)
            if not chunk:
                raise ProgramGone("the program's process ended")
            self.buffer += chunk
            if len(self.buffer) > MAX_REPLY:
                raise ProgramGone("answer too large")
        line, self.buffer = self.buffer.split(b"\n", 1)
        try:
            msg = json.loads(line)
        except (ValueError, RecursionError):  # RecursionError: nested too deeply for the parser
            raise ProgramGone("malformed answer") from None
        if not (isinstance(msg, list) and len(msg) == 2 and isinstance(msg[0], str)):
            raise ProgramGone("malformed answer")
        return msg

    def start(self) -> list[str] | None:
        """Names of the program's top-level callables, or None when its top level failed."""
        kind, names = self._read()
        if kind != "ready" or not isinstance(names, list):
            return None
        return [n for n in names if isinstance(n, str) and n.isidentifier()]

    def call(self, name: str, args: tuple, kwargs: dict):
        request = json.dumps([name, [encode(a) for a in args], {k: encode(v) for k, v in kwargs.items()}])
        try:
            self.box.proc.stdin.write(request.encode() + b"\n")
            self.box.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise ProgramGone("the program's process ended") from None
        kind, payload = self._read()
        if kind == "ok":
            try:
                return decode(payload)
            except (ValueError, OverflowError):
                raise TypeError("the program returned something that is not plain data") from None
        if kind == "raise" and isinstance(payload, str):
            raise _exception(payload)
        raise ProgramGone("malformed answer")


def _proxy(program: _Program, name: str):
    def call(*args, **kwargs):
        return program.call(name, args, kwargs)

    call.__name__ = name
    return call


def extract_code(text: str) -> str:
    """The last fenced code block, else the text itself."""
    blocks = _FENCE.findall(text)
    return blocks[-1] if blocks else text


def run_tests(program: str, tests: list[str], limits: SandboxLimits, isolation: str = "os") -> tuple[float, bool]:
    """(share of tests passed, timed out)."""
    if not tests:
        return 0.0, False
    passed, timed_out = 0, False
    files = {"solution.py": program, "server.py": _SERVER}
    with SandboxProcess(files, "server.py", limits, isolation) as box:
        remote = _Program(box)
        try:
            names = remote.start()
        except ProgramTimeout:
            return 0.0, True
        except ProgramGone:
            names = None
        if names is None:
            return 0.0, False
        # a program's `abs` or `len` would otherwise stand in for the builtin the test means to call
        names = [n for n in names if not hasattr(builtins, n)]
        for test in tests:
            ns = {"__name__": "test", **{n: _proxy(remote, n) for n in names}}
            try:
                exec(compile(test, "test.py", "exec"), ns)
                passed += 1
            except ProgramTimeout:
                timed_out = True
                break
            except ProgramGone:
                break
            except Exception:
                pass
    return passed / len(tests), timed_out


@reward_factory("code")
def code_reward(wall_s: float = 10.0, cpu_s: int = 5, memory_mb: int = 512, workers: int = 2,
                isolation: str = "os", skip_missing: bool = False):
    """Share of the row's `tests` that the completion's code passes, judged outside the sandboxed program.
    `isolation: none` runs programs without OS isolation (only for trusted code; refused otherwise where the
    machine cannot isolate). `skip_missing`: rows without `tests` (e.g. the math rows of a mixed stage) score None
    instead of being refused before the run."""
    problem = isolation_problem(isolation)
    if problem:
        raise ValueError(problem if problem.startswith("the code sandbox") else unavailable_message(problem))
    limits = SandboxLimits(wall_s=wall_s, cpu_s=cpu_s, memory_mb=memory_mb)

    def score(prompts, completions, tests=None, **_) -> RewardResult:
        tests = [None] * len(completions) if tests is None else tests
        rows = [i for i, t in enumerate(tests) if t is not None]  # all of them unless skip_missing
        test_lists = [json.loads(tests[i]) if isinstance(tests[i], str) else list(tests[i]) for i in rows]
        with cf.ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(lambda a: run_tests(extract_code(a[0]), a[1], limits, isolation),
                                    zip([completions[i] for i in rows], test_lists)))
        scores: list[float | None] = [None] * len(completions)
        for i, r in zip(rows, results):
            scores[i] = r[0]
        return RewardResult(scores, {"timeouts": float(sum(r[1] for r in results))})

    score.required_columns = [] if skip_missing else ["tests"]
    return score
