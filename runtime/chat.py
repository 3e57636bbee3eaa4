"""The chat template (read from the build's manifest) and LLaVA's tokenisation around the
image (torch-free).

The template is LLaVA's `Conversation` with separator style TWO, which is vicuna_v1:
    SYSTEM + sep + "USER: <image>\\nQ1" + sep + "ASSISTANT: A1" + sep2 + "USER: Q2" + sep + "ASSISTANT:"
LLaVA's `tokenizer_image_token` splits the prompt on `<image>`, tokenises each chunk on
its own (so the chunk after the image gets its own leading-space piece) and keeps the
BOS only at the very start.  We render the template around the image ourselves instead
of splitting the user's text, so a literal "<image>" typed in a question stays text.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

from avg_edge import constants as C
from avg_edge.errors import BuildFolderError, InputError


def check_question(question: object, what: str = "question") -> str:
    if not isinstance(question, str):
        raise InputError(f"{what}: expected a string, got {type(question).__name__}")
    if not question.strip():
        raise InputError(f"{what}: expected some text, got an empty {what}")
    try:
        question.encode("utf-8")
    except UnicodeEncodeError as e:         # a lone surrogate, or undecodable bytes from argv
        raise InputError(f"{what}: expected valid UTF-8 text, got an undecodable character at position {e.start} "
                         f"({question[max(e.start - 10, 0):e.start]!r} is what precedes it)") from None
    return question


@dataclass(frozen=True)
class ChatTemplate:
    """LLaVA's conversation template with separator style TWO (vicuna_v1 by default)."""

    name: str = "vicuna_v1"
    system: str = C.VICUNA_V1_SYSTEM
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = " "
    sep2: str = "</s>"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "roles": list(self.roles)}

    @classmethod
    def from_dict(cls, d: Any, where: str = "manifest.json chat_template") -> "ChatTemplate":
        if not isinstance(d, dict):
            raise BuildFolderError(f"{where}: expected an object, got {type(d).__name__}")
        for key in ("name", "system", "sep", "sep2"):
            if not isinstance(d.get(key), str):
                raise BuildFolderError(f"{where}: '{key}' should be a string, got {d.get(key)!r:.60}")
        roles = d.get("roles")
        if not (isinstance(roles, list) and len(roles) == 2 and all(isinstance(r, str) and r for r in roles)):
            raise BuildFolderError(f"{where}: 'roles' should be two strings (user, assistant), got {roles!r:.60}")
        return cls(d["name"], d["system"], (roles[0], roles[1]), d["sep"], d["sep2"])

    def render(self, turns: Sequence[str], system: str | None = None, image: bool = True,
               image_turn: int = 0) -> tuple[str, str]:
        """The prompt around the image: (text before it, text after it).

        `turns` alternate user, assistant, ..., user (the last turn is the question the
        answer follows); the image opens user turn `image_turn` (an index into `turns`,
        the first turn by default, as LLaVA puts it).  Without an image the whole prompt
        is the first element."""
        if not turns or len(turns) % 2 == 0:
            raise InputError(f"conversation: expected user and assistant turns alternating and ending with a user "
                             f"turn, got {len(turns)} turn(s)")
        if image and not (0 <= image_turn < len(turns) and image_turn % 2 == 0):
            raise InputError(f"conversation: the image must open a user turn (an even index below {len(turns)}), "
                             f"got turn {image_turn}")
        for i, text in enumerate(turns):
            check_question(text, "question" if i % 2 == 0 else "assistant message")
        seps = (self.sep, self.sep2)
        parts = [(self.system if system is None else system) + self.sep]
        cut = 0
        for i, text in enumerate(turns):
            head = f"{self.roles[i % 2]}: "
            if image and i == image_turn:
                cut = sum(map(len, parts)) + len(head)          # just after "USER: " of the image's turn
                head += "\n"
            parts.append(head + text + seps[i % 2])
        parts.append(f"{self.roles[1]}:")
        text = "".join(parts)
        if not image:
            return text, ""
        return text[:cut], text[cut:]

    def text(self, question: str) -> str:
        """One question about one image, with the placeholder where the image goes."""
        before, after = self.render([question])
        return before + C.IMAGE_PLACEHOLDER + after


DEFAULT_TEMPLATE = ChatTemplate()


def prompt_ids(encode: Callable[[str], list[int]], bos_id: int, before: str, after: str) -> tuple[list[int], list[int]]:
    """Token ids before and after the visual tokens; `encode` adds no special tokens."""
    return [bos_id, *encode(before)], (list(encode(after)) if after else [])


def router_text_ids(text_from: str, before: list[int], after: list[int], question_ids: list[int]) -> list[int]:
    """The token ids the router's text filter chooses from: the whole prompt around the
    image (the spec) or the question's own ids, encoded alone without special tokens
    (config "router_text_candidates", manifest router.text_from)."""
    if text_from == C.ROUTER_TEXT_FROM_PROMPT:
        return [*before, *after]
    if text_from == C.ROUTER_TEXT_FROM_QUESTION:
        return list(question_ids)
    raise ValueError(f"router text candidates: expected one of {list(C.ROUTER_TEXT_FROM)}, got {text_from!r}")
