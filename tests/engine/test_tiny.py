"""The tiny offline model: builds, loads fast, and runs the real pipeline end to end."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from engine.generation import Generator
from engine.models import ModelLoadError, load_pipeline
from engine.tiny import build_tiny_model

pytestmark = pytest.mark.model


def test_tiny_model_is_a_diffusers_folder(tiny_model_dir: Path) -> None:
    names = {p.name for p in tiny_model_dir.iterdir()}
    assert {"model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= names


def test_building_twice_leaves_the_model_as_it_was(tiny_model_dir: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in tiny_model_dir.rglob("*")}
    assert build_tiny_model(tiny_model_dir) == tiny_model_dir
    assert {p: p.stat().st_mtime_ns for p in tiny_model_dir.rglob("*")} == before
    assert [p.name for p in tiny_model_dir.parent.iterdir()] == [tiny_model_dir.name]


def test_tiny_model_loads_quickly_and_generates_64px(tiny_model_dir: Path) -> None:
    started = time.perf_counter()
    pipe = load_pipeline(tiny_model_dir)
    assert time.perf_counter() - started < 2.0
    assert pipe.tokenizer.model_max_length == 77

    images = Generator(pipe).generate("a photo of a dog", count=1, seed=0, steps=4)

    assert [im.size for im in images] == [(64, 64)]


def test_tokenizer_reads_any_text_byte_by_byte(tiny_model_dir: Path) -> None:
    tokenizer = load_pipeline(tiny_model_dir).tokenizer
    ids = tokenizer("zqv dog, ünïcode!").input_ids
    assert tokenizer.unk_token_id not in ids[1:-1]
    # CLIP decoding puts a space at every word end ("</w>"), punctuation included.
    assert tokenizer.decode(ids, skip_special_tokens=True) == "zqv dog , ünïcode !"


def test_missing_model_raises_error_naming_the_path(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="nowhere"):
        load_pipeline(tmp_path / "nowhere")


def test_folder_without_model_raises_model_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=str(tmp_path)):
        load_pipeline(tmp_path)
