"""Random AVG-LLaVA checkpoints in the released layout, for tests and benchmarks.

    python -m avg_edge.model.tiny OUT                          # toy widths (tests)
    python -m avg_edge.model.tiny --preset 7b --layers 2 OUT   # the real widths, N decoder layers

Toy checkpoints keep the real 336 px / 14 px geometry (so the 24x24 grid, the five
granularities and the pinpoints are exact) at toy widths.  The `7b` preset has the
released AVG-LLaVA-7B's widths exactly (CLIP ViT-L/14-336, the 4096-wide router, Llama
4096/11008/32 heads, vocabulary 32000 with a sentencepiece tokenizer of that size) with
N decoder layers instead of 32, written tensor by tensor into bf16 shards so that making
it needs little memory.  Needs the `export` extra (torch, sentencepiece).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

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


# -- full-width checkpoints ---------------------------------------------------------------
def sentencepiece_of_size(folder: Path, vocab_size: int) -> Path:
    """A Llama-style sentencepiece model with exactly `vocab_size` pieces: a small BPE
    model trained on SENTENCES, padded with pieces that no merge reaches (so both
    sentencepiece and the converted tokenizer.json tokenise text the same way)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    path = train_sentencepiece(folder)
    proto = pb.ModelProto()
    proto.ParseFromString(path.read_bytes())
    have = {p.piece for p in proto.pieces}
    low = min(p.score for p in proto.pieces) - 1.0
    i = 0
    while len(proto.pieces) < vocab_size:
        piece = "\u2581" + "".join(chr(ord("a") + int(d)) for d in f"{i:06d}")   # "▁aaaaab": never merged into
        i += 1
        if piece in have:
            continue
        proto.pieces.add(piece=piece, score=low - i * 1e-3, type=pb.ModelProto.SentencePiece.NORMAL)
    proto.trainer_spec.vocab_size = vocab_size
    path.write_bytes(proto.SerializeToString())
    return path


def _init_tensor(name: str, shape: tuple[int, ...], seed: int):
    """A seeded tensor whose scale keeps activations O(1): weight matrices N(0, 1/fan_in),
    norm weights near 1, biases small, embeddings, the image newline and the router's
    voter N(0, 1) (the voter as the original initialises it)."""
    import torch

    digest = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")
    g = torch.Generator().manual_seed(digest)
    x = torch.randn(shape, generator=g)
    leaf = name.rsplit(".", 1)[-1]
    if ("norm" in name or "layrnorm" in name) and leaf == "weight":
        x = 1.0 + 0.05 * x
    elif leaf == "bias" or name.endswith("in_proj_bias"):
        x = 0.02 * x
    elif name.endswith(("embed_tokens.weight", "image_newline", "router.voter", "class_embedding")):
        pass
    elif name.endswith("position_embedding.weight"):
        x = 0.02 * x
    elif len(shape) >= 2:
        fan_in = 1
        for d in shape[1:]:
            fan_in *= d
        x = x / fan_in ** 0.5
    return x


def full_width_config(preset: str, layers: int) -> dict:
    from avg_edge.model.config import AVG_LLAVA_7B_CONFIG

    if preset != "7b":
        raise ValueError(f"--preset: expected 7b, got {preset!r}")
    if layers < 1:
        raise ValueError(f"--layers: expected at least 1, got {layers}")
    return {**AVG_LLAVA_7B_CONFIG, "architectures": ["LlavaLlamaForCausalLM"], "num_hidden_layers": layers,
            "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
            "pad_token_id": 0, "use_cache": True}


def make_full_width_checkpoint(folder: Path, layers: int, preset: str = "7b", seed: int = 0,
                               shard_bytes: int = 1 << 30, progress: Callable[[str], None] = lambda s: None) -> Path:
    """The released AVG-LLaVA layout at real widths with `layers` decoder layers, in bf16
    shards of at most `shard_bytes`.  Tensors are made one at a time and a shard is written
    as soon as it is full, so memory stays near one shard."""
    import torch
    from safetensors.torch import save_file

    from avg_edge.model.checkpoint import checkpoint_name
    from avg_edge.model.config import AvgLlavaConfig
    from avg_edge.model.llava import AvgLlavaModel

    folder = Path(folder)
    if folder.exists():
        raise FileExistsError(f"{folder} already exists")
    cfg = full_width_config(preset, layers)
    with torch.device("meta"):
        shapes = {checkpoint_name(k): tuple(v.shape)
                  for k, v in AvgLlavaModel(AvgLlavaConfig.from_dict(cfg)).state_dict().items()}
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        sentencepiece_of_size(tmp, cfg["vocab_size"])
        names = sorted(shapes)
        groups: list[list[str]] = [[]]
        size = 0
        for name in names:
            nbytes = 2 * int(torch.Size(shapes[name]).numel())
            if groups[-1] and size + nbytes > shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(name)
            size += nbytes
        weight_map, total = {}, 0
        for i, group in enumerate(groups, 1):
            fname = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
            shard = {n: _init_tensor(n, shapes[n], seed).to(torch.bfloat16) for n in group}
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
            total += sum(t.numel() * 2 for t in shard.values())
            weight_map.update({n: fname for n in group})
            del shard
            progress(f"wrote {fname} ({i}/{len(groups)})")
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--preset", choices=("tiny", "7b"), default="tiny")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers (7b preset; the released model has 32)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.preset == "tiny":
        make_tiny_checkpoint(a.out, seed=a.seed)
    else:
        make_full_width_checkpoint(a.out, a.layers, a.preset, a.seed, progress=print)
    print(a.out)


if __name__ == "__main__":
    main()
