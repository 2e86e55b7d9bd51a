"""Torch-free parts of the generation service: PNG provenance, aspect sizes, the showcase
grid's layout, and the core's generation options, showcase and Vary/Upscale requests."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageFilter

from bot.config import Settings
from bot.core.delivery import Deliverer
from bot.core.errors import UserError
from bot.core.store import Owner, utcnow
from bot.launcher import BotRuntime
from engine.api import AdapterRef, GenerateRequest, Progress
from engine.aspects import aspect_size
from engine.generate_job import image_metadata, output_size
from engine.images import (
    WATERMARK,
    describe_png,
    encode_png,
    inspect_png,
    read_png_metadata,
    read_watermark,
    watermark_available,
)
from engine.showcase import (
    BACKGROUND,
    is_living,
    render_grid,
    render_showcase,
    showcase_layout,
    showcase_prompts,
)
from tests.conftest import (
    RecordingSink,
    engine_queue,
    make_settings,
    queued_generate_request,
    ready_subject,
)

DEST = {"channel": "c1"}


def a_request(**changes: object) -> GenerateRequest:
    values: dict[str, object] = {
        "job_id": "j1",
        "reply_queue": "q",
        "prompt": "a zqv dog on the beach",
        "negative_prompt": "blurry",
        "count": 1,
        "seed": 42,
        "adapters": [AdapterRef(name="subject-1", url="file:///a", scale=0.8, token="zqv")],
        "output_url": "file:///out",
        "base_model": "tiny",
    }
    values.update(changes)
    return GenerateRequest.model_validate(values)


# PNG provenance.


def test_png_metadata_round_trips_prompt_seed_model_token_steps_and_ai_notice(
    tmp_path: Path,
) -> None:
    settings = make_settings(tmp_path, "redis://127.0.0.1:1/0")
    metadata = image_metadata(settings, a_request(), steps=25, guidance=7.5)
    data = encode_png(Image.new("RGB", (64, 64), (10, 20, 30)), metadata)

    text = read_png_metadata(data)
    assert text["dreambot:prompt"] == "a zqv dog on the beach"
    assert text["dreambot:negative_prompt"] == "blurry"
    assert text["dreambot:seed"] == "42"
    assert text["dreambot:model"] == "tiny"
    assert text["dreambot:subject_tokens"] == "zqv"
    assert text["dreambot:subject_strengths"] == "0.8"
    assert text["dreambot:steps"] == "25"
    assert "AI-generated" in text["Comment"]
    found = inspect_png(data)
    assert found["ai_generated"] and found["metadata"]["seed"] == "42"
    assert "image smaller than 256" in found["watermark"] or "install" in found["watermark"]


def test_dreambot_inspect_prints_the_metadata(tmp_path: Path) -> None:
    image = tmp_path / "image.png"
    image.write_bytes(encode_png(Image.new("RGB", (64, 64)), {"prompt": "a red fox", "seed": "7"}))
    shown = subprocess.run(
        [sys.executable, "-m", "bot.cli", "inspect", str(image)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"DREAMBOT_DATA_DIR": str(tmp_path), "PATH": ""},
        cwd=tmp_path,
    )
    assert shown.returncode == 0, shown.stderr
    assert "prompt: a red fox" in shown.stdout
    assert "seed: 7" in shown.stdout
    assert "AI-generated notice: yes" in shown.stdout
    assert "invisible watermark:" in shown.stdout


@pytest.mark.skipif(not watermark_available(), reason="invisible-watermark is not installed")
def test_invisible_watermark_is_embedded_and_read_back() -> None:
    # Textured like a photo: the DWT-DCT watermark hides in texture, not in flat colour.
    channels = [Image.effect_noise((320, 256), 40) for _ in range(3)]
    picture = Image.merge("RGB", channels).filter(ImageFilter.GaussianBlur(2))

    marked = encode_png(picture, {"seed": "1"})
    plain = encode_png(picture, {"seed": "1"}, watermark=False)

    assert inspect_png(marked)["watermark"] == "found"
    assert inspect_png(plain)["watermark"] == "not found"
    # It lives in the pixels: stripping the text chunks keeps it.
    with Image.open(io.BytesIO(marked)) as image:
        assert read_watermark(image.convert("RGB")) == WATERMARK
    assert "invisible watermark: found" in describe_png(marked)


# Sizes.


@pytest.mark.parametrize(
    ("aspect", "native", "size"),
    [
        ("square", 512, (512, 512)),
        ("portrait", 512, (448, 640)),
        ("landscape", 512, (640, 448)),
        ("wide", 512, (704, 384)),
        ("portrait", 1024, (832, 1280)),
        ("wide", 1024, (1344, 768)),
        ("portrait", 64, (56, 80)),
    ],
)
def test_aspects_keep_the_models_pixel_count_in_its_multiples(
    aspect: str, native: int, size: tuple[int, int]
) -> None:
    width, height = aspect_size(aspect, native)  # type: ignore[arg-type]
    assert (width, height) == size
    multiple = 64 if native >= 512 else 8
    assert width % multiple == 0 and height % multiple == 0
    assert abs(width * height / native**2 - 1) < 0.15


def test_explicit_sizes_win_over_the_aspect_and_the_init_image_sets_the_default() -> None:
    assert output_size(a_request(aspect="wide"), 512, None) == (704, 384)
    assert output_size(a_request(aspect="wide", width=512, height=512), 512, None) == (512, 512)
    assert output_size(a_request(), 512, None) == (None, None)
    assert output_size(a_request(), 64, Image.new("RGB", (130, 66))) == (128, 64)


# The showcase grid.


def test_showcase_prompts_follow_the_class_kind() -> None:
    assert is_living("dog") and is_living("small cat") and not is_living("backpack")
    animal = [p.prompt for p in showcase_prompts("zqv", "dog")]
    thing = [p.prompt for p in showcase_prompts("zqv", "backpack")]
    assert len(animal) == len(thing) == 10
    assert "a zqv dog crossed with a panda" in animal
    assert "a zqv dog wearing sunglasses" in animal
    assert "a zqv backpack made of glass" in thing and "a red zqv backpack" in thing
    assert "a zqv backpack on the beach" in thing
    assert not any("panda" in p for p in thing)


def test_showcase_layout_has_a_labelled_cell_per_prompt_in_five_rows() -> None:
    prompts = showcase_prompts("zqv", "dog")
    layout = showcase_layout(prompts, cell_side=64, title="rex")

    assert len(layout.cells) == 10
    assert [text for _, text in layout.row_labels] == [
        "recontextualisation",
        "art renditions",
        "novel views",
        "property modification",
        "accessorisation",
    ]
    assert [cell.caption for cell in layout.cells[:2]] == ["on the beach", "in the jungle"]
    width, height = layout.size
    boxes = [cell.image_box for cell in layout.cells] + [cell.caption_box for cell in layout.cells]
    for left, top, right, bottom in boxes:
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
    # No two image boxes overlap.
    images = [cell.image_box for cell in layout.cells]
    for i, a in enumerate(images):
        for b in images[i + 1 :]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def test_the_showcase_grid_draws_every_image_and_label() -> None:
    drawn: list[tuple[list[str], int]] = []

    def draw(prompts: list[str], seed: int) -> list[Image.Image]:
        drawn.append((prompts, seed))
        return [Image.new("RGB", (64, 64), (250, 250, 0)) for _ in prompts]

    grid, prompts = render_showcase(
        draw, token="zqv", class_noun="backpack", name="bag", cell_side=64, seed=3
    )
    layout = showcase_layout(prompts, 64, "bag")
    assert grid.size == layout.size
    assert [seed for _, seed in drawn] == [3, 4] and sum(len(p) for p, _ in drawn) == 10
    for cell in layout.cells:
        left, top, right, bottom = cell.image_box
        assert grid.getpixel(((left + right) // 2, (top + bottom) // 2)) == (250, 250, 0)
        # Some caption pixels are text, not background.
        caption = grid.crop(cell.caption_box)
        assert any(pixel != BACKGROUND for pixel in caption.get_flattened_data())
    for box, _ in layout.row_labels:
        assert any(pixel != BACKGROUND for pixel in grid.crop(box).get_flattened_data())
    with pytest.raises(ValueError, match="10 cells"):
        render_grid(layout, [])


# The core: options, showcase, Vary and Upscale.


async def test_imagine_passes_aspect_steps_guidance_and_strength(
    runtime: BotRuntime, owner: Owner
) -> None:
    await ready_subject(runtime, owner, "rex", "zqv")
    receipt = await runtime.core.imagine(
        owner, DEST, "a [rex] in snow", aspect="portrait", steps=30, guidance=5.0, strength=0.7
    )
    request = await queued_generate_request(runtime, receipt.job_id)
    assert (request["aspect"], request["steps"], request["guidance"]) == ("portrait", 30, 5.0)
    assert request["adapters"] == [
        {
            "name": "id-rex-zqv",
            "url": "file:///adapters/rex.safetensors",
            "scale": 0.7,
            "token": "zqv",
        }
    ]
    job = await runtime.store.get_job(receipt.job_id)
    assert job is not None and job.options["aspect"] == "portrait"
    assert job.options["strength"] == 0.7


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("aspect", "panorama", "aspect must be one of square, portrait, landscape, wide"),
        ("steps", 51, "steps must be from 1 to 50"),
        ("guidance", 16.0, "guidance must be from 0 to 15"),
        ("strength", 2.0, "strength must be from 0 to 1.5"),
    ],
)
async def test_options_outside_the_configured_bounds_queue_nothing(
    runtime: BotRuntime, owner: Owner, option: str, value: object, message: str
) -> None:
    with pytest.raises(UserError, match=message):
        await runtime.core.imagine(owner, DEST, "a fox", **{option: value})  # type: ignore[arg-type]
    assert await runtime.queue.zcard(engine_queue(runtime)) == 0


async def test_showcase_queues_the_grid_for_the_named_or_newest_subject(
    runtime: BotRuntime, owner: Owner
) -> None:
    rex = await ready_subject(runtime, owner, "rex", "zqv")
    receipt = await runtime.core.showcase(owner, DEST, "rex")
    assert "showcase of rex" in receipt.text
    request = await queued_generate_request(runtime, receipt.job_id)
    assert (request["token"], request["class_noun"], request["name"]) == ("zqv", "dog", "rex")
    assert request["subject"]["name"] == rex.id  # type: ignore[index]
    assert (await runtime.store.usage(owner)).images == 10
    sink = RecordingSink()
    drawing = Progress(job_id=receipt.job_id, phase="generating", step=3, total=20)
    await Deliverer(runtime.core, sink).progress(drawing.model_dump())
    assert sink.progress[0][1].startswith("showcase of rex: drawing")
    with pytest.raises(UserError, match="no subject called `max`"):
        await runtime.core.showcase(owner, DEST, "max")
    with pytest.raises(UserError, match="showcase again"):
        await runtime.core.reimagine(owner, DEST, receipt.job_id)


async def finished(runtime: BotRuntime, owner: Owner, **result: object) -> str:
    receipt = await runtime.core.imagine(owner, DEST, "a red fox", count=2, seed=5)
    urls = ["file:///out/00.png", "file:///out/01.png"]
    done = {"job_id": receipt.job_id, "seed": 5, "image_urls": urls, "width": 64, "height": 64}
    await runtime.store.update_job(
        receipt.job_id, status="done", result={**done, **result}, delivered_at=utcnow()
    )
    return receipt.job_id


async def test_vary_redraws_the_chosen_image_at_a_low_strength_with_its_seed(
    runtime: BotRuntime, owner: Owner
) -> None:
    job_id = await finished(runtime, owner)
    varied = await runtime.core.reimagine(owner, DEST, job_id, vary=True, index=1)
    request = await queued_generate_request(runtime, varied.job_id)
    assert request["init_image_url"] == "file:///out/01.png"
    assert request["init_strength"] == runtime.core.settings.vary_strength
    assert request["seed"] == 5 and request["count"] == 2
    with pytest.raises(UserError, match="from 1 to 2"):
        await runtime.core.reimagine(owner, DEST, job_id, vary=True, index=2)


async def test_upscale_redraws_one_image_at_twice_the_size(
    runtime: BotRuntime, owner: Owner
) -> None:
    job_id = await finished(runtime, owner)
    upscaled = await runtime.core.reimagine(owner, DEST, job_id, upscale=True)
    request = await queued_generate_request(runtime, upscaled.job_id)
    assert (request["width"], request["height"], request["count"]) == (128, 128, 1)
    assert request["init_image_url"] == "file:///out/00.png"
    assert request["init_strength"] == runtime.core.settings.upscale_strength


def test_generation_bounds_must_contain_the_defaults(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="GENERATE_STEPS must not exceed"):
        Settings(_env_file=None, data_dir=tmp_path, generate_steps=60)  # type: ignore[call-arg]
