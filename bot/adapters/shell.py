"""The local shell adapter: chat with dreambot in a terminal, or script it through a pipe.

``dreambot shell < script.txt`` runs the commands in the file one after another (each waits
for its job's result, so ``/imagine a [V] …`` can follow ``/train``) and exits when input ends
and every job it queued has been delivered.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import stat
import sys
import threading
from pathlib import Path
from typing import TextIO

from bot.adapters.common import apology, ending_mark
from bot.adapters.options import parse_imagine, queue_imagine, split_options
from bot.core.commands import Core
from bot.core.delivery import Delivery
from bot.core.errors import UserError
from bot.core.moderation import MOD_HELP
from bot.core.photos import Upload, count_problem
from bot.core.sharing import parse_share_text
from bot.core.store import EVERYONE, Job, Owner
from engine.api import Progress
from engine.artifacts import local_path

PLATFORM = "shell"
WORKSPACE = "local"
DESTINATION = {"kind": "terminal"}
PROMPT = "you> "
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".heic", ".heif", ".avif"}
MYDATA_CONFIRM = "/mydata delete confirm"
"""What the shell's user types to confirm deleting their data."""
SKIPPED_SHOWN = 3
"""How many skipped files a message names before saying "and N more"."""


def _read_lines(
    loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[str | None], stream: TextIO
) -> None:
    # A daemon thread, so a blocked read never keeps the process alive at exit.
    for line in stream:
        loop.call_soon_threadsafe(queue.put_nowait, line)
    loop.call_soon_threadsafe(queue.put_nowait, None)


def _write_file(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)


def _unreadable(path: Path, exc: OSError) -> UserError:
    if isinstance(exc, PermissionError):
        return UserError(
            f"I can't read {path}: permission denied (on it or on a folder above it). "
            "Give the user dreambot runs as read access (e.g. chmod a+rx on the folders, "
            "a+r on the photos), or copy the photos somewhere it can read."
        )
    return UserError(f"I can't read {path}: {exc.strerror or exc}.")


def _not_there(path: Path, exc: OSError) -> UserError:
    """Why ``path`` (which could not be looked up) can't be used for /train."""
    if isinstance(exc, FileNotFoundError):
        return UserError(f"{path} does not exist.")
    if isinstance(exc, NotADirectoryError):
        blocker = next((p for p in reversed(path.parents) if p.is_file()), None)
        if blocker is not None:
            return UserError(f"{path} does not exist: {blocker} is a file, not a folder.")
    return _unreadable(path, exc)


def _scan_folder(folder: Path) -> tuple[list[Path], list[str]]:
    """The photos in ``folder`` (by suffix), and the names of the other files in it."""
    photos, skipped = [], []
    with os.scandir(folder) as entries:
        for entry in entries:
            if Path(entry.name).suffix.lower() in IMAGE_SUFFIXES:
                photos.append(folder / entry.name)
            # Hidden files (.DS_Store) are not something the user put there.
            elif not entry.name.startswith(".") and not entry.is_dir():
                skipped.append(entry.name)
    return sorted(photos), sorted(skipped)


def _skipped_note(names: list[str]) -> str:
    shown = ", ".join(names[:SKIPPED_SHOWN])
    more = f" and {len(names) - SKIPPED_SHOWN} more" if len(names) > SKIPPED_SHOWN else ""
    *others, last = sorted(IMAGE_SUFFIXES)
    return (
        f"Skipped {shown}{more}: only {', '.join(others)} and {last} files are read from a folder."
    )


class ShellAdapter:
    """Reads commands from a stream, calls the core, prints replies and deliveries."""

    def __init__(
        self, core: Core, user: str, *, out: TextIO | None = None, downloads: Path | None = None
    ) -> None:
        self.core = core
        self.owner = Owner(PLATFORM, WORKSPACE, user)
        # DREAMBOT_SHELL_MODERATORS unset: whoever runs the shell moderates, so the local demo
        # can try /mod. The terminal has no roles, so the configured lists are all there is.
        moderators = core.settings.shell_moderators
        self.is_moderator = (
            user in moderators if moderators is not None else True
        ) or core.moderation.is_configured_moderator(user)
        self.out = out or sys.stdout
        self.downloads = downloads or Path("downloads")
        self.pending: set[str] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._progress_open = False
        self._at_prompt = False
        self.last_generation: str | None = None
        self._previewed: set[str] = set()

    # Output.

    def say(self, text: str) -> None:
        """Print a message (ending any progress line in place, keeping the prompt last)."""
        if self._progress_open:
            self.out.write("\n")
            self._progress_open = False
        elif self._at_prompt:
            self.out.write("\r\033[K")
        self.out.write(text + "\n")
        if self._at_prompt:
            self.out.write(PROMPT)
        self.out.flush()

    def _track(self, job_id: str) -> None:
        self.pending.add(job_id)
        self._idle.clear()

    def _done(self, job_id: str) -> None:
        self.pending.discard(job_id)
        if not self.pending:
            self._idle.set()

    async def show_progress(self, job: Job, text: str, progress: Progress) -> None:
        """Progress updates one line in place on a terminal; one line each when piped. The
        first live preview's file is named once per job (later ones go to the same folder)."""
        preview = local_path(progress.preview_url) if progress.preview_url else None
        if preview is not None and job.id not in self._previewed:
            self._previewed.add(job.id)
            self.say(f"  preview: {preview}")
        if self.out.isatty():
            self.out.write("\r\033[K" + text)
            self._progress_open = True
            self.out.flush()
        else:
            self.say(text)

    async def show_result(self, delivery: Delivery) -> None:
        """Print the result and the paths of its images."""
        lines = [delivery.text]
        for url in delivery.image_urls:
            lines.append(f"  {await self._local_file(url)}")
        # Also a result whose images the safety filter withheld: /reroll draws it again.
        if delivery.job.kind == "generate":
            self.last_generation = delivery.job.id
        self.say("\n".join(lines))
        self._previewed.discard(delivery.job.id)
        self._done(delivery.job.id)

    async def show_failure(self, job: Job, text: str) -> None:
        """Print a failed (or cancelled) job's message."""
        self.say(f"{ending_mark(job)} {text}")
        self._previewed.discard(job.id)
        self._done(job.id)

    async def _local_file(self, url: str) -> Path:
        path = local_path(url)
        if path is not None:
            return path
        target = self.downloads / url.rsplit("/", 2)[-2] / url.rsplit("/", 1)[-1]
        data = await self.core.artifacts.aget_bytes(url)
        await asyncio.to_thread(_write_file, target, data)
        return target

    # Input.

    async def run(self, stream: TextIO | None = None) -> None:
        """Serve commands until input ends, then wait for this session's jobs."""
        stream = stream or sys.stdin
        interactive = stream.isatty()
        for job in await self.core.store.unfinished_jobs(PLATFORM):
            if job.owner == self.owner:
                self._track(job.id)
        if self.pending:
            self.say(f"{len(self.pending)} earlier job(s) still running; results will appear here.")
        if interactive:
            self.say("dreambot shell — /help for commands, Ctrl-D to quit.")
        lines: asyncio.Queue[str | None] = asyncio.Queue()
        threading.Thread(
            target=_read_lines, args=(asyncio.get_running_loop(), lines, stream), daemon=True
        ).start()
        while True:
            if interactive:
                self.out.write(PROMPT)
                self.out.flush()
                self._at_prompt = True
            line = await lines.get()
            self._at_prompt = False
            if line is None:
                break
            if line.strip() in ("/quit", "/exit"):
                break
            await self.handle(line)
            if not interactive:
                # A script's next command may need this one's result ("/train" then
                # "/imagine a [V] …"), so piped commands run one after another.
                await self._idle.wait()
        if self.pending:
            self.say(f"waiting for {len(self.pending)} job(s) to finish…")
        await self._idle.wait()

    async def handle(self, line: str) -> None:
        """Run one command line and print the reply."""
        line = line.strip()
        if not line or line.startswith("#"):
            return
        command, _, rest = line.partition(" ")
        try:
            if command == "/train":
                await self._train(rest)
            elif command == "/imagine":
                await self._imagine(rest)
            elif command == "/showcase":
                receipt = await self.core.showcase(self.owner, DESTINATION, rest.strip() or None)
                self._track(receipt.job_id)
                self.say(receipt.text)
            elif command in ("/reroll", "/vary", "/upscale"):
                await self._redo(command[1:], rest)
            elif command == "/subjects":
                self.say(await self.core.subjects_text(self.owner))
            elif command == "/use":
                self.say(await self.core.use(self.owner, rest.strip() or None))
            elif command == "/forget":
                self.say(await self.core.forget(self.owner, rest))
            elif command in ("/share", "/unshare"):
                self.say(await self._share(command[1:], rest))
            elif command == "/jobs":
                self.say(await self.core.jobs_text(self.owner))
            elif command == "/cancel":
                cancellation = await self.core.cancel(self.owner, rest.strip() or None)
                self._previewed.discard(cancellation.job.id)
                self._done(cancellation.job.id)
                self.say(cancellation.text)
            elif command == "/quota":
                self.say(await self.core.quota_text(self.owner))
            elif command == "/mydata":
                self.say(await self._mydata(rest))
            elif command == "/mod":
                await self._mod(rest)
            elif command == "/help":
                self.say(self.core.help_text())
            else:
                self.say(f"Unknown command {command!r}. Type /help for the list.")
        except UserError as exc:
            self.say(f"✗ {exc.message}")
        except Exception:
            # One failed command must not end the session (or a script) with a traceback.
            self.say(f"✗ {apology(f'shell {command}')}")

    async def _mydata(self, rest: str) -> str:
        """/mydata, /mydata delete (what it would delete), /mydata delete confirm (delete it:
        the shell's confirmation is typed)."""
        words = rest.lower().split()
        if not words:
            return await self.core.personal_data.summary(self.owner)
        if words == ["delete"]:
            preview = await self.core.personal_data.deletion_preview(self.owner)
            return f"{preview}\nType `{MYDATA_CONFIRM}` to go ahead."
        if words != ["delete", "confirm"]:
            raise UserError(f"Usage: /mydata, /mydata delete, then {MYDATA_CONFIRM}")
        deletion = await self.core.personal_data.delete(self.owner)
        for job in deletion.cancelled:
            self._previewed.discard(job.id)
            self._done(job.id)
        return self.core.personal_data.deleted_text(deletion)

    async def _mod(self, rest: str) -> None:
        if rest.strip().lower() in ("", "help") and self.is_moderator:
            self.say(
                f"{MOD_HELP}\n\nIn the shell, moderators are the users in "
                "DREAMBOT_SHELL_MODERATORS (comma-separated); unset, the shell user is one."
            )
            return
        self.say(await self.core.mod(self.owner, self.is_moderator, rest))

    async def _share(self, verb: str, rest: str) -> str:
        """/share <name> everyone, /unshare <name> [everyone]: the shell has one user, so
        "everyone" (every shell user of this database) is the only one to share with."""
        name, target = parse_share_text(verb, rest)
        if target not in (None, EVERYONE):
            does = "shares it with" if verb == "share" else "stops sharing it with"
            raise UserError(
                f"The shell has one user (you, {self.owner.user_id}), so there is nobody to "
                f"name: `/{verb} {name} everyone` {does} every shell user of this database. "
                "On Discord and Slack you can name one person."
            )
        if verb == "share":
            return await self.core.sharing.share(self.owner, name, EVERYONE)
        return await self.core.sharing.unshare(self.owner, name, target)

    async def _train(self, rest: str) -> None:
        rest, options = split_options(rest, ["model"])
        try:
            words = shlex.split(rest)
        except ValueError:
            words = rest.split()
        if len(words) < 2:
            raise UserError(
                "Usage: /train <name> <class> <photo files or a folder…> [--model NAME]"
            )
        name, class_noun, paths = words[0], words[1], [Path(w) for w in words[2:]]
        uploads = await asyncio.to_thread(self._read_uploads, paths)
        receipt = await self.core.train(
            self.owner, DESTINATION, name, class_noun, uploads, model=options.get("model")
        )
        self._track(receipt.job_id)
        self.say(receipt.text)

    def _read_uploads(self, paths: list[Path]) -> list[Upload]:
        files: list[Path] = []
        skipped: list[str] = []
        for path in (p.expanduser() for p in paths):
            # stat(), not is_dir()/is_file(): they hide why a path can't be looked at (a
            # folder above it unreadable, a file on the way), answering False or raising.
            try:
                mode = path.stat().st_mode
            except OSError as exc:
                raise _not_there(path, exc) from exc
            if stat.S_ISDIR(mode):
                try:
                    found, passed_over = _scan_folder(path)
                except OSError as exc:
                    raise _unreadable(path, exc) from exc
                files += found
                skipped += passed_over
            elif stat.S_ISREG(mode):
                files.append(path)
            else:
                raise UserError(f"{path} is neither a photo file nor a folder.")
        # Files a folder scan left out would vanish silently: when the count is wrong, name them.
        problem = count_problem(len(files), self.core.photo_rules)
        if problem is not None and skipped:
            raise UserError(f"{problem} {_skipped_note(skipped)}")
        limit = self.core.photo_rules.max_bytes
        uploads = []
        for file in files:
            try:
                with file.open("rb") as fh:
                    # Read one byte past the limit: enough to tell it is too big, never more.
                    uploads.append(Upload(file.name, fh.read(limit + 1)))
            except OSError as exc:
                raise _unreadable(file, exc) from exc
        return uploads

    async def _imagine(self, rest: str) -> None:
        receipt = await queue_imagine(self.core, self.owner, DESTINATION, parse_imagine(rest))
        self._track(receipt.job_id)
        self.say(receipt.text)

    async def _redo(self, action: str, rest: str) -> None:
        """/reroll, /vary [image number], /upscale [image number] of the last result here."""
        if self.last_generation is None:
            raise UserError(f"Nothing to {action} yet: /imagine something first.")
        try:
            number = int(rest.strip() or "1")
        except ValueError:
            raise UserError(f"Usage: /{action} [image number, from 1]") from None
        receipt = await self.core.reimagine(
            self.owner,
            DESTINATION,
            self.last_generation,
            vary=action == "vary",
            upscale=action == "upscale",
            index=number - 1,
        )
        self._track(receipt.job_id)
        self.say(receipt.text)
