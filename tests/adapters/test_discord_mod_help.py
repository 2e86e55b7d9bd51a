"""/mod help on Discord says what Discord's forms of the moderator commands do where they
differ from the text form: on/off switches are enabled:, and the safety filter's off is for
age-restricted channels only."""

from __future__ import annotations

from typing import Any

import discord

from bot.adapters.discord import DiscordAdapter
from tests.adapters.conftest import FakeDiscord, interaction_payload
from tests.adapters.test_discord_moderation import MODERATOR, private_replies


async def test_mod_help_says_safety_off_applies_only_in_age_restricted_channels(
    adapter: DiscordAdapter, fake_discord: FakeDiscord
) -> None:
    payload: dict[str, Any] = interaction_payload(
        command="mod",
        options=[{"name": "help", "type": 1, "options": []}],
        permissions=MODERATOR,
    )
    await adapter.client.tree._call(
        discord.Interaction(data=payload, state=adapter.client._connection)  # type: ignore[arg-type]
    )

    said = "\n".join(private_replies(fake_discord))
    assert "enabled:True or enabled:False" in said
    assert "/mod safety enabled:False lets images through unchecked only in age-restricted" in said
