"""The contract between the bot and the engine: queue names, job names, payloads, results.

This module must not import torch (or anything heavy): the bot host installs no GPU stack and
is only a client of this API. Only plain data and artifact URLs travel through Redis.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

# Engine job names (functions registered on the engine workers).
TRAIN_SUBJECT = "train_subject"
GENERATE = "generate"
SHOWCASE = "showcase"

# Training and generation wait in separate queues, so a generation never waits behind a
# queue of long trainings; the engine serves both and lets generations in between training
# chunks (see engine/gpu.py). Each base model has its own pair (``model_queue``), and an engine
# consumes only the queues of the models it serves: engines configured with different
# DREAMBOT_MODELS share one Redis, and a job for a model no running engine serves waits for one.
TRAIN_QUEUE = "dreambot:engine:train"
GENERATE_QUEUE = "dreambot:engine:generate"
LEGACY_QUEUES = {"train": TRAIN_QUEUE, "generate": GENERATE_QUEUE}
"""The queues of every model at once, for each ``jobs.kind`` of the bot's store: where jobs
went before per-model queues. Every engine still serves them, so a job queued before an
upgrade runs (and fails, as it always did, on an engine that lacks its model)."""
JOB_KINDS = {TRAIN_SUBJECT: "train", GENERATE: "generate", SHOWCASE: "generate"}
"""The queue kind (``jobs.kind`` of the bot's store) of each engine job."""


def model_queue(kind: str, model: str) -> str:
    """The arq queue of ``kind`` jobs ("train" or "generate", see ``JOB_KINDS``) for base
    model ``model``: ``dreambot:engine:train:<model>`` or ``dreambot:engine:generate:<model>``."""
    return f"{LEGACY_QUEUES[kind]}:{model}"


def train_queue(model: str) -> str:
    """The arq queue of trainings on base model ``model``."""
    return model_queue("train", model)


def generate_queue(model: str) -> str:
    """The arq queue of generations (and showcases) on base model ``model``."""
    return model_queue("generate", model)


def engine_queues(models: Iterable[str], kind: str | None = None) -> list[str]:
    """Every engine queue of ``kind`` jobs (both kinds when None) for ``models``, each legacy
    queue first: what to count to know how many jobs wait for those models."""
    kinds = list(LEGACY_QUEUES) if kind is None else [kind]
    return [LEGACY_QUEUES[k] for k in kinds] + [
        model_queue(k, model) for k in kinds for model in dict.fromkeys(models)
    ]


def cancel_key(job_id: str) -> str:
    """Redis key set (for a day) when a running job is cancelled; the engine polls it between
    steps, because arq's own abort cannot reach into a training thread."""
    return f"dreambot:cancel:{job_id}"


def rare_tokens_key(model: str) -> str:
    """Redis key where an engine publishes, at start, base model ``model``'s rare identifier
    tokens: a JSON list of words its tokenizer(s) read as one token and that carry no prior
    meaning (``engine.rare_tokens``). The bot draws each new subject's token from it."""
    return f"dreambot:engine:rare-tokens:{model}"


# Engine presence. Each engine process keeps its own short-lived key renewed while it runs
# (``engine.worker``), so the bot can tell a user whose job waits that no engine is there to
# take it, and moderators can see which engines are up (/mod status).
ENGINE_HEARTBEAT_SECONDS = 5.0
"""How often an engine renews its heartbeat key."""
ENGINE_HEARTBEAT_TTL_SECONDS = 20.0
"""How long a heartbeat key outlives its last renewal: an engine that stops renewing (crashed,
killed, its host or network down) counts as gone after at most this long."""
ENGINES_KEY = "dreambot:engines"
"""Redis set of the ids of engines that wrote a heartbeat; readers take its members' keys
(:func:`engine_alive_key`) and drop ids whose key has expired."""


def engine_alive_key(engine_id: str) -> str:
    """Redis key holding engine ``engine_id``'s :class:`EngineHeartbeat` (JSON) while it runs;
    it expires ``ENGINE_HEARTBEAT_TTL_SECONDS`` after the last renewal and is deleted when the
    engine shuts down cleanly."""
    return f"dreambot:engine:alive:{engine_id}"


# Bot job names (functions registered on the bot's own arq worker).
DELIVER_PROGRESS = "deliver_progress"
DELIVER_RESULT = "deliver_result"
DELIVER_FAILURE = "deliver_failure"


def bot_queue(platform: str) -> str:
    """Name of the arq queue that the bot process for ``platform`` consumes."""
    return f"dreambot:bot:{platform}"


Aspect = Literal["square", "portrait", "landscape", "wide"]
ASPECT_RATIOS: dict[str, tuple[int, int]] = {
    "square": (1, 1),
    "portrait": (2, 3),
    "landscape": (3, 2),
    "wide": (16, 9),
}
"""Width : height of each aspect; the engine maps them to sizes its model draws well
(``engine.aspects.aspect_size``)."""


class AdapterRef(BaseModel):
    """A trained subject adapter to activate during generation."""

    name: str = Field(description="stable adapter name, the subject id")
    url: str = Field(description="artifact URL of the .safetensors LoRA file")
    scale: float = Field(1.0, description="LoRA scale: the subject's strength in the image")
    token: str = Field("", description="the subject's rare token, recorded in the PNG metadata")


class TrainRequest(BaseModel):
    """Payload of the ``train_subject`` engine job."""

    job_id: str
    reply_queue: str
    subject_id: str
    token: str = Field(description="the rare identifier token, e.g. 'zqv'")
    class_noun: str = Field(description="the subject's class, e.g. 'dog'")
    name: str = Field("", description="the subject's display name (the sample grid's title)")
    photo_urls: list[str]
    adapter_url: str = Field(description="where the engine writes the finished adapter")
    samples_url: str = Field(description="folder URL for the sample images")
    base_model: str = Field(
        description="name of a configured base model (a DREAMBOT_MODELS key, or the one "
        "DREAMBOT_BASE_MODEL); the engine trains on that model"
    )
    steps: int | None = None
    safety_check: bool = Field(
        True,
        description="run the engine's safety checker (if it has one) on the sample grid's "
        "cells; a flagged cell is drawn as a grey 'withheld' tile",
    )


class GenerateRequest(BaseModel):
    """Payload of the ``generate`` engine job."""

    job_id: str
    reply_queue: str
    prompt: str
    negative_prompt: str = ""
    count: int = 4
    seed: int
    steps: int | None = None
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    aspect: Aspect | None = Field(
        None, description="mapped by the engine to its model's size; width/height win if given"
    )
    adapters: list[AdapterRef] = Field(default_factory=list)
    output_url: str = Field(description="folder URL for the generated images")
    base_model: str = Field(
        description="the model to draw on: the one the adapters were trained on, else the default"
    )
    init_image_url: str | None = Field(
        None, description="start from this image (img2img): Vary and Upscale of a result"
    )
    init_strength: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="how far img2img may move from the init image; 0 only resizes it",
    )
    previews: bool = Field(True, description="send small previews with the progress updates")
    safety_check: bool = Field(
        True,
        description="run the engine's safety checker (if it has one) on the images and the "
        "previews: a flagged image is neither stored nor listed, a flagged preview not sent",
    )


class ShowcaseRequest(BaseModel):
    """Payload of the ``showcase`` engine job: one subject across the DreamBooth paper's five
    capabilities, rendered as one labelled grid (see ``engine.showcase``)."""

    job_id: str
    reply_queue: str
    subject: AdapterRef
    token: str
    class_noun: str
    name: str = Field(description="the subject's display name, for the grid's title")
    seed: int = 0
    steps: int | None = None
    output_url: str = Field(description="folder URL for the grid image")
    base_model: str
    safety_check: bool = Field(
        True,
        description="run the engine's safety checker (if it has one) on the cells (and "
        "previews); a flagged cell is drawn as a grey 'withheld' tile",
    )


class Progress(BaseModel):
    """A throttled progress update for a running engine job."""

    job_id: str
    phase: Literal["queued", "loading", "class-priors", "training", "sampling", "generating"]
    step: int = 0
    total: int = 0
    eta_seconds: float | None = None
    loss: float | None = None
    preview_url: str | None = Field(
        None, description="a small preview of the image being drawn (artifact URL)"
    )
    position: int | None = Field(
        None,
        description="phase queued only: the job's place in its queue, 1 when none is ahead "
        "(the bot's own updates while a job waits; the engine never sends it)",
    )


class TrainResult(BaseModel):
    """Result of a finished ``train_subject`` job."""

    job_id: str
    subject_id: str
    adapter_url: str
    sample_urls: list[str]
    steps: int
    seconds: float
    withheld: int = Field(0, description="sample-grid cells the safety checker withheld")


class GenerateResult(BaseModel):
    """Result of a finished ``generate`` job."""

    job_id: str
    image_urls: list[str]
    seed: int
    width: int
    height: int
    steps: int
    seconds: float
    withheld: int = Field(
        0,
        description="images (a showcase: grid cells) the safety checker withheld; a generate "
        "job's image_urls then hold only the others, possibly none",
    )


class Failure(BaseModel):
    """An engine job that could not finish; ``message`` is shown to the user as is."""

    job_id: str
    message: str
    detail: str = ""


class EngineJob(BaseModel):
    """A job an engine is running, as its heartbeat reports it."""

    job_id: str
    kind: str = Field(description="the engine job name: train_subject, generate or showcase")
    started_at: datetime


class EngineHeartbeat(BaseModel):
    """What a running engine says about itself under ``engine_alive_key(engine_id)``."""

    engine_id: str
    host: str
    pid: int
    device: str = Field(description="the torch device it runs on, e.g. 'cuda' or 'cpu'")
    models: list[str] = Field(description="the base models it serves (DREAMBOT_MODELS names)")
    safety_checker: str | None = Field(
        None,
        description="where its safety checker was loaded from (a folder), None when it has none",
    )
    started_at: datetime
    jobs: list[EngineJob] = Field(
        default_factory=list,
        description="the jobs it is running, as of its last renewal",
    )
