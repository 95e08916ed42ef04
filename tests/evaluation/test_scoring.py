"""GSM8K and MMLU scorers on edge cases."""
from decimal import Decimal

import pytest

from derta_jax.evaluation import scoring


@pytest.mark.parametrize("response, answer, correct", [
    ("She pays 3 * 6 = 18 dollars.\n#### 18", "6 eggs ... #### 18", True),
    ("The total is 1,234 apples.", "#### 1234", True),
    ("So the answer is 1234.", "#### 1,234", True),
    ("The temperature drops to -5 degrees.", "#### -5", True),
    ("Half of it: 2.50 dollars", "#### 2.5", True),
    ("It is .5 of the cake", "#### 0.5", True),
    ("The answer is $12.", "#### 12", True),
    ("First 20, then 30, so the answer is 25. Check: 25 + 5 = 30", "#### 25", True),
    ("87 plus 57 is 144.", "144", True),  # a bare-number reference (the demo's arithmetic)
    ("I am not sure.", "#### 7", False),
    ("The answer is 17.", "#### 18", False),
    ("The change is -3.", "#### 3", False),  # the sign counts
])
def test_gsm8k_final_number_matches_the_reference(response, answer, correct):
    assert scoring.gsm8k_correct(response, answer) is correct


def test_gsm8k_no_digits_no_prediction_and_reference_needs_marker():
    assert scoring.gsm8k_prediction("no digits here") is None
    assert scoring.gsm8k_prediction("2 cats, 10,000 dogs") == Decimal(10000)
    with pytest.raises(ValueError, match="####"):
        scoring.gsm8k_reference("The answer is 5")
    with pytest.raises(ValueError, match="####"):
        scoring.gsm8k_reference("")


@pytest.mark.parametrize("response, letter", [
    ("The answer is (B).", "B"),
    ("the answer is (c)", "C"),
    ("Answer: d", "D"),
    ("(A) Paris, because it is the capital.", "A"),
    ("B. The mitochondria", "B"),
    ("b) oxygen", "B"),
    ("C", "C"),
    ("a good question, but I think (D) is right", "D"),
    ("I don't know.", None),
    ("", None),
])
def test_mmlu_prediction_reads_the_chosen_letter(response, letter):
    assert scoring.mmlu_prediction(response) == letter


def test_mmlu_correct_compares_letters_in_any_form():
    assert scoring.mmlu_correct("The answer is (B)", "B")
    assert scoring.mmlu_correct("The answer is (B)", "(b)")
    assert not scoring.mmlu_correct("The answer is (C)", "B")
    assert not scoring.mmlu_correct("No idea", "B")
    with pytest.raises(ValueError, match="A-D"):
        scoring.mmlu_reference("E")
