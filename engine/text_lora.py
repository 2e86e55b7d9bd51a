"""LoRA on the text encoders: adding it for training, and hot-swapping adapters that carry it.

transformers 5 refuses ``PreTrainedModel.add_adapter`` unless peft is at least 0.22 (not
released yet), so training adds the text encoders' LoRA layers with peft directly, registered
as ``add_adapter`` would register them. Loading needs no such help: diffusers'
``load_lora_weights`` puts an adapter's ``text_encoder.`` / ``text_encoder_2.`` weights into the
text encoders itself, and its ``set_adapters``, ``disable_lora`` and ``delete_adapters`` cover
them. Only hot-swapping does not (diffusers refuses to hot-swap text encoders):
:func:`load_lora_file` hot-swaps the UNet part and replaces the text-encoder part, which is
never compiled, so replacing it costs no recompilation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import safetensors
import torch
from diffusers.utils.peft_utils import delete_adapter_layers
from peft import LoraConfig, inject_adapter_in_model

TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2")
"""The pipeline attributes of the text encoders (SDXL has both), which are also the key
prefixes (plus ".") of their LoRA weights in an adapter file, as diffusers saves them."""

ADAPTER_METADATA_KEY = "lora_adapter_metadata"
"""safetensors metadata key under which diffusers stores the LoraConfigs (rank, alpha...)."""


def add_text_encoder_lora(
    encoder: torch.nn.Module, config: LoraConfig, adapter_name: str = "default"
) -> None:
    """Give ``encoder`` (a CLIP text model) LoRA layers ``adapter_name`` described by
    ``config``, registered in its ``peft_config`` as transformers' ``add_adapter`` would."""
    configs = dict(getattr(encoder, "peft_config", None) or {})
    if adapter_name in configs:
        raise ValueError(f"adapter {adapter_name!r} is already in the text encoder")
    inject_adapter_in_model(config, encoder, adapter_name=adapter_name)
    configs[adapter_name] = config
    # What transformers' add_adapter records, so diffusers' adapter helpers find the adapter.
    setattr(encoder, "peft_config", configs)  # noqa: B010 (nn.Module's typed __setattr__)
    setattr(encoder, "_hf_peft_config_loaded", True)  # noqa: B010


def remove_text_encoder_lora(encoder: torch.nn.Module, adapter_name: str) -> None:
    """Delete LoRA ``adapter_name`` from ``encoder`` if it has one by that name."""
    if adapter_name in (getattr(encoder, "peft_config", None) or {}):
        # Also drops its peft_config entry (diffusers' delete_adapters does the same).
        delete_adapter_layers(encoder, adapter_name)  # type: ignore[no-untyped-call]


def load_lora_file(pipe: Any, path: Path, adapter_name: str, *, hotswap: bool = False) -> None:
    """``pipe.load_lora_weights(path.parent, weight_name=path.name, adapter_name=adapter_name,
    hotswap=hotswap)``, also when hot-swapping an adapter with text-encoder weights.

    With ``hotswap`` the UNet's slot ``adapter_name`` gets the new weights in place and the text
    encoders' adapter of that name is replaced by the file's (or removed, when the file has
    none: the slot's previous subject may have had one).
    """
    encoders = [e for n in TEXT_ENCODER_NAMES if (e := getattr(pipe, n, None)) is not None]
    if not hotswap:
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter_name)
        return
    for encoder in encoders:
        remove_text_encoder_lora(encoder, adapter_name)
    with safetensors.safe_open(str(path), framework="pt") as handle:
        text_prefixes = tuple(f"{name}." for name in TEXT_ENCODER_NAMES)
        has_text = any(key.startswith(text_prefixes) for key in handle.keys())
    if not has_text:
        pipe.load_lora_weights(
            str(path.parent), weight_name=path.name, adapter_name=adapter_name, hotswap=True
        )
        return
    state_dict, _, metadata = pipe.lora_state_dict(
        str(path.parent), weight_name=path.name, return_lora_metadata=True
    )
    pipe.load_lora_into_unet(
        state_dict,
        network_alphas=None,
        unet=pipe.unet,
        adapter_name=adapter_name,
        _pipeline=pipe,
        hotswap=True,
        metadata=metadata,
    )
    for name in TEXT_ENCODER_NAMES:
        if getattr(pipe, name, None) is not None:
            pipe.load_lora_into_text_encoder(
                state_dict,
                network_alphas=None,
                text_encoder=getattr(pipe, name),
                prefix=name,
                adapter_name=adapter_name,
                _pipeline=pipe,
                metadata=metadata,
            )
