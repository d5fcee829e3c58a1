"""Incremental detokenisation with stop strings: turn a growing list of token ids into newly final text.

Text is held back while it might still change: a trailing incomplete UTF-8 sequence (decoded as U+FFFD) or a tail
that could be the beginning of a stop string. When a stop string appears, the text is cut right before it.
"""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT = "\ufffd"


class Detokenizer:
    """Accumulates one request's generated ids and yields only text that will not change any more."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already handed out
        self.text = ""  # the final text (cut before a stop string once stopped)

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; return (newly final text, whether a stop string was hit)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.stop:
            longest = max(len(s) for s in self.stop)
            start = max(0, self.emitted - longest)
            hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                cut = min(hits)
                return self._emit(text[:cut], cut), True
        safe = len(text.rstrip(REPLACEMENT))
        safe -= self._stop_prefix(text[:safe])
        return self._emit(text, safe), False

    def flush(self) -> str:
        """At the end of generation: everything not yet handed out (held-back text included)."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True) if self.ids else ""
        return self._emit(text, len(text))

    def _emit(self, text: str, upto: int) -> str:
        self.text = text[: max(upto, self.emitted)]
        if upto <= self.emitted:
            return ""
        new = text[self.emitted : upto]
        self.emitted = upto
        return new

    def _stop_prefix(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best
