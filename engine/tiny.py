"""Tiny random Stable Diffusion models (SD 1.x-, SD 2.x- and SDXL-shaped), built offline.

No machine here can download weights, so tests and the default demo use these models instead.
Each is saved as an ordinary diffusers folder and loaded by the same code as a real base model:
it draws noise, but every line of the real pipeline runs. :func:`save_single_file` writes one
as a single checkpoint in the original (LDM) layout that model sites distribute, so the
single-file loading path is tested too.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import safetensors.torch
import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from engine.families import detect_family

MODEL_MAX_LENGTH = 77
"""Token length the tokenizer pads/truncates to, as in real SD 1.x models."""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable unicode table, which CLIP's byte-level BPE vocabulary uses."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


TINY_WORDS = ("sun", "hat", "xjk", "vbq", "pqz", "kzx", "wzj", "qjx", "zwx", "bfq", "gvk", "jqd")
"""Whole words the tiny tokenizer reads as one token (BPE merges at the end of its vocabulary,
as a real CLIP vocabulary's rare words are): two common words and ten rare, vowel-less ones,
so the engine's rare-token lookup (``engine.rare_tokens``) has something to find and reject.
None is a token or class noun the tests train with, so their prompts tokenize byte by byte."""


def byte_level_tokens() -> list[str]:
    """Where a CLIP byte-level BPE vocabulary starts: each byte's character, then the same
    with ``</w>`` (whole-word end)."""
    chars = list(_bytes_to_unicode().values())
    return chars + [c + "</w>" for c in chars]


def add_whole_word_merges(vocab: dict[str, int], merges: list[str], words: Iterable[str]) -> None:
    """Append to ``vocab`` and ``merges`` what makes each three-letter word of ``words`` one
    whole-word token ("xjk": "x j" → "xj", then "xj k</w>" → "xjk</w>"), after all that is
    there already; pieces already in ``vocab`` are not added again."""
    for word in words:
        for merge, merged in (
            (f"{word[0]} {word[1]}", word[:2]),
            (f"{word[:2]} {word[2]}</w>", f"{word}</w>"),
        ):
            if merged not in vocab:
                merges.append(merge)
                vocab[merged] = len(vocab)


def write_bpe_files(folder: Path, vocab: Mapping[str, int], merges: Iterable[str]) -> None:
    """Write ``vocab.json`` and ``merges.txt``, the files ``CLIPTokenizer`` loads."""
    (folder / "vocab.json").write_text(json.dumps(dict(vocab)), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8"
    )


def _write_tokenizer_files(folder: Path) -> None:
    """Write a byte-level vocab (each byte char, its ``</w>`` form, the two specials), then
    the merges that make each of :data:`TINY_WORDS` one token; other text tokenizes into
    single bytes (or the few merged pairs)."""
    tokens = [*byte_level_tokens(), "<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges: list[str] = []
    add_whole_word_merges(vocab, merges, TINY_WORDS)
    write_bpe_files(folder, vocab, merges)


def _tokenizer(scratch: Path) -> CLIPTokenizer:
    # transformers 5's CLIPTokenizer takes in-memory vocab/merges in __init__; from_pretrained
    # is the stable way to build it from vocab.json + merges.txt across versions.
    _write_tokenizer_files(scratch)
    return CLIPTokenizer.from_pretrained(str(scratch), model_max_length=MODEL_MAX_LENGTH)


_BYTE_VOCAB_SIZE = 2 * 256 + 2
"""The byte-level part of the tiny vocabulary: each byte, its word-final form, two specials."""


def _add_word_rows(tokenizer: CLIPTokenizer, *encoders: CLIPTextModel) -> None:
    """Give the text encoders embedding rows for :data:`TINY_WORDS`' merged tokens. Done
    after every module is built, so the models' other random weights do not depend on how
    many words the vocabulary learned."""
    for encoder in encoders:
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)


def _text_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-5,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=_BYTE_VOCAB_SIZE,  # the learned words' rows come last: _add_word_rows
        max_position_embeddings=MODEL_MAX_LENGTH,
        projection_dim=32,
    )


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
    )


def _scheduler() -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )


_UNET_SHAPE: dict[str, object] = {
    "block_out_channels": (32, 64),
    "layers_per_block": 2,
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "norm_num_groups": 32,
}


def _build_pipeline(scratch: Path, seed: int) -> StableDiffusionPipeline:
    """Assemble the random SD 1.x-shaped pipeline; ``scratch`` holds the tokenizer's files."""
    torch.manual_seed(seed)  # the random weights are the model: make them reproducible
    tokenizer = _tokenizer(scratch)
    unet = UNet2DConditionModel(**_UNET_SHAPE, cross_attention_dim=32)  # type: ignore[arg-type]
    return _sd_pipeline(tokenizer, unet, _text_config(tokenizer), _scheduler())


def _safety_checker() -> tuple[StableDiffusionSafetyChecker, CLIPImageProcessor]:
    """A tiny random safety checker (a 2-layer CLIP vision model at 32 px) and its
    preprocessor, as real SD 1.x/2.x folders ship them in ``safety_checker/`` and
    ``feature_extractor/``, so the engine runs the real checking path (``engine.safety``).

    It flags nothing: the checker flags an image when, for some concept, the cosine
    similarity of the image's embedding with the concept's embedding minus the concept's
    weight (plus 0.01 once a "special care" concept matched), rounded to 3 decimals, is above
    0. A cosine is at most 1 and every weight here is 1, so no special-care score is above 0,
    no 0.01 is added, and no concept score is above 0 either. Tests set other weights.
    """
    vision = {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "image_size": 32,
        "patch_size": 8,
    }
    # The checker builds no text model, but its config needs a text part: a minimal one.
    text = {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_attention_heads": 4,
        "num_hidden_layers": 1,
        "vocab_size": 16,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
    }
    checker = StableDiffusionSafetyChecker(
        CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)
    )
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(1.0)
        checker.special_care_embeds_weights.fill_(1.0)
    processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    return checker, processor


def _sd_pipeline(
    tokenizer: CLIPTokenizer,
    unet: UNet2DConditionModel,
    text_config: CLIPTextConfig,
    scheduler: DDPMScheduler,
) -> StableDiffusionPipeline:
    """The rest of an SD 1.x/2.x-shaped pipeline around ``unet``: the VAE, then the text
    encoder, then the safety checker (in that order: the random weights depend on it; the
    checker was added last, so the other modules' weights stayed as they were)."""
    vae = _vae()
    text_encoder = CLIPTextModel(text_config)
    _add_word_rows(tokenizer, text_encoder)
    safety_checker, feature_extractor = _safety_checker()
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=safety_checker,
        feature_extractor=feature_extractor,
    )


def _build_sd2_pipeline(scratch: Path, seed: int, v_prediction: bool) -> StableDiffusionPipeline:
    """Assemble the random SD 2.x-shaped pipeline: SD 1.x's pipeline with a wider text encoder
    (OpenCLIP ViT-H's 1024 in SD 2.x, GELU activations) that the cross attention matches, linear
    projections in the UNet's transformer blocks, and with ``v_prediction`` a scheduler that
    predicts the velocity, as the 768 px "-v" models do (else the noise, as "base" models)."""
    torch.manual_seed(seed)
    tokenizer = _tokenizer(scratch)
    config = _text_config(tokenizer)
    config.hidden_size = 64
    config.hidden_act = "gelu"
    unet = UNet2DConditionModel(
        **_UNET_SHAPE,  # type: ignore[arg-type]
        cross_attention_dim=config.hidden_size,
        use_linear_projection=True,
        attention_head_dim=(2, 4),
    )
    prediction_type = "v_prediction" if v_prediction else "epsilon"
    scheduler = DDPMScheduler.from_config(_scheduler().config, prediction_type=prediction_type)
    return _sd_pipeline(tokenizer, unet, config, scheduler)


SDXL_TIME_EMBED_DIM = 8
"""Width of each of SDXL's six size/crop numbers' embedding in the tiny SDXL UNet."""


def _build_sdxl_pipeline(scratch: Path, seed: int) -> StableDiffusionXLPipeline:
    """Assemble the random SDXL-shaped pipeline: two text encoders (the second with a
    projection whose pooled output conditions the UNet), size/crop ("text_time") conditioning,
    cross-attention over both encoders' features side by side."""
    torch.manual_seed(seed)
    tokenizer = _tokenizer(scratch)
    config = _text_config(tokenizer)
    text_encoder = CLIPTextModel(config)
    # Wider than the first, as in SDXL (768 and 1280): single-file loading tells the two
    # encoders apart by their width.
    config_2 = _text_config(tokenizer)
    config_2.hidden_size = 64
    text_encoder_2 = CLIPTextModelWithProjection(config_2)
    unet = UNet2DConditionModel(
        **_UNET_SHAPE,  # type: ignore[arg-type]
        cross_attention_dim=config.hidden_size + config_2.hidden_size,
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
        # Six numbers (original size, crop top-left, target size) plus the pooled text.
        projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED_DIM + config_2.projection_dim,
        use_linear_projection=True,
        attention_head_dim=(2, 4),
    )
    vae = _vae()
    _add_word_rows(tokenizer, text_encoder, text_encoder_2)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=_scheduler(),
        add_watermarker=False,
    )


def build_tiny_model(path: Path, *, seed: int = 0) -> Path:
    """Build the tiny random SD 1.x-shaped model into ``path`` (a diffusers folder).

    Idempotent: a folder that already has ``model_index.json`` is left as it is. The model is
    built in a temporary folder beside ``path`` and renamed into place, so a half-built folder
    never looks finished (and two builders racing leave one complete model).
    """
    return _build_into(Path(path), lambda scratch: _build_pipeline(scratch, seed))


def build_tiny_named(name: str, path: Path) -> Path:
    """Build the tiny model called ``name`` in the configuration (``tiny``, ``tiny-sd2``,
    ``tiny-sdxl``, the keys of ``bot.config.TINY_MODEL_FOLDERS``) into ``path``."""
    builders: dict[str, Callable[[Path], Path]] = {
        "tiny": build_tiny_model,
        "tiny-sd2": build_tiny_sd2_model,
        "tiny-sdxl": build_tiny_sdxl_model,
    }
    return builders[name](path)


def build_tiny_sdxl_model(path: Path, *, seed: int = 0) -> Path:
    """Build the tiny random SDXL-shaped model into ``path``, like :func:`build_tiny_model`."""
    return _build_into(Path(path), lambda scratch: _build_sdxl_pipeline(scratch, seed))


def build_tiny_sd2_model(path: Path, *, seed: int = 0, v_prediction: bool = True) -> Path:
    """Build the tiny random SD 2.x-shaped model into ``path``, like :func:`build_tiny_model`;
    its scheduler predicts the velocity (``v_prediction``) unless told otherwise."""
    return _build_into(Path(path), lambda scratch: _build_sd2_pipeline(scratch, seed, v_prediction))


def _name_processor_portably(folder: Path) -> None:
    """Record the feature extractor in ``model_index.json`` as ``CLIPImageProcessor``, as real
    SD folders do. Without torchvision, transformers 5 builds the PIL variant and records
    ``CLIPImageProcessorPil``, a class transformers 4 lacks; ``CLIPImageProcessor`` loads on
    both (on 5 without torchvision it falls back to the PIL variant)."""
    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text())
    if index.get("feature_extractor", [None])[0] == "transformers":
        index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
        index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _build_into(path: Path, build: Callable[[Path], DiffusionPipeline]) -> Path:
    if (path / "model_index.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        with tempfile.TemporaryDirectory() as scratch:
            pipe = build(Path(scratch))
            pipe.save_pretrained(staging, safe_serialization=True)
            _name_processor_portably(staging)
        try:
            os.rename(staging, path)
        except OSError:
            # Someone else finished first (or an empty folder is in the way): keep a finished
            # model, replace an unfinished one.
            if (path / "model_index.json").exists():
                return path
            shutil.rmtree(path, ignore_errors=True)
            os.rename(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


# Single-file checkpoints in the original (LDM / CompVis / SGM) layout. diffusers ships only
# the other direction (``diffusers.loaders.single_file_utils``); this is the inverse of its
# mapping for the blocks SD-style UNets and VAEs are made of, checked by a round trip in the
# tests.

_UNET_RESNET = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _unet_prefix_map(unet: UNet2DConditionModel) -> list[tuple[str, str]]:
    """(diffusers prefix, LDM prefix) for every block of an SD-style UNet."""
    per_block = int(unet.config.layers_per_block)
    pairs: list[tuple[str, str]] = []
    for b, block in enumerate(unet.down_blocks):
        for j in range(per_block):
            index = 1 + b * (per_block + 1) + j
            pairs.append((f"down_blocks.{b}.resnets.{j}.", f"input_blocks.{index}.0."))
            if getattr(block, "attentions", None):
                pairs.append((f"down_blocks.{b}.attentions.{j}.", f"input_blocks.{index}.1."))
        if block.downsamplers:
            index = 1 + b * (per_block + 1) + per_block
            pairs.append((f"down_blocks.{b}.downsamplers.0.conv.", f"input_blocks.{index}.0.op."))
    pairs.append(("mid_block.resnets.0.", "middle_block.0."))
    pairs.append(("mid_block.attentions.0.", "middle_block.1."))
    pairs.append(("mid_block.resnets.1.", "middle_block.2."))
    for b, block in enumerate(unet.up_blocks):
        has_attention = bool(getattr(block, "attentions", None))
        for j in range(per_block + 1):
            index = b * (per_block + 1) + j
            pairs.append((f"up_blocks.{b}.resnets.{j}.", f"output_blocks.{index}.0."))
            if has_attention:
                pairs.append((f"up_blocks.{b}.attentions.{j}.", f"output_blocks.{index}.1."))
        if block.upsamplers:
            index = b * (per_block + 1) + per_block
            slot = 2 if has_attention else 1
            pairs.append((f"up_blocks.{b}.upsamplers.0.", f"output_blocks.{index}.{slot}."))
    return pairs


def _unet_to_ldm(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    pairs = _unet_prefix_map(unet)
    out: dict[str, torch.Tensor] = {}
    for key, value in unet.state_dict().items():
        module, _, leaf = key.rpartition(".")
        if module in _UNET_TOP:
            out[f"{_UNET_TOP[module]}.{leaf}"] = value
            continue
        for new, old in pairs:
            if key.startswith(new):
                rest = key[len(new) :]
                if ".resnets." in new:
                    for diffusers_name, ldm_name in _UNET_RESNET:
                        rest = rest.replace(diffusers_name, ldm_name)
                out[old + rest] = value
                break
        else:
            raise ValueError(f"no original-layout name for UNet weight {key}")
    return {"model.diffusion_model." + key: value for key, value in out.items()}


def _vae_to_ldm(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    blocks = len(vae.config.block_out_channels)
    pairs = [
        ("encoder.conv_norm_out.", "encoder.norm_out."),
        ("decoder.conv_norm_out.", "decoder.norm_out."),
    ]
    for part in ("encoder", "decoder"):
        pairs += [
            (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1."),
            (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2."),
            (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1."),
        ]
    for i in range(blocks):
        pairs.append((f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block."))
        pairs.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."))
        # The decoder's blocks are numbered from the bottom in the original layout.
        pairs.append((f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{blocks - 1 - i}.block."))
        pairs.append(
            (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{blocks - 1 - i}.upsample.")
        )
    attention = {
        "group_norm.": "norm.",
        "to_q.": "q.",
        "to_k.": "k.",
        "to_v.": "v.",
        "to_out.0.": "proj_out.",
    }
    out: dict[str, torch.Tensor] = {}
    for key, value in vae.state_dict().items():
        for new, old in pairs:
            if key.startswith(new):
                rest = key[len(new) :].replace("conv_shortcut", "nin_shortcut")
                if new.endswith("attentions.0."):
                    for diffusers_name, ldm_name in attention.items():
                        rest = rest.replace(diffusers_name, ldm_name)
                    if value.ndim == 2:  # 1x1 convolutions in the original
                        value = value[:, :, None, None]
                key = old + rest
                break
        out["first_stage_model." + key] = value
    return out


def _clip_to_ldm(encoder: CLIPTextModel, prefix: str) -> dict[str, torch.Tensor]:
    # transformers >= 5.6 flattened CLIPTextModel; the original layout keeps "text_model.".
    return {
        prefix + (key if key.startswith("text_model.") else "text_model." + key): value
        for key, value in encoder.state_dict().items()
    }


def _open_clip_to_ldm(
    encoder: CLIPTextModel | CLIPTextModelWithProjection, prefix: str
) -> dict[str, torch.Tensor]:
    # SD 2.x's encoder is a (flattened, in transformers >= 5.6) CLIPTextModel without the
    # projection, which diffusers ignores in SD 2.x checkpoints; SDXL's second one has it.
    state = {
        key if key.startswith(("text_model.", "text_projection.")) else "text_model." + key: value
        for key, value in encoder.state_dict().items()
    }
    out = {
        "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
        "token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
        "ln_final.weight": state["text_model.final_layer_norm.weight"],
        "ln_final.bias": state["text_model.final_layer_norm.bias"],
    }
    if "text_projection.weight" in state:
        out["text_projection"] = state["text_projection.weight"].T.contiguous()
    names = {
        "self_attn.out_proj": "attn.out_proj",
        "layer_norm1": "ln_1",
        "layer_norm2": "ln_2",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
    }
    for i in range(encoder.config.num_hidden_layers):
        layer = f"text_model.encoder.layers.{i}."
        block = f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{block}attn.in_proj_{kind}"] = torch.cat(
                [state[f"{layer}self_attn.{p}_proj.{kind}"] for p in "qkv"]
            )
            for diffusers_name, ldm_name in names.items():
                out[f"{block}{ldm_name}.{kind}"] = state[f"{layer}{diffusers_name}.{kind}"]
    return {prefix + key: value for key, value in out.items()}


def save_single_file(folder: Path, file: Path) -> Path:
    """Write the diffusers model in ``folder`` as one ``.safetensors`` checkpoint in the
    original layout (``model.diffusion_model.*``, ``first_stage_model.*``, and
    ``cond_stage_model.transformer.*``, SD 2.x's ``cond_stage_model.model.*`` or SDXL's
    ``conditioner.embedders.{0,1}.*``).

    Meant for the tiny models (their random weights must be exercised as a real downloaded
    checkpoint would be); it handles SD-style UNets and VAEs of any depth, CLIP, and the
    OpenCLIP layout of SD 2.x's encoder and SDXL's second one. An SD 2.x file holds only the
    encoder layers its diffusers folder has (a real one has one more, which diffusers drops,
    and a text projection it ignores). Returns ``file``.
    """
    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    tensors = _unet_to_ldm(pipe.unet) | _vae_to_ldm(pipe.vae)
    if getattr(pipe, "text_encoder_2", None) is not None:
        tensors |= _clip_to_ldm(pipe.text_encoder, "conditioner.embedders.0.transformer.")
        tensors |= _open_clip_to_ldm(pipe.text_encoder_2, "conditioner.embedders.1.model.")
    elif detect_family(folder).name == "sd2":
        tensors |= _open_clip_to_ldm(pipe.text_encoder, "cond_stage_model.model.")
    else:
        tensors |= _clip_to_ldm(pipe.text_encoder, "cond_stage_model.transformer.")
    file.parent.mkdir(parents=True, exist_ok=True)
    contiguous = {key: value.contiguous() for key, value in tensors.items()}
    safetensors.torch.save_file(contiguous, str(file))
    return file
