import io
import struct
from collections.abc import Callable
from typing import Any

import pytest
from PIL import Image

from bench.photos import subject_photos
from bot.core.errors import UserError
from bot.core.photos import PhotoRules, Upload, prepare_photos, to_rgb
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
    with pytest.raises(UserError, match="`holiday.jpg` could not be read"):
        await prepare_photos(uploads, RULES)


async def test_small_photo_is_named_with_its_size() -> None:
    uploads = [*_uploads(2), Upload("tiny.jpg", make_photo(3, (200, 400)))]
    with pytest.raises(UserError, match=r"`tiny.jpg` is 200×400.*256 px"):
        await prepare_photos(uploads, RULES)


async def test_giant_file_is_refused_by_size() -> None:
    uploads = [*_uploads(2), Upload("huge.png", b"\x89PNG" + b"\0" * 2_000_001)]
    with pytest.raises(UserError, match="`huge.png` is 1.9 MiB; photos may be at most 1.9 MiB"):
        await prepare_photos(uploads, RULES)


async def test_decompression_bomb_is_refused() -> None:
    bomb = io.BytesIO()
    Image.new("1", (12_000, 12_000)).save(bomb, format="PNG")  # tiny file, 144 Mpx
    uploads = [*_uploads(2), Upload("bomb.png", bomb.getvalue())]
    with pytest.raises(UserError, match="`bomb.png`"):
        await prepare_photos(uploads, RULES)


async def test_other_image_formats_are_refused_by_content() -> None:
    gif = io.BytesIO()
    Image.new("RGB", (300, 300)).save(gif, format="GIF")
    uploads = [*_uploads(2), Upload("looks-like.jpg", gif.getvalue())]
    with pytest.raises(UserError, match="`looks-like.jpg` is a GIF file"):
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


# Formats phones and browsers produce.


def _encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def _decoded(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def _close(pixel: Any, expected: tuple[int, int, int], tolerance: int = 12) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected, strict=True))


def _subject(size: tuple[int, int] = (320, 320)) -> Image.Image:
    """A red square in the middle of a blue photo."""
    w, h = size
    image = Image.new("RGB", size, (30, 60, 200))
    image.paste((220, 20, 20), (w // 4, h // 4, 3 * w // 4, 3 * h // 4))
    return image


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
async def test_heic_and_avif_photos_are_accepted(fmt: str) -> None:
    uploads = [*_uploads(2), Upload(f"phone.{fmt.lower()}", _encode(_subject(), fmt))]
    *_, data = await prepare_photos(uploads, RULES)

    shown = _decoded(data)
    assert shown.size == (64, 64)
    assert _close(shown.getpixel((32, 32)), (220, 20, 20))
    assert _close(shown.getpixel((3, 3)), (30, 60, 200))


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
async def test_heic_and_avif_orientation_is_applied(fmt: str) -> None:
    # As in test_exif_orientation_is_applied: stored landscape, top half red, "rotate 90°".
    image = Image.new("RGB", (400, 300), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 400, 150))
    exif = Image.Exif()
    exif[0x0112] = 6
    rules = PhotoRules(min_count=1, max_count=1, min_side=256, size=64)
    data = _encode(image, fmt, exif=exif.tobytes())
    [square] = await prepare_photos([Upload("rotated", data)], rules)

    shown = _decoded(square)
    assert _close(shown.getpixel((58, 32)), (255, 0, 0), 40)
    assert _close(shown.getpixel((5, 32)), (0, 0, 255), 40)


def _claiming(data: bytes, width: int, height: int) -> bytes:
    """The HEIF/AVIF file ``data`` with its image-size box claiming ``width``×``height``."""
    at = data.index(b"ispe") + 8  # after the box type and its version/flags
    return data[:at] + struct.pack(">II", width, height) + data[at + 8 :]


@pytest.mark.parametrize(
    ("fmt", "side", "message"),
    [
        # Under Pillow's own bomb limit, over ours: refused by its header. Decoding would
        # have failed ("damaged"): its real pixels don't fill the claimed size.
        ("HEIF", 8000, r"`giant.heif` is 8000×8000 pixels, too large to use; .* 50 megapixels"),
        ("AVIF", 8000, r"`giant.avif` is 8000×8000 pixels, too large to use; .* 50 megapixels"),
        ("HEIF", 20000, r"`giant.heif` claims too many pixels to use; .* 50 megapixels"),
    ],
)
async def test_a_heic_or_avif_claiming_huge_dimensions_is_refused_before_decoding(
    fmt: str, side: int, message: str
) -> None:
    small = _encode(Image.new("RGB", (320, 320), (10, 200, 30)), fmt)
    name = f"giant.{fmt.lower()}"
    uploads = [*_uploads(2), Upload(name, _claiming(small, side, side))]
    with pytest.raises(UserError, match=message):
        await prepare_photos(uploads, RULES)


def _without_payload(data: bytes) -> bytes:
    start = data.index(b"mdat") + 4
    return data[:start] + bytes(len(data) - start)


@pytest.mark.parametrize(
    "damage",
    [_without_payload, lambda data: data.replace(b"iloc", b"xloc", 1)],
    ids=["payload zeroed", "item locations lost"],
)
async def test_a_damaged_avif_is_reported_as_damaged(damage: Callable[[bytes], bytes]) -> None:
    avif = damage(_encode(_subject(), "AVIF"))
    uploads = [*_uploads(2), Upload("broken.avif", avif)]
    with pytest.raises(UserError, match="`broken.avif` could not be read as an image"):
        await prepare_photos(uploads, RULES)


async def test_messages_list_every_accepted_format() -> None:
    gif = _encode(Image.new("RGB", (300, 300)), "GIF")
    uploads = [*_uploads(1), Upload("a.gif", gif), Upload("b.jpg", b"not a photo")]
    with pytest.raises(UserError) as refused:
        await prepare_photos(uploads, RULES)
    lines = refused.value.message.splitlines()
    assert len(lines) == 2
    assert all(line.endswith("JPEG, PNG, WebP, HEIC or AVIF photos.") for line in lines)


# Colour modes: every photo becomes 8-bit RGB as it looks.


@pytest.mark.parametrize("fmt", ["PNG", "HEIF"])
@pytest.mark.parametrize("grey", [20, 128, 230])
async def test_16_bit_grey_photos_are_scaled_to_8_bits(fmt: str, grey: int) -> None:
    image = Image.new("I;16", (320, 320), grey * 257)
    uploads = [*_uploads(2), Upload(f"deep.{fmt.lower()}", _encode(image, fmt))]
    *_, data = await prepare_photos(uploads, RULES)

    assert _close(_decoded(data).getpixel((32, 32)), (grey, grey, grey), 3)


def _cut_out(mode: str) -> Image.Image:
    """A red square on a transparent background whose hidden colour is black."""
    image = Image.new("RGBA", (320, 320), (0, 0, 0, 0))
    image.paste((220, 20, 20, 255), (80, 80, 240, 240))
    if mode == "P":
        paletted = image.convert("RGB").quantize(2)
        black = paletted.getpixel((0, 0))
        paletted.info["transparency"] = black
        return paletted
    return image.convert(mode)


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("RGBA", "PNG"),
        ("RGBA", "WEBP"),
        ("RGBA", "AVIF"),
        ("RGBA", "HEIF"),
        ("LA", "PNG"),
        ("P", "PNG"),
    ],
)
async def test_transparent_parts_become_white(mode: str, fmt: str) -> None:
    uploads = [*_uploads(2), Upload(f"cut-out.{fmt.lower()}", _encode(_cut_out(mode), fmt))]
    *_, data = await prepare_photos(uploads, RULES)

    shown = _decoded(data)
    subject = (220, 20, 20) if mode != "LA" else (80, 80, 80)  # grey: LA has no colour
    assert _close(shown.getpixel((2, 2)), (255, 255, 255))
    assert _close(shown.getpixel((32, 32)), subject)


@pytest.mark.parametrize(
    ("make", "fmt", "colour"),
    [
        (lambda: Image.new("L", (320, 320), 128), "PNG", (128, 128, 128)),
        (lambda: Image.new("1", (320, 320), 1), "PNG", (255, 255, 255)),
        (
            lambda: Image.new("RGB", (320, 320), (220, 20, 20)).convert("CMYK"),
            "JPEG",
            (220, 20, 20),
        ),
    ],
    ids=["L", "1", "CMYK"],
)
async def test_other_colour_modes_keep_their_look(
    make: Callable[[], Image.Image], fmt: str, colour: tuple[int, int, int]
) -> None:
    uploads = [*_uploads(2), Upload(f"photo.{fmt.lower()}", _encode(make(), fmt))]
    *_, data = await prepare_photos(uploads, RULES)

    assert _close(_decoded(data).getpixel((32, 32)), colour)


def _transparent_pa() -> Image.Image:
    image = Image.new("PA", (8, 8), (0, 0))
    image.putpalette([0, 0, 0, 220, 20, 20])
    image.putpixel((4, 4), (1, 255))
    return image


@pytest.mark.parametrize(
    ("make", "colour"),
    [
        (lambda: Image.new("I;16B", (8, 8), 128 * 257), (128, 128, 128)),
        (lambda: Image.new("I", (8, 8), 65535), (255, 255, 255)),
        (lambda: Image.new("I", (8, 8), 40 * 257), (40, 40, 40)),
        (lambda: Image.new("I", (8, 8), 200), (200, 200, 200)),  # 8-bit values in a deep mode
        (lambda: Image.new("F", (8, 8), 100.0), (100, 100, 100)),
        (lambda: Image.new("F", (8, 8), 30000.0), (117, 117, 117)),
        (lambda: Image.new("LA", (8, 8), (0, 0)), (255, 255, 255)),
        (_transparent_pa, (255, 255, 255)),
        (lambda: Image.new("RGBA", (8, 8), (220, 20, 20, 128)), (238, 137, 137)),
        (lambda: Image.new("RGB", (8, 8), (1, 2, 3)).convert("CMYK"), (1, 2, 3)),
    ],
    ids=["I;16B", "I white", "I 16-bit", "I 8-bit", "F", "F 16-bit", "LA", "PA", "RGBA", "CMYK"],
)
def test_every_mode_becomes_8_bit_rgb_as_it_looks(
    make: Callable[[], Image.Image], colour: tuple[int, int, int]
) -> None:
    # Modes no accepted file decodes to (I, F, PA), besides the ones the tests above send.
    image = to_rgb(make())

    assert image.mode == "RGB"
    assert _close(image.getpixel((0, 0)), colour, 1)
    if make is _transparent_pa:
        assert image.getpixel((4, 4)) == (220, 20, 20)


# Every problem in one reply.


async def test_every_bad_photo_is_reported_at_once_one_line_each() -> None:
    gif = _encode(Image.new("RGB", (300, 300)), "GIF")
    uploads = [
        Upload("tiny.jpg", make_photo(3, (200, 400))),
        *_uploads(2),
        Upload("holiday.jpg", b"\xff\xd8 not really a jpeg"),
        Upload("anim.gif", gif),
    ]
    with pytest.raises(UserError) as refused:
        await prepare_photos(uploads, RULES)

    lines = refused.value.message.splitlines()
    assert [line.split()[0] for line in lines] == ["`tiny.jpg`", "`holiday.jpg`", "`anim.gif`"]
    assert "Send a larger photo" in lines[0]


async def test_an_unreadable_photo_is_described_in_plain_words() -> None:
    uploads = [*_uploads(2), Upload("holiday.jpg", b"\xff\xd8 not really a jpeg")]
    with pytest.raises(UserError) as refused:
        await prepare_photos(uploads, RULES)

    message = refused.value.message
    assert message == (
        "`holiday.jpg` could not be read as an image: it is damaged or not a photo. "
        "Send JPEG, PNG, WebP, HEIC or AVIF photos."
    )
    assert "Error" not in message


# The same photo twice.


def _copies() -> dict[str, Callable[[Image.Image], bytes]]:
    """Ways a photo gets sent again: as is, re-encoded, resized (never below 256 px)."""

    def resized(image: Image.Image, short: int) -> Image.Image:
        scale = short / min(image.size)
        return image.resize((round(image.width * scale), round(image.height * scale)))

    return {
        "the same file": lambda image: _encode(image, "JPEG", quality=90),
        "JPEG quality 30": lambda image: _encode(image, "JPEG", quality=30),
        "WebP, smaller": lambda image: _encode(resized(image, 256), "WEBP", quality=50),
        "PNG, larger": lambda image: _encode(resized(image, 700), "PNG"),
        "HEIC": lambda image: _encode(image, "HEIF"),
    }


@pytest.mark.parametrize("copy", list(_copies()))
async def test_the_same_photo_sent_again_is_refused_naming_both(copy: str) -> None:
    [original, *others] = subject_photos(3, 512, seed=5)
    uploads = [
        Upload("a.jpg", _encode(original, "JPEG", quality=90)),
        *(Upload(f"other{i}.png", _encode(image, "PNG")) for i, image in enumerate(others)),
        Upload("b.jpg", _copies()[copy](original)),
    ]
    with pytest.raises(UserError) as refused:
        await prepare_photos(uploads, RULES)

    assert refused.value.message == (
        "`b.jpg` looks like the same photo as `a.jpg`; send 3–5 different photos of the subject."
    )


async def test_a_rotated_copy_is_the_same_photo_once_upright() -> None:
    [photo] = subject_photos(1, 400, seed=3)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    stored_sideways = photo.transpose(Image.Transpose.ROTATE_90)
    uploads = [
        Upload("upright.jpg", _encode(photo, "JPEG")),
        Upload("sideways.jpg", _encode(stored_sideways, "JPEG", exif=exif)),
        *_uploads(2),
    ]
    with pytest.raises(
        UserError, match="`sideways.jpg` looks like the same photo as `upright.jpg`"
    ):
        await prepare_photos(uploads, RULES)


async def test_photos_with_one_name_are_told_apart_by_number() -> None:
    # Chat clients call every pasted image image.png.
    photo = make_photo(1)
    uploads = [Upload("image.png", make_photo(0)), *(Upload("image.png", photo) for _ in "ab")]
    with pytest.raises(
        UserError,
        match=r"^photo 3 \(`image.png`\) looks like the same photo as "
        r"photo 2 \(`image.png`\);",
    ):
        await prepare_photos(uploads, RULES)


@pytest.mark.parametrize(
    "photos",
    [
        lambda: [_encode(image, "JPEG") for image in subject_photos(20, 512, seed=0)],
        lambda: [_encode(image, "JPEG") for image in subject_photos(20, 300, seed=1)],
        # Red on blue, moved by as little as 3 px (1 % of the frame) between some of them.
        lambda: [make_photo(seed) for seed in range(20)],
    ],
    ids=["subject photos", "smaller subject photos", "make_photo"],
)
async def test_different_shots_of_one_subject_are_not_the_same_photo(
    photos: Callable[[], list[bytes]],
) -> None:
    uploads = [Upload(f"shot{i}.jpg", data) for i, data in enumerate(photos())]
    rules = PhotoRules(min_count=3, max_count=20, min_side=256, size=64)

    assert len(await prepare_photos(uploads, rules)) == 20


# sRGB's primaries adapted to D50 (the profile connection space), as ICC profiles store them.
SRGB_RED, SRGB_GREEN, SRGB_BLUE = (
    (0.4361, 0.2225, 0.0139),
    (0.3851, 0.7169, 0.0971),
    (
        0.1431,
        0.0606,
        0.7141,
    ),
)
D50 = (0.9642, 1.0, 0.8249)


def _icc_profile(
    red: tuple[float, ...], green: tuple[float, ...], blue: tuple[float, ...]
) -> bytes:
    """A minimal ICC v2 RGB display profile (matrix and gamma 2.2 curves) with these primaries."""

    def xyz(values: tuple[float, ...]) -> bytes:
        return b"XYZ \0\0\0\0" + b"".join(struct.pack(">i", round(v * 65536)) for v in values)

    name = b"test primaries\0"
    description = b"desc\0\0\0\0" + struct.pack(">I", len(name)) + name + bytes(4 + 4 + 2 + 1 + 67)
    curve = b"curv\0\0\0\0" + struct.pack(">IH", 1, 0x0233) + b"\0\0"  # gamma 2.2, padded
    tags = [
        (b"desc", description),
        (b"wtpt", xyz(D50)),
        (b"rXYZ", xyz(red)),
        (b"gXYZ", xyz(green)),
        (b"bXYZ", xyz(blue)),
        (b"rTRC", curve),
        (b"gTRC", curve),
        (b"bTRC", curve),
    ]
    offset = 128 + 4 + 12 * len(tags)
    table, data = b"", b""
    for signature, body in tags:
        body += bytes(-len(body) % 4)
        table += signature + struct.pack(">II", offset + len(data), len(body))
        data += body
    size = offset + len(data)
    header = (
        struct.pack(">I", size)
        + bytes(4)
        + struct.pack(">I", 0x02100000)
        + b"mntrRGB XYZ "
        + bytes(12)
        + b"acsp"
        + bytes(24)
        + struct.pack(">I", 0)
        + xyz(D50)[8:]
        + bytes(48)
    )
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + data


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "HEIF"])
async def test_a_photos_colour_profile_is_converted_to_srgb(fmt: str) -> None:
    # A profile whose red is sRGB's green: a photo tagged with it that stores pure red *is*
    # green, and must come out green (read as plain sRGB it would stay red).
    swapped = _icc_profile(SRGB_GREEN, SRGB_RED, SRGB_BLUE)
    tagged = Image.new("RGB", (320, 320), (255, 0, 0))
    uploads = [*_uploads(2), Upload("swapped", _encode(tagged, fmt, icc_profile=swapped))]

    prepared = await prepare_photos(uploads, RULES)

    assert _close(_decoded(prepared[2]).getpixel((32, 32)), (0, 255, 0), tolerance=20)
    # The same pixels with a plain sRGB profile, and without any, stay as they are.
    srgb = _icc_profile(SRGB_RED, SRGB_GREEN, SRGB_BLUE)
    for options in ({"icc_profile": srgb}, {}):
        uploads[2] = Upload("plain", _encode(tagged, fmt, **options))
        prepared = await prepare_photos(uploads, RULES)
        assert _close(_decoded(prepared[2]).getpixel((32, 32)), (255, 0, 0), tolerance=20)


async def test_a_broken_colour_profile_is_ignored() -> None:
    tagged = _encode(Image.new("RGB", (320, 320), (255, 0, 0)), "PNG", icc_profile=b"junk" * 40)
    uploads = [*_uploads(2), Upload("odd.png", tagged)]
    prepared = await prepare_photos(uploads, RULES)
    assert _close(_decoded(prepared[2]).getpixel((32, 32)), (255, 0, 0))
