"""The contract between the bot and the engine: queue names, job names, payloads, results.

This module must not import torch (or anything heavy): the bot host installs no GPU stack and
is only a client of this API. Only plain data and artifact URLs travel through Redis.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

# Engine job names (functions registered on the engine workers).
TRAIN_SUBJECT = "train_subject"
GENERATE = "generate"

# Training and generation wait in separate queues, so a generation never waits behind a
# queue of long trainings; the engine serves both and lets generations in between training
# chunks (see engine/gpu.py).
TRAIN_QUEUE = "dreambot:engine:train"
GENERATE_QUEUE = "dreambot:engine:generate"
ENGINE_QUEUES = {TRAIN_SUBJECT: TRAIN_QUEUE, GENERATE: GENERATE_QUEUE}
"""The arq queue of each engine job."""
JOB_KIND_QUEUES = {"train": TRAIN_QUEUE, "generate": GENERATE_QUEUE}
"""The arq queue for each ``jobs.kind`` of the bot's store."""


def cancel_key(job_id: str) -> str:
    """Redis key set (for a day) when a running job is cancelled; the engine polls it between
    steps, because arq's own abort cannot reach into a training thread."""
    return f"dreambot:cancel:{job_id}"


# Bot job names (functions registered on the bot's own arq worker).
DELIVER_PROGRESS = "deliver_progress"
DELIVER_RESULT = "deliver_result"
DELIVER_FAILURE = "deliver_failure"


def bot_queue(platform: str) -> str:
    """Name of the arq queue that the bot process for ``platform`` consumes."""
    return f"dreambot:bot:{platform}"


class AdapterRef(BaseModel):
    """A trained subject adapter to activate during generation."""

    name: str = Field(description="stable adapter name, the subject id")
    url: str = Field(description="artifact URL of the .safetensors LoRA file")
    scale: float = 1.0


class TrainRequest(BaseModel):
    """Payload of the ``train_subject`` engine job."""

    job_id: str
    reply_queue: str
    subject_id: str
    token: str = Field(description="the rare identifier token, e.g. 'zqv'")
    class_noun: str = Field(description="the subject's class, e.g. 'dog'")
    photo_urls: list[str]
    adapter_url: str = Field(description="where the engine writes the finished adapter")
    samples_url: str = Field(description="folder URL for the sample images")
    base_model: str
    steps: int | None = None


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
    adapters: list[AdapterRef] = Field(default_factory=list)
    output_url: str = Field(description="folder URL for the generated images")
    base_model: str


class Progress(BaseModel):
    """A throttled progress update for a running engine job."""

    job_id: str
    phase: Literal["queued", "loading", "class-priors", "training", "sampling", "generating"]
    step: int = 0
    total: int = 0
    eta_seconds: float | None = None
    loss: float | None = None


class TrainResult(BaseModel):
    """Result of a finished ``train_subject`` job."""

    job_id: str
    subject_id: str
    adapter_url: str
    sample_urls: list[str]
    steps: int
    seconds: float


class GenerateResult(BaseModel):
    """Result of a finished ``generate`` job."""

    job_id: str
    image_urls: list[str]
    seed: int
    width: int
    height: int
    steps: int
    seconds: float


class Failure(BaseModel):
    """An engine job that could not finish; ``message`` is shown to the user as is."""

    job_id: str
    message: str
    detail: str = ""
