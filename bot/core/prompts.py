"""Prompt resolution: ``[V]`` and ``[name]`` become the caller's subject tokens."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from bot.core.errors import UserError
from bot.core.store import Subject

SUBJECT_REF = re.compile(r"\[([^\[\]]{1,40})\]")
ACTIVE = "v"


@dataclass(frozen=True)
class ResolvedPrompt:
    """A prompt with its subject references replaced, and the subjects it uses."""

    text: str
    subjects: list[Subject]


def active_subject(subjects: Sequence[Subject]) -> Subject | None:
    """The subject ``[V]`` means: the caller's newest ready one (``subjects`` newest first)."""
    return next((s for s in subjects if s.status == "ready"), None)


def _format_names(subjects: list[Subject]) -> str:
    return ", ".join(s.name for s in subjects) or "none yet"


def resolve_prompt(prompt: str, subjects: list[Subject], *, max_chars: int) -> ResolvedPrompt:
    """Replace ``[V]`` (the caller's newest ready subject) and ``[name]`` with subject tokens.

    ``subjects`` are the caller's own, newest first. The class noun is added after the token
    when the prompt does not already say it ("[V] on the beach" → "zqv dog on the beach").
    Raises UserError for unknown or unfinished subjects and for prompts that end up too long.
    """
    prompt = " ".join(prompt.split())
    if not prompt:
        raise UserError("Tell me what to draw, e.g. `/imagine a [V] dog on the beach`.")
    used: list[Subject] = []

    def lookup(ref: str) -> Subject:
        if ref.lower() == ACTIVE:
            active = active_subject(subjects)
            if active is not None:
                return active
            if subjects:
                raise UserError(
                    f"Your subject {subjects[0].name} is still {subjects[0].status}; "
                    "[V] works once it is ready."
                )
            raise UserError(
                "[V] stands for your trained subject, and you have none yet. "
                "Train one first: `/train <name> <class> <3 or more photos>`."
            )
        for subject in subjects:
            if subject.name.lower() == ref.lower():
                if subject.status != "ready":
                    raise UserError(
                        f"Your subject {subject.name} is {subject.status}, not ready yet."
                    )
                return subject
        raise UserError(
            f"You have no subject called '{ref}'. Your subjects: {_format_names(subjects)}."
        )

    pieces: list[str] = []
    position = 0
    for match in SUBJECT_REF.finditer(prompt):
        subject = lookup(match.group(1).strip())
        if subject not in used:
            used.append(subject)
        pieces.append(prompt[position : match.start()])
        following = prompt[match.end() :].lstrip().lower()
        says_class = following.startswith(subject.class_noun.lower())
        pieces.append(subject.token if says_class else f"{subject.token} {subject.class_noun}")
        position = match.end()
    pieces.append(prompt[position:])
    text = "".join(pieces)
    if len(text) > max_chars:
        raise UserError(
            f"That prompt is {len(text)} characters; the limit is {max_chars}. Shorten it."
        )
    return ResolvedPrompt(text=text, subjects=used)
