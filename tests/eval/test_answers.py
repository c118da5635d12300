"""Answer extraction and equality on realistic model outputs."""

import os

import pytest

from sdar_jax.data import tasks
from sdar_jax.eval import answers
from sdar_jax.eval.answers import answer_key, extract_answer, is_correct, last_boxed, math_equiv

# ---- GSM8K ----------------------------------------------------------------------------------

GSM8K_OUTPUT = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n"
    "#### 72")


@pytest.mark.parametrize("prediction, reference, expected", [
    (GSM8K_OUTPUT, "72", True),
    (GSM8K_OUTPUT, "Natalia sold ... altogether.\n#### 72", True),  # full reference solution
    (GSM8K_OUTPUT, "73", False),
    ("She pays 2 * $1,250 = $2,500.\n#### $2,500.", "2500", True),
    ("Total: 18.00 dollars\n#### 18.00", "18", True),
    ("#### -3", "-3", True),
    ("#### 0.50", ".5", True),
    ("First #### 12 then I reconsider.\n#### 15\n<|im_end|>", "15", True),  # last marker wins
    ("#### 15\nThe answer may be 12.", "15", True),  # only the marker's own line counts
    ("The answer is 72.", "72", False),  # no marker, no box: strict
    ("So the total is \\boxed{72}.", "72", True),  # MATH-style answer to a GSM8K question
    ("####", "72", False),
    ("#### 1 3 5 9", "1 3 5 9", True),  # a sorted list from the embedded tasks
    ("#### 1, 3, 5, 9", "1 3 5 9", True),  # commas drop, spaces stay
    ("#### ant  bee\tcow", "ant bee cow", True),
])
def test_gsm8k(prediction, reference, expected):
    assert is_correct(prediction, reference, "gsm8k") is expected


def test_gsm8k_extraction_cleans():
    assert extract_answer("blah\n#### $1,234.  \nmore", "gsm8k") == "1234"
    assert extract_answer("no answer here", "gsm8k") is None
    assert answer_key("42.50", "gsm8k") == answer_key("42.5", "gsm8k") == "42.5"
    assert answer_key("-0.0", "gsm8k") == answer_key("0", "gsm8k") == "0"
    assert answer_key("1e2", "gsm8k") == "100"
    assert answer_key("abc", "gsm8k") == "abc"


def test_every_shipped_task_response_grades_correct_and_wrong_answers_fail():
    for e in tasks.load_split("test"):
        assert is_correct(e["response"], e["answer"], "gsm8k"), e
        wrong = e["response"].rsplit("####", 1)[0] + "#### 1" + e["answer"]
        assert not is_correct(wrong, e["answer"], "gsm8k"), e


# ---- MATH -----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, boxed", [
    ("so $x = \\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("\\boxed{1} first, then finally \\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("nested \\boxed{\\{1, {2}\\}} ok", "\\{1, {2}\\}"),
    ("answer \\fbox{7}", "7"),
    ("The answer is $\\boxed 5$.", "5"),
    ("unclosed \\boxed{\\frac{1}{2}", None),
    ("no box", None),
])
def test_last_boxed(text, boxed):
    assert last_boxed(text) == boxed


@pytest.mark.parametrize("a, b", [
    ("\\frac{1}{2}", "0.5"),
    ("\\frac12", "\\frac{1}{2}"),
    ("\\dfrac{3}{4}", "3/4"),
    ("\\tfrac{3}{4}", "\\frac34"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
    ("10\\!000", "10000"),
    ("90^\\circ", "90"),
    ("90^{\\circ}", "90"),
    ("5\\text{ cm}", "5"),
    ("\\$18.90", "18.90"),
    ("25\\%", "25"),
    ("25%", "25"),
    ("x = 5", "5"),
    ("k=\\frac{1}{3}", "\\frac13"),
    ("\\sqrt3", "\\sqrt{3}"),
    ("2\\sqrt{2}", "2\\sqrt2"),
    (".25", "0.25"),
    ("\\frac1{72}", "\\frac{1}{72}"),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}1\\2\\end{pmatrix}"),
])
def test_math_equivalent_forms(a, b):
    assert math_equiv(a, b) and math_equiv(b, a)


@pytest.mark.parametrize("a, b", [
    ("\\frac{1}{3}", "0.33"),
    ("0.25", "\\frac{1}{4}"),  # Hendrycks rewrites only 0.5
    ("5 \\text{cm}", "5"),  # a unit without the space after `\text{` stays
    ("x + y = 5", "5"),  # the `=` prefix must be at most 2 characters
    ("\\frac{2}{4}", "\\frac{1}{2}"),  # no arithmetic
    ("12", "-12"),
])
def test_math_different_answers(a, b):
    assert not math_equiv(a, b)


# The expectations of the MATH release's own `math_equivalence_test.py`.
@pytest.mark.parametrize("a, b, equal", [
    ("\\tfrac{1}{2} + \\frac1{72}", "\\\\frac{1}{2} + 2/3", False),
    ("10, 4, -2", "4, 10, -2", False),
    ("10, 4, 2", "4, 12, 2", False),
    ("\\tfrac{1}{2} +\\! \\frac1{72}", "\\\\dfrac{1}{2} +\\frac{1}{72}", True),
    ("10\\text{ units}", "10 ", True),
    ("10\\text{ units}", "100 ", False),
    ("10", "\\$10", True),
    ("\\left(x-2\\right)\\left(x+2\\right)", "(x-2)(x+2)", True),
    ("0.1, 4, 2", "4, .1, 2", False),
    ("0.1", ".1", True),
    ("10\\%", "10", True),
    ("10\\sqrt{3} + \\sqrt4", "10\\sqrt3 + \\sqrt{4}", True),
    ("\\frac34i", "\\frac{3}{4}i", True),
    ("\\tfrac83", "\\frac{8}{3}", True),
    ("5x - 7y + 11z + 4 = 0", "x + y - z + 2 = 0", False),
    ("1/2", "\\frac{1}{2}", True),
])
def test_math_release_cases(a, b, equal):
    assert math_equiv(a, b) is equal


def test_math_fallback_compares_raw_strings():
    # Two `\text{ ` units make Hendrycks' normaliser raise; then only identical strings match.
    weird = "1\\text{ a}\\text{ b}"
    assert math_equiv(weird, weird)
    assert not math_equiv(weird, "1")
    assert math_equiv("\\sqrt", "\\sqrt") and not math_equiv("\\sqrt", "\\sqrt{}")
    assert answers.normalize_math(weird) == weird


def test_math_is_correct_on_model_outputs():
    output = ("We have $\\frac{6}{12} = \\frac{1}{2}$ so the probability is "
              "$\\boxed{\\dfrac{1}{2}}$.<|im_end|>")
    assert is_correct(output, "\\frac{1}{2}", "math")
    assert is_correct(output, "The probability is $\\boxed{0.5}$.", "math")  # full solution
    assert not is_correct(output, "\\frac{1}{3}", "math")
    assert not is_correct("The probability is 1/2.", "\\frac{1}{2}", "math")  # no box
    polar = "Thus the point is $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.$"
    assert is_correct(polar, "\\left( 3, \\frac{\\pi}{2} \\right)", "math")
    assert is_correct("The angle is \\boxed{30^\\circ}", "30", "math")


# ---- exact and errors -----------------------------------------------------------------------

def test_exact_match():
    assert is_correct("  Paris \n", "Paris", "exact")
    assert is_correct("New   York\tCity", "New York City", "exact")
    assert not is_correct("paris", "Paris", "exact")


def test_unknown_style_is_named():
    with pytest.raises(ValueError, match="'latex'"):
        is_correct("1", "1", "latex")
    with pytest.raises(ValueError, match="'latex'"):
        answer_key("1", "latex")


# ---- lm-evaluation-harness's GSM8K rules ------------------------------------------------------

# (prediction, reference, strict-match verdict, flexible-extract verdict)
LM_EVAL_GSM8K_CASES = [
    (GSM8K_OUTPUT, "72", True, True),
    (GSM8K_OUTPUT, "Natalia sold ... altogether.\n#### 72", True, True),  # full solution
    ("She pays 2 * $1,250 = $2,500.\n#### $2,500.", "2500", False, True),  # `$` after ####: no strict
    ("She pays 2 * 1,250 = 2,500.\n#### 2,500.", "2500", True, True),  # separators and final period
    ("#### 18.00", "18", False, False),  # string equality, not numeric
    ("First #### 12 then I reconsider.\n#### 15", "15", False, True),  # strict takes the first
    ("#### 15\nCheck: 3 + 12 = 15.", "15", True, True),
    ("#### 15\nCheck: 3 + 12 = 16.", "15", True, False),  # flexible takes the last number
    ("The answer is 7", "7", False, True),  # one digit: the second alternative
    ("#### 42 dollars", "42", True, True),  # a unit after the number
    ("The total is -3.", "-3", False, True),
    ("no number at all", "0", False, False),
]


@pytest.mark.parametrize("prediction, reference, strict, flexible", LM_EVAL_GSM8K_CASES)
def test_gsm8k_lm_eval_rules(prediction, reference, strict, flexible):
    assert is_correct(prediction, reference, "gsm8k_strict") is strict
    assert is_correct(prediction, reference, "gsm8k_flexible") is flexible


def test_gsm8k_lm_eval_rules_match_lm_eval_itself():
    """The same verdicts from lm-eval's own regex filters and exact_match metric."""
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e .[lm-eval])")
    import yaml  # lm-eval's dependency
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    with open(os.path.join(os.path.dirname(lm_eval.__file__), "tasks", "gsm8k", "gsm8k.yaml")) as f:
        task = yaml.safe_load(f)
    (metric,) = task["metric_list"]
    filters = {f["name"]: f["filter"][0] for f in task["filter_list"]}
    for name, style in (("strict-match", "gsm8k_strict"), ("flexible-extract", "gsm8k_flexible")):
        rule = filters[name]
        regex = RegexFilter(rule["regex_pattern"], rule.get("group_select", 0))
        for prediction, reference, *_ in LM_EVAL_GSM8K_CASES:
            (extracted,) = regex.apply([[prediction]], [{}])[0]
            theirs = float(exact_match_hf_evaluate(
                [extracted], [reference], regexes_to_ignore=metric["regexes_to_ignore"],
                ignore_case=metric["ignore_case"], ignore_punctuation=metric["ignore_punctuation"],
            )["exact_match"]) == 1.0
            assert is_correct(prediction, reference, style) is theirs, (name, prediction)


def test_gsm8k_lm_eval_extraction():
    assert answers.extract_gsm8k_strict("#### 1,234. and #### 5") == "1,234."
    assert answers.extract_gsm8k_flexible("costs $1,234. Done") == "$1,234."
    assert answers.extract_gsm8k_flexible("no digits") is None
    assert answer_key("$1,234.", "gsm8k_flexible") == answer_key("1234", "gsm8k_strict") == "1234"


# ---- MATH with math-verify --------------------------------------------------------------------

@pytest.mark.parametrize("prediction, reference, expected", [
    ("so $p = \\boxed{\\dfrac{3}{4}}$.", "0.75", True),  # fraction vs decimal
    ("$\\boxed{\\frac{2}{4}}$", "\\frac12", True),  # arithmetic, which Hendrycks lacks
    ("$\\boxed{\\frac{\\sqrt{2}}{2}}$", "\\frac{1}{\\sqrt{2}}", True),
    ("$\\boxed{\\frac{1}{3}}$", "0.33", False),
    ("first \\boxed{1}, finally \\boxed{\\boxed{\\frac{7}{2}}}", "3.5", True),  # nested boxes
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "(3,\\frac{\\pi}{2})", True),
    ("\\boxed{10\\text{ cm}}", "10", True),  # units
    ("\\boxed{5 \\text{cm}}", "5", True),  # a unit Hendrycks keeps
    ("\\boxed{1,000}", "1000", True),  # thousands separators
    ("\\boxed{1{,}000}", "1000", True),
    ("\\boxed{5.}", "5", True),  # a trailing period inside the box
    ("The answer is \\boxed{5}.", "The answer is $\\boxed{5}$.", True),  # full reference solution
    ("\\boxed{\\{2, 1\\}}", "\\{1,2\\}", True),  # sets in any order
    ("\\boxed{3}", "x = 3", True),  # the reference's assignment
    ("\\boxed{(x+1)^2}", "x^2+2x+1", True),
    ("\\boxed{12}", "-12", False),
    ("The answer is 5.", "5", False),  # no box
])
def test_math_verify_grading(prediction, reference, expected):
    pytest.importorskip("math_verify", reason="math-verify is not installed")
    assert is_correct(prediction, reference, "math") is expected


def test_math_hendrycks_style_is_the_old_normaliser():
    assert is_correct("\\boxed{\\dfrac{1}{2}}", "0.5", "math_hendrycks")
    assert not is_correct("\\boxed{\\frac{2}{4}}", "\\frac12", "math_hendrycks")
    assert not is_correct("\\boxed{5 \\text{cm}}", "5", "math_hendrycks")


def test_math_without_math_verify_warns_and_uses_hendrycks(monkeypatch):
    monkeypatch.setattr(answers, "_math_verify", lambda: None)
    with pytest.warns(UserWarning, match="math-verify is not installed"):
        assert is_correct("\\boxed{\\dfrac{1}{2}}", "0.5", "math")
    with pytest.warns(UserWarning, match="math-verify is not installed"):
        assert not is_correct("\\boxed{\\frac{2}{4}}", "\\frac12", "math")
    assert not answers.math_verify_available()


def test_math_verify_unparseable_side_falls_back_to_hendrycks():
    pytest.importorskip("math_verify", reason="math-verify is not installed")
    assert answers.math_verify_equiv("", "5") is None
    assert not is_correct("\\boxed{}", "5", "math")
