"""The code reward's trusted side (issue 37): bounded work whatever the program answers, and scores as the reference
graders give them (forged passes fail, honest Counter / namedtuple / generator / in-place / prompt-helper programs
pass)."""

import collections
import decimal
import fractions
import random
import re
import time

import pytest

from align.run.data import load_prompts
from rewards.code import MAX_REPLY, decode, encode, extract_code, fenced_blocks, run_tests
from rewards.sandbox import SandboxLimits, isolation_problem

from .conftest import write_jsonl

LIMITS = SandboxLimits(wall_s=5, cpu_s=2, memory_mb=256, file_mb=4)
sandboxed = pytest.mark.skipif(isolation_problem() is not None, reason=str(isolation_problem()))
P = 2**61 - 1  # hash(i * P) == 0 for every int i


def score(program: str, tests: list[str], prelude: str = "", limits: SandboxLimits = LIMITS) -> float:
    return run_tests(program, tests, limits, prelude=prelude)[0]


# ------------------------------------------------------------------------------------------- bounded work here


def test_hash_colliding_values_are_refused_before_any_set_is_built():
    colliding = [["i", str(i * P)] for i in range(30000)]
    assert len(str(["S", colliding])) < MAX_REPLY
    for tag in ("S", "F", "l", "t"):  # a list too: the test could build the set (`set(f(x))`)
        t = time.perf_counter()
        with pytest.raises(ValueError, match="one hash"):
            decode([tag, colliding])
        assert time.perf_counter() - t < 1.0
    with pytest.raises(ValueError, match="one hash"):
        decode(["d", [[["i", str(i * P)], ["n", None]] for i in range(30000)]])
    # the same value many times, or many values: fine
    assert decode(encode([0] * 100000)) == [0] * 100000
    assert decode(encode(set(range(100000)))) == set(range(100000))
    assert decode(encode({i * P for i in range(16)})) == {i * P for i in range(16)}


@sandboxed
def test_a_program_sending_colliding_values_scores_0_fast():
    program = ("import __main__\ndef f():\n    __main__.send(['ok', [['S', [['i', str(i * (2**61 - 1))] "
               "for i in range(28000)]], []]])\n    import time; time.sleep(100)\n")
    t = time.monotonic()
    assert run_tests(program, ["assert f() == {1}"], LIMITS) == (0.0, False)
    assert time.monotonic() - t < 4.0


def test_extract_code_is_linear():
    for text in ("```\n" + "\n" * 65536 + "x", "```python" + " \n" * 65536, "```" * 30000, "```py\n" * 30000):
        t = time.perf_counter()
        extract_code(text)
        assert time.perf_counter() - t < 0.5, text[:12]


def test_fenced_blocks_match_the_regex_they_replace():
    regex = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.DOTALL)  # quadratic; fine on short strings
    rng = random.Random(0)
    alphabet = ["`", "```", "python", "py", "p", "\n", " ", "\t", "x", "3"]
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))
        assert fenced_blocks(text) == regex.findall(text), repr(text)
    assert extract_code("```python\na = 1\n```\ntext\n```py\nb = 2\n```") == "b = 2\n"
    assert extract_code("```python3\nx\n```") == "```python3\nx\n```"  # no block: the text itself


@sandboxed
def test_a_program_that_stops_reading_is_killed_and_scored_on_what_passed():
    # Answers the first call, then never reads again: the second test's 800 KB argument fills the pipe.
    program = ("import __main__\ndef f(x):\n    __main__.send(['ok', [['i', '1'], []]])\n"
               "    import time; time.sleep(100)\n")
    tests = ["assert f(1) == 1", "assert f([0] * 200000) == 1", "assert f(2) == 1"]
    limits = SandboxLimits(wall_s=3, cpu_s=2)
    t = time.monotonic()
    assert run_tests(program, tests, limits) == (pytest.approx(1 / 3), True)
    assert time.monotonic() - t < limits.wall_s + 2


@sandboxed
def test_large_arguments_still_reach_a_reading_program():
    assert score("def f(x):\n    return len(x)", ["assert f([0] * 200000) == 200000"]) == 1.0


# ------------------------------------------------------------------------------------------ forged passes fail


@sandboxed
@pytest.mark.parametrize("exc", ["StopIteration", "StopAsyncIteration", "GeneratorExit", "KeyboardInterrupt",
                                 "SystemExit"])
def test_control_flow_raised_by_the_program_fails_the_test(exc):
    program = f"def double(x):\n    raise {exc}\n"
    tests = ["assert all(map(lambda x: double(x) == 2 * x, [1, 2, 3]))",
             "assert list(filter(lambda x: double(x) != 2 * x, [1, 2])) == []",
             "try:\n    double(1)\nexcept Exception:\n    pass\nassert double(2) == 4"]
    assert score(program, tests) == 0.0


@sandboxed
def test_ordinary_exceptions_keep_their_names():
    program = "def f(x):\n    raise KeyError(x)\n"
    assert score(program, ["try:\n    f(1)\nexcept KeyError:\n    pass\nelse:\n    raise AssertionError"]) == 1.0


SUM_TESTS = ["assert sum([1, 2, 3]) == 6", "assert sum([]) == 0"]  # the task's function is named like the builtin


@sandboxed
@pytest.mark.parametrize("program,expected", [
    ("def sum(xs):\n    t = 0\n    for x in xs:\n        t += x\n    return t\n", 1.0),   # honest
    ("def sum(xs):\n    return None\n", 0.0),                                           # wrong
    ("def other():\n    pass\n", 0.0),                      # no `sum` at all: the builtin must not pass for it
])
def test_a_task_named_like_a_builtin_is_judged_on_the_programs_function(program, expected):
    assert score(program, SUM_TESTS) == expected


@sandboxed
def test_builtin_named_functions_cannot_replace_the_tests_checks():
    # MBPP shape: `set` applied to the answer. The program's `set` must not be the one the test calls.
    forged = "def common(a, b):\n    return None\ndef set(*a):\n    return 0\n"
    tests = ["assert set(common((3, 4, 5), (4, 5, 7))) == set((4, 5))"]
    assert score(forged, tests) == 0.0
    assert score("def common(a, b):\n    return [x for x in a if x in b]\n", tests) == 1.0
    # a builtin-named task function applied to a computed value is not taken for the function under test
    forged = "def max(xs):\n    return None\ndef sorted(x):\n    return [1, 2]\n"
    assert score(forged, ["assert sorted(max([[2, 1], [0]])) == [1, 2]"]) == 0.0
    # MBPP task 126 (`sum`, the sum of common divisors), its reference solution
    mbpp126 = ("def sum(a,b):\n    sum = 0\n    for i in range (1,min(a,b)):\n        if (a % i == 0 and b % i == 0):\n"
               "            sum += i\n    return sum")
    assert score(mbpp126, ["assert sum(10,15) == 6", "assert sum(100,150) == 93", "assert sum(4,6) == 3"]) == 1.0


@sandboxed
def test_a_test_that_never_calls_the_program_does_not_pass():
    assert score("def add(a, b):\n    return a + b\n", ["assert 1 + 1 == 2", "assert add(1, 1) == 2"]) == 0.5


# --------------------------------------------------------------------------------- honest programs score 1


@sandboxed
def test_counter_namedtuple_and_other_collections_cross_with_their_types():
    program = ("from collections import Counter, namedtuple, OrderedDict, defaultdict, deque\n"
               "from fractions import Fraction\nfrom decimal import Decimal\n"
               "Point = namedtuple('Point', 'x y')\n"
               "def count(s):\n    return Counter(s)\n"
               "def mid(a, b):\n    return Point((a[0] + b[0]) / 2, (a[1] + b[1]) / 2)\n"
               "def groups(xs):\n    d = defaultdict(list)\n    for x in xs:\n        d[x % 2].append(x)\n    return d\n"
               "def others():\n    return (OrderedDict(b=1, a=2), deque([1, 2], maxlen=3), Fraction(1, 3), "
               "Decimal('1.10'), range(1, 7, 2), {'a': 1}.keys(), {'a': 1}.values(), {'a': 1}.items())\n")
    tests = ["assert count('abca') == {'a': 2, 'b': 1, 'c': 1}",
             "from collections import Counter\nassert count('aab') == Counter(a=2, b=1)",
             "assert count('aab').most_common(1) == [('a', 2)] and count('x')['y'] == 0",
             "assert mid((0, 0), (2, 4)) == (1, 2) and mid((0, 0), (2, 4)).y == 2",
             "assert type(mid((0, 0), (2, 2))).__name__ == 'Point' and mid((0, 0), (2, 2))._fields == ('x', 'y')",
             "g = groups([1, 2, 3])\nassert g == {1: [1, 3], 0: [2]} and g[5] == []",
             "from collections import OrderedDict, deque\nfrom fractions import Fraction\nfrom decimal import Decimal\n"
             "o, q, f, d, r, k, v, i = others()\n"
             "assert o == OrderedDict(b=1, a=2) and o != OrderedDict(a=2, b=1)\n"
             "assert q == deque([1, 2]) and q.maxlen == 3 and q != [1, 2]\n"
             "assert f == Fraction(1, 3) and str(d) == '1.10' and r == range(1, 7, 2)\n"
             "assert k == {'a'} and list(v) == [1] and i == {('a', 1)}"]
    assert score(program, tests) == 1.0


@sandboxed
def test_generators_and_iterators_are_replayed_here():
    program = ("import itertools\n"
               "def evens(n):\n    for i in range(n):\n        if i % 2 == 0:\n            yield i\n"
               "def naturals():\n    n = 0\n    while True:\n        yield n\n        n += 1\n"
               "def pairs(a, b):\n    return zip(a, b)\n")
    tests = ["assert list(evens(5)) == [0, 2, 4]", "assert next(evens(5)) == 0", "assert sum(evens(7)) == 12",
             "assert evens(3) != [0, 2]",  # a generator is not a list, there as here
             "import itertools\nassert list(itertools.islice(naturals(), 5)) == [0, 1, 2, 3, 4]",
             "assert dict(pairs('ab', [1, 2])) == {'a': 1, 'b': 2}"]
    assert score(program, tests) == 1.0
    # an endless generator is cut at MAX_ITEMS: asking for more fails the test (it never looks finite)
    assert score(program, ["assert len(list(naturals())) > 0"]) == 0.0


@sandboxed
def test_in_place_changes_reach_the_tests_objects():
    program = ("def sort_in_place(xs):\n    xs.sort()\n"
               "def fill(d, key=None):\n    d[key] = 1\n"
               "def add_to(s, b):\n    s.add(1)\n    b.extend(b'!')\n")
    tests = ["xs = [3, 1, 2]\nsort_in_place(xs)\nassert xs == [1, 2, 3]",
             "rows = [[2, 1], [4, 3]]\nrow = rows[1]\nfor r in rows:\n    sort_in_place(r)\n"
             "assert rows == [[1, 2], [3, 4]] and row is rows[1] and row == [3, 4]",
             "d = {}\nfill(d, key='k')\nassert d == {'k': 1}",
             "s, b = set(), bytearray(b'a')\nadd_to(s, b)\nassert s == {1} and b == bytearray(b'a!')",
             "t = ([3, 1],)\nsort_in_place(t[0])\nassert t == ([1, 3],)"]
    assert score(program, tests) == 1.0
    # returning the sorted list without changing the argument is not sorting in place
    assert score("def sort_in_place(xs):\n    return sorted(xs)\n", tests[:1]) == 0.0


ENCODE_CYCLIC = ("def encode_cyclic(s: str):\n"
                 "    groups = [s[(3 * i):min((3 * i + 3), len(s))] for i in range((len(s) + 2) // 3)]\n"
                 "    groups = [(group[1:] + group[0]) if len(group) == 3 else group for group in groups]\n"
                 "    return ''.join(groups)\n")
CHECK_CYCLIC = ("def check(candidate):\n    for s in ['abcdefg', 'xy', 'hello world']:\n"
                "        assert candidate(encode_cyclic(s)) == s\n\ncheck(decode_cyclic)\n")


@sandboxed
def test_helpers_the_prompt_defines_are_there_for_the_program_and_stay_the_prompts_in_the_test():
    honest = "def decode_cyclic(s: str):\n    return encode_cyclic(encode_cyclic(s))\n"
    assert score(honest, [CHECK_CYCLIC], prelude="from typing import List\n" + ENCODE_CYCLIC) == 1.0
    assert score(honest, [CHECK_CYCLIC]) == 0.0  # without the prelude: a NameError, there and here
    # the program's own encode_cyclic is its own business: the test keeps the prompt's
    forged = "def encode_cyclic(s):\n    return s\ndef decode_cyclic(s):\n    return s\n"
    assert score(forged, [CHECK_CYCLIC], prelude=ENCODE_CYCLIC) == 0.0


def test_humaneval_format_gives_the_prompts_helpers_as_prelude(tmp_path):
    prompt = "from typing import List\n\n\n" + ENCODE_CYCLIC + '\n\ndef decode_cyclic(s: str):\n    """Undo it."""\n'
    row = {"task_id": "HumanEval/38", "prompt": prompt, "entry_point": "decode_cyclic",
           "canonical_solution": "    return encode_cyclic(encode_cyclic(s))\n",
           "test": CHECK_CYCLIC.rsplit("\n\ncheck", 1)[0]}
    path = write_jsonl(tmp_path / "he.jsonl", [row])
    columns = load_prompts(f"{path}#format=humaneval")[0].columns
    assert columns["prelude"] == "from typing import List\n" + ENCODE_CYCLIC


# ----------------------------------------------------------------------------------------- the codec's bounds


@pytest.mark.parametrize("payload", [
    ["i", "1" * 4301], ["E", "1e5000"], ["E", "sNaN"], ["f", "1" * 65], ["Q", ["1", "0"]],
    ["N", ["not a name", ["x"], [["n", None]]]], ["N", ["P", ["_x"], [["n", None]]]], ["N", ["P", ["x"], []]],
    ["g", [True, "x"]], ["D", ["print", []]], ["r", ["0", "1", "0"]], ["q", [-1, []]], ["x", 1],
])
def test_malformed_or_unbounded_values_are_refused(payload):
    with pytest.raises(Exception):
        decode(payload)


def test_too_many_namedtuple_types_are_refused():
    many = ["l", [["N", [f"T{i}", ["x"], [["n", None]]]] for i in range(65)]]
    with pytest.raises(ValueError, match="namedtuple"):
        decode(many)


def test_the_codec_round_trips_the_types_it_carries():
    Point = collections.namedtuple("Point", "x y")
    values = [None, True, 3, -2.5, complex(1, 2), "s", b"b", bytearray(b"ba"), [1, (2, 3)], {1: {2}}, frozenset([4]),
              collections.Counter("aab"), collections.OrderedDict(a=1), collections.deque([1], maxlen=2),
              fractions.Fraction(2, 3), decimal.Decimal("0.1"), range(3), Point(1, 2)]
    for v in values:
        back = decode(encode(v))
        assert back == v and type(back).__name__ == type(v).__name__, v
    dd = decode(encode(collections.defaultdict(int, a=1)))
    assert dd == {"a": 1} and dd["z"] == 0
    gen = decode(encode(iter([1, 2])))
    assert next(gen) == 1 and list(gen) == [2]


@sandboxed
def test_the_programs_imports_and_builtin_types_reach_the_tests():
    # MBPP 596 and 533: the test uses the program's `import sys`; a builtin type is an argument
    program = ("import sys\ndef tuple_size(t):\n    return sys.getsizeof(t)\n"
               "def remove_datatype(t, data_type):\n    return [e for e in t if not isinstance(e, data_type)]\n")
    tests = ['assert tuple_size(("A", 1, "B", 2)) == sys.getsizeof(("A", 1, "B", 2))',
             "assert remove_datatype((4, 5, 7.7, 1.2), int) == [7.7, 1.2]"]
    assert score(program, tests) == 1.0
    # an alias is not bound (a program cannot swap the module a test checks with)
    assert score("import cmath as math\ndef f():\n    return 1.0\n", ["assert math.isclose(f(), 1.0)"]) == 0.0
