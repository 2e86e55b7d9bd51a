"""Blocked-prompt rules: words, phrases and regexes, matched so the usual evasions don't work.

The caller owns storage: it loads a workspace's rules and passes them to ``PromptFilter``;
this module only validates and matches. Words and phrases are compared token by token on a
normalised form of the text (see ``normalize``), so "n.u.d.е" with a Cyrillic е is caught while
"assassin" passes a block on "ass". Moderators' regexes run on Google's RE2 engine, which works
in linear time, so no pattern can stall the bot whatever the input.
"""

from __future__ import annotations

import functools
import re
import string
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import re2
from confusable_homoglyphs.confusables import confusables_data

from bot.core.errors import UserError

MAX_PATTERN_CHARS = 200
MAX_INPUT_CHARS = 20_000
# Shorter rules would block ordinary prompts ("a", "x"), and inside spaced-out letter runs a
# one-letter rule would match almost anything.
MIN_RULE_LETTERS = 2

RuleKind = Literal["word", "regex"]

# A modest built-in list for a public image bot: sexual content, sexualised minors and violent
# abuse. Workspaces add their own on top or switch this off. Plurals ("nudes") are covered by
# the matcher, so only other word forms are listed.
DEFAULT_BLOCKED_WORDS: tuple[str, ...] = (
    "nude",
    "naked",
    "nudity",
    "topless",
    "nsfw",
    "porn",
    "porno",
    "pornographic",
    "pornography",
    "hentai",
    "sex",
    "sexual",
    "erotic",
    "genitals",
    "penis",
    "vagina",
    "nipple",
    "boobs",
    "orgasm",
    "masturbating",
    "masturbation",
    "blowjob",
    "loli",
    "lolicon",
    "shotacon",
    "rape",
    "raped",
    "raping",
    "rapist",
    "beheading",
    "beheaded",
    "decapitated",
    "dismembered",
    "mutilated",
    "snuff film",
)


class InvalidRule(UserError):
    """A rule a moderator tried to add cannot be used; ``message`` says why, for the moderator."""


@dataclass(frozen=True)
class Rule:
    """One blocking rule: a word or phrase (``kind="word"``) or an RE2 regex (``"regex"``).

    ``label`` is how moderators and logs name the rule (a stored id, or "default:nude");
    it defaults to the pattern.
    """

    kind: RuleKind
    pattern: str
    label: str = ""

    def __post_init__(self) -> None:
        if not self.label:
            object.__setattr__(self, "label", self.pattern)


@dataclass(frozen=True)
class Match:
    """Why a prompt was blocked: the rule, the normalised fragment it hit, and which text."""

    rule: Rule
    fragment: str
    text_index: int


DEFAULT_RULES: tuple[Rule, ...] = tuple(
    Rule("word", word, f"default:{word}") for word in DEFAULT_BLOCKED_WORDS
)


# --- character folding -------------------------------------------------------------------

# Characters that render as nothing but are not Unicode format characters (category Cf, which
# is dropped wholesale): Hangul fillers and the blank Braille pattern are popular "invisible
# spaces" for gluing or splitting words.
_INVISIBLE_EXTRA = frozenset("\u115f\u1160\u3164\uffa0\u2800")
_DROPPED_CATEGORIES = frozenset({"Cf", "Mn", "Me", "Cs", "Co", "Cn"})

# Scripts whose letters are folded onto Latin look-alikes. Other scripts (Arabic, Hebrew,
# Indic, ...) keep their letters: folding them would turn ordinary text in those languages
# into Latin letter soup that could collide with blocked words.
_FOLDED_SCRIPTS = ("LATIN", "GREEK", "CYRILLIC", "CHEROKEE", "MATHEMATICAL", "SMALL CAPITAL")

# Look-alikes the Unicode confusables data maps to small capitals or other non-ASCII letters
# rather than to the Latin letter people actually read them as.
_EXTRA_HOMOGLYPHS = {
    "к": "k", "м": "m", "т": "t", "н": "h", "в": "b", "п": "n", "ь": "b", "г": "r",
    "η": "n", "τ": "t", "κ": "k", "ν": "v", "ι": "i", "ø": "o", "ł": "l", "đ": "d", "ħ": "h",
    "ı": "i", "ĸ": "k", "ð": "d",
}  # fmt: skip


def _foldable(char: str) -> bool:
    category = unicodedata.category(char)
    if category == "Nd":  # other scripts' digits are numbers, not disguised letters
        return False
    if not category.startswith("L"):
        return True  # symbols such as "∣" or "℮" belong to no script
    return unicodedata.name(char, "").startswith(_FOLDED_SCRIPTS)


def _build_homoglyph_table() -> dict[int, str]:
    """Map each non-ASCII look-alike of a Latin letter to that (lower-case) letter."""
    table: dict[int, str] = {}
    for target in string.ascii_lowercase + string.ascii_uppercase:
        for entry in confusables_data.get(target, []):
            # Some entries carry bidi marks around the character; they are not part of it.
            glyph = entry["c"].replace("\u200e", "").replace("\u200f", "")
            if len(glyph) == 1 and not glyph.isascii() and _foldable(glyph):
                table.setdefault(ord(glyph), target.lower())
    for glyph, target in _EXTRA_HOMOGLYPHS.items():
        table.setdefault(ord(glyph), target)
    return table


_HOMOGLYPHS = _build_homoglyph_table()


def _fold_chars(text: str) -> str:
    """Case, compatibility forms, look-alikes, accents and invisible characters folded away.

    Spacing, punctuation and digits are kept: regexes see this form, and tokenising comes later.
    """
    text = unicodedata.normalize("NFKC", text)  # fullwidth, ligatures, math alphanumerics
    # Fold before casefolding too: the data maps some capitals (Cyrillic "Н" → "H") whose
    # lower-case forms look like nothing Latin ("н").
    text = text.translate(_HOMOGLYPHS).casefold()
    text = unicodedata.normalize("NFD", text)  # "ü" → "u" + combining diaeresis, dropped next
    text = "".join(
        char
        for char in text
        if char.isspace()
        or (
            unicodedata.category(char) not in _DROPPED_CATEGORIES
            and unicodedata.category(char) != "Cc"
            and char not in _INVISIBLE_EXTRA
        )
    )
    # Again, now that accents are gone: "ё" only becomes a foldable Cyrillic "е" here.
    return text.translate(_HOMOGLYPHS)


# --- tokens ------------------------------------------------------------------------------

_TOKEN = re.compile(r"[^\W_]+")  # letters and digits of any script
_LEET_CHARS = frozenset("0134578@$|!")
# "1" and "|" stand for "i" as often as for "l", so both readings are tried.
_LEET_AS_I = str.maketrans(
    {"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b",
     "@": "a", "$": "s", "|": "i", "!": "i"}
)  # fmt: skip
_LEET_AS_L = {**_LEET_AS_I, **str.maketrans({"1": "l", "|": "l"})}


def _leet(chunk: str, table: dict[int, str]) -> str:
    # A trailing "!" ends a sentence far more often than it spells an "i".
    body = chunk.rstrip("!")
    has_letter = any(char.isalpha() for char in body)
    if not has_letter and not any(char in "@$|!" for char in body):
        return chunk  # plain numbers ("1950", "4") are not words in disguise
    return body.translate(table)


def _merge_letter_runs(tokens: list[str]) -> tuple[list[str], list[bool]]:
    """Join runs of one-character tokens ("n u d e" → "nude"); flag which tokens were runs."""
    merged: list[str] = []
    is_run: list[bool] = []
    run: list[str] = []

    def close_run() -> None:
        if len(run) > 1:
            merged.append("".join(run))
            is_run.append(True)
        elif run:
            merged.append(run[0])
            is_run.append(False)
        run.clear()

    for token in tokens:
        if len(token) == 1:
            run.append(token)
        else:
            close_run()
            merged.append(token)
            is_run.append(False)
    close_run()
    return merged, is_run


@dataclass(frozen=True)
class _Stream:
    tokens: list[str]
    is_run: list[bool]


def _streams(text: str) -> list[_Stream]:
    """The token readings of ``text`` that are matched; the first one is ``normalize``'s.

    Each reading combines a leetspeak choice (as "i", as "l", none) with a tokenising choice:
    punctuation splits words ("half-nude" → half, nude) or is dropped inside a
    whitespace-separated chunk ("nu.de" → nude). Both are needed to catch both.
    """
    chunks = _fold_chars(text).split()
    variants = [[_leet(chunk, _LEET_AS_I) for chunk in chunks]]
    if any(char in _LEET_CHARS for chunk in chunks for char in chunk):
        variants.append([_leet(chunk, _LEET_AS_L) for chunk in chunks])
        variants.append(chunks)
    streams: list[_Stream] = []
    seen: set[tuple[str, ...]] = set()
    for variant in variants:
        split = [token for chunk in variant for token in _TOKEN.findall(chunk)]
        joined = ["".join(_TOKEN.findall(chunk)) for chunk in variant]
        for tokens in (split, [token for token in joined if token]):
            key = tuple(tokens)
            if key not in seen:
                seen.add(key)
                streams.append(_Stream(*_merge_letter_runs(tokens)))
    return streams


def normalize(text: str) -> str:
    """The form word rules are compared against, as space-separated tokens.

    Case, compatibility forms (NFKC), Cyrillic/Greek look-alikes, accents and invisible
    characters are folded away; leetspeak is read with "1" as "i"; punctuation separates
    tokens; runs of single characters are joined ("n.u.d.e" → "nude"). Repeated letters are
    kept: the matcher lets each letter of a rule repeat instead.
    """
    return " ".join(_streams(text)[0].tokens)


# --- word and phrase rules ---------------------------------------------------------------

# A token as run-length skeleton and counts: "nuuude" → ("nude", (1, 3, 1, 1)). A rule's
# token matches a text token when the skeletons are equal and every run in the text is at
# least as long as the rule's, so "nuuuude" hits "nude" and "asss" hits "ass" but "as" does not.
_Runs = tuple[str, tuple[int, ...]]


@functools.lru_cache(maxsize=4096)
def _runs(token: str) -> _Runs:
    letters: list[str] = []
    counts: list[int] = []
    for char in token:
        if letters and letters[-1] == char:
            counts[-1] += 1
        else:
            letters.append(char)
            counts.append(1)
    return "".join(letters), tuple(counts)


def _covers(text: _Runs, rule: _Runs) -> bool:
    return text[0] == rule[0] and all(t >= r for t, r in zip(text[1], rule[1], strict=True))


def _contains(text: _Runs, rule: _Runs) -> bool:
    """Whether ``rule`` occurs anywhere inside ``text``, letters allowed to repeat."""
    letters, counts = text
    start = letters.find(rule[0])
    while start != -1:
        if all(counts[start + i] >= need for i, need in enumerate(rule[1])):
            return True
        start = letters.find(rule[0], start + 1)
    return False


def _plural_readings(token: str) -> list[str]:
    # "nudes", "rapists", "asses": a rule's last word also blocks its plural.
    readings = []
    if len(token) > 2 and token.endswith("s"):
        readings.append(token[:-1])
        if token.endswith("es"):
            readings.append(token[:-2])
    return readings


@dataclass(frozen=True)
class _Phrase:
    rule: Rule
    words: tuple[_Runs, ...]


def _word_rule_tokens(pattern: str) -> list[str]:
    if len(pattern) > MAX_PATTERN_CHARS:
        raise InvalidRule(f"That rule is too long: keep it under {MAX_PATTERN_CHARS} characters.")
    tokens = normalize(pattern).split()
    if sum(len(token) for token in tokens) < MIN_RULE_LETTERS:
        raise InvalidRule(
            f"A blocked word needs at least {MIN_RULE_LETTERS} letters or digits; "
            "shorter ones would block ordinary prompts."
        )
    return tokens


def validate_word(pattern: str) -> None:
    """Raise InvalidRule, with a message for the moderator, if ``pattern`` can't be a word rule."""
    _word_rule_tokens(pattern)


# --- regex rules -------------------------------------------------------------------------


def _re2_options() -> re2.Options:
    options = re2.Options()
    options.case_sensitive = False
    options.log_errors = False  # a moderator's typo is not worth a line on stderr
    return options


def _compile_regex(pattern: str) -> re2._Regexp:
    if len(pattern) > MAX_PATTERN_CHARS:
        raise InvalidRule(
            f"That pattern is too long: keep it under {MAX_PATTERN_CHARS} characters."
        )
    try:
        compiled = re2.compile(pattern, _re2_options())
    except re2.error as error:
        reason = error.args[0] if error.args else ""
        if isinstance(reason, bytes):
            reason = reason.decode(errors="replace")
        try:
            re.compile(pattern)
        except re.error as python_error:
            raise InvalidRule(f"That is not a valid regular expression: {python_error}.") from None
        # Valid Python syntax that RE2 refuses: mostly backreferences, lookarounds, atomic
        # groups and possessive quantifiers, the very features that allow catastrophic
        # backtracking; also repeat counts over 1000.
        raise InvalidRule(
            f"The safe regex engine (RE2) cannot run that pattern ({reason}). It does not "
            "support backreferences, lookahead/lookbehind or atomic groups; rewrite it without."
        ) from None
    # A pattern that can match nothing at all (``a*``, ``\b``, ``x|``) would block every prompt.
    for sample in ("", "a cat, 1 dog."):
        found = compiled.search(sample)
        if found is not None and found.group(0) == "":
            raise InvalidRule(
                "That pattern can match without any text, so it would block every prompt."
            )
    return compiled


def validate_regex(pattern: str) -> None:
    """Raise InvalidRule, with a message for the moderator, if ``pattern`` can't be a regex rule.

    Refused: syntax errors, patterns over 200 characters, patterns that match the empty
    prompt, and features RE2 lacks (backreferences, lookarounds) since only RE2 guarantees
    that matching time stays linear in the prompt's length.
    """
    _compile_regex(pattern)


def validate_rule(rule: Rule) -> None:
    """Raise InvalidRule if ``rule`` can't be used; call it before storing a moderator's rule."""
    if rule.kind == "regex":
        validate_regex(rule.pattern)
    else:
        validate_word(rule.pattern)


# --- the filter --------------------------------------------------------------------------


class PromptFilter:
    """A workspace's compiled rules; ``check`` says whether texts may be drawn.

    Built once per rule change and reused: construction compiles and validates every rule
    (raising InvalidRule), checking is then cheap and never slower than linear.
    """

    def __init__(
        self,
        rules: Iterable[Rule] = (),
        *,
        use_defaults: bool = True,
        max_chars: int = MAX_INPUT_CHARS,
    ) -> None:
        all_rules = [*(DEFAULT_RULES if use_defaults else ()), *rules]
        self.max_chars = max_chars
        # Keyed by the skeleton of a rule's first word, so each text token costs one lookup.
        self._phrases: dict[str, list[_Phrase]] = {}
        self._spelled: list[_Phrase] = []  # whole rule, looked for inside spaced-letter runs
        self._regexes: list[tuple[Rule, re2._Regexp]] = []
        for rule in all_rules:
            if rule.kind == "regex":
                self._regexes.append((rule, _compile_regex(rule.pattern)))
                continue
            tokens = _word_rule_tokens(rule.pattern)
            self._add(_Phrase(rule, tuple(_runs(token) for token in tokens)))
            if len(tokens) > 1:
                self._add(_Phrase(rule, (_runs("".join(tokens)),)))  # "bloodbath"
            self._spelled.append(_Phrase(rule, (_runs("".join(tokens)),)))

    def _add(self, phrase: _Phrase) -> None:
        self._phrases.setdefault(phrase.words[0][0], []).append(phrase)

    def check(self, *texts: str) -> Match | None:
        """The first rule any of ``texts`` (prompt, negative prompt, ...) hits, or None.

        Raises UserError for a text longer than ``max_chars``: matching stays linear, but a
        bound keeps one request from costing the bot more than a few milliseconds.
        """
        for index, text in enumerate(texts):
            if len(text) > self.max_chars:
                raise UserError(
                    f"That prompt is too long for me to check ({len(text)} characters; "
                    f"the limit is {self.max_chars})."
                )
            match = self._check_one(text, index)
            if match is not None:
                return match
        return None

    def _check_one(self, text: str, index: int) -> Match | None:
        streams = _streams(text)
        for stream in streams:
            match = self._match_words(stream, index)
            if match is not None:
                return match
        if self._regexes:
            # Normalised for evasions, and merely folded so that patterns about punctuation
            # or digits ("4k", "r-18") still see them.
            targets = (" ".join(streams[0].tokens), _fold_chars(text))
            for rule, compiled in self._regexes:
                for target in targets:
                    found = compiled.search(target)
                    if found is not None:
                        return Match(rule, found.group(0), index)
        return None

    def _match_words(self, stream: _Stream, index: int) -> Match | None:
        tokens = stream.tokens
        for start, token in enumerate(tokens):
            for reading in (token, *_plural_readings(token)):
                runs = _runs(reading)
                for phrase in self._phrases.get(runs[0], ()):
                    if reading is not token and len(phrase.words) > 1:
                        continue  # the plural ending belongs on the phrase's last word only
                    if _covers(runs, phrase.words[0]) and self._rest_matches(tokens, start, phrase):
                        fragment = " ".join(tokens[start : start + len(phrase.words)])
                        return Match(phrase.rule, fragment, index)
        # Spaced-out letters join into one token that may hold the word and its neighbours
        # ("a n u d e" → "anude"), so inside those runs rules match anywhere.
        letter_runs = [t for t, is_run in zip(tokens, stream.is_run, strict=True) if is_run]
        if letter_runs:
            # One pass over all runs together; the space between them matches no rule.
            all_runs = _runs(" ".join(letter_runs))
            for phrase in self._spelled:
                if _contains(all_runs, phrase.words[0]):
                    fragment = next(
                        run for run in letter_runs if _contains(_runs(run), phrase.words[0])
                    )
                    return Match(phrase.rule, fragment, index)
        return None

    @staticmethod
    def _rest_matches(tokens: Sequence[str], start: int, phrase: _Phrase) -> bool:
        words = phrase.words
        if start + len(words) > len(tokens):
            return False
        for offset in range(1, len(words)):
            token = tokens[start + offset]
            readings = [token]
            if offset == len(words) - 1:
                readings += _plural_readings(token)
            if not any(_covers(_runs(reading), words[offset]) for reading in readings):
                return False
        return True
