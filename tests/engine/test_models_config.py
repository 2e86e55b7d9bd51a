"""Several base models in the configuration, and /train naming one of them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.config import ConfigError, Settings, load_settings
from bot.core.errors import UserError
from bot.core.photos import Upload
from bot.core.store import Owner
from bot.launcher import BotRuntime, open_core
from engine.api import GenerateRequest, TrainRequest
from tests.conftest import TEST_PLATFORM, engine_queue, make_photo, make_settings, queued

DEST = {"channel": "c1"}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No .env file and no model settings from the environment running the tests."""
    monkeypatch.chdir(tmp_path)
    for name in ("DREAMBOT_MODELS", "DREAMBOT_BASE_MODEL", "DREAMBOT_TRAIN_STEPS"):
        monkeypatch.delenv(name, raising=False)


def test_models_read_as_json_or_name_equals_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DREAMBOT_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("DREAMBOT_MODELS", "sd15=/m/sd15, xl=/m/xl.safetensors")
    settings = load_settings()
    assert settings.model_names == ["sd15", "xl"] and settings.base_model == "sd15"
    assert settings.model_source("xl") == Path("/m/xl.safetensors")

    monkeypatch.setenv(
        "DREAMBOT_MODELS",
        '{"demo": "tiny", "xl": {"path": "/m/xl.safetensors", "config": "/m/xl-configs"}}',
    )
    monkeypatch.setenv("DREAMBOT_BASE_MODEL", "xl")
    settings = load_settings()
    assert settings.model_names == ["xl", "demo"]
    assert settings.model_entry("xl").config == "/m/xl-configs"
    assert settings.model_source("demo") == tmp_path / "models" / "tiny-sd"
    assert settings.train_steps == 400  # tiny demo defaults only when the default is tiny


def test_a_default_model_not_in_models_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DREAMBOT_MODELS", "sd15=/m/sd15")
    monkeypatch.setenv("DREAMBOT_BASE_MODEL", "sdxl")
    with pytest.raises(ConfigError, match="'sdxl' is not one of DREAMBOT_MODELS: sd15"):
        load_settings()
    monkeypatch.setenv("DREAMBOT_MODELS", "sd15")
    with pytest.raises(ConfigError, match="DREAMBOT_MODELS.*'sd15' is not name=path"):
        load_settings()
    # Its queues would be named as arq's health-check keys of the legacy queues.
    monkeypatch.setenv("DREAMBOT_MODELS", "Health-Check=/m/sd15")
    monkeypatch.delenv("DREAMBOT_BASE_MODEL")
    with pytest.raises(ConfigError, match="model name 'Health-Check' is reserved"):
        load_settings()


def test_one_model_without_models_keeps_its_path_as_its_name(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, base_model=str(tmp_path))  # type: ignore[call-arg]
    assert settings.model_names == [str(tmp_path)]
    assert settings.base_model_source == tmp_path
    assert Settings(_env_file=None).model_source("tiny").name == "tiny-sd"  # type: ignore[call-arg]


@pytest.fixture
async def two_models(tmp_path: Path, redis_clean: str) -> AsyncIterator[BotRuntime]:
    settings = make_settings(tmp_path / "data", redis_clean, models="sd=tiny,xl=tiny-sdxl")
    async with open_core(settings, TEST_PLATFORM) as runtime:
        yield runtime


def _photos() -> list[Upload]:
    return [Upload(f"p{i}.jpg", make_photo(i)) for i in range(3)]


async def _payload(runtime: BotRuntime, queue: str) -> dict[str, object]:
    [job_id] = await runtime.queue.zrange(queue, -1, -1)
    info = await runtime.queue._get_job_def(job_id, None)
    payload: dict[str, object] = info.args[0]
    return payload


async def test_train_may_name_a_model_and_its_subject_is_drawn_on_it(
    two_models: BotRuntime, owner: Owner
) -> None:
    core = two_models.core
    await core.train(owner, DEST, "rex", "dog", _photos(), model="XL")
    assert (
        TrainRequest.model_validate(
            await _payload(two_models, engine_queue(two_models, "train", "xl"))
        ).base_model
        == "xl"
    )
    rex = await two_models.store.find_subject(owner, "rex")
    assert rex is not None and rex.base_model == "xl"
    await two_models.store.update_subject(rex.id, status="ready", adapter_url="file:///a")

    await core.imagine(owner, DEST, "a [rex] dog on the moon", count=1)
    drawn = GenerateRequest.model_validate(
        await _payload(two_models, engine_queue(two_models, "generate", "xl"))
    )
    assert drawn.base_model == "xl"
    await core.imagine(owner, DEST, "a cat", count=1)
    plain = GenerateRequest.model_validate(await _payload(two_models, engine_queue(two_models)))
    assert plain.base_model == "sd"


async def test_train_with_an_unknown_model_lists_the_models_and_queues_nothing(
    two_models: BotRuntime, owner: Owner
) -> None:
    with pytest.raises(UserError, match=r"no model called `sd3`. Models: sd, xl \(default sd\)"):
        await two_models.core.train(owner, DEST, "rex", "dog", _photos(), model="sd3")
    assert await queued(two_models.queue) == 0
    assert await two_models.store.find_subject(owner, "rex") is None


async def test_subjects_of_different_models_cannot_share_an_image(
    two_models: BotRuntime, owner: Owner
) -> None:
    core, store = two_models.core, two_models.store
    await core.train(owner, DEST, "rex", "dog", _photos(), model="xl")
    await core.train(owner, DEST, "tom", "cat", _photos())
    for name in ("rex", "tom"):
        subject = await store.find_subject(owner, name)
        assert subject is not None
        await store.update_subject(subject.id, status="ready", adapter_url="file:///a")

    with pytest.raises(UserError, match="different base models"):
        await core.imagine(owner, DEST, "[rex] and [tom]", count=1)
    for model in ("sd", "xl"):  # no image job on either model
        assert await two_models.queue.zcard(engine_queue(two_models, "generate", model)) == 0


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("DREAMBOT_DISCORD_DOWNLOAD_TIMEOUT", "900"),  # past Discord's 15 minutes for a reply
        ("DREAMBOT_SLACK_DOWNLOAD_TIMEOUT", "601"),
        ("DREAMBOT_MAX_PROMPT_CHARS", "5000"),  # a result quoting it would not fit a message
    ],
)
def test_limits_a_chat_platform_cannot_keep_are_config_errors(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=f"{variable}: Input should be less than or equal"):
        load_settings()
