"""Reading the final answer out of text: a model's completion, a dataset's worked solution.

`extract_answer` is what RM_reasoning and evaluation compare against a row's `answer`; `gsm8k_answer` and
`last_boxed` also read the answers of the GSM8K / MATH datasets (align/run/formats.py maps those fields with them).
`bounded` says whether an answer is small enough to parse and compare at all, `number` / `same_answer` compare
numbers exactly. Pure functions on strings, standard library only (the math reward's worker processes load this file
by path, without the `rewards` package).

The policy is optimised against these checks, so an answer is bounded before any arithmetic: `Fraction` (and sympy
after it) builds every number an answer writes, and `\\boxed{1e100000000}` (20 characters) or `9^{9^{9^9}}` would be a
10^8-digit integer or never end. `bounded` estimates, with float arithmetic on at most MAX_ANSWER_CHARS characters,
the size of every number the answer denotes (literals, `e` exponents, powers and towers of them, factorials, Γ,
binomials) and refuses one past 10^MAX_DIGITS, or an exponent past MAX_DIGITS, without building it.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

_GSM8K_FINAL = re.compile(r"####\s*([^\n]*?)\s*$", re.MULTILINE)
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def gsm8k_answer(solution: str) -> str | None:
    """The answer after the last '####' of a GSM8K solution, thousands separators removed ('1,000' -> '1000')."""
    found = _GSM8K_FINAL.findall(solution)
    if not found or not found[-1]:
        return None
    return _THOUSANDS.sub("", found[-1])


def last_boxed(text: str) -> str | None:
    """The contents of the last \\boxed{...} (or \\fbox{...}) in `text`, nested braces balanced and escaped ones
    (\\{ \\}) not counted; `\\boxed 5` gives '5'. None when there is none, it is empty or its braces never close."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\b", text)]
    if not starts:
        return None
    i = starts[-1]
    while i < len(text) and text[i] == " ":
        i += 1
    if i == len(text):
        return None
    if text[i] != "{":
        word = re.match(r"[^\s$]+", text[i:])
        return word.group(0) if word else None
    depth, j = 0, i
    while j < len(text):
        c = text[j]
        if c == "\\":
            j += 2
            continue
        depth += {"{": 1, "}": -1}.get(c, 0)
        if depth == 0:
            inner = text[i + 1: j].strip()
            return inner or None
        j += 1
    return None


_ANSWER = re.compile(r"Answer\s*:\s*([^\n]*)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")


def extract_answer(text: str) -> str | None:
    """The final answer: the last \\boxed{...} (braces nested to any depth), else the last "Answer: ...", else the
    last number."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.rstrip(".").strip()
    found = _ANSWER.findall(text)
    if found:
        return found[-1].strip().rstrip(".").strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


# ---- bounds before any arithmetic -------------------------------------------------------------------------------

MAX_ANSWER_CHARS = 200  # a final answer longer than this is wrong, never parsed
MAX_DIGITS = 10_000     # no number an answer denotes may pass 10^MAX_DIGITS, nor an exponent MAX_DIGITS
MAX_NESTING = 50        # braces / parentheses nested deeper than this: wrong (the parsers recurse)

_TOKEN = re.compile(r"(\d+\.?\d*|\.\d+)((?:[eE][+-]?\d+)?)|\\[a-zA-Z]+|\\.|\*\*|\s+|.", re.DOTALL)
_OPEN = {"{": "}", "(": ")", "[": "]"}
_SKIP = {"\\left", "\\right", "\\big", "\\Big", "\\bigg", "\\Bigg", "\\displaystyle", "\\,", "\\;", "\\:", "\\!",
         "\\ ", "$"}
_FRAC = {"\\frac", "\\dfrac", "\\tfrac", "\\cfrac"}
_BINOM = {"\\binom", "\\dbinom", "\\tbinom"}
_OPERATORS = {*"}])+-*/,=<>;:|_&", "\\cdot", "\\times", "\\div", "\\pm", "\\mp"}
_LOG2 = math.log10(2)


class _TooLarge(Exception):
    pass


def _literal(digits: str, exponent: str) -> float:
    """log10 of a bound on a literal's numerator and denominator ('12.5', '1e-3'), without building it."""
    whole, _, frac = digits.partition(".")
    whole = whole.lstrip("0")
    e = abs(int(exponent[1:])) if exponent else 0  # at most MAX_ANSWER_CHARS digits: a small int to read
    if e > MAX_DIGITS:
        raise _TooLarge
    if not frac and not e and len(whole) <= 15:
        return math.log10(int(whole)) if whole else 0.0
    return len(whole) + len(frac) + e


def _power(base: float | None, exponent: float | None) -> float | None:
    """log10 bound of base^exponent from the operands' log10 bounds (None: symbolic)."""
    if exponent is None:
        return None
    if exponent > math.log10(MAX_DIGITS):  # an exponent past MAX_DIGITS, whatever its base
        raise _TooLarge
    if base is None:
        return None
    size = 10 ** exponent * base
    if size > MAX_DIGITS:
        raise _TooLarge
    return size


def _factorial(n: float | None) -> float | None:
    if n is None:
        return None
    if n > math.log10(MAX_DIGITS):
        raise _TooLarge
    size = 10 ** n * max(n, _LOG2)  # log10(n!) <= n log10(n)
    if size > MAX_DIGITS:
        raise _TooLarge
    return size


class _Sizes:
    """A recursive descent over an answer's tokens that only estimates: log10 of a bound on each (sub)expression's
    magnitude, None where a symbol makes it unknown. Raises _TooLarge at the first number past the bounds. Total:
    any token sequence is read to its end (unknown tokens are symbols or operators)."""

    def __init__(self, text: str):
        self.tokens = [m for m in _TOKEN.finditer(text) if not m.group(0).isspace() and m.group(0) not in _SKIP]
        self.i = 0
        self.depth = 0

    def peek(self) -> str | None:
        return self.tokens[self.i].group(0) if self.i < len(self.tokens) else None

    def expr(self, close: str | None = None) -> float | None:
        """Terms up to `close` (consumed) or the end: their sizes summed (a bound on sums and products alike)."""
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise _TooLarge
        sizes: list[float | None] = []
        while (tok := self.peek()) is not None and tok != close:
            if tok in _OPERATORS:
                self.i += 1  # an operator, or a closer without its opener
                continue
            sizes.append(self.term())
        if tok == close:
            self.i += 1
        self.depth -= 1
        if None in sizes:
            return None
        return sum(sizes) + _LOG2 * max(0, len(sizes) - 1)  # |a ± b|, |a b| <= 2 max(1, |a|) max(1, |b|)

    def term(self) -> float | None:
        size = self.primary()
        while (tok := self.peek()) in ("^", "**", "!"):
            self.i += 1
            if tok == "!":
                while self.peek() == "!":  # n!! is bounded by n!
                    self.i += 1
                size = _factorial(size)
            else:
                size = _power(size, self.exponent())
        return size

    def exponent(self) -> float | None:
        """A power's exponent: one primary, and (right-associative) the powers on top of it."""
        size = self.primary()
        if self.peek() in ("^", "**"):
            self.i += 1
            self.depth += 1
            if self.depth > MAX_NESTING:
                raise _TooLarge
            size = _power(size, self.exponent())
            self.depth -= 1
        return size

    def primary(self) -> float | None:
        tok = self.peek()
        if tok is None or tok in "}])":
            return None
        m = self.tokens[self.i]
        self.i += 1
        if m.group(1):
            return _literal(m.group(1), m.group(2))
        if tok in _OPEN:
            return self.expr(_OPEN[tok])
        if tok in _FRAC:
            num, den = self.primary(), self.primary()
            return None if num is None or den is None else num + den
        if tok in _BINOM:  # C(n, k) <= 2^n
            n, _ = self.primary(), self.primary()
            return _power(_LOG2, n)
        if tok == "\\Gamma":  # Γ(n) = (n-1)!
            return _factorial(self.primary())
        if tok == "\\sqrt":
            if self.peek() == "[":
                self.primary()
            return self.primary()
        return None  # a symbol (x, \pi) or an unknown token


def bounded(text: str) -> bool:
    """Whether an answer is small enough to parse and compare: at most MAX_ANSWER_CHARS characters, no number it
    denotes past 10^MAX_DIGITS, no exponent past MAX_DIGITS, braces nested at most MAX_NESTING deep."""
    if len(text) > MAX_ANSWER_CHARS:
        return False
    sizes = _Sizes(text)
    try:
        while sizes.peek() is not None:
            sizes.expr()
    except _TooLarge:
        return False
    return True


def number(text: str) -> Fraction | None:
    """The exact number `text` writes ('1,024', '$3', '0.5', '1/2', '2e3'), None if it is not one or not bounded."""
    text = text.replace(",", "").replace("$", "").strip()
    if not bounded(text):
        return None
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def same_answer(predicted: str | None, reference: str) -> bool:
    """Equal as numbers when both are, else equal as strings (case and outer spaces aside); an unbounded prediction
    is never equal."""
    if predicted is None or not bounded(predicted):
        return False
    a, b = number(predicted), number(str(reference))
    if a is not None and b is not None:
        return a == b
    return predicted.strip().lower() == str(reference).strip().lower()
