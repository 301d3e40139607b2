"""The ranges of the sampling fields, declared once (no torch: the server's API layer imports this).

Three places check them and must agree: the server's request models (`corral.stack.api`, Pydantic
`Field` bounds made by `Range.field`), the engine (`SamplingParams.validate`, messages made by
`Range.check`), and the CLI's sampling options (help text from `Range.text`). The bounds are
OpenAI's where OpenAI has the field (temperature 0..2, penalties -2..2, top_logprobs 0..20, at most
4 stop sequences) and vLLM's for its extensions (top_k, min_p, repetition_penalty).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Range:
    """A closed (or left-open) interval of numbers; `integer` also requires an int (not a bool)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # lo itself is excluded (top_p > 0)
    integer: bool = False

    def _fmt(self, x: float) -> str:
        return str(int(x)) if self.integer else f"{x:g}"

    def problem(self, value) -> str | None:
        """Why `value` is outside the range ("must be >= 0, got -1"), or None if it is inside."""
        if self.integer:
            if isinstance(value, bool) or not isinstance(value, int):
                return f"must be an integer, got {value!r}"
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            return f"must be a number, got {value!r}"
        if self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)):
            return f"must be {'>' if self.lo_open else '>='} {self._fmt(self.lo)}, got {value!r}"
        if self.hi is not None and value > self.hi:
            return f"must be <= {self._fmt(self.hi)}, got {value!r}"
        if not self.integer and math.isinf(value):
            return f"must be finite, got {value!r}"
        return None

    def check(self, name: str, value) -> None:
        """Raise ValueError("name must be ..., got ...") if `value` is outside the range."""
        why = self.problem(value)
        if why is not None:
            raise ValueError(f"{name} {why}")

    def field(self) -> dict:
        """Pydantic `Field` keyword bounds: `Field(None, **TOP_P.field())`."""
        out = {}
        if self.lo is not None:
            out["gt" if self.lo_open else "ge"] = self.lo
        if self.hi is not None:
            out["le"] = self.hi
        if not self.integer:
            out["allow_inf_nan"] = False
        return out

    @property
    def text(self) -> str:
        """For help text: "0..2", "(0, 1]", ">= 0", "> 0"."""
        if self.lo is not None and self.hi is not None:
            if self.lo_open:
                return f"({self._fmt(self.lo)}, {self._fmt(self.hi)}]"
            return f"{self._fmt(self.lo)}..{self._fmt(self.hi)}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {self._fmt(self.lo)}"
        return f"<= {self._fmt(self.hi)}" if self.hi is not None else "any"


TEMPERATURE = Range(0.0, 2.0)  # 0 = greedy
TOP_P = Range(0.0, 1.0, lo_open=True)  # 1 = off
TOP_K = Range(0, integer=True)  # 0 = off
MIN_P = Range(0.0, 1.0)  # 0 = off
REPETITION_PENALTY = Range(0.0, lo_open=True)  # 1 = off
FREQUENCY_PENALTY = Range(-2.0, 2.0)
PRESENCE_PENALTY = Range(-2.0, 2.0)
LOGPROBS = Range(0, 20, integer=True)  # alternatives reported per token (chat top_logprobs, text logprobs)
SEED = Range(-(2**63), 2**64 - 1, integer=True)  # what a torch.Generator takes (signed or unsigned 64-bit)
N = Range(1, 8, integer=True)  # choices per request
MAX_TOKENS = Range(1, integer=True)  # a request's max_tokens (the engine also takes 0: generate nothing)
ENGINE_MAX_TOKENS = Range(0, integer=True)
MAX_STOP = 4  # stop sequences per request
