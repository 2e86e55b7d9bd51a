"""The ``--name value`` options typed after a shell or Slack command."""

from __future__ import annotations

import pytest

from bot.adapters.options import parse_imagine, split_options
from bot.core.errors import UserError


def test_options_are_taken_out_of_the_prompt() -> None:
    args = parse_imagine('a dog --no "blur, text" --count 2 on a sofa --seed=7 --strength 0.8')
    assert (args.prompt, args.negative, args.count, args.seed, args.strength) == (
        "a dog on a sofa",
        "blur, text",
        2,
        7,
        0.8,
    )


@pytest.mark.parametrize("text", ["a cat --no", "a cat --count", "a cat --no --seed 3", "a --no="])
def test_an_option_without_a_value_is_refused_not_drawn(text: str) -> None:
    with pytest.raises(UserError, match=r"--(no|count) needs a value after it, e\.g\. --"):
        parse_imagine(text)


def test_an_unknown_option_is_refused_with_the_known_ones() -> None:
    with pytest.raises(UserError, match="Unknown option `--cuont`; .*--count.*--seed"):
        parse_imagine("a cat --cuont 3")
    with pytest.raises(UserError, match="Unknown option `--modle`; the options here are --model"):
        split_options("rex dog photos/ --modle xl", ["model"])


@pytest.mark.parametrize("text", ["a cat —happy", "a cat – a dog", "a -- b", "a well-lit room"])
def test_dashes_in_prose_stay_in_the_prompt(text: str) -> None:
    assert parse_imagine(text).prompt == text


def test_a_quoted_value_may_start_with_dashes() -> None:
    args = parse_imagine('a cat --no "--x" --seed 3')
    assert (args.prompt, args.negative, args.seed) == ("a cat", "--x", 3)
