"""``dreambot eval``: the DreamBooth paper's CLIP-I, CLIP-T and DINO scores for a subject.

The encoders are tiny random CLIP and ViT models built offline, so the numbers mean nothing;
what is tested is the pipeline: the subject from the store, the prompts, the images drawn with
its adapter, the scores' ranges, the table and the JSON.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from PIL import Image
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizer,
    ViTConfig,
    ViTImageProcessor,
    ViTModel,
)

from bot.cli import main
from bot.core.store import Owner, Store, Subject, utcnow
from engine.evaluation import (
    LIVE_PROMPTS,
    OBJECT_PROMPTS,
    Encoders,
    EvalError,
    eval_prompts,
    paper_prompts,
    read_prompt_file,
    score_images,
)
from engine.tiny import _write_tokenizer_files
from tests.engine.conftest import red_square_photo

if TYPE_CHECKING:
    from tests.engine.conftest import TrainedSubject

pytestmark = pytest.mark.model

SIDE = 32


@pytest.fixture(scope="module")
def encoder_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Tiny random CLIP and DINO-shaped ViT models, saved as local model folders."""
    root = tmp_path_factory.mktemp("eval-encoders")
    clip_dir, dino_dir = root / "clip", root / "dino"
    clip_dir.mkdir()
    _write_tokenizer_files(clip_dir)
    tokenizer = CLIPTokenizer.from_pretrained(str(clip_dir), model_max_length=77)
    torch.manual_seed(0)
    tiny = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4}
    clip = CLIPModel(
        CLIPConfig(
            text_config={
                **tiny,
                "num_hidden_layers": 2,
                "vocab_size": len(tokenizer),
                "max_position_embeddings": 77,
                "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id,
            },
            vision_config={**tiny, "num_hidden_layers": 2, "image_size": SIDE, "patch_size": 8},
            projection_dim=16,
        )
    )
    clip.save_pretrained(clip_dir)
    pixels = {"size": {"shortest_edge": SIDE}, "crop_size": {"height": SIDE, "width": SIDE}}
    CLIPProcessor(
        image_processor=CLIPImageProcessor(**pixels), tokenizer=tokenizer
    ).save_pretrained(clip_dir)
    ViTModel(
        ViTConfig(**tiny, num_hidden_layers=2, image_size=SIDE, patch_size=16),
        add_pooling_layer=False,
    ).save_pretrained(dino_dir)
    ViTImageProcessor(size={"height": SIDE, "width": SIDE}).save_pretrained(dino_dir)
    return clip_dir, dino_dir


@pytest.fixture(scope="module")
def encoders(encoder_dirs: tuple[Path, Path]) -> Encoders:
    return Encoders.load(*encoder_dirs)


def test_the_paper_prompt_lists_have_25_prompts_with_the_subject_once() -> None:
    for templates in (OBJECT_PROMPTS, LIVE_PROMPTS):
        assert len(templates) == len(set(templates)) == 25
        assert all(t.count("{}") == 1 for t in templates)
    assert paper_prompts("golden retriever dog") is LIVE_PROMPTS
    assert paper_prompts("backpack") is OBJECT_PROMPTS
    assert paper_prompts("stuffed animal") is OBJECT_PROMPTS  # the dataset's plushies


def test_clip_t_compares_with_the_prompt_naming_the_class_not_the_rare_token() -> None:
    [prompt] = eval_prompts(["a {} wearing a red hat"], "zqv", "dog")
    assert prompt.prompt == "a zqv dog wearing a red hat"
    assert prompt.text == "a dog wearing a red hat"


def test_a_prompt_file_needs_the_subject_placeholder(tmp_path: Path) -> None:
    good = tmp_path / "good.txt"
    good.write_text("# mine\na {} on the moon\n\na red {}\n")
    assert read_prompt_file(good) == ["a {} on the moon", "a red {}"]
    bad = tmp_path / "bad.txt"
    bad.write_text("a dog on the moon\n")
    with pytest.raises(EvalError, match="bad.txt:1"):
        read_prompt_file(bad)


def test_eval_without_the_bots_database_says_where_it_looked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DREAMBOT_DATA_DIR", str(tmp_path / "data"))
    with pytest.raises(SystemExit, match="no database at .*DREAMBOT_DATABASE_PATH"):
        main(["eval", "rex"])
    assert not (tmp_path / "data").exists()  # nothing created on the way


def test_unset_encoder_paths_are_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EvalError, match="DREAMBOT_EVAL_CLIP_PATH"):
        Encoders.load(None, tmp_path)


def test_identical_images_score_one_and_every_score_is_a_cosine(encoders: Encoders) -> None:
    photos = [red_square_photo(i) for i in range(3)]
    [prompt, other] = eval_prompts(["a {}", "a {} in the snow"], "zqv", "dog")
    scores, means = score_images(
        encoders, photos[:1], [(prompt, photos[:1]), (other, [Image.new("RGB", (40, 40))] * 2)]
    )
    # Generated == real: both image metrics are exactly the self-similarity 1.
    assert scores[0].clip_i == pytest.approx(1.0, abs=1e-5)
    assert scores[0].dino == pytest.approx(1.0, abs=1e-5)
    for value in [*means.values(), *(v for s in scores for v in (s.clip_i, s.clip_t, s.dino))]:
        assert -1.0 - 1e-6 <= value <= 1.0 + 1e-6
    # The overall means weigh every image alike: three images, one of them the real photo.
    assert means["clip_i"] == pytest.approx((scores[0].clip_i + 2 * scores[1].clip_i) / 3)


def test_dreambot_eval_scores_a_stored_subject_and_writes_json(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tiny_model_dir: Path,
    trained_subject: TrainedSubject,
    encoder_dirs: tuple[Path, Path],
) -> None:
    data = tmp_path / "data"
    monkeypatch.chdir(tmp_path)  # no .env
    for name, value in {
        "DATA_DIR": data,
        "BASE_MODEL": tiny_model_dir,
        "DEVICE": "cpu",
        "EVAL_CLIP_PATH": encoder_dirs[0],
        "EVAL_DINO_PATH": encoder_dirs[1],
    }.items():
        monkeypatch.setenv(f"DREAMBOT_{name}", str(value))
    # What /train leaves behind: the photos, the adapter and a ready subject.
    artifacts = data / "artifacts" / "subjects" / "s1"
    (artifacts / "photos").mkdir(parents=True)
    for i in range(3):
        red_square_photo(i).resize((64, 64)).save(artifacts / "photos" / f"{i:02d}.png")
    (artifacts / "adapter.safetensors").write_bytes(trained_subject.adapter.read_bytes())
    asyncio.run(_store_subject(data, artifacts.as_uri(), base_model=str(tiny_model_dir)))
    output = tmp_path / "rex.json"

    args = ["eval", "rex", "--user", "discord:g1:u1", "--limit", "2", "--images-per-prompt", "2"]
    args += ["--steps", "2", "--output", str(output), "--save-images", str(tmp_path / "images")]
    main(args)

    report = json.loads(output.read_text())
    assert [p["prompt"] for p in report["prompts"]] == [
        "a zqv dog in the jungle",
        "a zqv dog in the snow",
    ]
    assert report["prompt_list"] == "DreamBooth live subject"
    assert (report["images_per_prompt"], report["real_photos"]) == (2, 3)
    for key in ("clip_i", "clip_t", "dino"):
        assert -1.0 <= report[key] <= 1.0
    assert len(report["images"]) == 4 and all(Path(p).is_file() for p in report["images"])
    printed = capsys.readouterr().out
    assert "CLIP-I  CLIP-T    DINO" in printed
    assert "a zqv dog in the snow" in printed and "mean" in printed

    # Unknown names say whose subjects were searched.
    with pytest.raises(SystemExit, match="no subject 'max'.*rex"):
        main(["eval", "max", "--user", "discord:g1:u1"])


async def _store_subject(data: Path, folder: str, *, base_model: str) -> None:
    """A ready subject as /train records it, with its files below ``folder``."""
    store = await Store.open(data / "dreambot.sqlite3")
    now = utcnow()
    await store.insert_subject(
        Subject(
            id="f" * 32,
            owner=Owner("discord", "g1", "u1"),
            name="rex",
            class_noun="dog",
            token="zqv",
            status="ready",
            adapter_url=f"{folder}/adapter.safetensors",
            photos_url=f"{folder}/photos",
            photo_count=3,
            base_model=base_model,
            error=None,
            created_at=now,
            updated_at=now,
        )
    )
    await store.close()
