"""Example align reward plugin.

`politeness` is registered through the `align.rewards` entry point (see pyproject.toml), so once this package is
installed a recipe names it like a built-in: `{name: politeness}`. `brevity` is not registered: a recipe reaches it
as `align_reward_plugin:brevity` (any importable `module:function` works the same way).
"""

from __future__ import annotations

POLITE = ("please", "thank", "sorry", "glad", "happy to")


def politeness(prompts, completions, **_) -> list[float]:
    """1.0 when the completion contains a polite phrase, else 0.0."""
    return [1.0 if any(p in c.lower() for p in POLITE) else 0.0 for c in completions]


def brevity(prompts, completions, max_words: int = 40, **_) -> list[float]:
    """1.0 for completions of at most `max_words` words, falling linearly to 0 at twice that."""
    out = []
    for c in completions:
        n = len(c.split())
        out.append(1.0 if n <= max_words else max(0.0, 2.0 - n / max_words))
    return out
