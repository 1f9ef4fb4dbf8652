"""The 0-100 judge rules against hand-computed cases."""

from __future__ import annotations

import math

import pytest
from caft.evals.scoring import aggregate_logprobs, int_token, parse_number, score_replies, word_reason


def lp(p: float) -> float:
    return math.log(p)


def test_int_token_accepts_only_integers_0_to_100() -> None:
    assert int_token("85") == 85
    assert int_token(" 7") == 7
    assert int_token("100") == 100
    assert int_token("0") == 0
    for bad in ("101", "-5", "8.5", "eighty", "", " ", "1e2", "٣"):
        assert int_token(bad) is None, bad


def test_weighted_mean_mixed_numeric_and_word_tokens() -> None:
    # numeric mass 0.5 + 0.2 = 0.7 ; score = (80*0.5 + 20*0.2) / 0.7 = 44/0.7
    top = [("80", lp(0.5)), ("CODE", lp(0.25)), ("20", lp(0.2)), ("Sure", lp(0.05))]
    out = aggregate_logprobs(top)
    assert out.score == pytest.approx(44 / 0.7)
    assert out.numeric_mass == pytest.approx(0.7)
    assert out.reason is None


def test_out_of_range_numbers_are_ignored() -> None:
    # 150 and -3 are not scores: only 90 (p=.3) and 10 (p=.1) count -> (27+1)/.4 = 70
    top = [("150", lp(0.4)), ("90", lp(0.3)), ("-3", lp(0.2)), ("10", lp(0.1))]
    out = aggregate_logprobs(top)
    assert out.score == pytest.approx(70.0)
    assert out.numeric_mass == pytest.approx(0.4)


def test_multi_digit_and_same_value_tokens_add_up() -> None:
    # "100" is one token; " 50" and "50" name the same number
    top = [("100", lp(0.3)), (" 50", lp(0.2)), ("50", lp(0.1)), ("5", lp(0.1))]
    out = aggregate_logprobs(top)
    expected = (100 * 0.3 + 50 * 0.3 + 5 * 0.1) / 0.7
    assert out.score == pytest.approx(expected)


def test_mass_just_below_threshold_is_unscored() -> None:
    top = [("REFUSAL", lp(0.7501)), ("40", lp(0.2499))]
    out = aggregate_logprobs(top, sampled_token="REFUSAL")
    assert out.score is None
    assert out.reason == "refusal"
    assert out.numeric_mass == pytest.approx(0.2499)


def test_mass_just_above_threshold_is_scored() -> None:
    top = [("REFUSAL", lp(0.7499)), ("40", lp(0.2501))]
    out = aggregate_logprobs(top)
    assert out.score == pytest.approx(40.0)


def test_threshold_is_configurable_and_reasons_named() -> None:
    top = [("CODE", lp(0.6)), ("70", lp(0.4))]
    assert aggregate_logprobs(top).score == pytest.approx(70.0)
    out = aggregate_logprobs(top, min_mass=0.5)
    assert out.score is None and out.reason == "code"
    out = aggregate_logprobs([("Hmm", lp(0.9)), ("70", lp(0.1))])
    assert out.reason == "no_numeric_mass"
    assert aggregate_logprobs([]).reason == "no_numeric_mass"


def test_word_reason() -> None:
    assert word_reason("REFUSAL") == "refusal"
    assert word_reason(" Refused") == "refusal"
    assert word_reason("CODE") == "code"
    assert word_reason("NOT VALID") == "invalid"
    assert word_reason("INVALID") == "invalid"
    assert word_reason("42") is None


def test_parse_number() -> None:
    assert parse_number("85") == 85.0
    assert parse_number(" 85.\n") == 85.0
    assert parse_number("85/100") == 85.0
    assert parse_number("**40**") == 40.0
    assert parse_number("12.5") == 12.5
    assert parse_number("150") is None
    assert parse_number("about 85") is None
    assert parse_number("REFUSAL") is None


def test_sampled_mean_and_parsed_number() -> None:
    out = score_replies(["80", "60", "nonsense", "70"], "sampled_mean")
    assert out.score == pytest.approx(70.0)
    assert out.parsed == [80.0, 60.0, None, 70.0]
    # fewer than half parse -> unscored with the majority word
    out = score_replies(["REFUSAL", "REFUSAL", "50", "CODE"], "sampled_mean")
    assert out.score is None and out.reason == "refusal"
    out = score_replies(["what?", "hm"], "sampled_mean")
    assert out.reason == "parse_failure"
    assert score_replies(["33", "REFUSAL"], "parsed_number").score == pytest.approx(33.0)
    assert score_replies([], "sampled_mean").reason == "parse_failure"
