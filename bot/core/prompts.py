"""Prompt resolution: ``[V]``, ``[name]`` and ``[token]`` become subject tokens.

A caller may draw their own subjects and those shared with them on purpose (``/share``);
``SubjectLookup`` decides which subject a reference in brackets means for one caller.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bot.core.errors import UserError, as_typed
from bot.core.store import Subject
from bot.core.syntax import TEXT_SYNTAX, CommandSyntax, train_example

SUBJECT_REF = re.compile(r"\[([^\[\]]{1,40})\]")
ACTIVE = "v"


@dataclass(frozen=True)
class ResolvedPrompt:
    """A prompt with its subject references replaced, and the subjects it uses."""

    text: str
    subjects: list[Subject]


def active_subject(subjects: Sequence[Subject], chosen: str | None = None) -> Subject | None:
    """The subject ``[V]`` means among the caller's own ``subjects`` (newest first): the one
    they chose with /use (``chosen``, its id) while it is ready, else their newest ready one."""
    ready = [s for s in subjects if s.status == "ready"]
    return next((s for s in ready if s.id == chosen), None) or next(iter(ready), None)


def format_names(subjects: Sequence[Subject]) -> str:
    """``rex, mia``: subjects' names as replies list them (``none yet`` for none)."""
    return ", ".join(s.name for s in subjects) or "none yet"


class SubjectLookup:
    """The subjects one caller may draw: their own (newest first) and those other users of
    the workspace shared with them (``shared``, newest first).

    ``[V]`` is the caller's active subject: the one they chose with /use (``chosen``, its id)
    while it is ready, else their newest ready one (``active_subject``); never a shared one.
    ``[name]`` is the caller's own subject of
    that name, else the one shared subject of that name (several: the caller is asked to
    write the token instead). ``[token]`` also names a subject: tokens are unique within a
    workspace, so it is the unambiguous way to write a shared subject. ``mention`` renders an
    owner's user id in messages; ``syntax`` types the commands its messages suggest.
    """

    def __init__(
        self,
        own: Sequence[Subject],
        shared: Sequence[Subject] = (),
        *,
        chosen: str | None = None,
        mention: Callable[[str], str] = str,
        syntax: CommandSyntax = TEXT_SYNTAX,
    ) -> None:
        self.own = list(own)
        self.shared = list(shared)
        self.chosen = chosen
        self.mention = mention
        self.syntax = syntax

    @property
    def active(self) -> Subject | None:
        """The subject ``[V]`` means now, if any (see ``active_subject``)."""
        return active_subject(self.own, self.chosen)

    def find(self, ref: str) -> Subject:
        """The ready subject ``ref`` (the text between the brackets) means.

        Raises UserError for an unknown, ambiguous or unfinished subject.
        """
        ref = ref.strip()
        key = ref.lower()
        if key == ACTIVE:
            return self._active()
        own = self._own(key)
        if own is not None:
            if own.status != "ready":
                raise UserError(f"Your subject {own.name} is {own.status}, not ready yet.")
            return own
        shared = self._shared(ref)
        if shared is None:
            raise UserError(self._unknown(ref))
        if shared.status == "failed":
            raise UserError(
                f"{shared.name}, shared with you by {self.mention(shared.owner.user_id)}, failed "
                "to train, so it can't be drawn until they train it again."
            )
        if shared.status != "ready":
            raise UserError(
                f"{shared.name}, shared with you by {self.mention(shared.owner.user_id)}, is "
                f"still {shared.status}; it can be drawn once it is ready."
            )
        return shared

    def reference(self, subject: Subject) -> str:
        """How the caller writes ``subject`` in a prompt: ``[name]``, or ``[token]`` for a
        shared subject whose name is also another subject's they may draw."""
        if subject in self.own:
            return f"[{subject.name}]"
        key = subject.name.lower()
        namesakes = [s for s in (*self.own, *self.shared) if s.name.lower() == key]
        return f"[{subject.name}]" if len(namesakes) == 1 else f"[{subject.token}]"

    def pinned(self, prompt: str) -> str:
        """``prompt`` with each reference written so it keeps meaning the subject it means
        now (for a later Reroll): ``[V]`` as the name of the subject it stands for, a shared
        subject as its token (the caller may later train a subject of that name). References
        that don't resolve are left as they are."""

        def pin(match: re.Match[str]) -> str:
            ref = match.group(1).strip()
            if ref.lower() == ACTIVE:
                active = self.active
                return f"[{active.name}]" if active is not None else match.group(0)
            if self._own(ref.lower()) is not None:
                return match.group(0)
            try:
                shared = self._shared(ref)
            except UserError:
                return match.group(0)
            return f"[{shared.token}]" if shared is not None else match.group(0)

        return SUBJECT_REF.sub(pin, prompt)

    def written(self, prompt: str) -> str:
        """``prompt`` as the caller would write it, for showing it: a shared subject that a
        pinned prompt names by token (``pinned``) is written as ``reference`` writes it, by
        name unless that name is ambiguous for them."""

        def write(match: re.Match[str]) -> str:
            ref = match.group(1).strip()
            if self._own(ref.lower()) is not None:
                return match.group(0)
            key = ref.lower()
            shared = next((s for s in self.shared if s.token.lower() == key), None)
            return self.reference(shared) if shared is not None else match.group(0)

        return SUBJECT_REF.sub(write, prompt)

    def _active(self) -> Subject:
        active = self.active
        if active is not None:
            return active
        if self.own:
            raise UserError(
                f"Your subject {self.own[0].name} is still {self.own[0].status}; "
                "[V] works once it is ready."
            )
        raise UserError(
            "[V] stands for your trained subject, and you have none yet. "
            f"Train one first: `{train_example(self.syntax)}`."
        )

    def _own(self, key: str) -> Subject | None:
        by_name = next((s for s in self.own if s.name.lower() == key), None)
        return by_name or next((s for s in self.own if s.token.lower() == key), None)

    def _shared(self, ref: str) -> Subject | None:
        """The shared subject ``ref`` names (its token first); None if none does."""
        key = ref.lower()
        by_token = next((s for s in self.shared if s.token.lower() == key), None)
        if by_token is not None:
            return by_token
        named = [s for s in self.shared if s.name.lower() == key]
        if len(named) > 1:
            listed = ", ".join(
                f"[{s.token}] ({self.mention(s.owner.user_id)}'s {s.class_noun})" for s in named
            )
            raise UserError(
                f"{len(named)} subjects shared with you are called {named[0].name}: {listed}. "
                f"Write the token of the one you mean instead of its name, e.g. "
                f"[{named[0].token}]; tokens are unique here."
            )
        return named[0] if named else None

    def shared_list(self) -> str:
        """The shared subjects as a prompt writes them, with their owners."""
        return ", ".join(
            f"{self.reference(s)} by {self.mention(s.owner.user_id)}" for s in self.shared
        )

    def _unknown(self, ref: str) -> str:
        text = (
            f"You have no subject called {as_typed(ref)}. Your subjects: {format_names(self.own)}."
        )
        if self.shared:
            text += f" Shared with you: {self.shared_list()}."
        return text


def resolve_prompt(
    prompt: str,
    subjects: Sequence[Subject] | SubjectLookup,
    *,
    max_chars: int,
) -> ResolvedPrompt:
    """Replace ``[V]`` (the caller's active subject: see ``SubjectLookup``), ``[name]`` and
    ``[token]`` with subject tokens.

    ``subjects`` are the caller's own, newest first, or a ``SubjectLookup`` that also holds
    the subjects shared with them. The class noun is added after the token when the prompt
    does not already say it ("[V] on the beach" → "zqv dog on the beach").
    Raises UserError for unknown, ambiguous or unfinished subjects and for prompts that end up
    too long.
    """
    lookup = subjects if isinstance(subjects, SubjectLookup) else SubjectLookup(subjects)
    prompt = " ".join(prompt.split())
    if not prompt:
        example = lookup.syntax.hint("imagine", ("prompt", "a [V] dog on the beach"))
        raise UserError(f"Tell me what to draw, e.g. `{example}`.")
    used: list[Subject] = []
    pieces: list[str] = []
    position = 0
    for match in SUBJECT_REF.finditer(prompt):
        subject = lookup.find(match.group(1))
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
