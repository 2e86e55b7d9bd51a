"""Rare identifier tokens for subjects ("a photo of zqv dog").

The engine publishes each base model's rare single-token words from its own vocabulary
(``engine.rare_tokens``, the DreamBooth paper's choice); :func:`pick_token` draws from those
when given them, and otherwise (no engine has started yet, or the vocabulary has none left)
from three-consonant strings, which carry no meaning either but may take several tokens.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Sequence

_CONSONANTS = "bcdfghjklmnpqrstvwxz"
# Consonant triples that are common abbreviations or words, which would carry meaning.
_COMMON = {
    "bbc",
    "cnn",
    "dvd",
    "gps",
    "hdd",
    "jpg",
    "kfc",
    "lcd",
    "mtv",
    "nba",
    "nfl",
    "pdf",
    "png",
    "ppl",
    "rgb",
    "sql",
    "tv",
    "txt",
    "www",
    "xxx",
    "bmw",
    "cvs",
    "dnb",
    "fbi",
    "nsf",
    "pls",
    "thx",
    "ssd",
    "std",
    "vhs",
    "mph",
    "kph",
    "hrs",
    "pcs",
    "nsw",
    "nyc",
    "smh",
    "lmk",
    "tbh",
}
CANDIDATES: tuple[str, ...] = tuple(
    t for t in ("".join(p) for p in itertools.product(_CONSONANTS, repeat=3)) if t not in _COMMON
)
"""Three-consonant strings such as 'zqv': short, unpronounceable, and without prior meaning."""


def usable_vocabulary_tokens(published: str | bytes | None) -> list[str]:
    """The engine's published rare tokens (a JSON list), less common abbreviations and
    anything that is not a short lower-case word; [] if there is no usable list."""
    if not published:
        return []
    try:
        words = json.loads(published)
    except ValueError:
        return []
    if not isinstance(words, list):
        return []
    return [
        w
        for w in words
        if isinstance(w, str) and 2 <= len(w) <= 4 and w.isascii() and w.isalpha()
        and w.islower() and w not in _COMMON
    ]  # fmt: skip


def pick_token(
    taken: set[str], rng: random.Random | None = None, vocabulary: Sequence[str] = ()
) -> str:
    """A rare token not in ``taken`` (the tokens already used in the workspace): one of
    ``vocabulary`` (the base model's rare single tokens) while any is free, else one of
    :data:`CANDIDATES`."""
    rng = rng or random.SystemRandom()
    free_words = [w for w in vocabulary if w not in taken]
    if free_words:
        return rng.choice(free_words)
    for _ in range(64):
        token = rng.choice(CANDIDATES)
        if token not in taken:
            return token
    free = [t for t in CANDIDATES if t not in taken]
    if not free:
        raise RuntimeError("every subject token of this workspace is taken")
    return rng.choice(free)
