"""Tokenizers behind one small interface (torch-free).

`tokenizer.json` (Hugging Face `tokenizers`) is what builds and the runtime use.  A
checkpoint that only has sentencepiece's `tokenizer.model` is read with the
`sentencepiece` library, which is exactly what the original slow Llama tokenizer ran
(`sentencepiece` comes with the `export` extra).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from avg_edge import constants as C
from avg_edge.errors import CheckpointError


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...  # no special tokens
    def decode(self, ids: list[int]) -> str: ...   # special tokens skipped
    def is_byte(self, token: int) -> bool: ...     # a byte-fallback piece (<0xNN>)
    @property
    def vocab_size(self) -> int: ...


class JsonTokenizer:
    """A `tokenizers` tokenizer.json."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as _HFTokenizer

        self.path = Path(path)
        try:
            self._tok = _HFTokenizer.from_file(str(self.path))
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise CheckpointError(f"{self.path}: not a valid tokenizer.json ({e})") from e
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self._bytes = frozenset(i for t, i in vocab.items() if len(t) == 6 and t.startswith("<0x") and t.endswith(">"))

    def is_byte(self, token: int) -> bool:
        return token in self._bytes

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)


class SentencePieceTokenizer:
    """sentencepiece `tokenizer.model`: plain `encode`, as LLaVA's slow LlamaTokenizer did."""

    def __init__(self, path: str | Path) -> None:
        try:
            import sentencepiece as spm
        except ImportError as e:
            raise CheckpointError(
                f"{path}: reading tokenizer.model needs the 'sentencepiece' package "
                "(pip install 'avg-edge[export]'); builds carry tokenizer.json instead"
            ) from e
        self.path = Path(path)
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(str(self.path))
        except (OSError, RuntimeError) as e:
            raise CheckpointError(f"{self.path}: not a valid sentencepiece model ({e})") from e

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text, out_type=int))

    def is_byte(self, token: int) -> bool:
        return bool(self._sp.IsByte(int(token)))

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """tokenizer.json if the folder has one, else tokenizer.model."""
    folder = Path(folder)
    if (folder / C.TOKENIZER_JSON_FILE).is_file():
        return JsonTokenizer(folder / C.TOKENIZER_JSON_FILE)
    if (folder / C.SENTENCEPIECE_FILE).is_file():
        return SentencePieceTokenizer(folder / C.SENTENCEPIECE_FILE)
    raise CheckpointError(
        f"{folder}: no tokenizer (expected {C.TOKENIZER_JSON_FILE} or {C.SENTENCEPIECE_FILE})"
    )
