"""Rule-based scorers: correct, wrong and malformed answers, and the data_source dispatch."""
import logging
import random
import signal
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from verl.utils.reward_score import UnknownDataSourceError, default_compute_score, get_scorer, known_data_sources
from verl.utils.reward_score import arithmetic, countdown, gsm8k
from verl.utils.reward_score import math as math_score

# ----------------------------------------------------------------------------------------------------------------------
# gsm8k


@pytest.mark.parametrize("text, strict, flexible", [
    ("3 + 4 = 7 so #### 7", "7", "7"),
    ("#### $1,234.50.", "1234.5", "1234.5"),
    ("####72.00", "72", "72"),
    ("#### -3", "-3", "-3"),
    ("answer is 5. Then 6.", None, "6"),
    ("the list 1,2,3", None, "3"),
    ("12-7", None, "7"),
    ("#### 1,000,000", "1000000", "1000000"),
    ("#### 4 and then 5", "4", "5"),
    ("no number at all", None, None),
    ("", None, None),
])
def test_gsm8k_extraction(text, strict, flexible):
    assert gsm8k.extract_solution(text, "strict") == strict
    assert gsm8k.extract_solution(text, "flexible") == flexible


def test_gsm8k_strict_vs_flexible_scores():
    assert gsm8k.compute_score("We get 18 eggs.\n#### 18", "18") == 1.0
    assert gsm8k.compute_score("We get 18 eggs.\n#### 18", "18.0") == 1.0
    assert gsm8k.compute_score("#### 1,800", "1800") == 1.0
    # no "####": strict finds nothing, flexible takes the last number
    assert gsm8k.compute_score("We get 18 eggs.", "18") == 0.0
    assert gsm8k.compute_score("We get 18 eggs.", "18", method="flexible") == 1.0
    # wrong answer gets format_score, missing answer gets 0
    assert gsm8k.compute_score("#### 17", "18", format_score=0.1) == 0.1
    assert gsm8k.compute_score("nothing", "18", format_score=0.1) == 0.0
    assert gsm8k.compute_score("#### 18", "18", score=2.0) == 2.0
    with pytest.raises(ValueError, match="strict' or 'flexible"):
        gsm8k.compute_score("#### 18", "18", method="fuzzy")


def test_gsm8k_only_the_tail_is_searched():
    long = "#### 18 " + "blah " * 200
    assert gsm8k.compute_score(long, "18") == 0.0
    assert gsm8k.compute_score("x" * 5000 + " #### 18", "18") == 1.0


def test_gsm8k_malformed_inputs_do_not_raise():
    assert gsm8k.compute_score(None, "18") == 0.0
    assert gsm8k.compute_score("#### abc", "18") == 0.0
    assert gsm8k.compute_score("#### .", "18") == 0.0


# ----------------------------------------------------------------------------------------------------------------------
# math


@pytest.mark.parametrize("text, boxed", [
    ("so \\boxed{5}", "5"),
    ("\\boxed{\\frac{1}{2}} is it", "\\frac{1}{2}"),
    ("nested \\boxed{\\frac{\\sqrt{3}}{\\{2\\}}}", "\\frac{\\sqrt{3}}{\\{2\\}}"),
    ("first \\boxed{3} then \\boxed{4}", "4"),
    ("$\\boxed 7$ ok", "7"),
    ("\\fbox{9}", "9"),
    ("unterminated \\boxed{\\frac{1}{2}", None),
    ("no box here", None),
    ("\\boxedfoo{3}", None),
])
def test_math_last_boxed(text, boxed):
    assert math_score.extract_boxed_answer(text) == boxed


@pytest.mark.parametrize("answer, truth", [
    ("\\frac{1}{2}", "\\frac12"),
    ("\\dfrac{1}{2}", "0.5"),
    ("1/2", "\\frac{1}{2}"),
    (".5", "\\frac{1}{2}"),
    ("-\\frac{3}{4}", "-0.75"),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}{2}"),
    ("x = 5", "5"),
    ("5 \\text{ cm}", "5"),
    ("90^\\circ", "90"),
    ("50\\%", "50"),
    ("1,000", "1000"),
    ("(1, 2)", "(1,2)"),
    ("\\left( 1,\\frac{2}{3} \\right)", "(1,\\frac23)"),
    ("\\text{(A)}", "(A)"),
    ("10.0", "10"),
])
def test_math_equivalent_forms(answer, truth):
    assert math_score.is_equiv(answer, truth)
    assert math_score.compute_score(f"The answer is $\\boxed{{{answer}}}$.", truth, use_math_verify=False) == 1.0


@pytest.mark.parametrize("answer, truth", [
    ("2", "3"),
    ("\\frac{1}{3}", "0.33"),
    ("(1,2)", "[1,2]"),
    ("(1,2)", "(2,1)"),
    ("x^2", "x^3"),
])
def test_math_wrong_answers(answer, truth):
    assert not math_score.is_equiv(answer, truth)
    assert math_score.compute_score(f"\\boxed{{{answer}}}", truth, use_math_verify=False) == 0.0


def test_math_scores_and_malformed():
    assert math_score.compute_score("no box", "1") == 0.0
    assert math_score.compute_score("\\boxed{2}", "3", format_score=0.1, use_math_verify=False) == 0.1
    assert math_score.compute_score(None, "3") == 0.0
    assert math_score.compute_score("\\boxed{\\frac{1}{0}}", "1", use_math_verify=False) == 0.0
    # a whole reference solution as ground truth: its box is used
    assert math_score.compute_score("\\boxed{4}", "so the result is \\boxed{4}.", use_math_verify=False) == 1.0


def test_math_verify_flag():
    if math_score._math_verify is None:
        with pytest.raises(ImportError, match="math-verify"):
            math_score.compute_score("\\boxed{1}", "2", use_math_verify=True)
    else:  # pragma: no cover - only where math-verify is installed
        assert math_score.compute_score("\\boxed{\\frac{2}{4}}", "0.5", use_math_verify=True) == 1.0
        # symbolic equality that string normalisation cannot see
        assert math_score.compute_score("\\boxed{x^2+2x}", "x(x+2)", use_math_verify=False) == 0.0
        assert math_score.compute_score("\\boxed{x^2+2x}", "x(x+2)") == 1.0
        # math_verify's own alarm must not cancel a timer that is already running (a manager's timeout)
        signal.setitimer(signal.ITIMER_REAL, 60.0)
        try:
            assert math_score.compute_score("\\boxed{\\sqrt{8}}", "2\\sqrt{2}") == 1.0
            assert signal.getitimer(signal.ITIMER_REAL)[0] > 50
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)


def test_math_dapo_scoring():
    assert math_score.compute_score_dapo("... Answer: 42", "42") == {"score": 1.0, "acc": True, "pred": "42"}
    assert math_score.compute_score_dapo("\\boxed{41}", "42") == {"score": -1.0, "acc": False, "pred": "41"}
    assert math_score.compute_score_dapo("nothing", "42") == {"score": -1.0, "acc": False, "pred": ""}


# ----------------------------------------------------------------------------------------------------------------------
# countdown

GT = {"target": 9, "numbers": [1, 2, 3]}


@pytest.mark.parametrize(
    "response, expected",
    [
        ("<answer>(1 + 2) * 3</answer>", 1.0),
        ("think... <answer>3 * (2 + 1)</answer>", 1.0),
        ("<answer>(1 + 2) * 3 = 9</answer>", 1.0),
        ("<answer>1 + 2</answer> no wait <answer>(1 + 2) * 3</answer>", 1.0),
        ("<answer>1 + 2 + 3</answer>", 0.1),  # valid numbers, wrong value
        ("<answer>(1 + 2) * 3 * 1</answer>", 0.1),  # 1 used twice
        ("<answer>3 * 3</answer>", 0.1),  # 3 used twice, 1 and 2 unused
        ("<answer>9</answer>", 0.1),  # not the given numbers
        ("<answer>(1 + 2) * 3.0</answer>", 0.1),  # float literal
        ("<answer>__import__('os').system('echo pwned')</answer>", 0.1),
        ("<answer>(1).__class__</answer>", 0.1),
        ("<answer>3 ** 2 * 1 // 2</answer>", 0.1),
        ("<answer>9 ** 9 ** 9 ** 9</answer>", 0.1),
        ("<answer>3 / (2 - 2) + 1</answer>", 0.1),  # division by zero
        ("<answer>(((1 + 2) * 3</answer>", 0.1),  # syntax error
        ("<answer>" + "(" * 300 + "1" + ")" * 300 + "</answer>", 0.1),  # too long / too deep
        ("(1 + 2) * 3", 0.0),  # strict: no answer tag
        ("nothing here", 0.0),
    ])
def test_countdown(response, expected):
    t0 = time.perf_counter()
    assert countdown.compute_score(response, GT) == pytest.approx(expected)
    assert time.perf_counter() - t0 < 1.0


def test_countdown_exact_division_and_fractions():
    gt = {"target": 2, "numbers": [3, 6, 1]}
    assert countdown.compute_score("<answer>6 / 3 * 1</answer>", gt) == 1.0
    # 1/3 + 5/3 = 2 exactly (floats would give 1.9999999999999998)
    assert countdown.compute_score("<answer>1 / 3 + 5 / 3</answer>", {"target": 2, "numbers": [1, 3, 5, 3]}) == 1.0


def test_countdown_flexible_and_ground_truth_forms():
    response = "I try (1 + 2) * 3\n(1 + 2) * 3 = 9"
    assert countdown.compute_score(response, GT) == 0.0
    assert countdown.compute_score(response, GT, method="flexible") == 1.0
    # parquet round trips give numpy arrays / numpy ints; a JSON string is accepted too
    assert countdown.compute_score("<answer>(1+2)*3</answer>", {
        "target": np.int64(9),
        "numbers": np.array([1, 2, 3])
    }) == 1.0
    assert countdown.compute_score("<answer>(1+2)*3</answer>", '{"target": 9, "numbers": [1, 2, 3]}') == 1.0
    assert countdown.compute_score("<answer>(1+2)*3</answer>", GT, format_score=0.0, score=2.0) == 2.0


@pytest.mark.parametrize("bad", [None, {"target": 9}, {"numbers": [1]}, "not json", {"target": "x", "numbers": [1]}])
def test_countdown_bad_ground_truth_names_keys(bad):
    with pytest.raises(ValueError, match="target"):
        countdown.compute_score("<answer>1</answer>", bad)


def test_countdown_never_calls_eval(monkeypatch):
    import builtins

    def forbidden(*args, **kwargs):
        raise AssertionError("eval must not be used")

    monkeypatch.setattr(builtins, "eval", forbidden)
    assert countdown.compute_score("<answer>(1 + 2) * 3</answer>", GT) == 1.0


def test_countdown_generated_problems_are_solvable_by_their_reference():
    rng = random.Random(0)
    for _ in range(50):
        numbers = [rng.randint(1, 20) for _ in range(4)]
        expr = f"({numbers[0]} + {numbers[1]}) * {numbers[2]} - {numbers[3]}"
        target = (numbers[0] + numbers[1]) * numbers[2] - numbers[3]
        gt = {"target": target, "numbers": numbers}
        assert countdown.compute_score(f"<answer>{expr}</answer>", gt) == 1.0
        assert countdown.compute_score(f"<answer>{expr} + 1</answer>", gt) == 0.1


# ----------------------------------------------------------------------------------------------------------------------
# arithmetic


def test_arithmetic():
    assert arithmetic.compute_score("12 + 7 = 19\n#### 19", "19") == 1.0
    assert arithmetic.compute_score("#### 19", 19) == 1.0
    assert arithmetic.compute_score("12 + 7 = 19", "19") == 1.0  # flexible: bare final number
    assert arithmetic.compute_score("12 + 7 = 19", "19", method="strict") == 0.0
    assert arithmetic.compute_score("#### 18", "19") == 0.0
    assert arithmetic.compute_score("#### 18", "19", format_score=0.1) == 0.1
    assert arithmetic.compute_score("#### 19 but maybe 20", "19") == 1.0  # "####" wins over later numbers
    assert arithmetic.compute_score("I don't know", "19") == 0.0
    assert arithmetic.compute_score("", "19") == 0.0
    with pytest.raises(ValueError, match="ground_truth"):
        arithmetic.compute_score("#### 19", "nineteen")


def test_arithmetic_matches_the_generator_format():
    from verl.utils.dataset.tasks import arithmetic_problem

    rng = random.Random(1)
    for _ in range(50):
        p = arithmetic_problem(rng, max_digits=3, ops="+-*")
        assert default_compute_score("arithmetic", p["solution"], p["answer"]) == 1.0
        wrong = str(int(p["answer"]) + 1)
        assert default_compute_score("arithmetic", f"#### {wrong}", p["answer"]) == 0.0


# ----------------------------------------------------------------------------------------------------------------------
# dispatch


@pytest.mark.parametrize("source, response, truth, expected", [
    ("openai/gsm8k", "#### 5", "5", 1.0),
    ("gsm8k", "5", "5", 0.0),
    ("lighteval/MATH", "\\boxed{5}", "5", 1.0),
    ("DigitalLearningGmbH/MATH-lighteval", "\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("HuggingFaceH4/MATH-500", "\\boxed{6}", "5", 0.0),
    ("numina_olympiads", "\\boxed{5}", "5", 1.0),
    ("countdown", "<answer>(1+2)*3</answer>", GT, 1.0),
    ("arithmetic", "#### 19", "19", 1.0),
])
def test_default_compute_score_dispatch(source, response, truth, expected):
    result = default_compute_score(source, response, truth)
    assert isinstance(result, float)
    assert result == expected


def test_default_compute_score_dict_sources_and_kwargs():
    assert default_compute_score("math_dapo", "\\boxed{5}", "5")["score"] == 1.0
    assert default_compute_score("aime2024", "Answer: 4", "5") == {"score": -1.0, "acc": False, "pred": "4"}
    assert default_compute_score(np.str_("openai/gsm8k"), "#### 4", "5", format_score=0.2) == 0.2
    assert default_compute_score("arithmetic", "19", "19", extra_info={"split": "test"}, method="strict") == 0.0


def test_unknown_kwarg_is_logged_once(caplog):
    with caplog.at_level(logging.WARNING, logger="verl.utils.reward_score"):
        default_compute_score("openai/gsm8k", "#### 5", "5", format_scroe=0.1)
        default_compute_score("openai/gsm8k", "#### 5", "5", format_scroe=0.1)
    assert sum("format_scroe" in r.message for r in caplog.records) == 1


def test_unknown_data_source_error():
    with pytest.raises(NotImplementedError) as info:
        default_compute_score("my/custom-task", "x", "y")
    message = str(info.value)
    assert "my/custom-task" in message and "custom_reward_function.path" in message
    assert "openai/gsm8k" in message and "countdown" in message
    assert isinstance(info.value, UnknownDataSourceError)
    with pytest.raises(NotImplementedError, match="sandbox"):
        get_scorer("codecontests")
    assert "arithmetic" in known_data_sources()


@given(st.integers(min_value=-10**12, max_value=10**12))
@settings(max_examples=200, deadline=None)
def test_gsm8k_number_formats_property(n):
    truth = str(n)
    for written in (f"{n:,}", f"{n}.00", f"{n}."):
        assert gsm8k.compute_score(f"so the total is\n#### {written}", truth) == 1.0
    assert gsm8k.compute_score(f"#### {n + 1:,}", truth) == 0.0
