"""The core's commands against a real SQLite file and a real Redis, without the engine."""

import json
from pathlib import Path

import pytest

from bot.config import Settings
from bot.core.commands import Core
from bot.core.errors import UserError
from bot.core.moderation import parse_duration
from bot.core.photos import Upload
from bot.core.store import Owner
from bot.core.tokens import CANDIDATES
from bot.launcher import BotRuntime, open_core
from engine.api import TRAIN_SUBJECT, TrainRequest, rare_tokens_key
from engine.artifacts import local_path
from tests.conftest import (
    TEST_PLATFORM,
    engine_queue,
    make_photo,
    make_settings,
    queued,
    ready_subject,
)

DEST = {"channel": "c1"}


def _photos(n: int) -> list[Upload]:
    return [Upload(f"p{i}.jpg", make_photo(i)) for i in range(n)]


async def _queued(runtime: BotRuntime) -> int:
    return int(await queued(runtime.queue))


async def _job_count(runtime: BotRuntime) -> int:
    async with runtime.store.db.execute("SELECT count(*) FROM jobs") as cur:
        row = await cur.fetchone()
    return int(row[0])


async def test_train_stores_photos_records_subject_and_queues_one_job(
    runtime: BotRuntime, owner: Owner
) -> None:
    receipt = await runtime.core.train(owner, DEST, "rex", "Dog", _photos(3))
    assert "queued (position 1)" in receipt.text
    assert await _queued(runtime) == 1
    subject = await runtime.store.find_subject(owner, "REX")
    assert subject is not None and subject.status == "queued" and subject.class_noun == "dog"
    assert len(subject.token) == 3
    job = await runtime.store.get_job(receipt.job_id)
    assert job is not None and job.kind == "train" and job.destination == DEST
    # The queued payload carries only references, and the photos are where it says.
    waiting = await runtime.queue.zrange(engine_queue(runtime, "train"), 0, -1)
    assert waiting == [receipt.job_id.encode()]
    info = await runtime.queue._get_job_def(receipt.job_id.encode(), None)
    assert info.function == TRAIN_SUBJECT
    request = TrainRequest.model_validate(info.args[0])
    assert request.token == subject.token and len(request.photo_urls) == 3
    for url in request.photo_urls:
        path = local_path(url)
        assert path is not None and path.is_file()


async def test_imagine_with_v_and_no_subject_queues_nothing(
    runtime: BotRuntime, owner: Owner
) -> None:
    with pytest.raises(UserError, match="you have none yet"):
        await runtime.core.imagine(owner, DEST, "a [V] dog wearing a hat")
    assert await _queued(runtime) == 0
    assert await _job_count(runtime) == 0


async def test_imagine_with_unknown_subject_queues_nothing(
    runtime: BotRuntime, owner: Owner
) -> None:
    await runtime.core.train(owner, DEST, "rex", "dog", _photos(3))
    before = await _queued(runtime)
    with pytest.raises(UserError, match="no subject called `fido`"):
        await runtime.core.imagine(owner, DEST, "[fido] in the snow")
    assert await _queued(runtime) == before


async def test_train_with_two_photos_queues_nothing(runtime: BotRuntime, owner: Owner) -> None:
    with pytest.raises(UserError, match="You sent 2 photos; training needs 3 to 20"):
        await runtime.core.train(owner, DEST, "rex", "dog", _photos(2))
    assert await _queued(runtime) == 0
    assert await runtime.store.list_subjects(owner) == []


async def test_a_bad_photo_leaves_no_subject_behind(runtime: BotRuntime, owner: Owner) -> None:
    uploads = [*_photos(2), Upload("broken.jpg", b"garbage")]
    with pytest.raises(UserError, match="broken.jpg"):
        await runtime.core.train(owner, DEST, "rex", "dog", uploads)
    assert await runtime.store.list_subjects(owner) == []
    assert await _queued(runtime) == 0


async def test_duplicate_subject_name_is_refused(runtime: BotRuntime, owner: Owner) -> None:
    await runtime.core.train(owner, DEST, "rex", "dog", _photos(3))
    with pytest.raises(UserError, match="already have a subject called rex"):
        await runtime.core.train(owner, DEST, "Rex", "dog", _photos(3))


async def test_tokens_are_unique_within_a_workspace(runtime: BotRuntime) -> None:
    tokens = set()
    for i in range(6):
        user = Owner(TEST_PLATFORM, "guild-1", f"user-{i}")
        await runtime.core.train(user, DEST, "rex", "dog", _photos(3))
        subject = await runtime.store.find_subject(user, "rex")
        assert subject is not None
        tokens.add(subject.token)
    assert len(tokens) == 6


async def test_other_users_subjects_are_not_visible(runtime: BotRuntime, owner: Owner) -> None:
    await runtime.core.train(owner, DEST, "rex", "dog", _photos(3))
    stranger = Owner(TEST_PLATFORM, "guild-1", "someone-else")
    with pytest.raises(UserError, match="no subject called `rex`"):
        await runtime.core.imagine(stranger, DEST, "[rex] at the park")
    assert "no subjects yet" in await runtime.core.subjects_text(stranger)
    listed = (await runtime.core.subjects_text(owner)).splitlines()
    [line] = [text for text in listed if "rex" in text]
    subject = await runtime.store.find_subject(owner, "rex")
    assert subject is not None
    created = subject.created_at[:16].replace("T", " ")
    assert line == f"  rex: dog, queued, 3 photos, since {created} UTC", line


async def test_full_queue_is_a_polite_busy_message(
    tmp_path: Path, redis_clean: str, owner: Owner
) -> None:
    settings = make_settings(tmp_path, redis_clean, max_queue=1)
    async with open_core(settings, TEST_PLATFORM) as runtime:
        await runtime.core.train(owner, DEST, "rex", "dog", _photos(3))
        with pytest.raises(UserError, match="busy.*Nothing was queued"):
            await runtime.core.train(owner, DEST, "mia", "cat", _photos(3))
        assert await runtime.store.find_subject(owner, "mia") is None


async def test_unreachable_redis_is_reported_and_nothing_is_kept(
    runtime: BotRuntime, owner: Owner, settings: Settings
) -> None:
    # Point a core at a port where nothing listens: the queue is "down".
    from arq.connections import ArqRedis

    from bot.redis_server import free_port

    dead = ArqRedis(host="127.0.0.1", port=free_port())
    core = Core(settings, runtime.store, runtime.core.artifacts, dead, TEST_PLATFORM)
    with pytest.raises(UserError, match="can't be reached.*nothing was queued"):
        await core.train(owner, DEST, "rex", "dog", _photos(3))
    await dead.aclose()
    assert await runtime.store.list_subjects(owner) == []
    assert await _job_count(runtime) == 0


async def test_a_queue_failure_after_the_job_is_queued_keeps_the_job(
    runtime: BotRuntime, owner: Owner, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The queue drops right after taking the job: the user must not hear "nothing was
    # queued" while the engine goes on to run it, and its row and units must stay.
    from redis.exceptions import ConnectionError as RedisConnectionError

    enqueue_job = runtime.queue.enqueue_job
    zcard = runtime.queue.zcard
    taken: list[str] = []

    async def enqueue_then_drop(*args: object, **kwargs: object) -> object:
        job = await enqueue_job(*args, **kwargs)
        taken.append(str(kwargs["_job_id"]))
        return job

    async def zcard_while_up(name: str) -> int:
        if taken:
            raise RedisConnectionError("connection lost")
        return int(await zcard(name))

    monkeypatch.setattr(runtime.queue, "enqueue_job", enqueue_then_drop)
    monkeypatch.setattr(runtime.queue, "zcard", zcard_while_up)
    receipt = await runtime.core.imagine(owner, DEST, "a cat", count=1)

    assert taken == [receipt.job_id]
    assert "queued (position 1)" in receipt.text
    assert await runtime.store.get_job(receipt.job_id) is not None
    assert (await runtime.store.usage(owner)).images == 1


async def test_forget_deletes_the_subject_and_its_files(runtime: BotRuntime, owner: Owner) -> None:
    receipt = await runtime.core.train(owner, DEST, "rex", "dog", _photos(3))
    subject = await runtime.store.find_subject(owner, "rex")
    assert subject is not None
    folder = local_path(runtime.core.artifacts.url("subjects", subject.id))
    assert folder is not None and folder.exists()
    # Its training still waits: forgetting the subject stops it and gives its units back.
    assert (await runtime.store.usage(owner)).trainings == 1
    reply = await runtime.core.forget(owner, "rex")
    assert reply.startswith("Forgot rex") and "Its training was stopped" in reply
    assert await runtime.store.find_subject(owner, "rex") is None
    assert not folder.exists()
    job = await runtime.store.get_job(receipt.job_id)
    assert job is not None and job.status == "cancelled"
    assert await runtime.queue.zcard(engine_queue(runtime, "train")) == 0
    assert (await runtime.store.usage(owner)).trainings == 0
    with pytest.raises(UserError, match="no subject called `rex`"):
        await runtime.core.forget(owner, "rex")


@pytest.mark.parametrize(
    ("name", "noun"), [("", "dog"), ("v", "dog"), ("a b", "dog"), ("rex", "d0g!"), ("rex", "")]
)
async def test_bad_names_and_classes_are_refused(
    runtime: BotRuntime, owner: Owner, name: str, noun: str
) -> None:
    with pytest.raises(UserError):
        await runtime.core.train(owner, DEST, name, noun, _photos(3))


async def test_a_new_name_with_two_underscores_in_a_row_is_refused_before_the_photos(
    runtime: BotRuntime, owner: Owner
) -> None:
    # Discord shows __text__ underlined, so my__dog__2 would not read as typed there.
    with pytest.raises(UserError, match="two underscores in a row") as refused:
        await runtime.core.train(owner, DEST, "my__dog__2", "dog", [])
    assert refused.value.message.startswith("`my__dog__2` can't be a subject name")
    assert refused.value.message.endswith("Use one at a time, or a -: `my_dog_2` or `my-dog-2`.")
    assert await _job_count(runtime) == 0
    # One underscore at a time is fine.
    receipt = await runtime.core.train(owner, DEST, "my_dog_2", "dog", _photos(3))
    assert receipt.text.startswith("Training my_dog_2 (dog) from 3 photos")


async def test_a_subject_named_with_two_underscores_before_they_were_refused_keeps_working(
    runtime: BotRuntime, owner: Owner
) -> None:
    subject = await ready_subject(runtime, owner, "my__dog", "zqv")

    receipt = await runtime.core.imagine(owner, DEST, "[my__dog] on the beach", count=1)
    assert receipt.text.startswith("Drawing 1 image")
    await runtime.store.update_subject(subject.id, status="failed", error="cancelled")
    # Training a failed subject again keeps its name: it replaces the subject, as ever.
    retrained = await runtime.core.train(owner, DEST, "my__dog", "dog", _photos(3))
    assert retrained.text.startswith("Training my__dog (dog) from 3 photos")
    assert (await runtime.core.forget(owner, "my__dog")).startswith("Forgot my__dog")


async def test_tokens_come_from_the_models_published_rare_words(
    runtime: BotRuntime, settings: Settings
) -> None:
    """The engine's rare single-token words first (common abbreviations dropped), unique in
    the workspace; once they are all taken, three-consonant strings."""
    words = ["zqv", "pdf", "xjk"]
    await runtime.queue.set(rare_tokens_key(settings.base_model), json.dumps(words))
    tokens = []
    for i in range(3):
        user = Owner(TEST_PLATFORM, "guild-1", f"user-{i}")
        await runtime.core.train(user, DEST, "rex", "dog", _photos(3))
        subject = await runtime.store.find_subject(user, "rex")
        assert subject is not None
        tokens.append(subject.token)
    assert sorted(tokens[:2]) == ["xjk", "zqv"]
    assert tokens[2] not in words and tokens[2] in CANDIDATES


async def test_a_name_and_a_token_never_mean_two_subjects_of_a_workspace(
    runtime: BotRuntime, settings: Settings
) -> None:
    """[word] in a prompt names a subject by name or token: a new token is never a subject's
    name in the workspace, and a new name is never another subject's token."""
    alice, mia = (Owner(TEST_PLATFORM, "guild-1", user) for user in ("alice", "mia"))
    # A name first (its token a three-letter fallback), then the model's rare words appear.
    await runtime.core.train(mia, DEST, "ZQVW", "toy", _photos(3))
    await runtime.queue.set(rare_tokens_key(settings.base_model), json.dumps(["zqvw", "xjkq"]))
    await runtime.core.train(alice, DEST, "rex", "dog", _photos(3))
    rex = await runtime.store.find_subject(alice, "rex")
    assert rex is not None and rex.token == "xjkq", "zqvw is a name here, so not a token"

    with pytest.raises(UserError, match="`xjkq` can't be a subject name here: it is the token"):
        await runtime.core.train(mia, DEST, "xjkq", "cat", _photos(3))
    # Another workspace has no such subject: the name is free there.
    elsewhere = Owner(TEST_PLATFORM, "guild-2", "mia")
    assert (await runtime.core.train(elsewhere, DEST, "xjkq", "cat", _photos(3))).text


async def test_unusable_published_tokens_fall_back(runtime: BotRuntime, settings: Settings) -> None:
    await runtime.queue.set(rare_tokens_key(settings.base_model), "not json")
    await runtime.core.train(Owner(TEST_PLATFORM, "g", "u"), DEST, "rex", "dog", _photos(3))
    subject = await runtime.store.find_subject(Owner(TEST_PLATFORM, "g", "u"), "rex")
    assert subject is not None and subject.token in CANDIDATES


async def test_refusals_echo_what_was_typed_in_a_code_span_so_no_markdown_shows(
    runtime: BotRuntime, owner: Owner
) -> None:
    core = runtime.core
    mod = core.moderation.acting(Owner(owner.platform, owner.workspace, "mod-1"), True)
    await core.imagine(owner, DEST, "a cat", count=1)  # a job, so /cancel looks for a name
    for refused, expected in (
        (lambda: core.forget(owner, "*rex*"), "You have no subject called `*rex*`."),
        (lambda: core.use(owner, "__rex__"), "You have no subject called `__rex__`."),
        (lambda: core.cancel(owner, "~~rex~~"), "You have no subject called `~~rex~~`."),
        (
            lambda: core.sharing.share(owner, "*rex*", "user-2"),
            "You have no subject called `*rex*`.",
        ),
        (
            lambda: core.imagine(owner, DEST, "a [_fido_] dog"),
            "You have no subject called `_fido_`.",
        ),
        (
            lambda: core.check_new_subject(owner, "rex", "dog", model="*xl*"),
            "no model called `*xl*`.",
        ),
        (
            lambda: mod.delete_subject(owner.user_id, "*rex*"),
            "user-1 has no subject called `*rex*`.",
        ),
        (lambda: core.mod(mod.owner, True, "quota set bob *many* 3"), "`*many*` isn't a limit"),
        (lambda: core.mod(mod.owner, True, "*frob*"), "Unknown /mod command `*frob*`."),
        (lambda: core.mod(mod.owner, True, "log `x`"), "`ˋxˋ` isn't a number."),
    ):
        with pytest.raises(UserError) as error:
            await refused()
        assert expected in error.value.message
    with pytest.raises(UserError, match="`\\*soon\\*` isn't a duration"):
        parse_duration("*soon*")
