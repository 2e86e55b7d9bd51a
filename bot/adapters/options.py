"""``--name value`` options typed after a text command (the shell, Slack), parsed one way.

Chat clients' "smart" punctuation is undone: “quotes” and an em or en dash for ``--`` work,
and so does ``--name=value``. Option names are matched without regard to case.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from bot.core.commands import Core, Receipt
from bot.core.errors import UserError, as_typed
from bot.core.store import Owner

IMAGINE_OPTIONS = ("count", "seed", "no", "aspect", "steps", "guidance", "strength")


def split_options(text: str, names: Iterable[str]) -> tuple[str, dict[str, str]]:
    """Take the ``--name value`` options in ``names`` out of ``text``: return what is left
    (each option replaced by a space) and the values by lower-case name; the last one wins."""
    pattern = re.compile(
        rf"(?:^|\s)(?:--|—|–)({'|'.join(map(re.escape, names))})"
        r"(?:\s+|=)(\"[^\"]*\"|“[^”]*”|(?!--|—|–)\S+)",
        re.IGNORECASE,
    )
    options: dict[str, str] = {}

    def take(match: re.Match[str]) -> str:
        options[match.group(1).lower()] = match.group(2).strip('"“”')
        return " "

    rest = pattern.sub(take, f" {text} ")
    _refuse_leftover_options(rest, names)
    return rest, options


def _refuse_leftover_options(rest: str, names: Iterable[str]) -> None:
    """Raise UserError for an option left in ``rest``: one of ``names`` with no value after it,
    or an unknown ``--name`` (a typo would otherwise end up in the prompt unnoticed)."""
    known = sorted({name.lower() for name in names})
    for match in re.finditer(r"(?:^|\s)(--|—|–)([A-Za-z][\w-]*)(?==|\s|$)", rest):
        name = match.group(2).lower()
        if name in known:
            raise UserError(f"--{name} needs a value after it, e.g. {_EXAMPLES.get(name, '')}.")
        if match.group(1) == "--":  # a dash in prose ("a cat —happy") is left alone
            listed = ", ".join(f"--{k}" for k in known)
            unknown = as_typed(f"--{name}")
            raise UserError(f"Unknown option {unknown}; the options here are {listed}.")


_EXAMPLES = {
    "count": "--count 2",
    "seed": "--seed 42",
    "no": '--no "blurry, text"',
    "aspect": "--aspect portrait",
    "steps": "--steps 25",
    "guidance": "--guidance 7.5",
    "strength": "--strength 0.8",
    "model": "--model NAME",
}


@dataclass(frozen=True)
class ImagineArgs:
    """``/imagine`` parsed: the prompt and its ``--options``."""

    prompt: str
    negative: str = ""
    count: int | None = None
    seed: int | None = None
    aspect: str | None = None
    steps: int | None = None
    guidance: float | None = None
    strength: float | None = None


def parse_imagine(text: str) -> ImagineArgs:
    """``a [V] dog --count 2 --seed 7 --no "blur"`` → prompt and options."""
    rest, options = split_options(text, IMAGINE_OPTIONS)
    prompt = " ".join(rest.split())
    if not prompt:
        raise UserError(
            'Usage: /imagine <prompt> [--count N] [--seed N] [--no "…"] [--aspect A] '
            "[--steps N] [--guidance X] [--strength X]"
        )
    try:
        count = int(options["count"]) if "count" in options else None
        seed = int(options["seed"]) if "seed" in options else None
        steps = int(options["steps"]) if "steps" in options else None
    except ValueError:
        raise UserError("--count, --seed and --steps take whole numbers.") from None
    try:
        guidance = float(options["guidance"]) if "guidance" in options else None
        strength = float(options["strength"]) if "strength" in options else None
    except ValueError:
        raise UserError("--guidance and --strength take numbers, e.g. 7.5 or 0.8.") from None
    return ImagineArgs(
        prompt=prompt,
        negative=options.get("no", ""),
        count=count,
        seed=seed,
        aspect=options["aspect"].lower() if "aspect" in options else None,
        steps=steps,
        guidance=guidance,
        strength=strength,
    )


async def queue_imagine(
    core: Core, owner: Owner, destination: dict[str, Any], args: ImagineArgs
) -> Receipt:
    """Queue a parsed ``/imagine`` for ``owner`` (``Core.imagine`` with its options)."""
    return await core.imagine(
        owner,
        destination,
        args.prompt,
        count=args.count,
        seed=args.seed,
        negative_prompt=args.negative,
        aspect=args.aspect,
        steps=args.steps,
        guidance=args.guidance,
        strength=args.strength,
    )
