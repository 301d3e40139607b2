"""Llama Guard's answer, read strictly: `safe`, or `unsafe` and a line of violated category codes.

    parse_verdict("unsafe\\nS1,S10", codes=["S1", ..., "S13"])   # -> Verdict(safe=False, codes=("S1", "S10"))

Whitespace around the answer and around each code is allowed; anything else (an empty answer, `unsafe`
with no codes, a code the policy does not have, a third line, prose) is a `GuardOutputError`, never a
"safe". Codes the operator excluded are dropped from the verdict: an answer whose every code is
excluded is safe (llama-stack's rule), but the codes the guard gave stay in `reported`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

SAFE, UNSAFE = "safe", "unsafe"


class GuardOutputError(ValueError):
    """The guard answered something that is not a verdict."""


@dataclass(frozen=True)
class Verdict:
    safe: bool
    codes: tuple[str, ...] = ()  # violated categories, in the guard's order, excluded ones removed
    reported: tuple[str, ...] = ()  # every code the guard gave

    @property
    def label(self) -> str:
        return SAFE if self.safe else UNSAFE


def parse_verdict(text: str, *, codes: Iterable[str], excluded: Iterable[str] = ()) -> Verdict:
    """`codes`: every code the policy has (excluded ones included, so an excluded answer is recognised)."""
    known, excluded = set(codes), set(excluded)
    answer = text.strip()
    if answer == SAFE:
        return Verdict(True)
    lines = answer.split("\n")
    if len(lines) != 2 or lines[0].strip() != UNSAFE:
        raise GuardOutputError(f"unexpected guard output {_short(text)}: expected 'safe' or 'unsafe' and a line "
                               "of category codes")
    reported = []
    for item in lines[1].split(","):
        code = item.strip()
        if code not in known:
            raise GuardOutputError(f"unexpected guard output {_short(text)}: {code!r} is not a category of the "
                                   f"policy ({', '.join(sorted(known, key=_code_order))})")
        if code not in reported:
            reported.append(code)
    violated = tuple(c for c in reported if c not in excluded)
    return Verdict(not violated, violated, tuple(reported))


def _code_order(code: str):
    digits = code.lstrip("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    return (code[: len(code) - len(digits)], int(digits) if digits.isdigit() else 0, code)


def _short(text: str) -> str:
    return repr(text if len(text) <= 80 else text[:80] + "...")
