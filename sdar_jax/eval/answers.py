"""Final-answer extraction and comparison: GSM8K (`#### 42`), MATH (`\\boxed{...}`), exact.

`is_correct(prediction_text, reference_answer, style)` is the one entry point;
`answer_key(answer, style)` gives the canonical form two answers share when
they are equal (what majority voting groups by).

- "gsm8k": the answer is the rest of the line after the last `####` (or, when
  a model answers in the MATH way, the last `\\boxed{...}`); commas, `$` and a
  trailing period are dropped and whitespace runs collapsed. Two numbers are
  equal when their decimal values are (`42.0 == 42`), anything else compares
  as text (so a sorted list `1 3 5` works too).
- "gsm8k_strict" / "gsm8k_flexible": lm-evaluation-harness's GSM8K rules
  `strict-match` (the first `#### <number>`) and `flexible-extract` (the last
  number-like run of the text), compared as its `exact_match` metric does:
  `,`, `$`, everything up to the last `#### ` and a final `.` removed from both
  sides, case ignored, then string equality (so `18.00` is not `18`).
- "math": the content of the last box (as "math_hendrycks" below, a trailing
  period dropped), judged by HF's `math-verify` (the box content of each side
  parsed to SymPy, then `verify(reference, prediction)`: numeric, symbolic,
  set, interval and equation equivalence, units and `\\text{}` dropped).
  Where math-verify parses nothing on either side, or is not installed (a
  warning says so), the comparison is "math_hendrycks".
- "math_hendrycks": the content of the last `\\boxed{...}` / `\\fbox{...}` (nested
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
import functools
import importlib
import re
import threading
import types
import warnings

STYLES = ("gsm8k", "gsm8k_strict", "gsm8k_flexible", "math", "math_hendrycks", "exact")
MATH_STYLES = ("math", "math_hendrycks")
# The `regex` filters of lm-evaluation-harness's gsm8k task (lm_eval/tasks/gsm8k/gsm8k.yaml).
GSM8K_STRICT_PATTERN = re.compile(r"#### (\-?[0-9\.\,]+)")
GSM8K_FLEXIBLE_PATTERN = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
# That task's exact_match `regexes_to_ignore`, applied in this order (then case is ignored).
GSM8K_IGNORED = tuple(re.compile(p) for p in (",", "\\$", "(?s).*#### ", "\\.$"))
# Per parse / comparison. math-verify's own default is 5 s; a loaded machine can spend that on a
# symbolic simplification, and a timeout grades the answer wrong, so wait longer.
MATH_VERIFY_TIMEOUT_SECONDS = 30

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


# ---- GSM8K, lm-evaluation-harness's rules --------------------------------------------------

def extract_gsm8k_strict(text: str) -> str | None:
    """lm-eval's `strict-match`: the number after the first `#### ` (None when there is none)."""
    match = GSM8K_STRICT_PATTERN.search(text)
    return match.group(1).strip() if match else None


def extract_gsm8k_flexible(text: str) -> str | None:
    """lm-eval's `flexible-extract`: the last number-like run (`$1,234.` counts), else None."""
    found = GSM8K_FLEXIBLE_PATTERN.findall(text)
    if not found:
        return None
    groups = [g for g in found[-1] if g]
    return groups[0].strip() if groups else None


def gsm8k_exact_match_key(answer: str) -> str:
    """lm-eval's gsm8k `exact_match` normalisation: its ignored regexes removed, lower case."""
    for pattern in GSM8K_IGNORED:
        answer = pattern.sub("", answer)
    return answer.lower()


# ---- MATH: math-verify ----------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _math_verify() -> types.ModuleType | None:
    try:
        return importlib.import_module("math_verify")
    except ImportError:
        return None


def math_verify_available() -> bool:
    """Whether HF's `math-verify` package can be imported."""
    return _math_verify() is not None


def _drop_final_period(answer: str) -> str:
    answer = answer.strip()
    return answer[:-1].rstrip() if answer.endswith(".") else answer


def math_verify_equiv(prediction: str, reference: str) -> bool | None:
    """math-verify's judgement of two box contents; None when it cannot judge.

    Each side is parsed as `\\boxed{...}` (so math-verify reads exactly that
    content) and `verify(reference, prediction)` decides (it is not symmetric:
    an assignment `x = 3` in the reference accepts `3`). None when math-verify
    is not installed or parses nothing on either side. Its timeouts use
    SIGALRM, which works only in the main thread; elsewhere they are off.
    """
    mv = _math_verify()
    if mv is None:
        return None
    timeout = (MATH_VERIFY_TIMEOUT_SECONDS
               if threading.current_thread() is threading.main_thread() else None)
    config = [mv.LatexExtractionConfig(boxed_match_priority=0)]
    parsed = [mv.parse(f"\\boxed{{{_drop_final_period(a)}}}", extraction_config=config,
                       parsing_timeout=timeout) for a in (reference, prediction)]
    if not parsed[0] or not parsed[1]:
        return None
    return bool(mv.verify(parsed[0], parsed[1], timeout_seconds=timeout))


def math_grade(prediction: str | None, reference: str | None) -> bool:
    """Style "math": math-verify on two box contents, Hendrycks' `math_equiv` where it cannot judge."""
    if prediction is None or reference is None:
        return False
    verdict = math_verify_equiv(prediction, reference)
    if verdict is not None:
        return verdict
    if not math_verify_available():
        warnings.warn("math-verify is not installed: style 'math' compares answers with "
                      "Hendrycks' MATH normaliser instead (pip install math-verify==0.9.0)",
                      stacklevel=2)
    return math_equiv(_drop_final_period(prediction), _drop_final_period(reference))


# ---- entry points ---------------------------------------------------------------------------

def _check_style(style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")


def extract_answer(text: str, style: str) -> str | None:
    """The final answer a model output states, in `style`'s sense (not yet normalised for math)."""
    _check_style(style)
    if style == "gsm8k":
        return extract_gsm8k(text)
    if style == "gsm8k_strict":
        return extract_gsm8k_strict(text)
    if style == "gsm8k_flexible":
        return extract_gsm8k_flexible(text)
    if style in MATH_STYLES:
        return last_boxed(text)
    return _collapse(text)


def _reference(reference: str, style: str) -> str | None:
    if style == "gsm8k":
        if "####" in reference or "\\boxed" in reference:
            return extract_gsm8k(reference)
        return _clean_gsm8k(reference) or None
    if style in ("gsm8k_strict", "gsm8k_flexible"):
        return reference  # lm-eval's normalisation drops a full solution's working
    if style in MATH_STYLES:
        boxed = last_boxed(reference)
        return boxed if boxed is not None else reference.strip()
    return _collapse(reference)


def answer_key(answer: str | None, style: str) -> str | None:
    """Canonical form of an *extracted* answer; equal keys mean equal answers under `style`.

    For math this holds up to one corner of Hendrycks' fallback: an answer its
    normaliser cannot handle keeps its raw text as key, which `math_equiv`
    compares only with raw text.

    gsm8k: a number's normalised decimal (`42.50` -> `42.5`), else the cleaned
    text; gsm8k_strict / gsm8k_flexible: `gsm8k_exact_match_key`; math,
    math_hendrycks: `normalize_math` (for math this groups answers
    math-verify may still judge equal, e.g. `0.25` and `\\frac{1}{4}`); exact:
    whitespace-collapsed text.
    """
    _check_style(style)
    if answer is None:
        return None
    if style == "gsm8k":
        number = _as_number(answer)
        if number is None:
            return answer
        return format(number.normalize(), "f") if number != 0 else "0"
    if style in ("gsm8k_strict", "gsm8k_flexible"):
        return gsm8k_exact_match_key(answer)
    if style in MATH_STYLES:
        return normalize_math(_drop_final_period(answer) if style == "math" else answer)
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
        return math_grade(predicted, reference)
    if style == "math_hendrycks":
        return math_equiv(predicted, reference)
    return answer_key(predicted, style) == answer_key(reference, style)
