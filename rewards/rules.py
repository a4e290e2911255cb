"""RM_rule built-ins: answer format / required tags, length and overlong penalty, language consistency, repetition.

Each is a plain reward `(prompts, completions, **columns) -> list[float]`; parameters come from the row's columns
when present (e.g. `target_language`) or from `args` in the recipe (`{name: overlong, args: {max_chars: 400}}`).
"""

from __future__ import annotations

import re
import unicodedata

from .registry import reward, reward_factory


@reward("answer_format")
def answer_format(prompts, completions, **_) -> list[float]:
    """1.0 when the completion ends with a final line "Answer: <number>", else 0.0."""
    return [1.0 if re.search(r"Answer:\s*-?\d+(?:\.\d+)?\s*$", c) else 0.0 for c in completions]


def tags_score(text: str, tags: list[str]) -> float:
    """Share of `tags` that appear exactly once as a well-ordered <tag>...</tag> pair."""
    ok = 0
    for tag in tags:
        opens, closes = text.count(f"<{tag}>"), text.count(f"</{tag}>")
        if opens == 1 and closes == 1 and text.index(f"<{tag}>") < text.index(f"</{tag}>"):
            ok += 1
    return ok / len(tags) if tags else 1.0


@reward_factory("required_tags")
def required_tags(tags: list[str]):
    """Share of the required tags (e.g. ["think", "answer"]) present once, opened before closed."""

    def score(prompts, completions, **_) -> list[float]:
        return [tags_score(c, tags) for c in completions]

    return score


def overlong_penalty(length: int, max_len: int, buffer: int) -> float:
    """DAPO's soft overlong punishment: 0 up to max_len - buffer, then linearly down to -1 at max_len, -1 beyond."""
    if length <= max_len - buffer:
        return 0.0
    if length <= max_len:
        return (max_len - buffer - length) / buffer
    return -1.0


@reward_factory("overlong")
def overlong(max_chars: int, buffer_chars: int = 0):
    """Soft overlong penalty on the completion's length in characters (0 when short enough, down to -1)."""
    buffer = buffer_chars or max(1, max_chars // 4)

    def score(prompts, completions, **_) -> list[float]:
        return [overlong_penalty(len(c), max_chars, buffer) for c in completions]

    return score


_SCRIPTS = {"en": "LATIN", "zh": "CJK", "ru": "CYRILLIC", "ar": "ARABIC", "el": "GREEK", "ja": "CJK", "ko": "HANGUL"}


def language_share(text: str, language: str) -> float:
    """Share of the letters in `text` written in the script of `language` (en, zh, ru, ar, el, ja, ko)."""
    script = _SCRIPTS.get(language)
    if script is None:
        raise ValueError(f"unknown language {language!r}; known: {sorted(_SCRIPTS)}")
    letters = [ch for ch in text if ch.isalpha()]
    if not letters:
        return 0.0
    return sum(1 for ch in letters if script in unicodedata.name(ch, "")) / len(letters)


@reward("language_consistency")
def language_consistency(prompts, completions, target_language=None, **_) -> list[float | None]:
    """Share of letters in the target language's script (row column `target_language`, default en)."""
    langs = target_language or ["en"] * len(completions)
    return [language_share(c, lang or "en") for c, lang in zip(completions, langs)]


def repetition_rate(text: str, n: int = 3) -> float:
    """Share of word n-grams that repeat an earlier n-gram of the same text (0 = no repetition)."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


@reward("repetition_penalty")
def repetition_penalty(prompts, completions, **_) -> list[float]:
    """Minus the share of repeated word 3-grams: 0 for no repetition, towards -1 for a looping completion."""
    return [-repetition_rate(c) for c in completions]
