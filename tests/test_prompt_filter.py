"""The prompt filter catches the usual evasions and lets innocent prompts through."""

from __future__ import annotations

import time

import pytest

from bot.core.errors import UserError
from bot.core.prompt_filter import (
    DEFAULT_RULES,
    InvalidRule,
    PromptFilter,
    Rule,
    normalize,
    validate_regex,
    validate_rule,
    validate_word,
)

WORKSPACE_RULES = [
    Rule("word", "ass", "rule-1"),
    Rule("word", "cunt", "rule-2"),
    Rule("word", "blood bath", "rule-3"),
    Rule("regex", r"\bkill(ing)?\s+(him|her|them)\b", "rule-4"),
]

# (prompt, label of the rule it must hit, or None when it must pass)
CASES: list[tuple[str, str | None]] = [
    # plain hits and case
    ("a nude woman on the beach", "default:nude"),
    ("NUDE portrait", "default:nude"),
    ("NuDe", "default:nude"),
    # Unicode look-alikes and compatibility forms
    ("nudе", "default:nude"),  # Cyrillic е
    ("рогn", "default:porn"),  # Cyrillic р, о, г
    ("ΝUDΕ", "default:nude"),  # Greek capital Nu and Epsilon
    ("ｎｕｄｅ", "default:nude"),  # fullwidth
    ("𝐧𝐮𝐝𝐞 statue", "default:nude"),  # mathematical bold
    ("𝓷𝓾𝓭𝓮", "default:nude"),  # mathematical script
    ("ⓝⓤⓓⓔ", "default:nude"),  # circled letters
    # accents and invisible characters
    ("nüde", "default:nude"),
    ("ñúdé", "default:nude"),
    ("nu\u200bde", "default:nude"),  # zero-width space
    ("n\u200du\u200cd\u200fe", "default:nude"),  # ZWJ, ZWNJ, RLM
    ("nu\u2060de", "default:nude"),  # word joiner
    ("\ufeffnude", "default:nude"),  # BOM
    ("nu\u00adde", "default:nude"),  # soft hyphen
    ("nu\ufe0fde", "default:nude"),  # variation selector
    ("n\u0336u\u0336d\u0336e\u0336", "default:nude"),  # combining strikethrough
    # spacing and punctuation inside the word
    ("n.u.d.e", "default:nude"),
    ("n u d e", "default:nude"),
    ("n-u-d-e", "default:nude"),
    ("n_u_d_e on a bed", "default:nude"),
    ("a n u d e woman", "default:nude"),
    ("nu.de", "default:nude"),
    ("half-nude", "default:nude"),
    # leetspeak
    ("p0rn", "default:porn"),
    ("s3x", "default:sex"),
    ("nud3", "default:nude"),
    ("h3nt4i", "default:hentai"),
    ("@$$", "rule-1"),
    ("a55", "rule-1"),
    ("l0l1", "default:loli"),
    ("|0|i", "default:loli"),
    ("r4p1st", "default:rapist"),
    ("nud3!", "default:nude"),
    # repeated letters and plurals
    ("nuuuude", "default:nude"),
    ("nnuuddee", "default:nude"),
    ("NUDES", "default:nude"),
    ("asssss", "rule-1"),
    # phrases
    ("a blood bath", "rule-3"),
    ("blood-bath", "rule-3"),
    ("bloodbath", "rule-3"),
    ("b l o o d  b a t h", "rule-3"),
    ("blood b.a.t.h", "rule-3"),
    ("snuff films", "default:snuff film"),
    # several evasions at once
    ("Ñ.Ü.Ð.Ε!", "default:nude"),
    ("p\u200b0\u200brn", "default:porn"),
    # regex rules see the normalised text
    ("killing them softly in the dark", "rule-4"),
    ("k i l l her", "rule-4"),
    # innocent prompts that merely contain a blocked word
    ("an assassin in the rain", None),
    ("a class photo", None),
    ("a narrow passage", None),
    ("a man playing bass guitar", None),
    ("as the sun sets", None),
    ("Scunthorpe town centre", None),
    ("a therapist's office", None),
    ("a bunch of grapes on a drapery", None),
    ("a denuded hillside", None),
    ("Essex countryside", None),
    ("a cat in 4k, 8k, 3d render, 1girl", None),
    ("summa cum laude diploma", None),
    ("a portrait in the style of the 1950s", None),
    ("A.K.A. the U.S. flag", None),
    ("blood orange in a bath", None),
    ("Αθήνα at night", None),  # Greek text stays innocent
    ("Москва зимой", None),  # so does Russian
    ("桜の木の下の猫", None),
    ("hello!!! what a lovely day!", None),
    ("a $5 bill and an @ sign", None),
    ("it's a cat, isn't it?", None),
]


@pytest.fixture(scope="module")
def workspace_filter() -> PromptFilter:
    return PromptFilter(WORKSPACE_RULES)


@pytest.mark.parametrize(("prompt", "label"), CASES, ids=[repr(p) for p, _ in CASES])
def test_prompt_is_blocked_or_allowed(
    workspace_filter: PromptFilter, prompt: str, label: str | None
) -> None:
    match = workspace_filter.check(prompt)
    assert (match.rule.label if match else None) == label


def test_case_table_is_large_and_covers_both_outcomes() -> None:
    assert len(CASES) >= 40
    assert sum(label is None for _, label in CASES) >= 15
    assert len({prompt for prompt, _ in CASES}) == len(CASES)


def test_normalize_folds_evasions_into_plain_tokens() -> None:
    assert normalize("Ｎ.ü.d.\u200bе  — the  P0RTRAIT!") == "nude the portrait"
    assert normalize("n u d e a cat") == "nudea cat"
    assert normalize("nuuuude") == "nuuuude"  # repeats are kept; the matcher allows them


def test_match_names_the_rule_fragment_and_text() -> None:
    match = PromptFilter([Rule("word", "blood bath", "r7")]).check("a b.l.o.o.d bath")
    assert match is not None
    assert match.rule == Rule("word", "blood bath", "r7")
    assert match.fragment == "blood bath"
    assert match.text_index == 0


def test_negative_prompt_is_checked_too() -> None:
    prompt_filter = PromptFilter()
    assert prompt_filter.check("a quiet lake", "blurry, low quality") is None
    match = prompt_filter.check("a quiet lake", "blurry, n-u-d-e")
    assert match is not None
    assert match.text_index == 1
    assert match.rule.label == "default:nude"


def test_defaults_can_be_switched_off() -> None:
    assert PromptFilter().check("a nude statue") is not None
    without_defaults = PromptFilter([Rule("word", "ass")], use_defaults=False)
    assert without_defaults.check("a nude statue") is None
    assert without_defaults.check("a55") is not None


def test_rule_label_defaults_to_its_pattern() -> None:
    assert Rule("word", "blood bath").label == "blood bath"
    assert all(rule.label.startswith("default:") for rule in DEFAULT_RULES)


def test_hostile_regex_finishes_fast_on_long_input() -> None:
    # (a+)+$ backtracks exponentially in a backtracking engine; RE2 runs it in linear time.
    prompt_filter = PromptFilter([Rule("regex", r"(a+)+$", "hostile")], use_defaults=False)
    text = "a" * 10_000 + "b"
    start = time.perf_counter()
    match = prompt_filter.check(text)
    elapsed = time.perf_counter() - start
    assert match is None
    assert elapsed < 0.1


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ("(unclosed", "not a valid regular expression"),
        ("[a-", "not a valid regular expression"),
        ("*nude", "not a valid regular expression"),
        (r"(a)\1", "backreferences"),
        (r"nude(?=s)", "lookahead"),
        (r"(?<!a)nude", "lookahead"),
        (r"(?>a+)b", "RE2"),
        ("a*", "block every prompt"),
        (r"\b", "block every prompt"),
        ("nude|", "block every prompt"),
        ("a" * 201, "too long"),
    ],
)
def test_validate_regex_rejects_bad_patterns(pattern: str, reason: str) -> None:
    with pytest.raises(InvalidRule, match=reason) as caught:
        validate_regex(pattern)
    assert isinstance(caught.value, UserError)  # adapters show the message as is


def test_validate_regex_accepts_ordinary_patterns() -> None:
    validate_regex(r"\bkill(ing)?\s+(him|her)\b")
    validate_regex(r"r-?18")


def test_validate_word_rejects_empty_short_and_long_words() -> None:
    for pattern in ("", "   ", "!!!", "a", "a" * 201):
        with pytest.raises(InvalidRule):
            validate_word(pattern)
    validate_word("blood bath")


def test_invalid_rule_is_refused_when_building_the_filter() -> None:
    with pytest.raises(InvalidRule):
        PromptFilter([Rule("regex", r"(x)\1")])
    with pytest.raises(InvalidRule):
        validate_rule(Rule("word", "."))


def test_regex_rules_are_case_insensitive_and_see_folded_punctuation() -> None:
    prompt_filter = PromptFilter([Rule("regex", r"r-18", "r18")], use_defaults=False)
    assert prompt_filter.check("R-18 artwork") is not None
    assert prompt_filter.check("Ｒ－１８ artwork") is not None  # fullwidth
    assert prompt_filter.check("route 18") is None


def test_overlong_input_is_refused_not_truncated() -> None:
    prompt_filter = PromptFilter(max_chars=100)
    with pytest.raises(UserError, match="too long"):
        prompt_filter.check("a cat", "x" * 101)


def test_default_filter_checks_a_long_ordinary_prompt_quickly() -> None:
    prompt_filter = PromptFilter(WORKSPACE_RULES)
    text = ("a quick brown f0x jumps over the l.a.z.y dog, " * 400)[:20_000]
    start = time.perf_counter()
    assert prompt_filter.check(text) is None
    assert time.perf_counter() - start < 0.5
