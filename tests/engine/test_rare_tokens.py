"""Rare identifier tokens drawn from the base model's own vocabulary (the paper's choice)."""

from __future__ import annotations

import json
from pathlib import Path

from redis.asyncio import Redis
from transformers import CLIPTokenizer

from engine.api import rare_tokens_key
from engine.models import load_pipeline
from engine.rare_tokens import pipeline_tokenizers, publish_rare_tokens, rare_tokens
from engine.tiny import TINY_WORDS

VOWEL_LESS = [w for w in TINY_WORDS if not set(w) & set("aeiouy")]


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
