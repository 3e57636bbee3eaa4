"""Text helpers: incremental detokenisation for streaming, stop sequences, and exact-match answers."""

from __future__ import annotations

from avg_edge.runtime.tokenizer import Tokenizer


class TextStream:
    """Incremental detokenisation: decode the whole answer each step and emit what is new.
    Byte-fallback pieces (<0xNN>) are held back until a normal piece follows, because
    the decoder turns a run of bytes into characters only as a whole."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        if self.tokenizer.is_byte(token):
            return ""
        text = self.tokenizer.decode(self.ids).lstrip()
        if text.endswith("\ufffd") or not text.startswith(self.emitted):
            return ""
        piece, self.emitted = text[len(self.emitted):], text
        return piece

    def flush(self) -> str:
        """Whatever was held back (a trailing partial character) once the answer ends."""
        text = self.tokenizer.decode(self.ids).lstrip()
        piece = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        self.emitted = text
        return piece


class StopText:
    """Text pieces cut at the first stop sequence (OpenAI's `stop`): a tail that could
    still become a stop sequence is held back until the next piece tells."""

    def __init__(self, stops: tuple[str, ...] | list[str] = ()) -> None:
        self.stops = tuple(s for s in stops if s)
        self.held = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        """The part of `piece` (after what was held) that is certainly answer text; once a
        stop sequence appears, `stopped` is True and nothing after it is returned."""
        if self.stopped:
            return ""
        text = self.held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.held = True, ""
            return text[:min(hits)]
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        rest, self.held = self.held, ""
        return "" if self.stopped else rest


def normalize_answer(text: str) -> str:
    """Exact-match comparison of short answers: lower case, single spaces."""
    return " ".join(text.lower().split())


def is_correct(text: str, answer: str) -> bool:
    return normalize_answer(text) == normalize_answer(answer)


class Accuracy:
    """Exact-match counter: add (text, answer) pairs, read `percent`."""

    def __init__(self) -> None:
        self.right = 0
        self.total = 0

    def add(self, text: str, answer: str) -> bool:
        ok = is_correct(text, answer)
        self.right += ok
        self.total += 1
        return ok

    @property
    def percent(self) -> float:
        return 100.0 * self.right / self.total if self.total else 0.0
