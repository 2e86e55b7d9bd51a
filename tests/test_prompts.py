from dataclasses import replace

import pytest

from bot.core.errors import UserError
from bot.core.prompts import SubjectLookup, resolve_prompt
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


def test_v_resolves_to_the_chosen_subject_while_it_is_ready_else_the_newest() -> None:
    chosen = SubjectLookup([REX, MIA], chosen=MIA.id)
    assert resolve_prompt("a [V]", chosen, max_chars=400).text == "a bkt cat"
    assert chosen.pinned("a [V] and [V]") == "a [mia] and [mia]"
    training = replace(MIA, status="training")
    fallback = SubjectLookup([REX, training], chosen=training.id)
    assert resolve_prompt("a [V]", fallback, max_chars=400).text == "a zqv dog"
    assert SubjectLookup([REX], chosen="gone").active == REX  # a deleted choice


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
    with pytest.raises(UserError, match="no subject called `bob`. Your subjects: rex, mia"):
        resolve_prompt("[bob] surfing", [REX, MIA], max_chars=400)


def test_over_long_prompt_is_reported_not_truncated() -> None:
    with pytest.raises(UserError, match="450 characters; the limit is 400"):
        resolve_prompt("x" * 450, [], max_chars=400)


def test_empty_prompt_is_refused() -> None:
    with pytest.raises(UserError, match="what to draw"):
        resolve_prompt("   ", [], max_chars=400)


def _shared(name: str, token: str, user: str, status: str = "ready") -> Subject:
    subject = _subject(name, token, status=status)
    return replace(subject, id=f"{user}-{name}", owner=Owner("p", "w", user))


def test_a_shared_subject_resolves_by_name_and_by_token() -> None:
    luna = _shared("luna", "pfx", "bob")
    lookup = SubjectLookup([REX], [luna])
    assert resolve_prompt("[luna] and [PFX]", lookup, max_chars=400).subjects == [luna]
    assert resolve_prompt("[luna] with [rex]", lookup, max_chars=400).text == (
        "pfx dog with zqv dog"
    )


def test_the_callers_own_name_wins_over_a_shared_subject_of_that_name() -> None:
    theirs = _shared("rex", "pfx", "bob")
    lookup = SubjectLookup([REX], [theirs])
    assert resolve_prompt("[rex]", lookup, max_chars=400).subjects == [REX]
    assert lookup.reference(theirs) == "[pfx]"
    assert lookup.reference(REX) == "[rex]"


def test_two_shared_subjects_of_one_name_ask_for_the_token() -> None:
    lookup = SubjectLookup(
        [], [_shared("luna", "pfx", "bob"), _shared("luna", "gmx", "amy")], mention="@{}".format
    )
    with pytest.raises(UserError, match=r"2 subjects shared with you are called luna: \[pfx\] "):
        resolve_prompt("[luna] asleep", lookup, max_chars=400)
    assert resolve_prompt("[gmx] asleep", lookup, max_chars=400).text == "gmx dog asleep"


def test_v_never_means_a_shared_subject() -> None:
    with pytest.raises(UserError, match="you have none yet"):
        resolve_prompt("[V]", SubjectLookup([], [_shared("luna", "pfx", "bob")]), max_chars=400)


def test_pinned_prompts_keep_meaning_the_same_subjects() -> None:
    lookup = SubjectLookup([REX, MIA], [_shared("luna", "pfx", "bob")])
    assert lookup.pinned("[V] and [luna] and [mia] and [nobody]") == (
        "[rex] and [pfx] and [mia] and [nobody]"
    )
