"""RM_reasoning for code: the completion's program against the row's tests, judged outside the program.

The row's `tests` column is a list of Python test snippets: assertions (`"assert add(1, 2) == 3"`, as in MBPP and
the bundled tasks) or a HumanEval-style `check(candidate)` definition followed by its call (`data_formats` builds
that from `test` + `entry_point`). The completion's last fenced code block (```python ... ```), or the whole
completion when it has none, is the program. An optional `prelude` column is code the prompt gives (HumanEval's
imports and helper functions, `format=humaneval` fills it): it runs before the program, and in each test's namespace,
as HumanEval's grader runs prompt + completion + test. The score is the share of tests that pass.

Why the verdict cannot be forged. Anything that runs in the program's interpreter can be rewritten by the program
(frames and `gc` reach every object; builtins, `exec` and `print` can be replaced; objects can claim to equal
anything), so the tests do not run there. The program runs alone in the OS sandbox (`rewards.sandbox`), in a small
server (`_SERVER`) that, once the program's top level has run, answers calls: function name + arguments in, the
return value (or the name of the exception raised) out, over a pipe. The tests run here, in the trusted process,
with each of the program's top-level functions replaced by a proxy that makes such a call. Values cross the pipe
in a strict plain-data encoding (`encode` / `decode`), so what comes back is a real `int`, `list`, ... built here
and never an object with its own `__eq__`; the expected values never enter the sandbox, and the tally is counted
here. A program can only choose what its functions return, and how they change their arguments: which is what is
being scored. Its output goes to /dev/null (nothing is parsed from it, so its size does not matter).

What crosses, as the reference graders (HumanEval's `check`, MBPP's asserts, run in the program's own interpreter)
would see it: None, bool, int, float, complex, str, bytes, bytearray, list, tuple, dict, set, frozenset,
collections.Counter / OrderedDict / defaultdict (its factory when a builtin type) / deque, the builtin types
themselves (`int`, `str`, ...), a namedtuple (rebuilt
here as a namedtuple of the same name and fields), fractions.Fraction, decimal.Decimal, range, dict views, and any
iterator (a generator, map, zip, ...: its first `MAX_ITEMS` items, replayed here by a generator that fails the test
if it is asked for more); subclasses of those cross as the type itself. Anything else is refused (the test fails).
An argument the program changes in place (a list it sorts, a dict it fills) is changed the same way on the test's
object. An exception the program raises reaches the test under its builtin name (a test expecting ValueError sees
one), except control flow (StopIteration, GeneratorExit, SystemExit, KeyboardInterrupt, ...): those fail the test,
so a program cannot end a test's `map` / `filter` / `zip` early. A test passes when it runs to its end having
called the program; the program's functions named like builtins (`sum`, `set`, `len`) do not replace the builtins
the test uses to check answers, and stand in for them only in a test that calls no other program function and
calls that name with literal arguments only (`assert sum(10, 15) == 25`, MBPP's task 126) or passes it by name
(`check(sum)`). The modules the program imported at its top level (`import sys`, not aliased) are there for the
tests too (as in MBPP, whose tests run in the program's namespace), when this process has already loaded them: it
never imports a module because a program names it.

Bounded work here, whatever the program answers: an answer is read up to MAX_REPLY bytes (plus the size of the
arguments sent, for changed arguments) and no longer than the sandbox's wall-clock limit; writing a test's
arguments waits no longer either (a program that stops reading is killed, and scored on the tests passed so far);
ints and fractions carry at most 4300 digits, a Decimal as many and an exponent within ±4300, a reply at most
MAX_SAME_HASH distinct values sharing one hash (a set or dict of hash-colliding values costs the square of their
number to build: such a reply is refused), at most 64 namedtuple types, nesting at most 64 deep; the fence is found
by a linear scan (`extract_code`).

A syntax error or a crash of the program's top level scores 0; so does a program that does not answer within the
wall-clock limit (timeouts are counted in `reward/<name>/timeouts`). Test and prelude code is trusted (it comes
from the dataset, like the reward's own code) and runs in this process: tests that pass the program values which
are not plain data (a callback, say) fail.
"""

from __future__ import annotations

import ast
import builtins
import collections
import concurrent.futures as cf
import json
import os
import re
import select
import sys

from .registry import RewardResult, reward_factory
from .sandbox import (
    SandboxLimits,
    SandboxProcess,
    isolation_problem,
    unavailable_message,
)

MAX_REPLY = 1 << 20  # bytes per answer from the sandbox

# The plain-data codec, [tag, payload] in JSON. The same source runs here and in the sandbox (the server encodes
# return values and decodes arguments with it); the program may tamper with its copy, but only `decode` here decides
# what a returned value is.
_CODEC = r"""
import collections, collections.abc, decimal, fractions, re
MAX_DEPTH = 64
MAX_ITEMS = 10000      # items taken from a returned iterator (an endless generator is cut there)
MAX_DIGITS = 4300      # of an int, a Fraction's terms, a Decimal's digits and exponent
MAX_SAME_HASH = 16     # distinct values one reply may hold with one hash
MAX_TUPLE_TYPES = 64   # namedtuple types one reply may name
SEQUENCES = {list: "l", tuple: "t", set: "S", frozenset: "F"}
FACTORIES = {f.__name__: f for f in (int, float, complex, str, bytes, bytearray, list, tuple, dict, set, frozenset,
                                     bool)}
_INT = re.compile(r"-?[0-9]{1,%d}" % MAX_DIGITS)
_TUPLE_TYPES = {}      # namedtuple classes made so far, (name, fields) -> class


class ProgramFailure(BaseException):
    "The test fails (a BaseException: a test's `except Exception` cannot swallow it, nor `map` take it for its end)."


def encode(v, depth=0):
    if depth > MAX_DEPTH:
        raise ValueError("nested too deeply")
    d, t = depth + 1, type(v)
    if v is None:
        return ["n", None]
    if t is bool:
        return ["b", v]
    if t is type and FACTORIES.get(v.__name__) is v:  # a builtin type as an argument (`isinstance(x, int)`)
        return ["T", v.__name__]
    if isinstance(v, int):
        return ["i", int.__repr__(v)]
    if isinstance(v, float):
        return ["f", float.__repr__(v)]
    if isinstance(v, complex):
        return ["c", [float.__repr__(v.real), float.__repr__(v.imag)]]
    if isinstance(v, str):
        return ["s", str.__str__(v)]
    if isinstance(v, bytes):
        return ["y", bytes.hex(v)]
    if isinstance(v, bytearray):
        return ["B", bytearray.hex(v)]
    if isinstance(v, dict):
        pairs = [[encode(k, d), encode(x, d)] for k, x in dict.items(v)]
        if isinstance(v, collections.Counter):
            return ["C", pairs]
        if isinstance(v, collections.OrderedDict):
            return ["O", pairs]
        if isinstance(v, collections.defaultdict):
            f = v.default_factory
            return ["D", [f.__name__ if FACTORIES.get(getattr(f, "__name__", None)) is f else None, pairs]]
        return ["d", pairs]
    if isinstance(v, tuple) and isinstance(getattr(t, "_fields", None), tuple):
        return ["N", [t.__name__, list(t._fields), [encode(x, d) for x in tuple.__iter__(v)]]]
    if isinstance(v, collections.deque):
        return ["q", [v.maxlen, [encode(x, d) for x in v]]]
    for base, tag in SEQUENCES.items():
        if isinstance(v, base):
            return [tag, [encode(x, d) for x in base.__iter__(v)]]
    if isinstance(v, fractions.Fraction):
        return ["Q", [str(v.numerator), str(v.denominator)]]
    if isinstance(v, decimal.Decimal):
        return ["E", str(v)]
    if isinstance(v, range):
        return ["r", [str(v.start), str(v.stop), str(v.step)]]
    if isinstance(v, collections.abc.KeysView):
        return ["K", [encode(x, d) for x in v]]
    if isinstance(v, collections.abc.ItemsView):
        return ["I", [[encode(k, d), encode(x, d)] for k, x in v]]
    if isinstance(v, collections.abc.ValuesView):
        return ["V", [encode(x, d) for x in v]]
    if isinstance(v, collections.abc.Iterator):
        items = []
        for x in v:
            if len(items) == MAX_ITEMS:
                return ["g", [False, items]]
            items.append(encode(x, d))
        return ["g", [True, items]]
    raise TypeError("not plain data: " + t.__name__)


def decode(x):
    "A plain value from its encoding; anything malformed or over a bound raises an Exception."
    return _Decoding().value(x, 0)


def _replay(items, complete):
    yield from items
    if not complete:
        raise ProgramFailure("the program's iterator was cut at %d items" % MAX_ITEMS)


class _Decoding:
    "One value's decoding, with the bounds that hold across all of it."

    def __init__(self):
        self.hashes, self.types = {}, {}

    def hashed(self, v):
        # Building a set or dict of values that share a hash compares each with all the others (quadratic), and the
        # hashes of ints, floats and tuples are easy to collide: a reply may hold MAX_SAME_HASH distinct ones per hash.
        try:
            h = hash(v)
        except TypeError:
            return v
        group = self.hashes.setdefault(h, [])
        for w in group:
            if w is v or w == v:
                return v
        if len(group) >= MAX_SAME_HASH:
            raise ValueError("too many distinct values with one hash")
        group.append(v)
        return v

    def tuple_type(self, name, fields):
        key = (name, tuple(fields))
        if key not in self.types:
            if len(self.types) >= MAX_TUPLE_TYPES or len(fields) > 255:
                raise ValueError("too many namedtuple types or fields")
            if key not in _TUPLE_TYPES:
                if len(_TUPLE_TYPES) >= 1024:
                    _TUPLE_TYPES.clear()
                _TUPLE_TYPES[key] = collections.namedtuple(name, fields)  # refuses names that are not identifiers
            self.types[key] = _TUPLE_TYPES[key]
        return self.types[key]

    def pairs(self, p, d):
        if not all(type(q) is list and len(q) == 2 for q in p):
            raise ValueError("malformed pairs")
        return [(self.value(k, d), self.value(v, d)) for k, v in p]

    def value(self, x, depth):
        if depth > MAX_DEPTH or not (type(x) is list and len(x) == 2 and type(x[0]) is str):
            raise ValueError("malformed value")
        (tag, p), d = x, depth + 1
        strs = type(p) is list and all(type(v) is str for v in p)
        if tag == "n" and p is None:
            return None
        if tag == "b" and type(p) is bool:
            return p
        if tag == "T" and type(p) is str and p in FACTORIES:
            return FACTORIES[p]
        if tag == "i" and type(p) is str and _INT.fullmatch(p):
            return self.hashed(int(p))
        if tag == "f" and type(p) is str and len(p) <= 64:
            return self.hashed(float(p))
        if tag == "c" and strs and len(p) == 2 and max(map(len, p)) <= 64:
            return self.hashed(complex(float(p[0]), float(p[1])))
        if tag == "s" and type(p) is str:
            return self.hashed(p)
        if tag == "y" and type(p) is str:
            return self.hashed(bytes.fromhex(p))
        if tag == "B" and type(p) is str:
            return bytearray.fromhex(p)
        if tag == "Q" and strs and len(p) == 2 and all(_INT.fullmatch(v) for v in p):
            return self.hashed(fractions.Fraction(int(p[0]), int(p[1])))
        if tag == "E" and type(p) is str and len(p) <= MAX_DIGITS + 16:
            v = decimal.Decimal(p)
            if v.is_snan() or (v.is_finite() and v and abs(v.adjusted()) > MAX_DIGITS):
                raise ValueError("Decimal out of bounds")
            return self.hashed(v)
        if tag == "r" and strs and len(p) == 3 and all(_INT.fullmatch(v) for v in p):
            return range(*map(int, p))
        if tag in SEQUENCES.values() and type(p) is list:
            items = [self.value(v, d) for v in p]
            if tag == "l":
                return items
            if tag == "S":
                return set(items)
            return self.hashed(tuple(items) if tag == "t" else frozenset(items))
        if tag == "N" and type(p) is list and len(p) == 3 and type(p[0]) is str and type(p[1]) is list \
                and all(type(f) is str for f in p[1]) and type(p[2]) is list and len(p[1]) == len(p[2]):
            cls = self.tuple_type(p[0], p[1])
            return self.hashed(cls._make([self.value(v, d) for v in p[2]]))
        if tag == "q" and type(p) is list and len(p) == 2 and (p[0] is None or type(p[0]) is int and p[0] >= 0) \
                and type(p[1]) is list:
            return collections.deque([self.value(v, d) for v in p[1]], p[0])
        if tag in ("d", "C", "O") and type(p) is list:
            pairs = self.pairs(p, d)
            return collections.Counter(dict(pairs)) if tag == "C" else (dict if tag == "d" else
                                                                       collections.OrderedDict)(pairs)
        if tag == "D" and type(p) is list and len(p) == 2 and (p[0] is None or p[0] in FACTORIES) \
                and type(p[1]) is list:
            return collections.defaultdict(FACTORIES.get(p[0]), self.pairs(p[1], d))
        if tag == "K" and type(p) is list:
            return dict.fromkeys([self.value(v, d) for v in p]).keys()
        if tag == "V" and type(p) is list:
            return dict(enumerate(self.value(v, d) for v in p)).values()
        if tag == "I" and type(p) is list:
            return dict(self.pairs(p, d)).items()
        if tag == "g" and type(p) is list and len(p) == 2 and type(p[0]) is bool and type(p[1]) is list \
                and len(p[1]) <= MAX_ITEMS:
            return _replay([self.value(v, d) for v in p[1]], p[0])
        raise ValueError("malformed value (tag %r)" % (tag,))
"""
_codec: dict = {}
exec(_CODEC, _codec)
encode, decode, ProgramFailure = _codec["encode"], _codec["decode"], _codec["ProgramFailure"]
MAX_DEPTH = _codec["MAX_DEPTH"]

_SERVER = _CODEC + r"""
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
send(["ready", [[k for k, v in ns.items() if callable(v) and not k.startswith("__")],
                {k: v.__name__ for k, v in ns.items() if type(v) is type(sys) and type(v.__name__) is str}]])
for line in rpc_in:
    name, args, kwargs = json.loads(line)
    try:
        a = [decode(x) for x in args]
        k = {key: decode(x) for key, x in kwargs.items()}
        value = ns[name](*a, **k)
        # the arguments it changed in place, so that the test sees the change on its own objects
        changed = [[i, e] for i, e in enumerate(map(encode, a)) if e != args[i]]
        changed += [[key, e] for key, e in ((key, encode(v)) for key, v in k.items()) if e != kwargs[key]]
        reply = ["ok", [encode(value), changed]]
    except BaseException as e:
        reply = ["raise", type(e).__name__]
    send(reply)
"""


class ProgramTimeout(BaseException):
    """The program did not answer in time (a BaseException: a test's `except Exception` cannot swallow it)."""


class ProgramGone(BaseException):
    """The program's process ended or answered something malformed."""


def _exception(name: str) -> BaseException:
    """The builtin exception of that name (so tests that expect a ValueError see one); control flow
    (StopIteration, SystemExit, ...) and unknown names fail the test."""
    cls = getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception) and not issubclass(cls, (StopIteration,
                                                                                      StopAsyncIteration)):
        try:
            return cls(f"raised by the program: {name}")
        except Exception:  # one that needs more arguments (UnicodeDecodeError)
            return RuntimeError(f"raised by the program: {name}")
    return ProgramFailure(f"the program raised {name}")


_MUTABLE = (list, dict, set, bytearray, collections.deque, tuple)  # tuple: for the containers inside it


def _update(old, new, depth: int = 0) -> None:
    """Make on `old` (the test's argument) the in-place change the program made on its copy, `new`: containers inside
    it keep their identity where the shape allows."""
    if depth > MAX_DEPTH:
        return
    if isinstance(old, list) and type(new) is list:
        if len(old) != len(new):
            old[:] = new
            return
        for i, n in enumerate(new):
            if _same_kind(old[i], n):
                _update(old[i], n, depth + 1)
            else:
                old[i] = n
    elif isinstance(old, dict) and isinstance(new, dict):
        if old.keys() != new.keys():
            old.clear()
            old.update(new)
            return
        for key, n in new.items():
            if _same_kind(old[key], n):
                _update(old[key], n, depth + 1)
            else:
                old[key] = n
    elif isinstance(old, set) and isinstance(new, (set, frozenset)):
        old.clear()
        old.update(new)
    elif isinstance(old, bytearray) and isinstance(new, (bytes, bytearray)):
        old[:] = new
    elif isinstance(old, collections.deque) and isinstance(new, collections.deque):
        old.clear()
        old.extend(new)
    elif isinstance(old, tuple) and isinstance(new, tuple) and len(old) == len(new):
        for o, n in zip(old, new):
            if _same_kind(o, n):
                _update(o, n, depth + 1)


def _same_kind(old, new) -> bool:
    return any(isinstance(old, k) and isinstance(new, k) for k in _MUTABLE) and not isinstance(old, (str, bytes))


def _ready(fd: int, event: int, seconds: float) -> bool:
    """Whether `fd` is ready for `event` (or hung up) within `seconds` (poll: a trainer's fds may pass 1024)."""
    poller = select.poll()
    poller.register(fd, event)
    return bool(poller.poll(max(1, int(seconds * 1000))))


class _Program:
    """The program running in the sandbox, called through its pipes; no wait outlasts the sandbox's wall clock."""

    def __init__(self, box: SandboxProcess):
        self.box, self.buffer, self.calls = box, b"", 0
        self.stdin, self.stdout = box.proc.stdin.fileno(), box.proc.stdout.fileno()
        os.set_blocking(self.stdin, False)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            left = self.box.remaining()
            if left <= 0:
                raise ProgramTimeout()
            if not _ready(self.stdin, select.POLLOUT, left):
                raise ProgramTimeout()  # it stopped reading
            try:
                view = view[os.write(self.stdin, view):]
            except BlockingIOError:
                continue
            except OSError:  # BrokenPipeError
                raise ProgramGone("the program's process ended") from None

    def _read(self, limit: int = MAX_REPLY):
        while b"\n" not in self.buffer:
            left = self.box.remaining()
            if left <= 0:
                raise ProgramTimeout()
            if not _ready(self.stdout, select.POLLIN, left):
                raise ProgramTimeout()
            chunk = os.read(self.stdout, 65536)
            if not chunk:
                raise ProgramGone("the program's process ended")
            self.buffer += chunk
            if len(self.buffer) > limit:
                raise ProgramGone("answer too large")
        line, self.buffer = self.buffer.split(b"\n", 1)
        try:
            msg = json.loads(line)
        except (ValueError, RecursionError):  # RecursionError: nested too deeply for the parser
            raise ProgramGone("malformed answer") from None
        if not (isinstance(msg, list) and len(msg) == 2 and isinstance(msg[0], str)):
            raise ProgramGone("malformed answer")
        return msg

    def start(self) -> tuple[list[str], dict[str, str]] | None:
        """Names of the program's top-level callables, and of the modules it imported (name -> module), or None
        when its top level failed."""
        kind, payload = self._read()
        if kind != "ready" or not (isinstance(payload, list) and len(payload) == 2 and isinstance(payload[0], list)
                                   and isinstance(payload[1], dict)):
            return None
        names, modules = payload
        return ([n for n in names if isinstance(n, str) and n.isidentifier()],
                {k: v for k, v in modules.items() if k.isidentifier() and isinstance(v, str)})

    def call(self, name: str, args: tuple, kwargs: dict):
        request = json.dumps([name, [encode(a) for a in args], {k: encode(v) for k, v in kwargs.items()}]).encode()
        self._write(request + b"\n")
        self.calls += 1
        kind, payload = self._read(MAX_REPLY + len(request))
        if kind == "ok":
            try:
                value, changed = payload
                result = decode(value)
                updates = [(args[i] if type(i) is int else kwargs[i], decode(new)) for i, new in changed
                           if type(i) is int and 0 <= i < len(args) or type(i) is str and i in kwargs]
            except Exception:  # malformed, or over a bound
                raise TypeError("the program returned something that is not plain data") from None
            for old, new in updates:
                _update(old, new)
            return result
        if kind == "raise" and isinstance(payload, str):
            raise _exception(payload)
        raise ProgramGone("malformed answer")


def _proxy(program: _Program, name: str):
    def call(*args, **kwargs):
        return program.call(name, args, kwargs)

    call.__name__ = name
    return call


_WS = re.compile(r"\s*")


def extract_code(text: str) -> str:
    """The last fenced code block, else the text itself."""
    blocks = fenced_blocks(text)
    return blocks[-1] if blocks else text


def fenced_blocks(text: str) -> list[str]:
    r"""What `re.findall(r"```(?:python|py)?\s*\n(.*?)```", text, re.DOTALL)` returns, found in linear time (that
    regex backtracks quadratically over a fence followed by a long run of whitespace)."""
    blocks, i = [], text.find("```")
    while i >= 0:
        start = None
        for tag in ("python", "py", ""):  # the alternatives in the regex's order
            if text.startswith(tag, i + 3):
                k = i + 3 + len(tag)
                newline = text.rfind("\n", k, _WS.match(text, k).end())  # \s* backs off to its last newline
                if newline >= 0:
                    start = newline + 1
                    break
        if start is None:
            i = text.find("```", i + 1)
            continue
        end = text.find("```", start)
        if end < 0:  # no fence closes it, nor any later one
            break
        blocks.append(text[start:end])
        i = text.find("```", end + 3)
    return blocks


def _names(tree: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}


def _literal(node: ast.AST) -> bool:
    try:
        ast.literal_eval(node)
        return True
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False


def _under_test(tree: ast.AST, candidates: set[str]) -> set[str]:
    """The names of `candidates` that the test uses only as a function under test: called with literal arguments
    only (`sum(10, 15)`), or passed by name to a call (`check(sum)`); never applied to a computed value."""
    ok, bad = set(), set()
    calls = {id(a) for n in ast.walk(tree) if isinstance(n, ast.Call) for a in n.args if isinstance(a, ast.Name)}
    funcs = {}
    for n in ast.walk(tree):
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name):
            funcs[id(n.func)] = all(_literal(a) for a in [*n.args, *(k.value for k in n.keywords)])
    for n in ast.walk(tree):
        if isinstance(n, ast.Name) and n.id in candidates:
            (ok if funcs.get(id(n), id(n) in calls) else bad).add(n.id)
    return ok - bad


def _run_test(code, setup, program: _Program, names: list[str], modules: dict) -> tuple[bool, int]:
    """Whether the test ran to its end with `names` bound to the program's functions (and `modules` to the modules
    the program imported under those names), and how many calls it made."""
    ns: dict = {"__name__": "test"}
    start = program.calls
    try:
        if setup is not None:
            exec(setup, ns)
        for n in names:
            ns.setdefault(n, _proxy(program, n))  # what the prompt defines stays the prompt's
        for n, module in modules.items():
            ns.setdefault(n, module)
        exec(code, ns)
        ok = True
    except (Exception, ProgramFailure):
        ok = False
    return ok, program.calls - start


def run_tests(program: str, tests: list[str], limits: SandboxLimits, isolation: str = "os",
              prelude: str = "") -> tuple[float, bool]:
    """(share of tests passed, timed out). `prelude`: trusted code the prompt gives (see the module docstring)."""
    if not tests:
        return 0.0, False
    setup = compile(prelude, "prelude.py", "exec") if prelude else None
    parsed = []
    for test in tests:
        try:
            tree = ast.parse(test, "test.py")
            parsed.append((tree, compile(tree, "test.py", "exec")))
        except (SyntaxError, ValueError):
            parsed.append(None)  # fails
    referenced = set().union(*(_names(p[0]) for p in parsed if p), _names(ast.parse(prelude)) if prelude else ())
    passed, timed_out = 0, False
    files = {"solution.py": f"{prelude}\n{program}" if prelude else program, "server.py": _SERVER}
    with SandboxProcess(files, "server.py", limits, isolation) as box:
        remote = _Program(box)
        try:
            ready = remote.start()
        except ProgramTimeout:
            return 0.0, True
        except ProgramGone:
            ready = None
        if ready is None:
            return 0.0, False
        names = sorted(set(ready[0]) & referenced)
        # the tests see the program's imports (MBPP's `sys.getsizeof(...)` after the program's `import sys`): under
        # their own names (no alias), already loaded here; never an import the program would make this process run
        modules = {n: sys.modules[m] for n, m in ready[1].items() if n == m and n in referenced and m in sys.modules}
        # a program's `len` or `set` would otherwise stand in for the builtin a test checks answers with
        plain = [n for n in names if not hasattr(builtins, n)]
        like_builtins = set(names) - set(plain)
        for item in parsed:
            if item is None:
                continue
            tree, code = item
            try:
                ok, calls = _run_test(code, setup, remote, plain, modules)
                if not calls and like_builtins:
                    shadow = _under_test(tree, like_builtins)
                    if shadow:
                        ok, calls = _run_test(code, setup, remote, plain + sorted(shadow), modules)
                passed += ok and calls > 0  # a test that never called the program did not judge it
            except ProgramTimeout:
                timed_out = True
                break
            except ProgramGone:
                break
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

    def score(prompts, completions, tests=None, prelude=None, **_) -> RewardResult:
        tests = [None] * len(completions) if tests is None else tests
        rows = [i for i, t in enumerate(tests) if t is not None]  # all of them unless skip_missing
        test_lists = [json.loads(tests[i]) if isinstance(tests[i], str) else list(tests[i]) for i in rows]
        preludes = [(prelude[i] if prelude is not None else None) or "" for i in rows]
        for i, code in zip(rows, preludes):
            try:
                compile(code, "prelude.py", "exec")
            except (SyntaxError, ValueError, TypeError) as e:
                raise ValueError(f"row {i + 1}: column 'prelude' is not Python code ({e})") from None
        with cf.ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(lambda a: run_tests(extract_code(a[0]), a[1], limits, isolation, a[2]),
                                    zip([completions[i] for i in rows], test_lists, preludes)))
        scores: list[float | None] = [None] * len(completions)
        for i, r in zip(rows, results):
            scores[i] = r[0]
        return RewardResult(scores, {"timeouts": float(sum(r[1] for r in results))})

    score.required_columns = [] if skip_missing else ["tests"]
    return score
