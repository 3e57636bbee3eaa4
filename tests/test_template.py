"""The prompt pinned to the spec's text, independently of the code that builds it."""

import pytest

from avg_edge.errors import BuildFolderError, InputError
from avg_edge.runtime.chat import DEFAULT_TEMPLATE, ChatTemplate

SPEC_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
               "helpful, detailed, and polite answers to the user's questions.")


def test_vicuna_v1_prompt_is_the_spec_text():
    assert DEFAULT_TEMPLATE.text("What is this?") == SPEC_SYSTEM + " USER: <image>\nWhat is this? ASSISTANT:"
    assert DEFAULT_TEMPLATE.render(["Q"]) == (SPEC_SYSTEM + " USER: ", "\nQ ASSISTANT:")


def test_literal_image_tag_in_a_question_stays_text():
    before, after = DEFAULT_TEMPLATE.render(["what does <image> mean?"])
    assert "<image>" not in before and after == "\nwhat does <image> mean? ASSISTANT:"


def test_multi_turn_follows_llava_separator_style_two():
    """LLaVA's conv_vicuna_v1.get_prompt(): turns end with sep (user) and sep2 (assistant)."""
    before, after = DEFAULT_TEMPLATE.render(["Q1", "A1", "Q2"])
    assert before == SPEC_SYSTEM + " USER: "
    assert after == "\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:"
    assert DEFAULT_TEMPLATE.render(["Q"], system="Be brief.", image=False) == ("Be brief. USER: Q ASSISTANT:", "")


def test_template_round_trips_through_the_manifest_form():
    t = ChatTemplate(name="custom", system="S", roles=("Human", "Bot"), sep="\n", sep2="\n\n")
    assert ChatTemplate.from_dict(t.to_dict()) == t
    assert t.render(["hi"]) == ("S\nHuman: ", "\nhi\nBot:")
    with pytest.raises(BuildFolderError, match="'roles' should be two strings"):
        ChatTemplate.from_dict({**t.to_dict(), "roles": ["one"]})


@pytest.mark.parametrize("turns", [[], ["Q", "A"], ["Q", "  "], ["Q", "A", 3]])
def test_bad_conversations(turns):
    with pytest.raises(InputError):
        DEFAULT_TEMPLATE.render(turns)


@pytest.mark.parametrize("text", ["bad \udcff byte", "\ud800 lone surrogate"])
def test_undecodable_text_is_a_usage_error(text):
    with pytest.raises(InputError, match="expected valid UTF-8 text"):
        DEFAULT_TEMPLATE.render([text])
