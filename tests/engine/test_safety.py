"""The output safety checker: real tiny checkers whose thresholds the tests set, on real engine
jobs (generate, Vary/Upscale, previews, showcase, the training's sample grid) with real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import io
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from arq.jobs import Job as ArqJob
from PIL import Image
from pydantic import ValidationError

from bot.config import ConfigError, Settings
from engine.api import (
    DELIVER_PROGRESS,
    AdapterRef,
    EngineHeartbeat,
    GenerateRequest,
    GenerateResult,
    ShowcaseRequest,
    TrainRequest,
    TrainResult,
    engine_alive_key,
)
from engine.artifacts import ArtifactStore, local_path
from engine.showcase import (
    BACKGROUND,
    WITHHELD_GREY,
    render_grid,
    showcase_layout,
    showcase_prompts,
)
from tests.conftest import make_photo, make_settings
from tests.engine.conftest import TrainedSubject, engine_context

REPLY_QUEUE = "dreambot:bot:safety-test"

ALL_FLAGGED = -2.0
"""A concept weight every image crosses: the cosine similarity is at least -1, so its score
(cosine - weight) is at least 1."""


def checker_settings(tmp_path: Path, redis_url: str, model: Path, **values: Any) -> Settings:
    """Engine settings on base model ``model`` (unless ``values`` name another)."""
    return make_settings(
        tmp_path / "data", redis_url, **{"base_model": str(model), "generate_steps": 4, **values}
    )


def stored_image(url: str) -> Image.Image:
    """An image the engine stored, read whole (its PNG text chunks included)."""
    path = local_path(url)
    assert path is not None
    return Image.open(io.BytesIO(path.read_bytes()))


@pytest.fixture
async def engine_ctx(
    tmp_path: Path, redis_clean: str, tiny_model_dir: Path
) -> AsyncIterator[dict[str, Any]]:
    """The engine's ``ctx`` on the tiny model with the default ``DREAMBOT_SAFETY_CHECKER``
    (``auto``: the tiny folder's own checker, which flags nothing)."""
    async with engine_context(checker_settings(tmp_path, redis_clean, tiny_model_dir)) as ctx:
        yield ctx


def edited_checker(tiny_model_dir: Path, folder: Path, edit: Callable[[Any], None]) -> Path:
    """A copy of the tiny model's checker with ``edit`` applied to its weights, saved as one
    folder (the layout of CompVis/stable-diffusion-safety-checker)."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    model = StableDiffusionSafetyChecker.from_pretrained(tiny_model_dir / "safety_checker")
    with torch.no_grad():
        edit(model)
    model.save_pretrained(folder)
    shutil.copy(tiny_model_dir / "feature_extractor" / "preprocessor_config.json", folder)
    return folder


def use_checker(ctx: dict[str, Any], folder: Path) -> None:
    """Give the engine of ``ctx`` the checker in ``folder``, as a start with it would."""
    from engine.safety import load_safety_checker

    ctx["safety"] = load_safety_checker(folder, device="cpu", dtype=torch.float32)


def flag_everything(model: Any) -> None:
    model.concept_embeds_weights.fill_(ALL_FLAGGED)


def unit_embeddings(ctx: dict[str, Any], images: list[Image.Image]) -> torch.Tensor:
    """The checker's CLIP image embeddings of ``images``, normalised (what it compares)."""
    checker = ctx["safety"]
    pixels = checker.processor(images=images, return_tensors="pt").pixel_values
    with torch.inference_mode():
        pooled = checker.model.vision_model(pixels)[1]
        return torch.nn.functional.normalize(checker.model.visual_projection(pooled))


def a_request(ctx: dict[str, Any], job_id: str, **changes: Any) -> GenerateRequest:
    values: dict[str, Any] = {
        "job_id": job_id,
        "reply_queue": REPLY_QUEUE,
        "prompt": "a red fox",
        "count": 3,
        "seed": 1,
        "output_url": ctx["artifacts"].url("outputs", job_id),
        "base_model": ctx["settings"].base_model,
        "previews": False,
    }
    return GenerateRequest(**{**values, **changes})


async def generated(ctx: dict[str, Any], job_id: str, **changes: Any) -> GenerateResult:
    """The result of a generation that must succeed."""
    from engine.generate_job import generate

    result = await generate(ctx, a_request(ctx, job_id, **changes).model_dump())
    assert result is not None
    return GenerateResult.model_validate(result)


def stored_pngs(ctx: dict[str, Any], job_id: str) -> list[str]:
    folder = local_path(ctx["artifacts"].url("outputs", job_id))
    assert folder is not None
    return sorted(p.name for p in folder.glob("*.png")) if folder.exists() else []


async def progress_updates(ctx: dict[str, Any]) -> list[dict[str, Any]]:
    """The progress updates the engine sent to the bot, in order."""
    redis = ctx["redis"]
    updates = []
    for job_id in await redis.zrange(REPLY_QUEUE, 0, -1):
        info = await ArqJob(job_id.decode(), redis, _queue_name=REPLY_QUEUE).info()
        assert info is not None
        if info.function == DELIVER_PROGRESS:
            updates.append(info.args[0])
    return updates


# Starting the engine: which checker it loads.


def test_the_setting_takes_auto_off_or_a_folder(tmp_path: Path) -> None:
    def setting(value: str | None = None) -> str:
        values = {} if value is None else {"safety_checker": value}
        return make_settings(tmp_path, "redis://127.0.0.1:1/0", **values).safety_checker

    assert setting() == "auto"
    assert setting(" OFF ") == "off"
    assert setting("~/checker ") == "~/checker"
    with pytest.raises(ValidationError, match="'auto', 'off' or the folder"):
        setting(" ")


@pytest.mark.model
async def test_auto_loads_the_checker_of_the_tiny_model_folder(
    engine_ctx: dict[str, Any], tiny_model_dir: Path
) -> None:
    assert engine_ctx["safety"].source == tiny_model_dir
    assert engine_ctx["safety"].model.dtype == torch.float32


@pytest.mark.model
async def test_auto_finds_no_checker_in_a_folder_without_one(
    tmp_path: Path, redis_clean: str, tiny_model_dir: Path, tiny_sdxl_dir: Path
) -> None:
    # A tiny folder built before it shipped a checker (its model_index.json still names one,
    # as this copy's does) keeps working, and so does an SDXL model, which never has one.
    stale = tmp_path / "stale-tiny-sd"
    shutil.copytree(
        tiny_model_dir, stale, ignore=shutil.ignore_patterns("safety_checker", "feature_extractor")
    )
    settings = checker_settings(
        tmp_path, redis_clean, stale, base_model="a", models=f"a={stale},b={tiny_sdxl_dir}"
    )
    async with engine_context(settings) as ctx:
        assert ctx["safety"] is None
        result = await generated(ctx, "unchecked", count=1)
    assert len(result.image_urls) == 1 and result.withheld == 0


@pytest.mark.model
async def test_auto_takes_the_first_model_folder_that_has_a_checker(
    tmp_path: Path, redis_clean: str, tiny_model_dir: Path, tiny_sdxl_dir: Path
) -> None:
    settings = checker_settings(
        tmp_path,
        redis_clean,
        tiny_sdxl_dir,
        base_model="xl",
        models=f"xl={tiny_sdxl_dir},sd={tiny_model_dir}",
    )
    async with engine_context(settings) as ctx:
        assert ctx["safety"].source == tiny_model_dir


@pytest.mark.model
async def test_off_loads_no_checker(tmp_path: Path, redis_clean: str, tiny_model_dir: Path) -> None:
    settings = checker_settings(tmp_path, redis_clean, tiny_model_dir, safety_checker="off")
    async with engine_context(settings) as ctx:
        assert ctx["safety"] is None


@pytest.mark.model
async def test_an_explicit_folder_of_the_compvis_layout_is_loaded(
    tmp_path: Path, redis_clean: str, tiny_model_dir: Path
) -> None:
    folder = edited_checker(tiny_model_dir, tmp_path / "checker", flag_everything)
    settings = checker_settings(tmp_path, redis_clean, tiny_model_dir, safety_checker=str(folder))
    async with engine_context(settings) as ctx:
        assert ctx["safety"].source == folder
        result = await generated(ctx, "everything-flagged", count=2)
    assert result.image_urls == [] and result.withheld == 2


@pytest.mark.model
@pytest.mark.parametrize("what", ["missing", "not a checker"])
async def test_a_bad_checker_folder_stops_the_engine_at_start_naming_it(
    tmp_path: Path,
    redis_clean: str,
    tiny_model_dir: Path,
    what: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from engine.worker import load_resources

    folder = tmp_path / "checker"
    if what == "not a checker":
        folder.mkdir()
        (folder / "config.json").write_text("{}")
    settings = checker_settings(tmp_path, redis_clean, tiny_model_dir, safety_checker=str(folder))
    with (
        caplog.at_level("INFO", logger="engine.worker"),
        pytest.raises(ConfigError, match=f"DREAMBOT_SAFETY_CHECKER: .*{folder}"),
    ):
        await load_resources(settings)
    assert "loaded model" not in caplog.text  # it stopped before loading any model


@pytest.mark.model
async def test_the_heartbeat_names_the_checker_folder(
    engine_ctx: dict[str, Any], tiny_model_dir: Path
) -> None:
    from engine.worker import engine_identity, keep_heartbeat

    identity = engine_identity(engine_ctx)
    heartbeat = asyncio.create_task(keep_heartbeat(engine_ctx, identity, interval=0.05))
    try:
        async with asyncio.timeout(10):
            key = engine_alive_key(identity.engine_id)
            while not (stored := await engine_ctx["redis"].get(key)):
                await asyncio.sleep(0.02)
    finally:
        heartbeat.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await heartbeat
    assert EngineHeartbeat.model_validate_json(stored).safety_checker == str(tiny_model_dir)

    engine_ctx.update(safety=None, engine=None)
    assert engine_identity(engine_ctx).safety_checker is None


# The tiny model's own checker.


@pytest.mark.model
async def test_the_tiny_checker_flags_nothing_even_an_image_equal_to_a_concept(
    engine_ctx: dict[str, Any], tmp_path: Path, tiny_model_dir: Path
) -> None:
    images = [
        Image.new("RGB", (64, 64), (0, 0, 0)),
        Image.new("RGB", (64, 64), (255, 255, 255)),
        Image.frombytes("RGB", (64, 64), torch.randint(0, 256, (64 * 64 * 3,)).byte().numpy()),
    ]
    assert engine_ctx["safety"].flagged(images) == [False, False, False]
    # A cosine is at most 1, so at the tiny checker's weights of 1 even an image whose
    # embedding is a concept's own is not flagged.
    [embedding] = unit_embeddings(engine_ctx, images[2:])

    def concept_is_the_image(model: Any) -> None:
        model.concept_embeds[0] = embedding
        model.special_care_embeds[0] = embedding

    use_checker(engine_ctx, edited_checker(tiny_model_dir, tmp_path / "c", concept_is_the_image))
    assert engine_ctx["safety"].flagged(images) == [False, False, False]


# Generation.


@pytest.mark.model
async def test_nothing_flagged_stores_every_image(engine_ctx: dict[str, Any]) -> None:
    result = await generated(engine_ctx, "clean")

    assert result.withheld == 0 and len(result.image_urls) == 3
    assert stored_pngs(engine_ctx, "clean") == ["00.png", "01.png", "02.png"]


@pytest.mark.model
async def test_everything_flagged_stores_nothing_and_is_a_normal_result(
    engine_ctx: dict[str, Any], tmp_path: Path, tiny_model_dir: Path
) -> None:
    use_checker(engine_ctx, edited_checker(tiny_model_dir, tmp_path / "c", flag_everything))

    result = await generated(engine_ctx, "flagged")

    assert result.image_urls == [] and result.withheld == 3
    assert (result.width, result.height) == (64, 64)
    assert stored_pngs(engine_ctx, "flagged") == []


@pytest.mark.model
async def test_exactly_the_flagged_image_of_a_batch_is_withheld(
    engine_ctx: dict[str, Any], tmp_path: Path, tiny_model_dir: Path
) -> None:
    unchecked = await generated(engine_ctx, "first-draw", safety_check=False)
    images = [stored_image(url) for url in unchecked.image_urls]
    embeddings = unit_embeddings(engine_ctx, images)
    cosines = (embeddings @ embeddings[1]).tolist()
    # The tiny model's noise images look alike to the tiny CLIP; a threshold between the
    # second image's own cosine (1) and the others' must survive the checker's rounding of
    # scores to 3 decimals.
    others = max(cosines[0], cosines[2])
    assert others < 0.996
    threshold = (1 + others) / 2

    def flag_the_second(model: Any) -> None:
        model.concept_embeds[0] = embeddings[1]
        model.concept_embeds_weights[0] = threshold

    use_checker(engine_ctx, edited_checker(tiny_model_dir, tmp_path / "c", flag_the_second))

    result = await generated(engine_ctx, "one-flagged")

    assert result.withheld == 1
    assert [url.rsplit("/", 1)[1] for url in result.image_urls] == ["00.png", "02.png"]
    assert stored_pngs(engine_ctx, "one-flagged") == ["00.png", "02.png"]
    stored = [stored_image(url) for url in result.image_urls]
    assert [im.tobytes() for im in stored] == [images[0].tobytes(), images[2].tobytes()]
    assert [im.text["dreambot:index"] for im in stored] == ["0", "2"]  # type: ignore[attr-defined]


@pytest.mark.model
async def test_safety_check_false_skips_the_check(
    engine_ctx: dict[str, Any], tmp_path: Path, tiny_model_dir: Path
) -> None:
    use_checker(engine_ctx, edited_checker(tiny_model_dir, tmp_path / "c", flag_everything))

    result = await generated(engine_ctx, "unchecked", safety_check=False)

    assert result.withheld == 0 and len(result.image_urls) == 3


@pytest.mark.model
@pytest.mark.parametrize("strength", [0.5, 0.0], ids=["vary", "upscale as a plain resize"])
async def test_vary_and_upscale_results_are_checked_too(
    engine_ctx: dict[str, Any], tmp_path: Path, tiny_model_dir: Path, strength: float
) -> None:
    first = await generated(engine_ctx, "original", count=1)
    use_checker(engine_ctx, edited_checker(tiny_model_dir, tmp_path / "c", flag_everything))

    result = await generated(
        engine_ctx,
        "redrawn",
        count=2,
        init_image_url=first.image_urls[0],
        init_strength=strength,
        width=128,
        height=128,
    )

    assert result.image_urls == [] and result.withheld == 2
    assert (result.width, result.height) == (128, 128)


@pytest.mark.model
@pytest.mark.parametrize("flagged", [False, True], ids=["clean", "flagged"])
async def test_a_flagged_preview_is_not_sent(
    engine_ctx: dict[str, Any], tmp_path: Path, tiny_model_dir: Path, flagged: bool
) -> None:
    if flagged:
        use_checker(engine_ctx, edited_checker(tiny_model_dir, tmp_path / "c", flag_everything))
    ctx = {
        **engine_ctx,
        "settings": engine_ctx["settings"].model_copy(update={"preview_interval": 1e-6}),
    }

    await generated(ctx, "previews", count=1, previews=True)

    updates = await progress_updates(ctx)
    previews = [update["preview_url"] for update in updates if update.get("preview_url")]
    folder = local_path(ctx["artifacts"].url("outputs", "previews", "previews"))
    assert folder is not None
    if flagged:
        # The progress updates went on, without previews.
        assert previews == [] and not folder.exists()
        assert [u["step"] for u in updates if u["phase"] == "generating"][-1] == 4
    else:
        assert len(previews) == 3 and len(list(folder.iterdir())) == 3


# Showcase grids: the showcase job and the training's sample.


def cell_colours(grid: Image.Image, class_noun: str = "dog") -> list[tuple[int, ...]]:
    """The colour of each showcase cell's top-left corner."""
    layout = showcase_layout(showcase_prompts("zqv", class_noun), 64, "")
    assert grid.size == layout.size
    return [grid.getpixel(cell.image_box[:2]) for cell in layout.cells]  # type: ignore[misc]


def test_a_withheld_cell_is_a_grey_tile_labelled_withheld() -> None:
    prompts = showcase_prompts("zqv", "dog")
    layout = showcase_layout(prompts, 64, "rex")
    yellow = Image.new("RGB", (64, 64), (250, 250, 0))
    images: list[Image.Image | None] = [yellow] * 10
    images[3] = None

    grid = render_grid(layout, images)

    left, top, right, bottom = layout.cells[3].image_box
    tile = grid.crop((left, top, right, bottom))
    colours = {colour for _, colour in tile.getcolors(maxcolors=1 << 16) or []}
    assert WITHHELD_GREY in colours and (250, 250, 0) not in colours
    assert len(colours) > 1  # the label is drawn on it
    assert tile.getpixel((0, 0)) == tile.getpixel((right - left - 1, bottom - top - 1))
    for i, cell in enumerate(layout.cells):
        if i != 3:
            assert grid.getpixel(cell.image_box[:2]) == (250, 250, 0)
        # Every caption, the withheld cell's too, is still written.
        assert any(p != BACKGROUND for p in grid.crop(cell.caption_box).get_flattened_data())


@pytest.mark.model
@pytest.mark.parametrize("safety_check", [True, False])
async def test_a_showcase_draws_flagged_cells_as_withheld_tiles(
    engine_ctx: dict[str, Any],
    tmp_path: Path,
    tiny_model_dir: Path,
    trained_subject: TrainedSubject,
    safety_check: bool,
) -> None:
    from engine.generate_job import showcase

    artifacts: ArtifactStore = engine_ctx["artifacts"]
    adapter = artifacts.url("subjects", "rex", "adapter.safetensors")
    artifacts.put_bytes(adapter, trained_subject.adapter.read_bytes())
    use_checker(engine_ctx, edited_checker(tiny_model_dir, tmp_path / "c", flag_everything))
    request = ShowcaseRequest(
        job_id="showcase",
        reply_queue=REPLY_QUEUE,
        subject=AdapterRef(name="rex", url=adapter),
        token="zqv",
        class_noun="dog",
        name="rex",
        steps=2,
        output_url=artifacts.url("outputs", "showcase"),
        base_model=engine_ctx["settings"].base_model,
        safety_check=safety_check,
    )

    answer = await showcase(engine_ctx, request.model_dump())

    assert answer is not None
    result = GenerateResult.model_validate(answer)
    [url] = result.image_urls
    colours = cell_colours(stored_image(url))
    if safety_check:
        assert result.withheld == 10 and colours == [WITHHELD_GREY] * 10
    else:
        assert result.withheld == 0 and WITHHELD_GREY not in colours


@pytest.mark.model
async def test_the_training_sample_grid_counts_its_withheld_cells(
    tmp_path: Path, redis_clean: str, tiny_model_dir: Path
) -> None:
    from engine.train_job import train_subject

    folder = edited_checker(tiny_model_dir, tmp_path / "checker", flag_everything)
    settings = checker_settings(
        tmp_path,
        redis_clean,
        tiny_model_dir,
        safety_checker=str(folder),
        train_steps=2,
        class_images=2,
        generate_steps=2,
        sample_count=1,
    )
    async with engine_context(settings) as ctx:
        artifacts: ArtifactStore = ctx["artifacts"]
        photos = [artifacts.url("subjects", "rex", "photos", f"{i}.png") for i in range(3)]
        for i, url in enumerate(photos):
            artifacts.put_bytes(url, make_photo(i, fmt="PNG"))
        request = TrainRequest(
            job_id="train-rex",
            reply_queue=REPLY_QUEUE,
            subject_id="rex",
            token="zqv",
            class_noun="dog",
            photo_urls=photos,
            adapter_url=artifacts.url("subjects", "rex", "adapter.safetensors"),
            samples_url=artifacts.url("subjects", "rex", "samples"),
            base_model=settings.base_model,
        )
        answer = await train_subject(ctx, request.model_dump())

    assert answer is not None
    result = TrainResult.model_validate(answer)
    [url] = result.sample_urls
    assert result.withheld == 10
    assert cell_colours(stored_image(url)) == [WITHHELD_GREY] * 10
