"""Pieces shared by training and evaluation: the demo model's sizes, prompts, answer NLL
with a shared visual prefix, and greedy answers for every granularity from one encoding."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from avg_edge.model.config import AvgLlavaConfig, TextConfig, VisionConfig
from avg_edge.model.llava import AvgLlavaModel
from avg_edge.model.demo.data import QA, Sample
from avg_edge.runtime.chat import DEFAULT_TEMPLATE, prompt_ids
from avg_edge.runtime.preprocess import PreprocessedImage, preprocess_image
from avg_edge.runtime.text import is_correct
from avg_edge.runtime.tokenizer import Tokenizer


def demo_config(vocab_size: int, decoder_layers: int = 2) -> AvgLlavaConfig:
    """Spec architecture at small sizes: ViT 336/14 (24x24 grid), Llama decoder, router."""
    return AvgLlavaConfig(
        text=TextConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=256,
                        num_hidden_layers=decoder_layers, num_attention_heads=4, num_key_value_heads=4,
                        head_dim=32, max_position_embeddings=4096, pad_token_id=0),
        vision=VisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                            num_attention_heads=4, image_size=336, patch_size=14, projection_dim=64),
        vision_tower="avg-edge-demo-clip",
        has_router=True,
    )


@dataclass
class Prompt:
    before: list[int]
    after: list[int]
    answer: list[int]   # answer ids + </s>
    question: list[int]  # the question's own ids (the router's candidates under "question")


def encode_qa(tok: Tokenizer, config: AvgLlavaConfig, qa: QA) -> Prompt:
    before, after = prompt_ids(tok.encode, config.text.bos_token_id, *DEFAULT_TEMPLATE.render([qa.question]))
    return Prompt(before, after, [*tok.encode(qa.answer), config.text.eos_token_id], list(tok.encode(qa.question)))


def prefix_cache(model: AvgLlavaModel, scaled: dict[int, torch.Tensor], g: int, pre: PreprocessedImage,
                 before: list[int]):
    """Run [prompt before | visual tokens at g] once; returns the decoder's KV cache."""
    emb_before = model.embed_ids(before)                                       # [Tb, D]
    empty = emb_before[:0]                                                     # [0, D]
    prefix = model.assemble(scaled, g, pre, emb_before, empty)[None]           # [1, P, D]
    return model.language_model.model(inputs_embeds=prefix, use_cache=True).cache


def answer_nll(model: AvgLlavaModel, scaled: dict[int, torch.Tensor], g: int, pre: PreprocessedImage,
               prompts: list[Prompt]) -> torch.Tensor:
    """Mean NLL of each answer (+ </s>) at granularity g -> [B].  The image prefix is
    computed once and its cache shared by the B questions (right padding is harmless
    under a causal mask)."""
    cache = prefix_cache(model, scaled, g, pre, prompts[0].before)
    cache.batch_repeat_interleave(len(prompts))
    seqs = [p.after + p.answer for p in prompts]
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)                      # [B, L]
    target = torch.full((len(seqs), width), -100, dtype=torch.long)            # [B, L]
    for b, (p, s) in enumerate(zip(prompts, seqs)):
        ids[b, : len(s)] = torch.tensor(s)
        a0 = len(p.after)
        target[b, a0 - 1: a0 - 1 + len(p.answer)] = torch.tensor(p.answer)     # logits at t predict t+1
    logits = model.language_model(input_ids=ids, cache=cache).logits          # [B, L, V]
    nll = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")    # [B, L]
    mask = (target != -100).float()                                            # [B, L]
    return (nll * mask).sum(1) / mask.sum(1)                                   # [B]


def encode_image(model: AvgLlavaModel, image) -> tuple[PreprocessedImage, torch.Tensor]:
    """AnyRes crops and the vision tower's patch features [crops, 576, Dv]."""
    pre = preprocess_image(image, model.preprocess_config)
    feats = model.vision_tower(torch.from_numpy(pre.pixel_values))             # [crops, 576, Dv]
    return pre, feats


def scaled_from_tower(model: AvgLlavaModel, feats: torch.Tensor) -> dict[int, torch.Tensor]:
    from avg_edge.model.scaler import scale_all

    return scale_all(model.mm_projector(feats), model.config.granularities)   # {g: [crops, g, D]}


@dataclass
class Answer:
    kind: str
    setting: str          # "36" ... "576" or "router"
    granularity: int
    correct: bool
    visual_tokens: int
    seconds: float


@torch.no_grad()
def answer_all(model: AvgLlavaModel, tok: Tokenizer, s: Sample, with_router: bool = True) -> list[Answer]:
    """Every question of a sample at every fixed granularity (and with the router),
    from one vision encoding.  Seconds = this image's vision time + the setting's own."""
    t0 = time.perf_counter()
    pre, feats = encode_image(model, s.image)
    scaled = scaled_from_tower(model, feats)
    t_vision = time.perf_counter() - t0
    settings: list[int | None] = [*model.config.granularities] + ([None] if with_router else [])
    out: list[Answer] = []
    for qa in s.qas:
        p = encode_qa(tok, model.config, qa)
        for setting in settings:
            t1 = time.perf_counter()
            eb, ea = model.embed_ids(p.before), model.embed_ids(p.after)       # [Tb, D], [Ta, D]
            g, _ = model.choose(scaled, model.router_text(p.before, p.after, p.question), setting)
            embeds = model.assemble(scaled, g, pre, eb, ea)[None]              # [1, N, D]
            text = tok.decode(model.greedy(embeds, max_new_tokens=4)[0])
            dt = time.perf_counter() - t1 + t_vision
            out.append(Answer(qa.kind, "router" if setting is None else str(setting), g,
                              is_correct(text, qa.answer),
                              embeds.shape[1] - len(p.before) - len(p.after), dt))
    return out
