"""Rare identifier tokens from a base model's own vocabulary, as the DreamBooth paper draws them.

The paper binds a subject to a *rare token*: a word the tokenizer reads as one token and the
text encoder has little prior meaning for, so fine-tuning does not fight an existing concept
(its "sks" became the community's default). CLIP's byte-pair vocabulary is ordered by merge
frequency, so a word-final entry (``…</w>``) late in the vocabulary is a rare word. Of those
we keep short, lower-case ASCII words without vowels (no "y" either: "sky", "gym"): such
strings are not English words, and a vowel-less abbreviation that is common (``bbc``, ``pdf``)
is filtered out by the bot, which draws one per subject, unique within its workspace. The
engine publishes the list per model at start (:func:`publish_rare_tokens`,
``engine.api.rare_tokens_key``).

On CLIP's own vocabulary (SD 1.x; SD 2.x's and SDXL's OpenCLIP text encoders use the same
byte-pair file, byte for byte: mlfoundations/open_clip@89fb801) this finds 504 words, most of
them abbreviations of something (``sks`` is a rifle); the bot keeps 340
(``bench/rare_tokens.py``, bench/RESULTS.md). Four letters would add 75, nearly all names
(``hsbc``, ``lcfc``, ``snsd``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from typing import Any

from engine.api import rare_tokens_key

log = logging.getLogger(__name__)

RARE_FROM = 0.5
"""Only the later part of the vocabulary counts as rare: entries whose id is at least this
share of the vocabulary's size (byte-pair merges are learned most frequent first)."""
_VOWELS = set("aeiouy")


def rare_tokens(
    tokenizers: Sequence[Any], *, lengths: Iterable[int] = (3,), rare_from: float = RARE_FROM
) -> list[str]:
    """Rare single-token words of ``tokenizers`` (SDXL has two; each must read the word as
    one token), ``lengths`` letters long, from the last ``1 - rare_from`` of the first
    tokenizer's vocabulary, in vocabulary order."""
    if not tokenizers:
        return []
    first = tokenizers[0]
    vocab: dict[str, int] = first.get_vocab()
    wanted = set(lengths)
    start = int(len(vocab) * rare_from)
    words = []
    for piece, index in sorted(vocab.items(), key=lambda item: item[1]):
        word = piece.removesuffix("</w>")
        if index < start or word == piece or len(word) not in wanted:
            continue  # early (common), not a whole word, or not the wanted length
        if not (word.isascii() and word.isalpha() and word.islower()) or _VOWELS & set(word):
            continue
        if all(_one_token(tokenizer, word) for tokenizer in tokenizers):
            words.append(word)
    return words


def _one_token(tokenizer: Any, word: str) -> bool:
    ids = tokenizer(word, add_special_tokens=False).input_ids
    return len(ids) == 1


def pipeline_tokenizers(pipe: Any) -> list[Any]:
    """The tokenizer(s) of a diffusers pipeline: one for SD 1.x/2.x, two for SDXL."""
    return [t for t in (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None)) if t]


async def publish_rare_tokens(redis: Any, pipes: dict[str, Any]) -> dict[str, int]:
    """Store each model's rare tokens under ``rare_tokens_key(name)`` (a JSON list; replaced
    at every engine start). Returns how many each model has."""
    counts = {}
    for name, pipe in pipes.items():
        words = rare_tokens(pipeline_tokenizers(pipe))
        await redis.set(rare_tokens_key(name), json.dumps(words))
        counts[name] = len(words)
        if not words:
            log.warning(
                "base model %s: no rare single-token words in its vocabulary; the bot "
                "falls back to its own three-consonant tokens",
                name,
            )
    return counts
