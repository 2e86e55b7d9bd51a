"""Configuration for every dreambot process, read from ``DREAMBOT_*`` environment variables.

An optional ``.env`` file in the working directory is read too (chat tokens included: keep it
private; the deploy files pass them as environment variables). Values are validated once at
start-up so a typo fails loudly with the variable's name instead of at the first job.
"""

from __future__ import annotations

import getpass
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

TINY_MODEL = "tiny"
"""Special value of ``DREAMBOT_BASE_MODEL``: the tiny random model built offline on first use."""

TINY_SDXL_MODEL = "tiny-sdxl"
"""Special model path: the tiny random SDXL-shaped model, built offline on first use."""

TINY_SD2_MODEL = "tiny-sd2"
"""Special model path: the tiny random SD 2.x-shaped (v-prediction) model, built on first use."""

TINY_MODEL_FOLDERS = {
    TINY_MODEL: "tiny-sd",
    TINY_SD2_MODEL: "tiny-sd2",
    TINY_SDXL_MODEL: "tiny-sdxl",
}
"""Each special tiny model's folder under ``DATA_DIR/models``."""

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,39}$")
"""What a name in ``DREAMBOT_MODELS`` may look like (users type it after /train)."""


class ModelEntry(BaseModel):
    """One base model of ``DREAMBOT_MODELS``."""

    path: str = Field(
        description="'tiny', 'tiny-sd2', 'tiny-sdxl', a diffusers folder, or a single "
        ".safetensors/.ckpt file"
    )
    config: str | None = Field(
        None,
        description="for a single file: a diffusers folder of the same family whose configs "
        "and tokenizers it uses (weights not needed); else the Hugging Face cache is used",
    )


TINY_DEFAULTS = {
    "train_steps": 60,
    "train_learning_rate": 1e-2,
    "class_images": 8,
    "generate_steps": 10,
}
"""Defaults that suit the tiny demo model (used unless set explicitly): a few steps at a
high learning rate so a subject visibly changes its noise within seconds on a CPU."""


class ConfigError(Exception):
    """The environment holds an invalid setting; the message names the variable."""


class Settings(BaseSettings):
    """All settings; each field is the environment variable ``DREAMBOT_<FIELD NAME>``."""

    model_config = SettingsConfigDict(
        env_prefix="DREAMBOT_", env_file=".env", extra="ignore", validate_default=True
    )

    # Infrastructure.
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Redis for the job queues; `dreambot run` starts a private one if none answers",
    )
    data_dir: Path = Field(Path("data"), description="root for the database, artifacts, models")
    database_path: Path | None = Field(
        None, description="SQLite file; default DATA_DIR/dreambot.sqlite3"
    )
    artifacts_url: str | None = Field(
        None, description="fsspec URL of the artifact store; default file://DATA_DIR/artifacts"
    )
    artifacts_public_url: str | None = Field(
        None,
        description="public https URL under which the artifact store's files are served (a CDN "
        "or bucket website in front of the bucket, a web server in front of the folder; only "
        "outputs/ needs to be): Slack's live previews link there",
    )

    # Engine.
    base_model: str = Field(
        TINY_MODEL,
        description="the default model: a name from MODELS if that is set (default: its first), "
        "else 'tiny', 'tiny-sd2', 'tiny-sdxl', a diffusers folder, or a single .safetensors/.ckpt "
        "file",
    )
    models: Annotated[dict[str, ModelEntry], NoDecode] = Field(
        default_factory=dict,
        description='several base models by name: JSON {"sd15": "/models/sd15", "xl": '
        '{"path": "/m/xl.safetensors", "config": "/m/xl-configs"}} or '
        "'sd15=/models/sd15,xl=/m/xl.safetensors'; the engine loads all of them",
    )
    device: str = Field("auto", description="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    safety_checker: str = Field(
        "auto",
        description="the NSFW check of the engine's images: 'auto' (the safety checker of the "
        "first base model folder with safety_checker/ and feature_extractor/, else none), "
        "'off', or a folder holding a StableDiffusionSafetyChecker and its "
        "preprocessor_config.json (directly, or in those two subfolders)",
    )
    train_steps: int = Field(400, ge=1, le=10_000)
    train_learning_rate: float = Field(1e-4, gt=0, le=1.0)
    train_rank: int = Field(4, ge=1, le=256)
    prior_loss_weight: float = Field(1.0, ge=0)
    class_images: int = Field(50, ge=0, le=1000)
    generate_steps: int = Field(25, ge=1, le=150, description="default sampler steps")
    generate_max_steps: int = Field(50, ge=1, le=150, description="most steps a user may ask")
    guidance_scale: float = Field(7.5, ge=0, le=30)
    guidance_max: float = Field(15.0, ge=0, le=30, description="most guidance a user may ask")
    subject_strength_max: float = Field(
        1.5, gt=0, le=4, description="largest subject strength (LoRA scale) a user may ask"
    )
    vary_strength: float = Field(
        0.35, gt=0, le=1, description="img2img strength of Vary: how far it may move"
    )
    upscale_factor: int = Field(2, ge=1, le=4, description="Upscale multiplies each side by this")
    upscale_strength: float = Field(
        0.3,
        ge=0,
        le=1,
        description="img2img strength of Upscale at the larger size; 0 is a plain resize",
    )
    preview_interval: float = Field(
        3.0, ge=0, description="seconds between live previews of a generation; 0 disables them"
    )
    adapter_cache_size: int = Field(8, ge=1, description="subject adapters kept loaded")
    fuse_lora: bool = Field(
        True,
        description="merge a generation's adapters into the UNet while it runs (faster; keeps a "
        "copy of the base weights they touch)",
    )
    lora_hotswap: bool = Field(
        False, description="hot-swap adapters in fixed slots (for a compiled UNet on a GPU)"
    )
    compile_unet: bool = Field(
        False, description="torch.compile the UNet (GPU; implies LORA_HOTSWAP; slow warm-up)"
    )
    eval_clip_path: Path | None = Field(
        None, description="local CLIP model folder for `dreambot eval` (CLIP-I, CLIP-T)"
    )
    eval_dino_path: Path | None = Field(
        None, description="local DINO ViT-S/16 model folder for `dreambot eval` (DINO)"
    )
    sample_count: int = Field(4, ge=0, le=16, description="sample images posted after training")
    progress_interval: float = Field(2.0, ge=0, description="seconds between progress updates")
    train_chunk_steps: int = Field(
        10, ge=1, description="training steps between chances for waiting generations to run"
    )
    job_timeout: int = Field(3 * 3600, ge=10, description="seconds before an engine job is killed")
    train_optimizer: Literal["adamw", "adamw8bit"] = Field(
        "adamw", description="'adamw8bit' needs the bitsandbytes extra (CUDA only)"
    )
    train_gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto",
        description="recompute activations: less GPU memory, slower steps; 'auto': on for "
        "SDXL on a GPU, off otherwise (see README, Training)",
    )
    train_compile: bool = Field(
        False,
        description="torch.compile (inductor) each training's UNet copy: faster steps, but the "
        "first training of a process waits for the compilation (see README, Training)",
    )
    train_random_flip: bool = Field(False, description="also train on mirrored photos")
    train_text_encoder: bool = Field(
        False,
        description="also train LoRA on the text encoder(s): more memory and time per step, "
        "and the token overfits sooner",
    )
    train_text_encoder_lr: float | None = Field(
        None,
        gt=0,
        le=1.0,
        description="learning rate of the text-encoder LoRA; default: TRAIN_LEARNING_RATE",
    )
    train_random_crops: int = Field(
        0, ge=0, le=8, description="extra random (slightly zoomed) framings of each photo"
    )
    train_checkpoint_steps: int = Field(
        100,
        ge=0,
        description="training steps between resumable checkpoints in the artifact store; 0: none",
    )
    job_lease_seconds: int = Field(
        60,
        ge=2,
        description="an engine's claim on a running job lasts this long and is renewed every "
        "third of it; a job whose engine died is run again after at most this long",
    )

    # Bot rules.
    images_per_prompt: int = Field(4, ge=1, le=4)
    # At most 1000: CLIP reads 77 tokens (about 300 characters) anyway, and a result's text
    # quoting the prompt must fit Discord's 2000-character message with its seed.
    max_prompt_chars: int = Field(400, ge=10, le=1000)
    min_photos: int = Field(3, ge=1)
    max_photos: int = Field(20, ge=1)
    min_photo_side: int = Field(256, ge=1)
    max_photo_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    photo_size: int = Field(512, ge=64, description="photos are centre-cropped to this square")
    max_queue: int = Field(100, ge=1, description="queued engine jobs before new ones are refused")
    # A try only needs to get one message through: the parts of a result already posted are
    # not posted again. 240 s takes a full 10 MiB Discord message at 0.35 Mbit/s (a boosted
    # server's 100 MiB at 3.5), with discord.py's own 5xx retries (16 s) or Slack's waits on
    # its rate limits; and it keeps arq's limit on the job (this + 60 s) at arq's default
    # 300 s, so a killed bot's cut-off result is posted again as soon after the kill as before.
    delivery_timeout: float = Field(
        240.0,
        gt=0,
        le=3600,
        description="seconds one try at posting a result may take before it is stopped and "
        "tried again (20 tries; a last one that fails says so in the chat)",
    )

    # Retention: what is kept about people, and how long (README: Your data).
    keep_images_days: int = Field(
        30,
        ge=0,
        le=36_500,
        description="days a finished image or showcase job's stored images (and live previews) "
        "are kept before each bot process deletes its platform's; 0 keeps them forever",
    )
    keep_moderation_days: int = Field(
        180,
        ge=0,
        le=36_500,
        description="days quota usage, blocked-prompt and withheld-output records, audit "
        "entries and expired bans are kept for moderators; 0 keeps them forever",
    )

    # Quotas: the defaults of every workspace; moderators override them per workspace, role
    # or user with `/mod quota set`.
    quota_daily_images: int = Field(
        100, ge=0, description="images one user may generate per UTC day"
    )
    quota_daily_trainings: int = Field(
        5, ge=0, description="subjects one user may train per UTC day"
    )
    quota_max_active_jobs: int = Field(
        3, ge=0, description="jobs one user may have waiting or running at once"
    )

    # Moderators. Each adapter decides who moderates on its platform; these lists are what it
    # consults (comma-separated in the environment).
    moderator_users: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="platform user ids that may use /mod"
    )
    moderator_roles: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="platform role ids whose members may use /mod"
    )

    # Shell adapter.
    shell_user: str = Field(default_factory=getpass.getuser)
    shell_moderators: Annotated[list[str] | None, NoDecode] = Field(
        None,
        description="shell users who may use /mod; unset means the shell user, so the local "
        "demo can moderate itself; empty means nobody",
    )

    # Discord adapter.
    discord_token: SecretStr | None = Field(None, description="bot token; `dreambot discord`")
    discord_dev_guild: int | None = Field(
        None, description="sync slash commands to this guild only (instant); global otherwise"
    )
    discord_edit_interval: float = Field(
        3.0, ge=1.0, description="seconds between edits of one progress message"
    )
    discord_download_timeout: float = Field(
        30.0,
        gt=0,
        le=600,
        # Discord takes the reply for 15 minutes after the command: the download must end first.
        description="seconds allowed to download one attachment",
    )

    # Slack adapter.
    slack_bot_token: SecretStr | None = Field(
        None, description="bot token (xoxb-…); `dreambot slack`"
    )
    slack_signing_secret: SecretStr | None = Field(
        None, description="signing secret: verifies Slack's requests in HTTP mode"
    )
    slack_app_token: SecretStr | None = Field(
        None, description="app-level token (xapp-…): set, the bot uses Socket Mode, not HTTP"
    )
    slack_host: str = Field("0.0.0.0", description="HTTP mode: the address to listen on")
    slack_port: int = Field(3000, ge=1, le=65535, description="HTTP mode: the port to listen on")
    slack_path: str = Field(
        "/slack/events", description="HTTP mode: the path of the app's Request URL"
    )
    slack_edit_interval: float = Field(
        3.0, ge=1.0, description="seconds between edits of one progress message"
    )
    slack_download_timeout: float = Field(
        30.0, gt=0, le=600, description="seconds allowed to download one shared photo"
    )
    slack_train_window: float = Field(
        600.0,
        ge=30,
        description="seconds after /train during which the user's next photos there are taken",
    )

    @field_validator("moderator_users", "moderator_roles", "shell_moderators", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        # "123, 456" reads better in an environment file than a JSON list.
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("safety_checker")
    @classmethod
    def _check_safety_checker(cls, value: str) -> str:
        # The folder itself is checked by the engine at start (a bot host does not have it).
        value = value.strip()
        if not value:
            raise ValueError("use 'auto', 'off' or the folder of a safety checker")
        return value.lower() if value.lower() in ("auto", "off") else value

    @field_validator("artifacts_public_url")
    @classmethod
    def _check_public_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        if not re.fullmatch(r"https?://[^/?#\s]+(/[^?#\s]*)?", value):
            raise ValueError(
                "must be an https:// URL without a query, e.g. https://cdn.example.com"
            )
        return value.rstrip("/")

    @field_validator("models", mode="before")
    @classmethod
    def _parse_models(cls, value: Any) -> Any:
        parsed = value
        text = value.strip() if isinstance(value, str) else None
        if text == "":
            return {}
        if text is not None and text.startswith("{"):
            try:
                parsed = json.loads(text)
            except ValueError as exc:
                raise ValueError(f"not valid JSON: {exc}") from exc
        elif text is not None:
            parsed = {}
            for part in text.split(","):
                name, sep, path = part.partition("=")
                if not sep or not name.strip() or not path.strip():
                    raise ValueError(f"'{part.strip()}' is not name=path")
                parsed[name.strip()] = path.strip()
        if not isinstance(parsed, dict):
            raise ValueError("must be a JSON object of name → path")
        return {
            name: {"path": entry} if isinstance(entry, str) else entry
            for name, entry in parsed.items()
        }

    @field_validator("models")
    @classmethod
    def _check_model_names(cls, value: dict[str, ModelEntry]) -> dict[str, ModelEntry]:
        for name in value:
            if not MODEL_NAME.match(name):
                raise ValueError(f"model name '{name}': use 1-40 letters, digits, '.', '-' or '_'")
            if name.lower() == "health-check":
                # Its queues' names would be arq's health-check keys of the legacy queues.
                raise ValueError(f"model name '{name}' is reserved; pick another")
        return value

    @model_validator(mode="after")
    def _check_ranges(self) -> Settings:
        if self.min_photos > self.max_photos:
            raise ValueError("DREAMBOT_MIN_PHOTOS must not exceed DREAMBOT_MAX_PHOTOS")
        if self.generate_steps > self.generate_max_steps:
            raise ValueError("DREAMBOT_GENERATE_STEPS must not exceed DREAMBOT_GENERATE_MAX_STEPS")
        if self.guidance_scale > self.guidance_max:
            raise ValueError("DREAMBOT_GUIDANCE_SCALE must not exceed DREAMBOT_GUIDANCE_MAX")
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("DREAMBOT_REDIS_URL must start with redis://, rediss:// or unix://")
        if self.models:
            if "base_model" not in self.model_fields_set:
                self.base_model = next(iter(self.models))
            elif self.base_model not in self.models:
                raise ValueError(
                    f"DREAMBOT_BASE_MODEL '{self.base_model}' is not one of DREAMBOT_MODELS: "
                    + ", ".join(self.models)
                )
        if self.model_entry(self.base_model).path in TINY_MODEL_FOLDERS:
            for name, value in TINY_DEFAULTS.items():
                if name not in self.model_fields_set:
                    setattr(self, name, value)
        return self

    @property
    def database_file(self) -> Path:
        """The SQLite database file."""
        return self.database_path or self.data_dir / "dreambot.sqlite3"

    @property
    def artifacts(self) -> str:
        """The artifact store's base URL."""
        return self.artifacts_url or (self.data_dir / "artifacts").resolve().as_uri()

    @property
    def model_names(self) -> list[str]:
        """The names jobs may ask for, default first: the ``DREAMBOT_MODELS`` keys, or else
        the one ``DREAMBOT_BASE_MODEL`` (its value is its name)."""
        if not self.models:
            return [self.base_model]
        return [self.base_model] + [name for name in self.models if name != self.base_model]

    def model_entry(self, name: str) -> ModelEntry:
        """The configured entry of model ``name``; KeyError if it is not configured."""
        if not self.models and name == self.base_model:
            return ModelEntry(path=self.base_model)
        return self.models[name]

    def model_source(self, name: str) -> Path:
        """Local path of model ``name`` (the tiny models map to folders under DATA_DIR)."""
        path = self.model_entry(name).path
        if path in TINY_MODEL_FOLDERS:
            return self.tiny_model_folder(path)
        return Path(path).expanduser()

    def tiny_model_folder(self, tiny: str) -> Path:
        """Where the tiny model ``tiny`` (a key of ``TINY_MODEL_FOLDERS``) is built."""
        return self.data_dir / "models" / TINY_MODEL_FOLDERS[tiny]

    @property
    def base_model_source(self) -> Path:
        """Local path of the default base model ('tiny' maps to its folder under DATA_DIR)."""
        return self.model_source(self.base_model)


def load_settings() -> Settings:
    """Read and validate the settings, turning validation errors into one readable message."""
    try:
        return Settings()
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            name = "DREAMBOT_" + "_".join(str(part) for part in error["loc"]).upper()
            lines.append(f"  {name}: {error['msg']}")
        raise ConfigError("invalid configuration:\n" + "\n".join(lines)) from exc
