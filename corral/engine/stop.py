"""Stop strings over streamed text, with the least holdback that is still safe.

Text arrives in deltas (one per token). A stop string may span deltas ("<|end" + "|>"), so the tail
of the text that could still become a stop string is held back; everything before it is released.
When a stop string completes, the text before it is released and the rest is dropped, so a stop
string is never streamed, not even partly.
"""

from __future__ import annotations


class StopStringMatcher:
    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""  # text held back: a suffix that is a prefix of some stop string
        self.stopped = False

    def push(self, text: str) -> tuple[str, bool]:
        """Add a delta; return (text safe to release, whether a stop string completed)."""
        if not self.stops:
            return text, False
        buffer = self.pending + text
        hits = [i for i in (buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending, self.stopped = "", True
            return buffer[: min(hits)], True
        hold = self._held_suffix(buffer)
        self.pending = buffer[len(buffer) - hold:] if hold else ""
        return buffer[: len(buffer) - hold], False

    def flush(self) -> str:
        """The generation ended without a stop string: release what was held back."""
        out, self.pending = self.pending, ""
        return out

    def _held_suffix(self, buffer: str) -> int:
        """Length of the longest suffix of buffer that is a proper prefix of a stop string."""
        for n in range(min(len(buffer), max(len(s) for s in self.stops) - 1), 0, -1):
            tail = buffer[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0
