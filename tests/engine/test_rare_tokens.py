"""Rare identifier tokens drawn from the base model's own vocabulary (the paper's choice)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from redis.asyncio import Redis
from transformers import CLIPTokenizer

from bot.core.tokens import usable_vocabulary_tokens
from engine.api import rare_tokens_key
from engine.models import load_pipeline
from engine.rare_tokens import pipeline_tokenizers, publish_rare_tokens, rare_tokens
from engine.tiny import TINY_WORDS, add_whole_word_merges, write_bpe_files

VOWEL_LESS = [w for w in TINY_WORDS if not set(w) & set("aeiouy")]


def _tiny_tokenizer_learning(
    words: Sequence[str], tiny_model_dir: Path, folder: Path
) -> CLIPTokenizer:
    """The tiny tokenizer with three-letter ``words`` merged into whole words after all its own,
    as late as CLIP's real vocabulary holds "sks" (48136 of 49408)."""
    tiny = CLIPTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    bpe = json.loads(tiny.backend_tokenizer.to_str())["model"]
    vocab: dict[str, int] = bpe["vocab"]
    merges = [" ".join(m) if isinstance(m, list) else m for m in bpe["merges"]]
    add_whole_word_merges(vocab, merges, words)
    write_bpe_files(folder, vocab, merges)
    return CLIPTokenizer.from_pretrained(str(folder))


def test_rare_tokens_are_the_late_vowel_less_single_token_words(tiny_model_dir: Path) -> None:
    tokenizer = CLIPTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    words = rare_tokens([tokenizer])
    # "sun" and "hat" are single tokens late in the vocabulary too, but words.
    assert words == VOWEL_LESS and len(words) == 10
    for word in words:  # "o", "f</w>", the word, "sun</w>"
        assert len(tokenizer(f"of {word} sun", add_special_tokens=False).input_ids) == 4


def test_early_vocabulary_entries_are_not_rare(tiny_model_dir: Path) -> None:
    tokenizer = CLIPTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    assert rare_tokens([tokenizer], rare_from=1.0) == []
    assert rare_tokens([tokenizer], lengths=(2, 4)) == []  # the tiny words are all 3 long
    assert rare_tokens([]) == []


def test_sdxl_words_must_be_one_token_for_both_tokenizers(tiny_sdxl_dir: Path) -> None:
    pipe = load_pipeline(tiny_sdxl_dir)
    tokenizers = pipeline_tokenizers(pipe)
    assert len(tokenizers) == 2
    assert rare_tokens(tokenizers) == VOWEL_LESS


async def test_engine_publishes_each_models_rare_tokens(
    redis_clean: str, tiny_model_dir: Path
) -> None:
    pipe = load_pipeline(tiny_model_dir)
    async with Redis.from_url(redis_clean) as redis:
        counts = await publish_rare_tokens(redis, {"tiny": pipe})
        published = await redis.get(rare_tokens_key("tiny"))
    assert counts == {"tiny": 10}
    assert json.loads(published) == VOWEL_LESS


def test_the_bot_keeps_every_rare_word_of_the_tiny_model(tiny_model_dir: Path) -> None:
    tokenizer = CLIPTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    assert usable_vocabulary_tokens(json.dumps(rare_tokens([tokenizer]))) == VOWEL_LESS


def test_rare_words_that_mean_something_are_published_but_never_drawn(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A real vocabulary's late vowel-less words are mostly abbreviations: the engine finds
    them all, the bot keeps only those without a meaning (bench/rare_tokens.py counts CLIP's)."""
    tokenizer = _tiny_tokenizer_learning(
        ["sks", "hdr", "nnn", "zqv", "fck"], tiny_model_dir, tmp_path
    )
    published = rare_tokens([tokenizer])
    assert published == [*VOWEL_LESS, "sks", "hdr", "nnn", "zqv", "fck"]
    assert usable_vocabulary_tokens(json.dumps(published)) == [*VOWEL_LESS, "zqv"]
