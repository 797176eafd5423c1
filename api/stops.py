"""Stop strings over streamed text: emit what can no longer be the start of a stop string.

The last `longest stop - 1` characters are held back, so a stop split across pieces is still found
and no character of it is ever emitted.

Worked example, stop "END": feed("abcE") -> ("ab", False) holding "cE"; feed("ND!") -> ("c", True).
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(s for s in stops if s)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Add new text; returns (text safe to emit, whether a stop string was reached)."""
        self._pending += text
        hits = [i for i in (self._pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self._pending = self._pending[:min(hits)], ""
            return out, True
        cut = len(self._pending) - self.hold
        if cut <= 0:
            return "", False
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out, False

    def flush(self) -> str:
        """The held-back text, at the end of generation."""
        out, self._pending = self._pending, ""
        return out
