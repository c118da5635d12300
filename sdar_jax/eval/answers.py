"""Final-answer extraction and comparison: GSM8K (`#### 42`), MATH (`\\boxed{...}`), exact.

`is_correct(prediction_text, reference_answer, style)` is the one entry point;
`answer_key(answer, style)` gives the canonical form two answers share when
they are equal (what majority voting groups by).

- "gsm8k": the answer is the rest of the line after the last `####` (or, when
  a model answers in the MATH way, the last `\\boxed{...}`); commas, `$` and a
  trailing period are dropped and whitespace runs collapsed. Two numbers are
  equal when their decimal values are (`42.0 == 42`), anything else compares
  as text (so a sorted list `1 3 5` works too).
- "math": the content of the last `\\boxed{...}` / `\\fbox{...}` (nested
  braces, or the `\\boxed 5` form), normalised by Hendrycks et al.'s
  `_strip_string` from the MATH release (`\\dfrac`/`\\tfrac` -> `\\frac`,
  `\\frac12` -> `\\frac{1}{2}`, `0.5` -> `\\frac{1}{2}`, `a/b` ->
  `\\frac{a}{b}`, no `\\left`/`\\right`, `\\!`, `^\\circ`, `\\$`, `%`,
  spaces, a unit written as `\\text{ unit}`, or a short `x =` prefix). Where that
  normaliser fails on an input (and the original raised), the raw strings are
  compared, as the original `is_equiv` did. A reference holding a `\\boxed`
  (a full solution) is reduced to its box first.
- "exact": both strings stripped and whitespace runs collapsed.
"""

from __future__ import annotations

import decimal
import re

STYLES = ("gsm8k", "math", "exact")

_WHITESPACE = re.compile(r"\s+")


class _Unnormalisable(Exception):
    """Hendrycks' normaliser raises on this input; the raw strings are compared instead."""


def _collapse(text: str) -> str:
    return _WHITESPACE.sub(" ", text).strip()


# ---- MATH: boxes -------------------------------------------------------------------------

def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` or `\\fbox{...}` (braces matched), or None.

    `\\boxed 5` (a space, no braces) gives the text up to the next `$` or line end.
    An unclosed brace gives None.
    """
    starts = [m for m in re.finditer(r"\\(?:boxed|fbox)", text)]
    if not starts:
        return None
    rest = text[starts[-1].end():]
    if rest.startswith(" "):
        return re.split(r"[$\n]", rest[1:], maxsplit=1)[0].strip()
    if not rest.startswith("{"):
        return None
    depth = 0
    for i, ch in enumerate(rest):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return rest[1:i]
    return None


# ---- MATH: Hendrycks' normaliser -----------------------------------------------------------

def _fix_fracs(s: str) -> str:
    """`\\frac12` -> `\\frac{1}{2}`, `\\frac1{72}` -> `\\frac{1}{72}`, `\\frac{a}b` left alone."""
    head, *parts = s.split("\\frac")
    out = head
    for part in parts:
        out += "\\frac"
        if not part:
            raise _Unnormalisable(s)
        if part[0] == "{":
            out += part
        elif len(part) < 2:
            return s
        elif part[1] != "{":
            out += "{" + part[0] + "}{" + part[1] + "}" + part[2:]
        else:
            out += "{" + part[0] + "}" + part[1:]
    return out


def _fix_a_slash_b(s: str) -> str:
    """`3/4` (two plain integers) -> `\\frac{3}{4}`."""
    parts = s.split("/")
    if len(parts) != 2:
        return s
    try:
        a, b = int(parts[0]), int(parts[1])
    except ValueError:
        return s
    return f"\\frac{{{a}}}{{{b}}}" if s == f"{a}/{b}" else s


def _remove_right_units(s: str) -> str:
    if "\\text{ " not in s:
        return s
    parts = s.split("\\text{ ")
    if len(parts) != 2:
        raise _Unnormalisable(s)
    return parts[0]


def _fix_sqrt(s: str) -> str:
    """`\\sqrt3` -> `\\sqrt{3}`."""
    head, *parts = s.split("\\sqrt")
    out = head
    for part in parts:
        if not part:
            raise _Unnormalisable(s)
        out += "\\sqrt" + (part if part[0] == "{" else "{" + part[0] + "}" + part[1:])
    return out


def _strip_string(s: str) -> str:
    """Hendrycks et al.'s MATH normaliser; raises `_Unnormalisable` where the original raised."""
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\$", "")
    s = _remove_right_units(s)
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:
        s = sides[1]
    s = _fix_sqrt(s)
    s = s.replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _fix_a_slash_b(s)


def normalize_math(answer: str) -> str:
    """The canonical form of a MATH answer (Hendrycks' normaliser, or the raw string)."""
    try:
        return _strip_string(answer)
    except _Unnormalisable:
        return answer


def math_equiv(a: str | None, b: str | None) -> bool:
    """Hendrycks' `is_equiv`: equal after normalisation (raw equality where it fails); None never matches."""
    if a is None or b is None:
        return False
    try:
        return _strip_string(a) == _strip_string(b)
    except _Unnormalisable:
        return a == b


# ---- GSM8K ----------------------------------------------------------------------------------

def _clean_gsm8k(answer: str) -> str:
    answer = _collapse(answer.replace(",", "").replace("$", ""))
    return answer.rstrip(".").rstrip()


def extract_gsm8k(text: str) -> str | None:
    """The cleaned answer after the last `####` (its line only), else the last box, else None."""
    idx = text.rfind("####")
    if idx >= 0:
        answer = text[idx + 4:].split("\n", 1)[0]
    else:
        answer = last_boxed(text)
        if answer is None:
            return None
    answer = _clean_gsm8k(answer)
    return answer or None


def _as_number(answer: str) -> decimal.Decimal | None:
    try:
        value = decimal.Decimal(answer)
    except decimal.InvalidOperation:
        return None
    return value if value.is_finite() else None


# ---- entry points ---------------------------------------------------------------------------

def _check_style(style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")


def extract_answer(text: str, style: str) -> str | None:
    """The final answer a model output states, in `style`'s sense (not yet normalised for math)."""
    _check_style(style)
    if style == "gsm8k":
        return extract_gsm8k(text)
    if style == "math":
        return last_boxed(text)
    return _collapse(text)


def _reference(reference: str, style: str) -> str | None:
    if style == "gsm8k":
        if "####" in reference or "\\boxed" in reference:
            return extract_gsm8k(reference)
        return _clean_gsm8k(reference) or None
    if style == "math":
        boxed = last_boxed(reference)
        return boxed if boxed is not None else reference.strip()
    return _collapse(reference)


def answer_key(answer: str | None, style: str) -> str | None:
    """Canonical form of an *extracted* answer; equal keys mean equal answers under `style`.

    For math this holds up to one corner of Hendrycks' fallback: an answer its
    normaliser cannot handle keeps its raw text as key, which `math_equiv`
    compares only with raw text.

    gsm8k: a number's normalised decimal (`42.50` -> `42.5`), else the cleaned
    text; math: `normalize_math`; exact: whitespace-collapsed text.
    """
    _check_style(style)
    if answer is None:
        return None
    if style == "gsm8k":
        number = _as_number(answer)
        if number is None:
            return answer
        return format(number.normalize(), "f") if number != 0 else "0"
    if style == "math":
        return normalize_math(answer)
    return _collapse(answer)


def is_correct(prediction_text: str, reference_answer: str, style: str) -> bool:
    """Whether a model output's final answer equals the reference under `style`.

    `reference_answer` may be the bare answer or a full reference solution
    (`... #### 42` for gsm8k, `... \\boxed{42}` for math).
    """
    _check_style(style)
    predicted = extract_answer(prediction_text, style)
    reference = _reference(reference_answer, style)
    if predicted is None or reference is None:
        return False
    if style == "math":
        return math_equiv(predicted, reference)
    return answer_key(predicted, style) == answer_key(reference, style)
