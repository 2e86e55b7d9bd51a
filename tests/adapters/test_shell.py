"""The shell adapter's output for engine updates: progress lines and the live preview."""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from bot.adapters.shell import ShellAdapter
from bot.core.delivery import Delivery
from bot.core.store import Job, Owner
from bot.launcher import BotRuntime
from engine.api import Progress
from tests.conftest import (
    configure_second_model,
    make_photo,
    queued,
    queued_train_request,
    ready_subject,
    running_job,
)


def job() -> Job:
    return running_job(Owner("shell", "local", "tester"), {"kind": "terminal"})


async def test_the_shell_names_a_jobs_first_preview_file_once(runtime: BotRuntime) -> None:
    out = io.StringIO()
    shell = ShellAdapter(runtime.core, "tester", out=out)
    drawing = Progress(job_id="a" * 32, phase="generating", step=3, total=10)
    for step in (3, 6):
        url = f"file:///data/outputs/{'a' * 32}/previews/{step:03d}.jpg"
        update = drawing.model_copy(update={"step": step, "preview_url": url})
        await shell.show_progress(job(), f"drawing {step}/10", update)
    await shell.show_result(Delivery(job(), "done", []))

    lines = out.getvalue().splitlines()
    assert lines == [
        f"  preview: /data/outputs/{'a' * 32}/previews/003.jpg",
        "drawing 3/10",
        "drawing 6/10",
        "done",
    ]
    # No images (the safety filter withheld them all): /reroll still draws its prompt again,
    # and /vary says there is nothing to vary (tests/test_safety_filter.py).
    assert shell.last_generation == "a" * 32


async def _train_in_shell(runtime: BotRuntime, tmp_path: Path, model: str) -> str:
    for i in range(3):
        (tmp_path / f"p{i}.jpg").write_bytes(make_photo(i))
    out = io.StringIO()
    shell = ShellAdapter(runtime.core, "tester", out=out)
    await shell.handle(f"/train rex dog {tmp_path} --model {model}")
    return out.getvalue()


async def test_train_with_a_model_queues_the_training_on_that_model(
    runtime: BotRuntime, tmp_path: Path
) -> None:
    configure_second_model(runtime.settings, "xl")
    said = await _train_in_shell(runtime, tmp_path, "xl")

    assert said.startswith("Training rex (dog) from 3 photos: queued")
    assert (await queued_train_request(runtime)).base_model == "xl"


async def test_train_with_an_unknown_model_is_refused_and_queues_nothing(
    runtime: BotRuntime, tmp_path: Path
) -> None:
    said = await _train_in_shell(runtime, tmp_path, "sdxl")

    assert said.startswith("✗ There is no model called `sdxl`. Models: tiny")
    assert await queued(runtime.queue) == 0


async def test_an_unreadable_photo_is_a_message_not_a_traceback(
    runtime: BotRuntime, tmp_path: Path
) -> None:
    for i in range(3):
        (tmp_path / f"p{i}.jpg").write_bytes(make_photo(i))
    (tmp_path / "p1.jpg").unlink()
    (tmp_path / "p1.jpg").mkdir()  # open() refuses it, as it would a file without permission
    out = io.StringIO()
    shell = ShellAdapter(runtime.core, "tester", out=out)
    await shell.handle(f"/train rex dog {tmp_path}")

    assert out.getvalue().startswith(f"✗ I can't read {tmp_path / 'p1.jpg'}")
    assert await queued(runtime.queue) == 0


@contextlib.contextmanager
def _permissions_bite() -> Iterator[None]:
    """Make file permissions apply, also when the tests run as root: root reads anything,
    so the effective user becomes nobody (65534) until the block ends."""
    if os.geteuid() != 0:
        yield
        return
    try:
        os.seteuid(65534)
    except PermissionError:
        pytest.skip("root without CAP_SETUID: permissions can't be made to apply")
    try:
        yield
    finally:
        os.seteuid(0)


async def test_a_folder_whose_parent_cannot_be_read_is_not_called_missing(
    runtime: BotRuntime, tmp_path: Path
) -> None:
    folder = tmp_path / "locked" / "photos"
    folder.mkdir(parents=True)
    for i in range(3):
        (folder / f"p{i}.jpg").write_bytes(make_photo(i))
    out = io.StringIO()
    shell = ShellAdapter(runtime.core, "tester", out=out)
    (tmp_path / "locked").chmod(0)
    try:
        with _permissions_bite():
            with pytest.raises(PermissionError):  # the situation under test, for real
                folder.stat()
            await shell.handle(f"/train rex dog {folder}")
    finally:
        (tmp_path / "locked").chmod(0o700)

    said = out.getvalue()
    assert said.startswith(f"✗ I can't read {folder}: permission denied")
    assert "does not exist" not in said
    assert "chmod" in said  # what to do about it
    assert await queued(runtime.queue) == 0


async def test_a_folder_under_a_file_is_missing_and_the_file_is_named(
    runtime: BotRuntime, tmp_path: Path
) -> None:
    (tmp_path / "notes.txt").write_text("not a folder")
    out = io.StringIO()
    shell = ShellAdapter(runtime.core, "tester", out=out)
    await shell.handle(f"/train rex dog {tmp_path / 'notes.txt' / 'photos'}")

    assert out.getvalue() == (
        f"✗ {tmp_path / 'notes.txt' / 'photos'} does not exist: "
        f"{tmp_path / 'notes.txt'} is a file, not a folder.\n"
    )
    assert await queued(runtime.queue) == 0


async def test_an_unexpected_error_is_an_apology_and_the_shell_goes_on(
    runtime: BotRuntime, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(owner: Owner) -> str:
        raise RuntimeError("database on fire")

    monkeypatch.setattr(runtime.core, "subjects_text", broken)
    out = io.StringIO()
    shell = ShellAdapter(runtime.core, "tester", out=out)
    with caplog.at_level(logging.ERROR):
        await shell.handle("/subjects")
    await shell.handle("/help")

    said = out.getvalue()
    assert said.startswith("✗ Sorry, something went wrong on my side (ref ")
    assert "dreambot teaches an image model" in said
    assert "database on fire" in caplog.text


async def _train_from_folder(runtime: BotRuntime, folder: Path) -> str:
    out = io.StringIO()
    shell = ShellAdapter(runtime.core, "tester", out=out)
    await shell.handle(f"/train rex dog {folder}")
    return out.getvalue()


async def test_a_folder_short_of_photos_names_the_files_it_skipped(
    runtime: BotRuntime, tmp_path: Path
) -> None:
    for i in range(2):
        (tmp_path / f"p{i}.jpg").write_bytes(make_photo(i))
    gif = io.BytesIO()
    Image.new("RGB", (320, 320)).save(gif, format="GIF")
    (tmp_path / "cat.gif").write_bytes(gif.getvalue())
    (tmp_path / "notes.txt").write_text("the third photo is on my phone")
    (tmp_path / ".DS_Store").write_bytes(b"\0")  # hidden: not the user's doing
    (tmp_path / "old").mkdir()  # a folder is not a skipped photo

    assert await _train_from_folder(runtime, tmp_path) == (
        "✗ You sent 2 photos; training needs 3 to 20 photos of the subject. "
        "Skipped cat.gif, notes.txt: only .avif, .heic, .heif, .jpeg, .jpg, .png and .webp "
        "files are read from a folder.\n"
    )
    assert await queued(runtime.queue) == 0


async def test_many_skipped_files_are_counted_not_listed(
    runtime: BotRuntime, tmp_path: Path
) -> None:
    (tmp_path / "p0.jpg").write_bytes(make_photo(0))
    for name in "abcdef":
        (tmp_path / f"{name}.txt").write_text(name)

    said = await _train_from_folder(runtime, tmp_path)

    assert "You sent 1 photo;" in said
    assert "Skipped a.txt, b.txt, c.txt and 3 more: only" in said


async def test_a_folder_of_heic_heif_and_avif_photos_trains(
    runtime: BotRuntime, tmp_path: Path
) -> None:
    for i, (suffix, fmt) in enumerate([(".HEIC", "HEIF"), (".heif", "HEIF"), (".avif", "AVIF")]):
        photo = io.BytesIO()
        Image.open(io.BytesIO(make_photo(i))).save(photo, format=fmt)
        (tmp_path / f"p{i}{suffix}").write_bytes(photo.getvalue())
    (tmp_path / "notes.txt").write_text("enough photos: skipped without a word")

    said = await _train_from_folder(runtime, tmp_path)

    assert said.startswith("Training rex (dog) from 3 photos: queued")
    assert await queued(runtime.queue) == 1


async def test_share_with_everyone_works_and_a_named_user_is_explained(
    runtime: BotRuntime,
) -> None:
    shell_user = Owner("shell", "local", "tester")
    await ready_subject(runtime, shell_user, "rex", "zqv")
    out = io.StringIO()
    shell = ShellAdapter(runtime.core, "tester", out=out)

    await shell.handle("/share rex mia")
    await shell.handle("/share rex everyone")
    await shell.handle("/share rex")
    await shell.handle("/unshare rex")

    said = out.getvalue().splitlines()
    assert said[0].startswith("✗ The shell has one user (you, tester), so there is nobody to name")
    assert said[1].startswith("Shared rex (dog) with everyone here: anyone here can draw it")
    assert said[2] == "✗ Usage: /share <subject name> <@user or everyone>"
    assert said[3] == (
        "Stopped sharing rex (it was shared with everyone here). Only you can draw it now."
    )
    assert await runtime.store.subject_shares(shell_user) == {}


async def test_another_shell_user_draws_a_subject_shared_with_everyone(
    runtime: BotRuntime,
) -> None:
    await ready_subject(runtime, Owner("shell", "local", "tester"), "rex", "zqv")
    owner_shell = ShellAdapter(runtime.core, "tester", out=io.StringIO())
    await owner_shell.handle("/share rex everyone")
    out = io.StringIO()
    other = ShellAdapter(runtime.core, "mia", out=out)

    await other.handle("/subjects")
    await other.handle("/imagine [rex] on the moon --count 1")

    said = out.getvalue()
    assert "Shared with you (write them as shown):\n  [rex]  rex: dog, ready, by tester" in said
    assert "Drawing 1 image" in said
    assert await queued(runtime.queue) == 1
