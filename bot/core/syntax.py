"""How each platform types a command with arguments, for the hints in replies.

A reply that tells users what to type next ("`/unshare rex` stops sharing it") shows it the way
their platform takes it: the shell types ``/unshare rex``; Slack ``/dreambot unshare rex`` for
the commands without a slash command of their own (``/forget rex`` for those with one);
Discord names each option, ``/unshare subject:rex``. One ``Core`` serves one platform, so its
adapter sets ``Core.syntax`` once, and the core writes every such hint with it.
"""

from __future__ import annotations

from dataclasses import dataclass

Argument = tuple[str, str | bool] | str
"""One argument of a hint: ``(option, value)``, ``(option, True)`` for a switch such as
``everyone``, or a bare string shown as it is (``…``)."""


@dataclass(frozen=True)
class CommandSyntax:
    """How one platform types its commands."""

    prefix: str = "/"
    """What comes before a command's name (Slack: ``/dreambot ``)."""
    own_commands: frozenset[str] = frozenset()
    """Commands typed with ``/`` alone whatever the prefix (Slack's own slash commands)."""
    named_options: bool = False
    """Whether arguments are written ``option:value`` (Discord's slash command options)."""

    def name(self, command: str) -> str:
        """How ``command`` alone is typed: ``/use``, ``/dreambot use``."""
        return f"/{command}" if command in self.own_commands else f"{self.prefix}{command}"

    def hint(self, command: str, *arguments: Argument) -> str:
        """``command`` with ``arguments`` as this platform types it: an ``(option, value)`` is
        ``value`` in the text form and ``option:value`` on Discord; an ``(option, True)`` is
        ``option`` (``everyone``) or ``option:True``; a bare string stays as it is."""
        words = [self.name(command)]
        for argument in arguments:
            if isinstance(argument, str):
                words.append(argument)
            elif self.named_options:
                words.append(f"{argument[0]}:{argument[1]}")
            else:
                option, value = argument
                words.append(option if value is True else str(value))
        return " ".join(words)


TEXT_SYNTAX = CommandSyntax()
"""The shell's: ``/unshare rex``; the core's default."""
DISCORD_SYNTAX = CommandSyntax(named_options=True)
"""Discord's: ``/unshare subject:rex``."""


def train_example(syntax: CommandSyntax) -> str:
    """How to train a first subject, for a caller who has none: ``/train <name> <class>
    <photos…>``; on Discord with its options, the photos being its attachment options (three
    required, up to ``photo10``): ``/train name:<name> class:<class> photo1:… photo2:…
    photo3:…``."""
    photos = "photo1:… photo2:… photo3:…" if syntax.named_options else "<photos…>"
    return syntax.hint("train", ("name", "<name>"), ("class", "<class>"), photos)
