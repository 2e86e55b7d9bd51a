"""Rare identifier tokens for subjects ("a photo of zqv dog")."""

from __future__ import annotations

import itertools
import random

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


def pick_token(taken: set[str], rng: random.Random | None = None) -> str:
    """A rare token not in ``taken`` (the tokens already used in the workspace)."""
    rng = rng or random.SystemRandom()
    for _ in range(64):
        token = rng.choice(CANDIDATES)
        if token not in taken:
            return token
    free = [t for t in CANDIDATES if t not in taken]
    if not free:
        raise RuntimeError("every subject token of this workspace is taken")
    return rng.choice(free)
