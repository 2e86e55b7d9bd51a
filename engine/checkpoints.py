"""Resumable training: checkpoints in the artifact store, and recognising a finished adapter.

A training job may run more than once: arq runs it again when an engine dies mid-job (see the
lease in ``engine.worker``). Each run names what it trains by a *fingerprint* of everything that
decides the result (base model, photos, token, class, recipe). A checkpoint carries the
fingerprint of the run that wrote it, so a retry resumes only its own run; a finished adapter
carries it in its metadata, so a retry after the adapter was written trains nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from engine.artifacts import ArtifactStore
from engine.training import TrainState

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
"""Bumped when the layout of a checkpoint file changes; older files are then ignored."""


def fingerprint(photos: Sequence[bytes], recipe: Mapping[str, object]) -> str:
    """A stable hash of the photos (in order) and the recipe (any JSON-able mapping)."""
    digest = hashlib.sha256()
    for photo in photos:
        digest.update(hashlib.sha256(photo).digest())
    digest.update(json.dumps(recipe, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def save_checkpoint(artifacts: ArtifactStore, url: str, key: str, state: TrainState) -> None:
    """Write ``state`` at ``url``, tagged with the run's fingerprint ``key``.

    The artifact store replaces the file atomically, so a crash while writing leaves the
    previous checkpoint readable.
    """
    artifacts.put_bytes(url, checkpoint_bytes(key, state))


def checkpoint_bytes(key: str, state: TrainState) -> bytes:
    """The checkpoint file of ``state``, tagged with the run's fingerprint ``key`` (what
    :func:`save_checkpoint` writes; :func:`load_checkpoint` reads it)."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "fingerprint": key,
        "step": state.step,
        "trainable": state.trainable,
        "optimizer": state.optimizer,
        "rng": state.rng,
        "grad_scaler": state.grad_scaler,
        "instance_losses": state.instance_losses,
        "prior_losses": state.prior_losses,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def load_checkpoint(artifacts: ArtifactStore, url: str, key: str) -> TrainState | None:
    """The state saved at ``url`` by the run with fingerprint ``key``, or None when there is
    none, it belongs to another run, or it cannot be read (then training starts over)."""
    if not artifacts.exists(url):
        return None
    try:
        # weights_only: a checkpoint is data (tensors, numbers, lists), never code to run.
        payload: dict[str, Any] = torch.load(
            io.BytesIO(artifacts.get_bytes(url)), map_location="cpu", weights_only=True
        )
        if payload.get("format") != CHECKPOINT_FORMAT or payload.get("fingerprint") != key:
            log.info("ignoring checkpoint %s: written by another training run", url)
            return None
        return TrainState(
            step=int(payload["step"]),
            trainable=dict(payload["trainable"]),
            optimizer=dict(payload["optimizer"]),
            rng=payload["rng"],
            grad_scaler=dict(payload["grad_scaler"]),
            instance_losses=[float(x) for x in payload["instance_losses"]],
            prior_losses=[float(x) for x in payload["prior_losses"]],
        )
    except Exception as exc:  # a damaged file must not fail the job: train from scratch
        log.warning("ignoring unreadable checkpoint %s: %s", url, exc)
        return None


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` block of a ``.safetensors`` file's header ({} if it has none).

    Raises ValueError when ``data`` is not a whole safetensors file.
    """
    if len(data) < 8:
        raise ValueError("too short for a safetensors file")
    (length,) = struct.unpack("<Q", data[:8])
    if 8 + length > len(data):
        raise ValueError("safetensors header runs past the end of the file")
    header = json.loads(data[8 : 8 + length])
    tensors = [v for k, v in header.items() if k != "__metadata__"]
    end = max((int(t["data_offsets"][1]) for t in tensors), default=0)
    if 8 + length + end != len(data):
        raise ValueError("safetensors file is truncated or has trailing bytes")
    metadata: dict[str, str] = header.get("__metadata__") or {}
    return metadata


def finished_adapter(artifacts: ArtifactStore, url: str, key: str) -> bool:
    """Whether a complete adapter written by the run with fingerprint ``key`` is at ``url``."""
    if not artifacts.exists(url):
        return False
    try:
        metadata = safetensors_metadata(artifacts.get_bytes(url))
    except (ValueError, OSError) as exc:
        log.warning("adapter %s is unreadable, training again: %s", url, exc)
        return False
    return metadata.get("fingerprint") == key
