"""Tiny random AVG-LLaVA checkpoints in the released layout, for tests and benchmarks.

Real sizes are 7B; these keep the real 336 px / 14 px geometry (so the 24x24 grid, the
five granularities and the pinpoints are exact) with toy widths.  Needs the `export`
extra (torch, sentencepiece).
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from pathlib import Path

SENTENCES = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: What colour is the background? ASSISTANT: red",
    "How many dots are there in the picture? Three small dots.",
    "Which side is the large circle on? The left side.",
    "What code is printed in the corner? AB12",
]


def train_sentencepiece(folder: Path, vocab_size: int = 400) -> Path:
    """A Llama-style sentencepiece model (unk 0, bos 1, eos 2, byte fallback, dummy prefix)."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 4), model_writer=buf, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        split_digits=True, minloglevel=2,
    )
    path = folder / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "legacy": True,
    }))
    return path


def tiny_config_dict(vocab_size: int = 300, router: bool = True, **over) -> dict:
    """A config.json in the released AVG-LLaVA layout, at toy sizes (grid stays 24x24)."""
    d = {
        "model_type": "llava_llama",
        "architectures": ["LlavaLlamaForCausalLM"],
        "vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "hidden_act": "silu",
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": False,
        "mm_vision_tower": "tiny-clip",
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
        "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": 32,
        "image_aspect_ratio": "anyres",
        # stored as a string, as the released config does
        "image_grid_pinpoints": "[(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]",
        "mm_patch_merge_type": "spatial_unpad",
        "vis_token_granularity": [36, 72, 144, 288, 576],
        "router_select": router,
        "use_cache": True, "torch_dtype": "float16", "some_unknown_key": 123,
    }
    d.update(over)
    return d


TINY_CLIP = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
             "num_hidden_layers": 3, "num_attention_heads": 4, "image_size": 336, "patch_size": 14,
             "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 16}


def randomize_(model, seed: int = 0) -> None:
    """Give every parameter seeded random values large enough to matter."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("voter"):
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))


def make_tiny_checkpoint(folder: Path, router: bool = True, seed: int = 0, max_shard_bytes: int = 400_000) -> Path:
    """Write a sharded layout-1 checkpoint with a tiny CLIP tower folder beside its config."""
    from avg_edge.model import AvgLlavaConfig, AvgLlavaModel
    from avg_edge.model.checkpoint import save_checkpoint

    staging = Path(tempfile.mkdtemp(prefix="avg-tiny-"))
    sp = train_sentencepiece(staging)
    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_file=str(sp)).get_piece_size()
    cfg_dict = tiny_config_dict(vocab_size=vocab, router=router)
    tower = staging / "tiny-clip"
    tower.mkdir()
    (tower / "config.json").write_text(json.dumps(TINY_CLIP))
    config = AvgLlavaConfig.from_dict(cfg_dict, folder=staging)
    model = AvgLlavaModel(config)
    randomize_(model, seed)
    save_checkpoint(model, folder, max_shard_bytes=max_shard_bytes,
                    tokenizer_files=(sp, staging / "tokenizer_config.json"))
    # Keep the released layout's config.json (tower by name, string pinpoints), not ours.
    (folder / "config.json").write_text(json.dumps(cfg_dict, indent=2))
    (folder / "tiny-clip").mkdir()
    (folder / "tiny-clip" / "config.json").write_text(json.dumps(TINY_CLIP))
    shutil.rmtree(staging, ignore_errors=True)
    return folder


def textured_image(width: int, height: int, seed: int = 0):
    """A seeded RGB image with structure (gradients + noise), not a flat colour."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1), (xx + yy) % 256], -1)
    noise = rng.integers(0, 64, size=(height, width, 3))
    return Image.fromarray(((base + noise) % 256).astype(np.uint8), "RGB")
