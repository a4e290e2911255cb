"""Reading the final answer out of text: a model's completion, a dataset's worked solution.

`extract_answer` is what RM_reasoning and evaluation compare against a row's `answer`; `gsm8k_answer` and
`last_boxed` also read the answers of the GSM8K / MATH datasets (align/run/formats.py maps those fields with them). Pure
functions on strings, no imports beyond `re`.
"""

from __future__ import annotations

import re

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
