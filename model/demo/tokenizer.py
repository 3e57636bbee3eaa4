"""A word-level tokenizer.json for the demo (tokenizers: WordLevel + Whitespace)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers

from avg_edge import constants as C
from avg_edge.runtime.chat import DEFAULT_TEMPLATE
from avg_edge.model.demo.data import all_answers, all_questions

SPECIALS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2


def vocabulary() -> list[str]:
    """Specials, then every word of the template, the questions and the answers (sorted)."""
    pre = pre_tokenizers.Whitespace()
    # "{question}" stays in: the shipped vocabulary has its "{", "question" and "}".
    texts = [DEFAULT_TEMPLATE.text("{question}").replace(C.IMAGE_PLACEHOLDER, " "), *all_questions(), *all_answers()]
    words = {w for t in texts for w, _ in pre.pre_tokenize_str(t)}
    return [*SPECIALS, *sorted(words - set(SPECIALS))]


def build_tokenizer() -> Tokenizer:
    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(SPECIALS))
    return tok


def write_tokenizer(path: str | Path) -> Path:
    path = Path(path)
    build_tokenizer().save(str(path))
    return path
