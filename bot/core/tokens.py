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
# Vowel-less words that carry meaning, which a subject's token must not: nearly every
# vowel-less whole word in CLIP's vocabulary is an abbreviation of something (that is how it
# became a token), so this lists those a text encoder surely knows, above all those with a
# look of their own (a logo, a product, a place, an art style) or that are rude. Checked
# against CLIP's own list: ``bench/rare_tokens.py``, bench/RESULTS.md.
_COMMON = frozenset(
    # chat shorthand and words spelled without vowels
    "brb chk dnt fwd gfs grl grp hrs jst knw lmk mfw mgr mkt mth pls ppl pvt shh smh smt srs "
    "sth szn tbd tbh thn thx tks tmr tmw tnx wht wks "
    # rude, sexual, drugs, weapons, violence, hate and party politics; "sks" is a rifle, and
    # subjects trained on it drift towards guns (PaddlePaddle/PaddleNLP#3852)
    "fck fml jfc sht wtf ntr pnp mlm pms lsd mmj thc cbd kms fgm smg sks blm bnp ccp pkk "
    # units, file formats, computing, games and photography
    "bpm dns dps drm dvd fps ftp gps gsm gtx hdd hdr jpg kgs khz kph lcd lvl mhz mpg mph npc "
    "nlp pcb pcs pdf png ppm psd pvc pvp rgb rpg sdk sfx sql ssd ssh ssl sqm tbs tsp tv txt "
    "vfx vhs vpn xxl crt gbc psp pkg fpv bnw tvs ddr "
    # money
    "gbp rmb xrp ltc bch btc "
    # brands, media, franchises, music, fashion and people
    "bbc bmw cnn cvs kfc mtv mcd mgm gmc ktm klm cbr gtr sls jdm nmd mms pbr spf pjs tmz msn "
    "dbz dbs csm mgs rdr smw smb scp tng kjv ppg wdw dmc mlg lps svt bts dmx lbj fdr jfk mlk hrh "
    "lfw pfw dnb rnb bbq nrg "
    # places, teams, leagues and institutions
    "nyc nsw phl bcn jpn bkk mnl pgh phx pnw gbr jhb blr wpg bhm fcb qpr nba nfl nhl mlb psg "
    "bjj fbi kgb cdc dmv chp hpv cpr ngc std nsf wtc".split()
)


def _meaningful(word: str) -> bool:
    """Whether ``word`` already means something: a listed abbreviation, or one letter
    repeated ("zzz" sleeps, "xxx", "www", "nnn", "kkk")."""
    return word in _COMMON or len(set(word)) == 1


CANDIDATES: tuple[str, ...] = tuple(
    t for t in ("".join(p) for p in itertools.product(_CONSONANTS, repeat=3)) if not _meaningful(t)
)
"""Three-consonant strings such as 'zqv': short, unpronounceable, and without prior meaning."""


def usable_vocabulary_tokens(published: str | bytes | None) -> list[str]:
    """The engine's published rare tokens (a JSON list), less common abbreviations, letters
    repeated and anything that is not a short lower-case word; [] if there is no usable list."""
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
        and w.islower() and not _meaningful(w)
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
