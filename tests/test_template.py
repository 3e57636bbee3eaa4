"""The prompt pinned to the spec's text, independently of the code that builds it."""

from avg_edge.runtime.chat import prompt_chunks, prompt_text

SPEC_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
               "helpful, detailed, and polite answers to the user's questions.")


def test_vicuna_v1_prompt_is_the_spec_text():
    assert prompt_text("What is this?") == SPEC_SYSTEM + " USER: <image>\nWhat is this? ASSISTANT:"
    assert prompt_chunks("Q") == (SPEC_SYSTEM + " USER: ", "\nQ ASSISTANT:")


def test_literal_image_tag_in_a_question_stays_text():
    before, after = prompt_chunks("what does <image> mean?")
    assert "<image>" not in before and after == "\nwhat does <image> mean? ASSISTANT:"
