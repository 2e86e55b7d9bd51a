"""Which rare tokens the bot draws for subjects (bot.core.tokens)."""

import json
import random

import pytest

from bot.core.tokens import CANDIDATES, pick_token, usable_vocabulary_tokens

# Whole words of CLIP's real vocabulary (ids in its later half) that mean something.
MEANINGFUL = ["sks", "fck", "hdr", "vfx", "bnw", "npc", "dbz", "nyc", "pdf", "brb", "gtx", "lsd"]
REPEATED = ["nnn", "zzz", "kkk", "www", "xxx", "wwww"]


def test_published_words_lose_common_abbreviations_and_repeated_letters() -> None:
    published = json.dumps(["zqv", *MEANINGFUL, "xjk", *REPEATED, "trs"])
    assert usable_vocabulary_tokens(published) == ["zqv", "xjk", "trs"]


@pytest.mark.parametrize(
    "published", [None, "", b"", "not json", '{"zqv": 1}', '["Zqv", "zq1", "zqvxk", 3, "ž"]']
)
def test_unusable_published_lists_give_no_words(published: str | bytes | None) -> None:
    assert usable_vocabulary_tokens(published) == []


def test_fallback_candidates_mean_nothing_either() -> None:
    assert "zqv" in CANDIDATES
    assert not set(CANDIDATES) & {*MEANINGFUL, *REPEATED}
    assert all(len(set(token)) > 1 for token in CANDIDATES)


def test_pick_token_draws_a_free_vocabulary_word_then_falls_back() -> None:
    rng = random.Random(0)
    assert pick_token({"zqv"}, rng, vocabulary=["zqv", "xjk"]) == "xjk"
    fallback = pick_token({"zqv", "xjk"}, rng, vocabulary=["zqv", "xjk"])
    assert fallback in CANDIDATES and fallback not in {"zqv", "xjk"}
