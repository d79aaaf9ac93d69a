"""Answers: reading the final answer out of a response, and comparing answers without math-verify.

One extractor per reward kind (`data.reward`, `eval --reward`): the last `\\boxed{}` for
math_verify, the whole response for exact, the last number written for last_number; voting groups
by the answer the reward grades (LASER_SPEC section 5). Also the two rewards that are string
comparisons (`exact_reward`, `last_number_match`), the presentation-free form of an answer that
voting and the grader's fast path share (`normalize_answer`), and the one conversion of stored
reference answers to strings (`answer_text`). The math-verify reward and its worker pool are
`laserjax.reward`.

Standard library and numpy only.
"""

from __future__ import annotations

import decimal
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

# `\boxed{`, `\boxed 5` (no braces) and `\fbox{`; the brace may follow after spaces.
_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?:\s*\{|\s+(?=[^\s{]))")
# In the brace scan an escaped character (`\{`, `\}`, `\\`) is skipped as one token, so a set
# `\{1, 2\}` or `\left\{ ... \right.` inside a box does not unbalance it.
_BRACE_TOKEN_RE = re.compile(r"\\.|[{}]", re.DOTALL)
# A brace-less `\boxed 5$` answer runs to the end of the math span or the line.
_UNBRACED_END_RE = re.compile(r"[$\n]")

_PRESENTATION_RE = re.compile(r"\\left|\\right|\\[,!;:]|\\displaystyle|\$")
_SPACE_RE = re.compile(r"\s+")


def extract_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\boxed x`, `\\fbox{...}`) of `text`.

    Braces are balanced (escaped `\\{`/`\\}` do not count). Returns None when there is no boxed
    answer, or when the last one never closes (a truncated response): an earlier box is not used
    then, because the response's final answer is the malformed one.
    """
    last = None
    for match in _BOX_RE.finditer(text):
        last = match
    if last is None:
        return None
    start = last.end()
    if not text[last.start() : start].endswith("{"):
        end = _UNBRACED_END_RE.search(text, start)
        content = text[start : end.start() if end else len(text)].strip()
        return content or None
    depth = 1
    for token in _BRACE_TOKEN_RE.finditer(text, start):
        brace = token.group()
        if brace == "{":
            depth += 1
        elif brace == "}":
            depth -= 1
            if depth == 0:
                return text[start : token.start()]
    return None


_NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?")


def extract_last_number(text: str) -> str | None:
    """The last number written in `text` (thousands separators dropped, `-` kept), in a
    canonical form (`"07"` -> `"7"`, `"3.50"` -> `"3.5"`, `"-0"` -> `"0"`); None when there is none.

    The verifier of free-text answers (the real-model CPU config): the model answers in its own
    words and the last number it writes is its answer. Grading and voting both read this one
    function, so a vote counts exactly what the reward graded.
    """
    matches = _NUMBER_RE.findall(text.replace(",", ""))
    if not matches:
        return None
    value = decimal.Decimal(matches[-1])
    out = format(value.normalize(), "f") if value != value.to_integral() else str(int(value))
    return "0" if out in ("-0", "0") else out


def last_number_match(responses: list[str], answers: list[str]) -> np.ndarray:
    """r_v for free-text answers: 1 when `extract_last_number` of the response equals that of the
    reference answer, else 0 (no number: 0)."""
    out = []
    for response, answer in zip(responses, answers, strict=True):
        pred, gold = extract_last_number(response), extract_last_number(answer)
        out.append(float(pred is not None and pred == gold))
    return np.array(out, np.float32)


def extract_exact(text: str) -> str | None:
    """The answer of the `exact` reward: the whole response, stripped (None when empty)."""
    return text.strip() or None


REWARDS = ("math_verify", "exact", "last_number")


def answer_extractor(reward: str) -> Callable[[str], str | None]:
    """The extractor that goes with a reward kind (`data.reward`, `eval --reward`): the answer
    the reward grades is the answer voting groups by (LASER_SPEC section 5). math_verify grades
    the last `\\boxed{}`; exact grades the whole response; last_number the last number written."""
    if reward == "math_verify":
        return extract_boxed
    if reward == "exact":
        return extract_exact
    if reward == "last_number":
        return extract_last_number
    raise ValueError(f"unknown reward {reward!r}; use one of {', '.join(REWARDS)}")


def exact_reward(responses: Sequence[str], answers: Sequence[str]) -> np.ndarray:
    """The `exact` reward: 1 when `extract_exact(response)` equals the stripped answer."""
    pairs = zip(responses, answers, strict=True)
    return np.array([float(extract_exact(r) == a.strip()) for r, a in pairs], np.float32)


def count_boxed(text: str) -> int:
    """How many boxed answers (every form `extract_boxed` reads) `text` holds.

    The reference code's training gate counts `\\boxed{` only; laserjax counts `\\fbox{` and
    `\\boxed x` too, so the gate means "exactly one final answer" whatever form it takes.
    """
    return sum(1 for _ in _BOX_RE.finditer(text))


def normalize_answer(answer: str) -> str:
    """A presentation-free form of an answer, for the exact-match fast path and for voting.

    Drops `$`, `\\left`/`\\right`, thin spaces and `\\displaystyle`, maps `\\dfrac`/`\\tfrac` to
    `\\frac` and removes all whitespace. Two answers equal in this form are equal as mathematics;
    unequal ones may still be equivalent (math-verify decides those).
    """
    out = _PRESENTATION_RE.sub("", answer)
    out = out.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    return _SPACE_RE.sub("", out)


def answer_text(value: Any) -> tuple[str | None, str | None]:
    """A reference answer as a stripped string, or None and why it is no answer: the one
    conversion of stored answers (aime25 stores integers, some sets floats, parquet numpy
    scalars), used by the data loader and the grader.

    Integral floats print as integers (`70.0` -> `"70"`); booleans, non-finite numbers and
    non-scalars are refused.
    """
    if isinstance(value, str):
        value = value.strip()
        return (value, None) if value else (None, "empty answer")
    if value is None:
        return None, "missing answer"
    if isinstance(value, bool | np.bool_):  # True/False is no math answer; json's ints hold bools
        return None, f"answer is a boolean ({value})"
    if isinstance(value, int | np.integer):
        return str(int(value)), None
    if isinstance(value, float | np.floating):
        value = float(value)
        if not math.isfinite(value):
            return None, f"answer is {value}"
        return (str(int(value)) if value.is_integer() else repr(value)), None
    return None, f"answer is a {type(value).__name__}, not a scalar"


def answer_to_str(answer: Any) -> str:
    """`answer_text`, raising TypeError (naming what it got) for what is no answer; an empty or
    blank string stays "" (a reference the grader marks wrong)."""
    if isinstance(answer, str):
        return answer.strip()
    text, why = answer_text(answer)
    if text is None:
        raise TypeError(f"reference answer must be a string or a finite number: {why}")
    return text
