"""The showcase: one subject across the DreamBooth paper's five capabilities, as one grid.

Recontextualisation, art renditions, novel views, property modification and accessorisation,
two prompts each, with prompt sets chosen by whether the subject's class is a living thing
(a dog can be crossed with a panda and wear sunglasses) or an object (a backpack can be made
of glass). The grid is what ``/showcase`` posts and the sample posted when training finishes.

Torch-free: the drawing goes through whatever ``draw`` function the caller passes (the engine
passes its warm ``Generator``), so the layout and prompts are testable on their own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

Box = tuple[int, int, int, int]
"""(left, top, right, bottom) in pixels."""

LIVING_CLASSES = frozenset(
    """
    animal bear bird bunny cat chicken cow deer dog duck ferret fish fox frog goat guinea pig
    hamster hedgehog horse kitten lizard monkey mouse parrot pig pony puppy rabbit rat sheep
    snake tiger tortoise turtle wolf baby boy child girl kid man person woman
    """.split()
)
"""Class nouns drawn as living things (last word of the class: "golden retriever" is a dog
only if it ends in a known word, so unknown breeds count as objects; say "dog")."""

# (capability, [(caption, prompt template)]) — ``{s}`` is the subject: "zqv dog".
_SHARED_CAPABILITIES: list[tuple[str, list[tuple[str, str]]]] = [
    (
        "recontextualisation",
        [("on the beach", "a {s} on the beach"), ("in the jungle", "a {s} in the jungle")],
    ),
    (
        "art renditions",
        [
            ("Van Gogh", "a painting of a {s} in the style of Van Gogh"),
            ("woodblock print", "a Japanese woodblock print of a {s}"),
        ],
    ),
    (
        "novel views",
        [("from above", "a {s} seen from above"), ("from behind", "a {s} seen from behind")],
    ),
]
"""The first three capabilities are shown the same way for living things and objects."""

LIVING_CAPABILITIES: list[tuple[str, list[tuple[str, str]]]] = [
    *_SHARED_CAPABILITIES,
    (
        "property modification",
        [
            ("crossed with a panda", "a {s} crossed with a panda"),
            ("crossed with a lion", "a {s} crossed with a lion"),
        ],
    ),
    (
        "accessorisation",
        [
            ("chef outfit", "a {s} wearing a chef outfit"),
            ("sunglasses", "a {s} wearing sunglasses"),
        ],
    ),
]

OBJECT_CAPABILITIES: list[tuple[str, list[tuple[str, str]]]] = [
    *_SHARED_CAPABILITIES,
    (
        "property modification",
        [("red", "a red {s}"), ("made of glass", "a {s} made of glass")],
    ),
    (
        "accessorisation",
        [
            ("with a bow", "a {s} with a ribbon bow on top"),
            ("with flowers", "a {s} decorated with flowers"),
        ],
    ),
]

MIN_CELL = 192
"""Cells are at least this wide, so the captions fit under the tiny model's 64 px images."""
PADDING = 8
TITLE_HEIGHT = 32
ROW_LABEL_WIDTH = 150
CAPTION_HEIGHT = 20
BACKGROUND = (24, 24, 28)
TEXT = (235, 235, 235)
WITHHELD_GREY = (128, 128, 128)
"""The neutral tile drawn in place of a cell the safety checker withheld."""
WITHHELD_LABEL = "withheld"


def is_living(class_noun: str) -> bool:
    """Whether the class is drawn as a living thing (its last word is a known animal/person)."""
    words = class_noun.lower().split()
    return bool(words) and words[-1] in LIVING_CLASSES


@dataclass(frozen=True)
class ShowcasePrompt:
    """One cell's prompt."""

    capability: str
    caption: str
    prompt: str


def showcase_prompts(token: str, class_noun: str) -> list[ShowcasePrompt]:
    """The ten prompts, capability by capability, for the subject ``token class_noun``."""
    capabilities = LIVING_CAPABILITIES if is_living(class_noun) else OBJECT_CAPABILITIES
    subject = f"{token} {class_noun}"
    return [
        ShowcasePrompt(capability, caption, template.format(s=subject))
        for capability, cells in capabilities
        for caption, template in cells
    ]


@dataclass(frozen=True)
class Cell:
    """Where one image and its caption go."""

    image_box: Box
    caption_box: Box
    caption: str
    capability: str


@dataclass(frozen=True)
class Layout:
    """The grid's geometry: its size, the title, one label per row, one cell per prompt."""

    size: tuple[int, int]
    title_box: Box
    title: str
    row_labels: list[tuple[Box, str]]
    cells: list[Cell]


def showcase_layout(
    prompts: Sequence[ShowcasePrompt], cell_side: int, title: str, columns: int = 2
) -> Layout:
    """Rows of ``columns`` cells, one row per capability (in the order of ``prompts``)."""
    side = max(cell_side, MIN_CELL)
    rows: list[str] = []
    for prompt in prompts:
        if prompt.capability not in rows:
            rows.append(prompt.capability)
    row_height = side + CAPTION_HEIGHT + PADDING
    width = ROW_LABEL_WIDTH + columns * (side + PADDING) + PADDING
    height = TITLE_HEIGHT + len(rows) * row_height + PADDING
    labels = []
    cells = []
    for row, capability in enumerate(rows):
        top = TITLE_HEIGHT + row * row_height
        labels.append(((PADDING, top, ROW_LABEL_WIDTH, top + side), capability))
        in_row = [p for p in prompts if p.capability == capability][:columns]
        for column, prompt in enumerate(in_row):
            left = ROW_LABEL_WIDTH + PADDING + column * (side + PADDING)
            image_box = (left, top, left + side, top + side)
            caption_box = (left, top + side, left + side, top + side + CAPTION_HEIGHT)
            cells.append(Cell(image_box, caption_box, prompt.caption, capability))
    return Layout(
        (width, height), (PADDING, 0, width - PADDING, TITLE_HEIGHT), title, labels, cells
    )


@lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def render_grid(layout: Layout, images: Sequence[Image.Image | None]) -> Image.Image:
    """Paste ``images`` (one per cell, in order) into the layout and write its labels; a None
    (withheld by the safety checker) becomes a grey tile labelled "withheld"."""
    if len(images) != len(layout.cells):
        raise ValueError(f"{len(layout.cells)} cells but {len(images)} images")
    grid = Image.new("RGB", layout.size, BACKGROUND)
    pen = ImageDraw.Draw(grid)
    left, top, _, bottom = layout.title_box
    pen.text((left, (top + bottom) // 2), layout.title, fill=TEXT, font=_font(16), anchor="lm")
    for (left, top, _right, bottom), text in layout.row_labels:
        pen.text((left, (top + bottom) // 2), text, fill=TEXT, font=_font(13), anchor="lm")
    for cell, image in zip(layout.cells, images, strict=True):
        left, top, right, bottom = cell.image_box
        if image is None:
            pen.rectangle((left, top, right - 1, bottom - 1), fill=WITHHELD_GREY)
            centre = ((left + right) // 2, (top + bottom) // 2)
            pen.text(centre, WITHHELD_LABEL, fill=BACKGROUND, font=_font(16), anchor="mm")
        else:
            grid.paste(image.convert("RGB").resize((right - left, bottom - top)), (left, top))
        left, top, right, bottom = cell.caption_box
        centre = ((left + right) // 2, (top + bottom) // 2)
        pen.text(centre, cell.caption, fill=TEXT, font=_font(12), anchor="mm")
    return grid


DrawBatch = Callable[[list[str], int], list[Image.Image | None]]
"""Draws one image per prompt with the given seed (the engine wraps its Generator); None for
an image the safety checker withheld."""


def render_showcase(
    draw: DrawBatch,
    *,
    token: str,
    class_noun: str,
    name: str,
    cell_side: int,
    seed: int = 0,
    batch: int = 5,
) -> tuple[Image.Image, list[ShowcasePrompt]]:
    """Draw the ten prompts (``batch`` per call, seeds ``seed``, ``seed+1``, …) into the grid."""
    prompts = showcase_prompts(token, class_noun)
    images: list[Image.Image | None] = []
    for start in range(0, len(prompts), batch):
        chunk = [p.prompt for p in prompts[start : start + batch]]
        images += draw(chunk, seed + start // batch)
    kind = "living thing" if is_living(class_noun) else "object"
    title = f"{name} ({class_noun}, {kind}) · DreamBooth showcase · AI-generated"
    layout = showcase_layout(prompts, cell_side, title)
    return render_grid(layout, images), prompts
