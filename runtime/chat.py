"""vicuna_v1 prompt and LLaVA's tokenisation around the image (torch-free).

LLaVA's `tokenizer_image_token` splits the prompt on `<image>`, tokenises each chunk on
its own (so the chunk after the image gets its own leading-space piece) and keeps the
BOS only at the very start.  We split the template, not the user's text, so a literal
"<image>" typed in a question stays text.
"""

from __future__ import annotations

from typing import Callable

from avg_edge import constants as C
from avg_edge.errors import InputError

TEMPLATE_BEFORE_IMAGE, TEMPLATE_AFTER_IMAGE = C.VICUNA_V1_TEMPLATE.split(C.IMAGE_PLACEHOLDER)


def check_question(question: object) -> str:
    if not isinstance(question, str):
        raise InputError(f"question: expected a string, got {type(question).__name__}")
    if not question.strip():
        raise InputError("question: expected some text, got an empty question")
    return question


def prompt_chunks(question: str) -> tuple[str, str]:
    """The vicuna_v1 prompt around the image: (text before, text after)."""
    return TEMPLATE_BEFORE_IMAGE, TEMPLATE_AFTER_IMAGE.format(question=check_question(question))


def prompt_text(question: str) -> str:
    before, after = prompt_chunks(question)
    return before + C.IMAGE_PLACEHOLDER + after


def prompt_ids(encode: Callable[[str], list[int]], bos_id: int, question: str) -> tuple[list[int], list[int]]:
    """Token ids before and after the visual tokens; `encode` adds no special tokens."""
    before, after = prompt_chunks(question)
    return [bos_id, *encode(before)], list(encode(after))
