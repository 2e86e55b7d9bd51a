import io

import pytest
from PIL import Image

from bot.core.errors import UserError
from bot.core.photos import PhotoRules, Upload, prepare_photos
from tests.conftest import make_photo

RULES = PhotoRules(min_count=3, max_count=5, min_side=256, max_bytes=2_000_000, size=64)


def _uploads(n: int) -> list[Upload]:
    return [Upload(f"p{i}.jpg", make_photo(i)) for i in range(n)]


async def test_good_photos_become_square_pngs_of_the_model_size() -> None:
    uploads = [
        *_uploads(2),
        Upload("p.png", make_photo(7, (400, 300), "PNG")),
        Upload("p.webp", make_photo(8, (300, 500), "WEBP")),
    ]
    photos = await prepare_photos(uploads, RULES)
    assert len(photos) == 4
    for data in photos:
        image = Image.open(io.BytesIO(data))
        assert image.format == "PNG" and image.size == (64, 64)


@pytest.mark.parametrize("count", [0, 2, 6])
async def test_wrong_number_of_photos_is_refused(count: int) -> None:
    with pytest.raises(UserError, match="3 to 5 photos|at most 5"):
        await prepare_photos(_uploads(count), RULES)


async def test_undecodable_file_is_named_in_the_message() -> None:
    uploads = [*_uploads(2), Upload("holiday.jpg", b"\xff\xd8 not really a jpeg")]
    with pytest.raises(UserError, match="holiday.jpg could not be read"):
        await prepare_photos(uploads, RULES)


async def test_small_photo_is_named_with_its_size() -> None:
    uploads = [*_uploads(2), Upload("tiny.jpg", make_photo(3, (200, 400)))]
    with pytest.raises(UserError, match=r"tiny.jpg is 200×400.*256 px"):
        await prepare_photos(uploads, RULES)


async def test_giant_file_is_refused_by_size() -> None:
    uploads = [*_uploads(2), Upload("huge.png", b"\x89PNG" + b"\0" * 2_000_001)]
    with pytest.raises(UserError, match="huge.png is 2.0 MB"):
        await prepare_photos(uploads, RULES)


async def test_decompression_bomb_is_refused() -> None:
    bomb = io.BytesIO()
    Image.new("1", (12_000, 12_000)).save(bomb, format="PNG")  # tiny file, 144 Mpx
    uploads = [*_uploads(2), Upload("bomb.png", bomb.getvalue())]
    with pytest.raises(UserError, match="bomb.png"):
        await prepare_photos(uploads, RULES)


async def test_other_image_formats_are_refused_by_content() -> None:
    gif = io.BytesIO()
    Image.new("RGB", (300, 300)).save(gif, format="GIF")
    uploads = [*_uploads(2), Upload("looks-like.jpg", gif.getvalue())]
    with pytest.raises(UserError, match="looks-like.jpg is a GIF file"):
        await prepare_photos(uploads, RULES)


async def test_exif_orientation_is_applied() -> None:
    # A landscape image whose EXIF says "rotate 90°" is really a portrait photo.
    image = Image.new("RGB", (400, 300), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 400, 150))  # top half red as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    out = io.BytesIO()
    image.save(out, format="JPEG", exif=exif)
    rules = PhotoRules(min_count=1, max_count=1, min_side=256, size=64)
    [data] = await prepare_photos([Upload("rotated.jpg", out.getvalue())], rules)
    shown = Image.open(io.BytesIO(data)).convert("RGB")
    # After rotating clockwise the red half is on the right.
    left, right = shown.getpixel((5, 32)), shown.getpixel((58, 32))
    assert right[0] > 200 and left[2] > 200
