"""AVG-LLaVA in PyTorch: the reference every export and runtime path is checked against."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from avg_edge.errors import InputError
from avg_edge.model.config import AvgLlavaConfig
from avg_edge.model.router import GranularityRouter
from avg_edge.model.scaler import pack_image, scale_all
from avg_edge.model.vision import Projector, VisionTower
from avg_edge.runtime.chat import DEFAULT_TEMPLATE, prompt_ids, router_text_ids
from avg_edge.runtime.image import load_image
from avg_edge.runtime.packing import visual_token_count
from avg_edge.runtime.pipeline import Result
from avg_edge.runtime.preprocess import PreprocessConfig, PreprocessedImage, preprocess_image
from avg_edge.runtime.tokenizer import Tokenizer

log = logging.getLogger("avg_edge")


@dataclass
class PreparedInputs:
    """Everything between the image and the decoder, for one image + question."""

    inputs_embeds: torch.Tensor          # [1, N, D]
    granularity: int
    router_logits: torch.Tensor | None   # [n_granularities]
    visual_tokens: int
    ids_before: list[int]
    ids_after: list[int]
    image: PreprocessedImage
    scaled: dict[int, torch.Tensor] = field(repr=False)  # {g: [crops, g, D]}


def _llama_config(config: AvgLlavaConfig) -> LlamaConfig:
    t = config.text
    return LlamaConfig(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads, head_dim=t.head_dim,
        max_position_embeddings=t.max_position_embeddings, rms_norm_eps=t.rms_norm_eps,
        rope_theta=t.rope_theta, rope_scaling=t.rope_scaling, hidden_act=t.hidden_act,
        attention_bias=t.attention_bias, mlp_bias=t.mlp_bias, tie_word_embeddings=t.tie_word_embeddings,
        bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id, pad_token_id=t.pad_token_id,
    )


class AvgLlavaModel(nn.Module):
    """Vision tower -> projector -> scaler -> (router) -> spatial_unpad packing -> Llama."""

    def __init__(self, config: AvgLlavaConfig, tokenizer: Tokenizer | None = None) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.vision_tower = VisionTower(config)
        self.mm_projector = Projector(config)
        self.image_newline = nn.Parameter(torch.zeros(config.hidden_size))
        self.router = GranularityRouter(config) if config.has_router else None
        self.language_model = LlamaForCausalLM(_llama_config(config))
        self.preprocess_config = PreprocessConfig(
            crop_size=config.crop_size, pinpoints=config.pinpoints,
            mean=config.image_mean, std=config.image_std,
        )
        self._said_no_router = False
        self.eval()

    # -- parts -------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[crops, 3, 336, 336] -> projected patch features [crops, 576, D]."""
        feats = self.vision_tower(pixel_values.to(self.dtype))   # [crops, 576, 1024]
        return self.mm_projector(feats)                          # [crops, 576, D]

    def embed_ids(self, ids: list[int]) -> torch.Tensor:
        table = self.language_model.get_input_embeddings()
        return table(torch.tensor(ids, dtype=torch.long))         # [T, D]

    def router_text(self, before: list[int], after: list[int], question_ids: list[int]) -> torch.Tensor:
        """The embeddings the router's text filter chooses from [T, D] (all of the prompt,
        or the question alone: config.router_text_candidates)."""
        ids = router_text_ids(self.config.router_text_candidates, before, after, question_ids)
        return self.embed_ids(ids)                                   # [T, D]; T may be 0

    def cast_(self, dtype: torch.dtype) -> "AvgLlavaModel":
        """Convert weights to `dtype` in place, keeping RoPE's inverse frequencies in fp32
        (in fp16 they are rounded enough that position x frequency drifts by radians
        at long context)."""
        rotary = self.language_model.model.rotary_emb
        keep = {n: b.detach().clone() for n, b in rotary.named_buffers(recurse=False)}
        original = getattr(rotary, "original_inv_freq", None)
        self.to(dtype)
        for n, b in keep.items():
            setattr(rotary, n, b)
        if isinstance(original, torch.Tensor):
            rotary.original_inv_freq = original.detach().clone().float()
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.image_newline.dtype

    def check_granularity(self, granularity: Any) -> int | None:
        valid = list(self.config.granularities)
        if granularity is None or granularity == "auto":
            return None
        if isinstance(granularity, bool) or not isinstance(granularity, (int, np.integer)) or int(granularity) not in valid:
            raise InputError(f"granularity: expected one of {valid} or None (router), got {granularity!r}")
        return int(granularity)

    def choose(self, scaled: dict[int, torch.Tensor], text: torch.Tensor, granularity: int | None) -> tuple[int, torch.Tensor | None]:
        if granularity is not None:
            return granularity, None
        if self.router is None:
            if not self._said_no_router:
                log.warning("this checkpoint has no router: using the finest granularity %d "
                            "(pass granularity= to choose another)", self.config.granularities[-1])
                self._said_no_router = True
            return self.config.granularities[-1], None
        logits = self.router(scaled, text)                        # [5]
        return self.config.granularities[int(torch.argmax(logits))], logits

    # -- image + question -> decoder inputs (grad-capable pieces, used by training) --
    def visual_features(self, pixel_values: torch.Tensor) -> dict[int, torch.Tensor]:
        """All granularities of every crop: {g: [crops, g, D]}."""
        return scale_all(self.encode_images(pixel_values), self.config.granularities)

    def assemble(self, scaled: dict[int, torch.Tensor], granularity: int, image: PreprocessedImage,
                 emb_before: torch.Tensor, emb_after: torch.Tensor) -> torch.Tensor:
        """[prompt before | packed visual tokens | prompt after] -> [N, D]."""
        visual = pack_image(scaled[granularity], image.grid, image.image_size, self.image_newline)  # [V, D]
        return torch.cat([emb_before, visual, emb_after])                  # [N, D]

    @torch.no_grad()
    def prepare(self, image: Any, question: str, granularity: int | None = None) -> PreparedInputs:
        gran = self.check_granularity(granularity)
        if self.tokenizer is None:
            raise InputError("this model has no tokenizer: load it with load_model(folder)")
        before, after = prompt_ids(self.tokenizer.encode, self.config.text.bos_token_id, *DEFAULT_TEMPLATE.render([question]))
        pre = preprocess_image(load_image(image), self.preprocess_config)
        scaled = self.visual_features(torch.from_numpy(pre.pixel_values))  # {g: [crops, g, D]}
        emb_before = self.embed_ids(before)                                # [Tb, D]
        emb_after = self.embed_ids(after)                                  # [Ta, D]
        router_text = self.router_text(before, after, self.tokenizer.encode(question))
        chosen, logits = self.choose(scaled, router_text, gran)
        embeds = self.assemble(scaled, chosen, pre, emb_before, emb_after)[None]  # [1, N, D]
        visual_tokens = embeds.shape[1] - len(before) - len(after)
        ctx = self.config.text.max_position_embeddings
        if embeds.shape[1] >= ctx:
            raise InputError(f"prompt is {embeds.shape[1]} tokens ({visual_tokens} visual); the context holds {ctx}")
        return PreparedInputs(embeds, chosen, logits, visual_tokens, before, after, pre, scaled)

    # -- generation ------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, image: Any, question: str, granularity: int | None = None, max_new_tokens: int = 64) -> Result:
        """Greedy answer (the runtime's Result type; timings are not measured here).
        `granularity=None` lets the router choose; an int forces one."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens: expected a positive integer, got {max_new_tokens!r}")
        prep = self.prepare(image, question, granularity)
        ids, finish = self.greedy(prep.inputs_embeds, max_new_tokens)
        logits = None if prep.router_logits is None else prep.router_logits.double()
        return Result(
            text=self.tokenizer.decode(ids).strip(),
            token_ids=ids,
            granularity=prep.granularity,
            router_logits=None if logits is None else logits.tolist(),
            router_probs=None if logits is None else torch.softmax(logits, 0).tolist(),
            visual_tokens=prep.visual_tokens,
            visual_tokens_full=visual_token_count(self.config.granularities[-1], prep.image.grid, prep.image.image_size),
            finish_reason=finish,
        )

    @torch.no_grad()
    def greedy(self, inputs_embeds: torch.Tensor, max_new_tokens: int) -> tuple[list[int], str]:
        """Greedy decoding with the KV cache: (ids up to </s>, not included; "stop" or "length")."""
        eos = self.config.text.eos_token_id
        room = self.config.text.max_position_embeddings - inputs_embeds.shape[1]
        out = self.language_model(inputs_embeds=inputs_embeds.to(self.dtype), use_cache=True, logits_to_keep=1)
        ids: list[int] = []
        for _ in range(min(max_new_tokens, room)):
            nxt = int(out.logits[0, -1].argmax())
            if nxt == eos:
                return ids, "stop"
            ids.append(nxt)
            out = self.language_model(input_ids=torch.tensor([[nxt]]), cache=out.cache, use_cache=True, logits_to_keep=1)
        return ids, "length"

    def forward_logits(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """Logits for every position of [1, N, D] embeddings (tests and scoring)."""
        return self.language_model(inputs_embeds=inputs_embeds.to(self.dtype)).logits
