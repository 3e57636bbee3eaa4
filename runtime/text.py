"""Text helpers: incremental detokenisation for streaming, and exact-match answers."""

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
