"""The DreamBooth paper's metrics for one trained subject: CLIP-I, CLIP-T and DINO.

Ruiz et al., "DreamBooth: Fine Tuning Text-to-Image Diffusion Models for Subject-Driven
Generation" (CVPR 2023), section 4.1, measures a subject with three averages of cosine
similarities:

- **DINO** (subject fidelity): between the ViT-S/16 DINO embeddings (the CLS token) of every
  generated image and every real photo of the subject — all pairs, averaged. DINO is trained
  without labels, so it tells two dogs of one breed apart; the paper prefers it for that.
- **CLIP-I** (subject fidelity): the same over CLIP image embeddings.
- **CLIP-T** (prompt fidelity): between each generated image's CLIP embedding and the CLIP
  text embedding of its prompt. The paper says only "prompt"; we embed the prompt with the
  subject written as its class noun ("a dog in the jungle", not "a zqv dog in the jungle"),
  as later work on the DreamBooth dataset does, because CLIP has never seen the rare token and
  would only be confused by it. The text used is recorded per prompt in the JSON.

The paper generates 4 images for each of 25 prompts per subject; the prompts (below) are the
DreamBooth dataset's (github.com/google/dreambooth, README): one list for objects, one for live
subjects (its cats and dogs), each with recontextualisation, and accessorisation (live) or
more backgrounds (objects), and property modification. Numbers depend on the encoders, so
compare runs made with the same ones.

Encoders are loaded from local folders only (``DREAMBOT_EVAL_CLIP_PATH``: a CLIP model such as
openai/clip-vit-base-patch32 saved with ``save_pretrained``; ``DREAMBOT_EVAL_DINO_PATH``:
facebook/dino-vits16). ``dreambot eval`` (``bot/cli.py``) runs this on the engine host.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from bot.config import TINY_MODEL_FOLDERS, Settings
from bot.core.store import Owner, Store, Subject
from engine.artifacts import ArtifactStore
from engine.generation import AdapterSpec, Generator
from engine.images import encode_png, open_rgb
from engine.showcase import is_living

_PLACE_PROMPTS: tuple[str, ...] = (
    "a {} in the jungle",
    "a {} in the snow",
    "a {} on the beach",
    "a {} on a cobblestone street",
    "a {} on top of pink fabric",
    "a {} on top of a wooden floor",
    "a {} with a city in the background",
    "a {} with a mountain in the background",
    "a {} with a blue house in the background",
    "a {} on top of a purple rug in a forest",
)
_PROPERTY_PROMPTS: tuple[str, ...] = (
    "a red {}",
    "a purple {}",
    "a shiny {}",
    "a wet {}",
    "a cube shaped {}",
)
"""The first ten and the last five prompts are the same for objects and live subjects."""

OBJECT_PROMPTS: tuple[str, ...] = (
    *_PLACE_PROMPTS,
    "a {} with a wheat field in the background",
    "a {} with a tree and autumn leaves in the background",
    "a {} with the Eiffel Tower in the background",
    "a {} floating on top of water",
    "a {} floating in an ocean of milk",
    "a {} on top of green grass with sunflowers around it",
    "a {} on top of a mirror",
    "a {} on top of the sidewalk in a crowded street",
    "a {} on top of a dirt road",
    "a {} on top of a white rug",
    *_PROPERTY_PROMPTS,
)
"""The DreamBooth dataset's 25 prompts for objects; ``{}`` is "<token> <class>"."""

LIVE_PROMPTS: tuple[str, ...] = (
    *_PLACE_PROMPTS,
    "a {} wearing a red hat",
    "a {} wearing a santa hat",
    "a {} wearing a rainbow scarf",
    "a {} wearing a black top hat and a monocle",
    "a {} in a chef outfit",
    "a {} in a firefighter outfit",
    "a {} in a police outfit",
    "a {} wearing pink glasses",
    "a {} wearing a yellow shirt",
    "a {} in a purple wizard outfit",
    *_PROPERTY_PROMPTS,
)
"""The DreamBooth dataset's 25 prompts for live subjects (cats, dogs); ``{}`` as above."""

PAPER_IMAGES_PER_PROMPT = 4

_SUBJECT_ID = re.compile(r"^[0-9a-f]{32}$")


class EvalError(Exception):
    """The evaluation cannot run; the message says what to fix."""


# Prompts.


@dataclass(frozen=True)
class EvalPrompt:
    """One prompt: what the model draws, and the text CLIP-T compares its images with."""

    template: str
    prompt: str
    text: str


_LIFELESS_WORDS = frozenset({"stuffed", "plush", "plushie", "toy", "figurine", "statue"})
"""Words that make an animal class an object: the dataset's "stuffed animal" plushies take the
object prompts."""


def is_live_subject(class_noun: str) -> bool:
    """Whether the class takes the live-subject prompts (an animal or a person, not a toy)."""
    return is_living(class_noun) and not _LIFELESS_WORDS & set(class_noun.lower().split())


def paper_prompts(class_noun: str) -> tuple[str, ...]:
    """The dataset's prompt list for the class: live subjects' or objects'."""
    return LIVE_PROMPTS if is_live_subject(class_noun) else OBJECT_PROMPTS


def read_prompt_file(path: Path) -> list[str]:
    """Prompt templates from a file, one a line (``{}`` stands for the subject; blank lines
    and ``#`` comments are skipped)."""
    templates = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.count("{}") != 1:
            raise EvalError(f"{path}:{number}: write {{}} once where the subject goes: {line!r}")
        templates.append(line)
    if not templates:
        raise EvalError(f"{path} holds no prompts")
    return templates


def eval_prompts(templates: Sequence[str], token: str, class_noun: str) -> list[EvalPrompt]:
    """Each template with the subject ("<token> <class>") for drawing and the class noun
    alone for CLIP-T."""
    return [
        EvalPrompt(t, t.replace("{}", f"{token} {class_noun}"), t.replace("{}", class_noun))
        for t in templates
    ]


# Encoders and metrics.


def _features(output: Any) -> torch.Tensor:
    # transformers 4 returns the projected features; 5 a model output carrying them.
    features = getattr(output, "pooler_output", output)
    assert isinstance(features, torch.Tensor)
    return features


def _normalized(vectors: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(vectors.float(), dim=-1)


@dataclass
class Encoders:
    """CLIP (images and texts) and DINO (images), loaded from local folders."""

    clip: Any
    clip_processor: Any
    dino: Any
    dino_processor: Any
    device: str = "cpu"

    @classmethod
    def load(cls, clip_path: Path | None, dino_path: Path | None, device: str = "cpu") -> Encoders:
        """Load both encoders (``local_files_only``); EvalError naming the setting when a
        path is unset or unreadable."""
        from transformers import AutoImageProcessor, CLIPModel, CLIPProcessor, ViTModel

        for name, path in [("CLIP", clip_path), ("DINO", dino_path)]:
            if path is None or not Path(path).is_dir():
                raise EvalError(
                    f"Set DREAMBOT_EVAL_{name}_PATH to a local {name} model folder "
                    f"(got {path}); see the README's Evaluation section."
                )
        assert clip_path is not None and dino_path is not None
        # transformers' loaders are loosely typed; the encoders are used through Any.
        auto_processor: Any = AutoImageProcessor
        try:
            clip: Any = CLIPModel.from_pretrained(clip_path, local_files_only=True)
            clip_processor = CLIPProcessor.from_pretrained(clip_path, local_files_only=True)
            # DINO's CLS token is the embedding; a pooling layer would add untrained weights.
            dino: Any = ViTModel.from_pretrained(
                dino_path, local_files_only=True, add_pooling_layer=False
            )
            dino_processor = auto_processor.from_pretrained(dino_path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise EvalError(f"cannot load an evaluation encoder: {exc}") from exc
        return cls(
            clip.to(device).eval(), clip_processor, dino.to(device).eval(), dino_processor, device
        )

    @torch.no_grad()
    def clip_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Unit-length CLIP image embeddings, one row per image."""
        inputs = self.clip_processor(images=[i.convert("RGB") for i in images], return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.device)
        return _normalized(_features(self.clip.get_image_features(pixel_values=pixels)))

    @torch.no_grad()
    def clip_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-length CLIP text embeddings, one row per text."""
        inputs = self.clip_processor(
            text=list(texts), return_tensors="pt", padding=True, truncation=True
        )
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        return _normalized(_features(self.clip.get_text_features(**inputs)))

    @torch.no_grad()
    def dino_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Unit-length DINO embeddings (the CLS token of the last layer), one row per image."""
        inputs = self.dino_processor(images=[i.convert("RGB") for i in images], return_tensors="pt")
        output = self.dino(pixel_values=inputs["pixel_values"].to(self.device))
        return _normalized(output.last_hidden_state[:, 0])


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """The mean cosine similarity over all pairs of rows of ``a`` and ``b`` (unit rows)."""
    return float((a @ b.T).mean())


@dataclass(frozen=True)
class PromptScores:
    """The three metrics over one prompt's images."""

    prompt: str
    text: str
    clip_i: float
    clip_t: float
    dino: float


@dataclass
class EvalReport:
    """One subject's evaluation: settings, the three means, and the per-prompt scores."""

    subject: str
    subject_id: str
    class_noun: str
    token: str
    model: str
    prompt_list: str
    images_per_prompt: int
    real_photos: int
    seed: int
    steps: int
    guidance: float
    strength: float
    clip_i: float
    clip_t: float
    dino: float
    prompts: list[PromptScores] = field(default_factory=list)
    seconds: float = 0.0
    images: list[str] = field(default_factory=list)

    def table(self) -> str:
        """The per-prompt scores and the means as a plain-text table."""
        width = max([len("prompt"), *(len(p.prompt) for p in self.prompts)])
        lines = [f"{'prompt':<{width}}  CLIP-I  CLIP-T    DINO"]
        lines.append("-" * len(lines[0]))
        for p in self.prompts:
            lines.append(f"{p.prompt:<{width}}  {p.clip_i:6.3f}  {p.clip_t:6.3f}  {p.dino:6.3f}")
        lines.append("-" * len(lines[0]))
        lines.append(f"{'mean':<{width}}  {self.clip_i:6.3f}  {self.clip_t:6.3f}  {self.dino:6.3f}")
        head = (
            f"{self.subject} ({self.token} {self.class_noun}) on {self.model}: "
            f"{len(self.prompts)} prompts ({self.prompt_list}) × {self.images_per_prompt} "
            f"images vs {self.real_photos} real photos, seed {self.seed}, {self.steps} steps, "
            f"{self.seconds:.0f}s"
        )
        return "\n".join([head, *lines])

    def to_json(self) -> str:
        """The report as JSON (``dreambot eval`` writes it)."""
        return json.dumps(asdict(self), indent=2, ensure_ascii=False)


def score_images(
    encoders: Encoders,
    real: Sequence[Image.Image],
    generated: Sequence[tuple[EvalPrompt, Sequence[Image.Image]]],
) -> tuple[list[PromptScores], dict[str, float]]:
    """Per-prompt scores and the overall means (over all images, as in the paper)."""
    if not real:
        raise EvalError("the subject has no real photos to compare with")
    real_clip, real_dino = encoders.clip_images(real), encoders.dino_images(real)
    texts = encoders.clip_texts([p.text for p, _ in generated])
    scores, all_clip, all_dino, all_t = [], [], [], []
    for (prompt, images), text in zip(generated, texts, strict=True):
        clip, dino = encoders.clip_images(images), encoders.dino_images(images)
        similarity_t = clip @ text
        scores.append(
            PromptScores(
                prompt.prompt,
                prompt.text,
                clip_i=mean_cosine(clip, real_clip),
                clip_t=float(similarity_t.mean()),
                dino=mean_cosine(dino, real_dino),
            )
        )
        all_clip.append(clip)
        all_dino.append(dino)
        all_t.append(similarity_t)
    means = {
        "clip_i": mean_cosine(torch.cat(all_clip), real_clip),
        "clip_t": float(torch.cat(all_t).mean()),
        "dino": mean_cosine(torch.cat(all_dino), real_dino),
    }
    return scores, means


def generate_for_prompts(
    generator: Generator,
    prompts: Sequence[EvalPrompt],
    adapters: Sequence[AdapterSpec],
    *,
    images_per_prompt: int,
    seed: int,
    steps: int,
    guidance: float,
    on_prompt: Callable[[int, int], None] | None = None,
) -> list[tuple[EvalPrompt, list[Image.Image]]]:
    """Each prompt's images, drawn as one batch per prompt with seed ``seed + index`` (so a
    run is repeatable and prompts don't share noise)."""
    drawn = []
    for index, prompt in enumerate(prompts):
        images = generator.generate(
            prompt.prompt,
            count=images_per_prompt,
            seed=seed + index,
            steps=steps,
            guidance=guidance,
            adapters=adapters,
        )
        drawn.append((prompt, images))
        if on_prompt is not None:
            on_prompt(index + 1, len(prompts))
    return drawn


# The subject, from the store the bot writes.


async def find_subject(store: Store, reference: str, owner: Owner) -> Subject:
    """The subject with this id, or ``owner``'s subject with this name; it must be ready."""
    subject = await store.get_subject(reference) if _SUBJECT_ID.match(reference) else None
    if subject is None:
        subject = await store.find_subject(owner, reference)
    if subject is None:
        mine = ", ".join(s.name for s in await store.list_subjects(owner)) or "none"
        raise EvalError(
            f"no subject {reference!r} (an id, or a name of {owner.platform}:"
            f"{owner.workspace}:{owner.user_id}, whose subjects are: {mine}); see --user"
        )
    if subject.status != "ready" or not subject.adapter_url:
        raise EvalError(f"{subject.name} is {subject.status}, not ready: train it first")
    return subject


def real_photos(artifacts: ArtifactStore, subject: Subject) -> list[Image.Image]:
    """The subject's stored photos (as ``/train`` kept them: centre-cropped squares)."""
    photos = []
    for url in artifacts.list(subject.photos_url):
        photos.append(open_rgb(artifacts.get_bytes(url)))
    if not photos:
        raise EvalError(f"{subject.name} has no photos at {subject.photos_url}")
    return photos


def load_generator(settings: Settings, model: str) -> Generator:
    """A warm generator for the configured base model ``model`` (the subject's)."""
    from engine.models import default_dtype, load_pipeline, resolve_device
    from engine.tiny import build_tiny_named

    if model not in settings.model_names:
        raise EvalError(
            f"the subject was trained on '{model}', which this configuration does not serve "
            f"({', '.join(settings.model_names)})"
        )
    entry, source = settings.model_entry(model), settings.model_source(model)
    if entry.path in TINY_MODEL_FOLDERS:
        build_tiny_named(entry.path, source)
    device = resolve_device(settings.device)
    pipe = load_pipeline(source, device=device, dtype=default_dtype(device), config=entry.config)
    return Generator(pipe, max_adapters=1)


@dataclass
class EvalOptions:
    """How ``dreambot eval`` was asked to run."""

    reference: str
    owner: Owner
    prompt_file: Path | None = None
    images_per_prompt: int = PAPER_IMAGES_PER_PROMPT
    limit: int | None = None
    seed: int = 0
    steps: int | None = None
    guidance: float | None = None
    strength: float = 1.0
    save_images: Path | None = None


async def evaluate_subject(
    settings: Settings,
    options: EvalOptions,
    *,
    log: Callable[[str], None] = lambda _: None,
) -> EvalReport:
    """Find the subject in the store, draw the prompt list with its adapter on its base model,
    and score the images against its photos (blocking work runs in threads)."""
    started = time.monotonic()
    if options.images_per_prompt < 1:
        raise EvalError("--images-per-prompt must be at least 1")
    if not settings.database_file.is_file():
        raise EvalError(
            f"no database at {settings.database_file}: run this where the bot's SQLite file is, "
            "or point DREAMBOT_DATABASE_PATH at it (or a copy)"
        )
    store = await Store.open(settings.database_file)
    try:
        subject = await find_subject(store, options.reference, options.owner)
    finally:
        await store.close()
    if options.prompt_file is not None:
        templates, list_name = read_prompt_file(options.prompt_file), str(options.prompt_file)
    else:
        templates = list(paper_prompts(subject.class_noun))
        live = is_live_subject(subject.class_noun)
        list_name = "DreamBooth " + ("live subject" if live else "object")
    templates = templates[: options.limit] if options.limit else templates
    prompts = eval_prompts(templates, subject.token, subject.class_noun)
    steps = options.steps or settings.generate_steps
    guidance = settings.guidance_scale if options.guidance is None else options.guidance

    def work() -> EvalReport:
        from engine.models import resolve_device

        # The encoders first: a wrong path should fail before minutes of drawing.
        encoders = Encoders.load(
            settings.eval_clip_path, settings.eval_dino_path, resolve_device(settings.device)
        )
        artifacts = ArtifactStore(settings.artifacts)
        real = real_photos(artifacts, subject)
        assert subject.adapter_url is not None
        cache = settings.data_dir / "engine-cache"
        adapter = artifacts.fetch_local(subject.adapter_url, cache)
        log(f"loading {subject.base_model}…")
        generator = load_generator(settings, subject.base_model)
        drawn = generate_for_prompts(
            generator,
            prompts,
            [(subject.id, adapter, options.strength)],
            images_per_prompt=options.images_per_prompt,
            seed=options.seed,
            steps=steps,
            guidance=guidance,
            on_prompt=lambda done, total: log(f"drew prompt {done}/{total}"),
        )
        scores, means = score_images(encoders, real, drawn)
        saved = []
        if options.save_images:
            metadata = {
                "seed": str(options.seed),
                "steps": str(steps),
                "guidance": str(guidance),
                "model": subject.base_model,
                "subjects": subject.id,
                "subject_tokens": subject.token,
            }
            saved = _save_images(drawn, options.save_images, metadata)
        return EvalReport(
            subject=subject.name,
            subject_id=subject.id,
            class_noun=subject.class_noun,
            token=subject.token,
            model=subject.base_model,
            prompt_list=list_name,
            images_per_prompt=options.images_per_prompt,
            real_photos=len(real),
            seed=options.seed,
            steps=steps,
            guidance=guidance,
            strength=options.strength,
            prompts=scores,
            seconds=time.monotonic() - started,
            images=saved,
            **means,
        )

    return await asyncio.to_thread(work)


def _save_images(
    drawn: Sequence[tuple[EvalPrompt, list[Image.Image]]], folder: Path, metadata: dict[str, str]
) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for p, (prompt, images) in enumerate(drawn):
        for i, image in enumerate(images):
            path = folder / f"{p:02d}-{i}.png"
            png = encode_png(image, {**metadata, "prompt": prompt.prompt, "index": str(i)})
            path.write_bytes(png)
            paths.append(str(path))
    return paths
