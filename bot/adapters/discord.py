"""The Discord adapter: slash commands and buttons in, channel messages, edits and files out.

It only translates. A slash command is deferred at once (Discord allows 3 seconds), its
attachments are downloaded from Discord's CDN, and the core is called with plain values; the
core's reply goes back as an ephemeral follow-up (several, cut between lines, when it is over
2,000 characters; by DM when the work outlasted the interaction's 15 minutes). Engine updates
arrive through the ``Sink`` methods: one public progress message per job (its id is kept in
the job's destination, so it is still edited after a restart), with a Cancel button for the
job's owner until the job ends, edited at most once per ``edit_interval`` seconds (an edit
carries the latest live preview of the image being drawn, if one came since the last), then the
result as a normal channel message mentioning the user (interaction tokens expire after 15
minutes, jobs may take longer), or by DM when the channel refuses it. Discord refuses a message
whose files exceed the server's upload limit, so a result is split into messages under it, and
an image too large on its own goes as a smaller JPEG copy with the same provenance
(``bot.adapters.uploads``); the stored PNG is unchanged. ``/mydata delete:True`` answers
with what it would delete above a "Delete everything" button (``DeleteDataButton``), which is
the confirmation: only the member it was shown to may press it.

Who moderates is the one rule decided here: members with Manage Server (as Discord resolves
it for the interaction) or a configured user/role (``DREAMBOT_MODERATOR_USERS``/``_ROLES``).
The /mod group is also hidden from others by its default permissions, but the check runs on
every call, because a server admin can change who sees it.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal, Self

import discord
from discord import app_commands

from bot.adapters import common, uploads
from bot.adapters.downloads import DISCORD_CDN_HOSTS, Downloader
from bot.adapters.throttle import Clock, EditThrottle, Sleep
from bot.config import ConfigError, Settings
from bot.core.commands import Core, Receipt
from bot.core.delivery import Delivery, PostedParts, file_part, progress_text
from bot.core.errors import UserError, as_typed
from bot.core.moderation import MOD_HELP, Moderator, parse_duration
from bot.core.sharing import SHAREABLE
from bot.core.store import EVERYONE, Job, Owner
from bot.core.syntax import DISCORD_SYNTAX
from engine.api import ASPECT_RATIOS, Progress

log = logging.getLogger(__name__)

PLATFORM = "discord"
MAX_CONTENT = 2000
MAX_FILES_PER_MESSAGE = 10
TOKEN_EXPIRED = frozenset({50027, 10015})
"""Discord's codes for a follow-up on an interaction token past its 15 minutes ("Invalid
Webhook Token", "Unknown Webhook")."""
ALREADY_ACKNOWLEDGED = 40060
"""Discord's answer to a second first response: this interaction was answered already."""
REQUEST_TOO_LARGE = 40005
"""Discord's JSON error code for a message whose files exceed the upload limit (HTTP 413)."""
UPLOAD_RETRIES = 3
"""How many times a refused upload is tried again at half the size before the text goes
alone (10 MiB → 5 → 2.5 → 1.25)."""
# Vary and Upscale carry the image's index (0-3); ids without one (older results) mean the
# first image.
BUTTON_ID = re.compile(
    r"dreambot:(?P<action>reroll|vary|upscale):(?P<job_id>[0-9a-f]{32})(?::(?P<index>[0-3]))?"
)
CANCEL_ID = re.compile(r"dreambot:cancel:(?P<job_id>[0-9a-f]{32})")
"""The Cancel button on a job's progress message."""
DELETE_DATA_ID = re.compile(r"dreambot:delete-data:(?P<user_id>[0-9]+)")
"""The "Delete everything" button that confirms /mydata delete:True (for the user it names)."""
MAX_BUTTON_IMAGES = 4
MAX_DISCORD_PHOTOS = 10  # photo1..photo10

DISCORD_MOD_NOTE = (
    "On Discord, pick each command's options in the command box. /mod quota set takes "
    "what:, limit: (leave it out to go back to the default) and user: or role: (neither "
    "means the whole server). Users are picked with user:, durations are typed, e.g. 7d. "
    "On and off are enabled:True or enabled:False; /mod safety enabled:False lets images "
    "through unchecked only in age-restricted channels (and their threads), as Discord's "
    "rules ask."
)


def fit(text: str, limit: int = MAX_CONTENT) -> str:
    """``text`` cut to Discord's message length, marked with an ellipsis when cut."""
    return common.fit(text, limit)


def owner_of(interaction: discord.Interaction[Any]) -> Owner:
    """The core's owner for the user of an interaction (one workspace per guild)."""
    return Owner(PLATFORM, str(interaction.guild_id), str(interaction.user.id))


def role_ids(user: discord.Member | discord.User) -> list[str]:
    """A member's role ids as strings (none for a user outside a guild).

    Read from the member data Discord sent with the interaction, not from the role cache, so
    it is right even before the guild is cached.
    """
    if not isinstance(user, discord.Member):
        return []
    return [str(role_id) for role_id in user._roles]


def target_roles(
    interaction: discord.Interaction[Any], user: discord.Member | discord.User
) -> list[str] | None:
    """Another member's role ids, for a moderator's view of them; None if unknown.

    Discord resolves a user option to a member (with roles) when they are in the server; a
    plain user is looked up in the guild's cache, and is otherwise not known as a member.
    """
    if isinstance(user, discord.Member):
        return role_ids(user)
    member = interaction.guild.get_member(user.id) if interaction.guild is not None else None
    return role_ids(member) if member is not None else None


def is_moderator(interaction: discord.Interaction[Any], core: Core) -> bool:
    """Manage Server in this guild, or a moderator by configuration (user id or role)."""
    # interaction.permissions is what Discord resolved for this member here (administrators
    # and the owner included); Manage Server is guild-wide, no channel overwrite changes it.
    if interaction.guild_id is not None and interaction.permissions.manage_guild:
        return True
    return core.moderation.is_configured_moderator(
        str(interaction.user.id), role_ids(interaction.user)
    )


def usage_text(core: Core) -> str:
    """The commands as they are typed on Discord, for /help."""
    settings = core.settings
    most = min(settings.max_photos, MAX_DISCORD_PHOTOS)
    return f"""\
/train name:<name> class:<class> photo1 … photo{most} [model:<base model>]
        learn a subject from {settings.min_photos}–{most} photos attached to the command
        e.g. /train name:rex class:dog with photo1…photo3 attached
/imagine prompt:<text> [negative:<text>] [count:1-4] [seed:<number>] [aspect:<shape>]
        [steps:<n>] [guidance:<x>] [strength:<x>]
        draw a prompt; [V] is your active subject (see /use), [name] a named one
        (yours, or one shared with you)
        e.g. /imagine prompt:a [V] dog wearing a hat aspect:portrait
        under each result: 🎲 Reroll (new seed), and per image V1…V4 (a close variation
        of that image) and U1…U4 (that image enlarged)
/showcase [name:<name>]
        your subject in the DreamBooth paper's five capabilities, one grid
/subjects              list your subjects and their status, and those shared with you
/use [subject:<name>]  make one of your ready subjects [V]; left out: your newest one
/forget name:<name>    delete a subject, its photos and its adapter
/share subject:<name> user:<member> | everyone:True
        let one member, or everyone on this server, draw your subject as [name] (or as
        its token where names clash) and /showcase it, on their quota
/unshare subject:<name> [user:<member> | everyone:True]
        stop sharing it with them (with neither: with anyone)
/jobs                  your jobs waiting or running, with their ids
/cancel [target:<subject name or job id>]
        cancel your newest job, a subject's training, or the job whose id starts so
        (4+ characters, as /jobs shows); or press ✖️ Cancel on a job's progress message
/quota                 your usage today and when it resets (midnight UTC)
/mydata [delete:True]  what dreambot keeps about you; delete:True deletes it
/mod help              moderator commands (Manage Server or a moderator role)
/help                  this text"""


def mention(user_id: str) -> str:
    """A mention of a Discord user (replies are sent without pinging anyone)."""
    return f"<@{user_id}>"


def share_target(user: discord.Member | discord.User | None, everyone: bool) -> str | None:
    """The target of /share or /unshare from its options: a member's id, ``EVERYONE``, or
    None when neither is given."""
    if user is not None and everyone:
        raise UserError("Pick either user: or everyone:, not both.")
    if everyone:
        return EVERYONE
    if user is None:
        return None
    if user.bot:
        raise UserError(f"{mention(str(user.id))} is a bot; bots don't draw subjects.")
    return str(user.id)


def destination_of(interaction: discord.Interaction[Any]) -> dict[str, Any]:
    """Where a job's progress and result go: the interaction's channel, then the user by DM."""
    return {
        "channel_id": interaction.channel_id,
        "guild_id": interaction.guild_id,
        "user_id": interaction.user.id,
        # Discord's rules keep adult content in age-restricted channels: only there may a
        # workspace's /mod safety off let images through unchecked (Core: checks_images).
        "age_restricted": age_restricted(interaction.channel),
    }


def age_restricted(channel: object) -> bool:
    """Whether ``channel`` is age-restricted ("NSFW"): a text or voice channel so marked, or a
    thread in one. A DM, or a channel Discord sent too little about to tell, is not."""
    is_nsfw = getattr(channel, "is_nsfw", None)
    return bool(is_nsfw()) if callable(is_nsfw) else False


@dataclass(frozen=True)
class Outgoing:
    """One message to post: text, image files, optional buttons."""

    content: str
    files: list[tuple[str, bytes]]
    buttons_for: str | None = None
    """The generation job whose Reroll / Vary / Upscale buttons go under the images."""
    button_images: int = 1
    """How many images get their own Vary / Upscale buttons (up to four)."""
    parts: PostedParts = field(default_factory=PostedParts)
    """What an earlier try already posted (the text, files by name): only the rest goes."""


class JobButton(discord.ui.DynamicItem[discord.ui.Button[Any]], template=BUTTON_ID.pattern):
    """Reroll, or Vary / Upscale of one image, under a result; the custom_id carries all it
    needs after a restart."""

    LABELS: ClassVar[dict[str, str]] = {"reroll": "Reroll", "vary": "Vary", "upscale": "Upscale"}
    EMOJI: ClassVar[dict[str, str]] = {"reroll": "🎲", "vary": "🔀", "upscale": "⬆️"}

    def __init__(
        self, action: str, job_id: str, index: int | None = None, *, images: int = 1
    ) -> None:
        """``index`` picks the image to vary or upscale; labelled V1, U2… when ``images`` > 1."""
        custom_id = f"dreambot:{action}:{job_id}"
        label = self.LABELS[action]
        if index is not None:
            custom_id += f":{index}"
            if images > 1:
                label = f"{action[0].upper()}{index + 1}"
        super().__init__(
            discord.ui.Button(
                label=label,
                emoji=self.EMOJI[action],
                style=discord.ButtonStyle.secondary,
                custom_id=custom_id,
                row=None if index is None or images == 1 else ("vary", "upscale").index(action) + 1,
            )
        )
        self.action = action
        self.job_id = job_id
        self.index = index or 0

    @classmethod
    async def from_custom_id(
        cls,
        interaction: discord.Interaction[Any],
        item: discord.ui.Item[Any],
        match: re.Match[str],
        /,
    ) -> JobButton:
        index = match["index"]
        return cls(match["action"], match["job_id"], int(index) if index else None)

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        client = interaction.client
        assert isinstance(client, DreamClient)
        await client.adapter.click(interaction, self.action, self.job_id, self.index)


@dataclass(frozen=True)
class WithButtons:
    """A command's private reply with buttons under its last message."""

    text: str
    view: discord.ui.View


class _UsersButton:
    """What the Cancel and "Delete everything" buttons share: one button whose custom_id,
    ``PREFIX:value``, carries all it needs after a restart (the template's group ``GROUP``
    reads the value back), which only one user may press (the core refuses others), handed
    to the adapter by ``pressed``. Mixed in before ``discord.ui.DynamicItem``."""

    PREFIX: ClassVar[str]
    GROUP: ClassVar[str]
    LOOK: ClassVar[tuple[str, str, discord.ButtonStyle]]
    """Its label, emoji and style."""

    def __init__(self, value: str) -> None:
        label, emoji, style = self.LOOK
        button = discord.ui.Button[Any](
            label=label, emoji=emoji, style=style, custom_id=f"{self.PREFIX}:{value}"
        )
        super().__init__(button)  # type: ignore[call-arg]  # DynamicItem's, after this mixin
        self.value = value

    @classmethod
    async def from_custom_id(
        cls,
        interaction: discord.Interaction[Any],
        item: discord.ui.Item[Any],
        match: re.Match[str],
        /,
    ) -> Self:
        return cls(match[cls.GROUP])

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        client = interaction.client
        assert isinstance(client, DreamClient)
        await self.pressed(client.adapter, interaction)

    async def pressed(self, adapter: DiscordAdapter, interaction: discord.Interaction[Any]) -> None:
        raise NotImplementedError


class DeleteDataButton(
    _UsersButton,
    discord.ui.DynamicItem[discord.ui.Button[Any]],
    template=DELETE_DATA_ID.pattern,
):
    """The "Delete everything" button under the private reply to /mydata delete:True: the
    confirmation. Only the user it was shown to may press it; the custom_id names them."""

    PREFIX, GROUP = "dreambot:delete-data", "user_id"
    LOOK = ("Delete everything", "🗑️", discord.ButtonStyle.danger)

    async def pressed(self, adapter: DiscordAdapter, interaction: discord.Interaction[Any]) -> None:
        await adapter.delete_data_click(interaction, self.value)


def delete_data_button(user_id: str) -> discord.ui.View:
    """The "Delete everything" button under a /mydata delete:True preview."""
    view = discord.ui.View(timeout=None)
    view.add_item(DeleteDataButton(user_id))
    return view


class CancelButton(
    _UsersButton, discord.ui.DynamicItem[discord.ui.Button[Any]], template=CANCEL_ID.pattern
):
    """Cancel, on a job's progress message while the job waits or runs; only its owner may
    press it. The custom_id carries the job."""

    PREFIX, GROUP = "dreambot:cancel", "job_id"
    LOOK = ("Cancel", "✖️", discord.ButtonStyle.secondary)

    async def pressed(self, adapter: DiscordAdapter, interaction: discord.Interaction[Any]) -> None:
        await adapter.cancel_click(interaction, self.value)


def cancel_button(job_id: str) -> discord.ui.View:
    """The Cancel button under a job's progress message."""
    view = discord.ui.View(timeout=None)
    view.add_item(CancelButton(job_id))
    return view


def job_buttons(job_id: str, images: int = 1) -> discord.ui.View:
    """Reroll, then Vary and Upscale for each of the first four images of a generation job
    (one row each when there are several: V1 V2 … / U1 U2 …); Reroll alone when it has no
    image (the safety filter withheld them all)."""
    view = discord.ui.View(timeout=None)
    view.add_item(JobButton("reroll", job_id))
    shown = min(images, MAX_BUTTON_IMAGES)
    for action in ("vary", "upscale"):
        for index in range(shown):
            view.add_item(JobButton(action, job_id, index, images=shown))
    return view


class DreamClient(discord.Client):
    """The discord.py client: holds the command tree and the adapter, syncs commands at login."""

    def __init__(self, adapter: DiscordAdapter, *, dev_guild: int | None = None) -> None:
        # Slash commands and buttons need no privileged intent (no message content, no members);
        # the guilds intent keeps discord.py's channel and guild state consistent.
        super().__init__(intents=discord.Intents(guilds=True))
        self.adapter = adapter
        self.dev_guild = dev_guild
        self.tree = app_commands.CommandTree(self)
        add_commands(self.tree, adapter)

    async def setup_hook(self) -> None:
        """Register the persistent buttons and publish the slash commands."""
        self.add_dynamic_items(JobButton, CancelButton, DeleteDataButton)
        if self.dev_guild is not None:
            guild = discord.Object(self.dev_guild)
            self.tree.copy_global_to(guild=guild)
            synced = await self.tree.sync(guild=guild)
            log.info("synced %d commands to guild %s", len(synced), self.dev_guild)
        else:
            synced = await self.tree.sync()
            log.info("synced %d global commands (may take up to an hour to appear)", len(synced))


class DiscordAdapter:
    """Translates Discord interactions into core calls and engine updates into messages."""

    def __init__(
        self,
        core: Core,
        *,
        downloader: Downloader | None = None,
        edit_interval: float = 3.0,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        dev_guild: int | None = None,
    ) -> None:
        self.core = core
        core.mention = mention
        core.syntax = DISCORD_SYNTAX
        self.downloader = downloader or Downloader(max_bytes=core.settings.max_photo_bytes)
        self.edits = EditThrottle(edit_interval, clock=clock, sleep=sleep)
        self.client = DreamClient(self, dev_guild=dev_guild)
        self.progress = common.ProgressMessages(core.store, self.edits, "progress_message_id", int)
        self.progress_messages = self.progress.refs
        # The newest live preview not yet shown, per job: it rides on the next edit, so
        # previews never add edits beyond the throttle's rate.
        self._previews: dict[str, str] = {}

    async def close(self) -> None:
        """Close the client and the downloader."""
        await self.client.close()
        await self.downloader.close()

    # Commands (called from the command tree).

    async def respond(
        self,
        interaction: discord.Interaction[Any],
        work: Callable[[], Awaitable[str | WithButtons]],
    ) -> None:
        """Defer privately, run ``work`` and follow up privately with its text (and buttons,
        under its last message) or the error (in several messages when it is long). An
        interaction that comes again (Discord takes one first response to it, so a copy can't
        defer) was handled already: nothing runs."""
        try:
            await interaction.response.defer(ephemeral=True, thinking=True)
        except discord.HTTPException as exc:
            if exc.code != ALREADY_ACKNOWLEDGED:
                raise
            log.info("interaction %s came again; it was answered already", interaction.id)
            return

        async def in_a_server() -> str | WithButtons:
            if interaction.guild_id is None:
                raise UserError("Use dreambot in a server channel, not in direct messages.")
            return await work()

        answer = await common.command_reply(in_a_server, f"command {_command_name(interaction)}")
        text, view = (
            (answer.text, answer.view) if isinstance(answer, WithButtons) else (answer, None)
        )
        # A long reply (/mod help, a moderator's long list) goes as several messages rather
        # than cut at Discord's 2,000 characters.
        parts = common.split_text(text, MAX_CONTENT)
        for index, part in enumerate(parts):
            buttons: dict[str, Any] = {}
            if view is not None and index == len(parts) - 1:
                buttons["view"] = view
            try:
                # Mentions show as names but ping nobody: a reply may echo what was typed
                # ("@everyone" as a subject's name).
                await interaction.followup.send(
                    part,
                    ephemeral=True,
                    allowed_mentions=discord.AllowedMentions.none(),
                    **buttons,
                )
            except discord.HTTPException as exc:
                if exc.code not in TOKEN_EXPIRED:
                    raise
                # The work took longer than the interaction's 15 minutes: the rest goes by DM.
                log.warning("interaction token expired (%s); replying by DM", exc)
                rest = "\n".join(parts[index:])
                await self._reply_by_dm(interaction, f"About your {_what(interaction)}:\n{rest}")
                return

    async def _reply_by_dm(self, interaction: discord.Interaction[Any], text: str) -> None:
        """Send a command's reply to its user by DM (logged if they don't take DMs)."""
        try:
            dm = await self.client.create_dm(discord.Object(interaction.user.id))
            for part in common.split_text(text, MAX_CONTENT):
                await dm.send(part, allowed_mentions=discord.AllowedMentions.none())
        except (discord.Forbidden, discord.NotFound) as exc:
            log.warning("reply to user %s not sent (%s): %s", interaction.user.id, exc, text)

    async def train(
        self,
        interaction: discord.Interaction[Any],
        name: str,
        class_noun: str,
        photos: list[discord.Attachment],
        model: str | None = None,
    ) -> str:
        """/train: download the photos, queue the training, post the progress message."""
        owner, roles = owner_of(interaction), role_ids(interaction.user)
        # What the core would refuse without the photos is refused before the downloads.
        await self.core.check_new_subject(owner, name, class_noun, roles=roles, model=model)
        uploads = await self.downloader.fetch_all((a.url, a.filename) for a in photos)
        receipt = await self.core.train(
            owner,
            destination_of(interaction),
            name,
            class_noun,
            uploads,
            roles=roles,
            model=model,
        )
        await self._post_queued(interaction, receipt)
        return receipt.text

    async def imagine(
        self,
        interaction: discord.Interaction[Any],
        prompt: str,
        *,
        negative: str = "",
        count: int | None = None,
        seed: int | None = None,
        aspect: str | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        strength: float | None = None,
    ) -> str:
        """/imagine (and the buttons): queue a generation as the interaction's user."""
        receipt = await self.core.imagine(
            owner_of(interaction),
            destination_of(interaction),
            prompt,
            count=count,
            seed=seed,
            negative_prompt=negative,
            aspect=aspect,
            steps=steps,
            guidance=guidance,
            strength=strength,
            roles=role_ids(interaction.user),
        )
        await self._post_queued(interaction, receipt)
        return receipt.text

    async def showcase(self, interaction: discord.Interaction[Any], name: str | None) -> str:
        """/showcase: queue a subject's showcase grid as the interaction's user."""
        receipt = await self.core.showcase(
            owner_of(interaction),
            destination_of(interaction),
            name,
            roles=role_ids(interaction.user),
        )
        await self._post_queued(interaction, receipt)
        return receipt.text

    async def click(
        self, interaction: discord.Interaction[Any], action: str, job_id: str, index: int = 0
    ) -> None:
        """Reroll / Vary / Upscale (of image ``index``): redo a generation with its options,
        as (and paid by) the clicker.

        The core refuses when the image shows someone else's subject.
        """

        async def work() -> str:
            receipt = await self.core.reimagine(
                owner_of(interaction),
                destination_of(interaction),
                job_id,
                vary=action == "vary",
                upscale=action == "upscale",
                index=index,
                roles=role_ids(interaction.user),
                mention=lambda user_id: f"<@{user_id}>",
            )
            await self._post_queued(interaction, receipt)
            return receipt.text

        await self.respond(interaction, work)

    async def share(
        self,
        interaction: discord.Interaction[Any],
        subject: str,
        user: discord.Member | discord.User | None,
        everyone: bool,
    ) -> str:
        """/share subject: user:|everyone:: let a member, or the whole server, draw it."""
        target = share_target(user, everyone)
        if target is None:
            raise UserError(
                f"Say whom to share {as_typed(subject.strip())} with: user: (one member) or "
                "everyone:True (everyone on this server)."
            )
        return await self.core.sharing.share(owner_of(interaction), subject, target)

    async def unshare(
        self,
        interaction: discord.Interaction[Any],
        subject: str,
        user: discord.Member | discord.User | None,
        everyone: bool,
    ) -> str:
        """/unshare subject: [user:|everyone:]: stop sharing it (with neither: with anyone)."""
        target = share_target(user, everyone)
        return await self.core.sharing.unshare(owner_of(interaction), subject, target)

    async def jobs(self, interaction: discord.Interaction[Any]) -> str:
        """/jobs: the caller's jobs waiting or running in this server."""
        return await self.core.jobs_text(owner_of(interaction))

    async def cancel(self, interaction: discord.Interaction[Any], target: str | None) -> str:
        """/cancel [target:]: cancel one of the caller's jobs and close its progress message."""
        cancellation = await self.core.cancel(owner_of(interaction), target)
        await self._finish_progress(cancellation.job, common.CANCELLED_BY_OWNER)
        return cancellation.text

    async def cancel_click(self, interaction: discord.Interaction[Any], job_id: str) -> None:
        """The Cancel button of a job's progress message: its owner cancels it (anyone else
        is refused, privately) and the message closes, without the button."""

        async def work() -> str:
            cancellation = await self.core.cancel_from_button(
                owner_of(interaction), job_id, mention=lambda user_id: f"<@{user_id}>"
            )
            await self._finish_progress(cancellation.job, common.CANCELLED_BY_OWNER)
            return cancellation.text

        await self.respond(interaction, work)

    async def mydata(
        self, interaction: discord.Interaction[Any], delete: bool
    ) -> str | WithButtons:
        """/mydata: what is stored about the caller here; with delete:True, what deleting it
        would delete, under a "Delete everything" button that does it. Banned users may too."""
        owner = owner_of(interaction)
        if not delete:
            return await self.core.personal_data.summary(owner)
        preview = await self.core.personal_data.deletion_preview(owner)
        return WithButtons(
            f"{preview}\nPress Delete everything to go ahead.", delete_data_button(owner.user_id)
        )

    async def delete_data_click(self, interaction: discord.Interaction[Any], user_id: str) -> None:
        """The "Delete everything" button: the user it was shown to deletes their data here
        (anyone else is refused, privately); their cancelled jobs' progress messages close."""

        async def work() -> str:
            deletion = await self.core.personal_data.delete_from_button(
                owner_of(interaction), user_id, mention=mention
            )
            for job in deletion.cancelled:
                await self._finish_progress(job, common.CANCELLED_BY_OWNER)
            return self.core.personal_data.deleted_text(deletion)

        await self.respond(interaction, work)

    def moderator(self, interaction: discord.Interaction[Any]) -> Moderator:
        """The caller's moderator actions; raises NotModerator (a UserError) for others."""
        return self.core.moderation.acting(
            owner_of(interaction), is_moderator(interaction, self.core)
        )

    async def mod(
        self,
        interaction: discord.Interaction[Any],
        action: Callable[[Moderator], Awaitable[str]],
    ) -> None:
        """Run one /mod action, privately, after the moderator check."""
        await self.respond(interaction, lambda: action(self.moderator(interaction)))

    async def _post_queued(self, interaction: discord.Interaction[Any], receipt: Receipt) -> None:
        """Post the job's progress message, naming the job as its later updates will."""
        queued = progress_text(Progress(job_id=receipt.job_id, phase="queued"), receipt.label)
        content = f"<@{interaction.user.id}> · {queued} {common.queue_place(receipt)}"
        await self.progress.post_queued(
            receipt.job_id, destination_of(interaction), content, self._post_progress
        )

    # Sink: engine updates.

    async def show_progress(self, job: Job, text: str, progress: Progress) -> None:
        """Post the job's progress message once, then edit it (throttled), with the newest
        live preview image when one came."""
        content = fit(f"<@{job.destination['user_id']}> · {text}")
        if progress.preview_url:
            self._previews[job.id] = progress.preview_url
        await self.progress.update(
            job,
            content,
            self._post_progress,
            lambda message_id: self._edit_with_preview(job, message_id, content),
        )

    async def show_result(self, delivery: Delivery) -> None:
        """Post the result with its images (and buttons for generations), mentioning the user."""
        job = delivery.job
        files, buttons_for = await common.result_files(self.core.artifacts, delivery)
        self.edits.forget(job.id)
        content = f"<@{job.destination['user_id']}> {plain(delivery.text)}"
        outgoing = Outgoing(content, files, buttons_for, len(files), delivery.parts)
        await self._post_to_user(job, outgoing)
        await self._finish_progress(job, "✓ done — result below.")

    async def show_failure(self, job: Job, text: str) -> None:
        """Tell the user in the channel (or by DM) that the job failed, or that a moderator
        (a ban, a deleted subject) cancelled it."""
        self.edits.forget(job.id)
        mark = common.ending_mark(job)
        await self._post_to_user(
            job, Outgoing(f"<@{job.destination['user_id']}> {mark} {plain(text)}", [])
        )
        await self._finish_progress(job, common.ending_note(job))

    # Messages.

    def _channel(self, destination: dict[str, Any]) -> discord.PartialMessageable:
        return self.client.get_partial_messageable(
            int(destination["channel_id"]),
            guild_id=int(destination["guild_id"]) if destination.get("guild_id") else None,
        )

    async def _post_progress(
        self, job_id: str, destination: dict[str, Any], content: str
    ) -> int | None:
        """Post a progress message, with its Cancel button (edits keep it; closing the
        message removes it); None if the channel refuses (progress is best effort)."""
        self.edits.sent(job_id)
        try:
            message = await self._channel(destination).send(
                content,
                allowed_mentions=discord.AllowedMentions.none(),
                view=cancel_button(job_id),
            )
        except (discord.Forbidden, discord.NotFound) as exc:
            log.warning("job %s: no progress message in the channel (%s)", job_id, exc)
            return None
        return message.id

    async def _edit_with_preview(self, job: Job, message_id: int, content: str) -> None:
        """Edit the progress message, attaching the newest preview not yet shown (if any)."""
        url = self._previews.pop(job.id, None)
        preview = None
        if url is not None:
            try:
                data = await self.core.artifacts.aget_bytes(url)
                preview = [discord.File(io.BytesIO(data), filename="preview.jpg")]
            except Exception:
                # Best effort: the text still moves on without the picture.
                log.warning("job %s: preview %s not read", job.id, url, exc_info=True)
        await self._edit_progress(job, message_id, content, attachments=preview)

    async def _edit_progress(
        self,
        job: Job,
        message_id: int,
        content: str,
        *,
        attachments: list[discord.File] | None = None,
        closing: bool = False,
    ) -> None:
        """Edit a progress message; ``attachments`` replace its files ([] removes them).
        ``closing`` also removes its Cancel button (other edits leave it as it is)."""
        message = self._channel(job.destination).get_partial_message(message_id)
        changes: dict[str, Any] = {} if attachments is None else {"attachments": attachments}
        if closing:
            changes["view"] = None
        try:
            await message.edit(
                content=content, allowed_mentions=discord.AllowedMentions.none(), **changes
            )
        except (discord.Forbidden, discord.NotFound) as exc:
            log.warning("job %s: progress message %s gone (%s)", job.id, message_id, exc)
            self.progress.gone(job.id)

    async def _finish_progress(self, job: Job, note: str) -> None:
        """Close the job's progress message (best effort: the result is already posted)."""
        self._previews.pop(job.id, None)
        content = f"<@{job.destination['user_id']}> · {note}"
        await self.progress.finish(
            job,
            # The last preview goes (the result below shows the real images), and the Cancel
            # button with it: the job is over.
            lambda message_id: self._edit_progress(
                job, message_id, content, attachments=[], closing=True
            ),
        )

    async def _post_to_user(self, job: Job, outgoing: Outgoing) -> None:
        """Post in the job's channel; by DM if the channel is gone or forbidden; else log.

        The DM stands on its own, even when the channel refused only the later messages of a
        result: its first message carries the text, under a line saying why it came by DM,
        then come the files and buttons the channel didn't take.

        Other errors (Discord down, network) propagate so the delivery is retried later; files
        too large for the channel are not one of them (``_send`` deals with those).
        """
        try:
            await self._send(self._channel(job.destination), outgoing, job)
            return
        except (discord.Forbidden, discord.NotFound) as exc:
            log.warning("job %s: channel refused the result (%s); sending it by DM", job.id, exc)
        note = common.by_dm_note(f"<#{job.destination['channel_id']}>", outgoing.parts)
        by_dm = replace(
            outgoing, content=f"{note}\n{outgoing.content}", parts=outgoing.parts.by_dm()
        )
        try:
            user_id = int(job.destination["user_id"])
            dm = await self.client.create_dm(discord.Object(user_id))
            await self._send(dm, by_dm, job)
        except (discord.Forbidden, discord.NotFound) as exc:
            common.log_undelivered(log, job, exc, outgoing.content)

    async def _send(self, channel: discord.abc.Messageable, outgoing: Outgoing, job: Job) -> None:
        """Post ``outgoing`` as messages within the channel's upload limit (Discord refuses
        the whole message otherwise), the text on the first and the buttons on the last.

        If Discord refuses files anyway (HTTP 413: the limit changed, or ours is wrong), the
        rest goes again as if the limit were half as large, ``UPLOAD_RETRIES`` times; then
        the text goes without the images, saying so. Retrying the delivery would fail alike.
        Each message posted is added to ``outgoing.parts``; what an earlier try posted is
        left out (the buttons ride on the last message, so they come with the rest).
        """
        limit = upload_limit(channel)
        parts = outgoing.parts
        pending = parts.unposted(outgoing.files)
        text = None if parts.text in parts else outgoing.content
        if text is None and not pending:
            return  # all of it went out on an earlier try
        for _ in range(UPLOAD_RETRIES + 1):
            batches = await asyncio.to_thread(
                uploads.plan_uploads, pending, limit, MAX_FILES_PER_MESSAGE
            )
            try:
                for index, batch in enumerate(batches):
                    last = index == len(batches) - 1
                    await self._send_message(
                        channel, outgoing, job, text, uploads.upload_notes(batch), batch, last
                    )
                    await parts.add(
                        parts.text, *(file_part(name) for name, _ in pending[: len(batch)])
                    )
                    text = None
                    pending = pending[len(batch) :]
                return
            except discord.HTTPException as exc:
                if not too_large(exc) or not pending:
                    raise
                log.warning(
                    "job %s: Discord refused files under %d bytes (%s); trying smaller copies",
                    job.id,
                    limit,
                    exc,
                )
                limit //= 2
        log.warning(
            "job %s: %d files not attached: too large for the channel", job.id, len(pending)
        )
        note = uploads.not_attached_note(len(pending))
        await self._send_message(channel, outgoing, job, text, [note], [], True)
        await parts.add(parts.text, *(file_part(name) for name, _ in pending))

    async def _send_message(
        self,
        channel: discord.abc.Messageable,
        outgoing: Outgoing,
        job: Job,
        text: str | None,
        notes: list[str],
        batch: list[uploads.Attachment],
        last: bool,
    ) -> None:
        """One message of a result: ``text`` (the first's), ``notes`` below it, the batch's
        files, and the buttons if it is the ``last``. It pings only the job's user, and shows
        no embed: a link in a prompt is not previewed in the channel."""
        mentions = discord.AllowedMentions(
            everyone=False, roles=False, users=[discord.Object(int(job.destination["user_id"]))]
        )
        kwargs: dict[str, Any] = {}
        if last and outgoing.buttons_for:
            kwargs["view"] = job_buttons(outgoing.buttons_for, outgoing.button_images)
        await channel.send(
            with_notes(text, notes),
            files=[
                discord.File(io.BytesIO(upload.data), filename=upload.name)
                for upload in batch
                if upload.data is not None
            ],
            allowed_mentions=mentions,
            suppress_embeds=True,
            **kwargs,
        )


def plain(text: str) -> str:
    """``text`` with Discord's markdown escaped, so that what a user typed (a prompt, a
    reason) shows as typed: no masked link, heading or bold comes from it."""
    return discord.utils.escape_markdown(text)


def with_notes(text: str | None, notes: list[str]) -> str | None:
    """A message's content: ``text`` cut to fit, then the ``notes`` on lines of their own."""
    below = "\n".join(notes)
    if text is None:
        return fit(below) if below else None
    if not below:
        return fit(text)
    return f"{fit(text, MAX_CONTENT - len(below) - 1)}\n{below}"


def upload_limit(channel: discord.abc.Messageable) -> int:
    """How many bytes of files one message may carry here: the server's limit (more at boost
    tiers 2 and 3) when discord.py knows the server, else the one every channel allows."""
    guild = getattr(channel, "guild", None)
    if isinstance(guild, discord.Guild):
        return guild.filesize_limit
    return uploads.DEFAULT_UPLOAD_LIMIT


def too_large(exc: discord.HTTPException) -> bool:
    """Whether Discord refused a message for the size of its files (413, "Request entity too
    large")."""
    return exc.status == 413 or exc.code == REQUEST_TOO_LARGE


def choices(options: list[tuple[str, str]], current: str) -> list[app_commands.Choice[str]]:
    """Autocomplete suggestions: the (label, value) pairs whose label contains what the user
    typed so far, at most the 25 Discord shows."""
    typed = current.strip().lower()
    return [
        app_commands.Choice(name=fit(label, 100), value=value)
        for label, value in options
        if typed in label.lower()
    ][:25]


def _command_name(interaction: discord.Interaction[Any]) -> str:
    command = interaction.command
    return command.qualified_name if command is not None else "button"


def _what(interaction: discord.Interaction[Any]) -> str:
    """What the user did, for a reply that comes by DM: ``/train``, or a button."""
    command = interaction.command
    return f"/{command.qualified_name}" if command is not None else "click of a button"


def add_commands(tree: app_commands.CommandTree[Any], adapter: DiscordAdapter) -> None:
    """Add /train, /imagine, /showcase, /subjects, /use, /forget, /share, /unshare, /jobs,
    /cancel, /quota, /mydata, /help and /mod to ``tree``."""

    @tree.command(name="train", description="Teach me a subject from 3-10 photos of it")
    @app_commands.guild_only()
    @app_commands.rename(class_noun="class")
    @app_commands.describe(
        name="a short name for the subject, e.g. rex",
        class_noun="what kind of thing it is, e.g. dog, cat, person, backpack",
        photo1="a clear photo of the subject",
        model="the base model to learn it on (default: the server's default)",
    )
    async def train(
        interaction: discord.Interaction[Any],
        name: str,
        class_noun: str,
        photo1: discord.Attachment,
        photo2: discord.Attachment,
        photo3: discord.Attachment,
        photo4: discord.Attachment | None = None,
        photo5: discord.Attachment | None = None,
        photo6: discord.Attachment | None = None,
        photo7: discord.Attachment | None = None,
        photo8: discord.Attachment | None = None,
        photo9: discord.Attachment | None = None,
        photo10: discord.Attachment | None = None,
        model: str | None = None,
    ) -> None:
        given = [photo1, photo2, photo3, photo4, photo5, photo6, photo7, photo8, photo9, photo10]
        photos = [photo for photo in given if photo is not None]
        await adapter.respond(
            interaction, lambda: adapter.train(interaction, name, class_noun, photos, model)
        )

    @train.autocomplete("model")
    async def train_model(
        interaction: discord.Interaction[Any], current: str
    ) -> list[app_commands.Choice[str]]:
        # The core checks the name again: a typed one need not be among these.
        return choices([(name, name) for name in adapter.core.settings.model_names], current)

    @tree.command(name="imagine", description="Draw a prompt; [V] is your active subject (/use)")
    @app_commands.guild_only()
    @app_commands.describe(
        prompt="what to draw, e.g. a [V] dog wearing a hat",
        negative="things to avoid",
        count="how many images (1-4)",
        seed="a number to repeat a result",
        aspect="the picture's shape (sized for the model)",
        steps="sampler steps (more: slower, finer)",
        guidance="how closely to follow the prompt (7.5 is usual)",
        strength="how strongly your subject shows (1 = as trained)",
    )
    @app_commands.choices(
        aspect=[
            app_commands.Choice(name=f"{name} ({w}:{h})", value=name)
            for name, (w, h) in ASPECT_RATIOS.items()
        ]
    )
    async def imagine(
        interaction: discord.Interaction[Any],
        prompt: str,
        negative: str | None = None,
        count: app_commands.Range[int, 1, 4] | None = None,
        seed: app_commands.Range[int, 0, 4294967295] | None = None,
        aspect: app_commands.Choice[str] | None = None,
        steps: app_commands.Range[int, 1, 150] | None = None,
        guidance: app_commands.Range[float, 0.0, 30.0] | None = None,
        strength: app_commands.Range[float, 0.0, 4.0] | None = None,
    ) -> None:
        # The ranges are Discord's outer bounds; the core checks the configured ones.
        await adapter.respond(
            interaction,
            lambda: adapter.imagine(
                interaction,
                prompt,
                negative=negative or "",
                count=count,
                seed=seed,
                aspect=aspect.value if aspect else None,
                steps=steps,
                guidance=guidance,
                strength=strength,
            ),
        )

    @tree.command(name="showcase", description="Your subject in the paper's five capabilities")
    @app_commands.guild_only()
    @app_commands.describe(name="the subject's name (default: your [V], see /use)")
    async def showcase(interaction: discord.Interaction[Any], name: str | None = None) -> None:
        await adapter.respond(interaction, lambda: adapter.showcase(interaction, name))

    @showcase.autocomplete("name")
    async def showcase_name(
        interaction: discord.Interaction[Any], current: str
    ) -> list[app_commands.Choice[str]]:
        return await subject_choices(interaction, current, ready_only=True, shared=True)

    @tree.command(name="subjects", description="List your subjects and their status")
    @app_commands.guild_only()
    async def subjects(interaction: discord.Interaction[Any]) -> None:
        await adapter.respond(
            interaction, lambda: adapter.core.subjects_text(owner_of(interaction))
        )

    @tree.command(name="use", description="Make one of your ready subjects [V] in prompts")
    @app_commands.guild_only()
    @app_commands.describe(
        subject="your ready subject; leave out to go back to your newest ready subject"
    )
    async def use(interaction: discord.Interaction[Any], subject: str | None = None) -> None:
        await adapter.respond(interaction, lambda: adapter.core.use(owner_of(interaction), subject))

    @use.autocomplete("subject")
    async def use_subject(
        interaction: discord.Interaction[Any], current: str
    ) -> list[app_commands.Choice[str]]:
        # Only their own: a shared subject is never [V]. The core checks the name again.
        return await subject_choices(interaction, current, ready_only=True)

    @tree.command(name="forget", description="Delete a subject, its photos and its adapter")
    @app_commands.guild_only()
    @app_commands.describe(name="the subject's name")
    async def forget(interaction: discord.Interaction[Any], name: str) -> None:
        await adapter.respond(interaction, lambda: adapter.core.forget(owner_of(interaction), name))

    @forget.autocomplete("name")
    async def forget_name(
        interaction: discord.Interaction[Any], current: str
    ) -> list[app_commands.Choice[str]]:
        return await subject_choices(interaction, current)

    @tree.command(name="share", description="Let a member, or everyone here, draw your subject")
    @app_commands.guild_only()
    @app_commands.describe(
        subject="your subject's name",
        user="the member to share it with",
        everyone="share it with everyone on this server",
    )
    async def share(
        interaction: discord.Interaction[Any],
        subject: str,
        user: User | None = None,
        everyone: bool = False,
    ) -> None:
        await adapter.respond(
            interaction, lambda: adapter.share(interaction, subject, user, everyone)
        )

    @share.autocomplete("subject")
    async def share_subject(
        interaction: discord.Interaction[Any], current: str
    ) -> list[app_commands.Choice[str]]:
        return await subject_choices(interaction, current, shareable=True)

    @tree.command(name="unshare", description="Stop sharing one of your subjects")
    @app_commands.guild_only()
    @app_commands.describe(
        subject="your subject's name",
        user="stop sharing it with this member (default: with anyone)",
        everyone="stop sharing it with everyone on this server",
    )
    async def unshare(
        interaction: discord.Interaction[Any],
        subject: str,
        user: User | None = None,
        everyone: bool = False,
    ) -> None:
        await adapter.respond(
            interaction, lambda: adapter.unshare(interaction, subject, user, everyone)
        )

    @unshare.autocomplete("subject")
    async def unshare_subject(
        interaction: discord.Interaction[Any], current: str
    ) -> list[app_commands.Choice[str]]:
        subjects = await adapter.core.sharing.shared_subjects(owner_of(interaction))
        return choices([(s.name, s.name) for s in subjects], current)

    @tree.command(name="jobs", description="Your jobs waiting or running, with their ids")
    @app_commands.guild_only()
    async def jobs(interaction: discord.Interaction[Any]) -> None:
        await adapter.respond(interaction, lambda: adapter.jobs(interaction))

    @tree.command(name="cancel", description="Cancel one of your waiting or running jobs")
    @app_commands.guild_only()
    @app_commands.describe(
        target="a subject's name (its training) or a job id from /jobs; default: your newest"
    )
    async def cancel(interaction: discord.Interaction[Any], target: str | None = None) -> None:
        await adapter.respond(interaction, lambda: adapter.cancel(interaction, target))

    @cancel.autocomplete("target")
    async def cancel_target(
        interaction: discord.Interaction[Any], current: str
    ) -> list[app_commands.Choice[str]]:
        # The caller's own jobs, named as /jobs names them; the core checks the value again.
        jobs = await adapter.core.job_choices(owner_of(interaction))
        return choices(jobs, current)

    async def subject_choices(
        interaction: discord.Interaction[Any],
        current: str,
        *,
        ready_only: bool = False,
        shareable: bool = False,
        shared: bool = False,
    ) -> list[app_commands.Choice[str]]:
        """The caller's subjects (only the ready ones, or those that can be shared), and with
        ``shared`` the ready ones shared with them, as a prompt writes them."""
        lookup = await adapter.core.sharing.lookup(owner_of(interaction))
        wanted = ("ready",) if ready_only else SHAREABLE if shareable else None
        options = [(s.name, s.name) for s in lookup.own if wanted is None or s.status in wanted]
        if shared:
            for subject in lookup.shared:
                if subject.status == "ready":
                    value = lookup.reference(subject).strip("[]")
                    written = "" if value == subject.name else f": write {value}"
                    options.append((f"{subject.name} (shared with you{written})", value))
        return choices(options, current)

    @tree.command(name="quota", description="Your usage today and when it resets")
    @app_commands.guild_only()
    async def quota(interaction: discord.Interaction[Any]) -> None:
        await adapter.respond(
            interaction,
            lambda: adapter.core.quota_text(
                owner_of(interaction), roles=role_ids(interaction.user)
            ),
        )

    @tree.command(name="mydata", description="What dreambot keeps about you here; delete it")
    @app_commands.guild_only()
    @app_commands.describe(delete="delete it all (you confirm with a button first)")
    async def mydata(interaction: discord.Interaction[Any], delete: bool = False) -> None:
        await adapter.respond(interaction, lambda: adapter.mydata(interaction, delete))

    @tree.command(name="help", description="What dreambot can do")
    @app_commands.guild_only()
    async def help_(interaction: discord.Interaction[Any]) -> None:
        async def text() -> str:
            return f"```\n{adapter.core.help_text(usage_text(adapter.core))}\n```"

        await adapter.respond(interaction, text)

    tree.add_command(mod_commands(adapter))


User = discord.Member | discord.User


def mod_commands(adapter: DiscordAdapter) -> app_commands.Group:
    """The /mod group: one subcommand per ``Moderator`` action, checked on every call."""
    mod = app_commands.Group(
        name="mod",
        description="Moderator commands (Manage Server or a moderator role)",
        guild_only=True,
        allowed_contexts=app_commands.AppCommandContext(guild=True),
        # Discord shows it only to members with Manage Server unless the server changes that;
        # the moderator check in the adapter runs regardless.
        default_permissions=discord.Permissions(manage_guild=True),
    )
    block = app_commands.Group(name="block", description="Blocked prompts", parent=mod)
    quota = app_commands.Group(name="quota", description="Daily limits", parent=mod)
    Interaction = discord.Interaction[Any]

    @mod.command(name="help", description="What moderators can do")
    async def help_(interaction: Interaction) -> None:
        async def text(moderator: Moderator) -> str:
            return f"```\n{MOD_HELP}\n```\n{DISCORD_MOD_NOTE}"

        await adapter.mod(interaction, text)

    @block.command(name="list", description="This server's blocked words, phrases and regexes")
    async def block_list(interaction: Interaction) -> None:
        await adapter.mod(interaction, lambda m: m.block_list())

    @block.command(name="add", description="Block a word or phrase (evasions included)")
    @app_commands.describe(phrase="the word or phrase to block")
    async def block_add(interaction: Interaction, phrase: str) -> None:
        await adapter.mod(interaction, lambda m: m.block_add(phrase))

    @block.command(name="add-regex", description="Block an RE2 regular expression")
    @app_commands.describe(pattern="RE2 syntax: no lookarounds or backreferences")
    async def block_add_regex(interaction: Interaction, pattern: str) -> None:
        await adapter.mod(interaction, lambda m: m.block_add_regex(pattern))

    @block.command(name="remove", description="Unblock a rule by its number")
    @app_commands.describe(rule="the rule's number from /mod block list")
    async def block_remove(interaction: Interaction, rule: app_commands.Range[int, 1]) -> None:
        await adapter.mod(interaction, lambda m: m.block_remove(str(rule)))

    @block.command(name="defaults", description="Use the built-in list of blocked words")
    async def block_defaults(interaction: Interaction, enabled: bool) -> None:
        await adapter.mod(interaction, lambda m: m.block_defaults(enabled))

    @block.command(name="reveal", description="Tell users which rule their prompt hit")
    async def block_reveal(interaction: Interaction, enabled: bool) -> None:
        await adapter.mod(interaction, lambda m: m.block_reveal(enabled))

    @mod.command(name="blocked", description="The latest blocked prompts and withheld images")
    async def blocked(
        interaction: Interaction, count: app_commands.Range[int, 1, 100] = 10
    ) -> None:
        await adapter.mod(interaction, lambda m: m.blocked_attempts(count))

    @mod.command(name="model", description="The base models; set this server's default")
    @app_commands.describe(name="a configured model, or 'default' for the configured default")
    async def model(interaction: Interaction, name: str | None = None) -> None:
        await adapter.mod(interaction, lambda m: m.model(name))

    @model.autocomplete("name")
    async def model_name(interaction: Interaction, current: str) -> list[app_commands.Choice[str]]:
        names = [*adapter.core.settings.model_names, "default"]
        return choices([(name, name) for name in names], current)

    @mod.command(
        name="safety", description="The safety filter on images (off: age-restricted channels)"
    )
    @app_commands.describe(enabled="leave out to see it, and whether the engines have a checker")
    async def safety(interaction: Interaction, enabled: bool | None = None) -> None:
        await adapter.mod(interaction, lambda m: m.safety(enabled))

    @quota.command(name="show", description="A member's usage and limits today")
    async def quota_show(interaction: Interaction, user: User) -> None:
        roles = target_roles(interaction, user)
        await adapter.mod(interaction, lambda m: m.quota_show(str(user.id), roles))

    @quota.command(name="set", description="Set a limit for a member, a role or the server")
    @app_commands.describe(
        what="images or trainings per UTC day, or jobs waiting or running at once",
        limit="the new limit; leave out to go back to the default",
        user="the member it applies to",
        role="the role it applies to (members get their most generous role)",
    )
    async def quota_set(
        interaction: Interaction,
        what: Literal["images", "trainings", "jobs"],
        limit: app_commands.Range[int, 0, 1_000_000] | None = None,
        user: User | None = None,
        role: discord.Role | None = None,
    ) -> None:
        async def action(moderator: Moderator) -> str:
            if user is not None and role is not None:
                raise UserError("Give a user or a role, not both. Nothing was changed.")
            target = (
                str(user.id) if user else f"role:{role.id}" if role is not None else "workspace"
            )
            return await moderator.quota_set(target, what, limit)

        await adapter.mod(interaction, action)

    @quota.command(name="reset", description="Give a member back today's images and trainings")
    async def quota_reset(interaction: Interaction, user: User) -> None:
        await adapter.mod(interaction, lambda m: m.quota_reset(str(user.id)))

    @quota.command(name="list", description="Every quota override on this server")
    async def quota_list(interaction: Interaction) -> None:
        await adapter.mod(interaction, lambda m: m.quota_list())

    @mod.command(name="ban", description="Refuse a member's commands and cancel their jobs")
    @app_commands.describe(
        user="who to ban",
        reason="why (they are told)",
        duration="how long, e.g. 30m, 12h, 7d, 2w; leave out for until unbanned",
    )
    async def ban(
        interaction: Interaction, user: User, reason: str = "", duration: str | None = None
    ) -> None:
        async def action(moderator: Moderator) -> str:
            length = parse_duration(duration) if duration else None
            return await moderator.ban(str(user.id), reason, length)

        await adapter.mod(interaction, action)

    @mod.command(name="unban", description="Lift a ban")
    async def unban(interaction: Interaction, user: User) -> None:
        await adapter.mod(interaction, lambda m: m.unban(str(user.id)))

    @mod.command(name="bans", description="Who is banned, why, until when")
    async def bans(interaction: Interaction) -> None:
        await adapter.mod(interaction, lambda m: m.bans())

    @mod.command(name="queue", description="Jobs waiting and running on this server")
    async def queue(interaction: Interaction) -> None:
        await adapter.mod(interaction, lambda m: m.queue())

    @mod.command(name="status", description="The engines running and the queues' lengths")
    async def status(interaction: Interaction) -> None:
        await adapter.mod(interaction, lambda m: m.status())

    @mod.command(name="cancel", description="Abort a waiting or running job")
    @app_commands.describe(job="the job id from /mod queue (the first 4+ characters)")
    async def cancel(interaction: Interaction, job: str, reason: str = "") -> None:
        await adapter.mod(interaction, lambda m: m.cancel(job, reason))

    @mod.command(name="subjects", description="A member's subjects, and whom each is shared with")
    async def subjects(interaction: Interaction, user: User) -> None:
        await adapter.mod(interaction, lambda m: m.subjects(str(user.id)))

    @mod.command(name="delete-subject", description="Delete a subject, its photos and adapter")
    @app_commands.describe(name="the subject's name")
    async def delete_subject(interaction: Interaction, user: User, name: str) -> None:
        await adapter.mod(interaction, lambda m: m.delete_subject(str(user.id), name))

    @mod.command(
        name="delete-user-data", description="Delete a member's subjects, images and prompts"
    )
    @app_commands.describe(user="whose data (as their own /mydata delete:True would)")
    async def delete_user_data(interaction: Interaction, user: User) -> None:
        await adapter.mod(interaction, lambda m: m.delete_user_data(str(user.id)))

    @mod.command(name="log", description="The latest moderator actions")
    async def log_(interaction: Interaction, count: app_commands.Range[int, 1, 100] = 20) -> None:
        await adapter.mod(interaction, lambda m: m.log(count))

    return mod


def build_adapter(core: Core, settings: Settings) -> DiscordAdapter:
    """The adapter as configured (downloads only from Discord's CDN)."""
    downloader = Downloader(
        max_bytes=settings.max_photo_bytes,
        allowed_hosts=DISCORD_CDN_HOSTS,
        timeout=settings.discord_download_timeout,
    )
    return DiscordAdapter(
        core,
        downloader=downloader,
        edit_interval=settings.discord_edit_interval,
        dev_guild=settings.discord_dev_guild,
    )


async def run_discord(settings: Settings) -> None:
    """Log in, consume the result queue, and serve Discord until the connection closes."""
    from bot.launcher import delivering, open_core

    if settings.discord_token is None:
        raise ConfigError("DREAMBOT_DISCORD_TOKEN is not set")
    async with open_core(settings, PLATFORM) as runtime:
        adapter = build_adapter(runtime.core, settings)
        try:
            # Log in before consuming results, so a waiting result can be posted at once.
            await adapter.client.login(settings.discord_token.get_secret_value())
            async with delivering(runtime, adapter):
                await adapter.client.connect()
        finally:
            await adapter.close()
