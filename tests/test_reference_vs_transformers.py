"""Independent check: at granularity 576 our reference IS LLaVA-NeXT.

Same weights, transformers' own LlavaNextForConditionalGeneration and image processor
(pinpoints given swapped, since transformers reads them as (height, width)): the merged
input embeddings and the logits must agree, for square, tall, wide and tiny images.
"""

from __future__ import annotations

import pytest
import torch

from avg_edge.model.tiny import TINY_CLIP, textured_image

transformers = pytest.importorskip("transformers")

PINPOINTS_WH = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]
VOCAB = 400
IMAGE_TOKEN = VOCAB - 1


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    from avg_edge.model.tiny import randomize_

    vision = {k: v for k, v in TINY_CLIP.items() if k != "model_type"}
    text = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    cfg = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**vision).to_dict(), text_config=text.to_dict(),
        image_grid_pinpoints=[[h, w] for w, h in PINPOINTS_WH], image_token_index=IMAGE_TOKEN,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    hf = LlavaNextForConditionalGeneration(cfg).eval()
    randomize_(hf, seed=3)
    folder = tmp_path_factory.mktemp("hf") / "llava-next-tiny"
    hf.save_pretrained(folder)
    words = "A chat between a curious user and an artificial intelligence assistant . The gives helpful , detailed polite answers to the user's questions USER : ASSISTANT What is in picture ? colour".split()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(dict.fromkeys(words))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    return folder, hf


def _hf_pixels(image):
    from transformers import LlavaNextImageProcessor

    proc = LlavaNextImageProcessor(
        image_grid_pinpoints=[[h, w] for w, h in PINPOINTS_WH], size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
        do_pad=True,
    )
    out = proc(images=image, return_tensors="pt")
    return out["pixel_values"], out["image_sizes"]


@pytest.mark.parametrize("size", [(672, 672), (640, 480), (300, 900), (1200, 300), (40, 60), (500, 500)],
                         ids=["square", "640x480", "tall", "wide", "tiny", "square500"])
def test_embeddings_and_logits_match_llava_next(hf_folder, size):
    from avg_edge.model import load_model

    folder, hf = hf_folder
    ours = load_model(folder)
    assert ours.config.source_layout == "llava_next" and ours.router is None
    image = textured_image(*size, seed=sum(size))
    question = "What is in the picture ?"
    prep = ours.prepare(image, question, granularity=576)

    input_ids = prep.ids_before + [IMAGE_TOKEN] * prep.visual_tokens + prep.ids_after
    pixel_values, image_sizes = _hf_pixels(image)
    captured = {}

    def grab(_module, args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"].detach().clone()

    handle = hf.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            out = hf(input_ids=torch.tensor([input_ids]), pixel_values=pixel_values, image_sizes=image_sizes)
    finally:
        handle.remove()

    hf_embeds = captured["embeds"]
    assert hf_embeds.shape == prep.inputs_embeds.shape, "visual token count differs from LLaVA-NeXT"
    torch.testing.assert_close(prep.inputs_embeds, hf_embeds, atol=2e-5, rtol=1e-4)
    ours_logits = ours.forward_logits(prep.inputs_embeds)
    torch.testing.assert_close(ours_logits, out.logits, atol=1e-4, rtol=1e-4)
    # The comparison could fail: the image tokens are not all equal to one another.
    assert prep.inputs_embeds[0, len(prep.ids_before):].std(dim=0).mean() > 1e-3
