import pytest

from bot.core.errors import UserError
from bot.core.prompts import resolve_prompt
from bot.core.store import Owner, Subject


def _subject(name: str, token: str, status: str = "ready", noun: str = "dog") -> Subject:
    return Subject(
        id=name,
        owner=Owner("p", "w", "u"),
        name=name,
        class_noun=noun,
        token=token,
        status=status,
        adapter_url=f"file:///a/{name}",
        photos_url="file:///p",
        photo_count=3,
        base_model="tiny",
        error=None,
        created_at="t",
        updated_at="t",
    )


REX, MIA = _subject("rex", "zqv"), _subject("mia", "bkt", noun="cat")


def test_v_resolves_to_the_newest_ready_subject() -> None:
    resolved = resolve_prompt("a [V] dog wearing a hat", [REX, MIA], max_chars=400)
    assert resolved.text == "a zqv dog wearing a hat"
    assert resolved.subjects == [REX]


def test_class_noun_is_added_when_the_prompt_omits_it() -> None:
    assert resolve_prompt("[V] on the beach", [REX], max_chars=400).text == "zqv dog on the beach"


def test_named_subjects_resolve_case_insensitively() -> None:
    resolved = resolve_prompt("[Rex] and [mia] on a sofa", [REX, MIA], max_chars=400)
    assert resolved.text == "zqv dog and bkt cat on a sofa"
    assert resolved.subjects == [REX, MIA]


def test_v_without_any_subject_explains_how_to_train() -> None:
    with pytest.raises(UserError, match="you have none yet.*/train"):
        resolve_prompt("a [V] dog", [], max_chars=400)


def test_v_while_the_only_subject_trains_says_so() -> None:
    with pytest.raises(UserError, match="rex is still training"):
        resolve_prompt("a [V] dog", [_subject("rex", "zqv", status="training")], max_chars=400)


def test_unknown_name_lists_the_callers_subjects() -> None:
    with pytest.raises(UserError, match="no subject called 'bob'. Your subjects: rex, mia"):
        resolve_prompt("[bob] surfing", [REX, MIA], max_chars=400)


def test_over_long_prompt_is_reported_not_truncated() -> None:
    with pytest.raises(UserError, match="450 characters; the limit is 400"):
        resolve_prompt("x" * 450, [], max_chars=400)


def test_empty_prompt_is_refused() -> None:
    with pytest.raises(UserError, match="what to draw"):
        resolve_prompt("   ", [], max_chars=400)
